//! keymint as an OIDC issuer (docs/design/0016-oidc-issuer.md): the keys it
//! signs workload JWTs with, their rotation, the JWK Set and discovery
//! documents that verifiers (AWS STS, PyJWT, providers' federation) fetch,
//! and signing itself.
//!
//! Shaped as plain data plus pure functions of `now`:
//!
//! - [`KeySet`]: every key with its algorithm and the time it starts to
//!   sign (`activates_at`). Which key signs, and which are published, is
//!   derived from those times alone, so nothing has to flip a state at the
//!   right moment and every replica agrees. It serialises to one JSON
//!   document ([`KeySet::to_bytes`]) that the server keeps sealed in its
//!   store like its other keys.
//! - Rotation ([`KeySet::rotate`]) adds a key per algorithm that is
//!   published at once but signs only `publish_ahead` later; the key it
//!   replaces stays published until every token it can have signed has
//!   expired (`max_token_secs` after its successor took over). So a
//!   verifier that caches the JWKS never meets an unknown `kid`.
//! - [`Issuer`]: the key set in force behind a lock, with the issuer URL,
//!   for the server's endpoints and the engines that sign.
//!
//! Keys: ES256 (P-256), RS256 (2048-bit RSA, PKCS#1 v1.5) and EdDSA
//! (Ed25519), all pure-Rust RustCrypto; `kid` is the key's RFC 7638 JWK
//! thumbprint. No `now()` is read here: time is a parameter.

use std::fmt;
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use keymint_core::Timestamp;
use keymint_core::role::SigningAlg;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// RSA modulus size for RS256 keys.
pub const RSA_BITS: usize = 2048;
/// How long after a key's successor takes over the key stays published,
/// beyond the longest token: verifiers' clocks and leeway.
pub const RETIRE_SLACK_SECS: u64 = 300;
/// The path of the JWK Set under the issuer URL.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";
/// The path of the discovery document under the issuer URL.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssuerError {
    #[error("the random number generator failed")]
    Random,
    #[error("the stored issuer keys cannot be read")]
    Corrupt,
    #[error("no {0} signing key is in force")]
    NoKey(SigningAlg),
    #[error("cannot sign the token")]
    Signing,
    #[error("a rotation is already under way: the new {0} key signs from {1}")]
    RotationPending(SigningAlg, String),
}

enum Material {
    Es256(p256::ecdsa::SigningKey),
    Rs256(Box<rsa::RsaPrivateKey>),
    EdDsa(ed25519_dalek::SigningKey),
}

/// One signing key. Its private half never leaves through `Debug`.
pub struct Key {
    kid: String,
    alg: SigningAlg,
    created_at: Timestamp,
    activates_at: Timestamp,
    material: Material,
    /// The public JWK (with `kid`, `alg`, `use`).
    public: Value,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("activates_at", &self.activates_at)
            .finish_non_exhaustive()
    }
}

/// How a key is stored (inside the sealed key set).
#[derive(Serialize, Deserialize)]
struct StoredKey {
    alg: SigningAlg,
    created_at: i64,
    activates_at: i64,
    /// base64url: the P-256 scalar, the Ed25519 seed, or RSA PKCS#8 DER.
    private: String,
}

#[derive(Serialize, Deserialize)]
struct StoredSet {
    version: u32,
    keys: Vec<StoredKey>,
}

fn random32() -> Result<Zeroizing<[u8; 32]>, IssuerError> {
    let mut b = Zeroizing::new([0u8; 32]);
    getrandom::fill(b.as_mut()).map_err(|_| IssuerError::Random)?;
    Ok(b)
}

impl Material {
    fn generate(alg: SigningAlg) -> Result<Self, IssuerError> {
        Ok(match alg {
            SigningAlg::ES256 => loop {
                // A random 32 bytes is a valid scalar but for a 2^-128 chance.
                if let Ok(k) = p256::ecdsa::SigningKey::from_slice(random32()?.as_ref()) {
                    break Self::Es256(k);
                }
            },
            SigningAlg::RS256 => Self::Rs256(Box::new(
                rsa::RsaPrivateKey::new(&mut rand_core::OsRng, RSA_BITS)
                    .map_err(|_| IssuerError::Random)?,
            )),
            SigningAlg::EdDSA => Self::EdDsa(ed25519_dalek::SigningKey::from_bytes(&*random32()?)),
        })
    }

