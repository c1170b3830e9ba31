//! Three `keymint server` processes on one PostgreSQL database
//! (docs/design/0022-duties-and-replicas.md): the background duties run on
//! exactly one, another takes them over within seconds of a kill -9, and
//! random kills under concurrent issuance and proxying lose nothing.
//!
//! `scripts/crash-replicas.sh` runs the random-kill test with more
//! iterations (`KEYMINT_CRASH_ITERATIONS`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keymint_client::Client;
use keymint_proto::{IssueLease, IssuedLease, Lease, LeaseState, List, StartTask, Task};
use keymint_testkit::upstream::FakeUpstream;
use serde_json::{Value, json};

use crate::postgres::admin_conn;

const BIN: &str = env!("CARGO_BIN_EXE_keymint");
/// The provider key the fake upstream accepts (fabricated).
const KEY: &str = "upstream-key-for-failover-tests-0123456789";

/// A new database on the test server, or `None` outside CI without one.
pub(crate) async fn fresh_database() -> Option<String> {
    let admin = admin_conn().await?;
    let name = format!(
        "kmf_{}",
        keymint_core::token::random_base62(12)
            .unwrap()
            .to_lowercase()
    );
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    Some(name)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `keymint server` process.
pub(crate) struct Replica {
    name: String,
    config: PathBuf,
    data: PathBuf,
    audit: PathBuf,
    child: Option<tokio::process::Child>,
    pub(crate) admin: Client,
}

impl Replica {
    /// Writes the configuration of replica `name` under `base` and starts
    /// it; the root key and admin token come from `seed` (the first
    /// replica's data directory) when given.
    async fn start(base: &Path, name: &str, db: &str, extra: &str, seed: Option<&Path>) -> Self {
        Self::start_with(base, name, db, "", extra, seed).await
    }

    /// [`Replica::start`] with `server` added to the `[server]` table.
    pub(crate) async fn start_with(
        base: &Path,
        name: &str,
        db: &str,
        server: &str,
        extra: &str,
        seed: Option<&Path>,
    ) -> Self {
        let dir = base.join(name);
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        std::fs::write(dir.join("policies/all.cedar"), keymint_testkit::PERMIT_ALL).unwrap();
        if let Some(seed) = seed {
            for f in ["root.key", "admin.token"] {
                std::fs::copy(seed.join(f), data.join(f)).unwrap();
            }
        }
        let audit = dir.join("audit.jsonl");
        let config = dir.join("keymint.toml");
        let port = free_port();
        std::fs::write(
            &config,
            format!(
                r#"version = 1
[server]
listen = "127.0.0.1:{port}"
dangerous_plaintext = true
{server}
[storage]
data_dir = "{}"
backend = "postgres"
url = "postgres://postgres@127.0.0.1:5432/{db}"
tls = "disable"
pool_size = 4
[audit]
file = "{}"
[policy]
paths = ["{}"]
[proxy]
audit_interval = "1s"
{extra}
"#,
                data.display(),
                audit.display(),
                dir.join("policies").display(),
            ),
        )
        .unwrap();
        let mut r = Self {
            name: name.into(),
            config,
            data,
            audit,
            child: None,
            admin: Client::new(&format!("http://127.0.0.1:{port}"), None).unwrap(),
        };
        r.spawn().await;
        r
    }

    async fn spawn(&mut self) {
        let child = tokio::process::Command::new(BIN)
            .args(["server", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let t0 = Instant::now();
        while self
            .admin
            .get::<keymint_proto::Health>("/v1/health")
            .await
            .is_err()
        {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "replica {} did not start",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let token = std::fs::read_to_string(self.data.join("admin.token")).unwrap();
        self.admin = self.admin.with_token(token.trim());
    }

    /// SIGKILL, and waits for the process to be gone.
    pub(crate) async fn kill_9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.start_kill().unwrap();
            let _ = c.wait().await;
        }
    }

    fn alive(&self) -> bool {
        self.child.is_some()
    }

    /// `keymint_duties_held` from `/metrics`, or `None` if it cannot be read.
    pub(crate) async fn holds_duties(&self) -> Option<bool> {
        let r = self
            .admin
            .raw(http::Method::GET, "/metrics", None, vec![])
            .await
            .ok()?;
        let text = r.text();
        let line = text
            .lines()
            .find(|l| l.starts_with("keymint_duties_held "))?;
        Some(line.ends_with(" 1"))
    }
}

/// The one live replica holding the duties, once exactly one does.
pub(crate) async fn holder(replicas: &[Replica], within: Duration) -> Option<usize> {
    let t0 = Instant::now();
    loop {
        let mut held = Vec::new();
        for (i, r) in replicas.iter().enumerate() {
            if r.alive() && r.holds_duties().await == Some(true) {
                held.push(i);
            }
        }
        assert!(held.len() <= 1, "two replicas hold the duties: {held:?}");
        if let [i] = held[..] {
            return Some(i);
        }
        if t0.elapsed() > within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn all_events(admin: &Client) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut after = 0u64;
    loop {
        let page: List<Value> = admin
            .get(&format!("/v1/audit?after={after}&limit=1000"))
            .await
            .unwrap();
        let n = page.items.len();
        if let Some(last) = page.items.last() {
            after = last["seq"].as_u64().unwrap();
        }
        out.extend(page.items);
        if n < 1000 {
            return out;
        }
    }
}

/// Waits until the replica's audit file holds the chain up to `head`,
/// then checks it whole.
async fn file_verifies(r: &Replica, head: u64) {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(&r.audit).unwrap_or_default();
        let last = text
            .lines()
            .last()
            .and_then(|l| serde_json::from_str::<Value>(l).ok())
            .and_then(|v| v["seq"].as_u64())
            .unwrap_or(0);
        if last >= head {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "replica {}'s audit file stops at {last} of {head}",
            r.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = crate::binary::verify_file(&r.audit);
    assert!(report.ok(), "replica {}'s audit file: {report:?}", r.name);
}

/// A TCP relay to the real PostgreSQL that can be taken down: while down
/// it closes every connection, new and open, as a lost database does.
pub(crate) struct Relay {
    pub(crate) port: u16,
    down: Arc<AtomicBool>,
}

impl Relay {
    pub(crate) async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let d = Arc::clone(&down);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if d.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let d = Arc::clone(&d);
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect("127.0.0.1:5432").await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(Self::pipe(cr, sw, Arc::clone(&d)));
                    Self::pipe(sr, cw, d).await;
                });
            }
        });
        Self { port, down }
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        down: Arc<AtomicBool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if down.load(Ordering::SeqCst) || to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    pub(crate) fn set_down(&self, on: bool) {
        self.down.store(on, Ordering::SeqCst);
    }
}

