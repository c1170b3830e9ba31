//! Provider keys per lease (docs/design/0017-provider-keys.md): the
//! `openai` engine against the Admin API stand-in and the `openrouter`
//! engine against the key-management stand-in, with the official `openai`
//! Python SDK using the issued keys unchanged.

use std::process::Stdio;
use std::sync::Arc;

use keymint_core::audit::AuditDraft;
use keymint_core::model::{EndReason, LeaseState};
use keymint_core::role::EngineKind;
use keymint_core::{Clock, ManualClock, SystemClock, Timestamp};
use keymint_proto::{Credential, EndStatus, EndTask, IssueLease, IssuedLease, List, Task};
use keymint_testkit::TestServer;
use keymint_testkit::openai_admin::FakeOpenAiAdmin;
use keymint_testkit::openrouter::FakeOpenRouter;
use serde_json::{Value, json};

use crate::start_task_in;

const PROJECT: &str = "proj_keymintTest01";

/// Fabricated admin keys, made per test.
fn fake_key(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        keymint_core::token::random_base62(32).unwrap().as_str()
    )
}

/// Whether python3 with the `openai` SDK is here; fails under CI if not.
async fn sdk() -> bool {
    let ok = tokio::process::Command::new("python3")
        .args(["-c", "import openai"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            !crate::postgres::in_ci(),
            "python3 with the `openai` package is required in CI (pip install openai)"
        );
        eprintln!("skipping: python3 with `openai` is not installed");
    }
    ok
}

fn config(openai: &str, openrouter: &str, timeout: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "openai-admin"
kind = "openai"
base_url = "{openai}"
timeout = "{timeout}"

[[upstreams]]
name = "openrouter-mgmt"
kind = "openai"
base_url = "{openrouter}"
timeout = "{timeout}"

[[roles]]
name = "openai-agent"
engine = "openai"
scopes = ["llm:chat"]
default_ttl = "5m"
max_ttl = "1h"
[roles.openai]
project = "{PROJECT}"
admin_key = "openai-admin"

[[roles]]
name = "openai-scoped"
engine = "openai"
scopes = ["llm:chat"]
default_ttl = "5m"
max_ttl = "1h"
[roles.openai]
project = "{PROJECT}"
admin_key = "openai-admin"
scopes = ["model.request", "api.model.read"]

[[roles]]
name = "openrouter-agent"
engine = "openrouter"
scopes = ["llm:chat"]
default_ttl = "5m"
max_ttl = "1h"
[roles.openrouter]
management_key = "openrouter-mgmt"
max_spend_usd = 0.5
limit_reset = "daily"
"#
    )
}

struct Env {
    s: TestServer,
    openai: FakeOpenAiAdmin,
    openrouter: FakeOpenRouter,
    admin_key: String,
    management_key: String,
}

async fn setup(clock: Option<ManualClock>, timeout: &str) -> Env {
    let c: Arc<dyn Clock> = match &clock {
        Some(m) => Arc::new(m.clone()),
        None => Arc::new(SystemClock),
    };
    let admin_key = fake_key("sk-admin");
    let management_key = fake_key("sk-or-mgmt");
    let openai = FakeOpenAiAdmin::start(&admin_key, PROJECT, Arc::clone(&c))
        .await
        .unwrap();
    let openrouter = FakeOpenRouter::start(&management_key, c).await.unwrap();
    let mut b = TestServer::builder().config_toml(&config(
        &openai.base_url(),
        &openrouter.base_url(),
        timeout,
    ));
    if let Some(m) = clock {
        b = b.clock(m);
    }
    let s = b.start().await.unwrap();
    crate::set_upstream_key(&s.admin(), "openai-admin", &admin_key).await;
    crate::set_upstream_key(&s.admin(), "openrouter-mgmt", &management_key).await;
    Env {
        s,
        openai,
        openrouter,
        admin_key,
        management_key,
    }
}

async fn issue(s: &TestServer, t: &Task) -> Result<IssuedLease, keymint_client::ClientError> {
    s.admin()
        .post(
            &format!("/v1/tasks/{}/leases", t.id),
            &IssueLease::default(),
        )
        .await
}

