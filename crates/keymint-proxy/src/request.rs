//! One request through the proxy, as named steps:
//!
//! route → authenticate → authorise → envelope → read body → screen →
//! reserve → rewrite → send → meter.
//!
//! Each step either hands the next one what it needs or refuses, in the
//! upstream's error shape, with the refusal counted and audited (within the
//! broker's bound, through the [`Gate`](crate::gate::Gate)). A JSON body is
//! parsed once (in `screen`, which screens its decoded strings, and hands
//! the document on to `reserve`), and re-encoded only when the forwarded
//! request must change. A body whose decoded strings need no second screen
//! (no escape, nothing found) is read only for the fields the proxy looks
//! at ([`peek`](crate::peek)), and parsed whole only if it must change.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::pool::UpstreamBody;
use crate::within::within;
use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use http_body_util::{BodyExt, Limited};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode, percent_encode};

use crate::budget::{Ask, Refusal};
use crate::config::{KeyPlacement, Policy, SecretAction, Upstream, UpstreamKind};
use crate::gate::{Caller, GateError};
use crate::metrics::UpstreamCounters;
use crate::provider::{self, Asked, Endpoint, Failure, ProxyError};
use crate::reflect::{KeyForms, SentKey, StreamRedactor, redact_key};
use crate::{CLIENT_BODY_TIMEOUT, MAX_RESPONSE, PREFIX, Proxy, Settlement, detect, peek, sse};
use keymint_scan::Screen;

/// The keymint token a request presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented<'a> {
    /// No `Authorization: Bearer`, `x-api-key` or `api-key` header.
    Nothing,
    /// The token of the header that carries it.
    Token(&'a str),
    /// The header that carries the token came more than once (named here).
    /// Which value counts would be a guess that another hop may make
    /// differently (RFC 9110 allows one `Authorization`), so the request is
    /// refused, as the MCP route and the token endpoint refuse it.
    Repeated(&'static str),
}

impl<'a> Presented<'a> {
    /// The token, when exactly one was presented.
    pub const fn token(self) -> Option<&'a str> {
        match self {
            Self::Token(t) => Some(t),
            Self::Nothing | Self::Repeated(_) => None,
        }
    }
}

/// The token an SDK sent: `Authorization: Bearer` (OpenAI), `x-api-key`
/// (Anthropic) or `api-key` (Azure), looked for in that order; the first
/// of them present is the one that counts, and it must come once.
pub fn presented_token(h: &HeaderMap) -> Presented<'_> {
    match header_once(h, header::AUTHORIZATION) {
        Ok(Some(v)) => {
            return v
                .to_str()
                .ok()
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .map_or(Presented::Nothing, |t| Presented::Token(t.trim()));
        }
        Err(Repeated) => return Presented::Repeated("authorization"),
        Ok(None) => {}
    }
    for name in ["x-api-key", "api-key"] {
        match header_once(h, name) {
            Ok(Some(v)) => {
                return v
                    .to_str()
                    .map_or(Presented::Nothing, |t| Presented::Token(t.trim()));
            }
            Err(Repeated) => return Presented::Repeated(name),
            Ok(None) => {}
        }
    }
    Presented::Nothing
}

/// A header that came more than once where one is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repeated;

/// `name`'s value if the request has it at most once (`None`: not at all);
/// [`Repeated`] when it has it more than once. The one place the API, the
/// MCP route and the proxy tell a credential header sent twice.
pub fn header_once<K: http::header::AsHeaderName>(
    h: &HeaderMap,
    name: K,
) -> Result<Option<&HeaderValue>, Repeated> {
    let mut all = h.get_all(name).iter();
    let first = all.next();
    if all.next().is_some() {
        return Err(Repeated);
    }
    Ok(first)
}

/// Answers one request: the steps in order, the first refusal in the
/// upstream's error shape.
///
/// One `async fn` from the listener's front down to the steps: in a
/// release build, a wrapper that only awaited this and turned the error
/// into a response measured twice this future's size, and every request
/// copied it (design 0029, "Ninth pass").
pub(crate) async fn handle(proxy: &Arc<Proxy>, req: Request) -> Response {
    // `?` for a step whose refusal is the answer.
    macro_rules! step {
        ($e:expr) => {
            match $e.await {
                Ok(v) => v,
                Err(e) => return e.into_response(),
            }
        };
    }
    let (parts, body) = req.into_parts();
    let at = step!(route(proxy, parts.uri.path()));
    let caller = step!(at.authenticate(&parts.headers));
    let grant = step!(at.authorise(&caller, &parts.method));
    step!(at.not_suspended(&caller));
    let envelope = step!(at.envelope(&caller, grant.policy, &parts));
    let body = step!(at.read_body(&caller, &parts.headers, body));
    let screened = step!(at.screen(&caller, grant.policy, &parts.headers, body));
    let mut reserved = step!(at.reserve(&caller, &grant, screened));
    reserved.settlement.seen = Some(crate::observe::Seen::new(&caller, &parts));
    let (out, settlement, strip_usage, key) =
        step!(at.rewrite(&parts.method, envelope, &grant, reserved));
    let (response, settlement) = step!(at.send(out, settlement));
    step!(at.meter(
        response,
        grant.endpoint,
        strip_usage,
        settlement,
        &key,
        &caller
    ))
}

/// Where a request goes: the configured upstream and the path under it.
struct Route<'a> {
    proxy: &'a Arc<Proxy>,
    name: &'a str,
    up: &'a Upstream,
    /// The connections to `up`.
    pool: &'a Arc<crate::pool::Pool>,
    rel: &'a str,
}

/// What the caller's role lets this request do.
struct Grant<'a> {
    policy: &'a Policy,
    /// The recognised LLM endpoint; `None` for `http` upstreams.
    endpoint: Option<Endpoint>,
}

/// What goes upstream around the body: the client headers the upstream
/// needs and the query, both screened.
struct Envelope {
    headers: HeaderMap,
    /// The client's query (without `?`), screened; empty if none.
    query: String,
    redacted: bool,
}

/// A body that passed screening.
struct Screened {
    body: Bytes,
    redacted: bool,
    /// The body as screened, when it is a JSON document.
    json: Option<Doc>,
}

/// A JSON request body, as far as the proxy has read it.
enum Doc {
    /// The whole document (parsed for the screen of its decoded strings).
    Full(serde_json::Value),
    /// Only the top-level fields the proxy reads ([`peek::request_fields`]):
    /// the body is forwarded as it came unless it must change.
    Fields(serde_json::Value),
}

impl Doc {
    /// What [`provider::inspect`] reads.
    const fn fields(&self) -> &serde_json::Value {
        match self {
            Self::Full(v) | Self::Fields(v) => v,
        }
    }

    /// The whole document, parsed from `body` (the bytes the fields were
    /// read from) when only the fields were.
    fn into_full(self, body: &[u8]) -> Option<serde_json::Value> {
        match self {
            Self::Full(v) => Some(v),
            Self::Fields(_) => serde_json::from_slice(body).ok(),
        }
    }
}

/// A request whose maximum use is reserved.
struct Reserved {
    body: Bytes,
    redacted: bool,
    /// The parsed body, for endpoints that name a model.
    json: Option<Doc>,
    asked: Asked,
    metered: bool,
    /// The output tokens reserved (the settlement holds the reservation).
    output: u64,
    settlement: Settlement,
}

