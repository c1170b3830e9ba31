//! Expiry, time-outs and revocation retries, with time moved by hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use keymint_core::keyring::Keyring;
use keymint_core::model::{Lease as CoreLease, LeaseState, Revocability, Role, TaskStatus};
use keymint_core::role::{DatabaseRole, EngineKind, RoleKind};
use keymint_core::rules::TaskLimits;
use keymint_core::token::{Token, TokenKind};
use keymint_core::{Clock, ManualClock, Timestamp};
use keymint_engines::{Engine, EngineError, IssueContext, Prepared};
use keymint_proto::{AuditEvent, EndStatus, EndTask, IssueLease, Lease, List, StartTask, Task};
use keymint_server::broker::{Broker, BrokerParts, Principal};
use keymint_store::{SqliteStore, Store};
use keymint_testkit::TestServer;

use crate::{introspect, issue, start_task};

const T0: Timestamp = Timestamp(1_900_000_000_000);

#[tokio::test]
async fn leases_expire_and_tasks_time_out_on_the_clock() {
    let clock = ManualClock::new(T0);
    let s = TestServer::builder()
        .clock(clock.clone())
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t: Task = admin
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some("w".into()),
                role: Some("demo".into()),
                ttl_secs: Some(120),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    let short: keymint_proto::IssuedLease = admin
        .post(
            &format!("/v1/tasks/{}/leases", t.id),
            &IssueLease {
                ttl_secs: Some(10),
                scopes: None,
                ..IssueLease::default()
            },
        )
        .await
        .unwrap();
    let short_tok = short.credential.secret();
    let (_, long_tok) = issue(&admin, &t.id).await;

    clock.advance_secs(10);
    // Dead at once, before any sweep.
    assert!(!introspect(&admin, short_tok.expose()).await.active);
    assert!(introspect(&admin, &long_tok).await.active);
    s.broker().sweep(clock.now()).await.unwrap();
    let l: keymint_proto::Lease = admin
        .get(&format!("/v1/leases/{}", short.lease.id))
        .await
        .unwrap();
    assert_eq!(l.state, LeaseState::Expired);

    clock.advance_secs(110);
    assert!(!introspect(&admin, &long_tok).await.active);
    s.broker().sweep(clock.now()).await.unwrap();
    let t: Task = admin.get(&format!("/v1/tasks/{}", t.id)).await.unwrap();
    assert_eq!(t.status, TaskStatus::TimedOut);
    let events = admin
        .get::<keymint_proto::List<keymint_proto::AuditEvent>>("/v1/audit?limit=100")
        .await
        .unwrap()
        .items;
    assert!(
        events
            .iter()
            .any(|e| e.kind == "lease.expired" && e.lease.as_deref() == Some(&short.lease.id))
    );
    assert!(
        events.iter().any(|e| e.kind == "task.ended"
            && e.data.get("status") == Some(&serde_json::json!("timed_out")))
    );
}

#[tokio::test]
async fn an_idle_task_times_out_unless_it_heartbeats() {
    let clock = ManualClock::new(T0);
    let s = TestServer::builder()
        .clock(clock.clone())
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t: Task = admin
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some("w".into()),
                role: Some("demo".into()),
                idle_timeout_secs: Some(30),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    let (_, tok) = issue(&admin, &t.id).await;
    let agent = s.client(&tok);
    clock.advance_secs(25);
    let _: Task = agent
        .post_empty(&format!("/v1/tasks/{}/heartbeat", t.id))
        .await
        .unwrap();
    clock.advance_secs(25);
    s.broker().sweep(clock.now()).await.unwrap();
    assert_eq!(
        admin
            .get::<Task>(&format!("/v1/tasks/{}", t.id))
            .await
            .unwrap()
            .status,
        TaskStatus::Active
    );
    clock.advance_secs(6);
    s.broker().sweep(clock.now()).await.unwrap();
    assert_eq!(
        admin
            .get::<Task>(&format!("/v1/tasks/{}", t.id))
            .await
            .unwrap()
            .status,
        TaskStatus::TimedOut
    );
    assert!(!introspect(&admin, &tok).await.active);
}

