//! The MCP route (docs/design/0031-mcp-route.md): keymint as the protected
//! resource in front of MCP servers (streamable HTTP transport).
//!
//! - `GET /.well-known/oauth-protected-resource/mcp/{name}`: RFC 9728
//!   metadata naming keymint as the authorization server;
//! - `POST|GET|DELETE /mcp/{name}`: the access token is checked (keymint's
//!   signature, `aud` = the resource, `exp`, the lease still active, the
//!   DPoP proof of a bound token), an `Mcp-Session-Id` must be one keymint
//!   bound to the token's task, each JSON-RPC `tools/call`,
//!   `resources/read` and `prompts/get` is decided by Cedar and audited,
//!   and the request goes to the MCP server without the agent's token
//!   (only an allowlist of headers crosses; keymint adds its own
//!   credential: a sealed bearer token or a token it mints per request).
//!
//! A refusal of the token is `401` with `WWW-Authenticate` naming the
//! metadata (RFC 9728 §5.1, RFC 6750 §3, RFC 9449 §7.1); a token without
//! the server's required scopes is `403 insufficient_scope`; a call policy
//! forbids is a JSON-RPC error, and nothing of that request reaches the
//! MCP server.

pub mod config;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use http_body_util::Full;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keymint_policy::McpFacts;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::broker::Broker;
use crate::broker::mcp::{ResourceToken, ResourceTokenError};
use crate::oauth::dpop;
pub use config::{CredentialKind, DpopMode, McpServer};

/// The JSON-RPC error code of a call policy refused (an implementation
/// defined server error, JSON-RPC 2.0 §5.1).
pub const FORBIDDEN_CODE: i64 = -32001;
/// The JSON-RPC error code of a call held for a human's approval.
pub const APPROVAL_CODE: i64 = -32003;
/// The JSON-RPC error code of a session id not bound to the caller's task.
pub const SESSION_CODE: i64 = -32002;
/// The JSON-RPC error code of a path that names no configured MCP server
/// (HTTP 404).
pub const UNKNOWN_SERVER_CODE: i64 = -32004;
/// The JSON-RPC error code of the 2026-07-28 transport for `Mcp-Method` or
/// `Mcp-Name` headers that disagree with the body (HTTP 400).
pub const HEADER_MISMATCH_CODE: i64 = -32001;
/// JSON-RPC's own code for a request that is not a valid one (an HTTP
/// method the transport does not have, 405).
pub const INVALID_REQUEST_CODE: i64 = -32600;
/// Longest session id keymint accepts from an MCP server.
const MAX_SESSION_ID: usize = 512;
const SESSION_HEADER: &str = "mcp-session-id";
/// How long a connection to an MCP server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The DPoP algorithms a proof may use (as at the token endpoint).
const DPOP_ALGS: &str = "ES256 EdDSA RS256";

type Upstream = HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Clone)]
struct McpState {
    broker: Arc<Broker>,
    servers: Arc<HashMap<String, Arc<McpServer>>>,
    client: Upstream,
}

/// The sealed secret holding a server's static bearer credential.
pub fn credential_secret_name(server: &str) -> String {
    format!("mcp/{server}/bearer")
}

/// The MCP routes, for `start()` to merge beside the API; none when no
/// server is configured.
pub fn router(broker: Arc<Broker>, servers: &[McpServer]) -> Router {
    if servers.is_empty() {
        return Router::new();
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let client = HyperClient::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https);
    let state = McpState {
        broker,
        servers: Arc::new(
            servers
                .iter()
                .map(|s| (s.name.clone(), Arc::new(s.clone())))
                .collect(),
        ),
        client,
    };
    Router::new()
        .route(
            "/.well-known/oauth-protected-resource/mcp/{name}",
            get(metadata),
        )
        .route("/mcp/{name}", any(handle))
        // The metadata's other methods: the API's problem document.
        .method_not_allowed_fallback(crate::api::method_not_allowed)
        .with_state(state)
}

/// RFC 9728 §2 protected resource metadata. A name that is not configured
/// (or not UTF-8) is answered as every unknown path of the API is.
async fn metadata(
    State(s): State<McpState>,
    name: Result<Path<String>, PathRejection>,
) -> Response {
    let Some(srv) = name.ok().and_then(|Path(n)| s.servers.get(&n).cloned()) else {
        return crate::api::not_found().await.into_response();
    };
    let Some(issuer) = s.broker.oidc() else {
        return crate::api::not_found().await.into_response();
    };
    let mut doc = json!({
        "resource": srv.resource,
        "authorization_servers": [issuer.url()],
        "scopes_supported": srv.scopes_supported,
        "bearer_methods_supported": ["header"],
        "resource_name": format!("MCP server {}", srv.name),
        "dpop_signing_alg_values_supported": ["ES256", "EdDSA", "RS256"],
    });
    if srv.dpop == DpopMode::Required {
        doc["dpop_bound_access_tokens_required"] = Value::Bool(true);
    }
    let mut r = axum::Json(doc).into_response();
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    r
}

