//! keymint's egress proxy: an agent sends its short-lived `kmt_` token where
//! a provider key would go; the proxy checks it, applies the role's rules and
//! budgets, puts the real key (sealed in the store) on the request and
//! forwards it to the one upstream the role names.
//!
//! Shape of a request (`/proxy/<upstream>/<path>`, any method):
//!
//! 1. path: the upstream must be configured; the path may not leave its base;
//! 2. [`auth`]: the token (`Authorization: Bearer` or `x-api-key`) must be a
//!    live lease whose role names this upstream;
//! 3. [`provider`]: the endpoint and model must be allowed by the role;
//! 4. [`detect`]: secrets in the body are blocked or redacted;
//! 5. [`budget`]: the request's maximum use is reserved against the task's
//!    budgets and rate limits;
//! 6. the request is forwarded with the upstream key; the response passes
//!    back (streams chunk by chunk, [`sse`]) and the reservation is settled
//!    against the usage it reports.
//!
//! Refusals answer in the provider's error shape and are audited one by
//! one; use is audited per lease and interval. Nothing here writes to the
//! store on the hot path.

pub mod budget;
pub mod config;
pub mod detect;
pub mod gate;
pub mod metrics;
pub mod provider;
pub mod sse;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keymint_core::audit::{AuditDraft, Outcome};
use keymint_core::keyring::Keyring;
use keymint_core::{Clock, Timestamp};
use keymint_store::Store;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::budget::{Ask, Ledger, Refusal, Reservation, Usage};
use crate::config::{
    KeyPlacement, Policy, Prices, ProxySettings, RolePolicy, SecretAction, Upstream, UpstreamKind,
};
use crate::detect::Detector;
use crate::gate::{Caller, Gate, GateError};
use crate::metrics::ProxyMetrics;
use crate::provider::{Failure, ProxyError};

/// Where the proxy is mounted.
pub const PREFIX: &str = "/proxy/";
/// Largest upstream response body read whole (non-streamed responses).
const MAX_RESPONSE: usize = 64 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// The sealed-secret name of an upstream's key.
pub fn key_secret_name(upstream: &str) -> String {
    format!("upstream/{upstream}/key")
}

/// What the proxy is built from.
#[derive(Debug)]
pub struct ProxyParts {
    pub store: Arc<dyn Store>,
    pub keyring: Arc<Keyring>,
    pub clock: Arc<dyn Clock>,
    /// Who may call: the broker's authentication and bounded audit.
    pub gate: Arc<dyn Gate>,
    pub upstreams: Vec<Upstream>,
    pub roles: Vec<(String, RolePolicy)>,
    pub prices: Prices,
    pub settings: ProxySettings,
    /// Tasks never live longer than this; idle ledgers older are dropped.
    pub max_task_ttl_secs: u64,
}

/// An upstream as shown by the API: never its key.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct UpstreamInfo {
    pub name: String,
    pub kind: UpstreamKind,
    pub base_url: String,
    pub key_set: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no upstream named `{0}`")]
    UnknownUpstream(String),
    #[error("{0}")]
    Invalid(&'static str),
    #[error("the key could not be stored")]
    Store,
}

#[derive(Debug, Default, Clone)]
struct Aggregate {
    task: String,
    workload: String,
    role: String,
    fingerprint: String,
    upstream: String,
    usage: Usage,
    errors: u64,
    since: Timestamp,
}

type Https = HttpsConnector<HttpConnector>;

