//! What a scan reports: findings (one per distinct secret and rule, with
//! every place it was seen), their locations, fingerprints and redaction.
//!
//! INVARIANT (DESIGN.md 4): the raw secret is held only in memory
//! ([`Secret`], wiped on drop, `Debug` redacted, skipped by serde); every
//! output shows [`Finding::redacted`] unless the user asks for the secret.

use std::fmt;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::rules::Confidence;

/// A secret in memory. Wiped on drop; never printed by `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Where a secret was read from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    File {
        path: String,
    },
    Stdin,
    /// A blob of a git repository, attributed to the commit where it first
    /// appeared (the earliest in topological order). A blob that no commit
    /// holds has an empty `commit`, `author` and `date`.
    Git {
        repository: String,
        commit: String,
        author: String,
        date: String,
        path: String,
        blob: String,
    },
    /// A file in a layer of a container image, or the image config.
    Image {
        image: String,
        /// The layer's path in the archive, or `config`.
        layer: String,
        path: String,
        /// The file is deleted (whited out) by a later layer.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        deleted_later: bool,
    },
    /// The environment of a running process.
    Process {
        pid: u32,
        command: String,
    },
}

impl Source {
    /// The path that SARIF and the human report show.
    pub fn display_path(&self) -> String {
        match self {
            Self::File { path } => path.clone(),
            Self::Stdin => "<stdin>".into(),
            Self::Git { path, .. } => path.clone(),
            Self::Image {
                image, layer, path, ..
            } => format!("{image}!{layer}!{path}"),
            Self::Process { pid, command } => format!("/proc/{pid}/environ ({command})"),
        }
    }
}

impl fmt::Display for Source {
    /// What the path does not say: commit, layer, process.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Git {
                commit,
                author,
                date,
                ..
            } => {
                if commit.is_empty() {
                    return f.write_str("a blob no commit holds (dangling or unreachable)");
                }
                let short = commit.get(..12).unwrap_or(commit);
                write!(f, "commit {short}, {author}, {date}")
            }
            Self::Image {
                image,
                layer,
                deleted_later,
                ..
            } => {
                write!(f, "image {image}, layer {layer}")?;
                if *deleted_later {
                    f.write_str(", deleted by a later layer")?;
                }
                Ok(())
            }
            Self::Process { pid, command } => write!(f, "process {pid} {command}"),
            Self::File { .. } | Self::Stdin => Ok(()),
        }
    }
}

/// One place a secret was seen.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Location {
    #[serde(flatten)]
    pub source: Source,
    /// 1-based line.
    pub line: u64,
    /// 1-based byte column.
    pub column: u64,
    /// Byte offset of the secret in the (decompressed) content.
    pub offset: u64,
    /// Where inside a structured document: a notebook cell, a Slack
    /// message, a Jira issue, an environment variable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// How the secret is written here when not as itself: `base64` for a
    /// key found by decoding the value at this place (line, column and
    /// offset are the encoded value's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
}

/// An encoding a secret was found under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    Base64,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Base64 => "base64",
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = match &self.source {
            Source::Image { path, .. } | Source::Git { path, .. } => path.clone(),
            other => other.display_path(),
        };
        write!(f, "{path}:{}:{}", self.line, self.column)?;
        let details = self.source.to_string();
        if !details.is_empty() {
            write!(f, " ({details})")?;
        }
        if let Some(c) = &self.context {
            write!(f, " [{c}]")?;
        }
        if let Some(e) = self.encoding {
            write!(f, " [{} encoded]", e.as_str())?;
        }
        Ok(())
    }
}

/// The other half of a credential pair (an AWS key ID for a secret key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paired {
    pub rule_id: String,
    pub fingerprint: String,
    pub redacted: String,
}