/// 1. The upstream must be configured and the path must stay under its
///    base.
async fn route<'a>(proxy: &'a Arc<Proxy>, path: &'a str) -> Result<Route<'a>, ProxyError> {
    let after = path.strip_prefix(PREFIX).unwrap_or("");
    let (name, rel) = after.split_once('/').unwrap_or((after, ""));
    let Some((up, pool)) = proxy.upstreams.get(name) else {
        return Err(ProxyError::new(Failure::NotFound, "no such upstream"));
    };
    let at = Route {
        proxy,
        name,
        up,
        pool,
        rel,
    };
    if !safe_path(rel) {
        at.deny(None, "path", "path leaves the upstream base", &[])
            .await;
        return Err(at.err(Failure::BadRequest, "the path is not allowed".into()));
    }
    Ok(at)
}

impl Route<'_> {
    fn err(&self, f: Failure, m: String) -> ProxyError {
        ProxyError::new(f, m).shaped(self.up.kind)
    }

    /// The screen could not read the request (its rules did not compile,
    /// or its work was lost): nothing unscreened is forwarded.
    fn unscreened(&self) -> ProxyError {
        self.err(
            Failure::Internal,
            "the request could not be screened".into(),
        )
    }

    /// keymint's store could not be asked: 503 with `Retry-After: 1`, as
    /// the API answers, never a 500 (docs/design/0040).
    fn unavailable(&self, m: &str) -> ProxyError {
        self.err(Failure::StoreUnavailable, m.to_owned())
            .retry_after(1)
    }

    async fn deny(
        &self,
        caller: Option<&Caller>,
        check: &'static str,
        message: &str,
        extra: &[(&str, serde_json::Value)],
    ) {
        // Boxed: a refusal is rare, and its future (an audit event being
        // built) would otherwise be part of every step's that can refuse.
        Box::pin(self.proxy.deny(caller, self.name, check, message, extra)).await;
    }

    fn counters(&self) -> Option<&UpstreamCounters> {
        self.proxy.metrics.upstream(self.name)
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.up.timeout_secs)
    }

    fn key_reflected(&self) {
        self.proxy.key_reflected(self.name);
    }

    /// 2. The token names a live lease (the broker decides and audits a
    ///    refusal).
    async fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Caller>, ProxyError> {
        let token = presented_token(headers);
        match self.proxy.gate.authenticate(token, self.name).await {
            Ok(c) => Ok(c),
            Err(GateError::Refused(m)) => {
                self.proxy.metrics.denied("auth");
                let m = if token == Presented::Nothing {
                    "missing keymint token (send it as `Authorization: Bearer` or `x-api-key`)"
                        .into()
                } else {
                    m
                };
                Err(self.err(Failure::Unauthenticated, m))
            }
            Err(GateError::Unavailable) => Err(self.unavailable("the token could not be checked")),
        }
    }

    /// 3b. The upstream's key is not suspended by misuse monitoring.
    async fn not_suspended(&self, caller: &Caller) -> Result<(), ProxyError> {
        let Some(why) = self.proxy.upstream_suspended(self.name) else {
            return Ok(());
        };
        let m = format!(
            "upstream `{}` is suspended by misuse monitoring ({why}); an operator can lift it",
            self.name
        );
        self.deny(Some(caller), "suspended", &m, &[]).await;
        Err(self.err(Failure::Forbidden, m))
    }

    /// 3. The role names this upstream and allows the endpoint.
    async fn authorise(&self, caller: &Caller, method: &Method) -> Result<Grant<'_>, ProxyError> {
        let Some(rp) = self.proxy.roles.get(&caller.role) else {
            let m = format!("role `{}` does not use the proxy", caller.role);
            self.deny(Some(caller), "upstream", &m, &[]).await;
            return Err(self.err(Failure::Forbidden, m));
        };
        if rp.upstream != self.name {
            let m = format!(
                "role `{}` may not reach upstream `{}`",
                caller.role, self.name
            );
            self.deny(Some(caller), "upstream", &m, &[]).await;
            return Err(self.err(Failure::Forbidden, m));
        }
        let policy: &Policy = &rp.proxy;
        let endpoint = match self.up.kind {
            UpstreamKind::Http => {
                if policy.allows_http(method.as_str(), &format!("/{}", self.rel)) {
                    return Ok(Grant {
                        policy,
                        endpoint: None,
                    });
                }
                None
            }
            kind => match provider::classify(kind, method, self.rel) {
                Some(ep) if policy.allows_endpoint(ep.name()) => {
                    return Ok(Grant {
                        policy,
                        endpoint: Some(ep),
                    });
                }
                found => found,
            },
        };
        let what = endpoint.map_or("this endpoint".to_owned(), |e| format!("`{}`", e.name()));
        let m = format!("role `{}` may not call {what}", caller.role);
        self.deny(
            Some(caller),
            "endpoint",
            &m,
            &[("method", method.as_str().into())],
        )
        .await;
        Err(self.err(Failure::Forbidden, m))
    }

    /// 4. The envelope: only the client headers the upstream's kind needs
    ///    (and those its configuration adds) go on, and they, the query
    ///    (decoded) and the path are screened like a body. A secret there
    ///    is blocked, or with `redact` replaced (a header value, a query
    ///    parameter); one in the path is always blocked. Every other header
    ///    stays behind, whatever it holds.
    async fn envelope(
        &self,
        caller: &Caller,
        policy: &Policy,
        parts: &Parts,
    ) -> Result<Envelope, ProxyError> {
        let Some(screen) = self.proxy.screen else {
            return Err(self.unscreened());
        };
        let redact = matches!(policy.secrets, SecretAction::Redact);
        let mut kinds: Vec<&str> = Vec::new();
        let mut wheres: Vec<&'static str> = Vec::new();
        let path = percent_decode(self.rel.as_bytes()).collect::<Vec<u8>>();
        let found = screen.find(&path);
        if !found.is_empty() {
            // A path names a resource: redacting it would call another.
            return Err(self.blocked_in(caller, detect::kinds(&found), "path").await);
        }
        let mut headers = upstream_headers(&parts.headers, self.up);
        let mut redacted = false;
        for v in headers.values_mut() {
            let found = screen.find(v.as_bytes());
            if found.is_empty() {
                continue;
            }
            kinds.extend(detect::kinds(&found));
            if !wheres.contains(&"headers") {
                wheres.push("headers");
            }
            if redact {
                // A redacted value is ASCII; one that still is not a valid
                // header value is sent empty.
                *v = HeaderValue::from_bytes(&detect::redact(v.as_bytes(), &found))
                    .unwrap_or_else(|_| HeaderValue::from_static(""));
                redacted = true;
            }
        }
        let query = match screen_query(screen, parts.uri.query().unwrap_or(""), redact) {
            QueryScreen::Clean(q) => q,
            QueryScreen::Redacted(q, k) => {
                kinds.extend(k);
                wheres.push("query");
                redacted = true;
                q
            }
            QueryScreen::Blocked(k) => {
                kinds.extend(k);
                wheres.push("query");
                String::new()
            }
        };
        if !kinds.is_empty() && !redact {
            kinds.sort_unstable();
            kinds.dedup();
            return Err(self.blocked_in(caller, kinds, &wheres.join(" and ")).await);
        }
        Ok(Envelope {
            headers,
            query,
            redacted,
        })
    }

    /// 5. The body, bounded in size and time, and sent as it is meant: a
    ///    body with a content coding (`Content-Encoding: gzip`) is refused
    ///    unread. The screen and the budget read the bytes as sent, and
    ///    the proxy does not decode them, so a compressed body would pass
    ///    both and be decoded by the upstream (`content-encoding` can never
    ///    be forwarded either, `config::NEVER_FORWARDED`).
    async fn read_body(
        &self,
        caller: &Caller,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Bytes, ProxyError> {
        if !identity_coded(headers) {
            self.deny(Some(caller), "encoding", "compressed request body", &[])
                .await;
            return Err(self.err(
                Failure::UnsupportedEncoding,
                "the request body has a content coding (`Content-Encoding`); send it \
                 uncompressed: the proxy must read it to screen it"
                    .into(),
            ));
        }
        let max = self.proxy.settings.max_body_bytes;
        let too_large = || {
            self.err(
                Failure::TooLarge,
                format!("the request body exceeds {max} bytes"),
            )
        };
        if headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .is_some_and(|n| n > max)
        {
            self.deny(Some(caller), "size", "request body too large", &[])
                .await;
            return Err(too_large());
        }
        // Whole in hyper's buffer, as most bodies are, it is taken with no timer.
        match within(CLIENT_BODY_TIMEOUT, Limited::new(body, max).collect()).await {
            Ok(Ok(b)) => Ok(b.to_bytes()),
            Ok(Err(e)) => {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    self.deny(Some(caller), "size", "request body too large", &[])
                        .await;
                    return Err(too_large());
                }
                Err(self.err(
                    Failure::BadRequest,
                    "the request body could not be read".into(),
                ))
            }
            Err(_) => Err(self.err(
                Failure::BadRequest,
                "the request body was not sent in time".into(),
            )),
        }
    }

    /// 6. Secrets in the body are blocked or redacted, as the role says. A
    ///    JSON body is screened as decoded strings (values anywhere and
    ///    object keys), so escapes hide nothing; it is parsed here once and
    ///    handed on. A form body is screened decoded, as a query is; any
    ///    other body as raw bytes. A large body is read off the
    ///    connection's runtime ([`crate::offload`]): the screen's work grows
    ///    with the body and with what it holds, and the runtime serves
    ///    every other connection of its core meanwhile.
    async fn screen(
        &self,
        caller: &Caller,
        policy: &Policy,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Screened, ProxyError> {
        let Some(screen) = self.proxy.screen else {
            // Fail closed: a body that cannot be screened is not forwarded.
            return Err(self.unscreened());
        };
        let redact = matches!(policy.secrets, SecretAction::Redact);
        let outcome = if body.len() < crate::offload::INLINE_BELOW {
            screen_body(screen, body, || is_form(headers), redact)
        } else {
            let form = is_form(headers);
            crate::offload::run(move || screen_body(screen, body, || form, redact))
                .await
                .map_err(|_| self.unscreened())?
        };
        match outcome {
            BodyScreen::Passed(s) => Ok(s),
            BodyScreen::Blocked(kinds) => Err(self.blocked(caller, kinds).await),
            BodyScreen::Duplicate => Err(self.err(
                Failure::BadRequest,
                format!(
                    "the request body is not valid: {}; send each once",
                    keymint_core::json::DUPLICATE_MEMBER
                ),
            )),
            BodyScreen::Unencodable => Err(self.err(
                Failure::Internal,
                "the request could not be re-encoded".into(),
            )),
        }
    }

    /// A body refused for the secrets it carries (named by kind only).
    async fn blocked(&self, caller: &Caller, kinds: Vec<&str>) -> ProxyError {
        let m = format!(
            "the request carries a secret ({}); keymint blocked it before it left",
            kinds.join(", ")
        );
        self.deny(Some(caller), "secret", &m, &[("kinds", kinds.into())])
            .await;
        self.err(Failure::BadRequest, m)
    }

    /// A request refused for secrets in its path, headers or query (named
    /// by kind and place only).
    async fn blocked_in(&self, caller: &Caller, kinds: Vec<&str>, place: &str) -> ProxyError {
        let m = format!(
            "the request carries a secret ({}) in its {place}; keymint blocked it before it left",
            kinds.join(", ")
        );
        self.deny(
            Some(caller),
            "secret",
            &m,
            &[("kinds", kinds.into()), ("in", place.into())],
        )
        .await;
        self.err(Failure::BadRequest, m)
    }

    /// 7. The model must be allowed; the request's maximum use is reserved
    ///    against the task's budgets and rate limits.
    async fn reserve(
        &self,
        caller: &Arc<Caller>,
        grant: &Grant<'_>,
        screened: Screened,
    ) -> Result<Reserved, ProxyError> {
        let Screened {
            body,
            redacted,
            json: screened_json,
        } = screened;
        let policy = grant.policy;
        let mut json: Option<Doc> = None;
        let mut asked = Asked::default();
        if let Some(ep) = grant.endpoint.filter(|e| e.has_model()) {
            // Parsed by the screen; a body that is not a JSON document
            // was not.
            let Some(v) = screened_json else {
                return Err(self.err(
                    Failure::BadRequest,
                    "the request body is not valid JSON".into(),
                ));
            };
            asked = provider::inspect(ep, v.fields());
            let Some(model) = asked.model.as_deref() else {
                return Err(self.err(Failure::BadRequest, "the request names no `model`".into()));
            };
            if asked.bad_choices() {
                return Err(self.err(
                    Failure::BadRequest,
                    format!(
                        "`n` must be a whole number of choices from 1 to {}",
                        provider::MAX_CHOICES
                    ),
                ));
            }
            if let Some(field) = asked.zero_output {
                return Err(self.err(Failure::BadRequest, format!("`{field}` must be at least 1")));
            }
            if !policy.allows_model(model) {
                let m = format!(
                    "role `{}` may not use model {}",
                    caller.role,
                    shown_model(self.proxy, model)
                );
                self.deny(Some(caller), "model", &m, &[]).await;
                return Err(self.err(Failure::Forbidden, m));
            }
            json = Some(v);
        }
        let proxy = self.proxy;
        let price = asked.model.as_deref().and_then(|m| proxy.prices.get(m));
        let metered = grant.endpoint.is_some_and(|e| e.metered());
        // Each of the `n` choices a chat completion asks for may use the
        // whole output limit, and all of them are billed.
        let choices = asked.choices();
        let ask = Ask {
            input: body.len() as u64,
            output: if metered {
                asked
                    .max_output
                    .unwrap_or(policy.default_max_tokens())
                    .saturating_mul(choices)
            } else {
                0
            },
            choices,
            price,
            metered,
        };
        let res = match proxy.reserve(caller, self.name, policy, ask).await {
            Ok(r) => r,
            Err(Refusal::Unavailable) => {
                return Err(self.unavailable("the task's budget could not be checked"));
            }
            Err(refusal) => {
                let (check, e) = self.refusal(refusal, &asked);
                self.deny(Some(caller), check, &e.message, &[]).await;
                return Err(e);
            }
        };
        let output = res.output;
        let settlement = Settlement {
            proxy: Arc::clone(proxy),
            upstream: self.name.to_owned(),
            res: Some(res),
            seen: None,
        };
        Ok(Reserved {
            body,
            redacted,
            json,
            asked,
            metered,
            output,
            settlement,
        })
    }

    /// A ledger refusal as the check it failed and the error to answer.
    fn refusal(&self, refusal: Refusal, asked: &Asked) -> (&'static str, ProxyError) {
        match refusal {
            Refusal::Budget(what) => (
                "budget",
                match crate::budget::more_than_allowed(what) {
                    // Not used up: this request is larger than the budget
                    // allows in all.
                    Some(lacks) => self.err(
                        Failure::BadRequest,
                        format!(
                            "the request needs more {lacks} than the task's budget allows in all; \
                             a smaller request may fit"
                        ),
                    ),
                    None => self.err(
                        Failure::BudgetExhausted,
                        format!("the task's budget of {what} is used up"),
                    ),
                },
            ),
            Refusal::Unavailable => (
                "budget",
                self.unavailable("the task's budget could not be checked"),
            ),
            Refusal::Rate(what, secs) => (
                "rate",
                self.err(
                    Failure::RateLimited,
                    format!("the task's rate limit of {what} is reached; retry in {secs}s"),
                )
                .retry_after(secs),
            ),
            Refusal::UnknownCost => (
                "price",
                self.err(
                    Failure::Forbidden,
                    format!(
                        "model {} has no price, and the role has a spend budget",
                        asked
                            .model
                            .as_deref()
                            .map_or("(none)".to_owned(), |m| shown_model(self.proxy, m))
                    ),
                ),
            ),
        }
    }

    /// 8. The request as it goes upstream: output capped to the
    ///    reservation, stream usage asked for, the envelope's headers and
    ///    query with the upstream's key (and the role's OpenAI organisation
    ///    and project). Answers whether usage chunks the client did not ask
    ///    for must be stripped from the stream.
    async fn rewrite(
        &self,
        method: &Method,
        envelope: Envelope,
        grant: &Grant<'_>,
        reserved: Reserved,
    ) -> Result<(http::Request<Bytes>, Settlement, bool, SentKey), ProxyError> {
        let Reserved {
            body,
            redacted,
            json,
            asked,
            metered,
            output,
            mut settlement,
        } = reserved;
        let policy = grant.policy;
        let mut strip_usage = false;
        // The reservation holds `choices` times the limit each choice gets.
        let choices = asked.choices();
        // Every limit field the request sets is lowered to the
        // reservation, not only the tightest one it was reserved by: an
        // upstream may read another (vLLM prefers `max_completion_tokens`
        // to `max_tokens`). Until session 28 `max_tokens: 1` with
        // `max_completion_tokens: 100000` reserved one token and went on
        // as sent, and the use billed passed the budget.
        let must_cap = metered
            && asked.max_output.map_or(
                policy.max_output_tokens.is_some() || policy.max_spend_usd.is_some(),
                |_| {
                    asked
                        .loosest_output
                        .unwrap_or(u64::MAX)
                        .saturating_mul(choices)
                        > output
                },
            );
        let body = match (json, grant.endpoint) {
            (Some(doc), Some(ep)) if must_cap || asked.usage_not_requested => {
                // Read whole only now that it must change; it parsed
                // before, from these very bytes.
                let Some(mut v) = doc.into_full(&body) else {
                    return Err(self.err(
                        Failure::Internal,
                        "the request could not be re-encoded".into(),
                    ));
                };
                let mut changed = false;
                if must_cap {
                    changed |= provider::cap_output(ep, &mut v, output / choices);
                }
                if asked.usage_not_requested {
                    provider::request_stream_usage(&mut v);
                    strip_usage = true;
                    changed = true;
                }
                if changed {
                    Bytes::from(serde_json::to_vec(&v).map_err(|_| {
                        self.err(
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

        let name = self.name;
        let up = self.up;
        let key = if up.federation.is_some() {
            // No static key: the provider's short-lived token, which keymint
            // obtains and refreshes itself (docs/design/0028). An outage is a
            // prompt 503, not a hang.
            match self.proxy.federated_token(name).await {
                Ok(k) => Some(k),
                Err(_) => {
                    Box::pin(settlement.settle(Some((0, 0)))).await;
                    return Err(self.err(
                        Failure::ProviderUnavailable,
                        format!(
                            "upstream `{name}`: the provider's token service is unavailable; retry shortly"
                        ),
                    ));
                }
            }
        } else {
            self.proxy.key(name).await
        };
        let Some(key) = key else {
            Box::pin(settlement.settle(Some((0, 0)))).await;
            return Err(self.err(
                Failure::UpstreamUnavailable,
                format!(
                    "no key is set for upstream `{name}`; an operator sets it with `keymint upstream set`"
                ),
            ));
        };
        let Envelope {
            mut headers,
            query: client_query,
            redacted: envelope_redacted,
        } = envelope;
        let redacted = redacted || envelope_redacted;
        for (name, value) in [
            ("openai-organization", &policy.organization),
            ("openai-project", &policy.project),
        ] {
            // Checked at load: printable ASCII.
            if let Some(v) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
                headers.insert(HeaderName::from_static(name), v);
            }
        }
        // Anthropic takes a federated bearer token only beside its OAuth
        // beta flag (added to the client's own flags).
        if up
            .federation
            .as_ref()
            .is_some_and(|f| f.provider == keymint_core::role::FederatedProvider::Anthropic)
        {
            let beta = HeaderName::from_static("anthropic-beta");
            let flag = "oauth-2025-04-20";
            let merged = match headers.get(&beta).and_then(|v| v.to_str().ok()) {
                Some(v) if v.split(',').any(|f| f.trim() == flag) => v.to_owned(),
                Some(v) if !v.trim().is_empty() => format!("{v},{flag}"),
                _ => flag.to_owned(),
            };
            if let Ok(v) = HeaderValue::from_str(&merged) {
                headers.insert(beta, v);
            }
        }
        // Usage is read from the body, so ask for it uncompressed.
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        let client_query = Some(client_query.as_str()).filter(|q| !q.is_empty());
        let in_query = matches!(up.key, KeyPlacement::Query { .. });
        let query = match &up.key {
            KeyPlacement::Header { name: h, prefix } => {
                // Joined without `format!`'s machinery: this runs per request.
                let mut v = HeaderValue::from_maybe_shared(Bytes::from(
                    [prefix.as_str(), key.as_str()].concat(),
                ))
                .map_err(|_| {
                    self.err(
                        Failure::Internal,
                        "the upstream key is not a valid header".into(),
                    )
                })?;
                v.set_sensitive(true);
                headers.insert(h.clone(), v);
                upstream_query(client_query, None)
            }
            KeyPlacement::Query { name: q } => {
                upstream_query(client_query, Some((q, key.as_str())))
            }
        };
        let uri = [
            up.scheme.as_str(),
            "://",
            &up.authority,
            &up.base_path,
            "/",
            self.rel,
            &query,
        ]
        .concat();
        let mut out = http::Request::builder()
            .method(method.clone())
            .uri(uri)
            .body(body)
            .map_err(|_| {
                self.err(
                    Failure::BadRequest,
                    "the request could not be forwarded".into(),
                )
            })?;
        *out.headers_mut() = headers;
        if let Some(h) = out.headers_mut().get_mut(header::CONTENT_TYPE) {
            h.set_sensitive(false);
        }
        if redacted && let Some(c) = self.counters() {
            c.redactions.fetch_add(1, Ordering::Relaxed);
        }
        Ok((out, settlement, strip_usage, SentKey { key, in_query }))
    }

    /// 9. Forwarded, within the upstream's timeout. A request that never
    ///    connected cost nothing; one that did may have been billed, so it
    ///    keeps its reservation.
    async fn send(
        &self,
        out: http::Request<Bytes>,
        mut settlement: Settlement,
    ) -> Result<(http::Response<UpstreamBody>, Settlement), ProxyError> {
        let name = self.name;
        let counters = self.counters();
        match tokio::time::timeout(self.timeout(), self.pool.send(out)).await {
            Ok(Ok(r)) => {
                if let Some(c) = counters {
                    c.forwarded.fetch_add(1, Ordering::Relaxed);
                }
                Ok((r, settlement))
            }
            Ok(Err(e)) => {
                if let Some(c) = counters {
                    c.upstream_errors.fetch_add(1, Ordering::Relaxed);
                }
                let connect = e.is_connect();
                Box::pin(settlement.settle(if connect { Some((0, 0)) } else { None })).await;
                tracing::warn!(upstream = name, connect, "proxy: upstream request failed");
                Err(self.err(
                    Failure::UpstreamUnavailable,
                    if connect {
                        format!("upstream `{name}` could not be reached")
                    } else {
                        format!(
                            "the connection to upstream `{name}` failed before its answer; the request may have reached it"
                        )
                    },
                ))
            }
            Err(_) => {
                if let Some(c) = counters {
                    c.upstream_errors.fetch_add(1, Ordering::Relaxed);
                }
                Box::pin(settlement.settle(None)).await;
                Err(self.err(
                    Failure::UpstreamTimeout,
                    format!(
                        "upstream `{name}` did not answer in {}s",
                        self.up.timeout_secs
                    ),
                ))
            }
        }
    }

    /// 10. The response goes back (a stream chunk by chunk) and the
    ///     reservation is settled against the usage the provider reported.
    async fn meter(
        &self,
        response: http::Response<UpstreamBody>,
        endpoint: Option<Endpoint>,
        strip_usage: bool,
        mut settlement: Settlement,
        key: &SentKey,
        caller: &Arc<Caller>,
    ) -> Result<Response, ProxyError> {
        let counters = self.counters();
        let timeout = self.timeout();
        let (rparts, rbody) = response.into_parts();
        let status = rparts.status;
        let forms = key.forms();
        let (headers, taken) = response_headers(&rparts.headers, &forms);
        if taken.origin_bound
            && let Some(c) = counters
        {
            c.origin_headers_dropped.fetch_add(1, Ordering::Relaxed);
        }
        let mut reflected = taken.key;
        let is_stream = rparts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));

        // Only a successful stream is passed on chunk by chunk (an LLM
        // endpoint's, metered along the way, or an `http` upstream's);
        // anything else is read whole.
        if is_stream && status.is_success() {
            if let Some(c) = counters {
                c.streams.fetch_add(1, Ordering::Relaxed);
            }
            // Reported once per response: now if a header carried the
            // key, else at the first chunk that does.
            let report: Option<Box<dyn FnOnce() + Send + Sync>> = if reflected {
                self.key_reflected();
                None
            } else {
                let proxy = Arc::clone(self.proxy);
                let name = self.name.to_owned();
                Some(Box::new(move || proxy.key_reflected(&name)))
            };
            let redactor = StreamRedactor::new(forms, report);
            let stream = sse::MeteredStream::new(
                rbody,
                endpoint,
                strip_usage,
                settlement,
                timeout,
                redactor,
                Some(sse::Liveness::new(
                    Arc::clone(self.proxy),
                    self.name,
                    Arc::clone(caller),
                )),
            );
            let mut r = Response::new(Body::new(stream));
            *r.status_mut() = status;
            *r.headers_mut() = headers;
            return Ok(r);
        }

        // A response that came whole with its head is taken with no timer.
        let bytes = match within(timeout, Limited::new(rbody, MAX_RESPONSE).collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            _ => {
                if let Some(c) = counters {
                    c.upstream_errors.fetch_add(1, Ordering::Relaxed);
                }
                Box::pin(settlement.settle(None)).await;
                return Err(self.err(
                    Failure::UpstreamUnavailable,
                    format!("upstream `{}` sent an unreadable response", self.name),
                ));
            }
        };
        let usage = match endpoint {
            Some(ep) if ep.metered() => peek::response_usage(ep, &bytes),
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
        // Recorded before the response is answered.
        settlement.settle(usage).await;
        let bytes = match redact_key(&bytes, &forms) {
            Some(clean) => {
                reflected = true;
                clean
            }
            None => bytes,
        };
        if reflected {
            self.key_reflected();
        }
        let mut r = Response::new(Body::from(bytes));
        *r.status_mut() = status;
        *r.headers_mut() = headers;
        Ok(r)
    }
}

/// Checks the path after the upstream name: no empty, `.` or `..` segment,
/// not even behind a path parameter (`..;x`, which Tomcat, Jetty and
/// Spring read as `..`), no encoded separator or dot, no backslash. The
/// path is appended to the upstream's base as it is, so nothing may climb
/// out of it.
fn safe_path(rel: &str) -> bool {
    if rel.is_empty() {
        return true;
    }
    // `%2e`, `%2f`, `%5c` in either case (no copy of the path per request).
    let encoded = rel.as_bytes().windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (w[1], w[2].to_ascii_lowercase()),
                (b'2', b'e' | b'f') | (b'5', b'c')
            )
    });
    if encoded || rel.contains('\\') {
        return false;
    }
    rel.split('/').all(|s| {
        let name = s.split_once(';').map_or(s, |(name, _)| name);
        !name.is_empty() && name != "." && name != ".."
    }) && (!rel.contains('%') || escapes_stay_plain(rel))
}

/// Whether what an upstream may decode from `rel`'s escapes is still a
/// plain path: each escape is percent-encoding (`%u002e` is not), none
/// decodes to `.`, `/`, `\` or a control character (NUL ends a C string,
/// a tab or line break bends a name), the bytes decode to UTF-8 (an
/// overlong `%c0%ae` is `.` to an old decoder), and no segment is `.` or
/// `..` between blanks (which Windows trims). The same holds of each
/// further decoding, for a server that decodes twice or sits behind a
/// proxy that decoded once (`%252e` is `%2e`, then `.`). Only a path with
/// an escape comes here (an SDK's never has one): only such a path is
/// decoded, and copied.
fn escapes_stay_plain(rel: &str) -> bool {
    let mut text = std::borrow::Cow::Borrowed(rel);
    let mut first = true;
    while text.contains('%') {
        let b = text.as_bytes();
        let hex = |j: usize| b.get(j).and_then(|c| char::from(*c).to_digit(16));
        for i in memchr::memchr_iter(b'%', b) {
            let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
                // Once decoded, a `%` not followed by two hex digits is a
                // literal one; in the path as sent it is not an escape.
                if first {
                    return false;
                }
                continue;
            };
            let byte = u8::try_from(hi * 16 + lo).unwrap_or(0);
            if matches!(byte, b'.' | b'/' | b'\\') || byte.is_ascii_control() {
                return false;
            }
        }
        let Ok(decoded) = percent_decode(b).decode_utf8() else {
            return false;
        };
        let dots = decoded.split('/').any(|s| {
            let name = s.split_once(';').map_or(s, |(name, _)| name);
            matches!(
                name.trim_matches(|c: char| c.is_ascii_whitespace()),
                "." | ".."
            )
        });
        if dots {
            return false;
        }
        let next = match decoded {
            // Nothing left to decode.
            std::borrow::Cow::Borrowed(_) => break,
            std::borrow::Cow::Owned(d) => d,
        };
        text = std::borrow::Cow::Owned(next);
        first = false;
    }
    true
}

/// Whether the body is sent without a content coding: no
/// `Content-Encoding`, or only `identity` (RFC 9110 §8.4), in any case.
/// The MCP route asks it too: a body keymint reads to decide on must be
/// the bytes it reads.
pub fn identity_coded(h: &HeaderMap) -> bool {
    h.get_all(header::CONTENT_ENCODING).iter().all(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .map(str::trim)
                .all(|c| c.is_empty() || c.eq_ignore_ascii_case("identity"))
        })
    })
}

