//! Dynamic PostgreSQL users against the real server on 127.0.0.1:5432.
//! Outside CI a missing server skips these tests with a message; under
//! `CI=true` it fails them.

use keymint_core::model::Role;
use keymint_core::role::{DatabaseRole, RoleKind};
use keymint_proto::{Credential, Lease, LeaseState, StartTask, Task};
use keymint_testkit::TestServer;
use tokio_postgres::NoTls;

const ADMIN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

#[allow(
    clippy::disallowed_methods,
    reason = "tests read CI to decide skip or fail"
)]
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

pub async fn admin_conn() -> Option<tokio_postgres::Client> {
    match tokio_postgres::connect(ADMIN, NoTls).await {
        Ok((c, conn)) => {
            tokio::spawn(conn);
            Some(c)
        }
        Err(e) => {
            assert!(
                !in_ci(),
                "PostgreSQL at 127.0.0.1:5432 is required in CI: {e}"
            );
            eprintln!("skipping: no PostgreSQL at 127.0.0.1:5432 ({e})");
            None
        }
    }
}

pub fn pg_role(name: &str, schema: &str) -> Role {
    Role {
        name: name.into(),
        scopes: vec!["db:read".into()],
        default_ttl_secs: 300,
        max_ttl_secs: 600,
        description: None,
        kind: RoleKind::Postgres(DatabaseRole {
            database: "main".into(),
            creation_statements: vec![
                format!("GRANT USAGE ON SCHEMA {schema} TO {{{{name}}}}"),
                format!("GRANT SELECT ON {schema}.orders TO {{{{name}}}}"),
            ],
            max_connections: keymint_core::role::DEFAULT_MAX_CONNECTIONS,
        }),
    }
}

/// A schema of its own per test, with a readable and a forbidden table.
pub async fn schema(admin: &tokio_postgres::Client) -> String {
    let name = format!(
        "km_{}",
        keymint_core::token::random_base62(10)
            .unwrap()
            .to_lowercase()
    );
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA {name}; CREATE TABLE {name}.orders (id int); INSERT INTO {name}.orders VALUES (1), (2);
             CREATE TABLE {name}.secrets (v text); INSERT INTO {name}.secrets VALUES ('classified');"
        ))
        .await
        .unwrap();
    name
}

async fn login(c: &Credential) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let Credential::Database {
        host,
        port,
        database,
        username,
        password,
        ..
    } = c
    else {
        panic!("not a database credential");
    };
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(host)
        .port(*port)
        .dbname(database)
        .user(username)
        .password(password.expose());
    let (client, conn) = cfg.connect(NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

async fn role_exists(admin: &tokio_postgres::Client, user: &str) -> bool {
    admin
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&user])
        .await
        .unwrap()
        .is_some()
}

/// The user's VALID UNTIL, to the second, as RFC 3339 without zone.
async fn valid_until(pg: &tokio_postgres::Client, user: &str) -> String {
    pg.query_one(
        "SELECT to_char(rolvaliduntil AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS') FROM pg_roles WHERE rolname = $1",
        &[&user],
    )
    .await
    .unwrap()
    .get(0)
}

