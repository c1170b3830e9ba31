//! Sign-in, sessions and CSRF.
//!
//! A session is made by POSTing the admin or an operator token to
//! `/ui/login`; the token goes through [`Broker::authenticate`] like an API
//! bearer (a refusal is counted and audited there). The browser gets a
//! random 256-bit id in a cookie; the table keeps only its keyed hash
//! (the keyring's fingerprint), so a memory dump of the table cannot be
//! replayed as a cookie. Every POST must carry the session's CSRF token
//! (a hidden field, compared in constant time) and an `Origin` header
//! naming this server.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::extract::{FromRequestParts, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine as _;
use keymint_core::Timestamp;
use keymint_core::audit::{AuditDraft, Outcome};
use subtle::ConstantTimeEq;

use super::html::{self, esc};
use super::{Console, Shared};
use crate::broker::Principal;

/// A session ends after this long without a request.
pub const IDLE_SECS: u64 = 30 * 60;
/// And after this long whatever happens.
pub const MAX_SECS: u64 = 8 * 60 * 60;
/// At most this many sessions at once (expired ones are dropped first).
const MAX_SESSIONS: usize = 10_000;
/// At most this many for one admin or operator: past it, signing in ends
/// their least recently used session, so that one principal signing in
/// over and over cannot fill the table and keep everyone else out.
const MAX_PER_PRINCIPAL: usize = 50;
/// The session cookie's name over plain HTTP (development only).
const COOKIE: &str = "keymint_session";
/// Over TLS: a `__Host-` cookie, which the browser takes only with
/// `Secure`, `Path=/` and no `Domain`, so that no other host of the
/// domain (nor a plain-HTTP page) can set or shadow it. Plain HTTP cannot
/// have one (it needs `Secure`): there the name is [`COOKIE`].
const HOST_COOKIE: &str = "__Host-keymint_session";
/// Sent by `console.js` with its live-update fetches.
const REFRESH_HEADER: &str = "x-keymint-refresh";

#[derive(Debug, Clone)]
struct Entry {
    principal: Principal,
    csrf: String,
    created: Timestamp,
    last_seen: Timestamp,
}

impl Entry {
    fn live(&self, now: Timestamp) -> bool {
        now < self.created.plus_secs(MAX_SECS) && now < self.last_seen.plus_secs(IDLE_SECS)
    }
}

/// The session table: keyed hash of the cookie value → session.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Entry>>,
}

/// A signed-in admin or operator, for one request.
#[derive(Debug, Clone)]
pub struct Session {
    pub principal: Principal,
    pub csrf: String,
    key: String,
}

impl Session {
    pub fn is_admin(&self) -> bool {
        matches!(self.principal, Principal::Admin)
    }

    /// Who is signed in, as audit events name them.
    pub fn actor(&self) -> String {
        self.principal.actor()
    }
}

fn random_b64(n: usize) -> Option<String> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).ok()?;
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

/// The session cookie's name on this listener.
fn cookie_name(c: &Console) -> &'static str {
    if c.tls { HOST_COOKIE } else { COOKIE }
}

fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| kv.trim().strip_prefix(name)?.strip_prefix('='))
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a session; returns the cookie value and the table's key, or
    /// `None` when the table is full of live sessions or randomness failed.
    fn open(&self, c: &Console, principal: Principal, now: Timestamp) -> Option<(String, String)> {
        let id = random_b64(32)?;
        let csrf = random_b64(32)?;
        let key = c.broker.keyring().fingerprint(id.as_bytes());
        let mut map = self.lock();
        let actor = principal.actor();
        let mut own: Vec<(Timestamp, String)> = map
            .iter()
            .filter(|(_, e)| e.principal.actor() == actor)
            .map(|(k, e)| (e.last_seen, k.clone()))
            .collect();
        if own.len() >= MAX_PER_PRINCIPAL {
            own.sort_unstable();
            for (_, k) in own.iter().take(own.len() + 1 - MAX_PER_PRINCIPAL) {
                map.remove(k);
            }
        }
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, e| e.live(now));
            if map.len() >= MAX_SESSIONS {
                return None;
            }
        }
        map.insert(
            key.clone(),
            Entry {
                principal,
                csrf,
                created: now,
                last_seen: now,
            },
        );
        Some((id, key))
    }

    /// The live session of this cookie value, touched when `activity`
    /// (the operator asked for something; not a live-update fetch); an
    /// expired one is removed.
    fn find(&self, c: &Console, cookie: &str, now: Timestamp, activity: bool) -> Option<Session> {
        let key = c.broker.keyring().fingerprint(cookie.as_bytes());
        let mut map = self.lock();
        let e = map.get_mut(&key)?;
        if !e.live(now) {
            map.remove(&key);
            return None;
        }
        if activity {
            e.last_seen = now;
        }
        Some(Session {
            principal: e.principal.clone(),
            csrf: e.csrf.clone(),
            key,
        })
    }

    fn close(&self, key: &str) -> bool {
        self.lock().remove(key).is_some()
    }

    /// Ends the session of this cookie value; who had it, when it was
    /// still live.
    fn close_cookie(&self, c: &Console, cookie: &str, now: Timestamp) -> Option<Principal> {
        let key = c.broker.keyring().fingerprint(cookie.as_bytes());
        self.lock()
            .remove(&key)
            .filter(|e| e.live(now))
            .map(|e| e.principal)
    }
}

