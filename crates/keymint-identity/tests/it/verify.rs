//! The checks of `Verifier::verify`, one by one.

use keymint_identity::{Alg, AuthError, Method, Verifier};
use serde_json::{Value, json};

use crate::support::*;

const ISS: &str = "https://issuer.test";

fn verifier(keys: &[&TestKey]) -> Verifier {
    Verifier::new(vec![inline_config(ISS, keys)]).unwrap()
}

async fn check(v: &Verifier, token: &str) -> Result<keymint_identity::Workload, AuthError> {
    v.verify(token, now()).await
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    if value.is_null() {
        claims.as_object_mut().unwrap().remove(key);
    } else {
        claims[key] = value;
    }
    claims
}

#[tokio::test]
async fn each_allowed_algorithm_is_accepted_over_http_jwks() {
    let (r, e, d) = (TestKey::rsa("r"), TestKey::p256("e"), TestKey::ed25519("d"));
    let server = JwksServer::start(jwks(&[&r, &e, &d])).await;
    let v = Verifier::new(vec![server.config()]).unwrap();
    for k in [&r, &e, &d] {
        let w = v
            .verify(&k.token(&claims(&server.url)), now())
            .await
            .unwrap();
        assert_eq!(w.id, "agent-7", "{}", k.alg());
        assert_eq!(w.method, Method::Jwt);
        assert_eq!(w.issuer, server.url);
        assert_eq!(w.issuer_name, "test");
        assert_eq!(w.expires_at, at(NOW_SECS + 600));
    }
    assert_eq!(server.hits(), 1, "one fetch serves every key");
}

#[tokio::test]
async fn alg_none_is_refused_in_every_spelling() {
    let k = TestKey::p256("k");
    let v = verifier(&[&k]);
    let body = b64(claims(ISS).to_string().as_bytes());
    for alg in ["none", "None", "NONE", "nOnE", ""] {
        let header = b64(json!({"alg": alg, "kid": "k"}).to_string().as_bytes());
        for token in [format!("{header}.{body}."), format!("{header}.{body}.c2ln")] {
            assert_eq!(
                check(&v, &token).await,
                Err(AuthError::AlgorithmNotAllowed),
                "{alg}"
            );
        }
    }
}

fn hs256(header: &Value, claims: &Value, secret: &[u8]) -> String {
    use hmac::Mac as _;
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", b64(&mac.finalize().into_bytes()))
}

#[tokio::test]
async fn hmac_keyed_with_the_public_key_is_refused() {
    use rsa::pkcs8::{EncodePublicKey as _, LineEnding};
    let k = TestKey::rsa("r");
    let server = JwksServer::start(jwks(&[&k])).await;
    let v = Verifier::new(vec![server.config()]).unwrap();
    let Key::Rsa(private) = &k.key else {
        unreachable!()
    };
    let public_pem = private
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    let jwk = k.jwk().to_string();
    for alg in ["HS256", "HS384", "HS512"] {
        for secret in [public_pem.as_bytes(), jwk.as_bytes()] {
            let t = hs256(
                &json!({"alg": alg, "kid": "r"}),
                &claims(&server.url),
                secret,
            );
            assert_eq!(
                v.verify(&t, now()).await,
                Err(AuthError::AlgorithmNotAllowed)
            );
        }
    }
    assert_eq!(server.hits(), 0, "refused before any key was looked at");
}

#[tokio::test]
async fn a_key_must_fit_the_algorithm() {
    let ec = TestKey::p256("ec");
    let rsa = TestKey::rsa("rsa");
    let v = verifier(&[&ec, &rsa]);
    // RS256 header naming the EC key: refused whatever the signature is.
    let forged = rsa.token_with_header(&json!({"alg": "RS256", "kid": "ec"}), &claims(ISS));
    assert_eq!(check(&v, &forged).await, Err(AuthError::KeyMismatch));
    // EdDSA header naming the RSA key.
    let ed = TestKey::ed25519("rsa");
    assert_eq!(
        check(&v, &ed.token(&claims(ISS))).await,
        Err(AuthError::KeyMismatch)
    );

    // A JWK whose `alg` disagrees with its own type can never be used.
    let mut jwk = ec.jwk();
    jwk["alg"] = json!("RS256");
    let v = Verifier::new(vec![{
        let mut c = inline_config(ISS, &[&rsa]);
        c.jwks =
            keymint_identity::JwksSource::Inline(json!({"keys": [jwk, rsa.jwk()]}).to_string());
        c
    }])
    .unwrap();
    assert_eq!(
        check(&v, &ec.token(&claims(ISS))).await,
        Err(AuthError::KeyMismatch)
    );

    // Encryption keys and X.509-SVID authorities are not signature keys.
    let mut enc = ec.jwk();
    enc["use"] = json!("enc");
    let mut x509 = ec.jwk();
    x509["use"] = json!("x509-svid");
    for jwk in [enc, x509] {
        let mut c = inline_config(ISS, &[&rsa]);
        c.jwks =
            keymint_identity::JwksSource::Inline(json!({"keys": [jwk, rsa.jwk()]}).to_string());
        let v = Verifier::new(vec![c]).unwrap();
        assert_eq!(
            check(&v, &ec.token(&claims(ISS))).await,
            Err(AuthError::UnknownKey)
        );
    }
}

