//! Workload identity at the API: a workload proves what it is with a JWT
//! from a configured issuer, policy decides on its verified claims, and it
//! acts on its own tasks only. Refused tokens are audited without contents.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::{Signer, SigningKey};
use keymint_client::Client;
use keymint_proto::{AuditEvent, IssueLease, IssuedLease, List, StartTask, Task};
use keymint_testkit::TestServer;

const ISSUER: &str = "https://ci.example.test";

const POLICY: &str = r#"
@id("acme-bots-triage")
permit(principal, action in [Keymint::Action::"start_task", Keymint::Action::"issue"], resource == Keymint::Role::"demo")
when { principal.method == "jwt" && principal.issuer == "https://ci.example.test"
       && principal.hasTag("repository") && principal.getTag("repository") like "acme/*" };
"#;

/// The wall clock, as the issuer and the server under test both see it.
fn unix_now() -> u64 {
    use keymint_core::Clock as _;
    u64::try_from(keymint_core::SystemClock.now().unix_seconds()).unwrap()
}

struct Issuer {
    key: SigningKey,
}

impl Issuer {
    fn new() -> Self {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).unwrap();
        Self {
            key: SigningKey::from_bytes(&seed),
        }
    }

    fn toml(&self) -> String {
        let x = B64.encode(self.key.verifying_key().as_bytes());
        format!(
            "[identity]\n[[identity.jwt]]\nname = \"ci\"\nissuer = \"{ISSUER}\"\n\
             audiences = [\"keymint\"]\n\
             jwks = {{ inline = '{{\"keys\":[{{\"kty\":\"OKP\",\"crv\":\"Ed25519\",\"x\":\"{x}\",\"kid\":\"k1\"}}]}}' }}\n\
             claim_mappings = {{ repository = \"repository\" }}\n"
        )
    }

    /// A signed token; `claims` are merged over sane defaults.
    fn token(&self, claims: serde_json::Value) -> String {
        let now = unix_now();
        let mut body = serde_json::json!({
            "iss": ISSUER, "aud": "keymint", "sub": "bot-1",
            "iat": now, "exp": now + 300, "repository": "acme/bot",
        });
        for (k, v) in claims.as_object().unwrap() {
            body[k] = v.clone();
        }
        let head = B64.encode(br#"{"alg":"EdDSA","typ":"JWT","kid":"k1"}"#);
        let payload = B64.encode(serde_json::to_vec(&body).unwrap());
        let input = format!("{head}.{payload}");
        let sig = B64.encode(self.key.sign(input.as_bytes()).to_bytes());
        format!("{input}.{sig}")
    }
}

fn start(workload: Option<&str>) -> StartTask {
    StartTask {
        workload: workload.map(Into::into),
        role: Some("demo".into()),
        ttl_secs: Some(300),
        ..StartTask::default()
    }
}

