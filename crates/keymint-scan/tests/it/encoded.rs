//! Keys written in base64 (issue 19, keys in context): a Kubernetes
//! `Secret`'s `data`, a whole `.env` file stored as one value, URL-safe
//! encodings. Found at the encoded value's place, under the key's own
//! rule and fingerprint; digests, random bytes and encoded text without a
//! key are not findings. Every value is generated here at run time.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use crate::{B62, Rng, anthropic_key, findings, openai_key, p, run_json};

#[test]
fn keys_in_base64_values_are_found_where_the_value_is() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let openai = openai_key(&mut rng);
    let anthropic = anthropic_key(&mut rng);
    // A key with no marker of its own: only the name beside the encoded
    // value says what it is (the Cohere context rule).
    let cohere = rng.chars(40, B62);
    let dotenv = format!("# bot settings\nLOG_LEVEL=info\nANTHROPIC_API_KEY={anthropic}\n");
    let secret = format!(
        "apiVersion: v1
kind: Secret
metadata:
  name: triage-bot
type: Opaque
data:
  OPENAI_API_KEY: {}
  COHERE_API_KEY: {}
  bot.env: {}
  region: {}
",
        STANDARD.encode(&openai),
        STANDARD.encode(&cohere),
        STANDARD.encode(&dotenv),
        STANDARD.encode("eu-west-1"),
    );
    std::fs::write(dir.path().join("secret.yaml"), &secret).unwrap();
    // The same OpenAI key in plain text elsewhere: one finding, two places.
    std::fs::write(
        dir.path().join("plain.env"),
        format!("OPENAI_API_KEY={openai}\n"),
    )
    .unwrap();
    // URL-safe and unpadded, inside JSON on one line, under a name that
    // says it is encoded.
    let second = openai_key(&mut rng);
    std::fs::write(
        dir.path().join("settings.json"),
        format!(
            "{{\"env_b64\":\"{}\",\"n\":1}}",
            URL_SAFE_NO_PAD.encode(format!("key={second}"))
        ),
    )
    .unwrap();
    // The same shape with nothing saying a value is encoded is not decoded
    // (design 0004: runs are searched only where the words ask for it).
    let unhinted = openai_key(&mut rng);
    std::fs::write(
        dir.path().join("plain.json"),
        format!(
            "{{\"blob\":\"{}\"}}",
            URL_SAFE_NO_PAD.encode(format!("key={unhinted}"))
        ),
    )
    .unwrap();

    let (code, doc, _) = run_json(&["--show-secrets", p(dir.path())]);
    assert_eq!(code, 1);
    let all = findings(&doc);
    let by_secret = |s: &str| {
        all.iter()
            .find(|f| f["secret"] == s)
            .unwrap_or_else(|| panic!("no finding for one of the keys: {doc:#}"))
    };

    let f = by_secret(&openai);
    assert_eq!(f["rule_id"], "openai.project-key");
    let locations = f["locations"].as_array().unwrap();
    assert_eq!(locations.len(), 2, "{f:#}");
    let encoded = locations
        .iter()
        .find(|l| l["encoding"] == "base64")
        .expect("the encoded place is marked");
    assert!(encoded["path"].as_str().unwrap().ends_with("secret.yaml"));
    // Line and column of the encoded value: `  OPENAI_API_KEY: <here>`.
    assert_eq!(encoded["line"], 7);
    assert_eq!(encoded["column"], 19);
    let offset = secret.find(&STANDARD.encode(&openai)).unwrap();
    assert_eq!(encoded["offset"], offset as u64);
    let plain = locations
        .iter()
        .find(|l| l.get("encoding").is_none())
        .unwrap();
    assert!(plain["path"].as_str().unwrap().ends_with("plain.env"));

    assert_eq!(by_secret(&cohere)["rule_id"], "cohere.api-key");
    let a = by_secret(&anthropic);
    assert!(
        a["rule_id"].as_str().unwrap().starts_with("anthropic."),
        "{a:#}"
    );
    assert_eq!(a["locations"][0]["line"], 9);
    let s = by_secret(&second);
    assert!(
        s["locations"][0]["path"]
            .as_str()
            .unwrap()
            .ends_with("settings.json")
    );
    assert_eq!(s["locations"][0]["encoding"], "base64");
    assert_eq!(all.len(), 4, "only the four keys: {doc:#}");
}

#[test]
fn digests_random_bytes_and_encoded_text_without_a_key_are_not_findings() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let random: Vec<u8> = (0..48).map(|_| rng.next_u64() as u8).collect();
    let text = format!(
        "kind: Secret
data:
  random: {}
  sha256: {}
  readme: {}
  jwt: {}.{}.{}
  placeholder: {}
",
        STANDARD.encode(&random),
        STANDARD.encode(rng.chars(64, b"0123456789abcdef")),
        STANDARD.encode("This service reads its API key from the vault at start-up."),
        URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(r#"{"sub":"triage-bot","aud":"keymint","exp":1893456000}"#),
        rng.chars(43, B62),
        STANDARD.encode("OPENAI_API_KEY=sk-proj-REPLACE_ME_WITH_YOUR_KEY"),
    );
    std::fs::write(dir.path().join("values.yaml"), text).unwrap();
    let (code, doc, _) = run_json(&[p(dir.path())]);
    assert_eq!(code, 0, "{doc:#}");
    assert!(findings(&doc).is_empty(), "{doc:#}");
}
