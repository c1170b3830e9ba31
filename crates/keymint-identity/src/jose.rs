//! The compact JWS serialization (RFC 7515 §7.1), parsed by hand so that
//! nothing about the token is trusted before it is checked.

use base64::Engine as _;
use serde_json::{Map, Value};

use crate::claims::parse_object;
use crate::config::Alg;
use crate::error::AuthError;

/// A token split and decoded, signature not yet checked.
#[derive(Debug)]
pub(crate) struct Jws<'a> {
    pub(crate) alg: Alg,
    pub(crate) kid: Option<String>,
    pub(crate) claims: Map<String, Value>,
    /// `BASE64URL(header) || '.' || BASE64URL(payload)`.
    pub(crate) signing_input: &'a [u8],
    pub(crate) signature: Vec<u8>,
}

fn b64(s: &str) -> Result<Vec<u8>, AuthError> {
    // URL_SAFE_NO_PAD refuses padding and non-canonical trailing bits.
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| AuthError::Malformed("invalid base64url"))
}

/// Splits and decodes a token. The caller has already checked its size.
/// The header is decoded and its `alg` checked first, so that `none` and
/// HMAC are refused as such whatever the rest looks like.
pub(crate) fn parse(token: &str) -> Result<Jws<'_>, AuthError> {
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(AuthError::Malformed("not a compact JWS"));
    }
    let parts: Vec<&str> = token.split('.').collect();
    let [h, p, s] = parts[..] else {
        return Err(if parts.len() == 5 {
            AuthError::Malformed("encrypted tokens (JWE) are not accepted")
        } else {
            AuthError::Malformed("not a compact JWS")
        });
    };
    // A JSON object, duplicate members refused (of any name: a header that
    // means one thing here and another to the next parser is refused).
    let header = parse_object(&b64(h)?).map_err(|()| AuthError::Malformed("invalid header"))?;
    let Some(Value::String(alg)) = header.get("alg") else {
        return Err(AuthError::Malformed("invalid header"));
    };
    // INVARIANT: only RS256, ES256 and EdDSA get past this line; `none`,
    // HS256/384/512 and everything else is refused before any key is looked
    // at, so an HMAC "keyed" with a public key can never be tried.
    let alg = Alg::from_name(alg).ok_or(AuthError::AlgorithmNotAllowed)?;
    if header.contains_key("crit") {
        // RFC 7515 §4.1.11: we understand no extension, so we must refuse
        // (whatever `crit` holds, `null` included).
        return Err(AuthError::Malformed(
            "critical header extensions are not supported",
        ));
    }
    let kid = match header.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) if !k.is_empty() && k.len() <= 256 => Some(k.clone()),
        Some(Value::String(_)) => return Err(AuthError::Malformed("invalid key id")),
        Some(_) => return Err(AuthError::Malformed("invalid header")),
    };
    let claims = parse_object(&b64(p)?).map_err(|()| AuthError::Malformed("invalid payload"))?;
    let signature = b64(s)?;
    if signature.is_empty() {
        return Err(AuthError::Malformed("missing signature"));
    }
    Ok(Jws {
        alg,
        kid,
        claims,
        signing_input: &token.as_bytes()[..h.len() + 1 + p.len()],
        signature,
    })
}
