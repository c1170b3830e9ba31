//! The smaller areas: the audit chain as read back (events are appended
//! only by [`super::writer::PgWriter::audit`]), sink cursors, sealed
//! secrets, approvals, registration entries, retention and counts.

use deadpool_postgres::ClientWrapper;
use keymint_core::Timestamp;
use keymint_core::audit::{AuditDraft, AuditEvent};
use keymint_core::model::{Approval, ApprovalStatus, LeaseState, RegistrationEntry};
use tokio_postgres::Row;

use super::row::{Params, bad, execute, limit, query, query_opt};
use super::writer::PgWriter;
use crate::{ApprovalChange, Counts, Pruned, Result, StoreError};

// ---- audit ----

/// A stored row `(seq, event)` read as an event; one that does not read
/// as one is named by its seq, never skipped.
fn event(r: &Row) -> Result<AuditEvent> {
    let seq = r.try_get::<_, i64>(0).map_err(bad)?.max(0) as u64;
    r.try_get::<_, &str>(1)
        .ok()
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or(StoreError::AuditUnreadable(seq))
}

/// Events after `after`. Appends hold the chain-head lock until they
/// commit, so what is committed is always a gapless prefix of the chain.
pub(super) async fn audit_after(c: &ClientWrapper, after: u64, n: u32) -> Result<Vec<AuditEvent>> {
    query(
        c,
        "SELECT seq, event FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
        &[&crate::seq_cursor(after), &limit(n)],
    )
    .await?
    .iter()
    .map(event)
    .collect()
}

pub(super) async fn audit_lines_after(
    c: &ClientWrapper,
    after: u64,
    n: u32,
) -> Result<Vec<(u64, String)>> {
    query(
        c,
        "SELECT seq, event FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
        &[&crate::seq_cursor(after), &limit(n)],
    )
    .await?
    .iter()
    .map(|r| {
        Ok((
            r.try_get::<_, i64>(0).map_err(bad)?.max(0) as u64,
            r.try_get::<_, String>(1).map_err(bad)?,
        ))
    })
    .collect()
}

pub(super) async fn audit_tail(c: &ClientWrapper, n: u32) -> Result<Vec<AuditEvent>> {
    let mut out = query(
        c,
        "SELECT seq, event FROM audit ORDER BY seq DESC LIMIT $1",
        &[&limit(n)],
    )
    .await?
    .iter()
    .map(event)
    .collect::<Result<Vec<_>>>()?;
    out.reverse();
    Ok(out)
}

pub(super) async fn sink_cursor(c: &ClientWrapper, sink: &str) -> Result<u64> {
    let row = query_opt(c, "SELECT seq FROM sink_cursors WHERE sink = $1", &[&sink]).await?;
    Ok(match row {
        Some(r) => r.try_get::<_, i64>(0).map_err(bad)?.max(0) as u64,
        None => 0,
    })
}

pub(super) async fn set_sink_cursor(w: &mut PgWriter, sink: String, seq: u64) -> Result<()> {
    execute(
        w.c(),
        "INSERT INTO sink_cursors (sink, seq) VALUES ($1, $2) \
         ON CONFLICT (sink) DO UPDATE SET seq = excluded.seq",
        &[&sink, &(seq as i64)],
    )
    .await?;
    Ok(())
}

// ---- sealed secrets ----

pub(super) async fn put_secret(
    w: &mut PgWriter,
    name: String,
    sealed: Vec<u8>,
    now: Timestamp,
) -> Result<()> {
    execute(
        w.c(),
        "INSERT INTO secrets (name, sealed, updated_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET sealed = excluded.sealed, updated_ms = excluded.updated_ms",
        &[&name, &sealed, &now.millis()],
    )
    .await?;
    Ok(())
}

/// `Store::swap_secret`: one statement either way, so two replicas racing
/// cannot both win (the row's lock orders them; the loser matches no row).
pub(super) async fn swap_secret(
    w: &mut PgWriter,
    name: String,
    expected: Option<Vec<u8>>,
    sealed: Vec<u8>,
    now: Timestamp,
) -> Result<bool> {
    let n =
        match expected {
            None => {
                execute(
                    w.c(),
                    "INSERT INTO secrets (name, sealed, updated_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO NOTHING",
                    &[&name, &sealed, &now.millis()],
                )
                .await?
            }
            Some(old) => execute(
                w.c(),
                "UPDATE secrets SET sealed = $2, updated_ms = $3 WHERE name = $1 AND sealed = $4",
                &[&name, &sealed, &now.millis(), &old],
            )
            .await?,
        };
    Ok(n == 1)
}

