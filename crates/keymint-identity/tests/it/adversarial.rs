//! An outside evaluator's attack list, run against real signed tokens:
//! keys a token brings with it, members that mean two things, encodings
//! and dates at the edges, and names that could make two workloads one.

use keymint_identity::{AuthError, Profile, Verifier};
use serde_json::{Value, json};

use crate::support::*;

const ISS: &str = "https://issuer.test";

fn verifier(keys: &[&TestKey]) -> Verifier {
    Verifier::new(vec![inline_config(ISS, keys)]).unwrap()
}

/// A token over exactly these header and payload bytes, signed by `k`.
fn signed_raw(k: &TestKey, header: &str, payload: &str) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    format!("{input}.{}", b64(&k.sign_bytes(input.as_bytes())))
}

/// A key the token carries (`jwk`, `x5c`) or points at (`jku`, `x5u`) is
/// never used: a token signed by the attacker's own key, which it names
/// in every one of those ways, is refused, and the URL it names is never
/// fetched.
#[tokio::test]
async fn keys_a_token_brings_or_points_at_are_ignored() {
    let issuer = TestKey::p256("k");
    let attacker = TestKey::p256("k");
    let lure = JwksServer::start(jwks(&[&attacker])).await;
    let v = verifier(&[&issuer]);
    let c = claims(ISS);
    for extra in [
        json!({"jwk": attacker.jwk()}),
        json!({"jku": lure.jwks_url()}),
        json!({"x5u": lure.jwks_url()}),
        json!({"jwk": attacker.jwk(), "jku": lure.jwks_url()}),
    ] {
        let mut h = json!({"alg": "ES256", "kid": "k"});
        h.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let t = attacker.token_with_header(&h, &c);
        assert_eq!(
            v.verify(&t, now()).await,
            Err(AuthError::BadSignature),
            "{h}"
        );
        // Without a `kid`: every issuer key is tried, never the token's.
        h.as_object_mut().unwrap().remove("kid");
        let t = attacker.token_with_header(&h, &c);
        assert_eq!(
            v.verify(&t, now()).await,
            Err(AuthError::BadSignature),
            "{h}"
        );
    }
    assert_eq!(lure.hits(), 0, "a `jku`/`x5u` is never fetched");
    // The same headers on the issuer's own signature verify: they are
    // ignored, not refused.
    let h = json!({"alg": "ES256", "kid": "k", "jku": lure.jwks_url(), "jwk": attacker.jwk()});
    assert!(
        v.verify(&issuer.token_with_header(&h, &c), now())
            .await
            .is_ok()
    );
    assert_eq!(lure.hits(), 0);
}

