//! A local stand-in for the providers' workload identity federation, on
//! 127.0.0.1 port 0, for the `federated` engine and the proxy's federated
//! upstreams. One server plays all three providers, each at its documented
//! path and shape (docs/design/0028-provider-federation.md):
//!
//! - OpenAI: `POST /oauth/token`, JSON, RFC 8693 (`grant_type`
//!   token-exchange, `subject_token_type` jwt, `subject_token`,
//!   `identity_provider_id`, `service_account_id`); the token then works on
//!   `POST /v1/chat/completions`;
//! - Anthropic: `POST /v1/oauth/token`, JSON, RFC 7523 (`grant_type`
//!   jwt-bearer, `assertion`, `federation_rule_id`, `organization_id`,
//!   `service_account_id`, optional `workspace_id`) with the
//!   `oidc-federation-2026-04-01` beta flag; the token (`sk-ant-oat01-…`)
//!   then works as `Authorization: Bearer` on `POST /v1/messages`;
//! - OpenRouter: `POST /api/v1/oauth/token`, form-encoded, RFC 8693 with
//!   `federation_policy_id`; tokens live 15 minutes at most and never past
//!   the JWT; the token then works on `POST /api/v1/chat/completions`.
//!
//! As the providers do, the stand-in verifies the JWT against the trusted
//! issuer's keys, fetched over HTTP from its discovery document and JWKS
//! (keymint's, set with [`FakeFederation::trust`]), checks `aud`, `exp` and
//! the ids, refuses a replayed `jti`, and answers RFC 6749 §5.1
//! (`access_token`, `token_type`, `expires_in`). Its tokens are refused
//! after they expire (by the clock it is given).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use http::{HeaderMap, StatusCode};
use keymint_core::{Clock, Timestamp};
use keymint_identity::{JwksSource, JwtIssuerConfig, Verifier};
use serde_json::{Value, json};

/// The ids the stand-in's trust configuration holds.
pub const OPENAI_IDP: &str = "idp_standin";
pub const OPENAI_SERVICE_ACCOUNT: &str = "svc_acct_standin";
pub const ANTHROPIC_RULE: &str = "fdrl_standin";
pub const ANTHROPIC_ORG: &str = "00000000-0000-4000-8000-000000000001";
pub const ANTHROPIC_SERVICE_ACCOUNT: &str = "svac_standin";
pub const OPENROUTER_POLICY: &str = "4b2f7d1e-8c3a-4e5f-9a6b-1c2d3e4f5a6b";

/// One token exchange the stand-in granted.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// `openai`, `anthropic` or `openrouter`.
    pub provider: &'static str,
    /// The verified JWT's claims.
    pub claims: Value,
    /// The token it issued.
    pub token: String,
    pub expires_at: Timestamp,
}

#[derive(Debug, Default)]
struct Data {
    exchanges: Vec<Exchange>,
    /// `provider: reason` of each refused exchange.
    refusals: Vec<String>,
    seen_jti: HashSet<String>,
    /// Requests on the API: `provider path beta-flag?`.
    calls: Vec<String>,
}

#[derive(Debug)]
struct Shared {
    clock: Arc<dyn Clock>,
    verifier: Mutex<Option<Arc<Verifier>>>,
    token_secs: AtomicU64,
    data: Mutex<Data>,
    delay_ms: AtomicU64,
    down: AtomicU16,
}

/// A running stand-in. Dropping it stops it.
#[derive(Debug)]
pub struct FakeFederation {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeFederation {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn rand(n: usize) -> String {
    keymint_core::token::random_base62(n)
        .map(|s| s.to_string())
        .unwrap_or_default()
}

impl FakeFederation {
    pub async fn start(clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            clock,
            verifier: Mutex::new(None),
            token_secs: AtomicU64::new(600),
            data: Mutex::new(Data::default()),
            delay_ms: AtomicU64::new(0),
            down: AtomicU16::new(0),
        });
        let app = Router::new()
            .route("/oauth/token", post(openai_token))
            .route("/v1/oauth/token", post(anthropic_token))
            .route("/api/v1/oauth/token", post(openrouter_token))
            .route("/v1/chat/completions", post(openai_chat))
            .route("/api/v1/chat/completions", post(openrouter_chat))
            .route("/v1/messages", post(anthropic_messages))
            .layer(axum::middleware::from_fn_with_state(
                Arc::clone(&shared),
                gate,
            ))
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// Trusts `issuer` (its discovery document and JWKS, over HTTP) for
    /// tokens with `audience`, as an operator registers keymint with the
    /// provider.
    pub fn trust(&self, issuer: &str, audience: &str) -> anyhow::Result<()> {
        let mut c = JwtIssuerConfig::new(
            "keymint",
            issuer,
            vec![audience.to_owned()],
            JwksSource::Discovery,
        );
        c.dangerous_allow_http = true;
        c.leeway_secs = 5;
        let v = Verifier::new(vec![c]).map_err(|e| anyhow::anyhow!("{e}"))?;
        *self
            .shared
            .verifier
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(v));
        Ok(())
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How long the tokens it issues live (default 600 s).
    pub fn set_token_secs(&self, s: u64) {
        self.shared.token_secs.store(s, Ordering::Relaxed);
    }

