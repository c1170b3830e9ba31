//! The MCP route (docs/design/0031-mcp-route.md): the official `mcp` Python
//! SDK's client calls tools on the SDK's own server (MCPServer, formerly
//! FastMCP) through keymint, with a keymint access token; and the attacks
//! that must fail: no token, a token for another audience, DPoP-bound
//! tokens without their proof, with another key's or a replayed proof, a
//! token of an ended task, a call policy forbids, oversized and malformed
//! bodies. The MCP server records every header it receives: the agent's
//! token is never among them.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use base64::Engine as _;
use keymint_client::Client;
use keymint_testkit::TestServer;
use serde_json::{Value, json};
use sha2::Digest as _;
use tokio::io::AsyncBufReadExt as _;

use crate::postgres::in_ci;

const TOOLS: &str = "https://keymint.test/mcp/tools";
const FILES: &str = "https://keymint.test/mcp/files";
const EXCH: &str = "https://keymint.test/mcp/exch";
/// The audience of the tokens keymint mints for the `exch` MCP server.
const EXCH_UPSTREAM: &str = "https://tools.internal/mcp";
const TE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const AT: &str = "urn:ietf:params:oauth:token-type:access_token";

fn config(port: u16) -> String {
    format!(
        r#"
[issuer]
algorithms = ["ES256"]

[[roles]]
name = "tools"
engine = "jwt"
scopes = ["tools:call", "tools:admin"]
default_ttl = "5m"
max_ttl = "30m"
[roles.jwt]
audience = "{TOOLS}"

[[roles]]
name = "files"
engine = "jwt"
scopes = ["files:read"]
default_ttl = "5m"
max_ttl = "30m"
[roles.jwt]
audience = "{FILES}"

[[roles]]
name = "exch"
engine = "jwt"
scopes = ["exch:call"]
default_ttl = "5m"
max_ttl = "30m"
[roles.jwt]
audience = "{EXCH}"

[[mcp.servers]]
name = "tools"
upstream = "http://127.0.0.1:{port}/mcp"
resource = "{TOOLS}"
required_scopes = ["tools:call"]
credential = "bearer"
max_body = 4096

[[mcp.servers]]
name = "files"
upstream = "http://127.0.0.1:{port}/mcp"
resource = "{FILES}"
dpop = "required"

[[mcp.servers]]
name = "exch"
upstream = "http://127.0.0.1:{port}/mcp"
resource = "{EXCH}"
credential = "exchanged"
upstream_audience = "{EXCH_UPSTREAM}"
"#
    )
}

/// Everything is allowed except the tool `delete_everything`, the
/// resources under `notes://secret/` and the prompt `exfiltrate`.
const POLICY: &str = r#"
@id("permit-all")
permit(principal, action, resource);

@id("no-deleting")
forbid(principal, action == Keymint::Action::"call_tool", resource)
when { context has mcp && context.mcp.tool == "delete_everything" };

@id("no-secrets")
forbid(principal, action == Keymint::Action::"read_resource", resource)
when { context has mcp && context.mcp.uri like "notes://secret/*" };

@id("no-exfiltrating")
forbid(principal, action == Keymint::Action::"get_prompt", resource)
when { context has mcp && context.mcp.prompt == "exfiltrate" };
"#;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/mcp")
        .join(name)
}

/// Whether python3 with the `mcp` SDK is here; fails under CI if not.
async fn python_has_mcp() -> bool {
    let ok = tokio::process::Command::new("python3")
        .args(["-c", "import mcp.server.mcpserver, uvicorn, httpx2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(!in_ci(), "python3 with `mcp` (2.x) is required in CI");
        eprintln!("skipping: python3 with the `mcp` SDK is not installed");
    }
    ok
}

/// The SDK's MCP server on a loopback port, recording the headers of every
/// request it receives into `dir/headers.jsonl`.
struct McpServer {
    _child: tokio::process::Child,
    port: u16,
    log: PathBuf,
}

impl McpServer {
    async fn start(dir: &Path) -> Self {
        let log = dir.join("headers.jsonl");
        let mut child = tokio::process::Command::new("python3")
            .arg(script("server.py"))
            .arg(&log)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(std::time::Duration::from_secs(60), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("the MCP server did not start in time"))
            .unwrap()
            .unwrap_or_else(|| panic!("the MCP server exited"));
        let port = serde_json::from_str::<Value>(&line).unwrap()["port"]
            .as_u64()
            .unwrap();
        Self {
            _child: child,
            port: u16::try_from(port).unwrap(),
            log,
        }
    }

    /// Every request the MCP server received: (method, headers).
    fn received(&self) -> Vec<(String, Vec<(String, String)>)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                let h = v["headers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| {
                        (
                            p[0].as_str().unwrap().to_owned(),
                            p[1].as_str().unwrap().to_owned(),
                        )
                    })
                    .collect();
                (v["method"].as_str().unwrap().to_owned(), h)
            })
            .collect()
    }

    /// Whether the forbidden tool ever ran.
    fn ran_forbidden_tool(&self) -> bool {
        let mut p = self.log.clone().into_os_string();
        p.push(".ran");
        Path::new(&p).exists()
    }
}

async fn server(port: u16) -> TestServer {
    TestServer::builder()
        .config_toml(&config(port))
        .policy(POLICY)
        .start()
        .await
        .unwrap()
}

async fn post_form(c: &Client, pairs: &[(&str, &str)]) -> (u16, Value, http::HeaderMap) {
    let body = serde_urlencoded::to_string(pairs).unwrap().into_bytes();
    let r = c
        .raw(
            http::Method::POST,
            "/oauth/token",
            Some("application/x-www-form-urlencoded"),
            body,
        )
        .await
        .unwrap();
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status.as_u16(), v, r.headers)
}

/// A task for `workload` and an access token from it for `resource`.
async fn access_token(
    s: &TestServer,
    workload: &str,
    resource: &str,
    scope: Option<&str>,
) -> (keymint_proto::Task, String) {
    let t = crate::start_task(&s.admin(), workload).await;
    let (_, kmt) = crate::issue(&s.admin(), &t.id).await;
    let mut p = vec![
        ("grant_type", TE),
        ("subject_token", kmt.as_str()),
        ("subject_token_type", AT),
        ("resource", resource),
    ];
    if let Some(sc) = scope {
        p.push(("scope", sc));
    }
    let (st, v, _) = post_form(&s.anonymous(), &p).await;
    assert_eq!(st, 200, "{v}");
    (t, v["access_token"].as_str().unwrap().to_owned())
}

/// An Ed25519 DPoP key and the proofs it makes, dated by the server's clock.
struct DpopKey(ed25519_dalek::SigningKey, i64);

