//! A local stand-in for the LLM providers the egress proxy talks to, on
//! 127.0.0.1 port 0. It follows the providers' documented shapes:
//!
//! - OpenAI (`/v1/chat/completions`, `/v1/responses`, `/v1/embeddings`,
//!   `/v1/models`): `chat.completion`, and as a stream `chat.completion.chunk`
//!   events with `usage: null`, a final usage-only chunk (empty `choices`)
//!   when `stream_options.include_usage` is set, then `data: [DONE]`;
//! - Anthropic (`/v1/messages`): a `message`, and as a stream
//!   `message_start` (input usage), `content_block_start`, `ping`,
//!   `content_block_delta`s, `content_block_stop`, `message_delta` (output
//!   usage), `message_stop`;
//! - a path ending in `/reflect`: the request printed back, headers and
//!   all (what a careless upstream does with the key it was sent); a chat
//!   completion for the model `reflect-sse`, a 400 event stream that
//!   prints the key, and for `reflect-stream`, a 200 event stream that
//!   quotes the key in an event cut in two mid-key (two chunks 20 ms
//!   apart), then in a later event whole, then `[DONE]`;
//! - a path ending in `/events`: a 200 event stream of three events 150
//!   ms apart, the second quoting the `X-Api-Key` it was sent (for http
//!   upstreams);
//! - anything else: a JSON echo (for http upstreams).
//!
//! With [`FakeUpstream::send_origin_headers`] every answer also carries
//! [`ORIGIN_HEADERS`] (what a careless or hostile upstream sends to set
//! the policy of the origin that relays it: cookies, `Alt-Svc`,
//! `Clear-Site-Data`, CORS, ...) and [`ORDINARY_HEADERS`] (a provider's
//! request id and timing, which must still pass).
//!
//! A chat completion gives `n` choices (default 1), each up to the
//! request's limit, and reports their tokens together, as OpenAI does.
//!
//! Like OpenAI, it refuses `max_tokens` on a chat completion for the
//! reasoning models (`o1`, `o3`, `o4`, `gpt-5` families), which take only
//! `max_completion_tokens`.
//!
//! It checks the provider key (`Authorization: Bearer` for OpenAI paths,
//! `x-api-key` for Anthropic) and records every request it receives, so that
//! tests can see what left the proxy. Usage is deterministic: input tokens
//! are the words of the prompt, output tokens the words of the reply (at
//! most the request's limit).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body::Frame;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The reply every model gives, one token per piece.
pub const REPLY: [&str; 6] = ["Hello", " from", " the", " fake", " upstream", "."];

/// Headers that act on the origin answering rather than on the response,
/// as an upstream can send them (`send_origin_headers`).
pub const ORIGIN_HEADERS: [(&str, &str); 20] = [
    (
        "set-cookie",
        "__Host-keymint_session=planted; Path=/; Secure; HttpOnly",
    ),
    ("set-cookie", "__cf_bm=abc; path=/; HttpOnly; Secure"),
    ("set-cookie2", "legacy=1; Version=1"),
    ("clear-site-data", "\"cookies\", \"storage\""),
    ("alt-svc", "h2=\"evil.example:443\"; ma=86400"),
    ("strict-transport-security", "max-age=0"),
    ("public-key-pins", "pin-sha256=\"AAAA\"; max-age=5184000"),
    (
        "public-key-pins-report-only",
        "pin-sha256=\"AAAA\"; max-age=1",
    ),
    ("expect-ct", "max-age=86400, enforce"),
    ("refresh", "0; url=https://evil.example/"),
    ("service-worker-allowed", "/"),
    ("origin-agent-cluster", "?0"),
    ("nel", "{\"report_to\": \"up\", \"max_age\": 2592000}"),
    (
        "report-to",
        "{\"group\": \"up\", \"max_age\": 2592000, \"endpoints\": [{\"url\": \"https://evil.example/r\"}]}",
    ),
    ("accept-ch", "Sec-CH-UA-Platform-Version"),
    ("set-login", "logged-in"),
    ("access-control-allow-origin", "*"),
    ("access-control-allow-credentials", "true"),
    ("access-control-expose-headers", "*"),
    ("timing-allow-origin", "*"),
];

/// Headers a provider sends that must reach the client as they are
/// (`send_origin_headers`).
pub const ORDINARY_HEADERS: [(&str, &str); 2] = [
    ("x-request-id", "req_fake_origin_01"),
    ("openai-processing-ms", "42"),
];

