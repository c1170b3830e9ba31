//! The conformance suite against the machine's PostgreSQL, each check in a
//! schema of its own with a random name (other tests use the same server
//! at the same time), and what only a shared store must show: two stores
//! (two replicas) on one database writing and sweeping at once.

use std::collections::HashSet;
use std::sync::Arc;

use keymint_core::audit::AuditDraft;
use keymint_core::model::{EndReason, LeaseState, TaskStatus};
use keymint_store::conformance::{self, T0};
use keymint_store::pg_test::TestSchema;
use keymint_store::{PgTls, PostgresOptions, PostgresStore, Store, TaskEnd};
use tokio_postgres::NoTls;

const ADMIN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

#[expect(
    clippy::disallowed_methods,
    reason = "tests read CI to decide skip or fail"
)]
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A new, empty schema on the test server, dropped with the guard (the
/// first one of the run also drops old leftovers), or `None` (outside CI)
/// when there is no server.
pub async fn fresh_schema() -> Option<TestSchema> {
    match TestSchema::create(ADMIN).await {
        Ok(s) => Some(s),
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

pub fn options(schema: &str, pool_size: usize) -> PostgresOptions {
    PostgresOptions::new(
        &format!("{ADMIN} options='-c search_path={schema}'"),
        None,
        pool_size,
        PgTls::Disable,
    )
    .unwrap()
}

async fn fresh() -> Option<(Arc<dyn Store>, TestSchema)> {
    let schema = fresh_schema().await?;
    let store: Arc<dyn Store> = Arc::new(PostgresStore::open(options(&schema, 4)).await.unwrap());
    Some((store, schema))
}

mod conformance_pg {
    use super::*;
    keymint_store::conformance_tests!(optional fresh().await);
}

/// Two stores (as two replicas would) on one schema: both issue leases at
/// once, then both sweep expiries and due revocations at once. The one
/// audit chain verifies, and no lease is handed to both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_one_chain_and_never_claim_a_lease_twice() {
    let Some(schema) = fresh_schema().await else {
        return;
    };
    // Both open the fresh schema at once: the migrations run once.
    let (a, b) = tokio::join!(
        PostgresStore::open(options(&schema, 4)),
        PostgresStore::open(options(&schema, 4))
    );
    let (a, b): (Arc<dyn Store>, Arc<dyn Store>) = (Arc::new(a.unwrap()), Arc::new(b.unwrap()));
    let task = conformance::start(&*a, conformance::task("agent", "r", None, T0, 600)).await;
    // The task is visible through the other replica.
    assert_eq!(b.get_task(&task.id).await.unwrap().as_ref(), Some(&task));

    let mut handles = Vec::new();
    for i in 0..120u32 {
        let s = if i % 2 == 0 {
            Arc::clone(&a)
        } else {
            Arc::clone(&b)
        };
        let t = task.clone();
        handles.push(tokio::spawn(async move {
            conformance::issue(&*s, &t, LeaseState::Active, T0, 5).await;
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(conformance::assert_chain_valid(&*a).await, 1 + 120);

    // Both sweep expiries at once, in small batches; each takes its first
    // batch before either goes on (so neither can take them all before the
    // other has started).
    let first = Arc::new(tokio::sync::Barrier::new(2));
    let sweep = |s: Arc<dyn Store>| {
        let first = Arc::clone(&first);
        tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let batch = s.expire_due(T0.plus_secs(10), 7).await.unwrap();
                if got.is_empty() {
                    first.wait().await;
                }
                if batch.is_empty() {
                    break got;
                }
                got.extend(batch.into_iter().map(|l| l.id));
            }
        })
    };
    let (ea, eb) = tokio::join!(sweep(Arc::clone(&a)), sweep(Arc::clone(&b)));
    let (ea, eb) = (ea.unwrap(), eb.unwrap());
    let all: Vec<_> = ea.iter().chain(&eb).cloned().collect();
    let unique: HashSet<_> = all.iter().cloned().collect();
    assert_eq!(all.len(), 120, "every expired lease claimed once");
    assert_eq!(unique.len(), 120, "no lease claimed by both replicas");
    assert!(
        !ea.is_empty() && !eb.is_empty(),
        "both replicas swept: {} and {}",
        ea.len(),
        eb.len()
    );

    // After the claim window, both pick up the due retries at once.
    let due_at = T0
        .plus_secs(10)
        .plus_millis(keymint_store::REVOCATION_CLAIM_MS);
    let retry = |s: Arc<dyn Store>| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let batch = s.due_revocations(due_at, 5).await.unwrap();
                if batch.is_empty() {
                    break got;
                }
                got.extend(batch.into_iter().map(|l| l.id));
            }
        })
    };
    let (ra, rb) = tokio::join!(retry(Arc::clone(&a)), retry(Arc::clone(&b)));
    let all: Vec<_> = ra.unwrap().into_iter().chain(rb.unwrap()).collect();
    assert_eq!(all.len(), 120);
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 120);

    // Ending the task through B while A appends: one chain still.
    let (ended, ev) = tokio::join!(
        b.end_task(TaskEnd {
            id: task.id.clone(),
            status: TaskStatus::Completed,
            now: T0.plus_secs(11),
            actor: "admin".into(),
            reason: None,
        }),
        a.append_audit(AuditDraft::new(T0, "admin.test", "admin"))
    );
    ended.unwrap().unwrap();
    ev.unwrap();
    let n = conformance::assert_chain_valid(&*b).await;
    assert_eq!(n, 1 + 120 + 1 + 1);
    assert_eq!(a.counts().await.unwrap().audit_head, n);
    let lease = a
        .list_leases(&keymint_store::LeaseFilter {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(lease[0].end_reason, Some(EndReason::Expired));
}

/// A replica hears of a revocation committed by another one (through the
/// notification, or at worst the poll), so it can drop cached tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_replica_bumps_the_other_replicas_epoch() {
    let Some(schema) = fresh_schema().await else {
        return;
    };
    let a = PostgresStore::open(options(&schema, 2)).await.unwrap();
    let b = PostgresStore::open(options(&schema, 2)).await.unwrap();
    let epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
    b.watch_revocations(Arc::clone(&epoch));
    let task = conformance::start(&a, conformance::task("agent", "r", None, T0, 600)).await;
    conformance::issue(&a, &task, LeaseState::Active, T0, 60).await;
    // The listener bumps once when it starts listening.
    let settled = wait_for(|| epoch.load(std::sync::atomic::Ordering::Acquire) >= 1).await;
    assert!(settled, "the listener started");
    let before = epoch.load(std::sync::atomic::Ordering::Acquire);
    let started = std::time::Instant::now();
    a.end_task(TaskEnd {
        id: task.id.clone(),
        status: TaskStatus::Completed,
        now: T0.plus_secs(1),
        actor: "admin".into(),
        reason: None,
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        wait_for(|| epoch.load(std::sync::atomic::Ordering::Acquire) > before).await,
        "the other replica heard of the task's end"
    );
    eprintln!(
        "revocation reached the other replica's epoch in {:?}",
        started.elapsed()
    );
}

async fn wait_for(f: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    f()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused() {
    let Some(schema) = fresh_schema().await else {
        return;
    };
    drop(PostgresStore::open(options(&schema, 2)).await.unwrap());
    let (client, conn) = tokio_postgres::connect(ADMIN, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("UPDATE {schema}.keymint_schema SET version = 99"))
        .await
        .unwrap();
    let err = PostgresStore::open(options(&schema, 2))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("newer than this keymint understands"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_survives_a_reopen_and_the_chain_continues() {
    let Some(schema) = fresh_schema().await else {
        return;
    };
    let (task, lease) = {
        let s = PostgresStore::open(options(&schema, 2)).await.unwrap();
        let t = conformance::start(&s, conformance::task("agent", "r", None, T0, 60)).await;
        let l = conformance::issue(&s, &t, LeaseState::Active, T0, 30).await;
        s.put_secret("ca", vec![9; 32], T0).await.unwrap();
        (t, l)
    };
    let s = PostgresStore::open(options(&schema, 2)).await.unwrap();
    assert_eq!(s.get_task(&task.id).await.unwrap(), Some(task.clone()));
    assert_eq!(s.get_lease(&lease.id).await.unwrap(), Some(lease));
    assert_eq!(s.get_secret("ca").await.unwrap(), Some(vec![9; 32]));
    conformance::issue(&s, &task, LeaseState::Active, T0, 30).await;
    assert_eq!(conformance::assert_chain_valid(&s).await, 3);
}

/// The URL never carries the password; the password is never shown;
/// errors name the setting, not its value.
#[test]
fn options_keep_the_password_out_of_sight() {
    let pw = "s3cr3t-Pa55word-for-test";
    let o = PostgresOptions::new(
        "postgres://keymint@db.internal:5432/keymint",
        Some(zeroize::Zeroizing::new(pw.to_owned())),
        8,
        PgTls::Require { ca_file: None },
    )
    .unwrap();
    let shown = format!("{o:?}");
    assert!(!shown.contains(pw), "{shown}");
    assert!(!o.is_local());
    let err = PostgresOptions::new(
        &format!("postgres://keymint:{pw}@db.internal/keymint"),
        None,
        8,
        PgTls::Disable,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("password_file") && !err.contains(pw), "{err}");
    let err = PostgresOptions::new(&format!("postgres://{pw}@[::1"), None, 8, PgTls::Disable)
        .unwrap_err()
        .to_string();
    assert!(!err.contains(pw), "{err}");
    assert!(PostgresOptions::new("postgres://k@127.0.0.1/db", None, 1, PgTls::Disable).is_err());
    assert!(PostgresOptions::new("postgres://k@127.0.0.1", None, 8, PgTls::Disable).is_err());
    for local in [
        "postgres://k@127.0.0.1:5432/db",
        "postgres://k@localhost/db",
        "postgres://k@[::1]/db",
        "host=/run/postgresql dbname=db",
    ] {
        let o = PostgresOptions::new(local, None, 8, PgTls::Disable).unwrap();
        assert!(o.is_local(), "{local}");
    }
}

/// With `tls = "require"`, keymint never falls back to plain text and
/// never accepts a certificate it cannot verify: against this server
/// (plain, or TLS with a self-signed certificate that is not in the
/// Mozilla roots) the connection is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_tls_is_never_downgraded_nor_unverified() {
    let Some(schema) = fresh_schema().await else {
        return;
    };
    let o = PostgresOptions::new(
        &format!("{ADMIN} options='-c search_path={schema}'"),
        None,
        2,
        PgTls::Require { ca_file: None },
    )
    .unwrap();
    let err = PostgresStore::open(o).await.unwrap_err().to_string();
    assert!(err.contains("cannot connect"), "{err}");
}

async fn admin() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(ADMIN, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

async fn schema_exists(c: &tokio_postgres::Client, name: &str) -> bool {
    c.query_one(
        "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
        &[&name],
    )
    .await
    .unwrap()
    .get::<_, i64>(0)
        == 1
}

/// A test's schema goes with its guard: after a check that passed, and
/// after one that panicked with a store open on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_schema_is_dropped_with_its_guard_even_when_the_test_fails() {
    let Some(schema) = fresh_schema().await else {
        return;
    };
    let c = admin().await;
    let name = schema.to_string();
    let store = PostgresStore::open(options(&schema, 2)).await.unwrap();
    conformance::start(&store, conformance::task("agent", "r", None, T0, 60)).await;
    assert!(schema_exists(&c, &name).await);
    drop(store);
    drop(schema);
    assert!(!schema_exists(&c, &name).await, "{name} is left");

    // A failing test: the guard is dropped while the task unwinds.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let failed = tokio::spawn(async move {
        let schema = fresh_schema().await.unwrap();
        let store = PostgresStore::open(options(&schema, 2)).await.unwrap();
        tx.send(schema.to_string()).unwrap();
        conformance::start(&store, conformance::task("agent", "r", None, T0, 60)).await;
        panic!("the check failed");
    })
    .await;
    assert!(failed.unwrap_err().is_panic());
    let name = rx.await.unwrap();
    assert!(!schema_exists(&c, &name).await, "{name} is left");
}

/// Leftovers of killed runs are dropped by the sweep when they are old
/// (by the time in their name, or for older names by their files' age);
/// a young one, which may be another run's, is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_drops_old_leftovers_and_keeps_young_ones() {
    let Some(young) = fresh_schema().await else {
        return;
    };
    let c = admin().await;
    let now = std::time::UNIX_EPOCH.elapsed().unwrap().as_secs();
    let old = format!(
        "kms_{}_sweeptest{}",
        now - 2 * 3600,
        &young[young.len() - 6..]
    );
    let old_db = format!(
        "kmr_{}_sweeptest{}",
        now - 2 * 3600,
        &young[young.len() - 6..]
    );
    c.batch_execute(&format!(
        "CREATE SCHEMA {old}; CREATE TABLE {old}.t (x int)"
    ))
    .await
    .unwrap();
    c.batch_execute(&format!("CREATE DATABASE {old_db}"))
        .await
        .unwrap();
    let dropped = keymint_store::pg_test::sweep_leftovers(&c).await.unwrap();
    assert!(dropped >= 2, "{dropped}");
    assert!(!schema_exists(&c, &old).await);
    let dbs: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&old_db],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dbs, 0);
    assert!(
        schema_exists(&c, &young).await,
        "a young schema was dropped"
    );
}

