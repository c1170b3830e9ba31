//! What the broker serves for SSH certificate authorities: each CA's public
//! key and its key revocation list (docs/design/0006-ssh-certificates.md).

use keymint_core::model::LeaseState;
use keymint_core::model::valid_name;
use keymint_core::role::EngineKind;
use keymint_engines::ssh::{CertData, krl};
use keymint_store::LeaseFilter;
use sha2::Digest;

use super::{Broker, BrokerError, Principal, Result};

/// Revoked leases read per page while building a KRL (every page is read:
/// the KRL lists every revoked certificate that has not expired).
const KRL_PAGE: u32 = 1000;

/// How long a built KRL is served before it is built again even without a
/// revocation seen (a backstop: another replica's revocations arrive as a
/// bump of the revocation epoch, whose fallback poll is far shorter).
const KRL_MAX_AGE_MS: i64 = 60_000;

/// Built KRLs per CA, served until an SSH lease is revoked. Building one is
/// the only costly step, and only a revocation (or age) leads to it: a
/// caller fetching the KRL cannot make keymint build it again. One build at
/// a time; callers meanwhile wait for it.
#[derive(Debug, Default)]
pub(crate) struct KrlCache {
    /// Bumped whenever an SSH lease leaves `active`.
    pub(crate) generation: std::sync::atomic::AtomicU64,
    built: tokio::sync::Mutex<std::collections::HashMap<String, BuiltKrl>>,
}

#[derive(Debug)]
struct BuiltKrl {
    /// The KRL generation and the revocation epoch it was built at.
    generation: (u64, u64),
    at: keymint_core::Timestamp,
    bytes: Vec<u8>,
}

impl Broker {
    fn ssh_public_key(&self, ca: &str) -> Result<String> {
        if !valid_name(ca) {
            return Err(BrokerError::NotFound("ssh CA"));
        }
        self.engines
            .get(&EngineKind::Ssh)
            .and_then(|e| e.authority_public_key(ca))
            .ok_or(BrokerError::NotFound("ssh CA"))
    }

    /// The CA's public key in OpenSSH format (any authenticated caller).
    pub async fn ssh_ca_public_key(&self, _p: &Principal, ca: &str) -> Result<String> {
        self.ssh_public_key(ca)
    }

    /// Imports an existing Ed25519 CA key (OpenSSH private key format,
    /// unencrypted) for the CA `ca` that a role names: sealed under the root
    /// key, in force at once, audited with the public key (never the
    /// private one). Replacing a key that is already there needs `replace`,
    /// because hosts trusting the old key stop accepting what it signed.
    pub async fn import_ssh_ca(
        &self,
        p: &Principal,
        ca: &str,
        private_key: &str,
        replace: bool,
    ) -> Result<String> {
        Self::require_admin(p)?;
        let current = self.ssh_public_key(ca)?;
        let bad = |m: &str| BrokerError::BadRequest(m.to_owned());
        if private_key.len() > 16 * 1024 {
            return Err(bad("`private_key` is too large for an Ed25519 key"));
        }
        let key = ssh_key::PrivateKey::from_openssh(private_key).map_err(|_| {
            bad("`private_key` is not an OpenSSH private key (ssh-keygen -t ed25519)")
        })?;
        if key.is_encrypted() {
            return Err(bad(
                "the private key is encrypted; decrypt it first (ssh-keygen -p)",
            ));
        }
        let Some(pair) = key.key_data().ed25519() else {
            return Err(bad("only Ed25519 CA keys are supported"));
        };
        let public = key
            .public_key()
            .to_openssh()
            .map_err(|_| bad("cannot encode the public key"))?;
        if public == current {
            return Ok(public);
        }
        if !replace {
            return Err(BrokerError::Forbidden(format!(
                "ssh CA `{ca}` already has a key; pass `replace` to swap it (hosts must then trust the new one)"
            )));
        }
        let name = keymint_engines::ssh::ca_secret_name(ca);
        let stored = self.store.get_secret(&name).await?;
        let seed = zeroize::Zeroizing::new(pair.private.to_bytes());
        let sealed = self
            .keyring
            .seal(&name, seed.as_ref())
            .map_err(|_| BrokerError::BadRequest("cannot seal the key".into()))?;
        // Durable first: a crash after this keeps the new key. It replaces
        // exactly the key read above: of two replicas importing at once,
        // one wins and the other is told (every replica then follows the
        // stored key, `Broker::refresh_engine_keys`).
        let digest: [u8; 32] = sha2::Sha256::digest(&sealed).into();
        if !self
            .store
            .swap_secret(&name, stored, sealed, self.now())
            .await?
        {
            return Err(BrokerError::Unavailable(format!(
                "ssh CA `{ca}`'s key changed on another replica at the same moment; nothing was imported here, look and ask again"
            )));
        }
        if let Some(engine) = self.engines.get(&EngineKind::Ssh) {
            engine.use_sealed_key(&name, seed.as_ref())?;
        }
        // Known here: the reload does not take it for another replica's.
        if let Ok(mut seen) = self.engine_keys_seen.lock() {
            seen.insert(name.clone(), digest);
        }
        self.krl
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        let ev = keymint_core::audit::AuditDraft::new(self.now(), "ssh.ca_imported", p.actor())
            .data("ca", ca)
            .data("public_key", public.clone())
            .data("replaced", current);
        self.store.append_audit(ev).await?;
        self.notify_audit();
        Ok(public)
    }

