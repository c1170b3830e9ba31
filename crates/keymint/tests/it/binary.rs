//! The real `keymint` binary: the CLI, kill -9 in the middle of issuing,
//! and the audit file check.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keymint_client::Client;
use keymint_core::audit::{AuditEvent, ChainReport};
use keymint_proto::{IssueLease, IssuedLease, Lease, StartTask, Task};
use sha2::Digest;

use crate::introspect;

const BIN: &str = env!("CARGO_BIN_EXE_keymint");

pub fn verify_file(path: &Path) -> ChainReport {
    let text = std::fs::read_to_string(path).unwrap();
    keymint_core::audit::verify(
        text.lines()
            .map(|l| serde_json::from_str::<AuditEvent>(l).map_err(|e| e.to_string())),
    )
}

struct Dev {
    child: tokio::process::Child,
    addr: String,
    token: String,
}

/// Polls `/v1/health` until it answers, for at most 30 s.
async fn wait_healthy(addr: &str) -> Client {
    let probe = Client::new(addr, None).unwrap();
    let t0 = Instant::now();
    while probe
        .get::<keymint_proto::Health>("/v1/health")
        .await
        .is_err()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "keymint at {addr} did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    probe
}

/// `keymint dev` on a port the system chooses (`--listen 127.0.0.1:0`):
/// no other process can take the port between a test's choice and the
/// server's bind. The address is read from the line the server prints.
async fn start_dev(dir: &Path) -> Dev {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(["dev", "--data-dir"])
        .arg(dir)
        .args(["--listen", "127.0.0.1:0"]);
    let (child, addr) = crate::spawn_listening(cmd).await;
    wait_healthy(&addr).await;
    let token = std::fs::read_to_string(dir.join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    Dev { child, addr, token }
}

fn cli(dev: &Dev, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("KEYMINT_ADDR", format!("http://{}", dev.addr))
        .env("KEYMINT_TOKEN", &dev.token)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `keymint entry` against `keymint dev`, which configures the node `dev`
/// with its token in the data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_registration_entries() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path()).await;
    let node_token = dir.path().join("node-dev.token");
    let mode = std::fs::metadata(&node_token).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the node token is private");
    // `--exe` hashes the file: here, the keymint binary itself.
    let (code, id, err) = cli(
        &dev,
        &[
            "entry",
            "create",
            "--workload",
            "triage",
            "--node",
            "dev",
            "--uid",
            "1000",
            "--exe",
            BIN,
            "--attribute",
            "team=support",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_owned();
    assert!(id.starts_with("ent_"), "{id}");
    let (code, out, _) = cli(&dev, &["entry", "list", "-o", "json"]);
    assert_eq!(code, 0);
    let items: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let want = hex::encode(sha2::Sha256::digest(std::fs::read(BIN).unwrap()));
    assert_eq!(items[0]["selectors"]["exe_sha256"], want);
    assert_eq!(items[0]["attributes"]["team"], "support");
    // The node lists its own entries with its token.
    let (code, out, err) = cli(
        &dev,
        &[
            "entry",
            "list",
            "--token-file",
            node_token.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&id) && out.contains("uid=1000"), "{out}");
    // Bad input: a clear message and a non-zero exit; nothing created.
    for (extra, why) in [
        (&["--node", "dev"][..], "at least one selector"),
        (
            &["--node", "elsewhere", "--uid", "5"][..],
            "names no configured node",
        ),
        (
            &["--node", "dev", "--exe", "/nonexistent/bin"][..],
            "cannot open",
        ),
    ] {
        let mut args = vec!["entry", "create", "--workload", "x"];
        args.extend_from_slice(extra);
        let (code, _, err) = cli(&dev, &args);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
    let (code, out, err) = cli(&dev, &["entry", "delete", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deleted"), "{out}");
    let (code, _, err) = cli(&dev, &["entry", "delete", &id]);
    assert_ne!(code, 0);
    assert!(err.contains("not found"), "{err}");
    let (_, out, _) = cli(&dev, &["entry", "list", "-o", "json"]);
    assert_eq!(out.trim(), "[]");
    // Its reader gone before it writes (`keymint … | head`): it ends
    // quietly with SIGPIPE's status, no panic on standard error.
    let mut child = Command::new(BIN)
        .args(["entry", "list", "-o", "json"])
        .env("KEYMINT_ADDR", format!("http://{}", dev.addr))
        .env("KEYMINT_TOKEN", &dev.token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(141), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_a_task_from_start_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path()).await;
    // Started on port 0: the issuer names the port it is bound to, where
    // clients that verify its tokens can fetch its keys.
    let disco: serde_json::Value = Client::new(&dev.addr, None)
        .unwrap()
        .get("/.well-known/openid-configuration")
        .await
        .unwrap();
    assert_eq!(disco["issuer"], format!("http://{}", dev.addr));
    assert_eq!(
        disco["jwks_uri"],
        format!("http://{}/.well-known/jwks.json", dev.addr)
    );
    let (code, out, err) = cli(
        &dev,
        &[
            "task",
            "start",
            "--role",
            "demo",
            "--workload",
            "cli-agent",
            "--ttl",
            "10m",
            "--scope",
            "llm:chat",
            "--issue",
            "-o",
            "json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let task = v["task"]["id"].as_str().unwrap().to_owned();
    let token = v["credential"]["token"].as_str().unwrap().to_owned();
    assert_eq!(v["lease"]["scopes"], serde_json::json!(["llm:chat"]));

    let (code, out, _) = cli(&dev, &["task", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("ID") && out.contains(&task) && out.contains("cli-agent"),
        "{out}"
    );
    let (code, out, _) = cli(&dev, &["lease", "list", "--task", &task, "-o", "json"]);
    assert_eq!(code, 0);
    let leases: Vec<Lease> = serde_json::from_str(&out).unwrap();
    assert_eq!(leases.len(), 1);

    let (code, _, err) = cli(
        &dev,
        &[
            "task",
            "start",
            "--role",
            "demo",
            "--workload",
            "x",
            "--ttl",
            "100d",
        ],
    );
    assert_eq!(code, 2);
    assert!(err.contains("ttl_exceeds_limit"), "{err}");
    let (code, _, err) = cli(
        &dev,
        &[
            "task",
            "start",
            "--role",
            "demo",
            "--workload",
            "x",
            "--ttl",
            "soon",
        ],
    );
    assert_eq!(code, 2);
    assert!(err.contains("invalid duration"), "{err}");

    // The sample policy `keymint dev` wrote holds a deletion in prod for a
    // human: exit 3, the approval's id, then approve and redeem it.
    assert!(dir.path().join("policies/sample.cedar").exists());
    let (code, _, err) = cli(
        &dev,
        &[
            "task",
            "start",
            "--role",
            "demo",
            "--workload",
            "x",
            "--env",
            "prod",
            "--intent",
            "delete stale tickets",
        ],
    );
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("held for human approval as apr_"), "{err}");
    let apr = err
        .split_whitespace()
        .find(|w| w.starts_with("apr_"))
        .unwrap()
        .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned();
    let approver = dir.path().join("approver.token");
    let approver = approver.to_str().unwrap();
    let (code, out, err) = cli(&dev, &["approval", "list", "--token-file", approver]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&apr) && out.contains("pending"), "{out}");
    // The admin token cannot approve: approvals need a named operator.
    let (code, _, err) = cli(&dev, &["approval", "approve", &apr]);
    assert_eq!(code, 2);
    assert!(err.contains("operator"), "{err}");
    let (code, out, err) = cli(
        &dev,
        &[
            "approval",
            "approve",
            &apr,
            "--note",
            "ok, ticket 42",
            "--token-file",
            approver,
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("approved"), "{out}");
    let (code, out, err) = cli(&dev, &["approval", "redeem", &apr, "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let t: Task = serde_json::from_str(&out).unwrap();
    assert_eq!(t.environment.as_deref(), Some("prod"));
    let (code, _, err) = cli(&dev, &["approval", "redeem", &apr]);
    assert_eq!(code, 2, "redeemed once only");
    assert!(err.contains("used"), "{err}");
    let (code, out, _) = cli(&dev, &["policy", "show"]);
    assert_eq!(code, 0);
    assert!(out.contains("demo-role"), "{out}");

    let (code, out, _) = cli(&dev, &["task", "end", &task, "--failed", "-o", "json"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Task>(&out).unwrap().status,
        keymint_proto::TaskStatus::Failed
    );
    let admin = Client::new(&dev.addr, Some(dev.token.clone())).unwrap();
    assert!(!introspect(&admin, &token).await.active);
    // The first end stands: the same end again changes nothing and says
    // so; another status, or a revocation, is refused and exits non-zero.
    let (code, out, err) = cli(&dev, &["task", "end", &task, "--failed", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Task>(&out).unwrap().status,
        keymint_proto::TaskStatus::Failed
    );
    assert!(
        err.contains("had already ended as `failed`; nothing changed"),
        "{err}"
    );
    for args in [
        vec!["task", "end", task.as_str()],
        vec!["task", "revoke", task.as_str()],
    ] {
        let (code, out, err) = cli(&dev, &args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert!(err.contains("already ended as `failed`"), "{args:?}: {err}");
    }
    let (_, out, _) = cli(&dev, &["task", "show", &task, "-o", "json"]);
    assert_eq!(
        serde_json::from_str::<Task>(&out).unwrap().status,
        keymint_proto::TaskStatus::Failed
    );

    let (code, out, _) = cli(&dev, &["audit", "tail", "-n", "50"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("task.ended") && out.contains("lease.revoked"),
        "{out}"
    );
    let (code, out, _) = cli(&dev, &["audit", "verify"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("intact"), "{out}");
    // The head it printed, recorded apart, is reached; a later one or
    // another hash is not.
    let words: Vec<&str> = out.split_whitespace().collect();
    let at = |w: &str| words[words.iter().position(|x| *x == w).unwrap() + 1];
    let (seq, hash) = (at("seq").parse::<u64>().unwrap(), at("hash"));
    let (code, out, _) = cli(
        &dev,
        &["audit", "verify", "--expect-head", &format!("{seq}:{hash}")],
    );
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = cli(
        &dev,
        &[
            "audit",
            "verify",
            "--expect-head",
            &format!("{}:{hash}", seq + 1000),
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("before the recorded head"), "{out}");
    let (code, out, _) = cli(
        &dev,
        &[
            "audit",
            "verify",
            "--expect-head",
            &format!("{seq}:{}", "0".repeat(64)),
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not the recorded head"), "{out}");

    // Without a token the CLI says what is missing.
    let out = Command::new(BIN)
        .args(["task", "list"])
        .env("KEYMINT_ADDR", format!("http://{}", dev.addr))
        .env_remove("KEYMINT_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Authorization"));
}

#[test]
fn audit_verify_names_the_first_tampered_entry() {
    use keymint_core::Timestamp;
    use keymint_core::audit::{AuditDraft, GENESIS};
    let dir = tempfile::tempdir().unwrap();
    let mut prev = GENESIS.to_owned();
    let mut lines = Vec::new();
    for seq in 1..=5 {
        let e = AuditDraft::new(Timestamp(seq as i64), "lease.issued", "admin").seal(seq, &prev);
        prev = e.hash.clone();
        lines.push(e.to_json());
    }
    let write = |name: &str, lines: &[String]| -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        p
    };
    let run = |p: &Path| {
        let out = Command::new(BIN)
            .args(["audit", "verify", "--file"])
            .arg(p)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = run(&write("good.jsonl", &lines));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("intact: 5 events"));

    let mut edited = lines.clone();
    edited[1] = edited[1].replace("\"admin\"", "\"mallory\"");
    let (code, out) = run(&write("edited.jsonl", &edited));
    assert_eq!(code, Some(1));
    assert!(out.contains("entry 2 (seq 2) was edited"), "{out}");

    let mut removed = lines.clone();
    removed.remove(2);
    let (code, out) = run(&write("removed.jsonl", &removed));
    assert_eq!(code, Some(1));
    assert!(out.contains("seq 3..=3 missing"), "{out}");

    let mut reordered = lines.clone();
    reordered.swap(3, 4);
    let (code, out) = run(&write("reordered.jsonl", &reordered));
    assert_eq!(code, Some(1));
    assert!(out.contains("(seq 4) is out of order"), "{out}");

    // Cut from the end, the chain is still whole: only a head recorded
    // apart from it tells.
    let head = |seq: usize| {
        let e: AuditEvent = serde_json::from_str(&lines[seq - 1]).unwrap();
        format!("{}:{}", e.seq, e.hash)
    };
    let expect = |p: &Path, head: &str| {
        let out = Command::new(BIN)
            .args(["audit", "verify", "--expect-head", head, "--file"])
            .arg(p)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let cut = write("cut.jsonl", &lines[..3]);
    let (code, out) = run(&cut);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = expect(&cut, &head(5));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("ends at seq 3, before the recorded head seq 5"),
        "{out}"
    );
    // The whole file reaches the head, and a later head too.
    let good = dir.path().join("good.jsonl");
    for seq in [3, 5] {
        let (code, out) = expect(&good, &head(seq));
        assert_eq!(code, Some(0), "{out}");
    }
    // A chain rebuilt from seq 2 on (every hash recomputed) is whole, and
    // not the one whose head was recorded.
    let mut prev = lines[0].clone();
    let first: AuditEvent = serde_json::from_str(&prev).unwrap();
    prev = first.hash;
    let mut forged = vec![lines[0].clone()];
    for seq in 2..=5 {
        let e = AuditDraft::new(Timestamp(seq as i64), "lease.issued", "mallory").seal(seq, &prev);
        prev = e.hash.clone();
        forged.push(e.to_json());
    }
    let forged = write("forged.jsonl", &forged);
    let (code, out) = run(&forged);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = expect(&forged, &head(5));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("seq 5 is not the recorded head"), "{out}");
    // A head that is not SEQ:HASH is refused before anything is read.
    for bad in ["5", "0:00", "x:y", &format!("5:{}", "g".repeat(64))] {
        let (code, out) = expect(&good, bad);
        assert_eq!(code, Some(2), "{bad}: {out}");
        assert!(out.contains("SEQ:HASH"), "{bad}: {out}");
    }
}

/// kill -9 while clients issue concurrently, several times: after every
/// restart each credential a client received is recorded and live, each
/// revoked one is dead, and both audit chains verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_issuing_loses_nothing_a_client_received() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = start_dev(dir.path()).await;
    let admin = Client::new(&dev.addr, Some(dev.token.clone())).unwrap();
    let task: Task = admin
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some("crash".into()),
                role: Some("demo".into()),
                ttl_secs: Some(3600),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    let mut received: Vec<(String, String)> = Vec::new();
    let mut revoked: Vec<String> = Vec::new();
    // A lease that expires during the first outage: after every restart it
    // must be dead, and the expiry manager must record it as expired.
    let short: IssuedLease = admin
        .post(
            &format!("/v1/tasks/{}/leases", task.id),
            &IssueLease {
                ttl_secs: Some(1),
                scopes: None,
                ..IssueLease::default()
            },
        )
        .await
        .unwrap();
    let short_token = short.credential.secret().expose().to_owned();

    for round in 0..3 {
        let admin = Client::new(&dev.addr, Some(dev.token.clone())).unwrap();
        // Revoke a few of what earlier rounds received.
        for (lease, token) in received.iter().skip(round * 3).take(3) {
            let _: Lease = admin
                .post_empty(&format!("/v1/leases/{lease}/revoke"))
                .await
                .unwrap();
            revoked.push(token.clone());
        }
        let got = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
        let mut workers = Vec::new();
        for _ in 0..16 {
            let (admin, got, path) = (
                admin.clone(),
                Arc::clone(&got),
                format!("/v1/tasks/{}/leases", task.id),
            );
            workers.push(tokio::spawn(async move {
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_secs(5) {
                    match admin
                        .post::<_, IssuedLease>(&path, &IssueLease::default())
                        .await
                    {
                        Ok(l) => {
                            let token = l.credential.secret().expose().to_owned();
                            got.lock().unwrap().push((l.lease.id.clone(), token));
                        }
                        Err(_) => break,
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(400 + 150 * round as u64)).await;
        dev.child.start_kill().unwrap(); // SIGKILL
        let _ = dev.child.wait().await;
        for w in workers {
            w.await.unwrap();
        }
        let got = std::mem::take(&mut *got.lock().unwrap());
        assert!(
            !got.is_empty(),
            "round {round}: clients received nothing before the kill"
        );
        received.extend(got);

        dev = start_dev(dir.path()).await;
        let admin = Client::new(&dev.addr, Some(dev.token.clone())).unwrap();
        for (lease, token) in &received {
            let i = introspect(&admin, token).await;
            if revoked.contains(token) {
                assert!(!i.active, "a revoked token came back to life");
            } else {
                assert!(
                    i.active,
                    "round {round}: lease {lease} was handed out but is not live"
                );
                assert_eq!(i.jti.as_deref(), Some(lease.as_str()));
            }
        }
        // Wait out its expiry if this restart came sooner than that.
        while keymint_core::Clock::now(&keymint_core::SystemClock) <= short.lease.expires_at {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !introspect(&admin, &short_token).await.active,
            "an expired lease came back"
        );
        let t0 = Instant::now();
        loop {
            let l: Lease = admin
                .get(&format!("/v1/leases/{}", short.lease.id))
                .await
                .unwrap();
            if l.state == keymint_proto::LeaseState::Expired {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "round {round}: not swept: {:?}",
                l.state
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let report: ChainReport = admin.get("/v1/audit/verify").await.unwrap();
        assert!(report.ok(), "round {round}: {report:?}");
        // The file sink catches up with the store and its chain verifies too.
        let head = report.last_seq.unwrap();
        let file = dir.path().join("audit.jsonl");
        let t0 = Instant::now();
        loop {
            let r = verify_file(&file);
            assert!(r.ok(), "round {round}: audit file: {r:?}");
            if r.last_seq == Some(head) || r.last_seq.unwrap_or(0) > head {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the audit file did not catch up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(
        received.len() > 30,
        "too few issuances to mean anything: {}",
        received.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_runs_from_a_config_file_and_refuses_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = format!(
        r#"version = 1
[server]
listen = "127.0.0.1:0"
dangerous_plaintext = true
[storage]
data_dir = "{}"
[audit]
file = "{}"
[[roles]]
name = "triage"
engine = "token"
scopes = ["llm:chat"]
default_ttl = "5m"
max_ttl = "10m"
[policy]
paths = ["{}"]
[issuer]
algorithms = ["ES256"]
"#,
        data.display(),
        dir.path().join("audit.jsonl").display(),
        dir.path().join("policies").display(),
    );
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/triage.cedar"),
        r#"@id("w-may-triage")
permit(principal == Keymint::Workload::"w", action, resource == Keymint::Role::"triage");"#,
    )
    .unwrap();
    let path = dir.path().join("keymint.toml");
    std::fs::write(&path, &config).unwrap();
    // On a port the system chooses, with JSON logs: the address is read
    // from the "listening" event.
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(["server", "--config"]).arg(&path);
    let (mut child, addr) = crate::spawn_listening(cmd).await;
    assert!(!addr.ends_with(":0"), "{addr}");
    let probe = wait_healthy(&addr).await;
    // An issuer named after the listener names the port it is bound to.
    let disco: serde_json::Value = probe
        .get("/.well-known/openid-configuration")
        .await
        .unwrap();
    assert_eq!(disco["issuer"], format!("http://{addr}"));
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let admin = probe.with_token(token.trim());
    let roles: keymint_proto::List<keymint_proto::Role> = admin.get("/v1/roles").await.unwrap();
    assert_eq!(roles.items.len(), 1);
    assert_eq!(roles.items[0].name, "triage");
    assert_eq!(roles.items[0].max_ttl_secs, 600);
    let t: Task = admin
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some("w".into()),
                role: Some("triage".into()),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    let e = admin
        .post::<_, IssuedLease>(
            &format!("/v1/tasks/{}/leases", t.id),
            &IssueLease {
                ttl_secs: Some(601),
                scopes: None,
                ..IssueLease::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("ttl_exceeds_limit"));

    // Policy decides: another workload gets nothing.
    let start = |w: &str| StartTask {
        workload: Some(w.into()),
        role: Some("triage".into()),
        ..StartTask::default()
    };
    let e = admin
        .post::<_, Task>("/v1/tasks", &start("x"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("policy_denied"));

    // An invalid set on SIGHUP is refused; the previous one stays in force.
    std::fs::write(
        dir.path().join("policies/triage.cedar"),
        "permit(principal, action, resource) when { context.nonsense };",
    )
    .unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let t0 = Instant::now();
    loop {
        let tail: keymint_proto::List<AuditEvent> = admin.get("/v1/audit?limit=1").await.unwrap();
        if tail
            .items
            .last()
            .is_some_and(|e| e.kind == "policy.reloaded")
        {
            let ev = tail.items.last().unwrap();
            assert_eq!(ev.outcome, keymint_core::audit::Outcome::Failure);
            assert_eq!(ev.actor, "signal");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "SIGHUP not handled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    admin
        .post::<_, Task>("/v1/tasks", &start("w"))
        .await
        .unwrap();

    // A valid new set through the CLI is in force at once, no restart.
    std::fs::write(
        dir.path().join("policies/triage.cedar"),
        r#"@id("x-only") permit(principal == Keymint::Workload::"x", action, resource);"#,
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["policy", "reload", "--addr", &format!("http://{addr}")])
        .env("KEYMINT_TOKEN", token.trim())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("x-only"));
    admin
        .post::<_, Task>("/v1/tasks", &start("x"))
        .await
        .unwrap();
    let e = admin
        .post::<_, Task>("/v1/tasks", &start("w"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("policy_denied"));

    // Every decision is audited with the policies that made it.
    let events: keymint_proto::List<AuditEvent> = admin.get("/v1/audit?limit=100").await.unwrap();
    let started: Vec<&AuditEvent> = events
        .items
        .iter()
        .filter(|e| e.kind == "task.started")
        .collect();
    assert_eq!(
        started[0].data["policies"],
        serde_json::json!(["w-may-triage"])
    );
    assert_eq!(
        started.last().unwrap().data["policies"],
        serde_json::json!(["x-only"])
    );
    let denied = events
        .items
        .iter()
        .filter(|e| e.kind == "task.denied")
        .collect::<Vec<_>>();
    assert_eq!(denied.len(), 2);
    assert_eq!(denied[0].data["decision"], "deny");
    assert_eq!(
        denied[0].reason.as_deref(),
        Some("no policy permits this request")
    );

    child.start_kill().unwrap();
    let _ = child.wait().await;

    // The stored signing key is sealed under the root key.
    let root = std::fs::read_to_string(data.join("root.key")).unwrap();
    let keyring = keymint_core::keyring::Keyring::from_root_hex(&root).unwrap();
    let store = keymint_store::SqliteStore::open(&data.join("keymint.db")).unwrap();
    let sealed = keymint_store::Store::get_secret(&store, "signing/ed25519-seed")
        .await
        .unwrap()
        .unwrap();
    let seed = keyring.open("signing/ed25519-seed", &sealed).unwrap();
    assert_eq!(seed.len(), 32);
    assert!(
        !sealed.windows(16).any(|w| w == &seed[..16]),
        "sealed, not plain"
    );
    let other = keymint_core::keyring::Keyring::from_root_hex(&"ab".repeat(32)).unwrap();
    assert!(other.open("signing/ed25519-seed", &sealed).is_err());

    // Unknown keys and bad values are refused with a message naming them.
    for (bad, needle) in [
        (
            config.replace("[audit]", "[audit]\nrotate = true"),
            "rotate",
        ),
        (
            config.replace("max_ttl = \"10m\"", "max_ttl = \"ten minutes\""),
            "roles.triage.max_ttl",
        ),
        (config.replace("version = 1", "version = 7"), "version"),
        // An issuer URL: https with a host, http only to a loopback host
        // (not one whose name merely starts like one), no user info; the
        // same rule for `[server] issuer`.
        (
            config.replace(
                "[issuer]\n",
                "[issuer]\nurl = \"http://127.0.0.1.evil.example\"\n",
            ),
            "`issuer.url`",
        ),
        (
            config.replace(
                "[issuer]\n",
                "[issuer]\nurl = \"http://localhost.evil.example:80\"\n",
            ),
            "`issuer.url`",
        ),
        (
            config.replace(
                "[issuer]\n",
                "[issuer]\nurl = \"http://127.0.0.1@evil.example\"\n",
            ),
            "`issuer.url`",
        ),
        (
            config.replace("[issuer]\n", "[issuer]\nurl = \"https://\"\n"),
            "`issuer.url`",
        ),
        (
            config.replace(
                "dangerous_plaintext = true",
                "dangerous_plaintext = true\nissuer = \"http://evil.example\"",
            ),
            "`server.issuer`",
        ),
        (
            config.replace(
                "dangerous_plaintext = true",
                "dangerous_plaintext = true\nissuer = \"ftp://evil example/?q\"",
            ),
            "`server.issuer`",
        ),
        // A role that signs with a key the issuer does not keep: named at
        // load, not a 503 on every issuance.
        (
            format!(
                "{config}\n[[roles]]\nname = \"sig\"\nengine = \"jwt\"\nscopes = []\n\
                 default_ttl = \"5m\"\nmax_ttl = \"10m\"\n[roles.jwt]\n\
                 audience = \"https://v.example\"\nalgorithm = \"RS256\"\n"
            ),
            "`roles.sig.algorithm`: RS256 is not in `[issuer] algorithms`",
        ),
    ] {
        std::fs::write(&path, bad).unwrap();
        // A configuration that is wrongly accepted starts a server, which
        // would run on: the refusal must come within the deadline.
        let child = tokio::process::Command::new(BIN)
            .args(["server", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("accepted instead of naming `{needle}`"))
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{needle}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "`{needle}` not named in: {err}");
    }
    // A file that is not there: named, with the reason said once.
    let missing = dir.path().join("absent.toml");
    let out = Command::new(BIN)
        .args(["server", "--config"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("absent.toml"), "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
}

async fn keymint_run(s: &keymint_testkit::TestServer, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(BIN)
        .arg("run")
        .args(args)
        .env("KEYMINT_ADDR", s.url())
        .env("KEYMINT_TOKEN", &s.admin_token)
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keymint_run_hands_the_command_a_credential_that_dies_with_it() {
    let s = keymint_testkit::TestServer::start().await.unwrap();
    let admin = s.admin();
    let out = keymint_run(
        &s,
        &[
            "--role",
            "demo",
            "--workload",
            "sh",
            "--ttl",
            "5m",
            "--",
            "sh",
            "-c",
            "echo \"$KEYMINT_TOKEN\"; echo \"$KEYMINT_TASK_ID\"",
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut lines = stdout.lines();
    let (token, task) = (
        lines.next().unwrap().to_owned(),
        lines.next().unwrap().to_owned(),
    );
    assert!(
        token.starts_with("kmt_"),
        "the child gets a task token: {token}"
    );
    assert_ne!(token, s.admin_token, "the admin token is never passed on");
    assert!(
        !introspect(&admin, &token).await.active,
        "dead once the command exited"
    );
    let t: Task = admin.get(&format!("/v1/tasks/{task}")).await.unwrap();
    assert_eq!(t.status, keymint_proto::TaskStatus::Completed);
    assert_eq!(t.workload, "sh");
    assert_eq!(
        t.idle_timeout_secs,
        Some(15),
        "a short idle timeout by default, heartbeaten while the command runs"
    );

    // A failing command fails its task, and its exit code comes through.
    let out = keymint_run(
        &s,
        &[
            "--role",
            "demo",
            "--workload",
            "w",
            "--",
            "sh",
            "-c",
            "echo \"$KEYMINT_TASK_ID\"; exit 3",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(3));
    let task = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let t: Task = admin.get(&format!("/v1/tasks/{task}")).await.unwrap();
    assert_eq!(t.status, keymint_proto::TaskStatus::Failed);

    // A role the caller cannot use: nothing runs.
    let out = keymint_run(
        &s,
        &[
            "--role",
            "nope",
            "--workload",
            "w",
            "--",
            "sh",
            "-c",
            "echo ran",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
}

/// An admin token proves no workload: `keymint run` does not make one up
/// from the command's name, it asks for `--workload`; a policy denial says
/// which workload was refused which role, and so does its audit event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keymint_run_names_the_workload_it_asks_as() {
    let s = keymint_testkit::TestServer::builder()
        .policy(
            "@id(\"bots-only\")\npermit(principal == Keymint::Workload::\"ticket-bot\", \
             action, resource == Keymint::Role::\"demo\");\n",
        )
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let out = keymint_run(&s, &["--role", "demo", "--", "sh", "-c", "echo ran"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "nothing ran");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--workload"), "{err}");
    let tasks: keymint_proto::List<Task> = admin.get("/v1/tasks").await.unwrap();
    assert!(tasks.items.is_empty(), "no task was started");

    let out = keymint_run(
        &s,
        &[
            "--role",
            "demo",
            "--workload",
            "python3",
            "--",
            "sh",
            "-c",
            "echo ran",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "nothing ran");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("workload `python3`") && err.contains("role `demo`"),
        "the denial names the workload and the role: {err}"
    );
    let audit: keymint_proto::List<keymint_proto::AuditEvent> =
        admin.get("/v1/audit?limit=100").await.unwrap();
    let ev = audit
        .items
        .iter()
        .find(|e| e.kind == "task.denied")
        .unwrap_or_else(|| panic!("no task.denied event"));
    assert_eq!(ev.workload.as_deref(), Some("python3"));
    assert_eq!(ev.role.as_deref(), Some("demo"));

    let out = keymint_run(
        &s,
        &[
            "--role",
            "demo",
            "--workload",
            "ticket-bot",
            "--",
            "sh",
            "-c",
            "echo ran",
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ran");
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet).
fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// Starts `keymint run … -- sh -c SCRIPT` with stdout piped; returns the
/// process and the first `lines` lines it printed.
async fn keymint_run_bg(
    s: &keymint_testkit::TestServer,
    args: &[&str],
    script: &str,
    lines: usize,
) -> (tokio::process::Child, Vec<String>) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(BIN)
        .arg("run")
        .args(args)
        .args(["--", "sh", "-c", script])
        .env("KEYMINT_ADDR", s.url())
        .env("KEYMINT_TOKEN", &s.admin_token)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut got = Vec::new();
    while got.len() < lines {
        got.push(
            out.next_line()
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("the command printed {} lines, not {lines}", got.len())),
        );
    }
    (child, got)
}

/// kill -9 of `keymint run`: its command is killed with it, and the task
/// (idle timeout, no more heartbeats) ends within seconds, so its token is
/// refused long before the task's TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keymint_run_killed_takes_its_command_and_task_down() {
    let s = keymint_testkit::TestServer::start().await.unwrap();
    let admin = s.admin();
    let (mut run, lines) = keymint_run_bg(
        &s,
        &[
            "--role",
            "demo",
            "--workload",
            "w",
            "--ttl",
            "30m",
            "--idle-timeout",
            "3s",
        ],
        "echo \"$KEYMINT_TOKEN\"; echo $$; exec sleep 600",
        2,
    )
    .await;
    let (token, child) = (lines[0].clone(), lines[1].parse::<i32>().unwrap());
    assert!(introspect(&admin, &token).await.active);
    assert!(!dead(child));

    let pid = nix::unistd::Pid::from_raw(i32::try_from(run.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    run.wait().await.unwrap();

    let t0 = Instant::now();
    while !dead(child) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the command outlived `keymint run`"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while introspect(&admin, &token).await.active {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the token outlived `keymint run` by more than its idle timeout"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = s.client(&token).get::<Task>("/v1/tasks").await.unwrap_err();
    assert_eq!(refused.code(), Some("unauthorized"), "{refused}");
}

/// While the command runs, heartbeats keep its task and its credential
/// alive well past the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keymint_run_heartbeats_keep_a_long_command_alive() {
    let s = keymint_testkit::TestServer::start().await.unwrap();
    let admin = s.admin();
    let (mut run, lines) = keymint_run_bg(
        &s,
        &["--role", "demo", "--workload", "w", "--idle-timeout", "2s"],
        "echo \"$KEYMINT_TOKEN\"; sleep 7",
        1,
    )
    .await;
    let token = lines[0].clone();
    // Three idle timeouts pass while the command runs.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let i = introspect(&admin, &token).await;
    assert!(i.active, "heartbeats keep the task alive: {i:?}");
    assert!(run.wait().await.unwrap().success());
    assert!(
        !introspect(&admin, &token).await.active,
        "dead once it exited"
    );
}

#[test]
fn policy_validate_and_test_check_policies_like_code() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.cedar");
    std::fs::write(&good, keymint_server::config::SAMPLE_POLICY).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = run(&["policy", "validate", good.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("3 policies valid"), "{out}");

    let bad = dir.path().join("bad.cedar");
    std::fs::write(
        &bad,
        r#"permit(principal, action, resource) when { context.colour == "red" };"#,
    )
    .unwrap();
    let (code, _, err) = run(&["policy", "validate", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("colour"), "{err}");

    let cases = dir.path().join("cases.toml");
    std::fs::write(
        &cases,
        r#"
[[case]]
name = "demo for 30 minutes"
action = "start_task"
principal = { id = "agent" }
role = { name = "demo" }
context = { ttl_secs = 1800 }
expect = "allow"
decided_by = ["demo-role"]

[[case]]
name = "deletes in prod wait for a human"
action = "issue"
principal = { id = "agent" }
role = { name = "demo" }
context = { ttl_secs = 60, environment = "prod", intent = "delete rows" }
expect = "approval"
decided_by = ["prod-deletes-need-a-human"]

[[case]]
name = "approved, they go ahead"
action = "issue"
principal = { id = "agent" }
role = { name = "demo" }
context = { ttl_secs = 60, environment = "prod", intent = "delete rows", approved = true }
expect = "allow"

[[case]]
name = "other roles are not covered"
action = "issue"
principal = { id = "agent" }
role = { name = "db-admin" }
expect = "deny"
"#,
    )
    .unwrap();
    let (code, out, _) = run(&[
        "policy",
        "test",
        cases.to_str().unwrap(),
        "-p",
        good.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("4 passed, 0 failed"), "{out}");

    // A wrong expectation fails the run and says which case.
    let text = std::fs::read_to_string(&cases).unwrap().replacen(
        "expect = \"approval\"",
        "expect = \"deny\"",
        1,
    );
    std::fs::write(&cases, text).unwrap();
    let (code, out, _) = run(&[
        "policy",
        "test",
        cases.to_str().unwrap(),
        "-p",
        good.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        out.contains("FAIL deletes in prod wait for a human"),
        "{out}"
    );

    let (code, out, _) = run(&["policy", "schema"]);
    assert_eq!(code, 0);
    assert!(out.contains("namespace Keymint"));
}

/// A second keymint on a data directory whose SQLite store another
/// process has open refuses to start, naming the store, and leaves the
/// first alone. Before, it started: its start-up reconciliation revoked
/// the first process's pending leases (the first's client got a 409) and
/// the two in-memory chain heads collided, so every write of the first
/// failed with a 500 (`UNIQUE constraint failed: audit.seq`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_one_sqlite_store_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = start_dev(dir.path()).await;
    let admin = Client::new(&first.addr, Some(first.token.clone())).unwrap();
    let task: Task = admin
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some("agent".into()),
                role: Some("demo".into()),
                ttl_secs: Some(600),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    let path = format!("/v1/tasks/{}/leases", task.id);
    let before: IssuedLease = admin.post(&path, &IssueLease::default()).await.unwrap();

    let second = tokio::process::Command::new(BIN)
        .args(["dev", "--data-dir"])
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .expect("a second keymint on the same store started and kept running")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("another keymint process") && stderr.contains("keymint.db"),
        "{stderr}"
    );

    // The first goes on: its lease is live, it writes, its chain verifies.
    assert!(
        introspect(&admin, before.credential.secret().expose())
            .await
            .active
    );
    let _: IssuedLease = admin.post(&path, &IssueLease::default()).await.unwrap();
    let report: keymint_proto::ChainReport = admin.get("/v1/audit/verify").await.unwrap();
    assert!(report.ok(), "{report:?}");

    // Once the first is gone (kill -9), the store opens again at once.
    first.child.start_kill().unwrap();
    let _ = first.child.wait().await;
    let again = start_dev(dir.path()).await;
    let admin = Client::new(&again.addr, Some(again.token.clone())).unwrap();
    assert!(
        introspect(&admin, before.credential.secret().expose())
            .await
            .active
    );
}

/// After a kill -9 the newest changes live in `keymint.db-wal`. A database
/// file that is then found empty or missing (a clean-up or restore that
/// removed or emptied `keymint.db` but left its log, a file system that
/// lost the file's contents) is refused with an error naming both files: keymint
/// used to open it as a new, empty store, which discarded the log's
/// changes and started the audit chain over. Nothing in the data
/// directory is changed by the refused start, and with the database file
/// back the store opens with everything in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_file_lost_beside_its_write_ahead_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keymint.db");
    let wal = dir.path().join("keymint.db-wal");
    let saved = dir.path().join("saved.db");
    let mut dev = start_dev(dir.path()).await;
    let admin = Client::new(&dev.addr, Some(dev.token.clone())).unwrap();
    let task: Task = admin
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some("agent".into()),
                role: Some("demo".into()),
                ttl_secs: Some(600),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    let issued: IssuedLease = admin
        .post(
            &format!("/v1/tasks/{}/leases", task.id),
            &IssueLease::default(),
        )
        .await
        .unwrap();
    dev.child.start_kill().unwrap(); // SIGKILL
    let _ = dev.child.wait().await;
    let wal_len = std::fs::metadata(&wal).unwrap().len();
    assert!(wal_len > 0, "kill -9 leaves the log");
    std::fs::copy(&db, &saved).unwrap();

    let refused = |what: &'static str| {
        let dir = dir.path().to_owned();
        async move {
            let run = tokio::process::Command::new(BIN)
                .args(["dev", "--data-dir"])
                .arg(&dir)
                .args(["--listen", "127.0.0.1:0"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .output();
            let out = tokio::time::timeout(Duration::from_secs(30), run)
                .await
                .unwrap_or_else(|_| panic!("{what}: keymint started a new store and kept running"))
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(!out.status.success(), "{what}: {stderr}");
            assert!(
                stderr.contains("keymint.db-wal") && stderr.contains("keymint.db`"),
                "{what}: the error names both files: {stderr}"
            );
        }
    };
    // Emptied.
    std::fs::write(&db, b"").unwrap();
    refused("an empty database file").await;
    assert_eq!(
        std::fs::metadata(&wal).unwrap().len(),
        wal_len,
        "the log is kept"
    );
    // Missing.
    std::fs::remove_file(&db).unwrap();
    refused("a missing database file").await;
    assert_eq!(
        std::fs::metadata(&wal).unwrap().len(),
        wal_len,
        "the log is kept"
    );

    // The database file is back: everything is there.
    std::fs::copy(&saved, &db).unwrap();
    let dev = start_dev(dir.path()).await;
    let admin = Client::new(&dev.addr, Some(dev.token.clone())).unwrap();
    let t: Task = admin.get(&format!("/v1/tasks/{}", task.id)).await.unwrap();
    assert_eq!(t.id, task.id);
    assert!(
        introspect(&admin, issued.credential.secret().expose())
            .await
            .active
    );
    let report: keymint_proto::ChainReport = admin.get("/v1/audit/verify").await.unwrap();
    assert!(report.ok(), "{report:?}");
}

/// A log that cannot be written (its disk is full, often the disk the
/// store is on) loses log lines, not the service: the logging library
/// reported a failed write with `eprintln!`, which panics when standard
/// error itself cannot be written, so `keymint server` died at its first
/// log line, and a running one dropped the connection of every request
/// that logged (a store that cannot write logs an error per request) and
/// could lose any background worker that logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_cannot_be_written_does_not_stop_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/all.cedar"),
        keymint_testkit::PERMIT_ALL,
    )
    .unwrap();
    let path = dir.path().join("keymint.toml");
    std::fs::write(
        &path,
        format!(
            r#"version = 1
[server]
listen = "127.0.0.1:{port}"
dangerous_plaintext = true
[storage]
data_dir = "{}"
[[roles]]
name = "triage"
engine = "token"
scopes = ["llm:chat"]
default_ttl = "5m"
max_ttl = "10m"
[policy]
paths = ["{}"]
"#,
            data.display(),
            dir.path().join("policies").display(),
        ),
    )
    .unwrap();
    // Every write to /dev/full fails with "no space left on device".
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["server", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::from(full))
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
            child.try_wait().unwrap().is_none(),
            "keymint ended because its log could not be written"
        );
        assert!(t0.elapsed() < Duration::from_secs(30), "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let admin = probe.with_token(token.trim());
    // Requests that log (refused tokens are logged) are answered.
    for _ in 0..3 {
        let r = probe
            .with_token("kma_notatokenQZKWJVB")
            .raw(http::Method::GET, "/v1/tasks", None, vec![])
            .await
            .unwrap();
        assert_eq!(r.status, 401);
    }
    let _: Task = admin
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some("w".into()),
                role: Some("triage".into()),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    assert!(child.try_wait().unwrap().is_none());
}
