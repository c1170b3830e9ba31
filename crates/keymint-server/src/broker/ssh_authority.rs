//! What the broker serves for SSH certificate authorities: each CA's public
//! key and its key revocation list (docs/design/0006-ssh-certificates.md).

use keymint_core::model::LeaseState;
use keymint_core::model::valid_name;
use keymint_core::role::{EngineKind, RoleKind};
use keymint_engines::ssh::{CertData, krl};
use keymint_store::LeaseFilter;

use super::{Broker, BrokerError, Principal, Result};

/// How many revoked leases per role a KRL looks at (newest first).
const KRL_SCAN: u32 = 100_000;

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
        let seed = zeroize::Zeroizing::new(pair.private.to_bytes());
        let sealed = self
            .keyring
            .seal(&name, seed.as_ref())
            .map_err(|_| BrokerError::BadRequest("cannot seal the key".into()))?;
        // Durable first: a crash after this keeps the new key.
        self.store.put_secret(&name, sealed, self.now()).await?;
        if let Some(engine) = self.engines.get(&EngineKind::Ssh) {
            engine.use_sealed_key(&name, seed.as_ref())?;
        }
        let ev = keymint_core::audit::AuditDraft::new(self.now(), "ssh.ca_imported", p.actor())
            .data("ca", ca)
            .data("public_key", public.clone())
            .data("replaced", current);
        self.store.append_audit(ev).await?;
        self.notify_audit();
        Ok(public)
    }

    /// The CA's OpenSSH KRL: the serial numbers of its certificates whose
    /// lease was revoked (or is being revoked) before they expired.
    pub async fn ssh_krl(&self, _p: &Principal, ca: &str) -> Result<Vec<u8>> {
        let public = self.ssh_public_key(ca)?;
        let public = ssh_key::PublicKey::from_openssh(&public).map_err(|_| {
            BrokerError::Engine(keymint_engines::EngineError::Internal(
                "cannot read the CA key".into(),
            ))
        })?;
        let now = self.now();
        let now_secs = u64::try_from(now.unix_seconds()).unwrap_or(0);
        let mut serials = Vec::new();
        let roles: Vec<String> = self
            .roles
            .values()
            .filter(|r| matches!(&r.kind, RoleKind::Ssh(s) if s.ca == ca))
            .map(|r| r.name.clone())
            .collect();
        for role in roles {
            for state in [LeaseState::Revoked, LeaseState::Revoking] {
                let leases = self
                    .store
                    .list_leases(&LeaseFilter {
                        role: Some(role.clone()),
                        state: Some(state),
                        limit: KRL_SCAN,
                        ..LeaseFilter::default()
                    })
                    .await?;
                for l in leases.iter().filter(|l| l.engine == EngineKind::Ssh) {
                    if let Ok(d) = serde_json::from_value::<CertData>(l.engine_data.clone())
                        && d.ca == ca
                        && d.valid_before > now_secs
                    {
                        serials.push(d.serial);
                    }
                }
            }
        }
        let version = u64::try_from(now.millis()).unwrap_or(0);
        krl::build(
            &public,
            &serials,
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
