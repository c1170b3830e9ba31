//! keymint as an OIDC issuer (docs/design/0016-oidc-issuer.md): PyJWT and
//! authlib verify its workload JWTs from the discovery document and JWKS,
//! across a signing-key rotation; AWS credentials from moto's STS through
//! `keymint run`, used by boto3, with the JWT keymint sent checked against
//! keymint's JWKS.

use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use keymint_proto::{IssueLease, IssuedLease, StartTask, Task};
use keymint_testkit::TestServer;
use serde_json::{Value, json};

use crate::postgres::in_ci;

const AUD: &str = "https://verifier.example";

const ROLES: &str = r#"
[[roles]]
name = "wl-es"
engine = "jwt"
scopes = []
default_ttl = "10m"
max_ttl = "1h"
[roles.jwt]
audience = "https://verifier.example"

[[roles]]
name = "wl-rs"
engine = "jwt"
scopes = []
default_ttl = "10m"
max_ttl = "1h"
[roles.jwt]
audience = ["https://verifier.example", "other"]
algorithm = "RS256"

[[roles]]
name = "wl-ed"
engine = "jwt"
scopes = []
default_ttl = "10m"
max_ttl = "1h"
[roles.jwt]
audience = "https://verifier.example"
algorithm = "EdDSA"
"#;

/// Whether python3 with `modules` is here; fails under CI if not.
async fn python_has(modules: &str) -> bool {
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

async fn task_in(s: &TestServer, role: &str, workload: &str, ttl: u64) -> Task {
    s.admin()
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some(workload.into()),
                role: Some(role.into()),
                ttl_secs: Some(ttl),
                intent: Some("read the build logs".into()),
                ..StartTask::default()
            },
        )
        .await
        .unwrap()
}

