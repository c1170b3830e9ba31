//! How a replaced upstream key reaches every process that proxies
//! (docs/design/0035-key-rotation.md).
//!
//! The proxy caches each upstream's opened key in memory (`Proxy::key`).
//! The process that sets a key (`Proxy::set_key`, which a rotation calls)
//! replaces its own entry at once; every other process sharing the store
//! (replicas on PostgreSQL, `keymint proxy` processes) reads the sealed
//! keys again every [`KEY_REFRESH`] and takes a key whose sealed bytes
//! changed. That is how the issuer's key set reaches replicas too (a
//! periodic read of sealed state), and it costs one small read per
//! upstream per second, off the request path. A rotation waits at least
//! [`MIN_SWITCH_GRACE`] after the switch before the old key is revoked, so
//! no process still sends it by then.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::{Proxy, key_secret_name};

/// How often every process reads the sealed upstream keys again.
pub const KEY_REFRESH: Duration = Duration::from_secs(1);

/// The least time between a switch and the revocation of the old key:
/// every process has read the new key by then (a refresh, plus a slow
/// store read), and requests sent with the old key reached the provider.
pub const MIN_SWITCH_GRACE: Duration = Duration::from_secs(3);

impl Proxy {
    /// Reads every upstream's sealed key again every [`KEY_REFRESH`] and
    /// replaces the cached key whose sealed form changed, until dropped.
    pub async fn run_key_refresh(self: Arc<Self>) {
        let mut seen: HashMap<String, Vec<u8>> = HashMap::new();
        let mut tick = tokio::time::interval(KEY_REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.refresh_keys(&mut seen).await;
        }
    }

    /// One pass of [`Proxy::run_key_refresh`]: `seen` holds the sealed
    /// form of each key last taken.
    pub(crate) async fn refresh_keys(&self, seen: &mut HashMap<String, Vec<u8>>) {
        for (name, (up, _)) in &self.upstreams {
            if up.federation.is_some() {
                continue;
            }
            let secret = key_secret_name(name);
            let sealed = match self.store.get_secret(&secret).await {
                Ok(Some(s)) => s,
                // Never set: nothing to take. A failed read keeps the key
                // in use (the next pass tries again).
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(upstream = %name, error = %e, "proxy: cannot read an upstream key again");
                    continue;
                }
            };
            if seen.get(name) == Some(&sealed) {
                continue;
            }
            let Ok(opened) = self.keyring.open(&secret, &sealed) else {
                tracing::error!(upstream = %name, "proxy: cannot open an upstream key");
                continue;
            };
            let Ok(key) = String::from_utf8(opened.to_vec()) else {
                continue;
            };
            let key = Arc::new(Zeroizing::new(key));
            let changed = {
                let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
                let changed = keys.get(name).is_some_and(|k| k.as_str() != key.as_str());
                keys.insert(name.clone(), key);
                changed
            };
            if changed {
                tracing::info!(upstream = %name, "proxy: took the upstream's new key");
            }
            seen.insert(name.clone(), sealed);
        }
    }
}
