//! The `/v1` HTTP API: thin handlers over the [`Broker`].
//!
//! Errors are RFC 9457 problem documents with a stable `code`. Internal
//! detail (store errors) goes to the log, never into a body. Bodies are
//! size-limited, must be JSON, and unknown fields are refused.
//!
//! Each handler carries its `#[utoipa::path]` (path, method, body,
//! responses, security), and [`router`] mounts only what
//! [`utoipa_axum::routes!`] registers, so the routes served and the OpenAPI
//! document ([`openapi`], served at `/v1/openapi.json`) come from one list.
//! The egress proxy's `/proxy/{upstream}/…` routes are not in it: they
//! pass a provider's own API through, with the provider's error shapes
//! (docs/design/0007-egress-proxy.md).

use std::sync::{Arc, LazyLock};

use axum::extract::{FromRequest, FromRequestParts, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use bytes::Bytes;
use keymint_core::model::{EndReason, LeaseState, TaskStatus};
use keymint_core::rules::RuleError;
use keymint_proto::{
    EndTask, ErrorCode, Health, IssueLease, List, Problem, RenewLease, RevokeLeases, Revoked,
    StartTask,
};
use keymint_store::{LeaseFilter, LeaseSelector, TaskFilter};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use utoipa::openapi::OpenApi;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::broker::{Broker, BrokerError, Principal};

mod inventory;
use inventory::*;
mod report;
use report::*;
mod suspensions;
use suspensions::*;

#[derive(Debug, Clone)]
pub struct AppState {
    pub broker: Arc<Broker>,
    pub max_body: usize,
    pub has_audit_file: bool,
    /// The egress proxy, for its upstream keys and metrics.
    pub proxy: Option<Arc<keymint_proxy::Proxy>>,
    /// What the configuration says, for the compliance report.
    pub report: Arc<crate::report::Deployment>,
}

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    detail: String,
    /// `Retry-After` (seconds), for a 503 that a retry may well pass.
    retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// The same error, telling the client to ask again in `secs`.
    #[must_use]
    pub fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem: Problem = self.code.problem(self.detail);
        let status =
            StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut res = (status, body).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        let code = match &e {
            BrokerError::Rule(r) => match r {
                RuleError::TtlTooLong { .. }
                | RuleError::TtlPastTaskEnd { .. }
                | RuleError::TtlPastCredentialEnd { .. } => ErrorCode::TtlExceedsLimit,
                RuleError::ScopeNotGranted { .. } | RuleError::RoleMismatch(_) => {
                    ErrorCode::ScopeNotGranted
                }
                RuleError::TaskNotActive(_) => ErrorCode::TaskNotActive,
                RuleError::LeaseNotActive(_) => ErrorCode::LeaseNotActive,
                RuleError::ZeroTtl
                | RuleError::IdleTimeout { .. }
                | RuleError::InvalidScope(_)
                | RuleError::DelegationTooDeep(_)
                | RuleError::TooManyScopes(_)
                | RuleError::BadText { .. }
                | RuleError::BadName { .. }
                | RuleError::NotRenewable(_) => ErrorCode::InvalidRequest,
            },
            BrokerError::NotFound(_) => ErrorCode::NotFound,
            BrokerError::Forbidden(_) => ErrorCode::Forbidden,
            BrokerError::Unauthorized(_) => ErrorCode::Unauthorized,
            BrokerError::BadRequest(_) => ErrorCode::InvalidRequest,
            BrokerError::Conflict(_) => ErrorCode::Conflict,
            // A decision that ran out of time (CPU contention) decided
            // nothing: 503, ask again, not a final 403.
            BrokerError::Policy {
                timed_out: true, ..
            } => {
                return Self::new(
                    ErrorCode::Unavailable,
                    "the policy decision timed out; retry the request",
                )
                .retry_after(1);
            }
            BrokerError::Policy { verdict, .. } => match verdict {
                keymint_policy::Verdict::NeedsApproval => ErrorCode::ApprovalRequired,
                _ => ErrorCode::PolicyDenied,
            },
            BrokerError::Held(_) => ErrorCode::ApprovalRequired,
            // Unavailable for now (a key another replica is changing, an
            // identity provider's keys not fetched): ask again shortly.
            BrokerError::Unavailable(m) => {
                return Self::new(ErrorCode::Unavailable, m.clone()).retry_after(1);
            }
            BrokerError::Engine(keymint_engines::EngineError::BadRequest(_)) => {
                ErrorCode::InvalidRequest
            }
            BrokerError::Engine(inner) => {
                // The provider's own words (`Access denied for user
                // 'keymint'@…`) name keymint's admin and its set-up: the
                // log has them, the client gets a stable code.
                tracing::warn!(error = %inner, "engine error");
                return match inner {
                    keymint_engines::EngineError::Rejected(_) => Self::new(
                        ErrorCode::IssuanceFailed,
                        "the credential provider refused the request; the server log has details",
                    ),
                    _ => Self::new(
                        ErrorCode::ProviderUnavailable,
                        "the credential provider is unavailable; the server log has details",
                    )
                    .retry_after(5),
                };
            }
            // A damaged stored event: still a server fault (500), but one
            // the operator must act on, so the answer names it rather than
            // skipping it, which would hide tampering (design 0002).
            BrokerError::Store(keymint_store::StoreError::AuditUnreadable(seq)) => {
                tracing::error!(seq, "a stored audit event cannot be read");
                return Self::new(
                    ErrorCode::Internal,
                    format!(
                        "the stored audit event with `seq` {seq} cannot be read: it was damaged \
                         or edited; `keymint audit verify` checks the chain, and `after={seq}` \
                         reads the events after it"
                    ),
                );
            }
            BrokerError::Store(inner @ keymint_store::StoreError::Unavailable(_)) => {
                tracing::error!(error = %inner, "the store cannot write");
                return Self::new(
                    ErrorCode::Unavailable,
                    "the store cannot write now; retry later",
                )
                .retry_after(5);
            }
            BrokerError::Store(inner) => {
                tracing::error!(error = %inner, "store error");
                return Self::new(
                    ErrorCode::Internal,
                    "internal error; the server log has details",
                );
            }
        };
        Self::new(code, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The authenticated caller.
#[derive(Debug)]
pub struct Auth(pub Principal);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        let p = caller(parts, state).await?;
        // The caller is the process attested on the local socket, proven
        // by the bytes of this head: the body that follows must be its
        // too (`read_limited` asks again once it has been read).
        if parts.headers.get(header::AUTHORIZATION).is_none()
            && let Some(local) = parts.extensions.get::<crate::local::LocalPeer>().cloned()
        {
            parts.extensions.insert(AttestedWriter(local));
        }
        // A node agent acting for a workload of one of its entries.
        let bad = |m| ApiError::new(ErrorCode::InvalidRequest, m);
        if let Some(entry) =
            once(&parts.headers, "x-keymint-entry", "X-Keymint-Entry").map_err(bad)?
        {
            let entry = entry.to_str().map_err(|_| {
                ApiError::new(ErrorCode::InvalidRequest, "bad `X-Keymint-Entry` header")
            })?;
            let attested = match once(&parts.headers, "x-keymint-attested", "X-Keymint-Attested")
                .map_err(bad)?
            {
                Some(v) => Some(v.to_str().map_err(|_| {
                    ApiError::new(ErrorCode::InvalidRequest, "bad `X-Keymint-Attested` header")
                })?),
                None => None,
            };
            return Ok(Self(
                state.broker.on_behalf(&p, entry.trim(), attested).await?,
            ));
        }
        Ok(Self(p))
    }
}

/// Set on a request whose caller is the process attested on the local
/// socket (no bearer token): [`read_limited`] checks after the body that
/// every byte of it was written by that process too.
#[derive(Debug, Clone)]
struct AttestedWriter(crate::local::LocalPeer);

/// Who sends the request: the bearer token's principal, else the attested
/// process on the local socket, else the SPIFFE ID of an mTLS client.
async fn caller(parts: &Parts, state: &AppState) -> ApiResult<Principal> {
    let Some(value) = once(&parts.headers, header::AUTHORIZATION, "Authorization")
        .map_err(|m| ApiError::new(ErrorCode::Unauthorized, m))?
    else {
        // On the local socket, the caller is what its process attests to.
        if let Some(local) = parts.extensions.get::<crate::local::LocalPeer>() {
            return Ok(state.broker.authenticate_local(&local.0).await?);
        }
        // Over mTLS, the caller is the SPIFFE ID of its X.509-SVID.
        if let Some(crate::tls::PeerSvid(Some(id))) = parts.extensions.get() {
            return Ok(state.broker.svid_principal(id));
        }
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "missing `Authorization: Bearer` header",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "the Authorization header must be `Bearer <token>`",
            )
        })?;
    let p = state.broker.authenticate(token).await?;
    // Holder binding: a task token presented by a caller that proves a
    // different workload identity is refused.
    if matches!(p, Principal::Task { .. })
        && let Some(presenter) = presenter(state, parts).await?
    {
        state.broker.check_holder_of(&p, &presenter).await?;
    }
    Ok(p)
}

