//! The rest of the token service's grants (docs/design/0026): registered
//! clients with `client_credentials` and `private_key_jwt`, workload JWTs
//! as subjects of token exchange, held jwt-bearer requests asked again
//! with their approval, OAuth approvals refused by the generic redeem
//! route; authlib as the client; the attacks that must fail and leave
//! nothing behind.

use std::process::Stdio;

use base64::Engine as _;
use keymint_client::Client;
use keymint_testkit::TestServer;
use serde_json::{Value, json};

use crate::oauth::{AT, CONFIG, FILES, JB, TE, TOOLS, WL_ISSUER, python_has, run_python};

const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const CA: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Everything is allowed, except for the client `blocked-bot` (by grant
/// type and client id in `context.oauth`); a workload JWT's task in
/// `files` waits for a human, and so does a delegated token for `files`.
const POLICY: &str = r#"
@id("permit-all")
permit(principal, action, resource);

@id("no-tokens-for-blocked-bot")
forbid(principal, action == Keymint::Action::"issue", resource)
when { context has oauth && context.oauth.grant_type == "client_credentials" && context.oauth.client_id == "blocked-bot" };

@id("workload-files-need-a-human")
@approval("required")
permit(principal, action == Keymint::Action::"start_task", resource == Keymint::Role::"files")
when { principal.method == "jwt" };

@id("delegated-files-need-a-human")
@approval("required")
permit(principal, action == Keymint::Action::"issue", resource == Keymint::Role::"files")
when { context has oauth && context.oauth.grant_type == "token_exchange" && context.oauth.actor_chain.contains("ci/reviewer") };
"#;

/// An Ed25519 key made for the test: a workload issuer's or a client's.
struct Key {
    sk: ed25519_dalek::SigningKey,
    kid: &'static str,
}

impl Key {
    fn new(kid: &'static str) -> Self {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).unwrap();
        Self {
            sk: ed25519_dalek::SigningKey::from_bytes(&seed),
            kid,
        }
    }
    fn x(&self) -> String {
        b64(self.sk.verifying_key().as_bytes())
    }
    fn jwks(&self) -> String {
        format!(
            r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{}","kid":"{}"}}]}}"#,
            self.x(),
            self.kid
        )
    }
    fn private_jwk(&self) -> Value {
        json!({"kty": "OKP", "crv": "Ed25519", "x": self.x(), "d": b64(&self.sk.to_bytes()), "kid": self.kid})
    }
    fn sign(&self, claims: &Value) -> String {
        self.sign_with(
            &json!({"alg": "EdDSA", "typ": "JWT", "kid": self.kid}),
            claims,
        )
    }
    fn sign_with(&self, header: &Value, claims: &Value) -> String {
        use ed25519_dalek::Signer as _;
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        format!(
            "{input}.{}",
            b64(&self.sk.sign(input.as_bytes()).to_bytes())
        )
    }
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// `[identity]` trusting `iss` for workload JWTs with audience `keymint`.
fn identity_toml(iss: &Key) -> String {
    format!(
        "[identity]\n[[identity.jwt]]\nname = \"ci\"\nissuer = \"{WL_ISSUER}\"\n\
         audiences = [\"keymint\"]\njwks = {{ inline = '{}' }}\n",
        iss.jwks()
    )
}

fn clients_toml(client: &Key, blocked: &Key) -> String {
    format!(
        "[[oauth.clients]]\nclient_id = \"reports-bot\"\nworkload = \"reports\"\n\
         jwks = {{ inline = '{}' }}\nresources = [\"{TOOLS}\"]\nscopes = [\"tools:read\"]\n\
         [[oauth.clients]]\nclient_id = \"blocked-bot\"\n\
         jwks = {{ inline = '{}' }}\nresources = [\"{TOOLS}\"]\nscopes = [\"tools:read\"]\n",
        client.jwks(),
        blocked.jwks()
    )
}

async fn server(extra: &str) -> TestServer {
    TestServer::builder()
        .config_toml(&format!("{CONFIG}\n{extra}"))
        .policy(POLICY)
        .start()
        .await
        .unwrap()
}

async fn post_form(c: &Client, path: &str, pairs: &[(&str, &str)]) -> (u16, Value) {
    let body = serde_urlencoded::to_string(pairs).unwrap().into_bytes();
    let r = c
        .raw(
            http::Method::POST,
            path,
            Some("application/x-www-form-urlencoded"),
            body,
        )
        .await
        .unwrap();
    let v = if r.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&r.body).unwrap_or(Value::String(r.text()))
    };
    (r.status.as_u16(), v)
}

async fn token(s: &TestServer, pairs: &[(&str, &str)]) -> (u16, Value) {
    post_form(&s.anonymous(), "/oauth/token", pairs).await
}

