//! The suite every [`Store`] backend passes, written against the trait only.
//!
//! A backend's integration tests invoke [`conformance_tests!`] with an async
//! expression that yields a fresh, empty store; the macro stamps out one
//! `#[tokio::test]` per check, so a failure names the check.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "this module is a test suite: a failed step is a failed test"
)]

use std::sync::Arc;

use keymint_core::Timestamp;
use keymint_core::audit::{self, AuditDraft};
use keymint_core::id;
use keymint_core::model::{
    Approval, ApprovalStatus, EndReason, Lease, LeaseState, RegistrationEntry, Revocability, Task,
    TaskStatus,
};
use keymint_core::rules::RuleError;

use crate::{
    ApprovalChange, BudgetFn, BudgetLevel, BudgetSettle, EndedTree, LeaseFilter, LeaseSelector,
    ReservationFor, RevocationDone, Store, StoreError, TaskEnd, TaskFilter, Usage,
};

pub const T0: Timestamp = Timestamp(1_800_000_000_000);

/// A task as the broker would build it.
pub fn task(workload: &str, role: &str, parent: Option<&Task>, now: Timestamp, ttl: u64) -> Task {
    Task {
        id: id::task_id(now),
        parent: parent.map(|p| p.id.clone()),
        workload: workload.into(),
        role: role.into(),
        intent: Some("summarise tickets".into()),
        purpose: None,
        environment: Some("test".into()),
        scopes: vec!["llm:chat".into()],
        status: TaskStatus::Active,
        created_at: now,
        expires_at: now.plus_secs(ttl),
        idle_timeout_secs: None,
        last_seen_at: now,
        ended_at: None,
        delegation: parent.map(|p| vec![p.workload.clone()]).unwrap_or_default(),
    }
}

/// A lease as the broker would build it.
pub fn lease(t: &Task, state: LeaseState, now: Timestamp, ttl: u64) -> Lease {
    Lease {
        id: id::lease_id(now),
        task: t.id.clone(),
        workload: t.workload.clone(),
        role: t.role.clone(),
        engine: keymint_core::model::EngineKind::Token,
        scopes: t.scopes.clone(),
        state,
        revocability: Revocability::Revocable,
        fingerprint: format!("fp-{}", id::lease_id(now)),
        created_at: now,
        expires_at: now.plus_secs(ttl),
        ended_at: None,
        end_reason: None,
        revoke_attempts: 0,
        next_attempt_at: None,
        last_error: None,
        engine_data: serde_json::Value::Null,
    }
}

pub async fn start(s: &dyn Store, t: Task) -> Task {
    let ev = AuditDraft::new(t.created_at, "task.started", "admin").task(&t.id);
    s.create_task(t.parent.clone().as_deref(), Box::new(move |_| Ok((t, ev))))
        .await
        .unwrap()
}

pub async fn issue(s: &dyn Store, t: &Task, state: LeaseState, now: Timestamp, ttl: u64) -> Lease {
    let l = lease(t, state, now, ttl);
    let ev = AuditDraft::new(now, "lease.issued", "admin").lease(&l.id);
    s.insert_lease(&t.id, Box::new(move |_| Ok((l, ev))))
        .await
        .unwrap()
}

/// Ends `id` with `status` as the admin would, and answers the tree ended.
pub async fn end(s: &dyn Store, id: &str, status: TaskStatus, now: Timestamp) -> EndedTree {
    s.end_task(TaskEnd {
        id: id.to_owned(),
        status,
        now,
        actor: "admin".into(),
        reason: None,
    })
    .await
    .unwrap()
    .unwrap()
}

/// Reads the whole chain and checks it.
pub async fn assert_chain_valid(s: &dyn Store) -> u64 {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let batch = s.audit_after(after, 500).await.unwrap();
        let Some(last) = batch.last() else { break };
        after = last.seq;
        all.extend(batch);
    }
    let report = audit::verify(all.into_iter().map(Ok));
    assert!(report.ok(), "audit chain broken: {:?}", report.problem);
    report.events
}