/// Whether the request's body is a form (`application/x-www-form-urlencoded`,
/// parameters or not).
fn is_form(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE).is_some_and(|v| {
        let media = v.as_bytes().split(|b| *b == b';').next().unwrap_or(b"");
        media
            .trim_ascii()
            .eq_ignore_ascii_case(b"application/x-www-form-urlencoded")
    })
}

/// The body as a JSON document, if it is one (an object, an array or a
/// string at the top, whatever the content type says); `Err` for a JSON
/// document with a member named twice in one object.
///
/// Such a document is refused rather than read as serde_json reads it
/// (the last of the two): the proxy decides on what it reads (the model,
/// the output limit, the decoded strings it screens) and passes the body
/// on as it came when nothing in it changes, to an upstream whose parser
/// may keep the first.
fn json_body(body: &[u8]) -> Result<Option<serde_json::Value>, ()> {
    let Some(first) = body.iter().find(|b| !b.is_ascii_whitespace()) else {
        return Ok(None);
    };
    if !matches!(first, b'{' | b'[' | b'"') {
        return Ok(None);
    }
    match keymint_core::json::from_slice(body) {
        Ok(v) => Ok(Some(v)),
        Err(keymint_core::json::Refused::Duplicate) => Err(()),
        Err(keymint_core::json::Refused::NotJson) => Ok(None),
    }
}

