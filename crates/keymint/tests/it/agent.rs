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
use tokio::io::AsyncBufReadExt;

const BIN: &str = env!("CARGO_BIN_EXE_keymint");

/// The real `keymint agent` of node `dev`, socket `DIR/run/agent.sock`,
/// delivering under `DIR/deliver`, once it is ready.
async fn start_agent(s: &TestServer, dir: &std::path::Path) -> tokio::process::Child {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let agent = tokio::process::Command::new(BIN)
        .arg("agent")
        .args(["--server", &s.url(), "--token-file"])
        .arg(s.data_dir().join("node-dev.token"))
        .arg("--socket")
        .arg(dir.join("run/agent.sock"))
        .arg("--deliver-dir")
        .arg(dir.join("deliver"))
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
    agent
}

/// An entry for `keymint` itself, run by this uid, as workload `runner`.
async fn runner_entry(s: &TestServer, dir: &std::path::Path) {
    let uid = std::fs::metadata(dir).unwrap().uid();
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
}

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
    runner_entry(&s, dir.path()).await;
    let mut agent = start_agent(&s, dir.path()).await;
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

/// The agent restarts (an upgrade: SIGTERM, a new agent on the same
/// socket) while `keymint run`'s command runs. The restart ends no task,
/// and the new agent does not know it; `keymint run` attaches it again, so
/// the task still ends with the command (completed), and still ends when
/// `keymint run` is killed with SIGKILL. Before, the first run exited 2
/// ("could not be ended") and both tasks stayed active to their TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keymint_run_keeps_its_task_through_an_agent_restart() {
    let s = TestServer::builder().start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run/agent.sock");
    runner_entry(&s, dir.path()).await;
    let mut agent = start_agent(&s, dir.path()).await;
    // The command writes its task id, then waits until `go` exists.
    let run = |name: &str, extra: &[&str]| {
        let (id, go) = (dir.path().join(format!("{name}.id")), dir.path().join(name));
        let child = tokio::process::Command::new(BIN)
            .arg("run")
            .arg("--agent")
            .arg(&sock)
            .args(["--role", "demo", "--ttl", "10m"])
            .args(extra)
            .args(["--", "sh", "-c"])
            .arg(format!(
                "echo \"$KEYMINT_TASK_ID\" > {id}.tmp && mv {id}.tmp {id}; \
                 while [ ! -e {go} ]; do sleep 0.05; done",
                id = id.display(),
                go = go.display()
            ))
            .env_remove("KEYMINT_TOKEN")
            .env("KEYMINT_ADDR", "http://127.0.0.1:1")
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        (child, id, go)
    };
    let task_id = async |id: &std::path::Path| {
        for _ in 0..300 {
            if let Ok(t) = std::fs::read_to_string(id) {
                return t.trim().to_owned();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the command did not start");
    };
    let status = async |task: &str| {
        let t: Task = s.admin().get(&format!("/v1/tasks/{task}")).await.unwrap();
        t.status.as_str().to_owned()
    };
    let (done, done_id, done_go) = run("done", &[]);
    let (killed, killed_id, _) = run("killed", &[]);
    let (done_task, killed_task) = (task_id(&done_id).await, task_id(&killed_id).await);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(agent.id().unwrap()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = agent.wait().await;
    assert_eq!(status(&done_task).await, "active", "a restart ends no task");
    let mut agent = start_agent(&s, dir.path()).await;

    // The command exits: its task completes.
    std::fs::write(&done_go, "").unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), done.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status(&done_task).await, "completed");

    // SIGKILL, once `keymint run` says it attached the task to the new
    // agent: the new agent ends the task of the dead `keymint run`.
    let mut killed = killed;
    let mut err = tokio::io::BufReader::new(killed.stderr.take().unwrap()).lines();
    let attached = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(l) = err.next_line().await.unwrap() {
            if l.contains("attached to the keymint agent again") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        attached.ok(),
        Some(true),
        "`keymint run` attached its task again"
    );
    killed.start_kill().unwrap();
    let _ = killed.wait().await;
    let mut ended = false;
    for _ in 0..200 {
        if status(&killed_task).await != "active" {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        ended,
        "the task of a killed `keymint run` ends after an agent restart"
    );
    assert_eq!(status(&killed_task).await, "failed");

    // The agent and `keymint run` both killed (SIGKILL): nothing is left
    // to end the task, and it ends at its idle timeout, which the agent
    // heartbeated while `keymint run` was connected.
    let (mut both, both_id, _) = run("both", &["--idle-timeout", "2s"]);
    let both_task = task_id(&both_id).await;
    let mut lasted = false;
    for _ in 0..200 {
        let t: Task = s
            .admin()
            .get(&format!("/v1/tasks/{both_task}"))
            .await
            .unwrap();
        assert_eq!(t.status.as_str(), "active");
        if t.created_at.until(t.last_seen_at) >= 3_000 {
            lasted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(lasted, "heartbeated past its idle timeout while connected");
    agent.start_kill().unwrap();
    let _ = agent.wait().await;
    both.start_kill().unwrap();
    let _ = both.wait().await;
    let mut ended = false;
    for _ in 0..200 {
        if status(&both_task).await != "active" {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ended, "ended at its idle timeout, not at its TTL");
    assert_eq!(status(&both_task).await, "timed_out");
}