#[tokio::test]
async fn the_issuer_allow_list_is_enforced() {
    let (r, e) = (TestKey::rsa("r"), TestKey::p256("e"));
    let mut c = inline_config(ISS, &[&r, &e]);
    c.algorithms = vec![Alg::ES256];
    let v = Verifier::new(vec![c]).unwrap();
    assert!(check(&v, &e.token(&claims(ISS))).await.is_ok());
    assert_eq!(
        check(&v, &r.token(&claims(ISS))).await,
        Err(AuthError::AlgorithmNotAllowed)
    );
}

#[tokio::test]
async fn expiry_and_not_before_with_leeway() {
    let k = TestKey::ed25519("k");
    let v = verifier(&[&k]);
    let c = claims(ISS);
    let t = |claims: Value| k.token(&claims);
    // Default leeway 30 s.
    assert!(
        check(&v, &t(with(c.clone(), "exp", json!(NOW_SECS - 29))))
            .await
            .is_ok()
    );
    assert_eq!(
        check(&v, &t(with(c.clone(), "exp", json!(NOW_SECS - 30)))).await,
        Err(AuthError::Expired)
    );
    assert_eq!(
        check(&v, &t(with(c.clone(), "exp", json!(NOW_SECS - 3600)))).await,
        Err(AuthError::Expired)
    );
    assert!(
        check(&v, &t(with(c.clone(), "nbf", json!(NOW_SECS + 30))))
            .await
            .is_ok()
    );
    assert_eq!(
        check(&v, &t(with(c.clone(), "nbf", json!(NOW_SECS + 31)))).await,
        Err(AuthError::NotYetValid)
    );
    assert_eq!(
        check(&v, &t(with(c.clone(), "iat", json!(NOW_SECS + 31)))).await,
        Err(AuthError::NotYetValid)
    );
    // The edge, to the millisecond: valid until exp + leeway.
    let tok = t(with(c.clone(), "exp", json!(NOW_SECS)));
    assert!(
        v.verify(&tok, at(NOW_SECS + 30).plus_millis(-1))
            .await
            .is_ok()
    );
    assert_eq!(
        v.verify(&tok, at(NOW_SECS + 30)).await,
        Err(AuthError::Expired)
    );
    // A zero leeway is exact.
    let mut cfg = inline_config(ISS, &[&k]);
    cfg.leeway_secs = 0;
    let strict = Verifier::new(vec![cfg]).unwrap();
    assert_eq!(
        check(&strict, &t(with(c.clone(), "exp", json!(NOW_SECS)))).await,
        Err(AuthError::Expired)
    );
    // exp is required, and must be a number.
    assert_eq!(
        check(&v, &t(with(c.clone(), "exp", Value::Null))).await,
        Err(AuthError::MissingClaim("exp".into()))
    );
    assert_eq!(
        check(&v, &t(with(c.clone(), "exp", json!("soon")))).await,
        Err(AuthError::InvalidClaim("exp".into()))
    );
}

