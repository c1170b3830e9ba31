//! Budgets of the egress proxy: the counters of each task's sub-tree
//! (`budgets`) and the reservations that hold part of them
//! (`reservations`). Every change runs in a write job, so the single writer
//! serialises reservations: two can never both take the last of a budget.

use keymint_core::audit::AuditDraft;
use keymint_core::{Timestamp, id};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::row::{json_list, limit, to_json_list};
use super::writer::Writer;
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

fn usage_at(r: &Row<'_>, o: usize) -> rusqlite::Result<Usage> {
    Ok(Usage {
        requests: u(r.get(o)?),
        input: u(r.get(o + 1)?),
        output: u(r.get(o + 2)?),
        spend_nusd: u(r.get(o + 3)?),
    })
}

/// `(used, reserved)` of one task's sub-tree.
fn counters(c: &Connection, task: &str) -> Result<(Usage, Usage)> {
    Ok(c.prepare_cached(
        "SELECT used_requests, used_input, used_output, used_spend, \
                res_requests, res_input, res_output, res_spend \
         FROM budgets WHERE task_id = ?1",
    )?
    .query_row([task], |r| Ok((usage_at(r, 0)?, usage_at(r, 4)?)))
    .optional()?
    .unwrap_or_default())
}

pub(super) fn budget_of(c: &Connection, task: &str) -> Result<(Usage, Usage)> {
    counters(c, task)
}

/// Adds `used` and `reserved` to one task's counters and takes `release`
/// off its reserved ones, a row at zero when there was none: one upsert
/// (docs/design/0029-proxy-hot-path.md).
///
/// The counters saturate at `i64::MAX`: SQLite turns an integer sum that
/// overflows into a float, which the strict table refused, so while one
/// huge reservation was held every other of the task and of the tasks
/// above it failed (503). `CAST` brings the sum back to an integer (the
/// largest, past it). Only a quantity no level of the chain limits can
/// get there (`fit` lowers a limited one to its budget): two requests in
/// flight with `max_tokens` near `u64::MAX` against a role that limits
/// requests only.
fn add(c: &Connection, task: &str, used: Usage, reserved: Usage, release: Usage) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO budgets (task_id, used_requests, used_input, used_output, used_spend, \
           res_requests, res_input, res_output, res_spend) \
         VALUES (?1, ?2, ?3, ?4, ?5, \
           MAX(?6 - ?10, 0), MAX(?7 - ?11, 0), MAX(?8 - ?12, 0), MAX(?9 - ?13, 0)) \
         ON CONFLICT(task_id) DO UPDATE SET \
           used_requests = CAST(used_requests + ?2 AS INTEGER), \
           used_input = CAST(used_input + ?3 AS INTEGER), \
           used_output = CAST(used_output + ?4 AS INTEGER), \
           used_spend = CAST(used_spend + ?5 AS INTEGER), \
           res_requests = CAST(MAX(res_requests + ?6 - ?10, 0) AS INTEGER), \
           res_input = CAST(MAX(res_input + ?7 - ?11, 0) AS INTEGER), \
           res_output = CAST(MAX(res_output + ?8 - ?12, 0) AS INTEGER), \
           res_spend = CAST(MAX(res_spend + ?9 - ?13, 0) AS INTEGER)",
    )?
    .execute(params![
        task,
        i(used.requests),
        i(used.input),
        i(used.output),
        i(used.spend_nusd),
        i(reserved.requests),
        i(reserved.input),
        i(reserved.output),
        i(reserved.spend_nusd),
        i(release.requests),
        i(release.input),
        i(release.output),
        i(release.spend_nusd),
    ])?;
    Ok(())
}

/// The task and its ancestors, root last, each with its role and counters:
/// one query per level (the task's row joined with its counters). The walk
/// stops at a pruned ancestor: it has no budget left to keep.
fn levels(c: &Connection, task: &str) -> Result<Vec<BudgetLevel>> {
    let mut out: Vec<BudgetLevel> = Vec::new();
    let mut next = Some(task.to_owned());
    while let Some(id) = next.take() {
        if out.len() >= MAX_DEPTH || out.iter().any(|l| l.task == id) {
            break;
        }
        let row: Option<(String, Option<String>, Usage, Usage)> = c
            .prepare_cached(
                "SELECT t.role, t.parent_id, \
                   COALESCE(b.used_requests, 0), COALESCE(b.used_input, 0), \
                   COALESCE(b.used_output, 0), COALESCE(b.used_spend, 0), \
                   COALESCE(b.res_requests, 0), COALESCE(b.res_input, 0), \
                   COALESCE(b.res_output, 0), COALESCE(b.res_spend, 0) \
                 FROM tasks t LEFT JOIN budgets b ON b.task_id = t.id WHERE t.id = ?1",
            )?
            .query_row([&id], |r| {
                Ok((r.get(0)?, r.get(1)?, usage_at(r, 2)?, usage_at(r, 6)?))
            })
            .optional()?;
        let Some((role, parent, used, reserved)) = row else {
            if out.is_empty() {
                return Err(StoreError::NotFound("task"));
            }
            break;
        };
        out.push(BudgetLevel {
            task: id,
            role,
            used,
            reserved,
        });
        next = parent;
    }
    Ok(out)
}

