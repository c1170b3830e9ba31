//! The workload API's wire format: newline-delimited JSON, one request
//! object per line and one response object per line, in order (watch
//! events interleave; they carry `"event"` instead of `"ok"`).
//!
//! Reading is bounded: a line is at most [`crate::Limits::max_line`] bytes
//! and, once started, must end within [`crate::Limits::line_timeout`].
//! The full table of ops is in `docs/design/0012-node-agent.md`.

use std::time::Duration;

use keymint_proto::{Credential, Lease, Task};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Every op the agent knows, for the `unknown_op` message.
pub const OPS: &[&str] = &[
    "whoami",
    "start_task",
    "end_task",
    "fetch",
    "renew",
    "watch",
    "attach",
    "health",
];

/// An error answered to a workload: a stable code and a message that
/// never contains a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({code})")]
pub struct ApiError {
    pub code: String,
    pub message: String,
}

/// The agent's own error codes; errors from the server keep the server's
/// code (`policy_denied`, `task_not_active`, …).
pub mod code {
    /// The line is not a JSON object, or a field is missing or malformed.
    pub const BAD_REQUEST: &str = "bad_request";
    /// `op` names nothing the agent knows.
    pub const UNKNOWN_OP: &str = "unknown_op";
    /// A line longer than the limit; the connection is closed.
    pub const TOO_LARGE: &str = "too_large";
    /// A line not finished in time; the connection is closed.
    pub const TIMEOUT: &str = "timeout";
    /// The caller matches no entry, or the attested process is gone.
    pub const NOT_ATTESTED: &str = "not_attested";
    /// The task or lease belongs to another workload.
    pub const FORBIDDEN: &str = "forbidden";
    pub const NOT_FOUND: &str = "not_found";
    /// The server cannot be reached (nothing new can be minted).
    pub const UNAVAILABLE: &str = "unavailable";
    /// Too many connections at once; the connection is closed.
    pub const BUSY: &str = "busy";
    pub const INTERNAL: &str = "internal";
}

impl ApiError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(code::BAD_REQUEST, message)
    }
}

/// A failure to read one line.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("a request line is longer than {0} bytes")]
    TooLarge(usize),
    #[error("a request line was not finished within {0:?}")]
    Timeout(Duration),
    #[error("reading the connection failed")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// What the workload is told before the connection closes.
    pub fn to_api(&self) -> ApiError {
        match self {
            Self::TooLarge(_) => ApiError::new(code::TOO_LARGE, self.to_string()),
            Self::Timeout(_) => ApiError::new(code::TIMEOUT, self.to_string()),
            Self::Io(_) => ApiError::bad_request(self.to_string()),
        }
    }
}

/// Reads one line (without its `\n`, and without a final `\r`). `None` at
/// the end of the stream (a partial last line is dropped). Waiting for a
/// line to start is unbounded; once its first byte arrived, the rest must
/// come within `timeout`, and it may not exceed `max` bytes (checked as
/// bytes arrive, so an endless line costs at most `max` bytes of memory).
pub async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
    timeout: Duration,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut line = Vec::new();
    let mut deadline = None;
    loop {
        let avail = match deadline {
            None => r.fill_buf().await?,
            Some(d) => tokio::time::timeout_at(d, r.fill_buf())
                .await
                .map_err(|_| FrameError::Timeout(timeout))??,
        };
        if avail.is_empty() {
            return Ok(None);
        }
        if deadline.is_none() {
            deadline = Some(tokio::time::Instant::now() + timeout);
        }
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (avail.len(), false),
        };
        if line.len() + take > max {
            return Err(FrameError::TooLarge(max));
        }
        line.extend_from_slice(&avail[..take]);
        r.consume(if done { take + 1 } else { take });
        if done {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Some(line));
        }
    }
}

