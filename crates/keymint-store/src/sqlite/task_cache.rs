//! Tasks as the read pool last found them, for the one read that a write
//! job repeats inside its transaction: the task an issuance is asked in,
//! read before the grant and the decision ([`crate::Store::task_before_grant`]).
//! A hit answers on the caller's own thread, without the two hand-offs of
//! a read on the blocking pool (docs/design/0036, "Fifth pass").
//!
//! `epoch` counts the writer's batches that may have changed a task: the
//! writer bumps it after the `COMMIT` (or `ROLLBACK`) of every batch that
//! held a job not marked as keeping tasks, which is every job but a lease's
//! insert or activation, an audit append and a sink cursor. An entry is
//! served only under the epoch it was read in, and a read notes the epoch
//! *before* it starts. So a read that began before a change committed is
//! kept under an epoch the change's bump has already left behind, and is
//! never served; and whoever made the change is answered only after the
//! bump (the syncer answers after the writer's `COMMIT`). Only one process
//! opens a SQLite store (`Store::shared` is false), so no write escapes the
//! count.
//!
//! Even a stale entry could not grant anything: the writer grants a lease
//! again against the task as it is in its transaction (status, deadline,
//! scopes), and the policy facts taken from the task (workload, parent,
//! intent, purpose, environment, delegation) never change after it starts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use keymint_core::model::Task;

/// Tasks kept at most; past it the cache starts again empty (a miss costs
/// one read).
const KEPT_MAX: usize = 4_096;

#[derive(Debug, Default)]
pub(super) struct TaskCache {
    epoch: AtomicU64,
    kept: Mutex<Kept>,
}

#[derive(Debug, Default)]
struct Kept {
    /// The epoch every entry of `tasks` was read in.
    epoch: u64,
    tasks: HashMap<String, Task>,
}

impl TaskCache {
    /// The epoch to note before a read whose result may be kept.
    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Called by the writer once a batch that may have changed a task is
    /// committed or rolled back: nothing read before is served again.
    pub(super) fn changed(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    pub(super) fn get(&self, id: &str) -> Option<Task> {
        let now = self.epoch();
        let kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.epoch != now {
            return None;
        }
        kept.tasks.get(id).cloned()
    }

    /// Keeps `task` as read by a read that started at epoch `read_at`.
    pub(super) fn put(&self, read_at: u64, task: &Task) {
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        if read_at < kept.epoch {
            return;
        }
        if read_at > kept.epoch || kept.tasks.len() >= KEPT_MAX {
            kept.tasks.clear();
            kept.epoch = read_at;
        }
        kept.tasks.insert(task.id.clone(), task.clone());
    }
}

#[cfg(test)]
mod tests {
    use keymint_core::Timestamp;
    use keymint_core::model::TaskStatus;

    use super::*;

    fn task(id: &str) -> Task {
        Task {
            id: id.into(),
            parent: None,
            workload: "w".into(),
            role: "r".into(),
            intent: None,
            purpose: None,
            environment: None,
            scopes: Vec::new(),
            status: TaskStatus::Active,
            created_at: Timestamp(0),
            expires_at: Timestamp(1),
            idle_timeout_secs: None,
            last_seen_at: Timestamp(0),
            ended_at: None,
            delegation: Vec::new(),
        }
    }

    #[test]
    fn a_read_from_before_a_change_is_never_served() {
        let c = TaskCache::default();
        let read_at = c.epoch();
        c.changed();
        c.put(read_at, &task("a"));
        assert!(c.get("a").is_none());
        // A read begun after the change is.
        c.put(c.epoch(), &task("a"));
        assert_eq!(c.get("a").map(|t| t.id), Some("a".into()));
        c.changed();
        assert!(c.get("a").is_none());
        // A late read of an older epoch does not replace the newer entries.
        c.put(c.epoch(), &task("b"));
        c.put(read_at, &task("c"));
        assert!(c.get("b").is_some());
        assert!(c.get("c").is_none());
    }

    #[test]
    fn the_cache_stays_bounded() {
        let c = TaskCache::default();
        for i in 0..(KEPT_MAX + 10) {
            c.put(0, &task(&format!("t{i}")));
        }
        let kept = c.kept.lock().unwrap();
        assert!(kept.tasks.len() <= KEPT_MAX);
        assert!(kept.tasks.contains_key(&format!("t{}", KEPT_MAX + 9)));
    }
}