fn username(c: &Credential) -> String {
    match c {
        Credential::Database { username, .. } => username.clone(),
        _ => panic!("not a database credential"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_user_can_do_what_its_grants_say_and_dies_with_its_lease() {
    let Some(pg) = admin_conn().await else { return };
    let schema = schema(&pg).await;
    let s = TestServer::builder()
        .postgres("main", ADMIN)
        .role(pg_role("analyst", &schema))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t: Task = admin
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some(r#"bot"; DROP ROLE postgres; --"#.into()),
                role: Some("analyst".into()),
                intent: Some("it's a report'); DROP TABLE x; --".into()),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    let (issued, _) = crate::issue(&admin, &t.id).await;
    assert_eq!(issued.lease.state, LeaseState::Active);
    let user = username(&issued.credential);
    assert!(user.starts_with("keymint_lse_"));

    // What the grants allow, and nothing else.
    let db = login(&issued.credential).await.unwrap();
    let n: i64 = db
        .query_one(&format!("SELECT count(*) FROM {schema}.orders"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let denied = db
        .query(&format!("SELECT * FROM {schema}.secrets"), &[])
        .await
        .unwrap_err();
    assert_eq!(
        denied.as_db_error().unwrap().code().code(),
        "42501",
        "insufficient privilege"
    );
    assert!(db.batch_execute("CREATE ROLE sneaky").await.is_err());

    // The safety net in the database itself: VALID UNTIL = the lease's end.
    let until = valid_until(&pg, &user).await;
    assert_eq!(until, issued.lease.expires_at.rfc3339()[..19]);
    // Renewing moves the database's own expiry too.
    let renewed: keymint_proto::Renewed = admin
        .post(
            &format!("/v1/leases/{}/renew", issued.lease.id),
            &keymint_proto::RenewLease {
                increment_secs: Some(600),
            },
        )
        .await
        .unwrap();
    assert!(renewed.lease.expires_at > issued.lease.expires_at);
    let until = valid_until(&pg, &user).await;
    assert_eq!(until, renewed.lease.expires_at.rfc3339()[..19]);
    // PostgreSQL stored keymint's SCRAM verifier as is (a string it could
    // not parse would have been hashed as a plaintext password instead).
    let stored: String = pg
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        stored.starts_with("SCRAM-SHA-256$128:"),
        "{}",
        &stored[..20]
    );
    let Credential::Database { password, .. } = &issued.credential else {
        unreachable!()
    };
    let salt_b64 = stored.split(['$', ':']).nth(2).unwrap();
    let salt: [u8; 16] =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, salt_b64)
            .unwrap()
            .try_into()
            .unwrap();
    assert_eq!(
        stored,
        keymint_engines::postgres::scram_verifier(password.expose(), &salt, 128)
    );
    // The hostile workload name did nothing.
    assert!(role_exists(&pg, "postgres").await);

    // Revoking ends the open session and the login.
    let l: Lease = admin
        .post_empty(&format!("/v1/leases/{}/revoke", issued.lease.id))
        .await
        .unwrap();
    assert_eq!(l.state, LeaseState::Revoked);
    assert!(
        db.query_one("SELECT 1", &[]).await.is_err(),
        "the open session must be gone"
    );
    assert!(
        login(&issued.credential).await.is_err(),
        "the user must not log in again"
    );
    assert!(!role_exists(&pg, &user).await);

    // Ending the task drops every user of it.
    let (a, _) = crate::issue(&admin, &t.id).await;
    let (b, _) = crate::issue(&admin, &t.id).await;
    assert!(role_exists(&pg, &username(&a.credential)).await);
    let _: Task = admin
        .post_empty(&format!("/v1/tasks/{}/revoke", t.id))
        .await
        .unwrap();
    for c in [&a.credential, &b.credential] {
        assert!(!role_exists(&pg, &username(c)).await);
    }
    pg.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_created_before_a_crash_is_dropped_by_reconciliation() {
    let Some(pg) = admin_conn().await else { return };
    let schema = schema(&pg).await;
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::builder()
        .data_dir(dir.path())
        .postgres("main", ADMIN)
        .role(pg_role("analyst", &schema))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "analyst", "w").await;
    // The state a crash between "user created" and "lease active" leaves:
    // a pending lease whose user exists.
    let engine = keymint_engines::postgres::PostgresEngine::new(
        vec![keymint_engines::postgres::Database::parse("main", ADMIN).unwrap()],
        s.broker().installation_id(),
    );
    let (lease_id, prepared) = crate::pending_lease_applied(&s, &t.id, "analyst", &engine).await;
    let user = username(&prepared.credential);
    assert!(role_exists(&pg, &user).await);
    s.stop().await;

    // At restart, reconciliation revokes the pending lease and drops the user.
    let s = TestServer::builder()
        .data_dir(dir.path())
        .postgres("main", ADMIN)
        .role(pg_role("analyst", &schema))
        .start()
        .await
        .unwrap();
    assert!(
        !role_exists(&pg, &user).await,
        "the crash leftover must be gone"
    );
    let l: Lease = s
        .admin()
        .get(&format!("/v1/leases/{lease_id}"))
        .await
        .unwrap();
    assert_eq!(l.state, LeaseState::Revoked);
    assert_eq!(
        l.end_reason,
        Some(keymint_core::model::EndReason::Reconciled)
    );
    pg.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_drops_only_this_installations_orphans() {
    let Some(pg) = admin_conn().await else { return };
    let schema = schema(&pg).await;
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        TestServer::builder()
            .data_dir(dir.path())
            .postgres("main", ADMIN)
            .role(pg_role("analyst", &schema))
            .start()
    };
    let s = start().await.unwrap();
    let install = s.broker().installation_id().to_owned();
    s.stop().await;

    let now = keymint_core::Clock::now(&keymint_core::SystemClock);
    let ids: Vec<String> = (0..3).map(|_| keymint_core::id::lease_id(now)).collect();
    let (orphan_lease, untagged_lease, other_lease) = (&ids[0], &ids[1], &ids[2]);
    let orphan = format!("keymint_{orphan_lease}");
    let untagged = format!("keymint_{untagged_lease}");
    let other_install = format!("keymint_{other_lease}");
    let foreign = format!("{schema}_app_user");
    pg.batch_execute(&format!(
        "CREATE ROLE \"{orphan}\" LOGIN;
         COMMENT ON ROLE \"{orphan}\" IS 'keymint lease {orphan_lease} task tsk_gone installation {install}';
         CREATE ROLE \"{untagged}\" LOGIN;
         CREATE ROLE \"{other_install}\" LOGIN;
         COMMENT ON ROLE \"{other_install}\" IS 'keymint lease {other_lease} task t installation 0000000000000000';
         CREATE ROLE \"{foreign}\" LOGIN;
         COMMENT ON ROLE \"{foreign}\" IS 'keymint lease {orphan_lease} task t installation {install}';"
    ))
    .await
    .unwrap();

    // At start, this installation's tagged orphan goes. The look-alike
    // without a tag, another installation's user on the same server, and the
    // user keymint never named all stay.
    let s = start().await.unwrap();
    assert!(
        !role_exists(&pg, &orphan).await,
        "a tagged orphan must be dropped"
    );
    assert!(
        role_exists(&pg, &untagged).await,
        "a name alone is not keymint's tag"
    );
    assert!(
        role_exists(&pg, &other_install).await,
        "another installation's users are not ours"
    );
    assert!(
        role_exists(&pg, &foreign).await,
        "users keymint did not create are never touched"
    );
    let events = s.broker().store().audit_tail(50).await.unwrap();
    assert!(events.iter().any(|e| e.kind == "credential.orphan_removed"
        && e.lease.as_deref() == Some(orphan_lease.as_str())));

    // A live lease's user survives reconciliation.
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "analyst", "w").await;
    let (live, _) = crate::issue(&admin, &t.id).await;
    assert_eq!(s.broker().reconcile_engines().await.unwrap(), 0);
    assert!(role_exists(&pg, &username(&live.credential)).await);

    let _: Task = admin
        .post_empty(&format!("/v1/tasks/{}/revoke", t.id))
        .await
        .unwrap();
    pg.batch_execute(&format!(
        "DROP ROLE \"{untagged}\"; DROP ROLE \"{other_install}\"; DROP ROLE \"{foreign}\"; DROP SCHEMA {schema} CASCADE;"
    ))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keymint_run_gives_psql_a_user_of_its_own() {
    let Some(pg) = admin_conn().await else { return };
    let schema = schema(&pg).await;
    let s = TestServer::builder()
        .postgres("main", ADMIN)
        .role(pg_role("analyst", &schema))
        .start()
        .await
        .unwrap();
    let script = format!(
        "psql -Atc 'SELECT current_user' && psql -Atc 'SELECT count(*) FROM {schema}.orders'"
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keymint"))
        .args([
            "run",
            "--role",
            "analyst",
            "--workload",
            "w",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .env("KEYMINT_ADDR", s.url())
        .env("KEYMINT_TOKEN", &s.admin_token)
        .env_remove("PGUSER")
        .env_remove("PGPASSWORD")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut lines = stdout.lines();
    let user = lines.next().unwrap().to_owned();
    assert!(
        user.starts_with("keymint_lse_"),
        "psql ran as the leased user: {user}"
    );
    assert_eq!(lines.next(), Some("2"));
    assert!(
        !role_exists(&pg, &user).await,
        "the user is gone once the command exited"
    );
    pg.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

/// How many connections `user` has open on the server.
async fn connections_of(pg: &tokio_postgres::Client, user: &str) -> i64 {
    pg.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
        &[&user],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_concurrent_issuances_than_admin_connections_all_succeed_within_the_cap() {
    let Some(pg) = admin_conn().await else { return };
    let schema = schema(&pg).await;
    // An admin of its own, so that its connections can be counted.
    let admin_user = format!(
        "kmpool_{}",
        keymint_core::token::random_base62(8)
            .unwrap()
            .to_lowercase()
    );
    // Users join a group role: concurrent grants on one shared object
    // collide in PostgreSQL's catalog (docs/benchmarks.md).
    let group = format!("{admin_user}_readers");
    pg.batch_execute(&format!(
        "CREATE ROLE {admin_user} LOGIN SUPERUSER; CREATE ROLE {group} NOLOGIN; \
         GRANT USAGE ON SCHEMA {schema} TO {group}; GRANT SELECT ON {schema}.orders TO {group}"
    ))
    .await
    .unwrap();
    let mut role = pg_role("analyst", &schema);
    if let RoleKind::Postgres(d) = &mut role.kind {
        d.creation_statements = vec![format!("GRANT {group} TO {{{{name}}}}")];
    }
    let s = TestServer::builder()
        .postgres(
            "main",
            &format!("host=127.0.0.1 port=5432 user={admin_user} dbname=test"),
        )
        .role(role)
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let cap = i64::try_from(keymint_engines::postgres::POOL_MAX).unwrap();
    let issuances = 5 * keymint_engines::postgres::POOL_MAX;

    // Count the admin's connections all through the burst.
    let done = std::sync::Arc::new(tokio::sync::Notify::new());
    let watcher = {
        let done = std::sync::Arc::clone(&done);
        let admin_user = admin_user.clone();
        tokio::spawn(async move {
            let pg = admin_conn().await.unwrap();
            let mut peak = 0;
            let stopped = done.notified();
            tokio::pin!(stopped);
            loop {
                peak = peak.max(connections_of(&pg, &admin_user).await);
                tokio::select! {
                    () = &mut stopped => return peak,
                    () = tokio::task::yield_now() => {}
                }
            }
        })
    };
    let t = crate::start_task_in(&admin, "analyst", "w").await;
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..issuances {
        let (admin, task) = (admin.clone(), t.id.clone());
        burst.spawn(async move { crate::issue(&admin, &task).await.0 });
    }
    let mut users = std::collections::HashSet::new();
    while let Some(issued) = burst.join_next().await {
        let issued = issued.unwrap();
        assert_eq!(issued.lease.state, LeaseState::Active);
        users.insert(username(&issued.credential));
    }
    done.notify_one();
    let peak = watcher.await.unwrap();
    assert_eq!(
        users.len(),
        issuances,
        "every issuance made a user of its own"
    );
    for user in &users {
        assert!(role_exists(&pg, user).await, "{user} must exist");
    }
    assert!(
        peak <= cap,
        "keymint held {peak} admin connections, more than {cap}"
    );
    // The burst needed more than one connection, and the pool keeps what it
    // opened, never more than the cap.
    let kept = connections_of(&pg, &admin_user).await;
    assert!((2..=cap).contains(&kept), "{kept} admin connections kept");

    let _: Task = admin
        .post_empty(&format!("/v1/tasks/{}/revoke", t.id))
        .await
        .unwrap();
    for user in &users {
        assert!(!role_exists(&pg, user).await, "{user} must be dropped");
    }
    assert!(connections_of(&pg, &admin_user).await <= cap);
    s.stop().await;
    pg.batch_execute(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{admin_user}'; \
         DROP SCHEMA {schema} CASCADE; DROP ROLE {group}; DROP ROLE {admin_user}"
    ))
    .await
    .unwrap();
}

/// A TCP relay to the real PostgreSQL that can be made to hang, as a
/// stopped server does: it keeps every connection open and reads what it
/// is sent, but passes nothing on and answers nothing.
struct Relay {
    port: u16,
    hung: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    async fn start() -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hung = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let h = hung.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let h = h.clone();
                tokio::spawn(async move {
                    if h.load(Ordering::SeqCst) {
                        // Held open, never answered.
                        let _held = client;
                        return std::future::pending::<()>().await;
                    }
                    let Ok(server) = tokio::net::TcpStream::connect("127.0.0.1:5432").await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(Self::pipe(cr, sw, h.clone()));
                    Self::pipe(sr, cw, h).await;
                });
            }
        });
        Self { port, hung }
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        hung: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            while hung.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    fn hang(&self, on: bool) {
        self.hung.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    fn connection(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=test",
            self.port
        )
    }
}

/// Polls `check` every 50 ms until it holds or `secs` pass.
async fn within<F, Fut>(secs: u64, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    while tokio::time::Instant::now() < end {
        if check().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    check().await
}

async fn lease_state(admin: &keymint_client::Client, id: &str) -> LeaseState {
    admin
        .get::<Lease>(&format!("/v1/leases/{id}"))
        .await
        .unwrap()
        .state
}

/// One database that hangs (it accepts and never answers) delays no other
/// revocation: when three tasks time out together, the hung database's
/// first, a token task's lease and a user on the healthy PostgreSQL are
/// revoked at once while the hung call waits out its deadline; when the
/// database answers again, its user is dropped at the next retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_database_delays_no_other_revocation() {
    let Some(pg) = admin_conn().await else { return };
    let schema = schema(&pg).await;
    let relay = Relay::start().await;
    let clock = keymint_core::ManualClock::new(keymint_core::Timestamp(1_900_000_000_000));
    let mut stuck_role = pg_role("stuck", &schema);
    if let RoleKind::Postgres(d) = &mut stuck_role.kind {
        d.database = "stuck".into();
    }
    let s = TestServer::builder()
        .clock(clock.clone())
        .postgres("main", ADMIN)
        .postgres("stuck", &relay.connection())
        .role(pg_role("analyst", &schema))
        .role(stuck_role)
        .start()
        .await
        .unwrap();
    s.broker()
        .set_provider_deadline(std::time::Duration::from_secs(8));
    let admin = s.admin();
    let start = |role: &'static str, ttl: u64| {
        let admin = admin.clone();
        async move {
            admin
                .post::<_, Task>(
                    "/v1/tasks",
                    &StartTask {
                        workload: Some("bot".into()),
                        role: Some(role.into()),
                        ttl_secs: Some(ttl),
                        ..StartTask::default()
                    },
                )
                .await
                .unwrap()
        }
    };
    let on_stuck = start("stuck", 30).await;
    let (stuck_lease, _) = crate::issue(&admin, &on_stuck.id).await;
    let on_main = start("analyst", 40).await;
    let (main_lease, _) = crate::issue(&admin, &on_main.id).await;
    let tokens = start("demo", 50).await;
    let (token_lease, token) = crate::issue(&admin, &tokens.id).await;
    let stuck_user = username(&stuck_lease.credential);
    let main_user = username(&main_lease.credential);
    assert!(role_exists(&pg, &stuck_user).await);

    relay.hang(true);
    clock.advance_secs(60);
    // The expiry manager (running in the background) times all three out.
    let (a, m, t) = (
        admin.clone(),
        main_lease.lease.id.clone(),
        token_lease.lease.id.clone(),
    );
    let on_time = within(5, || {
        let (a, m, t, pg, user) = (a.clone(), m.clone(), t.clone(), &pg, main_user.clone());
        async move {
            lease_state(&a, &t).await == LeaseState::Revoked
                && lease_state(&a, &m).await == LeaseState::Revoked
                && !role_exists(pg, &user).await
        }
    })
    .await;
    assert!(
        on_time,
        "the token lease and the healthy database's user are revoked while the other database hangs"
    );
    assert!(!crate::introspect(&admin, &token).await.active);
    assert_eq!(
        lease_state(&admin, &stuck_lease.lease.id).await,
        LeaseState::Revoking
    );
    // The hung call gives up at its deadline and is scheduled again.
    let sid = stuck_lease.lease.id.clone();
    let failed = within(15, || {
        let (a, sid) = (admin.clone(), sid.clone());
        async move {
            a.get::<Lease>(&format!("/v1/leases/{sid}"))
                .await
                .unwrap()
                .revoke_attempts
                >= 1
        }
    })
    .await;
    assert!(failed, "the hung call ends at its deadline");
    let l: Lease = admin.get(&format!("/v1/leases/{sid}")).await.unwrap();
    assert!(
        l.last_error
            .as_deref()
            .unwrap_or("")
            .contains("no answer within"),
        "{:?}",
        l.last_error
    );
    assert!(role_exists(&pg, &stuck_user).await);

    // The database answers again: the next retry (at most 30 s later)
    // drops the user.
    relay.hang(false);
    clock.advance_secs(31);
    let dropped = within(20, || {
        let user = stuck_user.clone();
        let pg = &pg;
        async move { !role_exists(pg, &user).await }
    })
    .await;
    assert!(
        dropped,
        "dropped at the first retry once the database answers"
    );
    pg.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

/// Keymint's admin need not be superuser: with CREATEROLE alone (PostgreSQL
/// 15) it drops users that own objects, by taking membership in them
/// first. An admin without CREATEROLE is refused at start, saying what to
/// grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_createrole_admin_that_is_not_superuser_drops_users_that_own_objects() {
    let Some(pg) = admin_conn().await else { return };
    let suffix = keymint_core::token::random_base62(10)
        .unwrap()
        .to_lowercase();
    let (adm, weak, schema) = (
        format!("km_adm_{suffix}"),
        format!("km_weak_{suffix}"),
        format!("km_{suffix}"),
    );
    pg.batch_execute(&format!(
        "CREATE ROLE {adm} LOGIN CREATEROLE PASSWORD 'km-test-only'; \
         CREATE ROLE {weak} LOGIN PASSWORD 'km-test-only'; \
         CREATE SCHEMA {schema} AUTHORIZATION {adm};"
    ))
    .await
    .unwrap();
    let conn = |user: &str| {
        format!("host=127.0.0.1 port=5432 user={user} password=km-test-only dbname=test")
    };
    let mut role = pg_role("owner", &schema);
    if let RoleKind::Postgres(d) = &mut role.kind {
        d.creation_statements = vec![format!(
            "GRANT USAGE, CREATE ON SCHEMA {schema} TO {{{{name}}}}"
        )];
    }

    // Without CREATEROLE: a clear error at start.
    let refused = TestServer::builder()
        .postgres("main", &conn(&weak))
        .role(role.clone())
        .start()
        .await
        .unwrap_err();
    let msg = format!("{refused:#}");
    assert!(msg.contains("CREATEROLE"), "{msg}");
    assert!(!msg.contains("km-test-only"), "no password in the error");

    let s = TestServer::builder()
        .postgres("main", &conn(&adm))
        .role(role)
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "owner", "bot").await;
    let (issued, _) = crate::issue(&admin, &t.id).await;
    let user = username(&issued.credential);
    // The user makes something of its own, and code and a view that run
    // with their owner's rights, offered to everyone.
    let db = login(&issued.credential).await.unwrap();
    db.batch_execute(&format!(
        "CREATE TABLE {schema}.notes (v text); INSERT INTO {schema}.notes VALUES ('mine'); \
         CREATE FUNCTION {schema}.whoami() RETURNS text LANGUAGE sql SECURITY DEFINER \
           AS 'SELECT current_user::text'; \
         GRANT EXECUTE ON FUNCTION {schema}.whoami() TO PUBLIC; \
         CREATE VIEW {schema}.everything AS SELECT rolname FROM pg_authid; \
         GRANT SELECT ON {schema}.everything TO PUBLIC;"
    ))
    .await
    .unwrap();
    let _: Task = admin
        .post_empty(&format!("/v1/tasks/{}/revoke", t.id))
        .await
        .unwrap();
    let l: Lease = admin
        .get(&format!("/v1/leases/{}", issued.lease.id))
        .await
        .unwrap();
    assert_eq!(l.state, LeaseState::Revoked, "{:?}", l.last_error);
    assert!(!role_exists(&pg, &user).await);
    // What it owned went with it: nothing it wrote now runs or reads with
    // keymint's admin's rights (before, the admin became its owner, and the
    // function ran as the admin for anyone).
    let left: i64 = pg
        .query_one(
            "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1) \
                  + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
                     WHERE n.nspname = $1)",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the user's table, view and function are dropped");
    drop(s);
    pg.batch_execute(&format!(
        "DROP SCHEMA {schema} CASCADE; DROP OWNED BY {adm}; DROP ROLE {adm}; DROP ROLE {weak};"
    ))
    .await
    .unwrap();
}

/// keymint's admin connection failing (here a login role that does not
/// exist) is the operator's to read in the log: the API client gets a
/// stable code, never the database's words naming keymint's admin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_error_reaches_the_client_as_a_stable_code_only() {
    let Some(pg) = admin_conn().await else {
        return;
    };
    let sch = schema(&pg).await;
    let admin_user = format!(
        "km_absent_admin_{}",
        keymint_core::token::random_base62(8)
            .unwrap()
            .to_lowercase()
    );
    let wrong = format!(
        "host=127.0.0.1 port=5432 user={admin_user} password=wrong-password-for-tests dbname=test"
    );
    let s = TestServer::builder()
        .postgres("main", &wrong)
        .role(pg_role("reader", &sch))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "reader", "w").await;
    let r = admin
        .raw(
            http::Method::POST,
            &format!("/v1/tasks/{}/leases", t.id),
            Some("application/json"),
            b"{}".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    let p: keymint_proto::Problem = r.json().unwrap();
    assert_eq!(p.code, "provider_unavailable", "{}", r.text());
    for leaked in [
        admin_user.as_str(),
        "wrong-password",
        "does not exist",
        "127.0.0.1",
        "5432",
    ] {
        assert!(
            !r.text().contains(leaked),
            "the body says `{leaked}`: {}",
            r.text()
        );
    }
}

/// A leased user allowed to create functions in a schema on the admin's
/// `search_path` (PostgreSQL 14's `public`, or any schema a role grants
/// `CREATE` on) plants a function named like a built-in that matches
/// keymint's own catalog queries better than the built-in does (the
/// CVE-2018-1058 pattern): `starts_with(name, text)`. keymint's
/// reconciliation and revocation must never run it, or it runs as
/// keymint's admin (a superuser here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leased_user_cannot_plant_a_function_that_keymint_runs_as_its_admin() {
    let Some(pg) = admin_conn().await else { return };
    let schema = schema(&pg).await;
    pg.batch_execute(&format!("CREATE TABLE {schema}.ran_as (who text)"))
        .await
        .unwrap();
    // The admin's search path names the workload's schema, as `public`
    // does by default.
    let conn = format!("{ADMIN} options='-c search_path={schema}'");
    let role = Role {
        kind: RoleKind::Postgres(DatabaseRole {
            database: "main".into(),
            creation_statements: vec![
                format!("GRANT USAGE, CREATE ON SCHEMA {schema} TO {{{{name}}}}"),
                format!("GRANT SELECT ON {schema}.orders TO {{{{name}}}}"),
            ],
            max_connections: keymint_core::role::DEFAULT_MAX_CONNECTIONS,
        }),
        ..pg_role("developer", &schema)
    };
    let s = TestServer::builder()
        .postgres("main", &conn)
        .role(role)
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "developer", "w").await;
    let (lease, _) = crate::issue(&admin, &t.id).await;
    let user = username(&lease.credential);
    let workload = login(&lease.credential).await.unwrap();
    for f in [
        "starts_with(name, text) RETURNS boolean",
        "pg_terminate_backend(integer) RETURNS boolean",
    ] {
        workload
            .batch_execute(&format!(
                "CREATE FUNCTION {schema}.{f} LANGUAGE plpgsql AS $$ BEGIN \
                 INSERT INTO {schema}.ran_as VALUES (current_user); RETURN true; END $$"
            ))
            .await
            .unwrap();
    }
    drop(workload);

    // Reconciliation lists keymint's users; the live lease stays.
    assert_eq!(s.broker().reconcile_engines().await.unwrap(), 0);
    assert!(role_exists(&pg, &user).await);
    // Revocation ends the user's sessions and drops it, with its functions.
    let _: Task = admin
        .post_empty(&format!("/v1/tasks/{}/revoke", t.id))
        .await
        .unwrap();
    assert!(!role_exists(&pg, &user).await);

    let ran: Vec<String> = pg
        .query(&format!("SELECT who FROM {schema}.ran_as"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        ran.is_empty(),
        "keymint ran the workload's function as {ran:?}"
    );
    pg.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

/// `KEYMINT_LOG=debug` (an operator chasing a problem) must not put a
/// new user's password, nor the SCRAM verifier keymint sends in its
/// place, into the log: the PostgreSQL client library logs every
/// statement it sends at debug.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debug_log_holds_neither_the_password_nor_the_verifier_of_a_new_user() {
    use tokio::io::AsyncBufReadExt;
    let Some(pg) = admin_conn().await else { return };
    let schema = schema(&pg).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/all.cedar"),
        "permit(principal, action, resource);",
    )
    .unwrap();
    let config = format!(
        r#"version = 1
[server]
listen = "127.0.0.1:0"
dangerous_plaintext = true
[storage]
data_dir = "{}"
[policy]
paths = ["{}"]
[[databases]]
name = "main"
engine = "postgres"
connection = "{ADMIN}"
[[roles]]
name = "analyst"
engine = "postgres"
database = "main"
creation_statements = ["GRANT USAGE ON SCHEMA {schema} TO {{{{name}}}}"]
scopes = ["db:read"]
default_ttl = "5m"
max_ttl = "10m"
"#,
        data.display(),
        dir.path().join("policies").display(),
    );
    let path = dir.path().join("keymint.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_keymint"))
        .args(["server", "--config"])
        .arg(&path)
        .env("KEYMINT_LOG", "debug")
        .env("KEYMINT_LOG_FORMAT", "json")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let kept = std::sync::Arc::clone(&log);
    let reader = tokio::spawn(async move {
        let mut addr_tx = Some(addr_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(" listening"))
                && let (Some(a), Some(tx)) = (v["addr"].as_str(), addr_tx.take())
            {
                let _ = tx.send(a.to_owned());
            }
            let mut k = kept.lock().unwrap();
            k.push_str(&line);
            k.push('\n');
        }
    });
    let addr = tokio::time::timeout(std::time::Duration::from_secs(30), addr_rx)
        .await
        .expect("keymint did not say where it listens")
        .unwrap();
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let admin = keymint_client::Client::new(&addr, Some(token.trim().to_owned())).unwrap();
    let t = crate::start_task_in(&admin, "analyst", "w").await;
    let (issued, password) = crate::issue(&admin, &t.id).await;
    let _: Task = admin
        .post_empty(&format!("/v1/tasks/{}/revoke", t.id))
        .await
        .unwrap();
    child.kill().await.unwrap();
    let _ = child.wait().await;
    reader.await.unwrap();
    let log = log.lock().unwrap().clone();
    assert!(
        log.contains("\"level\":\"DEBUG\""),
        "the log must be at debug"
    );
    assert!(!log.contains(&password), "the password is in the log");
    assert!(
        !log.contains("SCRAM-SHA-256$"),
        "a SCRAM verifier is in the log"
    );
    assert!(!role_exists(&pg, &username(&issued.credential)).await);
    pg.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

