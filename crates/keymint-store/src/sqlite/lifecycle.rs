//! The end of leases and tasks over time: what the expiry manager and the
//! revocation driver ask (the next deadline, timed-out tasks, expired
//! leases, due retries, stale pending leases) and how a lease moves through
//! `revoking` to its final state.

use keymint_core::Timestamp;
use keymint_core::audit::AuditDraft;
use keymint_core::model::{EndReason, Lease, LeaseState};
use rusqlite::{Connection, OptionalExtension, params};

use super::leases::{LEASE_COLS, query_leases};
use super::row::limit;
use super::writer::Writer;
use crate::{LeaseSelector, Result, RevocationDone};

/// Moves selected leases (at most `max`; `None`: all) to `revoking` and
/// audits each request.
pub(super) fn mark_revoking(
    w: &mut Writer<'_>,
    where_clause: &str,
    param: &str,
    reason: EndReason,
    now: Timestamp,
    actor: &str,
    max: Option<u32>,
) -> Result<Vec<Lease>> {
    let sql = format!(
        "UPDATE leases SET state = 'revoking', end_reason = ?2, next_attempt_ms = ?3 \
         WHERE id IN (SELECT id FROM leases WHERE {where_clause} \
         AND state IN ('pending', 'active') LIMIT ?5) RETURNING {LEASE_COLS}"
    );
    let claim = now.plus_millis(crate::REVOCATION_CLAIM_MS).millis();
    // SQLite: a negative LIMIT is no limit. `?4` (now) is there for the
    // clauses that need it.
    let max = max.map_or(-1, i64::from);
    let leases = query_leases(
        w.conn,
        &sql,
        params![param, reason.as_str(), claim, now.millis(), max],
    )?;
    for l in &leases {
        w.audit(crate::revoke_requested_event(
            now,
            actor,
            l,
            reason.as_str(),
        ))?;
    }
    Ok(leases)
}

