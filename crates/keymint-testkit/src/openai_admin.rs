//! A local stand-in for OpenAI's Admin API (project service accounts and
//! their API keys) and its inference endpoint, on 127.0.0.1 port 0, for the
//! `openai` engine's tests. It follows the documented shapes:
//!
//! - `POST /v1/organization/projects/{project}/service_accounts` with
//!   `name`, `create_service_account_only`, `expires_in_seconds`
//!   (1..=31536000; not with `create_service_account_only`): an
//!   `organization.project.service_account`, with its first key in
//!   `api_key` (`organization.project.service_account.api_key`: `id`,
//!   `value`, `name`, `created_at`, `expires_at`) unless only the account
//!   was asked for;
//! - `GET …/service_accounts?limit=&after=`: a `list` (`data`, `has_more`,
//!   `first_id`, `last_id`);
//! - `DELETE …/service_accounts/{id}`: `…service_account.deleted`, and the
//!   account's keys go with it;
//! - `POST …/service_accounts/{id}/api_keys` with `name`,
//!   `expires_in_seconds`, `scopes`;
//! - `GET /v1/organization/projects/{project}/api_keys?limit=&after=`: a
//!   `list` of `organization.project.api_key` (`id`, `name`,
//!   `redacted_value`: the key's first 12 characters, `...`, its last 4,
//!   `created_at`, `last_used_at`, `owner`), never the key itself;
//! - `DELETE /v1/organization/projects/{project}/api_keys/{id}`:
//!   `organization.project.api_key.deleted`;
//! - `POST /v1/chat/completions`: answers only a live, unexpired key (never
//!   the admin key), with OpenAI's `invalid_api_key` error otherwise;
//! - `GET /v1/models`: the same check (keymint's cheap check of a rotated
//!   key).
//!
//! Admin calls need `Authorization: Bearer <admin key>`. Keys live in
//! memory; time comes from the [`Clock`] given.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use http::{HeaderMap, StatusCode};
use keymint_core::Clock;
use serde_json::{Value, json};

/// One API key the stand-in issued.
#[derive(Debug, Clone)]
pub struct OpenAiKey {
    pub id: String,
    pub value: String,
    pub name: String,
    pub service_account: String,
    /// Unix seconds; `None`: never.
    pub expires_at: Option<i64>,
    pub scopes: Vec<String>,
}

#[derive(Debug, Default)]
struct Data {
    /// Service accounts by id (ordered, for paging): their names.
    accounts: BTreeMap<String, String>,
    keys: BTreeMap<String, OpenAiKey>,
    /// `METHOD path` of every request.
    log: Vec<String>,
    /// Bodies of the admin requests.
    bodies: Vec<Value>,
}

#[derive(Debug)]
struct Shared {
    admin_key: String,
    project: String,
    clock: Arc<dyn Clock>,
    data: Mutex<Data>,
    delay_ms: AtomicU64,
    /// An HTTP status every admin call answers with (an outage); 0: none.
    down: AtomicU16,
}