fn claims_of(jwt: &str) -> Value {
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(jwt.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap()
}

async fn audit(s: &TestServer) -> Vec<Value> {
    s.admin()
        .get::<keymint_proto::List<Value>>("/v1/audit?limit=1000")
        .await
        .unwrap()
        .items
}

fn count(events: &[Value], kind: &str) -> usize {
    events.iter().filter(|e| e["kind"] == kind).count()
}

async fn tasks_of(s: &TestServer, workload: &str) -> usize {
    s.admin()
        .get::<keymint_proto::List<keymint_proto::Task>>("/v1/tasks?limit=500")
        .await
        .unwrap()
        .items
        .iter()
        .filter(|t| t.workload == workload)
        .count()
}

fn assert_refused(what: &str, got: (u16, Value), status: u16, code: &str) {
    assert_eq!(
        (got.0, got.1["error"].as_str()),
        (status, Some(code)),
        "{what}: {}",
        got.1
    );
    assert!(got.1.get("access_token").is_none(), "{what}: {}", got.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_with_private_key_jwt_for_registered_clients() {
    let (client, blocked) = (Key::new("c1"), Key::new("b1"));
    let s = server(&clients_toml(&client, &blocked)).await;
    let endpoint = format!("{}/oauth/token", s.url());
    let meta: Value = s
        .anonymous()
        .get("/.well-known/oauth-authorization-server")
        .await
        .unwrap();
    assert!(
        meta["grant_types_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("client_credentials"))
    );
    assert!(
        meta["token_endpoint_auth_methods_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("private_key_jwt"))
    );
    assert_eq!(
        meta["token_endpoint_auth_signing_alg_values_supported"],
        json!(["ES256", "EdDSA", "RS256"])
    );

    let now = s.broker().now().unix_seconds();
    let claims = |jti: &str| json!({"iss": "reports-bot", "sub": "reports-bot", "aud": endpoint, "iat": now, "exp": now + 60, "jti": jti});
    let ask = |assertion: String, extra: Vec<(&'static str, String)>| {
        let s = &s;
        async move {
            let mut p = vec![
                ("grant_type", "client_credentials".to_owned()),
                ("client_assertion_type", CA.to_owned()),
                ("client_assertion", assertion),
                ("resource", TOOLS.to_owned()),
            ];
            p.extend(extra);
            let v: Vec<(&str, &str)> = p.iter().map(|(k, v)| (*k, v.as_str())).collect();
            token(s, &v).await
        }
    };
    let first = client.sign(&claims("a1"));
    let (st, t) = ask(first.clone(), vec![("scope", "tools:read".into())]).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["token_type"], "Bearer");
    let at = t["access_token"].as_str().unwrap().to_owned();
    let c = claims_of(&at);
    assert_eq!(c["sub"], "reports");
    assert_eq!(c["client_id"], "reports-bot");
    assert_eq!(c["aud"], TOOLS);
    assert_eq!(c["scope"], "tools:read");
    let task: keymint_proto::Task = s
        .admin()
        .get(&format!("/v1/tasks/{}", c["task_id"].as_str().unwrap()))
        .await
        .unwrap();
    assert_eq!(
        (task.workload.as_str(), task.role.as_str()),
        ("reports", "tools")
    );
    let i = crate::introspect(&s.admin(), &at).await;
    assert!(i.active);
    assert_eq!(i.client_id.as_deref(), Some("reports-bot"));
    // The issuer URL is an accepted `aud` too; `client_id` in the form
    // must be the assertion's; no scope asked: the client's.
    let mut by_issuer = claims("a2");
    by_issuer["aud"] = json!(s.url());
    let (st, t) = ask(
        client.sign(&by_issuer),
        vec![("client_id", "reports-bot".into())],
    )
    .await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["scope"], "tools:read");

    let before = (audit(&s).await, tasks_of(&s, "reports").await);
    let stranger = Key::new("c1");
    let mut far = claims("a6");
    far["exp"] = json!(now + 7200);
    let mut other_sub = claims("a7");
    other_sub["sub"] = json!("blocked-bot");
    let mut no_jti = claims("x");
    no_jti.as_object_mut().unwrap().remove("jti");
    let mut wrong_aud = claims("a4");
    wrong_aud["aud"] = json!("https://elsewhere.example/oauth/token");
    let mut expired = claims("a3");
    expired["exp"] = json!(now - 10);
    let mut unknown = claims("a5");
    unknown["iss"] = json!("ghost");
    unknown["sub"] = json!("ghost");
    let hs256 = format!(
        "{}.{}.{}",
        b64(br#"{"alg":"HS256","kid":"c1"}"#),
        b64(claims("a8").to_string().as_bytes()),
        b64(&client.sk.verifying_key().to_bytes())
    );
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none"}"#),
        b64(claims("a9").to_string().as_bytes())
    );
    for (what, assertion) in [
        ("replayed", first.clone()),
        ("expired", client.sign(&expired)),
        ("wrong aud", client.sign(&wrong_aud)),
        ("unregistered key", stranger.sign(&claims("a10"))),
        ("unknown client", client.sign(&unknown)),
        ("alg none", none),
        ("HS256 with the public key", hs256),
        ("exp too far", client.sign(&far)),
        ("iss is not sub", client.sign(&other_sub)),
        ("no jti", client.sign(&no_jti)),
        ("not a JWS", "junk".to_owned()),
    ] {
        assert_refused(what, ask(assertion, vec![]).await, 401, "invalid_client");
    }
    // `client_id` naming another client, a wrong assertion type, none.
    assert_refused(
        "client_id mismatch",
        ask(
            client.sign(&claims("a11")),
            vec![("client_id", "blocked-bot".into())],
        )
        .await,
        401,
        "invalid_client",
    );
    assert_refused(
        "assertion type",
        token(
            &s,
            &[
                ("grant_type", "client_credentials"),
                ("client_assertion_type", "urn:example:saml"),
                ("client_assertion", &client.sign(&claims("a12"))),
                ("resource", TOOLS),
            ],
        )
        .await,
        401,
        "invalid_client",
    );
    assert_refused(
        "no client authentication",
        token(
            &s,
            &[("grant_type", "client_credentials"), ("resource", TOOLS)],
        )
        .await,
        401,
        "invalid_client",
    );
    // What the client is not registered for.
    assert_refused(
        "scope beyond the client's",
        ask(
            client.sign(&claims("a13")),
            vec![("scope", "tools:write".into())],
        )
        .await,
        400,
        "invalid_scope",
    );
    let mut files = vec![
        ("grant_type", "client_credentials".to_owned()),
        ("client_assertion_type", CA.to_owned()),
        ("client_assertion", client.sign(&claims("a14"))),
        ("resource", FILES.to_owned()),
    ];
    let v: Vec<(&str, &str)> = files.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_refused(
        "resource beyond the client's",
        token(&s, &v).await,
        400,
        "invalid_target",
    );
    files.clear();
    // Client authentication with another grant is refused, not ignored.
    assert_refused(
        "client assertion on token exchange",
        token(
            &s,
            &[
                ("grant_type", TE),
                ("client_assertion_type", CA),
                ("client_assertion", &client.sign(&claims("a15"))),
                ("subject_token", &at),
                ("subject_token_type", AT),
                ("resource", TOOLS),
            ],
        )
        .await,
        401,
        "invalid_client",
    );
    // Nothing was issued and no task started by any of these; the failed
    // authentications are audited without the assertion.
    let after = (audit(&s).await, tasks_of(&s, "reports").await);
    assert_eq!(
        count(&after.0, "oauth.token_issued"),
        count(&before.0, "oauth.token_issued")
    );
    assert_eq!(after.1, before.1);
    assert!(count(&after.0, "auth.failed") > count(&before.0, "auth.failed"));
    let text = serde_json::to_string(&after.0).unwrap();
    assert!(!text.contains(&first) && !text.contains(&at));
    // A scope or a resource the client is not registered for is refused
    // before the assertion is spent: the same assertions, asked within the
    // registration, get a token, once.
    for jti in ["a13", "a14"] {
        let (st, t) = ask(client.sign(&claims(jti)), vec![]).await;
        assert_eq!(st, 200, "{jti}: {t}");
        assert_refused(
            "spent",
            ask(client.sign(&claims(jti)), vec![]).await,
            401,
            "invalid_client",
        );
    }

    // Policy decides with the grant type and the client id.
    let now = s.broker().now().unix_seconds();
    let (st, e) = ask(
        blocked.sign(&json!({"iss": "blocked-bot", "sub": "blocked-bot", "aud": endpoint, "exp": now + 60, "jti": "b1"})),
        vec![],
    )
    .await;
    assert_refused("policy", (st, e), 400, "access_denied");
    // The task started for the refused token is ended with it.
    let blocked_tasks: Vec<keymint_proto::Task> = s
        .admin()
        .get::<keymint_proto::List<keymint_proto::Task>>("/v1/tasks?limit=500")
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|t| t.workload == "blocked-bot")
        .collect();
    assert_eq!(blocked_tasks.len(), 1);
    assert_eq!(blocked_tasks[0].status, keymint_proto::TaskStatus::Failed);
    let events = audit(&s).await;
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "oauth.denied"
                && e.to_string().contains("no-tokens-for-blocked-bot")),
        "{events:?}"
    );

    // authlib's PrivateKeyJWT: the client authenticates as RFC 7523 says,
    // twice (a new `jti` each time), and validates the token via the
    // metadata and the JWKS.
    if !python_has("authlib, requests, cryptography, joserfc").await {
        return;
    }
    let v = run_python(
        AUTHLIB_CLIENT_CREDENTIALS,
        &json!({"issuer": s.url(), "jwk": client.private_jwk(), "resource": TOOLS}),
    )
    .await;
    assert_eq!(v["claims"]["client_id"], "reports-bot");
    assert_eq!(v["claims"]["sub"], "reports");
    assert_eq!(v["claims"]["aud"], TOOLS);
    assert_eq!(v["claims"]["scope"], "tools:read");
    assert_eq!(v["second"], true);
    assert_eq!(v["write_error"], "invalid_scope");
    let at = v["token"]["access_token"].as_str().unwrap();
    assert!(crate::introspect(&s.admin(), at).await.active);
}

