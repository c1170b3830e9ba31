//! What differs between providers: which endpoint a path is, what a request
//! asks for (model, stream, output limit), where usage is in a response, and
//! the shape of an error body.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};

use crate::config::UpstreamKind;

/// A recognised endpoint of an LLM upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Responses,
    Embeddings,
    Models,
    Messages,
    CountTokens,
}

impl Endpoint {
    pub const fn name(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat.completions",
            Self::Responses => "responses",
            Self::Embeddings => "embeddings",
            Self::Models => "models",
            Self::Messages => "messages",
            Self::CountTokens => "messages.count_tokens",
        }
    }

    /// Whether the endpoint generates (and is billed for) tokens.
    pub const fn metered(self) -> bool {
        !matches!(self, Self::Models | Self::CountTokens)
    }

    /// Whether the request body names a model.
    pub const fn has_model(self) -> bool {
        !matches!(self, Self::Models)
    }
}

/// Which endpoint `method rel` is, for an LLM upstream. `rel` is the path
/// after the upstream's base, without a leading `/`.
pub fn classify(kind: UpstreamKind, method: &http::Method, rel: &str) -> Option<Endpoint> {
    let get = method == http::Method::GET;
    let post = method == http::Method::POST;
    let models =
        |p: &str| p == "models" || p.strip_prefix("models/").is_some_and(|m| !m.is_empty());
    match kind {
        UpstreamKind::Openai => match rel {
            "chat/completions" if post => Some(Endpoint::ChatCompletions),
            "responses" if post => Some(Endpoint::Responses),
            "embeddings" if post => Some(Endpoint::Embeddings),
            p if get && models(p) => Some(Endpoint::Models),
            _ => None,
        },
        UpstreamKind::Anthropic => match rel {
            "v1/messages" if post => Some(Endpoint::Messages),
            "v1/messages/count_tokens" if post => Some(Endpoint::CountTokens),
            p if get && p.strip_prefix("v1/").is_some_and(models) => Some(Endpoint::Models),
            _ => None,
        },
        UpstreamKind::Http => None,
    }
}

/// What a JSON request asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Asked {
    pub model: Option<String>,
    pub stream: bool,
    /// The output limit the request sets, if any: the tightest of its
    /// limit fields.
    pub max_output: Option<u64>,
    /// The loosest of the limit fields the request sets (not `null`), a
    /// value that is not a whole number counting as no limit: what an
    /// upstream that reads another field than the tightest (vLLM and the
    /// stand-in prefer `max_completion_tokens` to `max_tokens`) may
    /// generate, unless the proxy lowers it.
    pub loosest_output: Option<u64>,
    /// OpenAI chat stream without `stream_options.include_usage`.
    pub usage_not_requested: bool,
    /// A chat completion's `n`: how many choices it generates, each up to
    /// the output limit, billed together. `None` when not set (one
    /// choice); `Some(0)` when set to anything but a whole number from 1
    /// to [`MAX_CHOICES`].
    pub n: Option<u64>,
    /// The output limit field the request sets to 0, if one is. No
    /// provider generates nothing (OpenAI and Anthropic answer 400), and a
    /// limit of 0 would reserve nothing against the task's budget.
    pub zero_output: Option<&'static str>,
}

/// The most choices OpenAI generates for one chat completion (`n`).
pub const MAX_CHOICES: u64 = 128;

impl Asked {
    /// How many choices the request generates, each up to its output
    /// limit.
    pub fn choices(&self) -> u64 {
        self.n.unwrap_or(1).max(1)
    }

    /// Whether `n` is set to something no provider takes.
    pub fn bad_choices(&self) -> bool {
        self.n == Some(0)
    }
}

