//! Budgets of the egress proxy on PostgreSQL: the counters of each task's
//! sub-tree (`budgets`) and the reservations that hold part of them
//! (`reservations`), as in the SQLite backend (`sqlite/budgets.rs`).
//!
//! Every change runs in a write job, and every write transaction first
//! locks the audit chain's head row (`writer.rs`): reservations of every
//! replica are serialised by that one lock, so two can never both take the
//! last of a budget, and each decides on the latest committed counters.

use deadpool_postgres::ClientWrapper;
use keymint_core::audit::AuditDraft;
use keymint_core::{Timestamp, id};
use tokio_postgres::Row;

use super::row::{bad, execute, json_list, limit, query, query_opt, to_json_list};
use super::writer::PgWriter;
use crate::{
    BudgetFn, BudgetLevel, BudgetReservation, BudgetSettle, ChunkSettle, ReservationFor, Result,
    StoreError, SummaryFn, Usage, UsageSummary,
};

/// Deeper task trees than this are not walked (the rules never make one).
const MAX_DEPTH: usize = 64;

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn usage_at(r: &Row, o: usize) -> Result<Usage> {
    let g = |k: usize| r.try_get::<_, i64>(o + k).map(u).map_err(bad);
    Ok(Usage {
        requests: g(0)?,
        input: g(1)?,
        output: g(2)?,
        spend_nusd: g(3)?,
    })
}

/// `(used, reserved)` of one task's sub-tree.
pub(super) async fn budget_of(c: &ClientWrapper, task: &str) -> Result<(Usage, Usage)> {
    let row = query_opt(
        c,
        "SELECT used_requests, used_input, used_output, used_spend, \
                res_requests, res_input, res_output, res_spend \
         FROM budgets WHERE task_id = $1",
        &[&task],
    )
    .await?;
    match row {
        Some(r) => Ok((usage_at(&r, 0)?, usage_at(&r, 4)?)),
        None => Ok((Usage::default(), Usage::default())),
    }
}

/// Adds `used` and `reserved` to the counters of every task in `tasks` and
/// takes `release` off their reserved ones, creating missing rows at zero:
/// one statement for the whole chain. The counters saturate at
/// `i64::MAX` (as on SQLite): a sum past it was `bigint out of range`,
/// refusing every request of the chain while the huge reservation was
/// held.
async fn add(
    c: &ClientWrapper,
    tasks: &[String],
    used: Usage,
    reserved: Usage,
    release: Usage,
) -> Result<()> {
    execute(
        c,
        "INSERT INTO budgets AS b (task_id, used_requests, used_input, used_output, used_spend, \
           res_requests, res_input, res_output, res_spend) \
         SELECT t, $2::bigint, $3::bigint, $4::bigint, $5::bigint, \
           GREATEST($6::bigint - $10::bigint, 0), GREATEST($7::bigint - $11::bigint, 0), \
           GREATEST($8::bigint - $12::bigint, 0), GREATEST($9::bigint - $13::bigint, 0) \
         FROM unnest($1::text[]) AS t \
         ON CONFLICT (task_id) DO UPDATE SET \
           used_requests = LEAST(b.used_requests::numeric + $2, $14::bigint)::bigint, \
           used_input = LEAST(b.used_input::numeric + $3, $14::bigint)::bigint, \
           used_output = LEAST(b.used_output::numeric + $4, $14::bigint)::bigint, \
           used_spend = LEAST(b.used_spend::numeric + $5, $14::bigint)::bigint, \
           res_requests = LEAST(GREATEST(b.res_requests::numeric + $6 - $10, 0), $14::bigint)::bigint, \
           res_input = LEAST(GREATEST(b.res_input::numeric + $7 - $11, 0), $14::bigint)::bigint, \
           res_output = LEAST(GREATEST(b.res_output::numeric + $8 - $12, 0), $14::bigint)::bigint, \
           res_spend = LEAST(GREATEST(b.res_spend::numeric + $9 - $13, 0), $14::bigint)::bigint",
        &[
            &tasks,
            &i(used.requests),
            &i(used.input),
            &i(used.output),
            &i(used.spend_nusd),
            &i(reserved.requests),
            &i(reserved.input),
            &i(reserved.output),
            &i(reserved.spend_nusd),
            &i(release.requests),
            &i(release.input),
            &i(release.output),
            &i(release.spend_nusd),
            &i64::MAX,
        ],
    )
    .await?;
    Ok(())
}

