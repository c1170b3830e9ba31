//! The HTTP API as a client sees it.

use keymint_client::ClientError;
use keymint_proto::{
    EndStatus, EndTask, IssueLease, IssuedLease, Lease, LeaseState, List, RenewLease, Renewed,
    RevokeLeases, Revoked, StartTask, Task, TaskStatus,
};
use keymint_testkit::TestServer;

use crate::{introspect, issue, start_task};

#[tokio::test]
async fn only_health_and_metrics_are_open() {
    let s = TestServer::start().await.unwrap();
    let anon = s.anonymous();
    let h: keymint_proto::Health = anon.get("/v1/health").await.unwrap();
    assert_eq!(h.status, "ok");
    let m = anon
        .raw(http::Method::GET, "/metrics", None, vec![])
        .await
        .unwrap();
    assert_eq!(m.status, 200);
    assert!(m.text().contains("keymint_leases_issued_total"));
    // The OIDC issuer's documents are public too (verifiers fetch them
    // without credentials); this server is no issuer, so they are absent.
    for path in [
        "/.well-known/openid-configuration",
        "/.well-known/jwks.json",
    ] {
        let r = anon
            .raw(http::Method::GET, path, None, vec![])
            .await
            .unwrap();
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.headers["content-type"], "application/problem+json");
    }
    for (method, path) in documented_routes() {
        if matches!(
            path.as_str(),
            "/v1/health"
                | "/metrics"
                | "/.well-known/openid-configuration"
                | "/.well-known/jwks.json"
        ) {
            continue;
        }
        let path = concrete(&path);
        let r = anon.raw(method.clone(), &path, None, vec![]).await.unwrap();
        assert_eq!(r.status, 401, "{method} {path} must need authentication");
        assert_eq!(r.headers["content-type"], "application/problem+json");
        assert_eq!(r.headers["www-authenticate"], "Bearer");
    }
}

/// Every (method, path) of the OpenAPI document, which is generated from
/// the same registration that mounts the routes.
fn documented_routes() -> Vec<(http::Method, String)> {
    let doc = serde_json::to_value(keymint_server::api::openapi()).unwrap();
    let mut routes = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let method = http::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            routes.push((method, path.clone()));
        }
    }
    routes
}

/// A documented path with its parameters filled in.
fn concrete(path: &str) -> String {
    path.replace("{id}", "tsk_0000000000000000000000")
        .replace("{name}", "nope")
}