    pub fn set_delay(&self, d: Duration) {
        self.shared
            .delay_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Answers every token request with `status` (none: normal).
    pub fn set_down(&self, status: Option<u16>) {
        self.shared
            .down
            .store(status.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn exchanges(&self) -> Vec<Exchange> {
        self.data().exchanges.clone()
    }

    pub fn refusals(&self) -> Vec<String> {
        self.data().refusals.clone()
    }

    pub fn calls(&self) -> Vec<String> {
        self.data().calls.clone()
    }

    fn data(&self) -> std::sync::MutexGuard<'_, Data> {
        self.shared.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn gate(
    State(s): State<Arc<Shared>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let delay = s.delay_ms.load(Ordering::Relaxed);
    if delay > 0 && req.uri().path().ends_with("/oauth/token") {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let down = s.down.load(Ordering::Relaxed);
    if down != 0 && req.uri().path().ends_with("/oauth/token") {
        let status = StatusCode::from_u16(down).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return oauth_error(status, "temporarily_unavailable");
    }
    next.run(req).await
}

fn oauth_error(status: StatusCode, code: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": code, "error_description": "refused by the stand-in"})),
    )
        .into_response()
}

fn refuse(s: &Shared, provider: &str, why: &str, status: StatusCode, code: &str) -> Response {
    s.data
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .refusals
        .push(format!("{provider}: {why}"));
    oauth_error(status, code)
}

/// Verifies `jwt` as the provider would: signature by a key of the trusted
/// issuer's JWKS, `iss`, `aud`, `exp`/`nbf`, and a `jti` never seen before.
async fn verify(s: &Shared, jwt: &str) -> Result<Value, &'static str> {
    let verifier = s
        .verifier
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or("no issuer is trusted")?;
    verifier
        .verify(jwt, s.clock.now())
        .await
        .map_err(|_| "the JWT does not verify")?;
    // Verified: its claims can be read.
    let payload = jwt.split('.').nth(1).ok_or("not a JWT")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| "not a JWT")?;
    let claims: Value = serde_json::from_slice(&bytes).map_err(|_| "not a JWT")?;
    let jti = claims["jti"]
        .as_str()
        .ok_or("the JWT has no jti")?
        .to_owned();
    if !s
        .data
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .seen_jti
        .insert(jti)
    {
        return Err("the JWT was already used (jti replay)");
    }
    Ok(claims)
}

/// Issues a token for verified `claims`, never past `cap_secs` nor the
/// JWT's own `exp` when `bounded_by_jwt`.
fn grant(
    s: &Shared,
    provider: &'static str,
    prefix: &str,
    claims: Value,
    cap_secs: Option<u64>,
) -> Response {
    let now = s.clock.now();
    let mut life = s.token_secs.load(Ordering::Relaxed);
    if let Some(cap) = cap_secs {
        life = life.min(cap);
        // OpenRouter: never longer than the JWT that was exchanged.
        let jwt_left = claims["exp"].as_i64().unwrap_or(0) - now.unix_seconds();
        life = life.min(u64::try_from(jwt_left).unwrap_or(0));
    }
    let token = format!("{prefix}{}", rand(40));
    let expires_at = now.plus_secs(life);
    s.data
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .exchanges
        .push(Exchange {
            provider,
            claims,
            token: token.clone(),
            expires_at,
        });
    let mut body = json!({"access_token": token, "token_type": "Bearer", "expires_in": life});
    if provider == "openrouter" {
        body["issued_token_type"] = json!("urn:ietf:params:oauth:token-type:access_token");
        body["scope"] = json!("inference");
    }
    axum::Json(body).into_response()
}

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

fn json_body(headers: &HeaderMap, body: &[u8]) -> Option<Value> {
    let ct = headers.get(http::header::CONTENT_TYPE)?.to_str().ok()?;
    if !ct.starts_with("application/json") {
        return None;
    }
    serde_json::from_slice::<Value>(body)
        .ok()
        .filter(Value::is_object)
}

async fn openai_token(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let p = "openai";
    let Some(b) = json_body(&headers, &body) else {
        return refuse(
            &s,
            p,
            "not a JSON body",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    };
    if b["grant_type"] != TOKEN_EXCHANGE || b["subject_token_type"] != JWT_TYPE {
        return refuse(
            &s,
            p,
            "wrong grant",
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
        );
    }
    if b["identity_provider_id"] != OPENAI_IDP || b["service_account_id"] != OPENAI_SERVICE_ACCOUNT
    {
        return refuse(
            &s,
            p,
            "unknown mapping",
            StatusCode::BAD_REQUEST,
            "invalid_target",
        );
    }
    let Some(jwt) = b["subject_token"].as_str() else {
        return refuse(
            &s,
            p,
            "no subject_token",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    };
    match verify(&s, jwt).await {
        Ok(c) => grant(&s, p, "fedoai_", c, None),
        Err(why) => refuse(&s, p, why, StatusCode::UNAUTHORIZED, "invalid_grant"),
    }
}

async fn anthropic_token(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let p = "anthropic";
    let beta_ok = headers
        .get("anthropic-beta")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|f| f.trim() == "oidc-federation-2026-04-01")
        });
    if !beta_ok {
        return refuse(
            &s,
            p,
            "no federation beta flag",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    }
    let Some(b) = json_body(&headers, &body) else {
        return refuse(
            &s,
            p,
            "not a JSON body",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    };
    if b["grant_type"] != JWT_BEARER {
        return refuse(
            &s,
            p,
            "wrong grant",
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
        );
    }
    if b["federation_rule_id"] != ANTHROPIC_RULE
        || b["organization_id"] != ANTHROPIC_ORG
        || b["service_account_id"] != ANTHROPIC_SERVICE_ACCOUNT
    {
        return refuse(
            &s,
            p,
            "no matching rule",
            StatusCode::UNAUTHORIZED,
            "invalid_grant",
        );
    }
    let Some(jwt) = b["assertion"].as_str() else {
        return refuse(
            &s,
            p,
            "no assertion",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    };
    match verify(&s, jwt).await {
        Ok(c) => grant(&s, p, "sk-ant-oat01-", c, None),
        Err(why) => refuse(&s, p, why, StatusCode::UNAUTHORIZED, "invalid_grant"),
    }
}

async fn openrouter_token(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let p = "openrouter";
    let form_ok = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let Some(f) = form_ok
        .then(|| serde_urlencoded::from_bytes::<BTreeMap<String, String>>(&body).ok())
        .flatten()
    else {
        return refuse(
            &s,
            p,
            "not a form body",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    };
    let get = |k: &str| f.get(k).map(String::as_str);
    if get("grant_type") != Some(TOKEN_EXCHANGE) || get("subject_token_type") != Some(JWT_TYPE) {
        return refuse(
            &s,
            p,
            "wrong grant",
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
        );
    }
    if get("requested_token_type")
        .is_some_and(|t| t != "urn:ietf:params:oauth:token-type:access_token")
    {
        return refuse(
            &s,
            p,
            "wrong requested type",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    }
    if get("federation_policy_id") != Some(OPENROUTER_POLICY) {
        return refuse(
            &s,
            p,
            "unknown policy",
            StatusCode::UNAUTHORIZED,
            "invalid_grant",
        );
    }
    let Some(jwt) = get("subject_token") else {
        return refuse(
            &s,
            p,
            "no subject_token",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    };
    match verify(&s, jwt).await {
        Ok(c) => grant(&s, p, "fedor_", c, Some(900)),
        Err(why) => refuse(&s, p, why, StatusCode::UNAUTHORIZED, "invalid_grant"),
    }
}

fn bearer(h: &HeaderMap) -> Option<&str> {
    h.get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// Whether `h` carries a live token the stand-in issued for `provider`.
fn live(s: &Shared, provider: &str, h: &HeaderMap, path: &str) -> bool {
    let now = s.clock.now();
    let beta = h
        .get("anthropic-beta")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut d = s.data.lock().unwrap_or_else(|p| p.into_inner());
    d.calls.push(format!("{provider} {path} beta={beta}"));
    bearer(h).is_some_and(|t| {
        d.exchanges
            .iter()
            .any(|e| e.provider == provider && e.token == t && now < e.expires_at)
    })
}

async fn chat(s: &Shared, provider: &str, h: &HeaderMap, body: &[u8], path: &str) -> Response {
    if !live(s, provider, h, path) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(
                json!({"error": {"message": "invalid or expired access token",
                "type": "invalid_request_error", "code": "invalid_api_key"}}),
            ),
        )
            .into_response();
    }
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    axum::Json(crate::openai_admin::completion(
        v["model"].as_str().unwrap_or("gpt-4o-mini"),
    ))
    .into_response()
}

async fn openai_chat(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    chat(&s, "openai", &headers, &body, "/v1/chat/completions").await
}

async fn openrouter_chat(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    chat(
        &s,
        "openrouter",
        &headers,
        &body,
        "/api/v1/chat/completions",
    )
    .await
}

async fn anthropic_messages(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !live(&s, "anthropic", &headers, "/v1/messages") {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(
                json!({"type": "error", "error": {"type": "authentication_error",
                "message": "invalid or expired access token"}}),
            ),
        )
            .into_response();
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = v["model"].as_str().unwrap_or("claude-sonnet-4-5");
    axum::Json(json!({
        "id": "msg_standin01", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": "Hello from the stand-in."}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 3, "output_tokens": 5},
    }))
    .into_response()
}
