//! The credential inventory, its findings and the leak response
//! (docs/design/0027): the real `keymint scan --report-to` against a tree
//! with a fake OpenAI project key, a fake Anthropic key and a live `kmt_`
//! token; the provider stand-ins follow the documented Admin APIs.

use std::process::Command;
use std::sync::Arc;

use keymint_core::inventory::{FindingKind, InventoryItem, ItemStatus, Origin};
use keymint_core::{Clock, SystemClock};
use keymint_proto::inventory::{FindingList, InventoryChange, InventoryPage};
use keymint_proto::{AuditEvent, LeaseState, List};
use keymint_testkit::TestServer;
use keymint_testkit::anthropic_admin::FakeAnthropicAdmin;
use keymint_testkit::openai_admin::FakeOpenAiAdmin;
use serde_json::json;

use crate::{introspect, issue, start_task};

const BIN: &str = env!("CARGO_BIN_EXE_keymint");
const PROJECT: &str = "proj_inventoryTest1";

fn fake_key(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        keymint_core::token::random_base62(32).unwrap().as_str()
    )
}

async fn audit(admin: &keymint_client::Client) -> Vec<AuditEvent> {
    admin
        .get::<List<AuditEvent>>("/v1/audit?limit=1000")
        .await
        .unwrap()
        .items
}

struct Env {
    s: TestServer,
    openai: FakeOpenAiAdmin,
    anthropic: FakeAnthropicAdmin,
}

async fn setup() -> Env {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let openai_admin = fake_key("sk-admin");
    let anthropic_admin = fake_key("sk-ant-admin01");
    let openai = FakeOpenAiAdmin::start(&openai_admin, PROJECT, clock)
        .await
        .unwrap();
    let anthropic = FakeAnthropicAdmin::start(&anthropic_admin).await.unwrap();
    let s = TestServer::builder()
        .config_toml(&format!(
            r#"
[[upstreams]]
name = "openai-admin"
kind = "openai"
base_url = "{}"

[[upstreams]]
name = "anthropic-admin"
kind = "anthropic"
base_url = "{}"

[inventory]
evaluate_every = "0"

[[inventory.responses]]
provider = "openai"
action = "revoke"
admin_key = "openai-admin"
projects = ["{PROJECT}"]

[[inventory.responses]]
provider = "anthropic"
action = "suspend"
admin_key = "anthropic-admin"
"#,
            openai.base_url(),
            anthropic.base_url()
        ))
        .start()
        .await
        .unwrap();
    crate::set_upstream_key(&s.admin(), "openai-admin", &openai_admin).await;
    crate::set_upstream_key(&s.admin(), "anthropic-admin", &anthropic_admin).await;
    Env {
        s,
        openai,
        anthropic,
    }
}

fn scan(url: &str, token: &str, dir: &std::path::Path, env: &str) -> std::process::Output {
    Command::new(BIN)
        .args([
            "scan",
            "--no-progress",
            "--format",
            "json",
            "--environment",
            env,
            "--report-to",
            url,
        ])
        .arg(dir)
        .env("KEYMINT_TOKEN", token)
        .output()
        .unwrap()
}

