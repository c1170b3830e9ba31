//! A local stand-in for OpenRouter's key management API and its
//! OpenAI-compatible inference endpoint, on 127.0.0.1 port 0, for the
//! `openrouter` engine's tests. It follows the documented shapes:
//!
//! - `POST /api/v1/keys` with `name` (required), `limit` (dollars),
//!   `limit_reset` (`daily`, `weekly`, `monthly` or null), `expires_at`
//!   (ISO 8601, UTC only), `include_byok_in_limit`: 201 with `data` (the
//!   key's facts: `hash`, `name`, `label`, `disabled`, `limit`,
//!   `limit_reset`, `expires_at`, …) and `key` (shown once);
//! - `GET /api/v1/keys?offset=&include_disabled=`: `data`, 100 at a time;
//! - `PATCH /api/v1/keys/{hash}` (`disabled`, `name`, `limit`): `data`;
//! - `DELETE /api/v1/keys/{hash}`: `{"deleted": true}`;
//! - `POST /api/v1/chat/completions`: only a live key (existing, enabled,
//!   unexpired; never the management key), else 401;
//! - `GET /api/v1/key` ("Get current API key"): the calling key's facts
//!   (`label`, `limit`, `usage`, `is_provisioning_key`, …), only for a live
//!   key, else 401 (keymint's cheap check of a rotated key).
//!
//! Management calls need `Authorization: Bearer <management key>`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, StatusCode};
use keymint_core::{Clock, Timestamp};
use serde_json::{Value, json};

/// One key the stand-in issued.
#[derive(Debug, Clone)]
pub struct OpenRouterKey {
    pub hash: String,
    pub key: String,
    pub name: String,
    pub limit: Option<f64>,
    pub limit_reset: Option<String>,
    pub expires_at: Option<Timestamp>,
    pub disabled: bool,
}

#[derive(Debug, Default)]
struct Data {
    keys: BTreeMap<String, OpenRouterKey>,
    log: Vec<String>,
    bodies: Vec<Value>,
    /// The hash of the key behind each answered chat completion, in order.
    used: Vec<String>,
}

#[derive(Debug)]
struct Shared {
    management_key: String,
    clock: Arc<dyn Clock>,
    data: Mutex<Data>,
    delay_ms: AtomicU64,
    down: AtomicU16,
    /// When set, `GET /key` answers this status (a key not usable yet).
    key_check: AtomicU16,
}

/// A running stand-in. Dropping it stops it.
#[derive(Debug)]
pub struct FakeOpenRouter {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeOpenRouter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn rand(n: usize) -> String {
    keymint_core::token::random_base62(n)
        .map(|s| s.to_string())
        .unwrap_or_default()
}

impl FakeOpenRouter {
    pub async fn start(management_key: &str, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            management_key: management_key.to_owned(),
            clock,
            data: Mutex::new(Data::default()),
            delay_ms: AtomicU64::new(0),
            down: AtomicU16::new(0),
            key_check: AtomicU16::new(0),
        });
        let app = Router::new()
            .route("/api/v1/keys", post(create).get(list))
            .route(
                "/api/v1/keys/{hash}",
                get(read).patch(update).delete(remove),
            )
            .route("/api/v1/chat/completions", post(chat))
            .route("/api/v1/key", get(current_key))
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

    /// The API base: `http://127.0.0.1:PORT/api/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/api/v1", self.addr)
    }

    pub fn set_delay(&self, d: Duration) {
        self.shared
            .delay_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn set_down(&self, status: Option<u16>) {
        self.shared
            .down
            .store(status.unwrap_or(0), Ordering::Relaxed);
    }

    /// Makes `GET /key` answer `status` whatever the key (`None`: as
    /// documented), as a new key the provider does not accept yet would.
    pub fn set_key_check(&self, status: Option<u16>) {
        self.shared
            .key_check
            .store(status.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn keys(&self) -> Vec<OpenRouterKey> {
        self.data().keys.values().cloned().collect()
    }

    pub fn log(&self) -> Vec<String> {
        self.data().log.clone()
    }

    /// The hash of the key behind each answered chat completion, in order.
    pub fn used(&self) -> Vec<String> {
        self.data().used.clone()
    }

    pub fn bodies(&self) -> Vec<Value> {
        self.data().bodies.clone()
    }

    /// Makes a key directly, as a keymint that crashed after the provider
    /// answered would have left it.
    pub fn create_directly(&self, name: &str) -> OpenRouterKey {
        let k = OpenRouterKey {
            hash: rand(64),
            key: format!("sk-or-v1-{}", rand(48)),
            name: name.to_owned(),
            limit: None,
            limit_reset: None,
            expires_at: None,
            disabled: false,
        };
        self.data().keys.insert(k.hash.clone(), k.clone());
        k
    }

    fn data(&self) -> std::sync::MutexGuard<'_, Data> {
        self.shared.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": status.as_u16(), "message": message}})),
    )
        .into_response()
}

fn bearer(h: &HeaderMap) -> Option<&str> {
    h.get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

async fn gate(
    State(s): State<Arc<Shared>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let delay = s.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let path = req.uri().path().to_owned();
    s.data
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .log
        .push(format!("{} {path}", req.method()));
    if path.starts_with("/api/v1/keys") {
        let down = s.down.load(Ordering::Relaxed);
        if down != 0 {
            let st = StatusCode::from_u16(down).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return error(st, "Service unavailable");
        }
        if bearer(req.headers()) != Some(s.management_key.as_str()) {
            return error(StatusCode::UNAUTHORIZED, "Invalid management key");
        }
    }
    next.run(req).await
}

fn facts(k: &OpenRouterKey) -> Value {
    json!({
        "hash": k.hash, "name": k.name, "label": format!("sk-or-v1-...{}", &k.key[k.key.len() - 3..]),
        "disabled": k.disabled, "limit": k.limit, "limit_remaining": k.limit,
        "limit_reset": k.limit_reset, "include_byok_in_limit": false,
        "usage": 0, "created_at": "2026-01-01T00:00:00Z", "updated_at": null,
        "expires_at": k.expires_at.map(|t| t.rfc3339()),
    })
}

async fn create(State(s): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "Invalid JSON");
    };
    s.data
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .bodies
        .push(v.clone());
    let Some(name) = v["name"].as_str().filter(|n| !n.is_empty()) else {
        return error(StatusCode::BAD_REQUEST, "name is required");
    };
    let limit = match &v["limit"] {
        Value::Null => None,
        l => match l.as_f64() {
            Some(x) if x >= 0.0 => Some(x),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "limit must be a non-negative number",
                );
            }
        },
    };
    let limit_reset = match &v["limit_reset"] {
        Value::Null => None,
        Value::String(r) if ["daily", "weekly", "monthly"].contains(&r.as_str()) => Some(r.clone()),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "limit_reset must be daily, weekly or monthly",
            );
        }
    };
    let expires_at = match &v["expires_at"] {
        Value::Null => None,
        Value::String(t) if t.ends_with('Z') => match Timestamp::parse_rfc3339(t) {
            Some(ts) => Some(ts),
            None => return error(StatusCode::BAD_REQUEST, "expires_at must be ISO 8601"),
        },
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "expires_at must be a UTC ISO 8601 timestamp",
            );
        }
    };
    let k = OpenRouterKey {
        hash: rand(64),
        key: format!("sk-or-v1-{}", rand(48)),
        name: name.to_owned(),
        limit,
        limit_reset,
        expires_at,
        disabled: false,
    };
    let out = json!({"data": facts(&k), "key": k.key});
    s.data
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys
        .insert(k.hash.clone(), k);
    (StatusCode::CREATED, axum::Json(out)).into_response()
}

