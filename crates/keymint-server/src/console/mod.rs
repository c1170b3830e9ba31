//! The operator console: server-rendered HTML under `/ui`.
//!
//! Everything the console shows or does goes through the same [`Broker`]
//! calls as the API, with the signed-in admin or operator as the principal,
//! so access rules and audit events are the API's own. The pieces:
//!
//! - `session`: sign-in with the admin or an operator token (POSTed in a
//!   form, never in a URL), a session table in memory keyed by a keyed hash
//!   of a random id, an `HttpOnly`, `SameSite=Strict`, `Path=/ui` cookie
//!   (`Secure` with TLS), 30 minutes idle and 8 hours at most, sign-out;
//!   CSRF: a per-session token in every form plus an `Origin` check;
//! - `html`: the one escaping helper and the page frame;
//! - `pages`: overview, tasks and leases, approvals, audit, upstreams and
//!   spend, registration entries; each list is one page from the store
//!   (a cursor, never an offset, never everything);
//! - `spend`: usage per upstream, role and workload from `proxy.usage`
//!   audit events, and a small SVG chart;
//! - `assets/`: the stylesheet and a few lines of script, compiled into
//!   the binary; the Content-Security-Policy allows nothing else.
//!
//! Pages for later features (inventory, findings, replicas) add a handler
//! in `pages`, a route in [`router`] and an entry in `html::NAV`.
//! Decisions: docs/design/0018-console.md.

pub(crate) mod html;
mod pages;
mod session;
mod spend;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::broker::Broker;

pub use session::{IDLE_SECS, MAX_SECS};

/// What the console's handlers share.
#[derive(Debug)]
pub struct Console {
    broker: Arc<Broker>,
    proxy: Option<Arc<keymint_proxy::Proxy>>,
    sessions: session::Sessions,
    /// The listener speaks TLS: cookies are `Secure` and the expected
    /// `Origin` is `https://…`.
    tls: bool,
    /// The last chain verification, for the overview.
    last_verify: std::sync::Mutex<Option<pages::Verified>>,
}

type Shared = State<Arc<Console>>;

/// The console's routes, all under `/ui`.
pub fn router(broker: Arc<Broker>, proxy: Option<Arc<keymint_proxy::Proxy>>, tls: bool) -> Router {
    let console = Arc::new(Console {
        broker,
        proxy,
        sessions: session::Sessions::default(),
        tls,
        last_verify: std::sync::Mutex::new(None),
    });
    Router::new()
        .route("/ui", get(pages::overview))
        .route("/ui/", get(pages::overview))
        .route(
            "/ui/login",
            get(session::login_page).post(session::login_submit),
        )
        .route("/ui/logout", post(session::logout))
        .route("/ui/static/console.css", get(css))
        .route("/ui/static/console.js", get(js))
        .route("/ui/tasks", get(pages::tasks))
        .route("/ui/tasks/{id}", get(pages::task))
        .route(
            "/ui/tasks/{id}/end",
            get(pages::end_task_confirm).post(pages::end_task),
        )
        .route("/ui/leases", get(pages::leases))
        .route("/ui/leases/{id}", get(pages::lease))
        .route(
            "/ui/leases/{id}/revoke",
            get(pages::revoke_lease_confirm).post(pages::revoke_lease),
        )
        .route("/ui/approvals", get(pages::approvals))
        .route("/ui/approvals/{id}", get(pages::approval))
        .route("/ui/approvals/{id}/decide", post(pages::decide))
        .route("/ui/audit", get(pages::audit))
        .route("/ui/audit/verify", get(pages::audit_verify))
        .route("/ui/audit/export", get(pages::audit_export))
        .route("/ui/upstreams", get(pages::upstreams))
        .route("/ui/entries", get(pages::entries))
        .route("/ui/{*rest}", get(pages::not_found).post(pages::not_found))
        .method_not_allowed_fallback(pages::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(console)
}

/// The largest form the console reads.
const MAX_FORM: usize = 16 * 1024;

/// A form's bytes. A body over [`MAX_FORM`], or one that cannot be read,
/// is answered with the console's error page, not axum's `text/plain`.
pub(crate) struct FormBody(pub bytes::Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for FormBody {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        use axum::http::StatusCode;
        <bytes::Bytes as axum::extract::FromRequest<S>>::from_request(req, state)
            .await
            .map(Self)
            .map_err(|r| {
                if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    html::error_page(
                        None,
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "Too large",
                        &format!("the form exceeds {MAX_FORM} bytes"),
                    )
                } else {
                    html::error_page(
                        None,
                        StatusCode::BAD_REQUEST,
                        "Bad request",
                        "the form could not be read",
                    )
                }
            })
    }
}

/// An id from the page's path. One that cannot be read (a bad
/// percent-encoding, bytes that are not UTF-8: `/ui/tasks/%ff`) is
/// answered with the console's error page, not axum's `text/plain`.
pub(crate) struct PathId(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for PathId {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Response> {
        <axum::extract::Path<String> as axum::extract::FromRequestParts<S>>::from_request_parts(
            parts, state,
        )
        .await
        .map(|axum::extract::Path(id)| Self(id))
        .map_err(|_| {
            html::error_page(
                None,
                axum::http::StatusCode::BAD_REQUEST,
                "Bad request",
                "the address could not be read: its path is not valid UTF-8",
            )
        })
    }
}

/// The stylesheet and script, compiled in.
const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

async fn css() -> Response {
    asset(CSS, "text/css; charset=utf-8")
}

async fn js() -> Response {
    asset(JS, "text/javascript; charset=utf-8")
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=300"),
    );
    res
}

/// Nothing but the console's own files may load or run; the console may
/// not be framed; pages are not cached (they show live state).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; form-action 'self'; base-uri 'none'; object-src 'none'; \
     frame-ancestors 'none'";

/// The console's own headers. `Strict-Transport-Security` is not among
/// them: every answer of a TLS listener carries it, the console's, the
/// API's and the proxy's alike (`cores::connection_service`).
async fn security_headers(req: Request, next: axum::middleware::Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}
