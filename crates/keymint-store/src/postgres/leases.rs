//! Leases: the row mapping, issuance inside a task, activation, lookup,
//! renewal, and their way to an end (revocation requests, expiry, retries,
//! confirmation), which the SQLite store keeps in a `lifecycle` module.
//!
//! Claims: `expire_due` and `due_revocations` take their rows with
//! `FOR UPDATE SKIP LOCKED` and move the next attempt past the claim window
//! in the same statement, so two replicas sweeping at once never hand out
//! the same lease (and the writer's chain-head lock already orders them).

use std::sync::LazyLock;

use deadpool_postgres::ClientWrapper;
use keymint_core::Timestamp;
use keymint_core::audit::AuditDraft;
use keymint_core::model::{EndReason, Lease, LeaseState, Revocability, Task};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::row::{Params, bad, execute, json_list, limit, query, query_opt, to_json_list};
use super::tasks::{TASK_COLS, TASK_NCOLS, task_from_row};
use super::writer::PgWriter;
use crate::{
    FilterValue, LeaseFilter, LeaseGrantFn, LeaseSelector, RenewFn, Result, RevocationDone,
    StoreError,
};

pub(super) const LEASE_COLS: &str = "id, task_id, workload, role, engine, scopes, state, revocability, fingerprint, \
     created_ms, expires_ms, ended_ms, end_reason, revoke_attempts, next_attempt_ms, last_error, engine_data";

fn prefixed(prefix: &str, cols: &str) -> String {
    cols.split(", ")
        .map(|c| format!("{prefix}.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

static LEASE_AND_TASK: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {}, {} FROM leases l JOIN tasks t ON t.id = l.task_id WHERE l.fingerprint = $1",
        prefixed("t", TASK_COLS),
        prefixed("l", LEASE_COLS)
    )
});

fn unreadable(what: &str) -> StoreError {
    StoreError::Backend(format!("stored {what} unreadable"))
}

pub(super) fn lease_from_row(r: &Row, o: usize) -> Result<Lease> {
    let state: String = r.try_get(o + 6).map_err(bad)?;
    let revocability: String = r.try_get(o + 7).map_err(bad)?;
    let end_reason: Option<String> = r.try_get(o + 12).map_err(bad)?;
    let engine_data: Option<String> = r.try_get(o + 16).map_err(bad)?;
    let engine: String = r.try_get(o + 4).map_err(bad)?;
    Ok(Lease {
        id: r.try_get(o).map_err(bad)?,
        task: r.try_get(o + 1).map_err(bad)?,
        workload: r.try_get(o + 2).map_err(bad)?,
        role: r.try_get(o + 3).map_err(bad)?,
        engine: engine.parse().map_err(|_| unreadable("lease engine"))?,
        scopes: json_list(&r.try_get::<_, String>(o + 5).map_err(bad)?)?,
        state: LeaseState::parse(&state).ok_or_else(|| unreadable("lease state"))?,
        revocability: match revocability.as_str() {
            "expire_only" => Revocability::ExpireOnly,
            _ => Revocability::Revocable,
        },
        fingerprint: r.try_get(o + 8).map_err(bad)?,
        created_at: Timestamp(r.try_get(o + 9).map_err(bad)?),
        expires_at: Timestamp(r.try_get(o + 10).map_err(bad)?),
        ended_at: r
            .try_get::<_, Option<i64>>(o + 11)
            .map_err(bad)?
            .map(Timestamp),
        end_reason: end_reason.as_deref().and_then(EndReason::parse),
        revoke_attempts: u32::try_from(r.try_get::<_, i64>(o + 13).map_err(bad)?)
            .unwrap_or(u32::MAX),
        next_attempt_at: r
            .try_get::<_, Option<i64>>(o + 14)
            .map_err(bad)?
            .map(Timestamp),
        last_error: r.try_get(o + 15).map_err(bad)?,
        engine_data: match engine_data {
            Some(s) => serde_json::from_str(&s).map_err(|_| unreadable("engine data"))?,
            None => serde_json::Value::Null,
        },
    })
}

async fn query_leases(c: &ClientWrapper, sql: &str, params: Params<'_>) -> Result<Vec<Lease>> {
    query(c, sql, params)
        .await?
        .iter()
        .map(|r| lease_from_row(r, 0))
        .collect()
}

fn revocability_str(r: Revocability) -> &'static str {
    match r {
        Revocability::Revocable => "revocable",
        Revocability::ExpireOnly => "expire_only",
    }
}

