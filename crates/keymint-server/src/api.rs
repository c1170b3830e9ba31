//! The `/v1` HTTP API: thin handlers over the [`Broker`].
//!
//! Errors are RFC 9457 problem documents with a stable `code`. Internal
//! detail (store errors) goes to the log, never into a body. Bodies are
//! size-limited, must be JSON, and unknown fields are refused.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Path, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
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

use crate::broker::{Broker, BrokerError, Principal};

pub const OPENAPI: &str = include_str!("openapi.json");

#[derive(Debug, Clone)]
pub struct AppState {
    pub broker: Arc<Broker>,
    pub max_body: usize,
    pub has_audit_file: bool,
    /// The egress proxy, for its upstream keys and metrics.
    pub proxy: Option<Arc<keymint_proxy::Proxy>>,
}

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    detail: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
        }
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
                RuleError::TtlTooLong { .. } | RuleError::TtlPastTaskEnd { .. } => {
                    ErrorCode::TtlExceedsLimit
                }
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
                | RuleError::BadText { .. } => ErrorCode::InvalidRequest,
            },
            BrokerError::NotFound(_) => ErrorCode::NotFound,
            BrokerError::Forbidden(_) => ErrorCode::Forbidden,
            BrokerError::Unauthorized(_) => ErrorCode::Unauthorized,
            BrokerError::BadRequest(_) => ErrorCode::InvalidRequest,
            BrokerError::Policy { verdict, .. } => match verdict {
                keymint_policy::Verdict::NeedsApproval => ErrorCode::ApprovalRequired,
                _ => ErrorCode::PolicyDenied,
            },
            BrokerError::Held(_) => ErrorCode::ApprovalRequired,
            BrokerError::Unavailable(_) => ErrorCode::Unavailable,
            BrokerError::Engine(keymint_engines::EngineError::BadRequest(_)) => {
                ErrorCode::InvalidRequest
            }
            BrokerError::Engine(inner) => {
                tracing::warn!(error = %inner, "engine error");
                ErrorCode::Unavailable
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
        // A node agent acting for a workload of one of its entries.
        if let Some(entry) = parts.headers.get("x-keymint-entry") {
            let entry = entry.to_str().map_err(|_| {
                ApiError::new(ErrorCode::InvalidRequest, "bad `X-Keymint-Entry` header")
            })?;
            let attested = match parts.headers.get("x-keymint-attested") {
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

/// Who sends the request: the bearer token's principal, else the attested
/// process on the local socket, else the SPIFFE ID of an mTLS client.
async fn caller(parts: &Parts, state: &AppState) -> ApiResult<Principal> {
    let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
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

/// Who proves to present a request, besides its bearer token: the attested
/// process on the local socket (if it attests to a workload), the
/// X.509-SVID of an mTLS connection, or a workload JWT in
/// `X-Keymint-Identity`. A bad JWT there is an error.
async fn presenter(state: &AppState, parts: &Parts) -> Result<Option<Principal>, BrokerError> {
    match (
        parts.extensions.get::<crate::local::LocalPeer>(),
        parts.extensions.get::<crate::tls::PeerSvid>(),
        parts.headers.get("x-keymint-identity"),
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

/// Middleware for the proxy's routes: when a request carries a `kmt_`
/// token and proves who presents it (attested local process, X.509-SVID,
/// or a JWT in `X-Keymint-Identity`), the presenter must be the token's
/// holder. Anything else is left to the proxy's own checks.
pub async fn proxy_holder_binding(
    State(s): State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let token = keymint_proxy::presented_token(&parts.headers)
        .filter(|t| t.starts_with("kmt_"))
        .map(str::to_owned);
    if let Some(token) = token {
        let checked = match presenter(&s, &parts).await {
            Ok(Some(presenter)) => match s.broker.authenticate(&token).await {
                Ok(p @ Principal::Task { .. }) => s.broker.check_holder_of(&p, &presenter).await,
                // A bad token is the proxy's to refuse, in the provider's shape.
                _ => Ok(()),
            },
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = checked {
            return ApiError::from(e).into_response();
        }
    }
    next.run(Request::from_parts(parts, body)).await
}

/// A JSON body: `application/json`, within the size limit, no unknown
/// fields. An empty body reads as `{}`. Parse errors say where, and never
/// echo values (which could be secrets).
#[derive(Debug)]
pub struct Body<T>(pub T);

fn describe_json_error(e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    let at = format!("at line {} column {}", e.line(), e.column());
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::new(ErrorCode::InvalidJson, format!("malformed JSON {at}"))
        }
        Category::Data => {
            let msg = e.to_string();
            let head = msg.split(" at line ").next().unwrap_or("");
            let safe = [
                "unknown field",
                "missing field",
                "duplicate field",
                "unknown variant",
                "invalid value: integer",
                "invalid type: integer",
                "invalid type: null",
                "invalid type: boolean",
                "invalid type: map",
                "invalid type: sequence",
                "invalid length",
            ]
            .iter()
            .any(|p| head.starts_with(p));
            let detail = if safe {
                format!("{head} {at}")
            } else {
                format!("invalid value {at}")
            };
            ApiError::new(ErrorCode::InvalidRequest, detail)
        }
    }
}

impl<T: DeserializeOwned> FromRequest<AppState> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> ApiResult<Self> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                let mime = v.split(';').next().unwrap_or("").trim();
                mime.eq_ignore_ascii_case("application/json")
            });
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
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| describe_json_error(&e))
    }
}