#[tokio::test]
async fn openapi_lists_exactly_the_routes() {
    // As an OIDC issuer (an ES256 key only: cheap), so its documents answer.
    let s = TestServer::builder()
        .config_toml("[issuer]\nalgorithms = [\"ES256\"]")
        .start()
        .await
        .unwrap();
    let doc: serde_json::Value = s.admin().get("/v1/openapi.json").await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc,
        serde_json::to_value(keymint_server::api::openapi()).unwrap(),
        "the server serves the generated document"
    );
    let routes = documented_routes();
    let paths = doc["paths"].as_object().unwrap();
    for (method, path) in &routes {
        assert!(
            paths
                .get(path)
                .and_then(|p| p.get(method.as_str().to_lowercase()))
                .is_some(),
            "{method} {path} missing from openapi.json"
        );
    }
    let n: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(
        n,
        routes.len(),
        "openapi.json has routes the server does not"
    );

    // Every documented route is served: anonymous, it is either open or
    // asks for a token, never "no such endpoint" or "method not allowed".
    // Every other method on a documented path is refused, so nothing
    // undocumented is mounted beside it.
    let anon = s.anonymous();
    let methods = [
        http::Method::GET,
        http::Method::POST,
        http::Method::PUT,
        http::Method::PATCH,
        http::Method::DELETE,
    ];
    for path in paths.keys() {
        for m in &methods {
            let r = anon
                .raw(m.clone(), &concrete(path), None, vec![])
                .await
                .unwrap();
            if routes.contains(&(m.clone(), path.clone())) {
                assert!(
                    r.status == 200 || r.status == 401,
                    "{m} {path} is documented but answers {}",
                    r.status
                );
            } else {
                assert_eq!(r.status, 405, "{m} {path} is served but not documented");
            }
        }
    }
    let r = anon
        .raw(http::Method::GET, "/v1/no-such-endpoint", None, vec![])
        .await
        .unwrap();
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn a_task_lives_issues_and_dies_with_its_credentials() {
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    let t = start_task(&admin, "ticket-bot").await;
    assert_eq!(t.status, TaskStatus::Active);
    assert_eq!(t.scopes, vec!["llm:chat", "llm:embeddings", "http:read"]);
    let (l1, tok1) = issue(&admin, &t.id).await;
    assert!(tok1.starts_with("kmt_") && tok1.len() == 53);
    assert_eq!(l1.lease.state, LeaseState::Active);
    assert!(l1.lease.expires_at <= t.expires_at);

    let i = introspect(&admin, &tok1).await;
    assert!(i.active);
    assert_eq!(i.sub.as_deref(), Some("ticket-bot"));
    assert_eq!(i.jti.as_deref(), Some(l1.lease.id.as_str()));
    assert_eq!(i.task_id.as_deref(), Some(t.id.as_str()));
    assert_eq!(
        i.scope.as_deref(),
        Some("llm:chat llm:embeddings http:read")
    );

    // The token itself authenticates as its task: it may look at it and heartbeat.
    let agent = s.client(&tok1);
    let seen: Task = agent.get(&format!("/v1/tasks/{}", t.id)).await.unwrap();
    assert_eq!(seen.id, t.id);
    let (_l2, tok2) = issue(&agent, &t.id).await;

    // Ending the task revokes every credential in it, at once.
    let ended: Task = admin
        .post(
            &format!("/v1/tasks/{}/end", t.id),
            &EndTask {
                status: EndStatus::Completed,
                reason: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(ended.status, TaskStatus::Completed);
    for tok in [&tok1, &tok2] {
        assert!(!introspect(&admin, tok).await.active);
        let e = s
            .client(tok)
            .get::<Task>(&format!("/v1/tasks/{}", t.id))
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(401));
        assert!(e.to_string().contains("revoked or expired"), "{e}");
    }
    let leases: List<Lease> = admin
        .get(&format!("/v1/leases?task={}", t.id))
        .await
        .unwrap();
    assert_eq!(leases.items.len(), 2);
    assert!(leases.items.iter().all(|l| l.state == LeaseState::Revoked));
    // A new lease in an ended task is refused.
    let e = admin
        .post::<_, IssuedLease>(
            &format!("/v1/tasks/{}/leases", t.id),
            &IssueLease::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("task_not_active"));

    let kinds: Vec<String> = admin
        .get::<List<keymint_proto::AuditEvent>>("/v1/audit?limit=100")
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| e.kind)
        .collect();
    for k in [
        "task.started",
        "lease.issued",
        "lease.revoke_requested",
        "lease.revoked",
        "task.ended",
        "lease.denied",
    ] {
        assert!(kinds.iter().any(|x| x == k), "no `{k}` in {kinds:?}");
    }
    let report: keymint_proto::ChainReport = admin.get("/v1/audit/verify").await.unwrap();
    assert!(report.ok(), "{report:?}");
}