/// A login that passed PostgreSQL's `rolcanlogin` check just before the
/// revocation's `NOLOGIN` committed, but was not yet in `pg_stat_activity`
/// when the revocation ended the user's sessions, is still ended: the drop
/// ends the role's sessions again, by oid, after `DROP OWNED`. The test
/// makes the window wide: the late login waits on a lock on its database
/// (held by a rename that is rolled back), which PostgreSQL takes after the
/// login check and before the session is listed, and the drop waits on a
/// lock on a table the user owns until the late login is in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_in_flight_when_the_user_is_disabled_does_not_outlive_the_drop() {
    let Some(pg) = admin_conn().await else { return };
    let schema = schema(&pg).await;
    let scratch = format!("{schema}_db");
    pg.batch_execute(&format!("CREATE DATABASE {scratch}"))
        .await
        .unwrap();
    let mut role = pg_role("late", &schema);
    if let RoleKind::Postgres(d) = &mut role.kind {
        d.creation_statements = vec![format!(
            "GRANT USAGE, CREATE ON SCHEMA {schema} TO {{{{name}}}}"
        )];
    }
    let s = TestServer::builder()
        .postgres("main", ADMIN)
        .role(role)
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "late", "bot").await;
    let (issued, _) = crate::issue(&admin, &t.id).await;
    let user = username(&issued.credential);
    let oid: u32 = pg
        .query_one("SELECT oid FROM pg_roles WHERE rolname = $1", &[&user])
        .await
        .unwrap()
        .get(0);
    let own = login(&issued.credential).await.unwrap();
    own.batch_execute(&format!("CREATE TABLE {schema}.mine (v int)"))
        .await
        .unwrap();
    drop(own);

    // The late login: past the login check, waiting on its database.
    let (db_lock, c1) = tokio_postgres::connect(ADMIN, NoTls).await.unwrap();
    tokio::spawn(c1);
    db_lock
        .batch_execute(&format!(
            "BEGIN; ALTER DATABASE {scratch} RENAME TO {scratch}_x"
        ))
        .await
        .unwrap();
    let Credential::Database { password, .. } = &issued.credential else {
        unreachable!()
    };
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(5432)
        .dbname(&scratch)
        .user(&user)
        .password(password.expose());
    let late = tokio::spawn(async move {
        let (client, conn) = cfg.connect(NoTls).await?;
        tokio::spawn(conn);
        Ok::<_, tokio_postgres::Error>(client)
    });
    let waiting = |what: String| {
        let pg = &pg;
        async move {
            pg.query_one(
                &format!("SELECT count(*) FROM pg_locks WHERE NOT granted AND {what}"),
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
                > 0
        }
    };
    assert!(
        within(10, || {
            waiting("locktype = 'object' AND classid = 'pg_database'::regclass".into())
        })
        .await,
        "the late login waits on its database"
    );

    // The drop, held at DROP OWNED by a lock on the user's table.
    let (table_lock, c2) = tokio_postgres::connect(ADMIN, NoTls).await.unwrap();
    tokio::spawn(c2);
    table_lock
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {schema}.mine IN ACCESS SHARE MODE"
        ))
        .await
        .unwrap();
    let revoke = {
        let admin = admin.clone();
        let id = t.id.clone();
        tokio::spawn(async move {
            admin
                .post_empty::<Task>(&format!("/v1/tasks/{id}/revoke"))
                .await
        })
    };
    let relation = format!("relation = '{schema}.mine'::regclass");
    assert!(
        within(10, || waiting(relation.clone())).await,
        "the drop waits on the user's table"
    );
    // NOLOGIN is committed and the first round of terminations is done;
    // now the late login completes.
    db_lock.batch_execute("ROLLBACK").await.unwrap();
    let late = late.await.unwrap().expect("the late login got in");
    late.simple_query("SELECT 1").await.unwrap();
    table_lock.batch_execute("ROLLBACK").await.unwrap();
    revoke.await.unwrap().unwrap();
    assert!(
        within(10, || async {
            lease_state(&admin, &issued.lease.id).await == LeaseState::Revoked
        })
        .await
    );
    assert!(!role_exists(&pg, &user).await);
    let gone = within(10, || async {
        pg.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usesysid = $1",
            &[&oid],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            == 0
    })
    .await;
    assert!(gone, "a session of the dropped user is still open");
    assert!(late.simple_query("SELECT 1").await.is_err());
    drop(s);
    drop(late);
    pg.batch_execute(&format!("DROP DATABASE {scratch}"))
        .await
        .unwrap();
    pg.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

