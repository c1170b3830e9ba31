//! Tasks: the row mapping and the queries of the task tree.

use deadpool_postgres::ClientWrapper;
use keymint_core::Timestamp;
use keymint_core::audit::AuditDraft;
use keymint_core::model::{EndReason, Task, TaskStatus};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::leases::mark_revoking;
use super::row::{bad, execute, json_list, limit, query, query_opt, secs_i64, to_json_list};
use super::writer::PgWriter;
use crate::{EndedTree, Result, StoreError, TaskEnd, TaskFilter, TaskGrantFn};

pub(super) const TASK_COLS: &str = "id, parent_id, workload, role, intent, purpose, environment, scopes, status, \
     created_ms, expires_ms, idle_timeout_s, last_seen_ms, ended_ms, delegation";
pub(super) const TASK_NCOLS: usize = 15;

pub(super) fn task_from_row(r: &Row, o: usize) -> Result<Task> {
    let status: String = r.try_get(o + 8).map_err(bad)?;
    Ok(Task {
        id: r.try_get(o).map_err(bad)?,
        parent: r.try_get(o + 1).map_err(bad)?,
        workload: r.try_get(o + 2).map_err(bad)?,
        role: r.try_get(o + 3).map_err(bad)?,
        intent: r.try_get(o + 4).map_err(bad)?,
        purpose: r.try_get(o + 5).map_err(bad)?,
        environment: r.try_get(o + 6).map_err(bad)?,
        scopes: json_list(&r.try_get::<_, String>(o + 7).map_err(bad)?)?,
        status: TaskStatus::parse(&status)
            .ok_or_else(|| StoreError::Backend("stored task status unreadable".into()))?,
        created_at: Timestamp(r.try_get(o + 9).map_err(bad)?),
        expires_at: Timestamp(r.try_get(o + 10).map_err(bad)?),
        idle_timeout_secs: r
            .try_get::<_, Option<i64>>(o + 11)
            .map_err(bad)?
            .map(|v| v.max(0) as u64),
        last_seen_at: Timestamp(r.try_get(o + 12).map_err(bad)?),
        ended_at: r
            .try_get::<_, Option<i64>>(o + 13)
            .map_err(bad)?
            .map(Timestamp),
        delegation: json_list(&r.try_get::<_, String>(o + 14).map_err(bad)?)?,
    })
}

fn tasks(rows: &[Row]) -> Result<Vec<Task>> {
    rows.iter().map(|r| task_from_row(r, 0)).collect()
}

pub(super) async fn insert_task(c: &ClientWrapper, t: &Task) -> Result<()> {
    let idle = t.idle_timeout_secs.map(secs_i64);
    execute(
        c,
        "INSERT INTO tasks (id, parent_id, workload, role, intent, purpose, environment, scopes, \
         status, created_ms, expires_ms, idle_timeout_s, last_seen_ms, deadline_ms, delegation) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        &[
            &t.id,
            &t.parent,
            &t.workload,
            &t.role,
            &t.intent,
            &t.purpose,
            &t.environment,
            &to_json_list(&t.scopes),
            &t.status.as_str(),
            &t.created_at.millis(),
            &t.expires_at.millis(),
            &idle,
            &t.last_seen_at.millis(),
            &t.deadline().millis(),
            &to_json_list(&t.delegation),
        ],
    )
    .await?;
    Ok(())
}

pub(super) async fn create(
    w: &mut PgWriter,
    parent: Option<String>,
    grant: TaskGrantFn,
) -> Result<Task> {
    let parent_task = match parent {
        Some(id) => Some(
            w.task(&id)
                .await?
                .ok_or(StoreError::NotFound("parent task"))?,
        ),
        None => None,
    };
    let (task, audit) = grant(parent_task.as_ref())?;
    insert_task(w.c(), &task).await?;
    w.audit(audit).await?;
    Ok(task)
}

/// The tasks of the given ids (`$1`, a text array), in no order.
pub(super) static BY_IDS: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("SELECT {TASK_COLS} FROM tasks WHERE id = ANY($1)"));

