//! keymint's own admin credentials on PostgreSQL and MariaDB: sealed in the
//! store, rotated through the API and the CLI, used from then on, and
//! picked up again at restart.

use keymint_core::keyring::Keyring;
use keymint_proto::{DatabaseRotated, Task};
use keymint_testkit::TestServer;
use mysql_async::prelude::Queryable;

use crate::mysql::{admin_conn, my_role, schema};

fn keyring(s: &TestServer) -> Keyring {
    Keyring::from_root_hex(&std::fs::read_to_string(&s.config.root_key_file).unwrap()).unwrap()
}

async fn sealed_password(s: &TestServer, db: &str) -> String {
    let name = format!("database/{db}/admin-password");
    let sealed = s.broker().store().get_secret(&name).await.unwrap().unwrap();
    String::from_utf8(keyring(s).open(&name, &sealed).unwrap().to_vec()).unwrap()
}

/// No file in the data directory holds `secret` in plain text.
fn not_on_disk(dir: &std::path::Path, secret: &str) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "`{}` holds the admin password in plain text",
                path.display()
            );
        }
    }
}

fn rand_lower(n: usize) -> String {
    keymint_core::token::random_base62(n)
        .unwrap()
        .to_lowercase()
}

/// A schema of its own, and an admin user for keymint on it with a
/// password of its own: (schema, user, password).
async fn mysql_admin(my: &mut mysql_async::Conn) -> (String, String, String) {
    let db = schema(my).await;
    // keymint's schema and expiry event exist, defined by root: the event
    // runs as its definer, which must not be the admin dropped at the end.
    keymint_engines::Engine::managed(&keymint_engines::mysql::MysqlEngine::new(
        vec![std::sync::Arc::new(
            keymint_engines::mysql::Database::parse("shop", &crate::mysql::admin_url(&db)).unwrap(),
        )],
        "0000000000000000",
    ))
    .await
    .unwrap();
    let admin_user = format!("kmadm_{}", rand_lower(8));
    let old = format!("old-{}", rand_lower(16));
    my.query_drop(format!(
        "CREATE USER `{admin_user}`@`%` IDENTIFIED BY '{old}'; \
         GRANT ALL PRIVILEGES ON *.* TO `{admin_user}`@`%` WITH GRANT OPTION;"
    ))
    .await
    .unwrap();
    (db, admin_user, old)
}

/// `POST /v1/databases/NAME/rotate` as `c`, whatever it answers.
async fn rotate_raw(c: &keymint_client::Client, name: &str) -> keymint_client::RawResponse {
    c.raw(
        http::Method::POST,
        &format!("/v1/databases/{name}/rotate"),
        None,
        vec![],
    )
    .await
    .unwrap()
}