/// Keeps a new lease row for the batch's multi-row insert
/// ([`PgWriter::flush`]).
fn defer_lease_row(w: &mut PgWriter, l: Lease) {
    let d = w.deferred();
    d.engine_data
        .push((!l.engine_data.is_null()).then(|| l.engine_data.to_string()));
    d.engine.push(l.engine.as_str());
    d.scopes.push(to_json_list(&l.scopes));
    d.state.push(l.state.as_str());
    d.revocability.push(revocability_str(l.revocability));
    d.created_ms.push(l.created_at.millis());
    d.expires_ms.push(l.expires_at.millis());
    d.lease_id.push(l.id);
    d.task_id.push(l.task);
    d.workload.push(l.workload);
    d.role.push(l.role);
    d.fingerprint.push(l.fingerprint);
}

/// Records a lease granted against its task as this transaction sees it.
/// No round trip of its own in a batch: the task is read with the head's
/// lock (the cache of [`PgWriter::task_cached`]; this job changes no task),
/// and the lease and its event are kept for the batch's multi-row inserts,
/// sent without waiting for their answers. The batch's head update, always
/// awaited before COMMIT, reports a failure of either, and then nothing of
/// the batch is committed or acknowledged.
pub(super) async fn insert(w: &mut PgWriter, task: String, grant: LeaseGrantFn) -> Result<Lease> {
    let t = w
        .task_cached(&task)
        .await?
        .ok_or(StoreError::NotFound("task"))?;
    let (lease, audit) = grant(&t)?;
    let (event, line) = w.seal(audit);
    let d = w.deferred();
    d.seq.push(event.seq as i64);
    d.hash.push(event.hash);
    d.event.push(line);
    defer_lease_row(w, lease.clone());
    Ok(lease)
}

pub(super) async fn activate(w: &mut PgWriter, id: String, audit: AuditDraft) -> Result<bool> {
    let n = execute(
        w.c(),
        "UPDATE leases SET state = 'active' WHERE id = $1 AND state = 'pending'",
        &[&id],
    )
    .await?;
    if n == 1 {
        w.audit(audit).await?;
    }
    Ok(n == 1)
}

/// Activates a pending lease whose secret the provider made: its real
/// fingerprint and what revoking it needs are recorded with it.
pub(super) async fn activate_minted(
    w: &mut PgWriter,
    id: String,
    fingerprint: String,
    engine_data: serde_json::Value,
    audit: AuditDraft,
) -> Result<bool> {
    let data = (!engine_data.is_null()).then(|| engine_data.to_string());
    let n = execute(
        w.c(),
        "UPDATE leases SET state = 'active', fingerprint = $2, engine_data = $3 \
         WHERE id = $1 AND state = 'pending'",
        &[&id, &fingerprint, &data],
    )
    .await?;
    if n == 1 {
        w.audit(audit).await?;
    }
    Ok(n == 1)
}

pub(super) async fn get(c: &ClientWrapper, id: &str) -> Result<Option<Lease>> {
    let sql = format!("SELECT {LEASE_COLS} FROM leases WHERE id = $1");
    query_opt(c, &sql, &[&id])
        .await?
        .map(|r| lease_from_row(&r, 0))
        .transpose()
}

pub(super) async fn by_fingerprint(c: &ClientWrapper, fp: &str) -> Result<Option<(Lease, Task)>> {
    match query_opt(c, &LEASE_AND_TASK, &[&fp]).await? {
        Some(r) => Ok(Some((
            lease_from_row(&r, TASK_NCOLS)?,
            task_from_row(&r, 0)?,
        ))),
        None => Ok(None),
    }
}

pub(super) async fn list(c: &ClientWrapper, f: &LeaseFilter) -> Result<Vec<Lease>> {
    let conditions = f.conditions();
    let mut sql = format!("SELECT {LEASE_COLS} FROM leases WHERE true");
    let mut values: Vec<Box<dyn ToSql + Sync + Send>> = Vec::with_capacity(conditions.len() + 1);
    for (i, (col, op, value)) in conditions.into_iter().enumerate() {
        sql.push_str(&format!(" AND {col} {op} ${}", i + 1));
        values.push(match value {
            FilterValue::Text(v) => Box::new(v.to_owned()),
            FilterValue::Millis(v) => Box::new(v),
        });
    }
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", values.len() + 1));
    values.push(Box::new(limit(f.limit)));
    let params: Vec<&(dyn ToSql + Sync)> = values
        .iter()
        .map(|v| v.as_ref() as &(dyn ToSql + Sync))
        .collect();
    query_leases(c, &sql, &params).await
}

pub(super) async fn renew(w: &mut PgWriter, id: String, renew: RenewFn) -> Result<Lease> {
    let mut lease = w.lease(&id).await?.ok_or(StoreError::NotFound("lease"))?;
    let task = w
        .task(&lease.task)
        .await?
        .ok_or(StoreError::NotFound("task"))?;
    let (expires, audit) = renew(&lease, &task)?;
    execute(
        w.c(),
        "UPDATE leases SET expires_ms = $2 WHERE id = $1",
        &[&id, &expires.millis()],
    )
    .await?;
    w.audit(audit).await?;
    lease.expires_at = expires;
    Ok(lease)
}