/// Whether an OpenAI model takes its chat output limit only as
/// `max_completion_tokens`: the reasoning families (`o1`, `o3`, `o4`,
/// `gpt-5`, with their `-mini`, dated and `.N` variants) reject
/// `max_tokens`.
pub fn needs_max_completion_tokens(model: &str) -> bool {
    ["o1", "o3", "o4", "gpt-5"].iter().any(|family| {
        model.strip_prefix(family).is_some_and(|rest| {
            rest.is_empty()
                || rest.starts_with('-')
                || (*family == "gpt-5" && rest.starts_with('.'))
        })
    })
}

/// The fields that limit output tokens, per endpoint. A chat completion
/// takes `max_completion_tokens` (the current name, and the only one
/// reasoning models accept) or the older `max_tokens`.
fn output_fields(ep: Endpoint) -> &'static [&'static str] {
    match ep {
        Endpoint::ChatCompletions => &["max_completion_tokens", "max_tokens"],
        Endpoint::Responses => &["max_output_tokens"],
        Endpoint::Messages => &["max_tokens"],
        _ => &[],
    }
}

/// The field to add when a request sets no output limit: for chat,
/// `max_completion_tokens` where the model requires it, else `max_tokens`
/// (which every OpenAI-compatible server takes).
fn default_output_field(ep: Endpoint, body: &Value) -> Option<&'static str> {
    match ep {
        Endpoint::ChatCompletions => Some(
            if body
                .get("model")
                .and_then(Value::as_str)
                .is_some_and(needs_max_completion_tokens)
            {
                "max_completion_tokens"
            } else {
                "max_tokens"
            },
        ),
        Endpoint::Responses => Some("max_output_tokens"),
        Endpoint::Messages => Some("max_tokens"),
        _ => None,
    }
}

pub fn inspect(ep: Endpoint, body: &Value) -> Asked {
    let model = body.get("model").and_then(Value::as_str).map(str::to_owned);
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    // One pass over the limit fields the request sets (not `null`): the
    // tightest whole number, the loosest (a value that is not a whole
    // number counts as no limit), and the first set to 0.
    let mut max_output: Option<u64> = None;
    let mut loosest_output: Option<u64> = None;
    let mut zero_output = None;
    for &field in output_fields(ep) {
        let Some(v) = body.get(field).filter(|v| !v.is_null()) else {
            continue;
        };
        let count = v.as_u64();
        if let Some(c) = count {
            max_output = Some(max_output.map_or(c, |m| m.min(c)));
        }
        if count == Some(0) && zero_output.is_none() {
            zero_output = Some(field);
        }
        let loose = count.unwrap_or(u64::MAX);
        loosest_output = Some(loosest_output.map_or(loose, |m| m.max(loose)));
    }
    let usage_not_requested = ep == Endpoint::ChatCompletions
        && stream
        && !body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
    let n = match body.get("n") {
        Some(v) if ep == Endpoint::ChatCompletions && !v.is_null() => Some(
            v.as_u64()
                .filter(|n| (1..=MAX_CHOICES).contains(n))
                .unwrap_or(0),
        ),
        _ => None,
    };
    Asked {
        model,
        stream,
        max_output,
        loosest_output,
        usage_not_requested,
        n,
        zero_output,
    }
}

/// Sets the output limit to `n` (the reservation): each limit field the
/// request holds is lowered to `n` if above it (or not a count); with
/// none, the endpoint's field for the model is added.
pub fn cap_output(ep: Endpoint, body: &mut Value, n: u64) -> bool {
    let default = default_output_field(ep, body);
    let Some(o) = body.as_object_mut() else {
        return false;
    };
    let present: Vec<&str> = output_fields(ep)
        .iter()
        .copied()
        .filter(|f| o.contains_key(*f))
        .collect();
    let mut changed = false;
    for f in &present {
        if o.get(*f).and_then(Value::as_u64).is_none_or(|c| c > n) {
            o.insert((*f).to_owned(), json!(n));
            changed = true;
        }
    }
    if present.is_empty()
        && let Some(f) = default
    {
        o.insert(f.to_owned(), json!(n));
        changed = true;
    }
    changed
}

