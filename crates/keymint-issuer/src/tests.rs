#![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]

use super::*;

const DAY: u64 = 86_400;

fn t(secs: u64) -> Timestamp {
    Timestamp::from_millis(1_800_000_000_000).plus_secs(secs)
}

fn claims(exp: Timestamp, aud: &str) -> Map<String, Value> {
    let Value::Object(m) = json!({
        "iss": "https://keymint.example",
        "sub": "ci/agent",
        "aud": aud,
        "iat": t(0).unix_seconds(),
        "exp": exp.unix_seconds(),
    }) else {
        panic!()
    };
    m
}

/// keymint's own verifier (keymint-identity), given the JWK Set inline.
fn verifier(jwks: &Value) -> keymint_identity::Verifier {
    let config: keymint_identity::IdentityConfig = serde_json::from_value(json!({
        "jwt": [{
            "name": "keymint",
            "issuer": "https://keymint.example",
            "audiences": ["sts.amazonaws.com"],
            "jwks": {"inline": jwks.to_string()},
        }]
    }))
    .unwrap();
    keymint_identity::Verifier::from_config(config).unwrap()
}

#[tokio::test]
async fn every_algorithm_signs_what_an_independent_verifier_accepts() {
    let mut set = KeySet::default();
    assert!(set.ensure(&SigningAlg::ALL, t(0)).unwrap());
    assert!(!set.ensure(&SigningAlg::ALL, t(0)).unwrap());
    let jwks = set.jwks(t(0), DAY);
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 3);
    let v = verifier(&jwks);
    for alg in SigningAlg::ALL {
        let jwt = set
            .sign(alg, &claims(t(600), "sts.amazonaws.com"), t(0))
            .unwrap();
        let w = v.verify(&jwt, t(1)).await.unwrap();
        assert_eq!(w.id, "ci/agent", "{alg}");
        // A flipped signature byte is refused.
        let mut forged = jwt.clone().into_bytes();
        let i = forged.len() - 5;
        forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert!(v.verify(&forged, t(1)).await.is_err(), "{alg}");
        // Wrong audience, and expiry, are refused too.
        let other = set
            .sign(alg, &claims(t(600), "someone-else"), t(0))
            .unwrap();
        assert!(v.verify(&other, t(1)).await.is_err());
        assert!(v.verify(&jwt, t(3600)).await.is_err());
    }
}

#[test]
fn keys_survive_the_round_trip_through_the_store_and_debug_shows_no_key() {
    let mut set = KeySet::default();
    set.ensure(&SigningAlg::ALL, t(0)).unwrap();
    let bytes = set.to_bytes().unwrap();
    let back = KeySet::from_bytes(&bytes).unwrap();
    assert_eq!(back.jwks(t(0), DAY), set.jwks(t(0), DAY));
    let dbg = format!("{set:?}");
    let stored: Value = serde_json::from_slice(&bytes).unwrap();
    for k in stored["keys"].as_array().unwrap() {
        let private = k["private"].as_str().unwrap();
        assert!(!dbg.contains(private));
    }
    assert!(KeySet::from_bytes(b"{\"version\":1,\"keys\":[{\"alg\":\"ES256\",\"created_at\":0,\"activates_at\":0,\"private\":\"AAAA\"}]}").is_err());
    assert!(KeySet::from_bytes(b"not json").is_err());
}

#[test]
fn kid_is_the_rfc7638_thumbprint() {
    // RFC 7638 §3.1's example key and thumbprint.
    let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
    let canonical = format!("{{\"e\":\"AQAB\",\"kty\":\"RSA\",\"n\":\"{n}\"}}");
    assert_eq!(
        B64.encode(Sha256::digest(canonical.as_bytes())),
        "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    );
    let mut set = KeySet::default();
    set.ensure(&[SigningAlg::ES256], t(0)).unwrap();
    let k = &set.keys()[0];
    let members = k.material.public_members();
    let canonical = format!(
        "{{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"{}\",\"y\":\"{}\"}}",
        members[2].1, members[3].1
    );
    assert_eq!(k.kid(), B64.encode(Sha256::digest(canonical.as_bytes())));
}

#[tokio::test]
async fn a_rotation_publishes_before_it_signs_and_retires_after_the_last_token_expires() {
    let max_token = 3600;
    let mut set = KeySet::default();
    set.ensure(&[SigningAlg::ES256], t(0)).unwrap();
    let old = set
        .signing_key(SigningAlg::ES256, t(0))
        .unwrap()
        .kid()
        .to_owned();
    let old_token = set
        .sign(
            SigningAlg::ES256,
            &claims(t(100 + max_token), "sts.amazonaws.com"),
            t(100),
        )
        .unwrap();

    let r = set
        .rotate(&[SigningAlg::ES256], t(100), 600, max_token)
        .unwrap();
    assert_eq!(r[0].replaces.as_deref(), Some(old.as_str()));
    let new = r[0].kid.clone();
    assert_ne!(new, old);
    // Published at once, both keys; the old one still signs.
    let kids = |set: &KeySet, at| -> Vec<String> {
        set.published(at, max_token)
            .iter()
            .map(|k| k.kid().to_owned())
            .collect()
    };
    assert_eq!(kids(&set, t(100)), [new.clone(), old.clone()]);
    assert_eq!(
        set.signing_key(SigningAlg::ES256, t(699)).unwrap().kid(),
        old
    );
    // A second rotation while one is under way is refused.
    assert!(matches!(
        set.rotate(&[SigningAlg::ES256], t(200), 600, max_token),
        Err(IssuerError::RotationPending(..))
    ));
    // From its time on, the new key signs; the old stays published for the
    // tokens it signed, then goes.
    assert_eq!(
        set.signing_key(SigningAlg::ES256, t(700)).unwrap().kid(),
        new
    );
    let retire = 700 + max_token + RETIRE_SLACK_SECS;
    assert_eq!(kids(&set, t(retire - 1)), [new.clone(), old.clone()]);
    assert_eq!(kids(&set, t(retire)), [new]);
    // The old token still verifies against the JWKS of every moment until
    // it expires.
    for at in [100, 699, 700, 100 + max_token - 1] {
        let v = verifier(&set.jwks(t(at), max_token));
        v.verify(&old_token, t(at)).await.unwrap();
    }
    set.prune(t(retire), max_token);
    assert_eq!(set.keys().len(), 1);
}

#[test]
fn act_nests_the_delegation_chain() {
    assert_eq!(
        act_claim(&["ci".into(), "planner".into()]),
        json!({"sub": "planner", "act": {"sub": "ci"}})
    );
    assert_eq!(act_claim(&[]), Value::Null);
}
