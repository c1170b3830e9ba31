//! A local stand-in for Anthropic's Admin API keys endpoints and its
//! Messages endpoint, on 127.0.0.1 port 0, for the leak response's tests
//! (docs/design/0027). It follows the documented shapes:
//!
//! - `GET /v1/organizations/api_keys?limit=&after_id=&status=`: `data` (each
//!   an `api_key`: `id`, `type`, `name`, `status` (`active`, `inactive`,
//!   `archived`), `partial_key_hint` (`sk-ant-api03-R2D...igAA`),
//!   `created_at` (RFC 3339), `created_by`, `workspace_id`), `has_more`,
//!   `first_id`, `last_id`; `limit` 1..=1000, default 20;
//! - `GET /v1/organizations/api_keys/{id}`: one `api_key`;
//! - `POST /v1/organizations/api_keys/{id}` with `name` and/or `status`
//!   (`active`, `inactive`, `archived`): the updated `api_key`;
//! - `POST /v1/messages`: answers only an `active` key (`x-api-key`);
//! - `GET /v1/models` ("List Models"): only an `active` key, with
//!   `anthropic-version` (keymint's cheap check of a rotated key).
//!
//! Admin calls need `x-api-key: <admin key>` and an `anthropic-version`
//! header; errors are Anthropic's `{"type": "error", "error": {...}}`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

/// One API key the stand-in holds.
#[derive(Debug, Clone)]
pub struct AnthropicKey {
    pub id: String,
    pub value: String,
    pub name: String,
    /// `active`, `inactive` or `archived`.
    pub status: String,
}

#[derive(Debug, Default)]
struct Data {
    keys: BTreeMap<String, AnthropicKey>,
    /// `METHOD path` of every request.
    log: Vec<String>,
}

#[derive(Debug)]
struct Shared {
    admin_key: String,
    data: Mutex<Data>,
}

/// A running stand-in. Dropping it stops it.
#[derive(Debug)]
pub struct FakeAnthropicAdmin {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeAnthropicAdmin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn rand(n: usize) -> String {
    keymint_core::token::random_base62(n)
        .map(|r| r.as_str().to_owned())
        .unwrap_or_default()
}

impl FakeAnthropicAdmin {
    /// Starts a stand-in that accepts `admin_key` on its Admin API.
    pub async fn start(admin_key: &str) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            admin_key: admin_key.to_owned(),
            data: Mutex::new(Data::default()),
        });
        let app = Router::new()
            .route("/v1/organizations/api_keys", get(list))
            .route("/v1/organizations/api_keys/{id}", get(read).post(update))
            .route("/v1/messages", post(messages))
            .route("/v1/models", get(models))
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

    /// The API's base URL (without `/v1`, as Anthropic's SDK takes it).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Makes an `active` API key (`sk-ant-api03-…AA`, the shape Anthropic
    /// issues and the scanner knows), as a person would in the console.
    pub fn create_key(&self, name: &str) -> AnthropicKey {
        let k = AnthropicKey {
            id: format!("apikey_{}", rand(24)),
            value: format!("sk-ant-api03-{}AA", rand(93)),
            name: name.to_owned(),
            status: "active".into(),
        };
        self.data().keys.insert(k.id.clone(), k.clone());
        k
    }

    pub fn keys(&self) -> Vec<AnthropicKey> {
        self.data().keys.values().cloned().collect()
    }

    pub fn log(&self) -> Vec<String> {
        self.data().log.clone()
    }

    fn data(&self) -> std::sync::MutexGuard<'_, Data> {
        self.shared.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"type": "error", "error": {"type": kind, "message": message}})),
    )
        .into_response()
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name)?.to_str().ok()
}

/// The admin key and `anthropic-version` in front of the Admin API.
async fn gate(
    State(s): State<Arc<Shared>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path().to_owned();
    s.data
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .log
        .push(format!("{} {path}", req.method()));
    if path.starts_with("/v1/organizations/") {
        if header(req.headers(), "anthropic-version").is_none() {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "anthropic-version: header is required",
            );
        }
        if header(req.headers(), "x-api-key") != Some(s.admin_key.as_str()) {
            return error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid x-api-key",
            );
        }
    }
    next.run(req).await
}

fn hint(value: &str) -> String {
    let n = value.len();
    format!(
        "{}...{}",
        &value[..16.min(n)],
        &value[n.saturating_sub(4)..]
    )
}

fn key_json(k: &AnthropicKey) -> Value {
    json!({
        "id": k.id, "type": "api_key", "name": k.name, "status": k.status,
        "partial_key_hint": hint(&k.value),
        "created_at": "2026-01-01T00:00:00Z",
        "created_by": {"id": "user_fake", "type": "user"},
        "workspace_id": null,
    })
}

async fn list(State(s): State<Arc<Shared>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => 20,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "limit: must be between 1 and 1000",
            );
        }
    };
    let d = s.data.lock().unwrap_or_else(|p| p.into_inner());
    let all: Vec<&AnthropicKey> = d
        .keys
        .values()
        .filter(|k| q.get("after_id").is_none_or(|a| k.id.as_str() > a.as_str()))
        .filter(|k| q.get("status").is_none_or(|st| &k.status == st))
        .collect();
    let page: Vec<Value> = all.iter().take(limit).map(|k| key_json(k)).collect();
    axum::Json(json!({
        "data": page,
        "has_more": all.len() > limit,
        "first_id": page.first().map(|p| p["id"].clone()),
        "last_id": page.last().map(|p| p["id"].clone()),
    }))
    .into_response()
}

async fn read(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let d = s.data.lock().unwrap_or_else(|p| p.into_inner());
    match d.keys.get(&id) {
        Some(k) => axum::Json(key_json(k)).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "API key not found",
        ),
    }
}

async fn update(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "the body is not JSON",
        );
    };
    let status = v.get("status").and_then(Value::as_str);
    if status.is_some_and(|st| !["active", "inactive", "archived"].contains(&st)) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "status: must be one of active, inactive, archived",
        );
    }
    let mut d = s.data.lock().unwrap_or_else(|p| p.into_inner());
    let Some(k) = d.keys.get_mut(&id) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "API key not found",
        );
    };
    if k.status == "archived" {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "an archived key cannot be changed",
        );
    }
    if let Some(st) = status {
        k.status = st.to_owned();
    }
    if let Some(n) = v.get("name").and_then(Value::as_str) {
        k.name = n.to_owned();
    }
    axum::Json(key_json(k)).into_response()
}

async fn messages(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let key = header(&headers, "x-api-key").unwrap_or_default();
    let ok = s
        .data
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys
        .values()
        .any(|k| k.value == key && k.status == "active");
    if !ok {
        return error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid x-api-key",
        );
    }
    axum::Json(json!({
        "id": "msg_fake", "type": "message", "role": "assistant", "model": "claude-test",
        "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }))
    .into_response()
}

async fn models(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if header(&headers, "anthropic-version").is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "anthropic-version: header is required",
        );
    }
    let key = header(&headers, "x-api-key").unwrap_or_default();
    let ok = s
        .data
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys
        .values()
        .any(|k| k.value == key && k.status == "active");
    if !ok {
        return error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid x-api-key",
        );
    }
    axum::Json(json!({
        "data": [{"type": "model", "id": "claude-test", "display_name": "Claude Test",
                  "created_at": "2026-01-01T00:00:00Z"}],
        "has_more": false, "first_id": "claude-test", "last_id": "claude-test",
    }))
    .into_response()
}
