//! Two keymint servers on one PostgreSQL database (a fresh database with a
//! random name on the test server): what one replica does, the other sees,
//! and a task ended on one is refused on the other within a bound.

use std::time::{Duration, Instant};

use keymint_proto::{EndStatus, EndTask, Task};
use keymint_server::config::StorageBackend;
use keymint_store::{PgTls, PostgresOptions};
use keymint_testkit::TestServer;

use keymint_store::pg_test::TestDatabase;

use crate::postgres::admin_conn;

const ADMIN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

/// A new database on the test server, dropped with the guard (the first
/// one of the run also drops old leftovers), or `None` outside CI without
/// a server.
pub(crate) async fn fresh_database() -> Option<TestDatabase> {
    admin_conn().await?;
    Some(TestDatabase::create(ADMIN).await.unwrap())
}

pub(crate) fn storage(db: &str) -> StorageBackend {
    StorageBackend::Postgres {
        options: Box::new(
            PostgresOptions::new(
                &format!("postgres://postgres@127.0.0.1:5432/{db}"),
                None,
                4,
                PgTls::Disable,
            )
            .unwrap(),
        ),
        password_file: None,
    }
}

/// Starts `n` servers on `db` with configuration `toml` (none: the test
/// kit's), sharing the first one's root key and admin token, as replicas
/// behind a load balancer would. The directory holds the others' data.
pub(crate) async fn replicas(
    db: &str,
    toml: Option<&str>,
    n: usize,
) -> (Vec<TestServer>, tempfile::TempDir) {
    let builder = |data: Option<&std::path::Path>| {
        let mut b = TestServer::builder().storage(storage(db));
        if let Some(t) = toml {
            b = b.config_toml(t);
        }
        if let Some(d) = data {
            b = b.data_dir(d);
        }
        b
    };
    let first = builder(None).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut all = vec![first];
    for i in 1..n {
        let data = dir.path().join(format!("r{i}"));
        std::fs::create_dir_all(&data).unwrap();
        for f in ["root.key", "admin.token"] {
            std::fs::copy(all[0].data_dir().join(f), data.join(f)).unwrap();
        }
        all.push(builder(Some(&data)).start().await.unwrap());
    }
    (all, dir)
}

