//! The OAuth 2 token service (docs/design/0026-oauth-token-service.md):
//! RFC 8414 metadata, RFC 8693 token exchange into RFC 9068 access tokens
//! bound to a resource and a task, DPoP (RFC 9449), introspection and
//! revocation; authlib as a real client; the attacks that must fail.

use std::process::Stdio;

use base64::Engine as _;
use keymint_client::Client;
use keymint_proto::Introspection;
use keymint_testkit::TestServer;
use serde_json::{Value, json};

use crate::postgres::in_ci;

pub(crate) const TOOLS: &str = "https://mcp.example/tools";
pub(crate) const FILES: &str = "https://mcp.example/files";
pub(crate) const TE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub(crate) const AT: &str = "urn:ietf:params:oauth:token-type:access_token";

pub(crate) const CONFIG: &str = r#"
[issuer]
algorithms = ["ES256", "EdDSA"]

[[roles]]
name = "tools"
engine = "jwt"
scopes = ["tools:read", "tools:write"]
default_ttl = "5m"
max_ttl = "30m"
[roles.jwt]
audience = "https://mcp.example/tools"

[[roles]]
name = "files"
engine = "jwt"
scopes = ["files:read"]
default_ttl = "5m"
max_ttl = "30m"
[roles.jwt]
audience = "https://mcp.example/files"
algorithm = "EdDSA"
"#;

/// Allows everything except `tools:write` for the workload `intruder`,
/// and holds any token asked with an actor for approval.
const POLICY: &str = r#"
@id("permit-all")
permit(principal, action, resource);

@id("no-writes-for-intruder")
forbid(principal == Keymint::Workload::"intruder", action == Keymint::Action::"issue", resource == Keymint::Role::"tools")
when { context has oauth && context.scopes.contains("tools:write") };

@id("delegated-files-need-a-human")
@approval("required")
permit(principal, action == Keymint::Action::"issue", resource == Keymint::Role::"files")
when { context has oauth && context.oauth.grant_type == "token_exchange" && context.oauth.actor_chain.contains("ci/reviewer") };
"#;

async fn server() -> TestServer {
    server_with("").await
}

async fn server_with(extra: &str) -> TestServer {
    TestServer::builder()
        .config_toml(&format!("{CONFIG}\n{extra}"))
        .policy(POLICY)
        .start()
        .await
        .unwrap()
}

/// A `kmt_` task token of a 10-minute task for `workload`.
async fn task_token(s: &TestServer, workload: &str) -> (keymint_proto::Task, String) {
    let t = crate::start_task(&s.admin(), workload).await;
    let (_, tok) = crate::issue(&s.admin(), &t.id).await;
    (t, tok)
}

fn form(pairs: &[(&str, &str)]) -> Vec<u8> {
    serde_urlencoded::to_string(pairs).unwrap().into_bytes()
}

async fn post_form(
    c: &Client,
    path: &str,
    pairs: &[(&str, &str)],
) -> (u16, Value, http::HeaderMap) {
    let r = c
        .raw(
            http::Method::POST,
            path,
            Some("application/x-www-form-urlencoded"),
            form(pairs),
        )
        .await
        .unwrap();
    let v = if r.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&r.body).unwrap_or(Value::String(r.text()))
    };
    (r.status.as_u16(), v, r.headers)
}

async fn exchange(s: &TestServer, extra: &[(&str, &str)]) -> (u16, Value) {
    let mut p = vec![("grant_type", TE)];
    p.extend_from_slice(extra);
    let (st, v, _) = post_form(&s.anonymous(), "/oauth/token", &p).await;
    (st, v)
}

fn claims_of(jwt: &str) -> (Value, Value) {
    let mut parts = jwt.split('.');
    let d = |p: Option<&str>| -> Value {
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p.unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    (d(parts.next()), d(parts.next()))
}

async fn introspect(s: &TestServer, tok: &str) -> Introspection {
    crate::introspect(&s.admin(), tok).await
}

/// Sends `head` and `body` (a whole HTTP/1.1 request with `connection:
/// close`) and returns the answer's head and body.
async fn raw_exchange(s: &TestServer, head: &str, body: &str) -> (String, String) {
    let sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let req = format!(
        "{head}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let text = crate::exchange(sock, req.as_bytes()).await;
    let (h, b) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (h.to_ascii_lowercase(), b.to_owned())
}

/// keymint takes no client secrets. A client that sends one (`Authorization:
/// Basic`, authlib's and many libraries' default) is refused as
/// `invalid_client` with the challenge RFC 6749 §5.2 asks for, not served
/// as if it had sent nothing (it would take that for authentication that
/// held); and another method at either endpoint is a 405 with a body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_secret_is_refused_and_other_methods_answer_405() {
    let s = server().await;
    let (_, tok) = task_token(&s, "agent-1").await;
    let body = String::from_utf8(form(&[
        ("grant_type", TE),
        ("subject_token", &tok),
        ("subject_token_type", AT),
        ("resource", TOOLS),
        ("scope", "tools:read"),
    ]))
    .unwrap();
    // Fake credentials: `client:secret`.
    let basic = "Basic Y2xpZW50OnNlY3JldA==";
    for path in ["/oauth/token", "/oauth/revoke"] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\nauthorization: {basic}\r\n"
        );
        let (h, b) = raw_exchange(&s, &head, &body).await;
        assert!(h.starts_with("http/1.1 401"), "{path}: {h}");
        assert!(
            h.contains("www-authenticate: basic realm=\"keymint\""),
            "{path}: {h}"
        );
        let v: Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["error"], "invalid_client", "{path}: {v}");
        assert!(
            !b.contains("c2VjcmV0") && !b.contains("secret\""),
            "{path}: {b}"
        );
    }
    // The same exchange without the header is served.
    let (st, v) = exchange(
        &s,
        &[
            ("subject_token", &tok),
            ("subject_token_type", AT),
            ("resource", TOOLS),
            ("scope", "tools:read"),
        ],
    )
    .await;
    assert_eq!(st, 200, "{v}");
    for path in ["/oauth/token", "/oauth/revoke"] {
        let (h, b) = raw_exchange(&s, &format!("GET {path} HTTP/1.1\r\nhost: x\r\n"), "").await;
        assert!(h.starts_with("http/1.1 405"), "{path}: {h}");
        assert!(h.contains("allow: post"), "{path}: {h}");
        let v: Value = serde_json::from_str(&b).unwrap_or_else(|_| panic!("{path}: {b}"));
        assert!(v.to_string().contains("method not allowed"), "{path}: {v}");
    }
}