async fn rotate_with_cli(s: &TestServer, name: &str) -> DatabaseRotated {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keymint"))
        .args(["database", "rotate", name, "-o", "json"])
        .env("KEYMINT_ADDR", s.url())
        .env("KEYMINT_TOKEN", &s.admin_token)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_mysql_admin_password_leaves_only_keymint_knowing_it() {
    let Some(mut my) = admin_conn().await else {
        return;
    };
    let (db, admin_user, old) = mysql_admin(&mut my).await;
    let url = |pw: &str| format!("mysql://{admin_user}:{pw}@127.0.0.1:3306/{db}");
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        TestServer::builder()
            .data_dir(dir.path())
            .mysql("shop", &url(&old))
            .role(my_role("clerk", &db))
            .start()
    };
    let s = start().await.unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "clerk", "w").await;
    crate::issue(&admin, &t.id).await;

    // Only the admin may rotate; unknown or hostile names are not found and
    // change nothing.
    let (_, task_token) = {
        let t2 = crate::start_task(&admin, "w").await;
        crate::issue(&admin, &t2.id).await
    };
    let r = rotate_raw(&s.client(&task_token), "shop").await;
    assert_eq!(r.status, 403, "{}", r.text());
    for bad in ["nope", "shop%27%3B%20DROP%20USER%20root%3B--", "a%60b"] {
        let r = rotate_raw(&admin, bad).await;
        assert_eq!(r.status, 404, "{bad}: {}", r.text());
    }
    assert!(crate::mysql::login_url(&url(&old)).await.is_ok());

    // MariaDB writes statements to its query log as sent: the new
    // password must not be in one (keymint sends its hash).
    let log = crate::mysql::general_log_on(&mut my).await;
    let rotated = rotate_with_cli(&s, "shop").await;
    let written = crate::mysql::general_log_off(&mut my, log).await;
    assert_eq!(rotated.database, "shop");
    assert_eq!(rotated.engine, keymint_core::role::EngineKind::Mysql);
    let new = sealed_password(&s, "shop").await;
    assert_eq!(new.len(), 32);
    assert!(written.contains(&format!("ALTER USER '{admin_user}'")));
    assert!(
        !written.contains(&new),
        "the new admin password is in the server's query log"
    );
    assert_eq!(rotated.fingerprint, keyring(&s).fingerprint(new.as_bytes()));
    // The old password no longer works; the new one does, and keymint uses it.
    let e = crate::mysql::login_url(&url(&old)).await.unwrap_err();
    assert!(
        matches!(e, mysql_async::Error::Server(ref s) if s.code == 1045),
        "{e}"
    );
    assert!(crate::mysql::login_url(&url(&new)).await.is_ok());
    crate::issue(&admin, &t.id).await;
    // Nowhere in plain text: not in the store's files, not in the audit trail.
    let events = s.broker().store().audit_tail(20).await.unwrap();
    let ev = events
        .iter()
        .find(|e| e.kind == "database.admin_rotated")
        .unwrap();
    assert_eq!(
        ev.fingerprint.as_deref(),
        Some(rotated.fingerprint.as_str())
    );
    assert!(!serde_json::to_string(&events).unwrap().contains(&new));
    let _: Task = admin
        .post_empty(&format!("/v1/tasks/{}/revoke", t.id))
        .await
        .unwrap();
    s.stop().await;
    not_on_disk(dir.path(), &new);

    // At restart the configuration still names the old password; keymint
    // uses the sealed one.
    let s = start().await.unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "clerk", "w").await;
    crate::issue(&admin, &t.id).await;

    // A crash after the database took a new password but before keymint
    // recorded it as current: the pending password is tried and kept.
    let next = rand_lower(32);
    let name = "database/shop/admin-password.pending";
    s.broker()
        .store()
        .put_secret(
            name,
            keyring(&s).seal(name, next.as_bytes()).unwrap(),
            s.broker().now(),
        )
        .await
        .unwrap();
    my.query_drop(format!(
        "ALTER USER `{admin_user}`@`%` IDENTIFIED BY '{next}'"
    ))
    .await
    .unwrap();
    let _: Task = admin
        .post_empty(&format!("/v1/tasks/{}/revoke", t.id))
        .await
        .unwrap();
    s.stop().await;
    let s = start().await.unwrap();
    assert_eq!(sealed_password(&s, "shop").await, next);
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "clerk", "w").await;
    crate::issue(&admin, &t.id).await;
    let _: Task = admin
        .post_empty(&format!("/v1/tasks/{}/revoke", t.id))
        .await
        .unwrap();
    s.stop().await;
    my.query_drop(format!(
        "DROP USER `{admin_user}`@`%`; DROP DATABASE `{db}`"
    ))
    .await
    .unwrap();
}

/// The server processes of `user`'s open connections.
async fn backends_of(pg: &tokio_postgres::Client, user: &str) -> Vec<i32> {
    pg.query(
        "SELECT pid FROM pg_stat_activity WHERE usename = $1",
        &[&user],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_postgres_admin_password_stores_only_keymints_verifier() {
    let Some(pg) = crate::postgres::admin_conn().await else {
        return;
    };
    let schema = crate::postgres::schema(&pg).await;
    let admin_user = format!("kmadm_{}", rand_lower(8));
    let old = format!("old-{}", rand_lower(16));
    pg.batch_execute(&format!(
        "CREATE ROLE {admin_user} LOGIN SUPERUSER PASSWORD '{old}'"
    ))
    .await
    .unwrap();
    let conn =
        |pw: &str| format!("host=127.0.0.1 port=5432 user={admin_user} password={pw} dbname=test");
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        TestServer::builder()
            .data_dir(dir.path())
            .postgres("main", &conn(&old))
            .role(crate::postgres::pg_role("analyst", &schema))
            .start()
    };
    let s = start().await.unwrap();
    let admin = s.admin();
    // Admin connections opened with the old password ...
    let t = crate::start_task_in(&admin, "analyst", "w").await;
    crate::issue(&admin, &t.id).await;
    let before = backends_of(&pg, &admin_user).await;
    assert!(!before.is_empty());
    let rotated: DatabaseRotated = admin.post_empty("/v1/databases/main/rotate").await.unwrap();
    assert_eq!(rotated.engine, keymint_core::role::EngineKind::Postgres);
    let new = sealed_password(&s, "main").await;
    // ... are closed by the rotation, and issuing opens new ones.
    crate::issue(&admin, &t.id).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let now = backends_of(&pg, &admin_user).await;
        if !now.is_empty() && now.iter().all(|pid| !before.contains(pid)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "connections opened before the rotation are still open: {before:?} {now:?}"
        );
        tokio::task::yield_now().await;
    }
    // The server on this machine authenticates loopback connections with
    // `trust`, so it would accept any password: check what it stores
    // instead. It is the SCRAM verifier of keymint's sealed password, and
    // not of the old one.
    let stored: String = pg
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&admin_user],
        )
        .await
        .unwrap()
        .get(0);
    let salt_b64 = stored.split(['$', ':']).nth(2).unwrap();
    let salt: [u8; 16] =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, salt_b64)
            .unwrap()
            .try_into()
            .unwrap();
    assert_eq!(
        stored,
        keymint_engines::postgres::scram_verifier(&new, &salt, 4096)
    );
    assert_ne!(
        stored,
        keymint_engines::postgres::scram_verifier(&old, &salt, 4096)
    );
    // Issuing goes on, and after a restart too.
    let t = crate::start_task_in(&admin, "analyst", "w").await;
    crate::issue(&admin, &t.id).await;
    let _: Task = admin
        .post_empty(&format!("/v1/tasks/{}/revoke", t.id))
        .await
        .unwrap();
    s.stop().await;
    not_on_disk(dir.path(), &new);
    let s = start().await.unwrap();
    let admin = s.admin();
    let t = crate::start_task_in(&admin, "analyst", "w").await;
    crate::issue(&admin, &t.id).await;
    let _: Task = admin
        .post_empty(&format!("/v1/tasks/{}/revoke", t.id))
        .await
        .unwrap();
    s.stop().await;
    pg.batch_execute(&format!(
        "DROP SCHEMA {schema} CASCADE; DROP ROLE {admin_user}"
    ))
    .await
    .unwrap();
}

