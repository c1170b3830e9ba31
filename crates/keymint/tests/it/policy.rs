//! Cedar policy decides every task start, issuance, renewal and delegation,
//! with the request's facts in the context; denials name the policies and
//! are audited; an approval policy holds the request; policy errors deny.

use keymint_client::Client;
use keymint_proto::{
    AuditEvent, IssueLease, IssuedLease, List, RenewLease, Renewed, StartTask, Task,
};
use keymint_testkit::TestServer;

const POLICY: &str = r#"
@id("planner-works")
permit(principal == Keymint::Workload::"planner",
       action in [Keymint::Action::"start_task", Keymint::Action::"issue"],
       resource == Keymint::Role::"demo")
when { context.ttl_secs <= 600 && context.environment != "prod" };

// The planner may hand the coder (and only the coder) one level of work.
@id("planner-delegates-to-coder")
permit(principal == Keymint::Workload::"planner",
       action == Keymint::Action::"delegate",
       resource == Keymint::Role::"demo")
when { context.subject == "coder" && context.delegation_depth == 1
       && context.delegation_chain.contains("planner") };

// The coder may use what it was handed, in its task only.
@id("coder-issues")
permit(principal == Keymint::Workload::"coder", action == Keymint::Action::"issue", resource)
when { context.parent_task != "" };

@id("embeddings-need-a-human")
@approval("required")
permit(principal, action == Keymint::Action::"issue", resource)
when { context.scopes.contains("llm:embeddings") };
"#;

fn start(workload: &str, ttl: u64) -> StartTask {
    StartTask {
        workload: Some(workload.into()),
        role: Some("demo".into()),
        ttl_secs: Some(ttl),
        scopes: Some(vec!["llm:chat".into()]),
        ..StartTask::default()
    }
}

async fn events(admin: &Client) -> Vec<AuditEvent> {
    admin
        .get::<List<AuditEvent>>("/v1/audit?limit=500")
        .await
        .unwrap()
        .items
}