/// A client secret in the form (`client_secret_post`, RFC 6749 §2.3.1) is
/// refused like one in `Authorization: Basic`: keymint takes no secrets,
/// and a client that sent one would take the token it got for
/// authentication that held. The secret is not echoed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_secret_in_the_form_is_refused() {
    let s = server().await;
    let (_, tok) = task_token(&s, "agent-1").await;
    // Made up for the test: not a real secret.
    let secret = "QZKWJVB-client-secret-fake";
    let (st, v, _) = post_form(
        &s.anonymous(),
        "/oauth/token",
        &[
            ("grant_type", TE),
            ("subject_token", &tok),
            ("subject_token_type", AT),
            ("resource", TOOLS),
            ("client_id", "agent-1"),
            ("client_secret", secret),
        ],
    )
    .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (401, Some("invalid_client")),
        "{v}"
    );
    assert!(!v.to_string().contains(secret), "{v}");
    let (st, v, _) = post_form(
        &s.anonymous(),
        "/oauth/revoke",
        &[
            ("token", &tok),
            ("client_id", "agent-1"),
            ("client_secret", secret),
        ],
    )
    .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (401, Some("invalid_client")),
        "{v}"
    );
    assert!(!v.to_string().contains(secret), "{v}");
    // Refused, so the token was not revoked.
    assert!(introspect(&s, &tok).await.active);
    // An empty secret (a public client's, as some libraries send it) is
    // no secret.
    let (st, v, _) = post_form(
        &s.anonymous(),
        "/oauth/token",
        &[
            ("grant_type", TE),
            ("subject_token", &tok),
            ("subject_token_type", AT),
            ("resource", TOOLS),
            ("client_secret", ""),
        ],
    )
    .await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_exchange_introspection_and_revocation() {
    let s = server().await;
    let base = s.url();
    let meta: Value = s
        .anonymous()
        .get("/.well-known/oauth-authorization-server")
        .await
        .unwrap();
    assert_eq!(meta["issuer"], base.as_str());
    assert_eq!(meta["token_endpoint"], format!("{base}/oauth/token"));
    assert_eq!(meta["revocation_endpoint"], format!("{base}/oauth/revoke"));
    assert_eq!(meta["jwks_uri"], format!("{base}/.well-known/jwks.json"));
    assert!(
        meta["grant_types_supported"]
            .as_array()
            .unwrap()
            .contains(&json!(TE))
    );
    assert!(
        meta["dpop_signing_alg_values_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("ES256"))
    );

    let (task, kmt) = task_token(&s, "agent-1").await;
    let (st, t) = exchange(
        &s,
        &[
            ("subject_token", &kmt),
            ("subject_token_type", AT),
            ("resource", TOOLS),
            ("scope", "tools:read"),
        ],
    )
    .await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["issued_token_type"], AT);
    assert_eq!(t["scope"], "tools:read");
    let at = t["access_token"].as_str().unwrap().to_owned();
    let (h, c) = claims_of(&at);
    assert_eq!(h["typ"], "at+jwt");
    assert_eq!(h["alg"], "ES256");
    assert_eq!(c["iss"], base.as_str());
    assert_eq!(c["aud"], TOOLS);
    assert_eq!(c["sub"], "agent-1");
    assert_eq!(c["client_id"], "agent-1");
    assert_eq!(c["scope"], "tools:read");
    assert_eq!(c["task_id"], task.id.as_str());
    assert!(c["exp"].as_i64().unwrap() <= task.expires_at.unix_seconds());
    let i = introspect(&s, &at).await;
    assert!(i.active);
    assert_eq!(i.aud.as_deref(), Some(TOOLS));
    assert_eq!(i.scope.as_deref(), Some("tools:read"));
    assert_eq!(i.task_id.as_deref(), Some(task.id.as_str()));
    assert_eq!(i.token_type.as_deref(), Some("Bearer"));

    // The roles' other algorithm.
    let (st, f) = exchange(
        &s,
        &[
            ("subject_token", &kmt),
            ("subject_token_type", AT),
            ("resource", FILES),
        ],
    )
    .await;
    assert_eq!(st, 200, "{f}");
    let files = f["access_token"].as_str().unwrap().to_owned();
    assert_eq!(claims_of(&files).0["alg"], "EdDSA");
    assert_eq!(f["scope"], "files:read");

    // Revocation (RFC 7009): 200, then inactive; an unknown token is 200 too.
    let (st, _, _) = post_form(&s.anonymous(), "/oauth/revoke", &[("token", &files)]).await;
    assert_eq!(st, 200);
    assert!(!introspect(&s, &files).await.active);
    assert!(introspect(&s, &at).await.active);
    let (st, _, _) = post_form(&s.anonymous(), "/oauth/revoke", &[("token", "nonsense")]).await;
    assert_eq!(st, 200);

    // The audit trail has the issuance, with the resource and no token.
    let events = s
        .admin()
        .get::<keymint_proto::List<Value>>("/v1/audit?limit=200")
        .await
        .unwrap()
        .items;
    let text = serde_json::to_string(&events).unwrap();
    assert!(text.contains("oauth.token_issued"));
    assert!(text.contains(TOOLS));
    assert!(!text.contains(&at));

    // Ending the task ends its access tokens: introspection says inactive
    // and an exchange from it is refused.
    let r = s
        .admin()
        .raw(
            http::Method::POST,
            &format!("/v1/tasks/{}/end", task.id),
            Some("application/json"),
            br#"{"status":"completed"}"#.to_vec(),
        )
        .await
        .unwrap();
    assert!(r.status.is_success(), "{}", r.text());
    assert!(!introspect(&s, &at).await.active);
    let (st, e) = exchange(
        &s,
        &[
            ("subject_token", &at),
            ("subject_token_type", AT),
            ("resource", TOOLS),
        ],
    )
    .await;
    assert_eq!(st, 400);
    assert_eq!(e["error"], "invalid_grant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_only_narrow_and_refusals_echo_nothing() {
    let s = server().await;
    let (task, kmt) = task_token(&s, "agent-2").await;
    let (st, t) = exchange(
        &s,
        &[
            ("subject_token", &kmt),
            ("subject_token_type", AT),
            ("resource", TOOLS),
            ("scope", "tools:read"),
            ("requested_lifetime", "120"),
        ],
    )
    .await;
    assert_eq!(st, 200, "{t}");
    let parent = t["access_token"].as_str().unwrap().to_owned();
    let parent_exp = claims_of(&parent).1["exp"].as_i64().unwrap();
    let sub = |extra: Vec<(&'static str, String)>| {
        let mut p: Vec<(&str, String)> = vec![
            ("subject_token", parent.clone()),
            ("subject_token_type", AT.to_owned()),
        ];
        p.extend(extra);
        p
    };
    let run = |p: Vec<(&'static str, String)>| {
        let s = &s;
        async move {
            let v: Vec<(&str, &str)> = p.iter().map(|(k, v)| (*k, v.as_str())).collect();
            exchange(s, &v).await
        }
    };
    // Narrower (same scope, shorter life): granted, never past the parent.
    let (st, child) = run(sub(vec![
        ("resource", TOOLS.into()),
        ("requested_lifetime", "60".into()),
    ]))
    .await;
    assert_eq!(st, 200, "{child}");
    let child_tok = child["access_token"].as_str().unwrap();
    assert!(claims_of(child_tok).1["exp"].as_i64().unwrap() <= parent_exp);
    assert_eq!(child["scope"], "tools:read");

    // Wider scope, another audience, longer life: refused.
    let (st, e) = run(sub(vec![
        ("resource", TOOLS.into()),
        ("scope", "tools:read tools:write".into()),
    ]))
    .await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_scope")));
    let (st, e) = run(sub(vec![("resource", FILES.into())])).await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_target")));
    let (st, e) = run(sub(vec![
        ("resource", TOOLS.into()),
        ("requested_lifetime", "600".into()),
    ]))
    .await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_request")));
    // Longer than the role allows, from a task token.
    let (st, e) = exchange(
        &s,
        &[
            ("subject_token", &kmt),
            ("subject_token_type", AT),
            ("resource", TOOLS),
            ("requested_lifetime", "7200"),
        ],
    )
    .await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_request")));

    // Bad input: a table of requests, each refused with its code, none
    // echoing what was sent.
    let marker = "MARKER-7d1e";
    let bad: Vec<(Vec<(&str, String)>, &str)> = vec![
        (
            vec![("resource", format!("https://{marker}.example"))],
            "invalid_target",
        ),
        (
            vec![
                ("resource", TOOLS.into()),
                ("scope", format!("tools:{marker}")),
            ],
            "invalid_scope",
        ),
        (
            vec![("resource", TOOLS.into()), ("resource", FILES.into())],
            "invalid_target",
        ),
        (vec![], "invalid_request"),
        (
            vec![
                ("resource", TOOLS.into()),
                ("requested_lifetime", marker.into()),
            ],
            "invalid_request",
        ),
        (
            vec![
                ("resource", TOOLS.into()),
                ("scope", format!("a\"{marker}")),
            ],
            "invalid_scope",
        ),
    ];
    for (extra, code) in bad {
        let (st, e) = run(sub(extra.clone())).await;
        assert_eq!((st, e["error"].as_str()), (400, Some(code)), "{extra:?}");
        assert!(!e.to_string().contains(marker), "{e}");
    }
    // Unknown grant, missing subject, a subject that is not a token.
    let (st, e, _) = post_form(&s.anonymous(), "/oauth/token", &[("grant_type", marker)]).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    assert!(!e.to_string().contains(marker));
    let (st, e) = exchange(&s, &[("resource", TOOLS), ("subject_token_type", AT)]).await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_request")));
    let (st, e) = exchange(
        &s,
        &[
            ("subject_token", marker),
            ("subject_token_type", AT),
            ("resource", TOOLS),
        ],
    )
    .await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_grant")));
    assert!(!e.to_string().contains(marker));
    // Repeated parameters and a JSON body.
    let (st, e, _) = post_form(
        &s.anonymous(),
        "/oauth/token",
        &[("grant_type", TE), ("grant_type", TE)],
    )
    .await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_request")));
    let r = s
        .anonymous()
        .raw(
            http::Method::POST,
            "/oauth/token",
            Some("application/json"),
            b"{}".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    // Oversized body.
    let big = "a".repeat(100 * 1024);
    let r = s
        .anonymous()
        .raw(
            http::Method::POST,
            "/oauth/token",
            Some("application/x-www-form-urlencoded"),
            form(&[("grant_type", TE), ("subject_token", &big)]),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 413);
    // Many parameters (each name once), at both endpoints: refused as such,
    // before the repeat check that costs their count squared.
    let names: Vec<String> = (0..65).map(|i| format!("p{i}")).collect();
    let mut many: Vec<(&str, &str)> = vec![("grant_type", TE)];
    many.extend(names.iter().map(|n| (n.as_str(), "")));
    for path in ["/oauth/token", "/oauth/revoke"] {
        let (st, e, _) = post_form(&s.anonymous(), path, &many).await;
        assert_eq!(
            (st, e["error_description"].as_str()),
            (400, Some("the form has more than 64 parameters")),
            "{path}: {e}"
        );
    }
    // At the limit, the request is read as usual.
    let (st, e, _) = post_form(&s.anonymous(), "/oauth/token", &many[..64]).await;
    assert_eq!(
        (st, e["error_description"].as_str()),
        (400, Some("`resource` is required")),
        "{e}"
    );
    // A media type is named in any case, with parameters; a longer name
    // that starts like it is another type.
    for (content_type, read) in [
        ("Application/X-WWW-Form-URLEncoded", true),
        ("application/x-www-form-urlencoded ; charset=UTF-8", true),
        ("application/x-www-form-urlencodedx", false),
    ] {
        let r = s
            .anonymous()
            .raw(
                http::Method::POST,
                "/oauth/token",
                Some(content_type),
                form(&[("grant_type", TE)]),
            )
            .await
            .unwrap();
        let e: Value = serde_json::from_slice(&r.body).unwrap();
        let told = e["error_description"].as_str().unwrap_or_default();
        assert_eq!(r.status, 400, "{content_type}: {e}");
        assert_eq!(
            told.contains("must be application/x-www-form-urlencoded"),
            !read,
            "{content_type}: {e}"
        );
    }
    drop(task);
}

/// A suspension (docs/design/0033) stops the credentials already out and
/// new ones: an access token of a suspended task is inactive at
/// introspection and exchanges for nothing, and so is the task's `kmt_`
/// token at introspection; lifted, both work again. Both used to read the
/// lease alone: a suspended task's access token was still `active` to a
/// resource server that introspects, and exchanged for fresh tokens that
/// one validating offline accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_tasks_tokens_are_inactive_and_exchange_for_nothing() {
    let s = server().await;
    let (task, kmt) = task_token(&s, "agent-1").await;
    let (st, t) = exchange(
        &s,
        &[
            ("subject_token", &kmt),
            ("subject_token_type", AT),
            ("resource", TOOLS),
        ],
    )
    .await;
    assert_eq!(st, 200, "{t}");
    let at = t["access_token"].as_str().unwrap().to_owned();
    assert!(introspect(&s, &at).await.active);

    let sus: Value = s
        .admin()
        .post(
            "/v1/suspensions",
            &json!({"scope": "task", "subject": task.id, "reason": "misuse"}),
        )
        .await
        .unwrap();
    assert!(!introspect(&s, &at).await.active);
    assert!(!introspect(&s, &kmt).await.active);
    for subject in [&kmt, &at] {
        let (st, e) = exchange(
            &s,
            &[
                ("subject_token", subject),
                ("subject_token_type", AT),
                ("resource", TOOLS),
            ],
        )
        .await;
        assert_eq!(
            (st, e["error"].as_str()),
            (400, Some("invalid_grant")),
            "{e}"
        );
    }

    let lift = format!("/v1/suspensions/{}/lift", sus["id"].as_str().unwrap());
    let r = s
        .admin()
        .raw(http::Method::POST, &lift, None, vec![])
        .await
        .unwrap();
    assert!(r.status.is_success(), "{}", r.text());
    assert!(introspect(&s, &at).await.active);
    assert!(introspect(&s, &kmt).await.active);
    let (st, t) = exchange(
        &s,
        &[
            ("subject_token", &at),
            ("subject_token_type", AT),
            ("resource", TOOLS),
        ],
    )
    .await;
    assert_eq!(st, 200, "{t}");
}

/// Exchanges `subject` (sent as an access token) for a token to `resource`.
async fn exchanged(s: &TestServer, subject: &str, resource: &str) -> String {
    let (st, t) = exchange(
        s,
        &[
            ("subject_token", subject),
            ("subject_token_type", AT),
            ("resource", resource),
        ],
    )
    .await;
    assert_eq!(st, 200, "{t}");
    t["access_token"].as_str().unwrap().to_owned()
}

/// A token exchanged from another ends when that one is revoked (RFC 7009
/// at `/oauth/revoke`), and so does everything exchanged from it in turn:
/// a holder who revokes a token that leaked, or the `kmt_` token it was
/// exchanged from, ends what the leak could still be turned into. Tokens
/// exchanged from other subjects of the same task are not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_token_ends_the_tokens_exchanged_from_it() {
    let s = server().await;
    let (_, kmt) = task_token(&s, "agent-1").await;
    // kmt → a → b → c, and a sibling of `a` from the same `kmt_` token.
    let a = exchanged(&s, &kmt, TOOLS).await;
    let b = exchanged(&s, &a, TOOLS).await;
    let c = exchanged(&s, &b, TOOLS).await;
    let files = exchanged(&s, &kmt, FILES).await;
    // Another `kmt_` token of another task: not touched by any of this.
    let (_, other_kmt) = task_token(&s, "agent-2").await;
    let other = exchanged(&s, &other_kmt, TOOLS).await;
    for t in [&a, &b, &c, &files, &other] {
        assert!(introspect(&s, t).await.active);
    }

    let (st, _, _) = post_form(&s.anonymous(), "/oauth/revoke", &[("token", &b)]).await;
    assert_eq!(st, 200);
    assert!(introspect(&s, &a).await.active, "the subject of `b` stays");
    assert!(!introspect(&s, &b).await.active);
    assert!(
        !introspect(&s, &c).await.active,
        "a token exchanged from a revoked token is still active"
    );
    let (st, e) = exchange(
        &s,
        &[
            ("subject_token", &c),
            ("subject_token_type", AT),
            ("resource", TOOLS),
        ],
    )
    .await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("invalid_grant")),
        "{e}"
    );

    // Revoking the `kmt_` token ends every token exchanged from it.
    let (st, _, _) = post_form(&s.anonymous(), "/oauth/revoke", &[("token", &kmt)]).await;
    assert_eq!(st, 200);
    assert!(
        !introspect(&s, &a).await.active,
        "a token exchanged from a revoked `kmt_` token is still active"
    );
    assert!(!introspect(&s, &files).await.active);
    assert!(introspect(&s, &other).await.active);

    // A chain of exchanges is bounded: each link is read when the last is
    // checked.
    let mut t = other;
    for _ in 1..16 {
        t = exchanged(&s, &t, TOOLS).await;
    }
    assert!(introspect(&s, &t).await.active);
    let (st, e) = exchange(
        &s,
        &[
            ("subject_token", &t),
            ("subject_token_type", AT),
            ("resource", TOOLS),
        ],
    )
    .await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("invalid_grant")),
        "{e}"
    );
}