/// An engine whose provider refuses to revoke the first `fail` times, and
/// takes `apply_ms` to create a credential; `exists` says whether the
/// provider holds one now.
#[derive(Debug, Default)]
struct Flaky {
    fail: u32,
    calls: AtomicU32,
    apply_ms: u64,
    exists: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Engine for Flaky {
    // A provider-backed engine that fails on demand, standing in for a
    // database engine.
    fn kind(&self) -> EngineKind {
        EngineKind::Postgres
    }
    fn revocability(&self) -> Revocability {
        Revocability::Revocable
    }
    fn is_local(&self) -> bool {
        false
    }
    fn prepare(&self, _: &IssueContext<'_>) -> Result<Prepared, EngineError> {
        let t = Token::generate(TokenKind::Access).unwrap();
        Ok(Prepared {
            fingerprint_material: zeroize::Zeroizing::new(t.expose().as_bytes().to_vec()),
            credential: keymint_proto::Credential::Bearer {
                token: keymint_proto::SecretString::new(t.expose().into()),
            },
            engine_data: serde_json::json!({"user": "u1"}),
        })
    }
    async fn apply(&self, _: &IssueContext<'_>, _: &Prepared) -> Result<(), EngineError> {
        tokio::time::sleep(std::time::Duration::from_millis(self.apply_ms)).await;
        self.exists.store(true, Ordering::SeqCst);
        Ok(())
    }
    async fn revoke(&self, _: &CoreLease) -> Result<(), EngineError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail {
            Err(EngineError::Unavailable("connection refused".into()))
        } else {
            self.exists.store(false, Ordering::SeqCst);
            Ok(())
        }
    }
}

async fn broker_with(
    engine: Arc<dyn Engine>,
    clock: ManualClock,
) -> (Arc<Broker>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("k.db")).unwrap());
    let keyring = Keyring::from_root_hex(&Keyring::generate_root_hex().unwrap()).unwrap();
    let admin = Token::generate(TokenKind::Admin).unwrap();
    let broker = Broker::new(BrokerParts {
        policy: Arc::new(
            keymint_server::policy::PolicyState::from_source(
                "test.cedar",
                keymint_testkit::PERMIT_ALL,
            )
            .unwrap(),
        ),
        operators: Vec::new(),
        node_tokens: Vec::new(),
        node_identities: Vec::new(),
        identity: None,
        approval_ttl_secs: 900,
        store,
        clock: Arc::new(clock),
        keyring: Arc::new(keyring),
        roles: vec![Role {
            name: "db".into(),
            scopes: vec!["db:read".into()],
            default_ttl_secs: 60,
            max_ttl_secs: 600,
            description: None,
            kind: RoleKind::Postgres(DatabaseRole {
                database: "flaky".into(),
                creation_statements: Vec::new(),
                max_connections: keymint_core::role::DEFAULT_MAX_CONNECTIONS,
            }),
        }],
        engines: vec![engine],
        limits: TaskLimits::default(),
        admin_token: admin.expose().into(),
        issuer: "test".into(),
        oidc: None,
    });
    (Arc::new(broker), dir)
}

