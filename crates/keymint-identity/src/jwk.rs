//! JSON Web Keys (RFC 7517) and the three signature algorithms keymint
//! accepts, verified with pure-Rust RustCrypto crates.

use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

use crate::config::Alg;
use crate::error::AuthError;

/// Most keys kept from one set; the rest are ignored (with a warning).
pub(crate) const MAX_KEYS: usize = 64;
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;

/// base64url for key material: padding tolerated (some producers add it),
/// non-canonical trailing bits refused.
const B64_KEY: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    key_ops: Option<Vec<String>>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    d: Option<Value>,
}

enum Material {
    Rsa(Box<rsa::RsaPublicKey>),
    P256(p256::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
}

/// One verification key and what its JWK says it may be used for.
pub(crate) struct Key {
    kid: Option<String>,
    alg: Option<String>,
    material: Material,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.material {
            Material::Rsa(_) => "RSA",
            Material::P256(_) => "EC P-256",
            Material::Ed25519(_) => "OKP Ed25519",
        };
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kind", &kind)
            .finish()
    }
}

impl Key {
    /// Whether this key may verify a token signed with `alg`: the key type
    /// and curve must be the algorithm's, and a JWK `alg`, if present, must
    /// name it. (`use` and `key_ops` were checked when the set was parsed.)
    fn fits(&self, alg: Alg) -> bool {
        let kind_fits = matches!(
            (&self.material, alg),
            (Material::Rsa(_), Alg::RS256)
                | (Material::P256(_), Alg::ES256)
                | (Material::Ed25519(_), Alg::EdDSA)
        );
        let alg_fits = match self.alg.as_deref() {
            None => true,
            // RFC 9864 names the fully-specified `Ed25519`.
            Some("Ed25519") => alg == Alg::EdDSA,
            Some(a) => a == alg.as_str(),
        };
        kind_fits && alg_fits
    }

    fn verify(&self, alg: Alg, input: &[u8], sig: &[u8]) -> bool {
        use sha2::Digest as _;
        match (&self.material, alg) {
            (Material::Rsa(k), Alg::RS256) => {
                let hashed = sha2::Sha256::digest(input);
                k.verify(rsa::Pkcs1v15Sign::new::<sha2::Sha256>(), &hashed, sig)
                    .is_ok()
            }
            (Material::P256(k), Alg::ES256) => {
                use p256::ecdsa::signature::Verifier as _;
                // RFC 7518 §3.4: exactly R || S, 32 bytes each; DER is refused.
                if sig.len() != 64 {
                    return false;
                }
                match p256::ecdsa::Signature::from_slice(sig) {
                    Ok(s) => k.verify(input, &s).is_ok(),
                    Err(_) => false,
                }
            }
            (Material::Ed25519(k), Alg::EdDSA) => match ed25519_dalek::Signature::from_slice(sig) {
                Ok(s) => k.verify_strict(input, &s).is_ok(),
                Err(_) => false,
            },
            _ => false,
        }
    }
}

/// What a key set knows about a `kid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// At least one key with that `kid` fits the algorithm.
    Fits,
    /// Keys with that `kid` exist, and none fits the algorithm.
    Mismatch,
    /// No key has that `kid` (or, without a `kid`, none fits the algorithm).
    Unknown,
}