/// A leased user needs no privilege to own something in another database
/// of the cluster: `PUBLIC` may connect to `postgres` by default, where
/// the user can create a large object and default privileges of its own.
/// `DROP OWNED` reaches only the database it runs in and `DROP ROLE`
/// refuses a role that owns anything anywhere, so the revocation failed at
/// every retry and the role was never dropped. With a CREATEROLE admin that
/// is not superuser, as docs/design/0003 allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_that_owns_something_in_another_database_is_still_dropped() {
    let Some(pg) = admin_conn().await else { return };
    let suffix = keymint_core::token::random_base62(10)
        .unwrap()
        .to_lowercase();
    let (adm, schema) = (format!("km_adm_{suffix}"), format!("km_{suffix}"));
    pg.batch_execute(&format!(
        "CREATE ROLE {adm} LOGIN CREATEROLE PASSWORD 'km-test-only'; \
         CREATE SCHEMA {schema} AUTHORIZATION {adm}; \
         CREATE TABLE {schema}.orders (id int); ALTER TABLE {schema}.orders OWNER TO {adm};"
    ))
    .await
    .unwrap();
    let s = TestServer::builder()
        .postgres(
            "main",
            &format!("host=127.0.0.1 port=5432 user={adm} password=km-test-only dbname=test"),
        )
        .role(pg_role("analyst", &schema))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "analyst", "bot").await;
    let (issued, _) = crate::issue(&admin, &t.id).await;
    let user = username(&issued.credential);
    let Credential::Database { password, .. } = &issued.credential else {
        unreachable!()
    };
    // The user connects to another database of the cluster and makes two
    // things of its own there, with no privilege granted.
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(5432)
        .dbname("postgres")
        .user(&user)
        .password(password.expose());
    let (elsewhere, conn) = cfg.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    elsewhere
        .batch_execute(
            "SELECT pg_catalog.lo_create(0); \
             ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO PUBLIC;",
        )
        .await
        .unwrap();

    let _: Task = admin
        .post_empty(&format!("/v1/tasks/{}/revoke", t.id))
        .await
        .unwrap();
    let l: Lease = admin
        .get(&format!("/v1/leases/{}", issued.lease.id))
        .await
        .unwrap();
    let dropped = !role_exists(&pg, &user).await;
    // Cleaned up before asserting, so a failure leaves nothing behind.
    if !dropped {
        let (other, conn) = tokio_postgres::connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=postgres",
            NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        other
            .batch_execute(&format!("DROP OWNED BY \"{user}\""))
            .await
            .unwrap();
        pg.batch_execute(&format!("DROP OWNED BY \"{user}\"; DROP ROLE \"{user}\""))
            .await
            .unwrap();
    }
    drop(s);
    pg.batch_execute(&format!(
        "DROP SCHEMA {schema} CASCADE; DROP OWNED BY {adm}; DROP ROLE {adm};"
    ))
    .await
    .unwrap();
    assert!(dropped, "the role outlived its lease: {:?}", l.last_error);
    assert_eq!(l.state, LeaseState::Revoked, "{:?}", l.last_error);
}