const AUTHLIB_CLIENT_CREDENTIALS: &str = r#"
import json, sys, urllib.request
from authlib.integrations.requests_client import OAuth2Session
from authlib.integrations.base_client.errors import OAuthError
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from authlib.jose import JsonWebToken, JsonWebKey
from joserfc.jwk import OKPKey

inp = json.load(sys.stdin)
meta = json.load(urllib.request.urlopen(inp["issuer"] + "/.well-known/oauth-authorization-server"))
assert "private_key_jwt" in meta["token_endpoint_auth_methods_supported"], meta
assert "EdDSA" in meta["token_endpoint_auth_signing_alg_values_supported"], meta
key = OKPKey.import_key(inp["jwk"])
client = OAuth2Session("reports-bot", key, token_endpoint_auth_method="private_key_jwt")
client.register_client_auth_method(PrivateKeyJWT(meta["token_endpoint"], alg="EdDSA", headers={"kid": inp["jwk"]["kid"]}))
tok = client.fetch_token(meta["token_endpoint"], grant_type="client_credentials",
                         resource=inp["resource"], scope="tools:read")
again = client.fetch_token(meta["token_endpoint"], grant_type="client_credentials", resource=inp["resource"])
try:
    client.fetch_token(meta["token_endpoint"], grant_type="client_credentials",
                       resource=inp["resource"], scope="tools:write")
    write = None