impl DpopKey {
    fn new(seed: u8, s: &TestServer) -> Self {
        Self(
            ed25519_dalek::SigningKey::from_bytes(&[seed; 32]),
            s.broker().now().unix_seconds(),
        )
    }

    fn proof(&self, htm: &str, htu: &str, token: Option<&str>, nonce: Option<&str>) -> String {
        let now = self.1;
        use ed25519_dalek::Signer as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": b64.encode(self.0.verifying_key().as_bytes())});
        let h = json!({"typ": "dpop+jwt", "alg": "EdDSA", "jwk": jwk});
        let mut jti = [0u8; 12];
        getrandom::fill(&mut jti).unwrap();
        let mut c = json!({"jti": b64.encode(jti), "htm": htm, "htu": htu, "iat": now});
        if let Some(t) = token {
            c["ath"] = json!(b64.encode(sha2::Sha256::digest(t.as_bytes())));
        }
        if let Some(n) = nonce {
            c["nonce"] = json!(n);
        }
        let input = format!(
            "{}.{}",
            b64.encode(h.to_string()),
            b64.encode(c.to_string())
        );
        let sig = self.0.sign(input.as_bytes());
        format!("{input}.{}", b64.encode(sig.to_bytes()))
    }
}

/// A DPoP-bound token for `resource`, bound to `key` (the nonce flow of
/// the token endpoint included).
async fn dpop_token(s: &TestServer, key: &DpopKey, workload: &str, resource: &str) -> String {
    let t = crate::start_task(&s.admin(), workload).await;
    let (_, kmt) = crate::issue(&s.admin(), &t.id).await;
    let url = format!("{}/oauth/token", s.url());
    let p = [
        ("grant_type", TE),
        ("subject_token", kmt.as_str()),
        ("subject_token_type", AT),
        ("resource", resource),
    ];
    let c = s
        .anonymous()
        .with_header("dpop", &key.proof("POST", &url, None, None))
        .unwrap();
    let (st, v, h) = post_form(&c, &p).await;
    assert_eq!((st, v["error"].as_str()), (400, Some("use_dpop_nonce")));
    let nonce = h["dpop-nonce"].to_str().unwrap().to_owned();
    let c = s
        .anonymous()
        .with_header("dpop", &key.proof("POST", &url, None, Some(&nonce)))
        .unwrap();
    let (st, v, _) = post_form(&c, &p).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["token_type"], "DPoP");
    v["access_token"].as_str().unwrap().to_owned()
}

const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"keymint-test","version":"0"}}}"#;

