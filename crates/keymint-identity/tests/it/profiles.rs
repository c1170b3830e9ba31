//! Kubernetes, GitHub Actions and SPIFFE profiles, and claim mappings.

use std::collections::BTreeMap;

use keymint_identity::{AuthError, JwksSource, JwtIssuerConfig, Method, Profile, Verifier};
use serde_json::{Value, json};

use crate::support::*;

fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect()
}

const K8S_ISS: &str = "https://oidc.cluster.test";

/// A projected service-account token as the kubelet asks the API server for.
fn k8s_claims(ns: &str, sa: &str) -> Value {
    json!({
        "aud": [AUD],
        "exp": NOW_SECS + 3600,
        "iat": NOW_SECS - 10,
        "nbf": NOW_SECS - 10,
        "iss": K8S_ISS,
        "jti": "8d6b7a2e-3c1f-4a57-9e0a-6f2b1d9c4e11",
        "kubernetes.io": {
            "namespace": ns,
            "node": {"name": "node-1", "uid": "5f3e"},
            "pod": {"name": "triage-bot-7d9f", "uid": "a1b2"},
            "serviceaccount": {"name": sa, "uid": "c3d4"}
        },
        "sub": format!("system:serviceaccount:{ns}:{sa}")
    })
}

#[tokio::test]
async fn kubernetes_service_account_tokens() {
    let k = TestKey::rsa("k8s");
    let mut c = inline_config(K8S_ISS, &[&k]);
    c.profile = Some(Profile::Kubernetes);
    c.claim_mappings.insert("jti".into(), "jti".into());
    let v = Verifier::new(vec![c]).unwrap();
    let w = v
        .verify(&k.token(&k8s_claims("agents", "triage")), now())
        .await
        .unwrap();
    assert_eq!(w.id, "k8s:agents/triage");
    assert_eq!(w.method, Method::Jwt);
    assert_eq!(
        w.attributes,
        attrs(&[
            ("namespace", "agents"),
            ("service_account", "triage"),
            ("service_account_uid", "c3d4"),
            ("pod", "triage-bot-7d9f"),
            ("pod_uid", "a1b2"),
            ("node", "node-1"),
            ("jti", "8d6b7a2e-3c1f-4a57-9e0a-6f2b1d9c4e11"),
        ])
    );
    // `sub` and the kubernetes.io claims must agree.
    let mut lying = k8s_claims("agents", "triage");
    lying["sub"] = json!("system:serviceaccount:kube-system:admin");
    assert_eq!(
        v.verify(&k.token(&lying), now()).await,
        Err(AuthError::InvalidClaim("kubernetes.io.namespace".into()))
    );
    let mut not_sa = k8s_claims("agents", "triage");
    not_sa["sub"] = json!("user:alice");
    assert_eq!(
        v.verify(&k.token(&not_sa), now()).await,
        Err(AuthError::InvalidClaim("sub".into()))
    );
    // A legacy secret-based token (no exp, no aud) is refused.
    let legacy = json!({
        "iss": K8S_ISS,
        "kubernetes.io/serviceaccount/namespace": "agents",
        "sub": "system:serviceaccount:agents:triage"
    });
    assert_eq!(
        v.verify(&k.token(&legacy), now()).await,
        Err(AuthError::MissingClaim("exp".into()))
    );
}

const GH_ISS: &str = "https://token.actions.githubusercontent.com";