async fn end(s: &TestServer, t: &Task) {
    let _: Task = s
        .admin()
        .post(
            &format!("/v1/tasks/{}/end", t.id),
            &EndTask {
                status: EndStatus::Completed,
                reason: None,
            },
        )
        .await
        .unwrap();
}

/// The credential's key and base URL.
fn api_key(l: &IssuedLease) -> (EngineKind, String, String, Option<u64>) {
    match &l.credential {
        Credential::ApiKey {
            provider,
            api_key,
            base_url,
            expires_at,
        } => (
            *provider,
            api_key.expose().to_owned(),
            base_url.clone(),
            *expires_at,
        ),
        other => panic!("not an api key: {other:?}"),
    }
}

/// `POST {base}/chat/completions` with `key`: the provider's status.
async fn chat_status(base: &str, key: &str) -> u16 {
    let http = keymint_client::http::HttpClient::builder().build().unwrap();
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("{base}/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(bytes::Bytes::from(
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
                .to_string(),
        ))
        .unwrap();
    http.send(req).await.unwrap().status.as_u16()
}

async fn audit(s: &TestServer) -> Vec<keymint_proto::AuditEvent> {
    s.admin()
        .get::<List<keymint_proto::AuditEvent>>("/v1/audit?limit=500")
        .await
        .unwrap()
        .items
}

/// Why the last issuance failed, as the audit trail says: the client gets
/// only a stable code, the provider's step and status are kept here.
async fn last_failure(s: &TestServer) -> String {
    audit(s)
        .await
        .into_iter()
        .rev()
        .find(|ev| ev.kind == "lease.apply_failed")
        .and_then(|ev| ev.reason)
        .unwrap_or_default()
}