/// Ends every session `user` has open on the MariaDB server (a pool's
/// connections end at any time: an idle timeout, a restart).
async fn end_sessions(my: &mut mysql_async::Conn, user: &str) {
    let ids: Vec<u64> = my
        .exec(
            "SELECT id FROM information_schema.processlist WHERE user = ?",
            (user,),
        )
        .await
        .unwrap();
    for id in ids {
        // One may end on its own meanwhile.
        let _ = my.query_drop(format!("KILL {id}")).await;
    }
}

/// Issues a lease of `task` on `s` within 20 s (a replica reads a rotated
/// password from the store every 2 s).
async fn issues_within(s: &TestServer, task: &str, who: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let r = s
            .admin()
            .raw(
                http::Method::POST,
                &format!("/v1/tasks/{task}/leases"),
                Some("application/json"),
                b"{}".to_vec(),
            )
            .await
            .unwrap();
        if r.status.is_success() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{who}: cannot issue: {} {}",
            r.status,
            r.text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Two replicas on one store, with one MariaDB admin. A rotation on one is
/// followed by the other: its next connections log in with the new
/// password. While a rotation holds the store's entry, another replica's
/// rotation of the same database is refused and changes nothing; an entry
/// whose time ran out (its replica stopped mid-rotation) holds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_rotate_the_admin_password_one_at_a_time_and_follow_it() {
    let Some(store_db) = crate::replicas::fresh_database().await else {
        return;
    };
    let Some(mut my) = admin_conn().await else {
        return;
    };
    let (db, admin_user, old) = mysql_admin(&mut my).await;
    let url = |pw: &str| format!("mysql://{admin_user}:{pw}@127.0.0.1:3306/{db}");
    let builder = || {
        TestServer::builder()
            .storage(crate::replicas::storage(&store_db))
            .mysql("shop", &url(&old))
            .role(my_role("clerk", &db))
    };
    let a = builder().start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for f in ["root.key", "admin.token"] {
        std::fs::copy(a.data_dir().join(f), dir.path().join(f)).unwrap();
    }
    let b = builder().data_dir(dir.path()).start().await.unwrap();
    let t = crate::start_task_in(&b.admin(), "clerk", "w").await;
    crate::issue(&b.admin(), &t.id).await;

    // Rotated on A ...
    let _: DatabaseRotated = a
        .admin()
        .post_empty("/v1/databases/shop/rotate")
        .await
        .unwrap();
    let new = sealed_password(&a, "shop").await;
    assert!(crate::mysql::login_url(&url(&old)).await.is_err());
    // ... B's connections, opened with the old password, end; B opens new
    // ones with the new password once it has read it from the store.
    end_sessions(&mut my, &admin_user).await;
    issues_within(&b, &t.id, "B, after A rotated").await;

    // Another replica's rotation under way (its entry in the store, a
    // minute to run): B's is refused and changes nothing.
    let name = "database/shop/admin-rotation";
    let hold = |until: i64| {
        let sealed = keyring(&a)
            .seal(name, until.to_string().as_bytes())
            .unwrap();
        let store = std::sync::Arc::clone(a.broker().store());
        let now = a.broker().now();
        async move { store.put_secret(name, sealed, now).await.unwrap() }
    };
    let now = a.broker().now().0;
    hold(now + 60_000).await;
    let r = rotate_raw(&b.admin(), "shop").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("another replica"), "{}", r.text());
    assert_eq!(
        r.headers["retry-after"], "1",
        "a 503 says when to ask again"
    );
    assert_eq!(sealed_password(&a, "shop").await, new);
    assert!(crate::mysql::login_url(&url(&new)).await.is_ok());

    // One whose time ran out holds nothing: B rotates, then A at once (B
    // gave the entry back), and both replicas go on issuing.
    hold(now - 1).await;
    let _: DatabaseRotated = b
        .admin()
        .post_empty("/v1/databases/shop/rotate")
        .await
        .unwrap();
    let newer = sealed_password(&a, "shop").await;
    assert_ne!(newer, new);
    let _: DatabaseRotated = a
        .admin()
        .post_empty("/v1/databases/shop/rotate")
        .await
        .unwrap();
    let newest = sealed_password(&a, "shop").await;
    assert_ne!(newest, newer);
    assert!(crate::mysql::login_url(&url(&newest)).await.is_ok());
    assert!(crate::mysql::login_url(&url(&newer)).await.is_err());
    end_sessions(&mut my, &admin_user).await;
    issues_within(&a, &t.id, "A, after both rotated").await;
    issues_within(&b, &t.id, "B, after both rotated").await;
    let _: Task = a
        .admin()
        .post_empty(&format!("/v1/tasks/{}/revoke", t.id))
        .await
        .unwrap();
    a.stop().await;
    b.stop().await;
    my.query_drop(format!(
        "DROP USER `{admin_user}`@`%`; DROP DATABASE `{db}`"
    ))
    .await
    .unwrap();
}