/// Why a request without a usable session is turned away.
#[derive(Debug)]
pub enum NoSession {
    /// A page: go and sign in.
    SignIn,
    /// A state change: refused outright.
    Refused,
}

impl IntoResponse for NoSession {
    fn into_response(self) -> Response {
        match self {
            Self::SignIn => Redirect::to("/ui/login").into_response(),
            Self::Refused => html::error_page(
                None,
                StatusCode::UNAUTHORIZED,
                "Not signed in",
                "sign in first; your session may have ended",
            ),
        }
    }
}

impl FromRequestParts<std::sync::Arc<Console>> for Session {
    type Rejection = NoSession;

    async fn from_request_parts(
        parts: &mut Parts,
        c: &std::sync::Arc<Console>,
    ) -> Result<Self, NoSession> {
        let reject = if parts.method == Method::GET || parts.method == Method::HEAD {
            NoSession::SignIn
        } else {
            NoSession::Refused
        };
        // The console's own live updates (`console.js`) say so: they are
        // not the operator's activity and do not keep the session alive.
        let activity = !parts.headers.contains_key(REFRESH_HEADER);
        cookie_value(&parts.headers, cookie_name(c))
            .and_then(|cookie| c.sessions.find(c, cookie, c.broker.now(), activity))
            .ok_or(reject)
    }
}

/// The origin this server is reached at, as the browser names it.
fn own_origin(c: &Console, headers: &HeaderMap) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let scheme = if c.tls { "https" } else { "http" };
    Some(format!("{scheme}://{host}"))
}

/// A state change must come from a page of this server: its `Origin` is
/// ours (browsers send it with every POST).
pub fn same_origin(c: &Console, headers: &HeaderMap) -> bool {
    let (Some(origin), Some(own)) = (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        own_origin(c, headers),
    ) else {
        return false;
    };
    origin.eq_ignore_ascii_case(&own)
}

/// The CSRF check of every POST made with a session: same origin, and the
/// form's token is the session's.
pub fn check_csrf(c: &Console, s: &Session, headers: &HeaderMap, token: &str) -> bool {
    same_origin(c, headers) && bool::from(token.as_bytes().ct_eq(s.csrf.as_bytes()))
}

/// The response to a refused CSRF check; nothing was changed. The refusal
/// is audited (`console.csrf_refused`), with fixed text only: the form
/// (`what`, a constant), whether the origin was ours, who was signed in;
/// never the request's origin or fields, which the attacker wrote. Anyone
/// can post a form, so the events are bounded as refused credentials are
/// (`Broker::record_csrf_refusal`): one by one up to a burst per window,
/// then one summary by form.
pub async fn csrf_refused(
    c: &Console,
    s: Option<&Session>,
    headers: &HeaderMap,
    what: &'static str,
) -> Response {
    let check = if same_origin(c, headers) {
        "csrf_token"
    } else {
        "origin"
    };
    let actor = s.map_or_else(|| "anonymous".to_owned(), Session::actor);
    let ev = AuditDraft::new(c.broker.now(), "console.csrf_refused", actor)
        .outcome(Outcome::Denied)
        .reason("a console form without this console's origin or CSRF token was refused")
        .data("form", what)
        .data("failed", check);
    c.broker.record_csrf_refusal(ev, what).await;
    html::error_page(
        s,
        StatusCode::FORBIDDEN,
        "Request refused",
        "this form did not come from this console (missing or wrong CSRF token or origin); \
         nothing was changed",
    )
}

fn session_cookie(c: &Console, value: &str, max_age: u64) -> Option<HeaderValue> {
    let (name, path, secure) = if c.tls {
        (HOST_COOKIE, "/", "; Secure")
    } else {
        (COOKIE, "/ui", "")
    };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path={path}; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .ok()
}

pub async fn login_page(State(c): Shared, headers: HeaderMap) -> Response {
    // Already signed in: straight to the overview.
    if let Some(v) = cookie_value(&headers, cookie_name(&c))
        && c.sessions.find(&c, v, c.broker.now(), true).is_some()
    {
        return Redirect::to("/ui").into_response();
    }
    login_form(StatusCode::OK, None)
}

