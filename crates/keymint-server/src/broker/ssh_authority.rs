//! What the broker serves for SSH certificate authorities: each CA's public
//! key and its key revocation list (docs/design/0006-ssh-certificates.md).

use keymint_core::model::LeaseState;
use keymint_core::model::valid_name;
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
            .get("ssh")
            .and_then(|e| e.authority_public_key(ca))
            .ok_or(BrokerError::NotFound("ssh CA"))
    }

    /// The CA's public key in OpenSSH format (any authenticated caller).
    pub async fn ssh_ca_public_key(&self, _p: &Principal, ca: &str) -> Result<String> {
        self.ssh_public_key(ca)
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
            .filter(|r| {
                r.engine == "ssh" && r.settings.get("ca").and_then(|c| c.as_str()) == Some(ca)
            })
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
                for l in leases.iter().filter(|l| l.engine == "ssh") {
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
