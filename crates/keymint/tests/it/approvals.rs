//! Human in the loop: a held request waits as a pending approval; only an
//! authorised operator who is not the requester decides it; only the
//! requester redeems it, once, for exactly what it asked; pending requests
//! expire; a webhook announces each one, retried until delivered.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keymint_client::{Client, ClientError};
use keymint_core::ManualClock;
use keymint_core::model::{Approval, ApprovalStatus};
use keymint_proto::{
    AuditEvent, EndStatus, EndTask, IssueLease, IssuedLease, List, StartTask, Task,
};
use keymint_testkit::TestServer;

const POLICY: &str = r#"
@id("work")
permit(principal, action in [Keymint::Action::"start_task", Keymint::Action::"issue"], resource);

@id("embeddings-need-a-human")
@approval("required")
permit(principal, action == Keymint::Action::"issue", resource)
when { context.scopes.contains("llm:embeddings") && !context.scopes.contains("llm:chat") };

// alice approves anything; bob only in the role `other`.
@id("alice-approves")
permit(principal == Keymint::Operator::"alice", action == Keymint::Action::"approve", resource);
@id("bob-approves-other")
permit(principal == Keymint::Operator::"bob", action == Keymint::Action::"approve", resource == Keymint::Role::"other");
"#;

fn operators_toml(dir: &std::path::Path) -> String {
    format!(
        "[approvals]\nttl = \"10m\"\n\
         [[operators]]\nname = \"alice\"\ntoken_file = {:?}\n\
         [[operators]]\nname = \"bob\"\ntoken_file = {:?}\n",
        dir.join("alice.token").display().to_string(),
        dir.join("bob.token").display().to_string(),
    )
}

fn token(dir: &std::path::Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.token")))
        .unwrap()
        .trim()
        .to_owned()
}

async fn held_issue(c: &Client, task: &str) -> String {
    let e = c
        .post::<_, IssuedLease>(
            &format!("/v1/tasks/{task}/leases"),
            &IssueLease {
                scopes: Some(vec!["llm:embeddings".into()]),
                ttl_secs: Some(120),
                ..IssueLease::default()
            },
        )
        .await
        .unwrap_err();
    match e {
        ClientError::Held { approval, .. } => approval,
        other => panic!("expected a held request, got {other}"),
    }
}

/// A chat-only token: not held.
async fn issue_chat(c: &Client, task: &str) -> (IssuedLease, String) {
    let l: IssuedLease = c
        .post(
            &format!("/v1/tasks/{task}/leases"),
            &IssueLease {
                scopes: Some(vec!["llm:chat".into()]),
                ttl_secs: None,
                ..IssueLease::default()
            },
        )
        .await
        .unwrap();
    let t = l.credential.secret().expose().to_owned();
    (l, t)
}