/// Revoking a token marks the tokens exchanged from it revoked in the
/// store too, in the same transaction, each with its own audit event
/// naming the revoked ancestor: the lease list, the inventory and the
/// audit trail no longer show as live what is refused on use (they did,
/// until each token's own expiry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_token_marks_the_tokens_exchanged_from_it_revoked() {
    use keymint_core::model::{Lease, LeaseState};
    let s = server().await;
    let admin = s.admin();
    let (task, kmt) = task_token(&s, "agent-9").await;
    let a = exchanged(&s, &kmt, TOOLS).await;
    let b = exchanged(&s, &a, TOOLS).await;
    let c = exchanged(&s, &b, TOOLS).await;
    let sibling = exchanged(&s, &kmt, FILES).await;
    let id = |t: &str| claims_of(t).1["jti"].as_str().unwrap().to_owned();
    let (ia, ib, ic, isib) = (id(&a), id(&b), id(&c), id(&sibling));
    let states = || {
        let admin = &admin;
        let task = &task.id;
        async move {
            let l: keymint_proto::List<Lease> =
                admin.get(&format!("/v1/leases?task={task}")).await.unwrap();
            l.items
                .into_iter()
                .map(|l| (l.id, l.state))
                .collect::<std::collections::HashMap<_, _>>()
        }
    };
    let inventory = || {
        let admin = &admin;
        async move {
            let p: keymint_proto::inventory::InventoryPage =
                admin.get("/v1/inventory").await.unwrap();
            p.items.into_iter().map(|i| i.id).collect::<Vec<_>>()
        }
    };
    assert!(inventory().await.contains(&ic));
    let head = s.broker().store().counts().await.unwrap().audit_head;

    let (st, _, _) = post_form(&s.anonymous(), "/oauth/revoke", &[("token", &a)]).await;
    assert_eq!(st, 200);
    let now = states().await;
    for l in [&ia, &ib, &ic] {
        assert_eq!(
            now[l],
            LeaseState::Revoked,
            "a token exchanged from a revoked token is listed as {:?}",
            now[l]
        );
    }
    assert_eq!(now[&isib], LeaseState::Active, "a sibling is not touched");
    let inv = inventory().await;
    assert!(!inv.contains(&ib) && !inv.contains(&ic), "{inv:?}");
    assert!(inv.contains(&isib));
    assert!(!introspect(&s, &c).await.active);
    assert!(introspect(&s, &sibling).await.active);
    let ev = s.broker().store().audit_after(head, 100).await.unwrap();
    let mut asked: Vec<_> = ev
        .iter()
        .filter(|e| e.kind == "lease.revoke_requested")
        .map(|e| {
            (
                e.lease.clone().unwrap(),
                e.data.get("exchanged_from").cloned(),
            )
        })
        .collect();
    asked.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        asked,
        vec![
            (ia.clone(), None),
            (ib.clone(), Some(json!(ia))),
            (ic.clone(), Some(json!(ia))),
        ]
    );
    // None of them appears in the trail with the token.
    for e in &ev {
        let line = serde_json::to_string(e).unwrap();
        assert!(!line.contains(&c) && !line.contains(&b));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_foreign_tokens_are_refused() {
    let s = server().await;
    let (_, kmt) = task_token(&s, "agent-3").await;
    let (_, t) = exchange(
        &s,
        &[
            ("subject_token", &kmt),
            ("subject_token_type", AT),
            ("resource", TOOLS),
            ("scope", "tools:read"),
        ],
    )
    .await;
    let at = t["access_token"].as_str().unwrap().to_owned();
    let (h, c) = claims_of(&at);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = at.split('.').collect();
    // A changed claim with the old signature.
    let mut widened = c.clone();
    widened["scope"] = json!("tools:read tools:write");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(widened.to_string()),
        parts[2]
    );
    // alg=none.
    let none = format!(
        "{}.{}.",
        b64.encode(json!({"alg": "none", "typ": "at+jwt"}).to_string()),
        parts[1]
    );
    let none_sig = format!("{none}AAAA");
    // Signed by keymint's own key but with another issuer, expired, or as
    // a plain JWT rather than an access token.
    let keys = s.broker().oidc().unwrap().keys();
    let now = s.broker().now();
    let sign = |typ: &str, f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut m = c.as_object().unwrap().clone();
        f(&mut m);
        keys.sign_typed(keymint_core::role::SigningAlg::ES256, typ, &m, now)
            .unwrap()
    };
    let wrong_iss = sign("at+jwt", &|m| {
        m.insert("iss".into(), json!("https://evil.example"));
    });
    let expired = sign("at+jwt", &|m| {
        m.insert("exp".into(), json!(now.unix_seconds() - 10));
    });
    let plain_jwt = sign("JWT", &|_| {});
    // A token re-signed with keymint's key but not one keymint recorded.
    let unrecorded = sign("at+jwt", &|m| {
        m.insert("jti".into(), json!("lea_0000000000000000000000"));
    });
    assert_eq!(h["typ"], "at+jwt");
    assert_ne!(forged, at);
    for (name, tok) in [
        ("forged", &forged),
        ("none", &none),
        ("none-sig", &none_sig),
        ("wrong-iss", &wrong_iss),
        ("expired", &expired),
        ("plain-jwt", &plain_jwt),
        ("unrecorded", &unrecorded),
    ] {
        assert!(!introspect(&s, tok).await.active, "{name}");
        let (st, e) = exchange(
            &s,
            &[
                ("subject_token", tok),
                ("subject_token_type", AT),
                ("resource", TOOLS),
            ],
        )
        .await;
        assert_eq!(
            (st, e["error"].as_str()),
            (400, Some("invalid_grant")),
            "{name}"
        );
    }
    assert!(introspect(&s, &at).await.active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_decides_tokens_with_the_oauth_context_and_approvals_hold_them() {
    let ops = tempfile::tempdir().unwrap();
    let s = server_with(&format!(
        "[approvals]\nttl = \"10m\"\n[[operators]]\nname = \"alice\"\ntoken_file = {:?}\n",
        ops.path().join("alice.token").display().to_string()
    ))
    .await;
    let alice = std::fs::read_to_string(ops.path().join("alice.token"))
        .unwrap()
        .trim()
        .to_owned();
    // Denied by a forbid on `tools:write` for this workload; audited.
    let (_, kmt) = task_token(&s, "intruder").await;
    let (st, e) = exchange(
        &s,
        &[
            ("subject_token", &kmt),
            ("subject_token_type", AT),
            ("resource", TOOLS),
            ("scope", "tools:write"),
        ],
    )
    .await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("access_denied")),
        "{e}"
    );
    let (st, _) = exchange(
        &s,
        &[
            ("subject_token", &kmt),
            ("subject_token_type", AT),
            ("resource", TOOLS),
            ("scope", "tools:read"),
        ],
    )
    .await;
    assert_eq!(st, 200);
    let events = s
        .admin()
        .get::<keymint_proto::List<Value>>("/v1/audit?limit=200")
        .await
        .unwrap()
        .items;
    assert!(
        events.iter().any(
            |e| e["kind"] == "oauth.denied" && e.to_string().contains("no-writes-for-intruder")
        ),
        "{events:?}"
    );

    // An actor token adds to the `act` chain; a delegated token for
    // `files` is held for a human, then granted once when asked again.
    let (_, lead) = task_token(&s, "ci/lead").await;
    let (_, reviewer) = task_token(&s, "ci/reviewer").await;
    let (st, t) = exchange(
        &s,
        &[
            ("subject_token", &lead),
            ("subject_token_type", AT),
            ("actor_token", &reviewer),
            ("actor_token_type", AT),
            ("resource", TOOLS),
        ],
    )
    .await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(
        claims_of(t["access_token"].as_str().unwrap()).1["act"],
        json!({"sub": "ci/reviewer"})
    );
    let ask = [
        ("subject_token", lead.as_str()),
        ("subject_token_type", AT),
        ("actor_token", reviewer.as_str()),
        ("actor_token_type", AT),
        ("resource", FILES),
    ];
    let (st, e) = exchange(&s, &ask).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("authorization_pending")),
        "{e}"
    );
    let apr = e["approval"].as_str().unwrap().to_owned();
    // Asking again with the approval before a human decided: still pending.
    let mut again = ask.to_vec();
    again.push(("approval", &apr));
    let (st, e) = exchange(&s, &again).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("authorization_pending")),
        "{e}"
    );
    let r = s
        .client(&alice)
        .raw(
            http::Method::POST,
            &format!("/v1/approvals/{apr}/approve"),
            Some("application/json"),
            b"{}".to_vec(),
        )
        .await
        .unwrap();
    assert!(r.status.is_success(), "{}", r.text());
    // Another token cannot use the approval.
    let mut stolen = again.clone();
    stolen[0] = ("subject_token", reviewer.as_str());
    let (st, e) = exchange(&s, &stolen).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("invalid_grant")),
        "{e}"
    );
    let (st, t) = exchange(&s, &again).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(
        claims_of(t["access_token"].as_str().unwrap()).1["aud"],
        FILES
    );
    // Used once.
    let (st, e) = exchange(&s, &again).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("invalid_grant")),
        "{e}"
    );
}