/// Why a request was refused before it reached the MCP server.
enum Refusal {
    /// No token: a challenge without an error code (RFC 6750 §3.1).
    NoToken,
    /// `invalid_token` / `invalid_request`, for the scheme that failed.
    Token {
        dpop: bool,
        code: &'static str,
        description: &'static str,
    },
    /// The DPoP proof lacks the current nonce.
    UseNonce,
    /// A valid token without the server's required scopes.
    InsufficientScope,
    /// The token could not be checked (the store).
    Unavailable,
}

impl Refusal {
    fn invalid(description: &'static str) -> Self {
        Self::Token {
            dpop: false,
            code: "invalid_token",
            description,
        }
    }

    fn proof(description: &'static str) -> Self {
        Self::Token {
            dpop: true,
            code: "invalid_dpop_proof",
            description,
        }
    }

    fn response(self, s: &McpState, srv: &McpServer) -> Response {
        let meta = srv.metadata_url();
        let scope = srv.required_scopes.join(" ");
        let mut challenges: Vec<String> = Vec::new();
        let bearer = srv.dpop == DpopMode::Optional;
        let status = match &self {
            Self::NoToken => {
                let scope = if scope.is_empty() {
                    String::new()
                } else {
                    format!(", scope=\"{scope}\"")
                };
                if bearer {
                    challenges.push(format!("Bearer resource_metadata=\"{meta}\"{scope}"));
                }
                challenges.push(format!(
                    "DPoP algs=\"{DPOP_ALGS}\", resource_metadata=\"{meta}\"{scope}"
                ));
                StatusCode::UNAUTHORIZED
            }
            Self::Token {
                dpop,
                code,
                description,
            } => {
                let params = format!(
                    "error=\"{code}\", error_description=\"{description}\", resource_metadata=\"{meta}\""
                );
                if bearer && !dpop {
                    challenges.push(format!("Bearer {params}"));
                }
                challenges.push(format!("DPoP algs=\"{DPOP_ALGS}\", {params}"));
                StatusCode::UNAUTHORIZED
            }
            Self::UseNonce => {
                challenges.push(format!(
                    "DPoP error=\"use_dpop_nonce\", error_description=\"the DPoP proof must carry the server's nonce\", algs=\"{DPOP_ALGS}\", resource_metadata=\"{meta}\""
                ));
                StatusCode::UNAUTHORIZED
            }
            Self::InsufficientScope => {
                let scheme = if bearer { "Bearer" } else { "DPoP" };
                challenges.push(format!(
                    "{scheme} error=\"insufficient_scope\", error_description=\"the token lacks a scope this server requires\", scope=\"{scope}\", resource_metadata=\"{meta}\""
                ));
                StatusCode::FORBIDDEN
            }
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        };
        let mut r = status.into_response();
        let h = r.headers_mut();
        for c in challenges {
            if let Ok(v) = HeaderValue::from_str(&c) {
                h.append(header::WWW_AUTHENTICATE, v);
            }
        }
        if matches!(self, Self::Unavailable) {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        add_nonce(h, s);
        r
    }
}

fn add_nonce(h: &mut HeaderMap, s: &McpState) {
    let nonce = dpop::Dpop::nonce(s.broker.keyring(), s.broker.now());
    if let Ok(v) = HeaderValue::from_str(&nonce) {
        h.insert("dpop-nonce", v);
    }
}

/// The token of the request and its scheme (`DPoP` or `Bearer`).
fn presented(headers: &HeaderMap) -> Result<Option<(bool, &str)>, Refusal> {
    let v =
        keymint_proxy::header_once(headers, header::AUTHORIZATION).map_err(|_| Refusal::Token {
            dpop: false,
            code: "invalid_request",
            description: "send one Authorization header",
        })?;
    let Some(v) = v else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| Refusal::invalid("the Authorization header is not a token"))?;
    let (scheme, token) = v
        .split_once(' ')
        .ok_or(Refusal::invalid("the Authorization header is not a token"))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(Refusal::invalid("the Authorization header is not a token"));
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        Ok(Some((false, token)))
    } else if scheme.eq_ignore_ascii_case("dpop") {
        Ok(Some((true, token)))
    } else {
        Err(Refusal::Token {
            dpop: false,
            code: "invalid_request",
            description: "the Authorization scheme must be Bearer or DPoP",
        })
    }
}