/// A leased user may hold at most its role's `max_connections` sessions
/// at once (`CONNECTION LIMIT`): without it one workload could open
/// connections until the server's `max_connections` and lock everyone
/// out, keymint's admin included when it is not a superuser. A role that
/// sets none gets the default, 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leased_user_holds_at_most_its_roles_connection_limit() {
    let Some(pg) = admin_conn().await else { return };
    let schema = schema(&pg).await;
    let mut limited = pg_role("analyst", &schema);
    let RoleKind::Postgres(d) = &mut limited.kind else {
        unreachable!()
    };
    d.max_connections = 3;
    let s = TestServer::builder()
        .postgres("main", ADMIN)
        .role(limited)
        .role(pg_role("reader", &schema))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "analyst", "w").await;
    let (issued, _) = crate::issue(&admin, &t.id).await;
    let user = username(&issued.credential);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(login(&issued.credential).await.unwrap());
    }
    let Err(e) = login(&issued.credential).await else {
        panic!("the fourth connection of a user limited to 3 must be refused");
    };
    assert_eq!(
        e.as_db_error().map(|d| d.code().code()),
        Some("53300"),
        "too many connections for role: {e}"
    );
    // One closed frees its place.
    drop(held.pop());
    assert!(
        within(10, || {
            let c = &issued.credential;
            async move { login(c).await.is_ok() }
        })
        .await,
        "a place freed must be usable again"
    );
    // The default.
    let t2 = crate::start_task_in(&admin, "reader", "w").await;
    let (other, _) = crate::issue(&admin, &t2.id).await;
    let limit: i32 = pg
        .query_one(
            "SELECT rolconnlimit FROM pg_roles WHERE rolname = $1",
            &[&username(&other.credential)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(limit, 10);
    for t in [&t.id, &t2.id] {
        let _: Task = admin
            .post_empty(&format!("/v1/tasks/{t}/revoke"))
            .await
            .unwrap();
    }
    assert!(!role_exists(&pg, &user).await);
    drop(held);
    pg.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

/// `VALID UNTIL` stops new logins (under password authentication) but
/// ends no session already open. When keymint is down at a lease's end,
/// the user's open session lives on; when keymint comes back, its expiry
/// sweep revokes the lease, and revocation ends the user's sessions
/// (`pg_terminate_backend`) before and with `DROP ROLE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_open_while_keymint_was_down_at_expiry_ends_when_keymint_comes_back() {
    let Some(pg) = admin_conn().await else { return };
    let schema = schema(&pg).await;
    let dir = tempfile::tempdir().unwrap();
    // keymint's clock: its expiry is the test's to move, whatever the
    // machine's load.
    let clock = keymint_core::ManualClock::new(keymint_core::Timestamp(1_900_000_000_000));
    let start = || {
        TestServer::builder()
            .data_dir(dir.path())
            .clock(clock.clone())
            .postgres("main", ADMIN)
            .role(pg_role("analyst", &schema))
            .start()
    };
    let s = start().await.unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "analyst", "w").await;
    let issued: keymint_proto::IssuedLease = admin
        .post(
            &format!("/v1/tasks/{}/leases", t.id),
            &keymint_proto::IssueLease {
                ttl_secs: Some(60),
                ..keymint_proto::IssueLease::default()
            },
        )
        .await
        .unwrap();
    let user = username(&issued.credential);
    let db = login(&issued.credential).await.unwrap();
    s.stop().await;
    clock.advance_secs(120);
    // The lease has ended and keymint is gone: nothing ends the session
    // (PostgreSQL checks VALID UNTIL at login only, and not at all under
    // this server's `trust`).
    db.query_one("SELECT 1", &[])
        .await
        .expect("nothing has ended the session yet");
    assert!(role_exists(&pg, &user).await);

    let s = start().await.unwrap();
    assert!(
        within(20, || {
            let (pg, user) = (&pg, &user);
            async move { !role_exists(pg, user).await }
        })
        .await,
        "keymint's expiry sweep must drop the user when it comes back"
    );
    assert!(
        db.query_one("SELECT 1", &[]).await.is_err(),
        "the session opened before the expiry must be ended"
    );
    assert!(
        within(10, || {
            let (a, id) = (s.admin(), issued.lease.id.clone());
            async move { lease_state(&a, &id).await == LeaseState::Expired }
        })
        .await,
        "the lease ends expired"
    );
    pg.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}
