//! Ready-made mappings for well-known workload tokens.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::claims::{MAX_ATTRIBUTE_LEN, required_text, text_claim};
use crate::error::AuthError;

/// A well-known kind of workload token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// Kubernetes projected service-account tokens. `sub` must be
    /// `system:serviceaccount:NS:SA` and agree with the `kubernetes.io`
    /// claims. Id `k8s:NS/SA`; attributes `namespace`, `service_account`,
    /// `service_account_uid`, `pod`, `pod_uid`, `node` (the last four when
    /// present). Legacy secret-based tokens (no `exp`, no `aud`) are refused
    /// by the generic checks.
    Kubernetes,
    /// GitHub Actions OIDC tokens. Id
    /// `github:OWNER_ID/REPOSITORY_ID:OWNER/REPO@REF` (GitHub's immutable
    /// numeric ids first: names can be deleted and registered again by
    /// someone else); attributes `repository`, `repository_owner`, `ref`,
    /// `repository_id`, `repository_owner_id` (required), and when present
    /// `ref_type`, `sha`,
    /// `workflow`, `workflow_ref`, `job_workflow_ref`, `environment`,
    /// `run_id`, `run_attempt`, `actor`, `actor_id`, `event_name`,
    /// `runner_environment`.
    GithubActions,
    /// SPIFFE JWT-SVIDs. `sub` must be a SPIFFE ID in the configured trust
    /// domain, whose bundle is the issuer's key set. Id: the SPIFFE ID;
    /// attributes `trust_domain`, `spiffe_path`.
    Spiffe,
}

const K8S_ATTRS: &[&str] = &[
    "namespace",
    "service_account",
    "service_account_uid",
    "pod",
    "pod_uid",
    "node",
];

const GITHUB_REQUIRED: &[&str] = &[
    "repository",
    "repository_owner",
    "ref",
    "repository_id",
    "repository_owner_id",
];
/// GitHub's immutable numeric ids (names can be re-registered; these are
/// never reused).
const GITHUB_IDS: &[&str] = &["repository_id", "repository_owner_id"];
const GITHUB_OPTIONAL: &[&str] = &[
    "ref_type",
    "sha",
    "workflow",
    "workflow_ref",
    "job_workflow_ref",
    "environment",
    "run_id",
    "run_attempt",
    "actor",
    "actor_id",
    "event_name",
    "runner_environment",
];

const SPIFFE_ATTRS: &[&str] = &["trust_domain", "spiffe_path"];

impl Profile {
    pub(crate) fn default_workload_id(self) -> &'static str {
        match self {
            Self::Kubernetes => "k8s:{kubernetes.io.namespace}/{kubernetes.io.serviceaccount.name}",
            Self::GithubActions => {
                "github:{repository_owner_id}/{repository_id}:{repository}@{ref}"
            }
            Self::Spiffe => "{sub}",
        }
    }

    /// The attributes this profile sets (a claim mapping may not reuse them).
    pub(crate) fn attributes(self) -> Vec<&'static str> {
        match self {
            Self::Kubernetes => K8S_ATTRS.to_vec(),
            Self::GithubActions => GITHUB_REQUIRED
                .iter()
                .chain(GITHUB_OPTIONAL)
                .copied()
                .collect(),
            Self::Spiffe => SPIFFE_ATTRS.to_vec(),
        }
    }

    /// Checks the profile's rules and returns its attributes.
    pub(crate) fn apply(
        self,
        claims: &Map<String, Value>,
        trust_domain: Option<&str>,
    ) -> Result<BTreeMap<String, String>, AuthError> {
        let mut attrs = BTreeMap::new();
        match self {
            Self::Kubernetes => {
                let sub = required_text(claims, "sub", MAX_ATTRIBUTE_LEN)?;
                let (ns, sa) = sub
                    .strip_prefix("system:serviceaccount:")
                    .and_then(|rest| rest.split_once(':'))
                    // The id is `k8s:NS/SA`: names Kubernetes would not
                    // make (a `/` in either would make two accounts one id)
                    // are refused, whoever signed them.
                    .filter(|(ns, sa)| dns_label(ns) && dns_subdomain(sa))
                    .ok_or_else(|| AuthError::InvalidClaim("sub".into()))?;
                let claim_ns = required_text(claims, "kubernetes.io.namespace", 253)?;
                let claim_sa = required_text(claims, "kubernetes.io.serviceaccount.name", 253)?;
                if claim_ns != ns {
                    return Err(AuthError::InvalidClaim("kubernetes.io.namespace".into()));
                }
                if claim_sa != sa {
                    return Err(AuthError::InvalidClaim(
                        "kubernetes.io.serviceaccount.name".into(),
                    ));
                }
                attrs.insert("namespace".into(), claim_ns);
                attrs.insert("service_account".into(), claim_sa);
                for (attr, path) in [
                    ("service_account_uid", "kubernetes.io.serviceaccount.uid"),
                    ("pod", "kubernetes.io.pod.name"),
                    ("pod_uid", "kubernetes.io.pod.uid"),
                    ("node", "kubernetes.io.node.name"),
                ] {
                    if let Some(v) = text_claim(claims, path, MAX_ATTRIBUTE_LEN)? {
                        attrs.insert(attr.into(), v);
                    }
                }
            }
            Self::GithubActions => {
                for &c in GITHUB_REQUIRED {
                    attrs.insert(c.into(), required_text(claims, c, MAX_ATTRIBUTE_LEN)?);
                }
                for &c in GITHUB_OPTIONAL {
                    if let Some(v) = text_claim(claims, c, MAX_ATTRIBUTE_LEN)? {
                        attrs.insert(c.into(), v);
                    }
                }
                // The ids are GitHub's numeric ids (decimal, as GitHub
                // writes them), not names.
                for &c in GITHUB_IDS {
                    if !attrs
                        .get(c)
                        .is_some_and(|v| v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()))
                    {
                        return Err(AuthError::InvalidClaim(c.into()));
                    }
                }
                // The repository is OWNER/NAME and its owner is OWNER.
                let owner_ok = attrs
                    .get("repository")
                    .and_then(|r| r.split_once('/'))
                    .is_some_and(|(o, _)| {
                        Some(o) == attrs.get("repository_owner").map(String::as_str)
                    });
                if !owner_ok {
                    return Err(AuthError::InvalidClaim("repository".into()));
                }
            }
            Self::Spiffe => {
                let sub = required_text(claims, "sub", 2048)?;
                let (td, path) =
                    parse_spiffe_id(&sub).ok_or_else(|| AuthError::InvalidClaim("sub".into()))?;
                // INVARIANT: a JWT-SVID is only good in the trust domain whose
                // bundle verified it.
                if Some(td) != trust_domain {
                    return Err(AuthError::UnknownIssuer);
                }
                attrs.insert("trust_domain".into(), td.to_owned());
                attrs.insert("spiffe_path".into(), path.to_owned());
            }
        }
        Ok(attrs)
    }
}

