//! The duty lease and dead replicas' work on PostgreSQL
//! (docs/design/0022-duties-and-replicas.md): two stores on one schema,
//! as two replicas. One holds the duties; a holder that lost the lease
//! without knowing it (a paused process) writes nothing; only a dead
//! replica's pending leases, claims and reservations are taken over.

use std::collections::HashSet;

use keymint_core::audit::AuditDraft;
use keymint_core::model::{EndReason, LeaseState};
use keymint_store::conformance::{self, T0};
use keymint_store::{LeaseSelector, PostgresStore, ReservationFor, Store, Usage};
use tokio_postgres::NoTls;

use crate::postgres::{fresh_schema, options};

const ADMIN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

async fn admin(schema: &str) -> tokio_postgres::Client {
    let (c, conn) =
        tokio_postgres::connect(&format!("{ADMIN} options='-c search_path={schema}'"), NoTls)
            .await
            .unwrap();
    tokio::spawn(conn);
    c
}

fn reservation(task: &str, lease: &str) -> ReservationFor {
    ReservationFor {
        task: task.into(),
        lease: lease.into(),
        workload: "agent".into(),
        role: "r".into(),
        fingerprint: "fp".into(),
        upstream: "openai".into(),
        now: T0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_holds_the_duties_and_a_holder_that_lost_them_writes_nothing() {
    let Some(schema) = fresh_schema().await else {
        return;
    };
    let a = PostgresStore::open(options(&schema, 3)).await.unwrap();
    let b = PostgresStore::open(options(&schema, 3)).await.unwrap();
    let db = admin(&schema).await;

    let ea = a
        .hold_duties(3_000)
        .await
        .unwrap()
        .expect("the first asker holds");
    assert_eq!(b.hold_duties(3_000).await.unwrap(), None, "one holder");
    assert_eq!(a.hold_duties(3_000).await.unwrap(), Some(ea), "renewed");

    let task = conformance::start(&a, conformance::task("agent", "r", None, T0, 600)).await;
    for _ in 0..3 {
        conformance::issue(&a, &task, LeaseState::Active, T0, 5).await;
    }
    let now = T0.plus_secs(10);
    // B does not hold the lease: its sweep changes nothing.
    assert!(b.expire_due(now, 10).await.unwrap().is_empty());
    assert!(b.take_over_dead_claims(now).await.unwrap() == 0);

    // A is paused past its lease (simulated: the lease runs out), B takes
    // over with a new epoch; A, which still believes it holds, is fenced.
    db.batch_execute("UPDATE duty_lease SET expires_ms = 0")
        .await
        .unwrap();
    let eb = b.hold_duties(3_000).await.unwrap().expect("taken over");
    assert!(eb > ea, "a new holder, a new epoch");
    assert!(
        a.expire_due(now, 10).await.unwrap().is_empty(),
        "the old holder's sweep is fenced"
    );
    assert!(
        a.due_revocations(now.plus_secs(60), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let swept = b.expire_due(now, 10).await.unwrap();
    assert_eq!(swept.len(), 3, "the new holder sweeps");
    assert_eq!(
        a.hold_duties(3_000).await.unwrap(),
        None,
        "A learns it lost"
    );

    // A clean release hands the lease over at once.
    b.release_duties().await.unwrap();
    let ea2 = a
        .hold_duties(3_000)
        .await
        .unwrap()
        .expect("free after release");
    assert!(ea2 > eb);

    // SSH serials from both replicas never repeat.
    let mut serials = HashSet::new();
    for _ in 0..20 {
        assert!(serials.insert(a.next_ssh_serial().await.unwrap().unwrap()));
        assert!(serials.insert(b.next_ssh_serial().await.unwrap().unwrap()));
    }
    conformance::assert_chain_valid(&a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_dead_replicas_pending_leases_claims_and_reservations_are_taken_over() {
    let Some(schema) = fresh_schema().await else {
        return;
    };
    let a = PostgresStore::open(options(&schema, 3)).await.unwrap();
    let b = PostgresStore::open(options(&schema, 3)).await.unwrap();
    let db = admin(&schema).await;
    assert!(b.hold_duties(3_000).await.unwrap().is_some());

    // A's work in flight: a lease being issued, a revocation it drives,
    // a proxied request.
    let task = conformance::start(&a, conformance::task("agent", "r", None, T0, 600)).await;
    let pending = conformance::issue(&a, &task, LeaseState::Pending, T0, 60).await;
    let active = conformance::issue(&a, &task, LeaseState::Active, T0, 60).await;
    let claimed = a
        .request_revocation(
            LeaseSelector::Id(active.id.clone()),
            EndReason::Revoked,
            T0,
            "admin",
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let rsv = a
        .reserve_budget(
            reservation(&task.id, &active.id),
            Box::new(|_| {
                Ok(Usage {
                    requests: 1,
                    ..Usage::default()
                })
            }),
        )
        .await
        .unwrap();
    let now = T0.plus_secs(1);

    // While A lives, B (starting, or sweeping) takes none of it, however
    // late its `before`.
    let later = T0.plus_secs(3600);
    assert!(b.stale_pending(later, 10).await.unwrap().is_empty());
    assert_eq!(b.take_over_dead_claims(now).await.unwrap(), 0);
    assert!(b.due_revocations(now, 10).await.unwrap().is_empty());
    assert_eq!(
        b.settle_stale_reservations(later, now, 10).await.unwrap(),
        0
    );
    assert_eq!(b.budget_of(&task.id).await.unwrap().1.requests, 1);

    // A dies: its heartbeat stops (and is older than the dead bound).
    let me = a.replica().to_owned();
    drop(a);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    db.execute("UPDATE replicas SET heartbeat_ms = 0 WHERE id = $1", &[&me])
        .await
        .unwrap();

    // Now B takes all three over, whatever their age.
    let stale = b.stale_pending(T0, 10).await.unwrap();
    assert_eq!(
        stale.iter().map(|l| &l.id).collect::<Vec<_>>(),
        vec![&pending.id]
    );
    assert_eq!(b.take_over_dead_claims(now).await.unwrap(), 1);
    let due = b.due_revocations(now, 10).await.unwrap();
    assert_eq!(
        due.iter().map(|l| &l.id).collect::<Vec<_>>(),
        vec![&active.id]
    );
    assert_eq!(
        b.take_over_dead_claims(now).await.unwrap(),
        0,
        "B's claim now"
    );
    assert_eq!(b.settle_stale_reservations(T0, now, 10).await.unwrap(), 1);
    let (used, reserved) = b.budget_of(&task.id).await.unwrap();
    assert_eq!(
        (used.requests, reserved.requests),
        (1, 0),
        "charged in full"
    );
    // The settle A would have sent, late, charges nothing more.
    b.settle_budget(vec![keymint_store::BudgetSettle {
        id: rsv.id,
        used: Some(Usage::default()),
        now,
    }])
    .await
    .unwrap();
    assert_eq!(b.budget_of(&task.id).await.unwrap().0.requests, 1);
    b.append_audit(AuditDraft::new(now, "admin.test", "admin"))
        .await
        .unwrap();
    conformance::assert_chain_valid(&b).await;
}

/// A database that stops taking writes makes the store report it (the
/// heartbeat goes through the writer), and writes fail as unavailable;
/// once it takes writes again the report clears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_refuses_writes_is_reported_and_clears() {
    let Some(schema) = fresh_schema().await else {
        return;
    };
    let a = PostgresStore::open(options(&schema, 3)).await.unwrap();
    let db = admin(&schema).await;
    assert!(a.hold_duties(3_000).await.unwrap().is_some());
    assert_eq!(a.write_failure(), None);
    // Every write of this schema fails (as on a read-only standby).
    db.batch_execute(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'read-only'; END $$; \
         CREATE TRIGGER refuse BEFORE UPDATE ON audit_head \
         FOR EACH ROW EXECUTE FUNCTION refuse(); \
         CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON replicas \
         FOR EACH ROW EXECUTE FUNCTION refuse()",
    )
    .await
    .unwrap();
    let r = a
        .append_audit(AuditDraft::new(T0, "admin.test", "admin"))
        .await;
    assert!(
        matches!(r, Err(keymint_store::StoreError::Unavailable(_))),
        "{r:?}"
    );
    assert!(a.write_failure().is_some(), "reported");
    db.batch_execute("DROP TRIGGER refuse ON audit_head; DROP TRIGGER refuse ON replicas")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while a.write_failure().is_some() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(a.write_failure(), None, "cleared by the next write");
}