/// `Store::claim_once` (see the SQLite twin).
pub(super) async fn claim_once(
    w: &mut PgWriter,
    key: String,
    until: Timestamp,
    now: Timestamp,
) -> Result<bool> {
    let name = format!("once/{key}");
    let empty: Vec<u8> = Vec::new();
    let n = execute(
        w.c(),
        "INSERT INTO secrets (name, sealed, updated_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET updated_ms = excluded.updated_ms \
         WHERE secrets.updated_ms <= $4",
        &[&name, &empty, &until.millis(), &now.millis()],
    )
    .await?;
    execute(
        w.c(),
        "DELETE FROM secrets WHERE name IN (SELECT name FROM secrets \
         WHERE name >= 'once/' AND name < 'once0' AND updated_ms <= $1 LIMIT 16)",
        &[&now.millis()],
    )
    .await?;
    Ok(n == 1)
}

pub(super) async fn get_secret(c: &ClientWrapper, name: &str) -> Result<Option<Vec<u8>>> {
    query_opt(c, "SELECT sealed FROM secrets WHERE name = $1", &[&name])
        .await?
        .map(|r| r.try_get(0).map_err(bad))
        .transpose()
}

// ---- approvals ----

fn approval_from_row(r: &Row) -> Result<Approval> {
    let key: String = r.try_get(0).map_err(bad)?;
    let doc: String = r.try_get(1).map_err(bad)?;
    let mut a: Approval = serde_json::from_str(&doc)
        .map_err(|_| StoreError::Backend("stored approval unreadable".into()))?;
    a.requester_key = key;
    Ok(a)
}

async fn query_approvals(
    c: &ClientWrapper,
    sql: &str,
    params: Params<'_>,
) -> Result<Vec<Approval>> {
    query(c, sql, params)
        .await?
        .iter()
        .map(approval_from_row)
        .collect()
}

fn approval_doc(a: &Approval) -> Result<String> {
    serde_json::to_string(a).map_err(|e| StoreError::Backend(e.to_string()))
}

pub(super) async fn create_approval(
    w: &mut PgWriter,
    a: Approval,
    audit: AuditDraft,
) -> Result<()> {
    let doc = approval_doc(&a)?;
    execute(
        w.c(),
        "INSERT INTO approvals (id, status, expires_ms, requester_key, announce_ms, doc) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &a.id,
            &a.status.as_str(),
            &a.expires_at.millis(),
            &a.requester_key,
            &a.created_at.millis(),
            &doc,
        ],
    )
    .await?;
    w.audit(audit).await?;
    Ok(())
}

pub(super) async fn get_approval(c: &ClientWrapper, id: &str) -> Result<Option<Approval>> {
    query_opt(
        c,
        "SELECT requester_key, doc FROM approvals WHERE id = $1",
        &[&id],
    )
    .await?
    .map(|r| approval_from_row(&r))
    .transpose()
}

pub(super) async fn list_approvals(
    c: &ClientWrapper,
    status: Option<ApprovalStatus>,
    n: u32,
) -> Result<Vec<Approval>> {
    let status = status.map(ApprovalStatus::as_str);
    query_approvals(
        c,
        "SELECT requester_key, doc FROM approvals WHERE ($1::text IS NULL OR status = $1) \
         ORDER BY id DESC LIMIT $2",
        &[&status, &limit(n)],
    )
    .await
}

pub(super) async fn transition_approval(
    w: &mut PgWriter,
    ch: ApprovalChange,
) -> Result<Option<Approval>> {
    let cur = query_opt(
        w.c(),
        "SELECT requester_key, doc FROM approvals WHERE id = $1 FOR UPDATE",
        &[&ch.id],
    )
    .await?
    .map(|r| approval_from_row(&r))
    .transpose()?;
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
    execute(
        w.c(),
        "UPDATE approvals SET status = $2, doc = $3, \
         announce_ms = CASE WHEN $2 = 'pending' THEN announce_ms ELSE NULL END \
         WHERE id = $1",
        &[&a.id, &a.status.as_str(), &doc],
    )
    .await?;
    w.audit(ch.audit).await?;
    Ok(Some(a))
}

