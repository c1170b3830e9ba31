//! One issuer's keys: cached, refreshed on an unknown `kid` or when old,
//! with at most one fetch per issuer per `jwks_min_refresh_interval`, and
//! concurrent requests sharing the fetch in flight.
//!
//! Ages, in order: keys younger than `jwks_max_age` are used as they are;
//! older ones are still used while one refresh runs in the background
//! (single flight, rate-limited), so a request never waits on the network
//! for a `kid` it knows; keys older than `jwks_max_stale` (every fetch since
//! has failed) are not used at all, and the issuer's tokens are refused
//! (`keys_stale`) until a fetch succeeds.
//!
//! The rate limit and the ages run on the `now` that callers pass to
//! `verify`, not on a clock of its own (DESIGN.md invariant 7), so tests
//! move it by hand.

use std::sync::{Arc, RwLock};

use keymint_core::Timestamp;

use crate::config::{Alg, IssuerSpec, Source};
use crate::error::AuthError;
use crate::fetch::{FetchError, Fetcher};
use crate::jwk::{KeySet, Lookup};

#[derive(Debug, Default)]
struct State {
    keys: Option<Arc<KeySet>>,
    fetched_at: Option<Timestamp>,
    last_attempt: Option<Timestamp>,
}

/// What a fetch needs, shared with a refresh running in the background.
#[derive(Debug)]
struct Shared {
    name: String,
    source: Source,
    fetch_timeout: std::time::Duration,
    state: RwLock<State>,
    /// Held for the whole of a fetch (in the foreground or the background);
    /// who waits on it shares the result.
    fetch_lock: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Debug)]
pub(crate) struct KeyCache {
    shared: Arc<Shared>,
}

impl Shared {
    fn snapshot(&self) -> (Option<Arc<KeySet>>, Option<Timestamp>, Option<Timestamp>) {
        let st = self
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (st.keys.clone(), st.fetched_at, st.last_attempt)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One fetch; the caller holds `fetch_lock` and has recorded the
    /// attempt. A failure keeps the old keys (they age out at
    /// `jwks_max_stale`).
    async fn refresh(&self, fetcher: &Fetcher, now: Timestamp) {
        match load(&self.source, self.fetch_timeout, fetcher).await {
            Ok(set) => {
                tracing::debug!(issuer = %self.name, keys = set.len(), "issuer keys loaded");
                let mut st = self.write();
                st.keys = Some(Arc::new(set));
                st.fetched_at = Some(now);
            }
            Err(e) => {
                tracing::warn!(issuer = %self.name, error = %e, "fetching issuer keys failed");
            }
        }
    }
}

impl KeyCache {
    pub(crate) fn new(spec: &IssuerSpec) -> Self {
        let mut st = State::default();
        if let Source::Static(set) = &spec.source {
            st.keys = Some(set.clone());
        }
        Self {
            shared: Arc::new(Shared {
                name: spec.name.clone(),
                source: spec.source.clone(),
                fetch_timeout: spec.fetch_timeout,
                state: RwLock::new(st),
                fetch_lock: Arc::new(tokio::sync::Mutex::new(())),
            }),
        }
    }

