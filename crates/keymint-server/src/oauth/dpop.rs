//! DPoP proofs (RFC 9449 §4.3): the checks a token endpoint and a resource
//! make, server nonces (§8, §9) and proof replay protection (§11.1).
//!
//! Nonces are stateless: base64url(HMAC(root key, "dpop-nonce" ‖ window)),
//! for the current and the previous window of `NONCE_WINDOW_SECS`, so
//! every replica with the same root key accepts every other's nonces. A
//! proof's (key, `jti`) is claimed in the store (`Store::claim_once`) until
//! its `iat` leaves the acceptance window, so a replayed proof is refused
//! by every replica.

use base64::Engine as _;
use keymint_core::Timestamp;
use keymint_core::keyring::Keyring;
use serde_json::Value;
use sha2::Digest as _;

/// A nonce is good for this long, and the one before it too.
pub const NONCE_WINDOW_SECS: i64 = 60;
/// How far a proof's `iat` may be in the past, and in the future.
pub const IAT_PAST_SECS: i64 = 120;
pub const IAT_FUTURE_SECS: i64 = 10;

/// Why a proof was refused. Never carries the proof's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpopError {
    #[error("{0}")]
    Invalid(&'static str),
    #[error("the proof must carry the server's current nonce")]
    UseNonce,
}

/// The proof checks (stateless; replay is the store's `claim_once`).
#[derive(Debug, Default)]
pub struct Dpop;

/// What a valid proof proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proven {
    /// The RFC 7638 thumbprint of the proof's key.
    pub jkt: String,
    /// To claim once (`Store::claim_once`) until `until`: a second use of
    /// the proof is a replay.
    pub replay_key: String,
    pub until: Timestamp,
}

impl Dpop {
    /// The nonce to hand out now.
    pub fn nonce(keyring: &Keyring, now: Timestamp) -> String {
        nonce_for(keyring, now.unix_seconds().div_euclid(NONCE_WINDOW_SECS))
    }

    /// Checks `proof` for a request `method url` at `now`; `access_token`
    /// when one is presented with it (its hash must be the proof's `ath`).
    /// `nonce`: whether the server's nonce is required.
    #[allow(clippy::too_many_arguments, reason = "the facts of one request")]
    pub fn check(
        &self,
        keyring: &Keyring,
        proof: &str,
        method: &str,
        url: &str,
        access_token: Option<&str>,
        nonce: bool,
        now: Timestamp,
    ) -> Result<Proven, DpopError> {
        let header = keymint_identity::jws::peek_header(proof)
            .map_err(|_| DpopError::Invalid("the DPoP proof is not a JWS"))?;
        if header.get("typ").and_then(Value::as_str) != Some("dpop+jwt") {
            return Err(DpopError::Invalid(
                "the DPoP proof's `typ` must be `dpop+jwt`",
            ));
        }
        let jwk = header
            .get("jwk")
            .filter(|j| j.is_object())
            .ok_or(DpopError::Invalid("the DPoP proof has no `jwk` header"))?;
        // RFC 9449 §4.3 (7): the key must be public. A private (or
        // symmetric) key is refused as such, not as a signature that does
        // not verify.
        const SECRET_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];
        if SECRET_MEMBERS.iter().any(|m| jwk.get(*m).is_some()) {
            return Err(DpopError::Invalid(
                "the DPoP proof's `jwk` must be a public key",
            ));
        }
        // RFC 7515 §2: base64url without padding. The key's members are
        // hashed as written into the RFC 7638 thumbprint, so a padded (or
        // otherwise non-canonical) spelling of the same key would bind
        // tokens to a different `jkt`: refused, named as such.
        const KEY_MEMBERS: [&str; 4] = ["x", "y", "n", "e"];
        if KEY_MEMBERS.iter().any(|m| {
            jwk.get(*m).is_some_and(|v| {
                v.as_str().is_none_or(|s| {
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(s)
                        .is_err()
                })
            })
        }) {
            return Err(DpopError::Invalid(
                "the DPoP proof's `jwk` members must be base64url without padding",
            ));
        }
        let v = keymint_identity::jws::verify_with_key(proof, jwk)
            .map_err(|_| DpopError::Invalid("the DPoP proof's signature does not verify"))?;
        let jkt = keymint_identity::jws::thumbprint(jwk).ok_or(DpopError::Invalid(
            "the DPoP proof's key type is not supported",
        ))?;
        let c = &v.claims;
        let s = |k: &str| c.get(k).and_then(Value::as_str);
        let jti = s("jti")
            .filter(|j| !j.is_empty() && j.len() <= 256)
            .ok_or(DpopError::Invalid("the DPoP proof needs a `jti`"))?;
        if s("htm") != Some(method) {
            return Err(DpopError::Invalid(
                "the DPoP proof's `htm` is not this request's method",
            ));
        }
        if s("htu").map(strip_query) != Some(strip_query(url)) {
            return Err(DpopError::Invalid(
                "the DPoP proof's `htu` is not this request's URL",
            ));
        }
        // A NumericDate, fractional ones floored (RFC 7519 §2).
        let iat = keymint_identity::jws::numeric_date(c, "iat")
            .ok()
            .flatten()
            .ok_or(DpopError::Invalid("the DPoP proof needs an `iat`"))?;
        let t = now.unix_seconds();
        if iat < t - IAT_PAST_SECS || iat > t + IAT_FUTURE_SECS {
            return Err(DpopError::Invalid(
                "the DPoP proof's `iat` is outside the accepted window",
            ));
        }
        if let Some(at) = access_token {
            let ath = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(sha2::Sha256::digest(at.as_bytes()));
            if s("ath") != Some(ath.as_str()) {
                return Err(DpopError::Invalid(
                    "the DPoP proof's `ath` is not the token's hash",
                ));
            }
        }
        if nonce {
            let w = t.div_euclid(NONCE_WINDOW_SECS);
            let got = s("nonce").ok_or(DpopError::UseNonce)?;
            let ok = [w, w - 1].into_iter().any(|w| {
                let n = nonce_for(keyring, w);
                subtle::ConstantTimeEq::ct_eq(n.as_bytes(), got.as_bytes()).into()
            });
            if !ok {
                return Err(DpopError::UseNonce);
            }
        }
        // Replay: the same key and jti within the window is the same proof.
        let digest = sha2::Sha256::digest(format!("{jkt}\n{jti}"));
        let replay_key = format!(
            "dpop/{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest)
        );
        Ok(Proven {
            jkt,
            replay_key,
            until: Timestamp::from_millis((iat + IAT_PAST_SECS + 1).saturating_mul(1000)),
        })
    }
}

fn nonce_for(keyring: &Keyring, window: i64) -> String {
    let f = keyring.fingerprint(format!("dpop-nonce\n{window}").as_bytes());
    // The fingerprint is hex; a prefix is plenty and keeps proofs short.
    f.chars().take(32).collect()
}

/// RFC 9449 §4.3: `htu` is compared without query and fragment.
fn strip_query(u: &str) -> &str {
    let end = u.find(['?', '#']).unwrap_or(u.len());
    &u[..end]
}