pub(super) async fn get(c: &ClientWrapper, id: &str) -> Result<Option<Task>> {
    let sql = format!("SELECT {TASK_COLS} FROM tasks WHERE id = $1");
    query_opt(c, &sql, &[&id])
        .await?
        .map(|r| task_from_row(&r, 0))
        .transpose()
}

pub(super) async fn list(c: &ClientWrapper, f: &TaskFilter) -> Result<Vec<Task>> {
    let sql = format!(
        "SELECT {TASK_COLS} FROM tasks WHERE ($1::text IS NULL OR status = $1) \
         AND ($2::text IS NULL OR workload = $2) AND ($3::text IS NULL OR role = $3) \
         AND ($4::text IS NULL OR parent_id = $4) AND ($6::text IS NULL OR id < $6) \
         ORDER BY id DESC LIMIT $5"
    );
    let status = f.status.map(TaskStatus::as_str);
    let params: [&(dyn ToSql + Sync); 6] = [
        &status,
        &f.workload,
        &f.role,
        &f.parent,
        &limit(f.limit),
        &f.before,
    ];
    tasks(&query(c, &sql, &params).await?)
}

pub(super) async fn touch(w: &mut PgWriter, id: &str, now: Timestamp) -> Result<Option<Task>> {
    let Some(mut t) = w.task(id).await? else {
        return Ok(None);
    };
    if !t.is_live(now) {
        return Ok(None);
    }
    t.last_seen_at = now;
    execute(
        w.c(),
        "UPDATE tasks SET last_seen_ms = $2, deadline_ms = $3 WHERE id = $1",
        &[&id, &now.millis(), &t.deadline().millis()],
    )
    .await?;
    Ok(Some(t))
}

/// Ends a task and its whole active sub-tree, moving pending or active
/// leases in it to `revoking` (at most [`crate::END_TASK_LEASES`]), in the
/// one transaction of the job.
pub(super) async fn end(w: &mut PgWriter, end: TaskEnd) -> Result<Option<EndedTree>> {
    let Some(root) = w.task(&end.id).await? else {
        return Err(StoreError::NotFound("task"));
    };
    if !root.status.is_active() {
        return Ok(None);
    }
    let rows = query(
        w.c(),
        "WITH RECURSIVE tree(id, depth) AS ( \
           SELECT id, 0 FROM tasks WHERE id = $1 \
           UNION ALL SELECT t.id, tree.depth + 1 FROM tasks t JOIN tree ON t.parent_id = tree.id) \
         SELECT tree.id FROM tree JOIN tasks ON tasks.id = tree.id \
         WHERE tasks.status = 'active' ORDER BY depth",
        &[&end.id],
    )
    .await?;
    let ids = rows
        .iter()
        .map(|r| r.try_get::<_, String>(0).map_err(bad))
        .collect::<Result<Vec<_>>>()?;
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
        execute(
            w.c(),
            "UPDATE tasks SET status = $2, ended_ms = $3, end_reason = $4 WHERE id = $1",
            &[id, &status.as_str(), &end.now.millis(), &reason],
        )
        .await?;
        // A bounded batch: the rest is taken with `revoke_ended_leases`,
        // in further transactions, so other writes interleave.
        let ended = if budget == 0 {
            Vec::new()
        } else {
            mark_revoking(
                w,
                "task_id = $1",
                id,
                EndReason::TaskEnded,
                end.now,
                &end.actor,
                Some(budget),
            )
            .await?
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
        w.audit(ev).await?;
        super::misc::close_approvals_of_task(w, id, status.as_str(), end.now, &end.actor).await?;
        leases.extend(ended);
    }
    // A task's end refuses its tokens on every replica, leases or not.
    w.revoked();
    Ok(Some(EndedTree {
        tasks: ids,
        leases,
        more: budget == 0,
    }))
}

/// Active tasks past their deadline.
pub(super) async fn timed_out(c: &ClientWrapper, now: Timestamp, n: u32) -> Result<Vec<String>> {
    let rows = query(
        c,
        "SELECT id FROM tasks WHERE status = 'active' AND deadline_ms <= $1 \
         ORDER BY deadline_ms LIMIT $2",
        &[&now.millis(), &limit(n)],
    )
    .await?;
    rows.iter()
        .map(|r| r.try_get::<_, String>(0).map_err(bad))
        .collect()
}