/// The usable keys of one JWK Set.
#[derive(Debug, Default)]
pub(crate) struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    /// Parses a JWK Set. Keys that cannot verify signatures (encryption
    /// keys, X.509-SVID authorities, private keys, unknown types, weak or
    /// broken material) are skipped, as RFC 7517 §5 asks; the set as a whole
    /// must be a JSON object with a `keys` array.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Set {
            keys: Vec<Value>,
        }
        let set: Set = serde_json::from_slice(bytes).map_err(|e| format!("not a JWK Set: {e}"))?;
        let mut keys = Vec::new();
        for (i, raw) in set.keys.into_iter().enumerate() {
            if keys.len() == MAX_KEYS {
                tracing::warn!(
                    max = MAX_KEYS,
                    "JWK Set has too many keys; the rest are ignored"
                );
                break;
            }
            match parse_key(raw) {
                Ok(Some(k)) => keys.push(k),
                Ok(None) => {}
                Err(reason) => tracing::debug!(index = i, reason, "JWK skipped"),
            }
        }
        Ok(Self { keys })
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    fn candidates<'a>(&'a self, kid: Option<&'a str>) -> impl Iterator<Item = &'a Key> + 'a {
        self.keys
            .iter()
            .filter(move |k| kid.is_none() || k.kid.as_deref() == kid)
    }

    pub(crate) fn lookup(&self, kid: Option<&str>, alg: Alg) -> Lookup {
        let mut named = false;
        for k in self.candidates(kid) {
            if k.fits(alg) {
                return Lookup::Fits;
            }
            named = true;
        }
        if named && kid.is_some() {
            Lookup::Mismatch
        } else {
            Lookup::Unknown
        }
    }

    /// Verifies `sig` over `input` with the key named by `kid` (or, without
    /// a `kid`, with any key of the set that fits `alg`).
    pub(crate) fn verify(
        &self,
        kid: Option<&str>,
        alg: Alg,
        input: &[u8],
        sig: &[u8],
    ) -> Result<(), AuthError> {
        match self.lookup(kid, alg) {
            Lookup::Unknown => return Err(AuthError::UnknownKey),
            Lookup::Mismatch => return Err(AuthError::KeyMismatch),
            Lookup::Fits => {}
        }
        if self
            .candidates(kid)
            .filter(|k| k.fits(alg))
            .any(|k| k.verify(alg, input, sig))
        {
            Ok(())
        } else {
            Err(AuthError::BadSignature)
        }
    }
}

fn b64(field: &str, v: Option<&String>) -> Result<Vec<u8>, String> {
    let v = v.ok_or_else(|| format!("missing `{field}`"))?;
    B64_KEY
        .decode(v)
        .map_err(|_| format!("`{field}` is not base64url"))
}

/// `Ok(None)`: a key that is fine but not for verifying JWTs.
fn parse_key(raw: Value) -> Result<Option<Key>, String> {
    let jwk: RawJwk = serde_json::from_value(raw).map_err(|e| format!("bad JWK: {e}"))?;
    if jwk.d.is_some() {
        // A private key published in a key set: someone made a mistake, and
        // trusting the rest of that key is unwise.
        return Err("private key material in a public key set".into());
    }
    match jwk.use_.as_deref() {
        // `jwt-svid` is the SPIFFE bundle's use for JWT-SVID keys.
        None | Some("sig") | Some("jwt-svid") => {}
        Some(_) => return Ok(None),
    }
    if let Some(ops) = &jwk.key_ops
        && !ops.iter().any(|o| o == "verify")
    {
        return Ok(None);
    }
    let material = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("RSA", _) => {
            let n = rsa::BigUint::from_bytes_be(&b64("n", jwk.n.as_ref())?);
            let e = rsa::BigUint::from_bytes_be(&b64("e", jwk.e.as_ref())?);
            let bits = n.bits();
            if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
                return Err(format!("RSA modulus of {bits} bits"));
            }
            let k = rsa::RsaPublicKey::new_with_max_size(n, e, RSA_MAX_BITS)
                .map_err(|e| format!("bad RSA key: {e}"))?;
            Material::Rsa(Box::new(k))
        }
        ("EC", Some("P-256")) => {
            let x = b64("x", jwk.x.as_ref())?;
            let y = b64("y", jwk.y.as_ref())?;
            if x.len() != 32 || y.len() != 32 {
                return Err("P-256 coordinates must be 32 bytes".into());
            }
            let point = p256::EncodedPoint::from_affine_coordinates(
                p256::FieldBytes::from_slice(&x),
                p256::FieldBytes::from_slice(&y),
                false,
            );
            let k = p256::ecdsa::VerifyingKey::from_encoded_point(&point)
                .map_err(|_| "P-256 point not on the curve".to_owned())?;
            Material::P256(k)
        }
        ("OKP", Some("Ed25519")) => {
            let x: [u8; 32] = b64("x", jwk.x.as_ref())?
                .try_into()
                .map_err(|_| "Ed25519 key must be 32 bytes".to_owned())?;
            let k = ed25519_dalek::VerifyingKey::from_bytes(&x)
                .map_err(|_| "bad Ed25519 key".to_owned())?;
            if k.is_weak() {
                return Err("weak Ed25519 key".into());
            }
            Material::Ed25519(k)
        }
        _ => return Ok(None),
    };
    Ok(Some(Key {
        kid: jwk.kid,
        alg: jwk.alg,
        material,
    }))
}