fn login_form(status: StatusCode, error: Option<&str>) -> Response {
    let mut body = String::new();
    body.push_str("<h1>Sign in</h1>");
    if let Some(e) = error {
        body.push_str(&format!(
            "<p class=\"error\" role=\"alert\" id=\"login-error\">{}</p>",
            esc(e)
        ));
    }
    body.push_str(
        "<p>Sign in with the admin token or your operator token. The token is sent once, \
         in this form; the console keeps a session cookie, never the token.</p>\
         <form method=\"post\" action=\"/ui/login\" class=\"login\">\
         <label for=\"token\">Token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"off\" required \
         spellcheck=\"false\" aria-describedby=\"token-help\">\
         <p id=\"token-help\" class=\"help\">A <code>kma_…</code> token.</p>\
         <button type=\"submit\">Sign in</button></form>",
    );
    html::page(None, status, "Sign in", "", &body)
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: zeroize::Zeroizing<String>,
}

pub async fn login_submit(
    State(c): Shared,
    headers: HeaderMap,
    super::FormBody(body): super::FormBody,
) -> Response {
    // Login CSRF: a foreign page must not sign the browser in.
    if !same_origin(&c, &headers) {
        return csrf_refused(&c, None, &headers, "login").await;
    }
    let Ok(form) = serde_urlencoded::from_bytes::<LoginForm>(&body) else {
        return login_form(StatusCode::BAD_REQUEST, Some("the form was not complete"));
    };
    let token = form.token.trim();
    let refused = || {
        login_form(
            StatusCode::UNAUTHORIZED,
            Some("sign-in refused: use the admin token or an operator token"),
        )
    };
    // The API's own authentication: a bad token is counted and audited.
    let principal = match c.broker.authenticate(token).await {
        Ok(p @ (Principal::Admin | Principal::Operator { .. })) => p,
        Ok(other) => {
            let ev = AuditDraft::new(c.broker.now(), "console.refused", other.actor())
                .outcome(Outcome::Denied)
                .reason("only the admin and operators may sign in to the console");
            record(&c, ev).await;
            return refused();
        }
        Err(_) => return refused(),
    };
    let now = c.broker.now();
    let Some((id, key)) = c.sessions.open(&c, principal.clone(), now) else {
        return html::error_page(
            None,
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            "no session could be opened now; try again later",
        );
    };
    // A sign-in the audit trail does not hold opens no session.
    let ev = AuditDraft::new(now, "console.signed_in", principal.actor()).outcome(Outcome::Success);
    if !record(&c, ev).await {
        c.sessions.close(&key);
        return html::error_page(
            None,
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            "the sign-in could not be written to the audit trail; no session was opened, \
             try again shortly",
        );
    }
    // Signing in again ends the session this browser had: its cookie is
    // replaced below, so that session would be no one's, yet open for
    // whoever copied the old cookie.
    if let Some(old) = cookie_value(&headers, cookie_name(&c))
        && let Some(was) = c.sessions.close_cookie(&c, old, now)
    {
        let ev = AuditDraft::new(now, "console.signed_out", was.actor())
            .outcome(Outcome::Success)
            .reason("signed in again");
        record(&c, ev).await;
    }
    let mut res = Redirect::to("/ui").into_response();
    if let Some(v) = session_cookie(&c, &id, MAX_SECS) {
        res.headers_mut().insert(header::SET_COOKIE, v);
    }
    res
}

#[derive(serde::Deserialize)]
struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

pub async fn logout(
    State(c): Shared,
    s: Session,
    headers: HeaderMap,
    super::FormBody(body): super::FormBody,
) -> Response {
    let form: CsrfOnly = serde_urlencoded::from_bytes(&body).unwrap_or(CsrfOnly {
        csrf: String::new(),
    });
    if !check_csrf(&c, &s, &headers, &form.csrf) {
        return csrf_refused(&c, Some(&s), &headers, "logout").await;
    }
    if c.sessions.close(&s.key) {
        record(
            &c,
            AuditDraft::new(c.broker.now(), "console.signed_out", s.actor())
                .outcome(Outcome::Success),
        )
        .await;
    }
    let mut res = Redirect::to("/ui/login").into_response();
    if let Some(v) = session_cookie(&c, "", 0) {
        res.headers_mut().insert(header::SET_COOKIE, v);
    }
    res
}

/// Appends a console event to the audit chain; whether it was written.
async fn record(c: &Console, ev: AuditDraft) -> bool {
    match c.broker.store().append_audit(ev).await {
        Ok(_) => {
            c.broker.notify_audit();
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "console: cannot record an audit event");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_read_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; keymint_session=abc; b=2"),
        );
        assert_eq!(cookie_value(&h, COOKIE), Some("abc"));
        assert_eq!(cookie_value(&h, HOST_COOKIE), None);
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("keymint_sessionx=1"),
        );
        assert_eq!(cookie_value(&h, COOKIE), None);
    }
}