/// One distinct secret found by one rule, and every place it was seen.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finding {
    pub rule_id: String,
    pub rule_name: String,
    pub confidence: Confidence,
    /// HMAC-SHA256 of the secret under the scan's fingerprint key, hex.
    pub fingerprint: String,
    pub redacted: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paired_with: Option<Paired>,
    /// Live verification (opt-in, see [`crate::report::verify_live`]):
    /// `true` when the provider accepted the secret, `false` when it refused
    /// it; absent when not verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<bool>,
    pub locations: Vec<Location>,
    /// The secret itself: in memory only.
    #[serde(skip)]
    pub secret: Secret,
}

/// Computes fingerprints: HMAC-SHA256 under a key, so that a fingerprint is
/// stable across scans that share the key and says nothing without it.
#[derive(Clone)]
pub struct Fingerprinter {
    key: Zeroizing<Vec<u8>>,
}

/// The key used when none is given. Public: the fingerprint then only
/// deduplicates, which is enough for baselines of high-entropy secrets.
pub const DEFAULT_FINGERPRINT_KEY: &[u8] = b"keymint-scan fingerprint v1";

impl Default for Fingerprinter {
    fn default() -> Self {
        Self::new(DEFAULT_FINGERPRINT_KEY)
    }
}

impl fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprinter(<key>)")
    }
}

impl Fingerprinter {
    pub fn new(key: &[u8]) -> Self {
        Self {
            key: Zeroizing::new(key.to_vec()),
        }
    }

    pub fn fingerprint(&self, secret: &[u8]) -> String {
        match <Hmac<Sha256> as Mac>::new_from_slice(&self.key) {
            Ok(mut mac) => {
                mac.update(secret);
                hex::encode(mac.finalize().into_bytes())
            }
            // HMAC accepts keys of any length.
            Err(_) => String::new(),
        }
    }
}

/// Shows enough of a secret to recognise it and not enough to use it: the
/// header of a key block, else at most a fifth of it (12 characters at
/// most), then `…`.
pub fn redact(secret: &str) -> String {
    if let Some(rest) = secret.strip_prefix("-----BEGIN") {
        // The header only, even when no line break follows it.
        let end = rest.find("-----").map_or(0, |i| i + 5);
        return format!("-----BEGIN{}…", &rest[..end]);
    }
    let visible = (secret.chars().count() / 5).min(12);
    let head: String = secret.chars().take(visible).collect();
    format!("{head}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_most_of_the_secret() {
        let key = format!(
            "sk-ant-api03-{}AA",
            "853VP2JUGyERxWlLEKdD3dmoP9".repeat(4).get(..93).unwrap()
        );
        let r = redact(&key);
        assert_eq!(r, "sk-ant-api03…");
        assert_eq!(redact("4af8494ce7dc7f41e39dcb8751fcd77c"), "4af849…");
        assert_eq!(
            redact("-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----"),
            "-----BEGIN RSA PRIVATE KEY-----…"
        );
        assert_eq!(
            redact(
                "-----BEGIN PRIVATE KEY-----MIIEvQIBADANBgkqhkiG9w0BAQEFAASC-----END PRIVATE KEY-----"
            ),
            "-----BEGIN PRIVATE KEY-----…"
        );
    }

    #[test]
    fn fingerprints_are_keyed_and_stable() {
        let a = Fingerprinter::new(b"one");
        let b = Fingerprinter::new(b"two");
        assert_eq!(a.fingerprint(b"s"), a.fingerprint(b"s"));
        assert_ne!(a.fingerprint(b"s"), b.fingerprint(b"s"));
        assert_eq!(a.fingerprint(b"s").len(), 64);
    }

    #[test]
    fn the_secret_never_serialises_or_debugs() {
        let f = Finding {
            rule_id: "x".into(),
            rule_name: "X".into(),
            confidence: Confidence::High,
            fingerprint: "f".into(),
            redacted: "ab…".into(),
            paired_with: None,
            live: None,
            locations: vec![],
            secret: Secret::new("abcdefghijklmnop-secret".into()),
        };
        assert!(!serde_json::to_string(&f).unwrap().contains("secret\""));
        assert!(
            !serde_json::to_string(&f)
                .unwrap()
                .contains("abcdefghijklmnop")
        );
        assert!(!format!("{f:?}").contains("abcdefghijklmnop"));
    }
}