/// Asks an OpenAI chat stream for its usage chunk.
pub fn request_stream_usage(body: &mut Value) {
    if let Some(o) = body.as_object_mut() {
        let so = o.entry("stream_options").or_insert_with(|| json!({}));
        if let Some(so) = so.as_object_mut() {
            so.insert("include_usage".into(), json!(true));
        } else {
            *so = json!({"include_usage": true});
        }
    }
}

fn u(v: &Value, p: &str) -> u64 {
    // A pointer to a direct member (`/name`, nothing to unescape) is a plain
    // lookup: `Value::pointer` would copy each of its tokens first, on
    // every metered response.
    let found = match p.strip_prefix('/') {
        Some(name) if !name.contains(['/', '~']) => v.get(name),
        _ => v.pointer(p),
    };
    found.and_then(Value::as_u64).unwrap_or(0)
}

/// `(input, output)` tokens from a complete (non-streamed) response body.
pub fn usage_of(ep: Endpoint, v: &Value) -> Option<(u64, u64)> {
    let usage = v.get("usage").filter(|x| x.is_object())?;
    Some(counts_of(ep, |name| {
        usage.get(name).and_then(Value::as_u64).unwrap_or(0)
    }))
}

/// The members of a response's `usage` object that [`counts_of`] reads.
pub(crate) const USAGE_MEMBERS: [&str; 6] = [
    "prompt_tokens",
    "completion_tokens",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
];

/// `(input, output)` tokens of a complete response whose `usage` is an
/// object, given each member's count (`0` when absent or not a `u64`).
/// The one place that says which members an endpoint is billed by, for
/// the whole document ([`usage_of`]) and for the peek at it.
pub(crate) fn counts_of(ep: Endpoint, count: impl Fn(&str) -> u64) -> (u64, u64) {
    match ep {
        Endpoint::ChatCompletions | Endpoint::Embeddings => {
            (count("prompt_tokens"), count("completion_tokens"))
        }
        Endpoint::Responses => (count("input_tokens"), count("output_tokens")),
        Endpoint::Messages => (anthropic_input_of(&count), count("output_tokens")),
        Endpoint::Models | Endpoint::CountTokens => (0, 0),
    }
}

fn anthropic_input(usage: &Value) -> u64 {
    anthropic_input_of(&|name: &str| usage.get(name).and_then(Value::as_u64).unwrap_or(0))
}

fn anthropic_input_of(count: &impl Fn(&str) -> u64) -> u64 {
    // Saturating: an upstream's counts near u64::MAX must not overflow
    // (a panic in debug builds, a wrap to a tiny charge in release).
    count("input_tokens")
        .saturating_add(count("cache_creation_input_tokens"))
        .saturating_add(count("cache_read_input_tokens"))
}

/// Follows the usage reported along a stream, one SSE event at a time.
#[derive(Debug, Default, Clone)]
pub struct StreamMeter {
    pub input: Option<u64>,
    pub output: Option<u64>,
    /// The provider's last report of the stream's usage was seen: OpenAI's
    /// usage-only chunk, a Responses stream's final `response`, Anthropic's
    /// `message_delta` (the output so far is not the output of a stream
    /// cut before them).
    pub last_report: bool,
}