    fn private_bytes(&self) -> Result<Zeroizing<Vec<u8>>, IssuerError> {
        Ok(match self {
            Self::Es256(k) => Zeroizing::new(k.to_bytes().to_vec()),
            Self::EdDsa(k) => Zeroizing::new(k.to_bytes().to_vec()),
            Self::Rs256(k) => {
                use rsa::pkcs8::EncodePrivateKey as _;
                let doc = k.to_pkcs8_der().map_err(|_| IssuerError::Corrupt)?;
                Zeroizing::new(doc.as_bytes().to_vec())
            }
        })
    }

    fn from_private(alg: SigningAlg, bytes: &[u8]) -> Result<Self, IssuerError> {
        Ok(match alg {
            SigningAlg::ES256 => Self::Es256(
                p256::ecdsa::SigningKey::from_slice(bytes).map_err(|_| IssuerError::Corrupt)?,
            ),
            SigningAlg::EdDSA => {
                let seed: [u8; 32] = bytes.try_into().map_err(|_| IssuerError::Corrupt)?;
                Self::EdDsa(ed25519_dalek::SigningKey::from_bytes(&seed))
            }
            SigningAlg::RS256 => {
                use rsa::pkcs8::DecodePrivateKey as _;
                Self::Rs256(Box::new(
                    rsa::RsaPrivateKey::from_pkcs8_der(bytes).map_err(|_| IssuerError::Corrupt)?,
                ))
            }
        })
    }

    /// The public JWK members, in RFC 7638 order (lexicographic), which is
    /// also what the thumbprint hashes.
    fn public_members(&self) -> Vec<(&'static str, String)> {
        match self {
            Self::Es256(k) => {
                let p = k.verifying_key().to_encoded_point(false);
                vec![
                    ("crv", "P-256".into()),
                    ("kty", "EC".into()),
                    (
                        "x",
                        B64.encode(p.x().map(|x| x.to_vec()).unwrap_or_default()),
                    ),
                    (
                        "y",
                        B64.encode(p.y().map(|y| y.to_vec()).unwrap_or_default()),
                    ),
                ]
            }
            Self::Rs256(k) => {
                use rsa::traits::PublicKeyParts as _;
                vec![
                    ("e", B64.encode(k.e().to_bytes_be())),
                    ("kty", "RSA".into()),
                    ("n", B64.encode(k.n().to_bytes_be())),
                ]
            }
            Self::EdDsa(k) => vec![
                ("crv", "Ed25519".into()),
                ("kty", "OKP".into()),
                ("x", B64.encode(k.verifying_key().as_bytes())),
            ],
        }
    }

    fn sign(&self, input: &[u8]) -> Result<Vec<u8>, IssuerError> {
        use p256::ecdsa::signature::Signer as _;
        Ok(match self {
            Self::Es256(k) => {
                // RFC 7518 §3.4: the fixed 64-byte R || S, not DER.
                let sig: p256::ecdsa::Signature = k.sign(input);
                sig.to_bytes().to_vec()
            }
            Self::Rs256(k) => {
                let signer = rsa::pkcs1v15::SigningKey::<Sha256>::new((**k).clone());
                let sig = signer.try_sign(input).map_err(|_| IssuerError::Signing)?;
                rsa::signature::SignatureEncoding::to_vec(&sig)
            }
            Self::EdDsa(k) => {
                use ed25519_dalek::Signer as _;
                k.sign(input).to_bytes().to_vec()
            }
        })
    }
}