async fn read_limited(req: Request, state: &AppState) -> ApiResult<Bytes> {
    Bytes::from_request(req, state).await.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("the body exceeds {} bytes", state.max_body),
            )
        } else {
            ApiError::new(ErrorCode::InvalidRequest, "the body could not be read")
        }
    })
}

/// Query parameters, strictly parsed.
fn query<T: DeserializeOwned + Default>(q: Option<String>) -> ApiResult<T> {
    match q.as_deref() {
        None | Some("") => Ok(T::default()),
        Some(s) => serde_urlencoded::from_str(s).map_err(|e| {
            let m = e.to_string();
            let detail = if m.starts_with("unknown field") || m.starts_with("unknown variant") {
                m
            } else {
                "invalid query parameter".to_owned()
            };
            ApiError::new(ErrorCode::InvalidRequest, detail)
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

async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

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

async fn openapi(_: Auth) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskQuery {
    status: Option<TaskStatus>,
    workload: Option<String>,
    role: Option<String>,
    parent: Option<String>,
    limit: Option<u32>,
}

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
        limit: limit_of(q.limit)?,
    };
    Ok(Json(List {
        items: s.broker.list_tasks(&p, f).await?,
    }))
}

async fn get_task(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<keymint_proto::Task>> {
    Ok(Json(s.broker.get_task(&p, &id).await?))
}

async fn heartbeat(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<keymint_proto::Task>> {
    Ok(Json(s.broker.heartbeat(&p, &id).await?))
}

async fn end_task(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
    Body(req): Body<EndTask>,
) -> ApiResult<Json<keymint_proto::Task>> {
    Ok(Json(
        s.broker
            .end_task(&p, &id, Some(req.status), req.reason)
            .await?,
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeTask {
    reason: Option<String>,
}

async fn revoke_task(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
    Body(req): Body<RevokeTask>,
) -> ApiResult<Json<keymint_proto::Task>> {
    Ok(Json(s.broker.end_task(&p, &id, None, req.reason).await?))
}

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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseQuery {
    task: Option<String>,
    workload: Option<String>,
    role: Option<String>,
    state: Option<LeaseState>,
    limit: Option<u32>,
}

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
        limit: limit_of(q.limit)?,
    };
    Ok(Json(List {
        items: s.broker.list_leases(&p, f).await?,
    }))
}

async fn get_lease(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<keymint_proto::Lease>> {
    Ok(Json(s.broker.get_lease(&p, &id).await?))
}

async fn renew_lease(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
    Body(req): Body<RenewLease>,
) -> ApiResult<Json<keymint_proto::Renewed>> {
    Ok(Json(s.broker.renew_lease(&p, &id, req).await?))
}

async fn policy_info(
    State(s): State<AppState>,
    Auth(p): Auth,
) -> ApiResult<Json<keymint_proto::PolicyInfo>> {
    Ok(Json(s.broker.policy_info(&p)?))
}

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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalQuery {
    status: Option<keymint_core::model::ApprovalStatus>,
    limit: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Decision {
    #[serde(default)]
    note: Option<String>,
}

async fn list_approvals(
    State(s): State<AppState>,
    Auth(p): Auth,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<List<keymint_core::model::Approval>>> {
    let q: ApprovalQuery = query(q)?;
    let items = s
        .broker
        .list_approvals(&p, q.status, q.limit.unwrap_or(100).min(1000))
        .await?;
    Ok(Json(List { items }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryQuery {
    node: Option<String>,
}

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

async fn list_entries(
    State(s): State<AppState>,
    Auth(p): Auth,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<List<keymint_core::model::RegistrationEntry>>> {
    let q: EntryQuery = query(q)?;
    let items = s.broker.list_entries(&p, q.node.as_deref()).await?;
    Ok(Json(List { items }))
}

async fn get_entry(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<keymint_core::model::RegistrationEntry>> {
    Ok(Json(s.broker.get_entry(&p, &id).await?))
}

async fn delete_entry(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<keymint_core::model::RegistrationEntry>> {
    Ok(Json(s.broker.delete_entry(&p, &id).await?))
}

async fn get_approval(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<keymint_core::model::Approval>> {
    Ok(Json(s.broker.get_approval(&p, &id).await?))
}

async fn approve(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
    Body(d): Body<Decision>,
) -> ApiResult<Json<keymint_core::model::Approval>> {
    Ok(Json(s.broker.decide_approval(&p, &id, true, d.note).await?))
}

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

async fn report_leaks(
    State(s): State<AppState>,
    Auth(p): Auth,
    Body(req): Body<keymint_proto::LeakReport>,
) -> ApiResult<Json<keymint_proto::LeaksRecorded>> {
    Ok(Json(s.broker.report_leaks(&p, req).await?))
}

async fn revoke_lease(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<keymint_proto::Lease>> {
    Ok(Json(s.broker.revoke_lease(&p, &id).await?))
}

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

#[derive(Debug, Default, Deserialize)]
struct IntrospectForm {
    token: Option<String>,
    #[allow(dead_code, reason = "RFC 7662 allows it; keymint has one token type")]
    token_type_hint: Option<String>,
}

async fn introspect(State(s): State<AppState>, Auth(p): Auth, req: Request) -> ApiResult<Response> {
    let form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    after: Option<u64>,
    limit: Option<u32>,
}

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
    let store = s.broker.store();
    let items = match q.after {
        Some(after) => store.audit_after(after, limit).await,
        None => store.audit_tail(limit).await,
    }
    .map_err(BrokerError::from)?;
    Ok(Json(List { items }))
}

async fn audit_verify(
    State(s): State<AppState>,
    Auth(p): Auth,
) -> ApiResult<Json<keymint_proto::ChainReport>> {
    Ok(Json(s.broker.audit_verify(&p).await?))
}

async fn roles(State(s): State<AppState>, Auth(_): Auth) -> Json<List<keymint_proto::Role>> {
    Json(List {
        items: s.broker.roles(),
    })
}

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
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetUpstreamKey {
    key: zeroize::Zeroizing<String>,
}

impl std::fmt::Debug for SetUpstreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SetUpstreamKey { key: <redacted> }")
    }
}

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

async fn rotate_database(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(name): Path<String>,
) -> ApiResult<Json<keymint_proto::DatabaseRotated>> {
    Ok(Json(s.broker.rotate_database_admin(&p, &name).await?))
}

async fn ssh_ca(
    State(s): State<AppState>,
    Auth(p): Auth,
    Path(name): Path<String>,
) -> ApiResult<Json<keymint_proto::SshCa>> {
    let public_key = s.broker.ssh_ca_public_key(&p, &name).await?;
    Ok(Json(keymint_proto::SshCa { name, public_key }))
}

/// `POST /v1/ssh/cas/{name}/key`: the key is never logged or returned.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportCa {
    private_key: zeroize::Zeroizing<String>,
    #[serde(default)]
    replace: bool,
}

impl std::fmt::Debug for ImportCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImportCa { private_key: <redacted> }")
    }
}

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

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
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

/// The router with every route. Paths here and in `openapi.json` are
/// checked against each other by a test.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/health"),
    ("get", "/metrics"),
    ("get", "/v1/openapi.json"),
    ("post", "/v1/tasks"),
    ("get", "/v1/tasks"),
    ("get", "/v1/tasks/{id}"),
    ("post", "/v1/tasks/{id}/heartbeat"),
    ("post", "/v1/tasks/{id}/end"),
    ("post", "/v1/tasks/{id}/revoke"),
    ("post", "/v1/tasks/{id}/leases"),
    ("get", "/v1/leases"),
    ("get", "/v1/leases/{id}"),
    ("post", "/v1/leases/{id}/renew"),
    ("post", "/v1/leases/{id}/revoke"),
    ("post", "/v1/leases/revoke"),
    ("post", "/v1/introspect"),
    ("get", "/v1/audit"),
    ("get", "/v1/audit/verify"),
    ("get", "/v1/roles"),
    ("post", "/v1/leaks"),
    ("get", "/v1/policy"),
    ("get", "/v1/approvals"),
    ("get", "/v1/approvals/{id}"),
    ("post", "/v1/approvals/{id}/approve"),
    ("post", "/v1/approvals/{id}/deny"),
    ("post", "/v1/approvals/{id}/redeem"),
    ("post", "/v1/entries"),
    ("get", "/v1/entries"),
    ("get", "/v1/entries/{id}"),
    ("delete", "/v1/entries/{id}"),
    ("post", "/v1/policy/reload"),
    ("get", "/v1/upstreams"),
    ("post", "/v1/upstreams/{id}/key"),
    ("post", "/v1/databases/{name}/rotate"),
    ("get", "/v1/ssh/cas/{name}"),
    ("get", "/v1/ssh/cas/{name}/krl"),
    ("post", "/v1/ssh/cas/{name}/key"),
];

/// `/v1/health` and `/metrics` alone, for a listener that serves only the
/// egress proxy (`keymint proxy`).
pub fn health_router(state: AppState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state)
}

pub fn router(state: AppState) -> Router {
    let max_body = state.max_body;
    Router::new()
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/tasks", post(start_task).get(list_tasks))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/tasks/{id}/heartbeat", post(heartbeat))
        .route("/v1/tasks/{id}/end", post(end_task))
        .route("/v1/tasks/{id}/revoke", post(revoke_task))
        .route("/v1/tasks/{id}/leases", post(issue_lease))
        .route("/v1/leases", get(list_leases))
        .route("/v1/leases/revoke", post(revoke_leases))
        .route("/v1/leases/{id}", get(get_lease))
        .route("/v1/leases/{id}/renew", post(renew_lease))
        .route("/v1/leases/{id}/revoke", post(revoke_lease))
        .route("/v1/introspect", post(introspect))
        .route("/v1/audit", get(audit))
        .route("/v1/audit/verify", get(audit_verify))
        .route("/v1/roles", get(roles))
        .route("/v1/leaks", post(report_leaks))
        .route("/v1/policy", get(policy_info))
        .route("/v1/approvals", get(list_approvals))
        .route("/v1/approvals/{id}", get(get_approval))
        .route("/v1/approvals/{id}/approve", post(approve))
        .route("/v1/approvals/{id}/deny", post(deny_approval))
        .route("/v1/approvals/{id}/redeem", post(redeem))
        .route("/v1/policy/reload", post(reload_policy))
        .route("/v1/entries", post(create_entry).get(list_entries))
        .route("/v1/entries/{id}", get(get_entry).delete(delete_entry))
        .route("/v1/upstreams", get(list_upstreams))
        .route("/v1/upstreams/{id}/key", post(set_upstream_key))
        .route("/v1/databases/{name}/rotate", post(rotate_database))
        .route("/v1/ssh/cas/{name}", get(ssh_ca))
        .route("/v1/ssh/cas/{name}/krl", get(ssh_krl))
        .route("/v1/ssh/cas/{name}/key", post(import_ssh_ca))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_responses,
        ))
        .with_state(state)
}