/// Moves selected leases (at most `max`; `None`: all) to `revoking`,
/// claimed by the caller for [`crate::REVOCATION_CLAIM_MS`], and audits
/// each request. The clause has `$1` (the value) and `$3` (now, in
/// milliseconds); every clause must use `$1`, or PostgreSQL cannot type it.
pub(super) async fn mark_revoking(
    w: &mut PgWriter,
    where_clause: &str,
    param: &str,
    reason: EndReason,
    now: Timestamp,
    actor: &str,
    max: Option<u32>,
) -> Result<Vec<Lease>> {
    // The state is checked again outside the sub-select: a row another
    // transaction moved meanwhile is re-read against it.
    let sql = format!(
        "UPDATE leases SET state = 'revoking', end_reason = $2, \
         next_attempt_ms = $3::bigint + {claim} \
         WHERE id IN (SELECT id FROM leases WHERE {where_clause} \
         AND state IN ('pending', 'active') LIMIT $4) \
         AND state IN ('pending', 'active') RETURNING {LEASE_COLS}",
        claim = crate::REVOCATION_CLAIM_MS
    );
    // `LIMIT NULL` is no limit.
    let max = max.map(i64::from);
    let leases = query_leases(
        w.c(),
        &sql,
        &[&param, &reason.as_str(), &now.millis(), &max],
    )
    .await?;
    for l in &leases {
        w.audit(crate::revoke_requested_event(
            now,
            actor,
            l,
            reason.as_str(),
        ))
        .await?;
    }
    if !leases.is_empty() {
        w.revoked();
    }
    Ok(leases)
}

pub(super) async fn request_revocation(
    w: &mut PgWriter,
    selector: LeaseSelector,
    reason: EndReason,
    now: Timestamp,
    actor: String,
) -> Result<Vec<Lease>> {
    let (clause, value) = match &selector {
        LeaseSelector::Id(v) => ("id = $1", v),
        LeaseSelector::Task(v) => ("task_id = $1", v),
        LeaseSelector::Workload(v) => ("workload = $1", v),
        LeaseSelector::Role(v) => ("role = $1", v),
        LeaseSelector::Fingerprint(v) => ("fingerprint = $1", v),
    };
    let mut leases = mark_revoking(w, clause, value, reason, now, &actor, None).await?;
    let exchanged = revoke_exchanged(w, &leases, now, &actor).await?;
    leases.extend(exchanged);
    Ok(leases)
}

/// The live access tokens exchanged from any of `revoked`, moved to
/// `revoking` in the same transaction and audited one by one (as the
/// SQLite store's `revoke_exchanged`; docs/design/0026, session 32).
async fn revoke_exchanged(
    w: &mut PgWriter,
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
    // The state is checked again outside the sub-select, as in
    // `mark_revoking`.
    let sql = format!(
        "UPDATE leases SET state = 'revoking', end_reason = 'revoked', \
         next_attempt_ms = $3::bigint + {claim} \
         WHERE id IN (SELECT id FROM leases WHERE task_id = ANY($1::text[]) \
           AND engine = 'jwt' AND state IN ('pending', 'active') \
           AND (engine_data::jsonb -> 'parents') ?| $2::text[]) \
         AND state IN ('pending', 'active') RETURNING {LEASE_COLS}",
        claim = crate::REVOCATION_CLAIM_MS
    );
    let children = query_leases(w.c(), &sql, &[&tasks, &ids, &now.millis()]).await?;
    for l in &children {
        w.audit(crate::exchanged_revoke_event(now, actor, l, &ids))
            .await?;
    }
    if !children.is_empty() {
        w.revoked();
    }
    Ok(children)
}

/// Up to `n` pending or active leases of ended tasks (of `task`, or of any
/// ended task whose hard end has not passed) to `revoking`.
pub(super) async fn revoke_ended_leases(
    w: &mut PgWriter,
    task: Option<String>,
    now: Timestamp,
    actor: String,
    n: u32,
) -> Result<Vec<Lease>> {
    // `$3` is `now`. A lease never outlives its task's hard end, so leases
    // of tasks past it are the expiry sweep's. Without a task, `$1` is
    // the empty string.
    let (clause, value) = match &task {
        Some(t) => (
            "task_id = $1 AND EXISTS (SELECT 1 FROM tasks WHERE id = $1 AND status <> 'active')",
            t.as_str(),
        ),
        None => (
            "$1::text = '' AND task_id IN (SELECT id FROM tasks \
             WHERE status <> 'active' AND expires_ms > $3)",
            "",
        ),
    };
    mark_revoking(
        w,
        clause,
        value,
        EndReason::TaskEnded,
        now,
        &actor,
        Some(n.max(1)),
    )
    .await
}