/// The token checks, in order: presence, keymint's signature, audience,
/// lease; then DPoP (a bound token needs its scheme, a proof by its key
/// with the token's hash, the method and URL, the nonce, used once);
/// then the server's required scopes.
async fn authenticate(
    s: &McpState,
    srv: &McpServer,
    method: &Method,
    headers: &HeaderMap,
) -> Result<ResourceToken, Refusal> {
    let (dpop_scheme, token) = presented(headers)?.ok_or(Refusal::NoToken)?;
    let t = s
        .broker
        .resource_token(token, &srv.resource)
        .await
        .map_err(|e| match e {
            ResourceTokenError::Invalid(why) => {
                tracing::info!(server = %srv.name, reason = why, "mcp: token refused");
                Refusal::invalid("the access token is not valid for this resource")
            }
            ResourceTokenError::Unavailable => Refusal::Unavailable,
        })?;
    match (&t.jkt, dpop_scheme) {
        (Some(jkt), true) => {
            let proofs: Vec<&HeaderValue> = headers.get_all("dpop").iter().collect();
            let [one] = proofs.as_slice() else {
                return Err(Refusal::proof("send one DPoP proof"));
            };
            let proof = one
                .to_str()
                .map_err(|_| Refusal::proof("the DPoP proof is not a JWS"))?;
            let now = s.broker.now();
            let proven = dpop::Dpop
                .check(
                    s.broker.keyring(),
                    proof,
                    method.as_str(),
                    &srv.resource,
                    Some(token),
                    true,
                    now,
                )
                .map_err(|e| match e {
                    dpop::DpopError::UseNonce => Refusal::UseNonce,
                    dpop::DpopError::Invalid(m) => Refusal::proof(m),
                })?;
            if !bool::from(subtle::ConstantTimeEq::ct_eq(
                proven.jkt.as_bytes(),
                jkt.as_bytes(),
            )) {
                return Err(Refusal::proof(
                    "the DPoP proof is not by the key the token is bound to",
                ));
            }
            let fresh = s
                .broker
                .store()
                .claim_once(&proven.replay_key, proven.until, now)
                .await
                .map_err(|_| Refusal::Unavailable)?;
            if !fresh {
                return Err(Refusal::proof("the DPoP proof was already used"));
            }
        }
        // RFC 9449 §7.1: a bound token sent as a bearer token is refused.
        (Some(_), false) => {
            return Err(Refusal::invalid(
                "the access token is DPoP-bound: send it with the DPoP scheme and a proof",
            ));
        }
        (None, true) => {
            return Err(Refusal::invalid(
                "the access token is not DPoP-bound: send it with the Bearer scheme",
            ));
        }
        (None, false) if srv.dpop == DpopMode::Required => {
            return Err(Refusal::Token {
                dpop: true,
                code: "invalid_token",
                description: "this resource takes DPoP-bound access tokens only",
            });
        }
        (None, false) => {}
    }
    if !srv.required_scopes.iter().all(|r| t.scopes.contains(r)) {
        return Err(Refusal::InsufficientScope);
    }
    Ok(t)
}

/// A JSON-RPC error response.
fn rpc_error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn rpc_response(status: StatusCode, v: &Value, s: &McpState) -> Response {
    let mut r = (status, axum::Json(v)).into_response();
    add_nonce(r.headers_mut(), s);
    r
}

/// A JSON value's type, as policy sees it.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The top-level keys of an arguments object and the same as `key:type`.
fn shape(args: &serde_json::Map<String, Value>) -> (Vec<String>, Vec<String>) {
    let mut keys: Vec<String> = args.keys().cloned().collect();
    keys.sort();
    let types = keys
        .iter()
        .map(|k| format!("{k}:{}", args.get(k).map_or("null", json_type)))
        .collect();
    (keys, types)
}

/// The methods policy decides; every other message passes on a valid token.
fn decided_method(m: &str) -> bool {
    matches!(m, "tools/call" | "resources/read" | "prompts/get")
}

/// What policy sees of a `tools/call`, `resources/read` or `prompts/get`:
/// the tool, URI or prompt it names and its arguments' shape (top-level
/// keys and their JSON types), never the values. `Err`: the request is
/// malformed (JSON-RPC invalid params).
fn call_facts(server: &str, msg: &Value) -> Result<McpFacts, &'static str> {
    let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
    let params = msg
        .get("params")
        .and_then(Value::as_object)
        .ok_or("`params` must be an object")?;
    let mut facts = McpFacts {
        server: server.to_owned(),
        method: method.to_owned(),
        ..McpFacts::default()
    };
    if method == "resources/read" {
        facts.uri = params
            .get("uri")
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty() && keymint_core::model::valid_text(u, 2048))
            .ok_or("`params.uri` must be a resource URI")?
            .to_owned();
        return Ok(facts);
    }
    let name = params
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty() && keymint_core::model::valid_text(n, 256))
        .ok_or(if method == "prompts/get" {
            "`params.name` must be a prompt name"
        } else {
            "`params.name` must be a tool name"
        })?
        .to_owned();
    let args = match params.get("arguments") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err("`params.arguments` must be an object"),
    };
    if args.len() > 256 {
        return Err("`params.arguments` has too many keys");
    }
    // The keys are what policy and an approver read of the arguments.
    if args
        .keys()
        .any(|k| !keymint_core::model::valid_text(k, 256))
    {
        return Err(
            "`params.arguments` has a key that is too long or holds a control or bidirectional formatting character",
        );
    }
    (facts.argument_keys, facts.argument_types) = shape(&args);
    if method == "prompts/get" {
        facts.prompt = name;
    } else {
        facts.tool = name;
    }
    Ok(facts)
}