pub async fn tasks_round_trip_and_filter(s: Arc<dyn Store>) {
    let a = start(&*s, task("agent-a", "r1", None, T0, 60)).await;
    let b = start(&*s, task("agent-b", "r2", None, T0.plus_secs(1), 60)).await;
    assert_eq!(s.get_task(&a.id).await.unwrap().as_ref(), Some(&a));
    assert_eq!(s.get_task("tsk_missing").await.unwrap(), None);
    let by_workload = s
        .list_tasks(&TaskFilter {
            workload: Some("agent-b".into()),
            limit: 10,
            ..TaskFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(by_workload, vec![b.clone()]);
    let all = s
        .list_tasks(&TaskFilter {
            limit: 10,
            ..TaskFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].id, b.id, "newest first");
    let one = s
        .list_tasks(&TaskFilter {
            limit: 1,
            ..TaskFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
}

pub async fn a_refused_grant_writes_nothing(s: Arc<dyn Store>) {
    let parent = start(&*s, task("agent", "r", None, T0, 60)).await;
    let before = s.audit_tail(1).await.unwrap();
    let r = s
        .create_task(
            Some(&parent.id),
            Box::new(|_| {
                Err(RuleError::ScopeNotGranted {
                    scope: Some("x".into()),
                    position: 1,
                    holder: "y".into(),
                })
            }),
        )
        .await;
    assert!(matches!(
        r,
        Err(StoreError::Rule(RuleError::ScopeNotGranted { .. }))
    ));
    let r = s
        .create_task(
            Some("tsk_nope"),
            Box::new(|_| unreachable!("no parent, no grant")),
        )
        .await;
    assert!(matches!(r, Err(StoreError::NotFound(_))));
    assert_eq!(
        s.audit_tail(1).await.unwrap(),
        before,
        "no audit event, no seq consumed"
    );
    assert_eq!(
        s.list_tasks(&TaskFilter {
            limit: 10,
            ..TaskFilter::default()
        })
        .await
        .unwrap()
        .len(),
        1
    );
    assert_chain_valid(&*s).await;
}

pub async fn sub_task_grant_sees_the_parent(s: Arc<dyn Store>) {
    let parent = start(&*s, task("agent", "r", None, T0, 60)).await;
    let child = task("sub-agent", "r", Some(&parent), T0, 30);
    let seen = Arc::new(std::sync::Mutex::new(None));
    let seen2 = Arc::clone(&seen);
    let c2 = child.clone();
    let created = s
        .create_task(
            Some(&parent.id),
            Box::new(move |p| {
                *seen2.lock().unwrap() = p.cloned();
                Ok((c2, AuditDraft::new(T0, "task.started", "admin")))
            }),
        )
        .await
        .unwrap();
    assert_eq!(created, child);
    assert_eq!(seen.lock().unwrap().as_ref(), Some(&parent));
    let kids = s
        .list_tasks(&TaskFilter {
            parent: Some(parent.id.clone()),
            limit: 10,
            ..TaskFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(kids, vec![child]);
}

pub async fn leases_are_found_by_fingerprint(s: Arc<dyn Store>) {
    let t = start(&*s, task("agent", "r", None, T0, 60)).await;
    let l = issue(&*s, &t, LeaseState::Active, T0, 30).await;
    let (found, ft) = s
        .lease_by_fingerprint(&l.fingerprint)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found, l);
    assert_eq!(ft, t);
    assert_eq!(s.get_lease(&l.id).await.unwrap(), Some(l.clone()));
    assert!(
        s.lease_by_fingerprint("fp-unknown")
            .await
            .unwrap()
            .is_none()
    );
    // A second lease with the same fingerprint is refused.
    let mut dup = lease(&t, LeaseState::Active, T0, 30);
    dup.fingerprint = l.fingerprint.clone();
    let r = s
        .insert_lease(
            &t.id,
            Box::new(move |_| Ok((dup, AuditDraft::new(T0, "lease.issued", "admin")))),
        )
        .await;
    assert!(r.is_err());
    assert_chain_valid(&*s).await;
}

pub async fn lists_page_with_a_cursor(s: Arc<dyn Store>) {
    // Five tasks of one workload with a lease each, one of another workload.
    let mut tasks = Vec::new();
    let mut leases = Vec::new();
    for i in 0..5 {
        let t = start(&*s, task("paged", "r", None, T0.plus_secs(i), 60)).await;
        leases.push(issue(&*s, &t, LeaseState::Active, T0.plus_secs(i), 30).await);
        tasks.push(t);
    }
    start(&*s, task("other", "r", None, T0.plus_secs(9), 60)).await;
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = s
            .list_tasks(&TaskFilter {
                workload: Some("paged".into()),
                before: before.clone(),
                limit: 2,
                ..TaskFilter::default()
            })
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        before = page.last().map(|t| t.id.clone());
        seen.extend(page.into_iter().map(|t| t.id));
    }
    let mut want: Vec<String> = tasks.iter().rev().map(|t| t.id.clone()).collect();
    assert_eq!(seen, want, "every task once, newest first, across pages");
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = s
            .list_leases(&LeaseFilter {
                state: Some(LeaseState::Active),
                before: before.clone(),
                limit: 3,
                ..LeaseFilter::default()
            })
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        before = page.last().map(|l| l.id.clone());
        seen.extend(page.into_iter().map(|l| l.id));
    }
    want = leases.iter().rev().map(|l| l.id.clone()).collect();
    assert_eq!(seen, want);
}

/// The task read before a grant ([`Store::task_before_grant`], which a
/// store may answer from a cache) follows every change of the task: a
/// heartbeat, and an end of every kind, at once after the change is
/// answered, also with issuances running on the task meanwhile. And the
/// store's own grant, inside its transaction, refuses a lease on an ended
/// task whatever that read said.
pub async fn the_task_read_before_a_grant_follows_every_change(s: Arc<dyn Store>) {
    use std::sync::atomic::{AtomicBool, Ordering};

    assert_eq!(s.task_before_grant("tsk_missing").await.unwrap(), None);
    let t = start(&*s, task("agent", "r", None, T0, 600)).await;
    assert_eq!(s.task_before_grant(&t.id).await.unwrap().as_ref(), Some(&t));
    // An issuance changes no task: the read still gives the task as it is.
    issue(&*s, &t, LeaseState::Active, T0, 60).await;
    assert_eq!(s.task_before_grant(&t.id).await.unwrap().as_ref(), Some(&t));
    let touched = s.touch_task(&t.id, T0.plus_secs(7)).await.unwrap().unwrap();
    let read = s.task_before_grant(&t.id).await.unwrap().unwrap();
    assert_eq!(read, touched);
    assert_eq!(read.last_seen_at, T0.plus_secs(7));

    for status in [
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::TimedOut,
        TaskStatus::Revoked,
    ] {
        let t = start(&*s, task("agent", "r", None, T0, 600)).await;
        let ended = Arc::new(AtomicBool::new(false));
        // Issuances on the task while it ends, each reading the task first
        // (and so keeping it in a cache) as the broker does.
        let mut workers = Vec::new();
        for _ in 0..4 {
            let (s, id, ended) = (Arc::clone(&s), t.id.clone(), Arc::clone(&ended));
            workers.push(tokio::spawn(async move {
                let mut after_end = 0;
                while after_end < 20 {
                    // Read before the call: if set, the end was answered
                    // before this attempt started.
                    let was_ended = ended.load(Ordering::SeqCst);
                    let read = s.task_before_grant(&id).await.unwrap().unwrap();
                    let cached_active = read.status == TaskStatus::Active;
                    if was_ended {
                        after_end += 1;
                        assert!(!cached_active, "a read after the end saw the task active");
                    }
                    let r = s
                        .insert_lease(
                            &id,
                            Box::new(move |t| {
                                if t.status != TaskStatus::Active {
                                    return Err(RuleError::TaskNotActive(t.id.clone()));
                                }
                                let l = lease(t, LeaseState::Active, T0, 60);
                                let ev = AuditDraft::new(T0, "lease.issued", "admin").lease(&l.id);
                                Ok((l, ev))
                            }),
                        )
                        .await;
                    if was_ended {
                        assert!(
                            matches!(r, Err(StoreError::Rule(RuleError::TaskNotActive(_)))),
                            "a lease was granted on an ended task: {r:?}"
                        );
                    } else if r.is_err() {
                        assert!(matches!(
                            r,
                            Err(StoreError::Rule(RuleError::TaskNotActive(_)))
                        ));
                    }
                    tokio::task::yield_now().await;
                }
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        end(&*s, &t.id, status, T0.plus_secs(1)).await;
        ended.store(true, Ordering::SeqCst);
        for w in workers {
            w.await.unwrap();
        }
        let read = s.task_before_grant(&t.id).await.unwrap().unwrap();
        assert_eq!(read.status, status);
        assert_eq!(read, s.get_task(&t.id).await.unwrap().unwrap());
    }
    assert_chain_valid(&*s).await;
}

pub async fn ending_a_task_ends_its_tree_and_marks_leases(s: Arc<dyn Store>) {
    let root = start(&*s, task("agent", "r", None, T0, 600)).await;
    let child = start(&*s, task("sub", "r", Some(&root), T0, 300)).await;
    let grandchild = start(&*s, task("subsub", "r", Some(&child), T0, 100)).await;
    let other = start(&*s, task("other", "r", None, T0, 600)).await;
    let l_root = issue(&*s, &root, LeaseState::Active, T0, 60).await;
    let l_gc = issue(&*s, &grandchild, LeaseState::Pending, T0, 60).await;
    let l_other = issue(&*s, &other, LeaseState::Active, T0, 60).await;

    let now = T0.plus_secs(5);
    let ended = s
        .end_task(TaskEnd {
            id: root.id.clone(),
            status: TaskStatus::Completed,
            now,
            actor: "admin".into(),
            reason: None,
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ended.tasks,
        vec![root.id.clone(), child.id.clone(), grandchild.id.clone()]
    );
    let mut ids: Vec<_> = ended.leases.iter().map(|l| l.id.clone()).collect();
    ids.sort();
    let mut want = vec![l_root.id.clone(), l_gc.id.clone()];
    want.sort();
    assert_eq!(ids, want);
    assert!(
        ended
            .leases
            .iter()
            .all(|l| l.state == LeaseState::Revoking && l.end_reason == Some(EndReason::TaskEnded))
    );

    let r = s.get_task(&root.id).await.unwrap().unwrap();
    assert_eq!(r.status, TaskStatus::Completed);
    assert_eq!(r.ended_at, Some(now));
    assert_eq!(
        s.get_task(&grandchild.id).await.unwrap().unwrap().status,
        TaskStatus::Revoked
    );
    assert_eq!(
        s.get_task(&other.id).await.unwrap().unwrap().status,
        TaskStatus::Active
    );
    assert_eq!(
        s.get_lease(&l_other.id).await.unwrap().unwrap().state,
        LeaseState::Active
    );

    // Ending again changes nothing.
    let again = s
        .end_task(TaskEnd {
            id: root.id.clone(),
            status: TaskStatus::Failed,
            now,
            actor: "admin".into(),
            reason: None,
        })
        .await
        .unwrap();
    assert_eq!(again, None);
    assert_eq!(
        s.get_task(&root.id).await.unwrap().unwrap().status,
        TaskStatus::Completed
    );

    // A pending lease whose task ended cannot be activated.
    assert!(
        !s.activate_lease(&l_gc.id, AuditDraft::new(now, "lease.activated", "system"))
            .await
            .unwrap()
    );
    // Nor can a new lease be granted by a grant that checks liveness.
    let r = s
        .insert_lease(
            &child.id,
            Box::new(move |t| {
                if t.is_live(now) {
                    Ok((
                        lease(t, LeaseState::Active, now, 10),
                        AuditDraft::new(now, "lease.issued", "a"),
                    ))
                } else {
                    Err(RuleError::TaskNotActive(t.id.clone()))
                }
            }),
        )
        .await;
    assert!(matches!(
        r,
        Err(StoreError::Rule(RuleError::TaskNotActive(_)))
    ));
    assert_chain_valid(&*s).await;
}

pub async fn revocation_is_retried_until_it_is_finished(s: Arc<dyn Store>) {
    let t = start(&*s, task("agent", "r", None, T0, 600)).await;
    let l = issue(&*s, &t, LeaseState::Active, T0, 60).await;
    let now = T0.plus_secs(1);
    let marked = s
        .request_revocation(
            LeaseSelector::Id(l.id.clone()),
            EndReason::Revoked,
            now,
            "admin",
        )
        .await
        .unwrap();
    assert_eq!(marked.len(), 1);
    assert!(
        s.due_revocations(now, 10).await.unwrap().is_empty(),
        "claimed by the caller at first"
    );
    let claim_end = now.plus_millis(crate::REVOCATION_CLAIM_MS);
    assert_eq!(marked[0].next_attempt_at, Some(claim_end));
    assert_eq!(
        s.due_revocations(claim_end, 10).await.unwrap().len(),
        1,
        "the sweeper's after the claim"
    );

    let retry = now.plus_secs(2);
    s.revocation_failed(
        &l.id,
        retry,
        "provider unreachable",
        AuditDraft::new(now, "lease.revoke_failed", "system"),
    )
    .await
    .unwrap();
    let l1 = s.get_lease(&l.id).await.unwrap().unwrap();
    assert_eq!(l1.state, LeaseState::Revoking);
    assert_eq!(l1.revoke_attempts, 1);
    assert_eq!(l1.last_error.as_deref(), Some("provider unreachable"));
    assert!(
        s.due_revocations(now, 10).await.unwrap().is_empty(),
        "not before the retry time"
    );
    assert_eq!(
        s.next_deadline().await.unwrap(),
        Some(retry).min(Some(t.deadline()))
    );
    assert_eq!(s.due_revocations(retry, 10).await.unwrap().len(), 1);
    assert!(
        s.due_revocations(retry, 10).await.unwrap().is_empty(),
        "handed out once: claimed by the first caller"
    );
    assert_eq!(
        s.get_lease(&l.id).await.unwrap().unwrap().next_attempt_at,
        Some(retry.plus_millis(crate::REVOCATION_CLAIM_MS)),
        "until the claim runs out"
    );

    s.finish_revocations(
        vec![RevocationDone {
            lease: l.id.clone(),
            audit: AuditDraft::new(retry, "lease.revoked", "system"),
        }],
        retry,
    )
    .await
    .unwrap();
    let l2 = s.get_lease(&l.id).await.unwrap().unwrap();
    assert_eq!(l2.state, LeaseState::Revoked);
    assert_eq!(l2.ended_at, Some(retry));
    assert_eq!(l2.last_error, None);
    assert!(
        s.due_revocations(retry.plus_secs(100), 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Revoking a revoked lease changes nothing.
    let again = s
        .request_revocation(
            LeaseSelector::Id(l.id.clone()),
            EndReason::Revoked,
            retry,
            "admin",
        )
        .await
        .unwrap();
    assert!(again.is_empty());
    assert_chain_valid(&*s).await;
}

pub async fn bulk_revocation_selects_by_workload_role_and_task(s: Arc<dyn Store>) {
    let a = start(&*s, task("wa", "ra", None, T0, 600)).await;
    let b = start(&*s, task("wb", "rb", None, T0, 600)).await;
    let la1 = issue(&*s, &a, LeaseState::Active, T0, 60).await;
    let _la2 = issue(&*s, &a, LeaseState::Active, T0, 60).await;
    let lb = issue(&*s, &b, LeaseState::Active, T0, 60).await;
    let got = s
        .request_revocation(
            LeaseSelector::Workload("wa".into()),
            EndReason::Revoked,
            T0,
            "admin",
        )
        .await
        .unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(
        s.get_lease(&lb.id).await.unwrap().unwrap().state,
        LeaseState::Active
    );
    let got = s
        .request_revocation(
            LeaseSelector::Role("rb".into()),
            EndReason::Revoked,
            T0,
            "admin",
        )
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    let got = s
        .request_revocation(
            LeaseSelector::Task(a.id.clone()),
            EndReason::Revoked,
            T0,
            "admin",
        )
        .await
        .unwrap();
    assert!(got.is_empty(), "already revoking");
    let revoking = s
        .list_leases(&LeaseFilter {
            state: Some(LeaseState::Revoking),
            limit: 10,
            ..LeaseFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(revoking.len(), 3);
    let of_a = s
        .list_leases(&LeaseFilter {
            task: Some(a.id.clone()),
            limit: 10,
            ..LeaseFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(of_a.len(), 2);
    assert!(of_a.iter().any(|l| l.id == la1.id));
}

/// Revoking a lease (by any selector) revokes, in the same transaction,
/// the access tokens exchanged from it, down the whole chain (a token's
/// `parents` name every lease it descends from), each with its own
/// `lease.revoke_requested` naming the revoked ancestor; its ancestors,
/// siblings from another parent and other tasks' leases stay active.
pub async fn revoking_a_lease_revokes_the_tokens_exchanged_from_it(s: Arc<dyn Store>) {
    let t = start(&*s, task("agent", "r", None, T0, 600)).await;
    let other = start(&*s, task("agent", "r", None, T0, 600)).await;
    let kmt = issue(&*s, &t, LeaseState::Active, T0, 300).await;
    let exchanged = |t: &Task, parents: &[&Lease], n: i64| {
        let mut l = lease(t, LeaseState::Active, T0.plus_millis(n), 300);
        l.engine = keymint_core::model::EngineKind::Jwt;
        let mut ids: Vec<String> = parents
            .last()
            .and_then(|p| p.engine_data["parents"].as_array())
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        if let Some(p) = parents.last() {
            ids.push(p.id.clone());
        }
        l.engine_data = serde_json::json!({ "oauth": true, "parents": ids });
        let (s, task) = (Arc::clone(&s), t.id.clone());
        async move {
            let ev = AuditDraft::new(T0, "oauth.token_issued", "admin").lease(&l.id);
            s.insert_lease(&task, Box::new(move |_| Ok((l, ev))))
                .await
                .unwrap()
        }
    };
    // kmt → a → b → c; kmt → d; an unrelated token e; a token of another
    // task.
    let a = exchanged(&t, &[&kmt], 1).await;
    let b = exchanged(&t, &[&a], 2).await;
    let c = exchanged(&t, &[&b], 3).await;
    let d = exchanged(&t, &[&kmt], 4).await;
    let e = exchanged(&t, &[], 5).await;
    let other_kmt = issue(&*s, &other, LeaseState::Active, T0, 300).await;
    let f = exchanged(&other, &[&other_kmt], 6).await;
    let state = |id: &str| {
        let (s, id) = (Arc::clone(&s), id.to_owned());
        async move { s.get_lease(&id).await.unwrap().unwrap().state }
    };
    let head = s.counts().await.unwrap().audit_head;
    let got = s
        .request_revocation(
            LeaseSelector::Id(a.id.clone()),
            EndReason::Revoked,
            T0.plus_secs(1),
            "workload:agent",
        )
        .await
        .unwrap();
    let mut ids: Vec<&str> = got.iter().map(|l| l.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![a.id.as_str(), b.id.as_str(), c.id.as_str()]);
    for l in [&b, &c] {
        assert_eq!(state(&l.id).await, LeaseState::Revoking, "{}", l.id);
    }
    for l in [&kmt, &d, &e, &f] {
        assert_eq!(state(&l.id).await, LeaseState::Active, "{}", l.id);
    }
    let tail = s.audit_after(head, 20).await.unwrap();
    let mut asked: Vec<_> = tail
        .iter()
        .filter(|e| e.kind == "lease.revoke_requested")
        .map(|e| {
            (
                e.lease.clone().unwrap(),
                e.data.get("exchanged_from").cloned(),
                e.actor.clone(),
            )
        })
        .collect();
    asked.sort_by(|x, y| x.0.cmp(&y.0));
    let from_a = Some(serde_json::json!(a.id));
    let actor = "workload:agent".to_owned();
    assert_eq!(
        asked,
        vec![
            (a.id.clone(), None, actor.clone()),
            (b.id.clone(), from_a.clone(), actor.clone()),
            (c.id.clone(), from_a, actor),
        ]
    );
    // By another selector: the `kmt_` token's fingerprint takes `d`.
    let got = s
        .request_revocation(
            LeaseSelector::Fingerprint(kmt.fingerprint.clone()),
            EndReason::Leaked,
            T0.plus_secs(2),
            "admin",
        )
        .await
        .unwrap();
    let mut ids: Vec<&str> = got.iter().map(|l| l.id.as_str()).collect();
    ids.sort_unstable();
    let mut want = vec![kmt.id.as_str(), d.id.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want);
    let d_now = s.get_lease(&d.id).await.unwrap().unwrap();
    assert_eq!(
        d_now.end_reason,
        Some(EndReason::Revoked),
        "not leaked itself"
    );
    for l in [&e, &f] {
        assert_eq!(state(&l.id).await, LeaseState::Active, "{}", l.id);
    }
    assert_chain_valid(&*s).await;
}

pub async fn expiry_and_timeouts_are_found_by_index(s: Arc<dyn Store>) {
    let t = start(&*s, task("agent", "r", None, T0, 100)).await;
    let mut idle = task("idle", "r", None, T0, 1000);
    idle.idle_timeout_secs = Some(10);
    let idle = start(&*s, idle).await;
    let short = issue(&*s, &t, LeaseState::Active, T0, 5).await;
    let _long = issue(&*s, &t, LeaseState::Active, T0, 50).await;
    assert_eq!(s.next_deadline().await.unwrap(), Some(T0.plus_secs(5)));
    assert!(s.expire_due(T0.plus_secs(4), 10).await.unwrap().is_empty());
    let expired = s.expire_due(T0.plus_secs(5), 10).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].id, short.id);
    assert_eq!(expired[0].end_reason, Some(EndReason::Expired));
    s.finish_revocations(
        vec![RevocationDone {
            lease: short.id.clone(),
            audit: AuditDraft::new(T0, "lease.expired", "system"),
        }],
        T0.plus_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(
        s.get_lease(&short.id).await.unwrap().unwrap().state,
        LeaseState::Expired
    );

    // The idle task times out at 10 s unless touched.
    assert_eq!(
        s.timed_out_tasks(T0.plus_secs(9), 10).await.unwrap(),
        Vec::<String>::new()
    );
    assert!(
        s.touch_task(&idle.id, T0.plus_secs(8))
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        s.timed_out_tasks(T0.plus_secs(10), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.timed_out_tasks(T0.plus_secs(18), 10).await.unwrap(),
        vec![idle.id.clone()]
    );
    assert!(
        s.touch_task(&idle.id, T0.plus_secs(18))
            .await
            .unwrap()
            .is_none(),
        "too late to touch"
    );
    assert_eq!(
        s.timed_out_tasks(T0.plus_secs(100), 10)
            .await
            .unwrap()
            .len(),
        2
    );
}

pub async fn renewal_moves_expiry_inside_the_transaction(s: Arc<dyn Store>) {
    let t = start(&*s, task("agent", "r", None, T0, 600)).await;
    let l = issue(&*s, &t, LeaseState::Active, T0, 60).await;
    let renewed = s
        .renew_lease(
            &l.id,
            Box::new(|l, t| {
                assert_eq!(l.task, t.id);
                Ok((
                    l.expires_at.plus_secs(60),
                    AuditDraft::new(T0, "lease.renewed", "admin"),
                ))
            }),
        )
        .await
        .unwrap();
    assert_eq!(renewed.expires_at, T0.plus_secs(120));
    assert_eq!(
        s.get_lease(&l.id).await.unwrap().unwrap().expires_at,
        T0.plus_secs(120)
    );
    let r = s
        .renew_lease(
            &l.id,
            Box::new(|l, _| Err(RuleError::LeaseNotActive(l.id.clone()))),
        )
        .await;
    assert!(matches!(r, Err(StoreError::Rule(_))));
    assert_eq!(
        s.get_lease(&l.id).await.unwrap().unwrap().expires_at,
        T0.plus_secs(120)
    );
    assert!(matches!(
        s.renew_lease("lse_missing", Box::new(|_, _| unreachable!()))
            .await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn stale_pending_leases_are_listed(s: Arc<dyn Store>) {
    let t = start(&*s, task("agent", "r", None, T0, 600)).await;
    let p = issue(&*s, &t, LeaseState::Pending, T0, 60).await;
    let _a = issue(&*s, &t, LeaseState::Active, T0, 60).await;
    assert!(s.stale_pending(T0, 10).await.unwrap().is_empty());
    let stale = s.stale_pending(T0.plus_secs(1), 10).await.unwrap();
    assert_eq!(stale.iter().map(|l| &l.id).collect::<Vec<_>>(), vec![&p.id]);
    assert!(
        s.activate_lease(&p.id, AuditDraft::new(T0, "lease.activated", "system"))
            .await
            .unwrap()
    );
    assert!(
        !s.activate_lease(&p.id, AuditDraft::new(T0, "lease.activated", "system"))
            .await
            .unwrap()
    );
}

pub async fn a_minted_lease_takes_the_providers_fingerprint(s: Arc<dyn Store>) {
    let t = start(&*s, task("agent", "r", None, T0, 600)).await;
    let p = issue(&*s, &t, LeaseState::Pending, T0, 60).await;
    let data = serde_json::json!({"service_account": "svc_1", "api_key": "key_1"});
    let ev = || AuditDraft::new(T0, "lease.issued", "system").lease(&p.id);
    assert!(
        s.activate_minted_lease(&p.id, "fp-minted", data.clone(), ev())
            .await
            .unwrap()
    );
    let (l, _) = s.lease_by_fingerprint("fp-minted").await.unwrap().unwrap();
    assert_eq!(l.id, p.id);
    assert_eq!(l.state, LeaseState::Active);
    assert_eq!(l.engine_data, data);
    assert!(
        s.lease_by_fingerprint(&p.fingerprint)
            .await
            .unwrap()
            .is_none()
    );
    // Only once, and never for a lease that left `pending`.
    assert!(
        !s.activate_minted_lease(&p.id, "fp-other", serde_json::Value::Null, ev())
            .await
            .unwrap()
    );
    assert_eq!(
        s.get_lease(&p.id).await.unwrap().unwrap().fingerprint,
        "fp-minted"
    );
    assert_chain_valid(&*s).await;
}

pub async fn the_audit_chain_is_gapless_under_concurrency(s: Arc<dyn Store>) {
    let t = start(&*s, task("agent", "r", None, T0, 600)).await;
    let mut handles = Vec::new();
    for i in 0..200u32 {
        let s = Arc::clone(&s);
        let t = t.clone();
        handles.push(tokio::spawn(async move {
            if i % 10 == 0 {
                // Refused grants interleave with successful ones.
                let r = s
                    .insert_lease(
                        &t.id,
                        Box::new(|t| Err(RuleError::TaskNotActive(t.id.clone()))),
                    )
                    .await;
                assert!(r.is_err());
            } else {
                issue(&*s, &t, LeaseState::Active, T0, 60).await;
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let n = assert_chain_valid(&*s).await;
    assert_eq!(n, 1 + 180);
    let tail = s.audit_tail(5).await.unwrap();
    assert_eq!(tail.len(), 5);
    assert_eq!(tail[4].seq, 181);
    let counts = s.counts().await.unwrap();
    assert_eq!(counts.audit_head, 181);
    assert!(counts.leases.contains(&(LeaseState::Active, 180)));
    assert_eq!(counts.tasks_active, 1);
}

pub async fn secrets_and_cursors_persist(s: Arc<dyn Store>) {
    assert_eq!(s.get_secret("k").await.unwrap(), None);
    s.put_secret("k", vec![1, 2, 3], T0).await.unwrap();
    s.put_secret("k", vec![4], T0).await.unwrap();
    assert_eq!(s.get_secret("k").await.unwrap(), Some(vec![4]));
    // Compare and set: only the writer that saw the current value wins.
    assert!(!s.swap_secret("k", None, vec![9], T0).await.unwrap());
    assert!(
        !s.swap_secret("k", Some(vec![5]), vec![9], T0)
            .await
            .unwrap()
    );
    assert_eq!(s.get_secret("k").await.unwrap(), Some(vec![4]));
    assert!(
        s.swap_secret("k", Some(vec![4]), vec![6], T0)
            .await
            .unwrap()
    );
    assert_eq!(s.get_secret("k").await.unwrap(), Some(vec![6]));
    assert!(
        !s.swap_secret("new", Some(vec![]), vec![1], T0)
            .await
            .unwrap()
    );
    assert_eq!(s.get_secret("new").await.unwrap(), None);
    // Many creators at once: exactly one wins and all read its value.
    let racers = (0u8..8).map(|i| {
        let s = Arc::clone(&s);
        tokio::spawn(async move { s.swap_secret("first", None, vec![i], T0).await.unwrap() })
    });
    let mut won = 0;
    for r in racers {
        won += usize::from(r.await.unwrap());
    }
    assert_eq!(won, 1, "exactly one creator wins");
    assert_eq!(
        s.get_secret("first").await.unwrap().map(|v| v.len()),
        Some(1)
    );
    assert_eq!(s.sink_cursor("file").await.unwrap(), 0);
    s.set_sink_cursor("file", 42).await.unwrap();
    s.set_sink_cursor("file", 43).await.unwrap();
    assert_eq!(s.sink_cursor("file").await.unwrap(), 43);
    let ev = s
        .append_audit(AuditDraft::new(T0, "admin.test", "admin"))
        .await
        .unwrap();
    assert_eq!(ev.seq, 1);
    let lines = s.audit_lines_after(0, 10).await.unwrap();
    assert_eq!(
        lines,
        vec![(1, ev.to_json())],
        "stored lines are the canonical JSON"
    );
    assert_eq!(s.audit_after(0, 10).await.unwrap(), vec![ev]);
    // A cursor past the largest `seq` SQL holds reads nothing; cast, it
    // would wrap to a negative number and read the chain from its start.
    for past in [i64::MAX as u64, 1 << 63, u64::MAX] {
        assert!(s.audit_after(past, 10).await.unwrap().is_empty(), "{past}");
        assert!(
            s.audit_lines_after(past, 10).await.unwrap().is_empty(),
            "{past}"
        );
    }
}

pub async fn single_use_claims_hold_once_until_they_end(s: Arc<dyn Store>) {
    let until = T0.plus_secs(60);
    // Concurrent claims of one key: exactly one wins.
    let mut joins = Vec::new();
    for _ in 0..8 {
        let s = Arc::clone(&s);
        joins.push(tokio::spawn(async move {
            s.claim_once("jti-a", until, T0).await.unwrap()
        }));
    }
    let mut won = 0;
    for j in joins {
        if j.await.unwrap() {
            won += 1;
        }
    }
    assert_eq!(won, 1);
    assert!(
        !s.claim_once("jti-a", until, T0.plus_secs(59))
            .await
            .unwrap()
    );
    assert!(s.claim_once("jti-b", until, T0).await.unwrap());
    // Once the claim ended, the key can be claimed again.
    assert!(
        s.claim_once("jti-a", until.plus_secs(60), until)
            .await
            .unwrap()
    );
    assert!(
        !s.claim_once("jti-a", until.plus_secs(60), until)
            .await
            .unwrap()
    );
    // Claims are not secrets anyone reads.
    assert_eq!(s.get_secret("jti-a").await.unwrap(), None);
}

pub async fn rate_buckets_are_shared_and_never_overdrawn(s: Arc<dyn Store>) {
    use crate::{RateAsk, RateGive, RateTake};
    let rpm = |key: &str, per_minute: u64, need: u64| RateAsk {
        key: key.into(),
        per_minute,
        need,
    };
    // Concurrent takes of a 5-a-minute bucket: exactly 5 are granted, one
    // unit each (a small limit is exact).
    let mut joins = Vec::new();
    for _ in 0..12 {
        let s = Arc::clone(&s);
        joins.push(tokio::spawn(async move {
            s.take_rates(vec![rpm("tsk_a/rpm", 5, 1)], T0)
                .await
                .unwrap()
        }));
    }
    let mut granted = 0;
    for j in joins {
        match j.await.unwrap() {
            RateTake::Taken(g) => {
                assert_eq!(g, vec![1]);
                granted += 1;
            }
            RateTake::Wait { index, wait_ms } => {
                assert_eq!(index, 0);
                assert_eq!(wait_ms, 12_000);
            }
        }
    }
    assert_eq!(granted, 5);
    // A unit given back is there for the next take, once.
    s.give_rates(
        vec![RateGive {
            key: "tsk_a/rpm".into(),
            per_minute: 5,
            units: 1,
        }],
        T0,
    )
    .await
    .unwrap();
    assert_eq!(
        s.take_rates(vec![rpm("tsk_a/rpm", 5, 1)], T0)
            .await
            .unwrap(),
        RateTake::Taken(vec![1])
    );
    assert!(matches!(
        s.take_rates(vec![rpm("tsk_a/rpm", 5, 1)], T0)
            .await
            .unwrap(),
        RateTake::Wait { .. }
    ));
    // Refilled with time: one unit per 12 s.
    assert_eq!(
        s.take_rates(vec![rpm("tsk_a/rpm", 5, 1)], T0.plus_secs(12))
            .await
            .unwrap(),
        RateTake::Taken(vec![1])
    );
    // Two buckets are taken together or not at all: the empty request
    // bucket leaves the token bucket untouched.
    let both = vec![rpm("tsk_a/rpm", 5, 1), rpm("tsk_a/tpm", 100, 90)];
    assert!(matches!(
        s.take_rates(both, T0.plus_secs(12)).await.unwrap(),
        RateTake::Wait { index: 0, .. }
    ));
    assert_eq!(
        s.take_rates(vec![rpm("tsk_a/tpm", 100, 90)], T0.plus_secs(12))
            .await
            .unwrap(),
        RateTake::Taken(vec![90])
    );
    // A large bucket hands out slices, and never more than it holds.
    let mut total = 0;
    while let RateTake::Taken(g) = s
        .take_rates(vec![rpm("tsk_b/rpm", 1_000, 1)], T0)
        .await
        .unwrap()
    {
        total += g[0];
    }
    assert_eq!(total, 1_000);
    // A minute later, untouched buckets are forgotten (full again).
    assert_eq!(
        s.take_rates(vec![rpm("tsk_c/rpm", 5, 1)], T0.plus_secs(3_600))
            .await
            .unwrap(),
        RateTake::Taken(vec![1])
    );
    assert_eq!(
        s.take_rates(vec![rpm("tsk_a/rpm", 5, 5)], T0.plus_secs(3_600))
            .await
            .unwrap(),
        RateTake::Taken(vec![5])
    );
}

fn approval(now: Timestamp, ttl: u64) -> Approval {
    Approval {
        id: id::approval_id(now),
        action: "issue".into(),
        status: ApprovalStatus::Pending,
        requester: "workload:coder".into(),
        requester_key: "lease:lse_x".into(),
        workload: "coder".into(),
        role: "db-write".into(),
        task: Some("tsk_x".into()),
        request: serde_json::json!({"ttl_secs": 60}),
        policies: vec!["needs-a-human".into()],
        created_at: now,
        expires_at: now.plus_secs(ttl),
        decided_by: None,
        decided_at: None,
        note: None,
    }
}

fn change(id: &str, from: ApprovalStatus, to: ApprovalStatus, now: Timestamp) -> ApprovalChange {
    ApprovalChange {
        id: id.into(),
        from,
        to,
        by: (to != ApprovalStatus::Used).then(|| "alice".to_owned()),
        note: None,
        now,
        audit: AuditDraft::new(now, "approval.changed", "alice"),
    }
}

pub async fn approvals_move_once_and_expire(s: Arc<dyn Store>) {
    use ApprovalStatus::*;
    let a = approval(T0, 600);
    s.create_approval(a.clone(), AuditDraft::new(T0, "approval.requested", "x"))
        .await
        .unwrap();
    let got = s.get_approval(&a.id).await.unwrap().unwrap();
    assert_eq!(got, a, "round trip, requester key included");
    assert_eq!(
        s.list_approvals(Some(Pending), 10).await.unwrap(),
        vec![a.clone()]
    );
    assert!(
        s.list_approvals(Some(Approved), 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Announced once, then retried at the time given, then done.
    let due = s.approvals_to_announce(T0, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    s.approval_announced(&a.id, Some(T0.plus_secs(5)))
        .await
        .unwrap();
    assert!(
        s.approvals_to_announce(T0.plus_secs(4), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.approvals_to_announce(T0.plus_secs(5), 10)
            .await
            .unwrap()
            .len(),
        1
    );
    s.approval_announced(&a.id, None).await.unwrap();
    assert!(
        s.approvals_to_announce(T0.plus_secs(60), 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Pending → approved once; a second approval or a denial finds nothing.
    let t1 = T0.plus_secs(10);
    let ok = s
        .transition_approval(change(&a.id, Pending, Approved, t1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ok.status, Approved);
    assert_eq!(ok.decided_by.as_deref(), Some("alice"));
    assert_eq!(ok.decided_at, Some(t1));
    assert!(
        s.transition_approval(change(&a.id, Pending, Approved, t1))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        s.transition_approval(change(&a.id, Pending, Denied, t1))
            .await
            .unwrap()
            .is_none()
    );
    // Redeemed once.
    let used = s
        .transition_approval(change(&a.id, Approved, Used, t1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(used.status, Used);
    assert_eq!(
        used.decided_by.as_deref(),
        Some("alice"),
        "the approver stays recorded"
    );
    assert!(
        s.transition_approval(change(&a.id, Approved, Used, t1))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        s.transition_approval(change("apr_missing", Pending, Approved, t1))
            .await
            .unwrap()
            .is_none()
    );

    // Past its expiry nothing moves it but expiry; expiry is audited.
    let b = approval(T0, 60);
    s.create_approval(b.clone(), AuditDraft::new(T0, "approval.requested", "x"))
        .await
        .unwrap();
    let late = T0.plus_secs(60);
    assert!(
        s.transition_approval(change(&b.id, Pending, Approved, late))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        s.expire_approvals(T0.plus_secs(59), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let head = s.counts().await.unwrap().audit_head;
    let expired = s.expire_approvals(late, 10).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].status, Expired);
    assert_eq!(
        s.get_approval(&b.id).await.unwrap().unwrap().status,
        Expired
    );
    assert!(s.approvals_to_announce(late, 10).await.unwrap().is_empty());
    let tail = s.audit_after(head, 10).await.unwrap();
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].kind, "approval.expired");
    assert!(s.expire_approvals(late, 10).await.unwrap().is_empty());
    let all = s.list_approvals(None, 10).await.unwrap();
    assert_eq!(all.len(), 2);
    assert!(all[0].id > all[1].id, "newest first");
}

/// Registration entries are stored whole, listed per node, deleted once,
/// and every change is in the audit chain.
/// Ending a task closes (`cancelled`, decided by no one, one
/// `approval.cancelled` each) the pending and approved approvals of its
/// tree, in the same transaction; other tasks' are left as they are.
pub async fn ending_a_task_closes_its_open_approvals(s: Arc<dyn Store>) {
    use ApprovalStatus::*;
    let root = start(&*s, task("agent", "r", None, T0, 600)).await;
    let child = start(&*s, task("sub", "r", Some(&root), T0, 300)).await;
    let other = start(&*s, task("other", "r", None, T0, 600)).await;
    let mut made = Vec::new();
    for (t, n) in [(&root, 1i64), (&child, 2), (&root, 3), (&other, 4)] {
        let mut a = approval(T0.plus_millis(n), 600);
        a.task = Some(t.id.clone());
        s.create_approval(a.clone(), AuditDraft::new(T0, "approval.requested", "x"))
            .await
            .unwrap();
        made.push(a.id);
    }
    s.transition_approval(change(&made[2], Pending, Approved, T0.plus_secs(1)))
        .await
        .unwrap()
        .unwrap();
    let head = s.counts().await.unwrap().audit_head;
    end(&*s, &root.id, TaskStatus::Failed, T0.plus_secs(5)).await;
    let status = |i: usize| {
        let (s, id) = (Arc::clone(&s), made[i].clone());
        async move { s.get_approval(&id).await.unwrap().unwrap() }
    };
    let closed = status(0).await;
    assert_eq!(closed.status, Cancelled);
    assert_eq!(closed.decided_by, None);
    assert!(closed.note.unwrap().contains("failed"));
    assert_eq!(status(1).await.status, Cancelled, "the sub-task's too");
    let approved = status(2).await;
    assert_eq!(
        approved.status, Cancelled,
        "an approved request its task can no longer carry out"
    );
    assert_eq!(approved.decided_by.as_deref(), Some("alice"), "kept");
    assert_eq!(status(3).await.status, Pending);
    assert_eq!(
        s.list_approvals(Some(Cancelled), 10).await.unwrap().len(),
        3
    );
    let tail = s.audit_after(head, 20).await.unwrap();
    let cancelled: Vec<_> = tail
        .iter()
        .filter(|e| e.kind == "approval.cancelled")
        .map(|e| {
            (
                e.task.clone().unwrap(),
                e.data["approval"].clone(),
                e.data["was"].clone(),
            )
        })
        .collect();
    let j = |v: &str| serde_json::json!(v);
    assert_eq!(
        cancelled,
        vec![
            (root.id.clone(), j(&made[0]), j("pending")),
            (root.id.clone(), j(&made[2]), j("approved")),
            (child.id.clone(), j(&made[1]), j("pending")),
        ]
    );
    // A redemption finds nothing to use.
    assert!(
        s.transition_approval(change(&made[2], Approved, Used, T0.plus_secs(6)))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        s.approvals_to_announce(T0.plus_secs(60), 10)
            .await
            .unwrap()
            .iter()
            .all(|a| a.id == made[3])
    );
    assert_chain_valid(&*s).await;
}

pub async fn entries_are_kept_per_node(s: Arc<dyn Store>) {
    let entry = |node: &str, workload: &str, n: i64| RegistrationEntry {
        id: id::entry_id(Timestamp(T0.0 + n)),
        workload: workload.into(),
        node: node.into(),
        selectors: serde_json::json!({ "uid": 1000, "exe_sha256": "ab".repeat(32) }),
        attributes: [("team".to_owned(), "support".to_owned())].into(),
        created_at: Timestamp(T0.0 + n),
    };
    let ev = |kind: &'static str, e: &RegistrationEntry| {
        AuditDraft::new(T0, kind, "admin").data("entry", e.id.clone())
    };
    let before = assert_chain_valid(&*s).await;
    let a = entry("node-a", "triage", 1);
    let b = entry("node-b", "triage", 2);
    let c = entry("node-a", "ci", 3);
    for e in [&a, &b, &c] {
        s.create_entry(e.clone(), ev("entry.created", e))
            .await
            .unwrap();
    }
    // The same id twice is an error and changes nothing.
    assert!(
        s.create_entry(a.clone(), ev("entry.created", &a))
            .await
            .is_err()
    );
    assert_eq!(s.get_entry(&a.id).await.unwrap().as_ref(), Some(&a));
    assert_eq!(
        s.list_entries(None).await.unwrap(),
        vec![a.clone(), b.clone(), c.clone()]
    );
    assert_eq!(
        s.list_entries(Some("node-a")).await.unwrap(),
        vec![a.clone(), c.clone()]
    );
    assert!(s.list_entries(Some("node-z")).await.unwrap().is_empty());

    assert_eq!(
        s.delete_entry(&a.id, ev("entry.deleted", &a))
            .await
            .unwrap(),
        Some(a.clone())
    );
    assert_eq!(
        s.delete_entry(&a.id, ev("entry.deleted", &a))
            .await
            .unwrap(),
        None
    );
    assert_eq!(s.get_entry(&a.id).await.unwrap(), None);
    assert_eq!(s.list_entries(Some("node-a")).await.unwrap(), vec![c]);
    // Three creations and one deletion were audited, nothing else.
    assert_eq!(assert_chain_valid(&*s).await, before + 4);
}

/// The inventory: an entry is written only over the version the writer
/// read (a new one only if neither its id nor its fingerprint is taken),
/// found by id and fingerprint, listed newest first with a cursor, and
/// every write that happened (and only those) is audited.
pub async fn inventory_writes_only_over_the_version_read(s: Arc<dyn Store>) {
    use keymint_core::inventory::{InventoryItem, ItemStatus, Origin};
    let item = |n: i64, fp: &str| InventoryItem {
        id: id::inventory_id(Timestamp(T0.0 + n)),
        version: 1,
        origin: Origin::Scan,
        status: ItemStatus::Active,
        name: format!("key {n}"),
        provider: "openai".into(),
        rule: Some("openai.project-key".into()),
        fingerprint: fp.into(),
        hint: Some("sk-proj-abc…wxyz".into()),
        business_owner: None,
        technical_owner: None,
        purpose: None,
        environment: None,
        workloads: vec![],
        scopes: vec![],
        created_at: Timestamp(T0.0 + n),
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
        updated_at: Timestamp(T0.0 + n),
    };
    let ev = |i: &InventoryItem| {
        AuditDraft::new(T0, "inventory.changed", "admin").data("item", i.id.clone())
    };
    let before = assert_chain_valid(&*s).await;
    let a = item(1, &"aa".repeat(32));
    let b = item(2, &"bb".repeat(32));
    assert!(s.put_inventory(a.clone(), 0, ev(&a)).await.unwrap());
    assert!(s.put_inventory(b.clone(), 0, ev(&b)).await.unwrap());
    // The same id, or another id with the same fingerprint: refused.
    assert!(!s.put_inventory(a.clone(), 0, ev(&a)).await.unwrap());
    let twin = item(3, &"aa".repeat(32));
    assert!(!s.put_inventory(twin.clone(), 0, ev(&twin)).await.unwrap());
    assert_eq!(s.get_inventory(&twin.id).await.unwrap(), None);

    let mut a2 = a.clone();
    a2.version = 2;
    a2.business_owner = Some("finance".into());
    assert!(s.put_inventory(a2.clone(), 1, ev(&a2)).await.unwrap());
    // A writer that read version 1 lost the race: nothing changes.
    let mut stale = a.clone();
    stale.version = 2;
    stale.purpose = Some("overwritten".into());
    assert!(!s.put_inventory(stale, 1, ev(&a)).await.unwrap());
    assert_eq!(s.get_inventory(&a.id).await.unwrap(), Some(a2.clone()));
    assert_eq!(
        s.inventory_by_fingerprint(&"aa".repeat(32)).await.unwrap(),
        Some(a2.clone())
    );
    assert_eq!(s.inventory_by_fingerprint("cc").await.unwrap(), None);
    assert_eq!(
        s.list_inventory(None, 10).await.unwrap(),
        vec![b.clone(), a2.clone()]
    );
    assert_eq!(s.list_inventory(Some(&b.id), 10).await.unwrap(), vec![a2]);
    assert_eq!(s.list_inventory(None, 1).await.unwrap(), vec![b]);
    // Three writes happened; the four refused ones left no event.
    assert_eq!(assert_chain_valid(&*s).await, before + 3);
}

/// Misuse monitoring: hours add up per scope and subject, sources keep
/// their countries, and a subject has at most one active suspension, lifted
/// once, each change audited.
pub async fn monitoring_adds_hours_and_suspends_once(s: Arc<dyn Store>) {
    use keymint_core::monitor::{Scope, SourceSeen, Suspension, UsageHour, hour_of};
    let h0 = hour_of(T0);
    let row = |hour: Timestamp, scope: Scope, subject: &str, n: u64| UsageHour {
        hour,
        scope,
        subject: subject.into(),
        requests: n,
        tokens: 10 * n,
        spend_nusd: 1000 * n,
    };
    s.add_usage_hours(vec![
        row(h0, Scope::Workload, "w", 1),
        row(h0, Scope::Task, "w", 5),
        row(h0.plus_secs(3600), Scope::Workload, "w", 2),
    ])
    .await
    .unwrap();
    s.add_usage_hours(vec![row(h0, Scope::Workload, "w", 3)])
        .await
        .unwrap();
    s.add_usage_hours(Vec::new()).await.unwrap();
    let got = s
        .usage_hours(Scope::Workload, "w", h0, h0.plus_secs(7200))
        .await
        .unwrap();
    assert_eq!(
        got,
        vec![
            row(h0, Scope::Workload, "w", 4),
            row(h0.plus_secs(3600), Scope::Workload, "w", 2)
        ]
    );
    // The upper bound is exclusive; another scope is apart.
    assert_eq!(
        s.usage_hours(Scope::Workload, "w", h0, h0.plus_secs(3600))
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        s.usage_hours(Scope::Task, "w", h0, h0.plus_secs(7200))
            .await
            .unwrap(),
        vec![row(h0, Scope::Task, "w", 5)]
    );

    let src = |addr: &str, country: Option<&str>, at: Timestamp| SourceSeen {
        workload: "w".into(),
        address: addr.into(),
        country: country.map(str::to_owned),
        first_seen: at,
        last_seen: at,
        requests: 1,
    };
    s.note_sources(vec![
        src("127.0.0.1", Some("DE"), T0),
        src("203.0.113.7", Some("FR"), T0),
        src("198.51.100.1", None, T0),
    ])
    .await
    .unwrap();
    s.note_sources(vec![src("127.0.0.1", None, T0.plus_secs(5))])
        .await
        .unwrap();
    assert_eq!(s.source_countries("w").await.unwrap(), vec!["DE", "FR"]);
    assert!(s.source_countries("other").await.unwrap().is_empty());

    let sus = |scope: Scope, subject: &str, n: i64| Suspension {
        id: id::suspension_id(Timestamp(T0.0 + n)),
        scope,
        subject: subject.into(),
        rule: "spike".into(),
        reason: "spend 5 times its baseline".into(),
        created_at: T0,
        created_by: "keymint".into(),
        lifted_at: None,
        lifted_by: None,
    };
    let ev = || AuditDraft::new(T0, "monitor.suspended", "keymint");
    let a = sus(Scope::Task, "tsk_1", 1);
    assert!(s.suspend(a.clone(), ev()).await.unwrap());
    // A second one for the same subject is refused; another subject is not.
    assert!(!s.suspend(sus(Scope::Task, "tsk_1", 2), ev()).await.unwrap());
    let b = sus(Scope::Workload, "tsk_1", 3);
    assert!(s.suspend(b.clone(), ev()).await.unwrap());
    assert_eq!(
        s.list_suspensions(true, 10).await.unwrap(),
        vec![b.clone(), a.clone()]
    );
    let lifted = s
        .lift_suspension(&a.id, "operator:alice", T0.plus_secs(60), ev())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lifted.lifted_at, Some(T0.plus_secs(60)));
    assert_eq!(lifted.lifted_by.as_deref(), Some("operator:alice"));
    assert!(!lifted.is_active());
    // Lifted once only; an unknown id lifts nothing.
    assert_eq!(
        s.lift_suspension(&a.id, "admin", T0, ev()).await.unwrap(),
        None
    );
    assert_eq!(
        s.lift_suspension("sus_nope", "admin", T0, ev())
            .await
            .unwrap(),
        None
    );
    assert_eq!(s.active_suspensions().await.unwrap(), vec![b.clone()]);
    assert_eq!(s.list_suspensions(true, 10).await.unwrap(), vec![b.clone()]);
    assert_eq!(
        s.list_suspensions(false, 10).await.unwrap(),
        vec![b, lifted]
    );
    // Once lifted, the subject can be suspended again.
    assert!(s.suspend(sus(Scope::Task, "tsk_1", 4), ev()).await.unwrap());
    // Three suspensions and one lift, each audited; nothing else was.
    let events = s.audit_after(0, 100).await.unwrap();
    assert_eq!(events.len(), 4);
    assert_chain_valid(s.as_ref()).await;
}

/// Retention deletes only what is over: tasks that ended before the cutoff
/// whose leases are all finished and whose sub-tasks are all ended.
pub async fn retention_prunes_only_what_is_over(s: Arc<dyn Store>) {
    let end = |id: &str, now: Timestamp| TaskEnd {
        id: id.to_owned(),
        status: TaskStatus::Completed,
        now,
        actor: "admin".into(),
        reason: None,
    };
    let finish = |ids: Vec<String>| {
        ids.into_iter()
            .map(|id| RevocationDone {
                audit: AuditDraft::new(T0, "lease.revoked", "system").lease(&id),
                lease: id,
            })
            .collect::<Vec<_>>()
    };
    // Old and over: ended at T0+1 with its lease revoked.
    let old = start(&*s, task("a", "r", None, T0, 600)).await;
    let old_lease = issue(&*s, &old, LeaseState::Active, T0, 60).await;
    let ended = s
        .end_task(end(&old.id, T0.plus_secs(1)))
        .await
        .unwrap()
        .unwrap();
    s.finish_revocations(
        finish(ended.leases.iter().map(|l| l.id.clone()).collect()),
        T0,
    )
    .await
    .unwrap();
    // Old but its revocation is still being retried: kept.
    let stuck = start(&*s, task("b", "r", None, T0, 600)).await;
    issue(&*s, &stuck, LeaseState::Active, T0, 60).await;
    s.end_task(end(&stuck.id, T0.plus_secs(1))).await.unwrap();
    // A live parent whose sub-task ended long ago: the sub-task goes, the
    // parent stays.
    let parent = start(&*s, task("c", "r", None, T0, 100_000)).await;
    let child = start(&*s, task("d", "r", Some(&parent), T0, 600)).await;
    s.end_task(end(&child.id, T0.plus_secs(2))).await.unwrap();
    // Ended recently: kept.
    let recent = start(&*s, task("e", "r", None, T0, 100_000)).await;
    s.end_task(end(&recent.id, T0.plus_secs(5000)))
        .await
        .unwrap();
    // Live: kept.
    let live = start(&*s, task("f", "r", None, T0, 100_000)).await;

    let before = assert_chain_valid(&*s).await;
    let cutoff = T0.plus_secs(1000);
    let now = T0.plus_secs(9000);
    let pruned = s.prune_ended(cutoff, now, 1).await.unwrap();
    assert_eq!(
        pruned,
        crate::Pruned {
            tasks: 1,
            leases: 1
        },
        "the limit holds"
    );
    let pruned = s.prune_ended(cutoff, now, 100).await.unwrap();
    assert_eq!(
        pruned,
        crate::Pruned {
            tasks: 1,
            leases: 0
        }
    );
    assert_eq!(
        s.prune_ended(cutoff, now, 100).await.unwrap(),
        crate::Pruned::default()
    );

    assert!(s.get_task(&old.id).await.unwrap().is_none());
    assert!(s.get_lease(&old_lease.id).await.unwrap().is_none());
    assert!(s.get_task(&child.id).await.unwrap().is_none());
    for kept in [&stuck, &parent, &recent, &live] {
        assert!(
            s.get_task(&kept.id).await.unwrap().is_some(),
            "{} kept",
            kept.workload
        );
    }
    // One audit event per call that pruned something, none otherwise.
    assert_eq!(assert_chain_valid(&*s).await, before + 2);
    let tail = s.audit_tail(2).await.unwrap();
    assert!(tail.iter().all(|e| e.kind == "store.pruned"));
    assert_eq!(tail[0].data["tasks"], 1);
}

/// Who reserves for `t` (its first lease, made up).
fn reserver(t: &Task, now: Timestamp) -> ReservationFor {
    ReservationFor {
        task: t.id.clone(),
        lease: format!("lse_for_{}", t.id),
        workload: t.workload.clone(),
        role: t.role.clone(),
        fingerprint: format!("fp-for-{}", t.id),
        upstream: "openai".into(),
        now,
    }
}

/// Reserves `ask` if every level keeps its requests at most `max` and its
/// output tokens at most `max_output`.
fn within(max: u64, max_output: u64, ask: Usage) -> BudgetFn {
    Box::new(move |levels: &[BudgetLevel]| {
        for l in levels {
            let held = l.used.plus(l.reserved).plus(ask);
            if held.requests > max {
                return Err("requests");
            }
            if held.output > max_output {
                return Err("output tokens");
            }
        }
        Ok(ask)
    })
}

fn use_of(requests: u64, input: u64, output: u64, spend_nusd: u64) -> Usage {
    Usage {
        requests,
        input,
        output,
        spend_nusd,
    }
}

pub async fn budgets_reserve_atomically_and_settle_once(s: Arc<dyn Store>) {
    let t = start(&*s, task("agent", "gpt", None, T0, 600)).await;
    let ask = use_of(1, 10, 100, 1_000);
    // 30 at once against 5 requests: the store serialises them.
    let mut handles = Vec::new();
    for _ in 0..30 {
        let (s, who) = (Arc::clone(&s), reserver(&t, T0));
        handles.push(tokio::spawn(async move {
            s.reserve_budget(who, within(5, u64::MAX, ask)).await
        }));
    }
    let mut granted = Vec::new();
    for h in handles {
        match h.await.unwrap() {
            Ok(r) => granted.push(r),
            Err(StoreError::BudgetExhausted(what)) => assert_eq!(what, "requests"),
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(granted.len(), 5);
    assert!(granted.iter().all(|r| r.chain == vec![t.id.clone()]));
    let (used, reserved) = s.budget_of(&t.id).await.unwrap();
    assert_eq!(used, Usage::default());
    assert_eq!(reserved, use_of(5, 50, 500, 5_000));
    // Two settle with what the provider reported, one with nothing known
    // (charged in full), and settling twice charges once.
    let settle = |r: &crate::BudgetReservation, used: Option<Usage>| BudgetSettle {
        id: r.id.clone(),
        used,
        now: T0.plus_secs(1),
    };
    s.settle_budget(vec![
        settle(&granted[0], Some(use_of(1, 4, 6, 60))),
        settle(&granted[1], Some(use_of(1, 4, 6, 60))),
        settle(&granted[2], None),
    ])
    .await
    .unwrap();
    s.settle_budget(vec![settle(&granted[0], Some(use_of(1, 9, 99, 999)))])
        .await
        .unwrap();
    s.settle_budget(vec![BudgetSettle {
        id: "rsv_unknown".into(),
        used: None,
        now: T0,
    }])
    .await
    .unwrap();
    let (used, reserved) = s.budget_of(&t.id).await.unwrap();
    assert_eq!(used, use_of(3, 4 + 4 + 10, 6 + 6 + 100, 60 + 60 + 1_000));
    assert_eq!(reserved, use_of(2, 20, 200, 2_000));
    // Settled requests still count: the budget stays full.
    let r = s
        .reserve_budget(reserver(&t, T0), within(5, u64::MAX, ask))
        .await;
    assert!(matches!(r, Err(StoreError::BudgetExhausted("requests"))));
    // Tokens are checked like requests, and what decide returns is held.
    let other = start(&*s, task("agent", "gpt", None, T0, 600)).await;
    let before = assert_chain_valid(&*s).await;
    let r = s
        .reserve_budget(reserver(&other, T0), within(5, 150, ask))
        .await
        .unwrap();
    assert_eq!(r.amount, ask);
    let r = s
        .reserve_budget(reserver(&other, T0), within(5, 150, ask))
        .await;
    assert!(matches!(
        r,
        Err(StoreError::BudgetExhausted("output tokens"))
    ));
    assert_eq!(s.budget_of(&other.id).await.unwrap().1, ask);
    // Budgets write no audit event of their own; a refusal writes nothing.
    assert_eq!(assert_chain_valid(&*s).await, before);
    let r = s.reserve_budget(
        reserver(&task("x", "y", None, T0, 1), T0),
        within(5, 5, ask),
    );
    assert!(matches!(r.await, Err(StoreError::NotFound(_))));
}

pub async fn sub_task_reservations_count_against_every_ancestor(s: Arc<dyn Store>) {
    let root = start(&*s, task("planner", "gpt", None, T0, 600)).await;
    let child = start(&*s, task("coder", "gpt-small", Some(&root), T0, 600)).await;
    let grandchild = start(&*s, task("tester", "gpt", Some(&child), T0, 600)).await;
    let sibling = start(&*s, task("writer", "gpt", Some(&root), T0, 600)).await;
    // decide sees the task first, then each ancestor, with its role.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let ask = use_of(1, 1, 1, 1);
    let seen2 = Arc::clone(&seen);
    let r = s
        .reserve_budget(
            reserver(&grandchild, T0),
            Box::new(move |levels: &[BudgetLevel]| {
                seen2.lock().unwrap().extend(
                    levels
                        .iter()
                        .map(|l| (l.task.clone(), l.role.clone(), l.used, l.reserved)),
                );
                Ok(ask)
            }),
        )
        .await
        .unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (
                grandchild.id.clone(),
                "gpt".to_owned(),
                Usage::default(),
                Usage::default()
            ),
            (
                child.id.clone(),
                "gpt-small".to_owned(),
                Usage::default(),
                Usage::default()
            ),
            (
                root.id.clone(),
                "gpt".to_owned(),
                Usage::default(),
                Usage::default()
            ),
        ]
    );
    assert_eq!(
        r.chain,
        vec![grandchild.id.clone(), child.id.clone(), root.id.clone()]
    );
    for t in [&grandchild, &child, &root] {
        assert_eq!(s.budget_of(&t.id).await.unwrap().1, ask, "{}", t.workload);
    }
    assert_eq!(s.budget_of(&sibling.id).await.unwrap(), Default::default());
    // The root's budget of 3 requests is shared by its whole tree: the
    // sibling gets 2 more, and then nobody in the tree gets any.
    for _ in 0..2 {
        s.reserve_budget(reserver(&sibling, T0), within(3, u64::MAX, ask))
            .await
            .unwrap();
    }
    for t in [&sibling, &grandchild, &child, &root] {
        let r = s
            .reserve_budget(reserver(t, T0), within(3, u64::MAX, ask))
            .await;
        assert!(
            matches!(r, Err(StoreError::BudgetExhausted("requests"))),
            "{}",
            t.workload
        );
    }
    // Settling moves the use up the same chain.
    s.settle_budget(vec![BudgetSettle {
        id: r.id,
        used: Some(use_of(1, 0, 0, 0)),
        now: T0,
    }])
    .await
    .unwrap();
    let (used, reserved) = s.budget_of(&root.id).await.unwrap();
    assert_eq!((used.requests, reserved.requests), (1, 2));
    assert_eq!(
        s.budget_of(&child.id).await.unwrap(),
        (use_of(1, 0, 0, 0), Usage::default())
    );
    assert_eq!(s.budget_of(&sibling.id).await.unwrap().1.requests, 2);
}

pub async fn stale_reservations_are_charged_in_full_and_use_is_audited_once(s: Arc<dyn Store>) {
    let t = start(&*s, task("agent", "gpt", None, T0, 600)).await;
    let ask = use_of(1, 10, 100, 1_000);
    let fits = || within(10, u64::MAX, ask);
    let a = s.reserve_budget(reserver(&t, T0), fits()).await.unwrap();
    let b = s.reserve_budget(reserver(&t, T0), fits()).await.unwrap();
    let c = s
        .reserve_budget(reserver(&t, T0.plus_secs(10)), fits())
        .await
        .unwrap();
    s.settle_budget(vec![BudgetSettle {
        id: a.id.clone(),
        used: Some(use_of(1, 3, 4, 5)),
        now: T0.plus_secs(1),
    }])
    .await
    .unwrap();
    // Open before T0 + 5 s: only b (a is settled, c is younger).
    let swept = s
        .settle_stale_reservations(T0.plus_secs(5), T0.plus_secs(20), 100)
        .await
        .unwrap();
    assert_eq!(swept, 1);
    assert_eq!(
        s.settle_stale_reservations(T0.plus_secs(5), T0.plus_secs(20), 100)
            .await
            .unwrap(),
        0
    );
    // A late settle of the swept one is a no-op: it stays charged in full.
    s.settle_budget(vec![BudgetSettle {
        id: b.id.clone(),
        used: Some(use_of(1, 0, 0, 0)),
        now: T0.plus_secs(21),
    }])
    .await
    .unwrap();
    let (used, reserved) = s.budget_of(&t.id).await.unwrap();
    assert_eq!(used, use_of(2, 13, 104, 1_005));
    assert_eq!(reserved, ask);

    let before = assert_chain_valid(&*s).await;
    let event = || -> crate::SummaryFn {
        Box::new(|u: &crate::UsageSummary| {
            AuditDraft::new(T0.plus_secs(30), "proxy.usage", "system")
                .task(&u.task)
                .lease(&u.lease)
                .workload(&u.workload)
                .role(&u.role)
                .fingerprint(&u.fingerprint)
                .data("upstream", u.upstream.as_str())
                .data("requests", u.used.requests)
                .data("input_tokens", u.used.input)
                .data("output_tokens", u.used.output)
                .data("spend_nusd", u.used.spend_nusd)
                .data("unmetered", u.unmetered)
                .data("since", u.since.rfc3339())
        })
    };
    assert_eq!(s.summarise_usage(1000, event()).await.unwrap(), 1);
    assert_eq!(assert_chain_valid(&*s).await, before + 1);
    let ev = s.audit_tail(1).await.unwrap().remove(0);
    assert_eq!(ev.kind, "proxy.usage");
    assert_eq!(
        ev.lease.as_deref(),
        Some(format!("lse_for_{}", t.id).as_str())
    );
    assert_eq!(ev.data["requests"], 2);
    assert_eq!(ev.data["input_tokens"], 13);
    assert_eq!(ev.data["output_tokens"], 104);
    assert_eq!(ev.data["spend_nusd"], 1_005);
    assert_eq!(ev.data["unmetered"], 1);
    assert_eq!(ev.data["since"], T0.rfc3339());
    // Each use is audited once; the open one waits for its settle.
    assert_eq!(s.summarise_usage(1000, event()).await.unwrap(), 0);
    s.settle_budget(vec![BudgetSettle {
        id: c.id,
        used: Some(use_of(1, 1, 1, 1)),
        now: T0.plus_secs(31),
    }])
    .await
    .unwrap();
    assert_eq!(s.summarise_usage(1000, event()).await.unwrap(), 1);
    assert_eq!(s.audit_tail(1).await.unwrap()[0].data["requests"], 1);
    assert_eq!(assert_chain_valid(&*s).await, before + 2);
    // The counters outlive the summaries.
    assert_eq!(s.budget_of(&t.id).await.unwrap().0.requests, 3);
}

/// A chunk (one reservation holding budget for several requests) is
/// settled in parts: each part moves what finished requests held from
/// `reserved` to `used` on the whole chain and is audited under the chunk's
/// lease; a release gives budget back; closing gives back the rest; a
/// chunk swept (charged in full, every request it held unmetered) ignores
/// later parts (docs/design/0030-chunked-budgets.md).
/// Counters that would pass `i64::MAX` saturate there: reservations of a
/// quantity nothing limits (`max_tokens` near `u64::MAX`) held together
/// leave the budget counting. Until session 28 both backends refused the
/// second reservation while the first was held (SQLite: `cannot store
/// REAL value in INTEGER column`; PostgreSQL: `bigint out of range`).
pub async fn budget_counters_saturate_instead_of_overflowing(s: Arc<dyn Store>) {
    let root = start(&*s, task("planner", "gpt", None, T0, 600)).await;
    let t = start(&*s, task("coder", "gpt", Some(&root), T0, 600)).await;
    let huge = use_of(1, 10, u64::MAX, u64::MAX);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            s.reserve_budget(reserver(&t, T0), within(5, u64::MAX, huge))
                .await
                .unwrap(),
        );
    }
    let max = i64::MAX.unsigned_abs();
    for id in [&t.id, &root.id] {
        let (used, reserved) = s.budget_of(id).await.unwrap();
        assert_eq!(used, Usage::default());
        assert_eq!(reserved, use_of(3, 30, max, max));
    }
    let settles = held
        .iter()
        .map(|r| BudgetSettle {
            id: r.id.clone(),
            used: Some(use_of(1, 2, 6, u64::MAX)),
            now: T0.plus_secs(1),
        })
        .collect();
    s.settle_budget(settles).await.unwrap();
    for id in [&t.id, &root.id] {
        let (used, reserved) = s.budget_of(id).await.unwrap();
        assert_eq!(used, use_of(3, 6, 18, max));
        assert_eq!((reserved.requests, reserved.input), (0, 0));
    }
    // The budget still counts: two more requests of five.
    let small = use_of(1, 10, 100, 1_000);
    for _ in 0..2 {
        s.reserve_budget(reserver(&root, T0), within(5, u64::MAX, small))
            .await
            .unwrap();
    }
    let r = s
        .reserve_budget(reserver(&t, T0), within(5, u64::MAX, small))
        .await;
    assert!(
        matches!(r, Err(StoreError::BudgetExhausted("requests"))),
        "{r:?}"
    );
}

pub async fn chunks_settle_in_parts_and_a_swept_chunk_stays_charged(s: Arc<dyn Store>) {
    let root = start(&*s, task("planner", "gpt", None, T0, 600)).await;
    let t = start(&*s, task("coder", "gpt", Some(&root), T0, 600)).await;
    let one = use_of(1, 10, 100, 1_000);
    let chunk = use_of(8, 80, 800, 8_000);
    let c = s
        .reserve_budget(reserver(&t, T0), within(10, u64::MAX, chunk))
        .await
        .unwrap();
    assert_eq!(c.chain, vec![t.id.clone(), root.id.clone()]);
    // Only 2 requests are left in the tree while the chunk is held.
    let r = s
        .reserve_budget(reserver(&root, T0), within(10, u64::MAX, chunk))
        .await;
    assert!(matches!(r, Err(StoreError::BudgetExhausted("requests"))));
    let part = |held: Usage, used: Usage, unmetered: u64, release: Usage, close: bool| {
        crate::ChunkSettle {
            id: c.id.clone(),
            held,
            used,
            unmetered,
            release,
            close,
            now: T0.plus_secs(1),
        }
    };
    // Three requests finished (one without usage, charged its share), and
    // one request's share is given back.
    let used3 = use_of(3, 4 + 4 + 10, 6 + 6 + 100, 60 + 60 + 1_000);
    assert_eq!(
        s.settle_chunks(vec![part(use_of(3, 30, 300, 3_000), used3, 1, one, false)])
            .await
            .unwrap(),
        1
    );
    for id in [&t.id, &root.id] {
        assert_eq!(
            s.budget_of(id).await.unwrap(),
            (used3, use_of(4, 40, 400, 4_000))
        );
    }
    // An unknown chunk is left alone.
    let mut unknown = part(one, one, 0, Usage::default(), true);
    unknown.id = "rsv_unknown".into();
    assert_eq!(s.settle_chunks(vec![unknown]).await.unwrap(), 0);
    // The part is audited under the chunk's lease, with its unmetered one.
    let before = assert_chain_valid(&*s).await;
    let event = || -> crate::SummaryFn {
        Box::new(|u: &crate::UsageSummary| {
            AuditDraft::new(T0.plus_secs(30), "proxy.usage", "system")
                .task(&u.task)
                .lease(&u.lease)
                .data("requests", u.used.requests)
                .data("output_tokens", u.used.output)
                .data("unmetered", u.unmetered)
        })
    };
    assert_eq!(s.summarise_usage(1000, event()).await.unwrap(), 1);
    let ev = s.audit_tail(1).await.unwrap().remove(0);
    assert_eq!(
        ev.lease.as_deref(),
        Some(format!("lse_for_{}", t.id).as_str())
    );
    assert_eq!(ev.task.as_deref(), Some(t.id.as_str()));
    assert_eq!(
        (
            &ev.data["requests"],
            &ev.data["output_tokens"],
            &ev.data["unmetered"]
        ),
        (&3.into(), &112.into(), &1.into())
    );
    assert_eq!(assert_chain_valid(&*s).await, before + 1);
    // Held parts never take more than the chunk still holds (4 requests).
    s.settle_chunks(vec![part(
        use_of(1, 10, 100, 1_000),
        use_of(1, 1, 1, 1),
        0,
        Usage::default(),
        false,
    )])
    .await
    .unwrap();
    // A crash: the sweep charges the 3 requests still held in full, as
    // unmetered, to the chunk's lease; a late part changes nothing.
    let swept = s
        .settle_stale_reservations(T0.plus_secs(5), T0.plus_secs(20), 100)
        .await
        .unwrap();
    assert_eq!(swept, 1);
    s.settle_chunks(vec![part(one, Usage::default(), 0, chunk, true)])
        .await
        .unwrap();
    let after = used3
        .plus(use_of(1, 1, 1, 1))
        .plus(use_of(3, 30, 300, 3_000));
    for id in [&t.id, &root.id] {
        assert_eq!(s.budget_of(id).await.unwrap(), (after, Usage::default()));
    }
    assert_eq!(s.summarise_usage(1000, event()).await.unwrap(), 1);
    let ev = s.audit_tail(1).await.unwrap().remove(0);
    assert_eq!(
        (&ev.data["requests"], &ev.data["unmetered"]),
        (&4.into(), &3.into())
    );
    // Closing gives back what a chunk still holds, and ends it: nothing is
    // left to sweep, and the budget has its room again.
    let c2 = s
        .reserve_budget(reserver(&t, T0), within(10, u64::MAX, use_of(2, 0, 0, 0)))
        .await
        .unwrap();
    s.settle_chunks(vec![crate::ChunkSettle {
        id: c2.id.clone(),
        held: Usage::default(),
        used: Usage::default(),
        unmetered: 0,
        release: Usage::default(),
        close: true,
        now: T0.plus_secs(2),
    }])
    .await
    .unwrap();
    assert_eq!(
        s.budget_of(&root.id).await.unwrap(),
        (after, Usage::default())
    );
    assert_eq!(
        s.settle_stale_reservations(T0.plus_secs(50), T0.plus_secs(50), 100)
            .await
            .unwrap(),
        0
    );
    // Nothing used, nothing to audit.
    assert_eq!(s.summarise_usage(1000, event()).await.unwrap(), 0);
}

/// Ending a task moves at most [`crate::END_TASK_LEASES`] leases in its
/// transaction and says there are more; `revoke_ended_leases` takes the
/// rest batch by batch (of that task, or of any ended task after a crash),
/// and never a live task's leases.
pub async fn ending_a_task_moves_leases_in_bounded_batches(s: Arc<dyn Store>) {
    let big = start(&*s, task("a", "r", None, T0, 600)).await;
    let total = crate::END_TASK_LEASES as usize + 7;
    // Concurrent inserts share commits.
    let mut inserts = tokio::task::JoinSet::new();
    for i in 0..total {
        let (s, big) = (Arc::clone(&s), big.clone());
        inserts.spawn(async move {
            let now = T0.plus_millis(i64::try_from(i).unwrap());
            issue(&*s, &big, LeaseState::Active, now, 60).await
        });
    }
    while inserts.join_next().await.is_some() {}
    let live = start(&*s, task("b", "r", None, T0, 600)).await;
    let live_lease = issue(&*s, &live, LeaseState::Active, T0, 60).await;
    let ended = end(&*s, &big.id, TaskStatus::Completed, T0.plus_secs(1)).await;
    assert_eq!(ended.leases.len(), crate::END_TASK_LEASES as usize);
    assert!(ended.more, "the batch was full");
    let still_active = s
        .list_leases(&LeaseFilter {
            task: Some(big.id.clone()),
            state: Some(LeaseState::Active),
            limit: 10_000,
            ..LeaseFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(still_active.len(), 7);
    // Any ended task's leftovers (what a crash between batches leaves).
    let some = s
        .revoke_ended_leases(None, T0.plus_secs(2), "system", 4)
        .await
        .unwrap();
    assert_eq!(some.len(), 4);
    assert!(some.iter().all(|l| l.state == LeaseState::Revoking
        && l.end_reason == Some(EndReason::TaskEnded)
        && l.task == big.id));
    let rest = s
        .revoke_ended_leases(Some(&big.id), T0.plus_secs(2), "system", 1000)
        .await
        .unwrap();
    assert_eq!(rest.len(), 3);
    assert!(
        s.revoke_ended_leases(None, T0.plus_secs(2), "system", 1000)
            .await
            .unwrap()
            .is_empty()
    );
    // A live task's leases are never taken.
    assert!(
        s.revoke_ended_leases(Some(&live.id), T0.plus_secs(2), "system", 1000)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.get_lease(&live_lease.id).await.unwrap().unwrap().state,
        LeaseState::Active
    );
    assert_eq!(
        s.get_lease(&ended.leases[0].id)
            .await
            .unwrap()
            .unwrap()
            .state,
        LeaseState::Revoking
    );
    assert_chain_valid(&*s).await;
}

/// A revoked expire-only lease (an SSH certificate in its CA's KRL) keeps
/// its task from retention until it expires; lists page with `before` and
/// filter by `expires_after`.
pub async fn retention_keeps_unexpired_certificates_and_lists_page(s: Arc<dyn Store>) {
    let t = start(&*s, task("a", "r", None, T0, 100_000)).await;
    let mut cert = lease(&t, LeaseState::Active, T0, 10_000);
    cert.revocability = Revocability::ExpireOnly;
    cert.engine = keymint_core::model::EngineKind::Ssh;
    let cert_id = cert.id.clone();
    let ev = AuditDraft::new(T0, "lease.issued", "admin").lease(&cert.id);
    s.insert_lease(&t.id, Box::new(move |_| Ok((cert, ev))))
        .await
        .unwrap();
    let ended = end(&*s, &t.id, TaskStatus::Completed, T0.plus_secs(1)).await;
    s.finish_revocations(
        vec![RevocationDone {
            lease: ended.leases[0].id.clone(),
            audit: AuditDraft::new(T0, "lease.revoked", "system"),
        }],
        T0.plus_secs(1),
    )
    .await
    .unwrap();
    // By engine, whatever the role: the certificate's lease is listed as
    // ssh, and none as jwt.
    let by_engine = |engine| LeaseFilter {
        engine: Some(engine),
        state: Some(LeaseState::Revoked),
        limit: 10,
        ..LeaseFilter::default()
    };
    let ssh = s
        .list_leases(&by_engine(keymint_core::model::EngineKind::Ssh))
        .await
        .unwrap();
    assert_eq!(ssh.len(), 1);
    assert_eq!(ssh[0].id, cert_id);
    let jwt = s
        .list_leases(&by_engine(keymint_core::model::EngineKind::Jwt))
        .await
        .unwrap();
    assert!(jwt.is_empty());
    // Past the retention cutoff, but the certificate is valid until T0+10000 s.
    let cutoff = T0.plus_secs(100);
    let pruned = s.prune_ended(cutoff, T0.plus_secs(200), 100).await.unwrap();
    assert_eq!(pruned, crate::Pruned::default());
    assert!(s.get_lease(&cert_id).await.unwrap().is_some());
    let pruned = s
        .prune_ended(cutoff, T0.plus_secs(10_000), 100)
        .await
        .unwrap();
    assert_eq!(pruned.leases, 1, "pruned once the certificate expired");

    // Paging: newest first, `before` the last id of the previous page.
    let p = start(&*s, task("b", "r", None, T0, 600)).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            issue(
                &*s,
                &p,
                LeaseState::Active,
                T0.plus_millis(i),
                60 + i as u64,
            )
            .await
            .id,
        );
    }
    let page = |before: Option<String>, expires_after: Option<Timestamp>| LeaseFilter {
        task: Some(p.id.clone()),
        before,
        expires_after,
        limit: 2,
        ..LeaseFilter::default()
    };
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let got = s.list_leases(&page(before.take(), None)).await.unwrap();
        seen.extend(got.iter().map(|l| l.id.clone()));
        match got.last() {
            Some(l) if got.len() == 2 => before = Some(l.id.clone()),
            _ => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.sort();
    newest_first.reverse();
    assert_eq!(seen, newest_first);
    // Expiring after T0+62.5 s: the leases with TTL 63 and 64 s.
    let late = s
        .list_leases(&LeaseFilter {
            limit: 10,
            ..page(None, Some(T0.plus_millis(62_500)))
        })
        .await
        .unwrap();
    assert_eq!(late.len(), 2);
}

/// The background duties' lease (docs/design/0022): a lone store holds it
/// and keeps its epoch on renewal, its duty writes go through, nothing of a
/// live process is taken over, and SSH serials (where the store makes
/// them) never repeat.
pub async fn the_duty_lease_is_held_and_its_holder_writes(s: Arc<dyn Store>) {
    let epoch = s.hold_duties(3_000).await.unwrap();
    assert!(epoch.is_some(), "a lone process holds the duties");
    assert_eq!(
        s.hold_duties(3_000).await.unwrap(),
        epoch,
        "renewal keeps the epoch"
    );

    let t = start(&*s, task("agent", "r", None, T0, 600)).await;
    let l = issue(&*s, &t, LeaseState::Active, T0, 60).await;
    let now = T0.plus_secs(61);
    let expired = s.expire_due(now, 10).await.unwrap();
    assert_eq!(expired.len(), 1, "the holder's sweep goes through");
    assert_eq!(expired[0].id, l.id);
    // Its own claim is not a dead replica's.
    assert_eq!(s.take_over_dead_claims(now).await.unwrap(), 0);
    assert!(s.due_revocations(now, 10).await.unwrap().is_empty());

    if let Some(a) = s.next_ssh_serial().await.unwrap() {
        let b = s.next_ssh_serial().await.unwrap().unwrap();
        assert!(b > a, "serials only grow");
        assert!(a >= 1 << 62, "above the old per-process serials");
    } else {
        assert!(!s.shared(), "a shared store makes SSH serials");
    }

    s.release_duties().await.unwrap();
    let again = s.hold_duties(3_000).await.unwrap();
    assert!(
        again.is_some() && again >= epoch,
        "taken back after a release"
    );
}

/// What a backend's `optional` constructor gives the suite: a store, or a
/// store with a guard that cleans up after the check (a PostgreSQL schema
/// of its own, [`crate::pg_test::TestSchema`]).
pub trait Fresh {
    type Guard;
    fn split(self) -> (Arc<dyn Store>, Self::Guard);
}

impl Fresh for Arc<dyn Store> {
    type Guard = ();
    fn split(self) -> (Arc<dyn Store>, ()) {
        (self, ())
    }
}

impl<G> Fresh for (Arc<dyn Store>, G) {
    type Guard = G;
    fn split(self) -> (Arc<dyn Store>, G) {
        self
    }
}

/// Stamps out one test per conformance check. `$make` is an async
/// expression returning `Arc<dyn Store>` for a fresh, empty store; with
/// `optional`, it returns `Option<Arc<dyn Store>>` (or `Option<(Arc<dyn
/// Store>, guard)>`, the guard kept to the end of the check) and `None`
/// skips the check (a server that is not there outside CI).
#[macro_export]
macro_rules! conformance_tests {
    (optional $make:expr) => {
        $crate::conformance_tests!(@all optional $make);
    };
    ($make:expr) => {
        $crate::conformance_tests!(@all each $make);
    };
    // The one list of checks: every backend runs all of them.
    (@all $kind:ident $make:expr) => {
        $crate::conformance_tests!(@$kind $make;
            tasks_round_trip_and_filter,
            the_task_read_before_a_grant_follows_every_change,
            lists_page_with_a_cursor,
            a_refused_grant_writes_nothing,
            sub_task_grant_sees_the_parent,
            leases_are_found_by_fingerprint,
            ending_a_task_ends_its_tree_and_marks_leases,
            ending_a_task_moves_leases_in_bounded_batches,
            revocation_is_retried_until_it_is_finished,
            bulk_revocation_selects_by_workload_role_and_task,
            revoking_a_lease_revokes_the_tokens_exchanged_from_it,
            expiry_and_timeouts_are_found_by_index,
            renewal_moves_expiry_inside_the_transaction,
            stale_pending_leases_are_listed,
            a_minted_lease_takes_the_providers_fingerprint,
            the_audit_chain_is_gapless_under_concurrency,
            secrets_and_cursors_persist,
            approvals_move_once_and_expire,
            ending_a_task_closes_its_open_approvals,
            entries_are_kept_per_node,
            retention_prunes_only_what_is_over,
            retention_keeps_unexpired_certificates_and_lists_page,
            budgets_reserve_atomically_and_settle_once,
            sub_task_reservations_count_against_every_ancestor,
            stale_reservations_are_charged_in_full_and_use_is_audited_once,
            chunks_settle_in_parts_and_a_swept_chunk_stays_charged,
            budget_counters_saturate_instead_of_overflowing,
            the_duty_lease_is_held_and_its_holder_writes,
            single_use_claims_hold_once_until_they_end,
            inventory_writes_only_over_the_version_read,
            monitoring_adds_hours_and_suspends_once,
            rate_buckets_are_shared_and_never_overdrawn
        );
    };
    (@optional $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(made) = $make else { return };
                // A guard that comes with the store (a throw-away schema)
                // lives to the end of the check, also when it fails.
                let (store, _guard) = $crate::conformance::Fresh::split(made);
                $crate::conformance::$name(store).await;
            }
        )*
    };
    (@each $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let store = $make;
                $crate::conformance::$name(store).await;
            }
        )*
    };
}