/// A POST to the MCP route with these headers.
async fn post(
    s: &TestServer,
    route: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> keymint_client::RawResponse {
    let mut c = s
        .anonymous()
        .with_header("accept", "application/json, text/event-stream")
        .unwrap();
    for (k, v) in headers {
        c = c.with_header(k, v).unwrap();
    }
    c.raw(
        http::Method::POST,
        route,
        Some("application/json"),
        body.as_bytes().to_vec(),
    )
    .await
    .unwrap()
}

fn challenges(r: &keymint_client::RawResponse) -> String {
    r.headers
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect::<Vec<_>>()
        .join(" | ")
}

async fn audit(s: &TestServer) -> Vec<Value> {
    s.admin()
        .get::<keymint_proto::List<Value>>("/v1/audit?limit=500")
        .await
        .unwrap()
        .items
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mcp_sdk_calls_a_tool_through_keymint_which_never_passes_the_agents_token() {
    if !python_has_mcp().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mcp = McpServer::start(dir.path()).await;
    let s = server(mcp.port).await;
    let (_, token) = access_token(&s, "agent-1", TOOLS, None).await;

    // No credential set yet for a `bearer` server: nothing is sent.
    let r = post(
        &s,
        "/mcp/tools",
        &[("authorization", &format!("Bearer {token}"))],
        INITIALIZE,
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(mcp.received().is_empty());

    // The admin seals keymint's own credential for the server.
    let mut upstream_cred = [0u8; 18];
    getrandom::fill(&mut upstream_cred).unwrap();
    let upstream_cred = format!(
        "upstream-test-{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(upstream_cred)
    );
    set_bearer(&s, &upstream_cred).await;
    // Not by a task token, not for an unknown or credential-less server.
    for (c, path, want) in [
        (s.client(&token), "/v1/mcp/tools/credential", 401),
        (s.admin(), "/v1/mcp/nope/credential", 404),
        (s.admin(), "/v1/mcp/files/credential", 404),
    ] {
        let r = c
            .raw(
                http::Method::POST,
                path,
                Some("application/json"),
                json!({ "token": "x" }).to_string().into_bytes(),
            )
            .await
            .unwrap();
        assert_eq!(r.status.as_u16(), want, "{path}: {}", r.text());
    }

    // The official SDK's streamable HTTP client, through keymint.
    let input = json!({
        "url": format!("{}/mcp/tools", s.url()),
        "token": token,
        "resources": ["notes://public/readme", "notes://secret/plan"],
        "prompts": ["summarize", "exfiltrate"],
    });
    let v = run_python(&script("client.py"), &input).await;
    assert_eq!(v["tools"], json!(["add", "delete_everything"]), "{v}");
    assert_eq!(v["add"]["is_error"], false, "{v}");
    assert_eq!(v["add"]["text"], json!(["42"]), "{v}");
    // Policy forbids `delete_everything`: a JSON-RPC error, the tool never ran.
    assert_eq!(v["forbidden"]["raised"], true, "{v}");
    assert!(
        v["forbidden"]["message"]
            .as_str()
            .unwrap()
            .contains("not permitted by policy"),
        "{v}"
    );
    assert!(!mcp.ran_forbidden_tool());
    // Resources and prompts are decided by policy too.
    let read = &v["read"];
    assert_eq!(read["notes://public/readme"]["raised"], false, "{v}");
    assert_eq!(
        read["notes://public/readme"]["text"],
        json!(["public notes"]),
        "{v}"
    );
    assert_eq!(read["notes://secret/plan"]["raised"], true, "{v}");
    assert!(
        read["notes://secret/plan"]["message"]
            .as_str()
            .unwrap()
            .contains("not permitted by policy"),
        "{v}"
    );
    assert_eq!(v["prompt"]["summarize"]["raised"], false, "{v}");
    assert_eq!(v["prompt"]["exfiltrate"]["raised"], true, "{v}");
    assert!(
        !mcp.ran_forbidden_tool(),
        "nothing forbidden ran or was read"
    );
    // The session id the SDK got is keymint's, bound to the task; the MCP
    // server saw its own.
    let sids = v["session_ids"].as_array().unwrap();
    assert_eq!(sids.len(), 1, "{v}");
    let sid = sids[0].as_str().unwrap().to_owned();
    assert!(sid.starts_with("kms1."), "{sid}");

    // What the MCP server received: keymint's credential, never the
    // agent's token, nor any header keymint does not pass.
    let got = mcp.received();
    assert!(got.len() >= 3, "{got:?}");
    for (method, headers) in &got {
        let text = format!("{headers:?}");
        assert!(!text.contains(&token), "{method}: the agent's token leaked");
        let auth: Vec<&String> = headers
            .iter()
            .filter(|(k, _)| k == "authorization")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(auth, [&format!("Bearer {upstream_cred}")], "{method}");
        assert!(!headers.iter().any(|(k, _)| k == "dpop"));
    }
    let upstream_sids: Vec<&String> = got
        .iter()
        .flat_map(|(_, h)| h.iter().filter(|(k, _)| k == "mcp-session-id"))
        .map(|(_, v)| v)
        .collect();
    assert!(!upstream_sids.is_empty(), "the session continues upstream");
    for u in &upstream_sids {
        assert!(sid.ends_with(&format!(".{u}")), "{sid} wraps {u}");
        assert!(!u.starts_with("kms1."), "the MCP server gets its own id");
    }

    // Another agent that stole the session id gets nowhere with the SDK.
    let before = mcp.received().len();
    let (_, thief) = access_token(&s, "agent-thief", TOOLS, None).await;
    let input =
        json!({ "url": format!("{}/mcp/tools", s.url()), "token": thief, "hijack_session": sid });
    let h = run_python(&script("client.py"), &input).await;
    assert_eq!(h["hijack"]["raised"], true, "{h}");
    assert!(
        h["hijack"]["message"]
            .as_str()
            .unwrap()
            .contains("no such session"),
        "{h}"
    );
    assert_eq!(
        mcp.received().len(),
        before,
        "nothing of the thief's reached the server"
    );

    // Each call is audited, allowed or denied, with the tool's name and
    // argument keys; never the argument values or a token.
    let events = audit(&s).await;
    let calls: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "mcp.tool_call")
        .collect();
    let find = |tool: &str| {
        calls
            .iter()
            .find(|e| e["data"]["tool"] == tool)
            .unwrap_or_else(|| panic!("no audit event for `{tool}`: {calls:?}"))
    };
    let add = find("add");
    assert_eq!(add["outcome"], "success", "{add}");
    assert_eq!(add["data"]["argument_keys"], json!(["a", "b"]));
    assert_eq!(add["workload"], "agent-1");
    let del = find("delete_everything");
    assert_eq!(del["outcome"], "denied", "{del}");
    assert_eq!(del["data"]["policies"], json!(["no-deleting"]), "{del}");
    let of = |kind: &str, key: &str, name: &str| {
        events
            .iter()
            .find(|e| e["kind"] == kind && e["data"][key] == name)
            .unwrap_or_else(|| panic!("no `{kind}` event for `{name}`"))
            .clone()
    };
    assert_eq!(
        of("mcp.resource_read", "uri", "notes://public/readme")["outcome"],
        "success"
    );
    let secret = of("mcp.resource_read", "uri", "notes://secret/plan");
    assert_eq!(secret["outcome"], "denied", "{secret}");
    assert_eq!(
        secret["data"]["policies"],
        json!(["no-secrets"]),
        "{secret}"
    );
    assert_eq!(
        of("mcp.prompt_get", "prompt", "summarize")["outcome"],
        "success"
    );
    let ex = of("mcp.prompt_get", "prompt", "exfiltrate");
    assert_eq!(ex["outcome"], "denied", "{ex}");
    assert_eq!(ex["data"]["argument_keys"], json!(["topic"]), "{ex}");
    let refused = of("mcp.session_refused", "server", "tools");
    assert_eq!(refused["workload"], "agent-thief", "{refused}");
    // Listing needs no decision: only the two calls are tool-call events.
    assert_eq!(calls.len(), 2, "{calls:?}");
    let text = serde_json::to_string(&events).unwrap();
    assert!(!text.contains(&token));
    assert!(!text.contains(&upstream_cred));
    assert!(text.contains("mcp.credential_set"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mcp_route_refuses_tokens_proofs_and_calls_it_must() {
    if !python_has_mcp().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mcp = McpServer::start(dir.path()).await;
    let s = server(mcp.port).await;

    // RFC 9728 metadata, at the path-inserted well-known URL.
    let meta: Value = s
        .anonymous()
        .get("/.well-known/oauth-protected-resource/mcp/tools")
        .await
        .unwrap();
    assert_eq!(meta["resource"], TOOLS);
    assert_eq!(meta["authorization_servers"], json!([s.url()]));
    assert_eq!(
        meta["scopes_supported"],
        json!(["tools:call", "tools:admin"])
    );
    assert_eq!(meta["bearer_methods_supported"], json!(["header"]));
    assert!(meta.get("dpop_bound_access_tokens_required").is_none());
    let fmeta: Value = s
        .anonymous()
        .get("/.well-known/oauth-protected-resource/mcp/files")
        .await
        .unwrap();
    assert_eq!(fmeta["resource"], FILES);
    assert_eq!(fmeta["dpop_bound_access_tokens_required"], true);
    // The authorization server it names has the token endpoint.
    let asm: Value = s
        .anonymous()
        .get("/.well-known/oauth-authorization-server")
        .await
        .unwrap();
    assert_eq!(asm["issuer"], meta["authorization_servers"][0]);

    // No token: 401 naming the metadata.
    let r = post(&s, "/mcp/tools", &[], INITIALIZE).await;
    assert_eq!(r.status, 401);
    let ch = challenges(&r);
    assert!(
        ch.contains(r#"Bearer resource_metadata="https://keymint.test/.well-known/oauth-protected-resource/mcp/tools""#),
        "{ch}"
    );
    assert!(ch.contains(r#"scope="tools:call""#), "{ch}");

    let (task, token) = access_token(&s, "agent-2", TOOLS, None).await;
    let (_, files_token) = access_token(&s, "agent-2", FILES, None).await;
    let (_, admin_only) = access_token(&s, "agent-2", TOOLS, Some("tools:admin")).await;
    let kmt = crate::issue(&s.admin(), &task.id).await.1;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    // The token with a changed claim under its old signature.
    let forged = {
        let p: Vec<&str> = token.split('.').collect();
        let mut c: Value = serde_json::from_slice(&b64.decode(p[1]).unwrap()).unwrap();
        c["exp"] = json!(c["exp"].as_i64().unwrap() + 3600);
        format!("{}.{}.{}", p[0], b64.encode(c.to_string()), p[2])
    };
    let refused = [
        ("another audience", format!("Bearer {files_token}")),
        ("a kmt_ task token", format!("Bearer {kmt}")),
        ("a forged claim", format!("Bearer {forged}")),
        ("junk", "Bearer not-a-token".to_owned()),
        ("an unbound token as DPoP", format!("DPoP {token}")),
        ("an unknown scheme", format!("Basic {token}")),
    ];
    for (what, auth) in &refused {
        let r = post(&s, "/mcp/tools", &[("authorization", auth)], INITIALIZE).await;
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        let ch = challenges(&r);
        assert!(ch.contains("resource_metadata="), "{what}: {ch}");
        assert!(!ch.contains(&token) && !r.text().contains(&token), "{what}");
    }
    // A valid token without the required scope: 403 insufficient_scope.
    let r = post(
        &s,
        "/mcp/tools",
        &[("authorization", &format!("Bearer {admin_only}"))],
        INITIALIZE,
    )
    .await;
    assert_eq!(r.status, 403);
    let ch = challenges(&r);
    assert!(ch.contains(r#"error="insufficient_scope""#), "{ch}");
    assert!(ch.contains(r#"scope="tools:call""#), "{ch}");
    assert!(
        mcp.received().is_empty(),
        "nothing refused reached the server"
    );

    // Set the credential; the right token passes (the positive control).
    set_bearer(&s, "upstream-test-credential").await;
    let bearer = format!("Bearer {token}");
    let auth = [("authorization", bearer.as_str())];
    let r = post(&s, "/mcp/tools", &auth, INITIALIZE).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("keymint-test-tools"), "{}", r.text());

    // A batch with one forbidden call is refused whole, each call answered.
    let batch = r#"[{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}},
                    {"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"delete_everything","arguments":{"confirm":true}}}]"#;
    let before = mcp.received().len();
    let r = post(&s, "/mcp/tools", &auth, batch).await;
    assert_eq!(r.status, 200);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
    for e in v.as_array().unwrap() {
        assert_eq!(e["error"]["code"], -32001, "{v}");
    }
    assert_eq!(
        mcp.received().len(),
        before,
        "nothing of the batch was sent"
    );
    assert!(!mcp.ran_forbidden_tool());
    let denied = audit(&s)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "mcp.tool_call" && e["outcome"] == "denied")
        .count();
    assert_eq!(denied, 1);

    // Malformed and oversized bodies, other methods.
    let r = post(&s, "/mcp/tools", &auth, "{not json").await;
    assert_eq!(r.status, 400);
    // A member named twice: decided on as one reading and passed on to a
    // server that may read the other (the forbidden tool behind an allowed
    // name, a method that skips the decision): refused, nothing sent.
    for twice in [
        r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"delete_everything","name":"add","arguments":{}}}"#,
        r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","method":"ping","params":{"name":"delete_everything"}}"#,
        r#"[{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"a":2}}}]"#,
    ] {
        let r = post(&s, "/mcp/tools", &auth, twice).await;
        assert_eq!(r.status, 400, "{twice}");
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["code"], -32600, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("twice"),
            "{v}"
        );
    }
    let r = post(
        &s,
        "/mcp/tools",
        &auth,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":[1,2]}}"#,
    )
    .await;
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"]["code"], -32602, "{v}");
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"x":"{}"}}}}"#,
        "a".repeat(8192)
    );
    let r = post(&s, "/mcp/tools", &auth, &big).await;
    assert_eq!(r.status, 413);
    let r = s
        .client(&token)
        .raw(http::Method::PUT, "/mcp/tools", None, vec![])
        .await
        .unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(mcp.received().len(), before, "none of these was sent");

    // DPoP: `files` takes bound tokens only.
    let r = post(
        &s,
        "/mcp/files",
        &[("authorization", &format!("Bearer {files_token}"))],
        INITIALIZE,
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(challenges(&r).contains("DPoP"), "{}", challenges(&r));
    let key = DpopKey::new(3, &s);
    let other = DpopKey::new(4, &s);
    let bound = dpop_token(&s, &key, "agent-3", FILES).await;
    let dpop_auth = format!("DPoP {bound}");
    let send = |proof: Option<String>, scheme: &'static str| {
        let (s, bound) = (&s, &bound);
        async move {
            let a = format!("{scheme} {bound}");
            let mut h = vec![("authorization", a.as_str())];
            let p = proof.unwrap_or_default();
            if !p.is_empty() {
                h.push(("dpop", p.as_str()));
            }
            post(s, "/mcp/files", &h, INITIALIZE).await
        }
    };
    // Without a nonce: told to use one.
    let r = send(Some(key.proof("POST", FILES, Some(&bound), None)), "DPoP").await;
    assert_eq!(r.status, 401);
    assert!(
        challenges(&r).contains("use_dpop_nonce"),
        "{}",
        challenges(&r)
    );
    let nonce = r.headers["dpop-nonce"].to_str().unwrap().to_owned();
    let good = |k: &DpopKey| k.proof("POST", FILES, Some(&bound), Some(&nonce));
    for (what, r) in [
        ("as a bearer token", send(Some(good(&key)), "Bearer").await),
        ("without a proof", send(None, "DPoP").await),
        (
            "with another key's proof",
            send(Some(good(&other)), "DPoP").await,
        ),
        (
            "with a proof for another token",
            send(
                Some(key.proof("POST", FILES, Some(&token), Some(&nonce))),
                "DPoP",
            )
            .await,
        ),
        (
            "with a proof for another URL",
            send(
                Some(key.proof("POST", TOOLS, Some(&bound), Some(&nonce))),
                "DPoP",
            )
            .await,
        ),
        (
            "with a proof for another method",
            send(
                Some(key.proof("GET", FILES, Some(&bound), Some(&nonce))),
                "DPoP",
            )
            .await,
        ),
    ] {
        assert_eq!(r.status, 401, "{what}: {}", r.text());
    }
    let proof = good(&key);
    let r = post(
        &s,
        "/mcp/files",
        &[("authorization", &dpop_auth), ("dpop", &proof)],
        INITIALIZE,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The same proof again: a replay.
    let r = post(
        &s,
        "/mcp/files",
        &[("authorization", &dpop_auth), ("dpop", &proof)],
        INITIALIZE,
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(
        challenges(&r).contains("invalid_dpop_proof"),
        "{}",
        challenges(&r)
    );

    // A token exchanged from a revoked token is refused with it, at once;
    // the token it was exchanged from is not touched.
    let from = |subject: String| {
        let s = &s;
        async move {
            let p = [
                ("grant_type", TE),
                ("subject_token", subject.as_str()),
                ("subject_token_type", AT),
                ("resource", TOOLS),
            ];
            let (st, v, _) = post_form(&s.anonymous(), &p).await;
            assert_eq!(st, 200, "{v}");
            v["access_token"].as_str().unwrap().to_owned()
        }
    };
    let derived = from(token.clone()).await;
    let child = from(derived.clone()).await;
    let child_auth = format!("Bearer {child}");
    let r = post(
        &s,
        "/mcp/tools",
        &[("authorization", &child_auth)],
        INITIALIZE,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s
        .anonymous()
        .raw(
            http::Method::POST,
            "/oauth/revoke",
            Some("application/x-www-form-urlencoded"),
            serde_urlencoded::to_string([("token", &derived)])
                .unwrap()
                .into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let r = post(
        &s,
        "/mcp/tools",
        &[("authorization", &child_auth)],
        INITIALIZE,
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(challenges(&r).contains("invalid_token"));

    // Ending the task ends its token at the route, at once.
    let r = post(&s, "/mcp/tools", &auth, INITIALIZE).await;
    assert_eq!(r.status, 200);
    let r = s
        .admin()
        .raw(
            http::Method::POST,
            &format!("/v1/tasks/{}/end", task.id),
            Some("application/json"),
            br#"{"status":"completed"}"#.to_vec(),
        )
        .await
        .unwrap();
    assert!(r.status.is_success(), "{}", r.text());
    let r = post(&s, "/mcp/tools", &auth, INITIALIZE).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(challenges(&r).contains("invalid_token"));

    // Nothing the agent sent as a credential ever reached the server.
    for (_, headers) in mcp.received() {
        let text = format!("{headers:?}");
        for t in [&token, &bound, &files_token, &admin_only] {
            assert!(!text.contains(t.as_str()));
        }
        assert!(!headers.iter().any(|(k, _)| k == "dpop"));
    }
}

/// Sets keymint's own credential for the `tools` MCP server (admin).
async fn set_bearer(s: &TestServer, credential: &str) {
    let r = s
        .admin()
        .raw(
            http::Method::POST,
            "/v1/mcp/tools/credential",
            Some("application/json"),
            json!({ "token": credential }).to_string().into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.text());
}

async fn end_task(s: &TestServer, id: &str) {
    let r = s
        .admin()
        .raw(
            http::Method::POST,
            &format!("/v1/tasks/{id}/end"),
            Some("application/json"),
            br#"{"status":"completed"}"#.to_vec(),
        )
        .await
        .unwrap();
    assert!(r.status.is_success(), "{}", r.text());
}

const LIST: &str = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_session_is_bound_to_the_task_that_opened_it() {
    if !python_has_mcp().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mcp = McpServer::start(dir.path()).await;
    let s = server(mcp.port).await;
    set_bearer(&s, "upstream-test-credential").await;
    let (task, token) = access_token(&s, "agent-s", TOOLS, None).await;
    let (_, same_workload) = access_token(&s, "agent-s", TOOLS, None).await;
    let (_, other_workload) = access_token(&s, "agent-o", TOOLS, None).await;
    let auth = |t: &str| format!("Bearer {t}");

    // The session keymint hands out wraps the MCP server's, bound to the task.
    let a = auth(&token);
    let r = post(&s, "/mcp/tools", &[("authorization", &a)], INITIALIZE).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let sid = r.headers["mcp-session-id"].to_str().unwrap().to_owned();
    let upstream_sid = sid.splitn(3, '.').nth(2).unwrap().to_owned();
    assert!(
        sid.starts_with("kms1.") && !upstream_sid.is_empty(),
        "{sid}"
    );
    let with = |t: &str, sid: &str| {
        vec![
            ("authorization".to_owned(), auth(t)),
            ("mcp-session-id".to_owned(), sid.to_owned()),
        ]
    };
    let send = |h: Vec<(String, String)>, body: &'static str| {
        let s = &s;
        async move {
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            post(s, "/mcp/tools", &h, body).await
        }
    };
    let r = send(
        with(&token, &sid),
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.text());
    // tools/list needs no decision: a valid token and its session suffice.
    let r = send(with(&token, &sid), LIST).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("delete_everything"), "{}", r.text());
    let sent = mcp.received().len();

    // Refused with 404 (the transport's unknown session), nothing sent.
    let mut tampered = sid.clone();
    let flip = if tampered.as_bytes()[5] == b'0' {
        "1"
    } else {
        "0"
    };
    tampered.replace_range(5..6, flip);
    let refusals = [
        ("the same workload's other task", with(&same_workload, &sid)),
        ("another workload", with(&other_workload, &sid)),
        ("a tampered tag", with(&token, &tampered)),
        ("the MCP server's raw id", with(&token, &upstream_sid)),
        ("an id keymint never made", with(&token, "kms1.00.x")),
    ];
    let n_refusals = refusals.len();
    for (what, h) in refusals {
        let r = send(h, LIST).await;
        assert_eq!(r.status, 404, "{what}: {}", r.text());
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["code"], -32002, "{what}: {v}");
        assert!(!r.text().contains(&upstream_sid), "{what}");
    }
    // A tools/call in a hijacked session is refused before policy.
    let call = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}"#;
    let r = send(with(&other_workload, &sid), call).await;
    assert_eq!(r.status, 404, "{}", r.text());
    // DELETE of another's session is refused too.
    let r = s
        .client(&other_workload)
        .with_header("mcp-session-id", &sid)
        .unwrap()
        .raw(http::Method::DELETE, "/mcp/tools", None, vec![])
        .await
        .unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(
        mcp.received().len(),
        sent,
        "nothing refused reached the server"
    );
    let refused = audit(&s)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "mcp.session_refused")
        .count();
    assert_eq!(refused, n_refusals + 2);
    assert!(
        !audit(&s).await.iter().any(|e| e["kind"] == "mcp.tool_call"),
        "a hijacked call is never decided"
    );

    // SEP-2243: headers that disagree with the body are refused, nothing sent.
    let call_add = r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}"#;
    for (k, v) in [
        ("mcp-method", "tools/list"),
        ("mcp-name", "delete_everything"),
    ] {
        let mut h = with(&token, &sid);
        h.push((k.to_owned(), v.to_owned()));
        let r = send(h, call_add).await;
        assert_eq!(r.status, 400, "{k}: {}", r.text());
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["code"], -32001, "{v}");
    }
    // A malformed resources/read, and a batch of 65: refused, nothing sent.
    let r = send(
        with(&token, &sid),
        r#"{"jsonrpc":"2.0","id":5,"method":"resources/read","params":{"uri":7}}"#,
    )
    .await;
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"]["code"], -32602, "{v}");
    let batch = format!("[{}]", vec![LIST; 65].join(","));
    let batch: &'static str = Box::leak(batch.into_boxed_str());
    let r = send(with(&token, &sid), batch).await;
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"]["code"], -32600, "{v}");
    assert_eq!(mcp.received().len(), sent, "none of these was sent");

    // The owner goes on; after its task ended, neither its token nor a
    // new task of the same workload continues the session.
    let r = send(with(&token, &sid), LIST).await;
    assert_eq!(r.status, 200, "{}", r.text());
    end_task(&s, &task.id).await;
    let r = send(with(&token, &sid), LIST).await;
    assert_eq!(r.status, 401, "{}", r.text());
    let (_, next) = access_token(&s, "agent-s", TOOLS, None).await;
    let r = send(with(&next, &sid), LIST).await;
    assert_eq!(r.status, 404, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchanged_upstream_token_is_keymint_signed_for_the_mcp_server_never_the_agents() {
    if !python_has_mcp().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mcp = McpServer::start(dir.path()).await;
    let s = server(mcp.port).await;
    let (task, token) = access_token(&s, "agent-x", EXCH, None).await;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let agent_exp = {
        let p: Vec<&str> = token.split('.').collect();
        let c: Value = serde_json::from_slice(&b64.decode(p[1]).unwrap()).unwrap();
        c["exp"].as_i64().unwrap()
    };

    // The SDK's client through the `exch` route: no credential to set.
    let input = json!({ "url": format!("{}/mcp/exch", s.url()), "token": token });
    let v = run_python(&script("client.py"), &input).await;
    assert_eq!(v["add"]["text"], json!(["42"]), "{v}");

    // Every request reached the MCP server with a keymint-minted token.
    let got = mcp.received();
    assert!(got.len() >= 3, "{got:?}");
    let mut minted = Vec::new();
    for (method, headers) in &got {
        let text = format!("{headers:?}");
        assert!(!text.contains(&token), "{method}: the agent's token leaked");
        assert!(!headers.iter().any(|(k, _)| k == "dpop"));
        let auth: Vec<&String> = headers
            .iter()
            .filter(|(k, _)| k == "authorization")
            .map(|(_, v)| v)
            .collect();
        let [one] = auth.as_slice() else {
            panic!("{method}: {auth:?}")
        };
        minted.push(one.strip_prefix("Bearer ").unwrap().to_owned());
    }
    // An MCP server that trusts keymint's JWKS validates them (PyJWT).
    let check = |aud: &str, tokens: &[String]| json!({ "issuer": s.url(), "audience": aud, "tokens": tokens });
    let out = run_python(&script("verify_token.py"), &check(EXCH_UPSTREAM, &minted)).await;
    let claims = out["claims"].as_array().unwrap_or_else(|| panic!("{out}"));
    assert_eq!(claims.len(), minted.len());
    for c in claims {
        assert_eq!(c["sub"], "agent-x", "{c}");
        assert_eq!(c["aud"], EXCH_UPSTREAM, "{c}");
        assert_eq!(c["act"], json!({ "sub": EXCH }), "{c}");
        assert_eq!(c["client_id"], EXCH, "{c}");
        assert_eq!(c["task_id"], json!(task.id), "{c}");
        assert_eq!(c["scope"], "exch:call", "{c}");
        let (exp, iat) = (c["exp"].as_i64().unwrap(), c["iat"].as_i64().unwrap());
        assert!(exp <= agent_exp && exp - iat <= 60, "{c}");
    }
    // Each request its own token.
    let mut jtis: Vec<&str> = claims.iter().map(|c| c["jti"].as_str().unwrap()).collect();
    jtis.sort_unstable();
    jtis.dedup();
    assert_eq!(jtis.len(), claims.len());
    // Not valid for keymint's own resource: the MCP server cannot replay it
    // at keymint (PyJWT refuses the audience; keymint's routes refuse it).
    let out = run_python(&script("verify_token.py"), &check(EXCH, &minted[..1])).await;
    assert!(
        out["error"]
            .as_str()
            .unwrap_or("")
            .contains("InvalidAudience"),
        "{out}"
    );
    for route in ["/mcp/exch", "/mcp/tools"] {
        let r = post(
            &s,
            route,
            &[("authorization", &format!("Bearer {}", minted[0]))],
            INITIALIZE,
        )
        .await;
        assert_eq!(r.status, 401, "{route}: {}", r.text());
    }
    // A token for another audience is refused at the route; after the
    // task ends, nothing more is minted.
    let (_, tools_token) = access_token(&s, "agent-x", TOOLS, None).await;
    let r = post(
        &s,
        "/mcp/exch",
        &[("authorization", &format!("Bearer {tools_token}"))],
        INITIALIZE,
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text());
    let before = mcp.received().len();
    end_task(&s, &task.id).await;
    let r = post(
        &s,
        "/mcp/exch",
        &[("authorization", &format!("Bearer {token}"))],
        INITIALIZE,
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(mcp.received().len(), before);
}

/// `add` with a `b` argument needs a human's approval.
const APPROVAL_POLICY: &str = r#"
@id("permit-all")
permit(principal, action, resource);

@id("adding-needs-a-human")
@approval("required")
permit(principal, action == Keymint::Action::"call_tool", resource)
when { context has mcp && context.mcp.tool == "add" };
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_tool_call_names_its_approval_and_goes_through_once_approved() {
    if !python_has_mcp().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mcp = McpServer::start(dir.path()).await;
    let ops = tempfile::tempdir().unwrap();
    let extra = format!(
        "\n[approvals]\nttl = \"10m\"\n[[operators]]\nname = \"alice\"\ntoken_file = {:?}\n",
        ops.path().join("alice.token").display().to_string()
    );
    let s = TestServer::builder()
        .config_toml(&format!("{}{extra}", config(mcp.port)))
        .policy(APPROVAL_POLICY)
        .start()
        .await
        .unwrap();
    let alice = std::fs::read_to_string(ops.path().join("alice.token"))
        .unwrap()
        .trim()
        .to_owned();
    set_bearer(&s, "upstream-test-credential").await;
    let (_, token) = access_token(&s, "agent-a", TOOLS, None).await;
    let sid = mcp_session(&s.client(&token), "/mcp/tools").await;
    let auth = format!("Bearer {token}");
    let h = [
        ("authorization", auth.as_str()),
        ("mcp-session-id", sid.as_str()),
    ];
    let call = r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}"#;
    let other = r#"{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"add","arguments":{"a":40,"b":2}}}"#;
    let sent = mcp.received().len();

    // Held: a JSON-RPC error naming the approval; nothing sent.
    let held = |r: &keymint_client::RawResponse| {
        assert_eq!(r.status, 200, "{}", r.text());
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["code"], -32003, "{v}");
        let apr = v["error"]["data"]["approval"].as_str().unwrap().to_owned();
        assert!(
            v["error"]["message"].as_str().unwrap().contains(&apr),
            "{v}"
        );
        apr
    };
    let apr = held(&post(&s, "/mcp/tools", &h, call).await);
    // The same call again while pending: the same approval, not another.
    assert_eq!(held(&post(&s, "/mcp/tools", &h, call).await), apr);
    assert_eq!(mcp.received().len(), sent, "nothing held was sent");
    // The generic redeem route cannot carry it out.
    let r = s
        .client(&token)
        .raw(
            http::Method::POST,
            &format!("/v1/approvals/{apr}/redeem"),
            Some("application/json"),
            b"{}".to_vec(),
        )
        .await
        .unwrap();
    assert!(!r.status.is_success(), "{}", r.text());
    // What the approver sees: the tool and argument keys, never values.
    let a: Value = s
        .client(&alice)
        .get(&format!("/v1/approvals/{apr}"))
        .await
        .unwrap();
    assert_eq!(a["action"], "call_tool", "{a}");
    assert_eq!(a["request"]["mcp"]["tool"], "add", "{a}");
    assert_eq!(
        a["request"]["mcp"]["argument_keys"],
        json!(["a", "b"]),
        "{a}"
    );
    let r = s
        .client(&alice)
        .raw(
            http::Method::POST,
            &format!("/v1/approvals/{apr}/approve"),
            Some("application/json"),
            b"{}".to_vec(),
        )
        .await
        .unwrap();
    assert!(r.status.is_success(), "{}", r.text());

    // Approved covers this call only: other argument values are held anew.
    let apr2 = held(&post(&s, "/mcp/tools", &h, other).await);
    assert_ne!(apr2, apr);
    // Another task's token with the same call: its own hold, not this approval.
    let (_, token2) = access_token(&s, "agent-a", TOOLS, None).await;
    let sid2 = mcp_session(&s.client(&token2), "/mcp/tools").await;
    let auth2 = format!("Bearer {token2}");
    let h2 = [
        ("authorization", auth2.as_str()),
        ("mcp-session-id", sid2.as_str()),
    ];
    assert_ne!(held(&post(&s, "/mcp/tools", &h2, call).await), apr);
    // The same call by the same token goes through, once.
    let r = post(&s, "/mcp/tools", &h, call).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("\"3\""), "{}", r.text());
    let again = held(&post(&s, "/mcp/tools", &h, call).await);
    assert_ne!(again, apr, "an approval is used once");

    let events = audit(&s).await;
    let calls: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "mcp.tool_call" && e["data"]["approval"] == apr)
        .collect();
    assert!(
        calls.iter().any(|e| e["data"]["decision"] == "approval"),
        "{calls:?}"
    );
    assert!(
        calls
            .iter()
            .any(|e| e["data"]["decision"] == "allow" && e["outcome"] == "success"),
        "{calls:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "approval.redeemed" && e["data"]["approval"] == apr)
    );
}

