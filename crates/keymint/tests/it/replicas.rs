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

/// Starts two servers on `db` sharing one root key and admin token (as
/// replicas behind a load balancer would).
async fn two_replicas(db: &str) -> (TestServer, TestServer, tempfile::TempDir) {
    let a = TestServer::builder()
        .storage(storage(db))
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let b_data = dir.path().join("b");
    std::fs::create_dir_all(&b_data).unwrap();
    for f in ["root.key", "admin.token"] {
        std::fs::copy(a.data_dir().join(f), b_data.join(f)).unwrap();
    }
    let b = TestServer::builder()
        .storage(storage(db))
        .data_dir(&b_data)
        .start()
        .await
        .unwrap();
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
