//! The workload JWT path: `Verifier::verify` on a token from the fuzzer.
//!
//! The first byte chooses the mode. Odd: the rest is the token as sent
//! (size, alphabet, split, base64url, header and payload JSON, `alg`, `kid`,
//! signature). Even: the rest is a JOSE header and a claims document
//! separated by a 0xFF byte, signed with the issuer's key, so that the
//! claim checks after the signature (issuer, audience, times, lifetime,
//! workload id) are reached too. A token that passes must carry the
//! configured issuer and audience, and be live at `NOW`.
#![no_main]

use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signer, SigningKey};
use keymint_core::Timestamp;
use keymint_identity::{JwtIssuerConfig, Verifier};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

/// RFC 8032's first test key (public, obviously not a secret).
const SEED: [u8; 32] = [
    0x9d, 0x61, 0xb1, 0x9d, 0xef, 0xfd, 0x5a, 0x60, 0xba, 0x84, 0x4a, 0xf4, 0x92, 0xec, 0x2c, 0xc4,
    0x44, 0x49, 0xc5, 0x69, 0x7b, 0x32, 0x69, 0x19, 0x70, 0x3b, 0xac, 0x03, 0x1c, 0xae, 0x7f, 0x60,
];
const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "keymint";
const NOW_SECS: i64 = 1_700_000_000;

struct Fixture {
    rt: tokio::runtime::Runtime,
    verifier: Verifier,
    key: SigningKey,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let key = SigningKey::from_bytes(&SEED);
        let x = URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
        let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "k1"}]});
        let config: JwtIssuerConfig = serde_json::from_value(json!({
            "name": "fuzz",
            "issuer": ISSUER,
            "audiences": [AUDIENCE],
            "jwks": {"inline": jwks.to_string()},
            "claim_mappings": {"team": "team"},
        }))
        .expect("fuzz issuer config");
        let verifier = Verifier::new(vec![config]).expect("fuzz verifier");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Fixture { rt, verifier, key }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let f = fixture();
    let (token, claims) = if mode & 1 == 1 {
        let Ok(t) = std::str::from_utf8(rest) else {
            return;
        };
        (t.to_owned(), None)
    } else {
        let mut parts = rest.splitn(2, |&b| b == 0xff);
        let header = parts.next().unwrap_or_default();
        let payload = parts.next().unwrap_or_default();
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let sig = f.key.sign(input.as_bytes());
        (
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes())),
            serde_json::from_slice::<Value>(payload).ok(),
        )
    };
    let now = Timestamp::from_millis(NOW_SECS * 1000);
    let verdict = f.rt.block_on(f.verifier.verify(&token, now));
    if let Ok(w) = verdict {
        assert_eq!(w.issuer, ISSUER);
        assert!(!w.id.is_empty() && w.id.len() <= 256);
        assert!(!w.id.chars().any(keymint_core::model::is_unsafe_char));
        // Only a token signed here can pass; its claims are what we signed.
        let c = claims.expect("a forged token passed");
        assert_eq!(c["iss"], ISSUER);
        let aud_ok = match &c["aud"] {
            Value::String(a) => a == AUDIENCE,
            Value::Array(a) => a.iter().any(|v| v == AUDIENCE),
            _ => false,
        };
        assert!(aud_ok, "audience not checked");
        let exp = c["exp"].as_f64().expect("a token without exp passed");
        assert!(exp + 300.0 > NOW_SECS as f64, "an expired token passed");
    }
});