async fn run_python(script: &Path, input: &Value) -> Value {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        child.wait_with_output(),
    )
    .await
    .unwrap_or_else(|_| panic!("the MCP client did not finish in time"))
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// An MCP session on `c` at `path`: initialize, then `initialized`; the
/// session id to send with the calls.
async fn mcp_session(c: &Client, path: &str) -> String {
    let c = c
        .with_header("accept", "application/json, text/event-stream")
        .unwrap();
    let r = c
        .raw(
            http::Method::POST,
            path,
            Some("application/json"),
            INITIALIZE.as_bytes().to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let sid = r.headers["mcp-session-id"].to_str().unwrap().to_owned();
    let r = c
        .with_header("mcp-session-id", &sid)
        .unwrap()
        .raw(
            http::Method::POST,
            path,
            Some("application/json"),
            br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#.to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    sid
}

/// The MCP route's added latency: `tools/call` sent one after another to
/// the SDK's server directly and through keymint (token check, Cedar, an
/// audit event written, forwarding). A benchmark, not a test:
/// `cargo test -p keymint --test it -- --ignored --nocapture mcp::route_latency`
/// (`MCP_BENCH_N` calls each, 300 by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by hand, see docs/benchmarks.md"]
async fn route_latency() {
    if !python_has_mcp().await {
        return;
    }
    #[allow(
        clippy::disallowed_methods,
        reason = "a benchmark's size, read by hand"
    )]
    let n: usize = std::env::var("MCP_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let dir = tempfile::tempdir().unwrap();
    let mcp = McpServer::start(dir.path()).await;
    let s = server(mcp.port).await;
    set_bearer(&s, "upstream-bench-credential").await;
    let (_, token) = access_token(&s, "bench", TOOLS, None).await;
    let direct = Client::new(&format!("http://127.0.0.1:{}", mcp.port), None).unwrap();
    let via = s.client(&token);
    let call = br#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}"#;
    let mut results = Vec::new();
    for (name, c, path) in [("direct", &direct, "/mcp"), ("keymint", &via, "/mcp/tools")] {
        let sid = mcp_session(c, path).await;
        let c = c
            .with_header("accept", "application/json, text/event-stream")
            .unwrap()
            .with_header("mcp-session-id", &sid)
            .unwrap();
        let mut took = Vec::with_capacity(n);
        for i in 0..n + 20 {
            let t = std::time::Instant::now();
            let r = c
                .raw(
                    http::Method::POST,
                    path,
                    Some("application/json"),
                    call.to_vec(),
                )
                .await
                .unwrap();
            let d = t.elapsed();
            assert_eq!(r.status, 200, "{}", r.text());
            assert!(r.text().contains("\"3\""), "{}", r.text());
            if i >= 20 {
                took.push(d.as_micros());
            }
        }
        took.sort_unstable();
        let p = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
        println!(
            "mcp bench {name}: n={n} p50={}us p90={}us p99={}us",
            p(0.5),
            p(0.9),
            p(0.99)
        );
        results.push((p(0.5), p(0.99)));
    }
    println!(
        "mcp bench added by keymint: p50 +{}us p99 +{}us",
        results[1].0.saturating_sub(results[0].0),
        results[1].1.saturating_sub(results[0].1)
    );
}

/// What the MCP routes say outside their protocol has a body in the shape
/// of its neighbours: an unknown name's metadata is the API's `not_found`
/// problem (as is a name that is not UTF-8), the metadata's other methods
/// the API's `method_not_allowed`; a configured server's other methods,
/// and an unreadable name on the route, a JSON-RPC error as an unknown
/// server's is. No MCP server needs to run: nothing here reaches one.
#[tokio::test]
async fn the_mcp_routes_answer_unknown_names_and_methods_with_a_body() {
    let s = server(9).await;
    let anon = s.anonymous();
    for (method, path, status, code) in [
        (
            http::Method::GET,
            "/.well-known/oauth-protected-resource/mcp/nope",
            404,
            "not_found",
        ),
        (
            http::Method::GET,
            "/.well-known/oauth-protected-resource/mcp/%ff",
            404,
            "not_found",
        ),
        (
            http::Method::POST,
            "/.well-known/oauth-protected-resource/mcp/tools",
            405,
            "method_not_allowed",
        ),
    ] {
        let r = anon.raw(method.clone(), path, None, vec![]).await.unwrap();
        assert_eq!(r.status, status, "{method} {path}");
        assert_eq!(
            r.headers.get("content-type").unwrap(),
            "application/problem+json",
            "{method} {path}"
        );
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["code"], code, "{method} {path}: {v}");
        if status == 405 {
            assert!(r.headers.get("allow").is_some(), "{method} {path}");
        }
    }
    for (method, path, status, code) in [
        (http::Method::PUT, "/mcp/tools", 405, -32600),
        (http::Method::PATCH, "/mcp/files", 405, -32600),
        (http::Method::POST, "/mcp/%ff", 404, -32004),
        (http::Method::POST, "/mcp/nope", 404, -32004),
    ] {
        let r = anon.raw(method.clone(), path, None, vec![]).await.unwrap();
        assert_eq!(r.status, status, "{method} {path}");
        assert_eq!(
            r.headers.get("content-type").unwrap(),
            "application/json",
            "{method} {path}"
        );
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["jsonrpc"], "2.0", "{method} {path}: {v}");
        assert_eq!(v["error"]["code"], code, "{method} {path}: {v}");
        if status == 405 {
            assert_eq!(
                r.headers.get("allow").unwrap(),
                "GET, POST, DELETE",
                "{method} {path}"
            );
        }
    }
}

