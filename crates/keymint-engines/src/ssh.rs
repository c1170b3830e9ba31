//! OpenSSH user certificates (docs/design/0006-ssh-certificates.md).
//!
//! A role names a certificate authority (an Ed25519 key keymint generates
//! once and keeps sealed in its store), the principals it grants, and the
//! critical options and extensions it sets. The workload sends its own
//! public key; keymint signs a user certificate for it whose validity ends
//! with the lease (never past the task's end), with a serial number that
//! only grows and a key id naming the lease and the task.
//!
//! A certificate cannot be recalled once handed out, so revoking records
//! the lease as revoked and the serial goes into the CA's OpenSSH KRL
//! ([`krl`]), which sshd reads through `RevokedKeys`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use keymint_core::model::{Lease, Revocability};
use keymint_core::role::EngineKind;
use keymint_proto::{Credential, SecretString};
use serde::{Deserialize, Serialize};
use ssh_key::certificate::{Builder, CertType};
use ssh_key::private::Ed25519Keypair;
use ssh_key::{PrivateKey, PublicKey};
use zeroize::Zeroizing;

use crate::{Engine, EngineError, IssueContext, Prepared};

/// How far before issue a certificate is valid, for clocks that run a
/// little behind keymint's.
pub const CLOCK_SKEW_SECS: u64 = 30;

/// The store name of a CA's sealed Ed25519 seed.
pub fn ca_secret_name(ca: &str) -> String {
    format!("ssh-ca/{ca}/ed25519-seed")
}

pub use keymint_core::role::{SshRole as SshRoleSettings, valid_principal, valid_source_address};

/// What a lease records about its certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertData {
    pub ca: String,
    pub serial: u64,
    pub key_id: String,
    pub valid_before: u64,
    /// The public key (OpenSSH format, no comment) that signed the
    /// certificate: a KRL lists a revoked serial under the key that signed
    /// it, which a CA key replaced since is not (docs/design/0006). Absent
    /// on leases from before it was recorded: those were signed by the key
    /// the CA had then, taken to be its key now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_key: Option<String>,
}

#[derive(Debug, Default)]
pub struct SshEngine {
    cas: Vec<String>,
    keys: std::sync::RwLock<HashMap<String, PrivateKey>>,
    last_serial: AtomicU64,
}

/// The creation time, in milliseconds, that a keymint id starts with.
pub(crate) fn id_millis(id: &str) -> Option<u64> {
    let body = id.split_once('_')?.1;
    let mut ms: u64 = 0;
    for b in body.bytes().take(8) {
        let d = keymint_core::token::ALPHABET.iter().position(|&a| a == b)?;
        ms = ms.checked_mul(62)?.checked_add(d as u64)?;
    }
    Some(ms)
}

impl SshEngine {
    /// An engine for the CAs named by `cas`. Their keys are given later
    /// with [`Engine::use_sealed_key`].
    pub fn new(mut cas: Vec<String>) -> Self {
        cas.sort();
        cas.dedup();
        Self {
            cas,
            keys: std::sync::RwLock::new(HashMap::new()),
            last_serial: AtomicU64::new(0),
        }
    }

    fn ca_key(&self, ca: &str) -> Result<PrivateKey, EngineError> {
        self.keys
            .read()
            .ok()
            .and_then(|k| k.get(ca).cloned())
            .ok_or_else(|| EngineError::Internal(format!("ssh CA `{ca}` has no key loaded")))
    }

    /// The CA's public key in OpenSSH format, for `TrustedUserCAKeys`.
    pub fn ca_public_key(&self, ca: &str) -> Result<PublicKey, EngineError> {
        Ok(self.ca_key(ca)?.public_key().clone())
    }

    pub fn cas(&self) -> &[String] {
        &self.cas
    }

    /// The next serial number: the issue time in milliseconds times 1,024,
    /// or one more than the last if that is not larger. So serials grow
    /// within a process and, as long as the clock does not go back, across
    /// restarts; the serial is stored with the lease.
    fn next_serial(&self, issued_ms: u64) -> u64 {
        let floor = issued_ms.saturating_mul(1024);
        let mut cur = self.last_serial.load(Ordering::Relaxed);
        loop {
            let next = floor.max(cur + 1);
            match self.last_serial.compare_exchange_weak(
                cur,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(actual) => cur = actual,
            }
        }
    }
}