fn github_claims(owner: &str) -> Value {
    json!({
        "jti": "example-id",
        "sub": format!("repo:{owner}/agent-repo:environment:prod"),
        "environment": "prod",
        "aud": AUD,
        "ref": "refs/heads/main",
        "sha": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4",
        "repository": format!("{owner}/agent-repo"),
        "repository_owner": owner,
        "repository_id": "74",
        "repository_owner_id": "65",
        "actor_id": "12",
        "run_id": "6041234567",
        "run_number": "10",
        "run_attempt": "2",
        "runner_environment": "github-hosted",
        "actor": "octocat",
        "workflow": "agent",
        "workflow_ref": format!("{owner}/agent-repo/.github/workflows/agent.yml@refs/heads/main"),
        "job_workflow_ref": format!("{owner}/agent-repo/.github/workflows/agent.yml@refs/heads/main"),
        "head_ref": "",
        "base_ref": "",
        "event_name": "workflow_dispatch",
        "ref_type": "branch",
        "iss": GH_ISS,
        "nbf": NOW_SECS - 20,
        "exp": NOW_SECS + 280,
        "iat": NOW_SECS - 10
    })
}

#[tokio::test]
async fn github_actions_tokens() {
    let k = TestKey::rsa("gh");
    let mut c = inline_config(GH_ISS, &[&k]);
    c.profile = Some(Profile::GithubActions);
    c.bound_claims
        .insert("repository_owner".into(), vec!["octo-org".into()]);
    c.bound_claims
        .insert("repository_owner_id".into(), vec!["65".into()]);
    let v = Verifier::new(vec![c]).unwrap();
    let w = v
        .verify(&k.token(&github_claims("octo-org")), now())
        .await
        .unwrap();
    assert_eq!(w.id, "github:65/74:octo-org/agent-repo@refs/heads/main");
    assert_eq!(w.attributes["repository"], "octo-org/agent-repo");
    assert_eq!(w.attributes["repository_owner"], "octo-org");
    assert_eq!(w.attributes["ref"], "refs/heads/main");
    assert_eq!(w.attributes["environment"], "prod");
    assert_eq!(w.attributes["run_id"], "6041234567");
    assert_eq!(w.attributes["actor"], "octocat");
    assert_eq!(
        w.attributes["job_workflow_ref"],
        "octo-org/agent-repo/.github/workflows/agent.yml@refs/heads/main"
    );
    assert_eq!(w.attributes.len(), 17);

    // Any repository on GitHub can ask for a token with our audience:
    // bound_claims keeps out the ones that are not ours.
    assert_eq!(
        v.verify(&k.token(&github_claims("evil-org")), now()).await,
        Err(AuthError::ClaimNotAllowed("repository_owner".into()))
    );
    let mut inconsistent = github_claims("octo-org");
    inconsistent["repository"] = json!("evil-org/agent-repo");
    assert_eq!(
        v.verify(&k.token(&inconsistent), now()).await,
        Err(AuthError::InvalidClaim("repository".into()))
    );
    let mut no_ref = github_claims("octo-org");
    no_ref.as_object_mut().unwrap().remove("ref");
    assert_eq!(
        v.verify(&k.token(&no_ref), now()).await,
        Err(AuthError::MissingClaim("ref".into()))
    );
}

/// Verifies `claims` signed with `k`, at [`now`].
async fn signed(
    v: &Verifier,
    k: &TestKey,
    claims: &Value,
) -> Result<keymint_identity::Workload, AuthError> {
    v.verify(&k.token(claims), now()).await
}