#[tokio::test]
async fn a_sub_agent_never_holds_more_than_its_parent() {
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    let parent: Task = admin
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some("planner".into()),
                role: Some("demo".into()),
                ttl_secs: Some(300),
                scopes: Some(vec!["llm:chat".into(), "http:read".into()]),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    let (_, ptok) = issue(&admin, &parent.id).await;
    let planner = s.client(&ptok);

    // Wider scope: refused.
    let e = planner
        .post::<_, Task>(
            "/v1/tasks",
            &StartTask {
                workload: Some("coder".into()),
                scopes: Some(vec!["llm:embeddings".into()]),
                ..StartTask::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("scope_not_granted"), "{e}");
    // Longer TTL: refused.
    let e = planner
        .post::<_, Task>(
            "/v1/tasks",
            &StartTask {
                workload: Some("coder".into()),
                ttl_secs: Some(301),
                ..StartTask::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("ttl_exceeds_limit"), "{e}");

    // Narrower: granted, parented to the caller's task, delegation recorded.
    let child: Task = planner
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some("coder".into()),
                scopes: Some(vec!["llm:chat".into()]),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(child.parent.as_deref(), Some(parent.id.as_str()));
    assert_eq!(child.delegation, vec!["planner"]);
    assert!(child.expires_at <= parent.expires_at);
    let (_, ctok) = issue(&planner, &child.id).await;
    let coder = s.client(&ctok);

    // The child cannot act on its parent, nor on an unrelated task.
    let e = coder
        .get::<Task>(&format!("/v1/tasks/{}", parent.id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("forbidden"));
    let other = start_task(&admin, "someone-else").await;
    let e = planner
        .post::<_, IssuedLease>(
            &format!("/v1/tasks/{}/leases", other.id),
            &IssueLease::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("forbidden"));
    // Nor list everything.
    assert_eq!(
        coder
            .get::<List<Task>>("/v1/tasks")
            .await
            .unwrap_err()
            .code(),
        Some("forbidden")
    );

    // Revoking the parent revokes the child's credentials.
    let _: Task = admin
        .post_empty(&format!("/v1/tasks/{}/revoke", parent.id))
        .await
        .unwrap();
    assert!(!introspect(&admin, &ctok).await.active);
    let c: Task = admin.get(&format!("/v1/tasks/{}", child.id)).await.unwrap();
    assert_eq!(c.status, TaskStatus::Revoked);

    let events = admin
        .get::<List<keymint_proto::AuditEvent>>("/v1/audit?limit=200")
        .await
        .unwrap()
        .items;
    let started = events
        .iter()
        .find(|e| e.kind == "task.started" && e.task.as_deref() == Some(&child.id))
        .unwrap();
    assert_eq!(started.data["act"], serde_json::json!({"sub": "planner"}));
    assert!(events.iter().any(|e| {
        e.kind == "task.denied"
            && e.reason
                .as_deref()
                .is_some_and(|r| r.contains("llm:embeddings"))
    }));
}

#[tokio::test]
async fn renewal_and_bulk_revocation() {
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    let t = start_task(&admin, "w1").await;
    let (l, _) = issue(&admin, &t.id).await;
    let r: Renewed = admin
        .post(
            &format!("/v1/leases/{}/renew", l.lease.id),
            &RenewLease {
                increment_secs: Some(7200),
            },
        )
        .await
        .unwrap();
    assert!(r.capped, "role max 1 h and task end 10 min cap the renewal");
    assert!(r.lease.expires_at <= t.expires_at);

    let t2 = start_task(&admin, "w2").await;
    let (_, a) = issue(&admin, &t2.id).await;
    let (_, b) = issue(&admin, &t2.id).await;
    let e = admin
        .post::<_, Revoked>("/v1/leases/revoke", &RevokeLeases::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("invalid_request"));
    let out: Revoked = admin
        .post(
            "/v1/leases/revoke",
            &RevokeLeases {
                workload: Some("w2".into()),
                ..RevokeLeases::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(out.revoked.len(), 2);
    assert!(out.revoked.iter().all(|l| l.state == LeaseState::Revoked));
    assert!(!introspect(&admin, &a).await.active && !introspect(&admin, &b).await.active);
    assert!(
        introspect(&admin, &issue(&admin, &t.id).await.1)
            .await
            .active,
        "other workloads untouched"
    );

    let out: Revoked = admin
        .post(
            "/v1/leases/revoke",
            &RevokeLeases {
                role: Some("demo".into()),
                ..RevokeLeases::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(out.revoked.len(), 2);
    let one: Lease = admin
        .get(&format!("/v1/leases/{}", l.lease.id))
        .await
        .unwrap();
    assert_eq!(one.state, LeaseState::Revoked);
}

#[tokio::test]
async fn secrets_stay_out_of_the_store_the_audit_file_and_metrics() {
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    let t = start_task(&admin, "w").await;
    let (_, tok) = issue(&admin, &t.id).await;
    let _: Task = admin
        .post_empty(&format!("/v1/tasks/{}/revoke", t.id))
        .await
        .unwrap();
    // Wait for the sink to catch up.
    let audit = s.data_dir().join("audit.jsonl");
    for _ in 0..200 {
        if std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .contains("task.ended")
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let needles = [tok.as_str(), &tok[4..20], s.admin_token.as_str()];
    let mut files = vec![audit];
    for e in std::fs::read_dir(s.data_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("keymint.db")
        {
            files.push(p);
        }
    }
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        for n in needles {
            assert!(
                !bytes.windows(n.len()).any(|w| w == n.as_bytes()),
                "{} holds a secret",
                f.display()
            );
        }
    }
    let metrics = s
        .anonymous()
        .raw(http::Method::GET, "/metrics", None, vec![])
        .await
        .unwrap()
        .text();
    assert!(!metrics.contains(&tok[4..20]));
    // The root key lives only in its own file, and the signing key is sealed.
    let root = std::fs::read_to_string(s.data_dir().join("root.key")).unwrap();
    for f in &files {
        let text = String::from_utf8_lossy(&std::fs::read(f).unwrap()).into_owned();
        assert!(!text.contains(root.trim()));
    }
    use std::os::unix::fs::PermissionsExt;
    for name in ["root.key", "admin.token", "keymint.db", "audit.jsonl"] {
        let mode = std::fs::metadata(s.data_dir().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
}

#[tokio::test]
async fn a_restart_keeps_every_task_lease_and_event() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::builder()
        .data_dir(dir.path())
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = start_task(&admin, "w").await;
    let (l, tok) = issue(&admin, &t.id).await;
    let (gone, gone_tok) = issue(&admin, &t.id).await;
    let _: Lease = admin
        .post_empty(&format!("/v1/leases/{}/revoke", gone.lease.id))
        .await
        .unwrap();
    let head: List<keymint_proto::AuditEvent> = admin.get("/v1/audit?limit=1").await.unwrap();
    let admin_token = s.admin_token.clone();
    s.stop().await;

    let s = TestServer::builder()
        .data_dir(dir.path())
        .start()
        .await
        .unwrap();
    assert_eq!(s.admin_token, admin_token, "the admin token survives");
    let admin = s.admin();
    assert_eq!(
        admin
            .get::<Task>(&format!("/v1/tasks/{}", t.id))
            .await
            .unwrap()
            .status,
        TaskStatus::Active
    );
    let i = introspect(&admin, &tok).await;
    assert!(i.active);
    assert_eq!(i.jti.as_deref(), Some(l.lease.id.as_str()));
    assert!(!introspect(&admin, &gone_tok).await.active);
    let after: List<keymint_proto::AuditEvent> = admin.get("/v1/audit?limit=1").await.unwrap();
    assert_eq!(after.items[0].seq, head.items[0].seq);
    let (_, _) = issue(&admin, &t.id).await;
    let report: keymint_proto::ChainReport = admin.get("/v1/audit/verify").await.unwrap();
    assert!(report.ok());
    assert_eq!(report.last_seq, Some(head.items[0].seq + 1));
}

#[tokio::test]
async fn a_failing_audit_sink_never_blocks_requests_and_catches_up_later() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let data = dir.path().join("data");
    let s = TestServer::builder()
        .data_dir(&data)
        .audit_file(Some(blocker.join("audit.jsonl")))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = start_task(&admin, "w").await;
    for _ in 0..20 {
        issue(&admin, &t.id).await;
    }
    let metrics = s
        .anonymous()
        .raw(http::Method::GET, "/metrics", None, vec![])
        .await
        .unwrap()
        .text();
    assert!(metrics.contains("keymint_audit_sink_lag 21"), "{metrics}");
    assert!(
        !metrics.contains("keymint_audit_sink_failures_total 0"),
        "{metrics}"
    );
    s.stop().await;

    // With a working sink, everything spooled in the store is delivered.
    let good = dir.path().join("audit.jsonl");
    let s = TestServer::builder()
        .data_dir(&data)
        .audit_file(Some(good.clone()))
        .start()
        .await
        .unwrap();
    for _ in 0..200 {
        if std::fs::read_to_string(&good)
            .unwrap_or_default()
            .lines()
            .count()
            >= 21
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let report = crate::binary::verify_file(&good);
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.events, 21);
    drop(s);
}

#[tokio::test]
async fn lists_filter_and_limit() {
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    for w in ["a", "a", "b"] {
        start_task(&admin, w).await;
    }
    let a: List<Task> = admin.get("/v1/tasks?workload=a").await.unwrap();
    assert_eq!(a.items.len(), 2);
    let one: List<Task> = admin.get("/v1/tasks?limit=1").await.unwrap();
    assert_eq!(one.items.len(), 1);
    let active: List<Task> = admin
        .get("/v1/tasks?status=active&role=demo")
        .await
        .unwrap();
    assert_eq!(active.items.len(), 3);
    for bad in [
        "/v1/tasks?limit=0",
        "/v1/tasks?limit=5000",
        "/v1/tasks?status=zombie",
        "/v1/tasks?colour=red",
    ] {
        let e = admin.get::<List<Task>>(bad).await.unwrap_err();
        assert_eq!(e.code(), Some("invalid_request"), "{bad}: {e}");
    }
    let e: ClientError = admin
        .get::<Task>("/v1/tasks/tsk_0000000000000000000000")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("not_found"));
}

#[tokio::test]
async fn a_task_token_cannot_mint_more_than_it_holds() {
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    let t = start_task(&admin, "w").await;
    let narrow: IssuedLease = admin
        .post(
            &format!("/v1/tasks/{}/leases", t.id),
            &IssueLease {
                ttl_secs: Some(60),
                scopes: Some(vec!["llm:chat".into()]),
                ..IssueLease::default()
            },
        )
        .await
        .unwrap();
    let agent = s.client(narrow.credential.secret().expose());
    // Not a scope of the task it holds beyond its own.
    let e = agent
        .post::<_, IssuedLease>(
            &format!("/v1/tasks/{}/leases", t.id),
            &IssueLease {
                ttl_secs: None,
                scopes: Some(vec!["http:read".into()]),
                ..IssueLease::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("scope_not_granted"), "{e}");
    // Not past its own expiry.
    let e = agent
        .post::<_, IssuedLease>(
            &format!("/v1/tasks/{}/leases", t.id),
            &IssueLease {
                ttl_secs: Some(120),
                scopes: None,
                ..IssueLease::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("ttl_exceeds_limit"), "{e}");
    // By default: what it holds, no more.
    let (l, _) = issue(&agent, &t.id).await;
    assert_eq!(l.lease.scopes, vec!["llm:chat"]);
    assert!(l.lease.expires_at <= narrow.lease.expires_at);
    // Its sub-tasks are bounded the same way.
    let sub: Task = agent
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some("sub".into()),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(sub.scopes, vec!["llm:chat"]);
    assert!(sub.expires_at <= narrow.lease.expires_at);
}

/// When the store cannot write (here: another process holds SQLite's write
/// lock, as a full disk or a failing device would refuse writes), requests
/// that write get 503 with `Retry-After`, not 500, and `/v1/health` says
/// not ready; both recover once a write goes through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_write_is_not_ready_and_answers_503() {
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    let health = |s: &TestServer| {
        let c = s.anonymous();
        async move {
            c.raw(http::Method::GET, "/v1/health", None, vec![])
                .await
                .unwrap()
        }
    };
    assert_eq!(health(&s).await.status, http::StatusCode::OK);
    let lock = rusqlite::Connection::open(s.data_dir().join("keymint.db")).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let body = serde_json::to_vec(&StartTask {
        workload: Some("w".into()),
        role: Some("demo".into()),
        ..StartTask::default()
    })
    .unwrap();
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
    assert!(r.headers.get(http::header::RETRY_AFTER).is_some());
    let p: keymint_proto::Problem = r.json().unwrap();
    assert_eq!(p.code, "unavailable");
    assert!(
        !p.detail.contains("locked"),
        "no backend detail: {}",
        p.detail
    );
    let h = health(&s).await;
    assert_eq!(h.status, http::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        h.json::<keymint_proto::Health>().unwrap().status,
        "unavailable"
    );

    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    let r = admin
        .raw(
            http::Method::POST,
            "/v1/tasks",
            Some("application/json"),
            body,
        )
        .await
        .unwrap();
    assert_eq!(
        r.status,
        http::StatusCode::CREATED,
        "writes go through again"
    );
    assert_eq!(health(&s).await.status, http::StatusCode::OK, "ready again");
}

/// Rewrites the stored text of the event `seq` in a SQLite store, as
/// someone with the database file in hand would.
fn tamper_stored_event(dir: &std::path::Path, seq: u64, edit: impl Fn(&str) -> String) {
    let db = rusqlite::Connection::open(dir.join("keymint.db")).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    let text: String = db
        .query_row(
            "SELECT event FROM audit WHERE seq = ?1",
            [seq as i64],
            |r| r.get(0),
        )
        .unwrap();
    let edited = edit(&text);
    assert_ne!(edited, text, "the edit changes the stored event");
    db.execute(
        "UPDATE audit SET event = ?1 WHERE seq = ?2",
        rusqlite::params![edited, seq as i64],
    )
    .unwrap();
}

/// An event edited in the store so that it no longer reads as an audit
/// event (a value no event can hold, a field no event has) is named by
/// `audit verify` like any other edit, instead of failing the check with
/// a 500; and a problem deep in a long chain is named at its place in the
/// whole chain, not in the batch it was read in.
#[tokio::test]
async fn audit_verify_names_a_stored_event_that_no_longer_reads_as_one() {
    use keymint_core::audit::{AuditDraft, ChainProblem};
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::builder()
        .data_dir(dir.path())
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = start_task(&admin, "w").await;
    issue(&admin, &t.id).await;
    issue(&admin, &t.id).await;
    let report: keymint_proto::ChainReport = admin.get("/v1/audit/verify").await.unwrap();
    assert!(report.ok(), "{report:?}");

    tamper_stored_event(dir.path(), 2, |e| {
        e.replace("\"outcome\":\"success\"", "\"outcome\":\"allowed\"")
    });
    let report: keymint_proto::ChainReport = admin.get("/v1/audit/verify").await.unwrap();
    assert_eq!(report.events, 1, "{report:?}");
    assert!(
        matches!(
            &report.problem,
            Some(ChainProblem::Malformed { position: 2, detail }) if detail.contains("allowed")
        ),
        "{report:?}"
    );
    tamper_stored_event(dir.path(), 2, |e| {
        e.replace("\"outcome\":\"allowed\"", "\"outcome\":\"success\"")
    });
    tamper_stored_event(dir.path(), 3, |e| e.replacen('{', "{\"forged\":true,", 1));
    let report: keymint_proto::ChainReport = admin.get("/v1/audit/verify").await.unwrap();
    assert!(
        matches!(
            report.problem,
            Some(ChainProblem::Malformed { position: 3, .. })
        ),
        "{report:?}"
    );
    tamper_stored_event(dir.path(), 3, |e| e.replacen("{\"forged\":true,", "{", 1));
    let report: keymint_proto::ChainReport = admin.get("/v1/audit/verify").await.unwrap();
    assert!(report.ok(), "{report:?}");

    // Past the first batch the server reads (5000 events).
    let store = s.broker().store().clone();
    let mut appends = tokio::task::JoinSet::new();
    for i in 0..5100 {
        let store = store.clone();
        appends.spawn(async move {
            let draft = AuditDraft::new(keymint_core::Timestamp(i), "test.filler", "admin");
            store.append_audit(draft).await.unwrap();
        });
    }
    while let Some(r) = appends.join_next().await {
        r.unwrap();
    }
    let report: keymint_proto::ChainReport = admin.get("/v1/audit/verify").await.unwrap();
    assert!(report.ok(), "{report:?}");
    let head = report.last_seq.unwrap();
    assert!(head > 5050, "{report:?}");
    tamper_stored_event(dir.path(), 5050, |e| {
        e.replace("\"actor\":\"admin\"", "\"actor\":\"mallory\"")
    });
    let report: keymint_proto::ChainReport = admin.get("/v1/audit/verify").await.unwrap();
    assert_eq!(
        report.problem,
        Some(ChainProblem::Edited {
            position: 5050,
            seq: 5050
        }),
        "{report:?}"
    );
    assert_eq!(report.events, 5049, "{report:?}");
}

/// A stored event that cannot be read (its text damaged into something
/// that is not an event, or into bytes that are not UTF-8) is never
/// skipped: reading the trail answers an error that names its `seq`
/// (nothing of its text), the events after it stay readable, and `audit
/// verify`, through the API and the CLI, names its place in the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_the_audit_names_a_stored_event_that_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::builder()
        .data_dir(dir.path())
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = start_task(&admin, "w").await;
    issue(&admin, &t.id).await;
    issue(&admin, &t.id).await;
    let all: keymint_proto::List<keymint_proto::AuditEvent> = admin.get("/v1/audit").await.unwrap();
    let head = all.items.last().unwrap().seq;
    assert!(head >= 3, "{head}");
    let set_raw = |sql: &str| {
        let db = rusqlite::Connection::open(dir.path().join("keymint.db")).unwrap();
        db.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
        db.execute(sql, []).unwrap_or_else(|e| panic!("{sql}: {e}"));
    };
    for damage in [
        "UPDATE audit SET event = 'QZKWJVB damaged' WHERE seq = 2",
        // `{` then a byte that is not UTF-8.
        "UPDATE audit SET event = CAST(x'7bff' AS TEXT) WHERE seq = 2",
    ] {
        set_raw(damage);
        for path in [
            "/v1/audit",
            "/v1/audit?after=0",
            "/v1/audit?after=1&limit=1",
        ] {
            let r = admin
                .raw(http::Method::GET, path, None, vec![])
                .await
                .unwrap();
            assert_eq!(r.status, 500, "{damage}: {path}: {}", r.text());
            let p: keymint_proto::Problem = r.json().unwrap();
            assert_eq!(p.code, "internal");
            assert!(
                p.detail.contains("`seq` 2 cannot be read") && p.detail.contains("audit verify"),
                "{damage}: {}",
                p.detail
            );
            assert!(!p.detail.contains("QZKWJVB"), "{}", p.detail);
        }
        // Around it, the trail reads.
        let before: keymint_proto::List<keymint_proto::AuditEvent> =
            admin.get("/v1/audit?after=0&limit=1").await.unwrap();
        assert_eq!(before.items.len(), 1);
        let after: keymint_proto::List<keymint_proto::AuditEvent> =
            admin.get("/v1/audit?after=2").await.unwrap();
        assert_eq!(after.items.first().map(|e| e.seq), Some(3));
        assert!(after.items.last().is_some_and(|e| e.seq >= head));

        let report: keymint_proto::ChainReport = admin.get("/v1/audit/verify").await.unwrap();
        assert!(
            matches!(
                &report.problem,
                Some(keymint_core::audit::ChainProblem::Malformed { position: 2, detail })
                    if detail.contains("`seq` 2") && !detail.contains("QZKWJVB")
            ),
            "{damage}: {report:?}"
        );
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keymint"))
            .args(["audit", "verify"])
            .env("KEYMINT_ADDR", s.url())
            .env("KEYMINT_TOKEN", &s.admin_token)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(
            text.contains("entry 2") && text.contains("`seq` 2"),
            "{text}"
        );
    }
}

/// A file sink whose file holds another chain (a store started afresh, a
/// store restored from an older backup, another deployment's file) never
/// splices this store's chain onto it, nor skips this chain's first
/// events because the file's last line has a higher seq: it refuses,
/// counts a failure, and delivers the whole chain once the file is moved
/// aside.
#[tokio::test]
async fn the_audit_file_never_receives_a_second_chain() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    let lines = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .count() as u64
    };
    let wait_lines = |p: std::path::PathBuf, n: u64| async move {
        for _ in 0..500 {
            if lines(&p) >= n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("`{}` never reached {n} lines", p.display());
    };
    let s = TestServer::builder()
        .data_dir(&dir.path().join("one"))
        .audit_file(Some(file.clone()))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = start_task(&admin, "w").await;
    for _ in 0..10 {
        issue(&admin, &t.id).await;
    }
    let first: keymint_proto::ChainReport = admin.get("/v1/audit/verify").await.unwrap();
    let first_head = first.last_seq.unwrap();
    wait_lines(file.clone(), first_head).await;
    s.stop().await;

    // A new store, the same file: its chain is not the file's.
    let s = TestServer::builder()
        .data_dir(&dir.path().join("two"))
        .audit_file(Some(file.clone()))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let t = start_task(&admin, "w").await;
    for _ in 0..15 {
        issue(&admin, &t.id).await;
    }
    let second: keymint_proto::ChainReport = admin.get("/v1/audit/verify").await.unwrap();
    let second_head = second.last_seq.unwrap();
    assert!(second_head > first_head + 2, "{second:?}");
    let mut refused = false;
    for _ in 0..500 {
        if crate::metric(&s, "keymint_audit_sink_failures_total").await
            != "keymint_audit_sink_failures_total 0"
        {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let report = crate::binary::verify_file(&file);
    assert!(report.ok(), "the file was spliced: {report:?}");
    assert_eq!(report.events, first_head, "{report:?}");
    assert!(refused, "the sink never refused the file");

    // Moved aside, the file starts again with this store's whole chain.
    std::fs::rename(&file, dir.path().join("audit.old.jsonl")).unwrap();
    wait_lines(file.clone(), second_head).await;
    let report = crate::binary::verify_file(&file);
    assert!(report.ok(), "{report:?}");
    assert!(report.events >= second_head, "{report:?}");
    drop(s);
}

/// A task token is narrower than its task (its own scopes and expiry): a
/// refusal at the token's limit names the token, not the task, which does
/// have the time or the scope asked for.
#[tokio::test]
async fn a_refusal_at_a_tokens_limit_names_the_token_not_its_task() {
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    let parent: Task = admin
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some("planner".into()),
                role: Some("demo".into()),
                ttl_secs: Some(600),
                scopes: Some(vec!["llm:chat".into(), "http:read".into()]),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    let l: IssuedLease = admin
        .post(
            &format!("/v1/tasks/{}/leases", parent.id),
            &IssueLease {
                ttl_secs: Some(60),
                scopes: Some(vec!["llm:chat".into()]),
                ..IssueLease::default()
            },
        )
        .await
        .unwrap();
    let planner = s.client(l.credential.secret().expose());
    let detail = |e: ClientError| match e {
        ClientError::Api(p) => (p.code, p.detail),
        other => panic!("{other}"),
    };
    let credential = format!("the credential acting for task `{}`", parent.id);

    let (code, d) = detail(
        planner
            .post::<_, Task>(
                "/v1/tasks",
                &StartTask {
                    workload: Some("coder".into()),
                    ttl_secs: Some(120),
                    ..StartTask::default()
                },
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(code, "ttl_exceeds_limit");
    assert!(d.contains(&credential), "{d}");
    let (code, d) = detail(
        planner
            .post::<_, Task>(
                "/v1/tasks",
                &StartTask {
                    workload: Some("coder".into()),
                    scopes: Some(vec!["http:read".into()]),
                    ..StartTask::default()
                },
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(code, "scope_not_granted");
    assert!(d.contains(&credential), "{d}");
    for ask in [
        IssueLease {
            ttl_secs: Some(120),
            ..IssueLease::default()
        },
        IssueLease {
            scopes: Some(vec!["http:read".into()]),
            ..IssueLease::default()
        },
    ] {
        let (_, d) = detail(
            planner
                .post::<_, IssuedLease>(&format!("/v1/tasks/{}/leases", parent.id), &ask)
                .await
                .unwrap_err(),
        );
        assert!(d.contains(&credential), "{ask:?}: {d}");
    }
    // The task's own limit is still named as the task's.
    let (code, d) = detail(
        admin
            .post::<_, IssuedLease>(
                &format!("/v1/tasks/{}/leases", parent.id),
                &IssueLease {
                    ttl_secs: Some(900),
                    ..IssueLease::default()
                },
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(code, "ttl_exceeds_limit");
    assert!(!d.contains("credential"), "{d}");
}

/// A task token acts through its task narrowed to its own expiry
/// (`a_task_token_cannot_mint_more_than_it_holds`); renewing is no way
/// around it: a token given 60 s cannot renew itself, or a credential it
/// issued, to the task's end.
#[tokio::test]
async fn a_task_token_cannot_renew_past_its_own_expiry() {
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    let t = start_task(&admin, "w").await;
    let narrow: IssuedLease = admin
        .post(
            &format!("/v1/tasks/{}/leases", t.id),
            &IssueLease {
                ttl_secs: Some(60),
                ..IssueLease::default()
            },
        )
        .await
        .unwrap();
    let agent = s.client(narrow.credential.secret().expose());
    let r: Renewed = agent
        .post(
            &format!("/v1/leases/{}/renew", narrow.lease.id),
            &RenewLease {
                increment_secs: Some(600),
            },
        )
        .await
        .unwrap();
    assert!(r.capped, "the token's own expiry caps its renewal");
    assert_eq!(
        r.lease.expires_at, narrow.lease.expires_at,
        "a token does not extend itself"
    );
    // A credential it issued is bounded the same way.
    let (mine, _) = issue(&agent, &t.id).await;
    let r: Renewed = agent
        .post(
            &format!("/v1/leases/{}/renew", mine.lease.id),
            &RenewLease {
                increment_secs: Some(600),
            },
        )
        .await
        .unwrap();
    assert!(r.lease.expires_at <= narrow.lease.expires_at);
    // The admin is not bounded.
    let r: Renewed = admin
        .post(
            &format!("/v1/leases/{}/renew", narrow.lease.id),
            &RenewLease {
                increment_secs: Some(300),
            },
        )
        .await
        .unwrap();
    assert!(r.lease.expires_at > narrow.lease.expires_at);
}
