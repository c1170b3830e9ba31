//! A small, self-contained detector for secrets in outbound request bodies:
//! literal prefixes and regular expressions, one rule per kind, each with
//! examples and negative examples in the tests. It is deliberately small;
//! the full scanner (`keymint-scan`) can replace it behind [`Detector`].
//!
//! Rules match only characters that need no escaping inside a JSON string
//! (a private key block is matched with its `\n` escapes), so redacting a
//! match in the raw body keeps the JSON valid.

use std::borrow::Cow;

use regex::bytes::Regex;

/// A secret found in a body: its kind and where it is. Never its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: &'static str,
    pub start: usize,
    pub end: usize,
}

#[derive(Debug)]
pub struct Detector {
    rules: Vec<(&'static str, Regex)>,
}

const RULES: &[(&str, &str)] = &[
    // keymint's own tokens (docs/design/0001): verified by checksum below.
    ("keymint_token", r"\b(?:kmt|kma)_[0-9A-Za-z]{49}\b"),
    ("anthropic_key", r"\bsk-ant-[A-Za-z0-9_-]{20,}"),
    (
        "openai_key",
        r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}",
    ),
    ("aws_access_key_id", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    (
        "aws_secret_access_key",
        r"(?i)aws_?secret_?access_?key\W{1,6}[A-Za-z0-9/+]{40}\b",
    ),
    (
        "github_token",
        r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}\b",
    ),
    ("github_token", r"\bgithub_pat_[A-Za-z0-9_]{60,}"),
    ("google_api_key", r"\bAIza[0-9A-Za-z_-]{35}\b"),
    ("slack_token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    ("stripe_key", r"\b(?:sk|rk)_live_[A-Za-z0-9]{20,}"),
    (
        "private_key",
        r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----(?:[A-Za-z0-9+/=\s]|\\[nr])*(?:-----END (?:[A-Z]+ )*PRIVATE KEY-----)?",
    ),
];

impl Detector {
    pub fn new() -> Self {
        let rules = RULES
            .iter()
            .filter_map(|(k, re)| match Regex::new(re) {
                Ok(r) => Some((*k, r)),
                Err(e) => {
                    // The rules are constants covered by the tests.
                    tracing::error!(rule = k, error = %e, "secret rule does not compile");
                    None
                }
            })
            .collect();
        Self { rules }
    }

    /// Every secret in `body`, in order, without overlaps.
    pub fn find(&self, body: &[u8]) -> Vec<Finding> {
        let mut out: Vec<Finding> = Vec::new();
        for (kind, re) in &self.rules {
            for m in re.find_iter(body) {
                if *kind == "keymint_token" {
                    let ok = std::str::from_utf8(m.as_bytes())
                        .is_ok_and(|s| keymint_core::token::check(s).is_ok());
                    if !ok {
                        continue;
                    }
                }
                out.push(Finding {
                    kind,
                    start: m.start(),
                    end: m.end(),
                });
            }
        }
        out.sort_by_key(|f| (f.start, std::cmp::Reverse(f.end)));
        let mut merged: Vec<Finding> = Vec::with_capacity(out.len());
        for f in out {
            match merged.last() {
                Some(last) if f.start < last.end => {}
                _ => merged.push(f),
            }
        }
        merged
    }

    /// `body` with every finding replaced by `[REDACTED:<kind>]`.
    pub fn redact<'a>(body: &'a [u8], findings: &[Finding]) -> Cow<'a, [u8]> {
        if findings.is_empty() {
            return Cow::Borrowed(body);
        }
        let mut out = Vec::with_capacity(body.len());
        let mut at = 0;
        for f in findings {
            out.extend_from_slice(&body[at..f.start]);
            out.extend_from_slice(b"[REDACTED:");
            out.extend_from_slice(f.kind.as_bytes());
            out.push(b']');
            at = f.end;
        }
        out.extend_from_slice(&body[at..]);
        Cow::Owned(out)
    }
}

impl Default for Detector {
    fn default() -> Self {
        Self::new()
    }
}

/// Kinds of the findings, deduplicated, for messages and audit events.
pub fn kinds(findings: &[Finding]) -> Vec<&'static str> {
    let mut k: Vec<&'static str> = findings.iter().map(|f| f.kind).collect();
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
    fn every_rule_has_examples_and_negative_examples() {
        let d = Detector::new();
        assert_eq!(d.rules.len(), RULES.len(), "a rule does not compile");
        let positives = [
            ("keymint_token", "kmt_000000000000000000000000000000000000000000023nMur".to_owned()),
            ("openai_key", fake("sk-proj-", "aB3dE", 8)),
            ("openai_key", fake("sk-", "Xy12", 12)),
            ("anthropic_key", fake("sk-ant-api03-", "Qw9_", 10)),
            ("aws_access_key_id", fake("AKIA", "ABCD", 4)),
            (
                "aws_secret_access_key",
                format!("aws_secret_access_key: {}", "wJalrXUtnFEMI/K7MDENG+bPxRfiCY".to_owned() + "EXAMPLEKEY"),
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
            let body = format!("{{\"content\":\"here: {text} ok\"}}");
            let f = d.find(body.as_bytes());
            assert_eq!(f.len(), 1, "{kind}: {f:?}");
            assert_eq!(f[0].kind, *kind);
            let red = Detector::redact(body.as_bytes(), &f);
            let v: serde_json::Value = serde_json::from_slice(&red).unwrap();
            let s = v["content"].as_str().unwrap();
            assert_eq!(s, format!("here: [REDACTED:{kind}] ok"));
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
            assert!(d.find(text.as_bytes()).is_empty(), "false positive: {text}");
        }
    }
}