impl Key {
    fn new(
        alg: SigningAlg,
        material: Material,
        created_at: Timestamp,
        activates_at: Timestamp,
    ) -> Self {
        let members = material.public_members();
        // RFC 7638: SHA-256 over the required members, sorted, no spaces.
        let canonical = format!(
            "{{{}}}",
            members
                .iter()
                .map(|(k, v)| format!("\"{k}\":\"{v}\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        let kid = B64.encode(Sha256::digest(canonical.as_bytes()));
        let mut public = Map::new();
        for (k, v) in members {
            public.insert(k.into(), Value::String(v));
        }
        public.insert("kid".into(), Value::String(kid.clone()));
        public.insert("alg".into(), Value::String(alg.as_str().into()));
        public.insert("use".into(), Value::String("sig".into()));
        Self {
            kid,
            alg,
            created_at,
            activates_at,
            material,
            public: Value::Object(public),
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn alg(&self) -> SigningAlg {
        self.alg
    }

    pub fn activates_at(&self) -> Timestamp {
        self.activates_at
    }

    pub fn created_at(&self) -> Timestamp {
        self.created_at
    }

    /// The public JWK.
    pub fn jwk(&self) -> &Value {
        &self.public
    }
}

/// What a rotation did, per algorithm, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rotated {
    pub alg: SigningAlg,
    pub kid: String,
    /// Unix milliseconds from which the new key signs.
    pub signs_from: i64,
    /// The key it replaces, if any.
    pub replaces: Option<String>,
}

/// Every signing key keymint has, of every algorithm.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// Adds a key, signing from `now`, for each of `algs` that has none
    /// yet (first start, or an algorithm added to the configuration).
    /// Returns whether anything was added.
    pub fn ensure(&mut self, algs: &[SigningAlg], now: Timestamp) -> Result<bool, IssuerError> {
        let mut added = false;
        for &alg in algs {
            if !self.keys.iter().any(|k| k.alg == alg) {
                self.keys
                    .push(Key::new(alg, Material::generate(alg)?, now, now));
                added = true;
            }
        }
        Ok(added)
    }

    /// The key that signs `alg` tokens at `now`: of those whose time has
    /// come, the one that came last.
    pub fn signing_key(&self, alg: SigningAlg, now: Timestamp) -> Option<&Key> {
        self.keys
            .iter()
            .filter(|k| k.alg == alg && k.activates_at <= now)
            .max_by_key(|k| (k.activates_at, k.created_at))
    }

    /// When `key` stopped (or will stop) signing: when its successor of the
    /// same algorithm takes over. `None`: it has no successor.
    fn succeeded_at(&self, key: &Key) -> Option<Timestamp> {
        self.keys
            .iter()
            .filter(|k| {
                k.alg == key.alg
                    && (k.activates_at, k.created_at) > (key.activates_at, key.created_at)
            })
            .map(|k| k.activates_at)
            .min()
    }

    /// Whether `key` is in the JWK Set at `now`: from its creation (so
    /// before it signs) until every token it signed has expired.
    fn is_published(&self, key: &Key, now: Timestamp, max_token_secs: u64) -> bool {
        match self.succeeded_at(key) {
            None => true,
            Some(t) => now < t.plus_secs(max_token_secs.saturating_add(RETIRE_SLACK_SECS)),
        }
    }

    /// The keys verifiers must know at `now`, newest first.
    pub fn published(&self, now: Timestamp, max_token_secs: u64) -> Vec<&Key> {
        let mut v: Vec<&Key> = self
            .keys
            .iter()
            .filter(|k| self.is_published(k, now, max_token_secs))
            .collect();
        v.sort_by_key(|k| std::cmp::Reverse((k.activates_at, k.created_at)));
        v
    }

    /// The JWK Set at `now` (RFC 7517 §5).
    pub fn jwks(&self, now: Timestamp, max_token_secs: u64) -> Value {
        json!({
            "keys": self
                .published(now, max_token_secs)
                .into_iter()
                .map(|k| k.public.clone())
                .collect::<Vec<_>>()
        })
    }

    /// Starts a rotation: a new key per algorithm in `algs`, published from
    /// now, signing from `now + publish_ahead_secs`. Keys no longer
    /// published are dropped. Refused while an earlier rotation's key has
    /// not started signing yet (so at most one key waits per algorithm).
    pub fn rotate(
        &mut self,
        algs: &[SigningAlg],
        now: Timestamp,
        publish_ahead_secs: u64,
        max_token_secs: u64,
    ) -> Result<Vec<Rotated>, IssuerError> {
        for &alg in algs {
            if let Some(k) = self
                .keys
                .iter()
                .find(|k| k.alg == alg && k.activates_at > now)
            {
                return Err(IssuerError::RotationPending(alg, k.activates_at.rfc3339()));
            }
        }
        let signs_from = now.plus_secs(publish_ahead_secs);
        let mut out = Vec::with_capacity(algs.len());
        let mut fresh = Vec::with_capacity(algs.len());
        for &alg in algs {
            let key = Key::new(alg, Material::generate(alg)?, now, signs_from);
            out.push(Rotated {
                alg,
                kid: key.kid.clone(),
                signs_from: signs_from.millis(),
                replaces: self.signing_key(alg, now).map(|k| k.kid.clone()),
            });
            fresh.push(key);
        }
        self.keys.extend(fresh);
        self.prune(now, max_token_secs);
        Ok(out)
    }

    /// Drops the keys that are no longer published.
    pub fn prune(&mut self, now: Timestamp, max_token_secs: u64) {
        let keep: Vec<bool> = self
            .keys
            .iter()
            .map(|k| self.is_published(k, now, max_token_secs))
            .collect();
        let mut i = 0;
        self.keys.retain(|_| {
            let k = keep[i];
            i += 1;
            k
        });
    }

    /// The set as one JSON document, private keys included: to be sealed.
    pub fn to_bytes(&self) -> Result<Zeroizing<Vec<u8>>, IssuerError> {
        let mut keys = Vec::with_capacity(self.keys.len());
        for k in &self.keys {
            keys.push(StoredKey {
                alg: k.alg,
                created_at: k.created_at.millis(),
                activates_at: k.activates_at.millis(),
                private: B64.encode(k.material.private_bytes()?.as_slice()),
            });
        }
        let set = StoredSet { version: 1, keys };
        let out = serde_json::to_vec(&set).map_err(|_| IssuerError::Corrupt)?;
        // The base64 strings inside `set` are dropped unzeroed; the
        // document itself is zeroized by the caller's `Zeroizing`.
        for k in set.keys {
            let mut p = k.private;
            zeroize::Zeroize::zeroize(&mut p);
        }
        Ok(Zeroizing::new(out))
    }

    /// Reads a set written by [`KeySet::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IssuerError> {
        let set: StoredSet = serde_json::from_slice(bytes).map_err(|_| IssuerError::Corrupt)?;
        if set.version != 1 {
            return Err(IssuerError::Corrupt);
        }
        let mut keys = Vec::with_capacity(set.keys.len());
        for mut k in set.keys {
            let private = Zeroizing::new(B64.decode(&k.private).map_err(|_| IssuerError::Corrupt)?);
            zeroize::Zeroize::zeroize(&mut k.private);
            keys.push(Key::new(
                k.alg,
                Material::from_private(k.alg, &private)?,
                Timestamp::from_millis(k.created_at),
                Timestamp::from_millis(k.activates_at),
            ));
        }
        Ok(Self { keys })
    }

    /// Signs `claims` as a compact JWS with the `alg` key in force at
    /// `now`. `typ` is `JWT`; `kid` names the key.
    pub fn sign(
        &self,
        alg: SigningAlg,
        claims: &Map<String, Value>,
        now: Timestamp,
    ) -> Result<String, IssuerError> {
        self.sign_typed(alg, "JWT", claims, now)
    }

    /// As [`KeySet::sign`], with the header's `typ` given (RFC 9068 access
    /// tokens are `at+jwt`).
    pub fn sign_typed(
        &self,
        alg: SigningAlg,
        typ: &str,
        claims: &Map<String, Value>,
        now: Timestamp,
    ) -> Result<String, IssuerError> {
        let key = self.signing_key(alg, now).ok_or(IssuerError::NoKey(alg))?;
        let header = json!({"alg": alg.as_str(), "typ": typ, "kid": key.kid});
        let header = serde_json::to_vec(&header).map_err(|_| IssuerError::Signing)?;
        let payload = serde_json::to_vec(claims).map_err(|_| IssuerError::Signing)?;
        let mut out = format!("{}.{}", B64.encode(header), B64.encode(payload));
        let sig = key.material.sign(out.as_bytes())?;
        out.push('.');
        out.push_str(&B64.encode(sig));
        Ok(out)
    }
}

/// How the issuer is set up (`[issuer]` in the configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerSettings {
    /// The `iss` of every token, and where the discovery document is
    /// served (`{url}/.well-known/openid-configuration`).
    pub url: String,
    /// The algorithms keymint keeps keys for.
    pub algorithms: Vec<SigningAlg>,
    /// How long a new key is published before it signs.
    pub publish_ahead_secs: u64,
    /// The longest a signed token can live (the longest task), which is
    /// how long a replaced key stays published.
    pub max_token_secs: u64,
    /// The SPIFFE trust domain for JWT-SVIDs, if any.
    pub trust_domain: Option<String>,
}

/// The issuer in force: settings and the current key set.
#[derive(Debug)]
pub struct Issuer {
    settings: IssuerSettings,
    keys: RwLock<Arc<KeySet>>,
}

impl Issuer {
    pub fn new(settings: IssuerSettings, keys: KeySet) -> Self {
        Self {
            settings,
            keys: RwLock::new(Arc::new(keys)),
        }
    }