/// Closes the open (pending and approved) approvals of task `task`, which
/// has just ended as `status` (in its end's transaction): they become
/// `cancelled`, with a note saying why, one `approval.cancelled` event each
/// (as the SQLite store's `close_of_task`).
pub(super) async fn close_approvals_of_task(
    w: &mut PgWriter,
    task: &str,
    status: &str,
    now: Timestamp,
    actor: &str,
) -> Result<()> {
    let open = query_approvals(
        w.c(),
        "SELECT requester_key, doc FROM approvals \
         WHERE status IN ('pending', 'approved') AND expires_ms > $2 \
         AND (doc::jsonb ->> 'task') = $1 ORDER BY id FOR UPDATE",
        &[&task, &now.millis()],
    )
    .await?;
    for mut a in open {
        let was = a.status;
        a.status = ApprovalStatus::Cancelled;
        a.note = Some(crate::closing_note(a.note.as_deref(), task, status));
        let doc = approval_doc(&a)?;
        execute(
            w.c(),
            "UPDATE approvals SET status = 'cancelled', doc = $2, announce_ms = NULL WHERE id = $1",
            &[&a.id, &doc],
        )
        .await?;
        w.audit(crate::cancelled_event(&a, was, task, status, now, actor))
            .await?;
    }
    Ok(())
}

pub(super) async fn any_expired_approval(c: &ClientWrapper, now: Timestamp) -> Result<bool> {
    let row = query_opt(
        c,
        "SELECT EXISTS (SELECT 1 FROM approvals \
         WHERE status IN ('pending', 'approved') AND expires_ms <= $1)",
        &[&now.millis()],
    )
    .await?;
    Ok(match row {
        Some(r) => r.try_get(0).map_err(bad)?,
        None => false,
    })
}

pub(super) async fn expire_approvals(
    w: &mut PgWriter,
    now: Timestamp,
    n: u32,
) -> Result<Vec<Approval>> {
    let due = query_approvals(
        w.c(),
        "SELECT requester_key, doc FROM approvals \
         WHERE status IN ('pending', 'approved') AND expires_ms <= $1 \
         ORDER BY expires_ms LIMIT $2 FOR UPDATE SKIP LOCKED",
        &[&now.millis(), &limit(n)],
    )
    .await?;
    let mut out = Vec::with_capacity(due.len());
    for mut a in due {
        let was = a.status;
        a.status = ApprovalStatus::Expired;
        let doc = approval_doc(&a)?;
        execute(
            w.c(),
            "UPDATE approvals SET status = 'expired', doc = $2, announce_ms = NULL WHERE id = $1",
            &[&a.id, &doc],
        )
        .await?;
        let mut ev = AuditDraft::new(now, "approval.expired", "system")
            .workload(&a.workload)
            .role(&a.role)
            .data("approval", a.id.clone())
            .data("was", was.as_str());
        if let Some(t) = &a.task {
            ev = ev.task(t);
        }
        w.audit(ev).await?;
        out.push(a);
    }
    Ok(out)
}

pub(super) async fn approvals_to_announce(
    c: &ClientWrapper,
    now: Timestamp,
    n: u32,
) -> Result<Vec<Approval>> {
    query_approvals(
        c,
        "SELECT requester_key, doc FROM approvals \
         WHERE announce_ms IS NOT NULL AND announce_ms <= $1 AND status = 'pending' \
         ORDER BY announce_ms LIMIT $2",
        &[&now.millis(), &limit(n)],
    )
    .await
}

pub(super) async fn approval_announced(
    w: &mut PgWriter,
    id: String,
    next: Option<Timestamp>,
) -> Result<()> {
    execute(
        w.c(),
        "UPDATE approvals SET announce_ms = $2, announce_attempts = announce_attempts + 1 \
         WHERE id = $1",
        &[&id, &next.map(Timestamp::millis)],
    )
    .await?;
    Ok(())
}

// ---- registration entries ----

fn entry_from_row(r: &Row) -> Result<RegistrationEntry> {
    let doc: String = r.try_get(0).map_err(bad)?;
    serde_json::from_str(&doc).map_err(|_| StoreError::Backend("stored entry unreadable".into()))
}

