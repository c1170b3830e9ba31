//! The proxy's side of the outbound screen: which secrets a body holds
//! (found by [`keymint_scan::Screen`], the scanner's engine and rules plus
//! the broad screening rules of `keymint-scan/rules/screen.toml`, one source
//! of truth for what a secret looks like), and the body with each of them
//! replaced by `[REDACTED:<kind>]`.
//!
//! Kinds are lowercase ASCII, digits and `_`, so a redacted JSON string
//! stays valid JSON.

use std::borrow::Cow;

use keymint_scan::Screen;
use serde_json::Value;

/// A secret found in a body: its kind and where it is. Never its value.
pub type Finding<'s> = keymint_scan::screen::Match<'s>;

/// The process's screen, compiled on first use. `None` only if the built-in
/// rules do not compile (the tests rule it out); the proxy then forwards
/// nothing that needs screening.
pub fn screen() -> Option<&'static Screen> {
    match Screen::builtin() {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "the secret screen's rules do not compile");
            None
        }
    }
}

/// `body` with every finding replaced by `[REDACTED:<kind>]`; findings are
/// ordered and do not overlap ([`Screen::find`]).
pub fn redact<'a>(body: &'a [u8], findings: &[Finding<'_>]) -> Cow<'a, [u8]> {
    redact_bytes(body, findings)
}

fn redact_bytes<'a>(body: &'a [u8], findings: &[Finding<'_>]) -> Cow<'a, [u8]> {
    if findings.is_empty() {
        return Cow::Borrowed(body);
    }
    let mut out = Vec::with_capacity(body.len());
    let mut at = 0;
    for f in findings {
        out.extend_from_slice(body.get(at..f.range.start).unwrap_or_default());
        out.extend_from_slice(b"[REDACTED:");
        out.extend_from_slice(f.kind.as_bytes());
        out.push(b']');
        at = f.range.end.max(at);
    }
    out.extend_from_slice(body.get(at..).unwrap_or_default());
    Cow::Owned(out)
}

/// Screens every string of a JSON document as decoded (values anywhere,
/// object keys too), so an escape (`\n` before a key, a key written with
/// `\u` escapes) hides nothing. With `redact`, each secret is replaced by
/// `[REDACTED:<kind>]` in the decoded string. Answers the kinds found,
/// deduplicated and sorted.
pub fn screen_json<'s>(screen: &'s Screen, v: &mut Value, redact: bool) -> Vec<&'s str> {
    let mut found = Vec::new();
    walk(screen, v, redact, &mut found);
    found.sort_unstable();
    found.dedup();
    found
}