/// A request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// Everything received, as text, for "this never left" checks.
    pub fn dump(&self) -> String {
        let mut s = format!("{} {}\n", self.method, self.uri);
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
        }
        s.push_str(&String::from_utf8_lossy(&self.body));
        s
    }
}

#[derive(Debug)]
struct Shared {
    key: String,
    received: Mutex<Vec<Received>>,
    /// Milliseconds to wait before answering (and between stream chunks).
    delay_ms: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    /// Whether answers carry [`ORIGIN_HEADERS`] and [`ORDINARY_HEADERS`].
    origin_headers: AtomicBool,
}

/// A running fake provider. Dropping it stops it.
#[derive(Debug)]
pub struct FakeUpstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeUpstream {
    /// Starts a fake provider that accepts `key`.
    pub async fn start(key: &str) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            key: key.to_owned(),
            received: Mutex::new(Vec::new()),
            delay_ms: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            origin_headers: AtomicBool::new(false),
        });
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.shared
            .received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits this long before answering, and between stream events.
    pub fn set_delay(&self, d: Duration) {
        self.shared
            .delay_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether every answer from now on carries [`ORIGIN_HEADERS`] and
    /// [`ORDINARY_HEADERS`] (streams and refusals too).
    pub fn send_origin_headers(&self, on: bool) {
        self.shared.origin_headers.store(on, Ordering::Relaxed);
    }

    /// The most requests that were being answered at the same time.
    pub fn max_in_flight(&self) -> u64 {
        self.shared.max_in_flight.load(Ordering::Relaxed)
    }
}

fn words(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.split_whitespace().count() as u64,
        Value::Array(a) => a.iter().map(words).sum(),
        Value::Object(o) => o
            .iter()
            .filter(|(k, _)| matches!(k.as_str(), "content" | "text" | "input" | "system"))
            .map(|(_, v)| words(v))
            .sum(),
        _ => 0,
    }
}

fn openai_error(status: StatusCode, msg: &str, code: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"error": {"message": msg, "type": "invalid_request_error", "param": null, "code": code}})
            .to_string(),
    )
        .into_response()
}

fn anthropic_error(status: StatusCode, kind: &str, msg: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"type": "error", "error": {"type": kind, "message": msg}}).to_string(),
    )
        .into_response()
}

struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let origin_headers = s.origin_headers.load(Ordering::Relaxed);
    let mut r = answer(s, req).await;
    if origin_headers {
        let h = r.headers_mut();
        for (k, v) in ORIGIN_HEADERS.iter().chain(&ORDINARY_HEADERS) {
            h.append(*k, HeaderValue::from_static(v));
        }
    }
    r
}