/// The HMAC of a request's method and exact params: what an approval of
/// it covers (the same call again, not one with other argument values).
fn call_fingerprint(s: &McpState, server: &str, msg: &Value) -> String {
    let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
    let params = msg.get("params").map(Value::to_string).unwrap_or_default();
    s.broker
        .keyring()
        .fingerprint(format!("keymint mcp call\0{server}\0{method}\0{params}").as_bytes())
}

/// The answer to a call held for approval: it names the approval; the
/// same call sent again once a human approved it goes through (once).
fn approval_error(id: Value, approval: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {
        "code": APPROVAL_CODE,
        "message": format!("keymint: the call needs a human's approval `{approval}`; send the same call again once it is approved"),
        "data": {"approval": approval},
    }})
}

/// Decides every `tools/call`, `resources/read` and `prompts/get` in the
/// body (one message or a batch). `None`: all may go; `Some(answer)`: the
/// answer to send instead, nothing forwarded (a batch with one refused
/// call is refused whole, so the MCP server never runs half of it).
async fn screen(s: &McpState, srv: &McpServer, t: &ResourceToken, body: &Value) -> Option<Value> {
    let (msgs, batch): (Vec<&Value>, bool) = match body {
        Value::Array(a) if !a.is_empty() && a.len() <= 64 => (a.iter().collect(), true),
        Value::Array(_) => {
            return Some(rpc_error(
                Value::Null,
                -32600,
                "a batch must have 1 to 64 messages",
            ));
        }
        Value::Object(_) => (vec![body], false),
        _ => return Some(rpc_error(Value::Null, -32600, "not a JSON-RPC message")),
    };
    let mut answers: Vec<Option<Value>> = Vec::with_capacity(msgs.len());
    let mut refused = false;
    for m in &msgs {
        if !m
            .get("method")
            .and_then(Value::as_str)
            .is_some_and(decided_method)
        {
            answers.push(None);
            continue;
        }
        let id = m.get("id").cloned().unwrap_or(Value::Null);
        let answer = match call_facts(&srv.name, m) {
            Err(why) => Some(rpc_error(id, -32602, why)),
            Ok(facts) => {
                let call = call_fingerprint(s, &srv.name, m);
                match s
                    .broker
                    .decide_mcp_request(t, &srv.name, &srv.role, facts, call)
                    .await
                {
                    Ok(_) => None,
                    Err(d) => {
                        tracing::info!(server = %srv.name, reason = %d.reason, "mcp: request refused");
                        Some(match d.approval {
                            Some(a) => approval_error(id, &a),
                            None => rpc_error(
                                id,
                                FORBIDDEN_CODE,
                                "keymint: the call is not permitted by policy",
                            ),
                        })
                    }
                }
            }
        };
        refused |= answer.is_some();
        answers.push(answer);
    }
    if !refused {
        return None;
    }
    if !batch {
        return answers.into_iter().next().flatten();
    }
    // Every request of a refused batch is answered; notifications are not.
    let out: Vec<Value> = msgs
        .iter()
        .zip(answers)
        .filter_map(|(m, a)| {
            a.or_else(|| {
                m.get("id").filter(|_| m.get("method").is_some()).map(|id| {
                    rpc_error(
                        id.clone(),
                        FORBIDDEN_CODE,
                        "keymint: not sent, another call of the batch was refused",
                    )
                })
            })
        })
        .collect();
    Some(Value::Array(out))
}

/// One header's value, if sent once; `Err` if sent twice or not text.
fn one_header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ()> {
    let mut all = headers.get_all(name).iter();
    let Some(v) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(());
    }
    v.to_str().map(Some).map_err(|_| ())
}

/// An `Mcp-Name` value: as is, or UTF-8 in the `=?base64?…?=` sentinel.
fn decode_mcp_name(v: &str) -> Option<String> {
    match v
        .strip_prefix("=?base64?")
        .and_then(|x| x.strip_suffix("?="))
    {
        Some(b) => base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b)
            .ok()
            .and_then(|b| String::from_utf8(b).ok()),
        None => Some(v.to_owned()),
    }
}

/// Whether the `Mcp-Method` and `Mcp-Name` headers (SEP-2243), when sent,
/// say what the body does: the method, and the tool or prompt name or the
/// resource URI. A batch takes neither (the revision that has the headers
/// has no batches). Absent headers agree (older clients send none).
fn headers_agree(headers: &HeaderMap, body: &Value) -> bool {
    let (Ok(method), Ok(name)) = (
        one_header(headers, "mcp-method"),
        one_header(headers, "mcp-name"),
    ) else {
        return false;
    };
    if method.is_none() && name.is_none() {
        return true;
    }
    let Value::Object(_) = body else {
        return false;
    };
    let body_method = body.get("method").and_then(Value::as_str);
    if method.is_some_and(|m| Some(m) != body_method) {
        return false;
    }
    let Some(name) = name else {
        return true;
    };
    let params = body.get("params");
    let body_name = match body_method {
        Some("resources/read" | "resources/subscribe" | "resources/unsubscribe") => {
            params.and_then(|p| p.get("uri"))
        }
        _ => params.and_then(|p| p.get("name")),
    }
    .and_then(Value::as_str);
    decode_mcp_name(name).is_some_and(|n| Some(n.as_str()) == body_name)
}

