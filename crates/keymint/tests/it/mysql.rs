//! Dynamic MySQL/MariaDB users against the real server on 127.0.0.1:3306.
//! Outside CI a missing server skips these tests with a message; under
//! `CI=true` it fails them.

use keymint_core::model::Role;
use keymint_core::role::{DatabaseRole, RoleKind};
use keymint_proto::{Credential, Lease, LeaseState, StartTask, Task};
use keymint_testkit::TestServer;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder};

pub const ADMIN: &str = "mysql://root@127.0.0.1:3306/test";

/// The admin connection keymint gets: the test's own database, which is
/// also the one its users log in to.
pub fn admin_url(db: &str) -> String {
    format!("mysql://root@127.0.0.1:3306/{db}")
}

fn opts(url: &str) -> OptsBuilder {
    OptsBuilder::from_opts(Opts::from_url(url).unwrap()).prefer_socket(false)
}

pub async fn admin_conn() -> Option<Conn> {
    match Conn::new(opts(ADMIN)).await {
        Ok(c) => Some(c),
        Err(e) => {
            assert!(
                !crate::postgres::in_ci(),
                "MariaDB at 127.0.0.1:3306 is required in CI: {e}"
            );
            eprintln!("skipping: no MariaDB at 127.0.0.1:3306 ({e})");
            None
        }
    }
}

pub fn my_role(name: &str, db: &str) -> Role {
    Role {
        name: name.into(),
        scopes: vec!["db:read".into()],
        default_ttl_secs: 300,
        max_ttl_secs: 600,
        description: None,
        kind: RoleKind::Mysql(DatabaseRole {
            database: "shop".into(),
            creation_statements: vec![format!("GRANT SELECT ON `{db}`.`orders` TO {{{{name}}}}")],
            max_connections: keymint_core::role::DEFAULT_MAX_CONNECTIONS,
        }),
    }
}

/// A database of its own per test, with a readable and a forbidden table.
pub async fn schema(admin: &mut Conn) -> String {
    let name = format!(
        "kmt_{}",
        keymint_core::token::random_base62(10)
            .unwrap()
            .to_lowercase()
    );
    admin
        .query_drop(format!(
            "CREATE DATABASE `{name}`; CREATE TABLE `{name}`.orders (id int); \
             INSERT INTO `{name}`.orders VALUES (1), (2); \
             CREATE TABLE `{name}`.secrets (v text); INSERT INTO `{name}`.secrets VALUES ('classified');"
        ))
        .await
        .unwrap();
    name
}

pub async fn login(c: &Credential) -> Result<Conn, mysql_async::Error> {
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
    Conn::new(
        OptsBuilder::default()
            .ip_or_hostname(host)
            .tcp_port(*port)
            .db_name(Some(database))
            .user(Some(username))
            .pass(Some(password.expose()))
            .prefer_socket(false),
    )
    .await
}

/// Logs in with an admin-style URL.
pub async fn login_url(url: &str) -> Result<Conn, mysql_async::Error> {
    Conn::new(opts(url)).await
}

pub async fn user_exists(admin: &mut Conn, user: &str) -> bool {
    let n: Option<i64> = admin
        .exec_first("SELECT COUNT(*) FROM mysql.user WHERE User = ?", (user,))
        .await
        .unwrap();
    n.unwrap() > 0
}

async fn bookkeeping(admin: &mut Conn, user: &str) -> Option<(String, String, i64)> {
    admin
        .exec_first(
            "SELECT lease_id, workload, expires_at_ms FROM keymint.users WHERE user = ?",
            (user,),
        )
        .await
        .unwrap()
}

fn username(c: &Credential) -> String {
    match c {
        Credential::Database { username, .. } => username.clone(),
        _ => panic!("not a database credential"),
    }
}