async fn list(
    State(s): State<Arc<Shared>>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let offset = q
        .get("offset")
        .and_then(|o| o.parse::<usize>().ok())
        .unwrap_or(0);
    let disabled = q.get("include_disabled").is_some_and(|d| d == "true");
    let d = s.data.lock().unwrap_or_else(|p| p.into_inner());
    let data: Vec<Value> = d
        .keys
        .values()
        .filter(|k| disabled || !k.disabled)
        .skip(offset)
        .take(100)
        .map(facts)
        .collect();
    axum::Json(json!({"data": data})).into_response()
}

async fn read(State(s): State<Arc<Shared>>, Path(hash): Path<String>) -> Response {
    let d = s.data.lock().unwrap_or_else(|p| p.into_inner());
    match d.keys.get(&hash) {
        Some(k) => axum::Json(json!({"data": facts(k)})).into_response(),
        None => error(StatusCode::NOT_FOUND, "Key not found"),
    }
}

async fn update(
    State(s): State<Arc<Shared>>,
    Path(hash): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "Invalid JSON");
    };
    let mut d = s.data.lock().unwrap_or_else(|p| p.into_inner());
    d.bodies.push(v.clone());
    let Some(k) = d.keys.get_mut(&hash) else {
        return error(StatusCode::NOT_FOUND, "Key not found");
    };
    if let Some(x) = v["disabled"].as_bool() {
        k.disabled = x;
    }
    if let Some(n) = v["name"].as_str() {
        n.clone_into(&mut k.name);
    }
    if let Some(l) = v["limit"].as_f64() {
        k.limit = Some(l);
    }
    axum::Json(json!({"data": facts(k)})).into_response()
}

async fn remove(State(s): State<Arc<Shared>>, Path(hash): Path<String>) -> Response {
    let mut d = s.data.lock().unwrap_or_else(|p| p.into_inner());
    if d.keys.remove(&hash).is_none() {
        return error(StatusCode::NOT_FOUND, "Key not found");
    }
    axum::Json(json!({"deleted": true})).into_response()
}

/// The hash of the live key `bearer` presents, if any.
fn live_key(s: &Shared, headers: &HeaderMap) -> Option<String> {
    let now = s.clock.now();
    let b = bearer(headers)?;
    s.data
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys
        .values()
        .find(|k| k.key == b && !k.disabled && k.expires_at.is_none_or(|e| now < e))
        .map(|k| k.hash.clone())
}

async fn chat(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(hash) = live_key(&s, &headers) else {
        return error(StatusCode::UNAUTHORIZED, "No auth credentials found");
    };
    s.data
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .used
        .push(hash);
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    axum::Json(crate::openai_admin::completion(
        v["model"].as_str().unwrap_or("openai/gpt-4o-mini"),
    ))
    .into_response()
}

async fn current_key(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let forced = s.key_check.load(Ordering::Relaxed);
    if forced != 0 {
        let st = StatusCode::from_u16(forced).unwrap_or(StatusCode::UNAUTHORIZED);
        return error(st, "No auth credentials found");
    }
    let Some(hash) = live_key(&s, &headers) else {
        return error(StatusCode::UNAUTHORIZED, "No auth credentials found");
    };
    let d = s.data.lock().unwrap_or_else(|p| p.into_inner());
    let Some(k) = d.keys.get(&hash) else {
        return error(StatusCode::UNAUTHORIZED, "No auth credentials found");
    };
    let f = facts(k);
    axum::Json(json!({"data": {
        "label": f["label"], "limit": f["limit"], "limit_remaining": f["limit_remaining"],
        "limit_reset": f["limit_reset"], "usage": 0, "is_free_tier": false,
        "is_provisioning_key": false, "include_byok_in_limit": false,
        "expires_at": f["expires_at"],
    }}))
    .into_response()
}