/// An approval of a held token request covers that request: the actor it
/// delegates to and the lifetime it asked for too, which the approver
/// sees. Asked again with another actor or a longer life, the approval
/// does not cover it (and stays for the request it was made for); before,
/// a token acting for an actor no human had approved came out of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_covers_the_actor_and_lifetime_it_was_asked_with() {
    let ops = tempfile::tempdir().unwrap();
    let policy = r#"
@id("permit-all")
permit(principal, action, resource);

@id("delegated-files-need-a-human")
@approval("required")
permit(principal, action == Keymint::Action::"issue", resource == Keymint::Role::"files")
when { context has oauth && (context.oauth.actor_chain.contains("ci/reviewer") || context.oauth.actor_chain.contains("ci/intruder")) };
"#;
    let s = TestServer::builder()
        .config_toml(&format!(
            "{CONFIG}\n[approvals]\nttl = \"10m\"\n[[operators]]\nname = \"alice\"\ntoken_file = {:?}\n",
            ops.path().join("alice.token").display().to_string()
        ))
        .policy(policy)
        .start()
        .await
        .unwrap();
    let alice = std::fs::read_to_string(ops.path().join("alice.token"))
        .unwrap()
        .trim()
        .to_owned();
    let (_, lead) = task_token(&s, "ci/lead").await;
    let (_, reviewer) = task_token(&s, "ci/reviewer").await;
    let (_, intruder) = task_token(&s, "ci/intruder").await;
    let ask = |actor: &str, extra: &[(&'static str, &str)]| {
        let mut p: Vec<(String, String)> = vec![
            ("subject_token".into(), lead.clone()),
            ("subject_token_type".into(), AT.into()),
            ("actor_token".into(), actor.to_owned()),
            ("actor_token_type".into(), AT.into()),
            ("resource".into(), FILES.into()),
        ];
        p.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        p
    };
    let send = |p: Vec<(String, String)>| {
        let s = &s;
        async move {
            let p: Vec<(&str, &str)> = p.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            exchange(s, &p).await
        }
    };
    let (st, e) = send(ask(&reviewer, &[])).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("authorization_pending")),
        "{e}"
    );
    let apr = e["approval"].as_str().unwrap().to_owned();
    // The approver sees whom the token would act for.
    let held: Value = s
        .client(&alice)
        .get(&format!("/v1/approvals/{apr}"))
        .await
        .unwrap();
    assert!(held.to_string().contains("ci/reviewer"), "{held}");
    let r = s
        .client(&alice)
        .raw(
            http::Method::POST,
            &format!("/v1/approvals/{apr}/approve"),
            Some("application/json"),
            b"{}".to_vec(),
        )
        .await
        .unwrap();
    assert!(r.status.is_success(), "{}", r.text());

    // Another actor, or a longer life, is not what was approved.
    for p in [
        ask(
            &reviewer,
            &[("approval", &apr), ("requested_lifetime", "500")],
        ),
        ask(&intruder, &[("approval", &apr)]),
    ] {
        let (st, e) = send(p).await;
        assert_eq!(
            (st, e["error"].as_str()),
            (400, Some("invalid_grant")),
            "{e}"
        );
    }
    // The request that was approved is granted, once.
    let (st, t) = send(ask(&reviewer, &[("approval", &apr)])).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(
        claims_of(t["access_token"].as_str().unwrap()).1["act"],
        json!({"sub": "ci/reviewer"})
    );
}

