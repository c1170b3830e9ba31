//! Leases: the row mapping, issuance inside a task, activation, lookup (by
//! id and by fingerprint, with the task) and renewal. Moving leases towards
//! their end is in [`super::lifecycle`].

use std::sync::LazyLock;

use keymint_core::Timestamp;
use keymint_core::audit::AuditDraft;
use keymint_core::model::{EndReason, Lease, LeaseState, Revocability, Task};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::row::{bad_column, json_list, limit, to_json_list};
use super::tasks::{TASK_COLS, TASK_NCOLS, task_from_row};
use super::writer::Writer;
use crate::{FilterValue, LeaseFilter, LeaseGrantFn, RenewFn, Result, StoreError};

pub(super) const LEASE_COLS: &str = "id, task_id, workload, role, engine, scopes, state, revocability, fingerprint, \
     created_ms, expires_ms, ended_ms, end_reason, revoke_attempts, next_attempt_ms, last_error, engine_data";

/// A lease by id: made once, not formatted per call.
static LEASE_BY_ID: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {LEASE_COLS} FROM leases WHERE id = ?1"));

fn prefixed(prefix: &str, cols: &str) -> String {
    cols.split(", ")
        .map(|c| format!("{prefix}.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

static LEASE_AND_TASK: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {}, {} FROM leases l JOIN tasks t ON t.id = l.task_id WHERE l.fingerprint = ?1",
        prefixed("t", TASK_COLS),
        prefixed("l", LEASE_COLS)
    )
});

pub(super) fn lease_from_row(r: &Row<'_>, o: usize) -> rusqlite::Result<Lease> {
    let state: String = r.get(o + 6)?;
    let revocability: String = r.get(o + 7)?;
    let end_reason: Option<String> = r.get(o + 12)?;
    let engine_data: Option<String> = r.get(o + 16)?;
    let engine: String = r.get(o + 4)?;
    Ok(Lease {
        id: r.get(o)?,
        task: r.get(o + 1)?,
        workload: r.get(o + 2)?,
        role: r.get(o + 3)?,
        engine: engine.parse().map_err(|_| bad_column("lease engine"))?,
        scopes: json_list(&r.get::<_, String>(o + 5)?)?,
        state: LeaseState::parse(&state).ok_or_else(|| bad_column("lease state"))?,
        revocability: match revocability.as_str() {
            "expire_only" => Revocability::ExpireOnly,
            _ => Revocability::Revocable,
        },
        fingerprint: r.get(o + 8)?,
        created_at: Timestamp(r.get(o + 9)?),
        expires_at: Timestamp(r.get(o + 10)?),
        ended_at: r.get::<_, Option<i64>>(o + 11)?.map(Timestamp),
        end_reason: end_reason.as_deref().and_then(EndReason::parse),
        revoke_attempts: u32::try_from(r.get::<_, i64>(o + 13)?).unwrap_or(u32::MAX),
        next_attempt_at: r.get::<_, Option<i64>>(o + 14)?.map(Timestamp),
        last_error: r.get(o + 15)?,
        engine_data: match engine_data {
            Some(s) => serde_json::from_str(&s).map_err(|_| bad_column("engine data"))?,
            None => serde_json::Value::Null,
        },
    })
}

fn revocability_str(r: Revocability) -> &'static str {
    match r {
        Revocability::Revocable => "revocable",
        Revocability::ExpireOnly => "expire_only",
    }
}

pub(super) fn insert_lease_row(conn: &Connection, l: &Lease) -> Result<()> {
    let engine_data = if l.engine_data.is_null() {
        None
    } else {
        Some(l.engine_data.to_string())
    };
    conn.prepare_cached(
        "INSERT INTO leases (id, task_id, workload, role, engine, scopes, state, revocability, \
         fingerprint, created_ms, expires_ms, engine_data) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        l.id,
        l.task,
        l.workload,
        l.role,
        l.engine.as_str(),
        to_json_list(&l.scopes),
        l.state.as_str(),
        revocability_str(l.revocability),
        l.fingerprint,
        l.created_at.millis(),
        l.expires_at.millis(),
        engine_data,
    ])?;
    Ok(())
}

pub(super) fn query_leases(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Lease>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, |r| lease_from_row(r, 0))?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

pub(super) fn insert(w: &mut Writer<'_>, task: &str, grant: LeaseGrantFn) -> Result<Lease> {
    let t = w.task(task)?.ok_or(StoreError::NotFound("task"))?;
    let (lease, audit) = grant(&t)?;
    insert_lease_row(w.conn, &lease)?;
    w.audit(audit)?;
    Ok(lease)
}