/// A running stand-in. Dropping it stops it.
#[derive(Debug)]
pub struct FakeOpenAiAdmin {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeOpenAiAdmin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn id(prefix: &str) -> String {
    let r = keymint_core::token::random_base62(20).unwrap_or_default();
    format!("{prefix}{}", r.as_str())
}

impl FakeOpenAiAdmin {
    /// Starts a stand-in that accepts `admin_key` for the project `project`.
    pub async fn start(
        admin_key: &str,
        project: &str,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            admin_key: admin_key.to_owned(),
            project: project.to_owned(),
            clock,
            data: Mutex::new(Data::default()),
            delay_ms: AtomicU64::new(0),
            down: AtomicU16::new(0),
        });
        let sa = "/v1/organization/projects/{project}/service_accounts";
        let app = Router::new()
            .route(sa, post(create_account).get(list_accounts))
            .route(&format!("{sa}/{{id}}"), delete(delete_account))
            .route(&format!("{sa}/{{id}}/api_keys"), post(create_key))
            .route(
                "/v1/organization/projects/{project}/api_keys",
                axum::routing::get(list_keys),
            )
            .route(
                "/v1/organization/projects/{project}/api_keys/{id}",
                delete(delete_key),
            )
            .route("/v1/chat/completions", post(chat))
            .route("/v1/models", axum::routing::get(models))
            .layer(axum::middleware::from_fn_with_state(
                Arc::clone(&shared),
                admin_gate,
            ))
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// The API base an SDK takes: `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Waits this long before answering any request.
    pub fn set_delay(&self, d: Duration) {
        self.shared
            .delay_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Every admin call answers `status` (503: an outage) until `None`.
    pub fn set_down(&self, status: Option<u16>) {
        self.shared
            .down
            .store(status.unwrap_or(0), Ordering::Relaxed);
    }

    /// The keys that exist now.
    pub fn keys(&self) -> Vec<OpenAiKey> {
        self.data().keys.values().cloned().collect()
    }

    /// The service accounts that exist now: `(id, name)`.
    pub fn accounts(&self) -> Vec<(String, String)> {
        self.data()
            .accounts
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// `METHOD path` of every request received.
    pub fn log(&self) -> Vec<String> {
        self.data().log.clone()
    }

    /// The JSON bodies of the admin requests received.
    pub fn bodies(&self) -> Vec<Value> {
        self.data().bodies.clone()
    }

    /// Makes a service account and key directly, as a keymint that crashed
    /// after the provider answered would have left them.
    pub fn create_directly(&self, name: &str, expires_at: Option<i64>) -> OpenAiKey {
        let mut d = self.data();
        let sa = id("svc_acct_");
        d.accounts.insert(sa.clone(), name.to_owned());
        let k = OpenAiKey {
            id: id("key_"),
            value: format!("sk-svcacct-{}", id("")),
            name: name.to_owned(),
            service_account: sa,
            expires_at,
            scopes: Vec::new(),
        };
        d.keys.insert(k.id.clone(), k.clone());
        k
    }

    /// Makes a user's project key (`sk-proj-…`, in the shape OpenAI
    /// issues and the scanner knows), as a person would in the dashboard.
    pub fn create_project_key(&self, name: &str) -> OpenAiKey {
        let part = || {
            let r = keymint_core::token::random_base62(74).unwrap_or_default();
            r.as_str().to_owned()
        };
        let k = OpenAiKey {
            id: id("key_"),
            value: format!("sk-proj-{}T3BlbkFJ{}", part(), part()),
            name: name.to_owned(),
            service_account: String::new(),
            expires_at: None,
            scopes: Vec::new(),
        };
        self.data().keys.insert(k.id.clone(), k.clone());
        k
    }

    fn data(&self) -> std::sync::MutexGuard<'_, Data> {
        self.shared.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn error(status: StatusCode, message: &str, code: &str) -> Response {
    (
        status,
        axum::Json(
            json!({"error": {"message": message, "type": "invalid_request_error",
            "param": null, "code": code}}),
        ),
    )
        .into_response()
}

fn bearer(h: &HeaderMap) -> Option<&str> {
    h.get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// Delay, log, outage and the admin key, in front of every route.
async fn admin_gate(
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
    if path.starts_with("/v1/organization/") {
        let down = s.down.load(Ordering::Relaxed);
        if down != 0 {
            let st = StatusCode::from_u16(down).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return error(st, "the server is temporarily unavailable", "server_error");
        }
        if bearer(req.headers()) != Some(s.admin_key.as_str()) {
            return error(
                StatusCode::UNAUTHORIZED,
                "Incorrect API key provided",
                "invalid_api_key",
            );
        }
        if !path.starts_with(&format!("/v1/organization/projects/{}/", s.project)) {
            return error(StatusCode::NOT_FOUND, "No such project", "not_found");
        }
    }
    next.run(req).await
}

fn body_of(s: &Shared, body: &[u8]) -> Result<Value, Box<Response>> {
    let v: Value = serde_json::from_slice(body).map_err(|_| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "We could not parse the JSON body of your request.",
            "invalid_json",
        ))
    })?;
    s.data
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .bodies
        .push(v.clone());
    Ok(v)
}

/// `expires_in_seconds`: absent or null, or 1..=31536000.
fn expires_in(v: &Value) -> Result<Option<i64>, Box<Response>> {
    match &v["expires_in_seconds"] {
        Value::Null => Ok(None),
        n => match n.as_i64() {
            Some(x) if (1..=31_536_000).contains(&x) => Ok(Some(x)),
            _ => Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                "expires_in_seconds must be between 1 and 31536000",
                "invalid_value",
            ))),
        },
    }
}

