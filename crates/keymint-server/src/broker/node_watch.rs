//! A node agent's long poll (`POST /v1/node/watch`,
//! docs/design/0024-agent-hardening.md): which of the tasks it holds
//! credentials for are over, and which entries it has, answered as soon as
//! either changes (or after `wait_secs`), so that the agent removes
//! delivered files when a task ends on the server, not at its next
//! refresh. The same call ends the tasks of entries the agent saw deleted.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use keymint_core::Timestamp;
use keymint_core::id;
use keymint_core::model::TaskStatus;
use serde::{Deserialize, Serialize};

use super::{Broker, BrokerError, Principal, Result};

/// At most this many task ids in one call.
pub const MAX_WATCHED: usize = 1000;
/// The longest wait.
pub const MAX_WAIT_SECS: u64 = 30;
/// How long the server remembers which workloads a deleted entry gave a
/// node (for `end`).
const DELETED_MEMORY_SECS: u64 = 3600;

/// `POST /v1/node/watch`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeWatch {
    /// The tasks the agent holds credentials for (at most 1,000 ids).
    #[serde(default)]
    pub tasks: Vec<String>,
    /// The entry ids the agent holds; the answer comes at once when the
    /// node's entries differ.
    #[serde(default)]
    pub entries: Option<Vec<String>>,
    /// Tasks of entries the agent saw deleted: ended as `failed` (each
    /// must be a task of a workload this node has, or had until an entry
    /// of it was deleted within the last hour).
    #[serde(default)]
    pub end: Vec<String>,
    /// How long to wait for a change, 0 to 30 seconds (default 20).
    #[serde(default)]
    pub wait_secs: Option<u64>,
}

/// The answer: the watched tasks that are over (ended, expired, unknown or
/// not this node's), and this node's entry ids.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct NodeWatchAnswer {
    pub ended: Vec<String>,
    pub entries: Vec<String>,
}

/// The broker's part of the long polls: workloads whose entries a node
/// lost (for a while), and whether the server is stopping (polls answer
/// at once, so a graceful shutdown does not wait for them).
#[derive(Debug, Default)]
pub(crate) struct DeletedEntries {
    deleted: std::sync::Mutex<Vec<(String, String, Timestamp)>>,
    closing: std::sync::atomic::AtomicBool,
}

impl DeletedEntries {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, String, Timestamp)>> {
        self.deleted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    pub(crate) fn remember(&self, node: &str, workload: &str, now: Timestamp) {
        let mut v = self.lock();
        v.retain(|(_, _, at)| at.plus_secs(DELETED_MEMORY_SECS) > now);
        v.push((node.to_owned(), workload.to_owned(), now));
    }

    fn had(&self, node: &str, workload: &str, now: Timestamp) -> bool {
        self.lock()
            .iter()
            .any(|(n, w, at)| n == node && w == workload && at.plus_secs(DELETED_MEMORY_SECS) > now)
    }
}

impl Broker {
    /// The server is stopping: long polls answer now.
    pub fn close_node_watches(&self) {
        self.deleted_entries.closing.store(true, Ordering::Release);
    }

    /// The node's long poll.
    pub async fn node_watch(&self, p: &Principal, req: NodeWatch) -> Result<NodeWatchAnswer> {
        let Principal::Node { name: node } = p else {
            return Err(BrokerError::Forbidden(
                "`/v1/node/watch` is for node agents".into(),
            ));
        };
        if req.tasks.len() > MAX_WATCHED || req.end.len() > MAX_WATCHED {
            return Err(BrokerError::BadRequest(format!(
                "at most {MAX_WATCHED} task ids in `tasks` and in `end`"
            )));
        }
        if req
            .entries
            .as_ref()
            .is_some_and(|e| e.len() > 10 * MAX_WATCHED)
        {
            return Err(BrokerError::BadRequest("too many ids in `entries`".into()));
        }
        let wait = req.wait_secs.unwrap_or(20);
        if wait > MAX_WAIT_SECS {
            return Err(BrokerError::BadRequest(format!(
                "`wait_secs` is at most {MAX_WAIT_SECS}"
            )));
        }
        for t in &req.end {
            self.end_for_deleted_entry(node, t).await?;
        }
        let known: Option<BTreeSet<&str>> = req
            .entries
            .as_ref()
            .map(|e| e.iter().map(String::as_str).collect());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
        loop {
            let epoch = self.revocation_epoch.load(Ordering::Acquire);
            let (ended, entries) = self.node_state(node, &req.tasks).await?;
            let changed = known.as_ref().is_some_and(|k| {
                k.len() != entries.len() || entries.iter().any(|e| !k.contains(e.as_str()))
            });
            if !ended.is_empty()
                || changed
                || tokio::time::Instant::now() >= deadline
                || self.deleted_entries.closing()
            {
                return Ok(NodeWatchAnswer { ended, entries });
            }
            // Look again when leases leave `active` (a task ended, expired
            // or was revoked; an entry was deleted), and every 2 s anyway
            // (an idle deadline that passed without leases).
            let again = (tokio::time::Instant::now() + Duration::from_secs(2)).min(deadline);
            while tokio::time::Instant::now() < again
                && self.revocation_epoch.load(Ordering::Acquire) == epoch
                && !self.deleted_entries.closing()
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// The watched tasks that are over for this node, and its entry ids.
    async fn node_state(&self, node: &str, tasks: &[String]) -> Result<(Vec<String>, Vec<String>)> {
        let entries = self.store.list_entries(Some(node)).await?;
        let now = self.now();
        let mut ended = Vec::new();
        for t in tasks {
            let live = id::is_valid("tsk_", t)
                && match self.store.get_task(t).await? {
                    Some(task) => {
                        task.is_live(now) && entries.iter().any(|e| e.workload == task.workload)
                    }
                    None => false,
                };
            if !live {
                ended.push(t.clone());
            }
        }
        Ok((ended, entries.into_iter().map(|e| e.id).collect()))
    }

    /// Ends a task of a workload whose entry on this node was deleted.
    async fn end_for_deleted_entry(&self, node: &str, task: &str) -> Result<()> {
        if !id::is_valid("tsk_", task) {
            return Err(BrokerError::BadRequest(
                "`end` holds a malformed task id".into(),
            ));
        }
        let Some(t) = self.store.get_task(task).await? else {
            return Ok(());
        };
        if t.status != TaskStatus::Active {
            return Ok(());
        }
        let now = self.now();
        let has = self
            .store
            .list_entries(Some(node))
            .await?
            .iter()
            .any(|e| e.workload == t.workload);
        if !has && !self.deleted_entries.had(node, &t.workload, now) {
            return Err(BrokerError::Forbidden(
                "a task in `end` is not a task of a workload of this node".into(),
            ));
        }
        self.end_tree(
            &t.id,
            TaskStatus::Failed,
            &format!("node:{node}"),
            Some("its registration entry was deleted".into()),
        )
        .await?;
        Ok(())
    }
}