/// An RFC 1123 label, as Kubernetes requires of a namespace
/// (`IsDNS1123Label`): 1-63 of `[a-z0-9-]`, beginning and ending with a
/// letter or digit.
fn dns_label(s: &str) -> bool {
    s.len() <= 63 && label_chars(s)
}

/// An RFC 1123 subdomain, as Kubernetes requires of a service account's
/// name (`IsDNS1123Subdomain`): at most 253 bytes of such labels (of any
/// length) joined by `.`.
fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(label_chars)
}

fn label_chars(s: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    s.bytes().all(|b| alnum(b) || b == b'-')
        && s.bytes().next().is_some_and(alnum)
        && s.bytes().last().is_some_and(alnum)
}

/// A SPIFFE trust domain: 1-255 of `[a-z0-9._-]`.
pub(crate) fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// Splits a SPIFFE ID (SPIFFE-ID §2) into trust domain and path (which may
/// be empty), or `None` if it is not one.
pub(crate) fn parse_spiffe_id(id: &str) -> Option<(&str, &str)> {
    if id.len() > 2048 {
        return None;
    }
    let rest = id.strip_prefix("spiffe://")?;
    let (td, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if !valid_trust_domain(td) {
        return None;
    }
    if !path.is_empty() {
        for seg in path[1..].split('/') {
            if seg.is_empty()
                || seg == "."
                || seg == ".."
                || !seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return None;
            }
        }
    }
    Some((td, path))
}

/// The trust domain of `sub` if it is a SPIFFE ID (for routing).
pub(crate) fn spiffe_trust_domain(claims: &Map<String, Value>) -> Option<&str> {
    match claims.get("sub") {
        Some(Value::String(s)) => parse_spiffe_id(s).map(|(td, _)| td),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids() {
        assert_eq!(
            parse_spiffe_id("spiffe://example.org/ns/prod/sa/agent"),
            Some(("example.org", "/ns/prod/sa/agent"))
        );
        assert_eq!(
            parse_spiffe_id("spiffe://example.org"),
            Some(("example.org", ""))
        );
        for bad in [
            "spiffe://",
            "spiffe://Example.org/x",
            "spiffe://example.org/",
            "spiffe://example.org//x",
            "spiffe://example.org/../x",
            "spiffe://example.org:443/x",
            "spiffe://user@example.org/x",
            "spiffe://example.org/x?y",
            "https://example.org/x",
            "SPIFFE://example.org/x",
        ] {
            assert_eq!(parse_spiffe_id(bad), None, "{bad}");
        }
    }
}
