//! Tasks: the row mapping and the queries of the task tree.

use std::sync::LazyLock;

use keymint_core::Timestamp;
use keymint_core::audit::AuditDraft;
use keymint_core::model::{EndReason, Task, TaskStatus};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::lifecycle::mark_revoking;
use super::row::{bad_column, json_list, limit, secs_i64, to_json_list};
use super::writer::Writer;
use crate::{EndedTree, Result, StoreError, TaskEnd, TaskFilter, TaskGrantFn};

pub(super) const TASK_COLS: &str = "id, parent_id, workload, role, intent, purpose, environment, scopes, status, \
     created_ms, expires_ms, idle_timeout_s, last_seen_ms, ended_ms, delegation";
pub(super) const TASK_NCOLS: usize = 15;
/// A task by id (each issuance reads its task twice): made once, not
/// formatted per call.
static TASK_BY_ID: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {TASK_COLS} FROM tasks WHERE id = ?1"));

pub(super) fn task_from_row(r: &Row<'_>, o: usize) -> rusqlite::Result<Task> {
    let status: String = r.get(o + 8)?;
    Ok(Task {
        id: r.get(o)?,
        parent: r.get(o + 1)?,
        workload: r.get(o + 2)?,
        role: r.get(o + 3)?,
        intent: r.get(o + 4)?,
        purpose: r.get(o + 5)?,
        environment: r.get(o + 6)?,
        scopes: json_list(&r.get::<_, String>(o + 7)?)?,
        status: TaskStatus::parse(&status).ok_or_else(|| bad_column("task status"))?,
        created_at: Timestamp(r.get(o + 9)?),
        expires_at: Timestamp(r.get(o + 10)?),
        idle_timeout_secs: r.get::<_, Option<i64>>(o + 11)?.map(|v| v.max(0) as u64),
        last_seen_at: Timestamp(r.get(o + 12)?),
        ended_at: r.get::<_, Option<i64>>(o + 13)?.map(Timestamp),
        delegation: json_list(&r.get::<_, String>(o + 14)?)?,
    })
}

fn deadline_ms(t: &Task) -> i64 {
    t.deadline().millis()
}

pub(super) fn insert_task(conn: &Connection, t: &Task) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO tasks (id, parent_id, workload, role, intent, purpose, environment, scopes, \
         status, created_ms, expires_ms, idle_timeout_s, last_seen_ms, deadline_ms, delegation) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
    )?
    .execute(params![
        t.id,
        t.parent,
        t.workload,
        t.role,
        t.intent,
        t.purpose,
        t.environment,
        to_json_list(&t.scopes),
        t.status.as_str(),
        t.created_at.millis(),
        t.expires_at.millis(),
        t.idle_timeout_secs.map(secs_i64),
        t.last_seen_at.millis(),
        deadline_ms(t),
        to_json_list(&t.delegation),
    ])?;
    Ok(())
}

pub(super) fn create(w: &mut Writer<'_>, parent: Option<&str>, grant: TaskGrantFn) -> Result<Task> {
    let parent_task = match parent {
        Some(id) => Some(w.task(id)?.ok_or(StoreError::NotFound("parent task"))?),
        None => None,
    };
    let (task, audit) = grant(parent_task.as_ref())?;
    insert_task(w.conn, &task)?;
    w.audit(audit)?;
    Ok(task)
}

pub(super) fn get(c: &Connection, id: &str) -> Result<Option<Task>> {
    Ok(c.prepare_cached(&TASK_BY_ID)?
        .query_row([id], |r| task_from_row(r, 0))
        .optional()?)
}

pub(super) fn list(c: &Connection, f: &TaskFilter) -> Result<Vec<Task>> {
    let sql = format!(
        "SELECT {TASK_COLS} FROM tasks WHERE (?1 IS NULL OR status = ?1) \
         AND (?2 IS NULL OR workload = ?2) AND (?3 IS NULL OR role = ?3) \
         AND (?4 IS NULL OR parent_id = ?4) AND (?6 IS NULL OR id < ?6) \
         ORDER BY id DESC LIMIT ?5"
    );
    let mut stmt = c.prepare_cached(&sql)?;
    let rows = stmt.query_map(
        params![
            f.status.map(TaskStatus::as_str),
            f.workload,
            f.role,
            f.parent,
            limit(f.limit),
            f.before
        ],
        |r| task_from_row(r, 0),
    )?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

pub(super) fn touch(w: &mut Writer<'_>, id: &str, now: Timestamp) -> Result<Option<Task>> {
    let Some(mut t) = w.task(id)? else {
        return Ok(None);
    };
    if !t.is_live(now) {
        return Ok(None);
    }
    t.last_seen_at = now;
    w.conn
        .prepare_cached("UPDATE tasks SET last_seen_ms = ?2, deadline_ms = ?3 WHERE id = ?1")?
        .execute(params![id, now.millis(), deadline_ms(&t)])?;
    Ok(Some(t))
}

/// Ends a task and its whole active sub-tree, moving every pending or
/// active lease in it to `revoking`, in the one transaction of the job.
pub(super) fn end(w: &mut Writer<'_>, end: TaskEnd) -> Result<Option<EndedTree>> {
    let Some(root) = w.task(&end.id)? else {
        return Err(StoreError::NotFound("task"));
    };
    if !root.status.is_active() {
        return Ok(None);
    }
    let mut stmt = w.conn.prepare_cached(
        "WITH RECURSIVE tree(id, depth) AS ( \
           SELECT id, 0 FROM tasks WHERE id = ?1 \
           UNION ALL SELECT t.id, tree.depth + 1 FROM tasks t JOIN tree ON t.parent_id = tree.id) \
         SELECT tree.id FROM tree JOIN tasks ON tasks.id = tree.id \
         WHERE tasks.status = 'active' ORDER BY depth",
    )?;
    let ids = stmt
        .query_map([&end.id], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    drop(stmt);
    let mut leases = Vec::new();
    let mut budget = crate::END_TASK_LEASES;
    for (i, id) in ids.iter().enumerate() {
        let (status, reason) = if i == 0 {
            (end.status, end.reason.clone())
        } else {
            (
                TaskStatus::Revoked,
                Some(format!("parent task `{}` ended", end.id)),
            )
        };
        w.conn
            .prepare_cached(
                "UPDATE tasks SET status = ?2, ended_ms = ?3, end_reason = ?4 WHERE id = ?1",
            )?
            .execute(params![id, status.as_str(), end.now.millis(), reason])?;
        // A bounded batch: the rest is taken with `revoke_ended_leases`,
        // in further transactions, so other writes interleave.
        let ended = if budget == 0 {
            Vec::new()
        } else {
            mark_revoking(
                w,
                "task_id = ?1",
                id,
                EndReason::TaskEnded,
                end.now,
                &end.actor,
                Some(budget),
            )?
        };
        budget = budget.saturating_sub(u32::try_from(ended.len()).unwrap_or(u32::MAX));
        let mut ev = AuditDraft::new(end.now, "task.ended", end.actor.clone())
            .task(id.clone())
            .data("status", status.as_str())
            .data("leases_revoked", ended.len());
        if let Some(r) = reason {
            ev = ev.reason(r);
        }
        if i == 0 {
            ev = ev.workload(&root.workload).role(&root.role);
        }
        w.audit(ev)?;
        super::approvals::close_of_task(w, id, status.as_str(), end.now, &end.actor)?;
        leases.extend(ended);
    }
    Ok(Some(EndedTree {
        tasks: ids,
        leases,
        more: budget == 0,
    }))
}