fn server_code(e: &mysql_async::Error) -> u16 {
    match e {
        mysql_async::Error::Server(s) => s.code,
        other => panic!("not a server error: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mysql_user_can_do_what_its_grants_say_and_dies_with_its_lease() {
    let Some(mut my) = admin_conn().await else {
        return;
    };
    let db = schema(&mut my).await;
    let s = TestServer::builder()
        .mysql("shop", &admin_url(&db))
        .role(my_role("clerk", &db))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let hostile = "bot'`; DROP USER root@'127.0.0.1'; -- \\'";
    let t: Task = admin
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some(hostile.into()),
                role: Some("clerk".into()),
                intent: Some("it's a report`); DROP DATABASE test; --".into()),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    let (issued, _) = crate::issue(&admin, &t.id).await;
    assert_eq!(issued.lease.state, LeaseState::Active);
    let user = username(&issued.credential);
    assert!(user.starts_with("km_") && user.len() <= 32, "{user}");

    // What the grants allow, and nothing else.
    let mut conn = login(&issued.credential).await.unwrap();
    let n: Option<i64> = conn
        .query_first(format!("SELECT COUNT(*) FROM `{db}`.orders"))
        .await
        .unwrap();
    assert_eq!(n, Some(2));
    let denied = conn
        .query_drop(format!("SELECT * FROM `{db}`.secrets"))
        .await
        .unwrap_err();
    assert_eq!(server_code(&denied), 1142, "SELECT command denied");
    assert!(conn.query_drop("CREATE USER sneaky").await.is_err());
    assert!(
        conn.query_drop("SELECT * FROM keymint.users")
            .await
            .is_err()
    );

    // The tag: the bookkeeping row names the lease, holds the hostile
    // workload name as data, and the lease's end.
    let (lease_id, workload, expires) = bookkeeping(&mut my, &user).await.unwrap();
    assert_eq!(lease_id, issued.lease.id);
    assert_eq!(workload, hostile);
    assert_eq!(expires, issued.lease.expires_at.millis());
    // Renewing moves the server-side expiry too.
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
    let (_, _, expires) = bookkeeping(&mut my, &user).await.unwrap();
    assert_eq!(expires, renewed.lease.expires_at.millis());
    // The hostile names did nothing.
    assert!(user_exists(&mut my, "root").await);
    let test_db: Option<String> = my
        .query_first(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = 'test'",
        )
        .await
        .unwrap();
    assert_eq!(test_db.as_deref(), Some("test"));

    // Revoking ends the open session and the login.
    let l: Lease = admin
        .post_empty(&format!("/v1/leases/{}/revoke", issued.lease.id))
        .await
        .unwrap();
    assert_eq!(l.state, LeaseState::Revoked);
    assert!(
        conn.query_drop("SELECT 1").await.is_err(),
        "the open session must be gone"
    );
    assert!(
        login(&issued.credential).await.is_err(),
        "the user must not log in again"
    );
    assert!(!user_exists(&mut my, &user).await);
    assert!(bookkeeping(&mut my, &user).await.is_none());
    // Revoking again (a retry) is harmless.
    keymint_engines::Engine::revoke(
        &keymint_engines::mysql::MysqlEngine::new(
            vec![std::sync::Arc::new(
                keymint_engines::mysql::Database::parse("shop", &admin_url(&db)).unwrap(),
            )],
            s.broker().installation_id(),
        ),
        &l,
    )
    .await
    .unwrap();

    // Ending the task drops every user of it.
    let (a, _) = crate::issue(&admin, &t.id).await;
    let (b, _) = crate::issue(&admin, &t.id).await;
    assert!(user_exists(&mut my, &username(&a.credential)).await);
    let _: Task = admin
        .post_empty(&format!("/v1/tasks/{}/revoke", t.id))
        .await
        .unwrap();
    for c in [&a.credential, &b.credential] {
        assert!(!user_exists(&mut my, &username(c)).await);
    }
    my.query_drop(format!("DROP DATABASE `{db}`"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_drops_an_expired_user_when_keymint_is_gone() {
    let Some(mut my) = admin_conn().await else {
        return;
    };
    // The safety net is a MariaDB event; the server must run its scheduler.
    my.query_drop("SET GLOBAL event_scheduler = ON")
        .await
        .unwrap();
    let db = schema(&mut my).await;
    let s = TestServer::builder()
        .mysql("shop", &admin_url(&db))
        .role(my_role("clerk", &db))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "clerk", "w").await;
    let issued: keymint_proto::IssuedLease = admin
        .post(
            &format!("/v1/tasks/{}/leases", t.id),
            &keymint_proto::IssueLease {
                ttl_secs: Some(2),
                ..keymint_proto::IssueLease::default()
            },
        )
        .await
        .unwrap();
    let user = username(&issued.credential);
    let mut conn = login(&issued.credential).await.unwrap();
    // keymint stops: nothing on its side will revoke the user.
    s.stop().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while user_exists(&mut my, &user).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the server's expiry event must drop the user"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert!(
        conn.query_drop("SELECT 1").await.is_err(),
        "the expiry event must end the open session"
    );
    assert!(bookkeeping(&mut my, &user).await.is_none());
    my.query_drop(format!("DROP DATABASE `{db}`"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mysql_user_created_before_a_crash_is_dropped_at_restart() {
    let Some(mut my) = admin_conn().await else {
        return;
    };
    let db = schema(&mut my).await;
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        TestServer::builder()
            .data_dir(dir.path())
            .mysql("shop", &admin_url(&db))
            .role(my_role("clerk", &db))
            .start()
    };
    let s = start().await.unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "clerk", "w").await;
    // The state a crash between "user created" and "lease active" leaves:
    // a pending lease whose user exists.
    let engine = keymint_engines::mysql::MysqlEngine::new(
        vec![std::sync::Arc::new(
            keymint_engines::mysql::Database::parse("shop", &admin_url(&db)).unwrap(),
        )],
        s.broker().installation_id(),
    );
    let (lease_id, prepared) = crate::pending_lease_applied(&s, &t.id, "clerk", &engine).await;
    let user = username(&prepared.credential);
    assert!(user_exists(&mut my, &user).await);
    s.stop().await;

    // At restart, reconciliation revokes the pending lease and drops the user.
    let s = start().await.unwrap();
    assert!(
        !user_exists(&mut my, &user).await,
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
    my.query_drop(format!("DROP DATABASE `{db}`"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_reconciliation_drops_only_this_installations_orphans() {
    let Some(mut my) = admin_conn().await else {
        return;
    };
    let db = schema(&mut my).await;
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        TestServer::builder()
            .data_dir(dir.path())
            .mysql("shop", &admin_url(&db))
            .role(my_role("clerk", &db))
            .start()
    };
    let s = start().await.unwrap();
    let install = s.broker().installation_id().to_owned();
    s.stop().await;

    let now = keymint_core::Clock::now(&keymint_core::SystemClock);
    let ids: Vec<String> = (0..3).map(|_| keymint_core::id::lease_id(now)).collect();
    let user = |l: &str| keymint_engines::mysql::user_for_lease(l).unwrap();
    let (orphan, untagged, other_install) = (user(&ids[0]), user(&ids[1]), user(&ids[2]));
    let foreign = format!("{db}_app");
    let far = now.plus_secs(3600).millis();
    my.query_drop(format!(
        "CREATE USER `{orphan}`@`%`; CREATE USER `{untagged}`@`%`; \
         CREATE USER `{other_install}`@`%`; CREATE USER `{foreign}`@`%`;"
    ))
    .await
    .unwrap();
    for (u, lease, inst) in [
        (&orphan, &ids[0], install.as_str()),
        (&other_install, &ids[2], "0000000000000000"),
        // A row naming a user keymint did not name is not a tag either.
        (&foreign, &ids[0], install.as_str()),
    ] {
        my.exec_drop(
            "INSERT INTO keymint.users (user, host, lease_id, task_id, installation, role, workload, expires_at_ms) \
             VALUES (?, '%', ?, 'tsk_gone', ?, 'clerk', 'w', ?)",
            (u, lease, inst, far),
        )
        .await
        .unwrap();
    }

    // At start, this installation's tagged orphan goes. The look-alike
    // without a tag, another installation's user, and the user keymint
    // never named all stay.
    let s = start().await.unwrap();
    assert!(
        !user_exists(&mut my, &orphan).await,
        "a tagged orphan must be dropped"
    );
    assert!(
        user_exists(&mut my, &untagged).await,
        "a name alone is not keymint's tag"
    );
    assert!(
        user_exists(&mut my, &other_install).await,
        "another installation's users are not ours"
    );
    assert!(
        user_exists(&mut my, &foreign).await,
        "users keymint did not create are never touched"
    );
    let events = s.broker().store().audit_tail(50).await.unwrap();
    assert!(
        events.iter().any(|e| e.kind == "credential.orphan_removed"
            && e.lease.as_deref() == Some(ids[0].as_str()))
    );

    // A live lease's user survives reconciliation.
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "clerk", "w").await;
    let (live, _) = crate::issue(&admin, &t.id).await;
    assert_eq!(s.broker().reconcile_engines().await.unwrap(), 0);
    assert!(user_exists(&mut my, &username(&live.credential)).await);

    let _: Task = admin
        .post_empty(&format!("/v1/tasks/{}/revoke", t.id))
        .await
        .unwrap();
    my.query_drop(format!(
        "DROP USER `{untagged}`@`%`, `{other_install}`@`%`, `{foreign}`@`%`; \
         DELETE FROM keymint.users WHERE user IN ('{other_install}', '{foreign}'); DROP DATABASE `{db}`;"
    ))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keymint_run_gives_the_mariadb_client_a_user_of_its_own() {
    let Some(mut my) = admin_conn().await else {
        return;
    };
    let db = schema(&mut my).await;
    let s = TestServer::builder()
        .mysql("shop", &admin_url(&db))
        .role(my_role("clerk", &db))
        .start()
        .await
        .unwrap();
    let script = format!(
        "mariadb -u \"$MYSQL_USER\" -N -e 'SELECT CURRENT_USER()' \
         && mariadb -u \"$MYSQL_USER\" -N -e 'SELECT COUNT(*) FROM orders' \"$MYSQL_DATABASE\" \
         && case \"$DATABASE_URL\" in mysql://km_*:*@127.0.0.1:3306/{db}) echo url-ok;; esac"
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keymint"))
        .args([
            "run",
            "--role",
            "clerk",
            "--workload",
            "w",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .env("KEYMINT_ADDR", s.url())
        .env("KEYMINT_TOKEN", &s.admin_token)
        .env("HOME", "/nonexistent")
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
    let current = lines.next().unwrap().to_owned();
    assert!(
        current.starts_with("km_") && current.ends_with("@%"),
        "the client ran as the leased user: {current}"
    );
    assert_eq!(lines.next(), Some("2"));
    assert_eq!(lines.next(), Some("url-ok"));
    let user = current.trim_end_matches("@%");
    assert!(
        !user_exists(&mut my, user).await,
        "the user is gone once the command exited"
    );
    my.query_drop(format!("DROP DATABASE `{db}`"))
        .await
        .unwrap();
}

/// A wrong admin password on MariaDB (`Access denied for user
/// 'root'@'…'`) is the operator's to read in the log: the API client gets
/// a stable code, never the database's words naming keymint's admin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_error_reaches_the_client_as_a_stable_code_only() {
    let Some(mut my) = admin_conn().await else {
        return;
    };
    let db = schema(&mut my).await;
    let wrong = format!("mysql://root:wrong-password-for-tests@127.0.0.1:3306/{db}");
    let s = TestServer::builder()
        .mysql("shop", &wrong)
        .role(my_role("clerk", &db))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "clerk", "w").await;
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
        "root",
        "Access denied",
        "wrong-password",
        "127.0.0.1",
        "3306",
    ] {
        assert!(
            !r.text().contains(leaked),
            "the body says `{leaked}`: {}",
            r.text()
        );
    }
    my.query_drop(format!("DROP DATABASE `{db}`"))
        .await
        .unwrap();
}

/// The server-side expiry event runs as keymint's admin and drops the
/// accounts `keymint.users` names. A role granted writes on every
/// database (`… ON *.* TO {{name}}`) lets its users write that table: a
/// row naming any account must not make the event drop that account (or
/// end its sessions). Only keymint's own `km_…`@`%` accounts are dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_bookkeeping_row_cannot_make_the_expiry_event_drop_another_account() {
    let Some(mut my) = admin_conn().await else {
        return;
    };
    my.query_drop("SET GLOBAL event_scheduler = ON")
        .await
        .unwrap();
    let db = schema(&mut my).await;
    // An application's account, which no lease made.
    let victim = format!("{db}_app");
    my.query_drop(format!(
        "CREATE USER `{victim}`@`%` IDENTIFIED BY 'visibly-fake-{db}'"
    ))
    .await
    .unwrap();
    let role = Role {
        kind: RoleKind::Mysql(DatabaseRole {
            database: "shop".into(),
            creation_statements: vec![
                "GRANT SELECT, INSERT, UPDATE, DELETE ON *.* TO {{name}}".into(),
            ],
            max_connections: keymint_core::role::DEFAULT_MAX_CONNECTIONS,
        }),
        ..my_role("writer", &db)
    };
    let s = TestServer::builder()
        .mysql("shop", &admin_url(&db))
        .role(role)
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "writer", "w").await;
    let (writer, _) = crate::issue(&admin, &t.id).await;
    let mut conn = login(&writer.credential).await.unwrap();
    conn.exec_drop(
        "INSERT INTO keymint.users (user, host, lease_id, task_id, installation, role, workload, \
         expires_at_ms) VALUES (?, '%', 'lse_forged', 'tsk_forged', 'forged', 'r', 'w', 0)",
        (&victim,),
    )
    .await
    .unwrap();
    // A lease that ends in 2 s shows when the event has run since.
    let short: keymint_proto::IssuedLease = admin
        .post(
            &format!("/v1/tasks/{}/leases", t.id),
            &keymint_proto::IssueLease {
                ttl_secs: Some(2),
                ..keymint_proto::IssueLease::default()
            },
        )
        .await
        .unwrap();
    let short_user = username(&short.credential);
    // keymint stops: only the server's event drops anything now.
    s.stop().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while user_exists(&mut my, &short_user).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the server's expiry event must drop the expired lease's user"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let victim_left = user_exists(&mut my, &victim).await;

    let writer_user = username(&writer.credential);
    my.query_drop(format!(
        "DROP USER IF EXISTS `{victim}`@`%`; DROP USER IF EXISTS `{writer_user}`@`%`; \
         DELETE FROM keymint.users WHERE user IN ('{victim}', '{writer_user}'); \
         DROP DATABASE `{db}`"
    ))
    .await
    .unwrap();
    assert!(
        victim_left,
        "a row a workload wrote made keymint's event drop `{victim}`"
    );
}

/// The expiry event runs as its definer. When that account is dropped
/// (an admin account replaced, a rotation test's admin removed), the
/// event fails at every run and the server-side net is gone: keymint's
/// next start gives the event its admin as definer again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_event_whose_definer_was_dropped_works_again_after_a_start() {
    let Some(mut my) = admin_conn().await else {
        return;
    };
    my.query_drop("SET GLOBAL event_scheduler = ON")
        .await
        .unwrap();
    let db = schema(&mut my).await;
    // The event exists (made by root), then its definer becomes an
    // account that is dropped.
    keymint_engines::Engine::managed(&keymint_engines::mysql::MysqlEngine::new(
        vec![std::sync::Arc::new(
            keymint_engines::mysql::Database::parse("shop", &admin_url(&db)).unwrap(),
        )],
        "0000000000000000",
    ))
    .await
    .unwrap();
    let gone = format!("{db}_gone");
    my.query_drop(format!(
        "CREATE USER `{gone}`@`%`; \
         ALTER DEFINER = `{gone}`@`%` EVENT keymint.expire_users ENABLE; \
         DROP USER `{gone}`@`%`"
    ))
    .await
    .unwrap();

    let s = TestServer::builder()
        .mysql("shop", &admin_url(&db))
        .role(my_role("clerk", &db))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "clerk", "w").await;
    let short: keymint_proto::IssuedLease = admin
        .post(
            &format!("/v1/tasks/{}/leases", t.id),
            &keymint_proto::IssueLease {
                ttl_secs: Some(2),
                ..keymint_proto::IssueLease::default()
            },
        )
        .await
        .unwrap();
    let user = username(&short.credential);
    s.stop().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut dropped = false;
    while std::time::Instant::now() < deadline {
        if !user_exists(&mut my, &user).await {
            dropped = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let definer: Option<String> = my
        .query_first(
            "SELECT DEFINER FROM information_schema.EVENTS \
             WHERE EVENT_SCHEMA = 'keymint' AND EVENT_NAME = 'expire_users'",
        )
        .await
        .unwrap();
    my.query_drop(format!(
        "DROP USER IF EXISTS `{user}`@`%`; DELETE FROM keymint.users WHERE user = '{user}'; \
         DROP DATABASE `{db}`"
    ))
    .await
    .unwrap();
    assert!(
        dropped,
        "the expiry event (definer {definer:?}) must drop the expired user"
    );
}

/// An admin without `PROCESS` sees only its own sessions in
/// `information_schema.PROCESSLIST`: a revocation found none of the
/// user's open sessions, dropped the account and said "revoked" while
/// the sessions went on working. Such an admin is refused at start,
/// with what to grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mysql_admin_that_cannot_see_other_sessions_is_refused_at_start() {
    let Some(mut my) = admin_conn().await else {
        return;
    };
    let db = schema(&mut my).await;
    // keymint's table and event exist (made by root).
    keymint_engines::Engine::managed(&keymint_engines::mysql::MysqlEngine::new(
        vec![std::sync::Arc::new(
            keymint_engines::mysql::Database::parse("shop", &admin_url(&db)).unwrap(),
        )],
        "0000000000000000",
    ))
    .await
    .unwrap();
    let adm = format!("{db}_adm");
    let password = keymint_core::token::random_base62(16).unwrap().to_string();
    my.query_drop(format!(
        "CREATE USER `{adm}`@`%` IDENTIFIED BY '{password}'; \
         GRANT CREATE USER ON *.* TO `{adm}`@`%`; \
         GRANT SELECT ON mysql.* TO `{adm}`@`%`; \
         GRANT ALL ON keymint.* TO `{adm}`@`%`; \
         GRANT SELECT ON `{db}`.* TO `{adm}`@`%` WITH GRANT OPTION;"
    ))
    .await
    .unwrap();
    let url = format!("mysql://{adm}:{password}@127.0.0.1:3306/{db}");
    let refused = TestServer::builder()
        .mysql("shop", &url)
        .role(my_role("clerk", &db))
        .start()
        .await
        .map(|_| ());
    my.query_drop(format!("DROP USER `{adm}`@`%`; DROP DATABASE `{db}`"))
        .await
        .unwrap();
    let e = format!(
        "{:#}",
        refused.expect_err("an admin without PROCESS must be refused")
    );
    assert!(e.contains("PROCESS"), "{e}");
    assert!(!e.contains(&password), "{e}");
}

/// The server's general query log, on to a file of a test's own until
/// [`general_log_off`]. One test at a time: the log is the server's.
pub struct GeneralLog {
    path: std::path::PathBuf,
    was_on: String,
    was_file: String,
    _one_at_a_time: tokio::sync::MutexGuard<'static, ()>,
}

static GENERAL_LOG: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn general_log_on(my: &mut Conn) -> GeneralLog {
    let guard = GENERAL_LOG.lock().await;
    let (was_on, was_file): (String, String) = my
        .query_first("SELECT @@GLOBAL.general_log, @@GLOBAL.general_log_file")
        .await
        .unwrap()
        .unwrap();
    // The server writes the file, so it goes where the server may write.
    let path = std::env::temp_dir().join(format!(
        "keymint-general-{}.log",
        keymint_core::token::random_base62(10).unwrap().as_str()
    ));
    my.exec_drop(
        "SET GLOBAL general_log_file = ?",
        (path.display().to_string(),),
    )
    .await
    .unwrap();
    my.query_drop("SET GLOBAL general_log = 1").await.unwrap();
    GeneralLog {
        path,
        was_on,
        was_file,
        _one_at_a_time: guard,
    }
}

/// Puts the general log back as it was and returns what it recorded.
pub async fn general_log_off(my: &mut Conn, g: GeneralLog) -> String {
    my.query_drop("SET GLOBAL general_log = 0").await.unwrap();
    my.exec_drop("SET GLOBAL general_log_file = ?", (&g.was_file,))
        .await
        .unwrap();
    if g.was_on == "1" {
        my.query_drop("SET GLOBAL general_log = 1").await.unwrap();
    }
    let written = std::fs::read_to_string(&g.path).unwrap_or_default();
    let _ = std::fs::remove_file(&g.path);
    written
}

/// MariaDB writes `CREATE USER … IDENTIFIED BY '<password>'` to its
/// general query log (and slow and binary logs) as sent, password and all,
/// where MySQL rewrites it: so keymint sends MariaDB the password's hash
/// (`IDENTIFIED BY PASSWORD '*…'`) and the server never sees the password,
/// as PostgreSQL is sent a SCRAM verifier. The user still logs in with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_users_password_never_reaches_the_mariadb_query_log() {
    let Some(mut my) = admin_conn().await else {
        return;
    };
    let db = schema(&mut my).await;
    let s = TestServer::builder()
        .mysql("shop", &admin_url(&db))
        .role(my_role("clerk", &db))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "clerk", "bot").await;
    let log = general_log_on(&mut my).await;
    let issued: Result<keymint_proto::IssuedLease, _> = admin
        .post(
            &format!("/v1/tasks/{}/leases", t.id),
            &keymint_proto::IssueLease::default(),
        )
        .await;
    let written = general_log_off(&mut my, log).await;
    let issued = issued.unwrap();
    let user = username(&issued.credential);
    let Credential::Database { password, .. } = &issued.credential else {
        unreachable!()
    };
    assert!(
        written.contains(&format!("CREATE USER `{user}`")),
        "the log recorded the issuance"
    );
    assert!(
        !written.contains(password.expose()),
        "the new user's password is in the server's query log"
    );
    // The password works all the same.
    let mut conn = login(&issued.credential).await.unwrap();
    let n: Option<i64> = conn
        .query_first(format!("SELECT COUNT(*) FROM `{db}`.orders"))
        .await
        .unwrap();
    assert_eq!(n, Some(2));
    drop(conn);
    drop(s);
    my.query_drop(format!("DROP DATABASE `{db}`"))
        .await
        .unwrap();
}

/// A leased account may hold at most its role's `max_connections`
/// sessions at once (`MAX_USER_CONNECTIONS`), so one workload cannot take
/// every connection the server allows; a role that sets none gets 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leased_mysql_user_holds_at_most_its_roles_connection_limit() {
    let Some(mut my) = admin_conn().await else {
        return;
    };
    let db = schema(&mut my).await;
    let mut limited = my_role("clerk", &db);
    let RoleKind::Mysql(d) = &mut limited.kind else {
        unreachable!()
    };
    d.max_connections = 2;
    let s = TestServer::builder()
        .mysql("shop", &admin_url(&db))
        .role(limited)
        .role(my_role("reader", &db))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "clerk", "w").await;
    let (issued, _) = crate::issue(&admin, &t.id).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(login(&issued.credential).await.unwrap());
    }
    let Err(e) = login(&issued.credential).await else {
        panic!("the third connection of a user limited to 2 must be refused");
    };
    assert_eq!(server_code(&e), 1226, "max_user_connections exceeded: {e}");
    // One closed frees its place.
    held.pop().unwrap().disconnect().await.unwrap();
    login(&issued.credential)
        .await
        .unwrap()
        .disconnect()
        .await
        .unwrap();
    // The default.
    let t2 = crate::start_task_in(&admin, "reader", "w").await;
    let (other, _) = crate::issue(&admin, &t2.id).await;
    let limit: Option<i64> = my
        .exec_first(
            "SELECT max_user_connections FROM mysql.user WHERE User = ?",
            (username(&other.credential),),
        )
        .await
        .unwrap();
    assert_eq!(limit, Some(10));
    for t in [&t.id, &t2.id] {
        let _: Task = admin
            .post_empty(&format!("/v1/tasks/{t}/revoke"))
            .await
            .unwrap();
    }
    for c in held {
        let _ = c.disconnect().await;
    }
    my.query_drop(format!("DROP DATABASE `{db}`"))
        .await
        .unwrap();
}