/// 200 lease inserts in `task` at once; the 101st (index 100) takes the
/// id `taken`. Each handle answers the id it asked for and the store's
/// answer.
pub(crate) fn insert_200_one_taken(
    s: &Arc<dyn Store>,
    task: &keymint_core::model::Task,
    taken: &str,
) -> Vec<tokio::task::JoinHandle<(String, keymint_store::Result<keymint_core::model::Lease>)>> {
    (0..200u32)
        .map(|i| {
            let (s, t) = (Arc::clone(s), task.clone());
            let mut l = conformance::lease(&t, LeaseState::Active, T0, 60);
            if i == 100 {
                taken.clone_into(&mut l.id);
            }
            let id = l.id.clone();
            tokio::spawn(async move { (id, s.insert_lease(&t.id, grant_if_active(l)).await) })
        })
        .collect()
}

/// A lease granted by a closure that refuses an ended task, as the broker's
/// grant does (`RuleError::TaskNotActive`).
fn grant_if_active(lease: keymint_core::model::Lease) -> keymint_store::LeaseGrantFn {
    Box::new(move |t| {
        if t.status != TaskStatus::Active {
            return Err(keymint_core::rules::RuleError::TaskNotActive(t.id.clone()));
        }
        let ev = AuditDraft::new(T0, "lease.issued", "admin").lease(&lease.id);
        Ok((lease, ev))
    })
}