/// Headers of the agent's request that may reach the MCP server: the
/// transport's own, nothing else (no `Authorization`, `DPoP`, cookies).
/// The session id is not among them: keymint sends the MCP server's own,
/// unwrapped from the one it bound to the task.
fn forwardable_request_header(n: &HeaderName) -> bool {
    let n = n.as_str();
    n != SESSION_HEADER
        && (n == "accept" || n == "content-type" || n == "last-event-id" || n.starts_with("mcp-"))
}

/// Headers of the MCP server's answer that reach the agent (the session
/// id bound to the task first). An allowlist: none that acts on keymint's
/// origin (`keymint_proxy::ORIGIN_BOUND`, `Set-Cookie` among them) can
/// pass, and the test of this function says so for each.
fn forwardable_response_header(n: &HeaderName) -> bool {
    let n = n.as_str();
    n != SESSION_HEADER && (n == "content-type" || n == "cache-control" || n.starts_with("mcp-"))
}

/// The MCP server's session id inside the request's `Mcp-Session-Id`:
/// `Ok(None)` without one; `Err` for one keymint did not bind to this
/// token's task at this server (MCP security best practices: a session id
/// is bound to the caller, so one taken from another agent, another task
/// or an ended task opens nothing).
fn session_of(
    s: &McpState,
    srv: &McpServer,
    t: &ResourceToken,
    headers: &HeaderMap,
) -> Result<Option<String>, ()> {
    let mut all = headers.get_all(SESSION_HEADER).iter();
    let Some(v) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(());
    }
    let v = v.to_str().map_err(|_| ())?;
    s.broker
        .open_session(t, &srv.name, v)
        .map(|sid| Some(sid.to_owned()))
        .ok_or(())
}

/// The MCP server's credential, as configured: nothing, the sealed bearer
/// token (read per request, so a new one set by the admin is used at
/// once), or a token keymint mints for this request (`exchanged`).
async fn credential(
    s: &McpState,
    srv: &McpServer,
    t: &ResourceToken,
) -> Result<Option<Zeroizing<String>>, ()> {
    match srv.credential {
        CredentialKind::None => Ok(None),
        CredentialKind::Exchanged => {
            let aud = srv.upstream_audience.as_deref().ok_or(())?;
            s.broker
                .upstream_token(t, &srv.role, &srv.resource, aud)
                .map(Some)
                .ok_or(())
        }
        CredentialKind::Bearer => {
            let name = credential_secret_name(&srv.name);
            let sealed = match s.broker.store().get_secret(&name).await {
                Ok(Some(x)) => x,
                Ok(None) => {
                    tracing::error!(server = %srv.name, "mcp: no credential is set for this server");
                    return Err(());
                }
                Err(e) => {
                    tracing::error!(error = %e, "mcp: cannot read a server credential");
                    return Err(());
                }
            };
            let opened = s.broker.keyring().open(&name, &sealed).map_err(|e| {
                tracing::error!(error = %e, "mcp: cannot open a server credential");
            })?;
            String::from_utf8(opened.to_vec())
                .map(|k| Some(Zeroizing::new(k)))
                .map_err(|_| ())
        }
    }
}

fn gateway_error(status: StatusCode, message: &str, s: &McpState) -> Response {
    rpc_response(status, &rpc_error(Value::Null, -32603, message), s)
}

