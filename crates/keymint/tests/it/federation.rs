//! Provider federation (docs/design/0028-provider-federation.md): keymint
//! signs a JWT for the task and trades it at the provider's token endpoint
//! (OpenAI RFC 8693, Anthropic RFC 7523, OpenRouter RFC 8693) for the
//! provider's short-lived token; the proxy serves an upstream with no
//! static key on a token it obtains and refreshes itself. The stand-in
//! verifies keymint's JWT against keymint's JWKS, fetched over HTTP, as the
//! providers do, and refuses its tokens after they expire.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keymint_core::{Clock, ManualClock, Timestamp};
use keymint_proto::{Credential, IssueLease, IssuedLease, List, RenewLease, Task};
use keymint_testkit::TestServer;
use keymint_testkit::federation::{
    ANTHROPIC_ORG, ANTHROPIC_RULE, ANTHROPIC_SERVICE_ACCOUNT, FakeFederation, OPENAI_IDP,
    OPENAI_SERVICE_ACCOUNT, OPENROUTER_POLICY,
};
use serde_json::{Value, json};

use crate::start_task_in;

const T0: Timestamp = Timestamp::from_millis(1_800_000_000_000);
const OPENAI_AUD: &str = "https://api.openai.com/v1";
const ANTHROPIC_AUD: &str = "https://api.anthropic.com";
const OPENROUTER_AUD: &str = "https://openrouter.ai";

fn config(f: &str) -> String {
    format!(
        r#"
[[roles]]
name = "openai-fed"
engine = "federated"
scopes = []
default_ttl = "10m"
max_ttl = "1h"
[roles.federated]
provider = "openai"
audience = "{OPENAI_AUD}"
token_url = "{f}/oauth/token"
api_base_url = "{f}/v1"
identity_provider_id = "{OPENAI_IDP}"
service_account_id = "{OPENAI_SERVICE_ACCOUNT}"
timeout_secs = 1

[[roles]]
name = "claude-fed"
engine = "federated"
scopes = []
default_ttl = "10m"
max_ttl = "1h"
[roles.federated]
provider = "anthropic"
audience = "{ANTHROPIC_AUD}"
api_base_url = "{f}"
token_url = "{f}/v1/oauth/token"
federation_rule_id = "{ANTHROPIC_RULE}"
organization_id = "{ANTHROPIC_ORG}"
service_account_id = "{ANTHROPIC_SERVICE_ACCOUNT}"
algorithm = "ES256"

[[roles]]
name = "openrouter-fed"
engine = "federated"
scopes = []
default_ttl = "10m"
max_ttl = "1h"
[roles.federated]
provider = "openrouter"
audience = "{OPENROUTER_AUD}"
token_url = "{f}/api/v1/oauth/token"
api_base_url = "{f}/api/v1"
federation_policy_id = "{OPENROUTER_POLICY}"

[[roles]]
name = "openai-wrong-aud"
engine = "federated"
scopes = []
default_ttl = "10m"
max_ttl = "1h"
[roles.federated]
provider = "openai"
audience = "https://someone-else.example"
token_url = "{f}/oauth/token"
api_base_url = "{f}/v1"
identity_provider_id = "{OPENAI_IDP}"
service_account_id = "{OPENAI_SERVICE_ACCOUNT}"

[[roles]]
name = "plain-jwt"
engine = "jwt"
scopes = []
default_ttl = "10m"
max_ttl = "1h"
[roles.jwt]
audience = "{OPENAI_AUD}"
algorithm = "RS256"

[[upstreams]]
name = "claude"
kind = "anthropic"
base_url = "{f}"
timeout = "5s"
[upstreams.federation]
provider = "anthropic"
audience = "{ANTHROPIC_AUD}"
token_url = "{f}/v1/oauth/token"
federation_rule_id = "{ANTHROPIC_RULE}"
organization_id = "{ANTHROPIC_ORG}"
service_account_id = "{ANTHROPIC_SERVICE_ACCOUNT}"
timeout_secs = 1

[[roles]]
name = "claude-proxy"
engine = "token"
upstream = "claude"
scopes = []
default_ttl = "10m"
max_ttl = "1h"
[roles.proxy]
models = ["claude-*"]
endpoints = ["messages"]
"#
    )
}

struct Env {
    s: TestServer,
    f: FakeFederation,
}