/// The fewest bits of an RSA key keymint certifies (NIST SP 800-131A;
/// OpenSSH itself still takes 1024).
pub const MIN_RSA_BITS: usize = 2048;

/// The size in bits of a positive big-endian integer.
fn bit_length(bytes: &[u8]) -> usize {
    bytes.iter().position(|&b| b != 0).map_or(0, |i| {
        (bytes.len() - i) * 8 - bytes[i].leading_zeros() as usize
    })
}

impl SshEngine {
    /// Refuses a key keymint must not certify: a DSA key, an RSA key under
    /// [`MIN_RSA_BITS`], or a CA key of keymint's own (a certificate for
    /// it would let whoever holds the CA key log in as the workload, and
    /// says the CA key is handed around). Never echoes the key.
    fn check_subject(&self, subject: &PublicKey) -> Result<(), EngineError> {
        if subject.key_data().dsa().is_some() {
            return Err(bad(
                "`public_key` is a DSA key; keymint does not certify DSA keys (1024 bits, removed from OpenSSH 9.8); use ssh-keygen -t ed25519",
            ));
        }
        if let Some(rsa) = subject.key_data().rsa() {
            let bits = rsa.n.as_positive_bytes().map_or(0, bit_length);
            if bits < MIN_RSA_BITS {
                return Err(bad(&format!(
                    "`public_key` is an RSA key of {bits} bits; keymint certifies RSA keys of {MIN_RSA_BITS} bits or more (or use ssh-keygen -t ed25519)"
                )));
            }
            // Exponent 1 makes the padded hash its own signature; an even
            // exponent or modulus is no RSA key (ssh-keygen makes 65537).
            let e = rsa.e.as_positive_bytes().unwrap_or_default();
            let odd = |b: &[u8]| b.last().is_some_and(|l| l & 1 == 1);
            if bit_length(e) < 2 || !odd(e) || !rsa.n.as_positive_bytes().is_some_and(odd) {
                return Err(bad(
                    "`public_key` is not a usable RSA key (its exponent must be odd and at least 3, its modulus odd): anyone could sign for it; use ssh-keygen -t ed25519",
                ));
            }
        }
        // A point of small order (the identity, among 8) verifies a fixed
        // signature for every message: a certificate for it would log in
        // whoever holds the certificate (sshd takes it; docs/design/0006).
        let ed25519 = match subject.key_data() {
            ssh_key::public::KeyData::Ed25519(k) => Some(k.0),
            ssh_key::public::KeyData::SkEd25519(k) => Some(k.public_key().0),
            _ => None,
        };
        if let Some(point) = ed25519
            && ed25519_dalek::VerifyingKey::from_bytes(&point).map_or(true, |k| k.is_weak())
        {
            return Err(bad(
                "`public_key` is not a usable Ed25519 key (a point of small order, or none): anyone could sign for it; generate one with ssh-keygen -t ed25519",
            ));
        }
        let is_a_ca_key = self.keys.read().ok().is_some_and(|k| {
            k.values()
                .any(|ca| ca.public_key().key_data() == subject.key_data())
        });
        if is_a_ca_key {
            return Err(bad(
                "`public_key` is the public key of a keymint SSH CA; send the workload's own key",
            ));
        }
        Ok(())
    }
}

fn bad(msg: &str) -> EngineError {
    EngineError::BadRequest(msg.to_owned())
}

