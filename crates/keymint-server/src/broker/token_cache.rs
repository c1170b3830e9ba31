//! `kmt_` access tokens, looked up once and cached until anything could
//! have changed them.
//!
//! A hit needs the entry to have been cached under the current revocation
//! epoch (bumped whenever leases leave `active`: a revocation, a task end, an
//! expiry sweep) and `now` to be before the lease's expiry and its task's
//! deadline; a renewal drops the lease's entry. Anything else goes to the
//! store. So on one node a revoked token is refused on the very next
//! request, by the API and the egress proxy alike, with no store read on
//! the hot path.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use foldhash::HashMap;
use keymint_core::Timestamp;
use keymint_core::model::{Lease, Task};
use keymint_proxy::gate::Caller;

use super::{Broker, BrokerError, Result};

/// Entries held before the cache is emptied and refilled.
const CACHE_MAX: usize = 100_000;

/// A live lease and its task, as they were when cached.
#[derive(Debug)]
pub(crate) struct LiveToken {
    pub(crate) task: Task,
    pub(crate) lease: Lease,
    /// The same, as the egress proxy needs it (built once per lookup).
    pub(crate) caller: Arc<Caller>,
    /// The task and the tasks it was delegated from, (id, workload),
    /// nearest first: a suspension of any of them refuses the token.
    ancestry: Vec<(String, String)>,
    valid_until: Timestamp,
    epoch: u64,
}

#[derive(Debug, Default)]
pub(crate) struct TokenCache {
    map: Mutex<HashMap<String, Arc<LiveToken>>>,
}

impl TokenCache {
    fn get(&self, fingerprint: &str, epoch: u64, now: Timestamp) -> Option<Arc<LiveToken>> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(fingerprint)
            .filter(|t| t.epoch == epoch && now < t.valid_until)
            .map(Arc::clone)
    }

    fn put(&self, fingerprint: String, t: Arc<LiveToken>) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= CACHE_MAX {
            map.clear();
        }
        map.insert(fingerprint, t);
    }

    /// Drops a lease's entry (after it was renewed).
    pub(crate) fn forget(&self, fingerprint: &str) {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(fingerprint);
    }
}

impl Broker {
    /// The live lease behind an access token's fingerprint (the token's
    /// shape and checksum already checked). Refused when unknown, ended or
    /// expired, or when its task is not live at `now`.
    pub(crate) async fn live_access_token(&self, fp: String) -> Result<Arc<LiveToken>> {
        let now = self.now();
        // Read the epoch before the store: a revocation that commits after
        // this read bumps it and so invalidates what is about to be cached.
        let epoch = self.revocation_epoch.load(Ordering::Acquire);
        if let Some(hit) = self.token_cache.get(&fp, epoch, now) {
            return self.not_suspended(hit);
        }
        match self.store.lease_by_fingerprint(&fp).await? {
            Some((lease, task)) if lease.is_usable(now) && task.is_live(now) => {
                if !self.parents_usable(&lease, now).await? {
                    return Err(BrokerError::Unauthorized("token revoked or expired".into()));
                }
                let ancestry = self.ancestry(&task).await?;
                let caller = Arc::new(Caller {
                    lease: lease.id.clone(),
                    task: task.id.clone(),
                    workload: task.workload.clone(),
                    role: lease.role.clone(),
                    fingerprint: fp.clone(),
                });
                let live = Arc::new(LiveToken {
                    valid_until: lease.expires_at.min(task.deadline()),
                    ancestry,
                    task,
                    lease,
                    caller,
                    epoch,
                });
                self.token_cache.put(fp, Arc::clone(&live));
                self.not_suspended(live)
            }
            Some(_) => Err(BrokerError::Unauthorized("token revoked or expired".into())),
            None => Err(BrokerError::Unauthorized("token not recognised".into())),
        }
    }

    /// Whether every lease an access token was exchanged from (`parents`,
    /// recorded at issuance; none for other leases) is still usable: a
    /// token exchanged from a revoked one is refused with it.
    async fn parents_usable(&self, lease: &Lease, now: Timestamp) -> Result<bool> {
        let Some(parents) = lease.engine_data["parents"].as_array() else {
            return Ok(true);
        };
        for id in parents.iter().take(super::oauth::MAX_EXCHANGES + 1) {
            let usable = match id.as_str() {
                Some(id) => self
                    .store
                    .get_lease(id)
                    .await?
                    .is_some_and(|p| p.is_usable(now)),
                None => false,
            };
            if !usable {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Refuses a live token whose task or workload, or a task or workload
    /// it was delegated from, misuse monitoring suspended
    /// (docs/design/0033): like a revocation, but reversible.
    fn not_suspended(&self, live: Arc<LiveToken>) -> Result<Arc<LiveToken>> {
        match self.suspensions.refusal(&live.ancestry) {
            Some(m) => Err(BrokerError::Unauthorized(m)),
            None => Ok(live),
        }
    }
}