async fn setup(clock: Option<ManualClock>) -> Env {
    let c: Arc<dyn Clock> = match &clock {
        Some(m) => Arc::new(m.clone()),
        None => Arc::new(keymint_core::SystemClock),
    };
    let f = FakeFederation::start(c).await.unwrap();
    let mut b = TestServer::builder().config_toml(&config(&f.url()));
    if let Some(m) = clock {
        b = b.clock(m);
    }
    let s = b.start().await.unwrap();
    Env { s, f }
}

async fn issue(s: &TestServer, t: &Task) -> Result<IssuedLease, keymint_client::ClientError> {
    s.admin()
        .post(
            &format!("/v1/tasks/{}/leases", t.id),
            &IssueLease::default(),
        )
        .await
}

async fn audit(s: &TestServer) -> Vec<keymint_proto::AuditEvent> {
    s.admin()
        .get::<List<keymint_proto::AuditEvent>>("/v1/audit?limit=500")
        .await
        .unwrap()
        .items
}

fn token(l: &IssuedLease) -> (String, String, u64) {
    match &l.credential {
        Credential::ProviderToken {
            access_token,
            base_url,
            expires_at,
            ..
        } => (
            access_token.expose().to_owned(),
            base_url.clone(),
            *expires_at,
        ),
        other => panic!("not a provider token: {other:?}"),
    }
}