/// GitHub names can be deleted and registered again by someone else
/// (GitHub's advice: rely on `repository_id` and `repository_owner_id`,
/// which are never reused). Tokens signed by the issuer's key with the same
/// names and other ids are other workloads, or refused.
#[tokio::test]
async fn a_re_registered_github_name_is_another_workload() {
    let k = TestKey::p256("gh");
    let mut c = inline_config(GH_ISS, &[&k]);
    c.profile = Some(Profile::GithubActions);
    let open = Verifier::new(vec![c.clone()]).unwrap();
    c.bound_claims
        .insert("repository_owner_id".into(), vec!["65".into()]);
    let pinned = Verifier::new(vec![c]).unwrap();

    let original = github_claims("octo-org");
    // The repository was deleted and re-created under the same owner and
    // name: a new repository id.
    let mut recreated = original.clone();
    recreated["repository_id"] = json!("9001");
    // The owner was deleted and its name registered by someone else.
    let mut new_owner = recreated.clone();
    new_owner["repository_owner_id"] = json!("6666");

    let first = signed(&open, &k, &original).await.unwrap();
    for (v, name) in [(&open, "open"), (&pinned, "pinned")] {
        let again = signed(v, &k, &recreated).await.unwrap();
        assert_eq!(
            again.attributes["repository"],
            first.attributes["repository"]
        );
        assert_ne!(again.id, first.id, "{name}: same names, another repository");
        assert_eq!(again.attributes["repository_id"], "9001");
    }
    // Another owner under the same name: another id, and refused where the
    // owner is pinned by its id.
    assert_ne!(signed(&open, &k, &new_owner).await.unwrap().id, first.id);
    assert_eq!(
        signed(&pinned, &k, &new_owner).await,
        Err(AuthError::ClaimNotAllowed("repository_owner_id".into()))
    );
    // The ids are required, and are numbers as GitHub writes them.
    for id in ["repository_id", "repository_owner_id"] {
        let mut missing = original.clone();
        missing.as_object_mut().unwrap().remove(id);
        assert_eq!(
            signed(&open, &k, &missing).await,
            Err(AuthError::MissingClaim(id.into()))
        );
        for bad in [
            json!("74a"),
            json!(" 74"),
            json!("-74"),
            json!(74.5),
            json!([74]),
        ] {
            let mut bad_id = original.clone();
            bad_id[id] = bad.clone();
            assert_eq!(
                signed(&open, &k, &bad_id).await,
                Err(AuthError::InvalidClaim(id.into())),
                "{id} = {bad}"
            );
        }
    }
    // A number is read as GitHub's string would be.
    let mut numeric = original.clone();
    numeric["repository_id"] = json!(74);
    assert_eq!(signed(&open, &k, &numeric).await.unwrap().id, first.id);
}

fn spiffe_config(name: &str, td: &str, bundle: Value) -> JwtIssuerConfig {
    let mut c = JwtIssuerConfig::new(
        name,
        "unused",
        vec![AUD.into()],
        JwksSource::Inline(bundle.to_string()),
    );
    c.issuer = None;
    c.trust_domain = Some(td.into());
    c.profile = Some(Profile::Spiffe);
    c
}

/// A SPIFFE trust bundle: JWT-SVID keys carry `use: jwt-svid`, and the
/// X.509 authorities sit beside them.
fn bundle(k: &TestKey) -> Value {
    let mut jwk = k.jwk();
    jwk["use"] = json!("jwt-svid");
    jwk.as_object_mut().unwrap().remove("alg");
    let mut x509 = TestKey::p256("x509-authority").jwk();
    x509["use"] = json!("x509-svid");
    x509["x5c"] = json!(["MIIB"]);
    json!({"keys": [jwk, x509], "spiffe_sequence": 3, "spiffe_refresh_hint": 300})
}

fn svid(sub: &str) -> Value {
    json!({"sub": sub, "aud": [AUD], "exp": NOW_SECS + 300, "iat": NOW_SECS})
}

