//! What the broker keeps and serves as an OIDC issuer
//! (docs/design/0016-oidc-issuer.md): the signing keys, sealed in the
//! store as one key set; the discovery document and JWK Set; rotation
//! (admin, audited); and a reload that lets replicas follow a rotation
//! made elsewhere.

use std::sync::Arc;

use keymint_core::Timestamp;
use keymint_core::keyring::Keyring;
use keymint_issuer::{Issuer, IssuerSettings, KeySet, Rotated};
use keymint_store::Store;
use sha2::{Digest, Sha256};

use super::{Broker, BrokerError, Principal, Result};

/// The store name of the sealed key set.
pub const ISSUER_KEYS: &str = "issuer/keyset";

/// How often a replica reads the key set again.
pub const ISSUER_REFRESH: std::time::Duration = std::time::Duration::from_secs(30);

/// How often a replica reads the engines' sealed keys (SSH CA keys) again,
/// so a CA key imported on another replica signs here too within this.
pub const ENGINE_KEY_REFRESH: std::time::Duration = std::time::Duration::from_secs(2);

/// The issuer in force, and what rotation and reloads need.
#[derive(Debug)]
pub struct OidcState {
    pub(crate) issuer: Arc<Issuer>,
    /// One rotation at a time in this process.
    rotation: tokio::sync::Mutex<()>,
    /// SHA-256 of the sealed set last loaded, so a reload parses only what
    /// changed.
    seen: std::sync::Mutex<[u8; 32]>,
}

impl OidcState {
    pub fn new(issuer: Arc<Issuer>) -> Self {
        Self {
            issuer,
            rotation: tokio::sync::Mutex::new(()),
            seen: std::sync::Mutex::new([0; 32]),
        }
    }
}

fn internal(m: &str) -> BrokerError {
    BrokerError::Engine(keymint_engines::EngineError::Internal(m.to_owned()))
}

fn open_set(keyring: &Keyring, sealed: &[u8]) -> Result<KeySet> {
    let plain = keyring
        .open(ISSUER_KEYS, sealed)
        .map_err(|_| internal("the sealed issuer keys cannot be opened with this root key"))?;
    KeySet::from_bytes(&plain).map_err(|_| internal("the stored issuer keys cannot be read"))
}

/// Seals `set` and stores it in place of `expected` (what was read before
/// the change; `None`: nothing stored yet). `false`: another replica
/// changed the set meanwhile, nothing was written; read it again.
async fn swap_set(
    store: &Arc<dyn Store>,
    keyring: &Keyring,
    expected: Option<Vec<u8>>,
    set: &KeySet,
    now: Timestamp,
) -> Result<bool> {
    let plain = set
        .to_bytes()
        .map_err(|_| internal("cannot encode the issuer keys"))?;
    let sealed = keyring
        .seal(ISSUER_KEYS, &plain)
        .map_err(|_| internal("cannot seal the issuer keys"))?;
    Ok(store
        .swap_secret(ISSUER_KEYS, expected, sealed, now)
        .await?)
}

/// How many times a replica reads the key set again after losing a race
/// to another replica's write before it gives up.
const SWAP_ATTEMPTS: usize = 8;

/// At start: the issuer with its sealed keys, generating (and sealing,
/// before any is used) a key for each configured algorithm that has none.
/// Replicas starting at once agree: each adds its keys only to the set it
/// read, and a replica whose write lost reads the winner's set and uses it.
pub async fn open_issuer(
    store: &Arc<dyn Store>,
    keyring: &Keyring,
    settings: IssuerSettings,
    now: Timestamp,
) -> Result<Arc<Issuer>> {
    for _ in 0..SWAP_ATTEMPTS {
        let stored = store.get_secret(ISSUER_KEYS).await?;
        let mut set = match &stored {
            Some(sealed) => open_set(keyring, sealed)?,
            None => KeySet::default(),
        };
        let algorithms = settings.algorithms.clone();
        let (set, added) = tokio::task::spawn_blocking(move || {
            let added = set.ensure(&algorithms, now);
            (set, added)
        })
        .await
        .map_err(|_| internal("key generation stopped"))?;
        if !added.map_err(|_| internal("cannot generate the issuer keys"))? {
            return Ok(Arc::new(Issuer::new(settings, set)));
        }
        if swap_set(store, keyring, stored, &set, now).await? {
            tracing::info!("generated the issuer's signing keys");
            return Ok(Arc::new(Issuer::new(settings, set)));
        }
    }
    Err(internal(
        "the issuer keys kept changing while this replica started; start it again",
    ))
}