/// Whether a `Content-Type` value names the media type `expected`: its
/// type and subtype, in any case (RFC 9110 §8.3.1), whatever parameters
/// follow (`; charset=utf-8`), and not a longer name that starts like it.
pub(crate) fn is_media_type(value: Option<&HeaderValue>, expected: &str) -> bool {
    value.and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case(expected)
    })
}

/// `name`'s value if the request has it at most once; a request that has
/// it more than once is refused (which value counts would be a guess that
/// another hop may make differently), as the MCP route and the proxy do.
/// The error says which header.
fn once<'h, K: header::AsHeaderName>(
    headers: &'h HeaderMap,
    name: K,
    shown: &str,
) -> Result<Option<&'h HeaderValue>, String> {
    keymint_proxy::header_once(headers, name).map_err(|_| format!("send one `{shown}` header"))
}

/// Who proves to present a request, besides its bearer token: the attested
/// process on the local socket (if it attests to a workload), the
/// X.509-SVID of an mTLS connection, or a workload JWT in
/// `X-Keymint-Identity`. A bad JWT there is an error.
async fn presenter(state: &AppState, parts: &Parts) -> Result<Option<Principal>, BrokerError> {
    match (
        parts.extensions.get::<crate::local::LocalPeer>(),
        parts.extensions.get::<crate::tls::PeerSvid>(),
        once(&parts.headers, "x-keymint-identity", "X-Keymint-Identity")
            .map_err(BrokerError::Unauthorized)?,
    ) {
        (Some(local), _, _) => Ok(state.broker.local_principal(&local.0)),
        (_, Some(crate::tls::PeerSvid(Some(id))), _) => Ok(Some(state.broker.svid_principal(id))),
        (_, _, Some(h)) => match h.to_str() {
            Ok(jwt) => state.broker.authenticate(jwt.trim()).await.map(Some),
            Err(_) => Err(BrokerError::Unauthorized(
                "bad `X-Keymint-Identity` header".into(),
            )),
        },
        _ => Ok(None),
    }
}

/// Holder binding on the proxy's path: when a request carries a `kmt_`
/// token and proves who presents it (attested local process, X.509-SVID,
/// or a JWT in `X-Keymint-Identity`), the presenter must be the token's
/// holder; the refusal is the API's error response. Anything else is left
/// to the proxy's own checks. Called by [`crate::Front`] before the proxy
/// sees the request.
pub async fn proxy_holder_binding(s: &AppState, parts: &Parts) -> Result<(), Response> {
    // Borrowed from the request's own headers (no copy per request).
    let Some(token) = keymint_proxy::presented_token(&parts.headers)
        .token()
        .filter(|t| t.starts_with("kmt_"))
    else {
        return Ok(());
    };
    let checked = match presenter(s, parts).await {
        // A bad token is the proxy's to refuse (and audit, once), in the
        // provider's shape.
        Ok(Some(presenter)) => match s.broker.task_token(token).await {
            Some(p) => s.broker.check_holder_of(&p, &presenter).await,
            None => Ok(()),
        },
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    checked.map_err(|e| ApiError::from(e).into_response())
}

/// A JSON body: `application/json`, within the size limit, no unknown
/// fields. An empty body reads as `{}`. Parse errors say where, and never
/// echo values (which could be secrets).
#[derive(Debug)]
pub struct Body<T>(pub T);

fn describe_json_error(e: &serde_json::Error) -> ApiError {
    use keymint_proto::json_error::JsonErrorKind;
    let (kind, message) = keymint_proto::json_error::describe_json_error(e);
    let code = match kind {
        JsonErrorKind::Syntax => ErrorCode::InvalidJson,
        JsonErrorKind::Data => ErrorCode::InvalidRequest,
    };
    ApiError::new(code, message)
}

use keymint_proto::json_error::describe_serde_message;

impl<T: DeserializeOwned> FromRequest<AppState> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> ApiResult<Self> {
        // One media type (which of two counts would be a guess another hop
        // may make differently), and no content coding: a body sent
        // compressed would otherwise be read as if it were not.
        let content_type = once(req.headers(), header::CONTENT_TYPE, "Content-Type")
            .map_err(|m| ApiError::new(ErrorCode::InvalidRequest, m))?;
        let coded = req
            .headers()
            .get_all(header::CONTENT_ENCODING)
            .iter()
            .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        if coded {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "a content coding (`Content-Encoding`) is not accepted: send the body as it is",
            ));
        }
        let is_json = is_media_type(content_type, "application/json");
        let has_body = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|v| v != "0");
        let bytes = read_limited(req, state).await?;
        if bytes.is_empty() {
            return serde_json::from_slice(b"{}")
                .map(Body)
                .map_err(|e| describe_json_error(&e));
        }
        if has_body && !is_json {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "the body must be `application/json`",
            ));
        }
        // Every body is an object: serde would also read a struct from an
        // array, binding its items to the fields in the order they are
        // declared (a task started by `["agent","demo",...]`).
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(
                match serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
                    Ok(_) => {
                        ApiError::new(ErrorCode::InvalidRequest, "the body must be a JSON object")
                    }
                    Err(e) => describe_json_error(&e),
                },
            );
        }
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| describe_json_error(&e))
    }
}

async fn read_limited(req: Request, state: &AppState) -> ApiResult<Bytes> {
    let too_large = || {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the body exceeds {} bytes", state.max_body),
        )
    };
    // A length declared above the limit is refused before a byte is read,
    // rather than once the client has sent what it can or the read times
    // out (the connection closes after the answer).
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| usize::try_from(n).map_or(true, |n| n > state.max_body)) {
        return Err(too_large());
    }
    let writer = req.extensions().get::<AttestedWriter>().cloned();
    let bytes = Bytes::from_request(req, state).await.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::new(ErrorCode::InvalidRequest, "the body could not be read")
        }
    })?;
    // INVARIANT (docs/design/0024): a request acts as the attested process
    // only if that process wrote all of it. The head was checked when the
    // caller was resolved; the body came later, and a child that inherited
    // the connection (or the process after an `execve`) may have written
    // it: asked again now, refused and audited as at the head.
    if let Some(AttestedWriter(local)) = writer {
        state.broker.authenticate_local(&local.0).await?;
    }
    Ok(bytes)
}

/// Path parameters: axum's `Path`, refused as problem+json that names the
/// parameter (axum's own rejection is `text/plain` and, for percent-encoded
/// bytes that are not UTF-8, `Invalid URL: Invalid UTF-8 in `id``). Every
/// `/v1` handler takes its path parameters through this.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Self> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Self(v))
            .map_err(|e| path_rejection(&e))
    }
}

fn path_rejection(e: &axum::extract::rejection::PathRejection) -> ApiError {
    use axum::extract::path::ErrorKind;
    use axum::extract::rejection::PathRejection;
    let detail = match e {
        PathRejection::FailedToDeserializePathParams(e) => match e.kind() {
            ErrorKind::InvalidUtf8InPathParam { key } => {
                format!("path parameter `{key}` is not valid UTF-8 once percent-decoded")
            }
            ErrorKind::ParseErrorAtKey { key, .. } | ErrorKind::DeserializeError { key, .. } => {
                format!("path parameter `{key}` is malformed")
            }
            _ => "a path parameter is malformed".to_owned(),
        },
        _ => "a path parameter is malformed".to_owned(),
    };
    ApiError::new(ErrorCode::InvalidRequest, detail)
}

/// Query parameters, strictly parsed.
fn query<T: DeserializeOwned + Default>(q: Option<String>) -> ApiResult<T> {
    match q.as_deref() {
        None | Some("") => Ok(T::default()),
        Some(s) => serde_urlencoded::from_str(s).map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                match describe_serde_message(&e.to_string()) {
                    (what, Some(x)) => format!("invalid query parameter: {what}, {x}"),
                    (what, None) => format!("invalid query parameter: {what}"),
                },
            )
        }),
    }
}

fn limit_of(l: Option<u32>) -> ApiResult<u32> {
    match l {
        None => Ok(100),
        Some(n @ 1..=1000) => Ok(n),
        Some(_) => Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "`limit` must be between 1 and 1000",
        )),
    }
}

// ---------------------------------------------------------------- handlers