/// The writer reads a task once per batch for the lease inserts queued
/// together (docs/design/0036): a task ended by a job queued among them is
/// seen ended by every insert after it in the same transaction, and every
/// acknowledged lease is stored, none other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inserts_batched_around_a_task_end_see_the_task_as_it_is_then() {
    let Some(schema) = fresh_schema().await else {
        return;
    };
    let s: Arc<dyn Store> = Arc::new(PostgresStore::open(options(&schema, 4)).await.unwrap());
    let task = conformance::start(&*s, conformance::task("agent", "r", None, T0, 600)).await;
    // Keep the writer busy so that what follows queues up into batches.
    let mut before = Vec::new();
    for _ in 0..300 {
        let (s, t) = (Arc::clone(&s), task.clone());
        let l = conformance::lease(&t, LeaseState::Active, T0, 60);
        before.push(tokio::spawn(async move {
            s.insert_lease(&t.id, grant_if_active(l)).await
        }));
    }
    let ender = {
        let (s, id) = (Arc::clone(&s), task.id.clone());
        tokio::spawn(async move {
            s.end_task(TaskEnd {
                id,
                status: TaskStatus::Completed,
                now: T0.plus_secs(1),
                actor: "admin".into(),
                reason: None,
            })
            .await
        })
    };
    let mut after = Vec::new();
    for _ in 0..300 {
        let (s, t) = (Arc::clone(&s), task.clone());
        let l = conformance::lease(&t, LeaseState::Active, T0, 60);
        after.push(tokio::spawn(async move {
            s.insert_lease(&t.id, grant_if_active(l)).await
        }));
    }
    let mut granted = HashSet::new();
    let mut refused = 0;
    for h in before.into_iter().chain(after) {
        match h.await.unwrap() {
            Ok(l) => {
                granted.insert(l.id);
            }
            Err(keymint_store::StoreError::Rule(_)) => refused += 1,
            Err(e) => panic!("an insert failed for another reason: {e}"),
        }
    }
    ender.await.unwrap().unwrap().unwrap();
    assert!(refused > 0, "the task ended while inserts were queued");
    assert_eq!(granted.len() + refused, 600);
    // Once ended, the task refuses every later insert.
    let late = conformance::lease(&task, LeaseState::Active, T0, 60);
    assert!(matches!(
        s.insert_lease(&task.id, grant_if_active(late)).await,
        Err(keymint_store::StoreError::Rule(_))
    ));
    // Every acknowledged lease is stored, and nothing else.
    let mut stored = HashSet::new();
    let mut cursor = None;
    loop {
        let page = s
            .list_leases(&keymint_store::LeaseFilter {
                limit: 500,
                before: cursor.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        cursor = Some(last.id.clone());
        stored.extend(page.into_iter().map(|l| l.id));
    }
    assert_eq!(stored, granted);
    // Every lease was issued before the end's first event: none was
    // granted on a task already ended in its transaction.
    conformance::assert_chain_valid(&*s).await;
    let mut chain = Vec::new();
    loop {
        let page = s
            .audit_after(
                chain
                    .last()
                    .map_or(0, |e: &keymint_core::audit::AuditEvent| e.seq),
                500,
            )
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        chain.extend(page);
    }
    let issued: Vec<u64> = chain
        .iter()
        .filter(|e| e.kind == "lease.issued")
        .map(|e| e.seq)
        .collect();
    let end = chain
        .iter()
        .find(|e| e.kind != "lease.issued" && e.kind != "task.started")
        .map(|e| e.seq)
        .unwrap();
    assert_eq!(issued.len(), granted.len());
    assert!(
        issued.iter().all(|seq| *seq < end),
        "a lease was issued after the task's end (event {end})"
    );
}

/// A lease insert the database refuses (here an id that exists already) is
/// sent without waiting inside its batch (docs/design/0036): it fails its
/// whole transaction, so no job of that batch is acknowledged, every
/// acknowledged lease is stored and every refused one is not, the chain
/// verifies, and the writer goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_the_database_refuses_fails_its_batch_and_nothing_of_it_is_kept() {
    let Some(schema) = fresh_schema().await else {
        return;
    };
    let s: Arc<dyn Store> = Arc::new(PostgresStore::open(options(&schema, 4)).await.unwrap());
    let task = conformance::start(&*s, conformance::task("agent", "r", None, T0, 600)).await;
    let first = conformance::issue(&*s, &task, LeaseState::Active, T0, 60).await;
    let handles = insert_200_one_taken(&s, &task, &first.id);
    let (mut ok, mut failed) = (HashSet::new(), HashSet::new());
    for h in handles {
        let (id, r) = h.await.unwrap();
        match r {
            Ok(l) => {
                assert_eq!(l.id, id);
                ok.insert(id);
            }
            Err(_) => {
                failed.insert(id);
            }
        }
    }
    assert!(failed.contains(&first.id), "the duplicate id was refused");
    for id in &ok {
        assert!(
            s.get_lease(id).await.unwrap().is_some(),
            "acknowledged {id} is stored"
        );
    }
    for id in failed.iter().filter(|id| **id != first.id) {
        assert!(
            s.get_lease(id).await.unwrap().is_none(),
            "refused {id} is not stored"
        );
    }
    let kept = s.get_lease(&first.id).await.unwrap().unwrap();
    assert_eq!(kept, first, "the existing lease is untouched");
    // One event per stored lease (and the task's), no gap, no fork.
    assert_eq!(
        conformance::assert_chain_valid(&*s).await,
        1 + 1 + ok.len() as u64
    );
    // The writer goes on.
    conformance::issue(&*s, &task, LeaseState::Active, T0, 60).await;
    conformance::assert_chain_valid(&*s).await;
}