pub(super) fn activate(w: &mut Writer<'_>, id: &str, audit: AuditDraft) -> Result<bool> {
    let n = w
        .conn
        .prepare_cached("UPDATE leases SET state = 'active' WHERE id = ?1 AND state = 'pending'")?
        .execute([id])?;
    if n == 1 {
        w.audit(audit)?;
    }
    Ok(n == 1)
}

pub(super) fn activate_minted(
    w: &mut Writer<'_>,
    id: &str,
    fingerprint: &str,
    engine_data: &serde_json::Value,
    audit: AuditDraft,
) -> Result<bool> {
    let data = (!engine_data.is_null()).then(|| engine_data.to_string());
    let n = w
        .conn
        .prepare_cached(
            "UPDATE leases SET state = 'active', fingerprint = ?2, engine_data = ?3 \
             WHERE id = ?1 AND state = 'pending'",
        )?
        .execute(params![id, fingerprint, data])?;
    if n == 1 {
        w.audit(audit)?;
    }
    Ok(n == 1)
}

pub(super) fn get(c: &Connection, id: &str) -> Result<Option<Lease>> {
    Ok(c.prepare_cached(&LEASE_BY_ID)?
        .query_row([id], |r| lease_from_row(r, 0))
        .optional()?)
}

pub(super) fn by_fingerprint(c: &Connection, fp: &str) -> Result<Option<(Lease, Task)>> {
    Ok(c.prepare_cached(&LEASE_AND_TASK)?
        .query_row([fp], |r| {
            Ok((lease_from_row(r, TASK_NCOLS)?, task_from_row(r, 0)?))
        })
        .optional()?)
}

pub(super) fn list(c: &Connection, f: &LeaseFilter) -> Result<Vec<Lease>> {
    let (sql, params) = list_query(f);
    query_leases(c, &sql, rusqlite::params_from_iter(params))
}

/// The list's SQL with only the filter's set conditions, and its values.
fn list_query(f: &LeaseFilter) -> (String, Vec<rusqlite::types::Value>) {
    let conditions = f.conditions();
    let mut sql = format!("SELECT {LEASE_COLS} FROM leases WHERE 1");
    let mut params: Vec<rusqlite::types::Value> = Vec::with_capacity(conditions.len() + 1);
    for (i, (col, op, value)) in conditions.into_iter().enumerate() {
        sql.push_str(&format!(" AND {col} {op} ?{}", i + 1));
        params.push(match value {
            FilterValue::Text(v) => v.to_owned().into(),
            FilterValue::Millis(v) => v.into(),
        });
    }
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", params.len() + 1));
    params.push(limit(f.limit).into());
    (sql, params)
}

pub(super) fn renew(w: &mut Writer<'_>, id: &str, renew: RenewFn) -> Result<Lease> {
    let mut lease = w.lease(id)?.ok_or(StoreError::NotFound("lease"))?;
    let task = w.task(&lease.task)?.ok_or(StoreError::NotFound("task"))?;
    let (expires, audit) = renew(&lease, &task)?;
    w.conn
        .prepare_cached("UPDATE leases SET expires_ms = ?2 WHERE id = ?1")?
        .execute(params![id, expires.millis()])?;
    w.audit(audit)?;
    lease.expires_at = expires;
    Ok(lease)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How SQLite plans a list with `filter`, in EXPLAIN QUERY PLAN's words.
    fn plan(filter: &LeaseFilter) -> String {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        let (sql, params) = list_query(filter);
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = stmt
            .query_map(rusqlite::params_from_iter(params), |r| {
                r.get::<_, String>(3)
            })
            .unwrap();
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .unwrap()
            .join("; ")
    }

    /// A list narrowed by task, workload or role reads that index, not
    /// every lease of the store newest first (the `(? IS NULL OR …)` form
    /// planned as a walk of the primary key).
    #[test]
    fn a_narrowed_list_reads_its_index() {
        for (filter, index) in [
            (
                LeaseFilter {
                    task: Some("tsk_x".into()),
                    limit: 50,
                    ..LeaseFilter::default()
                },
                "leases_task",
            ),
            (
                LeaseFilter {
                    workload: Some("w".into()),
                    state: Some(LeaseState::Active),
                    limit: 50,
                    ..LeaseFilter::default()
                },
                "leases_workload",
            ),
            (
                LeaseFilter {
                    role: Some("r".into()),
                    before: Some("lse_x".into()),
                    limit: 50,
                    ..LeaseFilter::default()
                },
                "leases_role",
            ),
        ] {
            let plan = plan(&filter);
            assert!(plan.contains(index), "{filter:?}: {plan}");
        }
    }
}