impl StreamMeter {
    /// Looks at one event's `data` (parsed JSON). Returns `true` if the
    /// event is OpenAI's usage-only chunk (which the caller may strip).
    pub fn observe(&mut self, ep: Endpoint, data: &Value) -> bool {
        match ep {
            Endpoint::ChatCompletions => {
                if let Some(usage) = data.get("usage").filter(|x| x.is_object()) {
                    self.input = Some(u(usage, "/prompt_tokens"));
                    self.output = Some(u(usage, "/completion_tokens"));
                    let no_choices = data
                        .get("choices")
                        .is_none_or(|c| c.as_array().is_none_or(Vec::is_empty));
                    self.last_report |= no_choices;
                    return no_choices;
                }
                false
            }
            Endpoint::Responses => {
                // Only the final `response` (completed, incomplete,
                // failed) carries its usage.
                if let Some(usage) = data.pointer("/response/usage").filter(|x| x.is_object()) {
                    self.input = Some(u(usage, "/input_tokens"));
                    self.output = Some(u(usage, "/output_tokens"));
                    self.last_report = true;
                }
                false
            }
            Endpoint::Messages => {
                match data.get("type").and_then(Value::as_str) {
                    Some("message_start") => {
                        // Its `output_tokens` (1, or so) is no count of the
                        // output: that comes in `message_delta`, after the
                        // text. A stream that ends or is cut before it
                        // reported no output.
                        if let Some(usage) = data.pointer("/message/usage") {
                            self.input = Some(anthropic_input(usage));
                        }
                    }
                    Some("message_delta") => {
                        if let Some(usage) = data.get("usage") {
                            // Cumulative counts; newer APIs repeat input here.
                            let out = u(usage, "/output_tokens");
                            self.output = Some(self.output.unwrap_or(0).max(out));
                            let inp = anthropic_input(usage);
                            if inp > 0 {
                                self.input = Some(self.input.unwrap_or(0).max(inp));
                            }
                            self.last_report = true;
                        }
                    }
                    _ => {}
                }
                false
            }
            _ => false,
        }
    }

    /// Both counts, once the stream has reported them.
    pub fn usage(&self) -> Option<(u64, u64)> {
        Some((self.input?, self.output?))
    }

    /// Both counts of a stream that did not reach its end (the client went
    /// away, the upstream failed or stalled): only once the provider's
    /// last report of them was seen. Before it, what was generated is not
    /// known, and the whole reservation is kept.
    pub fn usage_if_cut(&self) -> Option<(u64, u64)> {
        self.last_report.then(|| self.usage()).flatten()
    }
}

/// Why the proxy refused or failed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Unauthenticated,
    Forbidden,
    NotFound,
    BadRequest,
    TooLarge,
    /// The body is sent with a content coding (`Content-Encoding: gzip`)
    /// that the proxy does not decode: it could not be screened or read.
    UnsupportedEncoding,
    RateLimited,
    BudgetExhausted,
    UpstreamUnavailable,
    UpstreamTimeout,
    /// The provider's token service (federation) cannot give keymint a
    /// token now: 503, retry shortly.
    ProviderUnavailable,
    /// keymint's own store cannot be asked now (the token, the budget or
    /// the rate limit could not be checked): 503, retry shortly.
    StoreUnavailable,
    Internal,
}

impl Failure {
    pub const fn status(self) -> StatusCode {
        match self {
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedEncoding => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RateLimited | Self::BudgetExhausted => StatusCode::TOO_MANY_REQUESTS,
            Self::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::ProviderUnavailable | Self::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// keymint's stable code (also OpenAI's `code`).
    pub const fn code(self) -> &'static str {
        match self {
            Self::Unauthenticated => "invalid_api_key",
            Self::Forbidden => "not_allowed",
            Self::NotFound => "not_found",
            Self::BadRequest => "invalid_request",
            Self::TooLarge => "request_too_large",
            Self::UnsupportedEncoding => "unsupported_media_type",
            Self::RateLimited => "rate_limit_exceeded",
            Self::BudgetExhausted => "budget_exhausted",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::ProviderUnavailable => "provider_unavailable",
            Self::StoreUnavailable => "temporarily_unavailable",
            Self::Internal => "internal",
        }
    }

    const fn openai_type(self) -> &'static str {
        match self {
            Self::Unauthenticated
            | Self::Forbidden
            | Self::NotFound
            | Self::BadRequest
            | Self::TooLarge
            | Self::UnsupportedEncoding => "invalid_request_error",
            Self::RateLimited => "requests",
            Self::BudgetExhausted => "insufficient_quota",
            Self::UpstreamUnavailable
            | Self::UpstreamTimeout
            | Self::ProviderUnavailable
            | Self::StoreUnavailable
            | Self::Internal => "server_error",
        }
    }