impl Broker {
    /// The issuer, when keymint is one.
    pub fn oidc(&self) -> Option<&Arc<Issuer>> {
        self.oidc.as_ref().map(|o| &o.issuer)
    }

    /// The discovery document (`/.well-known/openid-configuration`).
    pub fn issuer_discovery(&self) -> Option<serde_json::Value> {
        Some(self.oidc()?.discovery())
    }

    /// The JWK Set at this moment.
    pub fn issuer_jwks(&self) -> Option<serde_json::Value> {
        Some(self.oidc()?.jwks(self.now()))
    }

    /// Starts a rotation of every signing key (admin): new keys published
    /// now, signing after `publish_ahead`; the old ones stay published
    /// until their last token expires. The set is sealed in the store
    /// before it is used. Audited as `issuer.rotated` (key ids only).
    pub async fn rotate_issuer_keys(&self, p: &Principal) -> Result<Vec<Rotated>> {
        Self::require_admin(p)?;
        let Some(state) = &self.oidc else {
            return Err(BrokerError::NotFound("issuer"));
        };
        let _one = state.rotation.lock().await;
        let now = self.now();
        // The store's copy is the truth (another replica may have rotated),
        // and the new set replaces exactly the copy it was made from: two
        // replicas rotating at once cannot both win and lose a key.
        let stored = self.store.get_secret(ISSUER_KEYS).await?;
        let mut set = match &stored {
            Some(sealed) => open_set(&self.keyring, sealed)?,
            None => KeySet::default(),
        };
        let settings = state.issuer.settings().clone();
        let rotated = tokio::task::spawn_blocking(move || {
            let r = set.rotate(
                &settings.algorithms,
                now,
                settings.publish_ahead_secs,
                settings.max_token_secs,
            );
            (set, r)
        })
        .await
        .map_err(|_| internal("key generation stopped"))?;
        let (set, rotated) = rotated;
        let rotated = rotated.map_err(|e| match e {
            keymint_issuer::IssuerError::RotationPending(..) => {
                BrokerError::Conflict(format!("{e}; rotate again once it signs"))
            }
            _ => internal("cannot generate the new issuer keys"),
        })?;
        // Durable first: a crash after this keeps the new keys.
        if !swap_set(&self.store, &self.keyring, stored, &set, now).await? {
            return Err(BrokerError::Unavailable(
                "another replica changed the issuer keys at the same moment; nothing was rotated here, ask again"
                    .into(),
            ));
        }
        state.issuer.replace(set);
        let ev = keymint_core::audit::AuditDraft::new(now, "issuer.rotated", p.actor()).data(
            "keys",
            serde_json::to_value(&rotated).unwrap_or(serde_json::Value::Null),
        );
        self.store.append_audit(ev).await?;
        self.notify_audit();
        Ok(rotated)
    }

    /// Reads the key set from the store again if it changed (a rotation on
    /// another replica). Returns whether it changed.
    pub async fn refresh_issuer_keys(&self) -> Result<bool> {
        let Some(state) = &self.oidc else {
            return Ok(false);
        };
        let Some(sealed) = self.store.get_secret(ISSUER_KEYS).await? else {
            return Ok(false);
        };
        let digest: [u8; 32] = Sha256::digest(&sealed).into();
        if state.seen.lock().map(|s| *s == digest).unwrap_or(false) {
            return Ok(false);
        }
        let set = open_set(&self.keyring, &sealed)?;
        state.issuer.replace(set);
        if let Ok(mut s) = state.seen.lock() {
            *s = digest;
        }
        Ok(true)
    }

    /// Follows keys changed by other replicas sharing the store: the SSH
    /// CAs' keys and the databases' admin passwords every
    /// [`ENGINE_KEY_REFRESH`], the issuer's every [`ISSUER_REFRESH`].
    pub async fn run_key_refresh(self: Arc<Self>) {
        let issuer_every =
            (ISSUER_REFRESH.as_millis() / ENGINE_KEY_REFRESH.as_millis()).max(1) as u64;
        let mut tick = 0u64;
        loop {
            tokio::time::sleep(ENGINE_KEY_REFRESH).await;
            tick += 1;
            if let Err(e) = self.refresh_engine_keys().await {
                tracing::error!(error = %e, "cannot reload the engines' keys");
            }
            if let Err(e) = self.refresh_admin_credentials().await {
                tracing::error!(error = %e, "cannot reload the databases' admin passwords");
            }
            if self.oidc.is_some()
                && tick.is_multiple_of(issuer_every)
                && let Err(e) = self.refresh_issuer_keys().await
            {
                tracing::error!(error = %e, "cannot reload the issuer keys");
            }
        }
    }
}