    /// The CA's OpenSSH KRL: the serial numbers of its certificates whose
    /// lease was revoked (or is being revoked) before they expired. Served
    /// from the cache while no SSH lease was revoked since it was built.
    pub async fn ssh_krl(&self, _p: &Principal, ca: &str) -> Result<Vec<u8>> {
        let public = match self.ssh_public_key(ca) {
            Ok(public) => public,
            // A CA no role names any more still has revoked certificates
            // that have not expired: its KRL is served as long as its key
            // is in the store (a name that never had one stays a 404).
            Err(BrokerError::NotFound(what)) => self
                .retired_ca_public_key(ca)
                .await?
                .ok_or(BrokerError::NotFound(what))?,
            Err(e) => return Err(e),
        };
        // Revocations made here bump the KRL generation; those made on
        // another replica sharing the store reach this one as a bump of the
        // revocation epoch (docs/design/0022): either makes a new build.
        let generation = (
            self.krl
                .generation
                .load(std::sync::atomic::Ordering::Acquire),
            self.revocation_epoch
                .load(std::sync::atomic::Ordering::Acquire),
        );
        let now = self.now();
        let mut built = self.krl.built.lock().await;
        if let Some(b) = built.get(ca)
            && b.generation == generation
            && now.until(b.at) > -KRL_MAX_AGE_MS
        {
            return Ok(b.bytes.clone());
        }
        let bytes = self.build_krl(ca, &public, now).await?;
        self.metrics
            .krl_builds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        built.insert(
            ca.to_owned(),
            BuiltKrl {
                generation,
                at: now,
                bytes: bytes.clone(),
            },
        );
        Ok(bytes)
    }

    /// The public key of a CA that no configured role names but whose key
    /// is still sealed in the store; `None` for a name that never had one.
    async fn retired_ca_public_key(&self, ca: &str) -> Result<Option<String>> {
        if !valid_name(ca) {
            return Ok(None);
        }
        let name = keymint_engines::ssh::ca_secret_name(ca);
        let Some(sealed) = self.store.get_secret(&name).await? else {
            return Ok(None);
        };
        let internal =
            |m: &str| BrokerError::Engine(keymint_engines::EngineError::Internal(m.to_owned()));
        let seed = self
            .keyring
            .open(&name, &sealed)
            .map_err(|_| internal("the sealed ssh CA key cannot be opened with this root key"))?;
        let key = keymint_engines::ssh::ca_key_from_seed(&name, &seed)?;
        key.public_key()
            .to_openssh()
            .map(Some)
            .map_err(|_| internal("cannot encode the CA key"))
    }

