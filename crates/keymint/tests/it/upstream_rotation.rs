//! Rotation of the upstream keys keymint holds (docs/design/0035): under
//! continuous proxied load no request fails and the old key is deleted
//! only after every request moved to the new one; a new key that fails
//! its check leaves the old key in use; only the admin may rotate; the
//! schedule rotates by itself; a provider that cannot make keys takes the
//! operator's. No key ever reaches the audit trail, the logs or the CLI's
//! output.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use keymint_client::Client;
use keymint_core::SystemClock;
use keymint_core::inventory::{ItemStatus, Origin};
use keymint_core::keyring::Keyring;
use keymint_proto::UpstreamRotated;
use keymint_testkit::TestServer;
use keymint_testkit::anthropic_admin::FakeAnthropicAdmin;
use keymint_testkit::openrouter::{FakeOpenRouter, OpenRouterKey};
use serde_json::json;

use crate::{issue, start_task_in};

/// Everything every test here logs (tracing, all levels to debug), to look
/// for keys in.
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    static INIT: OnceLock<()> = OnceLock::new();
    let buf = LOGS.get_or_init(Mutex::default);
    INIT.get_or_init(|| {
        #[derive(Clone)]
        struct W;
        impl Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                logs().lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(|| W)
            .try_init();
    });
    buf
}

fn assert_nowhere(s: &TestServer, what: &[u8], secrets: &[&str]) {
    for k in secrets {
        assert!(
            !what.windows(k.len()).any(|w| w == k.as_bytes()),
            "a key was found in {}",
            s.url()
        );
    }
}

/// No key in the audit trail (the store's lines and the audit file) or
/// the logs.
async fn no_key_leaked(s: &TestServer, secrets: &[&str]) {
    let lines = s
        .broker()
        .store()
        .audit_lines_after(0, 100_000)
        .await
        .unwrap();
    let all: Vec<u8> = lines.iter().flat_map(|(_, l)| l.bytes()).collect();
    assert!(!all.is_empty());
    assert_nowhere(s, &all, secrets);
    if let Some(f) = &s.config.audit_file
        && let Ok(bytes) = std::fs::read(f)
    {
        assert_nowhere(s, &bytes, secrets);
    }
    let l = logs().lock().unwrap().clone();
    // The capture works: the rotation's own line is there.
    assert!(String::from_utf8_lossy(&l).contains("upstream key rotated"));
    assert_nowhere(s, &l, secrets);
}

fn keyring(s: &TestServer) -> Keyring {
    Keyring::from_root_hex(&std::fs::read_to_string(&s.config.root_key_file).unwrap()).unwrap()
}

/// The key the proxy would use now, as sealed in the store.
async fn sealed_key(s: &TestServer, upstream: &str) -> String {
    let name = format!("upstream/{upstream}/key");
    let sealed = s.broker().store().get_secret(&name).await.unwrap().unwrap();
    String::from_utf8(keyring(s).open(&name, &sealed).unwrap().to_vec()).unwrap()
}

async fn events(s: &TestServer, kind: &str) -> Vec<keymint_core::audit::AuditEvent> {
    s.broker()
        .store()
        .audit_after(0, 100_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == kind)
        .collect()
}

/// Waits for `cond` up to `secs`.
async fn eventually<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// `POST /v1/upstreams/{name}/rotate` as `c`, with `key` if given.
async fn rotate(c: &Client, upstream: &str, key: Option<&str>) -> keymint_client::RawResponse {
    let body = match key {
        Some(k) => json!({ "key": k }).to_string().into_bytes(),
        None => Vec::new(),
    };
    c.raw(
        http::Method::POST,
        &format!("/v1/upstreams/{upstream}/rotate"),
        Some("application/json"),
        body,
    )
    .await
    .unwrap()
}

fn openrouter_config(base: &str, extra: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "openrouter"
kind = "openai"
base_url = "{base}"
timeout = "20s"

[[upstreams]]
name = "openrouter-mgmt"
kind = "openai"
base_url = "{base}"

[[rotations]]
upstream = "openrouter"
provider = "openrouter"
admin_key = "openrouter-mgmt"
grace = "3s"
{extra}

[[roles]]
name = "chat"
engine = "token"
upstream = "openrouter"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
models = ["*"]
endpoints = ["chat.completions"]
"#
    )
}