/// keymint's admin may act as a group role (`ALTER ROLE … SET role`, or
/// `options='-c role=…'` in the connection): `CURRENT_USER` is then the
/// group. The rotation must set the password of the role keymint logs in
/// as, never the group's: otherwise the store holds a password the login
/// role never had, and every new admin connection fails on a server that
/// checks passwords.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_sets_the_password_of_the_postgres_login_role_not_of_the_role_it_acts_as() {
    let Some(pg) = crate::postgres::admin_conn().await else {
        return;
    };
    let schema = crate::postgres::schema(&pg).await;
    let admin_user = format!("kmadm_{}", rand_lower(8));
    let group = format!("{admin_user}_grp");
    let old = format!("old-{}", rand_lower(16));
    pg.batch_execute(&format!(
        "CREATE ROLE {group} NOLOGIN CREATEROLE; \
         CREATE ROLE {admin_user} LOGIN PASSWORD '{old}' IN ROLE {group}; \
         ALTER ROLE {admin_user} SET role = '{group}'"
    ))
    .await
    .unwrap();
    let s = TestServer::builder()
        .postgres(
            "main",
            &format!("host=127.0.0.1 port=5432 user={admin_user} password={old} dbname=test"),
        )
        .role(crate::postgres::pg_role("analyst", &schema))
        .start()
        .await
        .unwrap();
    let rotated: Result<DatabaseRotated, _> =
        s.admin().post_empty("/v1/databases/main/rotate").await;
    let new = match &rotated {
        Ok(_) => Some(sealed_password(&s, "main").await),
        Err(_) => None,
    };
    s.stop().await;
    let stored = |role: String| {
        let pg = &pg;
        async move {
            pg.query_one(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                &[&role],
            )
            .await
            .unwrap()
            .get::<_, Option<String>>(0)
        }
    };
    let login = stored(admin_user.clone()).await.unwrap();
    let of_group = stored(group.clone()).await;
    pg.batch_execute(&format!(
        "DROP SCHEMA {schema} CASCADE; DROP ROLE {admin_user}; DROP ROLE {group}"
    ))
    .await
    .unwrap();
    rotated.unwrap();
    assert_eq!(of_group, None, "the group role got a password");
    let salt_b64 = login.split(['$', ':']).nth(2).unwrap();
    let salt: [u8; 16] =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, salt_b64)
            .unwrap()
            .try_into()
            .unwrap();
    assert_eq!(
        login,
        keymint_engines::postgres::scram_verifier(&new.unwrap(), &salt, 4096),
        "the login role must hold keymint's new password"
    );
}