    const fn anthropic_type(self) -> &'static str {
        match self {
            Self::Unauthenticated => "authentication_error",
            Self::Forbidden => "permission_error",
            Self::NotFound => "not_found_error",
            Self::BadRequest | Self::UnsupportedEncoding => "invalid_request_error",
            Self::TooLarge => "request_too_large",
            Self::RateLimited | Self::BudgetExhausted => "rate_limit_error",
            Self::UpstreamUnavailable | Self::UpstreamTimeout | Self::Internal => "api_error",
            Self::ProviderUnavailable | Self::StoreUnavailable => "overloaded_error",
        }
    }
}

/// An error response in the shape of the upstream's provider, so that SDKs
/// raise their usual exceptions. `message` must hold nothing secret.
#[derive(Debug, Clone)]
pub struct ProxyError {
    pub failure: Failure,
    pub message: String,
    pub retry_after: Option<u64>,
    /// Which shape; `None` (unknown upstream) answers like OpenAI.
    pub kind: Option<UpstreamKind>,
}

impl ProxyError {
    pub fn new(failure: Failure, message: impl Into<String>) -> Self {
        Self {
            failure,
            message: message.into(),
            retry_after: None,
            kind: None,
        }
    }

    #[must_use]
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    #[must_use]
    pub fn shaped(mut self, kind: UpstreamKind) -> Self {
        self.kind = Some(kind);
        self
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let f = self.failure;
        let (ctype, body) = match self.kind.unwrap_or(UpstreamKind::Openai) {
            UpstreamKind::Openai => (
                "application/json",
                json!({"error": {
                    "message": self.message,
                    "type": f.openai_type(),
                    "param": null,
                    "code": f.code(),
                }}),
            ),
            UpstreamKind::Anthropic => (
                "application/json",
                json!({"type": "error", "error": {
                    "type": f.anthropic_type(),
                    "message": self.message,
                }}),
            ),
            UpstreamKind::Http => (
                "application/problem+json",
                json!({
                    "type": format!("urn:keymint:error:{}", f.code()),
                    "title": f.code().replace('_', " "),
                    "status": f.status().as_u16(),
                    "detail": self.message,
                    "code": f.code(),
                }),
            ),
        };
        let mut res = (f.status(), body.to_string()).into_response();
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(s) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        // The SDKs retry 429 and 5xx by default; a spent budget or a refusal
        // will not get better by retrying.
        let retry = matches!(
            f,
            Failure::RateLimited
                | Failure::UpstreamUnavailable
                | Failure::UpstreamTimeout
                | Failure::ProviderUnavailable
                | Failure::StoreUnavailable
        );
        h.insert(
            "x-should-retry",
            HeaderValue::from_static(if retry { "true" } else { "false" }),
        );
        if f == Failure::Unauthenticated {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_lookups_read_what_a_json_pointer_reads() {
        let v = serde_json::json!({
            "prompt_tokens": 14, "completion_tokens": "2", "a/b": 3, "a~b": 4,
            "nested": {"input_tokens": 5}, "neg": -1, "big": u64::MAX
        });
        for p in [
            "/prompt_tokens",
            "/completion_tokens",
            "/a~1b",
            "/a~0b",
            "/nested/input_tokens",
            "/missing",
            "/neg",
            "/big",
            "/",
            "",
        ] {
            assert_eq!(
                u(&v, p),
                v.pointer(p).and_then(Value::as_u64).unwrap_or(0),
                "{p}"
            );
        }
        assert_eq!(
            usage_of(Endpoint::ChatCompletions, &serde_json::json!({"usage": v})),
            Some((14, 0))
        );
    }

    #[test]
    fn huge_anthropic_counts_saturate_instead_of_overflowing() {
        let big = u64::MAX - 1;
        let usage = json!({"input_tokens": big, "cache_creation_input_tokens": big,
                           "cache_read_input_tokens": 5, "output_tokens": 1});
        assert_eq!(anthropic_input(&usage), u64::MAX);
        let mut m = StreamMeter::default();
        m.observe(
            Endpoint::Messages,
            &json!({"type": "message_start", "message": {"usage": usage}}),
        );
        assert_eq!(m.input, Some(u64::MAX));
    }

    #[test]
    fn endpoints_are_classified_per_kind() {
        use http::Method;
        let o = UpstreamKind::Openai;
        assert_eq!(
            classify(o, &Method::POST, "chat/completions"),
            Some(Endpoint::ChatCompletions)
        );
        assert_eq!(
            classify(o, &Method::GET, "models/gpt-4o"),
            Some(Endpoint::Models)
        );
        assert_eq!(classify(o, &Method::GET, "chat/completions"), None);
        assert_eq!(classify(o, &Method::POST, "files"), None);
        let a = UpstreamKind::Anthropic;
        assert_eq!(
            classify(a, &Method::POST, "v1/messages"),
            Some(Endpoint::Messages)
        );
        assert_eq!(
            classify(a, &Method::GET, "v1/models"),
            Some(Endpoint::Models)
        );
        assert_eq!(classify(a, &Method::POST, "messages"), None);
    }

    #[test]
    fn chat_streams_without_usage_are_asked_for_it() {
        let mut b = json!({"model": "m", "stream": true, "messages": []});
        let a = inspect(Endpoint::ChatCompletions, &b);
        assert!(a.stream && a.usage_not_requested && a.max_output.is_none());
        request_stream_usage(&mut b);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert!(cap_output(Endpoint::ChatCompletions, &mut b, 100));
        assert_eq!(b["max_tokens"], 100);
        assert!(!cap_output(Endpoint::ChatCompletions, &mut b, 200));
        let mut c = json!({"model": "m", "max_completion_tokens": 500});
        assert!(cap_output(Endpoint::ChatCompletions, &mut c, 100));
        assert_eq!(c["max_completion_tokens"], 100);
        assert!(c.get("max_tokens").is_none());
    }

    #[test]
    fn reasoning_models_get_max_completion_tokens() {
        for m in [
            "o1",
            "o1-mini",
            "o3",
            "o3-mini-2025-01-31",
            "o4-mini",
            "gpt-5",
            "gpt-5-mini",
            "gpt-5.1",
        ] {
            assert!(needs_max_completion_tokens(m), "{m}");
            let mut b = json!({"model": m, "messages": []});
            assert!(cap_output(Endpoint::ChatCompletions, &mut b, 64));
            assert_eq!(b["max_completion_tokens"], 64, "{m}");
            assert!(b.get("max_tokens").is_none(), "{m}");
        }
        for m in [
            "gpt-4o-mini",
            "gpt-4.1",
            "o10",
            "gpt-50",
            "omni",
            "llama-o3",
        ] {
            assert!(!needs_max_completion_tokens(m), "{m}");
        }
        // A client's `max_completion_tokens` is the limit, and is lowered.
        let mut b = json!({"model": "o3", "max_completion_tokens": 10_000});
        assert_eq!(
            inspect(Endpoint::ChatCompletions, &b).max_output,
            Some(10_000)
        );
        assert!(cap_output(Endpoint::ChatCompletions, &mut b, 64));
        assert_eq!(b["max_completion_tokens"], 64);
        assert!(b.get("max_tokens").is_none());
        // Both set: the tighter one counts, and both are lowered.
        let mut b = json!({"model": "gpt-4o", "max_completion_tokens": 50, "max_tokens": 9000});
        assert_eq!(inspect(Endpoint::ChatCompletions, &b).max_output, Some(50));
        assert!(cap_output(Endpoint::ChatCompletions, &mut b, 64));
        assert_eq!(b["max_completion_tokens"], 50);
        assert_eq!(b["max_tokens"], 64);
    }

    #[test]
    fn stream_usage_is_found_for_each_provider() {
        let mut m = StreamMeter::default();
        assert!(!m.observe(
            Endpoint::ChatCompletions,
            &json!({"choices": [{"delta": {"content": "hi"}}], "usage": null})
        ));
        assert!(m.observe(
            Endpoint::ChatCompletions,
            &json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}})
        ));
        assert_eq!(m.usage(), Some((5, 7)));
        let mut a = StreamMeter::default();
        a.observe(
            Endpoint::Messages,
            &json!({"type": "message_start", "message": {"usage": {"input_tokens": 11, "output_tokens": 1}}}),
        );
        a.observe(
            Endpoint::Messages,
            &json!({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 9}}),
        );
        assert_eq!(a.usage(), Some((11, 9)));
    }

    /// A stream cut before the provider's last report of its usage has
    /// reported no output, whatever its first events said: Anthropic's
    /// `message_start` says 1 output token before any text is sent.
    #[test]
    fn a_stream_cut_before_its_last_usage_report_reported_nothing() {
        let start = json!({"type": "message_start", "message": {"usage": {"input_tokens": 11, "output_tokens": 1}}});
        let delta = json!({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 9}});
        let mut a = StreamMeter::default();
        a.observe(Endpoint::Messages, &start);
        assert_eq!((a.usage(), a.usage_if_cut()), (None, None));
        a.observe(Endpoint::Messages, &delta);
        assert_eq!(
            (a.usage(), a.usage_if_cut()),
            (Some((11, 9)), Some((11, 9)))
        );

        // A usage beside choices (per-chunk usage of some OpenAI-compatible
        // servers) is a count so far: it stands for a stream that ended,
        // not for one cut short.
        let mut c = StreamMeter::default();
        c.observe(
            Endpoint::ChatCompletions,
            &json!({"choices": [{"delta": {"content": "hi"}}], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}),
        );
        assert_eq!((c.usage(), c.usage_if_cut()), (Some((5, 1)), None));
        c.observe(
            Endpoint::ChatCompletions,
            &json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}}),
        );
        assert_eq!(c.usage_if_cut(), Some((5, 7)));

        let mut r = StreamMeter::default();
        r.observe(
            Endpoint::Responses,
            &json!({"type": "response.created", "response": {"usage": null}}),
        );
        assert_eq!(r.usage_if_cut(), None);
        r.observe(
            Endpoint::Responses,
            &json!({"type": "response.completed", "response": {"usage": {"input_tokens": 3, "output_tokens": 4}}}),
        );
        assert_eq!(r.usage_if_cut(), Some((3, 4)));
    }

    #[test]
    fn a_chat_completions_choices_are_read_and_checked() {
        let ask = |b: Value| inspect(Endpoint::ChatCompletions, &b);
        assert_eq!(ask(json!({"model": "m"})).choices(), 1);
        assert_eq!(ask(json!({"model": "m", "n": null})).choices(), 1);
        assert_eq!(ask(json!({"model": "m", "n": 4})).choices(), 4);
        for bad in [
            json!(0),
            json!(-1),
            json!(2.5),
            json!("4"),
            json!(129),
            json!([2]),
        ] {
            let a = ask(json!({"model": "m", "n": bad}));
            assert!(a.bad_choices(), "{bad}");
        }
        // Other endpoints have no `n` of this meaning.
        let m = inspect(Endpoint::Messages, &json!({"model": "m", "n": 4}));
        assert_eq!((m.choices(), m.bad_choices()), (1, false));
    }
}
