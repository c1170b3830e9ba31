//! The egress proxy, driven by the official `openai` and `anthropic` Python
//! SDKs (outside CI a missing SDK skips those tests with a message; under
//! `CI=true` it fails them) and by raw HTTP for what SDKs cannot send. The
//! upstream is the test kit's local stand-in for the providers.

use std::process::Stdio;
use std::time::{Duration, Instant};

use keymint_client::Client;
use keymint_proto::{IssueLease, IssuedLease, List, Task};
use keymint_testkit::TestServer;
use keymint_testkit::upstream::FakeUpstream;
use serde_json::{Value, json};

use crate::{metric, start_task_in};

/// The provider key the fake upstream accepts (fabricated).
const KEY: &str = "upstream-key-for-tests-0123456789";

#[allow(
    clippy::disallowed_methods,
    reason = "tests read CI to decide skip or fail"
)]
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether python3 with both SDKs is here; fails under CI if not.
async fn sdks() -> bool {
    let ok = tokio::process::Command::new("python3")
        .args(["-c", "import openai, anthropic"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            !in_ci(),
            "python3 with the `openai` and `anthropic` packages is required in CI (pip install openai anthropic)"
        );
        eprintln!("skipping: python3 with `openai` and `anthropic` is not installed");
    }
    ok
}

fn config(up: &FakeUpstream) -> String {
    let u = up.url();
    format!(
        r#"
[[upstreams]]
name = "openai"
kind = "openai"
base_url = "{u}/v1"
timeout = "10s"

[[upstreams]]
name = "anthropic"
kind = "anthropic"
base_url = "{u}"

[[upstreams]]
name = "tickets"
kind = "http"
base_url = "{u}/api"
key_header = "X-Api-Key"

[prices."gpt-4o-mini"]
input_per_mtok = 0.15
output_per_mtok = 0.60

[[roles]]
name = "gpt"
engine = "token"
upstream = "openai"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
models = ["gpt-4o-mini"]
endpoints = ["chat.completions", "responses", "embeddings", "models"]

[[roles]]
name = "gpt-redact"
engine = "token"
upstream = "openai"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
models = ["gpt-4o-mini"]
endpoints = ["chat.completions"]
secrets = "redact"

[[roles]]
name = "gpt-budget"
engine = "token"
upstream = "openai"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
models = ["gpt-4o-mini"]
endpoints = ["chat.completions"]
max_spend_usd = 0.0001

[[roles]]
name = "gpt-tiny"
engine = "token"
upstream = "openai"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
models = ["gpt-4o-mini"]
endpoints = ["chat.completions"]
max_requests = 1

[[roles]]
name = "gpt-rate"
engine = "token"
upstream = "openai"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
models = ["gpt-4o-mini"]
endpoints = ["chat.completions"]
requests_per_minute = 1

[[roles]]
name = "gpt-org"
engine = "token"
upstream = "openai"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
models = ["gpt-4o-mini"]
endpoints = ["chat.completions"]
organization = "org-operator"
project = "proj_operator"

[[roles]]
name = "reasoner"
engine = "token"
upstream = "openai"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
models = ["o3-mini", "gpt-5*", "gpt-4o-mini"]
endpoints = ["chat.completions"]
max_output_tokens = 1000

[[roles]]
name = "claude"
engine = "token"
upstream = "anthropic"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
models = ["claude-*"]
endpoints = ["messages"]

[[roles]]
name = "tickets"
engine = "token"
upstream = "tickets"
scopes = ["http:read"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
endpoints = ["GET /tickets*"]

[[roles]]
name = "tickets-redact"
engine = "token"
upstream = "tickets"
scopes = ["http:read"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
endpoints = ["GET /tickets*"]
secrets = "redact"
"#
    )
}

struct Env {
    s: TestServer,
    up: FakeUpstream,
}

async fn setup() -> Env {
    let up = FakeUpstream::start(KEY).await.unwrap();
    let s = TestServer::builder()
        .config_toml(&config(&up))
        .start()
        .await
        .unwrap();
    for name in ["openai", "anthropic", "tickets"] {
        let r = s
            .admin()
            .raw(
                http::Method::POST,
                &format!("/v1/upstreams/{name}/key"),
                Some("application/json"),
                json!({"key": KEY}).to_string().into_bytes(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 204, "{}", r.text());
    }
    Env { s, up }
}

/// Starts a task in `role` and issues its token.
async fn token(s: &TestServer, role: &str) -> (Task, String) {
    let t = start_task_in(&s.admin(), role, "sdk-agent").await;
    let l: IssuedLease = s
        .admin()
        .post(
            &format!("/v1/tasks/{}/leases", t.id),
            &IssueLease::default(),
        )
        .await
        .unwrap();
    (t, l.credential.secret().expose().to_owned())
}

/// Runs a Python script with `env`; returns its last stdout line as JSON.
async fn python(script: &str, env: &[(&str, String)]) -> Value {
    let out = tokio::process::Command::new("python3")
        .args(["-c", script])
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("ANTHROPIC_BASE_URL")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap()
}

fn openai_env(s: &TestServer, token: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OPENAI_API_KEY", token.to_owned()),
        ("OPENAI_BASE_URL", s.proxy_url("openai")),
    ]
}

fn anthropic_env(s: &TestServer, token: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ANTHROPIC_API_KEY", token.to_owned()),
        ("ANTHROPIC_BASE_URL", s.proxy_url("anthropic")),
    ]
}

/// Nothing the upstream received carries a keymint token; every request
/// carried the real key.
fn upstream_saw_only_the_key(up: &FakeUpstream, tokens: &[&str]) {
    for r in up.received() {
        let dump = r.dump();
        for t in tokens {
            assert!(!dump.contains(t), "a keymint token reached the upstream");
        }
        assert!(
            !dump.contains("kmt_"),
            "a keymint token reached the upstream"
        );
    }
}

const OPENAI_SCRIPT: &str = r#"
import json, openai
c = openai.OpenAI(max_retries=0)
msgs = [{"role": "user", "content": "say hello to me"}]
out = {}
r = c.chat.completions.create(model="gpt-4o-mini", messages=msgs)
out["text"] = r.choices[0].message.content
out["usage"] = [r.usage.prompt_tokens, r.usage.completion_tokens]
chunks = [ch.model_dump() for ch in c.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True)]
out["stream_text"] = "".join((ch["choices"][0]["delta"].get("content") or "") for ch in chunks if ch["choices"])
out["stream_empty_choices"] = sum(1 for ch in chunks if not ch["choices"])
out["stream_usage"] = [ch["usage"] for ch in chunks if ch.get("usage")]
last = None
for ch in c.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True, stream_options={"include_usage": True}):
    last = ch
out["asked_usage"] = [last.usage.prompt_tokens, last.usage.completion_tokens]
out["embedding_tokens"] = c.embeddings.create(model="gpt-4o-mini", input="one two three").usage.prompt_tokens
out["models"] = sorted(m.id for m in c.models.list().data)
out["responses_text"] = c.responses.create(model="gpt-4o-mini", input="hi there").output_text
try:
    c.chat.completions.create(model="gpt-4o", messages=msgs)
    out["denied"] = None
except openai.PermissionDeniedError as e:
    out["denied"] = [e.status_code, e.code, e.type, e.message]
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_works_through_the_proxy_streaming_or_not() {
    if !sdks().await {
        return;
    }
    let Env { s, up } = setup().await;
    let (t, tok) = token(&s, "gpt").await;
    let out = python(OPENAI_SCRIPT, &openai_env(&s, &tok)).await;
    assert_eq!(out["text"], "Hello from the fake upstream.");
    assert_eq!(out["usage"], json!([4, 6]));
    assert_eq!(out["stream_text"], "Hello from the fake upstream.");
    // The proxy asked for the usage chunk upstream and kept it from a
    // client that did not ask for it.
    assert_eq!(out["stream_empty_choices"], 0);
    assert_eq!(out["stream_usage"], json!([]));
    assert_eq!(out["asked_usage"], json!([4, 6]));
    assert_eq!(out["embedding_tokens"], 3);
    assert_eq!(out["models"], json!(["gpt-4o", "gpt-4o-mini"]));
    assert_eq!(out["responses_text"], "Hello from the fake upstream.");
    let denied = &out["denied"];
    assert_eq!(denied[0], 403);
    assert_eq!(denied[1], "not_allowed");
    assert!(denied[3].as_str().unwrap().contains("`gpt-4o`"), "{denied}");

    let streams: Vec<Value> = up
        .received()
        .iter()
        .map(|r| r.json())
        .filter(|j| j["stream"] == true)
        .collect();
    assert_eq!(streams.len(), 2);
    assert!(
        streams
            .iter()
            .all(|j| j["stream_options"]["include_usage"] == true)
    );
    upstream_saw_only_the_key(&up, &[&tok]);
    assert!(up.received().iter().all(|r| r.uri.starts_with("/v1/")));

    // Every metered call was settled against the usage the upstream reported:
    // 3 chat calls of 4 + 6 tokens, 3 embedding tokens, 2 + 6 for responses.
    let used = s.proxy().task_usage(&t.id).await;
    assert_eq!(used.requests, 6, "{used:?}");
    assert_eq!(used.input, 3 * 4 + 3 + 2);
    assert_eq!(used.output, 3 * 6 + 6);
    assert_eq!(used.spend_nusd, used.input * 150 + used.output * 600);

    // Use is audited per lease; the denial on its own.
    s.proxy().flush().await;
    let ev: List<Value> = s.admin().get("/v1/audit?limit=1000").await.unwrap();
    let usage: Vec<&Value> = ev
        .items
        .iter()
        .filter(|e| e["kind"] == "proxy.usage")
        .collect();
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0]["data"]["requests"], 6);
    let denied: Vec<&Value> = ev
        .items
        .iter()
        .filter(|e| e["kind"] == "proxy.denied")
        .collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["data"]["check"], "model");
    let m = s
        .anonymous()
        .raw(http::Method::GET, "/metrics", None, vec![])
        .await
        .unwrap()
        .text();
    assert!(
        m.contains("keymint_proxy_requests_total{upstream=\"openai\"} 6"),
        "{m}"
    );
    assert!(m.contains("keymint_proxy_denials_total{reason=\"model\"} 1"));
    for text in [ev.items.iter().map(Value::to_string).collect::<String>(), m] {
        assert!(!text.contains(KEY) && !text.contains(&tok));
    }
}

const ANTHROPIC_SCRIPT: &str = r#"
import json, anthropic
c = anthropic.Anthropic(max_retries=0)
msgs = [{"role": "user", "content": "say hello to me please"}]
out = {}
r = c.messages.create(model="claude-3-5-haiku-latest", max_tokens=100, messages=msgs)
out["text"] = r.content[0].text
out["usage"] = [r.usage.input_tokens, r.usage.output_tokens]
types = []
text = ""
for ev in c.messages.create(model="claude-3-5-haiku-latest", max_tokens=4, messages=msgs, stream=True):
    types.append(ev.type)
    if ev.type == "content_block_delta":
        text += ev.delta.text
    if ev.type == "message_delta":
        out["stream_output_tokens"] = ev.usage.output_tokens