/// A model name fit to repeat in a message: short, plain, and not a secret.
fn shown_model(proxy: &Proxy, m: &str) -> String {
    let plain = m.len() <= 100
        && m.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/@-".contains(&b));
    if plain
        && proxy
            .screen
            .is_some_and(|s| s.find(m.as_bytes()).is_empty())
    {
        format!("`{m}`")
    } else {
        "(not shown)".to_owned()
    }
}

pub(crate) const HOP_BY_HOP: [&str; 9] = [
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

/// Response headers of an upstream that never reach the agent, whatever
/// the route: they act on the origin that answers (keymint's, where the
/// console lives) rather than on the one response, so an upstream could
/// use them to set keymint's policy. `access-control-*` too (any name with
/// that prefix): keymint sends no CORS headers, and an upstream cannot
/// widen that. [`acts_on_origin`] is the check; this list is what it
/// recognises besides the prefix (docs/design/0019, 2026-12-07).
pub const ORIGIN_BOUND: [&str; 17] = [
    // Cookies on keymint's origin: the console's session among them.
    "set-cookie",
    "set-cookie2",
    // Clears the origin's cookies and storage (signs the console out).
    "clear-site-data",
    // Sends later connections to the origin to another host or port.
    "alt-svc",
    // The transport policy of keymint's host (HSTS is keymint's own over
    // TLS, `cores::connection_service`), pins, certificate transparency.
    "strict-transport-security",
    "public-key-pins",
    "public-key-pins-report-only",
    "expect-ct",
    // Network error reporting kept for the origin: failures of keymint's
    // URLs (the console's) would be reported to the upstream's collector.
    "nel",
    "report-to",
    // Client hints remembered for the origin.
    "accept-ch",
    "critical-ch",
    // The origin's login status (FedCM).
    "set-login",
    // Origin-wide agent clustering.
    "origin-agent-cluster",
    // Widens a service worker's scope, up to `/` (the console).
    "service-worker-allowed",
    // Sends a page that shows the answer to another URL.
    "refresh",
    // Lets other origins read the answer's timing, as CORS does its body.
    "timing-allow-origin",
];

/// Whether an upstream's response header is one of [`ORIGIN_BOUND`] or
/// `access-control-*` (`name` as `HeaderName` keeps it: lower case). Runs
/// on every header of every proxied answer, so it tells by length first:
/// one jump, then at most four comparisons, none for most names.
pub fn acts_on_origin(name: &str) -> bool {
    let listed = match name.len() {
        3 => name == "nel",
        7 => name == "alt-svc" || name == "refresh",
        9 => matches!(name, "expect-ct" | "report-to" | "accept-ch" | "set-login"),
        10 => name == "set-cookie",
        11 => name == "set-cookie2" || name == "critical-ch",
        15 => name == "clear-site-data" || name == "public-key-pins",
        19 => name == "timing-allow-origin",
        20 => name == "origin-agent-cluster",
        22 => name == "service-worker-allowed",
        25 => name == "strict-transport-security",
        27 => name == "public-key-pins-report-only",
        _ => false,
    };
    listed || name.starts_with("access-control-")
}

/// Client headers every upstream kind is sent.
const COMMON_HEADERS: &[&str] = &["content-type", "accept", "user-agent", "idempotency-key"];

/// Client headers an upstream kind needs besides the common ones: the
/// provider's version and beta headers, its request ids.
const fn kind_headers(kind: UpstreamKind) -> &'static [&'static str] {
    match kind {
        UpstreamKind::Openai => &["openai-beta", "x-client-request-id"],
        UpstreamKind::Anthropic => &["anthropic-version", "anthropic-beta"],
        UpstreamKind::Http => &[
            "accept-language",
            "if-match",
            "if-none-match",
            "if-modified-since",
            "if-unmodified-since",
        ],
    }
}