    /// The key set to verify with: one that knows `kid` (or, without `kid`,
    /// has a key fitting `alg`), refreshed first if needed and allowed.
    pub(crate) async fn keys_for(
        &self,
        spec: &IssuerSpec,
        fetcher: &Fetcher,
        kid: Option<&str>,
        alg: Alg,
        now: Timestamp,
    ) -> Result<Arc<KeySet>, AuthError> {
        let shared = &self.shared;
        if matches!(spec.source, Source::Static(_)) {
            return match shared.snapshot().0 {
                Some(ks) => Ok(ks),
                None => Err(AuthError::KeysUnavailable),
            };
        }
        // A `now` earlier than `fetched_at` (callers' clocks differ) is an
        // age of zero.
        let older_than = |fetched_at: Option<Timestamp>, max_ms: i64| {
            fetched_at.is_none_or(|t| t.until(now) >= max_ms)
        };
        // A `now` earlier than the last attempt counts as inside the window.
        let allowed = |last_attempt: Option<Timestamp>| {
            last_attempt.is_none_or(|t| t.until(now) >= spec.min_refresh_ms)
        };
        let (keys, fetched_at, last_attempt) = shared.snapshot();
        if let Some(ks) = &keys
            && ks.lookup(kid, alg) != Lookup::Unknown
            && !older_than(fetched_at, spec.jwks_max_stale_ms)
        {
            if older_than(fetched_at, spec.jwks_max_age_ms) && allowed(last_attempt) {
                self.refresh_in_background(fetcher, now, allowed);
            }
            return Ok(ks.clone());
        }

        // Unknown kid, nothing loaded yet, or keys past `jwks_max_stale`:
        // refresh, once, and wait for it.
        let _guard = shared.fetch_lock.lock().await;
        let (keys, fetched_at, last_attempt) = shared.snapshot();
        let known = keys
            .as_ref()
            .is_some_and(|ks| ks.lookup(kid, alg) != Lookup::Unknown);
        // Someone else refreshed while we waited for the lock.
        let refreshed = !older_than(fetched_at, spec.jwks_max_age_ms) && known;
        let attempted = !refreshed && allowed(last_attempt);
        if attempted {
            shared.write().last_attempt = Some(now);
            shared.refresh(fetcher, now).await;
        }
        let (keys, fetched_at, _) = shared.snapshot();
        match keys {
            // INVARIANT: keys that no fetch has confirmed for
            // `jwks_max_stale` verify nothing (a key the issuer has since
            // revoked would otherwise stay trusted while keymint is cut off
            // from the issuer).
            Some(_) if older_than(fetched_at, spec.jwks_max_stale_ms) => {
                if attempted {
                    // Once per attempt (so per `jwks_min_refresh_interval`),
                    // not per refused token.
                    tracing::warn!(
                        issuer = %spec.name,
                        "issuer keys are older than `jwks_max_stale` and could not be fetched again: its tokens are refused until a fetch succeeds"
                    );
                }
                Err(AuthError::KeysStale)
            }
            Some(ks) => Ok(ks),
            None => Err(AuthError::KeysUnavailable),
        }
    }

    /// Waits until no fetch of this issuer's keys is in flight.
    pub(crate) async fn settled(&self) {
        drop(self.shared.fetch_lock.lock().await);
    }

    /// Starts one refresh in the background unless one is already running
    /// (single flight) or the rate limit says no; the request that asked
    /// goes on with the keys it has. Outside a tokio runtime nothing is
    /// started (the keys are refreshed by the next request that must wait).
    fn refresh_in_background(
        &self,
        fetcher: &Fetcher,
        now: Timestamp,
        allowed: impl Fn(Option<Timestamp>) -> bool,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Ok(guard) = self.shared.fetch_lock.clone().try_lock_owned() else {
            return; // a fetch is in flight; it brings what this one would
        };
        {
            let mut st = self.shared.write();
            if !allowed(st.last_attempt) {
                return;
            }
            st.last_attempt = Some(now);
        }
        let shared = self.shared.clone();
        let fetcher = fetcher.clone();
        runtime.spawn(async move {
            let _guard = guard;
            shared.refresh(&fetcher, now).await;
        });
    }
}

async fn load(
    source: &Source,
    fetch_timeout: std::time::Duration,
    fetcher: &Fetcher,
) -> Result<KeySet, FetchError> {
    let body = match source {
        Source::Static(_) => return Err(FetchError::Invalid("static key set".into())),
        Source::File(p) => fetcher.read_file(p).await?,
        Source::Url(u) => fetcher.get(u, fetch_timeout).await?,
        Source::Discovery { issuer, allow_http } => {
            let started = tokio::time::Instant::now();
            let uri = fetcher
                .discover_jwks_uri(issuer, *allow_http, fetch_timeout)
                .await?;
            let left = fetch_timeout.saturating_sub(started.elapsed());
            fetcher.get(&uri, left).await?
        }
    };
    KeySet::parse(&body).map_err(FetchError::Invalid)
}