async fn handle(
    State(s): State<McpState>,
    name: Result<Path<String>, PathRejection>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // A name that is not UTF-8 names no server either.
    let Some(srv) = name.ok().and_then(|Path(n)| s.servers.get(&n).cloned()) else {
        // As an unknown session is answered: 404 with a JSON-RPC error,
        // which does not repeat the name.
        return rpc_response(
            StatusCode::NOT_FOUND,
            &rpc_error(
                Value::Null,
                UNKNOWN_SERVER_CODE,
                "keymint: no MCP server is configured under this path",
            ),
            &s,
        );
    };
    if !matches!(method, Method::POST | Method::GET | Method::DELETE) {
        let mut r = rpc_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &rpc_error(
                Value::Null,
                INVALID_REQUEST_CODE,
                "keymint: the MCP transport takes GET, POST and DELETE",
            ),
            &s,
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, POST, DELETE"));
        return r;
    }
    let token = match authenticate(&s, &srv, &method, &headers).await {
        Ok(t) => t,
        Err(r) => return r.response(&s, &srv),
    };
    // INVARIANT: a session opened by one task is never continued by
    // another (nor after its task ended: its tokens are refused above).
    let Ok(session) = session_of(&s, &srv, &token, &headers) else {
        tracing::warn!(server = %srv.name, task = %token.live.task.id, "mcp: a session id not bound to this task");
        s.broker.audit_session_refused(&token, &srv.name).await;
        // 404: the MCP transport's answer to an unknown session (the
        // client starts a new one); it does not say whose session it was.
        return rpc_response(
            StatusCode::NOT_FOUND,
            &rpc_error(
                Value::Null,
                SESSION_CODE,
                "keymint: no such session for this token; initialize a new one",
            ),
            &s,
        );
    };
    // As on the proxy's routes (docs/design/0019): keymint decides on the
    // bytes it reads, and it does not decode them, so a compressed body is
    // refused unread rather than read as something else than the MCP
    // server would.
    if !keymint_proxy::identity_coded(&headers) {
        s.broker
            .audit_mcp_denied(&token, &srv.name, "encoding", "compressed request body")
            .await;
        return gateway_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "keymint: the request body has a content coding (`Content-Encoding`); send it uncompressed",
            &s,
        );
    }
    let bytes = match axum::body::to_bytes(body, srv.max_body).await {
        Ok(b) => b,
        Err(_) => {
            return gateway_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "keymint: the request body is too large",
                &s,
            );
        }
    };
    if method == Method::POST {
        let json = crate::api::is_media_type(headers.get(header::CONTENT_TYPE), "application/json");
        if !json {
            return gateway_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "keymint: the body must be application/json",
                &s,
            );
        }
        // INVARIANT: what is forwarded is what was screened: the bytes
        // parsed here, and only when every tools/call in them is allowed.
        // Strictly: a member named twice (`"name"` of a tools/call, say)
        // would be decided on as serde_json reads it (the last) and passed
        // on as it came, to a server whose parser may keep the first.
        let msg = match keymint_core::json::from_slice(&bytes) {
            Ok(msg) => msg,
            Err(keymint_core::json::Refused::Duplicate) => {
                return rpc_response(
                    StatusCode::BAD_REQUEST,
                    &rpc_error(
                        Value::Null,
                        -32600,
                        "keymint: a member name appears twice in one object; send each once",
                    ),
                    &s,
                );
            }
            Err(keymint_core::json::Refused::NotJson) => {
                return rpc_response(
                    StatusCode::BAD_REQUEST,
                    &rpc_error(Value::Null, -32700, "keymint: the body is not JSON"),
                    &s,
                );
            }
        };
        // SEP-2243 (2026-07-28): an MCP server or gateway may route on
        // `Mcp-Method` / `Mcp-Name`; keymint decides on the body, so the
        // two must agree or a header could steer past the decision.
        if !headers_agree(&headers, &msg) {
            return rpc_response(
                StatusCode::BAD_REQUEST,
                &rpc_error(
                    Value::Null,
                    HEADER_MISMATCH_CODE,
                    "keymint: the Mcp-Method or Mcp-Name header does not match the body",
                ),
                &s,
            );
        }
        if let Some(answer) = screen(&s, &srv, &token, &msg).await {
            return rpc_response(StatusCode::OK, &answer, &s);
        }
    } else if !bytes.is_empty() {
        return gateway_error(
            StatusCode::BAD_REQUEST,
            "keymint: GET and DELETE take no body",
            &s,
        );
    }
    forward(
        &s,
        &srv,
        &token,
        session.as_deref(),
        method,
        &headers,
        bytes,
    )
    .await
}

