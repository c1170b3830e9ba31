//! Verifying a compact JWS against keys the caller holds, for the OAuth
//! token service (docs/design/0026-oauth-token-service.md): keymint's own
//! access tokens against its JWKS, DPoP proofs (RFC 9449) against the key
//! in their header, and `private_key_jwt` client assertions against a
//! registered client's key. The same parsing and algorithm rules as the
//! workload verifier: RS256, ES256 and EdDSA only, `none` and HMAC refused
//! before any key is looked at, duplicate members refused.

use base64::Engine as _;
use serde_json::{Map, Value};
use sha2::Digest as _;

use crate::config::Alg;
use crate::error::AuthError;
use crate::jwk::KeySet;

/// Largest token accepted here.
pub const MAX_JWS_SIZE: usize = 16 * 1024;

/// A token whose signature checked out.
#[derive(Debug, Clone)]
pub struct Verified {
    pub alg: Alg,
    /// The protected header (duplicate members refused).
    pub header: Map<String, Value>,
    pub claims: Map<String, Value>,
}

/// The protected header of `token`, before anything is verified.
pub fn peek_header(token: &str) -> Result<Map<String, Value>, AuthError> {
    if token.len() > MAX_JWS_SIZE {
        return Err(AuthError::TooLarge);
    }
    let h = token
        .split('.')
        .next()
        .ok_or(AuthError::Malformed("not a compact JWS"))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(h)
        .map_err(|_| AuthError::Malformed("invalid base64url"))?;
    crate::claims::parse_object(&bytes).map_err(|()| AuthError::Malformed("invalid header"))
}

/// The claims of `token`, before anything is verified (for a token the
/// caller has verified by other means).
pub fn peek_claims(token: &str) -> Result<Map<String, Value>, AuthError> {
    if token.len() > MAX_JWS_SIZE {
        return Err(AuthError::TooLarge);
    }
    Ok(crate::jose::parse(token)?.claims)
}

/// Verifies `token` with the keys of the JWK Set `jwks`, the key named by
/// its `kid` (or any that fits without one).
pub fn verify_with_set(token: &str, jwks: &Value) -> Result<Verified, AuthError> {
    if token.len() > MAX_JWS_SIZE {
        return Err(AuthError::TooLarge);
    }
    let jws = crate::jose::parse(token)?;
    let bytes = serde_json::to_vec(jwks).map_err(|_| AuthError::UnknownKey)?;
    let set = KeySet::parse(&bytes).map_err(|_| AuthError::UnknownKey)?;
    set.verify(
        jws.kid.as_deref(),
        jws.alg,
        jws.signing_input,
        &jws.signature,
    )?;
    let header = peek_header(token)?;
    Ok(Verified {
        alg: jws.alg,
        header,
        claims: jws.claims,
    })
}

/// Verifies `token` with one public JWK (its `kid`, if any, is ignored).
/// A private key is refused.
pub fn verify_with_key(token: &str, jwk: &Value) -> Result<Verified, AuthError> {
    let mut k = jwk.clone();
    if let Some(o) = k.as_object_mut() {
        o.remove("kid");
    }
    if jwk.get("d").is_some() {
        return Err(AuthError::KeyMismatch);
    }
    if token.len() > MAX_JWS_SIZE {
        return Err(AuthError::TooLarge);
    }
    let jws = crate::jose::parse(token)?;
    let bytes = serde_json::to_vec(&serde_json::json!({ "keys": [k] }))
        .map_err(|_| AuthError::UnknownKey)?;
    let set = KeySet::parse(&bytes).map_err(|_| AuthError::UnknownKey)?;
    if set.len() != 1 {
        return Err(AuthError::KeyMismatch);
    }
    set.verify(None, jws.alg, jws.signing_input, &jws.signature)?;
    let header = peek_header(token)?;
    Ok(Verified {
        alg: jws.alg,
        header,
        claims: jws.claims,
    })
}

/// A NumericDate claim (RFC 7519 §2) in whole seconds, read as the
/// workload verifier reads `exp`, `iat` and `nbf`: a fraction is floored;
/// `Err` for what is not a number or lies outside years 0..=9999;
/// `Ok(None)` when the claim is absent.
pub fn numeric_date(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<i64>, AuthError> {
    crate::claims::numeric_date(claims, name)
}

/// The RFC 7638 SHA-256 thumbprint of a public JWK (base64url), or `None`
/// for a key type keymint does not verify with.
pub fn thumbprint(jwk: &Value) -> Option<String> {
    let s = |k: &str| jwk.get(k).and_then(Value::as_str);
    // Required members only, in lexicographic order, no whitespace.
    let canonical = match s("kty")? {
        "EC" => format!(
            r#"{{"crv":{},"kty":"EC","x":{},"y":{}}}"#,
            Value::from(s("crv")?),
            Value::from(s("x")?),
            Value::from(s("y")?)
        ),
        "OKP" => format!(
            r#"{{"crv":{},"kty":"OKP","x":{}}}"#,
            Value::from(s("crv")?),
            Value::from(s("x")?)
        ),
        "RSA" => format!(
            r#"{{"e":{},"kty":"RSA","n":{}}}"#,
            Value::from(s("e")?),
            Value::from(s("n")?)
        ),
        _ => return None,
    };
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(canonical)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprint_matches_rfc7638_example() {
        // RFC 7638 §3.1.
        let jwk = serde_json::json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        });
        assert_eq!(
            thumbprint(&jwk).as_deref(),
            Some("NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs")
        );
        assert_eq!(
            thumbprint(&serde_json::json!({"kty": "oct", "k": "x"})),
            None
        );
    }

    #[test]
    fn none_and_hmac_are_refused_before_keys() {
        let h = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        for alg in ["none", "HS256"] {
            let t = format!(
                "{}.{}.{}",
                h.encode(format!(r#"{{"alg":"{alg}"}}"#)),
                h.encode("{}"),
                h.encode("x")
            );
            let jwk = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": h.encode([7u8; 32])});
            assert!(matches!(
                verify_with_key(&t, &jwk),
                Err(AuthError::AlgorithmNotAllowed)
            ));
        }
    }
}