/// An inventory entry this version cannot read (a newer version's status,
/// damage) is passed over by the listing, whose pages are still full and
/// still reach every entry after it (as on SQLite; the server's test is
/// `inventory::an_unreadable_entry_stops_neither_the_listing_nor_the_leak_response_retries`).
#[tokio::test]
async fn an_unreadable_inventory_entry_is_passed_over_and_the_page_still_filled() {
    use keymint_core::inventory::{InventoryItem, ItemStatus, Origin};
    let Some((store, schema)) = fresh().await else {
        return;
    };
    let item = |n: i64| InventoryItem {
        id: keymint_core::id::inventory_id(keymint_core::Timestamp(T0.0 + n)),
        version: 1,
        origin: Origin::Scan,
        status: ItemStatus::Active,
        name: format!("key {n}"),
        provider: "openai".into(),
        rule: None,
        fingerprint: format!("{n:064}"),
        hint: None,
        business_owner: None,
        technical_owner: None,
        purpose: None,
        environment: None,
        workloads: vec![],
        scopes: vec![],
        created_at: T0,
        expires_at: None,
        last_used_at: None,
        rotate_by: None,
        rotated_at: None,
        sightings: vec![],
        leaked_at: None,
        revocation: "manual".into(),
        lease: None,
        upstream: None,
        announced: vec![],
        response_due: None,
        updated_at: T0,
    };
    let items: Vec<InventoryItem> = (1..=3).map(item).collect();
    for i in &items {
        let ev = AuditDraft::new(T0, "inventory.changed", "admin");
        assert!(store.put_inventory(i.clone(), 0, ev).await.unwrap());
    }
    let (client, conn) = tokio_postgres::connect(ADMIN, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .execute(
            &format!(
                "UPDATE {}.inventory SET doc = jsonb_set(doc::jsonb, '{{status}}', '\"quarantined\"')::text WHERE id = $1",
                &*schema
            ),
            &[&items[1].id],
        )
        .await
        .unwrap();
    let ids = |l: Vec<InventoryItem>| l.into_iter().map(|i| i.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list_inventory(None, 2).await.unwrap()),
        vec![items[2].id.clone(), items[0].id.clone()]
    );
    assert_eq!(
        ids(store.list_inventory(Some(&items[2].id), 1).await.unwrap()),
        vec![items[0].id.clone()]
    );
    assert_eq!(store.list_inventory(None, 10).await.unwrap().len(), 2);
}