#[async_trait]
impl Engine for SshEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Ssh
    }

    fn revocability(&self) -> Revocability {
        // Revoked through the CA's KRL; otherwise it lives to its own end.
        Revocability::ExpireOnly
    }

    fn is_local(&self) -> bool {
        true
    }

    fn prepare(&self, ctx: &IssueContext<'_>) -> Result<Prepared, EngineError> {
        let settings = ctx.ssh_role()?;
        let text = ctx
            .public_key
            .ok_or_else(|| bad("`public_key` is required: the workload's OpenSSH public key"))?;
        if text.len() > 16 * 1024 {
            return Err(bad("`public_key` is too long"));
        }
        let subject = PublicKey::from_openssh(text.trim())
            .map_err(|_| bad("`public_key` is not an OpenSSH public key"))?;
        self.check_subject(&subject)?;
        let ca = self.ca_key(&settings.ca)?;
        let issued_ms = id_millis(ctx.lease_id)
            .ok_or_else(|| EngineError::Internal("the lease id is malformed".into()))?;
        let now = issued_ms / 1000;
        let valid_after = now.saturating_sub(CLOCK_SKEW_SECS);
        // INVARIANT (DESIGN.md 1): the certificate ends with the lease,
        // which never outlives its task.
        let valid_before = u64::try_from(ctx.expires_at.unix_seconds()).unwrap_or(0);
        if valid_before <= now {
            return Err(bad("the lease ends within the second"));
        }
        let serial = ctx.serial.unwrap_or_else(|| self.next_serial(issued_ms));
        let key_id = format!("keymint lease {} task {}", ctx.lease_id, ctx.task.id);
        let mut nonce = [0u8; 32];
        getrandom::fill(&mut nonce)
            .map_err(|_| EngineError::Internal("the random number generator failed".into()))?;
        let signing_failed = |_| EngineError::Internal("cannot build the certificate".into());
        let mut b = Builder::new(
            nonce.to_vec(),
            subject.key_data().clone(),
            valid_after,
            valid_before,
        )
        .map_err(signing_failed)?;
        b.serial(serial).map_err(signing_failed)?;
        b.cert_type(CertType::User).map_err(signing_failed)?;
        b.key_id(key_id.clone()).map_err(signing_failed)?;
        // Each once, at most 256 (OpenSSH loads no certificate with more).
        let principals = settings
            .certificate_principals(&ctx.role.name, ctx.principals)
            .map_err(EngineError::BadRequest)?;
        for p in &principals {
            b.valid_principal(p.clone()).map_err(signing_failed)?;
        }
        if let Some(c) = &settings.force_command {
            b.critical_option("force-command", c.clone())
                .map_err(signing_failed)?;
        }
        if let Some(s) = &settings.source_address {
            b.critical_option("source-address", s.clone())
                .map_err(signing_failed)?;
        }
        for (on, name) in [
            (settings.permit_agent_forwarding, "permit-agent-forwarding"),
            (settings.permit_port_forwarding, "permit-port-forwarding"),
            (settings.permit_pty, "permit-pty"),
            (settings.permit_user_rc, "permit-user-rc"),
            (settings.permit_x11_forwarding, "permit-X11-forwarding"),
        ] {
            if on {
                b.extension(name, "").map_err(signing_failed)?;
            }
        }
        let cert = b
            .sign(&ca)
            .map_err(|_| EngineError::Internal("cannot sign the certificate".into()))?;
        let text = cert
            .to_openssh()
            .map_err(|_| EngineError::Internal("cannot encode the certificate".into()))?;
        let ca_public_key = ca
            .public_key()
            .to_openssh()
            .map_err(|_| EngineError::Internal("cannot encode the CA key".into()))?;
        let data = CertData {
            ca: settings.ca.clone(),
            serial,
            key_id: key_id.clone(),
            valid_before,
            ca_key: Some(ca_public_key.clone()),
        };
        Ok(Prepared {
            fingerprint_material: Zeroizing::new(text.as_bytes().to_vec()),
            credential: Credential::SshCertificate {
                certificate: SecretString::new(text),
                serial,
                key_id,
                principals,
                valid_after,
                valid_before,
                ca_public_key,
            },
            engine_data: serde_json::to_value(&data)
                .map_err(|_| EngineError::Internal("cannot record the certificate".into()))?,
        })
    }

    async fn apply(&self, _: &IssueContext<'_>, _: &Prepared) -> Result<(), EngineError> {
        Ok(())
    }

    async fn revoke(&self, _lease: &Lease) -> Result<(), EngineError> {
        // The lease's state is the record; the KRL is built from it.
        Ok(())
    }

    fn authority_public_key(&self, name: &str) -> Option<String> {
        self.ca_public_key(name).ok()?.to_openssh().ok()
    }

    fn sealed_keys(&self) -> Vec<String> {
        self.cas.iter().map(|c| ca_secret_name(c)).collect()
    }

    fn use_sealed_key(&self, name: &str, secret: &[u8]) -> Result<(), EngineError> {
        let Some(ca) = self.cas.iter().find(|c| ca_secret_name(c) == name) else {
            return Err(EngineError::Internal(format!("no ssh CA uses `{name}`")));
        };
        let key = ca_key_from_seed(name, secret)?;
        if let Ok(mut k) = self.keys.write() {
            k.insert(ca.clone(), key);
        }
        Ok(())
    }
}

