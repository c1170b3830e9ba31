//! Interop with PyJWT (a real, widely used implementation): tokens it signs
//! with keys generated here verify. Skipped with a note when PyJWT is not
//! installed, except under CI (`CI=true`), where that fails.

use std::process::Command;

use keymint_identity::Verifier;

use crate::support::*;

const SIGN: &str = r#"
import json, os, sys, jwt
claims = json.loads(os.environ["KM_CLAIMS"])
for alg, kid, path in json.loads(os.environ["KM_KEYS"]):
    with open(path) as f:
        key = f.read()
    print(jwt.encode(claims, key, algorithm=alg, headers={"kid": kid}))
"#;

fn pyjwt_available() -> bool {
    Command::new("python3")
        .args(["-c", "import jwt, cryptography"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test]
async fn tokens_signed_by_pyjwt_verify() {
    if !pyjwt_available() {
        #[expect(clippy::disallowed_methods, reason = "the test harness reads CI")]
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(
            !ci,
            "PyJWT is required under CI: pip install pyjwt cryptography"
        );
        eprintln!(
            "note: PyJWT not installed; skipping interop test (pip install pyjwt cryptography)"
        );
        return;
    }
    let keys = [
        TestKey::rsa("py-rsa"),
        TestKey::p256("py-ec"),
        TestKey::ed25519("py-ed"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut spec = Vec::new();
    for k in &keys {
        let path = dir.path().join(format!("{}.pem", k.kid));
        std::fs::write(&path, k.private_pem()).unwrap();
        spec.push(serde_json::json!([k.alg(), k.kid, path]));
    }
    let iss = "https://pyjwt.test";
    let out = Command::new("python3")
        .args(["-c", SIGN])
        .env("KM_CLAIMS", claims(iss).to_string())
        .env("KM_KEYS", serde_json::Value::from(spec).to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tokens: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(tokens.len(), 3);
    let v = Verifier::new(vec![inline_config(iss, &keys.iter().collect::<Vec<_>>())]).unwrap();
    for (t, k) in tokens.iter().zip(&keys) {
        let w = v
            .verify(t, now())
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", k.alg()));
        assert_eq!(w.id, "agent-7");
    }
}