#[tokio::test]
async fn policy_decides_each_step_and_every_decision_is_audited() {
    let s = TestServer::builder().policy(POLICY).start().await.unwrap();
    let admin = s.admin();

    // Start: by workload, TTL and environment.
    let task: Task = admin
        .post("/v1/tasks", &start("planner", 600))
        .await
        .unwrap();
    for (req, why) in [
        (start("stranger", 600), "another workload"),
        (start("planner", 601), "a longer task"),
        (
            StartTask {
                environment: Some("prod".into()),
                ..start("planner", 60)
            },
            "production",
        ),
    ] {
        let e = admin.post::<_, Task>("/v1/tasks", &req).await.unwrap_err();
        assert_eq!(e.code(), Some("policy_denied"), "{why}: {e}");
    }

    // Issue: permitted for the planner; renew has no permit.
    let issued: IssuedLease = admin
        .post(
            &format!("/v1/tasks/{}/leases", task.id),
            &IssueLease::default(),
        )
        .await
        .unwrap();
    let e = admin
        .post::<_, Renewed>(
            &format!("/v1/leases/{}/renew", issued.lease.id),
            &RenewLease::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("policy_denied"));

    // Delegation: to the coder only, and the coder may then issue.
    let planner = s.client(issued.credential.secret().expose());
    let e = planner
        .post::<_, Task>(
            "/v1/tasks",
            &StartTask {
                workload: Some("intern".into()),
                ..StartTask::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("policy_denied"));
    let sub: Task = planner
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some("coder".into()),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    let coder_lease: IssuedLease = planner
        .post(
            &format!("/v1/tasks/{}/leases", sub.id),
            &IssueLease::default(),
        )
        .await
        .unwrap();
    // The coder cannot delegate further: no policy permits it.
    let coder = s.client(coder_lease.credential.secret().expose());
    let e = coder
        .post::<_, Task>(
            "/v1/tasks",
            &StartTask {
                workload: Some("coder".into()),
                ..StartTask::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("policy_denied"));

    // Embeddings need a human: held, not silently granted.
    let big: Task = admin
        .post(
            "/v1/tasks",
            &StartTask {
                scopes: Some(vec!["llm:chat".into(), "llm:embeddings".into()]),
                ..start("planner", 300)
            },
        )
        .await
        .unwrap();
    let e = admin
        .post::<_, IssuedLease>(
            &format!("/v1/tasks/{}/leases", big.id),
            &IssueLease {
                scopes: Some(vec!["llm:embeddings".into()]),
                ttl_secs: None,
                ..IssueLease::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, keymint_client::ClientError::Held { .. }),
        "held for a human, not granted: {e}"
    );

    // The audit trail names the deciding policies, for grants and refusals.
    let ev = events(&admin).await;
    let started = ev.iter().find(|e| e.kind == "task.started").unwrap();
    assert_eq!(
        started.data["policies"],
        serde_json::json!(["planner-works"])
    );
    let delegated = ev
        .iter()
        .find(|e| e.kind == "task.started" && e.workload.as_deref() == Some("coder"))
        .unwrap();
    assert_eq!(
        delegated.data["policies"],
        serde_json::json!(["planner-delegates-to-coder"])
    );
    assert_eq!(delegated.data["act"], serde_json::json!({"sub": "planner"}));
    let issued_ev = ev.iter().find(|e| e.kind == "lease.issued").unwrap();
    assert_eq!(
        issued_ev.data["policies"],
        serde_json::json!(["planner-works"])
    );
    let held = ev
        .iter()
        .find(|e| e.kind == "approval.requested")
        .expect("the held request is audited");
    // Both permits applied; the one that asks for a human holds it.
    assert_eq!(
        held.data["policies"],
        serde_json::json!(["embeddings-need-a-human", "planner-works"])
    );
    let denials = ev
        .iter()
        .filter(|e| e.outcome == keymint_core::audit::Outcome::Denied)
        .count();
    assert_eq!(
        denials, 7,
        "3 starts, 1 renew, 2 delegations, 1 held issuance"
    );
}

#[tokio::test]
async fn without_policy_nothing_is_granted_and_a_bad_reload_changes_nothing() {
    let s = TestServer::builder()
        .policy("// no policies\n")
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let e = admin
        .post::<_, Task>("/v1/tasks", &start("anyone", 60))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("policy_denied"));
    assert!(e.to_string().contains("no policy permits"), "{e}");

    // Write a good policy, reload through the API: in force at once.
    let file = s.data_dir().join("policies/test.cedar");
    std::fs::write(&file, "@id(\"all\") permit(principal, action, resource);").unwrap();
    let info: keymint_proto::PolicyInfo = admin.post_empty("/v1/policy/reload").await.unwrap();
    assert_eq!(info.policies, ["all"]);
    admin
        .post::<_, Task>("/v1/tasks", &start("anyone", 60))
        .await
        .unwrap();

    // A broken file: refused with the reason, the previous set stays.
    std::fs::write(&file, "permit(principal, action, resource) when { 1 };").unwrap();
    let r = admin
        .raw(http::Method::POST, "/v1/policy/reload", None, Vec::new())
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("previous policies stay in force"),
        "{}",
        r.text()
    );
    let info: keymint_proto::PolicyInfo = admin.get("/v1/policy").await.unwrap();
    assert_eq!(info.policies, ["all"]);
    admin
        .post::<_, Task>("/v1/tasks", &start("anyone", 60))
        .await
        .unwrap();

    // Only the admin may reload or read the policies.
    let t: Task = admin.post("/v1/tasks", &start("w", 60)).await.unwrap();
    let l: IssuedLease = admin
        .post(
            &format!("/v1/tasks/{}/leases", t.id),
            &IssueLease::default(),
        )
        .await
        .unwrap();
    let agent = s.client(l.credential.secret().expose());
    let e = agent
        .post_empty::<keymint_proto::PolicyInfo>("/v1/policy/reload")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("forbidden"));
    assert!(
        agent
            .get::<keymint_proto::PolicyInfo>("/v1/policy")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn policy_sees_the_source_address() {
    let s = TestServer::builder()
        .policy(
            r#"@id("from-this-host")
permit(principal, action, resource)
when { context has source_ip && context.source_ip.isLoopback() };
@id("not-from-10-net")
forbid(principal, action, resource)
when { context has source_ip && context.source_ip.isInRange(ip("10.0.0.0/8")) };"#,
        )
        .start()
        .await
        .unwrap();
    // The test client connects over loopback.
    let t: Task = s.admin().post("/v1/tasks", &start("w", 60)).await.unwrap();
    let ev = events(&s.admin()).await;
    let started = ev
        .iter()
        .find(|e| e.task.as_deref() == Some(t.id.as_str()))
        .unwrap();
    assert_eq!(
        started.data["policies"],
        serde_json::json!(["from-this-host"])
    );

    let s = TestServer::builder()
        .policy(
            r#"permit(principal, action, resource)
when { context has source_ip && !context.source_ip.isLoopback() };"#,
        )
        .start()
        .await
        .unwrap();
    let e = s
        .admin()
        .post::<_, Task>("/v1/tasks", &start("w", 60))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("policy_denied"));
}

