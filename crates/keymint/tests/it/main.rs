//! keymint's integration tests: the HTTP API against an in-process server
//! (the test kit), the broker's background work under a manual clock, and
//! the real binary (CLI, crash and restart).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::type_complexity,
    reason = "test helpers: a failed step is a failed test"
)]

mod agent;
mod api;
mod approvals;
mod bad_input;
mod binary;
mod budgets;
mod console;
mod db_tls;
mod entries;
mod failover;
mod federation;
mod identity;
mod inventory;
mod issuer;
mod leaks;
mod lifecycle;
mod local;
mod mcp;
mod monitoring;
mod mtls;
mod mysql;
mod oauth;
mod oauth_grants;
mod policy;
mod postgres;
mod providers;
mod proxy;
mod rates;
mod replica_keys;
mod replicas;
mod report;
mod rotation;
mod ssh;
mod upstream_rotation;

use keymint_client::Client;
use keymint_proto::{IssueLease, IssuedLease, StartTask, Task};

/// Spawns a keymint process told to listen on port 0 (`keymint dev
/// --listen 127.0.0.1:0`, a configuration's `listen = "127.0.0.1:0"`, or
/// `keymint proxy --listen 127.0.0.1:0`) and answers it with the address it
/// is bound to, as it says: `keymint dev`'s banner, or the `addr` of the
/// "… listening" event of its JSON log (`KEYMINT_LOG_FORMAT=json`, set
/// here). The port is the system's choice at the bind, so no other process
/// can take it between a test's choice and the server's start. Every log
/// line must be one JSON object without a colour escape; the rest of the
/// output is read and dropped so that the process never blocks on it.
pub async fn spawn_listening(mut cmd: tokio::process::Command) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut child = cmd
        .env("KEYMINT_LOG_FORMAT", "json")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(a) = line.strip_prefix("keymint dev listening on http://") {
                return a.trim().to_owned();
            }
            if !line.starts_with('{') {
                continue; // `keymint dev`'s banner
            }
            assert!(!line.contains('\u{1b}'), "a colour escape: {line:?}");
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            if v["message"]
                .as_str()
                .is_some_and(|m| m.contains(" listening"))
                && let Some(a) = v["addr"].as_str()
            {
                return a.to_owned();
            }
        }
        panic!("keymint ended before it listened: {cmd:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("keymint did not say where it listens: {cmd:?}"));
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    assert!(!addr.ends_with(":0"), "{addr}");
    (child, addr)
}

/// Writes `request` (a whole HTTP/1.1 request, `connection: close`) on
/// `stream` and returns what the server answers until it closes, read
/// within 10 s.
pub async fn exchange<S>(mut stream: S, request: &[u8]) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut out),
    )
    .await
    .unwrap()
    .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The line of `/metrics` for `series` (its name and value).
pub async fn metric(s: &keymint_testkit::TestServer, series: &str) -> String {
    let m = s
        .anonymous()
        .raw(http::Method::GET, "/metrics", None, vec![])
        .await
        .unwrap()
        .text();
    m.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no `{series}` in /metrics"))
        .to_owned()
}

/// Sets `upstream`'s key as `keymint upstream set` does (admin).
pub async fn set_upstream_key(admin: &Client, upstream: &str, key: &str) {
    let r = admin
        .raw(
            http::Method::POST,
            &format!("/v1/upstreams/{upstream}/key"),
            Some("application/json"),
            serde_json::json!({ "key": key }).to_string().into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.text());
}

pub async fn start_task(c: &Client, workload: &str) -> Task {
    start_task_in(c, "demo", workload).await
}

/// Starts a 10-minute task for `workload` with `role`.
pub async fn start_task_in(c: &Client, role: &str, workload: &str) -> Task {
    c.post(
        "/v1/tasks",
        &StartTask {
            workload: Some(workload.into()),
            role: Some(role.into()),
            ttl_secs: Some(600),
            intent: Some("triage tickets".into()),
            ..StartTask::default()
        },
    )
    .await
    .unwrap()
}

pub async fn issue(c: &Client, task: &str) -> (IssuedLease, String) {
    let l: IssuedLease = c
        .post(&format!("/v1/tasks/{task}/leases"), &IssueLease::default())
        .await
        .unwrap();
    let t = l.credential.secret().expose().to_owned();
    (l, t)
}

pub async fn introspect(admin: &Client, token: &str) -> keymint_proto::Introspection {
    let body = format!("token={}", keymint_client::encode(token));
    let r = admin
        .raw(
            http::Method::POST,
            "/v1/introspect",
            Some("application/x-www-form-urlencoded"),
            body.into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json().unwrap()
}

/// Leaves the state a crash between "user created" and "lease active"
/// leaves: with `engine` (a second instance of the server's own), a lease
/// of `role` in task `task` recorded as pending and applied at the
/// provider, never activated. Returns the lease's id and what the engine
/// prepared.
pub async fn pending_lease_applied(
    s: &keymint_testkit::TestServer,
    task: &str,
    role: &str,
    engine: &dyn keymint_engines::Engine,
) -> (String, keymint_engines::Prepared) {
    let b = s.broker();
    let role = b.roles().into_iter().find(|r| r.name == role).unwrap();
    let now = b.now();
    let lease_id = keymint_core::id::lease_id(now);
    let task = b.store().get_task(task).await.unwrap().unwrap();
    let ctx = keymint_engines::IssueContext {
        lease_id: &lease_id,
        task: &task,
        role: &role,
        expires_at: now.plus_secs(60),
        public_key: None,
        principals: None,
        serial: None,
    };
    let prepared = engine.prepare(&ctx).unwrap();
    let mut lease = keymint_store::conformance::lease(
        ctx.task,
        keymint_core::model::LeaseState::Pending,
        now,
        60,
    );
    lease.id = lease_id.clone();
    lease.engine = engine.kind();
    lease.engine_data = prepared.engine_data.clone();
    b.store()
        .insert_lease(
            &task.id,
            Box::new(move |_| {
                Ok((
                    lease,
                    keymint_core::audit::AuditDraft::new(now, "lease.recorded", "admin"),
                ))
            }),
        )
        .await
        .unwrap();
    engine.apply(&ctx, &prepared).await.unwrap();
    (lease_id, prepared)
}