/// The task and its ancestors (root last) with their roles and counters, in
/// one recursive query; a pruned ancestor ends the walk.
async fn levels(c: &ClientWrapper, task: &str) -> Result<Vec<BudgetLevel>> {
    let rows = query(
        c,
        "WITH RECURSIVE up (id, role, parent_id, depth) AS ( \
           SELECT id, role, parent_id, 0 FROM tasks WHERE id = $1 \
           UNION ALL \
           SELECT t.id, t.role, t.parent_id, up.depth + 1 FROM tasks t \
           JOIN up ON t.id = up.parent_id WHERE up.depth + 1 < $2) \
         SELECT up.id, up.role, \
           COALESCE(b.used_requests, 0), COALESCE(b.used_input, 0), \
           COALESCE(b.used_output, 0), COALESCE(b.used_spend, 0), \
           COALESCE(b.res_requests, 0), COALESCE(b.res_input, 0), \
           COALESCE(b.res_output, 0), COALESCE(b.res_spend, 0) \
         FROM up LEFT JOIN budgets b ON b.task_id = up.id ORDER BY up.depth",
        &[&task, &(MAX_DEPTH as i32)],
    )
    .await?;
    if rows.is_empty() {
        return Err(StoreError::NotFound("task"));
    }
    rows.iter()
        .map(|r| {
            Ok(BudgetLevel {
                task: r.try_get(0).map_err(bad)?,
                role: r.try_get(1).map_err(bad)?,
                used: usage_at(r, 2)?,
                reserved: usage_at(r, 6)?,
            })
        })
        .collect()
}

pub(super) async fn reserve(
    w: &mut PgWriter,
    who: ReservationFor,
    decide: BudgetFn,
) -> Result<BudgetReservation> {
    let levels = levels(w.c(), &who.task).await?;
    let amount = decide(&levels).map_err(StoreError::BudgetExhausted)?;
    let ids: Vec<String> = levels.into_iter().map(|l| l.task).collect();
    add(w.c(), &ids, Usage::default(), amount, Usage::default()).await?;
    let id = id::reservation_id(who.now);
    execute(
        w.c(),
        "INSERT INTO reservations (id, task_id, chain, lease_id, workload, role, fingerprint, \
         upstream, requests, input, output, spend, created_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        &[
            &id,
            &who.task,
            &to_json_list(&ids),
            &who.lease,
            &who.workload,
            &who.role,
            &who.fingerprint,
            &who.upstream,
            &i(amount.requests),
            &i(amount.input),
            &i(amount.output),
            &i(amount.spend_nusd),
            &who.now.millis(),
        ],
    )
    .await?;
    Ok(BudgetReservation {
        id,
        chain: ids,
        amount,
        created_at: who.now,
    })
}

/// Settles one open reservation; `false` if it was not open.
async fn settle_one(w: &PgWriter, s: &BudgetSettle) -> Result<bool> {
    let open = query_opt(
        w.c(),
        "SELECT chain, requests, input, output, spend FROM reservations \
         WHERE id = $1 AND settled_ms IS NULL",
        &[&s.id],
    )
    .await?;
    let Some(row) = open else {
        return Ok(false);
    };
    let chain: String = row.try_get(0).map_err(bad)?;
    let amount = usage_at(&row, 1)?;
    let used = s.used.unwrap_or(amount);
    add(w.c(), &json_list(&chain)?, used, Usage::default(), amount).await?;
    execute(
        w.c(),
        "UPDATE reservations SET settled_ms = $2, used_requests = $3, used_input = $4, \
         used_output = $5, used_spend = $6, unmetered = $7 WHERE id = $1",
        &[
            &s.id,
            &s.now.millis(),
            &i(used.requests),
            &i(used.input),
            &i(used.output),
            &i(used.spend_nusd),
            // Every request a chunk still held counts as unmetered.
            &if s.used.is_none() {
                i(amount.requests)
            } else {
                0
            },
        ],
    )
    .await?;
    Ok(true)
}

/// Settles part of one open chunk; `false` if it was not open.
async fn settle_chunk_one(w: &PgWriter, s: &ChunkSettle) -> Result<bool> {
    let open = query_opt(
        w.c(),
        "SELECT chain, requests, input, output, spend FROM reservations \
         WHERE id = $1 AND settled_ms IS NULL",
        &[&s.id],
    )
    .await?;
    let Some(row) = open else {
        return Ok(false);
    };
    let chain: String = row.try_get(0).map_err(bad)?;
    let amount = usage_at(&row, 1)?;
    let held = s.held.least(amount);
    let rest = amount.minus(held);
    let release = if s.close { rest } else { s.release.least(rest) };
    let left = rest.minus(release);
    add(
        w.c(),
        &json_list(&chain)?,
        s.used,
        Usage::default(),
        held.plus(release),
    )
    .await?;
    if !held.is_zero() || !s.used.is_zero() {
        // The use, as a settled reservation of the same lease: audited by
        // `summarise` like any other.
        execute(
            w.c(),
            "INSERT INTO reservations (id, task_id, chain, lease_id, workload, role, \
             fingerprint, upstream, requests, input, output, spend, created_ms, settled_ms, \
             used_requests, used_input, used_output, used_spend, unmetered) \
             SELECT $2, task_id, chain, lease_id, workload, role, fingerprint, upstream, \
             $3, $4, $5, $6, created_ms, $7, $8, $9, $10, $11, $12 \
             FROM reservations WHERE id = $1",
            &[
                &s.id,
                &id::reservation_id(s.now),
                &i(held.requests),
                &i(held.input),
                &i(held.output),
                &i(held.spend_nusd),
                &s.now.millis(),
                &i(s.used.requests),
                &i(s.used.input),
                &i(s.used.output),
                &i(s.used.spend_nusd),
                &i(s.unmetered),
            ],
        )
        .await?;
    }
    if s.close || left.is_zero() {
        execute(w.c(), "DELETE FROM reservations WHERE id = $1", &[&s.id]).await?;
    } else {
        execute(
            w.c(),
            "UPDATE reservations SET requests = $2, input = $3, output = $4, spend = $5 \
             WHERE id = $1",
            &[
                &s.id,
                &i(left.requests),
                &i(left.input),
                &i(left.output),
                &i(left.spend_nusd),
            ],
        )
        .await?;
    }
    Ok(true)
}