pub(super) async fn create_entry(
    w: &mut PgWriter,
    e: RegistrationEntry,
    audit: AuditDraft,
) -> Result<()> {
    let doc = serde_json::to_string(&e).map_err(|x| StoreError::Backend(x.to_string()))?;
    execute(
        w.c(),
        "INSERT INTO entries (id, node, doc) VALUES ($1, $2, $3)",
        &[&e.id, &e.node, &doc],
    )
    .await?;
    w.audit(audit).await?;
    Ok(())
}

pub(super) async fn get_entry(c: &ClientWrapper, id: &str) -> Result<Option<RegistrationEntry>> {
    query_opt(c, "SELECT doc FROM entries WHERE id = $1", &[&id])
        .await?
        .map(|r| entry_from_row(&r))
        .transpose()
}

pub(super) async fn list_entries(
    c: &ClientWrapper,
    node: Option<&str>,
) -> Result<Vec<RegistrationEntry>> {
    query(
        c,
        "SELECT doc FROM entries WHERE $1::text IS NULL OR node = $1 ORDER BY id",
        &[&node],
    )
    .await?
    .iter()
    .map(entry_from_row)
    .collect()
}

pub(super) async fn delete_entry(
    w: &mut PgWriter,
    id: String,
    audit: AuditDraft,
) -> Result<Option<RegistrationEntry>> {
    let found = query_opt(
        w.c(),
        "DELETE FROM entries WHERE id = $1 RETURNING doc",
        &[&id],
    )
    .await?
    .map(|r| entry_from_row(&r))
    .transpose()?;
    if found.is_some() {
        w.audit(audit).await?;
    }
    Ok(found)
}

// ---- retention ----

pub(super) async fn prune_ended(
    w: &mut PgWriter,
    before: Timestamp,
    now: Timestamp,
    n: u32,
) -> Result<Pruned> {
    let ids: Vec<String> = query(
        w.c(),
        "SELECT t.id FROM tasks t WHERE t.status <> 'active' AND t.ended_ms < $1 \
         AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.task_id = t.id \
             AND l.state IN ('pending', 'active', 'revoking')) \
         AND NOT EXISTS (SELECT 1 FROM tasks c WHERE c.parent_id = t.id \
             AND c.status = 'active') \
         AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.task_id = t.id \
             AND l.revocability = 'expire_only' AND l.expires_ms > $3) \
         ORDER BY t.ended_ms LIMIT $2",
        &[&before.millis(), &limit(n), &now.millis()],
    )
    .await?
    .iter()
    .map(|r| r.try_get(0).map_err(bad))
    .collect::<Result<_>>()?;
    let mut out = Pruned::default();
    if ids.is_empty() {
        return Ok(out);
    }
    out.leases = execute(w.c(), "DELETE FROM leases WHERE task_id = ANY($1)", &[&ids]).await?;
    execute(
        w.c(),
        "DELETE FROM budgets WHERE task_id = ANY($1)",
        &[&ids],
    )
    .await?;
    out.tasks = execute(w.c(), "DELETE FROM tasks WHERE id = ANY($1)", &[&ids]).await?;
    if out.tasks > 0 {
        w.audit(
            AuditDraft::new(now, "store.pruned", "system")
                .reason("retention: tasks ended before the cutoff, with their leases")
                .data("tasks", out.tasks)
                .data("leases", out.leases)
                .data("ended_before", before.rfc3339()),
        )
        .await?;
    }
    Ok(out)
}

// ---- operations ----

/// Live tasks, leases by live state and the audit head, for the metrics.
pub(super) async fn counts(c: &ClientWrapper) -> Result<Counts> {
    let row = query_opt(
        c,
        "SELECT (SELECT COUNT(*) FROM tasks WHERE status = 'active'), \
           (SELECT COUNT(*) FROM leases WHERE state = 'pending'), \
           (SELECT COUNT(*) FROM leases WHERE state = 'active'), \
           (SELECT COUNT(*) FROM leases WHERE state = 'revoking'), \
           (SELECT seq FROM audit_head WHERE id = 1)",
        &[],
    )
    .await?
    .ok_or_else(|| StoreError::Backend("counts: no row".into()))?;
    let n = |i: usize| -> Result<u64> { Ok(row.try_get::<_, i64>(i).map_err(bad)?.max(0) as u64) };
    Ok(Counts {
        tasks_active: n(0)?,
        leases: vec![
            (LeaseState::Pending, n(1)?),
            (LeaseState::Active, n(2)?),
            (LeaseState::Revoking, n(3)?),
        ],
        audit_head: n(4)?,
    })
}