pub(super) fn timed_out_tasks(c: &Connection, now: Timestamp, n: u32) -> Result<Vec<String>> {
    let mut stmt = c.prepare_cached(
        "SELECT id FROM tasks WHERE status = 'active' AND deadline_ms <= ?1 \
         ORDER BY deadline_ms LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![now.millis(), limit(n)], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

pub(super) fn request_revocation(
    w: &mut Writer<'_>,
    selector: &LeaseSelector,
    reason: EndReason,
    now: Timestamp,
    actor: &str,
) -> Result<Vec<Lease>> {
    let (clause, value) = match selector {
        LeaseSelector::Id(v) => ("id = ?1", v),
        LeaseSelector::Task(v) => ("task_id = ?1", v),
        LeaseSelector::Workload(v) => ("workload = ?1", v),
        LeaseSelector::Role(v) => ("role = ?1", v),
        LeaseSelector::Fingerprint(v) => ("fingerprint = ?1", v),
    };
    let mut leases = mark_revoking(w, clause, value, reason, now, actor, None)?;
    let exchanged = revoke_exchanged(w, &leases, now, actor)?;
    leases.extend(exchanged);
    Ok(leases)
}

/// The live access tokens exchanged from any of `revoked` (directly or
/// down a chain: a token's `parents` name every lease it descends from),
/// moved to `revoking` in the same transaction, each audited
/// (`lease.revoke_requested`, `exchanged_from` the revoked ancestor). They
/// live in their ancestors' tasks (an exchange records the token in its
/// subject's task), so only those tasks are read. Without this they were
/// refused on use but listed as `active` until their own expiry
/// (docs/design/0026, session 32).
fn revoke_exchanged(
    w: &mut Writer<'_>,
    revoked: &[Lease],
    now: Timestamp,
    actor: &str,
) -> Result<Vec<Lease>> {
    if revoked.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<&str> = revoked.iter().map(|l| l.id.as_str()).collect();
    let mut tasks: Vec<&str> = revoked.iter().map(|l| l.task.as_str()).collect();
    tasks.sort_unstable();
    tasks.dedup();
    let arg = serde_json::json!({ "ids": ids, "tasks": tasks }).to_string();
    let sql = format!(
        "UPDATE leases SET state = 'revoking', end_reason = 'revoked', next_attempt_ms = ?2 \
         WHERE id IN (SELECT l.id FROM leases l \
           WHERE l.task_id IN (SELECT value FROM json_each(?1, '$.tasks')) \
           AND l.engine = 'jwt' AND l.state IN ('pending', 'active') \
           AND EXISTS (SELECT 1 FROM json_each(l.engine_data, '$.parents') p \
             WHERE p.value IN (SELECT value FROM json_each(?1, '$.ids')))) \
         RETURNING {LEASE_COLS}"
    );
    let claim = now.plus_millis(crate::REVOCATION_CLAIM_MS).millis();
    let children = query_leases(w.conn, &sql, params![arg, claim])?;
    for l in &children {
        w.audit(crate::exchanged_revoke_event(now, actor, l, &ids))?;
    }
    Ok(children)
}

/// Up to `n` pending or active leases of ended tasks (of `task`, or of any
/// ended task whose hard end has not passed) to `revoking`.
pub(super) fn revoke_ended_leases(
    w: &mut Writer<'_>,
    task: Option<&str>,
    now: Timestamp,
    actor: &str,
    n: u32,
) -> Result<Vec<Lease>> {
    // `?4` is `now`. A lease never outlives its task's hard end, so leases
    // of tasks past it are the expiry sweep's.
    let (clause, value) = match task {
        Some(t) => (
            "task_id = ?1 AND EXISTS (SELECT 1 FROM tasks WHERE id = ?1 AND status != 'active')",
            t,
        ),
        None => (
            "task_id IN (SELECT id FROM tasks WHERE status != 'active' AND expires_ms > ?4)",
            "",
        ),
    };
    mark_revoking(
        w,
        clause,
        value,
        EndReason::TaskEnded,
        now,
        actor,
        Some(n.max(1)),
    )
}

pub(super) fn expire_due(w: &mut Writer<'_>, now: Timestamp, n: u32) -> Result<Vec<Lease>> {
    let sql = format!(
        "UPDATE leases SET state = 'revoking', end_reason = 'expired', next_attempt_ms = ?3 \
         WHERE id IN (SELECT id FROM leases WHERE state = 'active' AND expires_ms <= ?1 \
         ORDER BY expires_ms LIMIT ?2) RETURNING {LEASE_COLS}"
    );
    let claim = now.plus_millis(crate::REVOCATION_CLAIM_MS).millis();
    query_leases(w.conn, &sql, params![now.millis(), limit(n), claim])
}

/// Due revocations, claimed for the caller for
/// [`crate::REVOCATION_CLAIM_MS`] (returned as claimed).
pub(super) fn due_revocations(w: &mut Writer<'_>, now: Timestamp, n: u32) -> Result<Vec<Lease>> {
    let sql = format!(
        "UPDATE leases SET next_attempt_ms = ?3 \
         WHERE id IN (SELECT id FROM leases WHERE state = 'revoking' AND next_attempt_ms <= ?1 \
         ORDER BY next_attempt_ms LIMIT ?2) RETURNING {LEASE_COLS}"
    );
    let claim = now.plus_millis(crate::REVOCATION_CLAIM_MS).millis();
    query_leases(w.conn, &sql, params![now.millis(), limit(n), claim])
}

pub(super) fn stale_pending(c: &Connection, before: Timestamp, n: u32) -> Result<Vec<Lease>> {
    let sql = format!(
        "SELECT {LEASE_COLS} FROM leases WHERE state = 'pending' AND created_ms < ?1 \
         ORDER BY created_ms LIMIT ?2"
    );
    query_leases(c, &sql, params![before.millis(), limit(n)])
}

pub(super) fn finish_revocations(
    w: &mut Writer<'_>,
    done: Vec<RevocationDone>,
    now: Timestamp,
) -> Result<()> {
    for d in done {
        let Some(l) = w.lease(&d.lease)? else {
            continue;
        };
        if l.state != LeaseState::Revoking {
            continue;
        }
        let fin = l.end_reason.unwrap_or(EndReason::Revoked).final_state();
        w.conn
            .prepare_cached(
                "UPDATE leases SET state = ?2, ended_ms = ?3, next_attempt_ms = NULL, \
                 last_error = NULL WHERE id = ?1",
            )?
            .execute(params![d.lease, fin.as_str(), now.millis()])?;
        w.audit(d.audit)?;
    }
    Ok(())
}

pub(super) fn revocation_failed(
    w: &mut Writer<'_>,
    id: &str,
    next_attempt: Timestamp,
    error: &str,
    audit: AuditDraft,
) -> Result<()> {
    let n = w
        .conn
        .prepare_cached(
            "UPDATE leases SET state = 'revoking', ended_ms = NULL, \
             revoke_attempts = revoke_attempts + 1, next_attempt_ms = ?2, last_error = ?3 \
             WHERE id = ?1 AND state IN ('revoking', 'revoked')",
        )?
        .execute(params![id, next_attempt.millis(), error])?;
    if n == 1 {
        w.audit(audit)?;
    }
    Ok(())
}

/// The earliest moment the expiry manager has work: one indexed query per
/// kind (task deadlines, lease expiries, revocation retries).
pub(super) fn next_deadline(c: &Connection) -> Result<Option<Timestamp>> {
    let mut best: Option<i64> = None;
    for sql in [
        "SELECT deadline_ms FROM tasks WHERE status = 'active' ORDER BY deadline_ms LIMIT 1",
        "SELECT expires_ms FROM leases WHERE state = 'active' ORDER BY expires_ms LIMIT 1",
        "SELECT next_attempt_ms FROM leases WHERE state = 'revoking' \
         ORDER BY next_attempt_ms LIMIT 1",
    ] {
        let v: Option<i64> = c
            .prepare_cached(sql)?
            .query_row([], |r| r.get(0))
            .optional()?;
        if let Some(v) = v {
            best = Some(best.map_or(v, |b| b.min(v)));
        }
    }
    Ok(best.map(Timestamp))
}