/// A client of the MCP route with `token`, the transport's `Accept` and
/// `coding` as the body's `Content-Encoding`.
fn coded_client(s: &TestServer, token: &str, coding: &str) -> Client {
    s.anonymous()
        .with_header("authorization", &format!("Bearer {token}"))
        .unwrap()
        .with_header("accept", "application/json, text/event-stream")
        .unwrap()
        .with_header("content-encoding", coding)
        .unwrap()
}

/// A compressed body is refused unread, as on the proxy's routes
/// (docs/design/0019): 415 with a JSON-RPC error, audited `mcp.denied`
/// with `check = "encoding"`, nothing decided. keymint decides on the bytes
/// it reads and does not decode them. Before, the body was read and
/// refused as not JSON (400). `identity` is no coding: such a request goes
/// on (here to no MCP server: 502).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_body_is_refused_unread() {
    use std::io::Write as _;
    let s = server(9).await;
    let (_, token) = access_token(&s, "agent-z", TOOLS, None).await;
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "delete_everything", "arguments": {}}})
    .to_string();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(call.as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    let send = |coding: &'static str, body: Vec<u8>| {
        let c = coded_client(&s, &token, coding);
        async move {
            c.raw(
                http::Method::POST,
                "/mcp/tools",
                Some("application/json"),
                body,
            )
            .await
            .unwrap()
        }
    };
    for coding in ["gzip", "br", "deflate", "GZIP", "identity, gzip"] {
        let r = send(coding, gz.clone()).await;
        assert_eq!(r.status, 415, "{coding}: {}", r.text());
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["jsonrpc"], "2.0", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Content-Encoding"),
            "{v}"
        );
    }
    let events = audit(&s).await;
    let denied: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "mcp.denied")
        .collect();
    assert_eq!(denied.len(), 5, "{denied:?}");
    for e in &denied {
        assert_eq!(e["data"]["check"], "encoding", "{e}");
        assert_eq!(e["data"]["server"], "tools", "{e}");
    }
    assert!(
        !events.iter().any(|e| e["kind"] == "mcp.tool_call"),
        "nothing was decided"
    );
    let r = send("identity", INITIALIZE.as_bytes().to_vec()).await;
    assert_eq!(r.status, 502, "{}", r.text());
}