#[tokio::test]
async fn a_scan_revokes_each_leaked_key_at_its_provider_and_inventories_it() {
    let e = setup().await;
    let admin = e.s.admin();
    let openai_key = e.openai.create_project_key("billing bot");
    let other_openai = e.openai.create_project_key("kept");
    let anthropic_key = e.anthropic.create_key("support bot");
    let other_anthropic = e.anthropic.create_key("kept");
    let task = start_task(&admin, "ci-agent").await;
    let (lease, kmt) = issue(&admin, &task.id).await;

    let repo = tempfile::tempdir().unwrap();
    std::fs::write(
        repo.path().join("settings.py"),
        format!("OPENAI_API_KEY = \"{}\"\n", openai_key.value),
    )
    .unwrap();
    std::fs::create_dir(repo.path().join("deploy")).unwrap();
    std::fs::write(
        repo.path().join("deploy/.env"),
        format!(
            "ANTHROPIC_API_KEY={}\nKEYMINT_TOKEN={kmt}\n",
            anthropic_key.value
        ),
    )
    .unwrap();

    let (url, token, dir) = (e.s.url(), e.s.admin_token.clone(), repo.path().to_owned());
    let out = tokio::task::spawn_blocking(move || scan(&url, &token, &dir, "staging"))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "found → exit 1; {stderr}");
    for secret in [&openai_key.value, &anthropic_key.value, &kmt] {
        assert!(!stdout.contains(secret.as_str()) && !stderr.contains(secret.as_str()));
    }

    // OpenAI: the leaked project key is deleted, the other one kept.
    let openai_ids: Vec<String> = e.openai.keys().into_iter().map(|k| k.id).collect();
    assert!(!openai_ids.contains(&openai_key.id), "{openai_ids:?}");
    assert!(openai_ids.contains(&other_openai.id));
    assert!(e.openai.log().iter().any(|l| l
        == &format!(
            "DELETE /v1/organization/projects/{PROJECT}/api_keys/{}",
            openai_key.id
        )));
    // Anthropic: set inactive (the Admin API cannot delete), the other active.
    let status = |id: &str| {
        e.anthropic
            .keys()
            .into_iter()
            .find(|k| k.id == id)
            .map(|k| k.status)
    };
    assert_eq!(status(&anthropic_key.id).as_deref(), Some("inactive"));
    assert_eq!(status(&other_anthropic.id).as_deref(), Some("active"));
    // keymint's own token: revoked at once.
    assert!(!introspect(&admin, &kmt).await.active);
    let l: keymint_proto::Lease = admin
        .get(&format!("/v1/leases/{}", lease.lease.id))
        .await
        .unwrap();
    assert_eq!(l.state, LeaseState::Revoked);

    // Three inventory entries with their locations; never a secret.
    let page: InventoryPage = admin.get("/v1/inventory").await.unwrap();
    let seen: Vec<&InventoryItem> = page
        .items
        .iter()
        .filter(|i| !i.sightings.is_empty())
        .collect();
    assert_eq!(seen.len(), 3, "{seen:#?}");
    let by = |p: &str| *seen.iter().find(|i| i.provider == p).unwrap();
    let o = by("openai");
    assert_eq!(o.status, ItemStatus::Revoked);
    assert_eq!(o.origin, Origin::Scan);
    assert!(o.sightings[0].location.contains("settings.py:1"), "{o:?}");
    assert_eq!(o.sightings[0].environment.as_deref(), Some("staging"));
    assert!(o.leaked_at.is_some());
    let a = by("anthropic");
    assert_eq!(a.status, ItemStatus::Suspended);
    assert!(a.sightings[0].location.contains(".env:1"), "{a:?}");
    assert!(a.revocation.contains("inactive"));
    let k = by("keymint");
    assert_eq!(k.status, ItemStatus::Revoked);
    assert_eq!(k.lease.as_deref(), Some(lease.lease.id.as_str()));
    assert!(k.sightings[0].location.contains(".env:2"), "{k:?}");
    let listed = serde_json::to_string(&page).unwrap();
    for secret in [&openai_key.value, &anthropic_key.value, &kmt] {
        assert!(!listed.contains(secret.as_str()));
    }
    // The held admin keys are inventoried too (by the findings run).
    let f: FindingList = admin.get("/v1/inventory/findings").await.unwrap();
    let page: InventoryPage = admin.get("/v1/inventory?issued=false").await.unwrap();
    let upstreams: Vec<&InventoryItem> = page
        .items
        .iter()
        .filter(|i| i.origin == Origin::Upstream)
        .collect();
    assert_eq!(upstreams.len(), 2, "{upstreams:#?}");
    // A leaked key that was revoked no longer raises findings; a held admin
    // key without an owner does.
    assert!(!f.findings.iter().any(|x| x.item == o.id));
    assert!(
        f.findings
            .iter()
            .any(|x| x.item == upstreams[0].id && x.kind == FindingKind::NoOwner)
    );

    // Every response audited with the finding's location.
    let events = audit(&admin).await;
    let responses: Vec<&AuditEvent> = events
        .iter()
        .filter(|e| e.kind == "leak.response")
        .collect();
    assert_eq!(responses.len(), 2, "{responses:#?}");
    for r in &responses {
        assert!(r.data["locations"][0].as_str().is_some());
        assert!(["revoked", "suspended"].contains(&r.data["outcome"].as_str().unwrap()));
    }
    let all = serde_json::to_string(&events).unwrap();
    for secret in [&openai_key.value, &anthropic_key.value, &kmt] {
        assert!(!all.contains(secret.as_str()));
    }
    let verified: keymint_proto::ChainReport = admin.get("/v1/audit/verify").await.unwrap();
    assert!(verified.ok(), "{verified:?}");

    // The same tree scanned again from production: the entries gain a
    // location in a second environment, nothing is revoked twice.
    let (url, token, dir) = (e.s.url(), e.s.admin_token.clone(), repo.path().to_owned());
    let deletes = e
        .openai
        .log()
        .iter()
        .filter(|l| l.starts_with("DELETE"))
        .count();
    let out = tokio::task::spawn_blocking(move || scan(&url, &token, &dir, "prod"))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        e.openai
            .log()
            .iter()
            .filter(|l| l.starts_with("DELETE"))
            .count(),
        deletes
    );
    let again: InventoryItem = admin.get(&format!("/v1/inventory/{}", a.id)).await.unwrap();
    assert_eq!(again.sightings.len(), 2, "{again:?}");
}