struct Env {
    s: TestServer,
    or: FakeOpenRouter,
    first: keymint_testkit::openrouter::OpenRouterKey,
    management: String,
}

/// A fresh OpenRouter stand-in and its management key (random, made here).
async fn fake_openrouter() -> (String, FakeOpenRouter) {
    let _ = logs();
    let management = format!(
        "sk-or-mgmt-{}",
        keymint_core::token::random_base62(32).unwrap().as_str()
    );
    let or = FakeOpenRouter::start(&management, Arc::new(SystemClock))
        .await
        .unwrap();
    (management, or)
}

/// Gives `s` the management key and the key an operator made in
/// OpenRouter's console by hand; answers the latter.
async fn give_keys(s: &TestServer, management: &str, or: &FakeOpenRouter) -> OpenRouterKey {
    crate::set_upstream_key(&s.admin(), "openrouter-mgmt", management).await;
    let first = or.create_directly("set by hand");
    crate::set_upstream_key(&s.admin(), "openrouter", &first.key).await;
    first
}

async fn openrouter_env(extra: &str, toml_more: &str) -> Env {
    let (management, or) = fake_openrouter().await;
    let s = TestServer::builder()
        .config_toml(&format!(
            "{}{toml_more}",
            openrouter_config(&or.base_url(), extra)
        ))
        .start()
        .await
        .unwrap();
    let first = give_keys(&s, &management, &or).await;
    Env {
        s,
        or,
        first,
        management,
    }
}