async fn role_exists(pg: &tokio_postgres::Client, name: &str) -> bool {
    pg.query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .await
        .unwrap()
        .is_some()
}

pub(crate) async fn start_task(c: &Client, role: &str, ttl: u64) -> Task {
    c.post(
        "/v1/tasks",
        &StartTask {
            workload: Some("agent".into()),
            role: Some(role.into()),
            ttl_secs: Some(ttl),
            ..StartTask::default()
        },
    )
    .await
    .unwrap()
}

/// Kill -9 of the replica holding the duties while tasks expire and
/// revocations at an unreachable database are failing: another replica
/// takes the duties within seconds (measured), every lease ends exactly
/// once (no duty ran twice), the failing revocations are finished when
/// the database is back, and every replica's audit file verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_duty_holder_hands_the_duties_over() {
    let Some(db) = fresh_database().await else {
        return;
    };
    let pg = admin_conn().await.unwrap();
    let schema = crate::postgres::schema(&pg).await;
    let relay = Relay::start().await;
    let extra = format!(
        r#"
[[databases]]
name = "main"
engine = "postgres"
connection = "host=127.0.0.1 port={} user=postgres dbname=test"

[[roles]]
name = "analyst"
engine = "postgres"
database = "main"
creation_statements = ["GRANT USAGE ON SCHEMA {schema} TO {{{{name}}}}"]
scopes = ["db:read"]
default_ttl = "5m"
max_ttl = "10m"

[[roles]]
name = "demo"
engine = "token"
scopes = ["llm:chat"]
default_ttl = "5m"
max_ttl = "10m"
"#,
        relay.port
    );
    let base = tempfile::tempdir().unwrap();
    let a = Replica::start(base.path(), "a", &db, &extra, None).await;
    let seed = a.data.clone();
    let b = Replica::start(base.path(), "b", &db, &extra, Some(&seed)).await;
    let c = Replica::start(base.path(), "c", &db, &extra, Some(&seed)).await;
    let mut replicas = vec![a, b, c];
    let h = holder(&replicas, Duration::from_secs(10))
        .await
        .expect("one replica holds the duties");
    let other = (h + 1) % 3;
    let api = replicas[other].admin.clone();

    // Database users whose tasks end in 2 s, while their database is
    // unreachable: the holder's revocations fail and are retried.
    let mut pg_leases = Vec::new();
    for _ in 0..3 {
        let t = start_task(&api, "analyst", 2).await;
        let (l, _) = crate::issue(&api, &t.id).await;
        let user = match &l.credential {
            keymint_proto::Credential::Database { username, .. } => username.clone(),
            other => panic!("not a database credential: {other:?}"),
        };
        assert!(role_exists(&pg, &user).await);
        pg_leases.push((l.lease.id, user));
    }
    relay.set_down(true);
    // Token tasks that end after the kill.
    let mut token_leases = Vec::new();
    for _ in 0..10 {
        let t = start_task(&api, "demo", 5).await;
        let (l, _) = crate::issue(&api, &t.id).await;
        token_leases.push(l.lease.id);
    }
    // The revocations fail at least once at the holder.
    let t0 = Instant::now();
    loop {
        let l: Lease = api
            .get(&format!("/v1/leases/{}", pg_leases[0].0))
            .await
            .unwrap();
        if l.revoke_attempts >= 1 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the revocation never failed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let killed_at = Instant::now();
    replicas[h].kill_9().await;
    let new = holder(&replicas, Duration::from_secs(30))
        .await
        .expect("another replica takes the duties");
    let took = killed_at.elapsed();
    eprintln!(
        "duties taken over by replica {} in {took:?}",
        replicas[new].name
    );
    assert_ne!(new, h);
    // Designed for at most 4 s (a 3 s lease renewed every second); the
    // bound is generous for a loaded machine.
    assert!(took < Duration::from_secs(10), "take-over took {took:?}");

    // The token tasks time out and their leases end, on the new holder.
    let api = replicas[new].admin.clone();
    let t0 = Instant::now();
    for id in &token_leases {
        loop {
            let l: Lease = api.get(&format!("/v1/leases/{id}")).await.unwrap();
            if l.state.is_final() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "lease {id} is still {:?}",
                l.state
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The database comes back: no revocation was dropped in the hand-over.
    relay.set_down(false);
    let t0 = Instant::now();
    for (id, user) in &pg_leases {
        loop {
            let l: Lease = api.get(&format!("/v1/leases/{id}")).await.unwrap();
            if l.state == LeaseState::Revoked && !role_exists(&pg, user).await {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "lease {id} is still {:?} ({:?})",
                l.state,
                l.last_error
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The killed replica rejoins; every lease ended exactly once.
    replicas[h].spawn().await;
    let events = all_events(&api).await;
    let mut ends: HashMap<&str, usize> = HashMap::new();
    for e in &events {
        if matches!(e["kind"].as_str(), Some("lease.revoked" | "lease.expired")) {
            *ends.entry(e["lease"].as_str().unwrap_or("")).or_default() += 1;
        }
    }
    for id in token_leases
        .iter()
        .chain(pg_leases.iter().map(|(id, _)| id))
    {
        assert_eq!(
            ends.get(id.as_str()).copied(),
            Some(1),
            "lease {id} ended once"
        );
    }
    let head = events.last().unwrap()["seq"].as_u64().unwrap();
    for r in &replicas {
        file_verifies(r, head).await;
    }
    for r in &mut replicas {
        r.kill_9().await;
    }
    pg.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

#[expect(
    clippy::disallowed_methods,
    reason = "the crash script asks for more iterations through the environment"
)]
fn iterations() -> usize {
    std::env::var("KEYMINT_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

fn chat_body() -> Vec<u8> {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]})
        .to_string()
        .into_bytes()
}

fn random_below(n: u64) -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap();
    u64::from_le_bytes(b) % n
}

/// Replicas are killed (kill -9) at random moments while clients issue
/// leases and send proxied requests against a budget of 5 through all
/// three, and come back: no acknowledged lease is lost or ended, no budget is
/// overspent, every successful proxied request is in the audit trail, and
/// the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_under_issuance_and_proxying_lose_nothing() {
    let Some(db) = fresh_database().await else {
        return;
    };
    let up = FakeUpstream::start(KEY).await.unwrap();
    let extra = format!(
        r#"
[[upstreams]]
name = "openai"
kind = "openai"
base_url = "{}/v1"
timeout = "20s"

[[roles]]
name = "five"
engine = "token"
upstream = "openai"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
models = ["gpt-4o-mini"]
endpoints = ["chat.completions"]
max_requests = 5

[[roles]]
name = "demo"
engine = "token"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
"#,
        up.url()
    );
    let base = tempfile::tempdir().unwrap();
    let a = Replica::start(base.path(), "a", &db, &extra, None).await;
    let seed = a.data.clone();
    let b = Replica::start(base.path(), "b", &db, &extra, Some(&seed)).await;
    let c = Replica::start(base.path(), "c", &db, &extra, Some(&seed)).await;
    let mut replicas = vec![a, b, c];
    let r = replicas[0]
        .admin
        .raw(
            http::Method::POST,
            "/v1/upstreams/openai/key",
            Some("application/json"),
            json!({"key": KEY}).to_string().into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.text());

    let mut acknowledged: Vec<String> = Vec::new();
    // Per budget task: the requests its clients saw succeed.
    let mut proxied: Vec<(String, usize)> = Vec::new();
    let mut kills = 0;
    for round in 0..iterations() {
        let admins: Vec<Client> = replicas.iter().map(|r| r.admin.clone()).collect();
        let budget = start_task(&admins[round % 3], "five", 600).await;
        let l: IssuedLease = admins[round % 3]
            .post(
                &format!("/v1/tasks/{}/leases", budget.id),
                &IssueLease::default(),
            )
            .await
            .unwrap();
        let token = l.credential.secret().expose().to_owned();
        let work = start_task(&admins[(round + 1) % 3], "demo", 600).await;

        // Issuers: leases through every replica; a 2xx is an acknowledgement.
        let mut issuers = Vec::new();
        for i in 0..6 {
            let c = admins[i % 3].clone();
            let task = work.id.clone();
            issuers.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..15 {
                    let r = c
                        .raw(
                            http::Method::POST,
                            &format!("/v1/tasks/{task}/leases"),
                            Some("application/json"),
                            b"{}".to_vec(),
                        )
                        .await;
                    if let Ok(r) = r
                        && r.status.is_success()
                    {
                        let l: IssuedLease = r.json().unwrap();
                        got.push(l.lease.id);
                    }
                }
                got
            }));
        }
        // Proxy clients: 12 requests against a budget of 5, spread.
        let mut proxies = Vec::new();
        for i in 0..12 {
            let c = admins[i % 3].with_token(&token);
            proxies.push(tokio::spawn(async move {
                c.raw(
                    http::Method::POST,
                    "/proxy/openai/chat/completions",
                    Some("application/json"),
                    chat_body(),
                )
                .await
                .map(|r| r.status.as_u16())
                .unwrap_or(0)
            }));
        }
        tokio::time::sleep(Duration::from_millis(20 + random_below(300))).await;
        let victim = usize::try_from(random_below(3)).unwrap();
        replicas[victim].kill_9().await;
        kills += 1;
        for h in issuers {
            acknowledged.extend(h.await.unwrap());
        }
        let mut ok = 0;
        for h in proxies {
            match h.await.unwrap() {
                200 => ok += 1,
                // Refused by the budget, or lost with the killed replica.
                429 | 0 => {}
                s => panic!("unexpected proxy status {s}"),
            }
        }
        assert!(ok <= 5, "round {round}: {ok} requests passed a budget of 5");
        proxied.push((budget.id, ok));
        replicas[victim].spawn().await;
    }
    eprintln!(
        "{kills} kills; {} leases acknowledged; {} proxied requests answered",
        acknowledged.len(),
        proxied.iter().map(|(_, n)| n).sum::<usize>()
    );

    // Every acknowledged lease is in the store.
    let api = replicas[0].admin.clone();
    let unique: HashSet<&String> = acknowledged.iter().collect();
    assert_eq!(unique.len(), acknowledged.len());
    for id in &acknowledged {
        let r = api
            .raw(http::Method::GET, &format!("/v1/leases/{id}"), None, vec![])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "acknowledged lease {id} lost");
        // And still live: no restart's reconciliation took it for a
        // crash leftover (its task runs 10 minutes).
        let l: Lease = r.json().unwrap();
        assert_eq!(l.state, LeaseState::Active, "acknowledged lease {id}");
    }
    // Every answered request is audited (a killed replica's open
    // reservations are charged in full once it is seen dead), and no
    // budget was overspent.
    let t0 = Instant::now();
    loop {
        let events = all_events(&api).await;
        let mut charged: HashMap<String, u64> = HashMap::new();
        for e in events.iter().filter(|e| e["kind"] == "proxy.usage") {
            *charged
                .entry(e["task"].as_str().unwrap().to_owned())
                .or_default() += e["data"]["requests"].as_u64().unwrap();
        }
        for (task, _) in &proxied {
            let n = charged.get(task).copied().unwrap_or(0);
            assert!(n <= 5, "task {task} was charged {n} requests of 5");
        }
        let missing: Vec<_> = proxied
            .iter()
            .filter(|(task, ok)| charged.get(task).copied().unwrap_or(0) < *ok as u64)
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "answered requests missing from the audit trail: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let events = all_events(&api).await;
    let report = keymint_core::audit::verify(events.iter().map(|e| {
        serde_json::from_value::<keymint_core::audit::AuditEvent>(e.clone())
            .map_err(|e| e.to_string())
    }));
    assert!(report.ok(), "{report:?}");
    let head = events.last().unwrap()["seq"].as_u64().unwrap();
    for r in &replicas {
        file_verifies(r, head).await;
    }
    for r in &mut replicas {
        r.kill_9().await;
    }
}