pub(super) async fn expire_due(w: &mut PgWriter, now: Timestamp, n: u32) -> Result<Vec<Lease>> {
    let sql = format!(
        "UPDATE leases SET state = 'revoking', end_reason = 'expired', next_attempt_ms = $3 \
         WHERE id IN (SELECT id FROM leases WHERE state = 'active' AND expires_ms <= $1 \
         ORDER BY expires_ms LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING {LEASE_COLS}"
    );
    let claim = now.plus_millis(crate::REVOCATION_CLAIM_MS).millis();
    let leases = query_leases(w.c(), &sql, &[&now.millis(), &limit(n), &claim]).await?;
    if !leases.is_empty() {
        w.revoked();
    }
    Ok(leases)
}

/// Leases in `revoking` whose next attempt is due, claimed for the caller
/// (returned as claimed): their next attempt moves to the end of the claim
/// window, so another replica's sweep does not take them meanwhile.
pub(super) async fn due_revocations(
    w: &mut PgWriter,
    now: Timestamp,
    n: u32,
) -> Result<Vec<Lease>> {
    let sql = format!(
        "UPDATE leases SET next_attempt_ms = $3 \
         WHERE id IN (SELECT id FROM leases WHERE state = 'revoking' AND next_attempt_ms <= $1 \
         ORDER BY next_attempt_ms LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING {LEASE_COLS}"
    );
    let claim = now.plus_millis(crate::REVOCATION_CLAIM_MS).millis();
    query_leases(w.c(), &sql, &[&now.millis(), &limit(n), &claim]).await
}

/// Pending leases a crash left: this replica's (or an unowned one's)
/// created before `before`, and any of a dead replica's. A live replica's
/// lease being issued is never taken (docs/design/0022).
pub(super) async fn stale_pending(
    c: &ClientWrapper,
    me: &str,
    before: Timestamp,
    n: u32,
) -> Result<Vec<Lease>> {
    let sql = format!(
        "SELECT {LEASE_COLS} FROM leases WHERE state = 'pending' \
         AND ((created_ms < $1 AND (owner IS NULL OR owner = $3)) OR {}) \
         ORDER BY created_ms LIMIT $2",
        super::replicas::owner_dead("owner", "$3")
    );
    query_leases(c, &sql, &[&before.millis(), &limit(n), &me]).await
}

pub(super) async fn finish_revocations(
    w: &mut PgWriter,
    done: Vec<RevocationDone>,
    now: Timestamp,
) -> Result<()> {
    for d in done {
        let Some(l) = w.lease(&d.lease).await? else {
            continue;
        };
        if l.state != LeaseState::Revoking {
            continue;
        }
        let fin = l.end_reason.unwrap_or(EndReason::Revoked).final_state();
        execute(
            w.c(),
            "UPDATE leases SET state = $2, ended_ms = $3, next_attempt_ms = NULL, \
             last_error = NULL WHERE id = $1",
            &[&d.lease, &fin.as_str(), &now.millis()],
        )
        .await?;
        w.audit(d.audit).await?;
    }
    Ok(())
}

pub(super) async fn revocation_failed(
    w: &mut PgWriter,
    id: String,
    next_attempt: Timestamp,
    error: String,
    audit: AuditDraft,
) -> Result<()> {
    let n = execute(
        w.c(),
        "UPDATE leases SET state = 'revoking', ended_ms = NULL, \
         revoke_attempts = revoke_attempts + 1, next_attempt_ms = $2, last_error = $3 \
         WHERE id = $1 AND state IN ('revoking', 'revoked')",
        &[&id, &next_attempt.millis(), &error],
    )
    .await?;
    if n == 1 {
        w.audit(audit).await?;
    }
    Ok(())
}

/// The earliest moment the expiry manager has work: one indexed query per
/// kind (task deadlines, lease expiries, revocation retries).
pub(super) async fn next_deadline(c: &ClientWrapper) -> Result<Option<Timestamp>> {
    let row = query_opt(
        c,
        "SELECT LEAST( \
           (SELECT deadline_ms FROM tasks WHERE status = 'active' ORDER BY deadline_ms LIMIT 1), \
           (SELECT expires_ms FROM leases WHERE state = 'active' ORDER BY expires_ms LIMIT 1), \
           (SELECT next_attempt_ms FROM leases WHERE state = 'revoking' \
            ORDER BY next_attempt_ms LIMIT 1))",
        &[],
    )
    .await?;
    Ok(match row {
        Some(r) => r.try_get::<_, Option<i64>>(0).map_err(bad)?.map(Timestamp),
        None => None,
    })
}