/// A lease that ends while keymint is down: when keymint comes back, its
/// expiry sweep revokes the lease, which drops the account and ends the
/// session opened before (`KILL CONNECTION`; dropping an account ends
/// none of its sessions). keymint's clock is the test's and years ahead,
/// so the server's own expiry event never finds the row due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mysql_session_open_while_keymint_was_down_at_expiry_ends_when_keymint_comes_back() {
    let Some(mut my) = admin_conn().await else {
        return;
    };
    let db = schema(&mut my).await;
    let dir = tempfile::tempdir().unwrap();
    // keymint's clock: its expiry is the test's to move, whatever the
    // machine's load.
    let clock = keymint_core::ManualClock::new(keymint_core::Timestamp(1_900_000_000_000));
    let start = || {
        TestServer::builder()
            .data_dir(dir.path())
            .clock(clock.clone())
            .mysql("shop", &admin_url(&db))
            .role(my_role("clerk", &db))
            .start()
    };
    let s = start().await.unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "clerk", "w").await;
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
    let mut conn = login(&issued.credential).await.unwrap();
    s.stop().await;
    clock.advance_secs(120);
    conn.query_drop("SELECT 1")
        .await
        .expect("nothing has ended the session yet");

    let s = start().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while user_exists(&mut my, &user).await {
        assert!(
            std::time::Instant::now() < deadline,
            "keymint's expiry sweep must drop the user when it comes back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The account goes first (no new logins), then its sessions.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while conn.query_drop("SELECT 1").await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the session opened before the expiry must be ended"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut state = LeaseState::Active;
    for _ in 0..100 {
        let l: Lease = s
            .admin()
            .get(&format!("/v1/leases/{}", issued.lease.id))
            .await
            .unwrap();
        state = l.state;
        if state == LeaseState::Expired {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(state, LeaseState::Expired);
    my.query_drop(format!("DROP DATABASE `{db}`"))
        .await
        .unwrap();
}

/// A leased account a role lets create views, triggers, events and
/// routines: its revocation drops them with it. Dropping an account
/// leaves what it defined, and its trigger then fails every write to its
/// table (1449, "the user specified as a definer does not exist") for
/// everyone, long after the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_leased_mysql_user_defined_goes_with_it() {
    let Some(mut my) = admin_conn().await else {
        return;
    };
    let db = schema(&mut my).await;
    let mut maker = my_role("maker", &db);
    let RoleKind::Mysql(d) = &mut maker.kind else {
        unreachable!()
    };
    d.creation_statements = vec![format!(
        "GRANT SELECT, INSERT, CREATE VIEW, SHOW VIEW, TRIGGER, CREATE ROUTINE, EVENT ON `{db}`.* TO {{{{name}}}}"
    )];
    let s = TestServer::builder()
        .mysql("shop", &admin_url(&db))
        .role(maker)
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "maker", "w").await;
    let (issued, _) = crate::issue(&admin, &t.id).await;
    let user = username(&issued.credential);
    let mut conn = login(&issued.credential).await.unwrap();
    for sql in [
        format!("CREATE VIEW `{db}`.v AS SELECT id FROM `{db}`.orders"),
        format!(
            "CREATE TRIGGER `{db}`.tr BEFORE INSERT ON `{db}`.orders FOR EACH ROW SET NEW.id = NEW.id"
        ),
        format!("CREATE PROCEDURE `{db}`.p() SELECT 1"),
        format!("CREATE EVENT `{db}`.e ON SCHEDULE EVERY 1 DAY DO SELECT 1"),
    ] {
        conn.query_drop(&sql).await.unwrap();
    }
    let definer = format!("{user}@%");
    assert_eq!(defined_by(&mut my, &definer, &db).await, 4);
    let l: Lease = admin
        .post_empty(&format!("/v1/leases/{}/revoke", issued.lease.id))
        .await
        .unwrap();
    assert_eq!(l.state, LeaseState::Revoked);
    assert!(!user_exists(&mut my, &user).await);
    assert_eq!(
        defined_by(&mut my, &definer, &db).await,
        0,
        "nothing the user defined is left"
    );
    // The table takes writes again.
    my.query_drop(format!("INSERT INTO `{db}`.orders VALUES (3)"))
        .await
        .unwrap();
    drop(conn);
    my.query_drop(format!("DROP DATABASE `{db}`"))
        .await
        .unwrap();
}

/// How many views, triggers, routines and events in `db` name `definer`.
async fn defined_by(my: &mut Conn, definer: &str, db: &str) -> i64 {
    let n: Option<i64> = my
        .exec_first(
            "SELECT (SELECT COUNT(*) FROM information_schema.VIEWS WHERE DEFINER = ? AND TABLE_SCHEMA = ?) \
             + (SELECT COUNT(*) FROM information_schema.TRIGGERS WHERE DEFINER = ? AND TRIGGER_SCHEMA = ?) \
             + (SELECT COUNT(*) FROM information_schema.ROUTINES WHERE DEFINER = ? AND ROUTINE_SCHEMA = ?) \
             + (SELECT COUNT(*) FROM information_schema.EVENTS WHERE DEFINER = ? AND EVENT_SCHEMA = ?)",
            (definer, db, definer, db, definer, db, definer, db),
        )
        .await
        .unwrap();
    n.unwrap()
}