const T0: Timestamp = Timestamp::from_millis(1_800_000_000_000);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_key_lives_for_its_task_only_and_never_past_its_end() {
    let clock = ManualClock::new(T0);
    let e = setup(Some(clock.clone()), "5s").await;
    let t = start_task_in(&e.s.admin(), "openai-agent", "agent").await;
    let l = issue(&e.s, &t).await.unwrap();
    let (provider, key, base, expires_at) = api_key(&l);
    assert_eq!(provider, EngineKind::Openai);
    assert_eq!(base, e.openai.base_url());
    assert_eq!(l.lease.state, LeaseState::Active);

    // At OpenAI: one service account named for this installation and lease,
    // one key, expiring exactly at the task's end (600 s from now).
    let name = format!("keymint-{}-{}", e.s.broker().installation_id(), l.lease.id);
    let accounts = e.openai.accounts();
    assert_eq!(accounts.len(), 1);
    assert_eq!(accounts[0].1, name);
    let keys = e.openai.keys();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].value, key);
    assert_eq!(e.openai.bodies()[0]["expires_in_seconds"], 600);
    assert_eq!(keys[0].expires_at, Some(t.expires_at.unix_seconds()));
    assert_eq!(expires_at, Some(t.expires_at.unix_seconds() as u64));
    assert!(keys[0].expires_at.unwrap() <= t.expires_at.unix_seconds());

    // keymint knows the key by its fingerprint, never in plain text.
    assert_eq!(
        l.lease.fingerprint,
        e.s.broker().keyring().fingerprint(key.as_bytes())
    );
    let stored =
        e.s.broker()
            .store()
            .get_lease(&l.lease.id)
            .await
            .unwrap()
            .unwrap();
    assert_eq!(stored.fingerprint, l.lease.fingerprint);
    assert_eq!(
        stored.engine_data["service_account"],
        accounts[0].0.as_str()
    );
    assert!(!stored.engine_data.to_string().contains(&key));

    assert_eq!(chat_status(&base, &key).await, 200);
    // The admin key is for keymint: it does no inference.
    assert_eq!(chat_status(&base, &e.admin_key).await, 401);

    // Task end: the key and its service account are deleted; OpenAI
    // refuses the key.
    end(&e.s, &t).await;
    assert!(e.openai.keys().is_empty());
    assert!(e.openai.accounts().is_empty());
    assert_eq!(chat_status(&base, &key).await, 401);
    let l2 =
        e.s.broker()
            .store()
            .get_lease(&l.lease.id)
            .await
            .unwrap()
            .unwrap();
    assert_eq!(l2.state, LeaseState::Revoked);
    let log = e.openai.log();
    assert!(
        log.iter()
            .any(|l| l.starts_with("DELETE ") && l.contains("/api_keys/"))
    );
    assert!(
        log.iter()
            .any(|l| l.starts_with("DELETE ") && l.contains("/service_accounts/"))
    );

    // Audited: issued (with the key's fingerprint) and revoked; the key and
    // the admin key appear nowhere in the trail.
    let events = audit(&e.s).await;
    let issued = events
        .iter()
        .find(|ev| ev.kind == "lease.issued" && ev.lease.as_deref() == Some(l.lease.id.as_str()))
        .unwrap();
    assert_eq!(
        issued.fingerprint.as_deref(),
        Some(l.lease.fingerprint.as_str())
    );
    assert!(
        events.iter().any(
            |ev| ev.kind == "lease.revoked" && ev.lease.as_deref() == Some(l.lease.id.as_str())
        )
    );
    let all = serde_json::to_string(&events).unwrap();
    assert!(!all.contains(&key) && !all.contains(&e.admin_key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_openai_keys_are_made_for_an_account_of_their_own() {
    let clock = ManualClock::new(T0);
    let e = setup(Some(clock.clone()), "5s").await;
    let t = start_task_in(&e.s.admin(), "openai-scoped", "agent").await;
    let l = issue(&e.s, &t).await.unwrap();
    let (_, key, base, _) = api_key(&l);
    let bodies = e.openai.bodies();
    // The account alone, then its key with the scopes and the expiry.
    assert_eq!(bodies[0]["create_service_account_only"], true);
    assert!(bodies[0].get("expires_in_seconds").is_none());
    assert_eq!(
        bodies[1]["scopes"],
        json!(["model.request", "api.model.read"])
    );
    assert_eq!(bodies[1]["expires_in_seconds"], 600);
    let keys = e.openai.keys();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].scopes, ["model.request", "api.model.read"]);
    assert_eq!(chat_status(&base, &key).await, 200);

    // The key expires with the task at OpenAI even if keymint is not there
    // to delete it.
    clock.advance_secs(601);
    assert_eq!(chat_status(&base, &key).await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_uses_the_key_unchanged_and_it_dies_with_the_command() {
    if !sdk().await {
        return;
    }
    let e = setup(None, "5s").await;
    for (role, base) in [
        ("openai-agent", e.openai.base_url()),
        ("openrouter-agent", e.openrouter.base_url()),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("key");
        let script = format!(
            r#"
import openai, os
c = openai.OpenAI(max_retries=0)
r = c.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "hi"}}])
assert r.choices[0].message.content == "Hello from the stand-in."
open({:?}, "w").write(os.environ["OPENAI_API_KEY"] + "\n" + os.environ["OPENAI_BASE_URL"])
"#,
            seen.display().to_string()
        );
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keymint"))
            .args([
                "run",
                "--role",
                role,
                "--workload",
                "python3",
                "--",
                "python3",
                "-c",
                &script,
            ])
            .env("KEYMINT_ADDR", e.s.url())
            .env("KEYMINT_TOKEN", &e.s.admin_token)
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("KEYMINT_AGENT_SOCKET")
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{role}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&seen).unwrap();
        let (key, got_base) = text.split_once('\n').unwrap();
        assert_eq!(got_base, base);
        assert!(!key.starts_with("kmt_"), "the provider's own key");
        // The command has exited: the provider refuses the key.
        assert_eq!(chat_status(&base, key).await, 401, "{role}");
        // The keymint command never printed it.
        assert!(!String::from_utf8_lossy(&out.stderr).contains(key));
        assert!(!String::from_utf8_lossy(&out.stdout).contains(key));
    }
    assert!(e.openai.keys().is_empty() && e.openai.accounts().is_empty());
    assert!(e.openrouter.keys().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openrouter_key_carries_the_budget_and_is_disabled_then_deleted() {
    let clock = ManualClock::new(T0);
    let e = setup(Some(clock.clone()), "5s").await;
    let t = start_task_in(&e.s.admin(), "openrouter-agent", "agent").await;
    let l = issue(&e.s, &t).await.unwrap();
    let (provider, key, base, expires_at) = api_key(&l);
    assert_eq!(provider, EngineKind::Openrouter);
    assert_eq!(base, e.openrouter.base_url());
    let body = &e.openrouter.bodies()[0];
    assert_eq!(body["limit"], 0.5);
    assert_eq!(body["limit_reset"], "daily");
    assert_eq!(body["expires_at"], t.expires_at.rfc3339());
    let keys = e.openrouter.keys();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].key, key);
    assert_eq!(keys[0].expires_at, Some(t.expires_at));
    assert_eq!(expires_at, Some(t.expires_at.unix_seconds() as u64));
    assert_eq!(
        keys[0].name,
        format!("keymint-{}-{}", e.s.broker().installation_id(), l.lease.id)
    );
    assert_eq!(chat_status(&base, &key).await, 200);
    assert_eq!(chat_status(&base, &e.management_key).await, 401);

    end(&e.s, &t).await;
    assert!(e.openrouter.keys().is_empty());
    assert_eq!(chat_status(&base, &key).await, 401);
    // Disabled first (so it stops even if the delete fails), then deleted.
    let log = e.openrouter.log();
    let patch = log
        .iter()
        .position(|l| l.starts_with("PATCH /api/v1/keys/"));
    let delete = log
        .iter()
        .position(|l| l.starts_with("DELETE /api/v1/keys/"));
    assert!(patch.is_some() && patch < delete, "{log:?}");
    assert_eq!(
        e.openrouter.bodies().last().unwrap(),
        &json!({"disabled": true})
    );
    let all = serde_json::to_string(&audit(&e.s).await).unwrap();
    assert!(!all.contains(&key) && !all.contains(&e.management_key));
}