    pub fn settings(&self) -> &IssuerSettings {
        &self.settings
    }

    pub fn url(&self) -> &str {
        &self.settings.url
    }

    /// The key set in force.
    pub fn keys(&self) -> Arc<KeySet> {
        match self.keys.read() {
            Ok(k) => Arc::clone(&k),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// Puts `keys` in force (after a rotation, or a reload from the store).
    pub fn replace(&self, keys: KeySet) {
        let keys = Arc::new(keys);
        match self.keys.write() {
            Ok(mut k) => *k = keys,
            Err(p) => *p.into_inner() = keys,
        }
    }

    pub fn sign(
        &self,
        alg: SigningAlg,
        claims: &Map<String, Value>,
        now: Timestamp,
    ) -> Result<String, IssuerError> {
        self.keys().sign(alg, claims, now)
    }

    pub fn jwks(&self, now: Timestamp) -> Value {
        self.keys().jwks(now, self.settings.max_token_secs)
    }

    pub fn jwks_uri(&self) -> String {
        format!("{}{JWKS_PATH}", self.settings.url.trim_end_matches('/'))
    }

    /// The OpenID Provider metadata (OIDC Discovery 1.0 §3) a verifier
    /// needs: keymint issues no ID tokens to end users, but AWS and the
    /// providers' federation read `issuer` and `jwks_uri` from here.
    pub fn discovery(&self) -> Value {
        let algs: Vec<&str> = self
            .settings
            .algorithms
            .iter()
            .map(|a| a.as_str())
            .collect();
        json!({
            "issuer": self.settings.url,
            "jwks_uri": self.jwks_uri(),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": algs,
            "claims_supported": [
                "iss", "sub", "aud", "exp", "iat", "nbf", "jti", "act",
                "task_id", "role", "intent", "purpose", "environment"
            ],
        })
    }
}

/// The RFC 8693 `act` claim for a delegation chain (outermost first): the
/// most recent actor at the top, earlier ones nested inside.
pub fn act_claim(chain: &[String]) -> Value {
    let mut act = Value::Null;
    for w in chain {
        let mut o = Map::new();
        o.insert("sub".into(), Value::String(w.clone()));
        if !act.is_null() {
            o.insert("act".into(), act);
        }
        act = Value::Object(o);
    }
    act
}

#[cfg(test)]
mod tests;
