//! Test keys (generated once per run), token signing and a JWKS server on
//! 127.0.0.1:0 that counts what it serves.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use keymint_core::Timestamp;
use keymint_identity::{JwksSource, JwtIssuerConfig};
use serde_json::{Value, json};

/// 2027-01-15T08:00:00Z.
pub const NOW_SECS: i64 = 1_800_000_000;
pub fn now() -> Timestamp {
    Timestamp::from_millis(NOW_SECS * 1000)
}
pub fn at(secs: i64) -> Timestamp {
    Timestamp::from_millis(secs * 1000)
}

pub const AUD: &str = "https://keymint.test";

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[derive(Clone)]
pub enum Key {
    Rsa(Box<rsa::RsaPrivateKey>),
    P256(p256::ecdsa::SigningKey),
    Ed25519(ed25519_dalek::SigningKey),
}

pub struct TestKey {
    pub kid: String,
    pub key: Key,
}

fn rng() -> rand_core::OsRng {
    rand_core::OsRng
}

impl TestKey {
    pub fn rsa(kid: &str) -> Self {
        // RSA key generation is slow in debug builds: one key per run,
        // shared under several kids.
        static RSA: LazyLock<rsa::RsaPrivateKey> =
            LazyLock::new(|| rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap());
        Self::with(kid, Key::Rsa(Box::new(RSA.clone())))
    }
    /// A second RSA key, different from [`TestKey::rsa`].
    pub fn rsa2(kid: &str) -> Self {
        static RSA: LazyLock<rsa::RsaPrivateKey> =
            LazyLock::new(|| rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap());
        Self::with(kid, Key::Rsa(Box::new(RSA.clone())))
    }
    pub fn p256(kid: &str) -> Self {
        Self::with(kid, Key::P256(p256::ecdsa::SigningKey::random(&mut rng())))
    }
    pub fn ed25519(kid: &str) -> Self {
        Self::with(
            kid,
            Key::Ed25519(ed25519_dalek::SigningKey::generate(&mut rng())),
        )
    }
    pub fn with(kid: &str, key: Key) -> Self {
        Self {
            kid: kid.into(),
            key,
        }
    }

    pub fn alg(&self) -> &'static str {
        match self.key {
            Key::Rsa(_) => "RS256",
            Key::P256(_) => "ES256",
            Key::Ed25519(_) => "EdDSA",
        }
    }

    /// The public JWK, with `kid`, `use` and `alg`.
    pub fn jwk(&self) -> Value {
        let mut j = match &self.key {
            Key::Rsa(k) => {
                use rsa::traits::PublicKeyParts as _;
                json!({"kty": "RSA", "n": b64(&k.n().to_bytes_be()), "e": b64(&k.e().to_bytes_be())})
            }
            Key::P256(k) => {
                let p = k.verifying_key().to_encoded_point(false);
                json!({"kty": "EC", "crv": "P-256", "x": b64(p.x().unwrap()), "y": b64(p.y().unwrap())})
            }
            Key::Ed25519(k) => {
                json!({"kty": "OKP", "crv": "Ed25519", "x": b64(k.verifying_key().as_bytes())})
            }
        };
        j["kid"] = json!(self.kid);
        j["use"] = json!("sig");
        j["alg"] = json!(self.alg());
        j
    }

    pub fn sign_bytes(&self, input: &[u8]) -> Vec<u8> {
        match &self.key {
            Key::Rsa(k) => {
                use rsa::signature::{SignatureEncoding as _, Signer as _};
                let sk = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new((**k).clone());
                sk.sign(input).to_vec()
            }
            Key::P256(k) => {
                use p256::ecdsa::signature::Signer as _;
                let s: p256::ecdsa::Signature = k.sign(input);
                s.to_bytes().to_vec()
            }
            Key::Ed25519(k) => {
                use ed25519_dalek::Signer as _;
                k.sign(input).to_bytes().to_vec()
            }
        }
    }

    /// A token with this key's alg and kid.
    pub fn token(&self, claims: &Value) -> String {
        self.token_with_header(
            &json!({"alg": self.alg(), "kid": self.kid, "typ": "JWT"}),
            claims,
        )
    }

    pub fn token_with_header(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self.sign_bytes(input.as_bytes());
        format!("{input}.{}", b64(&sig))
    }

    /// PKCS#8 PEM of the private key (for PyJWT).
    pub fn private_pem(&self) -> String {
        use rsa::pkcs8::{EncodePrivateKey as _, LineEnding};
        match &self.key {
            Key::Rsa(k) => k.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
            Key::P256(k) => k.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
            Key::Ed25519(k) => {
                // RFC 8410 §7 PKCS#8 v1: ed25519-dalek writes v2 (with the
                // public key), which the `cryptography` package refuses.
                let mut der = ED25519_PKCS8_V1_PREFIX.to_vec();
                der.extend_from_slice(&k.to_bytes());
                let b = base64::engine::general_purpose::STANDARD.encode(der);
                format!("-----BEGIN PRIVATE KEY-----\n{b}\n-----END PRIVATE KEY-----\n")
            }
        }
    }
}

