//! Registration entries and nodes (docs/design/0012): admins manage
//! entries, a node sees only its own, and a node's request for an entry
//! acts as that entry's workload only when the entry is the node's and its
//! selectors hold for what the node observed.

use base64::Engine as _;
use keymint_client::Client;
use keymint_core::model::RegistrationEntry;
use keymint_proto::{AuditEvent, IssueLease, IssuedLease, List, StartTask, Task};
use keymint_testkit::TestServer;
use serde_json::json;

const HASH_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const HASH_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

async fn server() -> TestServer {
    TestServer::builder()
        .config_toml("[[nodes]]\nname = \"node-b\"\ntoken_file = \"node-b.token\"\n")
        .start()
        .await
        .unwrap()
}

fn node(s: &TestServer, name: &str) -> Client {
    let token = std::fs::read_to_string(s.data_dir().join(format!("node-{name}.token"))).unwrap();
    s.client(token.trim())
}

fn attested(v: serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

fn acting(c: &Client, entry: &str, observed: serde_json::Value) -> Client {
    c.with_header("x-keymint-entry", entry)
        .unwrap()
        .with_header("x-keymint-attested", &attested(observed))
        .unwrap()
}

/// `DELETE /v1/entries/{id}`: the status.
async fn delete(c: &Client, id: &str) -> u16 {
    c.raw(
        http::Method::DELETE,
        &format!("/v1/entries/{id}"),
        None,
        Vec::new(),
    )
    .await
    .unwrap()
    .status
    .as_u16()
}

async fn create(admin: &Client, body: serde_json::Value) -> Result<RegistrationEntry, String> {
    admin
        .post::<_, RegistrationEntry>("/v1/entries", &body)
        .await
        .map_err(|e| format!("{} {}", e.code().unwrap_or_default(), e))
}

async fn start(c: &Client) -> Result<Task, keymint_client::ClientError> {
    c.post(
        "/v1/tasks",
        &StartTask {
            role: Some("demo".into()),
            ttl_secs: Some(120),
            ..StartTask::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_manage_entries_and_nodes_see_their_own() {
    let s = server().await;
    let admin = s.admin();
    let a = create(
        &admin,
        json!({"workload": "triage", "node": "dev",
               "selectors": {"uid": 1000, "exe_sha256": HASH_A.to_uppercase()},
               "attributes": {"team": "support"}}),
    )
    .await
    .unwrap();
    assert!(a.id.starts_with("ent_"));
    // Normalised: the hash is stored lower case.
    assert_eq!(a.selectors, json!({"uid": 1000, "exe_sha256": HASH_A}));
    let b = create(
        &admin,
        json!({"workload": "ci", "node": "node-b", "selectors": {"uid": 1001}}),
    )
    .await
    .unwrap();

    // Listed by ID; IDs sort by their creation millisecond, and two entries
    // made in the same millisecond sort by their random part.
    let all: List<RegistrationEntry> = admin.get("/v1/entries").await.unwrap();
    let mut both = vec![a.clone(), b.clone()];
    both.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(all.items, both);
    let only_b: List<RegistrationEntry> = admin.get("/v1/entries?node=node-b").await.unwrap();
    assert_eq!(only_b.items, vec![b.clone()]);
    // A node lists its own entries, never another node's.
    let mine: List<RegistrationEntry> = node(&s, "dev").get("/v1/entries").await.unwrap();
    assert_eq!(mine.items, vec![a.clone()]);
    let e = node(&s, "dev")
        .get::<List<RegistrationEntry>>("/v1/entries?node=node-b")
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(403));
    // A node cannot create, read one by id, or delete.
    let e = create(
        &node(&s, "dev"),
        json!({"workload": "x", "node": "dev", "selectors": {"uid": 7}}),
    )
    .await
    .unwrap_err();
    assert!(e.starts_with("forbidden"), "{e}");
    assert_eq!(delete(&node(&s, "dev"), &a.id).await, 403);

    // Delete: gone, and a second delete is a 404.
    assert_eq!(delete(&admin, &b.id).await, 200);
    assert_eq!(delete(&admin, &b.id).await, 404);
    let got = admin
        .get::<RegistrationEntry>(&format!("/v1/entries/{}", a.id))
        .await
        .unwrap();
    assert_eq!(got, a);

    let audit: List<AuditEvent> = admin.get("/v1/audit?limit=100").await.unwrap();
    let kinds: Vec<&str> = audit
        .items
        .iter()
        .map(|e| e.kind.as_str())
        .filter(|k| k.starts_with("entry."))
        .collect();
    assert_eq!(kinds, ["entry.created", "entry.created", "entry.deleted"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_entries_are_refused_and_change_nothing() {
    let s = server().await;
    let admin = s.admin();
    create(
        &admin,
        json!({"workload": "triage", "node": "dev", "selectors": {"uid": 1000}}),
    )
    .await
    .unwrap();
    for (body, why) in [
        (
            json!({"workload": "x", "node": "nowhere", "selectors": {"uid": 1}}),
            "names no configured node",
        ),
        (
            json!({"workload": "x", "node": "dev", "selectors": {}}),
            "at least one selector",
        ),
        (
            json!({"workload": "x", "node": "dev", "selectors": {"pid": 1}}),
            "unknown field",
        ),
        (
            json!({"workload": "x", "node": "dev", "selectors": {"exe_sha256": "12"}}),
            "64 hex",
        ),
        (
            json!({"workload": "x", "node": "dev", "selectors": {"exe_path": "../bin/sh"}}),
            "absolute",
        ),
        (
            json!({"workload": "x", "node": "dev", "selectors": {"cgroup_prefix": "/a/../b"}}),
            "cgroup",
        ),
        (
            json!({"workload": "bad\nname", "node": "dev", "selectors": {"uid": 5}}),
            "control",
        ),
        (
            json!({"workload": "x", "node": "dev", "selectors": {"uid": 5},
                   "attributes": {"exe_sha256": HASH_B}}),
            "attestation fills in",
        ),
        (
            json!({"workload": "x", "node": "dev", "selectors": {"uid": 5},
                   "attributes": {"node": "node-b"}}),
            "set by the server",
        ),
        // As specific as the existing entry and able to match the same
        // process (uid 1000 running anything): ambiguous.
        (
            json!({"workload": "other", "node": "dev", "selectors": {"gid": 1000}}),
            "equally specific",
        ),
        (
            json!({"workload": "x", "node": "dev", "selectors": {"uid": 5}, "extra": 1}),
            "unknown field",
        ),
    ] {
        let e = create(&admin, body.clone()).await.unwrap_err();
        assert!(e.contains(why), "{body}: {e}");
    }
    // The same selectors on another node do not clash.
    create(
        &admin,
        json!({"workload": "other", "node": "node-b", "selectors": {"gid": 1000}}),
    )
    .await
    .unwrap();
    let all: List<RegistrationEntry> = admin.get("/v1/entries").await.unwrap();
    assert_eq!(all.items.len(), 2);
    for path in ["/v1/entries/ent_nope", "/v1/entries/..%2f..%2fadmin"] {
        let r = admin
            .raw(http::Method::GET, path, None, Vec::new())
            .await
            .unwrap();
        assert_eq!(r.status, 404, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_acts_only_for_its_entries_and_only_as_observed() {
    let s = server().await;
    let admin = s.admin();
    let mine = create(
        &admin,
        json!({"workload": "triage", "node": "dev",
               "selectors": {"uid": 1000, "exe_sha256": HASH_A},
               "attributes": {"team": "support"}}),
    )
    .await
    .unwrap();
    let theirs = create(
        &admin,
        json!({"workload": "ci", "node": "node-b", "selectors": {"uid": 1000}}),
    )
    .await
    .unwrap();
    let dev = node(&s, "dev");
    let seen = json!({"uid": "1000", "gid": "1000", "exe_sha256": HASH_A});

    // On its own a node is nobody's workload.
    let e = start(&dev).await.unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");

    // For its entry, with matching observations: the entry's workload.
    let w = acting(&dev, &mine.id, seen.clone());
    let t = start(&w).await.unwrap();
    assert_eq!(t.workload, "triage");
    let issued: IssuedLease = w
        .post(
            &format!("/v1/tasks/{}/leases", t.id),
            &IssueLease::default(),
        )
        .await
        .unwrap();
    assert_eq!(issued.lease.workload, "triage");
    let got: Task = w.get(&format!("/v1/tasks/{}", t.id)).await.unwrap();
    assert_eq!(got.id, t.id);

    // Another node's entry, an unknown entry, observations that do not
    // satisfy the selectors, missing or malformed observations: refused.
    let refusals = [
        (acting(&dev, &theirs.id, seen.clone()), 403),
        (
            acting(&dev, "ent_0000000000000000000000", seen.clone()),
            403,
        ),
        (
            acting(&dev, &mine.id, json!({"uid": "1000", "exe_sha256": HASH_B})),
            403,
        ),
        (
            acting(&dev, &mine.id, json!({"uid": "0", "exe_sha256": HASH_A})),
            403,
        ),
        (dev.with_header("x-keymint-entry", &mine.id).unwrap(), 400),
        (
            dev.with_header("x-keymint-entry", &mine.id)
                .unwrap()
                .with_header("x-keymint-attested", "not base64 at all!")
                .unwrap(),
            400,
        ),
        (
            acting(
                &dev,
                &mine.id,
                json!({"uid": "1000", "exe_sha256": HASH_A, "node": "x"}),
            ),
            400,
        ),
    ];
    for (c, status) in refusals {
        let e = start(&c).await.unwrap_err();
        assert_eq!(e.status(), Some(status), "{e}");
    }
    // The admin token (or a workload) cannot use the node headers.
    let e = start(&acting(&admin, &mine.id, seen.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    // A node cannot act on a task of a workload it does not serve.
    let other: Task = admin
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some("someone-else".into()),
                role: Some("demo".into()),
                ttl_secs: Some(60),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    let e = w
        .get::<Task>(&format!("/v1/tasks/{}", other.id))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");

    // A deleted entry stops working at once.
    assert_eq!(delete(&admin, &mine.id).await, 200);
    let e = start(&w).await.unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");

    // Every refusal through a node is in the audit trail, naming the node,
    // and so is everything the node did for a workload.
    let audit: List<AuditEvent> = admin.get("/v1/audit?limit=200").await.unwrap();
    let started = audit
        .items
        .iter()
        .find(|e| e.kind == "task.started" && e.task.as_deref() == Some(t.id.as_str()))
        .unwrap();
    assert_eq!(started.actor, "workload:triage via node:dev");
    let issued_ev = audit
        .items
        .iter()
        .find(|e| e.kind == "lease.issued" && e.lease.as_deref() == Some(issued.lease.id.as_str()))
        .unwrap();
    assert_eq!(issued_ev.actor, "workload:triage via node:dev");
    let refused = audit
        .items
        .iter()
        .filter(|e| e.kind == "auth.failed" && e.actor == "node:dev")
        .count();
    assert!(refused >= 5, "{refused} node refusals audited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_sees_the_node_and_what_it_observed() {
    let policy = format!(
        r#"@id("triage-via-dev-node")
permit(principal == Keymint::Workload::"triage", action, resource)
when {{ principal.method == "unix" && principal.hasTag("node") && principal.getTag("node") == "dev"
       && principal.hasTag("exe_sha256") && principal.getTag("exe_sha256") == "{HASH_A}"
       && principal.hasTag("team") && principal.getTag("team") == "support" }};"#
    );
    let s = TestServer::builder().policy(&policy).start().await.unwrap();
    let e = create(
        &s.admin(),
        json!({"workload": "triage", "node": "dev",
               "selectors": {"uid": 1000}, "attributes": {"team": "support"}}),
    )
    .await
    .unwrap();
    let dev = node(&s, "dev");
    let t = start(&acting(
        &dev,
        &e.id,
        json!({"uid": "1000", "exe_sha256": HASH_A}),
    ))
    .await
    .unwrap();
    assert_eq!(t.workload, "triage");
    // Same entry, another executable: the policy does not permit it.
    let err = start(&acting(
        &dev,
        &e.id,
        json!({"uid": "1000", "exe_sha256": HASH_B}),
    ))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Some("policy_denied"), "{err}");
}

/// An entry's workload is the workload its node's requests act as, so it
/// passes the check a task's workload passes, with the same words; and no
/// error about an entry quotes what the caller sent (a selector's value
/// can be a pasted key or markup).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_errors_check_workloads_like_tasks_and_never_echo_values() {
    let s = server().await;
    let admin = s.admin();
    let task_error = |workload: &str| {
        let admin = s.admin();
        let body = json!({"workload": workload, "role": "demo", "ttl_secs": 60});
        async move {
            let r = admin
                .raw(
                    http::Method::POST,
                    "/v1/tasks",
                    Some("application/json"),
                    body.to_string().into_bytes(),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 400, "{}", r.text());
            r.json::<keymint_proto::Problem>().unwrap().detail
        }
    };
    let long = "w".repeat(4000);
    for workload in [
        "ew\u{202e}2",
        "a\u{200b}b",
        "\u{feff}agent",
        "   ",
        "",
        long.as_str(),
    ] {
        let e = create(
            &admin,
            json!({"workload": workload, "node": "dev", "selectors": {"uid": 5, "gid": 5}}),
        )
        .await
        .unwrap_err();
        assert!(e.starts_with("invalid_request "), "{workload:?}: {e}");
        let same = task_error(workload).await;
        assert!(
            e.ends_with(&format!(": {same}")),
            "{workload:?}: {e} / {same}"
        );
        assert!(e.contains("`workload`"), "{e}");
        if !workload.trim().is_empty() {
            assert!(!e.contains(workload), "the value is echoed: {e}");
        }
        assert!(!e.contains("www"), "the value is echoed: {e}");
    }
    let secret = "sk-proj-FAKE0123456789abcdef<script>";
    for (selectors, field) in [
        (json!({"exe_path": secret}), "exe_path"),
        (json!({"exe_sha256": secret}), "exe_sha256"),
        (json!({"container_id": secret}), "container_id"),
        (json!({"cgroup_prefix": secret}), "cgroup_prefix"),
        (json!({"uid": secret}), "selectors"),
        (json!({secret: 1}), "selectors"),
    ] {
        let e = create(
            &admin,
            json!({"workload": "w", "node": "dev", "selectors": selectors}),
        )
        .await
        .unwrap_err();
        assert!(e.contains(field), "{selectors}: {e}");
        assert!(!e.contains("sk-proj") && !e.contains("<script"), "{e}");
    }
    for attributes in [
        json!({secret: "\u{202e}x"}),
        json!({"team": format!("{secret}\n")}),
    ] {
        let e = create(
            &admin,
            json!({"workload": "w", "node": "dev", "selectors": {"uid": 5},
                   "attributes": attributes}),
        )
        .await
        .unwrap_err();
        assert!(e.contains("attribute"), "{e}");
        assert!(!e.contains("sk-proj") && !e.contains("<script"), "{e}");
    }
    // A clash names the entry it clashes with, not workloads or selectors.
    let first = create(
        &admin,
        json!({"workload": "first-secret-name", "node": "dev",
               "selectors": {"exe_path": "/opt/secret/bin"}}),
    )
    .await
    .unwrap();
    let e = create(
        &admin,
        json!({"workload": "second", "node": "dev",
               "selectors": {"exe_path": "/opt/secret/bin"}}),
    )
    .await
    .unwrap_err();
    assert!(e.contains(&first.id), "{e}");
    assert!(!e.contains("secret"), "{e}");
    let all: List<RegistrationEntry> = admin.get("/v1/entries").await.unwrap();
    assert_eq!(all.items.len(), 1, "nothing else was stored");
}
