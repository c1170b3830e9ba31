//! Approvals: requests held for a human. Each is a JSON document with its
//! status, expiry and announcement schedule in columns; transitions are
//! conditional on the current status and expiry, in one job.

use keymint_core::Timestamp;
use keymint_core::audit::AuditDraft;
use keymint_core::model::{Approval, ApprovalStatus};
use rusqlite::{Connection, OptionalExtension, params};

use super::row::limit;
use super::writer::Writer;
use crate::{ApprovalChange, Result, StoreError};

fn approval_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Approval> {
    let key: String = r.get(0)?;
    let doc: String = r.get(1)?;
    let mut a: Approval = serde_json::from_str(&doc).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, Box::new(e))
    })?;
    a.requester_key = key;
    Ok(a)
}

fn query_approvals(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Approval>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, approval_from_row)?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

fn approval_doc(a: &Approval) -> Result<String> {
    serde_json::to_string(a).map_err(|e| StoreError::Backend(e.to_string()))
}

pub(super) fn create(w: &mut Writer<'_>, a: &Approval, audit: AuditDraft) -> Result<()> {
    let doc = approval_doc(a)?;
    w.conn
        .prepare_cached(
            "INSERT INTO approvals (id, status, expires_ms, requester_key, announce_ms, doc) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            a.id,
            a.status.as_str(),
            a.expires_at.millis(),
            a.requester_key,
            a.created_at.millis(),
            doc
        ])?;
    w.audit(audit)?;
    Ok(())
}

pub(super) fn get(c: &Connection, id: &str) -> Result<Option<Approval>> {
    Ok(
        c.prepare_cached("SELECT requester_key, doc FROM approvals WHERE id = ?1")?
            .query_row([id], approval_from_row)
            .optional()?,
    )
}

pub(super) fn list(
    c: &Connection,
    status: Option<ApprovalStatus>,
    n: u32,
) -> Result<Vec<Approval>> {
    match status {
        Some(st) => query_approvals(
            c,
            "SELECT requester_key, doc FROM approvals WHERE status = ?1 ORDER BY id DESC LIMIT ?2",
            params![st.as_str(), limit(n)],
        ),
        None => query_approvals(
            c,
            "SELECT requester_key, doc FROM approvals ORDER BY id DESC LIMIT ?1",
            params![limit(n)],
        ),
    }
}

pub(super) fn transition(w: &mut Writer<'_>, ch: ApprovalChange) -> Result<Option<Approval>> {
    let cur = w
        .conn
        .prepare_cached("SELECT requester_key, doc FROM approvals WHERE id = ?1")?
        .query_row([&ch.id], approval_from_row)
        .optional()?;
    let Some(mut a) = cur else {
        return Ok(None);
    };
    if a.status != ch.from || ch.now >= a.expires_at {
        return Ok(None);
    }
    a.status = ch.to;
    if ch.by.is_some() {
        a.decided_by = ch.by;
        a.decided_at = Some(ch.now);
    }
    if ch.note.is_some() {
        a.note = ch.note;
    }
    let doc = approval_doc(&a)?;
    w.conn
        .prepare_cached(
            "UPDATE approvals SET status = ?2, doc = ?3, \
             announce_ms = CASE WHEN ?2 = 'pending' THEN announce_ms ELSE NULL END \
             WHERE id = ?1",
        )?
        .execute(params![a.id, a.status.as_str(), doc])?;
    w.audit(ch.audit)?;
    Ok(Some(a))
}

/// Closes the open approvals of task `task`, which has just ended as
/// `status` (in its end's transaction): pending and approved ones become
/// `cancelled`, with a note saying why, one `approval.cancelled` event each
/// (`was`: the status it had). A request for an ended task cannot be
/// carried out: left pending, it could still be approved; left approved,
/// the record showed a decision waiting to be redeemed that no redemption
/// could use (docs/design/0009, session 32). Open approvals past their
/// expiry are the expiry sweeper's.
pub(super) fn close_of_task(
    w: &mut Writer<'_>,
    task: &str,
    status: &str,
    now: Timestamp,
    actor: &str,
) -> Result<()> {
    let open = query_approvals(
        w.conn,
        "SELECT requester_key, doc FROM approvals \
         WHERE status IN ('pending', 'approved') AND expires_ms > ?2 \
         AND json_extract(doc, '$.task') = ?1 ORDER BY id",
        params![task, now.millis()],
    )?;
    for mut a in open {
        let was = a.status;
        a.status = ApprovalStatus::Cancelled;
        a.note = Some(crate::closing_note(a.note.as_deref(), task, status));
        let doc = approval_doc(&a)?;
        w.conn
            .prepare_cached(
                "UPDATE approvals SET status = 'cancelled', doc = ?2, announce_ms = NULL \
                 WHERE id = ?1",
            )?
            .execute(params![a.id, doc])?;
        w.audit(crate::cancelled_event(&a, was, task, status, now, actor))?;
    }
    Ok(())
}

/// Whether any open approval has expired by `now` (a read, so that the
/// sweeper's question every second does not take the writer).
pub(super) fn any_expired(c: &Connection, now: Timestamp) -> Result<bool> {
    Ok(c.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM approvals \
         WHERE status IN ('pending', 'approved') AND expires_ms <= ?1)",
    )?
    .query_row([now.millis()], |r| r.get(0))?)
}

pub(super) fn expire(w: &mut Writer<'_>, now: Timestamp, n: u32) -> Result<Vec<Approval>> {
    let due = query_approvals(
        w.conn,
        "SELECT requester_key, doc FROM approvals \
         WHERE status IN ('pending', 'approved') AND expires_ms <= ?1 \
         ORDER BY expires_ms LIMIT ?2",
        params![now.millis(), limit(n)],
    )?;
    let mut out = Vec::with_capacity(due.len());
    for mut a in due {
        let was = a.status;
        a.status = ApprovalStatus::Expired;
        let doc = approval_doc(&a)?;
        w.conn
            .prepare_cached(
                "UPDATE approvals SET status = 'expired', doc = ?2, announce_ms = NULL \
                 WHERE id = ?1",
            )?
            .execute(params![a.id, doc])?;
        let mut ev = AuditDraft::new(now, "approval.expired", "system")
            .workload(&a.workload)
            .role(&a.role)
            .data("approval", a.id.clone())
            .data("was", was.as_str());
        if let Some(t) = &a.task {
            ev = ev.task(t);
        }
        w.audit(ev)?;
        out.push(a);
    }
    Ok(out)
}

pub(super) fn to_announce(c: &Connection, now: Timestamp, n: u32) -> Result<Vec<Approval>> {
    query_approvals(
        c,
        "SELECT requester_key, doc FROM approvals \
         WHERE announce_ms IS NOT NULL AND announce_ms <= ?1 AND status = 'pending' \
         ORDER BY announce_ms LIMIT ?2",
        params![now.millis(), limit(n)],
    )
}

pub(super) fn announced(w: &mut Writer<'_>, id: &str, next: Option<Timestamp>) -> Result<()> {
    w.conn
        .prepare_cached(
            "UPDATE approvals SET announce_ms = ?2, \
             announce_attempts = announce_attempts + 1 WHERE id = ?1",
        )?
        .execute(params![id, next.map(Timestamp::millis)])?;
    Ok(())
}