#[tokio::test]
async fn lifetime_is_bounded() {
    let k = TestKey::ed25519("k");
    let v = verifier(&[&k]);
    let long = with(claims(ISS), "exp", json!(NOW_SECS - 60 + 24 * 3600 + 1));
    assert_eq!(
        check(&v, &k.token(&long)).await,
        Err(AuthError::LifetimeTooLong)
    );
    let ok = with(claims(ISS), "exp", json!(NOW_SECS - 60 + 24 * 3600));
    assert!(check(&v, &k.token(&ok)).await.is_ok());
    // Without iat, the rest of the lifetime counts.
    let no_iat = with(
        with(claims(ISS), "iat", Value::Null),
        "exp",
        json!(NOW_SECS + 25 * 3600),
    );
    assert_eq!(
        check(&v, &k.token(&no_iat)).await,
        Err(AuthError::LifetimeTooLong)
    );
}

#[tokio::test]
async fn audience_must_match() {
    let k = TestKey::p256("k");
    let v = verifier(&[&k]);
    let t = |aud: Value| k.token(&with(claims(ISS), "aud", aud));
    assert_eq!(
        check(&v, &t(json!("https://other.test"))).await,
        Err(AuthError::WrongAudience)
    );
    assert_eq!(
        check(&v, &t(Value::Null)).await,
        Err(AuthError::MissingAudience)
    );
    assert_eq!(
        check(&v, &t(json!([]))).await,
        Err(AuthError::MissingAudience)
    );
    assert!(
        check(&v, &t(json!(["https://other.test", AUD])))
            .await
            .is_ok()
    );
    assert!(check(&v, &t(json!([AUD]))).await.is_ok());
    assert_eq!(
        check(&v, &t(json!(["a", "b"]))).await,
        Err(AuthError::WrongAudience)
    );
    assert_eq!(
        check(&v, &t(json!([AUD, 7]))).await,
        Err(AuthError::InvalidClaim("aud".into()))
    );
    assert_eq!(
        check(&v, &t(json!(7))).await,
        Err(AuthError::InvalidClaim("aud".into()))
    );
}

#[tokio::test]
async fn issuer_must_be_configured_exactly() {
    let k = TestKey::p256("k");
    let v = verifier(&[&k]);
    for iss in [
        "https://evil.test",
        "https://issuer.test/",
        "HTTPS://issuer.test",
        "",
    ] {
        let t = k.token(&with(claims(ISS), "iss", json!(iss)));
        assert_eq!(check(&v, &t).await, Err(AuthError::UnknownIssuer), "{iss}");
    }
    let t = k.token(&with(claims(ISS), "iss", Value::Null));
    assert_eq!(check(&v, &t).await, Err(AuthError::UnknownIssuer));
}

#[tokio::test]
async fn sub_must_be_a_string() {
    let k = TestKey::p256("k");
    let v = verifier(&[&k]);
    for sub in [
        json!(12345),
        json!(true),
        json!(1.5),
        json!({}),
        json!(["a"]),
    ] {
        let t = k.token(&with(claims(ISS), "sub", sub.clone()));
        assert_eq!(
            check(&v, &t).await,
            Err(AuthError::InvalidClaim("sub".into())),
            "{sub}"
        );
    }
    let t = k.token(&with(claims(ISS), "sub", json!("12345")));
    assert_eq!(check(&v, &t).await.unwrap().id, "12345");
}

#[tokio::test]
async fn tampering_breaks_the_signature() {
    for k in [TestKey::rsa("k"), TestKey::p256("k"), TestKey::ed25519("k")] {
        let v = verifier(&[&k]);
        let token = k.token(&claims(ISS));
        let parts: Vec<&str> = token.split('.').collect();
        let evil = b64(with(claims(ISS), "sub", json!("admin"))
            .to_string()
            .as_bytes());
        let tampered = format!("{}.{evil}.{}", parts[0], parts[2]);
        assert_eq!(
            check(&v, &tampered).await,
            Err(AuthError::BadSignature),
            "{}",
            k.alg()
        );
        // Same kid, another key.
        let other = match k.alg() {
            "RS256" => TestKey::rsa2("k"),
            "ES256" => TestKey::p256("k"),
            _ => TestKey::ed25519("k"),
        };
        assert_eq!(
            check(&v, &other.token(&claims(ISS))).await,
            Err(AuthError::BadSignature)
        );
    }
    // ES256 signatures are R || S, not DER.
    let k = TestKey::p256("k");
    let v = verifier(&[&k]);
    let token = k.token(&claims(ISS));
    let (input, _) = token.rsplit_once('.').unwrap();
    let Key::P256(sk) = &k.key else {
        unreachable!()
    };
    use p256::ecdsa::signature::Signer as _;
    let sig: p256::ecdsa::Signature = sk.sign(input.as_bytes());
    let der = format!("{input}.{}", b64(sig.to_der().as_bytes()));
    assert_eq!(check(&v, &der).await, Err(AuthError::BadSignature));
}