fn walk<'s>(screen: &'s Screen, v: &mut Value, redact: bool, found: &mut Vec<&'s str>) {
    match v {
        Value::String(s) => {
            if let Some(r) = screened(screen, s, redact, found) {
                *s = r;
            }
        }
        Value::Array(items) => {
            for item in items {
                walk(screen, item, redact, found);
            }
        }
        Value::Object(map) => {
            for item in map.values_mut() {
                walk(screen, item, redact, found);
            }
            let mut renamed = Vec::new();
            for k in map.keys() {
                if let Some(r) = screened(screen, k, redact, found) {
                    renamed.push((k.clone(), r));
                }
            }
            for (old, new) in renamed {
                if let Some(item) = map.remove(&old) {
                    map.insert(new, item);
                }
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// The string's kinds go into `found`; with `redact`, the string redacted
/// (`None`: nothing to change).
fn screened<'s>(
    screen: &'s Screen,
    s: &str,
    redact: bool,
    found: &mut Vec<&'s str>,
) -> Option<String> {
    let f = screen.find(s.as_bytes());
    if f.is_empty() {
        return None;
    }
    found.extend(f.iter().map(|m| m.kind));
    if !redact {
        return None;
    }
    // Secrets are ASCII, so their bounds are character bounds.
    Some(String::from_utf8_lossy(&redact_bytes(s.as_bytes(), &f)).into_owned())
}

/// Kinds of the findings, deduplicated, for messages and audit events.
pub fn kinds<'s>(findings: &[Finding<'s>]) -> Vec<&'s str> {
    let mut k: Vec<&'s str> = findings.iter().map(|f| f.kind).collect();
    k.sort_unstable();
    k.dedup();
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    // Obviously fabricated values, assembled at run time so that this file
    // does not itself trip scanners.
    fn fake(prefix: &str, body: &str, n: usize) -> String {
        format!("{prefix}{}", body.repeat(n))
    }

    #[test]
    fn every_kind_the_proxy_reports_is_found_and_redacted_in_json() {
        let s = screen().unwrap();
        let token = keymint_core::token::Token::generate(keymint_core::token::TokenKind::Access)
            .unwrap()
            .expose()
            .to_owned();
        let positives = [
            ("keymint_token", token),
            ("openai_key", fake("sk-proj-", "aB3dE", 8)),
            ("openai_key", fake("sk-", "Xy12", 12)),
            ("anthropic_key", fake("sk-ant-api03-", "Qw9_", 10)),
            ("aws_access_key_id", fake("AKIA", "ABCD", 4)),
            // Only the secret is replaced, not the name before it.
            (
                "aws_secret_access_key",
                fake("wJalrXUtnF", "Mi/K7+bPxR", 3),
            ),
            ("github_token", fake("ghp_", "a1B2", 9)),
            ("google_api_key", fake("AIza", "Sy0-x", 7)),
            ("slack_token", fake("xoxb-", "1234-", 4)),
            ("stripe_key", fake("sk_live_", "abcd", 6)),
            (
                "private_key",
                "-----BEGIN OPENSSH PRIVATE KEY-----\\nb3BlbnNzaC1rZXktdjEA\\n-----END OPENSSH PRIVATE KEY-----".to_owned(),
            ),
        ];
        for (kind, text) in &positives {
            let context = if *kind == "aws_secret_access_key" {
                "aws_secret_access_key: "
            } else {
                ""
            };
            let body = format!("{{\"content\":\"here: {context}{text} ok\"}}");
            let f = s.find(body.as_bytes());
            assert_eq!(f.len(), 1, "{kind}: {f:?}");
            assert_eq!(f[0].kind, *kind);
            let red = redact(body.as_bytes(), &f);
            let v: serde_json::Value = serde_json::from_slice(&red).unwrap();
            let got = v["content"].as_str().unwrap();
            assert_eq!(got, format!("here: {context}[REDACTED:{kind}] ok"));
        }
        let negatives = [
            // A kmt_ look-alike with a wrong checksum.
            "kmt_000000000000000000000000000000000000000000023nMuX".to_owned(),
            "sk-short".to_owned(),
            "task-1234567890abcdefghijklmnop".to_owned(),
            "AKIA-not-a-key".to_owned(),
            "-----BEGIN PUBLIC KEY-----".to_owned(),
            "the word secret and a ghp_ prefix".to_owned(),
            "xoxb-".to_owned(),
        ];
        for text in &negatives {
            assert!(s.find(text.as_bytes()).is_empty(), "false positive: {text}");
        }
    }

    #[test]
    fn json_strings_are_screened_decoded_keys_included() {
        let s = screen().unwrap();
        let key = fake("sk-proj-", "Zx9Qw8Er7Ty6", 4);
        let escaped: String = key
            .chars()
            .map(|c| format!("\\u{:04x}", c as u32))
            .collect();
        let aws = fake("AKIA", "ABCD", 4);
        let raw = format!(r#"{{"a":"line\n{key}","b":["{escaped}"],"c":{{"{aws}":1}},"n":2}}"#);
        // On the raw bytes, the escapes hide the first two.
        assert_eq!(kinds(&s.find(raw.as_bytes())), ["aws_access_key_id"]);
        let mut v: Value = serde_json::from_str(&raw).unwrap();
        let before = v.clone();
        assert_eq!(
            screen_json(s, &mut v, false),
            ["aws_access_key_id", "openai_key"]
        );
        assert_eq!(v, before, "blocking changes nothing");
        assert_eq!(
            screen_json(s, &mut v, true),
            ["aws_access_key_id", "openai_key"]
        );
        assert_eq!(
            v,
            serde_json::json!({
                "a": "line\n[REDACTED:openai_key]",
                "b": ["[REDACTED:openai_key]"],
                "c": {"[REDACTED:aws_access_key_id]": 1},
                "n": 2
            })
        );
        assert!(screen_json(s, &mut v, false).is_empty());
    }

    #[test]
    fn kinds_are_listed_once_in_order() {
        let s = screen().unwrap();
        let body = format!(
            "{} {} {}",
            fake("sk-", "Xy12", 12),
            fake("AKIA", "ABCD", 4),
            fake("sk-", "Zq34", 12)
        );
        let f = s.find(body.as_bytes());
        assert_eq!(f.len(), 3);
        assert_eq!(kinds(&f), ["aws_access_key_id", "openai_key"]);
        assert_eq!(
            redact(body.as_bytes(), &f),
            b"[REDACTED:openai_key] [REDACTED:aws_access_key_id] [REDACTED:openai_key]".as_slice()
        );
    }
}
