//! Retention: deleting tasks that ended before a cutoff, with their leases,
//! once nothing under them is live and no expire-only credential of theirs
//! (an SSH certificate, which a KRL lists while it is valid) has yet to
//! expire.

use keymint_core::Timestamp;
use keymint_core::audit::AuditDraft;
use rusqlite::params;

use super::row::limit;
use super::writer::Writer;
use crate::{Pruned, Result};

pub(super) fn prune_ended(
    w: &mut Writer<'_>,
    before: Timestamp,
    now: Timestamp,
    n: u32,
) -> Result<Pruned> {
    let ids: Vec<String> = w
        .conn
        .prepare_cached(
            "SELECT t.id FROM tasks t WHERE t.status != 'active' AND t.ended_ms < ?1 \
             AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.task_id = t.id \
                 AND l.state IN ('pending', 'active', 'revoking')) \
             AND NOT EXISTS (SELECT 1 FROM tasks c WHERE c.parent_id = t.id \
                 AND c.status = 'active') \
             AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.task_id = t.id \
                 AND l.revocability = 'expire_only' AND l.expires_ms > ?3) \
             ORDER BY t.ended_ms LIMIT ?2",
        )?
        .query_map(params![before.millis(), limit(n), now.millis()], |r| {
            r.get(0)
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Pruned::default();
    for id in &ids {
        out.leases += w
            .conn
            .prepare_cached("DELETE FROM leases WHERE task_id = ?1")?
            .execute([id])? as u64;
        w.conn
            .prepare_cached("DELETE FROM budgets WHERE task_id = ?1")?
            .execute([id])?;
        out.tasks += w
            .conn
            .prepare_cached("DELETE FROM tasks WHERE id = ?1")?
            .execute([id])? as u64;
    }
    if out.tasks > 0 {
        w.audit(
            AuditDraft::new(now, "store.pruned", "system")
                .reason("retention: tasks ended before the cutoff, with their leases")
                .data("tasks", out.tasks)
                .data("leases", out.leases)
                .data("ended_before", before.rfc3339()),
        )?;
    }
    Ok(out)
}