#[tokio::test]
async fn a_failed_revocation_is_retried_with_backoff_and_never_dropped() {
    let clock = ManualClock::new(T0);
    let engine = Arc::new(Flaky {
        fail: 5,
        ..Flaky::default()
    });
    let (b, _dir) = broker_with(engine.clone(), clock.clone()).await;
    let p = Principal::Admin;
    let t = b
        .start_task(
            &p,
            StartTask {
                workload: Some("w".into()),
                role: Some("db".into()),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    let issued = b
        .issue_lease(&p, &t.id, IssueLease::default())
        .await
        .unwrap();
    assert_eq!(
        issued.lease.state,
        LeaseState::Active,
        "activated after apply"
    );
    let l = b.revoke_lease(&p, &issued.lease.id).await.unwrap();
    assert_eq!(l.state, LeaseState::Revoking);
    assert_eq!(l.revoke_attempts, 1);
    assert_eq!(
        l.last_error.as_deref(),
        Some("provider unavailable: connection refused")
    );
    assert_eq!(l.next_attempt_at, Some(T0.plus_millis(1000)));

    // Each sweep before the retry time does nothing; each after it tries once.
    let mut expected_attempts = 1;
    for _ in 0..4 {
        b.sweep(clock.now()).await.unwrap();
        let l = b.get_lease(&p, &issued.lease.id).await.unwrap();
        assert_eq!(
            l.revoke_attempts, expected_attempts,
            "not before the backoff"
        );
        clock.set(l.next_attempt_at.unwrap());
        b.sweep(clock.now()).await.unwrap();
        expected_attempts += 1;
        let l = b.get_lease(&p, &issued.lease.id).await.unwrap();
        assert_eq!(l.revoke_attempts, expected_attempts);
        assert_eq!(l.state, LeaseState::Revoking, "still visible as revoking");
    }
    let metrics = b.metrics.render(None, None);
    assert!(
        metrics.contains("keymint_revocation_failures_total 5"),
        "{metrics}"
    );
    let l = b.get_lease(&p, &issued.lease.id).await.unwrap();
    assert_eq!(
        l.next_attempt_at.unwrap().millis() - clock.now().millis(),
        16_000,
        "1, 2, 4, 8, 16 s"
    );
    clock.set(l.next_attempt_at.unwrap());
    b.sweep(clock.now()).await.unwrap();
    let l = b.get_lease(&p, &issued.lease.id).await.unwrap();
    assert_eq!(l.state, LeaseState::Revoked);
    assert_eq!(engine.calls.load(Ordering::SeqCst), 6);
    let events = b.store().audit_tail(100).await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == "lease.revoke_failed")
            .count(),
        5
    );
    assert!(events.iter().any(|e| e.kind == "lease.revoked"));
    assert!(b.audit_verify(&p).await.unwrap().ok());
}