pub(super) async fn settle_chunks(w: &mut PgWriter, settles: Vec<ChunkSettle>) -> Result<u64> {
    let mut open = 0;
    for s in &settles {
        if settle_chunk_one(w, s).await? {
            open += 1;
        }
    }
    Ok(open)
}

pub(super) async fn settle(w: &mut PgWriter, settles: Vec<BudgetSettle>) -> Result<()> {
    for s in &settles {
        settle_one(w, s).await?;
    }
    Ok(())
}

/// Which open reservations are stale for the replica `me` (placeholder
/// `me`): its own (or unowned ones) made before `$1`, and any of a dead
/// replica's; a live replica's request in flight is never charged
/// (docs/design/0022).
fn stale_sql(cols: &str, me: &str) -> String {
    format!(
        "SELECT {cols} FROM reservations WHERE settled_ms IS NULL \
         AND ((created_ms < $1 AND (owner IS NULL OR owner = {me})) OR {})",
        super::replicas::owner_dead("owner", me)
    )
}

pub(super) async fn settle_stale(
    w: &mut PgWriter,
    me: &str,
    before: Timestamp,
    now: Timestamp,
    n: u32,
) -> Result<u64> {
    let ids: Vec<String> = query(
        w.c(),
        &format!("{} ORDER BY created_ms LIMIT $2", stale_sql("id", "$3")),
        &[&before.millis(), &limit(n), &me],
    )
    .await?
    .iter()
    .map(|r| r.try_get(0).map_err(bad))
    .collect::<Result<_>>()?;
    let mut done = 0;
    for id in ids {
        let s = BudgetSettle {
            id,
            used: None,
            now,
        };
        if settle_one(w, &s).await? {
            done += 1;
        }
    }
    Ok(done)
}

pub(super) async fn any_stale(c: &ClientWrapper, me: &str, before: Timestamp) -> Result<bool> {
    Ok(query_opt(
        c,
        &format!("{} LIMIT 1", stale_sql("1", "$2")),
        &[&before.millis(), &me],
    )
    .await?
    .is_some())
}

pub(super) async fn any_settled(c: &ClientWrapper) -> Result<bool> {
    Ok(query_opt(
        c,
        "SELECT 1 FROM reservations WHERE settled_ms IS NOT NULL LIMIT 1",
        &[],
    )
    .await?
    .is_some())
}

pub(super) async fn summarise(w: &mut PgWriter, n: u32, event: SummaryFn) -> Result<u64> {
    let rows = query(
        w.c(),
        "SELECT id, lease_id, task_id, workload, role, fingerprint, upstream, \
                used_requests, used_input, used_output, used_spend, unmetered, created_ms \
         FROM reservations WHERE settled_ms IS NOT NULL ORDER BY lease_id, created_ms LIMIT $1",
        &[&limit(n)],
    )
    .await?;
    let mut groups: Vec<UsageSummary> = Vec::new();
    let mut ids: Vec<String> = Vec::with_capacity(rows.len());
    for r in &rows {
        let s = |k: usize| r.try_get::<_, String>(k).map_err(bad);
        let row = UsageSummary {
            lease: s(1)?,
            task: s(2)?,
            workload: s(3)?,
            role: s(4)?,
            fingerprint: s(5)?,
            upstream: s(6)?,
            used: usage_at(r, 7)?,
            unmetered: u(r.try_get::<_, i64>(11).map_err(bad)?),
            since: Timestamp(r.try_get::<_, i64>(12).map_err(bad)?),
        };
        ids.push(s(0)?);
        match groups.last_mut() {
            Some(g) if g.lease == row.lease => {
                g.used = g.used.plus(row.used);
                g.unmetered += row.unmetered;
                g.since = g.since.min(row.since);
            }
            _ => groups.push(row),
        }
    }
    if !ids.is_empty() {
        execute(
            w.c(),
            "DELETE FROM reservations WHERE id = ANY($1)",
            &[&ids],
        )
        .await?;
    }
    for g in &groups {
        let draft: AuditDraft = event(g);
        w.audit(draft).await?;
    }
    Ok(groups.len() as u64)
}