/// A held token request binds the DPoP key it was asked with, not only
/// the use of DPoP: redeemed with another key's proof (or none), it is
/// refused as `invalid_grant` with a description that says so, audited
/// (`approval.redeem_refused`, both thumbprints), and the approval stays
/// for the key the approver saw. Before, the token came out bound to the
/// other key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_covers_the_dpop_key_it_was_asked_with() {
    let ops = tempfile::tempdir().unwrap();
    let s = TestServer::builder()
        .config_toml(&format!(
            "{CONFIG}\n[approvals]\nttl = \"10m\"\n[[operators]]\nname = \"alice\"\ntoken_file = {:?}\n",
            ops.path().join("alice.token").display().to_string()
        ))
        .policy(POLICY)
        .start()
        .await
        .unwrap();
    let alice = std::fs::read_to_string(ops.path().join("alice.token"))
        .unwrap()
        .trim()
        .to_owned();
    let url = format!("{}/oauth/token", s.url());
    let now = s.broker().now().unix_seconds();
    let (_, lead) = task_token(&s, "ci/lead").await;
    let (_, reviewer) = task_token(&s, "ci/reviewer").await;
    let (key, other) = (DpopKey::new(21), DpopKey::new(22));
    let jkt = |k: &DpopKey| keymint_identity::jws::thumbprint(&k.jwk()).unwrap();
    let send = |proof: Option<String>, approval: Option<&str>| {
        let s = &s;
        let mut p = vec![
            ("grant_type", TE.to_owned()),
            ("subject_token", lead.clone()),
            ("subject_token_type", AT.to_owned()),
            ("actor_token", reviewer.clone()),
            ("actor_token_type", AT.to_owned()),
            ("resource", FILES.to_owned()),
        ];
        if let Some(a) = approval {
            p.push(("approval", a.to_owned()));
        }
        async move {
            let c = match proof {
                Some(pr) => s.anonymous().with_header("dpop", &pr).unwrap(),
                None => s.anonymous(),
            };
            let v: Vec<(&str, &str)> = p.iter().map(|(k, v)| (*k, v.as_str())).collect();
            post_form(&c, "/oauth/token", &v).await
        }
    };
    let (st, e, h) = send(Some(key.proof("POST", &url, None, "k1", now)), None).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("use_dpop_nonce")),
        "{e}"
    );
    let nonce = h["dpop-nonce"].to_str().unwrap().to_owned();
    let (st, e, _) = send(Some(key.proof("POST", &url, Some(&nonce), "k2", now)), None).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("authorization_pending")),
        "{e}"
    );
    let apr = e["approval"].as_str().unwrap().to_owned();
    let held: Value = s
        .client(&alice)
        .get(&format!("/v1/approvals/{apr}"))
        .await
        .unwrap();
    assert_eq!(held["request"]["jkt"], json!(jkt(&key)), "{held}");
    let r = s
        .client(&alice)
        .raw(
            http::Method::POST,
            &format!("/v1/approvals/{apr}/approve"),
            Some("application/json"),
            b"{}".to_vec(),
        )
        .await
        .unwrap();
    assert!(r.status.is_success(), "{}", r.text());

    let head = s.broker().store().counts().await.unwrap().audit_head;
    // Another key's proof, then none: refused, said plainly, audited.
    for (n, proof) in [
        (
            "other key",
            Some(other.proof("POST", &url, Some(&nonce), "o1", now)),
        ),
        ("no proof", None),
    ] {
        let (st, e, _) = send(proof, Some(&apr)).await;
        assert_eq!(
            (st, e["error"].as_str()),
            (400, Some("invalid_grant")),
            "{n}: a held request was redeemed with another DPoP key: {e}"
        );
        assert!(
            e["error_description"]
                .as_str()
                .unwrap()
                .contains("DPoP key it was asked with"),
            "{n}: {e}"
        );
    }
    let ev = s.broker().store().audit_after(head, 50).await.unwrap();
    let refused: Vec<_> = ev
        .iter()
        .filter(|e| e.kind == "approval.redeem_refused")
        .collect();
    assert_eq!(refused.len(), 2, "{ev:?}");
    assert_eq!(refused[0].data["approval"], json!(apr));
    assert_eq!(refused[0].data["jkt_approved"], json!(jkt(&key)));
    assert_eq!(refused[0].data["jkt_presented"], json!(jkt(&other)));
    assert_eq!(refused[1].data["jkt_presented"], Value::Null);
    let still: Value = s
        .client(&alice)
        .get(&format!("/v1/approvals/{apr}"))
        .await
        .unwrap();
    assert_eq!(still["status"], "approved");

    // The key it was asked with: granted, bound to that key.
    let (st, t, _) = send(
        Some(key.proof("POST", &url, Some(&nonce), "k3", now)),
        Some(&apr),
    )
    .await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(
        claims_of(t["access_token"].as_str().unwrap()).1["cnf"],
        json!({"jkt": jkt(&key)})
    );
}