/// A member named twice is refused even when the two spellings differ
/// only in escapes (`"sub"` and `"\u0073ub"` are one name), in the header
/// and in the payload, at any depth: a token signed by the issuer that
/// another parser would read with the other value.
#[tokio::test]
async fn members_named_twice_in_different_spellings_are_refused() {
    let k = TestKey::ed25519("k");
    let v = verifier(&[&k]);
    let header = r#"{"alg":"EdDSA","kid":"k"}"#;
    let base = format!(
        r#""iss":"{ISS}","aud":"{AUD}","iat":{},"exp":{}"#,
        NOW_SECS - 10,
        NOW_SECS + 600
    );
    assert!(
        v.verify(
            &signed_raw(&k, header, &format!(r#"{{{base},"sub":"a"}}"#)),
            now()
        )
        .await
        .is_ok()
    );
    for payload in [
        format!(r#"{{{base},"sub":"a","\u0073ub":"admin"}}"#),
        format!(r#"{{{base},"sub":"a","x":{{"y":1,"\u0079":2}}}}"#),
        format!(r#"{{{base},"sub":"a","aud":"other"}}"#),
    ] {
        let r = v.verify(&signed_raw(&k, header, &payload), now()).await;
        assert!(
            matches!(r, Err(AuthError::Malformed(_))),
            "{payload}: {r:?}"
        );
    }
    let payload = format!(r#"{{{base},"sub":"a"}}"#);
    for header in [
        r#"{"alg":"EdDSA","kid":"k","\u006bid":"other"}"#,
        r#"{"alg":"EdDSA","kid":"k","\u0061lg":"EdDSA"}"#,
    ] {
        let r = v.verify(&signed_raw(&k, header, &payload), now()).await;
        assert!(matches!(r, Err(AuthError::Malformed(_))), "{header}: {r:?}");
    }
}

/// base64url exactly as RFC 7515 writes it: padding, the `+`/`/`
/// alphabet and non-canonical trailing bits are refused in every part,
/// so one signed token has one spelling.
#[tokio::test]
async fn only_canonical_base64url_is_accepted() {
    let k = TestKey::p256("k");
    let v = verifier(&[&k]);
    let good = k.token(&claims(ISS));
    assert!(v.verify(&good, now()).await.is_ok());
    let parts: Vec<&str> = good.split('.').collect();
    let std_b64 = |s: &str| s.replace('-', "+").replace('_', "/");
    let mut cases = Vec::new();
    for i in 0..3 {
        let mut p: Vec<String> = parts.iter().map(|s| (*s).to_owned()).collect();
        p[i] = format!("{}=", p[i]);
        cases.push(p.join("."));
        let mut p: Vec<String> = parts.iter().map(|s| (*s).to_owned()).collect();
        p[i] = std_b64(&p[i]);
        if p[i] != parts[i] {
            cases.push(p.join("."));
        }
    }
    // The signature (64 bytes: 86 characters, 4 bits to spare) with a
    // trailing bit set: decodes to the same bytes under a lax decoder.
    let sig = parts[2];
    let last = sig.chars().last().unwrap();
    let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let idx = alphabet.find(last).unwrap();
    let other = alphabet.chars().nth(idx ^ 1).unwrap();
    cases.push(format!(
        "{}.{}.{}{other}",
        parts[0],
        parts[1],
        &sig[..sig.len() - 1]
    ));
    for t in cases {
        let r = v.verify(&t, now()).await;
        assert!(matches!(r, Err(AuthError::Malformed(_))), "{t}: {r:?}");
    }
}

/// NumericDates at the edges: huge, negative, past year 9999, not numbers,
/// `null`; and a token valid for a century is refused for its lifetime.
#[tokio::test]
async fn numeric_dates_at_the_edges() {
    let k = TestKey::ed25519("k");
    let v = verifier(&[&k]);
    for (name, value) in [
        ("exp", "1e300"),
        ("exp", "18446744073709551615"),
        ("exp", "253402300800"),
        ("exp", "-1"),
        ("exp", "\"1800000600\""),
        ("exp", "null"),
        ("exp", "true"),
        ("exp", "[1800000600]"),
        ("nbf", "-0.5"),
        ("iat", "1e19"),
    ] {
        let mut c = claims(ISS);
        c.as_object_mut().unwrap().remove(name);
        let mut payload = c.to_string();
        payload.pop();
        payload.push_str(&format!(r#","{name}":{value}}}"#));
        let r = v
            .verify(&signed_raw(&k, r#"{"alg":"EdDSA"}"#, &payload), now())
            .await;
        assert_eq!(
            r,
            Err(AuthError::InvalidClaim(name.into())),
            "{name}={value}"
        );
    }
    // A number too large for JSON's doubles is not JSON to serde_json.
    let mut payload = claims(ISS).to_string();
    payload.pop();
    payload.push_str(r#","exp2":1e400}"#);
    let r = v
        .verify(&signed_raw(&k, r#"{"alg":"EdDSA"}"#, &payload), now())
        .await;
    assert!(matches!(r, Err(AuthError::Malformed(_))), "{r:?}");
    // Far in the future, with and without `iat`.
    let mut c = claims(ISS);
    c["exp"] = json!(NOW_SECS + 100 * 365 * 86400);
    assert_eq!(
        v.verify(&k.token(&c), now()).await,
        Err(AuthError::LifetimeTooLong)
    );
    c.as_object_mut().unwrap().remove("iat");
    assert_eq!(
        v.verify(&k.token(&c), now()).await,
        Err(AuthError::LifetimeTooLong)
    );
    // Issued in the future beyond the leeway.
    let mut c = claims(ISS);
    c["iat"] = json!(NOW_SECS + 3600);
    c["exp"] = json!(NOW_SECS + 3900);
    assert_eq!(
        v.verify(&k.token(&c), now()).await,
        Err(AuthError::NotYetValid)
    );
}

/// A nested JWT (`cty: JWT`, RFC 7519 §5.2) is not unwrapped: its payload
/// is a token, not a claims object.
#[tokio::test]
async fn nested_tokens_are_not_unwrapped() {
    let k = TestKey::ed25519("k");
    let v = verifier(&[&k]);
    let inner = k.token(&claims(ISS));
    let t = signed_raw(
        &k,
        r#"{"alg":"EdDSA","kid":"k","cty":"JWT"}"#,
        &Value::String(inner.clone()).to_string(),
    );
    assert!(matches!(
        v.verify(&t, now()).await,
        Err(AuthError::Malformed(_))
    ));
    let t = signed_raw(&k, r#"{"alg":"EdDSA","kid":"k","cty":"JWT"}"#, &inner);
    assert!(matches!(
        v.verify(&t, now()).await,
        Err(AuthError::Malformed(_))
    ));
}

/// `kid` against the key set: one that names no key is unknown even when
/// a key without `kid` would verify it; two keys under one `kid` are both
/// the issuer's; an empty `kid` is refused.
#[tokio::test]
async fn kids_name_keys_exactly() {
    let a = TestKey::p256("shared");
    let b = TestKey::p256("shared");
    let v = verifier(&[&a, &b]);
    assert!(v.verify(&a.token(&claims(ISS)), now()).await.is_ok());
    assert!(v.verify(&b.token(&claims(ISS)), now()).await.is_ok());

    let mut jwk = a.jwk();
    jwk.as_object_mut().unwrap().remove("kid");
    let set = json!({"keys": [jwk]}).to_string();
    let v = Verifier::new(vec![keymint_identity::JwtIssuerConfig::new(
        "test",
        ISS,
        vec![AUD.into()],
        keymint_identity::JwksSource::Inline(set),
    )])
    .unwrap();
    assert_eq!(
        v.verify(&a.token(&claims(ISS)), now()).await,
        Err(AuthError::UnknownKey)
    );
    let no_kid = a.token_with_header(&json!({"alg": "ES256"}), &claims(ISS));
    assert!(v.verify(&no_kid, now()).await.is_ok());
    let empty = a.token_with_header(&json!({"alg": "ES256", "kid": ""}), &claims(ISS));
    assert!(matches!(
        v.verify(&empty, now()).await,
        Err(AuthError::Malformed(_))
    ));
}

const K8S_ISS: &str = "https://oidc.cluster.test";

fn k8s_token(k: &TestKey, ns: &str, sa: &str) -> String {
    k.token(&json!({
        "aud": [AUD],
        "exp": NOW_SECS + 3600,
        "iat": NOW_SECS - 10,
        "iss": K8S_ISS,
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "c3d4"}},
        "sub": format!("system:serviceaccount:{ns}:{sa}")
    }))
}

/// The Kubernetes id is `k8s:NS/SA`, and a `/` in either name would make
/// two service accounts one id (`a` + `b/c` and `a/b` + `c` are both
/// `k8s:a/b/c`). Kubernetes names are DNS labels (namespaces) and DNS
/// subdomains (service accounts); a token whose names are not is refused,
/// whoever signed it.
#[tokio::test]
async fn kubernetes_names_that_kubernetes_would_not_make_are_refused() {
    let k = TestKey::ed25519("k8s");
    let mut c = inline_config(K8S_ISS, &[&k]);
    c.profile = Some(Profile::Kubernetes);
    let v = Verifier::new(vec![c]).unwrap();
    for (ns, sa, id) in [
        ("agents", "triage", "k8s:agents/triage"),
        (
            "kube-system",
            "triage.bot-1",
            "k8s:kube-system/triage.bot-1",
        ),
        ("a", "b", "k8s:a/b"),
    ] {
        let w = v.verify(&k8s_token(&k, ns, sa), now()).await.unwrap();
        assert_eq!(w.id, id);
    }
    let ids: Vec<_> = [("a", "b/c"), ("a/b", "c")]
        .iter()
        .map(|(ns, sa)| k8s_token(&k, ns, sa))
        .collect();
    for t in &ids {
        assert!(
            matches!(v.verify(t, now()).await, Err(AuthError::InvalidClaim(_))),
            "a `/` in a name: one id for two service accounts"
        );
    }
    for (ns, sa) in [
        ("..", "sa"),
        ("ns", ".."),
        ("Agents", "sa"),
        ("ns", "SA"),
        ("-ns", "sa"),
        ("ns", "sa-"),
        ("ns", "a..b"),
        ("ns.x", "sa"),
        ("ns", "a b"),
        ("ns", "a\"b"),
        ("ns", "a%2Fb"),
    ] {
        let r = v.verify(&k8s_token(&k, ns, sa), now()).await;
        assert!(
            matches!(r, Err(AuthError::InvalidClaim(_))),
            "{ns:?} {sa:?}: {r:?}"
        );
    }
    let long_ns = "n".repeat(64);
    assert!(
        v.verify(&k8s_token(&k, &long_ns, "sa"), now())
            .await
            .is_err()
    );
    assert!(
        v.verify(&k8s_token(&k, &"n".repeat(63), "sa"), now())
            .await
            .is_ok()
    );
}

fn spiffe_issuer(name: &str, td: &str, k: &TestKey) -> keymint_identity::JwtIssuerConfig {
    let mut jwk = k.jwk();
    jwk["use"] = json!("jwt-svid");
    let mut c = keymint_identity::JwtIssuerConfig::new(
        name,
        "unused",
        vec![AUD.into()],
        keymint_identity::JwksSource::Inline(json!({"keys": [jwk]}).to_string()),
    );
    c.issuer = None;
    c.trust_domain = Some(td.into());
    c.profile = Some(Profile::Spiffe);
    c
}

/// A SPIFFE issuer configured without `issuer` checks no `iss`: the token's
/// `iss` is whatever its trust domain's authority wrote. It must not
/// become the workload's issuer, which policy reads as `principal.issuer`
/// (and an X.509-SVID's is `spiffe://TD`): trust domain B's SVID saying
/// `iss: spiffe://a.test` is B's, and says so.
#[tokio::test]
async fn an_unchecked_iss_is_not_the_workloads_issuer() {
    let a = TestKey::p256("a-key");
    let b = TestKey::p256("b-key");
    let v = Verifier::new(vec![
        spiffe_issuer("td-a", "a.test", &a),
        spiffe_issuer("td-b", "b.test", &b),
    ])
    .unwrap();
    for iss in ["spiffe://a.test", "node:prod-1", "https://issuer.test"] {
        let c = json!({
            "sub": "spiffe://b.test/agent", "iss": iss, "aud": [AUD],
            "exp": NOW_SECS + 300, "iat": NOW_SECS
        });
        let w = v.verify(&b.token(&c), now()).await.unwrap();
        assert_eq!(w.issuer, "spiffe://b.test", "iss {iss}");
        assert_eq!(w.issuer_name, "td-b");
    }
    // A configured `iss` is checked, and is the issuer.
    let mut c = spiffe_issuer("td-a", "a.test", &a);
    c.issuer = Some("https://oidc.a.test".into());
    let v = Verifier::new(vec![c]).unwrap();
    let t = json!({
        "sub": "spiffe://a.test/agent", "iss": "https://oidc.a.test", "aud": [AUD],
        "exp": NOW_SECS + 300, "iat": NOW_SECS
    });
    assert_eq!(
        v.verify(&a.token(&t), now()).await.unwrap().issuer,
        "https://oidc.a.test"
    );
}

// Session 32: a second sweep (docs/design/0008, "2026-12-07").

/// A key set may carry keys keymint must never verify with: RSA below
/// 2048 bits, and EC keys on curves other than P-256 (a P-256 point
/// relabelled `P-384` or `secp256k1`, so that only the label is wrong).
/// They are dropped when the set is parsed: a token naming them by `kid`
/// finds no key, whatever it is signed with.
#[tokio::test]
async fn weak_rsa_and_foreign_curve_keys_are_never_used() {
    let weak = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 1024).unwrap();
    let weak = TestKey::with("weak", Key::Rsa(Box::new(weak)));
    let ec = TestKey::p256("p256");
    let good = TestKey::ed25519("good");
    let mut keys = vec![weak.jwk(), good.jwk()];
    for crv in ["P-384", "secp256k1", "p-256", "P256"] {
        let mut j = ec.jwk();
        j["crv"] = json!(crv);
        j["kid"] = json!(crv);
        keys.push(j);
    }
    let mut c = inline_config(ISS, &[&good]);
    c.jwks = keymint_identity::JwksSource::Inline(json!({ "keys": keys }).to_string());
    let v = Verifier::new(vec![c]).unwrap();
    assert!(v.verify(&good.token(&claims(ISS)), now()).await.is_ok());
    assert_eq!(
        v.verify(&weak.token(&claims(ISS)), now()).await,
        Err(AuthError::UnknownKey),
        "RSA-1024"
    );
    for crv in ["P-384", "secp256k1", "p-256", "P256"] {
        let t = ec.token_with_header(&json!({"alg": "ES256", "kid": crv}), &claims(ISS));
        assert_eq!(
            v.verify(&t, now()).await,
            Err(AuthError::UnknownKey),
            "{crv}"
        );
    }
    // Without a `kid` every usable key is tried: still none of those.
    for k in [&weak, &ec] {
        let t = k.token_with_header(&json!({"alg": k.alg()}), &claims(ISS));
        assert_eq!(v.verify(&t, now()).await, Err(AuthError::UnknownKey));
    }
    // A set of nothing but such keys is refused at start-up.
    let mut c = inline_config(ISS, &[&good]);
    c.jwks = keymint_identity::JwksSource::Inline(json!({"keys": [weak.jwk()]}).to_string());
    assert!(Verifier::new(vec![c]).is_err());
}

/// A `kid` is looked up, never used to build a path, a URL or a query:
/// `kid`s with path, URL, SQL or NUL characters are unknown keys, the
/// issuer's one JWKS URL is all that is fetched, at most once per window,
/// and nothing of them comes back in the error.
#[tokio::test]
async fn kids_with_path_or_query_characters_are_only_names() {
    let k = TestKey::p256("k");
    let server = JwksServer::start(jwks(&[&k])).await;
    let v = Verifier::new(vec![server.config()]).unwrap();
    let c = claims(&server.url);
    assert!(v.verify(&k.token(&c), now()).await.is_ok());
    assert_eq!(server.hits(), 1);
    for kid in [
        "../../../etc/passwd",
        "/jwks?kid=k",
        "k' OR '1'='1",
        "k\"; DROP TABLE leases; --",
        "k\u{0}",
        "%2e%2e%2fk",
        "http://127.0.0.1:1/jwks",
        "k#",
    ] {
        let t = k.token_with_header(&json!({"alg": "ES256", "kid": kid}), &c);
        let e = v.verify(&t, now().plus_secs(60)).await.unwrap_err();
        assert_eq!(e, AuthError::UnknownKey, "{kid:?}");
        assert!(!format!("{e} {e:?}").contains(kid), "{kid:?}");
    }
    assert_eq!(server.hits(), 2, "one refresh for the whole flood");
}

/// Issuers are compared as the exact strings configured: look-alikes
/// (Cyrillic `і`, a fullwidth letter, a zero-width space, a trailing
/// dot, a default port, percent-encoding) are other issuers.
#[tokio::test]
async fn look_alike_issuers_are_other_issuers() {
    let k = TestKey::p256("k");
    let v = verifier(&[&k]);
    for iss in [
        "https://\u{456}ssuer.test",
        "https://issuer.tes\u{ff54}",
        "https://issuer.test\u{200b}",
        "https://issuer.test.",
        "https://issuer.test:443",
        "https://%69ssuer.test",
        " https://issuer.test",
    ] {
        let mut c = claims(ISS);
        c["iss"] = json!(iss);
        assert_eq!(
            v.verify(&k.token(&c), now()).await,
            Err(AuthError::UnknownIssuer),
            "{iss:?}"
        );
    }
}

/// `aud` as RFC 7519 §4.1.3 reads it: one accepted value among others is
/// enough, and `azp` (an OpenID Connect ID-token claim naming the party
/// the token was issued to) is not consulted: a workload token is not an
/// ID token, and keymint is not an OAuth client of the issuer. Pinned, so
/// that a change is deliberate (docs/design/0008, 2026-12-07).
#[tokio::test]
async fn aud_arrays_need_one_accepted_value_and_azp_is_not_read() {
    let k = TestKey::p256("k");
    let v = verifier(&[&k]);
    let mut c = claims(ISS);
    c["aud"] = json!(["https://other.test", AUD]);
    c["azp"] = json!("https://other.test");
    assert!(v.verify(&k.token(&c), now()).await.is_ok());
    c["aud"] = json!(["https://other.test"]);
    c["azp"] = json!(AUD);
    assert_eq!(
        v.verify(&k.token(&c), now()).await,
        Err(AuthError::WrongAudience),
        "`azp` naming keymint is no audience"
    );
}

/// A `sub` that is not a SPIFFE ID by the SPIFFE-ID standard (§2) is
/// never routed to a trust domain: case, dot segments, empty segments,
/// percent-encoding, query, fragment, user info, port, a trailing `/`,
/// other schemes. Each is an unknown issuer, even signed by the trust
/// domain's own key.
#[tokio::test]
async fn subs_that_are_not_spiffe_ids_reach_no_trust_domain() {
    let k = TestKey::p256("a-key");
    let v = Verifier::new(vec![spiffe_issuer("a", "a.test", &k)]).unwrap();
    let svid =
        |sub: &str| json!({"sub": sub, "aud": [AUD], "exp": NOW_SECS + 300, "iat": NOW_SECS});
    assert!(
        v.verify(&k.token(&svid("spiffe://a.test/agent")), now())
            .await
            .is_ok()
    );
    for sub in [
        "spiffe://A.test/agent",
        "SPIFFE://a.test/agent",
        "spiffe://a.test/x/../agent",
        "spiffe://a.test/./agent",
        "spiffe://a.test//agent",
        "spiffe://a.test/agent/",
        "spiffe://a.test/ag%65nt",
        "spiffe://a.test/agent?x=1",
        "spiffe://a.test/agent#x",
        "spiffe://u@a.test/agent",
        "spiffe://a.test:443/agent",
        "spiffe:a.test/agent",
        "spiffe:///a.test/agent",
        "https://a.test/agent",
        "spiffe://a.test/agent\u{0}",
        "spiffe://a.test/\u{430}gent",
    ] {
        assert_eq!(
            v.verify(&k.token(&svid(sub)), now()).await,
            Err(AuthError::UnknownIssuer),
            "{sub:?}"
        );
    }
}