/// The CA key sealed as `name` (an Ed25519 seed).
pub fn ca_key_from_seed(name: &str, secret: &[u8]) -> Result<PrivateKey, EngineError> {
    let seed: &[u8; 32] = secret
        .try_into()
        .map_err(|_| EngineError::Internal(format!("`{name}` is not an Ed25519 seed")))?;
    Ok(PrivateKey::from(Ed25519Keypair::from_seed(seed)))
}

/// OpenSSH key revocation lists (PROTOCOL.krl), with one certificate
/// section per CA listing revoked serial numbers.
pub mod krl {
    use ssh_key::PublicKey;

    const MAGIC: u64 = 0x5353_484b_524c_0a00; // "SSHKRL\n\0"
    const FORMAT_VERSION: u32 = 1;
    const SECTION_CERTIFICATES: u8 = 1;
    const CERT_SERIAL_LIST: u8 = 0x20;

    fn string(out: &mut Vec<u8>, data: &[u8]) {
        out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(data);
    }

    /// A KRL revoking, for each CA key, the serials it signed: one
    /// certificate section per key (PROTOCOL.krl scopes a serial to the CA
    /// key that signed it). `version` must grow with each new list (sshd
    /// does not check it; tools may).
    pub fn build(
        sections: &[(PublicKey, Vec<u64>)],
        version: u64,
        generated: u64,
        comment: &str,
    ) -> Result<Vec<u8>, ssh_key::Error> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_be_bytes());
        out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        out.extend_from_slice(&version.to_be_bytes());
        out.extend_from_slice(&generated.to_be_bytes());
        out.extend_from_slice(&0u64.to_be_bytes()); // flags
        string(&mut out, b""); // reserved
        string(&mut out, comment.as_bytes());
        for (ca, serials) in sections {
            if serials.is_empty() {
                continue;
            }
            let mut sorted = serials.clone();
            sorted.sort_unstable();
            sorted.dedup();
            let mut list = Vec::with_capacity(sorted.len() * 8);
            for s in sorted {
                list.extend_from_slice(&s.to_be_bytes());
            }
            let mut section = Vec::new();
            string(&mut section, &ca.to_bytes()?);
            string(&mut section, b""); // reserved
            section.push(CERT_SERIAL_LIST);
            string(&mut section, &list);
            out.push(SECTION_CERTIFICATES);
            string(&mut out, &section);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let mut s = SshRoleSettings {
            ca: "ops".into(),
            principals: vec!["deploy".into()],
            force_command: None,
            source_address: Some("127.0.0.1/32,::1".into()),
            permit_pty: true,
            permit_port_forwarding: false,
            permit_agent_forwarding: false,
            permit_x11_forwarding: false,
            permit_user_rc: false,
        };
        assert!(s.validate().is_ok());
        s.principals = vec!["a,b".into()];
        assert!(s.validate().is_err());
        s.principals = vec!["root".into()];
        s.source_address = Some("10.0.0.0/8; rm -rf /".into());
        assert!(s.validate().is_err());
    }

    #[test]
    fn serials_only_grow() {
        let e = SshEngine::new(vec!["ops".into()]);
        let a = e.next_serial(1_000);
        let b = e.next_serial(1_000);
        let c = e.next_serial(999);
        assert!(a < b && b < c);
        assert!(e.next_serial(2_000) > c);
    }

    #[test]
    fn rsa_sizes_are_counted_in_bits() {
        assert_eq!(bit_length(&[]), 0);
        assert_eq!(bit_length(&[0, 0]), 0);
        assert_eq!(bit_length(&[1]), 1);
        assert_eq!(bit_length(&[0, 0x80, 0]), 16);
        let mut n = vec![0u8; 256];
        n[0] = 0xc1;
        assert_eq!(bit_length(&n), 2048);
        n[0] = 0x7f;
        assert_eq!(bit_length(&n), 2047);
    }

    #[test]
    fn id_time_is_decoded() {
        let now = keymint_core::Timestamp(1_800_000_000_123);
        let id = keymint_core::id::lease_id(now);
        assert_eq!(id_millis(&id), Some(1_800_000_000_123));
    }
}