/// One parsed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Echoed in the response.
    pub id: Option<Value>,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Whoami,
    StartTask(StartTaskOp),
    EndTask(EndTaskOp),
    Fetch(FetchOp),
    Renew(RenewOp),
    Watch(WatchOp),
    Attach(AttachOp),
    Health,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartTaskOp {
    pub role: Option<String>,
    pub intent: Option<String>,
    pub purpose: Option<String>,
    pub environment: Option<String>,
    pub ttl_secs: Option<u64>,
    pub idle_timeout_secs: Option<u64>,
    pub scopes: Option<Vec<String>>,
    pub parent: Option<String>,
    /// Keep the task when this connection closes.
    #[serde(default)]
    pub detach: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndTaskOp {
    pub task: String,
    /// `completed` (default) or `failed`.
    #[serde(default = "completed")]
    pub status: keymint_proto::EndStatus,
    #[serde(default)]
    pub reason: Option<String>,
}

fn completed() -> keymint_proto::EndStatus {
    keymint_proto::EndStatus::Completed
}

/// What a delivered file holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// The secret alone: the token, the password or the certificate line.
    #[default]
    Secret,
    /// The whole credential object as JSON.
    Json,
    /// The variables the provider's SDK reads (`OPENAI_API_KEY`,
    /// `ANTHROPIC_AUTH_TOKEN`, `AWS_ACCESS_KEY_ID`, …), one
    /// `export NAME='value'` line each, for `. FILE` in a shell or a
    /// dotenv loader; the same variables `keymint run` sets.
    Env,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchOp {
    pub task: String,
    pub ttl_secs: Option<u64>,
    pub scopes: Option<Vec<String>>,
    pub public_key: Option<String>,
    pub principals: Option<Vec<String>>,
    /// Also write the credential to `DELIVER_DIR/TASK/FILE`.
    pub file: Option<String>,
    #[serde(default)]
    pub format: Format,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewOp {
    pub lease: String,
    pub increment_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchOp {
    pub task: String,
}

/// Makes the caller's connection the owner of a task of its workload: the
/// agent ends the task when this connection closes (how `keymint run`
/// takes its task back after the agent restarted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachOp {
    pub task: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

/// Parses one line. On error, the request's `id` (when it could be read)
/// comes back with the error so that the response can echo it.
pub fn parse(line: &[u8]) -> Result<Request, (Option<Value>, ApiError)> {
    let mut obj: Map<String, Value> = match serde_json::from_slice(line) {
        Ok(Value::Object(o)) => o,
        Ok(_) => return Err((None, ApiError::bad_request("a request is a JSON object"))),
        Err(_) => return Err((None, ApiError::bad_request("a request is a JSON object"))),
    };
    let id = obj.remove("id");
    let op = match obj.remove("op") {
        Some(Value::String(s)) => s,
        Some(_) => {
            return Err((id, ApiError::bad_request("`op` must be a string")));
        }
        None => return Err((id, ApiError::bad_request("a request needs an `op`"))),
    };
    let rest = Value::Object(obj);
    let op = match op.as_str() {
        "whoami" => body::<Empty>(rest).map(|_| Op::Whoami),
        "health" => body::<Empty>(rest).map(|_| Op::Health),
        "start_task" => body(rest).map(Op::StartTask),
        "end_task" => body(rest).map(Op::EndTask),
        "fetch" => body(rest).map(Op::Fetch),
        "renew" => body(rest).map(Op::Renew),
        "watch" => body(rest).map(Op::Watch),
        "attach" => body(rest).map(Op::Attach),
        _ => Err(ApiError::new(
            code::UNKNOWN_OP,
            format!("unknown op; the ops are {}", OPS.join(", ")),
        )),
    };
    match op {
        Ok(op) => Ok(Request { id, op }),
        Err(e) => Err((id, e)),
    }
}

fn body<T: DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    // serde's messages start with the caller's value (`unknown field `X``,
    // `invalid type: string "X"`), which may be a secret pasted in the wrong
    // place: tell the kind of mistake and what was expected, never the value.
    serde_json::from_value(v).map_err(|e| {
        let msg = e.to_string();
        let (what, expected) = keymint_proto::json_error::describe_serde_message(&msg);
        ApiError::bad_request(match expected {
            Some(x) => format!("{what}, {x}"),
            None => what,
        })
    })
}

/// A successful response line: the op's fields plus `ok` and `id`.
pub fn ok_line(id: Option<Value>, body: &impl Serialize) -> Vec<u8> {
    let mut obj = match serde_json::to_value(body) {
        Ok(Value::Object(o)) => o,
        _ => Map::new(),
    };
    obj.insert("ok".into(), Value::Bool(true));
    if let Some(id) = id {
        obj.insert("id".into(), id);
    }
    line(&Value::Object(obj))
}

/// An error response line.
pub fn error_line(id: Option<Value>, e: &ApiError) -> Vec<u8> {
    let mut obj = Map::new();
    if let Some(id) = id {
        obj.insert("id".into(), id);
    }
    obj.insert("ok".into(), Value::Bool(false));
    obj.insert(
        "error".into(),
        serde_json::json!({"code": e.code, "message": e.message}),
    );
    line(&Value::Object(obj))
}

/// Any value as one line.
pub fn line(v: &impl Serialize) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    out
}

/// What a watcher receives.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A fresh credential replaced `replaces` (and its file, if delivered).
    Credential {
        task: String,
        lease: Box<Lease>,
        credential: Credential,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file: Option<String>,
        replaces: String,
    },
    /// A credential expired before a fresh one could be fetched (the
    /// server was unreachable); its file was removed. The agent keeps
    /// trying.
    Expired { task: String, lease: String },
    /// The task ended; its credentials are forgotten and its files gone.
    TaskEnded { task: String, reason: String },
}