async fn chat(c: &Client) -> u16 {
    c.raw(
        http::Method::POST,
        "/proxy/openrouter/chat/completions",
        Some("application/json"),
        json!({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
            .to_string()
            .into_bytes(),
    )
    .await
    .map_or(0, |r| r.status.as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_under_continuous_proxied_load_loses_no_request() {
    let e = openrouter_env("", "").await;
    let t = start_task_in(&e.s.admin(), "chat", "agent").await;
    let (_, tok) = issue(&e.s.admin(), &t.id).await;
    let client = e.s.client(&tok);
    assert_eq!(chat(&client).await, 200);

    // Two clients send requests the whole time: at most 20,000 or 60 s.
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(Vec::<u16>::new()));
    let mut loops = Vec::new();
    for _ in 0..2 {
        let (c, stop, st) = (client.clone(), Arc::clone(&stop), Arc::clone(&statuses));
        loops.push(tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                let code = chat(&c).await;
                let mut v = st.lock().unwrap();
                v.push(code);
                if v.len() >= 20_000 {
                    break;
                }
            }
        }));
    }
    let answered = || statuses.lock().unwrap().len();
    eventually(20, "requests before the rotation", || async {
        answered() >= 20
    })
    .await;

    let r = rotate(&e.s.admin(), "openrouter", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let done: UpstreamRotated = r.json().unwrap();
    assert!(done.created);
    assert_eq!(done.provider, "openrouter");
    assert_eq!(done.verified, "GET /key answered 200");
    let at_switch = answered();

    // The new key is the one the stand-in made for keymint, and the store
    // holds it.
    let new =
        e.or.keys()
            .into_iter()
            .find(|k| k.hash != e.first.hash)
            .expect("keymint made a key at the provider");
    assert!(new.name.starts_with("keymint rotation of openrouter"));
    assert_eq!(sealed_key(&e.s, "openrouter").await, new.key);
    assert_eq!(
        done.fingerprint,
        keyring(&e.s).fingerprint(new.key.as_bytes())
    );

    // The old key goes only after the grace period, under load.
    let deleted_by = Instant::now() + Duration::from_secs(3);
    eventually(20, "the old key deleted", || async {
        !e.or.keys().iter().any(|k| k.hash == e.first.hash)
    })
    .await;
    assert!(Instant::now() >= deleted_by - Duration::from_millis(500));
    let at_delete = answered();
    eventually(20, "requests after the deletion", || async {
        answered() >= at_delete + 20
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }

    let st = statuses.lock().unwrap().clone();
    assert!(
        st.len() > at_delete && at_delete > at_switch,
        "{} {at_switch} {at_delete}",
        st.len()
    );
    let failed: Vec<&u16> = st.iter().filter(|c| **c != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        st.len()
    );
    // The provider saw the old key, then the new one: after the first use
    // of the new key, the old one arrives at most once per client (a
    // request that read it before the switch and reached the provider
    // after another client's first new-key request), and never after its
    // deletion (it would have failed above).
    let used = e.or.used();
    let first_new = used
        .iter()
        .position(|h| *h == new.hash)
        .expect("the new key was used");
    assert!(used[..first_new].iter().all(|h| *h == e.first.hash));
    assert!(
        used[first_new..]
            .iter()
            .all(|h| *h == new.hash || *h == e.first.hash)
    );
    let late_old = used[first_new..]
        .iter()
        .filter(|h| **h == e.first.hash)
        .count();
    assert!(
        late_old <= 2,
        "{late_old} old-key requests after the first new-key one, with 2 clients"
    );
    assert_eq!(e.or.keys().len(), 1);

    // Every step audited, by fingerprint.
    eventually(10, "the revocation audited", || async {
        !events(&e.s, "upstream.old_key_revoked").await.is_empty()
    })
    .await;
    for kind in [
        "upstream.rotation_started",
        "upstream.key_created",
        "upstream.key_set",
        "upstream.rotated",
        "upstream.old_key_revoked",
    ] {
        assert!(!events(&e.s, kind).await.is_empty(), "no `{kind}` event");
    }
    let revoked = &events(&e.s, "upstream.old_key_revoked").await[0];
    assert_eq!(
        revoked.fingerprint.as_deref(),
        Some(keyring(&e.s).fingerprint(e.first.key.as_bytes()).as_str())
    );
    // The inventory: the old key's entry is revoked, the new one active
    // with when it was rotated.
    let items =
        e.s.broker()
            .store()
            .list_inventory(None, 100)
            .await
            .unwrap();
    let mine: Vec<_> = items
        .iter()
        .filter(|i| i.origin == Origin::Upstream && i.upstream.as_deref() == Some("openrouter"))
        .collect();
    let now_in_use = mine
        .iter()
        .find(|i| i.fingerprint == done.fingerprint)
        .unwrap();
    assert_eq!(now_in_use.status, ItemStatus::Active);
    assert_eq!(now_in_use.rotated_at, Some(done.rotated_at));
    let before = mine
        .iter()
        .find(|i| i.fingerprint == done.old_fingerprint)
        .unwrap();
    assert_eq!(before.status, ItemStatus::Revoked);
    no_key_leaked(&e.s, &[&e.first.key, &new.key, &e.management, &tok]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_key_that_fails_its_check_leaves_the_old_key_in_use() {
    let e = openrouter_env("", "").await;
    let t = start_task_in(&e.s.admin(), "chat", "agent").await;
    let (_, tok) = issue(&e.s.admin(), &t.id).await;
    let client = e.s.client(&tok);

    // The provider makes the key but does not accept it yet.
    e.or.set_key_check(Some(401));
    let r = rotate(&e.s.admin(), "openrouter", None).await;
    assert_eq!(r.status, 503, "{}", r.text());
    let body = r.text();
    assert!(body.contains("failed at `verify`"), "{body}");
    assert!(body.contains("the old key stays in use"), "{body}");
    e.or.set_key_check(None);
    // The key it made was deleted again; the old key is in use and works.
    assert_eq!(e.or.keys().len(), 1);
    assert_eq!(sealed_key(&e.s, "openrouter").await, e.first.key);
    assert_eq!(chat(&client).await, 200);
    assert_eq!(e.or.used().last(), Some(&e.first.hash));
    let failed = events(&e.s, "upstream.rotation_failed").await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].data["step"], "verify");
    assert_eq!(events(&e.s, "upstream.key_discarded").await.len(), 1);
    assert!(events(&e.s, "upstream.rotated").await.is_empty());

    // An operator's key the provider refuses: a 400, nothing changes.
    let bogus = format!(
        "sk-or-v1-{}",
        keymint_core::token::random_base62(48).unwrap().as_str()
    );
    let r = rotate(&e.s.admin(), "openrouter", Some(&bogus)).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(!r.text().contains(&bogus));
    assert_eq!(sealed_key(&e.s, "openrouter").await, e.first.key);
    assert_eq!(chat(&client).await, 200);
    // Not the key in use, not garbage.
    let r = rotate(&e.s.admin(), "openrouter", Some(&e.first.key)).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = rotate(&e.s.admin(), "openrouter", Some("has space\n")).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = rotate(&e.s.admin(), "nope", None).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(events(&e.s, "upstream.rotation_failed").await.len(), 2);

    // Then a rotation that works.
    let r = rotate(&e.s.admin(), "openrouter", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(chat(&client).await, 200);
    assert_ne!(e.or.used().last(), Some(&e.first.hash));
    no_key_leaked(&e.s, &[&e.first.key, &bogus, &e.management]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_admin_may_rotate() {
    let ops = tempfile::tempdir().unwrap();
    let more = format!(
        "\n[[operators]]\nname = \"alice\"\ntoken_file = {:?}\n",
        ops.path().join("alice.token").display().to_string()
    );
    let e = openrouter_env("", &more).await;
    let alice = std::fs::read_to_string(ops.path().join("alice.token"))
        .unwrap()
        .trim()
        .to_owned();
    let t = start_task_in(&e.s.admin(), "chat", "agent").await;
    let (_, tok) = issue(&e.s.admin(), &t.id).await;
    for c in [e.s.client(&alice), e.s.client(&tok)] {
        let r = rotate(&c, "openrouter", None).await;
        assert_eq!(r.status, 403, "{}", r.text());
    }
    let r = rotate(&e.s.anonymous(), "openrouter", None).await;
    assert_eq!(r.status, 401, "{}", r.text());
    // Nothing made, nothing switched, nothing started.
    assert_eq!(e.or.keys().len(), 1);
    assert_eq!(sealed_key(&e.s, "openrouter").await, e.first.key);
    assert!(events(&e.s, "upstream.rotation_started").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_rotation_fires() {
    let e = openrouter_env("rotate_every = \"2s\"", "").await;
    // The first key comes into the inventory with its rotation date, and
    // is rotated when it passes, by the duty holder.
    eventually(30, "a scheduled rotation", || async {
        !events(&e.s, "upstream.rotated").await.is_empty()
    })
    .await;
    let ev = &events(&e.s, "upstream.rotated").await[0];
    assert_eq!(ev.data["trigger"], "schedule");
    assert_eq!(ev.actor, "keymint");
    assert_ne!(sealed_key(&e.s, "openrouter").await, e.first.key);
    eventually(20, "the first key deleted", || async {
        !e.or.keys().iter().any(|k| k.hash == e.first.hash)
    })
    .await;
    // The new key's entry is due again `rotate_every` after it came in.
    let items =
        e.s.broker()
            .store()
            .list_inventory(None, 100)
            .await
            .unwrap();
    let fresh = items
        .iter()
        .find(|i| i.rotated_at.is_some() && i.upstream.as_deref() == Some("openrouter"))
        .unwrap();
    assert_eq!(
        fresh.rotate_by,
        fresh.rotated_at.map(|t| t.plus_millis(2000))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_cannot_make_keys_takes_the_operators_key() {
    let _ = logs();
    let admin = format!(
        "sk-ant-admin01-{}",
        keymint_core::token::random_base62(40).unwrap().as_str()
    );
    let ant = FakeAnthropicAdmin::start(&admin).await.unwrap();
    let base = ant.base_url();
    let s = TestServer::builder()
        .config_toml(&format!(
            r#"
[[upstreams]]
name = "claude"
kind = "anthropic"
base_url = "{base}"

[[upstreams]]
name = "anthropic-admin"
kind = "anthropic"
base_url = "{base}"

[[rotations]]
upstream = "claude"
provider = "anthropic"
admin_key = "anthropic-admin"
grace = "3s"
rotate_every = "90d"
"#
        ))
        .start()
        .await
        .unwrap();
    crate::set_upstream_key(&s.admin(), "anthropic-admin", &admin).await;
    let first = ant.create_key("first");
    let second = ant.create_key("second");
    crate::set_upstream_key(&s.admin(), "claude", &first.value).await;

    // Anthropic's Admin API cannot make keys: a clear refusal, nothing done.
    let r = rotate(&s.admin(), "claude", None).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let body = r.text();
    assert!(body.contains("cannot create API keys"), "{body}");
    assert!(body.contains("--key-file"), "{body}");
    assert!(events(&s, "upstream.rotation_started").await.is_empty());

    // The operator supplies the new key with the CLI.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("new.key");
    std::fs::write(&file, format!("{}\n", second.value)).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keymint"))
        .args(["upstream", "rotate", "claude", "--key-file"])
        .arg(&file)
        .args(["-o", "json"])
        .env("KEYMINT_ADDR", s.url())
        .env("KEYMINT_TOKEN", &s.admin_token)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for k in [&first.value, &second.value, &admin] {
        assert!(!stdout.contains(k.as_str()) && !stderr.contains(k.as_str()));
    }
    let done: UpstreamRotated = serde_json::from_str(&stdout).unwrap();
    assert!(!done.created);
    assert_eq!(done.provider, "anthropic");
    assert_eq!(done.verified, "GET /v1/models answered 200");
    assert_eq!(sealed_key(&s, "claude").await, second.value);

    // After the grace period the old key is set inactive, the new one not.
    eventually(20, "the old key inactive", || async {
        ant.keys()
            .iter()
            .any(|k| k.id == first.id && k.status == "inactive")
    })
    .await;
    assert!(
        ant.keys()
            .iter()
            .any(|k| k.id == second.id && k.status == "active")
    );
    // Audited once the provider answered.
    eventually(10, "the revocation audited", || async {
        !events(&s, "upstream.old_key_revoked").await.is_empty()
    })
    .await;
    let ev = &events(&s, "upstream.old_key_revoked").await[0];
    assert!(ev.data["detail"].as_str().unwrap().contains("set inactive"));
    // The new key's entry has its rotation date: 90 days on, so
    // `rotation_due` warns before it (keymint cannot rotate it alone).
    let items = s.broker().store().list_inventory(None, 100).await.unwrap();
    let fresh = items
        .iter()
        .find(|i| i.fingerprint == done.fingerprint)
        .unwrap();
    assert_eq!(
        fresh.rotate_by,
        Some(done.rotated_at.plus_secs(90 * 86_400))
    );
    assert!(fresh.revocation.contains("--key-file"));
    no_key_leaked(&s, &[&first.value, &second.value, &admin]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_key_is_rotated_through_a_service_account() {
    const PROJECT: &str = "proj_rotationTest01";
    let _ = logs();
    let admin = format!(
        "sk-admin-{}",
        keymint_core::token::random_base62(32).unwrap().as_str()
    );
    let openai = keymint_testkit::openai_admin::FakeOpenAiAdmin::start(
        &admin,
        PROJECT,
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    let base = openai.base_url();
    let s = TestServer::builder()
        .config_toml(&format!(
            r#"
[[upstreams]]
name = "openai"
kind = "openai"
base_url = "{base}"

[[upstreams]]
name = "openai-admin"
kind = "openai"
base_url = "{base}"

[[rotations]]
upstream = "openai"
provider = "openai"
admin_key = "openai-admin"
project = "{PROJECT}"
grace = "3s"
"#
        ))
        .start()
        .await
        .unwrap();
    crate::set_upstream_key(&s.admin(), "openai-admin", &admin).await;
    // A person's project key, made in the dashboard.
    let first = openai.create_project_key("by hand");
    crate::set_upstream_key(&s.admin(), "openai", &first.value).await;

    let r = rotate(&s.admin(), "openai", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let done: UpstreamRotated = r.json().unwrap();
    assert!(done.created);
    assert_eq!(done.verified, "GET /models answered 200");
    let in_use = sealed_key(&s, "openai").await;
    let made = openai
        .keys()
        .into_iter()
        .find(|k| k.value == in_use)
        .expect("the key in use is the one keymint made");
    assert!(!made.service_account.is_empty());
    // The person's key is found by its redacted form and deleted.
    eventually(20, "the first key deleted", || async {
        !openai.keys().iter().any(|k| k.id == first.id)
    })
    .await;

    // A key keymint made goes with its service account, by the reference
    // it kept.
    let r = rotate(&s.admin(), "openai", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    eventually(20, "the made key and its account deleted", || async {
        !openai.keys().iter().any(|k| k.id == made.id)
            && !openai
                .accounts()
                .iter()
                .any(|(id, _)| *id == made.service_account)
    })
    .await;
    assert_eq!(openai.keys().len(), 1);
    assert_eq!(openai.accounts().len(), 1);
    let last = sealed_key(&s, "openai").await;
    assert_eq!(openai.keys()[0].value, last);
    eventually(10, "both revocations audited", || async {
        events(&s, "upstream.old_key_revoked").await.len() == 2
    })
    .await;
    no_key_leaked(&s, &[&first.value, &made.value, &last, &admin]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotation_on_one_replica_reaches_the_other_before_the_old_key_goes() {
    let Some(db) = crate::replicas::fresh_database().await else {
        return;
    };
    let (management, or) = fake_openrouter().await;
    let toml = openrouter_config(&or.base_url(), "");
    let (mut rs, _dir) = crate::replicas::replicas(&db, Some(&toml), 2).await;
    let b = rs.pop().unwrap();
    let a = rs.pop().unwrap();
    let first = give_keys(&a, &management, &or).await;
    let t = start_task_in(&a.admin(), "chat", "agent").await;
    let (_, tok) = issue(&a.admin(), &t.id).await;
    // Requests go through replica B only, the whole time.
    let via_b = b.client(&tok);
    assert_eq!(chat(&via_b).await, 200);
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(Vec::<u16>::new()));
    let looping = {
        let (c, stop, st) = (via_b.clone(), Arc::clone(&stop), Arc::clone(&statuses));
        tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                let code = chat(&c).await;
                st.lock().unwrap().push(code);
            }
        })
    };
    let answered = || statuses.lock().unwrap().len();
    eventually(20, "requests before the rotation", || async {
        answered() >= 10
    })
    .await;

    // Rotated on replica A.
    let r = rotate(&a.admin(), "openrouter", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let new = or
        .keys()
        .into_iter()
        .find(|k| k.hash != first.hash)
        .unwrap();
    // B takes the new key within about a second, well before the old key
    // goes (3 s).
    let switched = Instant::now();
    eventually(10, "replica B on the new key", || async {
        or.used().last() == Some(&new.hash)
    })
    .await;
    assert!(switched.elapsed() < Duration::from_millis(2500));
    eventually(20, "the old key deleted", || async {
        !or.keys().iter().any(|k| k.hash == first.hash)
    })
    .await;
    let at_delete = answered();
    eventually(20, "requests after the deletion", || async {
        answered() >= at_delete + 10
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    looping.await.unwrap();
    let st = statuses.lock().unwrap().clone();
    assert!(st.iter().all(|c| *c == 200), "{st:?}");
    let used = or.used();
    let first_new = used.iter().position(|h| *h == new.hash).unwrap();
    assert!(used[..first_new].iter().all(|h| *h == first.hash));
    assert!(used[first_new..].iter().all(|h| *h == new.hash));
}

/// The old key's revocation is recorded in the store when the switch is
/// made: a server stopped during the grace period does not drop it, and the
/// next one started on the same data revokes the old key when it is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_the_grace_period_still_revokes_the_old_key() {
    let (management, or) = fake_openrouter().await;
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        TestServer::builder()
            .data_dir(dir.path())
            .config_toml(&openrouter_config(&or.base_url(), ""))
            .start()
    };
    let s = start().await.unwrap();
    let first = give_keys(&s, &management, &or).await;
    let r = rotate(&s.admin(), "openrouter", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Stopped at once, and left stopped past the grace period (3 s): the
    // revocation waits in the store, not in a task of the stopped process
    // (which a kill -9 would take with it).
    s.stop().await;
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    assert!(
        or.keys().iter().any(|k| k.hash == first.hash),
        "nothing revokes the old key while no server runs"
    );
    let s = start().await.unwrap();
    eventually(20, "the old key deleted after the restart", || async {
        !or.keys().iter().any(|k| k.hash == first.hash)
    })
    .await;
    eventually(10, "the revocation audited", || async {
        !events(&s, "upstream.old_key_revoked").await.is_empty()
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(
        events(&s, "upstream.old_key_revoked").await.len(),
        1,
        "revoked once"
    );
    s.stop().await;
}

/// The stored list of old keys waiting for their revocation
/// (`upstream/<name>/retiring`, sealed), as a crashed process leaves it.
async fn retiring(s: &TestServer, upstream: &str) -> Vec<serde_json::Value> {
    let name = format!("upstream/{upstream}/retiring");
    match s.broker().store().get_secret(&name).await.unwrap() {
        None => Vec::new(),
        Some(sealed) => serde_json::from_slice(&keyring(s).open(&name, &sealed).unwrap()).unwrap(),
    }
}

async fn put_retiring(s: &TestServer, upstream: &str, list: &serde_json::Value) {
    let name = format!("upstream/{upstream}/retiring");
    let sealed = keyring(s)
        .seal(&name, &serde_json::to_vec(list).unwrap())
        .unwrap();
    s.broker()
        .store()
        .put_secret(&name, sealed, keymint_core::Clock::now(&SystemClock))
        .await
        .unwrap();
}

/// A provider that fails the old key's deletion: every attempt is audited
/// with its number and the next attempt's time, the key stays listed as
/// retiring, and once the provider answers again it is deleted and the
/// revocation audited once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_revocation_of_the_old_key_is_retried_until_the_provider_confirms() {
    let e = openrouter_env("", "").await;
    let r = rotate(&e.s.admin(), "openrouter", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The provider's key API is down from now on (the grace period is 3 s).
    e.or.set_down(Some(503));
    eventually(30, "two failed attempts", || async {
        events(&e.s, "upstream.old_key_revoke_failed").await.len() >= 2
    })
    .await;
    let failed = events(&e.s, "upstream.old_key_revoke_failed").await;
    assert_eq!(failed[0].data["attempt"], 1);
    assert_eq!(failed[1].data["attempt"], 2);
    assert!(failed[0].data["next_attempt_at"].is_string());
    assert!(
        failed[0]
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("tried again"),
        "{failed:?}"
    );
    assert!(e.or.keys().iter().any(|k| k.hash == e.first.hash));
    assert_eq!(retiring(&e.s, "openrouter").await.len(), 1);
    assert!(events(&e.s, "upstream.old_key_revoked").await.is_empty());

    e.or.set_down(None);
    eventually(30, "the old key deleted", || async {
        !e.or.keys().iter().any(|k| k.hash == e.first.hash)
    })
    .await;
    eventually(
        10,
        "the revocation audited and the list emptied",
        || async {
            !events(&e.s, "upstream.old_key_revoked").await.is_empty()
                && retiring(&e.s, "openrouter").await.is_empty()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let done = events(&e.s, "upstream.old_key_revoked").await;
    assert_eq!(done.len(), 1, "revoked once");
    assert!(done[0].data["attempt"].as_u64().unwrap() >= 3);
    no_key_leaked(&e.s, &[&e.first.key, &e.management]).await;
}

/// A server stopped while its call to delete the old key is under way: the
/// entry stays in the store, claimed; the next server takes it up once the
/// claim runs out and the revocation is confirmed (deleted, or no longer
/// listed because the interrupted call did delete it), audited once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_revocation_is_taken_up_by_the_next_server() {
    let (management, or) = fake_openrouter().await;
    let dir = tempfile::tempdir().unwrap();
    // Admin calls end after 3 s: a claim lasts 2 calls and 5 s (11 s).
    let toml = openrouter_config(&or.base_url(), "").replacen(
        "name = \"openrouter-mgmt\"",
        "name = \"openrouter-mgmt\"\ntimeout = \"3s\"",
        1,
    );
    let start = || {
        TestServer::builder()
            .data_dir(dir.path())
            .config_toml(&toml)
            .start()
    };
    let s = start().await.unwrap();
    let first = give_keys(&s, &management, &or).await;
    let r = rotate(&s.admin(), "openrouter", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The provider answers slowly; the server is stopped while it waits.
    or.set_delay(Duration::from_secs(2));
    eventually(20, "the revocation claimed", || async {
        retiring(&s, "openrouter")
            .await
            .first()
            .is_some_and(|r| r["claimed_until_ms"].as_i64().unwrap_or(0) > 0)
    })
    .await;
    s.stop().await;
    or.set_delay(Duration::ZERO);
    let s = start().await.unwrap();
    assert_eq!(
        retiring(&s, "openrouter").await.len(),
        1,
        "kept in the store"
    );
    eventually(40, "the revocation confirmed after the restart", || async {
        retiring(&s, "openrouter").await.is_empty()
    })
    .await;
    assert!(!or.keys().iter().any(|k| k.hash == first.hash));
    assert_eq!(events(&s, "upstream.old_key_revoked").await.len(), 1);
    s.stop().await;
}

/// What a rotation that died around its switch leaves: the old key's entry
/// written before the switch, not confirmed. If the switch happened (the
/// key in use is another), the old key is revoked; if it did not (the key
/// is still in use), it is never revoked, and the entry is dropped with an
/// audit once the rotation surely ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_that_died_around_its_switch_neither_loses_nor_misdirects_the_revocation() {
    let (management, or) = fake_openrouter().await;
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        TestServer::builder()
            .data_dir(dir.path())
            .config_toml(&openrouter_config(&or.base_url(), ""))
            .start()
    };
    let s = start().await.unwrap();
    crate::set_upstream_key(&s.admin(), "openrouter-mgmt", &management).await;
    let old = or.create_directly("switched away from");
    let in_use = or.create_directly("never switched away from");
    crate::set_upstream_key(&s.admin(), "openrouter", &in_use.key).await;
    let kr = keyring(&s);
    let now = keymint_core::Clock::now(&SystemClock).millis();
    let hint = |k: &str| keymint_core::inventory::hint(k, 8);
    put_retiring(
        &s,
        "openrouter",
        &json!([
            // Written, then the switch, then the crash.
            {"fingerprint": kr.fingerprint(old.key.as_bytes()), "hint": hint(&old.key),
             "actor": "admin", "due_ms": now, "switched": false, "written_ms": now},
            // Written, then the crash before the switch (long ago).
            {"fingerprint": kr.fingerprint(in_use.key.as_bytes()), "hint": hint(&in_use.key),
             "actor": "admin", "due_ms": now, "switched": false, "written_ms": now - 200_000},
        ]),
    )
    .await;
    s.stop().await;
    let s = start().await.unwrap();
    eventually(20, "the switched-away key deleted", || async {
        !or.keys().iter().any(|k| k.hash == old.hash)
    })
    .await;
    eventually(10, "both entries handled", || async {
        retiring(&s, "openrouter").await.is_empty()
    })
    .await;
    assert!(or.keys().iter().any(|k| k.hash == in_use.hash));
    assert_eq!(sealed_key(&s, "openrouter").await, in_use.key);
    let kept = events(&s, "upstream.old_key_kept").await;
    assert_eq!(kept.len(), 1);
    assert_eq!(
        kept[0].fingerprint.as_deref(),
        Some(kr.fingerprint(in_use.key.as_bytes()).as_str())
    );
    assert_eq!(events(&s, "upstream.old_key_revoked").await.len(), 1);
    s.stop().await;
}

/// On PostgreSQL a failed rotation releases its lock: it is retried at once
/// (on another replica too), while two rotations at the same time are
/// still one too many.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_rotation_on_postgresql_can_be_retried_at_once() {
    let Some(db) = crate::replicas::fresh_database().await else {
        return;
    };
    let (management, or) = fake_openrouter().await;
    let toml = openrouter_config(&or.base_url(), "");
    let (mut rs, _dir) = crate::replicas::replicas(&db, Some(&toml), 2).await;
    let b = rs.pop().unwrap();
    let a = rs.pop().unwrap();
    give_keys(&a, &management, &or).await;

    or.set_key_check(Some(401));
    let r = rotate(&a.admin(), "openrouter", None).await;
    assert_eq!(r.status, 503, "{}", r.text());
    or.set_key_check(None);
    // At once, on the same replica and on the other.
    let r = rotate(&a.admin(), "openrouter", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = rotate(&b.admin(), "openrouter", None).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Two at once: the provider is slow, one of them is refused.
    or.set_delay(Duration::from_millis(1500));
    let (ca, cb) = (a.admin(), b.admin());
    let (ra, rb) = tokio::join!(
        rotate(&ca, "openrouter", None),
        rotate(&cb, "openrouter", None)
    );
    or.set_delay(Duration::ZERO);
    let mut st = [ra.status.as_u16(), rb.status.as_u16()];
    st.sort_unstable();
    // The loser collides with work under way: 409 `conflict`, not a
    // malformed request.
    assert_eq!(st, [200, 409], "{} {}", ra.text(), rb.text());
    let refused = if ra.status == 409 { &ra } else { &rb };
    assert!(
        refused.text().contains("already under way")
            && refused.text().contains("\"code\":\"conflict\""),
        "{}",
        refused.text()
    );
    a.stop().await;
    b.stop().await;
}