/// Readiness; no authentication. 503 with status `unavailable` while the
/// store cannot write (its last write failed); ready again once one
/// succeeds.
#[utoipa::path(
    get,
    path = "/v1/health",
    tag = "meta",
    responses(
        (status = 200, description = "the server is up and its store writes", body = Health),
        (status = 503, description = "the store cannot write", body = Health),
    ),
)]
async fn health(State(s): State<AppState>) -> Response {
    let failure = s.broker.store().write_failure();
    if let Some(why) = &failure {
        tracing::warn!(error = %why, "not ready: the store cannot write");
    }
    let (status, text) = match failure {
        None => (StatusCode::OK, "ok"),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    };
    let mut res = (
        status,
        Json(Health {
            status: text.into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }),
    )
        .into_response();
    if status != StatusCode::OK {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(5u32));
    }
    res
}

/// Prometheus metrics; no authentication.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    responses(
        (status = 200, description = "the text exposition format", body = String, content_type = "text/plain; version=0.0.4"),
    ),
)]
async fn metrics(State(s): State<AppState>) -> Response {
    let store = s.broker.store();
    let counts = store.counts().await.ok();
    let lag = if s.has_audit_file {
        match (
            counts.as_ref(),
            store.sink_cursor(crate::audit_sink::SINK_NAME).await,
        ) {
            (Some(c), Ok(cur)) => Some(c.audit_head.saturating_sub(cur)),
            _ => None,
        }
    } else {
        None
    };
    let mut body = s.broker.metrics.render(counts.as_ref(), lag);
    if let Some(p) = &s.proxy {
        p.render_metrics(&mut body);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// This document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "meta",
    responses(
        (status = 200, description = "the OpenAPI 3.1 document", body = Object),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn openapi_json(_: Auth) -> Response {
    match &*DOCUMENT {
        Some(json) => ([(header::CONTENT_TYPE, "application/json")], json.clone()).into_response(),
        None => ApiError::new(
            ErrorCode::Internal,
            "internal error; the server log has details",
        )
        .into_response(),
    }
}

/// Start a task (admin) or a sub-task (task token).
#[utoipa::path(
    post,
    path = "/v1/tasks",
    tag = "tasks",
    request_body(content = StartTask, description = "an empty body is `{}`"),
    responses(
        (status = 201, description = "the task", body = keymint_proto::Task),
        (status = 202, description = "held for a human: the pending approval", body = keymint_core::model::Approval, headers(("Location" = String, description = "`/v1/approvals/{id}`"))),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn start_task(
    State(s): State<AppState>,
    Auth(p): Auth,
    Body(req): Body<StartTask>,
) -> ApiResult<Response> {
    match s.broker.start_task(&p, req).await {
        Ok(t) => Ok((StatusCode::CREATED, Json(t)).into_response()),
        Err(BrokerError::Held(a)) => Ok(held(&a)),
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct TaskQuery {
    status: Option<TaskStatus>,
    workload: Option<String>,
    role: Option<String>,
    /// Only the direct sub-tasks of this task.
    parent: Option<String>,
    /// 1 to 1000; 100 if not given.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// List tasks (admin; a task token sees its own sub-tree).
#[utoipa::path(
    get,
    path = "/v1/tasks",
    tag = "tasks",
    params(TaskQuery),
    responses(
        (status = 200, description = "the tasks, newest first", body = List<keymint_proto::Task>),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn list_tasks(
    State(s): State<AppState>,
    Auth(p): Auth,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<List<keymint_proto::Task>>> {
    let q: TaskQuery = query(q)?;
    let f = TaskFilter {
        status: q.status,
        workload: q.workload,
        role: q.role,
        parent: q.parent,
        before: None,
        limit: limit_of(q.limit)?,
    };
    Ok(Json(List {
        items: s.broker.list_tasks(&p, f).await?,
    }))
}

/// Show a task.
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}",
    tag = "tasks",
    params(("id" = String, Path, description = "the task id, `tsk_…`")),
    responses(
        (status = 200, description = "the task", body = keymint_proto::Task),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn get_task(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<keymint_proto::Task>> {
    Ok(Json(s.broker.get_task(&p, &id).await?))
}

/// Record activity (resets the idle timeout).
#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/heartbeat",
    tag = "tasks",
    params(("id" = String, Path, description = "the task id, `tsk_…`")),
    responses(
        (status = 200, description = "the task", body = keymint_proto::Task),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn heartbeat(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<keymint_proto::Task>> {
    Ok(Json(s.broker.heartbeat(&p, &id).await?))
}

/// End a task as completed or failed; revokes its leases and sub-tasks.
#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/end",
    tag = "tasks",
    params(("id" = String, Path, description = "the task id, `tsk_…`")),
    request_body = EndTask,
    responses(
        (status = 200, description = "the ended task; ending it again with the same status \
            changes nothing and answers the same, with `Keymint-Already-Ended: true`; \
            another status is refused (409 `conflict`, naming the status it has)",
            body = keymint_proto::Task,
            headers(("Keymint-Already-Ended" = String, description = "`true` when the task had already ended so"))),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn end_task(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
    Body(req): Body<EndTask>,
) -> ApiResult<Response> {
    let ended = s
        .broker
        .end_task_once(&p, &id, Some(req.status), req.reason)
        .await?;
    Ok(ended_task(ended))
}

/// An ended task; `Keymint-Already-Ended: true` if it had ended before.
fn ended_task((task, already): (keymint_proto::Task, bool)) -> Response {
    let mut res = Json(task).into_response();
    if already {
        res.headers_mut()
            .insert("keymint-already-ended", HeaderValue::from_static("true"));
    }
    res
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RevokeTask {
    /// Why, for the audit trail.
    reason: Option<String>,
}

/// Revoke a task, its leases and sub-tasks.
#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/revoke",
    tag = "tasks",
    params(("id" = String, Path, description = "the task id, `tsk_…`")),
    request_body(content = RevokeTask, description = "optional; an empty body is `{}`"),
    responses(
        (status = 200, description = "the revoked task; revoking it again changes nothing and \
            answers the same, with `Keymint-Already-Ended: true`; a task that ended otherwise \
            is refused (409 `conflict`)", body = keymint_proto::Task,
            headers(("Keymint-Already-Ended" = String, description = "`true` when the task had already been revoked"))),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn revoke_task(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
    Body(req): Body<RevokeTask>,
) -> ApiResult<Response> {
    let ended = s.broker.end_task_once(&p, &id, None, req.reason).await?;
    Ok(ended_task(ended))
}

/// Issue a credential inside the task; the secret is in this response only.
#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/leases",
    tag = "leases",
    params(("id" = String, Path, description = "the task id, `tsk_…`")),
    request_body(content = IssueLease, description = "an empty body is `{}`"),
    responses(
        (status = 201, description = "the lease and its credential (`Cache-Control: no-store`)", body = keymint_proto::IssuedLease),
        (status = 202, description = "held for a human: the pending approval", body = keymint_core::model::Approval, headers(("Location" = String, description = "`/v1/approvals/{id}`"))),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn issue_lease(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
    Body(req): Body<IssueLease>,
) -> ApiResult<Response> {
    let issued = match s.broker.issue_lease(&p, &id, req).await {
        Ok(i) => i,
        Err(BrokerError::Held(a)) => return Ok(held(&a)),
        Err(e) => return Err(e.into()),
    };
    let mut res = (StatusCode::CREATED, Json(issued)).into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct LeaseQuery {
    task: Option<String>,
    workload: Option<String>,
    role: Option<String>,
    state: Option<LeaseState>,
    /// 1 to 1000; 100 if not given.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// List leases (admin; a task token sees its own sub-tree).
#[utoipa::path(
    get,
    path = "/v1/leases",
    tag = "leases",
    params(LeaseQuery),
    responses(
        (status = 200, description = "the leases, newest first", body = List<keymint_proto::Lease>),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn list_leases(
    State(s): State<AppState>,
    Auth(p): Auth,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<List<keymint_proto::Lease>>> {
    let q: LeaseQuery = query(q)?;
    let f = LeaseFilter {
        task: q.task,
        workload: q.workload,
        role: q.role,
        state: q.state,
        before: None,
        limit: limit_of(q.limit)?,
        ..LeaseFilter::default()
    };
    Ok(Json(List {
        items: s.broker.list_leases(&p, f).await?,
    }))
}

/// Show a lease.
#[utoipa::path(
    get,
    path = "/v1/leases/{id}",
    tag = "leases",
    params(("id" = String, Path, description = "the lease id, `lse_…`")),
    responses(
        (status = 200, description = "the lease (never its secret)", body = keymint_proto::Lease),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn get_lease(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<keymint_proto::Lease>> {
    Ok(Json(s.broker.get_lease(&p, &id).await?))
}

/// Renew a lease (never past the role's max TTL or the task's end).
#[utoipa::path(
    post,
    path = "/v1/leases/{id}/renew",
    tag = "leases",
    params(("id" = String, Path, description = "the lease id, `lse_…`")),
    request_body(content = RenewLease, description = "an empty body is `{}`"),
    responses(
        (status = 200, description = "the renewed lease", body = keymint_proto::Renewed),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn renew_lease(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
    Body(req): Body<RenewLease>,
) -> ApiResult<Json<keymint_proto::Renewed>> {
    Ok(Json(s.broker.renew_lease(&p, &id, req).await?))
}

/// The Cedar policies in force: ids and source files (admin).
#[utoipa::path(
    get,
    path = "/v1/policy",
    tag = "policy",
    responses(
        (status = 200, description = "the policies in force", body = keymint_proto::PolicyInfo),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn policy_info(
    State(s): State<AppState>,
    Auth(p): Auth,
) -> ApiResult<Json<keymint_proto::PolicyInfo>> {
    Ok(Json(s.broker.policy_info(&p)?))
}

/// Read the policy files again; an invalid set is refused and the previous one stays in force (admin).
#[utoipa::path(
    post,
    path = "/v1/policy/reload",
    tag = "policy",
    responses(
        (status = 200, description = "the policies now in force", body = keymint_proto::PolicyInfo),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn reload_policy(
    State(s): State<AppState>,
    Auth(p): Auth,
) -> ApiResult<Json<keymint_proto::PolicyInfo>> {
    Ok(Json(s.broker.reload_policy(&p).await?))
}

/// 202 Accepted: the request waits for a human as this approval.
fn held(a: &keymint_core::model::Approval) -> Response {
    let mut res = (StatusCode::ACCEPTED, Json(a)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/approvals/{}", a.id)) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    res
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ApprovalQuery {
    status: Option<keymint_core::model::ApprovalStatus>,
    /// 1 to 1000; 100 if not given.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Decision {
    /// Why, for the requester and the audit trail.
    #[serde(default)]
    #[schema(max_length = 1024)]
    note: Option<String>,
}

/// Requests held for a human, newest first (admin, operators).
#[utoipa::path(
    get,
    path = "/v1/approvals",
    tag = "approvals",
    params(ApprovalQuery),
    responses(
        (status = 200, description = "the approvals", body = List<keymint_core::model::Approval>),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn list_approvals(
    State(s): State<AppState>,
    Auth(p): Auth,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<List<keymint_core::model::Approval>>> {
    let q: ApprovalQuery = query(q)?;
    let limit = limit_of(q.limit)?;
    let items = s.broker.list_approvals(&p, q.status, limit).await?;
    Ok(Json(List { items }))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EntryQuery {
    /// Only this node's entries (admin).
    node: Option<String>,
}

/// Create a registration entry: which processes on a node are a workload (admin).
#[utoipa::path(
    post,
    path = "/v1/entries",
    tag = "entries",
    request_body = NewEntrySchema,
    responses(
        (status = 201, description = "the entry", body = keymint_core::model::RegistrationEntry),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn create_entry(
    State(s): State<AppState>,
    Auth(p): Auth,
    Body(req): Body<crate::entries::NewEntry>,
) -> ApiResult<(StatusCode, Json<keymint_core::model::RegistrationEntry>)> {
    Ok((
        StatusCode::CREATED,
        Json(s.broker.create_entry(&p, req).await?),
    ))
}

/// Registration entries: all for the admin (or one node's with `node`), a node's own for a node.
#[utoipa::path(
    get,
    path = "/v1/entries",
    tag = "entries",
    params(EntryQuery),
    responses(
        (status = 200, description = "the entries", body = List<keymint_core::model::RegistrationEntry>),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn list_entries(
    State(s): State<AppState>,
    Auth(p): Auth,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<List<keymint_core::model::RegistrationEntry>>> {
    let q: EntryQuery = query(q)?;
    let items = s.broker.list_entries(&p, q.node.as_deref()).await?;
    Ok(Json(List { items }))
}

/// One registration entry (admin).
#[utoipa::path(
    get,
    path = "/v1/entries/{id}",
    tag = "entries",
    params(("id" = String, Path, description = "the entry id, `ent_…`")),
    responses(
        (status = 200, description = "the entry", body = keymint_core::model::RegistrationEntry),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn get_entry(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<keymint_core::model::RegistrationEntry>> {
    Ok(Json(s.broker.get_entry(&p, &id).await?))
}

/// Delete a registration entry (admin); node agents stop acting for it at once.
#[utoipa::path(
    delete,
    path = "/v1/entries/{id}",
    tag = "entries",
    params(("id" = String, Path, description = "the entry id, `ent_…`")),
    responses(
        (status = 200, description = "the deleted entry", body = keymint_core::model::RegistrationEntry),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn delete_entry(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<keymint_core::model::RegistrationEntry>> {
    Ok(Json(s.broker.delete_entry(&p, &id).await?))
}

/// A node agent's long poll: which of its tasks are over, its entry ids; ends the tasks of its deleted entries (docs/design/0024).
#[utoipa::path(
    post,
    path = "/v1/node/watch",
    tag = "entries",
    request_body = crate::node_watch::NodeWatch,
    responses(
        (status = 200, description = "the tasks that are over, the node's entries", body = crate::node_watch::NodeWatchAnswer),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn node_watch(
    State(s): State<AppState>,
    Auth(p): Auth,
    Body(req): Body<crate::node_watch::NodeWatch>,
) -> ApiResult<Json<crate::node_watch::NodeWatchAnswer>> {
    Ok(Json(s.broker.node_watch(&p, req).await?))
}

/// One held request (admin, operators, its requester).
#[utoipa::path(
    get,
    path = "/v1/approvals/{id}",
    tag = "approvals",
    params(("id" = String, Path, description = "the approval id, `apr_…`")),
    responses(
        (status = 200, description = "the approval", body = keymint_core::model::Approval),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn get_approval(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<keymint_core::model::Approval>> {
    Ok(Json(s.broker.get_approval(&p, &id).await?))
}

/// Approve a held request (an operator authorised by the Cedar action `approve`, not the requester).
#[utoipa::path(
    post,
    path = "/v1/approvals/{id}/approve",
    tag = "approvals",
    params(("id" = String, Path, description = "the approval id, `apr_…`")),
    request_body(content = Decision, description = "optional; an empty body is `{}`"),
    responses(
        (status = 200, description = "the approval", body = keymint_core::model::Approval),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn approve(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
    Body(d): Body<Decision>,
) -> ApiResult<Json<keymint_core::model::Approval>> {
    Ok(Json(s.broker.decide_approval(&p, &id, true, d.note).await?))
}

/// Deny a held request (an operator).
#[utoipa::path(
    post,
    path = "/v1/approvals/{id}/deny",
    tag = "approvals",
    params(("id" = String, Path, description = "the approval id, `apr_…`")),
    request_body(content = Decision, description = "optional; an empty body is `{}`"),
    responses(
        (status = 200, description = "the approval", body = keymint_core::model::Approval),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn deny_approval(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
    Body(d): Body<Decision>,
) -> ApiResult<Json<keymint_core::model::Approval>> {
    Ok(Json(
        s.broker.decide_approval(&p, &id, false, d.note).await?,
    ))
}

/// Redeem an approved request, once, with the token that made it: returns the task or the issued lease it asked for.
#[utoipa::path(
    post,
    path = "/v1/approvals/{id}/redeem",
    tag = "approvals",
    params(("id" = String, Path, description = "the approval id, `apr_…`")),
    responses(
        (status = 201, description = "the task or the issued lease (`Cache-Control: no-store`)", body = RedeemedSchema),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn redeem(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let r = s.broker.redeem_approval(&p, &id).await?;
    let mut res = (StatusCode::CREATED, Json(r)).into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

/// Report secrets found by a scanner; every live keymint token among them is revoked as leaked (admin).
#[utoipa::path(
    post,
    path = "/v1/leaks",
    tag = "audit",
    request_body = keymint_proto::LeakReport,
    responses(
        (status = 200, description = "what was recorded and revoked", body = keymint_proto::LeaksRecorded),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn report_leaks(
    State(s): State<AppState>,
    Auth(p): Auth,
    Body(req): Body<keymint_proto::LeakReport>,
) -> ApiResult<Json<keymint_proto::LeaksRecorded>> {
    // A task of its own, so that the report runs to its end when the caller
    // stops waiting: a provider's leak response may outlast the caller's
    // deadline, and a request dropped half-way would leave the rest of the
    // report's keys unanswered.
    // The caller's address goes with it (policy's `context.source_ip`).
    let broker = Arc::clone(&s.broker);
    let ip = crate::broker::SOURCE_IP.try_with(|ip| *ip).ok();
    let run = tokio::spawn(async move {
        match ip {
            Some(ip) => {
                crate::broker::SOURCE_IP
                    .scope(ip, broker.report_leaks(&p, req))
                    .await
            }
            None => broker.report_leaks(&p, req).await,
        }
    });
    match run.await {
        Ok(r) => Ok(Json(r?)),
        Err(e) => {
            tracing::error!(error = %e, "the leak report stopped");
            Err(BrokerError::Unavailable(
                "the leak report stopped; the server log has details".into(),
            )
            .into())
        }
    }
}

/// Revoke one lease.
#[utoipa::path(
    post,
    path = "/v1/leases/{id}/revoke",
    tag = "leases",
    params(("id" = String, Path, description = "the lease id, `lse_…`")),
    responses(
        (status = 200, description = "the lease", body = keymint_proto::Lease),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn revoke_lease(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<keymint_proto::Lease>> {
    Ok(Json(s.broker.revoke_lease(&p, &id).await?))
}

/// Revoke every live lease of a task, workload or role (admin).
#[utoipa::path(
    post,
    path = "/v1/leases/revoke",
    tag = "leases",
    request_body = RevokeLeases,
    responses(
        (status = 200, description = "the leases revoked", body = Revoked),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn revoke_leases(
    State(s): State<AppState>,
    Auth(p): Auth,
    Body(req): Body<RevokeLeases>,
) -> ApiResult<Json<Revoked>> {
    let sel = match (req.task, req.workload, req.role) {
        (Some(t), None, None) => LeaseSelector::Task(t),
        (None, Some(w), None) => LeaseSelector::Workload(w),
        (None, None, Some(r)) => LeaseSelector::Role(r),
        _ => {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                "exactly one of `task`, `workload` or `role` must be given",
            ));
        }
    };
    let revoked = s.broker.revoke_many(&p, sel, EndReason::Revoked).await?;
    Ok(Json(Revoked { revoked }))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
struct IntrospectForm {
    /// The token to look at.
    #[schema(required = true)]
    token: Option<String>,
    #[allow(dead_code, reason = "RFC 7662 allows it; keymint has one token type")]
    token_type_hint: Option<String>,
}

/// RFC 7662 token introspection (admin).
#[utoipa::path(
    post,
    path = "/v1/introspect",
    tag = "leases",
    request_body(content((IntrospectForm = "application/x-www-form-urlencoded"), (IntrospectForm = "application/json"))),
    responses(
        (status = 200, description = "what the token is, or `active: false` (`Cache-Control: no-store`)", body = keymint_proto::Introspection),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn introspect(State(s): State<AppState>, Auth(p): Auth, req: Request) -> ApiResult<Response> {
    let form = is_media_type(
        req.headers().get(header::CONTENT_TYPE),
        "application/x-www-form-urlencoded",
    );
    let bytes = read_limited(req, &s).await?;
    let parsed: IntrospectForm = if form {
        serde_urlencoded::from_bytes(&bytes)
            .map_err(|_| ApiError::new(ErrorCode::InvalidRequest, "invalid form body"))?
    } else {
        serde_json::from_slice(&bytes).map_err(|e| describe_json_error(&e))?
    };
    let token = parsed
        .token
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidRequest, "`token` is required"))?;
    let r = s.broker.introspect(&p, &token).await?;
    let mut res = Json(r).into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AuditQuery {
    /// Events after this `seq`, oldest first; without it, the newest. At
    /// most 2^63-1 (the largest `seq`).
    after: Option<u64>,
    /// 1 to 1000; 100 if not given.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// Audit events: the newest, or those after `after` (admin).
#[utoipa::path(
    get,
    path = "/v1/audit",
    tag = "audit",
    params(AuditQuery),
    responses(
        (status = 200, description = "the events, in chain order", body = List<keymint_proto::AuditEvent>),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn audit(
    State(s): State<AppState>,
    Auth(p): Auth,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<List<keymint_proto::AuditEvent>>> {
    if !matches!(p, Principal::Admin) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "this needs the admin token",
        ));
    }
    let q: AuditQuery = query(q)?;
    let limit = limit_of(q.limit)?;
    if q.after.is_some_and(|a| i64::try_from(a).is_err()) {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("`after` must be a `seq`, at most {}", i64::MAX),
        ));
    }
    let store = s.broker.store();
    let items = match q.after {
        Some(after) => store.audit_after(after, limit).await,
        None => store.audit_tail(limit).await,
    }
    .map_err(BrokerError::from)?;
    Ok(Json(List { items }))
}

/// Check the stored audit chain (admin).
#[utoipa::path(
    get,
    path = "/v1/audit/verify",
    tag = "audit",
    responses(
        (status = 200, description = "the chain report; `problem` names the first bad event", body = keymint_proto::ChainReport),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn audit_verify(
    State(s): State<AppState>,
    Auth(p): Auth,
) -> ApiResult<Json<keymint_proto::ChainReport>> {
    Ok(Json(s.broker.audit_verify(&p).await?))
}

/// Roles this server knows.
#[utoipa::path(
    get,
    path = "/v1/roles",
    tag = "policy",
    responses(
        (status = 200, description = "the roles", body = List<keymint_proto::Role>),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn roles(State(s): State<AppState>, Auth(_): Auth) -> Json<List<keymint_proto::Role>> {
    Json(List {
        items: s.broker.roles(),
    })
}

/// Upstreams of the egress proxy and whether each has a key set (admin); never the key.
#[utoipa::path(
    get,
    path = "/v1/upstreams",
    tag = "upstreams",
    responses(
        (status = 200, description = "the upstreams", body = List<UpstreamInfoSchema>),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn list_upstreams(
    State(s): State<AppState>,
    Auth(p): Auth,
) -> ApiResult<Json<List<keymint_proxy::UpstreamInfo>>> {
    if !matches!(p, Principal::Admin) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "this needs the admin token",
        ));
    }
    let items = match &s.proxy {
        Some(px) => px.upstreams().await,
        None => Vec::new(),
    };
    Ok(Json(List { items }))
}

/// The body of `POST /v1/upstreams/{id}/key`. The key is never returned,
/// logged or audited; only its fingerprint is.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SetUpstreamKey {
    /// The provider's API key.
    #[schema(value_type = String, write_only)]
    key: zeroize::Zeroizing<String>,
}

impl std::fmt::Debug for SetUpstreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SetUpstreamKey { key: <redacted> }")
    }
}

/// Set an upstream's provider key (admin). Sealed at rest; never returned by any endpoint; audited by fingerprint only.
#[utoipa::path(
    post,
    path = "/v1/upstreams/{id}/key",
    tag = "upstreams",
    params(("id" = String, Path, description = "the upstream's name")),
    request_body = SetUpstreamKey,
    responses(
        (status = 204, description = "the key is set"),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn set_upstream_key(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
    Body(req): Body<SetUpstreamKey>,
) -> ApiResult<Response> {
    if !matches!(p, Principal::Admin) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "this needs the admin token",
        ));
    }
    let Some(px) = &s.proxy else {
        return Err(ApiError::new(ErrorCode::NotFound, "no such upstream"));
    };
    use keymint_proxy::KeyError;
    match px.set_key(&id, req.key, &p.actor()).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(KeyError::UnknownUpstream(_)) => {
            Err(ApiError::new(ErrorCode::NotFound, "no such upstream"))
        }
        Err(e @ KeyError::Invalid(_)) => {
            Err(ApiError::new(ErrorCode::InvalidRequest, e.to_string()))
        }
        Err(KeyError::Store) => Err(ApiError::new(
            ErrorCode::Internal,
            "internal error; the server log has details",
        )),
    }
}

/// The body of `POST /v1/upstreams/{id}/rotate`: empty, or the new key
/// when the operator supplies it. Never returned, logged or audited.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct RotateUpstreamKey {
    /// The new key, for a provider whose admin API cannot make one
    /// (anthropic, manual); without it keymint makes the key itself.
    #[schema(value_type = Option<String>, write_only)]
    #[serde(default)]
    key: Option<zeroize::Zeroizing<String>>,
}

impl std::fmt::Debug for RotateUpstreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RotateUpstreamKey { key: <redacted> }")
    }
}

/// Rotate an upstream's key (admin): a new key made at the provider (or
/// supplied), verified, switched to on every replica, and the old key
/// revoked after the grace period. On any failure the old key stays in
/// use. Audited by fingerprint only (docs/design/0035).
#[utoipa::path(
    post,
    path = "/v1/upstreams/{id}/rotate",
    tag = "upstreams",
    params(("id" = String, Path, description = "the upstream's name")),
    request_body(content = RotateUpstreamKey, description = "optional; an empty body is `{}`"),
    responses(
        (status = 200, description = "the key in use now, by fingerprint, and when the old one is revoked", body = keymint_proto::UpstreamRotated),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn rotate_upstream_key(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
    Body(req): Body<RotateUpstreamKey>,
) -> ApiResult<Json<keymint_proto::UpstreamRotated>> {
    Ok(Json(s.broker.rotate_upstream(&p, &id, req.key).await?))
}

/// The body of `POST /v1/mcp/{name}/credential`. The credential is never
/// returned, logged or audited; only its fingerprint is.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SetMcpCredential {
    /// The bearer token keymint presents to the MCP server.
    #[schema(value_type = String, write_only)]
    token: zeroize::Zeroizing<String>,
}

impl std::fmt::Debug for SetMcpCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SetMcpCredential { token: <redacted> }")
    }
}

/// Set the bearer credential keymint presents to an MCP server it fronts (admin; `credential = "bearer"`). Sealed at rest; never returned; audited by fingerprint only (docs/design/0031).
#[utoipa::path(
    post,
    path = "/v1/mcp/{name}/credential",
    tag = "mcp",
    params(("name" = String, Path, description = "the `[[mcp.servers]]` entry's name")),
    request_body = SetMcpCredential,
    responses(
        (status = 204, description = "the credential is set"),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn set_mcp_credential(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(name): Path<String>,
    Body(req): Body<SetMcpCredential>,
) -> ApiResult<Response> {
    s.broker.set_mcp_credential(&p, &name, &req.token).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Rotate keymint's admin password on a database (admin).
#[utoipa::path(
    post,
    path = "/v1/databases/{name}/rotate",
    tag = "databases",
    params(("name" = String, Path, description = "the database's name")),
    responses(
        (status = 200, description = "when and to what fingerprint it was rotated", body = keymint_proto::DatabaseRotated),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn rotate_database(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(name): Path<String>,
) -> ApiResult<Json<keymint_proto::DatabaseRotated>> {
    Ok(Json(s.broker.rotate_database_admin(&p, &name).await?))
}

/// A public, cacheable JSON document of the issuer; 404 when keymint is
/// not an issuer.
fn issuer_document(doc: Option<serde_json::Value>) -> ApiResult<Response> {
    let Some(doc) = doc else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "keymint is not an OIDC issuer here (no `[issuer]`, no jwt or aws role)",
        ));
    };
    let mut res = Json(doc).into_response();
    // A verifier may cache it this long; a new key is published
    // `publish_ahead` (default 10 minutes) before it signs.
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("public, max-age=300"),
    );
    Ok(res)
}

/// OpenID Provider metadata (OIDC Discovery): `issuer`, `jwks_uri`, the
/// signing algorithms. No authentication.
#[utoipa::path(
    get,
    path = "/.well-known/openid-configuration",
    tag = "issuer",
    responses(
        (status = 200, description = "the discovery document", body = Object),
        (status = 404, description = "keymint is not an issuer here", body = Problem),
    ),
)]
async fn openid_configuration(State(s): State<AppState>) -> ApiResult<Response> {
    issuer_document(s.broker.issuer_discovery())
}

/// The issuer's JWK Set: every key that signs, will sign, or signed a
/// token not yet expired. No authentication.
#[utoipa::path(
    get,
    path = "/.well-known/jwks.json",
    tag = "issuer",
    responses(
        (status = 200, description = "the JWK Set (RFC 7517)", body = Object),
        (status = 404, description = "keymint is not an issuer here", body = Problem),
    ),
)]
async fn jwks(State(s): State<AppState>) -> ApiResult<Response> {
    issuer_document(s.broker.issuer_jwks())
}

/// Rotate the issuer's signing keys (admin): new keys are published now
/// and sign after `publish_ahead`; the old ones stay published until the
/// last token they signed expires.
#[utoipa::path(
    post,
    path = "/v1/issuer/rotate",
    tag = "issuer",
    responses(
        (status = 200, description = "the new keys, per algorithm", body = [Object]),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn rotate_issuer(
    State(s): State<AppState>,
    Auth(p): Auth,
) -> ApiResult<Json<Vec<keymint_issuer::Rotated>>> {
    Ok(Json(s.broker.rotate_issuer_keys(&p).await?))
}

/// An SSH CA's public key, for sshd's `TrustedUserCAKeys`.
#[utoipa::path(
    get,
    path = "/v1/ssh/cas/{name}",
    tag = "ssh",
    params(("name" = String, Path, description = "the CA's name")),
    responses(
        (status = 200, description = "the CA", body = keymint_proto::SshCa),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn ssh_ca(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(name): Path<String>,
) -> ApiResult<Json<keymint_proto::SshCa>> {
    let public_key = s.broker.ssh_ca_public_key(&p, &name).await?;
    Ok(Json(keymint_proto::SshCa { name, public_key }))
}

/// `POST /v1/ssh/cas/{name}/key`: the key is never logged or returned.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ImportCa {
    /// The CA's Ed25519 private key, OpenSSH format, unencrypted.
    #[schema(value_type = String, write_only)]
    private_key: zeroize::Zeroizing<String>,
    /// Replace the CA's existing key.
    #[serde(default)]
    replace: bool,
}

impl std::fmt::Debug for ImportCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImportCa { private_key: <redacted> }")
    }
}

/// Import an existing Ed25519 CA key (OpenSSH format, unencrypted); sealed, never returned (admin). Replacing a key needs `replace`.
#[utoipa::path(
    post,
    path = "/v1/ssh/cas/{name}/key",
    tag = "ssh",
    params(("name" = String, Path, description = "the CA's name")),
    request_body = ImportCa,
    responses(
        (status = 200, description = "the CA", body = keymint_proto::SshCa),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn import_ssh_ca(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(name): Path<String>,
    Body(req): Body<ImportCa>,
) -> ApiResult<Json<keymint_proto::SshCa>> {
    let public_key = s
        .broker
        .import_ssh_ca(&p, &name, &req.private_key, req.replace)
        .await?;
    Ok(Json(keymint_proto::SshCa { name, public_key }))
}

/// The CA's OpenSSH KRL, binary, for sshd's `RevokedKeys`.
#[utoipa::path(
    get,
    path = "/v1/ssh/cas/{name}/krl",
    tag = "ssh",
    params(("name" = String, Path, description = "the CA's name")),
    responses(
        (status = 200, description = "the KRL, binary (`Cache-Control: no-store`)", body = [u8], content_type = "application/octet-stream"),
        ApiErrors,
    ),
    security(("bearer" = [])),
)]
async fn ssh_krl(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let krl = s.broker.ssh_krl(&p, &name).await?;
    let mut res = krl.into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    Ok(res)
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such endpoint")
}

pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "method not allowed on this endpoint",
    )
}

async fn count_responses(
    State(s): State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    // The peer's address, for policy (`context.source_ip`): scoped to this
    // request's future, absent when the listener did not record it.
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let res = match peer {
        Some(ip) => crate::broker::SOURCE_IP.scope(ip, next.run(req)).await,
        None => next.run(req).await,
    };
    s.broker.metrics.http(res.status().as_u16());
    res
}

/// Every route of the API, each registered once with its OpenAPI
/// operation: the router serves exactly what the document lists.
fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::build())
        .routes(routes!(health))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(start_task, list_tasks))
        .routes(routes!(get_task))
        .routes(routes!(heartbeat))
        .routes(routes!(end_task))
        .routes(routes!(revoke_task))
        .routes(routes!(issue_lease))
        .routes(routes!(list_leases))
        .routes(routes!(revoke_leases))
        .routes(routes!(get_lease))
        .routes(routes!(renew_lease))
        .routes(routes!(revoke_lease))
        .routes(routes!(introspect))
        .routes(routes!(set_mcp_credential))
        .routes(routes!(audit))
        .routes(routes!(audit_verify))
        .routes(routes!(roles))
        .routes(routes!(report_leaks))
        .routes(routes!(list_inventory, register_inventory))
        .routes(routes!(inventory_findings))
        .routes(routes!(import_inventory))
        .routes(routes!(show_inventory, update_inventory))
        .routes(routes!(retire_inventory))
        .routes(routes!(report))
        .routes(routes!(list_suspensions, add_suspension))
        .routes(routes!(lift_suspension))
        .routes(routes!(policy_info))
        .routes(routes!(reload_policy))
        .routes(routes!(list_approvals))
        .routes(routes!(get_approval))
        .routes(routes!(approve))
        .routes(routes!(deny_approval))
        .routes(routes!(redeem))
        .routes(routes!(create_entry, list_entries))
        .routes(routes!(get_entry, delete_entry))
        .routes(routes!(node_watch))
        .routes(routes!(list_upstreams))
        .routes(routes!(set_upstream_key))
        .routes(routes!(rotate_upstream_key))
        .routes(routes!(rotate_database))
        .routes(routes!(ssh_ca))
        .routes(routes!(ssh_krl))
        .routes(routes!(import_ssh_ca))
        .routes(routes!(openid_configuration))
        .routes(routes!(jwks))
        .routes(routes!(rotate_issuer))
}

/// The OpenAPI document of the API, generated from the handlers'
/// annotations and the wire types.
pub fn openapi() -> OpenApi {
    let mut doc = api_routes().into_openapi();
    optional_empty_bodies(&mut doc);
    doc
}

/// An empty body reads as `{}` ([`Body`]), so a body whose schema requires
/// no property may be left out: its `requestBody` is not `required`.
fn optional_empty_bodies(doc: &mut OpenApi) {
    use utoipa::openapi::RefOr;
    use utoipa::openapi::schema::Schema;
    let Some(components) = &doc.components else {
        return;
    };
    let requires_nothing = |schema: &Option<RefOr<Schema>>| {
        let Some(RefOr::Ref(r)) = schema else {
            return false;
        };
        let name = r.ref_location.trim_start_matches("#/components/schemas/");
        matches!(
            components.schemas.get(name),
            Some(RefOr::T(Schema::Object(o))) if o.required.is_empty()
        )
    };
    let mut optional = Vec::new();
    for (path, item) in &doc.paths.paths {
        for (i, op) in [&item.post, &item.put, &item.patch, &item.delete]
            .into_iter()
            .enumerate()
        {
            let Some(RefOr::T(body)) = op.as_ref().and_then(|op| op.request_body.as_ref()) else {
                continue;
            };
            let all = body.content.values().all(|c| match c {
                RefOr::T(c) => requires_nothing(&c.schema),
                RefOr::Ref(_) => false,
            });
            if all {
                optional.push((path.clone(), i));
            }
        }
    }
    for (path, i) in optional {
        if let Some(item) = doc.paths.paths.get_mut(&path) {
            let op = [
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ]
            .into_iter()
            .nth(i)
            .and_then(Option::as_mut);
            if let Some(RefOr::T(body)) = op.and_then(|op| op.request_body.as_mut()) {
                body.required = Some(utoipa::openapi::Required::False);
            }
        }
    }
}

/// The document as served: serialised once per process.
static DOCUMENT: LazyLock<Option<Bytes>> = LazyLock::new(|| match serde_json::to_vec(&openapi()) {
    Ok(json) => Some(Bytes::from(json)),
    Err(e) => {
        tracing::error!(error = %e, "the OpenAPI document could not be serialised");
        None
    }
});

/// `/v1/health` and `/metrics` alone, for a listener that serves only the
/// egress proxy (`keymint proxy`).
pub fn health_router(state: AppState) -> Router {
    let (router, _) = OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(metrics))
        .split_for_parts();
    router.with_state(state)
}

pub fn router(state: AppState) -> Router {
    let max_body = state.max_body;
    // Built here, at start, rather than by the first request.
    LazyLock::force(&DOCUMENT);
    let (router, _) = api_routes().split_for_parts();
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_responses,
        ))
        .with_state(state)
}

// ------------------------------------------------------- OpenAPI document

/// The frame of the document: what the handlers do not say themselves.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "keymint",
        description = "Short-lived, identity-bound, task-scoped credentials for AI agents. Errors are RFC 9457 problem documents (`application/problem+json`) with a stable `code`."
    ),
    components(schemas(Problem))
)]
struct ApiDoc;

impl ApiDoc {
    fn build() -> OpenApi {
        use utoipa::OpenApi as _;
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let mut doc = Self::openapi();
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(
                            "the admin token (`kma_…`), an operator or node token, a task token (`kmt_…`) or a workload JWT",
                        ))
                        .build(),
                ),
            );
        doc
    }
}

/// The problem+json answers every authenticated operation may give: one
/// response per status, naming the stable codes it carries.
struct ApiErrors;

impl utoipa::IntoResponses for ApiErrors {
    fn responses() -> std::collections::BTreeMap<
        String,
        utoipa::openapi::RefOr<utoipa::openapi::response::Response>,
    > {
        use utoipa::openapi::content::ContentBuilder;
        use utoipa::openapi::example::ExampleBuilder;
        use utoipa::openapi::header::HeaderBuilder;
        use utoipa::openapi::response::ResponseBuilder;
        use utoipa::openapi::schema::{ObjectBuilder, Ref, Type};

        let mut by_status: std::collections::BTreeMap<u16, Vec<ErrorCode>> = Default::default();
        for code in ErrorCode::ALL {
            // 405 is the router's answer to a method an operation does not
            // have, not an answer of the operation.
            if code != ErrorCode::MethodNotAllowed {
                by_status.entry(code.status()).or_default().push(code);
            }
        }
        by_status
            .into_iter()
            .map(|(status, codes)| {
                let names = codes
                    .iter()
                    .map(|c| format!("`{}`", c.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ");
                let examples = codes.iter().map(|code| {
                    let problem = serde_json::to_value(code.problem(code.title()));
                    let example = ExampleBuilder::new().value(problem.ok()).build();
                    (code.as_str(), example)
                });
                let content = ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .examples_from_iter(examples);
                let mut response = ResponseBuilder::new()
                    .description(format!("a problem document; `code` is one of {names}"))
                    .content("application/problem+json", content.build());
                if status == 401 {
                    response = response.header(
                        "WWW-Authenticate",
                        HeaderBuilder::new()
                            .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                            .description(Some("`Bearer`"))
                            .build(),
                    );
                }
                (status.to_string(), response.build().into())
            })
            .collect()
    }
}

// Schemas of bodies whose Rust types live where no `ToSchema` derive can
// go (another crate, or a module that is not the API's). Each one is
// checked against the real type by a test below, so neither can drift.

// keymint_proxy::UpstreamInfo
/// An upstream of the egress proxy, as the API shows it: never its key.
#[derive(ToSchema)]
#[schema(as = UpstreamInfo)]
#[expect(dead_code, reason = "a schema only")]
struct UpstreamInfoSchema {
    name: String,
    kind: keymint_core::role::UpstreamKind,
    base_url: String,
    /// Whether a provider key is set (never the key).
    key_set: bool,
}

// entries::NewEntry
/// A new registration entry: which processes on a node are a workload.
#[derive(ToSchema)]
#[schema(as = NewEntry)]
#[serde(deny_unknown_fields)]
#[expect(dead_code, reason = "a schema only")]
struct NewEntrySchema {
    /// The workload a matching process is.
    workload: String,
    /// The node whose agent may attest it.
    node: String,
    selectors: SelectorsSchema,
    /// Extra attributes for policy.
    #[serde(default)]
    attributes: std::collections::BTreeMap<String, String>,
}

// keymint_attest::Selectors
/// What a process must be, all of it; at least one.
#[derive(ToSchema)]
#[schema(as = Selectors, min_properties = 1)]
#[serde(deny_unknown_fields)]
#[expect(dead_code, reason = "a schema only")]
struct SelectorsSchema {
    uid: Option<u32>,
    gid: Option<u32>,
    /// An absolute path.
    exe_path: Option<String>,
    #[schema(pattern = "^[0-9a-fA-F]{64}$")]
    exe_sha256: Option<String>,
    cgroup_prefix: Option<String>,
    #[schema(pattern = "^[0-9a-fA-F]{64}$")]
    container_id: Option<String>,
}

// approvals::Redeemed
/// What redeeming an approval gave: the task or the issued lease that was
/// asked for.
#[derive(ToSchema)]
#[schema(as = Redeemed)]
#[serde(untagged)]
#[expect(dead_code, reason = "a schema only")]
enum RedeemedSchema {
    Task(keymint_proto::Task),
    Lease(keymint_proto::IssuedLease),
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashSet};

    use serde_json::{Value, json};

    use super::*;

    fn document() -> Value {
        serde_json::to_value(openapi()).unwrap()
    }

    #[test]
    fn serde_errors_are_told_without_the_callers_value() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[expect(dead_code, reason = "only deserialised")]
        struct S {
            ttl: Option<u32>,
            status: Option<EndStatusLike>,
        }
        #[derive(Debug, Deserialize)]
        #[serde(rename_all = "snake_case")]
        enum EndStatusLike {
            Completed,
        }
        let secret = "sk-proj-NOTREAL0123456789abcdef";
        for (body, what, expected) in [
            (
                format!(r#"{{"{secret}": 1}}"#),
                "unknown field at line 1 column",
                ", expected `ttl` or `status`",
            ),
            (
                format!(r#"{{"x`, expected `evil {secret}": 1}}"#),
                "unknown field at line 1 column",
                ", expected `ttl` or `status`",
            ),
            (
                format!(r#"{{"status": "{secret}"}}"#),
                "unknown variant at line 1 column",
                ", expected `completed`",
            ),
            (
                format!(r#"{{"ttl": "{secret}"}}"#),
                "invalid type at line 1 column",
                ", expected u32",
            ),
            (
                r#"{"ttl": 99999999999}"#.to_owned(),
                "invalid value at line 1 column",
                ", expected u32",
            ),
        ] {
            let e = serde_json::from_str::<S>(&body).unwrap_err();
            let p = describe_json_error(&e);
            let shown = format!("{p:?}");
            assert!(
                !shown.contains("NOTREAL") && !shown.contains("evil"),
                "{shown}"
            );
            assert!(
                shown.contains(what) && shown.contains(&format!("{expected}\", ")),
                "{shown}"
            );
        }
        let e = serde_urlencoded::from_str::<S>(&format!("status={secret}")).unwrap_err();
        let m = e.to_string();
        let (what, x) = describe_serde_message(&m);
        assert_eq!(
            (what.as_str(), x),
            ("unknown variant", Some("expected `completed`"))
        );
    }

    /// Every operation: (method, path, operation).
    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let mut ops = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                ops.push((method.clone(), path.clone(), op.clone()));
            }
        }
        ops
    }

    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(r)) => out.push(r.clone()),
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn the_document_is_openapi_3_1_and_every_ref_resolves() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["info"]["title"], "keymint");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for name in [
            "Task",
            "Lease",
            "Role",
            "Problem",
            "IssuedLease",
            "Credential",
        ] {
            assert!(schemas.contains_key(name), "no schema for `{name}`");
        }
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(all.len() > 50, "the document references its schemas");
        for r in all {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("`{r}` is not a reference to a schema"));
            assert!(schemas.contains_key(name), "`{r}` does not resolve");
        }
        let mut ids = HashSet::new();
        for (method, path, op) in operations(&doc) {
            assert!(
                ["get", "post", "delete"].contains(&method.as_str()),
                "{method} {path}"
            );
            let id = op["operationId"].as_str().unwrap().to_owned();
            assert!(ids.insert(id), "{method} {path}: operationId used twice");
            assert!(op["summary"].as_str().is_some_and(|s| !s.is_empty()));
            assert!(op["tags"].as_array().is_some_and(|t| t.len() == 1));
            let responses = op["responses"].as_object().unwrap();
            assert!(
                responses.keys().any(|k| k.starts_with('2')),
                "{method} {path} has no success response"
            );
            // Each `{name}` in the path is a required path parameter, and
            // there is no other.
            let in_path: BTreeSet<&str> = path
                .split('/')
                .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            let declared: BTreeSet<&str> = op["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["in"] == "path")
                        .inspect(|p| assert_eq!(p["required"], true, "{method} {path}"))
                        .map(|p| p["name"].as_str().unwrap())
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(in_path, declared, "{method} {path}");
        }
    }

    #[test]
    fn every_operation_but_health_and_metrics_needs_a_bearer_token_and_answers_problems() {
        let doc = document();
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        assert!(doc.get("security").is_none());
        let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        let problem_codes = &doc["components"]["schemas"]["Problem"]["properties"]["code"]["enum"];
        assert_eq!(problem_codes, &json!(codes));
        let mut open = Vec::new();
        for (method, path, op) in operations(&doc) {
            let Some(security) = op.get("security") else {
                open.push(format!("{method} {path}"));
                continue;
            };
            assert_eq!(security, &json!([{"bearer": []}]), "{method} {path}");
            let mut seen = BTreeSet::new();
            for (status, response) in op["responses"].as_object().unwrap() {
                if !status.starts_with(['4', '5']) {
                    continue;
                }
                let content = &response["content"]["application/problem+json"];
                assert_eq!(
                    content["schema"]["$ref"], "#/components/schemas/Problem",
                    "{method} {path} {status}"
                );
                for (code, example) in content["examples"].as_object().unwrap() {
                    assert_eq!(example["value"]["code"], code.as_str());
                    assert_eq!(example["value"]["status"].to_string(), *status);
                    assert!(response["description"].as_str().unwrap().contains(code));
                    seen.insert(code.clone());
                }
                if status == "401" {
                    assert!(response["headers"].get("WWW-Authenticate").is_some());
                }
            }
            let expected: BTreeSet<String> = ErrorCode::ALL
                .iter()
                .filter(|c| **c != ErrorCode::MethodNotAllowed)
                .map(|c| c.as_str().to_owned())
                .collect();
            assert_eq!(seen, expected, "{method} {path}");
        }
        // The issuer's documents are public by design (verifiers such as
        // AWS STS fetch them without credentials).
        assert_eq!(
            open,
            [
                "get /v1/health",
                "get /metrics",
                "get /.well-known/openid-configuration",
                "get /.well-known/jwks.json"
            ]
        );
    }

    #[test]
    fn a_body_that_may_be_empty_is_optional() {
        let doc = document();
        let required = |method: &str, path: &str| {
            doc["paths"][path][method]["requestBody"]["required"].clone()
        };
        // Every field optional: an empty body is `{}`.
        for (method, path) in [
            ("post", "/v1/tasks"),
            ("post", "/v1/tasks/{id}/revoke"),
            ("post", "/v1/tasks/{id}/leases"),
            ("post", "/v1/leases/{id}/renew"),
            ("post", "/v1/approvals/{id}/approve"),
        ] {
            assert_eq!(required(method, path), false, "{method} {path}");
        }
        for (method, path) in [
            ("post", "/v1/tasks/{id}/end"),
            ("post", "/v1/upstreams/{id}/key"),
            ("post", "/v1/entries"),
            ("post", "/v1/introspect"),
        ] {
            assert_eq!(required(method, path), true, "{method} {path}");
        }
    }

    fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
        &doc["components"]["schemas"][name]
    }

    fn properties(schema: &Value) -> BTreeSet<String> {
        schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    #[test]
    fn schemas_written_beside_foreign_types_match_them() {
        let doc = document();

        // UpstreamInfo: what the API serialises has exactly the documented
        // fields, and every documented kind is one the proxy knows.
        let real = keymint_proxy::UpstreamInfo {
            name: "openai".into(),
            kind: keymint_proxy::config::UpstreamKind::Openai,
            base_url: "https://api.example.invalid/v1".into(),
            key_set: false,
        };
        let real = serde_json::to_value(real).unwrap();
        let info = schema(&doc, "UpstreamInfo");
        assert_eq!(
            properties(info),
            real.as_object().unwrap().keys().cloned().collect()
        );
        assert_eq!(
            info["required"].as_array().unwrap().len(),
            real.as_object().unwrap().len()
        );
        for kind in schema(&doc, "UpstreamKind")["enum"].as_array().unwrap() {
            serde_json::from_value::<keymint_proxy::config::UpstreamKind>(kind.clone()).unwrap();
        }

        // Selectors: an object with every documented selector is a valid
        // selector set, and reads back as the same fields.
        let selectors = json!({
            "uid": 1000,
            "gid": 1000,
            "exe_path": "/usr/bin/agent",
            "exe_sha256": "ab".repeat(32),
            "cgroup_prefix": "/system.slice/agent.service",
            "container_id": "cd".repeat(32),
        });
        assert_eq!(
            properties(schema(&doc, "Selectors")),
            selectors.as_object().unwrap().keys().cloned().collect()
        );
        let parsed: keymint_attest::Selectors = serde_json::from_value(selectors.clone()).unwrap();
        assert_eq!(serde_json::to_value(parsed).unwrap(), selectors);

        // NewEntry: every documented field is accepted, each required one
        // is required, and nothing else is accepted.
        let new_entry = schema(&doc, "NewEntry");
        let full = json!({
            "workload": "ticket-bot",
            "node": "node-1",
            "selectors": {"uid": 1000},
            "attributes": {"team": "support"},
        });
        assert_eq!(
            properties(new_entry),
            full.as_object().unwrap().keys().cloned().collect()
        );
        serde_json::from_value::<crate::entries::NewEntry>(full.clone()).unwrap();
        for field in full.as_object().unwrap().keys() {
            let mut without = full.clone();
            without.as_object_mut().unwrap().remove(field);
            let required = new_entry["required"]
                .as_array()
                .unwrap()
                .contains(&json!(field));
            let parsed = serde_json::from_value::<crate::entries::NewEntry>(without);
            assert_eq!(parsed.is_err(), required, "`{field}`");
        }
        assert_eq!(new_entry["additionalProperties"], false);
        let mut extra = full;
        extra["extra"] = json!(1);
        assert!(serde_json::from_value::<crate::entries::NewEntry>(extra).is_err());
    }
}