/// An Ed25519 DPoP key and proofs made with it.
struct DpopKey {
    sk: ed25519_dalek::SigningKey,
}

impl DpopKey {
    fn new(seed: u8) -> Self {
        Self {
            sk: ed25519_dalek::SigningKey::from_bytes(&[seed; 32]),
        }
    }
    fn jwk(&self) -> Value {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        json!({"kty": "OKP", "crv": "Ed25519", "x": b64.encode(self.sk.verifying_key().as_bytes())})
    }
    fn proof(&self, htm: &str, htu: &str, nonce: Option<&str>, jti: &str, iat: i64) -> String {
        self.proof_with_jwk(self.jwk(), htm, htu, nonce, jti, iat)
    }
    /// The key's whole JWK, its private half (`d`, made at test time) too.
    fn private_jwk(&self) -> Value {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut j = self.jwk();
        j["d"] = json!(b64.encode(self.sk.to_bytes()));
        j
    }
    fn proof_with_jwk(
        &self,
        jwk: Value,
        htm: &str,
        htu: &str,
        nonce: Option<&str>,
        jti: &str,
        iat: i64,
    ) -> String {
        use ed25519_dalek::Signer as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let h = json!({"typ": "dpop+jwt", "alg": "EdDSA", "jwk": jwk});
        let mut c = json!({"jti": jti, "htm": htm, "htu": htu, "iat": iat});
        if let Some(n) = nonce {
            c["nonce"] = json!(n);
        }
        let input = format!(
            "{}.{}",
            b64.encode(h.to_string()),
            b64.encode(c.to_string())
        );
        let sig = self.sk.sign(input.as_bytes());
        format!("{input}.{}", b64.encode(sig.to_bytes()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_binds_tokens_with_nonces_and_refuses_replays() {
    let s = server().await;
    let url = format!("{}/oauth/token", s.url());
    let now = s.broker().now().unix_seconds();
    let (_, kmt) = task_token(&s, "agent-4").await;
    let key = DpopKey::new(7);
    let other = DpopKey::new(9);
    let body = [
        ("grant_type", TE),
        ("subject_token", kmt.as_str()),
        ("subject_token_type", AT),
        ("resource", TOOLS),
    ];
    let send = |proof: String, pairs: Vec<(&'static str, String)>| {
        let s = &s;
        async move {
            let c = s.anonymous().with_header("dpop", &proof).unwrap();
            let v: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            post_form(&c, "/oauth/token", &v).await
        }
    };
    let owned = |b: &[(&str, &str)]| -> Vec<(&'static str, String)> {
        b.iter()
            .map(|(k, v)| {
                let k: &'static str = match *k {
                    "grant_type" => "grant_type",
                    "subject_token" => "subject_token",
                    "subject_token_type" => "subject_token_type",
                    _ => "resource",
                };
                (k, v.to_string())
            })
            .collect()
    };
    // Without the server's nonce: `use_dpop_nonce` and a `DPoP-Nonce`.
    let (st, e, h) = send(key.proof("POST", &url, None, "p1", now), owned(&body)).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("use_dpop_nonce")),
        "{e}"
    );
    let nonce = h["dpop-nonce"].to_str().unwrap().to_owned();
    // With it: a DPoP-bound token with `cnf.jkt` = the key's thumbprint.
    let proof = key.proof("POST", &url, Some(&nonce), "p2", now);
    let (st, t, _) = send(proof.clone(), owned(&body)).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["token_type"], "DPoP");
    let at = t["access_token"].as_str().unwrap().to_owned();
    let jkt = keymint_identity::jws::thumbprint(&key.jwk()).unwrap();
    assert_eq!(claims_of(&at).1["cnf"], json!({"jkt": jkt}));
    let i = introspect(&s, &at).await;
    assert_eq!(i.cnf.map(|c| c.jkt), Some(jkt.clone()));
    assert_eq!(i.token_type.as_deref(), Some("DPoP"));
    // The same proof again: refused as a replay.
    let (st, e, _) = send(proof, owned(&body)).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("invalid_dpop_proof")),
        "{e}"
    );
    // Wrong method, wrong URL, stale iat, a wrong nonce, a private key in
    // the header: refused.
    for (name, p) in [
        ("htm", key.proof("GET", &url, Some(&nonce), "p3", now)),
        (
            "htu",
            key.proof(
                "POST",
                "https://evil.example/oauth/token",
                Some(&nonce),
                "p4",
                now,
            ),
        ),
        (
            "iat",
            key.proof("POST", &url, Some(&nonce), "p5", now - 3600),
        ),
    ] {
        let (st, e, _) = send(p, owned(&body)).await;
        assert_eq!(
            (st, e["error"].as_str()),
            (400, Some("invalid_dpop_proof")),
            "{name}: {e}"
        );
    }
    let (st, e, _) = send(
        key.proof_with_jwk(key.private_jwk(), "POST", &url, Some(&nonce), "p7", now),
        owned(&body),
    )
    .await;
    assert_eq!(
        (st, e["error"].as_str(), e["error_description"].as_str()),
        (
            400,
            Some("invalid_dpop_proof"),
            Some("the DPoP proof's `jwk` must be a public key")
        ),
        "{e}"
    );
    // The same key with its `x` padded (`=`): RFC 7515 base64url has no
    // padding, and the padded spelling would hash to another thumbprint,
    // binding the token to a `jkt` the key's own proofs never match.
    let mut padded = key.jwk();
    let x = format!("{}=", padded["x"].as_str().unwrap());
    padded["x"] = json!(x);
    assert_ne!(
        keymint_identity::jws::thumbprint(&padded),
        keymint_identity::jws::thumbprint(&key.jwk())
    );
    let (st, e, _) = send(
        key.proof_with_jwk(padded, "POST", &url, Some(&nonce), "p8", now),
        owned(&body),
    )
    .await;
    assert_eq!(
        (st, e["error"].as_str(), e["error_description"].as_str()),
        (
            400,
            Some("invalid_dpop_proof"),
            Some("the DPoP proof's `jwk` members must be base64url without padding")
        ),
        "{e}"
    );
    let (st, e, _) = send(
        key.proof("POST", &url, Some("not-the-nonce"), "p6", now),
        owned(&body),
    )
    .await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("use_dpop_nonce")),
        "{e}"
    );

    // Exchanging the bound token: without a proof, or with another key's
    // proof, refused; with its own key's proof, granted and still bound.
    let sub = vec![
        ("grant_type", TE.to_owned()),
        ("subject_token", at.clone()),
        ("subject_token_type", AT.to_owned()),
        ("resource", TOOLS.to_owned()),
    ];
    let v: Vec<(&str, &str)> = sub.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (st, e, _) = post_form(&s.anonymous(), "/oauth/token", &v).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("invalid_grant")),
        "{e}"
    );
    let (st, e, _) = send(
        other.proof("POST", &url, Some(&nonce), "o1", now),
        sub.clone(),
    )
    .await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("invalid_grant")),
        "{e}"
    );
    let (st, t, _) = send(key.proof("POST", &url, Some(&nonce), "p7", now), sub).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(
        claims_of(t["access_token"].as_str().unwrap()).1["cnf"]["jkt"],
        jkt.as_str()
    );
}