fn key_json(k: &OpenAiKey, created: i64) -> Value {
    json!({
        "object": "organization.project.service_account.api_key",
        "id": k.id, "name": k.name, "value": k.value,
        "created_at": created, "expires_at": k.expires_at,
    })
}

fn new_key(
    s: &Shared,
    sa: &str,
    name: &str,
    expires_in: Option<i64>,
    scopes: Vec<String>,
) -> Value {
    let now = s.clock.now().unix_seconds();
    let k = OpenAiKey {
        id: id("key_"),
        value: format!("sk-svcacct-{}", id("")),
        name: name.to_owned(),
        service_account: sa.to_owned(),
        expires_at: expires_in.map(|e| now + e),
        scopes,
    };
    let j = key_json(&k, now);
    s.data
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys
        .insert(k.id.clone(), k);
    j
}

async fn create_account(State(s): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let v = match body_of(&s, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let Some(name) = v["name"].as_str() else {
        return error(StatusCode::BAD_REQUEST, "name is required", "invalid_value");
    };
    let only = v["create_service_account_only"].as_bool().unwrap_or(false);
    let exp = match expires_in(&v) {
        Ok(e) => e,
        Err(r) => return *r,
    };
    if only && exp.is_some() {
        return error(
            StatusCode::BAD_REQUEST,
            "expires_in_seconds cannot be set with create_service_account_only",
            "invalid_value",
        );
    }
    let sa = id("svc_acct_");
    s.data
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .accounts
        .insert(sa.clone(), name.to_owned());
    let api_key = if only {
        Value::Null
    } else {
        new_key(&s, &sa, "Secret Key", exp, Vec::new())
    };
    axum::Json(json!({
        "object": "organization.project.service_account",
        "id": sa, "name": name,
        "role": if only { "none" } else { "member" },
        "created_at": s.clock.now().unix_seconds(),
        "api_key": api_key,
    }))
    .into_response()
}

async fn list_accounts(
    State(s): State<Arc<Shared>>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(20)
        .clamp(1, 100);
    let d = s.data.lock().unwrap_or_else(|p| p.into_inner());
    let all: Vec<(&String, &String)> = d
        .accounts
        .iter()
        .filter(|(id, _)| q.get("after").is_none_or(|a| id.as_str() > a.as_str()))
        .collect();
    let page: Vec<Value> = all
        .iter()
        .take(limit)
        .map(|(id, name)| {
            json!({"object": "organization.project.service_account", "id": id,
                "name": name, "role": "member", "created_at": 0})
        })
        .collect();
    axum::Json(json!({
        "object": "list",
        "first_id": page.first().map(|p| p["id"].clone()),
        "last_id": page.last().map(|p| p["id"].clone()),
        "has_more": all.len() > limit,
        "data": page,
    }))
    .into_response()
}

async fn delete_account(
    State(s): State<Arc<Shared>>,
    Path((_, sa)): Path<(String, String)>,
) -> Response {
    let mut d = s.data.lock().unwrap_or_else(|p| p.into_inner());
    if d.accounts.remove(&sa).is_none() {
        return error(
            StatusCode::NOT_FOUND,
            "No such service account",
            "not_found",
        );
    }
    d.keys.retain(|_, k| k.service_account != sa);
    axum::Json(
        json!({"object": "organization.project.service_account.deleted",
        "id": sa, "deleted": true}),
    )
    .into_response()
}

async fn create_key(
    State(s): State<Arc<Shared>>,
    Path((_, sa)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let v = match body_of(&s, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    if !s
        .data
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .accounts
        .contains_key(&sa)
    {
        return error(
            StatusCode::NOT_FOUND,
            "No such service account",
            "not_found",
        );
    }
    let exp = match expires_in(&v) {
        Ok(e) => e,
        Err(r) => return *r,
    };
    let scopes: Vec<String> = v["scopes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let name = v["name"].as_str().unwrap_or("Secret Key").to_owned();
    axum::Json(new_key(&s, &sa, &name, exp, scopes)).into_response()
}

async fn delete_key(
    State(s): State<Arc<Shared>>,
    Path((_, key)): Path<(String, String)>,
) -> Response {
    let mut d = s.data.lock().unwrap_or_else(|p| p.into_inner());
    if d.keys.remove(&key).is_none() {
        return error(StatusCode::NOT_FOUND, "No such API key", "not_found");
    }
    axum::Json(json!({"object": "organization.project.api_key.deleted",
        "id": key, "deleted": true}))
    .into_response()
}

/// The redacted form OpenAI lists a key with.
fn redacted(value: &str) -> String {
    let n = value.len();
    format!(
        "{}...{}",
        &value[..12.min(n)],
        &value[n.saturating_sub(4)..]
    )
}

async fn list_keys(
    State(s): State<Arc<Shared>>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(20)
        .clamp(1, 100);
    let d = s.data.lock().unwrap_or_else(|p| p.into_inner());
    let all: Vec<&OpenAiKey> = d
        .keys
        .values()
        .filter(|k| q.get("after").is_none_or(|a| k.id.as_str() > a.as_str()))
        .collect();
    let page: Vec<Value> = all
        .iter()
        .take(limit)
        .map(|k| {
            let owner = if k.service_account.is_empty() {
                json!({"type": "user", "user": {"id": "user_fake", "name": "A Person"}})
            } else {
                json!({"type": "service_account", "service_account": {"id": k.service_account}})
            };
            json!({"object": "organization.project.api_key", "id": k.id, "name": k.name,
                "redacted_value": redacted(&k.value), "created_at": 0,
                "last_used_at": null, "owner": owner})
        })
        .collect();
    axum::Json(json!({
        "object": "list",
        "first_id": page.first().map(|p| p["id"].clone()),
        "last_id": page.last().map(|p| p["id"].clone()),
        "has_more": all.len() > limit,
        "data": page,
    }))
    .into_response()
}

/// Whether `value` is a key that exists and has not expired at `now`.
fn live(s: &Shared, value: &str) -> bool {
    let now = s.clock.now().unix_seconds();
    s.data
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys
        .values()
        .any(|k| k.value == value && k.expires_at.is_none_or(|e| now < e))
}

/// A `chat.completion` for `model`.
pub fn completion(model: &str) -> Value {
    json!({
        "id": "chatcmpl-standin", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "Hello from the stand-in."}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6},
    })
}

async fn chat(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !bearer(&headers).is_some_and(|k| live(&s, k)) {
        return error(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided",
            "invalid_api_key",
        );
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    axum::Json(completion(v["model"].as_str().unwrap_or("gpt-4o-mini"))).into_response()
}

/// `GET /v1/models` ("List models"): only a live key.
async fn models(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if !bearer(&headers).is_some_and(|k| live(&s, k)) {
        return error(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided",
            "invalid_api_key",
        );
    }
    axum::Json(json!({"object": "list", "data": [
        {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "system"},
    ]}))
    .into_response()
}