/// A token holder sending refused requests again and again (here a
/// compressed body) is refused every time but cannot grow the audit trail
/// without bound: `mcp.denied` one by one up to the broker's burst, then
/// one `mcp.refused.suppressed` summary by check when the window closes,
/// as the proxy's refusals are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_mcp_requests_is_audited_within_a_bound() {
    let clock =
        keymint_core::ManualClock::new(keymint_core::Timestamp::from_millis(1_800_000_000_000));
    let s = TestServer::builder()
        .clock(clock.clone())
        .config_toml(&config(9))
        .policy(POLICY)
        .start()
        .await
        .unwrap();
    let (_, token) = access_token(&s, "agent-z", TOOLS, None).await;
    let c = coded_client(&s, &token, "gzip");
    let burst = keymint_server::broker::AUTH_AUDIT_BURST as usize;
    const N: usize = 130;
    for _ in 0..N {
        let r = c
            .raw(
                http::Method::POST,
                "/mcp/tools",
                Some("application/json"),
                b"\x1f\x8b".to_vec(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 415, "{}", r.text());
    }
    let of = |events: &[Value], kind: &str| -> Vec<Value> {
        events
            .iter()
            .filter(|e| e["kind"] == kind)
            .cloned()
            .collect()
    };
    let events = audit(&s).await;
    assert_eq!(of(&events, "mcp.denied").len(), burst);
    assert!(of(&events, "mcp.refused.suppressed").is_empty());

    clock.advance_secs(11);
    let t0 = std::time::Instant::now();
    let summary = loop {
        if let Some(e) = of(&audit(&s).await, "mcp.refused.suppressed").pop() {
            break e;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "no summary"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(summary["data"]["count"], (N - burst) as u64, "{summary}");
    assert_eq!(summary["data"]["by_check"]["encoding"], (N - burst) as u64);
    assert_eq!(of(&audit(&s).await, "mcp.denied").len(), burst);
}

/// A stream the route opened for a token ends once the token is refused:
/// the MCP server's GET stream (server requests, notifications) and a
/// streamed answer are cut when the token's task ends, as the next request
/// would be refused. They used to run on for as long as the MCP server
/// kept them open, so an agent whose task had ended (or was revoked or
/// suspended) went on receiving what the MCP server sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_ends_when_its_token_is_refused() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    if !python_has_mcp().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mcp = McpServer::start(dir.path()).await;
    let s = server(mcp.port).await;
    set_bearer(&s, "upstream-test-credential").await;
    let (task, token) = access_token(&s, "agent-g", TOOLS, None).await;
    let sid = mcp_session(&s.client(&token), "/mcp/tools").await;

    // The GET stream, over a plain connection so it can be read as it comes.
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "GET /mcp/tools HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {token}\r\n\
         accept: text/event-stream\r\nmcp-session-id: {sid}\r\n\
         mcp-protocol-version: 2025-06-18\r\n\r\n",
        s.addr
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(30), tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the stream closed before its head");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("text/event-stream"), "{text}");

    end_task(&s, &task.id).await;
    // The stream ends (the last chunk, or the connection closed) well
    // within the deadline; before, it was still open after it.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let n = tcp.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            got.extend_from_slice(&buf[..n]);
            if got.ends_with(b"0\r\n\r\n") {
                return;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream outlived its token's task");
}