/// Sends the request on to the MCP server with keymint's credential and
/// the MCP server's own session id, and streams its answer back (JSON or
/// an SSE stream) with a new session id bound to the token's task.
async fn forward(
    s: &McpState,
    srv: &McpServer,
    token: &ResourceToken,
    session: Option<&str>,
    method: Method,
    headers: &HeaderMap,
    bytes: Bytes,
) -> Response {
    let Ok(cred) = credential(s, srv, token).await else {
        return gateway_error(
            StatusCode::BAD_GATEWAY,
            "keymint: the MCP server's credential is not available",
            s,
        );
    };
    let mut req = http::Request::builder()
        .method(method)
        .uri(srv.upstream.clone());
    if let Some(h) = req.headers_mut() {
        for (n, v) in headers {
            if forwardable_request_header(n) {
                h.append(n.clone(), v.clone());
            }
        }
        if let Some(sid) = session.and_then(|x| HeaderValue::from_str(x).ok()) {
            h.insert(SESSION_HEADER, sid);
        }
        if let Some(c) = &cred {
            match HeaderValue::from_str(&format!("Bearer {}", c.as_str())) {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    h.insert(header::AUTHORIZATION, v);
                }
                Err(_) => {
                    return gateway_error(
                        StatusCode::BAD_GATEWAY,
                        "keymint: the MCP server's credential is not available",
                        s,
                    );
                }
            }
        }
    }
    let Ok(req) = req.body(Full::new(bytes)) else {
        return gateway_error(StatusCode::BAD_GATEWAY, "keymint: bad upstream request", s);
    };
    let timeout = Duration::from_secs(srv.timeout_secs);
    let res = match tokio::time::timeout(timeout, s.client.request(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::warn!(server = %srv.name, error = %e, "mcp: the MCP server cannot be reached");
            return gateway_error(
                StatusCode::BAD_GATEWAY,
                "keymint: the MCP server cannot be reached",
                s,
            );
        }
        Err(_) => {
            return gateway_error(
                StatusCode::GATEWAY_TIMEOUT,
                "keymint: the MCP server did not answer in time",
                s,
            );
        }
    };
    let (parts, body) = res.into_parts();
    if parts.status == StatusCode::UNAUTHORIZED || parts.status == StatusCode::FORBIDDEN {
        // The MCP server refused keymint's credential: not the agent's
        // business, and its challenge must not reach the agent.
        tracing::warn!(server = %srv.name, status = %parts.status, "mcp: the MCP server refused keymint's credential");
        return gateway_error(
            StatusCode::BAD_GATEWAY,
            "keymint: the MCP server refused keymint's credential",
            s,
        );
    }
    // The MCP server's session id, bound to the token's task: visible
    // ASCII (the transport's rule) and short, else it is not passed on.
    let bound = match parts.headers.get(SESSION_HEADER).map(HeaderValue::as_bytes) {
        None => None,
        Some(sid)
            if !sid.is_empty()
                && sid.len() <= MAX_SESSION_ID
                && sid.iter().all(|b| (0x21..0x7f).contains(b)) =>
        {
            let sid = String::from_utf8_lossy(sid);
            HeaderValue::from_str(&s.broker.bind_session(token, &srv.name, &sid)).ok()
        }
        Some(_) => {
            tracing::warn!(server = %srv.name, "mcp: the MCP server sent a malformed session id");
            return gateway_error(
                StatusCode::BAD_GATEWAY,
                "keymint: the MCP server sent a malformed session id",
                s,
            );
        }
    };
    let streamed = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
    let body = if streamed {
        while_live(s, token, body)
    } else {
        Body::new(body)
    };
    let mut r = Response::new(body);
    *r.status_mut() = parts.status;
    let h = r.headers_mut();
    for (n, v) in &parts.headers {
        if forwardable_response_header(n) {
            h.append(n.clone(), v.clone());
        }
    }
    if let Some(b) = bound {
        h.insert(SESSION_HEADER, b);
    }
    add_nonce(h, s);
    r
}

/// How often an open stream's token is checked again.
const STREAM_CHECK: Duration = Duration::from_secs(1);

/// The body of a stream relayed from the MCP server.
#[derive(Debug)]
struct Relay(tokio::sync::mpsc::Receiver<Result<http_body::Frame<Bytes>, hyper::Error>>);

impl http_body::Body for Relay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        self.0.poll_recv(cx)
    }
}