async fn two_replicas(db: &str) -> (TestServer, TestServer, tempfile::TempDir) {
    let (mut rs, dir) = replicas(db, None, 2).await;
    let b = rs.pop().unwrap();
    let a = rs.pop().unwrap();
    (a, b, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_ended_on_one_replica_is_refused_on_the_other() {
    let Some(db) = fresh_database().await else {
        return;
    };
    let (a, b, _dir) = two_replicas(&db).await;

    // Started on A, visible on B.
    let task = crate::start_task(&a.admin(), "replicated-agent").await;
    let seen: Task = b
        .admin()
        .get(&format!("/v1/tasks/{}", task.id))
        .await
        .unwrap();
    assert_eq!(seen.id, task.id);

    // A token issued on A works on B's API, and on A's (now cached there).
    let (_lease, token) = crate::issue(&a.admin(), &task.id).await;
    let path = format!("/v1/tasks/{}", task.id);
    for s in [&b, &a, &a] {
        let r = s
            .client(&token)
            .raw(http::Method::GET, &path, None, vec![])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }

    // Ended on B: A refuses the token (its cache is invalidated by B's
    // notification, or at worst by the 1 s poll).
    let ended_at = Instant::now();
    let _: Task = b
        .admin()
        .post(
            &format!("/v1/tasks/{}/end", task.id),
            &EndTask {
                status: EndStatus::Completed,
                reason: None,
            },
        )
        .await
        .unwrap();
    let mut refused = None;
    while ended_at.elapsed() < Duration::from_secs(2) {
        let r = a
            .client(&token)
            .raw(http::Method::GET, &path, None, vec![])
            .await
            .unwrap();
        if r.status == 401 {
            refused = Some(ended_at.elapsed());
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let delay = refused.expect("replica A still accepts the token 2 s after the task ended on B");
    eprintln!("revocation propagated from replica B to replica A in {delay:?}");

    // One audit chain for both: A verifies what B wrote and the reverse.
    let head_a = a.broker().store().counts().await.unwrap().audit_head;
    let head_b = b.broker().store().counts().await.unwrap().audit_head;
    assert_eq!(head_a, head_b);
    keymint_store::conformance::assert_chain_valid(&**a.broker().store()).await;
    a.stop().await;
    b.stop().await;
}

/// Three servers on `db` with the budget roles of `budgets.rs` and the fake
/// upstream's key, sharing one root key and admin token.
pub(crate) async fn three_proxies(
    db: &str,
    up: &keymint_testkit::upstream::FakeUpstream,
) -> (Vec<TestServer>, tempfile::TempDir) {
    let toml = crate::budgets::config(up);
    let (all, dir) = replicas(db, Some(&toml), 3).await;
    crate::set_upstream_key(&all[0].admin(), "openai", crate::budgets::KEY).await;
    (all, dir)
}

/// Budgets reserved in chunks per replica stay exact across replicas
/// (docs/design/0030-chunked-budgets.md): 30 concurrent requests spread
/// over three replicas against a budget of 5 give exactly 5; against a
/// budget of 100 never more than 100, and every one of the 100 is usable
/// once idle chunks are given back; a chunk held by an idle replica goes
/// back so that another can use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chunked_budgets_are_exact_across_three_replicas() {
    use crate::budgets::{chat, drain, token_for};
    use keymint_testkit::upstream::FakeUpstream;
    let Some(db) = fresh_database().await else {
        return;
    };
    let up = FakeUpstream::start(crate::budgets::KEY).await.unwrap();
    let (rs, _dir) = three_proxies(&db, &up).await;
    let admin = rs[0].admin();
    let spread =
        |tok: &str| -> Vec<keymint_client::Client> { rs.iter().map(|r| r.client(tok)).collect() };
    let concurrent = |clients: Vec<keymint_client::Client>, n: usize| async move {
        let mut handles = Vec::new();
        for i in 0..n {
            let c = clients[i % clients.len()].clone();
            handles.push(tokio::spawn(async move { chat(&c, None).await }));
        }
        let mut ok = 0;
        for h in handles {
            if h.await.unwrap() == 200 {
                ok += 1;
            }
        }
        ok
    };

    up.set_delay(Duration::from_millis(100));
    let t = crate::start_task_in(&admin, "five", "agent").await;
    let tok = token_for(&admin, &t.id).await;
    assert_eq!(concurrent(spread(&tok), 30).await, 5);
    assert_eq!(up.received().len(), 5);
    assert_eq!(rs[2].proxy().task_usage(&t.id).await.requests, 5);

    // 100: chunks on every replica; never more than 100 at once, and all
    // 100 once the idle chunks are back.
    up.set_delay(Duration::from_millis(20));
    let t = crate::start_task_in(&admin, "hundred", "agent").await;
    let tok = token_for(&admin, &t.id).await;
    let before = up.received().len();
    let first = concurrent(spread(&tok), 150).await;
    assert!((1..=100).contains(&first), "{first}");
    let rest = drain(&spread(&tok), None).await;
    assert_eq!(first + rest, 100);
    assert_eq!(up.received().len() - before, 100);
    for r in &rs {
        assert_eq!(r.proxy().task_usage(&t.id).await.requests, 100);
    }

    // One request on replica A reserves a chunk of 12 and holds 11; once
    // A is idle they go back, and replica B can use all 99 left.
    up.set_delay(Duration::ZERO);
    let t = crate::start_task_in(&admin, "hundred", "agent").await;
    let tok = token_for(&admin, &t.id).await;
    assert_eq!(chat(&rs[0].client(&tok), None).await, 200);
    assert_eq!(rs[0].proxy().chunked_requests(), 11);
    let t0 = Instant::now();
    while rs[0].proxy().chunked_requests() > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the idle chunk was kept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let b = rs[1].client(&tok);
    let mut ok = 0;
    while chat(&b, None).await == 200 {
        ok += 1;
        assert!(ok <= 99);
    }
    assert_eq!(ok, 99);
    assert_eq!(rs[1].proxy().task_usage(&t.id).await.requests, 100);
    for r in rs {
        r.stop().await;
    }
}