/// Whether python3 with `modules` is here; fails under CI if not.
pub(crate) async fn python_has(modules: &str) -> bool {
    let ok = tokio::process::Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            !in_ci(),
            "python3 with `{modules}` is required in CI (see .ci/run)"
        );
        eprintln!("skipping: python3 with `{modules}` is not installed");
    }
    ok
}

/// authlib's OAuth 2 client performs the token exchange, reading the
/// token endpoint from the metadata; authlib's JOSE validates the token
/// from the JWKS named there, and refuses it for another audience.
const AUTHLIB: &str = r#"
import json, sys, urllib.request
from authlib.integrations.requests_client import OAuth2Session
from authlib.jose import JsonWebToken, JsonWebKey
from authlib.jose.errors import InvalidClaimError

inp = json.load(sys.stdin)
meta = json.load(urllib.request.urlopen(inp["issuer"] + "/.well-known/oauth-authorization-server"))
assert meta["issuer"] == inp["issuer"], meta
client = OAuth2Session(token_endpoint_auth_method="none")
tok = client.fetch_token(
    meta["token_endpoint"],
    grant_type="urn:ietf:params:oauth:grant-type:token-exchange",
    subject_token=inp["subject"],
    subject_token_type="urn:ietf:params:oauth:token-type:access_token",
    resource=inp["resource"],
    scope="tools:read",
)
keys = JsonWebKey.import_key_set(json.load(urllib.request.urlopen(meta["jwks_uri"])))
jwt = JsonWebToken(meta["access_token_signing_alg_values_supported"])
claims = jwt.decode(tok["access_token"], keys, claims_options={
    "iss": {"essential": True, "value": meta["issuer"]},
    "aud": {"essential": True, "value": inp["resource"]},
    "exp": {"essential": True},
    "sub": {"essential": True},
})
claims.validate()
other = jwt.decode(tok["access_token"], keys, claims_options={"aud": {"essential": True, "value": "https://mcp.example/files"}})
try:
    other.validate()
    refused = False
except InvalidClaimError:
    refused = True
header = jwt.decode(tok["access_token"], keys).header
print(json.dumps({"token": tok, "claims": dict(claims), "typ": header.get("typ"), "other_aud_refused": refused}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authlib_exchanges_and_validates_via_metadata_and_jwks() {
    use tokio::io::AsyncWriteExt;
    if !python_has("authlib, requests, cryptography").await {
        return;
    }
    let s = server().await;
    let (task, kmt) = task_token(&s, "agent-py").await;
    let input = json!({"issuer": s.url(), "subject": kmt, "resource": TOOLS});
    let mut child = tokio::process::Command::new("python3")
        .args(["-c", AUTHLIB])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["typ"], "at+jwt");
    assert_eq!(v["claims"]["aud"], TOOLS);
    assert_eq!(v["claims"]["sub"], "agent-py");
    assert_eq!(v["claims"]["task_id"], task.id.as_str());
    assert_eq!(v["token"]["token_type"], "Bearer");
    assert_eq!(v["other_aud_refused"], true);
    let at = v["token"]["access_token"].as_str().unwrap();
    assert!(introspect(&s, at).await.active);
}

/// The MCP SDK's discovery URLs for an authorization server (RFC 8414
/// §3.1 path insertion first), as JSON.
const MCP_DISCOVERY: &str = r#"
import json, sys
from mcp.client.auth.utils import build_oauth_authorization_server_metadata_discovery_urls as urls
issuer = sys.argv[1]
print(json.dumps(urls(issuer, issuer)))
"#;

/// RFC 8414 §3.1: the metadata of an issuer whose URL has a path is at
/// `/.well-known/oauth-authorization-server` followed by that path, the
/// first URL the MCP SDK (and any RFC 8414 client) asks. keymint served
/// it at the root only, so a client of an issuer with a path found
/// nothing. A path that is not the issuer's is still not found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_with_a_path_serves_its_metadata_where_rfc_8414_puts_it() {
    let issuer = "http://127.0.0.1:9/auth/keymint";
    let s = TestServer::builder()
        .config_toml(&CONFIG.replace("[issuer]\n", &format!("[issuer]\nurl = \"{issuer}/\"\n")))
        .policy(POLICY)
        .start()
        .await
        .unwrap();
    let mut expected = format!("{issuer}/.well-known/oauth-authorization-server");
    if python_has("mcp").await {
        let out = tokio::process::Command::new("python3")
            .args(["-c", MCP_DISCOVERY, issuer])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let urls: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
        expected = urls[0].clone();
    }
    let path = expected.strip_prefix("http://127.0.0.1:9").unwrap();
    assert_eq!(path, "/.well-known/oauth-authorization-server/auth/keymint");
    let r = s
        .anonymous()
        .raw(http::Method::GET, path, None, vec![])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let meta: Value = r.json().unwrap();
    assert_eq!(meta["issuer"], issuer);
    assert_eq!(meta["token_endpoint"], format!("{issuer}/oauth/token"));
    for other in [
        "/.well-known/oauth-authorization-server/auth",
        "/.well-known/oauth-authorization-server/auth/keymint/x",
        "/.well-known/oauth-authorization-server/other",
    ] {
        let r = s
            .anonymous()
            .raw(http::Method::GET, other, None, vec![])
            .await
            .unwrap();
        assert_eq!(r.status, 404, "{other}: {}", r.text());
    }
}

pub(crate) const WL_ISSUER: &str = "https://ci.example.test";
pub(crate) const JB: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// A workload identity issuer the server trusts (`[identity]`), signing
/// with an Ed25519 key made for the test.
struct WorkloadIssuer {
    key: ed25519_dalek::SigningKey,
}

