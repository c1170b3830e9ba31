//! One issuer's keys: cached, refreshed on an unknown `kid` or when old,
//! with at most one fetch per issuer per `jwks_min_refresh_interval`, and
//! concurrent requests sharing the fetch in flight.
//!
//! The rate limit runs on the `now` that callers pass to `verify`, not on a
//! clock of its own (DESIGN.md invariant 7), so tests move it by hand.

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

#[derive(Debug)]
pub(crate) struct KeyCache {
    state: RwLock<State>,
    /// Held for the whole of a fetch; who waits on it shares the result.
    fetch_lock: tokio::sync::Mutex<()>,
}

impl KeyCache {
    pub(crate) fn new(spec: &IssuerSpec) -> Self {
        let mut st = State::default();
        if let Source::Static(set) = &spec.source {
            st.keys = Some(set.clone());
        }
        Self {
            state: RwLock::new(st),
            fetch_lock: tokio::sync::Mutex::new(()),
        }
    }

    fn snapshot(&self) -> (Option<Arc<KeySet>>, Option<Timestamp>, Option<Timestamp>) {
        let st = self
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (st.keys.clone(), st.fetched_at, st.last_attempt)
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
        if matches!(spec.source, Source::Static(_)) {
            return match self.snapshot().0 {
                Some(ks) => Ok(ks),
                None => Err(AuthError::KeysUnavailable),
            };
        }
        let stale = |fetched_at: Option<Timestamp>| {
            fetched_at.is_none_or(|t| t.until(now) >= spec.jwks_max_age_ms)
        };
        let (keys, fetched_at, _) = self.snapshot();
        if let Some(ks) = &keys
            && !stale(fetched_at)
            && ks.lookup(kid, alg) != Lookup::Unknown
        {
            return Ok(ks.clone());
        }

        // Unknown kid, nothing loaded yet, or keys too old: refresh, once.
        let _guard = self.fetch_lock.lock().await;
        let (keys, fetched_at, last_attempt) = self.snapshot();
        let known = keys
            .as_ref()
            .is_some_and(|ks| ks.lookup(kid, alg) != Lookup::Unknown);
        // Someone else refreshed while we waited for the lock.
        let refreshed = !stale(fetched_at) && known;
        // A `now` earlier than the last attempt (callers' clocks differ)
        // counts as inside the window.
        let allowed = last_attempt.is_none_or(|t| t.until(now) >= spec.min_refresh_ms);
        if !refreshed && allowed {
            self.state
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .last_attempt = Some(now);
            match load(spec, fetcher).await {
                Ok(set) => {
                    tracing::debug!(issuer = %spec.name, keys = set.len(), "issuer keys loaded");
                    let mut st = self
                        .state
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    st.keys = Some(Arc::new(set));
                    st.fetched_at = Some(now);
                }
                Err(e) => {
                    // Old keys stay in use until a fetch succeeds.
                    tracing::warn!(issuer = %spec.name, error = %e, "fetching issuer keys failed");
                }
            }
        }
        match self.snapshot().0 {
            Some(ks) => Ok(ks),
            None => Err(AuthError::KeysUnavailable),
        }
    }
}

async fn load(spec: &IssuerSpec, fetcher: &Fetcher) -> Result<KeySet, FetchError> {
    let body = match &spec.source {
        Source::Static(_) => return Err(FetchError::Invalid("static key set".into())),
        Source::File(p) => fetcher.read_file(p).await?,
        Source::Url(u) => fetcher.get(u, spec.fetch_timeout).await?,
        Source::Discovery { issuer, allow_http } => {
            let started = tokio::time::Instant::now();
            let uri = fetcher
                .discover_jwks_uri(issuer, *allow_http, spec.fetch_timeout)
                .await?;
            let left = spec.fetch_timeout.saturating_sub(started.elapsed());
            fetcher.get(&uri, left).await?
        }
    };
    KeySet::parse(&body).map_err(FetchError::Invalid)
}