async fn jwt_in(s: &TestServer, task: &str, ttl: Option<u64>) -> String {
    let l: IssuedLease = s
        .admin()
        .post(
            &format!("/v1/tasks/{task}/leases"),
            &IssueLease {
                ttl_secs: ttl,
                ..IssueLease::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        l.lease.revocability,
        keymint_core::model::Revocability::ExpireOnly
    );
    l.credential.secret().expose().to_owned()
}

const VERIFY: &str = r#"
import json, sys, urllib.request
import jwt
from authlib.jose import JsonWebToken, JsonWebKey

inp = json.load(sys.stdin)
disc = json.load(urllib.request.urlopen(inp["issuer"] + "/.well-known/openid-configuration"))
assert disc["issuer"] == inp["issuer"], disc
algs = disc["id_token_signing_alg_values_supported"]
client = jwt.PyJWKClient(disc["jwks_uri"], cache_keys=False, cache_jwk_set=False)
out = {"pyjwt": {}, "authlib": {}, "refused": {}}
for name, tok in inp["valid"].items():
    key = client.get_signing_key_from_jwt(tok)
    out["pyjwt"][name] = jwt.decode(tok, key.key, algorithms=algs, audience=inp["aud"],
        issuer=inp["issuer"], options={"require": ["exp", "iat", "sub", "jti", "aud", "iss"]})
jwks = json.load(urllib.request.urlopen(disc["jwks_uri"]))
keyset = JsonWebKey.import_key_set(jwks)
for name, tok in inp["valid"].items():
    c = JsonWebToken(algs).decode(tok, keyset, claims_options={
        "iss": {"essential": True, "value": inp["issuer"]},
        "aud": {"essential": True, "value": inp["aud"]},
        "exp": {"essential": True}})
    c.validate()
    out["authlib"][name] = dict(c)
for name, (tok, aud) in inp["bad"].items():
    try:
        key = client.get_signing_key_from_jwt(tok)
        jwt.decode(tok, key.key, algorithms=algs, audience=aud, issuer=inp["issuer"])
        out["refused"][name] = None
    except Exception as e:
        out["refused"][name] = type(e).__name__
print(json.dumps(out))
"#;

async fn python_verify(input: &Value) -> Value {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("python3")
        .args(["-c", VERIFY])
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

/// A new issuer key must be published longer than a verifier may cache
/// the JWKS (`max-age=300`) plus the replicas' 30 s re-read, or a token
/// could carry a `kid` the verifier has not seen: a shorter
/// `[issuer] publish_ahead` is refused at load, naming the key and the
/// minimum.
#[tokio::test]
async fn publish_ahead_under_the_jwks_cache_life_is_refused_at_load() {
    for (ahead, ok) in [
        ("0s", false),
        ("10s", false),
        ("5m", false),
        ("329s", false),
        ("330s", true),
        ("10m", true),
    ] {
        let toml = format!("[issuer]\npublish_ahead = \"{ahead}\"\n");
        match TestServer::builder().config_toml(&toml).start().await {
            Ok(s) => {
                assert!(ok, "`{ahead}` accepted");
                s.stop().await;
            }
            Err(e) => {
                let msg = format!("{e:#}");
                assert!(!ok, "`{ahead}` refused: {msg}");
                assert!(
                    msg.contains("`issuer.publish_ahead`") && msg.contains("at least 5m30s"),
                    "{msg}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyjwt_and_authlib_verify_keymint_tokens_across_a_key_rotation() {
    if !python_has("jwt, authlib, cryptography").await {
        return;
    }
    let s = TestServer::builder()
        .config_toml(ROLES)
        .issuer_publish_ahead_secs(10)
        .start()
        .await
        .unwrap();
    let issuer = s.url();
    let anon = s.anonymous();
    let disc = anon
        .raw(
            http::Method::GET,
            "/.well-known/openid-configuration",
            None,
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(disc.status, 200);
    assert!(
        disc.headers["cache-control"]
            .to_str()
            .unwrap()
            .contains("max-age")
    );
    let disc: Value = disc.json().unwrap();
    assert_eq!(disc["issuer"], issuer.as_str());
    assert_eq!(disc["jwks_uri"], format!("{issuer}/.well-known/jwks.json"));

    // A sub-agent's token carries the delegation chain as `act`.
    let parent = task_in(&s, "wl-es", "ci/planner", 1800).await;
    let child: Task = s
        .admin()
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some("ci/worker".into()),
                parent: Some(parent.id.clone()),
                ttl_secs: Some(300),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    let (_, c) = claims_of(&jwt_in(&s, &child.id, None).await);
    assert_eq!(c["sub"], "ci/worker");
    assert_eq!(c["act"], json!({"sub": "ci/planner"}));
    assert!(c["exp"].as_i64().unwrap() <= child.expires_at.unix_seconds());
    let before = jwt_in(&s, &parent.id, None).await;
    let (h, c) = claims_of(&before);
    let old_kid = h["kid"].as_str().unwrap().to_owned();
    assert_eq!(h["alg"], "ES256");
    assert_eq!(c["iss"], issuer.as_str());
    assert_eq!(c["sub"], "ci/planner");
    assert_eq!(c["aud"], AUD);
    assert_eq!(c["task_id"], parent.id.as_str());
    assert_eq!(c["intent"], "read the build logs");
    assert_eq!(c["role"], "wl-es");
    // `exp` never past the task's end.
    assert!(c["exp"].as_i64().unwrap() <= parent.expires_at.unix_seconds());
    let rs_task = task_in(&s, "wl-rs", "ci/planner", 600).await;
    let rs = jwt_in(&s, &rs_task.id, None).await;
    assert_eq!(claims_of(&rs).0["alg"], "RS256");
    assert_eq!(claims_of(&rs).1["aud"], json!([AUD, "other"]));
    let ed_task = task_in(&s, "wl-ed", "ci/planner", 600).await;
    let ed = jwt_in(&s, &ed_task.id, None).await;
    assert_eq!(claims_of(&ed).0["alg"], "EdDSA");

    // Rotation: only the admin; the new keys are published at once and
    // sign only later.
    let demo = crate::start_task(&s.admin(), "someone").await;
    let (_, kmt) = crate::issue(&s.admin(), &demo.id).await;
    let r = s
        .client(&kmt)
        .raw(http::Method::POST, "/v1/issuer/rotate", None, vec![])
        .await
        .unwrap();
    assert!(r.status == 401 || r.status == 403, "{}", r.status);
    let rotated: Vec<Value> = s.admin().post_empty("/v1/issuer/rotate").await.unwrap();
    assert_eq!(rotated.len(), 3);
    let new_es = rotated.iter().find(|k| k["alg"] == "ES256").unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    let jwks: Value = anon.get("/.well-known/jwks.json").await.unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert!(kids.contains(&old_kid.as_str()) && kids.contains(&new_es.as_str()));
    assert_eq!(kids.len(), 6, "{kids:?}");
    for k in jwks["keys"].as_array().unwrap() {
        assert!(
            k.get("d").is_none() && k.get("p").is_none(),
            "a private member: {k}"
        );
    }
    let during = jwt_in(&s, &parent.id, None).await;
    assert_eq!(claims_of(&during).0["kid"], old_kid.as_str());
    // A second rotation while this one is under way is refused as a
    // conflict (409 `conflict`), not as a caller without the right.
    let again = s
        .admin()
        .raw(http::Method::POST, "/v1/issuer/rotate", None, vec![])
        .await
        .unwrap();
    let problem: Value = serde_json::from_slice(&again.body).unwrap();
    assert_eq!(
        (again.status.as_u16(), problem["code"].as_str()),
        (409, Some("conflict")),
        "{problem}"
    );
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("a rotation is already under way")),
        "{problem}"
    );
    // Within a deadline, new tokens carry the new kid.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let after = loop {
        let t = jwt_in(&s, &parent.id, None).await;
        if claims_of(&t).0["kid"] == new_es.as_str() {
            break t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new key never signed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // An expired token: 1 s of life, then waited out.
    let short = jwt_in(&s, &parent.id, Some(1)).await;
    let forged = {
        let mut p: Vec<&str> = after.split('.').collect();
        let (_, mut claims) = claims_of(&after);
        claims["sub"] = json!("admin");
        let body = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&claims).unwrap());
        p[1] = &body;
        p.join(".")
    };
    let none_alg = {
        let (mut h, c) = claims_of(&after);
        h["alg"] = json!("none");
        let e = |v: &Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
        };
        format!("{}.{}.", e(&h), e(&c))
    };
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let out = python_verify(&json!({
        "issuer": issuer,
        "aud": AUD,
        "valid": {"before": before, "after": after, "rs": rs, "ed": ed},
        "bad": {
            "forged": [forged, AUD],
            "wrong_audience": [after, "https://someone-else.example"],
            "expired": [short, AUD],
            "none": [none_alg, AUD],
        }
    }))
    .await;
    // The token signed before the rotation still verifies after it.
    for lib in ["pyjwt", "authlib"] {
        for name in ["before", "after", "rs", "ed"] {
            assert_eq!(out[lib][name]["iss"], issuer.as_str(), "{lib} {name}");
        }
        assert_eq!(out[lib]["before"]["task_id"], parent.id.as_str());
    }
    assert_eq!(out["refused"]["forged"], "InvalidSignatureError");
    assert_eq!(out["refused"]["wrong_audience"], "InvalidAudienceError");
    assert_eq!(out["refused"]["expired"], "ExpiredSignatureError");
    assert!(out["refused"]["none"].is_string(), "{}", out["refused"]);

    // Audited, with the key ids only.
    let audit: Value = s.admin().get("/v1/audit?limit=1000").await.unwrap();
    let text = audit.to_string();
    assert!(text.contains("issuer.rotated") && text.contains(&new_es));
}

/// moto in server mode on a free loopback port, killed on drop.
struct Moto {
    url: String,
    _child: tokio::process::Child,
    /// moto's working directory (its recording file goes there).
    _dir: tempfile::TempDir,
}

async fn moto() -> Option<Moto> {
    if !python_has("boto3, moto, flask, flask_cors").await {
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let child = tokio::process::Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .current_dir(dir.path())
        .env("MOTO_ENABLE_RECORDING", "True")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(!in_ci(), "moto_server is required in CI: {e}");
            eprintln!("skipping: moto_server cannot start ({e})");
            return None;
        }
    };
    let url = format!("http://127.0.0.1:{port}");
    let c = keymint_client::Client::new(&url, None).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if c.raw(http::Method::GET, "/moto-api/", None, vec![])
            .await
            .is_ok_and(|r| r.status == 200)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "moto_server never answered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = c
        .raw(
            http::Method::POST,
            "/moto-api/recorder/start-recording",
            None,
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    Some(Moto {
        url,
        _child: child,
        _dir: dir,
    })
}

impl Moto {
    /// The STS form bodies moto received, as key → value maps.
    async fn sts_requests(&self) -> Vec<std::collections::HashMap<String, String>> {
        let c = keymint_client::Client::new(&self.url, None).unwrap();
        let rec = c
            .raw(
                http::Method::GET,
                "/moto-api/recorder/download-recording",
                None,
                vec![],
            )
            .await
            .unwrap()
            .text();
        rec.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|r| {
                let body = r["body"].as_str()?.to_owned();
                let body = if r["body_encoded"] == true {
                    String::from_utf8(
                        base64::engine::general_purpose::STANDARD
                            .decode(body)
                            .ok()?,
                    )
                    .ok()?
                } else {
                    body
                };
                let form: std::collections::HashMap<String, String> =
                    serde_urlencoded::from_str(&body).ok()?;
                (form.get("Action").map(String::as_str) == Some("AssumeRoleWithWebIdentity"))
                    .then_some(form)
            })
            .collect()
    }
}

const POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["s3:ListAllMyBuckets","s3:CreateBucket"],"Resource":"*"}]}"#;