/// The response to `whoami`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Whoami {
    pub workload: String,
    pub entry: String,
    pub attributes: std::collections::BTreeMap<String, String>,
}

/// The response to `start_task` and `end_task`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskResponse {
    pub task: Task,
}

/// The response to `fetch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fetched {
    pub lease: Lease,
    pub credential: Credential,
    /// The delivered file's path, when one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// For a role of the egress proxy: where to send the provider's
    /// requests with this credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyRoute>,
}

/// A role's egress proxy upstream, as the workload reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyRoute {
    /// The upstream's name.
    pub upstream: String,
    /// What it speaks: `openai`, `anthropic` or `http`.
    pub kind: keymint_core::role::UpstreamKind,
    /// The proxy's base URL for it (`SERVER/proxy/NAME`).
    pub base_url: String,
}

/// The ack of `watch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Watching {
    pub watching: String,
}

/// The ack of `attach`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attached {
    pub attached: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_never_quote_the_callers_values() {
        let secret = "sk-proj-NOTAREALKEY0123456789abcdefgh";
        for line in [
            format!(r#"{{"op":"start_task","{secret}":1}}"#),
            format!(r#"{{"op":"fetch","role":{{"{secret}":2}}}}"#),
            format!(r#"{{"op":"end_task","status":"{secret}"}}"#),
            format!(r#"{{"op":"{secret}"}}"#),
        ] {
            let Err((_, e)) = parse(line.as_bytes()) else {
                panic!("accepted: {line}");
            };
            assert!(!e.message.contains(secret), "{}", e.message);
            assert!(!e.message.contains("sk-proj"), "{}", e.message);
        }
        // The field's own name (keymint's) is still told.
        let Err((_, e)) = parse(br#"{"op":"end_task"}"#) else {
            panic!("accepted an end_task without its task");
        };
        assert!(e.message.contains("missing field"), "{}", e.message);
    }

    async fn lines(input: &[u8], max: usize) -> Vec<Result<Option<Vec<u8>>, String>> {
        let mut r = tokio::io::BufReader::with_capacity(4, input);
        let mut out = Vec::new();
        loop {
            let l = read_line(&mut r, max, Duration::from_secs(1)).await;
            let stop = !matches!(l, Ok(Some(_)));
            out.push(l.map_err(|e| e.to_string()));
            if stop {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn lines_are_split_and_bounded() {
        let got = lines(b"ab\r\ncd\n\nxyz", 8).await;
        assert_eq!(
            got,
            vec![
                Ok(Some(b"ab".to_vec())),
                Ok(Some(b"cd".to_vec())),
                Ok(Some(Vec::new())),
                Ok(None)
            ]
        );
        // Exactly the limit is fine; one more byte is not, even before the
        // newline arrives.
        assert_eq!(
            lines(b"12345678\n", 8).await[0],
            Ok(Some(b"12345678".to_vec()))
        );
        let got = lines(b"123456789", 8).await;
        assert!(
            got[0].as_ref().is_err_and(|e| e.contains("longer")),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn an_unfinished_line_times_out() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut r = tokio::io::BufReader::new(server);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"{\"op\"")
            .await
            .unwrap();
        let start = std::time::Instant::now();
        let e = read_line(&mut r, 1024, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, FrameError::Timeout(_)), "{e:?}");
        assert!(start.elapsed() < Duration::from_secs(2));
        // Waiting for a line to *start* is not bounded by it.
        let (_client, server) = tokio::io::duplex(64);
        let mut r = tokio::io::BufReader::new(server);
        let waited = tokio::time::timeout(
            Duration::from_millis(400),
            read_line(&mut r, 1024, Duration::from_millis(100)),
        )
        .await;
        assert!(waited.is_err(), "an idle connection is not a slow line");
    }

    #[test]
    fn requests_parse_with_their_id() {
        let r = parse(br#"{"op":"fetch","id":7,"task":"tsk_1","file":"token"}"#).unwrap();
        assert_eq!(r.id, Some(serde_json::json!(7)));
        let Op::Fetch(f) = r.op else { panic!() };
        assert_eq!(f.task, "tsk_1");
        assert_eq!(f.file.as_deref(), Some("token"));
        assert_eq!(f.format, Format::Secret);
        assert_eq!(parse(br#"{"op":"whoami"}"#).unwrap().op, Op::Whoami);
        let Op::EndTask(e) = parse(br#"{"op":"end_task","task":"t"}"#).unwrap().op else {
            panic!()
        };
        assert_eq!(e.status, keymint_proto::EndStatus::Completed);
    }

    #[test]
    fn bad_requests_say_why() {
        let (id, e) = parse(b"not json").unwrap_err();
        assert_eq!((id, e.code.as_str()), (None, code::BAD_REQUEST));
        let (id, e) = parse(br#"{"id":"x","op":"frobnicate"}"#).unwrap_err();
        assert_eq!(id, Some(serde_json::json!("x")));
        assert_eq!(e.code, code::UNKNOWN_OP);
        // The caller's op is not repeated; the ops there are, are.
        assert!(!e.message.contains("frobnicate") && e.message.contains("start_task"));
        let (_, e) = parse(br#"{"op":"fetch","task":"t","bogus":1}"#).unwrap_err();
        assert_eq!(e.code, code::BAD_REQUEST);
        assert!(
            e.message.contains("unknown field") && !e.message.contains("bogus"),
            "{}",
            e.message
        );
        let (_, e) = parse(br#"{"op":"fetch"}"#).unwrap_err();
        assert!(e.message.contains("task"), "{}", e.message);
        let (_, e) = parse(br#"{"op":"whoami","x":1}"#).unwrap_err();
        assert_eq!(e.code, code::BAD_REQUEST);
        let (_, e) = parse(br#"[1]"#).unwrap_err();
        assert_eq!(e.code, code::BAD_REQUEST);
        let (_, e) = parse(br#"{"op":5}"#).unwrap_err();
        assert_eq!(e.code, code::BAD_REQUEST);
    }

    /// The ops are those the design document's table lists.
    #[test]
    fn the_design_document_lists_every_op() {
        let doc = include_str!("../../../docs/design/0012-node-agent.md");
        let table = &doc[doc.find("| op | request | response |").unwrap()..];
        let documented: Vec<&str> = table
            .lines()
            .skip(2)
            .take_while(|l| l.starts_with("| `"))
            .map(|l| l[3..].split('`').next().unwrap())
            .collect();
        assert_eq!(documented, OPS);
    }

    #[test]
    fn responses_echo_the_id() {
        let l = ok_line(
            Some(serde_json::json!(3)),
            &Watching {
                watching: "t".into(),
            },
        );
        let v: Value = serde_json::from_slice(&l).unwrap();
        assert_eq!(v, serde_json::json!({"ok": true, "id": 3, "watching": "t"}));
        assert_eq!(l.last(), Some(&b'\n'));
        let l = error_line(None, &ApiError::bad_request("no"));
        let v: Value = serde_json::from_slice(&l).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ok": false, "error": {"code": "bad_request", "message": "no"}})
        );
    }
}