#[tokio::test]
async fn spiffe_jwt_svids_are_checked_against_their_trust_domain() {
    let a = TestKey::p256("a-key");
    let b = TestKey::p256("b-key");
    let v = Verifier::new(vec![
        spiffe_config("td-a", "a.test", bundle(&a)),
        spiffe_config("td-b", "b.test", bundle(&b)),
    ])
    .unwrap();
    let w = v
        .verify(
            &a.token(&svid("spiffe://a.test/ns/agents/sa/triage")),
            now(),
        )
        .await
        .unwrap();
    assert_eq!(w.id, "spiffe://a.test/ns/agents/sa/triage");
    assert_eq!(w.method, Method::Spiffe);
    assert_eq!(w.issuer, "spiffe://a.test");
    assert_eq!(w.issuer_name, "td-a");
    assert_eq!(
        w.attributes,
        attrs(&[
            ("trust_domain", "a.test"),
            ("spiffe_path", "/ns/agents/sa/triage")
        ])
    );
    assert!(
        v.verify(&b.token(&svid("spiffe://b.test/x")), now())
            .await
            .is_ok()
    );

    // An SVID for trust domain A signed with B's key: refused, whether the
    // header names B's key or claims A's.
    assert_eq!(
        v.verify(
            &b.token(&svid("spiffe://a.test/ns/agents/sa/triage")),
            now()
        )
        .await,
        Err(AuthError::UnknownKey)
    );
    let b_as_a = TestKey::with("a-key", b.key.clone());
    assert_eq!(
        v.verify(
            &b_as_a.token(&svid("spiffe://a.test/ns/agents/sa/triage")),
            now()
        )
        .await,
        Err(AuthError::BadSignature)
    );
    // Unknown trust domains and non-SPIFFE subjects have no issuer.
    assert_eq!(
        v.verify(&a.token(&svid("spiffe://c.test/x")), now()).await,
        Err(AuthError::UnknownIssuer)
    );
    assert_eq!(
        v.verify(&a.token(&svid("spiffe://a.test/../x")), now())
            .await,
        Err(AuthError::UnknownIssuer)
    );
}

#[tokio::test]
async fn spiffe_issuer_if_configured_must_match() {
    let a = TestKey::ed25519("a");
    let mut c = spiffe_config("td-a", "a.test", bundle(&a));
    c.issuer = Some("https://oidc.a.test".into());
    let v = Verifier::new(vec![c]).unwrap();
    let mut claims = svid("spiffe://a.test/w");
    assert_eq!(
        v.verify(&a.token(&claims), now()).await,
        Err(AuthError::UnknownIssuer)
    );
    claims["iss"] = json!("https://oidc.a.test");
    assert_eq!(
        v.verify(&a.token(&claims), now()).await.unwrap().issuer,
        "https://oidc.a.test"
    );
    // Routed by iss, the trust domain of sub must still be the bundle's.
    claims["sub"] = json!("spiffe://b.test/w");
    assert_eq!(
        v.verify(&a.token(&claims), now()).await,
        Err(AuthError::UnknownIssuer)
    );
}

#[tokio::test]
async fn claim_mappings_and_workload_templates() {
    let k = TestKey::p256("k");
    let iss = "https://idp.test";
    let mut c = inline_config(iss, &[&k]);
    c.workload_id = Some("svc:{tenant.name}/{client_id}".into());
    c.claim_mappings = [
        ("tenant", "tenant.name"),
        ("tier", "tenant.tier"),
        ("missing", "nope"),
        ("admin", "is_admin"),
    ]
    .into_iter()
    .map(|(a, p)| (a.to_owned(), p.to_owned()))
    .collect();
    let v = Verifier::new(vec![c]).unwrap();
    let mut claims = claims(iss);
    claims["client_id"] = json!("triage-bot");
    claims["tenant"] = json!({"name": "acme", "tier": 2});
    claims["is_admin"] = json!(false);
    let w = v.verify(&k.token(&claims), now()).await.unwrap();
    assert_eq!(w.id, "svc:acme/triage-bot");
    assert_eq!(
        w.attributes,
        attrs(&[("tenant", "acme"), ("tier", "2"), ("admin", "false")])
    );

    claims["tenant"] = json!({"name": ["acme", "evil"]});
    assert_eq!(
        v.verify(&k.token(&claims), now()).await,
        Err(AuthError::InvalidClaim("tenant.name".into()))
    );
    claims["tenant"] = json!({"name": "acme\nforged log line"});
    assert_eq!(
        v.verify(&k.token(&claims), now()).await,
        Err(AuthError::InvalidClaim("tenant.name".into()))
    );
}