except OAuthError as e:
    write = e.error
keys = JsonWebKey.import_key_set(json.load(urllib.request.urlopen(meta["jwks_uri"])))
claims = JsonWebToken(meta["access_token_signing_alg_values_supported"]).decode(
    tok["access_token"], keys, claims_options={
        "iss": {"essential": True, "value": meta["issuer"]},
        "aud": {"essential": True, "value": inp["resource"]},
        "exp": {"essential": True}})
claims.validate()
print(json.dumps({"token": tok, "claims": dict(claims),
                  "second": again["access_token"] != tok["access_token"], "write_error": write}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_jwts_are_subjects_of_exchanges_that_only_narrow() {
    let iss = Key::new("k1");
    let s = server(&identity_toml(&iss)).await;
    let now = s.broker().now().unix_seconds();
    let jwt = |sub: &str, exp: i64| {
        iss.sign(&json!({"iss": WL_ISSUER, "sub": sub, "aud": "keymint", "iat": now, "exp": exp}))
    };
    let subject = jwt("bot-1", now + 600);
    let (st, t) = token(
        &s,
        &[
            ("grant_type", TE),
            ("subject_token", &subject),
            ("subject_token_type", JWT),
            ("resource", TOOLS),
            ("scope", "tools:read"),
            ("requested_lifetime", "120"),
        ],
    )
    .await;
    assert_eq!(st, 200, "{t}");
    let at = t["access_token"].as_str().unwrap().to_owned();
    let c = claims_of(&at);
    assert_eq!(c["sub"], "ci/bot-1");
    assert_eq!(c["scope"], "tools:read");
    let task: keymint_proto::Task = s
        .admin()
        .get(&format!("/v1/tasks/{}", c["task_id"].as_str().unwrap()))
        .await
        .unwrap();
    assert_eq!(
        (task.workload.as_str(), task.role.as_str()),
        ("ci/bot-1", "tools")
    );
    assert!(task.expires_at.unix_seconds() <= now + 125);
    assert!(crate::introspect(&s.admin(), &at).await.active);
    // With an actor: the `act` chain.
    let (_, reviewer) = crate::issue(
        &s.admin(),
        &crate::start_task(&s.admin(), "ci/reviewer").await.id,
    )
    .await;
    let (st, t) = token(
        &s,
        &[
            ("grant_type", TE),
            ("subject_token", &subject),
            ("subject_token_type", JWT),
            ("actor_token", &reviewer),
            ("actor_token_type", AT),
            ("resource", TOOLS),
        ],
    )
    .await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(
        claims_of(t["access_token"].as_str().unwrap())["act"],
        json!({"sub": "ci/reviewer"})
    );

    let before = (audit(&s).await, tasks_of(&s, "ci/bot-1").await);
    // The access token only narrows: another audience, a wider scope, a
    // longer life are refused.
    let from_at = |extra: &[(&'static str, &'static str)]| {
        let mut p = vec![
            ("grant_type", TE),
            ("subject_token", at.as_str()),
            ("subject_token_type", AT),
        ];
        p.extend_from_slice(extra);
        p
    };
    for (what, extra, code) in [
        ("audience", vec![("resource", FILES)], "invalid_target"),
        (
            "scope",
            vec![("resource", TOOLS), ("scope", "tools:write")],
            "invalid_scope",
        ),
        (
            "lifetime",
            vec![("resource", TOOLS), ("requested_lifetime", "1200")],
            "invalid_request",
        ),
    ] {
        assert_refused(what, token(&s, &from_at(&extra)).await, 400, code);
    }
    // From the workload JWT: beyond the role, expired, forged, from an
    // unknown issuer, or a bad actor: refused, and no task is started.
    let other = Key::new("k1");
    let forged = other.sign(
        &json!({"iss": WL_ISSUER, "sub": "bot-1", "aud": "keymint", "iat": now, "exp": now + 600}),
    );
    let stranger = iss.sign(&json!({"iss": "https://evil.example", "sub": "bot-1", "aud": "keymint", "iat": now, "exp": now + 600}));
    let expired = jwt("bot-1", now - 100);
    for (what, subj, extra, code) in [
        (
            "scope beyond the role",
            subject.clone(),
            vec![("scope", "admin")],
            "invalid_scope",
        ),
        (
            "lifetime beyond the role",
            subject.clone(),
            vec![("requested_lifetime", "86400")],
            "invalid_request",
        ),
        ("expired", expired, vec![], "invalid_grant"),
        ("forged", forged, vec![], "invalid_grant"),
        ("unknown issuer", stranger, vec![], "invalid_grant"),
        (
            "bad actor",
            subject.clone(),
            vec![("actor_token", "kmt_nope"), ("actor_token_type", AT)],
            "invalid_grant",
        ),
    ] {
        let mut p = vec![
            ("grant_type", TE),
            ("subject_token", subj.as_str()),
            ("subject_token_type", JWT),
            ("resource", TOOLS),
        ];
        p.extend(extra);
        assert_refused(what, token(&s, &p).await, 400, code);
    }
    // An X.509-SVID subject without an mTLS connection is refused.
    assert_refused(
        "svid without mTLS",
        token(
            &s,
            &[
                ("grant_type", TE),
                ("subject_token", "spiffe://example.org/agent"),
                (
                    "subject_token_type",
                    "urn:keymint:params:oauth:token-type:x509-svid",
                ),
                ("resource", TOOLS),
            ],
        )
        .await,
        400,
        "invalid_grant",
    );
    let after = (audit(&s).await, tasks_of(&s, "ci/bot-1").await);
    assert_eq!(
        count(&after.0, "oauth.token_issued"),
        count(&before.0, "oauth.token_issued")
    );
    assert_eq!(after.1, before.1);

    // authlib performs the exchange with the workload JWT as subject and
    // validates the token via the metadata and JWKS.
    if !python_has("authlib, requests, cryptography").await {
        return;
    }
    let v = run_python(
        AUTHLIB_JWT_SUBJECT,
        &json!({"issuer": s.url(), "subject": subject, "resource": TOOLS}),
    )
    .await;
    assert_eq!(v["claims"]["sub"], "ci/bot-1");
    assert_eq!(v["claims"]["aud"], TOOLS);
}

const AUTHLIB_JWT_SUBJECT: &str = r#"
import json, sys, urllib.request
from authlib.integrations.requests_client import OAuth2Session
from authlib.jose import JsonWebToken, JsonWebKey

inp = json.load(sys.stdin)
meta = json.load(urllib.request.urlopen(inp["issuer"] + "/.well-known/oauth-authorization-server"))
client = OAuth2Session(token_endpoint_auth_method="none")
tok = client.fetch_token(meta["token_endpoint"],
    grant_type="urn:ietf:params:oauth:grant-type:token-exchange",
    subject_token=inp["subject"], subject_token_type="urn:ietf:params:oauth:token-type:jwt",
    resource=inp["resource"], scope="tools:read")
keys = JsonWebKey.import_key_set(json.load(urllib.request.urlopen(meta["jwks_uri"])))
claims = JsonWebToken(meta["access_token_signing_alg_values_supported"]).decode(
    tok["access_token"], keys, claims_options={
        "iss": {"essential": True, "value": meta["issuer"]},
        "aud": {"essential": True, "value": inp["resource"]},
        "exp": {"essential": True}})
claims.validate()
print(json.dumps({"token": tok, "claims": dict(claims)}))
"#;

fn operator_toml(dir: &std::path::Path) -> String {
    format!(
        "[approvals]\nttl = \"10m\"\n[[operators]]\nname = \"alice\"\ntoken_file = {:?}\n",
        dir.join("alice.token").display().to_string()
    )
}

async fn approve(s: &TestServer, dir: &std::path::Path, apr: &str) {
    let alice = std::fs::read_to_string(dir.join("alice.token")).unwrap();
    let r = s
        .client(alice.trim())
        .raw(
            http::Method::POST,
            &format!("/v1/approvals/{apr}/approve"),
            Some("application/json"),
            b"{}".to_vec(),
        )
        .await
        .unwrap();
    assert!(r.status.is_success(), "{}", r.text());
}

async fn approval_status(s: &TestServer, apr: &str) -> String {
    let a: Value = s
        .admin()
        .get(&format!("/v1/approvals/{apr}"))
        .await
        .unwrap();
    a["status"].as_str().unwrap().to_owned()
}

/// The generic route refuses an OAuth approval, which stays approved.
async fn generic_redeem_refused(s: &TestServer, bearer: &str, apr: &str) {
    let r = s
        .client(bearer)
        .raw(
            http::Method::POST,
            &format!("/v1/approvals/{apr}/redeem"),
            None,
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), 400, "{}", r.text());
    assert!(!r.text().contains("kmt_"), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_jwt_bearer_and_exchange_requests_are_asked_again_with_their_approval() {
    let ops = tempfile::tempdir().unwrap();
    let iss = Key::new("k1");
    let s = server(&format!(
        "{}{}",
        identity_toml(&iss),
        operator_toml(ops.path())
    ))
    .await;
    let endpoint = format!("{}/oauth/token", s.url());
    let now = s.broker().now().unix_seconds();
    let assertion = |sub: &str, jti: &str| {
        iss.sign(&json!({"iss": WL_ISSUER, "sub": sub, "aud": ["keymint", endpoint], "iat": now, "exp": now + 300, "jti": jti}))
    };
    let ask = |a: String, approval: Option<&str>| {
        let s = &s;
        let approval = approval.map(str::to_owned);
        async move {
            let mut p = vec![
                ("grant_type", JB.to_owned()),
                ("assertion", a),
                ("resource", FILES.to_owned()),
                ("scope", "files:read".to_owned()),
            ];
            if let Some(apr) = approval {
                p.push(("approval", apr));
            }
            let v: Vec<(&str, &str)> = p.iter().map(|(k, v)| (*k, v.as_str())).collect();
            token(s, &v).await
        }
    };
    // Held: the task in `files` for a workload JWT waits for a human.
    let (st, e) = ask(assertion("bot-1", "h1"), None).await;
    assert_refused("held", (st, e.clone()), 400, "authorization_pending");
    let apr = e["approval"].as_str().unwrap().to_owned();
    assert_eq!(approval_status(&s, &apr).await, "pending");
    assert_eq!(tasks_of(&s, "ci/bot-1").await, 0);
    // Asked again (a fresh assertion: each is used once) before anyone
    // decided: still pending.
    let (st, e) = ask(assertion("bot-1", "h2"), Some(&apr)).await;
    assert_refused("pending", (st, e), 400, "authorization_pending");
    approve(&s, ops.path(), &apr).await;
    // The generic redeem route, with the same workload's JWT as bearer:
    // refused, and the approval stays approved.
    generic_redeem_refused(&s, &assertion("bot-1", "h3"), &apr).await;
    assert_eq!(approval_status(&s, &apr).await, "approved");
    // Another workload cannot use it; nor can another request (scope).
    let (st, e) = ask(assertion("bot-2", "h4"), Some(&apr)).await;
    assert_refused("another workload", (st, e), 400, "invalid_grant");
    let mut p = vec![
        ("grant_type", JB.to_owned()),
        ("assertion", assertion("bot-1", "h5")),
        ("resource", FILES.to_owned()),
        ("approval", apr.clone()),
    ];
    p.push(("requested_lifetime", "60".to_owned()));
    let v: Vec<(&str, &str)> = p.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_refused("another request", token(&s, &v).await, 400, "invalid_grant");
    assert_eq!(approval_status(&s, &apr).await, "approved");
    // The same request, approved: granted once.
    let (st, t) = ask(assertion("bot-1", "h6"), Some(&apr)).await;
    assert_eq!(st, 200, "{t}");
    let c = claims_of(t["access_token"].as_str().unwrap());
    assert_eq!(
        (c["sub"].as_str(), c["aud"].as_str()),
        (Some("ci/bot-1"), Some(FILES))
    );
    assert_eq!(approval_status(&s, &apr).await, "used");
    let (st, e) = ask(assertion("bot-1", "h7"), Some(&apr)).await;
    assert_refused("used", (st, e), 400, "invalid_grant");
    assert_eq!(tasks_of(&s, "ci/bot-1").await, 1);

    // A held token exchange (c059114): the generic route refuses it with
    // the very token that asked, and it stays usable at the token endpoint.
    let (_, lead) = crate::issue(
        &s.admin(),
        &crate::start_task(&s.admin(), "ci/lead").await.id,
    )
    .await;
    let (_, reviewer) = crate::issue(
        &s.admin(),
        &crate::start_task(&s.admin(), "ci/reviewer").await.id,
    )
    .await;
    let ex = [
        ("grant_type", TE),
        ("subject_token", lead.as_str()),
        ("subject_token_type", AT),
        ("actor_token", reviewer.as_str()),
        ("actor_token_type", AT),
        ("resource", FILES),
    ];
    let (st, e) = token(&s, &ex).await;
    assert_refused(
        "exchange held",
        (st, e.clone()),
        400,
        "authorization_pending",
    );
    let apr = e["approval"].as_str().unwrap().to_owned();
    approve(&s, ops.path(), &apr).await;
    generic_redeem_refused(&s, &lead, &apr).await;
    assert_eq!(approval_status(&s, &apr).await, "approved");
    let mut again = ex.to_vec();
    again.push(("approval", &apr));
    let (st, t) = token(&s, &again).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(approval_status(&s, &apr).await, "used");
}

/// The hold of the task a workload JWT subject gets covers the actor of
/// the exchange too: approved without one, it is not used for a token
/// delegated to `ci/reviewer` (whose delegation policy holds for a human
/// of its own). Before, that approval also approved the token's own
/// decision, and a token acting for `ci/reviewer` came out that no human
/// had seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_workload_task_covers_the_actor_it_was_asked_with() {
    let ops = tempfile::tempdir().unwrap();
    let iss = Key::new("k1");
    let s = server(&format!(
        "{}{}",
        identity_toml(&iss),
        operator_toml(ops.path())
    ))
    .await;
    let now = s.broker().now().unix_seconds();
    let jwt = iss.sign(
        &json!({"iss": WL_ISSUER, "sub": "bot-1", "aud": "keymint", "iat": now, "exp": now + 600}),
    );
    let (_, reviewer) = crate::issue(
        &s.admin(),
        &crate::start_task(&s.admin(), "ci/reviewer").await.id,
    )
    .await;
    let plain = [
        ("grant_type", TE),
        ("subject_token", jwt.as_str()),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("resource", FILES),
    ];
    let (st, e) = token(&s, &plain).await;
    assert_refused("held", (st, e.clone()), 400, "authorization_pending");
    let apr = e["approval"].as_str().unwrap().to_owned();
    approve(&s, ops.path(), &apr).await;
    let mut delegated = plain.to_vec();
    delegated.extend([
        ("actor_token", reviewer.as_str()),
        ("actor_token_type", AT),
        ("approval", apr.as_str()),
    ]);
    let (st, e) = token(&s, &delegated).await;
    assert_refused("another actor", (st, e), 400, "invalid_grant");
    assert_eq!(approval_status(&s, &apr).await, "approved");
    let mut again = plain.to_vec();
    again.push(("approval", apr.as_str()));
    let (st, t) = token(&s, &again).await;
    assert_eq!(st, 200, "{t}");
    assert!(
        claims_of(t["access_token"].as_str().unwrap())
            .get("act")
            .is_none()
    );
}

async fn cli(s: &TestServer, token: &str, args: &[&str], stdin: &str) -> (i32, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_keymint"))
        .args(args)
        .env("KEYMINT_ADDR", s.url())
        .env("KEYMINT_TOKEN", token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut i = child.stdin.take().unwrap();
    i.write_all(stdin.as_bytes()).await.unwrap();
    drop(i);
    let out = child.wait_with_output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// `keymint token exchange|introspect|revoke` and `keymint run
/// --resource`: the token is printed only as `exchange`'s output; the
/// others read it from standard input; refusals say what was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_exchanges_introspects_revokes_and_runs_with_an_access_token() {
    let s = server("").await;
    let (_, kmt) = crate::issue(
        &s.admin(),
        &crate::start_task(&s.admin(), "cli-agent").await.id,
    )
    .await;
    let (code, out, err) = cli(
        &s,
        &kmt,
        &[
            "token",
            "exchange",
            "--resource",
            TOOLS,
            "--scope",
            "tools:read",
            "--lifetime",
            "2m",
        ],
        "",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let at = out.trim().to_owned();
    assert_eq!(out.lines().count(), 1, "only the token: {out}");
    let c = claims_of(&at);
    assert_eq!(
        (c["aud"].as_str(), c["scope"].as_str()),
        (Some(TOOLS), Some("tools:read"))
    );
    assert_eq!(c["sub"], "cli-agent");
    assert!(!err.contains(&kmt));

    let (code, out, err) = cli(&s, &s.admin_token, &["token", "introspect"], &at).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("active      true"), "{out}");
    assert!(out.contains(TOOLS) && out.contains("cli-agent"), "{out}");
    assert!(!out.contains(&at) && !err.contains(&at));
    let (code, out, _) = cli(
        &s,
        &s.admin_token,
        &["token", "introspect", "-o", "json"],
        &at,
    )
    .await;
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["active"].as_bool(), v["aud"].as_str()),
        (Some(true), Some(TOOLS))
    );
    // Introspection needs the admin token: a clear refusal.
    let (code, out, err) = cli(&s, &kmt, &["token", "introspect"], &at).await;
    assert_eq!(code, 2, "{out}");
    assert!(err.contains("refused"), "{err}");

    // A refused exchange: the error code, no token.
    let (code, out, err) = cli(
        &s,
        &kmt,
        &["token", "exchange", "--resource", "https://nope.example"],
        "",
    )
    .await;
    assert_eq!(code, 2);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("invalid_target"), "{err}");
    assert!(!err.contains(&kmt));

    let (code, out, err) = cli(&s, "", &["token", "revoke"], &at).await;
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains(&at));
    assert!(!crate::introspect(&s.admin(), &at).await.active);
    // Junk is "revoked" too (RFC 7009 tells nothing).
    let (code, _, err) = cli(&s, "", &["token", "revoke"], "junk").await;
    assert_eq!(code, 0, "{err}");

    // `keymint run --resource`: the command gets an access token for the
    // resource, which dies with the task.
    let (code, out, err) = cli(
        &s,
        &s.admin_token,
        &[
            "run",
            "--role",
            "demo",
            "--workload",
            "runner",
            "--resource",
            TOOLS,
            "--resource-scope",
            "tools:read",
            "--",
            "sh",
            "-c",
            "printf '%s\\n%s\\n' \"$KEYMINT_ACCESS_TOKEN\" \"$KEYMINT_ACCESS_TOKEN_RESOURCE\"",
        ],
        "",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let mut lines = out.lines();
    let (run_at, res) = (lines.next().unwrap(), lines.next().unwrap());
    assert_eq!(res, TOOLS);
    let c = claims_of(run_at);
    assert_eq!(
        (c["sub"].as_str(), c["aud"].as_str()),
        (Some("runner"), Some(TOOLS))
    );
    assert_eq!(c["scope"], "tools:read");
    assert!(
        !crate::introspect(&s.admin(), run_at).await.active,
        "ended with the command's task"
    );
    // A resource nobody serves: the command does not run.
    let (code, out, err) = cli(
        &s,
        &s.admin_token,
        &[
            "run",
            "--role",
            "demo",
            "--workload",
            "runner",
            "--resource",
            "https://nope.example",
            "--",
            "echo",
            "ran",
        ],
        "",
    )
    .await;
    assert_eq!(code, 2, "{out}");
    assert!(!out.contains("ran"));
    assert!(err.contains("invalid_target"), "{err}");
}

