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

async fn broker_with(engine: Arc<dyn Engine>, clock: ManualClock) -> (Broker, tempfile::TempDir) {
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
            }),
        }],
        engines: vec![engine],
        limits: TaskLimits::default(),
        admin_token: admin.expose().into(),
        issuer: "test".into(),
        oidc: None,
    });
    (broker, dir)
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
    let b = Arc::new(b);
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