/// A PostgreSQL store that stops taking writes (a read-only standby after a
/// fail-over) makes the server not ready within a
/// heartbeat, and writes answer 503; once writes pass again, it is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_store_that_cannot_write_makes_the_server_not_ready() {
    let Some(db) = fresh_database().await else {
        return;
    };
    let s = keymint_testkit::TestServer::builder()
        .storage(keymint_server::config::StorageBackend::Postgres {
            options: Box::new(
                keymint_store::PostgresOptions::new(
                    &format!("postgres://postgres@127.0.0.1:5432/{db}"),
                    None,
                    4,
                    keymint_store::PgTls::Disable,
                )
                .unwrap(),
            ),
            password_file: None,
        })
        .start()
        .await
        .unwrap();
    let health = |s: &keymint_testkit::TestServer| {
        let c = s.admin();
        async move {
            c.raw(http::Method::GET, "/v1/health", None, vec![])
                .await
                .unwrap()
                .status
                .as_u16()
        }
    };
    assert_eq!(health(&s).await, 200);
    let pg = crate::postgres::admin_conn().await.unwrap();
    // The database turns read-only, as a standby does.
    let read_only = |on: bool| set_read_only(&pg, &db, on);
    read_only(true).await;
    let t0 = Instant::now();
    while health(&s).await != 503 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "still ready while the store cannot write"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = s
        .admin()
        .raw(
            http::Method::POST,
            "/v1/tasks",
            Some("application/json"),
            json!({"workload": "agent", "role": "demo"})
                .to_string()
                .into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(!r.text().contains("read-only"), "no database detail leaks");
    assert!(!r.text().contains("SQLSTATE"), "no database detail leaks");
    read_only(false).await;
    let t0 = Instant::now();
    while health(&s).await != 200 {
        assert!(t0.elapsed() < Duration::from_secs(15), "never ready again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.stop().await;
}

/// While the store cannot write (a read-only standby after a fail-over),
/// the egress proxy cannot reserve a request's budget: it answers 503
/// `temporarily_unavailable` with `Retry-After`, as the API does and as
/// docs/design/0040 says, not a 500 (which tells a client nothing about
/// when to come back); once writes pass again, the request goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_answers_503_while_the_store_cannot_write() {
    let Some(db) = crate::replicas::fresh_database().await else {
        return;
    };
    let up = FakeUpstream::start(KEY).await.unwrap();
    let s = keymint_testkit::TestServer::builder()
        .storage(crate::replicas::storage(&db))
        .config_toml(&format!(
            r#"
[[upstreams]]
name = "openai"
kind = "openai"
base_url = "{}/v1"

[[roles]]
name = "five"
engine = "token"
upstream = "openai"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
models = ["gpt-4o-mini"]
endpoints = ["chat.completions"]
max_requests = 5
"#,
            up.url()
        ))
        .start()
        .await
        .unwrap();
    crate::set_upstream_key(&s.admin(), "openai", KEY).await;
    let t = start_task(&s.admin(), "five", 600).await;
    let (_, token) = crate::issue(&s.admin(), &t.id).await;
    let agent = s.client(&token);
    let chat = || {
        let agent = agent.clone();
        async move {
            agent
                .raw(
                    http::Method::POST,
                    "/proxy/openai/chat/completions",
                    Some("application/json"),
                    chat_body(),
                )
                .await
                .unwrap()
        }
    };
    assert_eq!(chat().await.status, 200);
    let pg = crate::postgres::admin_conn().await.unwrap();
    let read_only = |on: bool| set_read_only(&pg, &db, on);
    read_only(true).await;
    // Every answer while the store cannot write is a 503 a client can act
    // on (a request may also be refused as unauthenticated while the
    // store's connections come back: never a 500).
    let t0 = Instant::now();
    let mut seen_503 = false;
    while !seen_503 {
        let r = chat().await;
        assert_ne!(r.status, 500, "{}", r.text());
        if r.status == 503 {
            let v: Value = r.json().unwrap();
            assert_eq!(v["error"]["code"], "temporarily_unavailable", "{v}");
            assert_eq!(
                r.headers.get("retry-after").and_then(|v| v.to_str().ok()),
                Some("1")
            );
            seen_503 = true;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the proxy never answered 503 while the store could not write"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    read_only(false).await;
    let t0 = Instant::now();
    loop {
        let r = chat().await;
        if r.status == 200 {
            break;
        }
        assert_ne!(r.status, 500, "{}", r.text());
        assert!(t0.elapsed() < Duration::from_secs(15), "never served again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.stop().await;
}

/// Turns database `db` read-only (or back), as a standby is: new sessions
/// refuse writes, and the sessions open now are cut so that the store
/// reconnects to one (`pg` is a session of another database). Two statements, not one batch: a batch is one
/// implicit transaction, so a session that started between the
/// termination and the batch's commit kept the old setting.
async fn set_read_only(pg: &tokio_postgres::Client, db: &str, on: bool) {
    pg.batch_execute(&format!(
        "ALTER DATABASE {db} SET default_transaction_read_only = {}",
        if on { "on" } else { "off" }
    ))
    .await
    .unwrap();
    pg.batch_execute(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{db}' AND pid <> pg_backend_pid()"
    ))
    .await
    .unwrap();
}

/// A replica that starts (or restarts after a kill -9) while another is
/// issuing leaves that replica's in-flight pending leases alone: its
/// start-up reconciliation takes only its own, owner-less or dead
/// replicas' pending leases (docs/design/0022). Every database user the
/// issuing replica handed out stays active and usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_replica_leaves_another_replicas_issuance_alone() {
    let Some(db) = fresh_database().await else {
        return;
    };
    let pg = admin_conn().await.unwrap();
    let schema = crate::postgres::schema(&pg).await;
    // The creation sleeps, so that leases are pending while B starts.
    let extra = format!(
        r#"
[[databases]]
name = "main"
engine = "postgres"
connection = "host=127.0.0.1 port=5432 user=postgres dbname=test"

[[roles]]
name = "analyst"
engine = "postgres"
database = "main"
creation_statements = ["SELECT pg_sleep(0.2), '{{{{name}}}}'::text", "GRANT USAGE ON SCHEMA {schema} TO {{{{name}}}}"]
scopes = ["db:read"]
default_ttl = "5m"
max_ttl = "10m"
"#
    );
    let base = tempfile::tempdir().unwrap();
    let a = Replica::start(base.path(), "a", &db, &extra, None).await;
    let seed = a.data.clone();
    let mut b = Replica::start(base.path(), "b", &db, &extra, Some(&seed)).await;
    let api = a.admin.clone();
    let task = start_task(&api, "analyst", 600).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut issuers = Vec::new();
    for _ in 0..3 {
        let (c, task, stop) = (api.clone(), task.id.clone(), Arc::clone(&stop));
        issuers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let (l, _) = crate::issue(&c, &task).await;
                let keymint_proto::Credential::Database { username, .. } = &l.credential else {
                    panic!("not a database credential");
                };
                got.push((l.lease.id.clone(), username.clone()));
            }
            got
        }));
    }
    // B restarts three times while A issues; each start reconciles.
    let mut pending_seen = 0;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.kill_9().await;
        pending_seen += usize::from(
            pg_count(&db, "SELECT count(*) FROM leases WHERE state = 'pending'").await > 0,
        );
        b.spawn().await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut issued = Vec::new();
    for h in issuers {
        issued.extend(h.await.unwrap());
    }
    assert!(!issued.is_empty());
    assert!(pending_seen > 0, "no lease was pending while B started");
    // B's start-up work (and a duty holder's sweeps) have run by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (id, user) in &issued {
        let l: Lease = b.admin.get(&format!("/v1/leases/{id}")).await.unwrap();
        assert_eq!(l.state, LeaseState::Active, "lease {id} was ended: {l:?}");
        assert!(role_exists(&pg, user).await, "user of lease {id} dropped");
    }
    let mut replicas = vec![a, b];
    for r in &mut replicas {
        r.kill_9().await;
    }
    pg.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