out["stream_types"] = types
out["stream_text"] = text
try:
    c.messages.create(model="gpt-4o-mini", max_tokens=10, messages=msgs)
    out["denied"] = None
except anthropic.PermissionDeniedError as e:
    out["denied"] = [e.status_code, e.body]
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_sdk_works_through_the_proxy_streaming_or_not() {
    if !sdks().await {
        return;
    }
    let Env { s, up } = setup().await;
    let (t, tok) = token(&s, "claude").await;
    let out = python(ANTHROPIC_SCRIPT, &anthropic_env(&s, &tok)).await;
    assert_eq!(out["text"], "Hello from the fake upstream.");
    assert_eq!(out["usage"], json!([5, 6]));
    assert_eq!(out["stream_text"], "Hello from the fake");
    assert_eq!(out["stream_output_tokens"], 4);
    assert_eq!(
        out["stream_types"],
        json!([
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ])
    );
    assert_eq!(out["denied"][0], 403);
    assert_eq!(out["denied"][1]["type"], "error");
    assert_eq!(out["denied"][1]["error"]["type"], "permission_error");
    upstream_saw_only_the_key(&up, &[&tok]);
    // The key went as x-api-key; the SDK's version header went along.
    let r = &up.received()[0];
    assert_eq!(r.headers["x-api-key"], KEY);
    assert!(r.headers.contains_key("anthropic-version"));
    assert!(!r.headers.contains_key("authorization"));
    let used = s.proxy().task_usage(&t.id).await;
    assert_eq!((used.requests, used.input, used.output), (2, 10, 6 + 4));
}

/// A stream read to the end of its text and closed there, before the
/// `message_delta` that reports its output.
const CUT_AFTER_TEXT: &str = r#"
import json, anthropic
c = anthropic.Anthropic(max_retries=0)
text, types = "", []
stream = c.messages.create(model="claude-3-5-haiku-latest", max_tokens=6,
    messages=[{"role": "user", "content": "say hello to me please"}], stream=True)
for ev in stream:
    types.append(ev.type)
    if ev.type == "content_block_delta":
        text += ev.delta.text
    if ev.type == "content_block_stop":
        break
stream.close()
print(json.dumps({"text": text, "types": types}))
"#;

/// Anthropic's stream says `output_tokens: 1` in its `message_start`,
/// before any text, and the real count only in the `message_delta` after
/// the text: a client that has its text and closes the stream before that
/// must not pay for one token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_after_its_text_keeps_its_whole_reservation() {
    if !sdks().await {
        return;
    }
    let Env { s, up } = setup().await;
    up.set_delay(Duration::from_millis(300));
    let (t, tok) = token(&s, "claude").await;
    let out = python(CUT_AFTER_TEXT, &anthropic_env(&s, &tok)).await;
    assert_eq!(out["text"], "Hello from the fake upstream.");
    assert_eq!(out["types"][0], "message_start");
    assert!(!out["types"].to_string().contains("message_delta"), "{out}");
    let t0 = Instant::now();
    let used = loop {
        let used = s.proxy().task_usage(&t.id).await;
        if used.requests == 1 || t0.elapsed() > Duration::from_secs(10) {
            break used;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The whole reservation: the body's length in input tokens, and the
    // 6 output tokens the request could (and did) generate.
    let body_len = up.received()[0].body.len() as u64;
    assert_eq!((used.requests, used.input, used.output), (1, body_len, 6));
}

const ONE_CALL: &str = r#"
import json, openai, sys
c = openai.OpenAI(max_retries=0)
out = []
for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 2):
    try:
        r = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        out.append(["ok", r.choices[0].message.content])
    except openai.APIStatusError as e:
        out.append([type(e).__name__, e.status_code, e.code, e.message, e.response.headers.get("retry-after"), e.response.headers.get("x-should-retry")])
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_budget_or_rate_limit_is_a_429_the_sdk_understands() {
    if !sdks().await {
        return;
    }
    let Env { s, up: _up } = setup().await;
    let (_, tok) = token(&s, "gpt-tiny").await;
    let out = python(ONE_CALL, &openai_env(&s, &tok)).await;
    assert_eq!(out[0][0], "ok", "{out}");
    assert_eq!(out[1][0], "RateLimitError");
    assert_eq!(out[1][2], "budget_exhausted");
    assert!(out[1][3].as_str().unwrap().contains("requests"));
    assert_eq!(out[1][5], "false");
    // Another task in the same role has a budget of its own.
    let (_, tok2) = token(&s, "gpt-tiny").await;
    let out = python(ONE_CALL, &openai_env(&s, &tok2)).await;
    assert_eq!(out[0][0], "ok");

    let (_, tok) = token(&s, "gpt-rate").await;
    let out = python(ONE_CALL, &openai_env(&s, &tok)).await;
    assert_eq!(out[0][0], "ok");
    assert_eq!(out[1][0], "RateLimitError");
    assert_eq!(out[1][2], "rate_limit_exceeded");
    assert_eq!(out[1][4], "60");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_on_the_next_request() {
    if !sdks().await {
        return;
    }
    let Env { s, up: _up } = setup().await;
    let (t, tok) = token(&s, "gpt").await;
    let env = openai_env(&s, &tok);
    assert_eq!(python(ONE_CALL, &env).await[0][0], "ok");
    // The token is cached now; revoking must still take effect at once.
    let _: Task = s
        .admin()
        .post_empty(&format!("/v1/tasks/{}/revoke", t.id))
        .await
        .unwrap();
    let out = python(ONE_CALL, &env).await;
    assert_eq!(out[0][0], "AuthenticationError");
    assert_eq!(out[0][1], 401);
    assert!(out[0][3].as_str().unwrap().contains("revoked or expired"));
    assert!(!out.to_string().contains(&tok));
    // Anthropic's SDK sees its own shape.
    let (t2, tok2) = token(&s, "claude").await;
    let _: Task = s
        .admin()
        .post_empty(&format!("/v1/tasks/{}/revoke", t2.id))
        .await
        .unwrap();
    let out = python(
        r#"
import json, anthropic
try:
    anthropic.Anthropic(max_retries=0).messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    print(json.dumps(None))
except anthropic.AuthenticationError as e:
    print(json.dumps(e.body))
"#,
        &anthropic_env(&s, &tok2),
    )
    .await;
    assert_eq!(out["error"]["type"], "authentication_error");
}

const SECRET_SCRIPT: &str = r#"
import json, openai, os
c = openai.OpenAI(max_retries=0)
leak = os.environ["LEAK"]
try:
    r = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "debug this: OPENAI_API_KEY=" + leak}])
    print(json.dumps(["ok", r.choices[0].message.content]))
except openai.BadRequestError as e:
    print(json.dumps([e.status_code, e.code, e.message]))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_carrying_a_secret_is_blocked_or_redacted() {
    if !sdks().await {
        return;
    }
    let Env { s, up } = setup().await;
    // Fabricated, shaped like an OpenAI project key.
    let leak = format!("sk-proj-{}", "Zx9Qw8Er7Ty6".repeat(4));
    let (_, tok) = token(&s, "gpt").await;
    let mut env = openai_env(&s, &tok);
    env.push(("LEAK", leak.clone()));
    let out = python(SECRET_SCRIPT, &env).await;
    assert_eq!(out[0], 400);
    assert!(out[2].as_str().unwrap().contains("openai_key"), "{out}");
    assert!(!out.to_string().contains(&leak));
    assert!(
        up.received().is_empty(),
        "a blocked request reached the upstream"
    );
    // The agent's own keymint token in a prompt is a secret too.
    env.pop();
    env.push(("LEAK", tok.clone()));
    let out = python(SECRET_SCRIPT, &env).await;
    assert!(out[2].as_str().unwrap().contains("keymint_token"), "{out}");
    assert!(up.received().is_empty());

    let (_, tok) = token(&s, "gpt-redact").await;
    let mut env = openai_env(&s, &tok);
    env.push(("LEAK", leak.clone()));
    let out = python(SECRET_SCRIPT, &env).await;
    assert_eq!(out[0], "ok");
    let got = up.received();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].json()["messages"][0]["content"],
        "debug this: OPENAI_API_KEY=[REDACTED:openai_key]"
    );
    let ev: List<Value> = s.admin().get("/v1/audit?limit=1000").await.unwrap();
    let all = ev.items.iter().map(Value::to_string).collect::<String>();
    assert!(!all.contains(&leak) && !all.contains(&tok));
    assert_eq!(
        ev.items
            .iter()
            .filter(|e| e["kind"] == "proxy.denied" && e["data"]["check"] == "secret")
            .count(),
        2
    );
}

/// A key hidden by JSON escapes: right after a `\n`, spelt with `\u`
/// escapes, inside a tool call's arguments. Each is blocked, or redacted so
/// that the upstream never receives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_behind_json_escapes_are_blocked_or_redacted() {
    let Env { s, up } = setup().await;
    // Fabricated at run time, shaped like an OpenAI project key.
    let leak = format!("sk-proj-{}", "Zx9Qw8Er7Ty6".repeat(4));
    let spelt: String = leak
        .chars()
        .map(|c| format!("\\u{:04x}", c as u32))
        .collect();
    let tool_args = json!({"path": "/etc/env", "content": format!("KEY={leak}")}).to_string();
    let bodies = [
        (
            "after a newline escape",
            format!(
                r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"env:\n{leak}"}}]}}"#
            ),
            "env:\n[REDACTED:openai_key]",
        ),
        (
            "spelt with unicode escapes",
            format!(
                r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{spelt}"}}]}}"#
            ),
            "[REDACTED:openai_key]",
        ),
        (
            "in a tool call's arguments",
            json!({
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "user", "content": "save it"},
                    {"role": "assistant", "tool_calls": [{
                        "id": "call_1", "type": "function",
                        "function": {"name": "write_file", "arguments": tool_args}
                    }]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "done"}
                ]
            })
            .to_string(),
            "",
        ),
    ];
    let chat = "/proxy/openai/chat/completions";
    let (_, tok) = token(&s, "gpt").await;
    for (what, body, _) in &bodies {
        let r = s
            .client(&tok)
            .raw(
                http::Method::POST,
                chat,
                Some("application/json"),
                body.clone().into_bytes(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert!(r.text().contains("openai_key"), "{what}: {}", r.text());
        assert!(!r.text().contains(&leak), "{what}");
        assert!(
            up.received().is_empty(),
            "{what}: a blocked request reached the upstream"
        );
    }

    let (_, tok) = token(&s, "gpt-redact").await;
    for (i, (what, body, content)) in bodies.iter().enumerate() {
        let r = s
            .client(&tok)
            .raw(
                http::Method::POST,
                chat,
                Some("application/json"),
                body.clone().into_bytes(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        let got = up.received();
        assert_eq!(got.len(), i + 1, "{what}");
        let sent = &got[i];
        assert!(
            !sent.dump().contains(&leak),
            "{what}: the upstream received the key"
        );
        assert!(
            !sent.dump().contains(&spelt),
            "{what}: the upstream received the key"
        );
        let v = sent.json();
        if content.is_empty() {
            let args = v["messages"][1]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap();
            let args: Value = serde_json::from_str(args).unwrap();
            assert_eq!(args["content"], "KEY=[REDACTED:openai_key]", "{what}");
            assert_eq!(args["path"], "/etc/env");
        } else {
            assert_eq!(v["messages"][0]["content"], *content, "{what}");
        }
        assert_eq!(v["model"], "gpt-4o-mini");
    }
    let ev: List<Value> = s.admin().get("/v1/audit?limit=1000").await.unwrap();
    let all = ev.items.iter().map(Value::to_string).collect::<String>();
    assert!(!all.contains(&leak));
    assert_eq!(
        ev.items
            .iter()
            .filter(|e| e["kind"] == "proxy.denied" && e["data"]["check"] == "secret")
            .count(),
        3
    );
}

fn chat_body(max_tokens: Option<u64>) -> Vec<u8> {
    let mut b =
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]});
    if let Some(m) = max_tokens {
        b["max_tokens"] = json!(m);
    }
    b.to_string().into_bytes()
}