async fn server(iss: &Issuer) -> TestServer {
    TestServer::builder()
        .policy(POLICY)
        .config_toml(&iss.toml())
        .start()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_workload_proves_itself_and_policy_decides_on_its_claims() {
    let iss = Issuer::new();
    let s = server(&iss).await;
    let bot = s.client(&iss.token(serde_json::json!({})));

    // The task is the workload's own: named by issuer and subject.
    let task: Task = bot.post("/v1/tasks", &start(None)).await.unwrap();
    assert_eq!(task.workload, "ci/bot-1");
    let lease: IssuedLease = bot
        .post(
            &format!("/v1/tasks/{}/leases", task.id),
            &IssueLease::default(),
        )
        .await
        .unwrap();
    assert!(
        crate::introspect(&s.admin(), lease.credential.secret().expose())
            .await
            .active
    );

    // It cannot start tasks in another workload's name.
    let e = bot
        .post::<_, Task>("/v1/tasks", &start(Some("ci/someone-else")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("forbidden"));

    // A fork's token is verified but policy refuses it, on the claim.
    let fork = s.client(&iss.token(serde_json::json!({"sub": "bot-2", "repository": "evil/fork"})));
    let e = fork
        .post::<_, Task>("/v1/tasks", &start(None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("policy_denied"));
    // ... and cannot touch the first workload's task.
    let e = fork
        .get::<Task>(&format!("/v1/tasks/{}", task.id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("forbidden"));
    // Admin-only endpoints stay closed to workloads.
    assert!(bot.get::<List<Task>>("/v1/tasks").await.is_err());

    // The grant's audit event names the policy that decided it.
    let ev: List<AuditEvent> = s.admin().get("/v1/audit?limit=100").await.unwrap();
    let started = ev.items.iter().find(|e| e.kind == "task.started").unwrap();
    assert_eq!(started.actor, "workload:ci/bot-1");
    assert_eq!(
        started.data["policies"],
        serde_json::json!(["acme-bots-triage"])
    );
}

#[tokio::test]
async fn bad_identity_tokens_are_refused_and_audited_without_their_contents() {
    let iss = Issuer::new();
    let s = server(&iss).await;
    let other = Issuer::new();
    let now = unix_now();
    let good = iss.token(serde_json::json!({}));
    let mut tampered = good.clone();
    tampered.insert_str(good.find('.').unwrap() + 1, "eyJ4IjoxfQ");
    let cases = [
        (
            iss.token(serde_json::json!({"exp": now - 120, "iat": now - 600})),
            "expired",
        ),
        (
            iss.token(serde_json::json!({"aud": "someone-else"})),
            "audience",
        ),
        (
            iss.token(serde_json::json!({"iss": "https://evil.example"})),
            "issuer",
        ),
        (other.token(serde_json::json!({})), "signature"),
        (tampered, ""),
        (
            format!(
                "{}.{}.",
                B64.encode(br#"{"alg":"none","typ":"JWT"}"#),
                B64.encode(br#"{"sub":"admin"}"#)
            ),
            "",
        ),
    ];
    let before: List<AuditEvent> = s.admin().get("/v1/audit?limit=1000").await.unwrap();
    for (tok, why) in &cases {
        let e = s
            .client(tok)
            .post::<_, Task>("/v1/tasks", &start(None))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("unauthorized"), "{why}: {e}");
        assert!(e.to_string().to_lowercase().contains(why), "{why}: {e}");
    }
    let after: List<AuditEvent> = s.admin().get("/v1/audit?limit=1000").await.unwrap();
    let failed: Vec<&AuditEvent> = after.items[before.items.len()..]
        .iter()
        .filter(|e| e.kind == "auth.failed")
        .collect();
    assert_eq!(failed.len(), cases.len());
    assert!(failed.iter().all(|e| e.data["credential"] == "jwt"));
    let text = serde_json::to_string(&failed).unwrap();
    for (tok, _) in &cases {
        let sig = tok.rsplit('.').next().unwrap();
        if sig.len() > 10 {
            assert!(!text.contains(sig), "no token contents in the audit trail");
        }
        assert!(!text.contains(tok.split('.').nth(1).unwrap()));
    }
    // Nothing was started.
    let tasks: List<Task> = s.admin().get("/v1/tasks").await.unwrap();
    assert!(tasks.items.is_empty());

    // A server without [identity] says so.
    let plain = TestServer::start().await.unwrap();
    let e = plain
        .client(&good)
        .get::<List<Task>>("/v1/tasks")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no workload identity"), "{e}");
    let _ = Client::new(&plain.url(), None);
}

/// GET `path` with a bearer token and an `X-Keymint-Identity` header, via
/// curl (the API client sends no extra headers).
fn get_with_identity(url: &str, token: &str, identity: Option<&str>) -> (String, String) {
    let mut c = std::process::Command::new("curl");
    c.args(["-s", "-w", "\n%{http_code}", "-H"])
        .arg(format!("Authorization: Bearer {token}"));
    if let Some(i) = identity {
        c.arg("-H").arg(format!("X-Keymint-Identity: {i}"));
    }
    let out = c.arg(url).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_presented_by_another_proven_workload_is_refused() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(!crate::postgres::in_ci(), "curl is required under CI=true");
        return;
    }
    let iss = Issuer::new();
    let s = server(&iss).await;
    let bot_jwt = iss.token(serde_json::json!({}));
    let fork_jwt = iss.token(serde_json::json!({"sub": "bot-2", "repository": "acme/other"}));
    let bot = s.client(&bot_jwt);
    let task: Task = bot.post("/v1/tasks", &start(None)).await.unwrap();
    let lease: IssuedLease = bot
        .post(
            &format!("/v1/tasks/{}/leases", task.id),
            &IssueLease::default(),
        )
        .await
        .unwrap();
    let token = lease.credential.secret().expose().to_owned();
    let url = format!("{}/v1/tasks/{}", s.url(), task.id);
    let call = |identity: Option<String>| {
        let (url, token) = (url.clone(), token.clone());
        tokio::task::spawn_blocking(move || get_with_identity(&url, &token, identity.as_deref()))
    };
    // Its holder, proving itself: fine. The token alone: fine.
    assert_eq!(call(Some(bot_jwt.clone())).await.unwrap().0, "200");
    assert_eq!(call(None).await.unwrap().0, "200");
    // Another workload presenting it: refused, and audited.
    let (code, body) = call(Some(fork_jwt)).await.unwrap();
    assert_eq!(code, "401", "{body}");
    assert!(body.contains("bound to workload `ci/bot-1`"), "{body}");
    // The same at the egress proxy's door.
    let proxy_url = format!("{}/proxy/openai/v1/models", s.url());
    let call_proxy = |identity: String| {
        let (url, token) = (proxy_url.clone(), token.clone());
        tokio::task::spawn_blocking(move || get_with_identity(&url, &token, Some(&identity)))
    };
    let fork_jwt = iss.token(serde_json::json!({"sub": "bot-2", "repository": "acme/other"}));
    let (code, body) = call_proxy(fork_jwt).await.unwrap();
    assert_eq!(code, "401", "{body}");
    assert!(body.contains("bound to workload `ci/bot-1`"), "{body}");
    let (code, body) = call_proxy(bot_jwt.clone()).await.unwrap();
    assert!(!body.contains("bound to workload"), "{code} {body}");

    let ev: List<AuditEvent> = s.admin().get("/v1/audit?limit=200").await.unwrap();
    let refused = ev
        .items
        .iter()
        .find(|e| e.kind == "auth.failed" && e.data.contains_key("presented_by"))
        .expect("audited");
    assert_eq!(refused.data["presented_by"], "ci/bot-2");
    assert_eq!(refused.lease.as_deref(), Some(lease.lease.id.as_str()));
    assert!(!serde_json::to_string(&ev.items).unwrap().contains(&token));
}

/// A bad token at the egress proxy is refused, counted and audited once,
/// whether or not its presenter proves who it is (holder binding in front
/// of the proxy must not record the same refusal again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_at_the_proxy_is_refused_once_whoever_presents_it() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(!crate::postgres::in_ci(), "curl is required under CI=true");
        return;
    }
    let iss = Issuer::new();
    let s = TestServer::builder()
        .policy(POLICY)
        .config_toml(&format!(
            "{}\n[[upstreams]]\nname = \"openai\"\nkind = \"openai\"\n\
             base_url = \"http://127.0.0.1:9/v1\"\n",
            iss.toml()
        ))
        .start()
        .await
        .unwrap();
    let unknown = keymint_core::token::Token::generate(keymint_core::token::TokenKind::Access)
        .unwrap()
        .expose()
        .to_owned();
    let url = format!("{}/proxy/openai/models", s.url());
    let jwt = iss.token(serde_json::json!({}));
    let failures = || async {
        let line = crate::metric(&s, "keymint_auth_failures_total").await;
        let ev: List<AuditEvent> = s.admin().get("/v1/audit?limit=500").await.unwrap();
        let audited = ev.items.iter().filter(|e| e.kind == "auth.failed").count();
        (line, audited)
    };
    let before = failures().await;
    for identity in [None, Some(jwt)] {
        let (url, token) = (url.clone(), unknown.clone());
        let (code, body) = tokio::task::spawn_blocking(move || {
            get_with_identity(&url, &token, identity.as_deref())
        })
        .await
        .unwrap();
        assert_eq!(code, "401", "{body}");
    }
    let after = failures().await;
    assert_eq!(
        after.0, "keymint_auth_failures_total 2",
        "before: {before:?}"
    );
    assert_eq!(after.1, before.1 + 2, "each refusal audited once");
}

/// A node proves itself with a JWT (`[[nodes]] identity`): it is a node,
/// not a workload, and acts for workloads only through its entries.
#[tokio::test]
async fn a_node_can_prove_itself_with_a_jwt() {
    let iss = Issuer::new();
    let s = TestServer::builder()
        .config_toml(&format!(
            "{}[[nodes]]\nname = \"pool-1\"\nidentity = \"ci/node-agent\"\n",
            iss.toml()
        ))
        .start()
        .await
        .unwrap();
    let e: keymint_core::model::RegistrationEntry = s
        .admin()
        .post(
            "/v1/entries",
            &serde_json::json!({"workload": "triage", "node": "pool-1", "selectors": {"uid": 0}}),
        )
        .await
        .unwrap();
    let node = s.client(&iss.token(serde_json::json!({"sub": "node-agent"})));
    let mine: List<keymint_core::model::RegistrationEntry> = node.get("/v1/entries").await.unwrap();
    assert_eq!(mine.items, vec![e.clone()]);
    // On its own it starts nothing.
    let err = node
        .post::<_, Task>("/v1/tasks", &start(None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("forbidden"));
    // For its entry it does, as the entry's workload.
    let observed = B64.encode(br#"{"uid":"0","gid":"0"}"#);
    let acting = node
        .with_header("x-keymint-entry", &e.id)
        .unwrap()
        .with_header("x-keymint-attested", &observed)
        .unwrap();
    let t: Task = acting.post("/v1/tasks", &start(None)).await.unwrap();
    assert_eq!(t.workload, "triage");
    // Another subject of the same issuer is an ordinary workload, not the node.
    let other = s.client(&iss.token(serde_json::json!({"sub": "bot-1"})));
    let err = other
        .with_header("x-keymint-entry", &e.id)
        .unwrap()
        .with_header("x-keymint-attested", &observed)
        .unwrap()
        .post::<_, Task>("/v1/tasks", &start(None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("forbidden"));
}

/// A GitHub repository deleted and re-created under the same owner and
/// name (or an owner name registered again by someone else) does not
/// inherit the old one's permissions: the workload id rests on GitHub's
/// immutable `repository_id` and `repository_owner_id` (design 0008,
/// 2026-12-07). Tokens are forged with a key generated here.
#[tokio::test]
async fn a_re_created_github_repository_does_not_inherit_permissions() {
    const GH: &str = "https://token.actions.githubusercontent.com";
    let iss = Issuer::new();
    let x = B64.encode(iss.key.verifying_key().as_bytes());
    let config = format!(
        "[identity]\n[[identity.jwt]]\nname = \"gh\"\nissuer = \"{GH}\"\n\
         audiences = [\"keymint\"]\nprofile = \"github_actions\"\n\
         bound_claims = {{ repository_owner_id = [\"65\"] }}\n\
         jwks = {{ inline = '{{\"keys\":[{{\"kty\":\"OKP\",\"crv\":\"Ed25519\",\"x\":\"{x}\",\"kid\":\"k1\"}}]}}' }}\n"
    );
    let policy = r#"
permit(principal == Keymint::Workload::"gh/github:65/74:acme/bot@refs/heads/main",
       action in [Keymint::Action::"start_task", Keymint::Action::"issue"],
       resource == Keymint::Role::"demo");
"#;
    let s = TestServer::builder()
        .policy(policy)
        .config_toml(&config)
        .start()
        .await
        .unwrap();
    let token = |repository_id: &str, owner_id: &str| {
        iss.token(serde_json::json!({
            "iss": GH, "sub": "repo:acme/bot:ref:refs/heads/main",
            "repository": "acme/bot", "repository_owner": "acme", "ref": "refs/heads/main",
            "repository_id": repository_id, "repository_owner_id": owner_id,
        }))
    };

    let task: Task = s
        .client(&token("74", "65"))
        .post("/v1/tasks", &start(None))
        .await
        .unwrap();
    assert_eq!(task.workload, "gh/github:65/74:acme/bot@refs/heads/main");

    // Same owner and name, another repository: another workload, which the
    // policy does not name.
    let recreated = s.client(&token("9001", "65"));
    let e = recreated
        .post::<_, Task>("/v1/tasks", &start(None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("policy_denied"), "{e}");
    let e = recreated
        .get::<Task>(&format!("/v1/tasks/{}", task.id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("forbidden"), "{e}");
    // The owner's name registered again by someone else: not trusted.
    let e = s
        .client(&token("74", "6666"))
        .post::<_, Task>("/v1/tasks", &start(None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("unauthorized"), "{e}");
}