/// Request headers to send on: only those the upstream's kind needs and
/// those its configuration adds (never a credential, cookie or hop-by-hop
/// header, refused at load), and none a `Connection` header names as
/// hop-by-hop. Everything else a client sends stays behind.
fn upstream_headers(src: &HeaderMap, up: &Upstream) -> HeaderMap {
    let named_by_connection: Vec<String> = src
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::new();
    for (k, v) in src {
        let n = k.as_str();
        let wanted = COMMON_HEADERS.contains(&n)
            || kind_headers(up.kind).contains(&n)
            || up.forward_headers.contains(k);
        if !wanted
            || crate::config::NEVER_FORWARDED.contains(&n)
            || named_by_connection.iter().any(|c| c == n)
        {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    out
}

/// The upstream's response headers the client gets, and what was taken
/// out of them: not the hop-by-hop ones nor the length (the body is framed
/// again), none that acts on keymint's origin ([`acts_on_origin`]), and the
/// upstream's key redacted wherever a value carries it back (a `Location`
/// with the key in its query, say).
fn response_headers(src: &HeaderMap, key: &KeyForms) -> (HeaderMap, Taken) {
    let mut out = HeaderMap::with_capacity(src.len());
    let mut taken = Taken::default();
    for (k, v) in src {
        let n = k.as_str();
        if HOP_BY_HOP.contains(&n) || k == header::CONTENT_LENGTH {
            continue;
        }
        if acts_on_origin(n) {
            taken.origin_bound = true;
            continue;
        }
        match redact_key(v.as_bytes(), key).map(HeaderValue::from_maybe_shared) {
            Some(Ok(clean)) => {
                taken.key = true;
                out.append(k.clone(), clean);
            }
            // Not a valid value once redacted (it cannot be: the mark is
            // printable ASCII); dropped rather than passed on.
            Some(Err(_)) => taken.key = true,
            None => {
                out.append(k.clone(), v.clone());
            }
        }
    }
    (out, taken)
}

/// What [`response_headers`] took out of an upstream's headers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Taken {
    /// The upstream's key, from at least one value.
    key: bool,
    /// At least one header that acts on keymint's origin.
    origin_bound: bool,
}

/// Bytes a query value keeps as they are (RFC 3986 unreserved); every
/// other byte is percent-encoded.
pub(crate) const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// What the screen made of a request body.
enum BodyScreen {
    /// Nothing found, or what was found replaced (`redact`).
    Passed(Screened),
    /// Secrets found where the role blocks them: their kinds.
    Blocked(Vec<&'static str>),
    /// A JSON body naming a member twice.
    Duplicate,
    /// A redacted JSON document that could not be encoded again.
    Unencodable,
}

/// The screen of a request body (the proxy's step 6 without its answers,
/// so that a large body's can run on another thread): the raw bytes, and a
/// JSON document's decoded strings or a form's decoded fields where
/// escapes or encoding could hide a secret from the raw screen. `form`
/// says whether the body is a form; it is asked only of a body that is not
/// JSON.
fn screen_body(
    screen: &'static Screen,
    body: Bytes,
    form: impl FnOnce() -> bool,
    redact: bool,
) -> BodyScreen {
    let raw = screen.find(&body);
    let escaped = body.contains(&b'\\');
    if raw.is_empty()
        && !escaped
        && let Some(fields) = peek::request_fields(&body)
    {
        // As below: nothing the decoded screen could add, and nothing
        // to re-encode; only the fields `reserve` reads are kept.
        return BodyScreen::Passed(Screened {
            body,
            redacted: false,
            json: Some(Doc::Fields(fields)),
        });
    }
    let Ok(parsed) = json_body(&body) else {
        return BodyScreen::Duplicate;
    };
    if let Some(mut v) = parsed {
        if raw.is_empty() && !escaped {
            // Without a single escape every decoded string (and key) is
            // a piece of the raw bytes the screen has just read, between
            // quotes that bound it as the start and end of a string do:
            // the decoded screen could find nothing more.
            return BodyScreen::Passed(Screened {
                body,
                redacted: false,
                json: Some(Doc::Full(v)),
            });
        }
        let kinds = detect::screen_json(screen, &mut v, redact);
        if !kinds.is_empty() && !redact {
            return BodyScreen::Blocked(kinds);
        }
        // What goes upstream is what was screened: the document is
        // re-encoded when a secret was replaced, when the raw bytes
        // show one the parsed document does not hold (a duplicate key),
        // or when escapes could spell one.
        let reencode = !kinds.is_empty() || !raw.is_empty() || body.windows(2).any(|w| w == b"\\u");
        let body = if reencode {
            match serde_json::to_vec(&v) {
                Ok(b) => Bytes::from(b),
                Err(_) => return BodyScreen::Unencodable,
            }
        } else {
            body
        };
        return BodyScreen::Passed(Screened {
            body,
            redacted: !kinds.is_empty(),
            json: Some(Doc::Full(v)),
        });
    }
    // A form's names and values are percent-encoded (and `+` is a
    // space): the upstream decodes them, so the screen does too, as it
    // does a query's; the raw bytes can hide a secret behind `%XX`.
    if form()
        && let Ok(text) = std::str::from_utf8(&body)
    {
        match screen_query(screen, text, redact) {
            // Nothing decoded; the raw bytes are screened below.
            QueryScreen::Clean(_) => {}
            QueryScreen::Blocked(kinds) => return BodyScreen::Blocked(kinds),
            QueryScreen::Redacted(form, _) => {
                return BodyScreen::Passed(Screened {
                    body: Bytes::from(form),
                    redacted: true,
                    json: None,
                });
            }
        }
    }
    if raw.is_empty() {
        return BodyScreen::Passed(Screened {
            body,
            redacted: false,
            json: None,
        });
    }
    let kinds = detect::kinds(&raw);
    if !redact {
        return BodyScreen::Blocked(kinds);
    }
    BodyScreen::Passed(Screened {
        body: Bytes::from(detect::redact(&body, &raw).into_owned()),
        redacted: true,
        json: None,
    })
}

/// What the screen made of a client's query.
enum QueryScreen<'s> {
    /// Nothing found: the query as sent.
    Clean(String),
    /// Secrets replaced (`redact`): the query to send, and their kinds.
    Redacted(String, Vec<&'s str>),
    /// Secrets found (`block`): their kinds.
    Blocked(Vec<&'s str>),
}

/// Screens each parameter of a query as decoded (`%XX` and `+`), so
/// encoding hides nothing: the whole `name=value`, then, to redact, the
/// name and the value each. A parameter whose secret only shows across
/// the two is dropped when redacting.
fn screen_query<'s>(screen: &'s Screen, query: &str, redact: bool) -> QueryScreen<'s> {
    if query.is_empty() {
        // Nothing to screen (the common case: no query at all).
        return QueryScreen::Clean(String::new());
    }
    let decode = |s: &str| -> Vec<u8> {
        let plus = s.replace('+', " ");
        percent_decode(plus.as_bytes()).collect()
    };
    let mut kinds = Vec::new();
    let mut out: Vec<String> = Vec::new();
    for param in query.split('&') {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (decode(n), Some(decode(v))),
            None => (decode(param), None),
        };
        let mut whole = name.clone();
        if let Some(v) = &value {
            whole.push(b'=');
            whole.extend_from_slice(v);
        }
        let found = screen.find(&whole);
        if found.is_empty() {
            out.push(param.to_owned());
            continue;
        }
        kinds.extend(detect::kinds(&found));
        if !redact {
            continue;
        }
        let (fname, fvalue) = (
            screen.find(&name),
            value.as_deref().map(|v| screen.find(v)).unwrap_or_default(),
        );
        if fname.is_empty() && fvalue.is_empty() {
            continue;
        }
        let mut p = percent_encode(&detect::redact(&name, &fname), QUERY_VALUE).to_string();
        if let Some(v) = &value {
            p.push('=');
            p.push_str(&percent_encode(&detect::redact(v, &fvalue), QUERY_VALUE).to_string());
        }
        out.push(p);
    }
    if kinds.is_empty() {
        return QueryScreen::Clean(query.to_owned());
    }
    kinds.sort_unstable();
    kinds.dedup();
    if redact {
        QueryScreen::Redacted(out.join("&"), kinds)
    } else {
        QueryScreen::Blocked(kinds)
    }
}

