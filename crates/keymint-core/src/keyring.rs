//! The root key and what is derived from it.
//!
//! INVARIANT (DESIGN.md 4): stored secrets (upstream keys, CA keys, signing
//! keys) are sealed with XChaCha20-Poly1305 under a key derived from the root
//! key, with the secret's name as associated data, so a sealed value cannot be
//! moved to another name. Secrets that are handed out (tokens, passwords) are
//! never stored; only their HMAC-SHA256 fingerprint is, under a second derived
//! key, and the fingerprint is all that audit events and logs ever carry.

use std::fmt;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

pub const ROOT_KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("root key must be {ROOT_KEY_LEN} bytes written as 64 hex digits")]
    BadRootKey,
    #[error("the operating system's random number generator failed")]
    Random,
    #[error("sealed value is corrupt or was sealed under another root key or name")]
    Open,
}

/// The root key and its derived keys. `Debug` prints nothing secret.
pub struct Keyring {
    seal: XChaCha20Poly1305,
    /// HMAC-SHA256 keyed with the fingerprint key, its inner and outer
    /// pads already absorbed: a fingerprint clones it instead of keying a
    /// new one (two SHA-256 blocks fewer per call, on every request's
    /// token lookup).
    fingerprint_mac: Hmac<Sha256>,
    key_id: String,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

fn derive(root: &[u8; ROOT_KEY_LEN], label: &[u8]) -> Zeroizing<[u8; 32]> {
    let hk = hkdf::Hkdf::<Sha256>::new(Some(b"keymint root key v1"), root);
    let mut out = Zeroizing::new([0u8; 32]);
    // 32 bytes is always a valid HKDF-SHA256 output length.
    let _ = hk.expand(label, out.as_mut());
    out
}

impl Keyring {
    pub fn from_root(root: &[u8; ROOT_KEY_LEN]) -> Self {
        let seal_key = derive(root, b"seal");
        let fingerprint_key = derive(root, b"fingerprint");
        let id = derive(root, b"key id");
        let seal = XChaCha20Poly1305::new(seal_key.as_ref().into());
        // HMAC pads a key shorter than the hash's block with zeros: the
        // same key, written out to the 64 bytes `KeyInit::new` takes.
        let mut block = Zeroizing::new([0u8; 64]);
        block[..32].copy_from_slice(fingerprint_key.as_ref());
        let fingerprint_mac = <Hmac<Sha256> as hmac::digest::KeyInit>::new(block.as_ref().into());
        Self {
            seal,
            fingerprint_mac,
            key_id: hex::encode(&id[..8]),
        }
    }

    /// Generates a fresh root key, returned as the hex text to store.
    pub fn generate_root_hex() -> Result<Zeroizing<String>, KeyringError> {
        let mut k = Zeroizing::new([0u8; ROOT_KEY_LEN]);
        getrandom::fill(k.as_mut()).map_err(|_| KeyringError::Random)?;
        Ok(Zeroizing::new(hex::encode(k.as_ref())))
    }

    /// Parses a root key file's text (64 hex digits, surrounding white space ignored).
    pub fn from_root_hex(text: &str) -> Result<Self, KeyringError> {
        let mut raw = hex::decode(text.trim()).map_err(|_| KeyringError::BadRootKey)?;
        let res = <[u8; ROOT_KEY_LEN]>::try_from(raw.as_slice())
            .map(|k| Self::from_root(&k))
            .map_err(|_| KeyringError::BadRootKey);
        raw.zeroize();
        res
    }

    /// A public identifier of the root key (not derived usefully from it by
    /// anyone without it), recorded with sealed values to explain failures.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Seals `plaintext` under `name`. Output: 24-byte nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, name: &str, plaintext: &[u8]) -> Result<Vec<u8>, KeyringError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|_| KeyringError::Random)?;
        let ct = self
            .seal
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| KeyringError::Open)?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Opens a value sealed under `name`.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyringError> {
        if sealed.len() < NONCE_LEN {
            return Err(KeyringError::Open);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.seal
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: name.as_bytes(),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| KeyringError::Open)
    }

    /// The HMAC-SHA256 fingerprint of a secret, as 64 hex digits. Stable for
    /// one root key, useless to anyone without it.
    pub fn fingerprint(&self, secret: &[u8]) -> String {
        let mut mac = self.fingerprint_mac.clone();
        mac.update(secret);
        crate::lower_hex(&mac.finalize().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring() -> Keyring {
        Keyring::from_root_hex(&Keyring::generate_root_hex().unwrap()).unwrap()
    }

    #[test]
    fn seal_round_trips_and_binds_the_name() {
        let k = keyring();
        let sealed = k.seal("upstream/openai", b"sk-test-not-real").unwrap();
        assert!(!sealed.windows(8).any(|w| w == b"sk-test-"));
        assert_eq!(
            &k.open("upstream/openai", &sealed).unwrap()[..],
            b"sk-test-not-real"
        );
        assert!(k.open("upstream/other", &sealed).is_err());
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(k.open("upstream/openai", &tampered).is_err());
        assert!(keyring().open("upstream/openai", &sealed).is_err());
    }

    #[test]
    fn fingerprints_are_keyed() {
        let a = keyring();
        let b = keyring();
        assert_eq!(a.fingerprint(b"x"), a.fingerprint(b"x"));
        assert_ne!(a.fingerprint(b"x"), b.fingerprint(b"x"));
        assert_eq!(a.fingerprint(b"x").len(), 64);
    }

    #[test]
    fn fingerprints_are_those_stored_before_the_mac_was_kept() {
        // Stored fingerprints must keep matching: the kept, pre-keyed MAC
        // gives what a MAC keyed per call with the derived key gave.
        let root = [7u8; ROOT_KEY_LEN];
        let k = Keyring::from_root(&root);
        let key = derive(&root, b"fingerprint");
        for secret in [&b""[..], b"x", b"kmt_NotARealToken", &[0xab; 200]] {
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.as_ref()).unwrap();
            mac.update(secret);
            assert_eq!(
                k.fingerprint(secret),
                hex::encode(mac.finalize().into_bytes())
            );
        }
    }

    #[test]
    fn bad_root_keys_are_refused() {
        assert!(Keyring::from_root_hex("abcd").is_err());
        assert!(Keyring::from_root_hex(&"zz".repeat(32)).is_err());
        assert!(Keyring::from_root_hex(&format!("  {}\n", "ab".repeat(32))).is_ok());
    }
}