impl WorkloadIssuer {
    fn new() -> Self {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).unwrap();
        Self {
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        }
    }
    fn x(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.key.verifying_key().as_bytes())
    }
    fn toml(&self) -> String {
        format!(
            "[identity]\n[[identity.jwt]]\nname = \"ci\"\nissuer = \"{WL_ISSUER}\"\n\
             audiences = [\"keymint\"]\n\
             jwks = {{ inline = '{{\"keys\":[{{\"kty\":\"OKP\",\"crv\":\"Ed25519\",\"x\":\"{}\",\"kid\":\"k1\"}}]}}' }}\n",
            self.x()
        )
    }
    fn assertion(&self, claims: Value) -> String {
        use ed25519_dalek::Signer as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let input = format!(
            "{}.{}",
            b64.encode(br#"{"alg":"EdDSA","typ":"JWT","kid":"k1"}"#),
            b64.encode(claims.to_string())
        );
        format!(
            "{input}.{}",
            b64.encode(self.key.sign(input.as_bytes()).to_bytes())
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_bearer_takes_a_workload_jwt_once_for_the_token_endpoint() {
    let iss = WorkloadIssuer::new();
    let s = server_with(&format!(
        "{}[[nodes]]\nname = \"pool-1\"\nidentity = \"ci/node-agent\"\n",
        iss.toml()
    ))
    .await;
    let endpoint = format!("{}/oauth/token", s.url());
    let now = s.broker().now().unix_seconds();
    let claims = |jti: &str, aud: Value, exp: i64| json!({"iss": WL_ISSUER, "sub": "bot-1", "aud": aud, "iat": now, "exp": exp, "jti": jti});
    let both = json!(["keymint", endpoint]);
    let a = iss.assertion(claims("j1", both.clone(), now + 120));
    let ask = |assertion: String, extra: Vec<(&'static str, String)>| {
        let s = &s;
        async move {
            let mut p = vec![
                ("grant_type", JB.to_owned()),
                ("assertion", assertion),
                ("resource", TOOLS.to_owned()),
            ];
            p.extend(extra);
            let v: Vec<(&str, &str)> = p.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let (st, body, _) = post_form(&s.anonymous(), "/oauth/token", &v).await;
            (st, body)
        }
    };
    let (st, t) = ask(a.clone(), vec![("scope", "tools:read".into())]).await;
    assert_eq!(st, 200, "{t}");
    let at = t["access_token"].as_str().unwrap().to_owned();
    let c = claims_of(&at).1;
    assert_eq!(c["sub"], "ci/bot-1");
    assert_eq!(c["aud"], TOOLS);
    assert_eq!(c["scope"], "tools:read");
    // Its own task, as long as the token: ending it ends the token.
    let task_id = c["task_id"].as_str().unwrap().to_owned();
    let task: keymint_proto::Task = s
        .admin()
        .get(&format!("/v1/tasks/{task_id}"))
        .await
        .unwrap();
    assert_eq!(task.workload, "ci/bot-1");
    assert_eq!(task.role, "tools");
    assert!(c["exp"].as_i64().unwrap() <= task.expires_at.unix_seconds());
    assert!(introspect(&s, &at).await.active);

    // The same assertion again: a replay.
    let (st, e) = ask(a, vec![]).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("invalid_grant")),
        "{e}"
    );
    // A node's own identity is the node's (as at the API and as the subject
    // of an exchange): no task and no token as a workload of that name.
    let node = iss.assertion(json!({"iss": WL_ISSUER, "sub": "node-agent", "aud": both, "iat": now, "exp": now + 120, "jti": "j-node"}));
    let (st, e) = ask(node, vec![]).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("invalid_grant")),
        "{e}"
    );
    let tasks: keymint_proto::List<keymint_proto::Task> =
        s.admin().get("/v1/tasks?limit=500").await.unwrap();
    assert!(
        tasks.items.iter().all(|t| t.workload != "ci/node-agent"),
        "{:?}",
        tasks.items
    );
    // A fractional `exp` (a NumericDate may have one; the verifier floors
    // it) is still used once: the second use is a replay.
    let frac = iss.assertion(json!({"iss": WL_ISSUER, "sub": "bot-1", "aud": both, "iat": now, "exp": now as f64 + 120.5, "jti": "j-frac"}));
    let (st, t) = ask(frac.clone(), vec![]).await;
    assert_eq!(st, 200, "{t}");
    for _ in 0..2 {
        let (st, e) = ask(frac.clone(), vec![]).await;
        assert_eq!(
            (st, e["error"].as_str(), e["error_description"].as_str()),
            (
                400,
                Some("invalid_grant"),
                Some("the assertion was already used")
            ),
            "{e}"
        );
    }
    // `aud` without the token endpoint, no `jti`, expired, signed by
    // another key, unknown issuer: refused.
    let other = WorkloadIssuer::new();
    for (name, bad) in [
        ("aud", iss.assertion(claims("j2", json!("keymint"), now + 120))),
        ("jti", iss.assertion(json!({"iss": WL_ISSUER, "sub": "bot-1", "aud": both, "iat": now, "exp": now + 120}))),
        ("expired", iss.assertion(claims("j3", both.clone(), now - 100))),
        ("key", other.assertion(claims("j4", both.clone(), now + 120))),
        ("issuer", iss.assertion(json!({"iss": "https://evil.example", "sub": "bot-1", "aud": both, "iat": now, "exp": now + 120, "jti": "j5"}))),
    ] {
        let (st, e) = ask(bad, vec![]).await;
        assert_eq!((st, e["error"].as_str()), (400, Some("invalid_grant")), "{name}: {e}");
    }
    // Scope beyond the role, lifetime beyond the role: refused before the
    // assertion is spent, so the same assertion then gets a token, once.
    let a6 = iss.assertion(claims("j6", both.clone(), now + 120));
    let (st, e) = ask(a6.clone(), vec![("scope", "admin".into())]).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("invalid_scope")),
        "{e}"
    );
    let (st, e) = ask(a6.clone(), vec![("requested_lifetime", "86400".into())]).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("invalid_request")),
        "{e}"
    );
    let (st, t) = ask(a6.clone(), vec![("scope", "tools:read".into())]).await;
    assert_eq!(st, 200, "{t}");
    let (st, e) = ask(a6, vec![]).await;
    assert_eq!(
        (st, e["error_description"].as_str()),
        (400, Some("the assertion was already used")),
        "{e}"
    );

    // authlib: OAuth2Session performs the jwt-bearer grant with an
    // assertion authlib's JOSE signs with the workload's key.
    if !python_has("authlib, requests, cryptography").await {
        return;
    }
    let d = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(iss.key.to_bytes());
    let input = json!({
        "issuer": s.url(),
        "jwk": {"kty": "OKP", "crv": "Ed25519", "x": iss.x(), "d": d},
        "wl_issuer": WL_ISSUER,
        "resource": TOOLS,
    });
    let v = run_python(AUTHLIB_JWT_BEARER, &input).await;
    assert_eq!(v["token"]["token_type"], "Bearer");
    assert_eq!(v["claims"]["sub"], "ci/bot-1");
    assert_eq!(v["claims"]["aud"], TOOLS);
    assert_eq!(v["replay_error"], "invalid_grant");
}

const AUTHLIB_JWT_BEARER: &str = r#"
import json, sys, time, uuid, urllib.request
from authlib.integrations.requests_client import OAuth2Session
from authlib.jose import JsonWebToken, JsonWebKey
from authlib.integrations.base_client.errors import OAuthError

inp = json.load(sys.stdin)
meta = json.load(urllib.request.urlopen(inp["issuer"] + "/.well-known/oauth-authorization-server"))
assert "urn:ietf:params:oauth:grant-type:jwt-bearer" in meta["grant_types_supported"], meta
now = int(time.time())
key = JsonWebKey.import_key(inp["jwk"])
assertion = JsonWebToken(["EdDSA"]).encode(
    {"alg": "EdDSA", "kid": "k1"},
    {"iss": inp["wl_issuer"], "sub": "bot-1", "aud": ["keymint", meta["token_endpoint"]],
     "iat": now, "exp": now + 120, "jti": str(uuid.uuid4())},
    key,
).decode()
client = OAuth2Session(token_endpoint_auth_method="none")
tok = client.fetch_token(meta["token_endpoint"],
    grant_type="urn:ietf:params:oauth:grant-type:jwt-bearer",
    assertion=assertion, resource=inp["resource"])
keys = JsonWebKey.import_key_set(json.load(urllib.request.urlopen(meta["jwks_uri"])))
claims = JsonWebToken(meta["access_token_signing_alg_values_supported"]).decode(
    tok["access_token"], keys, claims_options={
        "iss": {"essential": True, "value": meta["issuer"]},
        "aud": {"essential": True, "value": inp["resource"]}})
claims.validate()
try:
    client.fetch_token(meta["token_endpoint"],
        grant_type="urn:ietf:params:oauth:grant-type:jwt-bearer",
        assertion=assertion, resource=inp["resource"])
    replay = None
except OAuthError as e:
    replay = e.error
print(json.dumps({"token": tok, "claims": dict(claims), "replay_error": replay}))
"#;

pub(crate) async fn run_python(script: &str, input: &Value) -> Value {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