/// An SSE answer (the GET stream, a streamed response) passed on while the
/// token it was opened with stays live: checked every [`STREAM_CHECK`]
/// through the lookup every request makes (cached until the revocation
/// epoch moves), so a task that ends, a revoked or expired token, or a
/// suspension ends the stream within a second, as it refuses the next
/// request. A store that cannot be read does not cut it (checked again on
/// the next tick). The agent closing the stream closes the MCP server's.
// INVARIANT (DESIGN.md 1): nothing reaches an agent through keymint after
// its task ended, a stream opened before included.
fn while_live(s: &McpState, token: &ResourceToken, body: hyper::body::Incoming) -> Body {
    use http_body_util::BodyExt as _;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let broker = Arc::clone(&s.broker);
    let fingerprint = token.live.lease.fingerprint.clone();
    tokio::spawn(async move {
        let mut body = body;
        let mut tick = tokio::time::interval(STREAM_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                frame = body.frame() => {
                    let Some(frame) = frame else { return };
                    if tx.send(frame).await.is_err() {
                        return;
                    }
                }
                _ = tick.tick() => {
                    match broker.live_access_token(fingerprint.clone()).await {
                        Ok(_) => {}
                        Err(crate::broker::BrokerError::Unauthorized(_)) => {
                            tracing::info!("mcp: a stream ended with its token");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "mcp: cannot check an open stream's token");
                        }
                    }
                }
                () = tx.closed() => return,
            }
        }
    });
    Body::new(Relay(rx))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn policy_sees_the_arguments_shape_never_their_values() {
        let msg = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "query", "arguments": {"sql": "drop table x", "limit": 5, "opts": {"a": 1}, "tags": [], "dry": true, "n": null}}});
        let f = call_facts("db", &msg).unwrap();
        assert_eq!(f.tool, "query");
        assert_eq!(
            f.argument_keys,
            ["dry", "limit", "n", "opts", "sql", "tags"]
        );
        assert_eq!(
            f.argument_types,
            [
                "dry:boolean",
                "limit:number",
                "n:null",
                "opts:object",
                "sql:string",
                "tags:array"
            ]
        );
        assert!(!format!("{f:?}").contains("drop table"));
        assert_eq!(f.method, "tools/call");
        let r = call_facts(
            "db",
            &json!({"method": "resources/read", "params": {"uri": "file:///etc/passwd"}}),
        )
        .unwrap();
        assert_eq!(
            (r.uri.as_str(), r.tool.as_str()),
            ("file:///etc/passwd", "")
        );
        let p = call_facts(
            "db",
            &json!({"method": "prompts/get", "params": {"name": "review", "arguments": {"code": "secret"}}}),
        )
        .unwrap();
        assert_eq!((p.prompt.as_str(), p.tool.as_str()), ("review", ""));
        assert_eq!(p.argument_types, ["code:string"]);
        assert!(!format!("{p:?}").contains("secret"));
        for bad in [
            json!({"method": "tools/call"}),
            json!({"method": "tools/call", "params": {"arguments": {}}}),
            json!({"method": "tools/call", "params": {"name": 3}}),
            json!({"method": "tools/call", "params": {"name": "x", "arguments": [1]}}),
            json!({"method": "tools/call", "params": {"name": ""}}),
            json!({"method": "resources/read", "params": {"name": "x"}}),
            json!({"method": "resources/read", "params": {"uri": ""}}),
            json!({"method": "resources/read", "params": {"uri": "x".repeat(2049)}}),
            json!({"method": "prompts/get", "params": {"arguments": {}}}),
            json!({"method": "prompts/get", "params": {"name": "p", "arguments": "x"}}),
            // What an approver reads may not display otherwise than it is.
            json!({"method": "tools/call", "params": {"name": "drop\u{202e}daer"}}),
            json!({"method": "prompts/get", "params": {"name": "p\u{2066}x"}}),
            json!({"method": "resources/read", "params": {"uri": "file:///a\u{202e}txt.exe"}}),
            json!({"method": "tools/call", "params": {"name": "q", "arguments": {"a\u{202e}b": 1}}}),
            json!({"method": "tools/call", "params": {"name": "q", "arguments": {"a\nb": 1}}}),
        ] {
            assert!(call_facts("db", &bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mcp_method_and_name_headers_must_say_what_the_body_does() {
        let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "add", "arguments": {}}});
        let read = json!({"jsonrpc": "2.0", "id": 1, "method": "resources/read",
            "params": {"uri": "notes://public/readme"}});
        let h = |pairs: &[(&'static str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(*k, HeaderValue::from_str(v).unwrap());
            }
            m
        };
        assert!(headers_agree(&h(&[]), &call));
        assert!(headers_agree(&h(&[("mcp-method", "tools/call")]), &call));
        assert!(headers_agree(
            &h(&[("mcp-method", "tools/call"), ("mcp-name", "add")]),
            &call
        ));
        // "add" in the base64 sentinel.
        assert!(headers_agree(&h(&[("mcp-name", "=?base64?YWRk?=")]), &call));
        assert!(headers_agree(
            &h(&[
                ("mcp-method", "resources/read"),
                ("mcp-name", "notes://public/readme")
            ]),
            &read
        ));
        for bad in [
            h(&[("mcp-method", "tools/list")]),
            h(&[
                ("mcp-method", "tools/call"),
                ("mcp-name", "delete_everything"),
            ]),
            h(&[("mcp-name", "=?base64?ZGVsZXRl?=")]),
            h(&[("mcp-name", "=?base64?not base64?=")]),
            h(&[("mcp-method", "tools/call"), ("mcp-method", "tools/call")]),
        ] {
            assert!(!headers_agree(&bad, &call), "{bad:?}");
        }
        assert!(!headers_agree(
            &h(&[("mcp-name", "notes://secret/plan")]),
            &read
        ));
        assert!(!headers_agree(
            &h(&[("mcp-method", "tools/call")]),
            &json!([call.clone()])
        ));
    }

    #[test]
    fn only_transport_headers_cross() {
        for ok in [
            "accept",
            "content-type",
            "mcp-protocol-version",
            "last-event-id",
        ] {
            assert!(forwardable_request_header(&HeaderName::from_static(ok)));
        }
        for no in [
            // Sent by keymint itself, unwrapped from the bound one.
            "mcp-session-id",
            "authorization",
            "dpop",
            "cookie",
            "x-forwarded-for",
            "host",
            "proxy-authorization",
        ] {
            assert!(!forwardable_request_header(&HeaderName::from_static(no)));
        }
        assert!(!forwardable_response_header(&HeaderName::from_static(
            "www-authenticate"
        )));
        assert!(!forwardable_response_header(&HeaderName::from_static(
            "set-cookie"
        )));
        // Nothing that acts on keymint's origin, as on the proxy's routes.
        for n in keymint_proxy::ORIGIN_BOUND.iter().chain(&[
            "access-control-allow-origin",
            "access-control-allow-credentials",
        ]) {
            assert!(keymint_proxy::acts_on_origin(n), "{n}");
            assert!(
                !forwardable_response_header(&HeaderName::from_static(n)),
                "{n}"
            );
        }
    }
}