async fn start(c: &Client, workload: &str) -> Task {
    c.post(
        "/v1/tasks",
        &StartTask {
            workload: Some(workload.into()),
            role: Some("demo".into()),
            ttl_secs: Some(600),
            scopes: Some(vec!["llm:chat".into(), "llm:embeddings".into()]),
            ..StartTask::default()
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn an_approved_request_is_redeemed_once_by_its_requester_for_exactly_what_it_asked() {
    let ops = tempfile::tempdir().unwrap();
    let s = TestServer::builder()
        .policy(POLICY)
        .config_toml(&operators_toml(ops.path()))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let alice = s.client(&token(ops.path(), "alice"));
    let bob = s.client(&token(ops.path(), "bob"));

    // The planner's own token asks; the request is held (202, Location).
    let task = start(&admin, "planner").await;
    // Both scopes at once are not held (see the policy); embeddings alone are.
    let (_, ptok) = crate::issue(&admin, &task.id).await;
    let planner = s.client(&ptok);
    let raw = planner
        .raw(
            http::Method::POST,
            &format!("/v1/tasks/{}/leases", task.id),
            Some("application/json"),
            br#"{"scopes":["llm:embeddings"],"ttl_secs":120}"#.to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(raw.status, 202);
    let pending: Approval = raw.json().unwrap();
    assert_eq!(pending.status, ApprovalStatus::Pending);
    assert_eq!(pending.policies, ["embeddings-need-a-human", "work"]);
    assert_eq!(
        raw.headers["location"].to_str().unwrap(),
        format!("/v1/approvals/{}", pending.id)
    );
    let id = pending.id.clone();

    // The requester sees its approval; another task's token does not.
    let mine: Approval = planner.get(&format!("/v1/approvals/{id}")).await.unwrap();
    assert_eq!(mine.id, id);
    let other_task = start(&admin, "other-agent").await;
    let (_, otok) = issue_chat(&admin, &other_task.id).await;
    let stranger = s.client(&otok);
    let e = stranger
        .get::<Approval>(&format!("/v1/approvals/{id}"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("not_found"));

    // Not approved yet: nothing to redeem.
    let e = planner
        .post_empty::<serde_json::Value>(&format!("/v1/approvals/{id}/redeem"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("forbidden"));

    // Neither the admin, nor a task token, nor an operator policy does not
    // authorise for this role may approve.
    for (who, c) in [("admin", &admin), ("task token", &planner)] {
        let e = c
            .post::<_, Approval>(
                &format!("/v1/approvals/{id}/approve"),
                &serde_json::json!({}),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("forbidden"), "{who}");
    }
    let e = bob
        .post::<_, Approval>(
            &format!("/v1/approvals/{id}/approve"),
            &serde_json::json!({}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("policy_denied"), "{e}");

    // alice approves, with a note.
    let ok: Approval = alice
        .post(
            &format!("/v1/approvals/{id}/approve"),
            &serde_json::json!({"note": "needed for the nightly index"}),
        )
        .await
        .unwrap();
    assert_eq!(ok.status, ApprovalStatus::Approved);
    assert_eq!(ok.decided_by.as_deref(), Some("alice"));
    // Approving twice changes nothing.
    assert!(
        alice
            .post::<_, Approval>(
                &format!("/v1/approvals/{id}/approve"),
                &serde_json::json!({})
            )
            .await
            .is_err()
    );

    // Only the token that asked may redeem, and only once.
    let e = admin
        .post_empty::<serde_json::Value>(&format!("/v1/approvals/{id}/redeem"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("forbidden"));
    let got: IssuedLease = planner
        .post_empty(&format!("/v1/approvals/{id}/redeem"))
        .await
        .unwrap();
    assert_eq!(
        got.lease.scopes,
        ["llm:embeddings"],
        "exactly what was asked"
    );
    assert!(got.lease.expires_at.millis() - got.lease.created_at.millis() <= 120_000);
    assert!(
        crate::introspect(&admin, got.credential.secret().expose())
            .await
            .active
    );
    let e = planner
        .post_empty::<serde_json::Value>(&format!("/v1/approvals/{id}/redeem"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("used"), "{e}");
    let replays: List<AuditEvent> = admin.get("/v1/audit?limit=500").await.unwrap();
    assert!(
        replays
            .items
            .iter()
            .any(|e| e.kind == "approval.redeem_refused"
                && e.reason.as_deref().is_some_and(|r| r.contains("used"))),
        "the replay is audited"
    );

    // The trail: requested, approved (with the note), redeemed, issued.
    let ev: List<AuditEvent> = admin.get("/v1/audit?limit=500").await.unwrap();
    let kinds: Vec<&str> = ev
        .items
        .iter()
        .filter(|e| e.data.get("approval").is_some_and(|a| a == id.as_str()))
        .map(|e| e.kind.as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "approval.requested",
            "approval.approved",
            "approval.redeemed"
        ]
    );
    let approved = ev
        .items
        .iter()
        .find(|e| e.kind == "approval.approved")
        .unwrap();
    assert_eq!(approved.actor, "operator:alice");
    assert_eq!(approved.data["note"], "needed for the nightly index");
    assert!(
        ev.items
            .iter()
            .any(|e| e.kind == "approval.refused" && e.actor == "operator:bob"),
        "bob's refusal is audited"
    );
}

#[tokio::test]
async fn an_operator_cannot_decide_their_own_request_and_a_denial_is_final() {
    let ops = tempfile::tempdir().unwrap();
    let s = TestServer::builder()
        .policy(POLICY)
        .config_toml(&operators_toml(ops.path()))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let alice = s.client(&token(ops.path(), "alice"));

    // alice's own agent runs as workload `alice`: she may not approve it.
    let task = start(&admin, "alice").await;
    let id = held_issue(&admin, &task.id).await;
    let e = alice
        .post::<_, Approval>(
            &format!("/v1/approvals/{id}/approve"),
            &serde_json::json!({}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("forbidden"));
    assert!(e.to_string().contains("own"), "{e}");

    // An operator token is for approvals only.
    let e = alice
        .post::<_, Task>(
            "/v1/tasks",
            &StartTask {
                workload: Some("x".into()),
                role: Some("demo".into()),
                ..StartTask::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("forbidden"));
    assert!(alice.get::<List<Task>>("/v1/tasks").await.is_err());

    // Denied: final; redeeming fails.
    let task = start(&admin, "worker").await;
    let id = held_issue(&admin, &task.id).await;
    let d: Approval = alice
        .post(
            &format!("/v1/approvals/{id}/deny"),
            &serde_json::json!({"note": "not today"}),
        )
        .await
        .unwrap();
    assert_eq!(d.status, ApprovalStatus::Denied);
    let e = admin
        .post_empty::<serde_json::Value>(&format!("/v1/approvals/{id}/redeem"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("denied"), "{e}");

    // Bad input: unknown fields, control characters, unknown ids.
    let r = alice
        .raw(
            http::Method::POST,
            &format!("/v1/approvals/{id}/approve"),
            Some("application/json"),
            br#"{"note":"x","force":true}"#.to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let task = start(&admin, "worker2").await;
    let id2 = held_issue(&admin, &task.id).await;
    let e = alice
        .post::<_, Approval>(
            &format!("/v1/approvals/{id2}/approve"),
            &serde_json::json!({"note": "line\nforged"}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("invalid_request"));
    let still: Approval = admin.get(&format!("/v1/approvals/{id2}")).await.unwrap();
    assert_eq!(still.status, ApprovalStatus::Pending);
    for bad in ["apr_nope", "../../etc/passwd", "tsk_0000"] {
        let r = alice
            .raw(
                http::Method::POST,
                &format!("/v1/approvals/{}/approve", keymint_client::encode(bad)),
                Some("application/json"),
                b"{}".to_vec(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 404, "{bad}");
    }
}

/// alice's agent (workload `alice`) hands work to a sub-agent and asks,
/// with its own token or the sub-agent's, for a held scope on the
/// sub-task: the request is alice's own all the same, so operator alice
/// may not decide it. Only the sub-task's workload was compared, so she
/// could approve what her own agent asked for.
#[tokio::test]
async fn an_operator_cannot_decide_a_request_their_own_agent_made_through_a_sub_task() {
    let ops = tempfile::tempdir().unwrap();
    let s = TestServer::builder()
        .policy(&format!(
            "{POLICY}\n@id(\"delegate\")\npermit(principal, action == Keymint::Action::\"delegate\", resource);\n"
        ))
        .config_toml(&operators_toml(ops.path()))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let alice = s.client(&token(ops.path(), "alice"));

    let task = start(&admin, "alice").await;
    // Both scopes at once are not held; the tokens may ask for either.
    let (_, atok) = crate::issue(&admin, &task.id).await;
    let own_agent = s.client(&atok);
    let sub: Task = own_agent
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some("helper-bot".into()),
                parent: Some(task.id.clone()),
                ttl_secs: Some(300),
                scopes: Some(vec!["llm:chat".into(), "llm:embeddings".into()]),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(sub.delegation, ["alice"]);
    let (_, stok) = crate::issue(&own_agent, &sub.id).await;
    let sub_agent = s.client(&stok);
    for (who, asker) in [
        ("alice's own token", &own_agent),
        ("the sub-agent's", &sub_agent),
    ] {
        let id = held_issue(asker, &sub.id).await;
        let e = alice
            .post::<_, Approval>(
                &format!("/v1/approvals/{id}/approve"),
                &serde_json::json!({}),
            )
            .await
            .expect_err(who);
        assert_eq!(e.code(), Some("forbidden"), "{who}: {e}");
        assert!(e.to_string().contains("own"), "{who}: {e}");
        let still: Approval = admin.get(&format!("/v1/approvals/{id}")).await.unwrap();
        assert_eq!(still.status, ApprovalStatus::Pending, "{who}");
    }
}

/// A held request is for its task: when the task ends (completed,
/// failed, revoked), its pending requests are closed at once, audited,
/// and an operator can no longer approve them.
#[tokio::test]
async fn ending_a_task_closes_its_pending_requests_and_they_cannot_be_approved() {
    let ops = tempfile::tempdir().unwrap();
    let s = TestServer::builder()
        .policy(POLICY)
        .config_toml(&operators_toml(ops.path()))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let alice = s.client(&token(ops.path(), "alice"));
    for how in ["completed", "failed", "revoked"] {
        let task = start(&admin, "worker").await;
        let id = held_issue(&admin, &task.id).await;
        let ended: Task = match how {
            "revoked" => admin
                .post(
                    &format!("/v1/tasks/{}/revoke", task.id),
                    &serde_json::json!({}),
                )
                .await
                .unwrap(),
            _ => admin
                .post(
                    &format!("/v1/tasks/{}/end", task.id),
                    &EndTask {
                        status: if how == "failed" {
                            EndStatus::Failed
                        } else {
                            EndStatus::Completed
                        },
                        reason: None,
                    },
                )
                .await
                .unwrap(),
        };
        assert_eq!(ended.status.as_str(), how);
        let closed: Approval = admin.get(&format!("/v1/approvals/{id}")).await.unwrap();
        assert_eq!(closed.status, ApprovalStatus::Cancelled, "{how}");
        let e = alice
            .post::<_, Approval>(
                &format!("/v1/approvals/{id}/approve"),
                &serde_json::json!({}),
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("ended"), "{how}: {e}");
        let after: Approval = admin.get(&format!("/v1/approvals/{id}")).await.unwrap();
        assert_eq!(after, closed, "{how}");
        let e = admin
            .post_empty::<serde_json::Value>(&format!("/v1/approvals/{id}/redeem"))
            .await
            .unwrap_err();
        assert!(e.status().is_some_and(|s| s >= 400), "{how}: {e}");
        let ev: List<AuditEvent> = admin.get("/v1/audit?limit=500").await.unwrap();
        let cancelled: Vec<_> = ev
            .items
            .iter()
            .filter(|e| {
                e.kind == "approval.cancelled"
                    && e.data.get("approval").and_then(|v| v.as_str()) == Some(id.as_str())
            })
            .collect();
        assert_eq!(cancelled.len(), 1, "{how}");
        assert_eq!(cancelled[0].task.as_deref(), Some(task.id.as_str()));
        assert!(!ev.items.iter().any(|e| e.kind == "approval.approved"));
    }
}

/// An approved request that was not redeemed when its task ended is
/// closed with the task too (`cancelled`, audited with `was: approved`),
/// not left `approved` for a redemption that can no longer be carried
/// out; listed under its own status, and a redemption says so.
#[tokio::test]
async fn ending_a_task_cancels_its_approved_but_unredeemed_requests() {
    let ops = tempfile::tempdir().unwrap();
    let s = TestServer::builder()
        .policy(POLICY)
        .config_toml(&operators_toml(ops.path()))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let alice = s.client(&token(ops.path(), "alice"));
    let task = start(&admin, "worker").await;
    let id = held_issue(&admin, &task.id).await;
    let approved: Approval = alice
        .post(
            &format!("/v1/approvals/{id}/approve"),
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    assert_eq!(approved.status, ApprovalStatus::Approved);
    let _: Task = admin
        .post(
            &format!("/v1/tasks/{}/end", task.id),
            &EndTask {
                status: EndStatus::Completed,
                reason: None,
            },
        )
        .await
        .unwrap();
    let closed: Approval = admin.get(&format!("/v1/approvals/{id}")).await.unwrap();
    assert_eq!(
        closed.status,
        ApprovalStatus::Cancelled,
        "an approved request of an ended task still reads as approved"
    );
    assert_eq!(closed.decided_by.as_deref(), Some("alice"));
    assert!(
        closed
            .note
            .as_deref()
            .unwrap_or_default()
            .contains("completed")
    );
    let listed: List<Approval> = admin.get("/v1/approvals?status=cancelled").await.unwrap();
    assert_eq!(
        listed
            .items
            .iter()
            .map(|a| a.id.as_str())
            .collect::<Vec<_>>(),
        vec![id.as_str()]
    );
    let approved_now: List<Approval> = admin.get("/v1/approvals?status=approved").await.unwrap();
    assert!(approved_now.items.is_empty());
    let e = admin
        .post_empty::<serde_json::Value>(&format!("/v1/approvals/{id}/redeem"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cancelled"), "{e}");
    let after: Approval = admin.get(&format!("/v1/approvals/{id}")).await.unwrap();
    assert_eq!(after, closed);
    let ev: List<AuditEvent> = admin.get("/v1/audit?limit=500").await.unwrap();
    let cancelled: Vec<_> = ev
        .items
        .iter()
        .filter(|e| {
            e.kind == "approval.cancelled"
                && e.data.get("approval").and_then(|v| v.as_str()) == Some(id.as_str())
        })
        .collect();
    assert_eq!(cancelled.len(), 1);
    assert_eq!(cancelled[0].data["was"], "approved");
    assert_eq!(cancelled[0].task.as_deref(), Some(task.id.as_str()));
}

#[tokio::test]
async fn a_pending_request_expires_and_cannot_be_approved_after() {
    let ops = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(keymint_core::Timestamp(1_800_000_000_000));
    let s = TestServer::builder()
        .clock(clock.clone())
        .policy(POLICY)
        .config_toml(&operators_toml(ops.path()))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let alice = s.client(&token(ops.path(), "alice"));
    let task = start(&admin, "worker").await;
    let id = held_issue(&admin, &task.id).await;
    clock.advance_secs(601);
    let t0 = Instant::now();
    loop {
        let a: Approval = admin.get(&format!("/v1/approvals/{id}")).await.unwrap();
        if a.status == ApprovalStatus::Expired {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "not expired by the sweeper"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let e = alice
        .post::<_, Approval>(
            &format!("/v1/approvals/{id}/approve"),
            &serde_json::json!({}),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");
    let ev: List<AuditEvent> = admin.get("/v1/audit?limit=100").await.unwrap();
    assert!(ev.items.iter().any(|e| e.kind == "approval.expired"));
}

#[tokio::test]
async fn each_pending_request_is_announced_and_a_failed_announcement_is_retried() {
    // A webhook receiver that fails the first delivery.
    let got: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let app = {
        let got = Arc::clone(&got);
        let calls = Arc::clone(&calls);
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(v): axum::Json<serde_json::Value>| {
                let got = Arc::clone(&got);
                let calls = Arc::clone(&calls);
                async move {
                    if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                        return http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    got.lock().unwrap().push(v);
                    http::StatusCode::NO_CONTENT
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let ops = tempfile::tempdir().unwrap();
    let s = TestServer::builder()
        .policy(POLICY)
        .config_toml(&format!(
            "{}\n",
            operators_toml(ops.path()).replace(
                "ttl = \"10m\"",
                &format!("ttl = \"10m\"\nwebhook = \"{hook}\"")
            )
        ))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let task = start(&admin, "worker").await;
    let (_, tok) = issue_chat(&admin, &task.id).await;
    let id = held_issue(&admin, &task.id).await;
    let t0 = Instant::now();
    while got.lock().unwrap().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(15), "never delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        calls.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "retried"
    );
    let v = got.lock().unwrap()[0].clone();
    assert_eq!(v["approval"], id.as_str());
    assert_eq!(v["workload"], "worker");
    assert_eq!(
        v["policies"],
        serde_json::json!(["embeddings-need-a-human", "work"])
    );
    assert!(v["text"].as_str().unwrap().contains(&id));
    assert!(
        !v.to_string().contains(&tok),
        "no credential in the announcement"
    );
    // Delivered once: no further calls.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(got.lock().unwrap().len(), 1);
}

/// A redemption whose request is not carried out (here its task was
/// suspended after the approval) grants nothing and so changes nothing: the approval
/// stays approved (given back, audited `approval.restored`), not used up
/// by a refusal. Redemptions racing for one approval: exactly one gets
/// the credential, and every other is told the approval is used (they
/// were told it "is approved, not open for this", the state they had read
/// before the winner used it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redemption_that_grants_nothing_leaves_the_approval_approved() {
    let ops = tempfile::tempdir().unwrap();
    let s = TestServer::builder()
        .policy(POLICY)
        .config_toml(&operators_toml(ops.path()))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let alice = s.client(&token(ops.path(), "alice"));
    let approve = |id: String| {
        let alice = alice.clone();
        async move {
            let a: Approval = alice
                .post(
                    &format!("/v1/approvals/{id}/approve"),
                    &serde_json::json!({}),
                )
                .await
                .unwrap();
            assert_eq!(a.status, ApprovalStatus::Approved);
        }
    };

    let task = start(&admin, "worker").await;
    let id = held_issue(&admin, &task.id).await;
    approve(id.clone()).await;
    // Suspended (an ended task now cancels its approvals instead: see
    // `ending_a_task_cancels_its_approved_but_unredeemed_requests`).
    let r = admin
        .raw(
            http::Method::POST,
            "/v1/suspensions",
            Some("application/json"),
            serde_json::to_vec(&serde_json::json!({
                "scope": "task", "subject": task.id, "reason": "a test"
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let r = admin
        .raw(
            http::Method::POST,
            &format!("/v1/approvals/{id}/redeem"),
            None,
            vec![],
        )
        .await
        .unwrap();
    assert!(r.status.as_u16() >= 400, "{}", r.text());
    let a: Approval = admin.get(&format!("/v1/approvals/{id}")).await.unwrap();
    assert_eq!(a.status, ApprovalStatus::Approved, "a refusal used it up");
    let ev: List<AuditEvent> = admin.get("/v1/audit?limit=500").await.unwrap();
    assert!(
        ev.items.iter().any(|e| e.kind == "approval.restored"
            && e.data.get("approval").is_some_and(|a| a == id.as_str())),
        "the give-back is audited"
    );

    // Eight redemptions at once: one credential, seven told it is used.
    let task = start(&admin, "racer").await;
    let id = held_issue(&admin, &task.id).await;
    approve(id.clone()).await;
    let mut all = Vec::new();
    for _ in 0..8 {
        let (admin, id) = (admin.clone(), id.clone());
        all.push(tokio::spawn(async move {
            let r = admin
                .raw(
                    http::Method::POST,
                    &format!("/v1/approvals/{id}/redeem"),
                    None,
                    vec![],
                )
                .await
                .unwrap();
            (r.status.as_u16(), r.text())
        }));
    }
    let mut won = 0;
    for h in all {
        let (st, text) = h.await.unwrap();
        if (200..300).contains(&st) {
            won += 1;
        } else {
            assert_eq!(st, 403, "{text}");
            assert!(text.contains("is used"), "{text}");
        }
    }
    assert_eq!(won, 1);
    let leases: List<keymint_proto::Lease> = admin
        .get(&format!("/v1/leases?task={}", task.id))
        .await
        .unwrap();
    assert_eq!(leases.items.len(), 1);
}

/// Every credential needs a human; alice approves.
const HOLD_ALL: &str = r#"
@id("work")
permit(principal, action == Keymint::Action::"start_task", resource);
@id("every-credential-needs-a-human")
@approval("required")
permit(principal, action == Keymint::Action::"issue", resource);
@id("alice-approves")
permit(principal == Keymint::Operator::"alice", action == Keymint::Action::"approve", resource);
"#;

/// A redemption racing its task's end, in each order: the end first (the
/// approval is cancelled while `approved`, the redemption refused); the
/// redemption first and done (the lease it made is revoked by the end,
/// the approval stays `used`); and the end landing while the redeemed
/// request is at the provider (the approval is `used`, the lease
/// `pending`): the lease is never activated, and the broker closes the
/// approval `used → cancelled` (`cancel_used`) instead of giving it back.
/// Each ends with no live credential in the ended task, exactly one
/// event that put the approval in its final status (and nothing after
/// it), and an audit chain that verifies. The third order is driven by a
/// provider that answers after 3 s: the task is ended once the pending
/// lease is seen, which proves the race happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redemption_raced_by_its_tasks_end_never_leaves_a_live_credential() {
    use keymint_testkit::federation::{
        ANTHROPIC_ORG, ANTHROPIC_RULE, ANTHROPIC_SERVICE_ACCOUNT, FakeFederation,
    };
    const AUD: &str = "https://api.anthropic.com";
    let f = FakeFederation::start(Arc::new(keymint_core::SystemClock))
        .await
        .unwrap();
    let fed = f.url();
    let ops = tempfile::tempdir().unwrap();
    let s = TestServer::builder()
        .policy(HOLD_ALL)
        .config_toml(&operators_toml(ops.path()))
        .config_toml(&format!(
            r#"
[[roles]]
name = "claude-fed"
engine = "federated"
scopes = []
default_ttl = "10m"
max_ttl = "1h"
[roles.federated]
provider = "anthropic"
audience = "{AUD}"
api_base_url = "{fed}"
token_url = "{fed}/v1/oauth/token"
federation_rule_id = "{ANTHROPIC_RULE}"
organization_id = "{ANTHROPIC_ORG}"
service_account_id = "{ANTHROPIC_SERVICE_ACCOUNT}"
timeout_secs = 30
"#
        ))
        .start()
        .await
        .unwrap();
    f.trust(&s.url(), AUD).unwrap();
    let admin = s.admin();
    let alice = s.client(&token(ops.path(), "alice"));
    let task_in = |role: &'static str| {
        let admin = admin.clone();
        async move {
            admin
                .post::<_, Task>(
                    "/v1/tasks",
                    &StartTask {
                        workload: Some("worker".into()),
                        role: Some(role.into()),
                        ttl_secs: Some(600),
                        ..StartTask::default()
                    },
                )
                .await
                .unwrap()
        }
    };
    let held_and_approved = |task: String| {
        let (admin, alice) = (admin.clone(), alice.clone());
        async move {
            let id = match admin
                .post::<_, IssuedLease>(&format!("/v1/tasks/{task}/leases"), &IssueLease::default())
                .await
            {
                Err(ClientError::Held { approval, .. }) => approval,
                other => panic!("expected a held request, got {other:?}"),
            };
            let a: Approval = alice
                .post(
                    &format!("/v1/approvals/{id}/approve"),
                    &serde_json::json!({}),
                )
                .await
                .unwrap();
            assert_eq!(a.status, ApprovalStatus::Approved);
            id
        }
    };
    let end = |task: String| {
        let admin = admin.clone();
        async move {
            let t: Task = admin
                .post(
                    &format!("/v1/tasks/{task}/end"),
                    &EndTask {
                        status: EndStatus::Completed,
                        reason: None,
                    },
                )
                .await
                .unwrap();
            assert_eq!(t.status.as_str(), "completed");
        }
    };
    // The end state every order must reach.
    let check = |task: String, id: String, status: ApprovalStatus, last: &'static str| {
        let admin = admin.clone();
        async move {
            let a: Approval = admin.get(&format!("/v1/approvals/{id}")).await.unwrap();
            assert_eq!(a.status, status, "{last}");
            let ev: List<AuditEvent> = admin.get("/v1/audit?limit=1000").await.unwrap();
            let mine: Vec<&AuditEvent> = ev
                .items
                .iter()
                .filter(|e| {
                    e.kind.starts_with("approval.")
                        && e.data.get("approval").and_then(|v| v.as_str()) == Some(id.as_str())
                })
                .collect();
            // In chain order: the last thing that happened to it is what
            // put it in its final status, and it happened once.
            assert_eq!(mine.last().map(|e| e.kind.as_str()), Some(last), "{mine:?}");
            assert_eq!(
                mine.iter().filter(|e| e.kind == last).count(),
                1,
                "{mine:?}"
            );
            assert!(
                !mine.iter().any(|e| e.kind == "approval.restored"),
                "{mine:?}"
            );
            let leases: List<keymint_proto::Lease> =
                admin.get(&format!("/v1/leases?task={task}")).await.unwrap();
            for l in &leases.items {
                assert!(
                    !matches!(
                        l.state,
                        keymint_core::model::LeaseState::Active
                            | keymint_core::model::LeaseState::Pending
                    ),
                    "a live lease in an ended task: {l:?}"
                );
            }
            let report: keymint_proto::ChainReport = admin.get("/v1/audit/verify").await.unwrap();
            assert!(report.ok(), "{report:?}");
            (mine.into_iter().cloned().collect::<Vec<_>>(), leases.items)
        }
    };

    // 1. The end first: cancelled while approved; the redemption refused.
    let t = task_in("demo").await;
    let id = held_and_approved(t.id.clone()).await;
    end(t.id.clone()).await;
    let e = admin
        .post_empty::<serde_json::Value>(&format!("/v1/approvals/{id}/redeem"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cancelled"), "{e}");
    let (ev, leases) = check(
        t.id.clone(),
        id,
        ApprovalStatus::Cancelled,
        "approval.cancelled",
    )
    .await;
    assert_eq!(ev.last().unwrap().data["was"], "approved");
    assert!(!ev.iter().any(|e| e.kind == "approval.redeemed"));
    assert!(leases.is_empty());

    // 2. The redemption first, done: its lease is revoked by the end.
    let t = task_in("demo").await;
    let id = held_and_approved(t.id.clone()).await;
    let got: IssuedLease = admin
        .post_empty(&format!("/v1/approvals/{id}/redeem"))
        .await
        .unwrap();
    let kmt = got.credential.secret().expose().to_owned();
    assert!(crate::introspect(&admin, &kmt).await.active);
    end(t.id.clone()).await;
    assert!(!crate::introspect(&admin, &kmt).await.active);
    let (ev, leases) = check(t.id.clone(), id, ApprovalStatus::Used, "approval.redeemed").await;
    assert!(!ev.iter().any(|e| e.kind == "approval.cancelled"));
    assert_eq!(leases.len(), 1);

    // 3. The end lands while the redeemed request is at the provider.
    let t = task_in("claude-fed").await;
    let id = held_and_approved(t.id.clone()).await;
    f.set_delay(Duration::from_secs(3));
    let redeeming = {
        let (admin, id) = (admin.clone(), id.clone());
        tokio::spawn(async move {
            admin
                .post_empty::<IssuedLease>(&format!("/v1/approvals/{id}/redeem"))
                .await
        })
    };
    let started = Instant::now();
    loop {
        let pending: List<keymint_proto::Lease> = admin
            .get(&format!("/v1/leases?task={}&state=pending", t.id))
            .await
            .unwrap();
        if !pending.items.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the redemption never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The race is on: used, its lease pending at the provider.
    let a: Approval = admin.get(&format!("/v1/approvals/{id}")).await.unwrap();
    assert_eq!(a.status, ApprovalStatus::Used);
    end(t.id.clone()).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the end came after the provider answered: no race"
    );
    let r = redeeming.await.unwrap();
    assert!(r.is_err(), "a credential was handed out in an ended task");
    let (ev, leases) = check(
        t.id.clone(),
        id,
        ApprovalStatus::Cancelled,
        "approval.cancelled",
    )
    .await;
    assert_eq!(ev.last().unwrap().data["was"], "used");
    assert_eq!(
        ev.iter().filter(|e| e.kind == "approval.redeemed").count(),
        1
    );
    assert_eq!(leases.len(), 1);
    let all: List<AuditEvent> = admin.get("/v1/audit?limit=1000").await.unwrap();
    assert!(
        !all.items
            .iter()
            .any(|e| e.kind == "lease.issued" && e.lease.as_deref() == Some(leases[0].id.as_str())),
        "the lease was activated"
    );
    f.set_delay(Duration::ZERO);
}