#[tokio::test]
async fn a_lease_left_pending_by_a_crash_is_revoked_by_reconciliation() {
    let clock = ManualClock::new(T0);
    let engine = Arc::new(Flaky::default());
    let (b, _dir) = broker_with(engine.clone(), clock.clone()).await;
    let t = b
        .start_task(
            &Principal::Admin,
            StartTask {
                workload: Some("w".into()),
                role: Some("db".into()),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    // What a crash between recording and activating leaves behind.
    let mut pending = keymint_store::conformance::lease(&t, LeaseState::Pending, T0, 60);
    pending.engine = EngineKind::Postgres;
    let id = pending.id.clone();
    b.store()
        .insert_lease(
            &t.id,
            Box::new(move |_| {
                Ok((
                    pending,
                    keymint_core::audit::AuditDraft::new(T0, "lease.recorded", "admin"),
                ))
            }),
        )
        .await
        .unwrap();
    clock.advance_secs(1);
    assert_eq!(b.reconcile(clock.now()).await.unwrap(), 1);
    let l = b.store().get_lease(&id).await.unwrap().unwrap();
    assert_eq!(l.state, LeaseState::Revoked);
    assert_eq!(
        l.end_reason,
        Some(keymint_core::model::EndReason::Reconciled)
    );
    assert_eq!(
        engine.calls.load(Ordering::SeqCst),
        1,
        "the provider was told"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_ending_while_the_provider_mints_leaves_nothing_behind() {
    let clock = ManualClock::new(T0);
    let engine = Arc::new(Flaky {
        apply_ms: 300,
        ..Flaky::default()
    });
    let (b, _dir) = broker_with(engine.clone(), clock.clone()).await;
    let p = Principal::Admin;
    let t = b
        .start_task(
            &p,
            StartTask {
                workload: Some("w".into()),
                role: Some("db".into()),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    let (b2, id) = (Arc::clone(&b), t.id.clone());
    let issuing = tokio::spawn(async move {
        b2.issue_lease(&Principal::Admin, &id, IssueLease::default())
            .await
    });
    // End the task while the provider is still creating the credential:
    // its revocation finds nothing to remove yet.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    b.end_task(&p, &t.id, Some(keymint_proto::EndStatus::Completed), None)
        .await
        .unwrap();
    assert!(!engine.exists.load(Ordering::SeqCst));
    let r = issuing.await.unwrap();
    assert!(r.is_err(), "the caller must not get the credential");
    assert!(
        !engine.exists.load(Ordering::SeqCst),
        "what the provider created after the task ended must be removed"
    );
}

/// Retention: a task that ended more than `tasks.retain_ended` (30 days by
/// default) ago is deleted with its leases by the background worker; the
/// audit trail keeps its history and says what was pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_tasks_are_pruned_after_the_retention_period() {
    let clock = ManualClock::new(T0);
    let s = TestServer::builder()
        .clock(clock.clone())
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let old = start_task(&admin, "w").await;
    let (issued, _) = issue(&admin, &old.id).await;
    let end = |id: String, status| {
        let admin = admin.clone();
        async move {
            let _: Task = admin
                .post(
                    &format!("/v1/tasks/{id}/end"),
                    &EndTask {
                        status,
                        reason: None,
                    },
                )
                .await
                .unwrap();
        }
    };
    end(old.id.clone(), EndStatus::Completed).await;
    clock.advance_secs(29 * 86_400);
    let recent = start_task(&admin, "w").await;
    end(recent.id.clone(), EndStatus::Failed).await;
    clock.advance_secs(2 * 86_400);
    // The audit trail shows only what is on disk, which may trail the
    // deletion by a moment: wait for the event itself.
    let t0 = std::time::Instant::now();
    let (audit, pruned) = loop {
        let audit: List<AuditEvent> = admin.get("/v1/audit?limit=200").await.unwrap();
        if let Some(p) = audit.items.iter().find(|e| e.kind == "store.pruned") {
            let p = p.clone();
            break (audit, p);
        }
        assert!(t0.elapsed().as_secs() < 10, "the ended task was not pruned");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let e = admin
        .get::<Task>(&format!("/v1/tasks/{}", old.id))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404));
    let e = admin
        .get::<Lease>(&format!("/v1/leases/{}", issued.lease.id))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404));
    // Ended two days ago: still there.
    let kept: Task = admin
        .get(&format!("/v1/tasks/{}", recent.id))
        .await
        .unwrap();
    assert_eq!(kept.status, TaskStatus::Failed);
    assert_eq!(pruned.data["tasks"], 1);
    assert_eq!(pruned.data["leases"], 1);
    // The history of the pruned task is still in the trail, and intact.
    assert!(
        audit
            .items
            .iter()
            .any(|e| e.kind == "task.started" && e.task.as_deref() == Some(old.id.as_str()))
    );
    let report: keymint_proto::ChainReport = admin.get("/v1/audit/verify").await.unwrap();
    assert!(report.ok(), "{report:?}");
}

/// A task with an idle timeout gives its leases its hard end, not the
/// first idle deadline: heartbeats keep them working, and going idle ends
/// the task and the leases with it.
#[tokio::test]
async fn leases_of_an_idle_task_work_as_long_as_it_heartbeats() {
    let clock = ManualClock::new(T0);
    let s = TestServer::builder()
        .clock(clock.clone())
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t: Task = admin
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some("w".into()),
                role: Some("demo".into()),
                ttl_secs: Some(600),
                idle_timeout_secs: Some(30),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    let (issued, tok) = issue(&admin, &t.id).await;
    assert_eq!(
        issued.lease.expires_at,
        T0.plus_secs(600),
        "the role's default TTL (15 min), cut at the task's hard end"
    );
    let agent = s.client(&tok);
    for _ in 0..4 {
        clock.advance_secs(25);
        let _: Task = agent
            .post_empty(&format!("/v1/tasks/{}/heartbeat", t.id))
            .await
            .unwrap();
    }
    s.broker().sweep(clock.now()).await.unwrap();
    assert!(
        introspect(&admin, &tok).await.active,
        "100 s in, well past the first idle deadline, the heartbeats keep it"
    );
    let l: Lease = admin
        .get(&format!("/v1/leases/{}", issued.lease.id))
        .await
        .unwrap();
    assert_eq!(l.state, LeaseState::Active);
    // Silence: the task times out and takes the lease with it.
    clock.advance_secs(31);
    assert!(!introspect(&admin, &tok).await.active);
    s.broker().sweep(clock.now()).await.unwrap();
    let t: Task = admin.get(&format!("/v1/tasks/{}", t.id)).await.unwrap();
    assert_eq!(t.status, TaskStatus::TimedOut);
    let l: Lease = admin
        .get(&format!("/v1/leases/{}", issued.lease.id))
        .await
        .unwrap();
    assert_eq!(l.state, LeaseState::Revoked);
}

/// Polls `check` every 20 ms until it holds or `secs` pass.
async fn eventually<F, Fut>(secs: u64, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    while tokio::time::Instant::now() < end {
        if check().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    check().await
}

/// After a crash, a revocation the dead process had claimed (moved to
/// `revoking`, claim 30 s) is taken over at once by the next start, with
/// the clock standing still, not after the claim runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_takes_over_the_dead_process_revocation_claims_at_once() {
    let clock = ManualClock::new(T0);
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("data");
    let s = TestServer::builder()
        .clock(clock.clone())
        .data_dir(&dir)
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = start_task(&admin, "w").await;
    let (issued, _) = issue(&admin, &t.id).await;
    // What a crash right after moving the lease to `revoking` leaves: the
    // claim, and no one driving it.
    let claimed = s
        .broker()
        .store()
        .request_revocation(
            keymint_store::LeaseSelector::Id(issued.lease.id.clone()),
            keymint_core::model::EndReason::Revoked,
            clock.now(),
            "admin",
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    s.stop().await;

    let s = TestServer::builder()
        .clock(clock.clone())
        .data_dir(&dir)
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let id = issued.lease.id.clone();
    let revoked = eventually(10, || {
        let (admin, id) = (admin.clone(), id.clone());
        async move {
            admin
                .get::<Lease>(&format!("/v1/leases/{id}"))
                .await
                .unwrap()
                .state
                == LeaseState::Revoked
        }
    })
    .await;
    assert!(revoked, "taken over at start, with the clock at the crash");
    assert_eq!(clock.now(), T0);
}

/// Ending a task with more leases than one batch ends it completely, in
/// several transactions, while issuance in another task goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_with_many_leases_ends_in_batches_while_issuance_goes_on() {
    let s = TestServer::builder().start().await.unwrap();
    let b = Arc::clone(s.broker());
    let p = Principal::Admin;
    let big = b
        .start_task(
            &p,
            StartTask {
                workload: Some("w".into()),
                role: Some("demo".into()),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    let n = keymint_store::END_TASK_LEASES as usize * 2 + 100;
    // Recorded straight in the store (concurrent writes share commits);
    // the end below goes through the broker.
    let mut issuing = tokio::task::JoinSet::new();
    for i in 0..n {
        let (store, big) = (Arc::clone(b.store()), big.clone());
        issuing.spawn(async move {
            let now = big.created_at.plus_millis(i64::try_from(i).unwrap());
            let l = keymint_store::conformance::lease(&big, LeaseState::Active, now, 600);
            let ev = keymint_core::audit::AuditDraft::new(now, "lease.issued", "admin")
                .task(&big.id)
                .lease(&l.id);
            store
                .insert_lease(&big.id, Box::new(move |_| Ok((l, ev))))
                .await
                .unwrap()
        });
    }
    while issuing.join_next().await.is_some() {}
    let other = b
        .start_task(
            &p,
            StartTask {
                workload: Some("v".into()),
                role: Some("demo".into()),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    // Issue in the other task while the big one ends.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (b2, stop2, oid) = (Arc::clone(&b), Arc::clone(&stop), other.id.clone());
    let side = tokio::spawn(async move {
        let (mut ok, mut tries) = (0u32, 0u32);
        // A policy decision can run out its 50 ms on this shared machine;
        // what counts is that issuance is served while the task ends.
        while (!stop2.load(Ordering::SeqCst) || ok == 0) && tries < 10_000 {
            tries += 1;
            if b2
                .issue_lease(&Principal::Admin, &oid, IssueLease::default())
                .await
                .is_ok()
            {
                ok += 1;
            }
        }
        ok
    });
    b.end_task(&p, &big.id, Some(EndStatus::Completed), None)
        .await
        .unwrap();
    stop.store(true, Ordering::SeqCst);
    assert!(side.await.unwrap() > 0);
    let leases = b
        .store()
        .list_leases(&keymint_store::LeaseFilter {
            task: Some(big.id.clone()),
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(leases.len(), n);
    assert!(
        leases.iter().all(|l| l.state == LeaseState::Revoked),
        "every lease of the task is revoked"
    );
    // The task's end moved one batch; the rest followed in further
    // transactions, each lease requested and confirmed once.
    let mut events = Vec::new();
    loop {
        let after = events
            .last()
            .map_or(0, |e: &keymint_core::audit::AuditEvent| e.seq);
        let page = b.store().audit_after(after, 5000).await.unwrap();
        if page.is_empty() {
            break;
        }
        events.extend(page);
    }
    let ended = events
        .iter()
        .find(|e| e.kind == "task.ended" && e.task.as_deref() == Some(big.id.as_str()))
        .unwrap();
    assert_eq!(
        ended.data["leases_revoked"],
        keymint_store::END_TASK_LEASES,
        "the first batch only"
    );
    let of_big = |kind: &str| {
        events
            .iter()
            .filter(|e| e.kind == kind && e.task.as_deref() == Some(big.id.as_str()))
            .count()
    };
    assert_eq!(of_big("lease.revoke_requested"), n);
    assert_eq!(of_big("lease.revoked"), n);
    // Other tasks' leases are untouched.
    let live = b
        .store()
        .list_leases(&keymint_store::LeaseFilter {
            task: Some(other.id.clone()),
            state: Some(LeaseState::Active),
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!live.is_empty());
}

/// The first end of a task stands: the same end again is answered as
/// already done (200, `Keymint-Already-Ended: true`), another status
/// (or a revocation) is refused with 409 naming the status the task has;
/// neither changes the task or writes a second `task.ended`.
#[tokio::test]
async fn a_second_end_of_a_task_is_idempotent_or_refused_and_changes_nothing() {
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    let t = start_task(&admin, "ticket-bot").await;
    let end = |status| {
        let body = serde_json::to_vec(&EndTask {
            status,
            reason: Some("second thoughts".into()),
        })
        .unwrap();
        let (admin, id) = (admin.clone(), t.id.clone());
        async move {
            admin
                .raw(
                    http::Method::POST,
                    &format!("/v1/tasks/{id}/end"),
                    Some("application/json"),
                    body,
                )
                .await
                .unwrap()
        }
    };
    let first = end(EndStatus::Completed).await;
    assert_eq!(first.status, 200);
    assert!(first.headers.get("keymint-already-ended").is_none());
    let first: Task = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(first.status, TaskStatus::Completed);

    let again = end(EndStatus::Completed).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.headers.get("keymint-already-ended").unwrap(), "true");
    let again: Task = serde_json::from_slice(&again.body).unwrap();
    assert_eq!(again, first);

    let other = end(EndStatus::Failed).await;
    assert_eq!(
        other.status,
        409,
        "{}",
        String::from_utf8_lossy(&other.body)
    );
    assert_eq!(
        other.headers.get("content-type").unwrap(),
        "application/problem+json"
    );
    let p: serde_json::Value = serde_json::from_slice(&other.body).unwrap();
    assert!(p["detail"].as_str().unwrap().contains("completed"), "{p}");
    let e = admin
        .post::<_, Task>(
            &format!("/v1/tasks/{}/revoke", t.id),
            &serde_json::json!({}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");

    let now: Task = admin.get(&format!("/v1/tasks/{}", t.id)).await.unwrap();
    assert_eq!(now, first);
    let ev: List<AuditEvent> = admin.get("/v1/audit?limit=500").await.unwrap();
    let ended = ev
        .items
        .iter()
        .filter(|e| e.kind == "task.ended" && e.task.as_deref() == Some(t.id.as_str()))
        .count();
    assert_eq!(ended, 1);
}