/// POSTs `body` to `url` with `headers`; the status and JSON body.
async fn post(url: &str, headers: &[(&str, &str)], body: Value) -> (u16, Value) {
    let http = keymint_client::http::HttpClient::builder().build().unwrap();
    let mut req = http::Request::builder()
        .method(http::Method::POST)
        .uri(url)
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(bytes::Bytes::from(body.to_string())).unwrap();
    let r = http.send(req).await.unwrap();
    (
        r.status.as_u16(),
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

async fn use_token(f: &FakeFederation, provider: &str, tok: &str) -> u16 {
    let bearer = format!("Bearer {tok}");
    let h = [("authorization", bearer.as_str())];
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    match provider {
        "openai" => {
            post(&format!("{}/v1/chat/completions", f.url()), &h, chat)
                .await
                .0
        }
        "openrouter" => {
            post(&format!("{}/api/v1/chat/completions", f.url()), &h, chat)
                .await
                .0
        }
        _ => {
            post(
                &format!("{}/v1/messages", f.url()),
                &h,
                json!({"model": "claude-sonnet-4-5", "max_tokens": 16,
                    "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await
            .0
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_provider_verifies_keymints_jwt_and_its_token_dies_on_time() {
    let clock = ManualClock::new(T0);
    let e = setup(Some(clock.clone())).await;
    e.f.trust(&e.s.url(), OPENAI_AUD).unwrap();
    let mut seen = Vec::new();
    for (role, provider, aud, base) in [
        (
            "openai-fed",
            "openai",
            OPENAI_AUD,
            format!("{}/v1", e.f.url()),
        ),
        ("claude-fed", "anthropic", ANTHROPIC_AUD, e.f.url()),
        (
            "openrouter-fed",
            "openrouter",
            OPENROUTER_AUD,
            format!("{}/api/v1", e.f.url()),
        ),
    ] {
        // As each provider is told to trust keymint for its audience.
        e.f.trust(&e.s.url(), aud).unwrap();
        let t = start_task_in(&e.s.admin(), role, "ci/agent-7").await;
        let l = issue(&e.s, &t).await.unwrap();
        let (tok, got_base, expires_at) = token(&l);
        assert_eq!(got_base, base, "{role}");
        assert_eq!(
            l.lease.revocability,
            keymint_core::model::Revocability::ExpireOnly,
            "{role}"
        );
        // The lease is known by the provider's token, so a leaked token
        // names its lease.
        assert_eq!(
            l.lease.fingerprint,
            e.s.broker().keyring().fingerprint(tok.as_bytes())
        );
        // What the provider verified: keymint's JWT for this task.
        let x = e.f.exchanges().into_iter().last().unwrap();
        assert_eq!(x.provider, provider);
        assert_eq!(x.token, tok);
        assert_eq!(x.claims["iss"], e.s.url());
        assert_eq!(x.claims["sub"], "ci/agent-7");
        assert_eq!(x.claims["aud"], aud);
        assert_eq!(x.claims["task_id"], t.id.as_str());
        assert_eq!(x.claims["jti"], l.lease.id.as_str());
        assert!(x.claims["exp"].as_i64().unwrap() <= t.expires_at.unix_seconds());
        assert_eq!(expires_at as i64, x.expires_at.unix_seconds());
        assert!(expires_at as i64 <= t.expires_at.unix_seconds());
        // The provider takes it on its API, and refuses it once expired.
        assert_eq!(use_token(&e.f, provider, &tok).await, 200, "{role}");
        seen.push((provider, tok));
    }
    clock.advance_secs(601);
    for (provider, tok) in &seen {
        assert_eq!(use_token(&e.f, provider, tok).await, 401, "{provider}");
    }
    let kinds: Vec<String> = audit(&e.s).await.into_iter().map(|ev| ev.kind).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "lease.issued").count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_and_wrong_audience_jwts_are_refused() {
    let e = setup(None).await;
    e.f.trust(&e.s.url(), OPENAI_AUD).unwrap();
    let exchange = |jwt: &str| {
        json!({"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "subject_token": jwt, "identity_provider_id": OPENAI_IDP,
            "service_account_id": OPENAI_SERVICE_ACCOUNT})
    };
    let url = format!("{}/oauth/token", e.f.url());
    // A genuine keymint JWT for the audience is good once.
    let t = start_task_in(&e.s.admin(), "plain-jwt", "ci/agent-7").await;
    let l = issue(&e.s, &t).await.unwrap();
    let jwt = l.credential.secret().expose().to_owned();
    assert_eq!(post(&url, &[], exchange(&jwt)).await.0, 200);
    // Replayed: refused.
    let (st, body) = post(&url, &[], exchange(&jwt)).await;
    assert_eq!(st, 401);
    assert_eq!(body["error"], "invalid_grant");
    // Forged: the payload changed under the signature.
    let t2 = start_task_in(&e.s.admin(), "plain-jwt", "ci/agent-7").await;
    let l2 = issue(&e.s, &t2).await.unwrap();
    let parts: Vec<&str> = l2.credential.secret().expose().split('.').collect();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    claims["sub"] = json!("ci/admin");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(claims.to_string()),
        parts[2]
    );
    assert_eq!(post(&url, &[], exchange(&forged)).await.0, 401);
    // `alg: none`.
    let none = format!(
        "{}.{}.",
        b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        parts[1]
    );
    assert_eq!(post(&url, &[], exchange(&none)).await.0, 401);
    assert!(
        e.f.refusals()
            .iter()
            .filter(|r| r.contains("does not verify"))
            .count()
            >= 2
    );

    // A role whose JWT names another audience: the provider refuses, the
    // issuance fails with a stable code, nothing of the JWT or the
    // provider's body is echoed, and the failure is audited.
    let t3 = start_task_in(&e.s.admin(), "openai-wrong-aud", "ci/agent-7").await;
    let err = issue(&e.s, &t3).await.unwrap_err();
    let shown = format!("{err:?} {err}");
    assert!(!shown.contains("refused by the stand-in"), "{shown}");
    assert!(!shown.contains("eyJ"), "{shown}");
    let failed = audit(&e.s)
        .await
        .into_iter()
        .rev()
        .find(|ev| ev.kind == "lease.apply_failed")
        .and_then(|ev| ev.reason)
        .unwrap_or_default();
    assert!(
        failed.contains("openai refused the token exchange: HTTP 401 (invalid_grant)"),
        "{failed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_would_outlive_the_task_is_not_handed_out() {
    let clock = ManualClock::new(T0);
    let e = setup(Some(clock.clone())).await;
    e.f.trust(&e.s.url(), OPENAI_AUD).unwrap();
    // The provider would grant an hour; the task has ten minutes.
    e.f.set_token_secs(3600);
    let t = start_task_in(&e.s.admin(), "openai-fed", "agent").await;
    let err = issue(&e.s, &t).await.unwrap_err();
    assert!(err.code().is_some(), "{err:?}");
    let failed = audit(&e.s)
        .await
        .into_iter()
        .rev()
        .find(|ev| ev.kind == "lease.apply_failed")
        .and_then(|ev| ev.reason)
        .unwrap_or_default();
    assert!(failed.contains("past the task's end"), "{failed}");
    // OpenRouter caps its token at the JWT, which keymint caps at the task.
    e.f.trust(&e.s.url(), OPENROUTER_AUD).unwrap();
    let t = start_task_in(&e.s.admin(), "openrouter-fed", "agent").await;
    let (_, _, exp) = token(&issue(&e.s, &t).await.unwrap());
    assert!(exp as i64 <= t.expires_at.unix_seconds());
    assert_eq!(exp as i64, T0.unix_seconds() + 600);
}

/// A sub-task ends with its parent, and follows only the parent's hard end;
/// its holder is another workload, which the parent's supervisor does not
/// take down with it (`keymint run`'s idle timeout). So a credential that
/// cannot be taken back (a workload JWT, a provider's federated token)
/// issued in a sub-task never outlives the earliest deadline of the task's
/// ancestors, idle timeout included (DESIGN.md invariants 1 and 6), as SSH
/// certificates already did; once an ancestor is past its deadline nothing
/// more is issued under it. Before, both lived to the sub-task's hard end,
/// ten minutes after a parent that went quiet within one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_only_credentials_in_a_sub_task_never_outlive_the_parents_deadline() {
    let clock = ManualClock::new(T0);
    let e = setup(Some(clock.clone())).await;
    e.f.trust(&e.s.url(), OPENAI_AUD).unwrap();
    let admin = e.s.admin();
    let tree = |role: &'static str| {
        let admin = admin.clone();
        async move {
            let parent: Task = admin
                .post(
                    "/v1/tasks",
                    &keymint_proto::StartTask {
                        workload: Some("supervisor".into()),
                        role: Some(role.into()),
                        ttl_secs: Some(600),
                        idle_timeout_secs: Some(60),
                        ..keymint_proto::StartTask::default()
                    },
                )
                .await
                .unwrap();
            let child: Task = admin
                .post(
                    "/v1/tasks",
                    &keymint_proto::StartTask {
                        workload: Some("sub-agent".into()),
                        parent: Some(parent.id.clone()),
                        ..keymint_proto::StartTask::default()
                    },
                )
                .await
                .unwrap();
            assert_eq!(child.expires_at, parent.expires_at);
            (parent, child)
        }
    };
    let parent_deadline = T0.plus_secs(60);

    // A workload JWT: `exp` at the parent's idle deadline, not the
    // sub-task's hard end.
    let (_, child) = tree("plain-jwt").await;
    let l = issue(&e.s, &child).await.unwrap();
    assert!(
        l.lease.expires_at <= parent_deadline,
        "{} > {}",
        l.lease.expires_at.rfc3339(),
        parent_deadline.rfc3339()
    );
    let jwt = l.credential.secret().expose().to_owned();
    use base64::Engine as _;
    let payload = jwt.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert!(claims["exp"].as_i64().unwrap() <= parent_deadline.unix_seconds());
    // Asked for past it: refused, as in the parent itself.
    let err =
        e.s.admin()
            .post::<_, IssuedLease>(
                &format!("/v1/tasks/{}/leases", child.id),
                &IssueLease {
                    ttl_secs: Some(300),
                    ..IssueLease::default()
                },
            )
            .await
            .unwrap_err();
    assert_eq!(err.code(), Some("ttl_exceeds_limit"), "{err}");

    // A provider token that would live past the parent's deadline is not
    // handed out; one that dies before it is.
    let (_, child) = tree("openai-fed").await;
    e.f.set_token_secs(300);
    let before = e.f.exchanges().len();
    let err = issue(&e.s, &child).await.unwrap_err();
    assert!(err.code().is_some(), "{err:?}");
    assert_eq!(e.f.exchanges().len(), before + 1);
    e.f.set_token_secs(45);
    let (_, _, exp) = token(&issue(&e.s, &child).await.unwrap());
    assert!(exp as i64 <= parent_deadline.unix_seconds());

    // Past the parent's deadline, nothing more is issued in the sub-task
    // (whether or not the sweeper has ended the tree yet).
    let (_, child) = tree("plain-jwt").await;
    clock.advance_secs(61);
    let err = issue(&e.s, &child).await.unwrap_err();
    assert!(
        err.status().is_some_and(|s| (400..500).contains(&s)),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_outage_fails_issuance_promptly_and_is_audited() {
    let e = setup(None).await;
    e.f.trust(&e.s.url(), OPENAI_AUD).unwrap();
    e.f.set_down(Some(503));
    let t = start_task_in(&e.s.admin(), "openai-fed", "agent").await;
    let err = issue(&e.s, &t).await.unwrap_err();
    assert_eq!(err.code(), Some("provider_unavailable"), "{err:?}");
    e.f.set_down(None);
    // Slower than the role's 1 s deadline: refused within it, not hung.
    e.f.set_delay(Duration::from_secs(5));
    let t = start_task_in(&e.s.admin(), "openai-fed", "agent").await;
    let started = Instant::now();
    let err = issue(&e.s, &t).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(err.code(), Some("provider_unavailable"), "{err:?}");
    let reasons: Vec<String> = audit(&e.s)
        .await
        .into_iter()
        .filter(|ev| ev.kind == "lease.apply_failed")
        .filter_map(|ev| ev.reason)
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("HTTP 503")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("no answer within 1 s")),
        "{reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_and_provider_tokens_refuse_renewal_clearly() {
    let e = setup(None).await;
    e.f.trust(&e.s.url(), OPENAI_AUD).unwrap();
    for role in ["plain-jwt", "openai-fed"] {
        let t = start_task_in(&e.s.admin(), role, "agent").await;
        let l = issue(&e.s, &t).await.unwrap();
        let err =
            e.s.admin()
                .post::<_, Value>(
                    &format!("/v1/leases/{}/renew", l.lease.id),
                    &RenewLease {
                        increment_secs: Some(60),
                    },
                )
                .await
                .unwrap_err();
        assert_eq!(err.code(), Some("invalid_request"), "{role}: {err:?}");
        assert!(err.to_string().contains("issue a new lease"), "{err}");
        let lease: keymint_proto::Lease =
            e.s.admin()
                .get(&format!("/v1/leases/{}", l.lease.id))
                .await
                .unwrap();
        assert_eq!(lease.expires_at, l.lease.expires_at, "{role}: unchanged");
    }
    assert!(
        audit(&e.s)
            .await
            .iter()
            .any(|ev| ev.kind == "lease.renew_denied")
    );
}

/// Whether python3 with both SDKs is here; fails under CI if not.
async fn sdks() -> bool {
    let ok = tokio::process::Command::new("python3")
        .args(["-c", "import openai, anthropic"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            !crate::postgres::in_ci(),
            "python3 with the `openai` and `anthropic` packages is required in CI"
        );
        eprintln!("skipping: python3 with `openai` and `anthropic` is not installed");
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdks_use_federated_tokens_through_keymint_run() {
    if !sdks().await {
        return;
    }
    let clock = ManualClock::new(T0);
    let e = setup(Some(clock.clone())).await;
    let scripts = [
        (
            "openai-fed",
            OPENAI_AUD,
            r#"
import openai, os
c = openai.OpenAI(max_retries=0)
r = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
assert r.choices[0].message.content == "Hello from the stand-in."
print("TOKEN=" + os.environ["OPENAI_API_KEY"])
"#,
        ),
        (
            "claude-fed",
            ANTHROPIC_AUD,
            r#"
import anthropic, os
assert "ANTHROPIC_API_KEY" not in os.environ
c = anthropic.Anthropic(max_retries=0)
r = c.messages.create(model="claude-sonnet-4-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
assert r.content[0].text == "Hello from the stand-in."
print("TOKEN=" + os.environ["ANTHROPIC_AUTH_TOKEN"])
"#,
        ),
    ];
    let mut tokens = Vec::new();
    for (role, aud, script) in scripts {
        e.f.trust(&e.s.url(), aud).unwrap();
        // The default idle timeout: expire-only credentials follow the
        // task's hard end, so nothing needs `--idle-timeout 0`.
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keymint"))
            .args([
                "run",
                "--role",
                role,
                "--workload",
                "ci/agent-7",
                "--",
                "python3",
                "-c",
                script,
            ])
            .env("KEYMINT_ADDR", e.s.url())
            .env("KEYMINT_TOKEN", &e.s.admin_token)
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("ANTHROPIC_API_KEY")
            .env_remove("ANTHROPIC_AUTH_TOKEN")
            .env_remove("ANTHROPIC_BASE_URL")
            .env_remove("KEYMINT_AGENT_SOCKET")
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{role}: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tok = stdout
            .lines()
            .find_map(|l| l.strip_prefix("TOKEN="))
            .unwrap()
            .to_owned();
        assert!(!tok.starts_with("kmt_"), "the provider's own token");
        assert!(!String::from_utf8_lossy(&out.stderr).contains(&tok));
        tokens.push((
            if role == "claude-fed" {
                "anthropic"
            } else {
                "openai"
            },
            tok,
        ));
    }
    // Expire-only: the tokens die at their expiry, which the provider
    // enforces.
    clock.advance_secs(601);
    for (p, tok) in &tokens {
        assert_eq!(use_token(&e.f, p, tok).await, 401, "{p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_serves_an_upstream_with_no_static_key() {
    let clock = ManualClock::new(T0);
    let e = setup(Some(clock.clone())).await;
    e.f.trust(&e.s.url(), ANTHROPIC_AUD).unwrap();
    // Five-minute tokens, inside the ten-minute task.
    e.f.set_token_secs(300);
    // No key can be set for it: it has none.
    let err =
        e.s.admin()
            .post::<_, Value>("/v1/upstreams/claude/key", &json!({"key": "sk-ant-static"}))
            .await
            .unwrap_err();
    assert_eq!(err.code(), Some("invalid_request"), "{err:?}");

    let t = start_task_in(&e.s.admin(), "claude-proxy", "agent").await;
    let l = issue(&e.s, &t).await.unwrap();
    let kmt = l.credential.secret().expose().to_owned();
    let url = format!("{}/proxy/claude/v1/messages", e.s.url());
    let msg = json!({"model": "claude-sonnet-4-5", "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}]});
    let call = |body: Value| {
        let (url, kmt) = (url.clone(), kmt.clone());
        async move {
            post(
                &url,
                &[
                    ("x-api-key", kmt.as_str()),
                    ("anthropic-version", "2023-06-01"),
                ],
                body,
            )
            .await
        }
    };
    let (st, body) = call(msg.clone()).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["content"][0]["text"], "Hello from the stand-in.");
    let (st, _) = call(msg.clone()).await;
    assert_eq!(st, 200);
    // One exchange serves both; the provider saw keymint's own JWT for the
    // proxy, and the bearer token with Anthropic's OAuth beta flag.
    let x = e.f.exchanges();
    assert_eq!(x.len(), 1);
    assert_eq!(x[0].claims["sub"], "keymint-proxy/claude");
    assert_eq!(x[0].claims["iss"], e.s.url());
    assert!(
        e.f.calls()
            .iter()
            .all(|c| c.contains("beta=oauth-2025-04-20")),
        "{:?}",
        e.f.calls()
    );

    // Past two thirds of its life the token is replaced before it expires:
    // eight concurrent requests make exactly one exchange.
    clock.advance_secs(201);
    let mut all = Vec::new();
    for _ in 0..8 {
        all.push(tokio::spawn(call(msg.clone())));
    }
    for h in all {
        assert_eq!(h.await.unwrap().0, 200);
    }
    assert_eq!(e.f.exchanges().len(), 2);

    // The provider's token service down and the token expired: 503
    // provider_unavailable at once, not a hang; audited.
    e.f.set_down(Some(503));
    clock.advance_secs(301);
    let started = Instant::now();
    let (st, body) = call(msg.clone()).await;
    assert_eq!(st, 503, "{body}");
    assert!(
        body.to_string().contains("provider_unavailable")
            || body["error"]["type"] == "overloaded_error",
        "{body}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    e.f.set_down(None);
    clock.advance_secs(3);
    let (st, _) = call(msg.clone()).await;
    assert_eq!(st, 200, "recovers once the provider is back");
    let ev = audit(&e.s).await;
    assert_eq!(
        ev.iter()
            .filter(|e| e.kind == "upstream.token_refreshed")
            .count(),
        3
    );
    let failed: Vec<_> = ev
        .iter()
        .filter(|e| e.kind == "upstream.token_failed")
        .collect();
    assert_eq!(failed.len(), 1);
    // Neither the token nor the JWT is in the audit trail.
    let text = serde_json::to_string(&ev).unwrap();
    for x in e.f.exchanges() {
        assert!(!text.contains(&x.token));
    }
    // No JWT: `eyJ` (a JSON header in base64url) followed by base64url
    // and a dot. Not the bare `eyJ`, which the 14 random base62
    // characters of the task's and the lease's IDs hold by chance about
    // once in 10,000 runs: the likely cause of one clean-clone CI failure
    // on the bare check (30 local runs passed). A JWT always has its dot.
    let jwt = text.match_indices("eyJ").find(|(i, _)| {
        let rest = text.get(i + 3..).unwrap_or("");
        let head = rest
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
            .count();
        head >= 8 && rest.as_bytes().get(head) == Some(&b'.')
    });
    if let Some((i, _)) = jwt {
        let around = text.get(i.saturating_sub(400)..(i + 200).min(text.len()));
        panic!("a JWT at {i} of the audit trail: {around:?}");
    }
}