pub struct Proxy {
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    clock: Arc<dyn Clock>,
    gate: Arc<dyn Gate>,
    upstreams: HashMap<String, Upstream>,
    roles: HashMap<String, RolePolicy>,
    prices: Prices,
    settings: ProxySettings,
    ledger: Ledger,
    detector: Detector,
    keys: RwLock<HashMap<String, Arc<Zeroizing<String>>>>,
    usage: Mutex<HashMap<String, Aggregate>>,
    max_task_ttl_secs: u64,
    pub metrics: ProxyMetrics,
    client: HyperClient<Https, Full<Bytes>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("upstreams", &self.upstreams.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Settles a reservation once: at the end of the response, or (with no
/// usage known, so at the full reservation) when dropped.
pub(crate) struct Settlement {
    proxy: Arc<Proxy>,
    caller: Arc<Caller>,
    upstream: String,
    res: Option<Reservation>,
}

impl Settlement {
    pub(crate) fn finish(&mut self, actual: Option<(u64, u64)>) {
        if let Some(res) = self.res.take() {
            self.proxy
                .settle(&self.caller, &self.upstream, &res, actual);
        }
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        self.finish(None);
    }
}

impl Proxy {
    pub fn new(p: ProxyParts) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(https);
        let metrics = ProxyMetrics::new(p.upstreams.iter().map(|u| u.name.as_str()));
        Self {
            gate: p.gate,
            store: p.store,
            keyring: p.keyring,
            clock: p.clock,
            upstreams: p
                .upstreams
                .into_iter()
                .map(|u| (u.name.clone(), u))
                .collect(),
            roles: p.roles.into_iter().collect(),
            prices: p.prices,
            settings: p.settings,
            ledger: Ledger::default(),
            detector: Detector::new(),
            keys: RwLock::new(HashMap::new()),
            usage: Mutex::new(HashMap::new()),
            max_task_ttl_secs: p.max_task_ttl_secs,
            metrics,
            client,
        }
    }

    /// The proxy's routes: `/proxy/{upstream}/{*path}`, any method.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/proxy/{upstream}/{*path}", axum::routing::any(handle))
            .route("/proxy/{upstream}", axum::routing::any(handle))
            .with_state(Arc::clone(self))
    }

    pub fn has_upstreams(&self) -> bool {
        !self.upstreams.is_empty()
    }

    // ------------------------------------------------------------ keys

    /// Seals and stores an upstream's key. The key is never returned.
    pub async fn set_key(
        &self,
        upstream: &str,
        key: Zeroizing<String>,
        actor: &str,
    ) -> Result<(), KeyError> {
        if !self.upstreams.contains_key(upstream) {
            return Err(KeyError::UnknownUpstream(upstream.to_owned()));
        }
        let key = Zeroizing::new(key.trim().to_owned());
        if key.is_empty() {
            return Err(KeyError::Invalid("the key is empty"));
        }
        if key.len() > 8192 {
            return Err(KeyError::Invalid("the key is longer than 8192 bytes"));
        }
        // INVARIANT: the key goes into a header or a query; a control
        // character would let it forge another header.
        if !key.bytes().all(|b| (0x21..0x7f).contains(&b)) {
            return Err(KeyError::Invalid(
                "the key must be printable ASCII without spaces",
            ));
        }
        let name = key_secret_name(upstream);
        let sealed = self
            .keyring
            .seal(&name, key.as_bytes())
            .map_err(|_| KeyError::Store)?;
        let now = self.clock.now();
        self.store
            .put_secret(&name, sealed, now)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "proxy: cannot store an upstream key");
                KeyError::Store
            })?;
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(upstream.to_owned(), Arc::new(key.clone()));
        let ev = AuditDraft::new(now, "upstream.key_set", actor)
            .fingerprint(self.keyring.fingerprint(key.as_bytes()))
            .data("upstream", upstream);
        if let Err(e) = self.store.append_audit(ev).await {
            tracing::error!(error = %e, "proxy: cannot audit an upstream key change");
        }
        Ok(())
    }

    async fn key(&self, upstream: &str) -> Option<Arc<Zeroizing<String>>> {
        if let Some(k) = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(upstream)
        {
            return Some(Arc::clone(k));
        }
        let name = key_secret_name(upstream);
        let sealed = match self.store.get_secret(&name).await {
            Ok(s) => s?,
            Err(e) => {
                tracing::error!(error = %e, "proxy: cannot read an upstream key");
                return None;
            }
        };
        let opened = match self.keyring.open(&name, &sealed) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(upstream, error = %e, "proxy: cannot open an upstream key");
                return None;
            }
        };
        let key = Arc::new(Zeroizing::new(String::from_utf8(opened.to_vec()).ok()?));
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(upstream.to_owned(), Arc::clone(&key));
        Some(key)
    }

    /// Every upstream, and whether its key is set.
    pub async fn upstreams(&self) -> Vec<UpstreamInfo> {
        let mut v = Vec::with_capacity(self.upstreams.len());
        for u in self.upstreams.values() {
            let key_set = matches!(
                self.store.get_secret(&key_secret_name(&u.name)).await,
                Ok(Some(_))
            );
            v.push(UpstreamInfo {
                name: u.name.clone(),
                kind: u.kind,
                base_url: u.base_url(),
                key_set,
            });
        }
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    // ------------------------------------------------------------ usage

    fn settle(
        &self,
        caller: &Caller,
        upstream: &str,
        res: &Reservation,
        actual: Option<(u64, u64)>,
    ) {
        let now = self.clock.now();
        let charged = self.ledger.settle(res, actual, now);
        if let Some(c) = self.metrics.upstream(upstream) {
            c.input_tokens.fetch_add(charged.input, Ordering::Relaxed);
            c.output_tokens.fetch_add(charged.output, Ordering::Relaxed);
            c.spend_nusd
                .fetch_add(charged.spend_nusd, Ordering::Relaxed);
        }
        let mut agg = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let a = agg
            .entry(caller.lease.clone())
            .or_insert_with(|| Aggregate {
                task: caller.task.clone(),
                workload: caller.workload.clone(),
                role: caller.role.clone(),
                fingerprint: caller.fingerprint.clone(),
                upstream: upstream.to_owned(),
                since: now,
                ..Aggregate::default()
            });
        a.usage.requests += charged.requests;
        a.usage.input += charged.input;
        a.usage.output += charged.output;
        a.usage.spend_nusd += charged.spend_nusd;
        if actual.is_none() {
            a.errors += 1;
        }
    }

    /// What a task has used through the proxy (settled).
    pub fn task_usage(&self, task: &str) -> Usage {
        self.ledger.used(task)
    }

    /// Writes the use since the last flush to the audit trail, one
    /// `proxy.usage` event per lease.
    pub async fn flush(&self) {
        let now = self.clock.now();
        let batch: Vec<(String, Aggregate)> = {
            let mut agg = self.usage.lock().unwrap_or_else(|p| p.into_inner());
            agg.drain().collect()
        };
        for (lease, a) in batch {
            let ev = AuditDraft::new(now, "proxy.usage", format!("workload:{}", a.workload))
                .task(&a.task)
                .lease(&lease)
                .workload(&a.workload)
                .role(&a.role)
                .fingerprint(&a.fingerprint)
                .data("upstream", a.upstream.as_str())
                .data("requests", a.usage.requests)
                .data("input_tokens", a.usage.input)
                .data("output_tokens", a.usage.output)
                .data("spend_usd", a.usage.spend_nusd as f64 / 1e9)
                .data("unmetered", a.errors)
                .data("since", a.since.rfc3339());
            if let Err(e) = self.store.append_audit(ev).await {
                tracing::error!(error = %e, "proxy: cannot record usage in the audit trail");
            }
        }
        self.ledger
            .forget_idle(now.plus_millis(-(self.max_task_ttl_secs as i64).saturating_mul(1000)));
    }

    /// Flushes usage to the audit trail every `audit_interval` until dropped.
    pub async fn run_flush(self: Arc<Self>) {
        let every = Duration::from_secs(self.settings.audit_interval_secs);
        loop {
            tokio::time::sleep(every).await;
            self.flush().await;
        }
    }

    async fn deny(
        &self,
        caller: Option<&Caller>,
        upstream: &str,
        reason: &'static str,
        message: &str,
        extra: &[(&str, serde_json::Value)],
    ) {
        self.metrics.denied(reason);
        let actor = caller.map_or_else(
            || "anonymous".to_owned(),
            |c| format!("workload:{}", c.workload),
        );
        let mut ev = AuditDraft::new(self.clock.now(), "proxy.denied", actor)
            .outcome(Outcome::Denied)
            .reason(message)
            .data("upstream", upstream)
            .data("check", reason);
        if let Some(c) = caller {
            ev = ev
                .task(&c.task)
                .lease(&c.lease)
                .workload(&c.workload)
                .role(&c.role)
                .fingerprint(&c.fingerprint);
        }
        for (k, v) in extra {
            ev = ev.data(k, v.clone());
        }
        self.gate.record_denial(ev, reason).await;
    }

    /// Renders the proxy's metrics (Prometheus text) after `out`.
    pub fn render_metrics(&self, out: &mut String) {
        self.metrics.render(out);
    }
}