pub(super) fn reserve(
    w: &mut Writer<'_>,
    who: &ReservationFor,
    decide: BudgetFn,
) -> Result<BudgetReservation> {
    let levels = levels(w.conn, &who.task)?;
    let amount = decide(&levels).map_err(StoreError::BudgetExhausted)?;
    for l in &levels {
        add(w.conn, &l.task, Usage::default(), amount, Usage::default())?;
    }
    let ids: Vec<String> = levels.into_iter().map(|l| l.task).collect();
    let id = id::reservation_id(who.now);
    w.conn
        .prepare_cached(
            "INSERT INTO reservations (id, task_id, chain, lease_id, workload, role, fingerprint, \
             upstream, requests, input, output, spend, created_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )?
        .execute(params![
            id,
            who.task,
            to_json_list(&ids),
            who.lease,
            who.workload,
            who.role,
            who.fingerprint,
            who.upstream,
            i(amount.requests),
            i(amount.input),
            i(amount.output),
            i(amount.spend_nusd),
            who.now.millis(),
        ])?;
    Ok(BudgetReservation {
        id,
        chain: ids,
        amount,
        created_at: who.now,
    })
}

/// Settles one open reservation; `false` if it was not open.
fn settle_one(w: &Writer<'_>, s: &BudgetSettle) -> Result<bool> {
    let open: Option<(String, Usage)> = w
        .conn
        .prepare_cached(
            "SELECT chain, requests, input, output, spend FROM reservations \
             WHERE id = ?1 AND settled_ms IS NULL",
        )?
        .query_row([&s.id], |r| Ok((r.get::<_, String>(0)?, usage_at(r, 1)?)))
        .optional()?;
    let Some((chain, amount)) = open else {
        return Ok(false);
    };
    let used = s.used.unwrap_or(amount);
    for task in json_list(&chain)? {
        add(w.conn, &task, used, Usage::default(), amount)?;
    }
    w.conn
        .prepare_cached(
            "UPDATE reservations SET settled_ms = ?2, used_requests = ?3, used_input = ?4, \
             used_output = ?5, used_spend = ?6, unmetered = ?7 WHERE id = ?1",
        )?
        .execute(params![
            s.id,
            s.now.millis(),
            i(used.requests),
            i(used.input),
            i(used.output),
            i(used.spend_nusd),
            // Every request a chunk still held counts as unmetered.
            if s.used.is_none() {
                i(amount.requests)
            } else {
                0
            },
        ])?;
    Ok(true)
}

/// Settles part of one open chunk; `false` if it was not open.
fn settle_chunk_one(w: &Writer<'_>, s: &ChunkSettle) -> Result<bool> {
    let open: Option<(String, Usage)> = w
        .conn
        .prepare_cached(
            "SELECT chain, requests, input, output, spend FROM reservations \
             WHERE id = ?1 AND settled_ms IS NULL",
        )?
        .query_row([&s.id], |r| Ok((r.get::<_, String>(0)?, usage_at(r, 1)?)))
        .optional()?;
    let Some((chain, amount)) = open else {
        return Ok(false);
    };
    let held = s.held.least(amount);
    let rest = amount.minus(held);
    let release = if s.close { rest } else { s.release.least(rest) };
    let left = rest.minus(release);
    for task in json_list(&chain)? {
        add(w.conn, &task, s.used, Usage::default(), held.plus(release))?;
    }
    if !held.is_zero() || !s.used.is_zero() {
        // The use, as a settled reservation of the same lease: audited by
        // `summarise` like any other.
        w.conn
            .prepare_cached(
                "INSERT INTO reservations (id, task_id, chain, lease_id, workload, role, \
                 fingerprint, upstream, requests, input, output, spend, created_ms, settled_ms, \
                 used_requests, used_input, used_output, used_spend, unmetered) \
                 SELECT ?2, task_id, chain, lease_id, workload, role, fingerprint, upstream, \
                 ?3, ?4, ?5, ?6, created_ms, ?7, ?8, ?9, ?10, ?11, ?12 \
                 FROM reservations WHERE id = ?1",
            )?
            .execute(params![
                s.id,
                id::reservation_id(s.now),
                i(held.requests),
                i(held.input),
                i(held.output),
                i(held.spend_nusd),
                s.now.millis(),
                i(s.used.requests),
                i(s.used.input),
                i(s.used.output),
                i(s.used.spend_nusd),
                i(s.unmetered),
            ])?;
    }
    if s.close || left.is_zero() {
        w.conn
            .prepare_cached("DELETE FROM reservations WHERE id = ?1")?
            .execute([&s.id])?;
    } else {
        w.conn
            .prepare_cached(
                "UPDATE reservations SET requests = ?2, input = ?3, output = ?4, spend = ?5 \
                 WHERE id = ?1",
            )?
            .execute(params![
                s.id,
                i(left.requests),
                i(left.input),
                i(left.output),
                i(left.spend_nusd),
            ])?;
    }
    Ok(true)
}

pub(super) fn settle_chunks(w: &mut Writer<'_>, settles: &[ChunkSettle]) -> Result<u64> {
    let mut open = 0;
    for s in settles {
        if settle_chunk_one(w, s)? {
            open += 1;
        }
    }
    Ok(open)
}

pub(super) fn settle(w: &mut Writer<'_>, settles: &[BudgetSettle]) -> Result<()> {
    for s in settles {
        settle_one(w, s)?;
    }
    Ok(())
}

pub(super) fn settle_stale(
    w: &mut Writer<'_>,
    before: Timestamp,
    now: Timestamp,
    n: u32,
) -> Result<u64> {
    let ids: Vec<String> = w
        .conn
        .prepare_cached(
            "SELECT id FROM reservations WHERE settled_ms IS NULL AND created_ms < ?1 \
             ORDER BY created_ms LIMIT ?2",
        )?
        .query_map(params![before.millis(), limit(n)], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut done = 0;
    for id in ids {
        if settle_one(
            w,
            &BudgetSettle {
                id,
                used: None,
                now,
            },
        )? {
            done += 1;
        }
    }
    Ok(done)
}

pub(super) fn any_stale(c: &Connection, before: Timestamp) -> Result<bool> {
    Ok(c.prepare_cached(
        "SELECT 1 FROM reservations WHERE settled_ms IS NULL AND created_ms < ?1 LIMIT 1",
    )?
    .query_row([before.millis()], |_| Ok(()))
    .optional()?
    .is_some())
}

pub(super) fn any_settled(c: &Connection) -> Result<bool> {
    Ok(
        c.prepare_cached("SELECT 1 FROM reservations WHERE settled_ms IS NOT NULL LIMIT 1")?
            .query_row([], |_| Ok(()))
            .optional()?
            .is_some(),
    )
}

pub(super) fn summarise(w: &mut Writer<'_>, n: u32, event: &SummaryFn) -> Result<u64> {
    let rows: Vec<(String, UsageSummary)> = w
        .conn
        .prepare_cached(
            "SELECT id, lease_id, task_id, workload, role, fingerprint, upstream, \
                    used_requests, used_input, used_output, used_spend, unmetered, created_ms \
             FROM reservations WHERE settled_ms IS NOT NULL ORDER BY lease_id, created_ms LIMIT ?1",
        )?
        .query_map([limit(n)], |r| {
            Ok((
                r.get(0)?,
                UsageSummary {
                    lease: r.get(1)?,
                    task: r.get(2)?,
                    workload: r.get(3)?,
                    role: r.get(4)?,
                    fingerprint: r.get(5)?,
                    upstream: r.get(6)?,
                    used: usage_at(r, 7)?,
                    unmetered: u(r.get(11)?),
                    since: Timestamp(r.get(12)?),
                },
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut groups: Vec<UsageSummary> = Vec::new();
    for (id, row) in rows {
        match groups.last_mut() {
            Some(g) if g.lease == row.lease => {
                g.used = g.used.plus(row.used);
                g.unmetered += row.unmetered;
                g.since = g.since.min(row.since);
            }
            _ => groups.push(row),
        }
        w.conn
            .prepare_cached("DELETE FROM reservations WHERE id = ?1")?
            .execute([&id])?;
    }
    for g in &groups {
        let draft: AuditDraft = event(g);
        w.audit(draft)?;
    }
    Ok(groups.len() as u64)
}