/// A body with a member named twice means one thing to the proxy's checks
/// (serde_json keeps the last) and maybe another to the upstream (a parser
/// that keeps the first): a model the role does not allow behind one it
/// does, an output limit above the one reserved, a secret spelt with
/// escapes in the copy the decoded screen would not see. Refused, whatever
/// the order, and nothing reaches the upstream. (A repeated member that no
/// check reads, in a body with nothing to decode, passes as it came: the
/// fields read are taken only when each is there once, design 0045.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_with_a_member_named_twice_is_refused() {
    let Env { s, up } = setup().await;
    let (_, gpt) = token(&s, "gpt").await;
    let (_, tickets) = token(&s, "tickets").await;
    let secret = format!("sk-proj-{}", "A1b2C3d4E5f6G7h8".repeat(4));
    let escaped: String = secret
        .chars()
        .map(|c| format!("\\u{:04x}", c as u32))
        .collect();
    for (tok, method, path, body) in [
        (
            &gpt,
            http::Method::POST,
            "/proxy/openai/chat/completions",
            r#"{"model":"gpt-4o","model":"gpt-4o-mini","messages":[]}"#.to_owned(),
        ),
        (
            &gpt,
            http::Method::POST,
            "/proxy/openai/chat/completions",
            r#"{"model":"gpt-4o-mini","messages":[],"max_tokens":1000000,"max_tokens":5}"#
                .to_owned(),
        ),
        (
            &gpt,
            http::Method::POST,
            "/proxy/openai/chat/completions",
            r#"{"model":"gpt-4o-mini","messages":[],"stream":false,"stream":true}"#.to_owned(),
        ),
        (
            &gpt,
            http::Method::POST,
            "/proxy/openai/chat/completions",
            format!(r#"{{"model":"gpt-4o-mini","messages":[],"user":"{escaped}","user":"u1"}}"#),
        ),
        (
            &tickets,
            http::Method::GET,
            "/proxy/tickets/tickets",
            format!(r#"{{"note":"{escaped}","note":"fine"}}"#),
        ),
    ] {
        let r = s
            .client(tok)
            .raw(
                method,
                path,
                Some("application/json"),
                body.clone().into_bytes(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert!(r.text().contains("twice"), "{}", r.text());
        assert!(!r.text().contains(&secret));
    }
    assert!(up.received().is_empty(), "nothing was forwarded");
    // The same bodies without the repeated member go through (the control).
    let r = s
        .client(&gpt)
        .raw(
            http::Method::POST,
            "/proxy/openai/chat/completions",
            Some("application/json"),
            br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#
                .to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

/// An output limit of 0 (`max_tokens`, `max_completion_tokens`,
/// `max_output_tokens`) reserves nothing against the task's budget, so it
/// would pass even where the output budget is spent; no provider generates
/// nothing (OpenAI and Anthropic answer 400 for it). The proxy refuses it
/// with its own 400, naming the field, and forwards nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_limit_of_zero_is_refused_before_the_upstream() {
    let Env { s, up } = setup().await;
    let (_, gpt) = token(&s, "gpt").await;
    let (_, claude) = token(&s, "claude").await;
    let hi = json!([{"role": "user", "content": "hi"}]);
    for (tok, path, body, field) in [
        (
            &gpt,
            "/proxy/openai/chat/completions",
            json!({"model": "gpt-4o-mini", "messages": hi, "max_tokens": 0}),
            "max_tokens",
        ),
        (
            &gpt,
            "/proxy/openai/chat/completions",
            json!({"model": "gpt-4o-mini", "messages": hi, "max_completion_tokens": 0}),
            "max_completion_tokens",
        ),
        (
            &gpt,
            "/proxy/openai/responses",
            json!({"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 0}),
            "max_output_tokens",
        ),
        (
            &claude,
            "/proxy/anthropic/v1/messages",
            json!({"model": "claude-3-5-haiku-latest", "messages": hi, "max_tokens": 0}),
            "max_tokens",
        ),
    ] {
        let r = s
            .client(tok)
            .raw(
                http::Method::POST,
                path,
                Some("application/json"),
                body.to_string().into_bytes(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert!(
            r.text().contains(&format!("`{field}` must be at least 1")),
            "{body}: {}",
            r.text()
        );
    }
    assert!(up.received().is_empty(), "nothing was forwarded");
}

/// A request larger than its budget allows in all (it could not fit a
/// fresh task either) is told so (400: a smaller one may fit), not that the
/// budget is used up (429 `insufficient_quota`, which SDKs take as final);
/// a smaller one then goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_the_budget_allows_is_told_so() {
    let Env { s, up } = setup().await;
    let (_, tok) = token(&s, "gpt-budget").await;
    // 0.0001 USD at 0.15 USD per million input tokens: 666 tokens, and the
    // proxy holds a body's bytes as its most input tokens.
    let big = json!({"model": "gpt-4o-mini", "max_tokens": 5,
        "messages": [{"role": "user", "content": "word ".repeat(200)}]})
    .to_string();
    let send = |body: Vec<u8>| {
        let c = s.client(&tok);
        async move {
            c.raw(
                http::Method::POST,
                "/proxy/openai/chat/completions",
                Some("application/json"),
                body,
            )
            .await
            .unwrap()
        }
    };
    let r = send(big.into_bytes()).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let v: Value = r.json().unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("needs more spend than the task's budget allows in all"),
        "{v}"
    );
    assert!(up.received().is_empty());
    let r = send(chat_body(Some(5))).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_overspend_the_budget() {
    let Env { s, up } = setup().await;
    up.set_delay(Duration::from_millis(100));
    let (t, tok) = token(&s, "gpt-budget").await;
    let c = s.client(&tok);
    let mut handles = Vec::new();
    for _ in 0..24 {
        let c = c.clone();
        handles.push(tokio::spawn(async move {
            c.raw(
                http::Method::POST,
                "/proxy/openai/chat/completions",
                Some("application/json"),
                chat_body(Some(6)),
            )
            .await
            .unwrap()
        }));
    }
    let mut ok = 0;
    for h in handles {
        let r = h.await.unwrap();
        match r.status.as_u16() {
            200 => ok += 1,
            429 => {
                let v: Value = r.json().unwrap();
                assert_eq!(v["error"]["code"], "budget_exhausted", "{v}");
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    // Each request reserves its body's length in input tokens (an upper
    // bound) and 6 output tokens: 17,100 nano-dollars of the 100,000, so
    // five fit while they are all in flight together, and no sixth.
    let used = s.proxy().task_usage(&t.id).await;
    let budget = 100_000; // $0.0001 in nano-dollars
    assert_eq!(ok, 5, "{used:?}");
    assert!(up.max_in_flight() >= 2, "the requests did not overlap");
    assert!(used.spend_nusd <= budget, "{used:?}");
    assert_eq!(used.requests, ok);
    assert_eq!(up.received().len() as u64, ok);
    // Settled against actual use: 2 input and 6 output tokens each.
    assert_eq!(used.spend_nusd, 5 * (2 * 150 + 6 * 600));
}

/// The listener serves the proxy's path ahead of the API's router (design
/// 0029, "Fifth pass"): the proxy's own paths get the proxy's answers, in
/// the provider's shape, and the paths next to them are still the router's
/// (its "no such endpoint" problem), whatever token they carry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_paths_are_the_proxys_and_the_paths_next_to_them_the_apis() {
    let Env { s, up } = setup().await;
    let (_, tok) = token(&s, "gpt").await;
    let agent = Client::new(&s.url(), Some(tok)).unwrap();
    let get = |path: &'static str| {
        let agent = agent.clone();
        async move {
            let r = agent
                .raw(http::Method::GET, path, None, Vec::new())
                .await
                .unwrap();
            let body = String::from_utf8_lossy(&r.body).into_owned();
            (r.status.as_u16(), body)
        }
    };
    for path in ["/proxy", "/proxy/", "/proxy//", "/proxy/openai/"] {
        let (status, body) = get(path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(body.contains("no such endpoint"), "{path}: {body}");
    }
    // The proxy's own refusals, in OpenAI's shape.
    for path in ["/proxy/nope/models", "/proxy/nope", "/proxy//models"] {
        let (status, body) = get(path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(body.contains("no such upstream"), "{path}: {body}");
    }
    let (status, body) = get("/proxy/openai/%2e%2e/v1/models").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    // And what it passes on.
    let (status, body) = get("/proxy/openai/models").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(up.received().len(), 1);
}

/// Sends `req` (a whole HTTP/1.1 request with `connection: close`) and
/// reads the answer as it arrives: the whole text, when `marker` first
/// appeared in it, and when the answer ended (each read within 10 s).
async fn timed_exchange(s: &TestServer, req: &str, marker: &str) -> (String, Duration, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    sock.write_all(req.as_bytes()).await.unwrap();
    let t0 = Instant::now();
    let mut seen = String::new();
    let mut first_at = None;
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        if first_at.is_none() && seen.contains(marker) {
            first_at = Some(t0.elapsed());
        }
    }
    let total = t0.elapsed();
    let first = first_at.unwrap_or_else(|| panic!("`{marker}` never came: {seen}"));
    (seen, first, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pass_through_chunk_by_chunk() {
    let Env { s, up } = setup().await;
    up.set_delay(Duration::from_millis(150));
    let (_, tok) = token(&s, "gpt").await;
    // A raw HTTP/1.1 client that timestamps what arrives.
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let req = format!(
        "POST /proxy/openai/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {tok}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let (seen, first, total) = timed_exchange(&s, &req, "\"Hello\"").await;
    // 9 events 150 ms apart: the first word arrives long before the end.
    assert!(total >= Duration::from_millis(900), "{total:?}");
    assert!(first < total / 2, "first word at {first:?} of {total:?}");
    assert!(seen.contains("data: [DONE]"));
    assert!(
        !seen.contains("\"choices\":[]"),
        "the usage chunk was not stripped"
    );
}

/// A stream in flight when its task is revoked is cut within about a
/// second, as the next request is refused (DESIGN.md invariant 1: nothing
/// reaches an agent after its task ended), and is settled like any stream
/// cut before its end. Before, it ran to its end: here seven more events
/// over five seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_in_flight_ends_with_its_task() {
    let Env { s, up } = setup().await;
    up.set_delay(Duration::from_millis(700));
    let (t, tok) = token(&s, "gpt").await;
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let req = format!(
        "POST /proxy/openai/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {tok}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let t0 = Instant::now();
    let revoke = async {
        // After the first event (700 ms), before the second.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let _: Task = s
            .admin()
            .post_empty(&format!("/v1/tasks/{}/revoke", t.id))
            .await
            .unwrap();
        t0.elapsed()
    };
    let ((seen, _, total), revoked_at) =
        tokio::join!(timed_exchange(&s, &req, "\"Hello\""), revoke);
    // Uncut, the stream takes 9 × 700 ms; cut, it ends within a check
    // period (1 s) and a little of the revocation.
    assert!(
        total < revoked_at + Duration::from_millis(2_000),
        "the stream went on {:?} after the revocation: {seen}",
        total - revoked_at
    );
    assert!(!seen.contains("[DONE]"), "{seen}");
    assert!(
        !seen.contains(" upstream"),
        "events after the revocation: {seen}"
    );
    // Not a clean end: the chunked body has no last chunk, so a client
    // sees a cut stream, not a short answer.
    assert!(!seen.ends_with("0\r\n\r\n"), "{seen}");
    // Settled: one request, its input billed.
    let t1 = Instant::now();
    let used = loop {
        let used = s.proxy().task_usage(&t.id).await;
        if used.requests == 1 || t1.elapsed() > Duration::from_secs(10) {
            break used;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(used.requests, 1);
    assert!(used.input > 0, "{used:?}");
    // And the token is refused for the next request.
    let r = Client::new(&s.url(), Some(tok))
        .unwrap()
        .raw(http::Method::GET, "/proxy/openai/models", None, Vec::new())
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), 401);
}

/// An `http` upstream's event stream (a ticket feed, say) is passed on as
/// it comes, not read whole first (which held it back until it ended, and
/// failed a stream that outlived the upstream's timeout), and the key is
/// redacted from it like from any other answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_upstreams_event_stream_passes_as_it_comes() {
    let Env { s, up } = setup().await;
    let (_, tok) = token(&s, "tickets").await;
    let req = format!(
        "GET /proxy/tickets/tickets/events HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {tok}\r\nconnection: close\r\n\r\n"
    );
    let (seen, first, total) = timed_exchange(&s, &req, "{\"n\": 1}").await;
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(seen.contains("text/event-stream"), "{seen}");
    // Three events 150 ms apart: the first arrives long before the end.
    assert!(total >= Duration::from_millis(300), "{total:?}");
    assert!(first < total / 2, "first event at {first:?} of {total:?}");
    assert!(seen.contains("{\"n\": 3}"), "{seen}");
    assert!(!seen.contains(KEY), "the key came back: {seen}");
    assert!(seen.contains("key=[key redacted by keymint]"), "{seen}");
    let series = "keymint_proxy_key_reflections_total{upstream=\"tickets\"}";
    assert_eq!(metric(&s, series).await, format!("{series} 1"));
    let series = "keymint_proxy_requests_total{upstream=\"tickets\"}";
    assert_eq!(metric(&s, series).await, format!("{series} 1"));
    // The upstream did get the key: it is the stream that lost it.
    assert_eq!(up.received()[0].headers["x-api-key"], KEY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_foreign_expired_and_oversized_requests_are_refused() {
    let up = FakeUpstream::start(KEY).await.unwrap();
    let clock =
        keymint_core::ManualClock::new(keymint_core::Timestamp::from_millis(1_800_000_000_000));
    let s = TestServer::builder()
        .clock(clock.clone())
        .config_toml(&format!(
            "{}\n[proxy]\nmax_body_bytes = 2048\n",
            config(&up)
        ))
        .start()
        .await
        .unwrap();
    let set = |name: &'static str, key: String| {
        let admin = s.admin();
        async move {
            admin
                .raw(
                    http::Method::POST,
                    &format!("/v1/upstreams/{name}/key"),
                    Some("application/json"),
                    json!({ "key": key }).to_string().into_bytes(),
                )
                .await
                .unwrap()
        }
    };
    // Header injection through the key is refused; nothing echoes it.
    let r = set("openai", format!("{KEY}\r\nx-evil: 1")).await;
    assert_eq!(r.status, 400);
    assert!(!r.text().contains(KEY));
    assert_eq!(set("nope", KEY.into()).await.status, 404);
    for name in ["openai", "tickets"] {
        assert_eq!(set(name, KEY.into()).await.status, 204);
    }
    // Only admins set keys; no endpoint returns one.
    let (_, tok) = token(&s, "gpt").await;
    let r = s
        .client(&tok)
        .raw(
            http::Method::POST,
            "/v1/upstreams/openai/key",
            Some("application/json"),
            json!({"key": "x"}).to_string().into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    let list: List<Value> = s.admin().get("/v1/upstreams").await.unwrap();
    assert_eq!(list.items.len(), 3);
    assert!(!list.items.iter().any(|u| u.to_string().contains(KEY)));
    assert_eq!(list.items[1]["name"], "openai");
    assert_eq!(list.items[1]["key_set"], true);
    assert_eq!(list.items[0]["key_set"], false);

    let post = |c: Client, path: &'static str, body: Vec<u8>| async move {
        c.raw(http::Method::POST, path, Some("application/json"), body)
            .await
            .unwrap()
    };
    let chat = "/proxy/openai/chat/completions";
    assert_eq!(
        post(s.client(&tok), chat, chat_body(None)).await.status,
        200
    );

    let mut bodies = Vec::new();
    // Forged: well-formed, checksum right, never issued.
    let forged = "kmt_000000000000000000000000000000000000000000023nMur";
    for (t, status) in [
        (forged.to_owned(), 401),
        ("kmt_garbage".to_owned(), 401),
        (s.admin_token.clone(), 401),
    ] {
        let r = post(s.client(&t), chat, chat_body(None)).await;
        assert_eq!(r.status, status);
        assert_eq!(r.headers["www-authenticate"], "Bearer");
        bodies.push(r.text());
    }
    let r = post(s.anonymous(), chat, chat_body(None)).await;
    assert_eq!(r.status, 401);

    // A token of another role (another upstream) and of another endpoint.
    let (_, claude) = token(&s, "claude").await;
    let r = post(s.client(&claude), chat, chat_body(None)).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        post(s.client(&tok), "/proxy/openai/files", vec![])
            .await
            .status,
        403
    );
    let (_, tickets) = token(&s, "tickets").await;
    let tc = s.client(&tickets);
    let r = tc
        .raw(
            http::Method::GET,
            "/proxy/tickets/tickets/42?q=1",
            None,
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let last = up.received().pop().unwrap();
    assert_eq!(last.uri, "/api/tickets/42?q=1");
    assert_eq!(last.headers["x-api-key"], KEY);
    let r = tc
        .raw(
            http::Method::DELETE,
            "/proxy/tickets/tickets/42",
            None,
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.headers["content-type"], "application/problem+json");

    // Paths that try to leave the upstream's base.
    for p in [
        "/proxy/tickets/tickets/../../admin",
        "/proxy/tickets/tickets/%2e%2e/admin",
        "/proxy/tickets/tickets%2f..%2fadmin",
        "/proxy/tickets//admin",
        // Tomcat, Jetty and Spring read `..;` as `..`.
        "/proxy/tickets/tickets/..;/..;/admin",
    ] {
        let r = tc.raw(http::Method::GET, p, None, vec![]).await.unwrap();
        assert_eq!(r.status, 400, "{p}");
    }
    assert!(!up.received().iter().any(|r| r.uri.contains("admin")));

    // Oversized bodies never reach the upstream.
    let n = up.received().len();
    let big = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x ".repeat(4000)}]});
    let r = post(s.client(&tok), chat, big.to_string().into_bytes()).await;
    assert_eq!(r.status, 413);
    assert_eq!(up.received().len(), n);

    // Expired: the lease's TTL (15 minutes) passes; the cached token dies.
    clock.advance_secs(16 * 60);
    let r = post(s.client(&tok), chat, chat_body(None)).await;
    assert_eq!(r.status, 401);
    bodies.push(r.text());
    for b in &bodies {
        assert!(
            !b.contains(&tok)
                && !b.contains(KEY)
                && !b.contains(forged)
                && !b.contains(&s.admin_token),
            "{b}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keymint_run_gives_the_sdk_a_key_that_dies_with_the_command() {
    if !sdks().await {
        return;
    }
    let Env { s, up: _up } = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("key");
    let script = format!(
        r#"
import openai, os
c = openai.OpenAI(max_retries=0)
r = c.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "hi"}}])
assert r.choices[0].message.content == "Hello from the fake upstream."
open({:?}, "w").write(os.environ["OPENAI_API_KEY"] + "\n" + os.environ["OPENAI_BASE_URL"])
"#,
        seen.display().to_string()
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keymint"))
        .args([
            "run",
            "--role",
            "gpt",
            "--workload",
            "w",
            "--",
            "python3",
            "-c",
            &script,
        ])
        .env("KEYMINT_ADDR", s.url())
        .env("KEYMINT_TOKEN", &s.admin_token)
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&seen).unwrap();
    let (key, base) = text.split_once('\n').unwrap();
    assert!(key.starts_with("kmt_"));
    assert_eq!(base, s.proxy_url("openai"));
    // The command has exited: the same key is refused.
    let r = s
        .client(key)
        .raw(
            http::Method::POST,
            "/proxy/openai/chat/completions",
            Some("application/json"),
            chat_body(None),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert!(r.text().contains("revoked or expired"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sets_upstream_keys_from_a_file_or_stdin_only() {
    use std::io::Write;
    let up = FakeUpstream::start(KEY).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = dir.path().join("keymint.toml");
    let policy = dir.path().join("all.cedar");
    std::fs::write(&policy, keymint_testkit::PERMIT_ALL).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "version = 1\n[server]\nlisten = \"127.0.0.1:{port}\"\ndangerous_plaintext = true\n\
             [storage]\ndata_dir = {:?}\n[policy]\npaths = [{:?}]\n{}",
            dir.path().join("data").display().to_string(),
            policy.display().to_string(),
            config(&up)
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_keymint");
    let _server = tokio::process::Command::new(bin)
        .args(["server", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr = format!("http://127.0.0.1:{port}");
    let probe = Client::new(&addr, None).unwrap();
    let t0 = Instant::now();
    while probe
        .get::<keymint_proto::Health>("/v1/health")
        .await
        .is_err()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the server did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let admin = std::fs::read_to_string(dir.path().join("data/admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    let cli = |args: &[&str], stdin: Option<&str>| {
        let mut c = std::process::Command::new(bin);
        c.args(args)
            .env("KEYMINT_ADDR", &addr)
            .env("KEYMINT_TOKEN", &admin)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let key_file = dir.path().join("openai.key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let (code, out, err) = cli(
        &[
            "upstream",
            "set",
            "openai",
            "--key-file",
            key_file.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains(KEY) && !err.contains(KEY));
    let (code, _, err) = cli(&["upstream", "set", "anthropic"], Some(KEY));
    assert_eq!(code, 0, "{err}");
    // There is no way to pass the key as an argument.
    let (code, _, _) = cli(&["upstream", "set", "tickets", KEY], None);
    assert_ne!(code, 0);
    let (code, out, _) = cli(&["upstream", "list", "-o", "json"], None);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    let set: Vec<bool> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["key_set"].as_bool().unwrap())
        .collect();
    assert_eq!(set, [true, true, false]);
    assert!(!out.contains(KEY));
    // The key works: a task token reaches the upstream with it.
    let c = Client::new(&addr, Some(admin)).unwrap();
    let t = start_task_in(&c, "gpt", "cli-agent").await;
    let l: IssuedLease = c
        .post(
            &format!("/v1/tasks/{}/leases", t.id),
            &IssueLease::default(),
        )
        .await
        .unwrap();
    let r = c
        .with_token(l.credential.secret().expose())
        .raw(
            http::Method::POST,
            "/proxy/openai/chat/completions",
            Some("application/json"),
            chat_body(None),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // The key is sealed at rest: not in the database in plain text.
    let db = std::fs::read(dir.path().join("data/keymint.db")).unwrap();
    let wal = std::fs::read(dir.path().join("data/keymint.db-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(!bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()));
    }
}

/// Sends `n` POSTs to `path` from `clients` in turn, 32 in flight, and
/// returns the status of each.
async fn flood(clients: Vec<Client>, path: &'static str, body: Vec<u8>, n: usize) -> Vec<u16> {
    const IN_FLIGHT: usize = 32;
    let mut workers = Vec::with_capacity(IN_FLIGHT);
    for w in 0..IN_FLIGHT {
        let clients = clients.clone();
        let body = body.clone();
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in (w..n).step_by(IN_FLIGHT) {
                let c = &clients[i % clients.len()];
                let r = c
                    .raw(
                        http::Method::POST,
                        path,
                        Some("application/json"),
                        body.clone(),
                    )
                    .await
                    .unwrap();
                out.push(r.status.as_u16());
            }
            out
        }));
    }
    let mut all = Vec::with_capacity(n);
    for w in workers {
        all.extend(w.await.unwrap());
    }
    all
}

/// The audit trail's events of `kind`.
async fn events_of(s: &TestServer, kind: &str) -> Vec<Value> {
    let ev: List<Value> = s.admin().get("/v1/audit?limit=1000").await.unwrap();
    ev.items.into_iter().filter(|e| e["kind"] == kind).collect()
}

/// Waits until the trail holds an event of `kind` (written by the expiry
/// manager's tick), with a deadline.
async fn eventually_event(s: &TestServer, kind: &str) -> Value {
    let t0 = Instant::now();
    loop {
        if let Some(e) = events_of(s, kind).await.into_iter().next() {
            return e;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no `{kind}` event");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn clocked_setup() -> (Env, keymint_core::ManualClock) {
    let up = FakeUpstream::start(KEY).await.unwrap();
    let clock =
        keymint_core::ManualClock::new(keymint_core::Timestamp::from_millis(1_800_000_000_000));
    let s = TestServer::builder()
        .clock(clock.clone())
        .config_toml(&config(&up))
        .start()
        .await
        .unwrap();
    (Env { s, up }, clock)
}

/// An anonymous flood through the proxy (junk, well-formed but unknown
/// `kmt_` tokens, the admin token) is refused and counted in full, but
/// audited one by one only up to the broker's burst, then as one summary:
/// the proxy shares the API's authentication and its bounded audit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_tokens_at_the_proxy_is_counted_in_full_but_audited_within_a_bound() {
    let (Env { s, up }, clock) = clocked_setup().await;
    let burst = keymint_server::broker::AUTH_AUDIT_BURST as usize;
    const N: usize = 5_000;
    let unknown = keymint_core::token::Token::generate(keymint_core::token::TokenKind::Access)
        .unwrap()
        .expose()
        .to_owned();
    let clients = vec![
        s.client("not-a-token"),
        s.client(&unknown),
        s.client(&s.admin_token),
    ];
    let statuses = flood(
        clients,
        "/proxy/openai/chat/completions",
        chat_body(None),
        N,
    )
    .await;
    assert_eq!(statuses.len(), N);
    assert!(
        statuses.iter().all(|st| *st == 401),
        "a bad token got through"
    );
    assert!(up.received().is_empty());

    // One event each up to the burst, nothing more inside the window.
    let failed = events_of(&s, "auth.failed").await;
    assert_eq!(failed.len(), burst);
    assert!(failed.iter().all(|e| e["data"]["upstream"] == "openai"));
    assert!(events_of(&s, "proxy.denied").await.is_empty());
    assert_eq!(
        metric(&s, "keymint_auth_failures_total").await,
        format!("keymint_auth_failures_total {N}")
    );
    assert_eq!(
        metric(&s, "keymint_proxy_denials_total{reason=\"auth\"}").await,
        format!("keymint_proxy_denials_total{{reason=\"auth\"}} {N}")
    );

    // When the window closes the rest is one summary, counted by kind.
    clock.advance_secs(11);
    let summary = eventually_event(&s, "auth.failed.suppressed").await;
    assert_eq!(summary["data"]["count"], (N - burst) as u64);
    let by = summary["data"]["by_credential"].as_object().unwrap();
    assert_eq!(by.len(), 3, "{by:?}");
    let sum: u64 = by.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(sum, (N - burst) as u64);
    assert_eq!(events_of(&s, "auth.failed").await.len(), burst);
    assert_eq!(events_of(&s, "auth.failed.suppressed").await.len(), 1);
    let all: List<Value> = s.admin().get("/v1/audit?limit=1000").await.unwrap();
    let text = all.items.iter().map(Value::to_string).collect::<String>();
    assert!(!text.contains(&unknown) && !text.contains(&s.admin_token));
}

/// A token holder asking again and again for a model its role forbids is
/// refused every time and counted every time, but cannot grow the audit
/// trail without bound: `proxy.denied` one by one up to the burst, then one
/// `proxy.denied.suppressed` summary by check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_forbidden_requests_are_counted_in_full_but_audited_within_a_bound() {
    let (Env { s, up }, clock) = clocked_setup().await;
    for name in ["openai"] {
        let r = s
            .admin()
            .raw(
                http::Method::POST,
                &format!("/v1/upstreams/{name}/key"),
                Some("application/json"),
                json!({"key": KEY}).to_string().into_bytes(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 204, "{}", r.text());
    }
    let burst = keymint_server::broker::AUTH_AUDIT_BURST as usize;
    const N: usize = 1_000;
    let (task, tok) = token(&s, "gpt").await;
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let statuses = flood(
        vec![s.client(&tok)],
        "/proxy/openai/chat/completions",
        body.to_string().into_bytes(),
        N,
    )
    .await;
    assert!(statuses.iter().all(|st| *st == 403), "{statuses:?}");
    assert!(up.received().is_empty());
    let denied = events_of(&s, "proxy.denied").await;
    assert_eq!(denied.len(), burst);
    assert!(
        denied
            .iter()
            .all(|e| e["data"]["check"] == "model" && e["task"] == task.id.as_str())
    );
    assert_eq!(
        metric(&s, "keymint_proxy_denials_total{reason=\"model\"}").await,
        format!("keymint_proxy_denials_total{{reason=\"model\"}} {N}")
    );
    // Nothing here was an authentication failure.
    assert_eq!(
        metric(&s, "keymint_auth_failures_total").await,
        "keymint_auth_failures_total 0"
    );

    clock.advance_secs(11);
    let summary = eventually_event(&s, "proxy.denied.suppressed").await;
    assert_eq!(summary["data"]["count"], (N - burst) as u64);
    assert_eq!(summary["data"]["by_check"]["model"], (N - burst) as u64);
    assert_eq!(events_of(&s, "proxy.denied").await.len(), burst);

    // A new window audits one by one again, and the token still works.
    let r = s
        .client(&tok)
        .raw(
            http::Method::POST,
            "/proxy/openai/chat/completions",
            Some("application/json"),
            body.to_string().into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(events_of(&s, "proxy.denied").await.len(), burst + 1);
    let r = s
        .client(&tok)
        .raw(
            http::Method::POST,
            "/proxy/openai/chat/completions",
            Some("application/json"),
            chat_body(None),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Fabricated at run time: an OpenAI-shaped project key and an AWS access
/// key id, neither a documentation placeholder.
fn fake_keys() -> (String, String) {
    (
        format!("sk-proj-{}", "Zx9Qw8Er7Ty6".repeat(4)),
        format!("AKIA{}", "Q7RZ2M4XW6TB3KPD"),
    )
}

fn pct(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

/// Headers and the query string are a way out too: only the headers an
/// upstream kind needs go on (screened like a body), every other one stays
/// behind whatever it holds; the query is screened decoded; a secret in the
/// path is refused; a client's `OpenAI-Organization`/`OpenAI-Project` never
/// reach the upstream, the role's do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_headers_query_or_path_never_reach_the_upstream() {
    let Env { s, up } = setup().await;
    let (leak, akia) = fake_keys();
    let (_, other) = token(&s, "gpt").await; // another task's token
    let (_, tok) = token(&s, "gpt").await;
    let chat = "/proxy/openai/chat/completions";
    let json = Some("application/json");
    let with = |tok: &str, hs: &[(&str, &str)]| {
        let mut c = s.client(tok);
        for (k, v) in hs {
            c = c.with_header(k, v).unwrap();
        }
        c
    };

    // Headers the upstream does not need are dropped, whatever they hold.
    let r = with(
        &tok,
        &[
            ("X-Anything", &akia),
            ("X-Other-Task", &other),
            ("X-Debug", &leak),
            ("OpenAI-Organization", "org-client"),
            ("OpenAI-Project", "proj_client"),
            ("User-Agent", "agent/1.0"),
            ("OpenAI-Beta", "assistants=v2"),
        ],
    )
    .raw(http::Method::POST, chat, json, chat_body(None))
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let got = up.received();
    assert_eq!(got.len(), 1);
    let dump = got[0].dump();
    for bad in [akia.as_str(), &other, &leak, "org-client", "proj_client"] {
        assert!(
            !dump.contains(bad),
            "the upstream received `{bad}`:\n{dump}"
        );
    }
    assert_eq!(got[0].headers["user-agent"], "agent/1.0");
    assert_eq!(got[0].headers["openai-beta"], "assistants=v2");
    assert_eq!(got[0].headers["authorization"], format!("Bearer {KEY}"));

    // A needed header carrying a secret, a secret in the query (plain,
    // percent-encoded, `+` for spaces), in the path: refused, by kind.
    let other_in_query = format!("{chat}?note={}", pct(&other));
    let leak_in_query = format!("{chat}?q=see+{}+here", pct(&leak));
    let akia_in_query = format!("{chat}?{akia}");
    let other_in_path = format!("/proxy/openai/models/{other}");
    let ua_leak = format!("agent {leak}");
    let cases: [(&str, Vec<(&str, &str)>, http::Method, &str, &str); 6] = [
        (
            "a needed header",
            vec![("User-Agent", ua_leak.as_str())],
            http::Method::POST,
            chat,
            "openai_key",
        ),
        (
            "another task's token in the query",
            vec![],
            http::Method::POST,
            &other_in_query,
            "keymint_token",
        ),
        (
            "an encoded key in the query",
            vec![],
            http::Method::POST,
            &leak_in_query,
            "openai_key",
        ),
        (
            "a query name",
            vec![],
            http::Method::POST,
            &akia_in_query,
            "aws_access_key_id",
        ),
        (
            "another task's token in the path",
            vec![],
            http::Method::GET,
            &other_in_path,
            "keymint_token",
        ),
        (
            "the idempotency key",
            vec![("Idempotency-Key", other.as_str())],
            http::Method::POST,
            chat,
            "keymint_token",
        ),
    ];
    for (what, hs, method, path, kind) in &cases {
        let body = (*method == http::Method::POST).then(|| chat_body(None));
        let r = with(&tok, hs)
            .raw(method.clone(), path, json, body.unwrap_or_default())
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert!(r.text().contains(kind), "{what}: {}", r.text());
        for bad in [akia.as_str(), &other, &leak] {
            assert!(!r.text().contains(bad), "{what}: echoed");
        }
        assert_eq!(up.received().len(), 1, "{what}: it reached the upstream");
    }

    // With `redact`, a header value and a query parameter go on redacted.
    let (_, red) = token(&s, "gpt-redact").await;
    let r = with(&red, &[("User-Agent", ua_leak.as_str())])
        .raw(http::Method::POST, &leak_in_query, json, chat_body(None))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let got = up.received();
    let sent = got.last().unwrap();
    assert!(!sent.dump().contains(&leak) && !sent.dump().contains(&pct(&leak)));
    assert_eq!(sent.headers["user-agent"], "agent [REDACTED:openai_key]");
    assert!(
        sent.uri
            .ends_with("/v1/chat/completions?q=see%20%5BREDACTED%3Aopenai_key%5D%20here"),
        "{}",
        sent.uri
    );
    // An http upstream: the query is screened the same way.
    let (_, tk) = token(&s, "tickets").await;
    let r = s
        .client(&tk)
        .raw(
            http::Method::GET,
            &format!("/proxy/tickets/tickets?token={other}"),
            None,
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    let (_, tk) = token(&s, "tickets-redact").await;
    let r = s
        .client(&tk)
        .raw(
            http::Method::GET,
            &format!("/proxy/tickets/tickets?state=open&token={other}"),
            None,
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = up.received().last().unwrap().clone();
    assert_eq!(
        sent.uri,
        "/api/tickets?state=open&token=%5BREDACTED%3Akeymint_token%5D"
    );

    // The role, not the client, names the organisation and project billed.
    let (_, org) = token(&s, "gpt-org").await;
    let r = with(
        &org,
        &[
            ("OpenAI-Organization", "org-client"),
            ("OpenAI-Project", "proj_client"),
        ],
    )
    .raw(http::Method::POST, chat, json, chat_body(None))
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = up.received().last().unwrap().clone();
    assert_eq!(sent.headers["openai-organization"], "org-operator");
    assert_eq!(sent.headers["openai-project"], "proj_operator");
    assert_eq!(
        sent.headers.get_all("openai-organization").iter().count(),
        1
    );

    upstream_saw_only_the_key(&up, &[&tok, &other, &red, &org]);
    let ev: List<Value> = s.admin().get("/v1/audit?limit=1000").await.unwrap();
    let all = ev.items.iter().map(Value::to_string).collect::<String>();
    for bad in [akia.as_str(), &other, &leak] {
        assert!(!all.contains(bad), "the audit trail holds a secret");
    }
}

const SDK_HEADERS_SCRIPT: &str = r#"
import json, openai, os
out = {}
c = openai.OpenAI(max_retries=0, organization="org-client", project="proj_client",
    default_headers={"X-Anything": os.environ["AKIA"], "X-Other-Task": os.environ["OTHER"]})
msgs = [{"role": "user", "content": "hello"}]
out["plain"] = c.chat.completions.create(model="gpt-4o-mini", messages=msgs).choices[0].message.content
try:
    c.chat.completions.create(model="gpt-4o-mini", messages=msgs, extra_query={"debug": os.environ["OTHER"]})
    out["query"] = None
except openai.BadRequestError as e:
    out["query"] = [e.status_code, e.message]
try:
    c.chat.completions.create(model="gpt-4o-mini", messages=msgs, extra_headers={"User-Agent": "x " + os.environ["AKIA"]})
    out["header"] = None
except openai.BadRequestError as e:
    out["header"] = [e.status_code, e.message]
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdks_default_headers_and_extra_query_leak_nothing() {
    if !sdks().await {
        return;
    }
    let Env { s, up } = setup().await;
    let (_, akia) = fake_keys();
    let (_, other) = token(&s, "gpt").await;
    let (_, tok) = token(&s, "gpt-org").await;
    let mut env = openai_env(&s, &tok);
    env.push(("AKIA", akia.clone()));
    env.push(("OTHER", other.clone()));
    let out = python(SDK_HEADERS_SCRIPT, &env).await;
    assert_eq!(out["plain"], "Hello from the fake upstream.", "{out}");
    assert_eq!(out["query"][0], 400, "{out}");
    assert!(out["query"][1].as_str().unwrap().contains("keymint_token"));
    assert_eq!(out["header"][0], 400, "{out}");
    assert!(
        out["header"][1]
            .as_str()
            .unwrap()
            .contains("aws_access_key_id")
    );
    assert!(!out.to_string().contains(&akia) && !out.to_string().contains(&other));
    let got = up.received();
    assert_eq!(got.len(), 1, "only the clean request left");
    let dump = got[0].dump();
    assert!(!dump.contains(&akia) && !dump.contains("org-client") && !dump.contains("proj_client"));
    assert_eq!(got[0].headers["openai-organization"], "org-operator");
    assert_eq!(got[0].headers["openai-project"], "proj_operator");
    upstream_saw_only_the_key(&up, &[&tok, &other]);
}

/// OpenAI's reasoning models refuse `max_tokens`: where the proxy adds an
/// output limit (the role has an output or spend budget and the client set
/// none), it adds `max_completion_tokens` for them; a client's
/// `max_completion_tokens` is the limit it reserves and lowers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_models_get_their_output_limit_as_max_completion_tokens() {
    let Env { s, up } = setup().await;
    let chat = "/proxy/openai/chat/completions";
    let body = |model: &str, extra: Value| {
        let mut b = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b.to_string().into_bytes()
    };
    let cases = [
        ("o3-mini", json!({}), "max_completion_tokens", 1000),
        ("gpt-5-mini", json!({}), "max_completion_tokens", 1000),
        (
            "o3-mini",
            json!({"max_completion_tokens": 50_000}),
            "max_completion_tokens",
            1000,
        ),
        (
            "o3-mini",
            json!({"max_completion_tokens": 7}),
            "max_completion_tokens",
            7,
        ),
        ("gpt-4o-mini", json!({}), "max_tokens", 1000),
    ];
    for (i, (model, extra, field, want)) in cases.iter().enumerate() {
        // A task each: the output budget is per task.
        let (_, tok) = token(&s, "reasoner").await;
        let r = s
            .client(&tok)
            .raw(
                http::Method::POST,
                chat,
                Some("application/json"),
                body(model, extra.clone()),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{model} {extra}: {}", r.text());
        let sent = up.received()[i].json();
        assert_eq!(sent[*field], *want, "{model} {extra}: {sent}");
        let other = if *field == "max_tokens" {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        assert!(sent.get(other).is_none(), "{model} {extra}: {sent}");
    }
}

/// An upstream that answers before it has read the request's body (a `413`
/// to an upload too large for it, RFC 9112 §9.3) and then stops reading:
/// the client gets that answer through the proxy, not the proxy's `502`
/// or, when the upstream holds the connection, a `504` after its timeout.
/// One that closes without an answer is the proxy's `502`, which says the
/// request may have reached it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_answers_before_reading_the_body_is_heard() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const REFUSAL: &str = "uploads are limited to 1 MiB";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = std::sync::Arc::clone(&heads);
    tokio::spawn(async move {
        // Connection by connection: answered then closed, answered then
        // held open unread, closed with no answer.
        let mut n = 0;
        while let Ok((mut s, _)) = listener.accept().await {
            let way = n % 3;
            n += 1;
            s.set_nodelay(true).unwrap();
            let seen = std::sync::Arc::clone(&seen);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if !matches!(s.read(&mut b).await, Ok(1)) {
                        return;
                    }
                    head.push(b[0]);
                }
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                if way == 2 {
                    return;
                }
                let answer = format!(
                    "HTTP/1.1 413 Content Too Large\r\ncontent-type: text/plain\r\n\
                     content-length: {}\r\n\r\n{REFUSAL}",
                    REFUSAL.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
                if way == 1 {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            });
        }
    });
    let s = TestServer::builder()
        .config_toml(&format!(
            r#"
[[upstreams]]
name = "uploads"
kind = "http"
base_url = "http://127.0.0.1:{port}/api"
key_header = "X-Api-Key"
timeout = "30s"

[[roles]]
name = "uploader"
engine = "token"
upstream = "uploads"
scopes = ["http:read"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
endpoints = ["POST /upload*"]
"#
        ))
        .start()
        .await
        .unwrap();
    let r = s
        .admin()
        .raw(
            http::Method::POST,
            "/v1/upstreams/uploads/key",
            Some("application/json"),
            json!({"key": KEY}).to_string().into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.text());
    let (_, tok) = token(&s, "uploader").await;
    // Larger than the two sockets' buffers between the proxy and the
    // upstream, within the proxy's own body limit (8 MiB).
    let upload = || async {
        s.client(&tok)
            .raw(
                http::Method::POST,
                "/proxy/uploads/upload",
                Some("application/octet-stream"),
                vec![b'u'; 6 << 20],
            )
            .await
            .unwrap()
    };
    for round in ["closes", "holds the connection"] {
        let started = Instant::now();
        let r = upload().await;
        assert_eq!(r.status, 413, "the upstream {round}: {}", r.text());
        assert_eq!(r.text(), REFUSAL, "the upstream {round}");
        // Well inside the upstream's 30 s timeout: nothing waited for it.
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the upstream {round}: {:?}",
            started.elapsed()
        );
    }
    let r = upload().await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("may have reached it"), "{}", r.text());
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 3, "{heads:?}");
    for h in &heads {
        assert!(h.starts_with("POST /api/upload HTTP/1.1\r\n"), "{h}");
        assert!(h.to_ascii_lowercase().contains("x-api-key: "), "{h}");
    }
    s.stop().await;
}

/// One HTTP/1.1 exchange written by hand (`head` without the blank line;
/// `connection: close` is added): the status and the body.
async fn exchange(s: &TestServer, head: &str, body: &str) -> (u16, String) {
    let (status, text) = exchange_with(s, head, body).await;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// [`exchange`] without a body: the status and the whole answer, head and
/// body.
async fn exchange_raw(s: &TestServer, head: &str) -> (u16, String) {
    exchange_with(s, head, "").await
}

async fn exchange_with(s: &TestServer, head: &str, body: impl AsRef<[u8]>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.as_ref();
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut req = format!(
        "{head}\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    sock.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"));
    (status, text)
}

/// A credential header that comes twice is refused, whichever of its values
/// is the valid one, by the proxy (in the provider's shape, audited as
/// `auth.failed`, nothing forwarded) and by the API (nothing changed), as
/// the MCP route and the token endpoint refuse it: which value counts
/// would be a guess that another hop in front may make differently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_header_sent_twice_is_refused() {
    let Env { s, up } = setup().await;
    let (task, tok) = token(&s, "gpt").await;
    let chat = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let post = "POST /proxy/openai/chat/completions HTTP/1.1\r\ncontent-type: application/json";
    for (headers, which) in [
        (
            format!("authorization: Bearer {tok}\r\nauthorization: Bearer kmt_junk"),
            "authorization",
        ),
        (
            format!("authorization: Bearer kmt_junk\r\nauthorization: Bearer {tok}"),
            "authorization",
        ),
        (format!("x-api-key: {tok}\r\nx-api-key: {tok}"), "x-api-key"),
        (format!("api-key: kmt_junk\r\napi-key: {tok}"), "api-key"),
    ] {
        let (status, body) = exchange(&s, &format!("{post}\r\n{headers}"), chat).await;
        assert_eq!(status, 401, "{which}: {body}");
        let e: Value = serde_json::from_str(&body).unwrap();
        let m = e["error"]["message"].as_str().unwrap();
        assert!(
            m.contains(&format!("more than one `{which}` header")),
            "{m}"
        );
        assert!(!body.contains(&tok[4..16]), "the token is not echoed");
    }
    assert!(up.received().is_empty(), "nothing was forwarded");
    let failed = events_of(&s, "auth.failed").await;
    assert_eq!(
        failed
            .iter()
            .filter(|e| e["data"]["credential"] == "repeated")
            .count(),
        4,
        "{failed:?}"
    );
    assert!(
        !serde_json::to_string(&failed)
            .unwrap()
            .contains(&tok[4..16])
    );
    // Sent once, the same token goes through; a second, other header does
    // not count against it (`Authorization` is looked for first).
    let (status, body) = exchange(
        &s,
        &format!("{post}\r\nauthorization: Bearer {tok}\r\nx-api-key: kmt_junk"),
        chat,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(up.received().len(), 1);

    // The API: the admin token beside another.
    let admin = &s.admin_token;
    let tasks_before = s
        .admin()
        .get::<List<Task>>("/v1/tasks")
        .await
        .unwrap()
        .items
        .len();
    for order in [
        format!("authorization: Bearer {admin}\r\nauthorization: Bearer kma_junk"),
        format!("authorization: Bearer kma_junk\r\nauthorization: Bearer {admin}"),
    ] {
        let (status, body) = exchange(
            &s,
            &format!("POST /v1/tasks HTTP/1.1\r\ncontent-type: application/json\r\n{order}"),
            r#"{"workload":"w","role":"gpt","ttl_secs":60}"#,
        )
        .await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("send one `Authorization` header"), "{body}");
        assert!(!body.contains(&admin[4..16]));
    }
    assert_eq!(
        s.admin()
            .get::<List<Task>>("/v1/tasks")
            .await
            .unwrap()
            .items
            .len(),
        tasks_before,
        "no task was started"
    );
    // A task token with two identity proofs beside it.
    let (status, body) = exchange(
        &s,
        &format!(
            "GET /v1/tasks/{} HTTP/1.1\r\nauthorization: Bearer {tok}\r\nx-keymint-identity: a.b.c\r\nx-keymint-identity: d.e.f",
            task.id
        ),
        "",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body.contains("send one `X-Keymint-Identity` header"),
        "{body}"
    );
}

/// An upstream that prints the request back (an error page, an echo
/// service, a redirect that keeps the query) would hand the agent the key
/// the proxy holds for it. The proxy redacts the key from the response's
/// headers and body in every form it may come back in (as sent in a
/// header, percent-encoded as sent in a query, with `/` escaped as JSON
/// encoders write it), counts it and logs it without the key; the agent
/// never holds the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_carries_the_upstreams_key_back_is_redacted() {
    let up = FakeUpstream::start(KEY).await.unwrap();
    let extra = format!(
        r#"
[[upstreams]]
name = "lookup"
kind = "http"
base_url = "{}/api"
key_query = "api_key"

[[roles]]
name = "lookup"
engine = "token"
upstream = "lookup"
scopes = ["http:read"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
endpoints = ["GET /reflect*"]

[[roles]]
name = "reflect-llm"
engine = "token"
upstream = "openai"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
models = ["reflect-sse", "reflect-stream"]
endpoints = ["chat.completions"]

[[roles]]
name = "tickets-reflect"
engine = "token"
upstream = "tickets"
scopes = ["http:read"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
endpoints = ["GET /reflect*"]
"#,
        up.url()
    );
    let s = TestServer::builder()
        .config_toml(&format!("{}{extra}", config(&up)))
        .start()
        .await
        .unwrap();
    // Fabricated keys with the characters that change form on the way:
    // `/` and `+` (percent-encoded in a query, `/` escaped in JSON).
    let fake = |p: &str| {
        format!(
            "{p}/{}+{}",
            keymint_core::token::random_base62(20).unwrap().as_str(),
            keymint_core::token::random_base62(8).unwrap().as_str()
        )
    };
    let (header_key, query_key) = (fake("tk_fake"), fake("lk_fake"));
    for (name, key) in [("tickets", &header_key), ("lookup", &query_key)] {
        crate::set_upstream_key(&s.admin(), name, key).await;
    }
    let encoded = query_key.replace('/', "%2F").replace('+', "%2B");
    for (role, path, key, forms) in [
        (
            "tickets-reflect",
            "/proxy/tickets/reflect",
            &header_key,
            vec![header_key.clone(), header_key.replace('/', "\\/")],
        ),
        (
            "lookup",
            "/proxy/lookup/reflect?q=1",
            &query_key,
            vec![
                query_key.clone(),
                encoded.clone(),
                query_key.replace('/', "\\/"),
            ],
        ),
    ] {
        let (_, tok) = token(&s, role).await;
        let (status, text) = exchange(
            &s,
            &format!("GET {path} HTTP/1.1\r\nauthorization: Bearer {tok}"),
            "",
        )
        .await;
        assert_eq!(status, 200, "{role}: {text}");
        for f in &forms {
            assert!(
                !text.contains(f.as_str()),
                "{role}: the key came back: {text}"
            );
        }
        assert!(text.contains("[key redacted by keymint]"), "{role}: {text}");
        // The upstream did get the key: it is the response that lost it.
        let got = up.received();
        let last = got.last().unwrap();
        let sent = format!(
            "{}{}",
            last.uri,
            last.headers
                .get("x-api-key")
                .map_or("", |v| v.to_str().unwrap())
        );
        assert!(
            sent.contains(key.as_str()) || sent.contains(&encoded),
            "{role}: {sent}"
        );
    }
    // The head: the echoed request line carried the query key.
    let (_, tok) = token(&s, "lookup").await;
    let (_, raw) = exchange_raw(
        &s,
        &format!("GET /proxy/lookup/reflect HTTP/1.1\r\nauthorization: Bearer {tok}"),
    )
    .await;
    let head = raw.split("\r\n\r\n").next().unwrap();
    assert!(
        head.contains("x-request-uri: /api/reflect?api_key=[key redacted by keymint]"),
        "{head}"
    );
    assert!(!raw.contains(&encoded) && !raw.contains(&query_key));
    // An LLM upstream's refusal that says `text/event-stream` is read whole
    // and searched like any other (only a successful stream passes unread).
    crate::set_upstream_key(&s.admin(), "openai", KEY).await;
    let (_, tok) = token(&s, "reflect-llm").await;
    let (status, text) = exchange(
        &s,
        &format!(
            "POST /proxy/openai/chat/completions HTTP/1.1\r\ncontent-type: application/json\r\nauthorization: Bearer {tok}"
        ),
        r#"{"model":"reflect-sse","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(!text.contains(KEY), "the key came back: {text}");
    assert!(
        text.contains("refused Bearer [key redacted by keymint]"),
        "{text}"
    );
    // A successful stream is passed on as it comes, and the key is taken
    // out of it even where a chunk boundary cuts it in two.
    let r = s
        .client(&tok)
        .raw(
            http::Method::POST,
            "/proxy/openai/chat/completions",
            Some("application/json"),
            br#"{"model":"reflect-stream","messages":[{"role":"user","content":"hi"}],"stream":true}"#
                .to_vec(),
        )
        .await
        .unwrap();
    let text = r.text();
    assert_eq!(r.status, 200, "{text}");
    assert!(!text.contains(KEY), "the key came back: {text}");
    assert!(
        text.contains(r#"{"echo": "Bearer [key redacted by keymint]"}"#)
            && text.contains(r#"{"again": "[key redacted by keymint]"}"#)
            && text.contains("data: [DONE]"),
        "{text}"
    );
    for (upstream, n) in [("lookup", 2), ("tickets", 1), ("openai", 2)] {
        let series = format!("keymint_proxy_key_reflections_total{{upstream=\"{upstream}\"}}");
        assert_eq!(metric(&s, &series).await, format!("{series} {n}"));
    }
}

/// A path the proxy forwards is one every upstream reads under its base:
/// encodings that a server decoding twice (or a proxy in front of it
/// decoding once more), an old Windows or Java decoder, or a C string read
/// as `..` are refused like `..` itself, before the token is looked at,
/// and nothing reaches the upstream. A path with ordinary escapes still
/// goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_an_upstream_could_decode_out_of_its_base_is_refused() {
    let Env { s, up } = setup().await;
    let (_, tt) = token(&s, "tickets").await;
    for p in [
        // Encoded twice (and three times): `%2e%2e` once decoded.
        "tickets/%252e%252e/admin",
        "tickets/%252E%252E/admin",
        "tickets%252f..%252fadmin",
        "tickets%255c..%255cadmin",
        "tickets/%25252e%25252e/admin",
        // Overlong UTF-8 for `.` and `/` (old Java and IIS decoders).
        "tickets/%c0%ae%c0%ae/admin",
        "tickets/..%c0%afadmin",
        "tickets/%e0%80%ae%e0%80%ae/admin",
        // IIS's `%u` escapes; not percent-encoding at all.
        "tickets/%u002e%u002e/admin",
        "tickets/%zz",
        // A NUL or another control character cuts or bends a name.
        "tickets/..%00/admin",
        "tickets/.%00./admin",
        "tickets/..%09/admin",
        "tickets/x%0d%0aadmin",
        // Blanks around the dots, which Windows trims from a name.
        "tickets/..%20/admin",
        "tickets/%20../admin",
    ] {
        let n = up.received().len();
        let (status, text) = exchange_raw(
            &s,
            &format!("GET /proxy/tickets/{p} HTTP/1.1\r\nauthorization: Bearer {tt}"),
        )
        .await;
        assert_eq!(status, 400, "{p}: {text}");
        assert!(text.contains("the path is not allowed"), "{p}: {text}");
        assert_eq!(up.received().len(), n, "{p} reached the upstream");
    }
    // Ordinary escapes (a space, a non-ASCII name, a literal `%`) pass.
    for p in ["tickets/a%20b", "tickets/caf%C3%A9", "tickets/100%25"] {
        let (status, text) = exchange_raw(
            &s,
            &format!("GET /proxy/tickets/{p} HTTP/1.1\r\nauthorization: Bearer {tt}"),
        )
        .await;
        assert_eq!(status, 200, "{p}: {text}");
        assert_eq!(up.received().pop().unwrap().uri, format!("/api/{p}"));
    }
}

/// `s` with its `%XX` escapes decoded.
fn decoded(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            s.get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok()),
        ) {
            (b'%', Some(c)) => {
                out.push(c);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A client's query parameter named like the one a `key_query` upstream's
/// key travels in is removed, however its name is percent-encoded: the
/// upstream decodes the names, and would otherwise see two keys, the
/// client's first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parameter_named_like_the_query_key_is_removed_however_it_is_spelt() {
    let up = FakeUpstream::start(KEY).await.unwrap();
    let extra = r#"
[[upstreams]]
name = "lookup"
kind = "http"
base_url = "UP/api"
key_query = "api_key"

[[roles]]
name = "lookup"
engine = "token"
upstream = "lookup"
scopes = ["http:read"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
endpoints = ["GET /items*"]
"#
    .replace("UP", &up.url());
    let s = TestServer::builder()
        .config_toml(&format!("{}{extra}", config(&up)))
        .start()
        .await
        .unwrap();
    crate::set_upstream_key(&s.admin(), "lookup", KEY).await;
    let (_, tok) = token(&s, "lookup").await;
    for query in [
        "api_key=mine&q=1",
        "api%5Fkey=mine&q=1",
        "api%5fkey=mine&q=1",
        "%61pi_key=mine&q=1",
        "q=1&%61%70%69%5F%6B%65%79=mine",
    ] {
        let (status, text) = exchange(
            &s,
            &format!("GET /proxy/lookup/items?{query} HTTP/1.1\r\nauthorization: Bearer {tok}"),
            "",
        )
        .await;
        assert_eq!(status, 200, "{query}: {text}");
        let got = up.received().pop().unwrap();
        let (_, sent) = got.uri.split_once('?').unwrap();
        let keys: Vec<String> = sent
            .split('&')
            .filter_map(|p| {
                let (n, v) = p.split_once('=')?;
                (decoded(n) == "api_key").then(|| v.to_owned())
            })
            .collect();
        assert_eq!(keys, [KEY], "{query}: the upstream got {sent}");
        assert!(sent.contains("q=1"), "{query}: {sent}");
    }
}

/// A form body (`application/x-www-form-urlencoded`) is screened decoded,
/// as the query is: a secret percent-encoded, or with `+` for its spaces
/// (a private key's armour), is blocked or redacted like one sent plain,
/// and a clean form goes on as it came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_in_a_form_body_is_screened_decoded() {
    let up = FakeUpstream::start(KEY).await.unwrap();
    let extra = r#"
[[roles]]
name = "tickets-post"
engine = "token"
upstream = "tickets"
scopes = ["http:read"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
endpoints = ["POST /tickets*"]

[[roles]]
name = "tickets-post-redact"
engine = "token"
upstream = "tickets"
scopes = ["http:read"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
endpoints = ["POST /tickets*"]
secrets = "redact"
"#;
    let s = TestServer::builder()
        .config_toml(&format!("{}{extra}", config(&up)))
        .start()
        .await
        .unwrap();
    crate::set_upstream_key(&s.admin(), "tickets", KEY).await;
    let (leak, akia) = fake_keys();
    let form = Some("application/x-www-form-urlencoded");
    let bodies = [
        format!("title=t&note=see+{}+here", pct(&leak)),
        format!("id={}", pct(&akia)),
    ];
    let (_, block) = token(&s, "tickets-post").await;
    for body in &bodies {
        let n = up.received().len();
        let r = s
            .client(&block)
            .raw(
                http::Method::POST,
                "/proxy/tickets/tickets",
                form,
                body.clone().into_bytes(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert!(r.text().contains("carries a secret"), "{}", r.text());
        assert_eq!(up.received().len(), n, "{body} reached the upstream");
    }
    let (_, redact) = token(&s, "tickets-post-redact").await;
    for body in &bodies {
        let r = s
            .client(&redact)
            .raw(
                http::Method::POST,
                "/proxy/tickets/tickets",
                form,
                body.clone().into_bytes(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{body}: {}", r.text());
        let got = up.received().pop().unwrap();
        let sent = decoded(&String::from_utf8_lossy(&got.body).replace('+', " "));
        assert!(!sent.contains(&leak) && !sent.contains(&akia), "{sent}");
        assert!(sent.contains("[REDACTED:"), "{sent}");
    }
    let clean = "title=printer+jam&floor=3%2C+east";
    let r = s
        .client(&block)
        .raw(
            http::Method::POST,
            "/proxy/tickets/tickets",
            form,
            clean.as_bytes().to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.received().pop().unwrap().body, clean.as_bytes());
}

/// A compressed body (`Content-Encoding: gzip`, `br`, `deflate`, a list)
/// is refused unread, 415 in the provider's shape and audited: the screen
/// reads the bytes as sent, so a key inside compressed bytes would pass it
/// and be decoded by the upstream. `identity` is no coding and passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_body_is_refused_unread() {
    use std::io::Write as _;
    let up = FakeUpstream::start(KEY).await.unwrap();
    let extra = r#"
[[roles]]
name = "tickets-post"
engine = "token"
upstream = "tickets"
scopes = ["http:read"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
endpoints = ["POST /tickets*"]
"#;
    let s = TestServer::builder()
        .config_toml(&format!("{}{extra}", config(&up)))
        .start()
        .await
        .unwrap();
    for name in ["openai", "tickets"] {
        crate::set_upstream_key(&s.admin(), name, KEY).await;
    }
    let (leak, _) = fake_keys();
    let note = json!({"title": "t", "note": format!("use {leak}")}).to_string();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(note.as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    assert!(
        !String::from_utf8_lossy(&gz).contains(&leak),
        "the compressed body must hide the key from a byte screen"
    );
    let (_, tickets) = token(&s, "tickets-post").await;
    for coding in ["gzip", "br", "deflate", "GZIP", "identity, gzip"] {
        let head = format!(
            "POST /proxy/tickets/tickets HTTP/1.1\r\nauthorization: Bearer {tickets}\r\n\
             content-type: application/json\r\ncontent-encoding: {coding}"
        );
        let (status, answer) = exchange_with(&s, &head, &gz).await;
        assert_eq!(status, 415, "{coding}: {answer}");
        assert!(answer.contains("unsupported_media_type"), "{answer}");
        assert!(answer.contains("Content-Encoding"), "{answer}");
    }
    assert!(
        up.received().is_empty(),
        "a compressed body reached the upstream"
    );
    let denied = events_of(&s, "proxy.denied").await;
    assert!(
        denied.iter().any(|e| e["data"]["check"] == "encoding"),
        "{denied:?}"
    );
    assert!(
        metric(&s, "keymint_proxy_denials_total{reason=\"encoding\"}")
            .await
            .ends_with(" 5"),
    );

    // An LLM endpoint: the budget's read of the model and limits is not
    // passed either.
    let (_, gpt) = token(&s, "gpt").await;
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
        .to_string();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(chat.as_bytes()).unwrap();
    let head = format!(
        "POST /proxy/openai/chat/completions HTTP/1.1\r\nauthorization: Bearer {gpt}\r\n\
         content-type: application/json\r\ncontent-encoding: gzip"
    );
    let (status, answer) = exchange_with(&s, &head, gz.finish().unwrap()).await;
    assert_eq!(status, 415, "{answer}");
    assert!(
        answer.contains("\"code\":\"unsupported_media_type\""),
        "{answer}"
    );
    assert!(up.received().is_empty());

    // `identity` is no coding: the body goes on as sent.
    let head = format!(
        "POST /proxy/openai/chat/completions HTTP/1.1\r\nauthorization: Bearer {gpt}\r\n\
         content-type: application/json\r\ncontent-encoding: identity"
    );
    let (status, answer) = exchange(&s, &head, &chat).await;
    assert_eq!(status, 200, "{answer}");
    let got = up.received();
    assert_eq!(got.len(), 1);
    assert!(
        !got[0]
            .dump()
            .to_ascii_lowercase()
            .contains("content-encoding"),
        "{}",
        got[0].dump()
    );
}

/// A body crafted to cost the screen the most (a rule's window opened
/// every few bytes: `SECRET_KEY=` six million bytes long, then a key) is
/// read off the runtime that serves its connection, so the connections
/// that share that runtime go on being answered while it is screened
/// (design 0019, "Large bodies"). Before, every connection of the big
/// body's core waited for its screen: the requests sent after the big body
/// on a connection of its runtime were answered only after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_crafted_body_stops_no_other_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Env { s, up } = setup().await;
    let (_, tok) = token(&s, "gpt").await;
    // Fabricated, shaped like an OpenAI project key: the screen blocks the
    // body once it has read it whole, so the answer comes right after.
    let leak = format!("sk-proj-{}", "Zx9Qw8Er7Ty6".repeat(4));
    let content = format!("{} {leak}", "SECRET_KEY=".repeat(6 * 1024 * 1024 / 11));
    let big = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]})
        .to_string();
    // Four connections for small requests, opened first (each a client
    // of its own, spread over the runtimes, so some share the big body's).
    let clients: Vec<Client> = (0..4).map(|_| s.client(&tok)).collect();
    for c in &clients {
        assert_eq!(crate::budgets::chat(c, Some(4)).await, 200);
    }
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /proxy/openai/chat/completions HTTP/1.1\r\nHost: keymint\r\n\
         Authorization: Bearer {tok}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        big.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(big.as_bytes()).await.unwrap();
    // The body is sent: from here the server reads what is left of it and
    // screens it. Each small connection counts the answers to requests it
    // sent from now on and had before the big body's answer came.
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let big_answer = tokio::spawn(async move {
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(120), sock.read_to_end(&mut answer))
            .await
            .expect("the large body was never answered")
            .unwrap();
        done_tx.send(true).unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    });
    let mut loops = Vec::new();
    for c in clients {
        let done = done_rx.clone();
        loops.push(tokio::spawn(async move {
            let mut answered = 0usize;
            while !*done.borrow() && answered < 100_000 {
                assert_eq!(crate::budgets::chat(&c, Some(4)).await, 200);
                if !*done.borrow() {
                    answered += 1;
                }
            }
            answered
        }));
    }
    let answer = big_answer.await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("openai_key"),
        "{}",
        &answer[..answer.len().min(300)]
    );
    assert!(!answer.contains(&leak));
    let mut counts = Vec::new();
    for l in loops {
        counts.push(l.await.unwrap());
    }
    assert!(
        counts.iter().all(|&n| n >= 10),
        "answers per connection while the large body was screened: {counts:?}"
    );
    assert!(
        up.received().iter().all(|r| r.body.len() < big.len()),
        "the blocked body reached the upstream"
    );
}