// ---------------------------------------------------------------- request

/// The token an SDK sent: `Authorization: Bearer` (OpenAI), `x-api-key`
/// (Anthropic) or `api-key` (Azure).
pub fn presented_token(h: &HeaderMap) -> Option<&str> {
    if let Some(v) = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .map(str::trim);
    }
    ["x-api-key", "api-key"]
        .iter()
        .find_map(|n| h.get(*n).and_then(|v| v.to_str().ok()))
        .map(str::trim)
}

/// Checks the path after the upstream name: no empty, `.` or `..` segment,
/// no encoded separator or dot, no backslash. The path is appended to the
/// upstream's base as it is, so nothing may climb out of it.
fn safe_path(rel: &str) -> bool {
    if rel.is_empty() {
        return true;
    }
    let lower = rel.to_ascii_lowercase();
    if lower.contains("%2e") || lower.contains("%2f") || lower.contains("%5c") || rel.contains('\\')
    {
        return false;
    }
    rel.split('/')
        .all(|s| !s.is_empty() && s != "." && s != "..")
}

/// A model name fit to repeat in a message: short, plain, and not a secret.
fn shown_model(proxy: &Proxy, m: &str) -> String {
    let plain = m.len() <= 100
        && m.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/@-".contains(&b));
    if plain && proxy.detector.find(m.as_bytes()).is_empty() {
        format!("`{m}`")
    } else {
        "(not shown)".to_owned()
    }
}

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Request headers to send on: everything but hop-by-hop headers, the
/// client's credentials and cookies, `host` and `content-length` (set anew).
fn forward_headers(src: &HeaderMap, key_header: Option<&HeaderName>) -> HeaderMap {
    let named_by_connection: Vec<String> = src
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(src.len());
    for (k, v) in src {
        let n = k.as_str();
        if HOP_BY_HOP.contains(&n)
            || matches!(
                n,
                "host"
                    | "content-length"
                    | "authorization"
                    | "x-api-key"
                    | "api-key"
                    | "cookie"
                    | "accept-encoding"
                    | "forwarded"
                    | "x-forwarded-for"
                    // The caller's proof of identity is for keymint only.
                    | "x-keymint-identity"
            )
            || key_header.is_some_and(|h| h == k)
            || named_by_connection.iter().any(|c| c == n)
        {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    // Usage is read from the body, so ask for it uncompressed.
    out.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    out
}

fn response_headers(src: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(src.len());
    for (k, v) in src {
        if HOP_BY_HOP.contains(&k.as_str()) || k == header::CONTENT_LENGTH {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    out
}

fn encode_query(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// The query sent upstream: the client's, without any parameter named like
/// the key parameter, plus the key.
fn upstream_query(client: Option<&str>, key: Option<(&str, &str)>) -> String {
    let mut parts: Vec<String> = client
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| key.is_none_or(|(name, _)| p.split('=').next().unwrap_or("") != name))
        .map(str::to_owned)
        .collect();
    if let Some((name, k)) = key {
        parts.push(format!("{name}={}", encode_query(k)));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

async fn handle(State(proxy): State<Arc<Proxy>>, req: Request) -> Response {
    match proxy_request(&proxy, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn proxy_request(proxy: &Arc<Proxy>, req: Request) -> Result<Response, ProxyError> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let after = path.strip_prefix(PREFIX).unwrap_or("");
    let (name, rel) = after.split_once('/').unwrap_or((after, ""));
    let Some(up) = proxy.upstreams.get(name) else {
        return Err(ProxyError::new(Failure::NotFound, "no such upstream"));
    };
    let kind = up.kind;
    let err = |f: Failure, m: String| ProxyError::new(f, m).shaped(kind);

    if !safe_path(rel) {
        proxy
            .deny(None, name, "path", "path leaves the upstream base", &[])
            .await;
        return Err(err(Failure::BadRequest, "the path is not allowed".into()));
    }

    // 1. Who is calling.
    let token = presented_token(&parts.headers);
    let caller = match proxy.gate.authenticate(token, name).await {
        Ok(c) => c,
        Err(GateError::Refused(m)) => {
            proxy.metrics.denied("auth");
            let m = if token.is_none() {
                "missing keymint token (send it as `Authorization: Bearer` or `x-api-key`)".into()
            } else {
                m
            };
            return Err(err(Failure::Unauthenticated, m));
        }
        Err(GateError::Unavailable) => {
            return Err(err(
                Failure::Internal,
                "the token could not be checked".into(),
            ));
        }
    };

    // 2. May this role reach this upstream and endpoint?
    let Some(rp) = proxy.roles.get(&caller.role) else {
        let m = format!("role `{}` does not use the proxy", caller.role);
        proxy.deny(Some(&caller), name, "upstream", &m, &[]).await;
        return Err(err(Failure::Forbidden, m));
    };
    if rp.upstream != name {
        let m = format!("role `{}` may not reach upstream `{name}`", caller.role);
        proxy.deny(Some(&caller), name, "upstream", &m, &[]).await;
        return Err(err(Failure::Forbidden, m));
    }
    let policy: &Policy = &rp.policy;
    let method = parts.method.clone();
    let endpoint = match kind {
        UpstreamKind::Http => {
            if !policy.allows_http(method.as_str(), &format!("/{rel}")) {
                let m = format!("role `{}` may not call this endpoint", caller.role);
                proxy
                    .deny(
                        Some(&caller),
                        name,
                        "endpoint",
                        &m,
                        &[("method", method.as_str().into())],
                    )
                    .await;
                return Err(err(Failure::Forbidden, m));
            }
            None
        }
        _ => match provider::classify(kind, &method, rel) {
            Some(ep) if policy.allows_endpoint(ep.name()) => Some(ep),
            found => {
                let what = found.map_or("this endpoint".to_owned(), |e| format!("`{}`", e.name()));
                let m = format!("role `{}` may not call {what}", caller.role);
                proxy
                    .deny(
                        Some(&caller),
                        name,
                        "endpoint",
                        &m,
                        &[("method", method.as_str().into())],
                    )
                    .await;
                return Err(err(Failure::Forbidden, m));
            }
        },
    };

    // 3. The body, bounded in size and time.
    let max = proxy.settings.max_body_bytes;
    let too_large = || {
        err(
            Failure::TooLarge,
            format!("the request body exceeds {max} bytes"),
        )
    };
    if parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > max)
    {
        proxy
            .deny(Some(&caller), name, "size", "request body too large", &[])
            .await;
        return Err(too_large());
    }
    let body =
        match tokio::time::timeout(CLIENT_BODY_TIMEOUT, Limited::new(body, max).collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) => {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    proxy
                        .deny(Some(&caller), name, "size", "request body too large", &[])
                        .await;
                    return Err(too_large());
                }
                return Err(err(
                    Failure::BadRequest,
                    "the request body could not be read".into(),
                ));
            }
            Err(_) => {
                return Err(err(
                    Failure::BadRequest,
                    "the request body was not sent in time".into(),
                ));
            }
        };

    // 4. Secrets in the body.
    let findings = proxy.detector.find(&body);
    let mut redacted = false;
    let body: Bytes = if findings.is_empty() {
        body
    } else {
        let kinds = detect::kinds(&findings);
        let list = kinds.join(", ");
        match policy.secrets {
            SecretAction::Block => {
                let m = format!(
                    "the request carries a secret ({list}); keymint blocked it before it left"
                );
                proxy
                    .deny(
                        Some(&caller),
                        name,
                        "secret",
                        &m,
                        &[("kinds", kinds.clone().into())],
                    )
                    .await;
                return Err(err(Failure::BadRequest, m));
            }
            SecretAction::Redact => {
                redacted = true;
                Bytes::from(Detector::redact(&body, &findings).into_owned())
            }
        }
    };

    // 5. Model, budgets, rate limits.
    let mut json: Option<serde_json::Value> = None;
    let mut asked = provider::Asked::default();
    if let Some(ep) = endpoint.filter(|e| e.has_model()) {
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|_| {
            err(
                Failure::BadRequest,
                "the request body is not valid JSON".into(),
            )
        })?;
        asked = provider::inspect(ep, &v);
        let Some(model) = asked.model.clone() else {
            return Err(err(
                Failure::BadRequest,
                "the request names no `model`".into(),
            ));
        };
        if !policy.allows_model(&model) {
            let m = format!(
                "role `{}` may not use model {}",
                caller.role,
                shown_model(proxy, &model)
            );
            proxy.deny(Some(&caller), name, "model", &m, &[]).await;
            return Err(err(Failure::Forbidden, m));
        }
        json = Some(v);
    }
    let price = asked.model.as_deref().and_then(|m| proxy.prices.get(m));
    let metered = endpoint.is_some_and(|e| e.metered());
    let ask = Ask {
        input: body.len() as u64,
        output: if metered {
            asked.max_output.unwrap_or(policy.default_max_tokens())
        } else {
            0
        },
        price,
        metered,
    };
    let now = proxy.clock.now();
    let res = match proxy.ledger.reserve(&caller.task, policy, ask, now) {
        Ok(r) => r,
        Err(refusal) => {
            let (reason, e) = match refusal {
                Refusal::Budget(what) => (
                    "budget",
                    err(
                        Failure::BudgetExhausted,
                        format!("the task's budget of {what} is used up"),
                    ),
                ),
                Refusal::Rate(what, secs) => (
                    "rate",
                    err(
                        Failure::RateLimited,
                        format!("the task's rate limit of {what} is reached; retry in {secs}s"),
                    )
                    .retry_after(secs),
                ),
                Refusal::UnknownCost => (
                    "price",
                    err(
                        Failure::Forbidden,
                        format!(
                            "model {} has no price, and the role has a spend budget",
                            asked
                                .model
                                .as_deref()
                                .map_or("(none)".to_owned(), |m| shown_model(proxy, m))
                        ),
                    ),
                ),
            };
            proxy
                .deny(Some(&caller), name, reason, &e.message, &[])
                .await;
            return Err(e);
        }
    };
    let mut settlement = Settlement {
        proxy: Arc::clone(proxy),
        caller: caller.clone(),
        upstream: name.to_owned(),
        res: Some(res.clone()),
    };

    // 6. The request as it goes upstream.
    let mut strip_usage = false;
    let body = match (json, endpoint) {
        (Some(mut v), Some(ep)) => {
            let mut changed = false;
            if metered {
                let must_cap = asked.max_output.map_or(
                    policy.max_output_tokens.is_some() || policy.max_spend_usd.is_some(),
                    |m| m > res.output,
                );
                if must_cap {
                    changed |= provider::cap_output(ep, &mut v, res.output);
                }
            }
            if asked.usage_not_requested {
                provider::request_stream_usage(&mut v);
                strip_usage = true;
                changed = true;
            }
            if changed {
                Bytes::from(serde_json::to_vec(&v).map_err(|_| {
                    err(
                        Failure::Internal,
                        "the request could not be re-encoded".into(),
                    )
                })?)
            } else {
                body
            }
        }
        _ => body,
    };

    let Some(key) = proxy.key(name).await else {
        settlement.finish(Some((0, 0)));
        return Err(err(
            Failure::UpstreamUnavailable,
            format!(
                "no key is set for upstream `{name}`; an operator sets it with `keymint upstream set`"
            ),
        ));
    };
    let key_header = match &up.key {
        KeyPlacement::Header { name, .. } => Some(name),
        KeyPlacement::Query { .. } => None,
    };
    let mut headers = forward_headers(&parts.headers, key_header);
    let query = match &up.key {
        KeyPlacement::Header { name: h, prefix } => {
            let v = HeaderValue::from_str(&format!("{prefix}{}", key.as_str())).map_err(|_| {
                err(
                    Failure::Internal,
                    "the upstream key is not a valid header".into(),
                )
            })?;
            let mut v = v;
            v.set_sensitive(true);
            headers.insert(h.clone(), v);
            upstream_query(parts.uri.query(), None)
        }
        KeyPlacement::Query { name: q } => {
            upstream_query(parts.uri.query(), Some((q, key.as_str())))
        }
    };
    let uri = format!(
        "{}://{}{}/{}{}",
        up.scheme, up.authority, up.base_path, rel, query
    );
    let mut out = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::new(body))
        .map_err(|_| {
            err(
                Failure::BadRequest,
                "the request could not be forwarded".into(),
            )
        })?;
    *out.headers_mut() = headers;
    if let Some(h) = out.headers_mut().get_mut(header::CONTENT_TYPE) {
        h.set_sensitive(false);
    }

    let counters = proxy.metrics.upstream(name);
    if redacted && let Some(c) = counters {
        c.redactions.fetch_add(1, Ordering::Relaxed);
    }
    let timeout = Duration::from_secs(up.timeout_secs);
    let upstream_res = match tokio::time::timeout(timeout, proxy.client.request(out)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            if let Some(c) = counters {
                c.upstream_errors.fetch_add(1, Ordering::Relaxed);
            }
            // A request that never connected cost nothing; one that did may
            // have been billed, so it keeps its reservation.
            let connect = e.is_connect();
            settlement.finish(if connect { Some((0, 0)) } else { None });
            tracing::warn!(upstream = name, connect, "proxy: upstream request failed");
            return Err(err(
                Failure::UpstreamUnavailable,
                format!("upstream `{name}` could not be reached"),
            ));
        }
        Err(_) => {
            if let Some(c) = counters {
                c.upstream_errors.fetch_add(1, Ordering::Relaxed);
            }
            settlement.finish(None);
            return Err(err(
                Failure::UpstreamTimeout,
                format!("upstream `{name}` did not answer in {}s", up.timeout_secs),
            ));
        }
    };
    if let Some(c) = counters {
        c.forwarded.fetch_add(1, Ordering::Relaxed);
    }
    let (rparts, rbody) = upstream_res.into_parts();
    let status = rparts.status;
    let headers = response_headers(&rparts.headers);
    let is_stream = rparts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));

    if is_stream && let Some(ep) = endpoint {
        if let Some(c) = counters {
            c.streams.fetch_add(1, Ordering::Relaxed);
        }
        let stream = sse::MeteredStream::new(rbody, ep, strip_usage, settlement, timeout);
        let mut r = Response::new(Body::new(stream));
        *r.status_mut() = status;
        *r.headers_mut() = headers;
        return Ok(r);
    }

    let bytes =
        match tokio::time::timeout(timeout, Limited::new(rbody, MAX_RESPONSE).collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            _ => {
                if let Some(c) = counters {
                    c.upstream_errors.fetch_add(1, Ordering::Relaxed);
                }
                settlement.finish(None);
                return Err(err(
                    Failure::UpstreamUnavailable,
                    format!("upstream `{name}` sent an unreadable response"),
                ));
            }
        };
    let usage = match endpoint {
        Some(ep) if ep.metered() => serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| provider::usage_of(ep, &v)),
        // Listings and http upstreams are counted by request only.
        _ => Some((0, 0)),
    };
    // Providers do not bill refused requests; a success without usage
    // keeps its whole reservation.
    let usage = if status.is_success() {
        usage
    } else {
        usage.or(Some((0, 0)))
    };
    settlement.finish(usage);
    let mut r = Response::new(Body::from(bytes));
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cannot_leave_the_base() {
        for ok in [
            "chat/completions",
            "v1/messages",
            "models/gpt-4o",
            "",
            "a.b/c..d",
        ] {
            assert!(safe_path(ok), "{ok}");
        }
        for bad in [
            "../admin",
            "v1/../../x",
            "v1/%2e%2e/x",
            "v1/%2E%2e/x",
            "a%2fb",
            "a\\b",
            "a//b",
            "./a",
            "a/",
        ] {
            assert!(!safe_path(bad), "{bad}");
        }
    }

    #[test]
    fn credentials_and_hop_by_hop_headers_stay_behind() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer kmt_x"),
            ("x-api-key", "kmt_x"),
            ("cookie", "a=b"),
            ("connection", "close, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("anthropic-version", "2023-06-01"),
            ("content-type", "application/json"),
            ("host", "127.0.0.1"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = forward_headers(&h, None);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(out.contains_key("anthropic-version"));
        assert_eq!(out["accept-encoding"], "identity");
    }

    #[test]
    fn the_key_query_parameter_cannot_be_set_by_the_client() {
        assert_eq!(
            upstream_query(Some("q=1&api_key=evil&x"), Some(("api_key", "k y"))),
            "?q=1&x&api_key=k%20y"
        );
        assert_eq!(upstream_query(None, None), "");
        assert_eq!(
            upstream_query(Some("api-version=2024"), None),
            "?api-version=2024"
        );
    }
}