/// RFC 7519 §2: a NumericDate may be fractional. A client assertion's
/// `exp`, `iat` and `nbf` and a DPoP proof's `iat` (RFC 9449 §4.2) are
/// read as the workload verifier reads them (floored). They used to be
/// read as integers only: a client whose JOSE library signs `time() + 60`
/// as `1796569266.25` was refused "the assertion needs an `exp`" (or "is
/// not valid yet"), and its DPoP proof "needs an `iat`".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fractional_numeric_dates_are_read_as_the_verifier_reads_them() {
    let (client, blocked) = (Key::new("c1"), Key::new("b1"));
    let s = server(&clients_toml(&client, &blocked)).await;
    let endpoint = format!("{}/oauth/token", s.url());
    let now = s.broker().now().unix_seconds() as f64 + 0.25;
    let claims = json!({"iss": "reports-bot", "sub": "reports-bot", "aud": endpoint,
        "iat": now, "nbf": now, "exp": now + 60.0, "jti": "frac-1"});
    let dpop = Key::new("d1");
    let proof = |nonce: Option<&str>, jti: &str| {
        let h = json!({"typ": "dpop+jwt", "alg": "EdDSA",
            "jwk": {"kty": "OKP", "crv": "Ed25519", "x": dpop.x()}});
        let mut c = json!({"jti": jti, "htm": "POST", "htu": endpoint, "iat": now});
        if let Some(n) = nonce {
            c["nonce"] = json!(n);
        }
        dpop.sign_with(&h, &c)
    };
    // The server's nonce, from any answer of the token endpoint.
    let r = s
        .anonymous()
        .raw(
            http::Method::POST,
            "/oauth/token",
            Some("application/x-www-form-urlencoded"),
            b"grant_type=client_credentials".to_vec(),
        )
        .await
        .unwrap();
    let nonce = r.headers["dpop-nonce"].to_str().unwrap().to_owned();
    let body = serde_urlencoded::to_string([
        ("grant_type", "client_credentials"),
        ("client_assertion_type", CA),
        ("client_assertion", client.sign(&claims).as_str()),
        ("resource", TOOLS),
    ])
    .unwrap();
    let r = s
        .anonymous()
        .with_header("dpop", &proof(Some(&nonce), "p1"))
        .unwrap()
        .raw(
            http::Method::POST,
            "/oauth/token",
            Some("application/x-www-form-urlencoded"),
            body.into_bytes(),
        )
        .await
        .unwrap();
    let t: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(r.status, 200, "{t}");
    assert_eq!(t["token_type"], "DPoP");
    // Floored, not rounded up: the same `jti` is still spent.
    let (st, e) = token(
        &s,
        &[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", CA),
            ("client_assertion", client.sign(&claims).as_str()),
            ("resource", TOOLS),
        ],
    )
    .await;
    assert_refused("replayed", (st, e), 401, "invalid_client");
    // A date that is not a number is still refused, as such.
    for (k, v) in [
        ("exp", json!("soon")),
        ("iat", json!(true)),
        ("nbf", json!(1e300)),
    ] {
        let mut c = claims.clone();
        c[k] = v;
        c["jti"] = json!(format!("bad-{k}"));
        let got = token(
            &s,
            &[
                ("grant_type", "client_credentials"),
                ("client_assertion_type", CA),
                ("client_assertion", client.sign(&c).as_str()),
                ("resource", TOOLS),
            ],
        )
        .await;
        assert_refused(k, got, 401, "invalid_client");
    }
}