async fn answer(s: Arc<Shared>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    s.received
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Received {
            method: parts.method.to_string(),
            uri: parts.uri.to_string(),
            headers: parts.headers.clone(),
            body: body.clone(),
        });
    let n = s.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    s.max_in_flight.fetch_max(n, Ordering::Relaxed);
    let _guard = InFlight(Arc::clone(&s));
    let delay = Duration::from_millis(s.delay_ms.load(Ordering::Relaxed));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let path = parts.uri.path();
    let h = &parts.headers;
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = v["model"].as_str().unwrap_or("unknown").to_owned();
    match path {
        // Anthropic's model listing (`x-api-key`), as a key check uses it.
        "/v1/models" if h.contains_key("x-api-key") => {
            if h.get("x-api-key").and_then(|k| k.to_str().ok()) != Some(s.key.as_str()) {
                return anthropic_error(
                    StatusCode::UNAUTHORIZED,
                    "authentication_error",
                    "invalid x-api-key",
                );
            }
            Json(json!({"data": [{"type": "model", "id": "claude-sonnet-4-5",
                "display_name": "Claude Sonnet 4.5", "created_at": "2025-09-29T00:00:00Z"}],
                "has_more": false, "first_id": "claude-sonnet-4-5", "last_id": "claude-sonnet-4-5"}))
        }
        "/v1/messages" => {
            if h.get("x-api-key").and_then(|k| k.to_str().ok()) != Some(s.key.as_str()) {
                return anthropic_error(
                    StatusCode::UNAUTHORIZED,
                    "authentication_error",
                    "invalid x-api-key",
                );
            }
            let Some(max) = v["max_tokens"].as_u64() else {
                return anthropic_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "max_tokens: Field required",
                );
            };
            let input = words(&v["messages"]) + words(&v["system"]);
            let out = (REPLY.len() as u64).min(max);
            let stop = if out < REPLY.len() as u64 {
                "max_tokens"
            } else {
                "end_turn"
            };
            if v["stream"].as_bool() == Some(true) {
                let mut ev: Vec<(String, Value)> = vec![(
                    "message_start".into(),
                    json!({"type": "message_start", "message": {"id": "msg_fake01", "type": "message", "role": "assistant",
                        "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
                        "usage": {"input_tokens": input, "output_tokens": 1}}}),
                )];
                ev.push(("content_block_start".into(), json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})));
                ev.push(("ping".into(), json!({"type": "ping"})));
                for w in REPLY.iter().take(out as usize) {
                    ev.push(("content_block_delta".into(), json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}})));
                }
                ev.push((
                    "content_block_stop".into(),
                    json!({"type": "content_block_stop", "index": 0}),
                ));
                ev.push(("message_delta".into(), json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": out}})));
                ev.push(("message_stop".into(), json!({"type": "message_stop"})));
                let chunks = ev
                    .into_iter()
                    .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
                    .collect();
                return sse(chunks, delay);
            }
            let text: String = REPLY.iter().take(out as usize).copied().collect();
            Json(
                json!({"id": "msg_fake01", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}], "stop_reason": stop, "stop_sequence": null,
                "usage": {"input_tokens": input, "output_tokens": out}}),
            )
        }
        p if p.starts_with("/v1/")
            && matches!(
                &p[4..],
                "chat/completions" | "responses" | "embeddings" | "models"
            )
            || p.starts_with("/v1/models/") =>
        {
            let want = format!("Bearer {}", s.key);
            if h.get(header::AUTHORIZATION).and_then(|k| k.to_str().ok()) != Some(want.as_str()) {
                return openai_error(
                    StatusCode::UNAUTHORIZED,
                    "Incorrect API key provided",
                    "invalid_api_key",
                );
            }
            // A careless gateway's refusal as an event stream that prints
            // the request's credential.
            if model == "reflect-sse" {
                return (
                    StatusCode::BAD_REQUEST,
                    [(header::CONTENT_TYPE, "text/event-stream")],
                    format!("data: {{\"error\": \"refused {want}\"}}\n\n"),
                )
                    .into_response();
            }
            if model == "reflect-stream" {
                let event = format!("data: {{\"echo\": \"{want}\"}}\n\n");
                let cut = event.len() - s.key.len() / 2 - 6;
                return sse(
                    vec![
                        event[..cut].to_owned(),
                        event[cut..].to_owned(),
                        format!("data: {{\"again\": \"{}\"}}\n\n", s.key),
                        "data: [DONE]\n\n".to_owned(),
                    ],
                    Duration::from_millis(20),
                );
            }
            openai(&p[4..], &v, model, delay)
        }
        p if p.ends_with("/events") => {
            let key = h
                .get("x-api-key")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default();
            sse(
                vec![
                    "event: ticket\ndata: {\"n\": 1}\n\n".to_owned(),
                    format!("event: ticket\ndata: {{\"n\": 2, \"debug\": \"key={key}\"}}\n\n"),
                    "event: ticket\ndata: {\"n\": 3}\n\n".to_owned(),
                ],
                Duration::from_millis(150),
            )
        }
        // An endpoint that prints the request back, headers and all, as a
        // careless error page or an echo service does: the request line in
        // a header, the rest as JSON with `/` escaped (`\/`, as PHP's
        // `json_encode` writes it).
        p if p.ends_with("/reflect") => {
            let headers: serde_json::Map<String, Value> = h
                .iter()
                .map(|(k, v)| (k.to_string(), json!(String::from_utf8_lossy(v.as_bytes()))))
                .collect();
            let text = json!({"uri": parts.uri.to_string(), "headers": headers})
                .to_string()
                .replace('/', "\\/");
            let uri = HeaderValue::from_str(&parts.uri.to_string())
                .unwrap_or(HeaderValue::from_static("-"));
            (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                [("x-request-uri", uri)],
                text,
            )
                .into_response()
        }
        _ => Json(json!({
            "ok": true,
            "method": parts.method.as_str(),
            "uri": parts.uri.to_string(),
        })),
    }
}