#[tokio::test]
async fn policy_sees_where_a_credential_will_be_used() {
    let role = keymint_core::model::Role {
        name: "orders-ro".into(),
        scopes: vec!["db:read".into()],
        default_ttl_secs: 60,
        max_ttl_secs: 600,
        description: None,
        kind: keymint_core::role::RoleKind::Postgres(keymint_core::role::DatabaseRole {
            database: "orders".into(),
            creation_statements: Vec::new(),
            max_connections: keymint_core::role::DEFAULT_MAX_CONNECTIONS,
        }),
    };
    let s = TestServer::builder()
        .role(role)
        .policy(
            r#"@id("orders-only") permit(principal, action, resource)
when { context.destination == "database:orders" };"#,
        )
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let ok = StartTask {
        role: Some("orders-ro".into()),
        scopes: None,
        ..start("w", 60)
    };
    admin.post::<_, Task>("/v1/tasks", &ok).await.unwrap();
    // The demo role has no destination: not covered.
    let e = admin
        .post::<_, Task>("/v1/tasks", &start("w", 60))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("policy_denied"));
}

/// A decision that runs out of time (CPU contention against the budget)
/// decided nothing: 503 with `Retry-After`, audited as `policy.timeout`,
/// and the same request passes once decisions are fast again.
#[tokio::test]
async fn a_policy_timeout_is_a_503_to_retry_not_a_denial() {
    let s = TestServer::builder().policy(POLICY).start().await.unwrap();
    let admin = s.admin();
    s.broker()
        .policy()
        .set_decision_budget(std::time::Duration::ZERO);
    let body = serde_json::to_vec(&start("planner", 300)).unwrap();
    let r = admin
        .raw(
            http::Method::POST,
            "/v1/tasks",
            Some("application/json"),
            body.clone(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, http::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        r.headers.get(http::header::RETRY_AFTER).unwrap(),
        "1",
        "a client knows when to ask again"
    );
    let p: keymint_proto::Problem = r.json().unwrap();
    assert_eq!(p.code, "unavailable");
    let events: List<AuditEvent> = admin.get("/v1/audit?limit=100").await.unwrap();
    let ev = events
        .items
        .iter()
        .find(|e| e.kind == "policy.timeout")
        .unwrap_or_else(|| panic!("no policy.timeout event"));
    assert_eq!(ev.workload.as_deref(), Some("planner"));
    assert_eq!(ev.role.as_deref(), Some("demo"));
    assert_eq!(ev.data.get("decision"), Some(&serde_json::json!("timeout")));
    assert!(
        !events.items.iter().any(|e| e.kind == "task.denied"),
        "not audited as a denial"
    );

    s.broker()
        .policy()
        .set_decision_budget(keymint_policy::DECISION_BUDGET);
    let r = admin
        .raw(
            http::Method::POST,
            "/v1/tasks",
            Some("application/json"),
            body,
        )
        .await
        .unwrap();
    assert_eq!(r.status, http::StatusCode::CREATED, "the retry passes");
}
