//! From raw hits to a report: findings grouped by rule and fingerprint (one
//! per distinct secret, with every location), baseline suppression, and the
//! summary.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::finding::{Finding, Secret, redact};
use crate::pipeline::{Issue, ScanOutput, Severity};

/// The result of a scan.
#[derive(Debug, Default)]
pub struct Report {
    /// Findings not suppressed by the baseline, in a stable order.
    pub findings: Vec<Finding>,
    /// Findings the baseline suppressed (kept for `--write-baseline`).
    pub suppressed: Vec<Finding>,
    pub issues: Vec<Issue>,
    pub summary: Summary,
}

/// The rule that finds keymint's own `kmt_`/`kma_` tokens.
pub const KEYMINT_TOKEN_RULE: &str = "keymint.token";

impl Report {
    pub fn has_errors(&self) -> bool {
        self.issues.iter().any(|i| i.severity == Severity::Error)
    }

    /// keymint tokens found (checksum verified), baseline or not: the ones
    /// to revoke and audit as leaked.
    pub fn keymint_tokens(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .chain(self.suppressed.iter())
            .filter(|f| f.rule_id == KEYMINT_TOKEN_RULE)
    }
}

/// What was scanned, how fast, and what was found.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    pub bytes: u64,
    pub files: u64,
    pub blobs: u64,
    pub binary_skipped: u64,
    pub findings: u64,
    pub locations: u64,
    pub suppressed_by_baseline: u64,
    pub errors: u64,
    pub warnings: u64,
    pub elapsed_seconds: f64,
    pub throughput_mib_per_second: f64,
}

/// Known findings that are not reported again.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baseline {
    pub version: u32,
    pub findings: Vec<BaselineEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineEntry {
    pub fingerprint: String,
    pub rule_id: String,
    /// For the reader of the file; not used to match.
    #[serde(default)]
    pub redacted: String,
    #[serde(default)]
    pub locations: Vec<String>,
}

impl Baseline {
    pub const VERSION: u32 = 1;

    /// A baseline that suppresses every given finding.
    pub fn from_findings<'a>(findings: impl IntoIterator<Item = &'a Finding>) -> Self {
        let mut entries: Vec<BaselineEntry> = findings
            .into_iter()
            .map(|f| BaselineEntry {
                fingerprint: f.fingerprint.clone(),
                rule_id: f.rule_id.clone(),
                redacted: f.redacted.clone(),
                locations: f.locations.iter().map(ToString::to_string).collect(),
            })
            .collect();
        entries.sort_by(|a, b| (&a.rule_id, &a.fingerprint).cmp(&(&b.rule_id, &b.fingerprint)));
        Self {
            version: Self::VERSION,
            findings: entries,
        }
    }

    fn fingerprints(&self) -> HashSet<&str> {
        self.findings
            .iter()
            .map(|e| e.fingerprint.as_str())
            .collect()
    }
}

/// Groups the hits of a scan into findings and applies the baseline.
pub fn build(engine: &Engine, output: ScanOutput, baseline: Option<&Baseline>) -> Report {
    let mut index: HashMap<(usize, String), usize> = HashMap::new();
    let mut findings: Vec<Finding> = Vec::new();
    let mut locations = 0u64;
    for hit in output.hits {
        let key = (hit.rule, hit.fingerprint.clone());
        let i = *index.entry(key).or_insert_with(|| {
            let rule = &engine.rule(hit.rule).spec;
            findings.push(Finding {
                rule_id: rule.id.clone(),
                rule_name: rule.name.clone(),
                confidence: rule.confidence,
                fingerprint: hit.fingerprint.clone(),
                redacted: redact(hit.secret.expose()),
                paired_with: None,
                live: None,
                locations: Vec::new(),
                secret: hit.secret.clone(),
            });
            findings.len() - 1
        });
        let f = &mut findings[i];
        if f.paired_with.is_none() {
            f.paired_with = hit.paired_with;
        }
        f.locations.push(hit.location);
    }
    for f in &mut findings {
        f.locations.sort();
        f.locations.dedup();
        locations += f.locations.len() as u64;
    }
    findings.sort_by(|a, b| {
        a.locations
            .first()
            .cmp(&b.locations.first())
            .then_with(|| a.rule_id.cmp(&b.rule_id))
    });
    let (findings, suppressed) = match baseline {
        Some(b) => {
            let known = b.fingerprints();
            findings
                .into_iter()
                .partition(|f| !known.contains(f.fingerprint.as_str()))
        }
        None => (findings, Vec::new()),
    };
    let secs = output.elapsed.as_secs_f64();
    let summary = Summary {
        bytes: output.bytes,
        files: output.files,
        blobs: output.blobs,
        binary_skipped: output.binary_skipped,
        findings: findings.len() as u64,
        locations,
        suppressed_by_baseline: suppressed.len() as u64,
        errors: output
            .issues
            .iter()
            .filter(|i| i.severity == Severity::Error)
            .count() as u64,
        warnings: output
            .issues
            .iter()
            .filter(|i| i.severity == Severity::Warning)
            .count() as u64,
        elapsed_seconds: secs,
        throughput_mib_per_second: if secs > 0.0 {
            output.bytes as f64 / (1024.0 * 1024.0) / secs
        } else {
            0.0
        },
    };
    Report {
        findings,
        suppressed,
        issues: output.issues,
        summary,
    }
}

/// Live verification of a secret against its provider. Off by default: the
/// scanner itself never touches the network; a caller that opts in (for
/// example `keymint scan --verify`, wired in the binary, where the HTTP
/// client lives) supplies an implementation.
pub trait Verifier {
    /// `Some(true)`: the provider accepts the secret; `Some(false)`: it
    /// refuses it; `None`: cannot tell (no check for this rule, network
    /// error). Must not log the secret.
    fn verify(&self, rule_id: &str, secret: &Secret) -> Option<bool>;
}

/// Verifies every finding of `report` with `verifier` (opt-in).
pub fn verify_live(report: &mut Report, verifier: &dyn Verifier) {
    for f in &mut report.findings {
        f.live = verifier.verify(&f.rule_id, &f.secret);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finding::{Location, Source};
    use crate::rules::Confidence;

    fn finding(rule: &str, secret: &str) -> Finding {
        Finding {
            rule_id: rule.into(),
            rule_name: rule.into(),
            confidence: Confidence::High,
            fingerprint: format!("fp-{secret}"),
            redacted: redact(secret),
            paired_with: None,
            live: None,
            locations: vec![Location {
                source: Source::Stdin,
                line: 1,
                column: 1,
                offset: 0,
                context: None,
                encoding: None,
            }],
            secret: Secret::new(secret.into()),
        }
    }

    struct Fake;

    impl Verifier for Fake {
        fn verify(&self, rule_id: &str, secret: &Secret) -> Option<bool> {
            (rule_id == "github.token").then(|| secret.expose().ends_with("live"))
        }
    }

    #[test]
    fn live_verification_is_recorded_and_serialised_only_when_done() {
        let mut report = Report {
            findings: vec![
                finding("github.token", "token-live"),
                finding("github.token", "token-dead"),
                finding("aws.access-key-id", "AKIA-whatever"),
            ],
            ..Report::default()
        };
        let before = serde_json::to_value(&report.findings[0]).unwrap();
        assert!(before.get("live").is_none());
        verify_live(&mut report, &Fake);
        let live: Vec<Option<bool>> = report.findings.iter().map(|f| f.live).collect();
        assert_eq!(live, [Some(true), Some(false), None]);
        assert_eq!(
            serde_json::to_value(&report.findings[0]).unwrap()["live"],
            true
        );
    }
}