/// Records a pending lease in `t` as a crash between the provider's answer
/// and activation leaves it (`data`: what prepare recorded, the name
/// filled in), and makes at the provider what the call made, with `make`.
async fn crashed_lease(e: &Env, t: &Task, engine: EngineKind, mut data: Value) -> String {
    let mut pending = keymint_store::conformance::lease(t, LeaseState::Pending, T0, 60);
    pending.engine = engine;
    pending.role = t.role.clone();
    data["name"] = json!(format!(
        "keymint-{}-{}",
        e.s.broker().installation_id(),
        pending.id
    ));
    pending.engine_data = data;
    let id = pending.id.clone();
    e.s.broker()
        .store()
        .insert_lease(
            &t.id,
            Box::new(move |_| Ok((pending, AuditDraft::new(T0, "lease.recorded", "admin")))),
        )
        .await
        .unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_minting_and_recording_is_healed_by_reconciliation() {
    let clock = ManualClock::new(T0);
    let e = setup(Some(clock.clone()), "5s").await;
    let inst = e.s.broker().installation_id().to_owned();

    // 1. The leases are on disk as pending; their keys exist at the
    //    providers but keymint never learnt their ids. Reconciliation (at
    //    start) revokes the leases, finding what they made by name.
    let t = start_task_in(&e.s.admin(), "openai-agent", "agent").await;
    let id = crashed_lease(
        &e,
        &t,
        EngineKind::Openai,
        json!({"admin_key": "openai-admin", "project": PROJECT}),
    )
    .await;
    let t2 = start_task_in(&e.s.admin(), "openrouter-agent", "agent").await;
    let or_id = crashed_lease(
        &e,
        &t2,
        EngineKind::Openrouter,
        json!({"management_key": "openrouter-mgmt"}),
    )
    .await;
    let or_made = e
        .openrouter
        .create_directly(&format!("keymint-{inst}-{or_id}"));
    let oa_made = e.openai.create_directly(
        &format!("keymint-{inst}-{id}"),
        Some(T0.unix_seconds() + 600),
    );
    assert_eq!(chat_status(&e.openai.base_url(), &oa_made.value).await, 200);
    assert_eq!(
        chat_status(&e.openrouter.base_url(), &or_made.key).await,
        200
    );

    clock.advance_secs(1);
    assert_eq!(e.s.broker().reconcile(clock.now()).await.unwrap(), 2);
    for lid in [&id, &or_id] {
        let l = e.s.broker().store().get_lease(lid).await.unwrap().unwrap();
        assert_eq!(l.state, LeaseState::Revoked, "{lid}");
        assert_eq!(l.end_reason, Some(EndReason::Reconciled));
    }
    assert_eq!(chat_status(&e.openai.base_url(), &oa_made.value).await, 401);
    assert_eq!(
        chat_status(&e.openrouter.base_url(), &or_made.key).await,
        401
    );

    // 2. No lease at all (the insert never committed): engine
    //    reconciliation lists keymint's names and removes the ones no live
    //    lease accounts for; names of another installation, or a person's,
    //    are never touched.
    let orphan = e
        .openai
        .create_directly(&format!("keymint-{inst}-lse_0000000000orphan1"), None);
    let foreign = e
        .openai
        .create_directly("keymint-ffffffffffffffff-lse_0000000000other01", None);
    let human = e.openai.create_directly("production backend", None);
    let or_orphan = e
        .openrouter
        .create_directly(&format!("keymint-{inst}-lse_0000000000orphan2"));
    let or_human = e.openrouter.create_directly("my laptop");
    // A live lease's key stays.
    let live = issue(
        &e.s,
        &start_task_in(&e.s.admin(), "openai-agent", "agent").await,
    )
    .await
    .unwrap();
    let live_key = api_key(&live).1;

    assert_eq!(e.s.broker().reconcile_engines().await.unwrap(), 2);
    let values: Vec<String> = e.openai.keys().into_iter().map(|k| k.value).collect();
    assert!(!values.contains(&orphan.value));
    for k in [&foreign.value, &human.value, &live_key] {
        assert!(values.contains(k));
    }
    let or_keys: Vec<String> = e.openrouter.keys().into_iter().map(|k| k.key).collect();
    assert!(!or_keys.contains(&or_orphan.key));
    assert_eq!(or_keys, vec![or_human.key.clone()]);
    let events = audit(&e.s).await;
    assert_eq!(
        events
            .iter()
            .filter(|ev| ev.kind == "credential.orphan_removed")
            .count(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_down_provider_fails_issuance_clearly_and_blocks_nothing_else() {
    let e = setup(None, "1s").await;
    let s = Arc::new(e.s);
    let t = start_task_in(&s.admin(), "openai-agent", "agent").await;
    let other = start_task_in(&s.admin(), "demo", "agent").await;

    // Slow: the admin call's deadline (the upstream's timeout) passes.
    e.openai.set_delay(std::time::Duration::from_secs(3));
    let slow = {
        let s = Arc::clone(&s);
        let t = t.clone();
        tokio::spawn(async move { issue(&s, &t).await })
    };
    // Meanwhile other issuance goes on: a token lease is issued while the
    // provider call is still waiting.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let tok: IssuedLease = issue(&s, &other).await.unwrap();
    assert!(matches!(tok.credential, Credential::Bearer { .. }));
    assert!(
        !slow.is_finished(),
        "the token lease did not wait for the provider"
    );
    let err = slow.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some("provider_unavailable"));
    let why = last_failure(&s).await;
    assert!(why.contains("no answer within"), "{why}");
    e.openai.set_delay(std::time::Duration::ZERO);

    // Down: a 503 from the Admin API.
    e.openai.set_down(Some(503));
    let err = issue(&s, &t).await.unwrap_err();
    assert_eq!(err.code(), Some("provider_unavailable"));
    let why = last_failure(&s).await;
    assert!(why.contains("HTTP 503"), "{why}");
    e.openrouter.set_down(Some(500));
    let t2 = start_task_in(&s.admin(), "openrouter-agent", "agent").await;
    let err = issue(&s, &t2).await.unwrap_err();
    assert_eq!(err.code(), Some("provider_unavailable"));
    let why = last_failure(&s).await;
    assert!(why.contains("openrouter"), "{why}");

    // Each failure is audited, and the failed leases are not active.
    let events = audit(&s).await;
    assert_eq!(
        events
            .iter()
            .filter(|ev| ev.kind == "lease.apply_failed")
            .count(),
        3
    );
    let leases: List<keymint_core::model::Lease> = s
        .admin()
        .get(&format!("/v1/leases?task={}", t.id))
        .await
        .unwrap();
    assert!(leases.items.iter().all(|l| l.state != LeaseState::Active));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_admin_key_is_a_clear_error_that_echoes_no_secret() {
    let e = setup(None, "5s").await;
    let wrong = fake_key("sk-admin-wrong");
    crate::set_upstream_key(&e.s.admin(), "openai-admin", &wrong).await;
    crate::set_upstream_key(&e.s.admin(), "openrouter-mgmt", &wrong).await;
    for role in ["openai-agent", "openrouter-agent"] {
        let t = start_task_in(&e.s.admin(), role, "agent").await;
        let err = issue(&e.s, &t).await.unwrap_err();
        assert!(
            matches!(err.code(), Some("issuance_failed" | "provider_unavailable")),
            "{role}: {err}"
        );
        let why = last_failure(&e.s).await;
        assert!(why.contains("was refused (HTTP 401)"), "{why}");
        let text = format!("{err} {why}");
        for secret in [&wrong, &e.admin_key, &e.management_key] {
            assert!(!text.contains(secret.as_str()), "{text}");
        }
        // The provider's body is never passed on.
        assert!(!text.contains("Incorrect API key") && !text.contains("Invalid management"));
    }
    assert!(e.openai.keys().is_empty() && e.openrouter.keys().is_empty());
    let all = serde_json::to_string(&audit(&e.s).await).unwrap();
    assert!(!all.contains(&wrong) && !all.contains(&e.admin_key));

    // The right key again: issuance works (the key is read at each use).
    crate::set_upstream_key(&e.s.admin(), "openai-admin", &e.admin_key).await;
    let t = start_task_in(&e.s.admin(), "openai-agent", "agent").await;
    issue(&e.s, &t).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_key_deletion_is_retried_until_the_provider_confirms() {
    let clock = ManualClock::new(T0);
    let e = setup(Some(clock.clone()), "5s").await;
    let t = start_task_in(&e.s.admin(), "openrouter-agent", "agent").await;
    let l = issue(&e.s, &t).await.unwrap();
    let (_, key, base, _) = api_key(&l);

    // The provider is down when the task ends: the lease stays `revoking`,
    // the failure is audited with its next attempt, nothing is dropped.
    e.openrouter.set_down(Some(503));
    end(&e.s, &t).await;
    let stuck =
        e.s.broker()
            .store()
            .get_lease(&l.lease.id)
            .await
            .unwrap()
            .unwrap();
    assert_eq!(stuck.state, LeaseState::Revoking);
    assert_eq!(stuck.revoke_attempts, 1);
    assert!(stuck.last_error.as_deref().unwrap().contains("HTTP 503"));
    assert_eq!(e.openrouter.keys().len(), 1);
    let failed = audit(&e.s).await;
    assert!(
        failed.iter().any(|ev| ev.kind == "lease.revoke_failed"
            && ev.lease.as_deref() == Some(l.lease.id.as_str()))
    );

    // Back up: the retry after the backoff deletes the key.
    e.openrouter.set_down(None);
    clock.advance_secs(2);
    e.s.broker().sweep(clock.now()).await.unwrap();
    // (The server's own expiry worker may have taken the retry: wait for
    // whichever did, with a deadline.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let cur =
            e.s.broker()
                .store()
                .get_lease(&l.lease.id)
                .await
                .unwrap()
                .unwrap();
        if cur.state == LeaseState::Revoked {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {:?}",
            cur.state
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(e.openrouter.keys().is_empty());
    assert_eq!(chat_status(&base, &key).await, 401);
}
