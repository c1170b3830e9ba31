//! The conformance suite against SQLite, plus what only a file-backed store
//! can show: persistence across reopen.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failed step is a failed test"
)]

use std::sync::Arc;

use keymint_core::model::LeaseState;
use keymint_store::conformance::{self, T0};
use keymint_store::{SqliteStore, Store};

/// A fresh store in cargo's per-target scratch directory (the store's writer
/// thread outlives the test body, so the file must too; `target/tmp` is
/// cleaned with the build, not left in /tmp).
fn fresh() -> Arc<dyn Store> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("keymint-store-conformance");
    std::fs::create_dir_all(&dir).unwrap();
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("{}-{n}.db", std::process::id()));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Arc::new(SqliteStore::open(&path).unwrap())
}

mod duties;
mod postgres;

mod sqlite {
    use super::*;
    keymint_store::conformance_tests!(fresh());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_survives_a_reopen_and_the_chain_continues() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keymint.db");
    let (task, lease) = {
        let s = SqliteStore::open(&path).unwrap();
        let t = conformance::start(&s, conformance::task("agent", "r", None, T0, 60)).await;
        let l = conformance::issue(&s, &t, LeaseState::Active, T0, 30).await;
        s.put_secret("ca", vec![9; 32], T0).await.unwrap();
        (t, l)
    };
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.get_task(&task.id).await.unwrap(), Some(task.clone()));
    assert_eq!(s.get_lease(&lease.id).await.unwrap(), Some(lease));
    assert_eq!(s.get_secret("ca").await.unwrap(), Some(vec![9; 32]));
    conformance::issue(&s, &task, LeaseState::Active, T0, 30).await;
    assert_eq!(conformance::assert_chain_valid(&s).await, 3);
}

/// The task read before a grant may come from the store's cache, which only
/// this store's writer invalidates. keymint never opens one SQLite file
/// twice, but a second store on the file is the way to make that cache
/// stale on purpose: the task ended behind its back is still served active
/// before the grant, and the lease is refused all the same, because the
/// writer grants against the task as its transaction reads it
/// (docs/design/0036, "Fifth pass").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_task_read_before_the_grant_grants_nothing() {
    use keymint_core::audit::AuditDraft;
    use keymint_core::model::TaskStatus;
    use keymint_core::rules::RuleError;
    use keymint_store::StoreError;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keymint.db");
    let a = SqliteStore::open(&path).unwrap();
    let t = conformance::start(&a, conformance::task("agent", "r", None, T0, 600)).await;
    assert_eq!(a.task_before_grant(&t.id).await.unwrap().as_ref(), Some(&t));
    let b = SqliteStore::open(&path).unwrap();
    conformance::end(&b, &t.id, TaskStatus::Revoked, T0.plus_secs(1)).await;
    let stale = a.task_before_grant(&t.id).await.unwrap().unwrap();
    assert_eq!(
        stale.status,
        TaskStatus::Active,
        "the cache did not hold the task: this test shows nothing"
    );
    let seen = Arc::new(std::sync::Mutex::new(None));
    let seen_in_grant = Arc::clone(&seen);
    let r = a
        .insert_lease(
            &t.id,
            Box::new(move |t| {
                *seen_in_grant.lock().unwrap() = Some(t.status);
                if !t.is_live(T0.plus_secs(2)) {
                    return Err(RuleError::TaskNotActive(t.id.clone()));
                }
                let l = conformance::lease(t, LeaseState::Active, T0, 60);
                let ev = AuditDraft::new(T0, "lease.issued", "admin").lease(&l.id);
                Ok((l, ev))
            }),
        )
        .await;
    assert!(
        matches!(r, Err(StoreError::Rule(RuleError::TaskNotActive(_)))),
        "{r:?}"
    );
    assert_eq!(*seen.lock().unwrap(), Some(TaskStatus::Revoked));
    assert_eq!(
        b.list_leases(&keymint_store::LeaseFilter {
            task: Some(t.id.clone()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap(),
        Vec::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keymint.db");
    drop(SqliteStore::open(&path).unwrap());
    let c = rusqlite::Connection::open(&path).unwrap();
    c.pragma_update(None, "user_version", 99).unwrap();
    drop(c);
    let err = SqliteStore::open(&path).unwrap_err().to_string();
    assert!(err.contains("newer than this keymint understands"), "{err}");
}

/// The writer never checkpoints inside a commit (`wal_autocheckpoint=0`);
/// the checkpointer thread copies the WAL back into the database file
/// while the store is open and busy (docs/design/0036), so the WAL does not
/// grow without bound, and what was copied reads back after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpointer_copies_the_wal_back_while_the_writer_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keymint.db");
    let s: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    let task = conformance::start(&*s, conformance::task("agent", "r", None, T0, 600)).await;
    let db_len = || std::fs::metadata(&path).unwrap().len();
    let before = db_len();
    let mut handles = Vec::new();
    for _ in 0..3_000 {
        let (s, t) = (Arc::clone(&s), task.clone());
        handles.push(tokio::spawn(async move {
            conformance::issue(&*s, &t, LeaseState::Active, T0, 60).await
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    // Only a checkpoint writes the database file itself; wait for one.
    let mut grown = false;
    for _ in 0..40 {
        if db_len() > before + 1_000_000 {
            grown = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        grown,
        "the database file stayed at {} bytes (from {before}): no checkpoint ran",
        db_len()
    );
    assert_eq!(conformance::assert_chain_valid(&*s).await, 1 + 3_000);
    drop(s);
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(conformance::assert_chain_valid(&s).await, 1 + 3_000);
}

/// A lease insert runs without a savepoint of its own (docs/design/0036,
/// "Seventh pass"): one the database refuses at its first write (a taken
/// id) fails alone, among 200 inserted at once in a few batches; every
/// other lease is acknowledged and stored with its event, and the chain has
/// no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_the_database_refuses_fails_alone() {
    let s = fresh();
    let task = conformance::start(&*s, conformance::task("agent", "r", None, T0, 600)).await;
    let first = conformance::issue(&*s, &task, LeaseState::Active, T0, 60).await;
    let handles = postgres::insert_200_one_taken(&s, &task, &first.id);
    let mut stored = 0u64;
    for (i, h) in handles.into_iter().enumerate() {
        let (id, r) = h.await.unwrap();
        if i == 100 {
            let e = r.expect_err("the taken id is refused");
            assert!(
                matches!(e, keymint_store::StoreError::Backend(_)),
                "a refusal, not an outage: {e:?}"
            );
        } else {
            assert_eq!(r.expect("every other lease is acknowledged").id, id);
            assert!(s.get_lease(&id).await.unwrap().is_some(), "{id} is stored");
            stored += 1;
        }
    }
    assert_eq!(stored, 199);
    let kept = s.get_lease(&first.id).await.unwrap().unwrap();
    assert_eq!(kept, first, "the existing lease is untouched");
    assert_eq!(conformance::assert_chain_valid(&*s).await, 1 + 1 + 199);
}