    /// Builds the KRL from every revoked or revoking SSH lease whose
    /// certificate this CA signed and has not expired, page by page.
    // INVARIANT (docs/design/0006): the CA and serial come from what the
    // lease recorded when the certificate was signed, never from the roles
    // configured now: a role removed, renamed or moved to another CA keeps
    // its revoked certificates in the KRL of the CA that signed them.
    async fn build_krl(
        &self,
        ca: &str,
        current: &str,
        now: keymint_core::Timestamp,
    ) -> Result<Vec<u8>> {
        let now_secs = u64::try_from(now.unix_seconds()).unwrap_or(0);
        // A certificate is valid from `CLOCK_SKEW_SECS` before issue, for
        // hosts whose clock runs behind keymint's; such a host also takes
        // it that long past its end by keymint's clock, so a revoked one
        // stays listed that long too.
        let skew = keymint_engines::ssh::CLOCK_SKEW_SECS;
        let listed_after = now.plus_millis(-i64::try_from(skew.saturating_mul(1000)).unwrap_or(0));
        // Serials by the key that signed them (the CA's key now for leases
        // that did not record it): a CA key replaced keeps its revoked
        // certificates in the KRL, under its own key, for hosts that still
        // trust it.
        let mut by_key: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
        for state in [LeaseState::Revoked, LeaseState::Revoking] {
            let mut before = None;
            loop {
                let page = self
                    .store
                    .list_leases(&LeaseFilter {
                        engine: Some(EngineKind::Ssh),
                        state: Some(state),
                        before: before.take(),
                        expires_after: Some(listed_after),
                        limit: KRL_PAGE,
                        ..LeaseFilter::default()
                    })
                    .await?;
                for l in &page {
                    match serde_json::from_value::<CertData>(l.engine_data.clone()) {
                        Ok(d) if d.ca == ca && d.valid_before.saturating_add(skew) > now_secs => {
                            let key = d.ca_key.unwrap_or_else(|| current.to_owned());
                            by_key.entry(key).or_default().push(d.serial);
                        }
                        Ok(_) => {}
                        // Every SSH lease records its certificate; one that
                        // does not cannot be listed, and says so.
                        Err(_) => {
                            tracing::error!(lease = %l.id, "an ssh lease has no certificate record; it cannot be put in a KRL");
                        }
                    }
                }
                match page.last() {
                    Some(last) if page.len() >= KRL_PAGE as usize => {
                        before = Some(last.id.clone());
                    }
                    _ => break,
                }
            }
        }
        // One section per key, whatever comment its text carried.
        let mut sections: Vec<(ssh_key::PublicKey, Vec<u64>)> = Vec::with_capacity(by_key.len());
        for (key, serials) in by_key {
            let Ok(public) = ssh_key::PublicKey::from_openssh(&key) else {
                // Written by keymint at signing; never seen unreadable.
                tracing::error!(
                    ca,
                    "a recorded ssh CA key cannot be read; its revoked certificates are not in the KRL"
                );
                continue;
            };
            match sections
                .iter_mut()
                .find(|(k, _)| k.key_data() == public.key_data())
            {
                Some((_, all)) => all.extend(serials),
                None => sections.push((public, serials)),
            }
        }
        let version = u64::try_from(now.millis()).unwrap_or(0);
        krl::build(
            &sections,
            version,
            now_secs,
            &format!("keymint ssh CA {ca}"),
        )
        .map_err(|_| {
            BrokerError::Engine(keymint_engines::EngineError::Internal(
                "cannot build the KRL".into(),
            ))
        })
    }
}
