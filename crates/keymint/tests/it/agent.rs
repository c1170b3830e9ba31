//! `keymint agent` (the real binary) and `keymint run` through it: the
//! command gets its credential because `keymint` is what the node's entry
//! names (this uid, this executable's SHA-256), with no token at all.

use std::os::unix::fs::MetadataExt;
use std::process::Stdio;
use std::time::Duration;

use keymint_proto::Task;
use keymint_testkit::TestServer;
use serde_json::json;
use sha2::Digest;

const BIN: &str = env!("CARGO_BIN_EXE_keymint");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keymint_run_gets_its_credential_through_the_agent() {
    // A role of the egress proxy too: through the agent, the command gets
    // what the OpenAI SDK reads.
    let s = TestServer::builder()
        .config_toml(
            "[[upstreams]]\nname = \"openai\"\nkind = \"openai\"\n\
             base_url = \"http://127.0.0.1:9/v1\"\n\
             [[roles]]\nname = \"gpt\"\nengine = \"token\"\nupstream = \"openai\"\n\
             scopes = [\"llm:chat\"]\ndefault_ttl = \"15m\"\nmax_ttl = \"1h\"\n\
             [roles.proxy]\nmodels = [\"gpt-4o-mini\"]\nendpoints = [\"chat.completions\"]\n\
             [issuer]\nalgorithms = [\"ES256\"]\n\
             [[roles]]\nname = \"tools\"\nengine = \"jwt\"\nscopes = [\"tools:read\"]\n\
             default_ttl = \"5m\"\nmax_ttl = \"30m\"\n\
             [roles.jwt]\naudience = \"https://mcp.example/tools\"\n",
        )
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run/agent.sock");
    let uid = std::fs::metadata(dir.path()).unwrap().uid();
    let hash = hex::encode(sha2::Sha256::digest(std::fs::read(BIN).unwrap()));
    let _: serde_json::Value = s
        .admin()
        .post(
            "/v1/entries",
            &json!({"workload": "runner", "node": "dev",
                    "selectors": {"uid": uid, "exe_sha256": hash}}),
        )
        .await
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut agent = tokio::process::Command::new(BIN)
        .arg("agent")
        .args(["--server", &s.url(), "--token-file"])
        .arg(s.data_dir().join("node-dev.token"))
        .arg("--socket")
        .arg(&sock)
        .arg("--deliver-dir")
        .arg(dir.path().join("deliver"))
        .args([
            "--health",
            &format!("127.0.0.1:{port}"),
            "--sync-interval",
            "1",
        ])
        .env_remove("KEYMINT_TOKEN")
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let health = keymint_client::Client::new(&format!("http://127.0.0.1:{port}"), None).unwrap();
    let mut ready = false;
    for _ in 0..300 {
        if let Ok(r) = health
            .raw(http::Method::GET, "/ready", None, Vec::new())
            .await
            && r.status == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the agent became ready");
    let mode = std::fs::metadata(&sock).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600, "owner-only socket");

    // No token, and a server address that goes nowhere: only the agent
    // can have provided the credential.
    let sock2 = sock.clone();
    let run = move |args: &[&str], via_env: bool| {
        let mut c = std::process::Command::new(BIN);
        c.arg("run");
        if via_env {
            c.env("KEYMINT_AGENT_SOCKET", &sock2);
        } else {
            c.arg("--agent").arg(&sock2);
        }
        c.args(args)
            .env_remove("KEYMINT_TOKEN")
            .env("KEYMINT_ADDR", "http://127.0.0.1:1")
            .output()
            .unwrap()
    };
    let out = tokio::task::spawn_blocking(move || {
        let ok = run(
            &[
                "--role",
                "demo",
                "--ttl",
                "2m",
                "--",
                "sh",
                "-c",
                "echo \"$KEYMINT_TOKEN $KEYMINT_TASK_ID\"",
            ],
            false,
        );
        let failed = run(&["--role", "demo", "--", "sh", "-c", "exit 3"], true);
        let sdk = run(
            &[
                "--role",
                "gpt",
                "--",
                "sh",
                "-c",
                "echo \"$OPENAI_API_KEY $OPENAI_BASE_URL\"",
            ],
            true,
        );
        (ok, failed, sdk)
    })
    .await
    .unwrap();
    let (ok, failed, sdk) = out;
    assert!(
        sdk.status.success(),
        "{}",
        String::from_utf8_lossy(&sdk.stderr)
    );
    let line = String::from_utf8_lossy(&sdk.stdout);
    let (key, base) = line.trim().split_once(' ').unwrap();
    assert!(key.starts_with("kmt_"), "{line}");
    assert_eq!(base, format!("{}/proxy/openai", s.url()));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let stdout = String::from_utf8_lossy(&ok.stdout);
    let (token, task) = stdout.trim().split_once(' ').unwrap();
    assert!(token.starts_with("kmt_"), "{stdout}");
    let t: Task = s.admin().get(&format!("/v1/tasks/{task}")).await.unwrap();
    assert_eq!(t.workload, "runner", "the entry's workload");
    assert_eq!(t.status.as_str(), "completed");
    let i = crate::introspect(&s.admin(), token).await;
    assert!(!i.active, "revoked when the command exited");

    assert_eq!(
        failed.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&failed.stderr)
    );
    let tasks: keymint_proto::List<Task> = s.admin().get("/v1/tasks").await.unwrap();
    assert_eq!(tasks.items.len(), 3);
    assert!(
        tasks.items.iter().any(|t| t.status.as_str() == "failed"),
        "the failed command's task failed"
    );

    // `--resource` through the agent: the agent's task token exchanged at
    // the server's token endpoint (the only thing KEYMINT_ADDR is for).
    let (sock3, url) = (sock.clone(), s.url());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .arg("run")
            .arg("--agent")
            .arg(&sock3)
            .args([
                "--role",
                "demo",
                "--resource",
                "https://mcp.example/tools",
                "--",
                "sh",
                "-c",
                "echo \"$KEYMINT_ACCESS_TOKEN $KEYMINT_ACCESS_TOKEN_RESOURCE\"",
            ])
            .env_remove("KEYMINT_TOKEN")
            .env("KEYMINT_ADDR", url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let (at, res) = line.trim().split_once(' ').unwrap();
    assert_eq!(res, "https://mcp.example/tools");
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(&b64, at.split('.').nth(1).unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(
        claims["sub"], "runner",
        "the agent's entry decides the workload"
    );
    assert_eq!(claims["aud"], "https://mcp.example/tools");
    assert!(
        !crate::introspect(&s.admin(), at).await.active,
        "ended with the command's task"
    );
    agent.start_kill().unwrap();
    let _ = agent.wait().await;
}