/// The query sent upstream: the client's, without any parameter named like
/// the key parameter (its name compared as the upstream reads it, escapes
/// decoded: `api%5Fkey` is `api_key`), plus the key.
fn upstream_query(client: Option<&str>, key: Option<(&str, &str)>) -> String {
    let mut parts: Vec<String> = client
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| {
            key.is_none_or(|(name, _)| {
                let sent = p.split('=').next().unwrap_or("");
                !percent_decode(sent.as_bytes()).eq(name.bytes())
            })
        })
        .map(str::to_owned)
        .collect();
    if let Some((name, k)) = key {
        parts.push(format!(
            "{name}={}",
            percent_encode(k.as_bytes(), QUERY_VALUE)
        ));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
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
            "a;v=1/b",
            "a%20b",
            "caf%C3%A9",
            "100%25",
            "100%25zz",
            "a%2525b",
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
            "v1/..;/x",
            "v1/..;jsessionid=1/x",
            "v1/.;/x",
            "v1/;/x",
            "v1/%252e%252e/x",
            "v1%252fx",
            "v1/%25252E%25252e/x",
            "v1/%c0%ae%c0%ae/x",
            "v1/%u002e%u002e/x",
            "v1/..%00/x",
            "v1/..%0a/x",
            "v1/..%20/x",
            "v1/..%3b/x",
            "v1/%",
            "v1/%2",
        ] {
            assert!(!safe_path(bad), "{bad}");
        }
    }

    fn upstream(kind: UpstreamKind, extra: &[&'static str]) -> Upstream {
        Upstream {
            name: "up".into(),
            kind,
            scheme: "http".into(),
            authority: "127.0.0.1:9".into(),
            base_path: String::new(),
            key: crate::config::KeyPlacement::Query { name: "k".into() },
            timeout_secs: 1,
            forward_headers: extra.iter().map(|h| HeaderName::from_static(h)).collect(),
            federation: None,
        }
    }

    #[test]
    fn the_token_is_taken_from_one_header_sent_once() {
        let map = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
            }
            h
        };
        let cases: [(&[(&str, &str)], Presented<'_>); 10] = [
            (&[], Presented::Nothing),
            (
                &[("authorization", "Bearer kmt_a ")],
                Presented::Token("kmt_a"),
            ),
            (
                &[("authorization", "bearer kmt_a")],
                Presented::Token("kmt_a"),
            ),
            (&[("x-api-key", "kmt_b")], Presented::Token("kmt_b")),
            (&[("api-key", "kmt_c")], Presented::Token("kmt_c")),
            // The first header present is the one that counts.
            (
                &[("x-api-key", "kmt_b"), ("authorization", "Bearer kmt_a")],
                Presented::Token("kmt_a"),
            ),
            (
                &[("authorization", "Basic a2V5"), ("x-api-key", "kmt_b")],
                Presented::Nothing,
            ),
            // Twice, even with the same value, is refused.
            (
                &[
                    ("authorization", "Bearer kmt_a"),
                    ("authorization", "Bearer kmt_a"),
                ],
                Presented::Repeated("authorization"),
            ),
            (
                &[("x-api-key", "kmt_b"), ("x-api-key", "kmt_z")],
                Presented::Repeated("x-api-key"),
            ),
            (
                &[
                    ("authorization", "Bearer kmt_a"),
                    ("x-api-key", "kmt_b"),
                    ("x-api-key", "kmt_z"),
                ],
                Presented::Token("kmt_a"),
            ),
        ];
        for (pairs, want) in cases {
            assert_eq!(presented_token(&map(pairs)), want, "{pairs:?}");
        }
        assert_eq!(
            presented_token(&map(&[("api-key", "a"), ("api-key", "b")])).token(),
            None
        );
    }

    #[test]
    fn the_upstreams_key_is_redacted_in_response_headers() {
        let forms = SentKey {
            key: Arc::new(zeroize::Zeroizing::new("uk_fake/Zx9+Qw8Er7".to_owned())),
            in_query: true,
        }
        .forms();
        let mark = std::str::from_utf8(crate::reflect::KEY_REDACTED).unwrap();
        let mut src = HeaderMap::new();
        src.insert(
            "location",
            HeaderValue::from_static("/x?api_key=uk_fake%2FZx9%2BQw8Er7"),
        );
        src.insert("x-request-id", HeaderValue::from_static("req_1"));
        src.insert("content-length", HeaderValue::from_static("10"));
        let (out, taken) = response_headers(&src, &forms);
        assert!(taken.key && !taken.origin_bound);
        assert_eq!(out["location"], format!("/x?api_key={mark}").as_str());
        assert_eq!(out["x-request-id"], "req_1");
        assert!(!out.contains_key("content-length"));
        src.remove("location");
        assert_eq!(response_headers(&src, &forms).1, Taken::default());
    }

    #[test]
    fn headers_that_act_on_keymints_origin_never_pass() {
        let forms = SentKey {
            key: Arc::new(zeroize::Zeroizing::new("uk_fake_Zx9Qw8Er7".to_owned())),
            in_query: false,
        }
        .forms();
        let cors = [
            "access-control-allow-origin",
            "access-control-allow-credentials",
            "access-control-allow-headers",
            "access-control-allow-methods",
            "access-control-expose-headers",
            "access-control-max-age",
            "access-control-allow-private-network",
        ];
        let mut src = HeaderMap::new();
        for n in ORIGIN_BOUND.iter().chain(&cors) {
            assert!(acts_on_origin(n), "{n}");
            src.append(HeaderName::from_static(n), HeaderValue::from_static("x=1"));
        }
        // Two cookies, as upstreams send them.
        src.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
        // What providers send and SDKs read stays.
        let ordinary = [
            "content-type",
            "x-request-id",
            "request-id",
            "openai-processing-ms",
            "openai-version",
            "x-ratelimit-remaining-requests",
            "anthropic-ratelimit-requests-remaining",
            "retry-after",
            "location",
            "link",
            "cache-control",
            "etag",
            "vary",
            "date",
            "www-authenticate",
            "content-security-policy",
            "x-should-retry",
            // Near misses, by length and by prefix.
            "set-cookies",
            "set-cookie3",
            "access-control",
            "nelx",
            "origin-agent-clusters",
        ];
        for n in ordinary {
            assert!(!acts_on_origin(n), "{n}");
            src.append(HeaderName::from_static(n), HeaderValue::from_static("1"));
        }
        let (out, taken) = response_headers(&src, &forms);
        assert_eq!(
            taken,
            Taken {
                key: false,
                origin_bound: true
            }
        );
        let left: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ordinary, "only the ordinary headers are left");
        // Alone, an ordinary answer takes nothing out.
        for n in ORIGIN_BOUND.iter().chain(&cors) {
            src.remove(*n);
        }
        assert_eq!(response_headers(&src, &forms).1, Taken::default());
    }

    #[test]
    fn only_the_headers_a_kind_needs_go_on() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer kmt_x"),
            ("x-api-key", "kmt_x"),
            ("cookie", "a=b"),
            ("connection", "close, user-agent"),
            ("user-agent", "named by connection"),
            ("anthropic-version", "2023-06-01"),
            ("openai-beta", "assistants=v2"),
            ("openai-organization", "org-evil"),
            ("openai-project", "proj_evil"),
            ("x-anything", "AKIA"),
            ("x-stainless-os", "Linux"),
            ("x-github-api-version", "2022-11-28"),
            ("content-type", "application/json"),
            ("accept", "application/json"),
            ("idempotency-key", "abc"),
            ("host", "127.0.0.1"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let names = |out: HeaderMap| {
            let mut n: Vec<String> = out.keys().map(|k| k.as_str().to_owned()).collect();
            n.sort();
            n
        };
        assert_eq!(
            names(upstream_headers(
                &h,
                &upstream(UpstreamKind::Anthropic, &[])
            )),
            [
                "accept",
                "anthropic-version",
                "content-type",
                "idempotency-key"
            ]
        );
        assert_eq!(
            names(upstream_headers(&h, &upstream(UpstreamKind::Openai, &[]))),
            ["accept", "content-type", "idempotency-key", "openai-beta"]
        );
        assert_eq!(
            names(upstream_headers(
                &h,
                &upstream(UpstreamKind::Http, &["x-github-api-version"])
            )),
            [
                "accept",
                "content-type",
                "idempotency-key",
                "x-github-api-version"
            ]
        );
    }

    #[test]
    fn a_query_is_screened_decoded() {
        let s = detect::screen().unwrap();
        // Fabricated, shaped like an OpenAI project key.
        let leak = format!("sk-proj-{}", "Zx9Qw8Er7Ty6".repeat(4));
        let encoded: String = leak.bytes().map(|b| format!("%{b:02X}")).collect();
        assert!(matches!(
            screen_query(s, "api-version=2024-10-21&limit=5", false),
            QueryScreen::Clean(q) if q == "api-version=2024-10-21&limit=5"
        ));
        for q in [
            format!("q={leak}"),
            format!("q={encoded}"),
            format!("a=1&{encoded}"),
            format!("note=key+{encoded}+here"),
        ] {
            match screen_query(s, &q, false) {
                QueryScreen::Blocked(k) => assert_eq!(k, ["openai_key"], "{q}"),
                _ => panic!("not blocked: {q}"),
            }
            match screen_query(s, &q, true) {
                QueryScreen::Redacted(out, k) => {
                    assert_eq!(k, ["openai_key"]);
                    assert!(!out.contains(&leak) && !out.contains(&encoded), "{out}");
                    assert!(out.contains("%5BREDACTED%3Aopenai_key%5D"), "{out}");
                }
                _ => panic!("not redacted: {q}"),
            }
        }
    }

    #[test]
    fn the_key_query_parameter_cannot_be_set_by_the_client() {
        assert_eq!(
            upstream_query(Some("q=1&api_key=evil&x"), Some(("api_key", "k y"))),
            "?q=1&x&api_key=k%20y"
        );
        assert_eq!(
            upstream_query(
                Some("api%5Fkey=a&%61pi_key=b&api_keys=c&api_key%3D=d"),
                Some(("api_key", "k"))
            ),
            "?api_keys=c&api_key%3D=d&api_key=k"
        );
        assert_eq!(upstream_query(None, None), "");
        assert_eq!(
            upstream_query(Some("api-version=2024"), None),
            "?api-version=2024"
        );
    }
}