#[tokio::test]
async fn a_registered_key_without_owner_or_expiry_is_flagged_until_it_has_them() {
    let e = setup().await;
    let admin = e.s.admin();
    // `keymint inventory set --key-file`: only a fingerprint and a hint leave.
    let dir = tempfile::tempdir().unwrap();
    let key = format!(
        "sk-or-v1-{}",
        hex::encode(keymint_core::token::random_base62(32).unwrap().as_bytes())
    );
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, &key).unwrap();
    let (url, token, kf) = (e.s.url(), e.s.admin_token.clone(), key_file.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args([
                "inventory",
                "set",
                "--provider",
                "openrouter",
                "--name",
                "legacy batch key",
                "--output",
                "json",
                "--addr",
                &url,
            ])
            .arg("--key-file")
            .arg(&kf)
            .env("KEYMINT_TOKEN", token)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains(&key));
    let item: InventoryItem = serde_json::from_str(&stdout).unwrap();
    assert_eq!(item.origin, Origin::Registered);
    assert_eq!(item.fingerprint.len(), 64);
    assert!(item.hint.as_deref().unwrap().starts_with("sk-or-v1-"));
    assert!(
        item.revocation.starts_with("manual:"),
        "{}",
        item.revocation
    );

    let kinds = |f: &FindingList| -> Vec<FindingKind> {
        f.findings
            .iter()
            .filter(|x| x.item == item.id)
            .map(|x| x.kind)
            .collect()
    };
    let f: FindingList = admin.get("/v1/inventory/findings").await.unwrap();
    assert_eq!(kinds(&f), vec![FindingKind::NoOwner, FindingKind::NoExpiry]);
    // Audited once each, not again on the next evaluation.
    let _: FindingList = admin.get("/v1/inventory/findings").await.unwrap();
    let events = audit(&admin).await;
    let flagged: Vec<&AuditEvent> = events
        .iter()
        .filter(|e| e.kind == "inventory.finding" && e.data["item"] == item.id.as_str())
        .collect();
    assert_eq!(flagged.len(), 2, "{flagged:#?}");

    // The owner and expiry set: no finding left; the change is audited.
    let changed: InventoryItem = admin
        .post(
            &format!("/v1/inventory/{}", item.id),
            &InventoryChange {
                business_owner: Some("data platform".into()),
                technical_owner: Some("alice@example.com".into()),
                expires_at: Some(SystemClock.now().plus_secs(30 * 86_400)),
                ..InventoryChange::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        changed.version,
        item.version + 2,
        "findings recorded, then the change"
    );
    let f: FindingList = admin.get("/v1/inventory/findings").await.unwrap();
    assert!(kinds(&f).is_empty(), "{f:?}");
    assert!(
        audit(&admin)
            .await
            .iter()
            .any(|e| e.kind == "inventory.updated"
                && e.data["fields"].to_string().contains("business_owner"))
    );

    // Retired: kept, not judged.
    let r: InventoryItem = admin
        .post(
            &format!("/v1/inventory/{}/retire", item.id),
            &json!({"reason": "replaced"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, ItemStatus::Retired);
}

#[tokio::test]
async fn bad_inventory_input_is_refused_changes_nothing_and_echoes_nothing() {
    let e = setup().await;
    let admin = e.s.admin();
    let before: InventoryPage = admin.get("/v1/inventory?issued=false").await.unwrap();
    let secret = format!("sk-proj-{}", "Q".repeat(60));
    let bad = [
        json!({"fingerprint": "zz".repeat(32), "provider": "openai"}),
        json!({"fingerprint": "ab".repeat(32), "hint": secret}),
        json!({"fingerprint": "ab".repeat(32), "business_owner": format!("{secret}\n")}),
        json!({"fingerprint": "ab".repeat(32), "purpose": "x".repeat(5000)}),
        json!({"fingerprint": "ab".repeat(32), "unknown_field": 1}),
        json!({"provider": "openai"}),
    ];
    for b in bad {
        let r = admin
            .raw(
                http::Method::POST,
                "/v1/inventory",
                Some("application/json"),
                b.to_string().into_bytes(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{b} → {}", r.text());
        assert!(!r.text().contains(&secret), "{}", r.text());
    }
    // Path traversal and garbage ids: refused, not looked up.
    for id in ["..%2F..%2Fetc%2Fpasswd", "inv_short", "lse_%00"] {
        let r = admin
            .raw(
                http::Method::GET,
                &format!("/v1/inventory/{id}"),
                None,
                Vec::new(),
            )
            .await
            .unwrap();
        assert!(r.status == 400 || r.status == 404, "{id} → {}", r.status);
        assert!(!r.text().contains("passwd"));
    }
    // An oversized body.
    let r = admin
        .raw(
            http::Method::POST,
            "/v1/inventory",
            Some("application/json"),
            json!({"fingerprint": "ab".repeat(32), "purpose": "y".repeat(200_000)})
                .to_string()
                .into_bytes(),
        )
        .await
        .unwrap();
    assert!(r.status == 413 || r.status == 400, "{}", r.status);
    // A task token is not the admin: refused and audited.
    let task = start_task(&admin, "nosy").await;
    let (_, kmt) = issue(&admin, &task.id).await;
    let r = e.s.client(&kmt).get::<InventoryPage>("/v1/inventory").await;
    assert!(r.is_err());
    let after: InventoryPage = admin.get("/v1/inventory?issued=false").await.unwrap();
    assert_eq!(before.items.len(), after.items.len());
    // A leak report with a malformed hint changes nothing.
    let r = admin
        .raw(
            http::Method::POST,
            "/v1/leaks",
            Some("application/json"),
            json!({"source": "keymint scan", "findings": [{"rule": "openai.project-key",
                "fingerprint": "ab".repeat(32), "locations": ["a.py:1"], "hint": secret}]})
            .to_string()
            .into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(!r.text().contains(&secret));
    let after: InventoryPage = admin.get("/v1/inventory?issued=false").await.unwrap();
    assert_eq!(before.items.len(), after.items.len());
    assert!(e.openai.log().iter().all(|l| !l.starts_with("DELETE")));
}

/// Findings reach the configured webhook once each, with the entry's hint
/// and revocation path and never the key; a finding that clears and comes
/// back is announced again.
#[tokio::test]
async fn findings_are_announced_once_on_the_webhook_and_never_carry_the_key() {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let app = {
        let got = Arc::clone(&got);
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: String| {
                let got = Arc::clone(&got);
                async move {
                    got.lock().unwrap().push(body);
                    http::StatusCode::NO_CONTENT
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let s = TestServer::builder()
        .config_toml(&format!(
            "[inventory]\nevaluate_every = \"0\"\nwebhook = \"{hook}\"\n"
        ))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    // Registered by fingerprint and hint only, as `inventory set` sends it.
    let key = fake_key("sk-or-v1-NotARealKey");
    let item: InventoryItem = admin
        .post(
            "/v1/inventory",
            &InventoryChange {
                name: Some("batch key".into()),
                provider: Some("openrouter".into()),
                fingerprint: Some(hex::encode([7u8; 32])),
                hint: Some(format!("sk-or-v1-Not…{}", &key[key.len() - 4..])),
                ..InventoryChange::default()
            },
        )
        .await
        .unwrap();
    let wait_for = |n: usize| {
        let got = Arc::clone(&got);
        async move {
            let t0 = Instant::now();
            while got.lock().unwrap().len() < n {
                assert!(t0.elapsed() < Duration::from_secs(10), "no webhook call");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let _: FindingList = admin.get("/v1/inventory/findings").await.unwrap();
    wait_for(1).await;
    let first: serde_json::Value = serde_json::from_str(&got.lock().unwrap()[0]).unwrap();
    assert_eq!(first["type"], "keymint.inventory.findings");
    assert_eq!(first["item"], item.id.as_str());
    assert_eq!(first["provider"], "openrouter");
    assert!(first["revocation"].as_str().unwrap().starts_with("manual:"));
    let kinds: Vec<&str> = first["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["no_owner", "no_expiry"]);
    // Evaluated again: nothing new, nothing sent.
    let _: FindingList = admin.get("/v1/inventory/findings").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(got.lock().unwrap().len(), 1);
    // Owners set, expiry still missing: nothing new. Owners removed again:
    // `no_owner` is announced again, alone.
    let owned = InventoryChange {
        business_owner: Some("data platform".into()),
        technical_owner: Some("alice@example.com".into()),
        ..InventoryChange::default()
    };
    let _: InventoryItem = admin
        .post(&format!("/v1/inventory/{}", item.id), &owned)
        .await
        .unwrap();
    let _: FindingList = admin.get("/v1/inventory/findings").await.unwrap();
    let unowned = InventoryChange {
        business_owner: Some(String::new()),
        technical_owner: Some(String::new()),
        ..InventoryChange::default()
    };
    let _: InventoryItem = admin
        .post(&format!("/v1/inventory/{}", item.id), &unowned)
        .await
        .unwrap();
    let _: FindingList = admin.get("/v1/inventory/findings").await.unwrap();
    wait_for(2).await;
    let second: serde_json::Value = serde_json::from_str(&got.lock().unwrap()[1]).unwrap();
    assert_eq!(second["findings"][0]["kind"], "no_owner");
    assert_eq!(second["findings"].as_array().unwrap().len(), 1);
    for body in got.lock().unwrap().iter() {
        assert!(!body.contains(&key), "the key reached the webhook");
    }
    s.stop().await;
}

/// A slow provider holds up neither the revocation of a leaked keymint
/// token reported beside its key nor its own leak response: the token is
/// revoked before any provider is asked, and the report runs to its end
/// after the caller stopped waiting (here after 1 s; `keymint scan`'s
/// client gave up after 30 s while an Admin API call may take as long).
#[tokio::test]
async fn a_slow_provider_neither_delays_a_leaked_tokens_revocation_nor_cuts_its_response_short() {
    use keymint_proto::{LeakReport, LeakedFinding, LeaksRecorded};
    use std::time::{Duration, Instant};
    let e = setup().await;
    let admin = e.s.admin();
    let openai_key = e.openai.create_project_key("billing bot");
    let task = start_task(&admin, "ci-agent").await;
    let (lease, kmt) = issue(&admin, &task.id).await;
    e.openai.set_delay(Duration::from_secs(3));
    let finding = |rule: &str, fingerprint: &str| LeakedFinding {
        rule: rule.into(),
        fingerprint: fingerprint.into(),
        locations: vec!["deploy/.env:1:16".into()],
        more_locations: 0,
        token: None,
        hint: None,
        environment: None,
    };
    let report = LeakReport {
        source: "keymint scan".into(),
        findings: vec![
            LeakedFinding {
                hint: Some(keymint_core::inventory::hint(&openai_key.value, 16)),
                ..finding("openai.project-key", &"ab".repeat(32))
            },
            LeakedFinding {
                token: Some(kmt.clone()),
                ..finding("keymint.token", &"cd".repeat(32))
            },
        ],
    };
    let started = Instant::now();
    let r = admin
        .with_timeout(Duration::from_secs(1))
        .post::<_, LeaksRecorded>("/v1/leaks", &report)
        .await;
    assert!(r.is_err(), "the stand-in answers after 3 s: {r:?}");
    assert!(
        !introspect(&admin, &kmt).await.active,
        "the token waited for the provider"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let l: keymint_proto::Lease = admin
        .get(&format!("/v1/leases/{}", lease.lease.id))
        .await
        .unwrap();
    assert_ne!(l.state, LeaseState::Active);

    // The caller left; the key is deleted at the provider all the same.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let responded = audit(&admin)
            .await
            .iter()
            .any(|ev| ev.kind == "leak.response" && ev.data["outcome"] == "revoked");
        if responded {
            break;
        }
        assert!(Instant::now() < deadline, "the leak response never ended");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        e.openai.keys().iter().all(|k| k.id != openai_key.id),
        "the leaked key is still at the provider"
    );
}

/// One leaked OpenAI project key, reported with its hint only (what
/// `keymint scan --report-to` sends for a third-party key).
fn openai_leak(key: &str) -> keymint_proto::LeakReport {
    keymint_proto::LeakReport {
        source: "keymint scan".into(),
        findings: vec![keymint_proto::LeakedFinding {
            rule: "openai.project-key".into(),
            fingerprint: "ef".repeat(32),
            locations: vec!["deploy/.env:1:16".into()],
            more_locations: 0,
            token: None,
            hint: Some(keymint_core::inventory::hint(key, 16)),
            environment: None,
        }],
    }
}

/// Waits (at most `secs`) until `key_id` is gone from the OpenAI stand-in.
async fn until_deleted(openai: &FakeOpenAiAdmin, key_id: &str, secs: u64) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if openai.keys().iter().all(|k| k.id != key_id) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn a_leak_response_the_provider_failed_is_retried_until_it_confirms() {
    // The provider is down when the leak is reported: the answer says
    // `failed`, and the key must still be revoked once the provider is
    // back, with no second report (DESIGN.md invariant 3).
    let e = setup().await;
    let admin = e.s.admin();
    let key = e.openai.create_project_key("billing bot");
    e.openai.set_down(Some(503));
    let r: keymint_proto::LeaksRecorded = admin
        .post("/v1/leaks", &openai_leak(&key.value))
        .await
        .unwrap();
    assert_eq!(r.responses.len(), 1);
    assert_eq!(r.responses[0].outcome, "failed", "{r:?}");
    assert!(
        r.responses[0].detail.contains("HTTP 503"),
        "{}",
        r.responses[0].detail
    );
    e.openai.set_down(None);

    assert!(
        until_deleted(&e.openai, &key.id, 20).await,
        "the failed leak response was never retried"
    );
    // The provider confirms before the store records it: wait for the
    // record (a read right after the deletion raced it under load), the
    // entry's status and then the response's event, two writes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let item = loop {
        let item: InventoryItem = admin
            .get(&format!("/v1/inventory/{}", r.responses[0].item))
            .await
            .unwrap();
        let settled = audit(&admin)
            .await
            .iter()
            .any(|ev| ev.kind == "leak.response" && ev.data["outcome"] == "revoked");
        if (item.status == ItemStatus::Revoked && settled) || std::time::Instant::now() > deadline {
            break item;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(item.status, ItemStatus::Revoked);
    let responses: Vec<AuditEvent> = audit(&admin)
        .await
        .into_iter()
        .filter(|ev| ev.kind == "leak.response")
        .collect();
    let outcomes: Vec<&str> = responses
        .iter()
        .map(|ev| ev.data["outcome"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(outcomes.first(), Some(&"failed"), "{outcomes:?}");
    assert_eq!(outcomes.last(), Some(&"revoked"), "{outcomes:?}");
    assert_eq!(
        outcomes.iter().filter(|o| **o == "revoked").count(),
        1,
        "{outcomes:?}"
    );
    // Settled: nothing is called again.
    let calls = e.openai.log().len();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(e.openai.log().len(), calls, "{:?}", e.openai.log());
    for ev in &responses {
        assert!(
            !serde_json::to_string(&ev.data)
                .unwrap()
                .contains(&key.value)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leak_response_cut_short_by_kill_9_is_finished_by_the_next_start() {
    // `keymint server` is killed while the provider call of a leak
    // response is in flight: the next start must finish the response.
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let openai_admin = fake_key("sk-admin");
    let openai = FakeOpenAiAdmin::start(&openai_admin, PROJECT, clock)
        .await
        .unwrap();
    let key = openai.create_project_key("billing bot");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/all.cedar"),
        keymint_testkit::PERMIT_ALL,
    )
    .unwrap();
    let path = dir.path().join("keymint.toml");
    std::fs::write(
        &path,
        format!(
            r#"version = 1
[server]
listen = "127.0.0.1:0"
dangerous_plaintext = true
[storage]
data_dir = "{}"
[policy]
paths = ["{}"]

[[upstreams]]
name = "openai-admin"
kind = "openai"
base_url = "{}"
timeout = "2s"

[inventory]
evaluate_every = "0"

[[inventory.responses]]
provider = "openai"
action = "revoke"
admin_key = "openai-admin"
projects = ["{PROJECT}"]
"#,
            data.display(),
            dir.path().join("policies").display(),
            openai.base_url(),
        ),
    )
    .unwrap();
    let start = || async {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.args(["server", "--config"]).arg(&path);
        let (child, probe) = crate::budgets::until_healthy(cmd).await;
        let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
        (child, probe.with_token(token.trim()))
    };
    let (mut child, admin) = start().await;
    crate::set_upstream_key(&admin, "openai-admin", &openai_admin).await;

    openai.set_delay(std::time::Duration::from_secs(60));
    let before = openai.log().len();
    let sent = admin
        .with_timeout(std::time::Duration::from_millis(500))
        .post::<_, keymint_proto::LeaksRecorded>("/v1/leaks", &openai_leak(&key.value))
        .await;
    assert!(sent.is_err(), "the stand-in holds every call: {sent:?}");
    child.start_kill().unwrap(); // SIGKILL, the provider call in flight
    let _ = child.wait().await;
    openai.set_delay(std::time::Duration::ZERO);
    assert!(
        openai.keys().iter().any(|k| k.id == key.id),
        "deleted before the kill: {:?}",
        &openai.log()[before..]
    );

    let (mut child, admin) = start().await;
    let done = until_deleted(&openai, &key.id, 30).await;
    // The provider confirms before the store records it (two writes):
    // wait for the record, as a read right after the deletion races it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let events = loop {
        let events = audit(&admin).await;
        if std::time::Instant::now() > deadline
            || events
                .iter()
                .any(|ev| ev.kind == "leak.response" && ev.data["outcome"] == "revoked")
        {
            break events;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    child.start_kill().unwrap();
    let _ = child.wait().await;
    assert!(done, "the leak response was forgotten across the crash");
    assert!(
        events
            .iter()
            .any(|ev| ev.kind == "leak.response" && ev.data["outcome"] == "revoked"),
        "the finished response is not audited"
    );
    for ev in &events {
        assert!(!serde_json::to_string(ev).unwrap().contains(&key.value));
    }
}

/// `keymint inventory set --key-file` with a file that is not one key (an
/// `.env` file, a log, a device that never ends) refuses it on the
/// operator's machine: nothing is registered, nothing of the file is
/// shown, and the command does not read without end. Until the sweep of
/// 2026-12-06 the whole file was fingerprinted and registered as a key
/// (its hint made of the file's first and last characters), and
/// `/dev/zero` was read until memory ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_that_is_not_one_key_is_refused_and_registers_nothing() {
    let e = setup().await;
    let admin = e.s.admin();
    let before: InventoryPage = admin.get("/v1/inventory?issued=false").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = format!("sk-proj-QZKWJVB{}", "x".repeat(40));
    let env = dir.path().join(".env");
    std::fs::write(
        &env,
        format!("# the batch job's settings\nOPENAI_API_KEY={key}\nREGION=eu\n"),
    )
    .unwrap();
    let big = dir.path().join("big.log");
    std::fs::write(&big, "QZKWJVBa".repeat(1 << 20)).unwrap();
    for f in [
        env.clone(),
        big.clone(),
        std::path::PathBuf::from("/dev/zero"),
    ] {
        let (url, token) = (e.s.url(), e.s.admin_token.clone());
        let kf = f.clone();
        let out = tokio::task::spawn_blocking(move || {
            Command::new("timeout")
                .arg("30")
                .arg(BIN)
                .args(["inventory", "set", "--provider", "openai", "--addr", &url])
                .arg("--key-file")
                .arg(&kf)
                .env("KEYMINT_TOKEN", token)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert_ne!(
            out.status.code(),
            Some(124),
            "{f:?}: still reading after 30 s"
        );
        assert!(!out.status.success(), "{f:?} registered: {stdout}");
        assert!(stderr.contains("key file"), "{f:?}: {stderr}");
        for text in [&stderr, &stdout] {
            assert!(!text.contains("QZKWJVB"), "{f:?}: {text}");
            assert!(!text.contains("OPENAI_API_KEY"), "{f:?}: {text}");
        }
    }
    let after: InventoryPage = admin.get("/v1/inventory?issued=false").await.unwrap();
    assert_eq!(after.items.len(), before.items.len());
}

/// One stored entry this version cannot read (written by a newer version
/// before a downgrade, or damaged) neither hides the rest of the
/// inventory nor stops the leak response duty: until the sweep of
/// 2026-12-06 every page holding it failed, so the duty retried no
/// response at all and `GET /v1/inventory` answered 500.
#[tokio::test]
async fn an_unreadable_entry_stops_neither_the_listing_nor_the_leak_response_retries() {
    let e = setup().await;
    let admin = e.s.admin();
    let odd: InventoryItem = admin
        .post(
            "/v1/inventory",
            &json!({"fingerprint": "ab".repeat(32), "provider": "openai", "name": "odd one"}),
        )
        .await
        .unwrap();
    let db = rusqlite::Connection::open(e.s.data_dir().join("keymint.db")).unwrap();
    db.execute(
        "UPDATE inventory SET doc = json_set(doc, '$.status', 'quarantined') WHERE id = ?1",
        [&odd.id],
    )
    .unwrap();
    drop(db);

    let key = e.openai.create_project_key("billing bot");
    e.openai.set_down(Some(503));
    let r: keymint_proto::LeaksRecorded = admin
        .post("/v1/leaks", &openai_leak(&key.value))
        .await
        .unwrap();
    assert_eq!(r.responses[0].outcome, "failed", "{r:?}");
    e.openai.set_down(None);
    assert!(
        until_deleted(&e.openai, &key.id, 20).await,
        "the failed leak response was never retried"
    );
    // The listing shows every entry it can read.
    let page: InventoryPage = admin.get("/v1/inventory?issued=false").await.unwrap();
    assert!(
        page.items.iter().any(|i| i.id == r.responses[0].item),
        "{:?}",
        page.items.iter().map(|i| &i.id).collect::<Vec<_>>()
    );
}