pub fn jwks(keys: &[&TestKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()})
}

/// Standard claims valid at [`now`].
pub fn claims(iss: &str) -> Value {
    json!({
        "iss": iss,
        "sub": "agent-7",
        "aud": AUD,
        "iat": NOW_SECS - 60,
        "nbf": NOW_SECS - 60,
        "exp": NOW_SECS + 600,
    })
}

/// An issuer configured with inline keys.
pub fn inline_config(iss: &str, keys: &[&TestKey]) -> JwtIssuerConfig {
    JwtIssuerConfig::new(
        "test",
        iss,
        vec![AUD.into()],
        JwksSource::Inline(jwks(keys).to_string()),
    )
}

#[derive(Default)]
pub struct ServerState {
    pub jwks: Mutex<Value>,
    pub jwks_hits: AtomicUsize,
    pub discovery_hits: AtomicUsize,
    /// Milliseconds every response waits.
    pub delay_ms: AtomicU64,
    /// When set, the JWKS endpoint answers with this status.
    pub fail_status: Mutex<Option<u16>>,
    /// The issuer the discovery document names (default: the server's URL).
    pub discovery_issuer: Mutex<Option<String>>,
    pub base: Mutex<String>,
}

/// A JWKS and discovery server on 127.0.0.1:0.
pub struct JwksServer {
    pub url: String,
    pub state: Arc<ServerState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_jwks(State(st): State<Arc<ServerState>>) -> Response {
    st.jwks_hits.fetch_add(1, Ordering::SeqCst);
    let delay = st.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    if let Some(code) = *st.fail_status.lock().unwrap() {
        return StatusCode::from_u16(code).unwrap().into_response();
    }
    let body = st.jwks.lock().unwrap().clone();
    axum::Json(body).into_response()
}

async fn serve_discovery(State(st): State<Arc<ServerState>>) -> Response {
    st.discovery_hits.fetch_add(1, Ordering::SeqCst);
    let base = st.base.lock().unwrap().clone();
    let issuer = st
        .discovery_issuer
        .lock()
        .unwrap()
        .clone()
        .unwrap_or(base.clone());
    axum::Json(json!({
        "issuer": issuer,
        "jwks_uri": format!("{base}/jwks"),
        "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
    }))
    .into_response()
}

impl JwksServer {
    pub async fn start(jwks: Value) -> Self {
        let state = Arc::new(ServerState::default());
        *state.jwks.lock().unwrap() = jwks;
        let app = axum::Router::new()
            .route("/jwks", axum::routing::get(serve_jwks))
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(serve_discovery),
            )
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        *state.base.lock().unwrap() = url.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, state, task }
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/jwks", self.url)
    }

    pub fn hits(&self) -> usize {
        self.state.jwks_hits.load(Ordering::SeqCst)
    }

    pub fn set_jwks(&self, v: Value) {
        *self.state.jwks.lock().unwrap() = v;
    }

    /// An issuer (named by the server's URL) whose keys come from `/jwks`.
    pub fn config(&self) -> JwtIssuerConfig {
        JwtIssuerConfig::new(
            "test",
            &self.url,
            vec![AUD.into()],
            JwksSource::Url(self.jwks_url()),
        )
    }
}

/// `SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING (32) } }`
const ED25519_PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