async fn pg_count(db: &str, sql: &str) -> i64 {
    let (c, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port=5432 user=postgres dbname={db}"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// A PostgreSQL connection lost under a read (the database restarted or
/// failed over, a network path dropped) is an outage, not a fault of
/// keymint's: the API answers 503 with `Retry-After`, as it does when a
/// write cannot commit or no connection can be had, never 500 `internal`.
/// Once the database answers again, the same server serves the read
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_on_a_lost_postgres_connection_answers_503_and_recovers() {
    let Some(db) = fresh_database().await else {
        return;
    };
    let relay = Relay::start().await;
    let s = keymint_testkit::TestServer::builder()
        .storage(keymint_server::config::StorageBackend::Postgres {
            options: Box::new(
                keymint_store::PostgresOptions::new(
                    &format!("postgres://postgres@127.0.0.1:{}/{db}", relay.port),
                    None,
                    4,
                    keymint_store::PgTls::Disable,
                )
                .unwrap(),
            ),
            password_file: None,
        })
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let task = start_task(&admin, "demo", 600).await;
    let path = format!("/v1/tasks/{}", task.id);
    let read = || {
        let (admin, path) = (admin.clone(), path.clone());
        async move {
            admin
                .raw(http::Method::GET, &path, None, vec![])
                .await
                .unwrap()
        }
    };
    // Every pooled connection has served a read.
    for _ in 0..8 {
        assert_eq!(read().await.status, 200);
    }
    // The database goes away: each open connection is cut at its next
    // request, new ones are refused.
    relay.set_down(true);
    for _ in 0..6 {
        let r = read().await;
        assert_eq!(r.status, 503, "{}", r.text());
        let v: Value = r.json().unwrap();
        assert_eq!(v["code"], "unavailable", "{v}");
        assert!(r.headers.get("retry-after").is_some());
        assert!(!r.text().contains("SQLSTATE"), "no database detail leaks");
    }
    relay.set_down(false);
    let t0 = Instant::now();
    loop {
        let r = read().await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(t0.elapsed() < Duration::from_secs(15), "never served again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.stop().await;
}

/// A replica that dies while it ends a task with more leases than one
/// batch (`END_TASK_LEASES`) has ended the task and moved the first batch
/// to `revoking`; the rest are still active. Its claims are taken over by
/// the replica holding the duties, and so must the rest be, while the
/// survivors run on (docs/design/0020): they used to wait for some replica
/// to start, and a database user among them could log in until its own
/// expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_dying_while_it_ends_a_large_task_leaves_no_lease_active() {
    use keymint_core::Clock;
    let Some(db) = crate::replicas::fresh_database().await else {
        return;
    };
    let s = keymint_testkit::TestServer::builder()
        .storage(crate::replicas::storage(&db))
        .start()
        .await
        .unwrap();
    let task = start_task(&s.admin(), "demo", 600).await;
    let store = Arc::clone(s.broker().store());
    let task = store.get_task(&task.id).await.unwrap().unwrap();
    // The replica that dies: a store of its own on the same database.
    let dying = keymint_store::PostgresStore::open(
        keymint_store::PostgresOptions::new(
            &format!("postgres://postgres@127.0.0.1:5432/{db}"),
            None,
            4,
            keymint_store::PgTls::Disable,
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let dying: Arc<dyn keymint_store::Store> = Arc::new(dying);
    let n = keymint_store::END_TASK_LEASES as usize + 3;
    let mut issuing = tokio::task::JoinSet::new();
    for i in 0..n {
        let (store, task) = (Arc::clone(&dying), task.clone());
        issuing.spawn(async move {
            let now = task.created_at.plus_millis(i64::try_from(i).unwrap());
            let l = keymint_store::conformance::lease(
                &task,
                keymint_core::model::LeaseState::Active,
                now,
                600,
            );
            let ev = keymint_core::audit::AuditDraft::new(now, "lease.issued", "admin")
                .task(&task.id)
                .lease(&l.id);
            store
                .insert_lease(&task.id, Box::new(move |_| Ok((l, ev))))
                .await
                .unwrap()
        });
    }
    while issuing.join_next().await.is_some() {}
    // It ends the task (the first batch moved, claimed by it) and dies
    // before it takes the rest.
    let ended = dying
        .end_task(keymint_store::TaskEnd {
            id: task.id.clone(),
            status: keymint_core::model::TaskStatus::Completed,
            now: keymint_core::SystemClock.now(),
            actor: "admin".into(),
            reason: None,
        })
        .await
        .unwrap()
        .unwrap();
    assert!(ended.more, "the task has more leases than one batch");
    drop(dying);

    let leases = || {
        let store = Arc::clone(&store);
        let id = task.id.clone();
        async move {
            store
                .list_leases(&keymint_store::LeaseFilter {
                    task: Some(id),
                    limit: 10_000,
                    ..Default::default()
                })
                .await
                .unwrap()
        }
    };
    assert_eq!(leases().await.len(), n);
    // Dead after 5 s without a heartbeat, taken over within a second.
    let t0 = Instant::now();
    loop {
        let left: Vec<_> = leases()
            .await
            .into_iter()
            .filter(|l| l.state != keymint_core::model::LeaseState::Revoked)
            .map(|l| l.state)
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{} leases of the ended task are not revoked: {:?}",
            left.len(),
            left.iter().take(5).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s.stop().await;
}
