//! Authenticating the `kmt_` token an SDK sends, with a cache that a
//! revocation empties at once.
//!
//! A hit needs the cached entry to be younger than the broker's revocation
//! epoch (bumped whenever leases leave `active`: a revocation, a task end, an
//! expiry sweep) and `now` to be before the lease's expiry and its task's
//! deadline. Anything else goes to the store. So on one node a revoked token
//! is refused on the very next request, with no store read on the hot path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use keymint_core::keyring::Keyring;
use keymint_core::token::{self, TokenKind};
use keymint_core::{Clock, Timestamp};
use keymint_store::Store;

const CACHE_MAX: usize = 100_000;

/// Who is calling through the proxy.
#[derive(Debug, Clone)]
pub struct Caller {
    pub lease: String,
    pub task: String,
    pub workload: String,
    pub role: String,
    pub fingerprint: String,
    valid_until: Timestamp,
    epoch: u64,
}

/// Why a token is refused. Never what it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Refused(String),
    #[error("the token could not be checked")]
    Store,
}

#[derive(Debug)]
pub struct Authenticator {
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    clock: Arc<dyn Clock>,
    epoch: Arc<AtomicU64>,
    cache: Mutex<HashMap<String, Caller>>,
}

impl Authenticator {
    pub fn new(
        store: Arc<dyn Store>,
        keyring: Arc<Keyring>,
        clock: Arc<dyn Clock>,
        epoch: Arc<AtomicU64>,
    ) -> Self {
        Self {
            store,
            keyring,
            clock,
            epoch,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The fingerprint of a well-formed presented token, for audit events.
    pub fn fingerprint(&self, token: &str) -> Option<String> {
        token::check(token)
            .is_ok()
            .then(|| self.keyring.fingerprint(token.as_bytes()))
    }

    pub async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        match token::check(token) {
            Ok(TokenKind::Access) => {}
            Ok(TokenKind::Admin) => {
                return Err(AuthError::Refused(
                    "the admin token cannot be used with the proxy; use a task token (kmt_...)"
                        .into(),
                ));
            }
            Err(e) => return Err(AuthError::Refused(e.to_string())),
        }
        let fp = self.keyring.fingerprint(token.as_bytes());
        let now = self.clock.now();
        // Read the epoch before the store: a revocation that commits after
        // this read bumps it and so invalidates what we are about to cache.
        let epoch = self.epoch.load(Ordering::Acquire);
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cache.get(&fp)
                && c.epoch == epoch
                && now < c.valid_until
            {
                return Ok(c.clone());
            }
        }
        let found = self.store.lease_by_fingerprint(&fp).await.map_err(|e| {
            tracing::error!(error = %e, "proxy: token lookup failed");
            AuthError::Store
        })?;
        match found {
            Some((lease, task)) if lease.is_usable(now) && task.is_live(now) => {
                let caller = Caller {
                    valid_until: lease.expires_at.min(task.deadline()),
                    lease: lease.id,
                    task: task.id,
                    workload: task.workload,
                    role: lease.role,
                    fingerprint: fp.clone(),
                    epoch,
                };
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
                cache.insert(fp, caller.clone());
                Ok(caller)
            }
            Some(_) => Err(AuthError::Refused("token revoked or expired".into())),
            None => Err(AuthError::Refused("token not recognised".into())),
        }
    }
}