#[allow(non_snake_case)]
fn Json(v: Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

fn openai(path: &str, v: &Value, model: String, delay: Duration) -> Response {
    match path {
        "models" => Json(json!({"object": "list", "data": [
            {"id": "gpt-4o-mini", "object": "model", "created": 1_700_000_000, "owned_by": "fake"},
            {"id": "gpt-4o", "object": "model", "created": 1_700_000_000, "owned_by": "fake"},
        ]})),
        p if p.starts_with("models/") => Json(
            json!({"id": &p[7..], "object": "model", "created": 1_700_000_000, "owned_by": "fake"}),
        ),
        "embeddings" => {
            let input = words(&v["input"]);
            Json(json!({"object": "list", "model": model,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "usage": {"prompt_tokens": input, "total_tokens": input}}))
        }
        "responses" => {
            let input = words(&v["input"]) + words(&v["instructions"]);
            let max = v["max_output_tokens"].as_u64().unwrap_or(u64::MAX);
            let out = (REPLY.len() as u64).min(max);
            let text: String = REPLY.iter().take(out as usize).copied().collect();
            Json(
                json!({"id": "resp_fake01", "object": "response", "created_at": 1_700_000_000, "status": "completed",
                "model": model, "output": [{"type": "message", "id": "msg_fake01", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
                "usage": {"input_tokens": input, "output_tokens": out, "total_tokens": input + out,
                    "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}}),
            )
        }
        _ => {
            // OpenAI's reasoning models take only `max_completion_tokens`.
            let reasoning = ["o1", "o3", "o4", "gpt-5"].iter().any(|f| {
                model
                    .strip_prefix(*f)
                    .is_some_and(|r| r.is_empty() || r.starts_with('-') || r.starts_with('.'))
            });
            if reasoning && v.get("max_tokens").is_some() {
                return (
                    StatusCode::BAD_REQUEST,
                    [(header::CONTENT_TYPE, "application/json")],
                    json!({"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.",
                        "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter"}})
                    .to_string(),
                )
                    .into_response();
            }
            let input = words(&v["messages"]);
            let max = v["max_completion_tokens"]
                .as_u64()
                .or(v["max_tokens"].as_u64())
                .unwrap_or(u64::MAX);
            let out = (REPLY.len() as u64).min(max);
            let finish = if out < REPLY.len() as u64 {
                "length"
            } else {
                "stop"
            };
            // `n` choices, each up to the limit, billed together ("you will
            // be charged based on the number of generated tokens across all
            // of the choices").
            let n = v["n"].as_u64().unwrap_or(1).clamp(1, 128);
            let completion = out * n;
            let usage = json!({"prompt_tokens": input, "completion_tokens": completion, "total_tokens": input + completion});
            if v["stream"].as_bool() == Some(true) {
                let with_usage = v
                    .pointer("/stream_options/include_usage")
                    .and_then(Value::as_bool)
                    == Some(true);
                let chunk = |index: u64, delta: Value, finish: Value| {
                    let mut c = json!({"id": "chatcmpl-fake01", "object": "chat.completion.chunk", "created": 1_700_000_000,
                        "model": model, "system_fingerprint": null,
                        "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}]});
                    if with_usage {
                        c["usage"] = Value::Null;
                    }
                    c
                };
                let mut events = Vec::new();
                for i in 0..n {
                    events.push(chunk(
                        i,
                        json!({"role": "assistant", "content": ""}),
                        Value::Null,
                    ));
                    for w in REPLY.iter().take(out as usize) {
                        events.push(chunk(i, json!({"content": w}), Value::Null));
                    }
                    events.push(chunk(i, json!({}), json!(finish)));
                }
                if with_usage {
                    events.push(json!({"id": "chatcmpl-fake01", "object": "chat.completion.chunk", "created": 1_700_000_000,
                        "model": model, "system_fingerprint": null, "choices": [], "usage": usage}));
                }
                let mut chunks: Vec<String> = events
                    .into_iter()
                    .map(|e| format!("data: {e}\n\n"))
                    .collect();
                chunks.push("data: [DONE]\n\n".into());
                return sse(chunks, delay);
            }
            let text: String = REPLY.iter().take(out as usize).copied().collect();
            let choices: Vec<Value> = (0..n)
                .map(|i| json!({"index": i, "message": {"role": "assistant", "content": text, "refusal": null},
                    "logprobs": null, "finish_reason": finish}))
                .collect();
            Json(
                json!({"id": "chatcmpl-fake01", "object": "chat.completion", "created": 1_700_000_000, "model": model,
                "system_fingerprint": null,
                "choices": choices,
                "usage": usage}),
            )
        }
    }
}

/// An event stream that sends each chunk separately, `delay` apart.
fn sse(chunks: Vec<String>, delay: Duration) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        for c in chunks {
            if tx.send(Bytes::from(c)).await.is_err() {
                return;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::new(ChannelBody(rx)),
    )
        .into_response()
}

struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}