fn aws_roles(sts: &str) -> String {
    format!(
        r#"
[[roles]]
name = "aws-agent"
engine = "aws"
scopes = []
default_ttl = "30m"
max_ttl = "1h"
[roles.aws]
role_arn = "arn:aws:iam::123456789012:role/agent"
region = "eu-west-1"
sts_endpoint = "{sts}/"
session_policy = '{POLICY}'
timeout_secs = 5

[[roles]]
name = "aws-down"
engine = "aws"
scopes = []
default_ttl = "30m"
max_ttl = "1h"
[roles.aws]
role_arn = "arn:aws:iam::123456789012:role/agent"
region = "eu-west-1"
sts_endpoint = "http://127.0.0.1:9/"
timeout_secs = 2
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keymint_run_gives_boto3_sts_credentials_for_keymint_s_own_jwt() {
    let Some(moto) = moto().await else {
        return;
    };
    let s = TestServer::builder()
        .config_toml(&aws_roles(&moto.url))
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen.json");
    let script = dir.path().join("script.py");
    std::fs::write(
        &script,
        format!(
            r#"
import boto3, json, os
sts = boto3.client("sts", endpoint_url={moto:?})
me = sts.get_caller_identity()
s3 = boto3.client("s3", endpoint_url={moto:?})
s3.create_bucket(Bucket="agent-reports", CreateBucketConfiguration={{"LocationConstraint": "eu-west-1"}})
names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
json.dump({{"arn": me["Arn"], "buckets": names, "region": os.environ["AWS_REGION"],
           "key": os.environ["AWS_ACCESS_KEY_ID"], "task": os.environ["KEYMINT_TASK_ID"]}},
          open({seen:?}, "w"))
"#,
            moto = moto.url,
            seen = seen.display().to_string(),
        ),
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keymint"))
        .args([
            "run",
            "--role",
            "aws-agent",
            "--workload",
            "python3",
            // `keymint run`'s default idle timeout: STS credentials follow
            // the task's hard end, not its idle deadline (docs/design/0028).
            "--ttl",
            "1200",
            "--",
            "python3",
        ])
        .arg(&script)
        .env("KEYMINT_ADDR", s.url())
        .env("KEYMINT_TOKEN", &s.admin_token)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_str(&std::fs::read_to_string(&seen).unwrap()).unwrap();
    let task_id = seen["task"].as_str().unwrap().to_owned();
    assert_eq!(
        seen["arn"],
        format!("arn:aws:sts::123456789012:assumed-role/agent/{task_id}")
    );
    assert_eq!(seen["buckets"], json!(["agent-reports"]));
    assert_eq!(seen["region"], "eu-west-1");
    assert!(seen["key"].as_str().unwrap().starts_with("ASIA"));

    // The JWT keymint sent to STS verifies against keymint's own discovery
    // document and JWKS, with the right aud, sub and exp.
    let sent = moto.sts_requests().await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    let form = &sent[0];
    assert_eq!(form["RoleArn"], "arn:aws:iam::123456789012:role/agent");
    assert_eq!(form["RoleSessionName"], task_id);
    assert_eq!(form["Policy"], POLICY);
    let duration: u64 = form["DurationSeconds"].parse().unwrap();
    assert!((1190..=1200).contains(&duration), "{duration}");
    let verifier = keymint_identity::Verifier::from_config(
        serde_json::from_value(json!({
            "jwt": [{
                "name": "keymint",
                "issuer": s.url(),
                "audiences": ["sts.amazonaws.com"],
                "jwks": "discovery",
            }]
        }))
        .unwrap(),
    )
    .unwrap();
    let token = &form["WebIdentityToken"];
    let now = keymint_core::Clock::now(&keymint_core::SystemClock);
    let w = verifier.verify(token, now).await.unwrap();
    assert_eq!(w.id, "python3");
    let (h, c) = claims_of(token);
    assert_eq!(h["alg"], "RS256");
    assert_eq!(c["aud"], "sts.amazonaws.com");
    assert_eq!(c["task_id"], task_id.as_str());
    let task: Task = s
        .admin()
        .get(&format!("/v1/tasks/{task_id}"))
        .await
        .unwrap();
    assert!(c["exp"].as_i64().unwrap() <= task.expires_at.unix_seconds());
    // The lease is expire-only and the task is over.
    assert!(task.status != keymint_core::model::TaskStatus::Active);

    // A task shorter than STS's 15 minutes is refused before STS is called.
    let short = task_in(&s, "aws-agent", "python3", 300).await;
    let r = s
        .admin()
        .raw(
            http::Method::POST,
            &format!("/v1/tasks/{}/leases", short.id),
            Some("application/json"),
            b"{}".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("allow_longer_than_task"), "{}", r.text());
    assert_eq!(moto.sts_requests().await.len(), 1);

    // STS unreachable: a clear error, audited, the lease revoked, no secret.
    let down = task_in(&s, "aws-down", "python3", 1200).await;
    let r = s
        .admin()
        .raw(
            http::Method::POST,
            &format!("/v1/tasks/{}/leases", down.id),
            Some("application/json"),
            b"{}".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("provider_unavailable"), "{}", r.text());
    assert_eq!(
        r.headers["retry-after"], "5",
        "a 503 says when to ask again"
    );
    let audit: Value = s.admin().get("/v1/audit?limit=1000").await.unwrap();
    assert!(audit.to_string().contains("lease.apply_failed"));
}