#[tokio::test]
async fn oversized_and_garbage_tokens_are_refused_without_parsing() {
    let k = TestKey::ed25519("k");
    let v = verifier(&[&k]);
    let big = k.token(&with(claims(ISS), "pad", json!("x".repeat(16 * 1024))));
    assert_eq!(check(&v, &big).await, Err(AuthError::TooLarge));
    assert_eq!(
        check(&v, &"a".repeat(20_000)).await,
        Err(AuthError::TooLarge)
    );

    let h = b64(json!({"alg": "EdDSA", "kid": "k"}).to_string().as_bytes());
    let p = b64(claims(ISS).to_string().as_bytes());
    let cases: Vec<String> = vec![
        String::new(),
        "garbage".into(),
        "a.b".into(),
        "a.b.c.d".into(),
        format!("{h}.{p}.c2ln.x.y"),
        format!("{h}.{p}.sig!"),
        format!("{h}=.{p}.c2ln"),
        format!("{h} .{p}.c2ln"),
        format!("{}.{p}.c2ln", b64(b"not json")),
        format!("{}.{p}.c2ln", b64(b"[1,2]")),
        format!("{}.{p}.c2ln", b64(br#"{"alg":"EdDSA","alg":"none"}"#)),
        format!("{}.{p}.c2ln", b64(br#"{"kid":"k"}"#)),
        format!("{h}.{}.c2ln", b64(b"not json")),
        format!("{h}.{}.c2ln", b64(b"\"a string\"")),
        format!("{h}.{}.c2ln", b64(br#"{"sub":"a","sub":"b"}"#)),
        format!("{h}.{p}."),
        format!(
            "{}.{p}.c2ln",
            b64(br#"{"alg":"EdDSA","crit":["exp"],"exp":1}"#)
        ),
        "ünïcödé.x.y".into(),
    ];
    for t in cases {
        let r = check(&v, &t).await;
        assert!(matches!(r, Err(AuthError::Malformed(_))), "{t}: {r:?}");
    }

    // Signed by the issuer's own key and still refused: a header member
    // twice (of a name keymint does not read: another parser may read it),
    // and `crit` present as `null`.
    let signed = |header: &str| {
        let input = format!("{}.{p}", b64(header.as_bytes()));
        format!("{input}.{}", b64(&k.sign_bytes(input.as_bytes())))
    };
    assert!(
        check(&v, &signed(r#"{"alg":"EdDSA","kid":"k"}"#))
            .await
            .is_ok()
    );
    for header in [
        r#"{"alg":"EdDSA","kid":"k","x5u":"https://a.example","x5u":"https://b.example"}"#,
        r#"{"alg":"EdDSA","kid":"k","typ":"JWT","typ":"at+jwt"}"#,
        r#"{"alg":"EdDSA","kid":"k","crit":null}"#,
    ] {
        let r = check(&v, &signed(header)).await;
        assert!(matches!(r, Err(AuthError::Malformed(_))), "{header}: {r:?}");
    }
}

#[tokio::test]
async fn errors_never_repeat_the_token() {
    let k = TestKey::p256("kid-SECRET-MARKER");
    let v = verifier(&[&k]);
    let marker = "SECRET-MARKER";
    let mut c = claims(ISS);
    c["sub"] = json!(format!("sub-{marker}"));
    c["extra"] = json!(marker);
    let good = k.token(&c);
    let tampered = good.replace(&good[good.len() - 8..], "AAAAAAAA");
    let cases = vec![
        tampered,
        k.token(&with(c.clone(), "aud", json!(marker))),
        k.token(&with(c.clone(), "iss", json!(marker))),
        k.token(&with(c.clone(), "exp", json!(NOW_SECS - 3600))),
        TestKey::p256(&format!("unknown-{marker}")).token(&c),
        format!("{good}{}", "A".repeat(20_000)),
        format!("{marker}.{marker}.{marker}"),
    ];
    for t in cases {
        let err = check(&v, &t).await.unwrap_err();
        let shown = format!("{err} {err:?} {}", err.code());
        assert!(!shown.contains(marker), "{shown}");
        assert!(!shown.contains(&t[..20]), "{shown}");
    }
}
