//! Configuration: one [`JwtIssuerConfig`] per trusted issuer, as it comes
//! from the TOML file (`deny_unknown_fields`, durations as `"30s"`), and its
//! validation into what the [`Verifier`](crate::Verifier) runs on.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

use crate::claims::Template;
use crate::error::ConfigError;
use crate::fetch;
use crate::jwk::KeySet;
use crate::profile::{self, Profile};

/// The signature algorithms keymint accepts. Nothing else can be
/// configured: not `none`, not HMAC (a shared secret is not a workload
/// identity, and HMAC "keyed" with a public key is the classic
/// algorithm-confusion attack), not RSA-PSS or larger curves (no issuer we
/// target needs them; adding one is a deliberate change here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256, RSA keys of 2048 to 8192 bits.
    RS256,
    /// ECDSA on P-256 with SHA-256, signature as fixed-size `R || S`.
    ES256,
    /// Ed25519 (RFC 8037).
    EdDSA,
}

impl Alg {
    pub const ALL: [Alg; 3] = [Alg::RS256, Alg::ES256, Alg::EdDSA];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RS256 => "RS256",
            Self::ES256 => "ES256",
            Self::EdDSA => "EdDSA",
        }
    }

    /// The algorithm a JOSE header names, if it is one of ours. Exact,
    /// case-sensitive match (RFC 7515 §4.1.1).
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Alg {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::from_name(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "algorithm `{s}` is not allowed (allowed: RS256, ES256, EdDSA)"
            ))
        })
    }
}

/// Where an issuer's verification keys (a JWK Set) come from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum JwksSource {
    /// A JWK Set (or SPIFFE trust bundle) on disk, read again on refresh.
    File(PathBuf),
    /// A JWK Set served at this URL (`https://`; `http://` only on loopback
    /// or with `dangerous_allow_http`).
    Url(String),
    /// OpenID Connect discovery: `{issuer}/.well-known/openid-configuration`,
    /// whose `issuer` must equal the configured one, names the `jwks_uri`.
    Discovery,
    /// A JWK Set in the configuration itself, as a JSON string. Never
    /// refreshed.
    Inline(String),
}

/// One trusted issuer of workload JWTs.
///
/// In TOML (as `[[identity.jwt]]` or wherever the server puts it):
///
/// ```toml
/// name = "github"
/// issuer = "https://token.actions.githubusercontent.com"
/// audiences = ["https://keymint.example.com"]
/// jwks = "discovery"
/// profile = "github_actions"
/// bound_claims = { repository_owner_id = ["123456"] }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuerConfig {
    /// A short label for this trust relationship (`[a-z0-9_-]`, unique); it
    /// becomes [`Workload::issuer_name`](crate::Workload::issuer_name).
    pub name: String,
    /// The exact `iss` this issuer's tokens carry. Required, except for the
    /// SPIFFE profile, where tokens are found by the trust domain of `sub`
    /// and `iss` is checked only if this is set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// SPIFFE profile only: the trust domain whose bundle `jwks` is.
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// Audiences accepted: the token's `aud` must contain at least one.
    pub audiences: Vec<String>,
    /// Where the keys come from.
    pub jwks: JwksSource,
    /// Algorithms accepted from this issuer.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<Alg>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat` (at most 300 s).
    #[serde(
        default = "default_leeway",
        rename = "leeway",
        deserialize_with = "secs"
    )]
    pub leeway_secs: u64,
    /// Longest lifetime accepted: `exp - iat` (or `exp - now` without
    /// `iat`).
    #[serde(
        default = "default_max_lifetime",
        rename = "max_lifetime",
        deserialize_with = "secs"
    )]
    pub max_lifetime_secs: u64,
    /// The workload id, as a template over claims (`"{sub}"`,
    /// `"ci:{repository}"`). Defaults to the profile's, or `"{sub}"`.
    #[serde(default)]
    pub workload_id: Option<String>,
    /// Workload attributes taken from claims: attribute name → dotted claim
    /// path (`"kubernetes.io.namespace"`). A missing claim leaves the
    /// attribute out; a non-scalar one refuses the token.
    #[serde(default)]
    pub claim_mappings: BTreeMap<String, String>,
    /// Claims that must have one of the listed values (exact match), e.g.
    /// `repository_owner_id = ["123456"]`. A missing claim refuses the
    /// token.
    #[serde(default)]
    pub bound_claims: BTreeMap<String, Vec<String>>,
    /// A ready-made mapping for a well-known kind of token.
    #[serde(default)]
    pub profile: Option<Profile>,
    /// Keys older than this are fetched again on the next token.
    #[serde(
        default = "default_jwks_max_age",
        rename = "jwks_max_age",
        deserialize_with = "secs"
    )]
    pub jwks_max_age_secs: u64,
    /// Keys that no fetch has confirmed for this long (every fetch since
    /// has failed) are no longer used: the issuer's tokens are refused
    /// (`keys_stale`, a 503) until a fetch succeeds. At least
    /// `jwks_max_age`, at most 30 days; 24 h by default.
    #[serde(
        default = "default_jwks_max_stale",
        rename = "jwks_max_stale",
        deserialize_with = "secs"
    )]
    pub jwks_max_stale_secs: u64,
    /// At most one fetch of this issuer's keys per this interval, whatever
    /// the tokens say (unknown `kid`s cannot make keymint hammer the issuer).
    #[serde(
        default = "default_min_refresh",
        rename = "jwks_min_refresh_interval",
        deserialize_with = "secs"
    )]
    pub jwks_min_refresh_interval_secs: u64,
    /// Timeout for one fetch (discovery and JWKS together).
    #[serde(
        default = "default_fetch_timeout",
        rename = "fetch_timeout",
        deserialize_with = "secs"
    )]
    pub fetch_timeout_secs: u64,
    /// Allows `http://` key URLs on hosts other than loopback. Insecure:
    /// anyone on the path can substitute keys. Logged as a warning.
    #[serde(default)]
    pub dangerous_allow_http: bool,
}

/// Leeway, at most.
pub const MAX_LEEWAY_SECS: u64 = 300;

fn default_algorithms() -> Vec<Alg> {
    Alg::ALL.to_vec()
}
fn default_leeway() -> u64 {
    30
}
fn default_max_lifetime() -> u64 {
    24 * 3600
}
fn default_jwks_max_age() -> u64 {
    3600
}
fn default_jwks_max_stale() -> u64 {
    24 * 3600
}
/// `jwks_max_stale`, at most.
pub const MAX_JWKS_MAX_STALE_SECS: u64 = 30 * 24 * 3600;
fn default_min_refresh() -> u64 {
    30
}
fn default_fetch_timeout() -> u64 {
    10
}

/// A duration as `"30s"`/`"1h30m"` or a number of seconds.
fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(n) => Ok(n),
        Raw::Text(s) => keymint_core::duration::parse_secs(&s).map_err(serde::de::Error::custom),
    }
}

impl JwtIssuerConfig {
    /// A configuration with every default, for building in code.
    pub fn new(
        name: impl Into<String>,
        issuer: impl Into<String>,
        audiences: Vec<String>,
        jwks: JwksSource,
    ) -> Self {
        Self {
            name: name.into(),
            issuer: Some(issuer.into()),
            trust_domain: None,
            audiences,
            jwks,
            algorithms: default_algorithms(),
            leeway_secs: default_leeway(),
            max_lifetime_secs: default_max_lifetime(),
            workload_id: None,
            claim_mappings: BTreeMap::new(),
            bound_claims: BTreeMap::new(),
            profile: None,
            jwks_max_age_secs: default_jwks_max_age(),
            jwks_max_stale_secs: default_jwks_max_stale(),
            jwks_min_refresh_interval_secs: default_min_refresh(),
            fetch_timeout_secs: default_fetch_timeout(),
            dangerous_allow_http: false,
        }
    }
}

/// All of workload identity's configuration.
///
/// ```toml
/// max_token_size = 16384
/// [[jwt]]
/// name = "cluster"
/// # ...
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Tokens longer than this (bytes) are refused before parsing.
    #[serde(default = "default_max_token_size")]
    pub max_token_size: usize,
    /// Largest discovery document or JWK Set accepted (bytes).
    #[serde(default = "default_max_document_size")]
    pub max_document_size: usize,
    #[serde(default)]
    pub jwt: Vec<JwtIssuerConfig>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            max_token_size: default_max_token_size(),
            max_document_size: default_max_document_size(),
            jwt: Vec::new(),
        }
    }
}

fn default_max_token_size() -> usize {
    16 * 1024
}
fn default_max_document_size() -> usize {
    256 * 1024
}

/// Tag names that identity methods other than a JWT issuer's claim
/// mappings fill in, with who sets them. A claim mapping may not use them:
/// a policy that reads such a tag without checking `principal.method`
/// (`getTag("uid") == "1000"`, `getTag("svid") == "x509"`) must not be
/// satisfiable by a claim that an issuer's token carries.
///
/// Kept in step with where they are set: `keymint_attest::OBSERVED_ATTRIBUTES`
/// (local attestation, and what a node agent reports), the server's
/// requests relayed by a node (`node`, `entry`), its X.509-SVID principals
/// (`trust_domain`, `svid`), the SPIFFE profile here (`spiffe_path`) and
/// registered OAuth clients (`client_id`).
pub const OTHER_METHODS_ATTRIBUTES: &[(&str, &str)] = &[
    ("uid", "local attestation (`unix`)"),
    ("gid", "local attestation (`unix`)"),
    ("exe_path", "local attestation (`unix`)"),
    ("exe_sha256", "local attestation (`unix`)"),
    ("cgroup", "local attestation (`unix`)"),
    ("container_id", "local attestation (`unix`)"),
    ("node", "a node agent relaying a local workload (`unix`)"),
    ("entry", "a node agent relaying a local workload (`unix`)"),
    ("trust_domain", "SPIFFE (`spiffe`, X.509-SVID and JWT-SVID)"),
    ("svid", "an X.509-SVID over mTLS (`spiffe`)"),
    ("spiffe_path", "a JWT-SVID (`spiffe`)"),
    ("client_id", "a registered OAuth client (`oauth_client`)"),
];

/// GitHub names (owners, repositories) can be deleted and registered again
/// by someone else; the numeric `repository_owner_id` and `repository_id`
/// are never reused (GitHub's own advice, and what its immutable `sub`
/// carries). So for the GitHub Actions profile the workload id must name
/// `{repository_id}`, and a `bound_claims` entry on a name must come with
/// one on `repository_owner_id`.
fn github_ids_pinned(
    workload_id: &Template,
    bound: &BTreeMap<String, Vec<String>>,
) -> Result<(), String> {
    if !workload_id.names_claim("repository_id") {
        return Err("the github_actions profile's `workload_id` must include \
                    `{repository_id}`: a repository deleted and re-created by someone else \
                    under the same name would otherwise be the same workload"
            .into());
    }
    for name in ["repository_owner", "repository"] {
        if bound.contains_key(name) && !bound.contains_key("repository_owner_id") {
            return Err(format!(
                "`bound_claims.{name}` binds a GitHub name, which can be deleted and \
                 registered again by someone else: bind `repository_owner_id` (the owner's \
                 numeric id, `gh api users/OWNER --jq .id`) as well or instead"
            ));
        }
    }
    Ok(())
}

/// Validated key source.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    Static(std::sync::Arc<KeySet>),
    File(PathBuf),
    Url(String),
    Discovery { issuer: String, allow_http: bool },
}

/// A validated issuer.
#[derive(Debug)]
pub(crate) struct IssuerSpec {
    pub(crate) name: String,
    pub(crate) issuer: Option<String>,
    pub(crate) trust_domain: Option<String>,
    pub(crate) audiences: BTreeSet<String>,
    pub(crate) algorithms: BTreeSet<Alg>,
    pub(crate) leeway_secs: i64,
    pub(crate) max_lifetime_secs: i64,
    pub(crate) workload_id: Template,
    pub(crate) claim_mappings: BTreeMap<String, String>,
    pub(crate) bound_claims: BTreeMap<String, BTreeSet<String>>,
    pub(crate) profile: Option<Profile>,
    pub(crate) source: Source,
    pub(crate) jwks_max_age_ms: i64,
    pub(crate) jwks_max_stale_ms: i64,
    pub(crate) min_refresh_ms: i64,
    pub(crate) fetch_timeout: std::time::Duration,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl JwtIssuerConfig {
    pub(crate) fn validate(&self) -> Result<IssuerSpec, ConfigError> {
        let err = |reason: String| ConfigError::Issuer {
            name: self.name.clone(),
            reason,
        };
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b))
        {
            return Err(err("`name` must be 1-64 of [a-z0-9_-]".into()));
        }
        let spiffe = self.profile == Some(Profile::Spiffe);
        let issuer = match &self.issuer {
            Some(i) if i.is_empty() || !keymint_core::model::valid_text(i, 1024) => {
                return Err(err(
                    "`issuer` must be 1-1024 characters, no control characters".into(),
                ));
            }
            Some(i) => Some(i.clone()),
            None if spiffe => None,
            None => return Err(err("`issuer` is required".into())),
        };
        let trust_domain = match (&self.trust_domain, spiffe) {
            (Some(td), true) => {
                if !profile::valid_trust_domain(td) {
                    return Err(err(format!(
                        "`trust_domain` `{td}` is not a SPIFFE trust domain"
                    )));
                }
                Some(td.clone())
            }
            (None, true) => return Err(err("the spiffe profile needs `trust_domain`".into())),
            (Some(_), false) => {
                return Err(err("`trust_domain` is for the spiffe profile only".into()));
            }
            (None, false) => None,
        };
        if self.audiences.is_empty() || self.audiences.iter().any(String::is_empty) {
            return Err(err(
                "`audiences` must list at least one non-empty audience".into()
            ));
        }
        if self.algorithms.is_empty() {
            return Err(err("`algorithms` must not be empty".into()));
        }
        if self.leeway_secs > MAX_LEEWAY_SECS {
            return Err(err(format!("`leeway` is at most {MAX_LEEWAY_SECS}s")));
        }
        if self.max_lifetime_secs == 0 {
            return Err(err("`max_lifetime` must be positive".into()));
        }
        if self.jwks_min_refresh_interval_secs == 0 {
            return Err(err("`jwks_min_refresh_interval` must be positive".into()));
        }
        if self.jwks_max_age_secs < self.jwks_min_refresh_interval_secs {
            return Err(err(
                "`jwks_max_age` must be at least `jwks_min_refresh_interval`".into(),
            ));
        }
        if self.jwks_max_stale_secs < self.jwks_max_age_secs {
            return Err(err(format!(
                "`jwks_max_stale` ({}s) must be at least `jwks_max_age` ({}s): keys are refreshed at \
                 `jwks_max_age` and refused at `jwks_max_stale` when no refresh succeeded",
                self.jwks_max_stale_secs, self.jwks_max_age_secs
            )));
        }
        if self.jwks_max_stale_secs > MAX_JWKS_MAX_STALE_SECS {
            return Err(err(
                "`jwks_max_stale` is at most 30 days (720h): it bounds how long keys that \
                 cannot be fetched again are trusted"
                    .into(),
            ));
        }
        if !(1..=120).contains(&self.fetch_timeout_secs) {
            return Err(err("`fetch_timeout` must be 1s to 2m".into()));
        }
        let template = match (&self.workload_id, self.profile) {
            (Some(t), _) => t.as_str(),
            (None, Some(p)) => p.default_workload_id(),
            (None, None) => "{sub}",
        };
        let workload_id =
            Template::parse(template).map_err(|e| err(format!("`workload_id`: {e}")))?;
        if self.profile == Some(Profile::GithubActions) {
            github_ids_pinned(&workload_id, &self.bound_claims).map_err(err)?;
        }
        let reserved = self.profile.map(|p| p.attributes()).unwrap_or_default();
        for (attr, path) in &self.claim_mappings {
            if attr.is_empty()
                || attr.len() > 64
                || !attr
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            {
                return Err(err(format!(
                    "attribute name `{attr}` must be 1-64 of [A-Za-z0-9_.-]"
                )));
            }
            if reserved.contains(&attr.as_str()) {
                return Err(err(format!("attribute `{attr}` is set by the profile")));
            }
            if let Some((_, by)) = OTHER_METHODS_ATTRIBUTES.iter().find(|(n, _)| n == attr) {
                return Err(err(format!(
                    "`claim_mappings.{attr}` (claim `{path}`): `{attr}` is a tag that {by} sets; \
                     a policy reading it without checking `principal.method` would take this \
                     claim for it (choose another name)"
                )));
            }
            if path.is_empty() {
                return Err(err(format!("attribute `{attr}` maps an empty claim path")));
            }
        }
        let mut bound_claims = BTreeMap::new();
        for (path, values) in &self.bound_claims {
            if path.is_empty() || values.is_empty() {
                return Err(err(format!(
                    "`bound_claims.{path}` must list at least one value"
                )));
            }
            bound_claims.insert(path.clone(), values.iter().cloned().collect());
        }
        let source = match &self.jwks {
            JwksSource::Inline(json) => {
                let set = KeySet::parse(json.as_bytes())
                    .map_err(|e| err(format!("inline `jwks`: {e}")))?;
                if set.len() == 0 {
                    return Err(err("inline `jwks` holds no usable key".into()));
                }
                Source::Static(std::sync::Arc::new(set))
            }
            JwksSource::File(p) => Source::File(p.clone()),
            JwksSource::Url(u) => {
                fetch::check_url(u, self.dangerous_allow_http).map_err(err)?;
                if self.dangerous_allow_http {
                    tracing::warn!(issuer = %self.name, url = %u, "dangerous_allow_http: keys may be fetched over plain HTTP");
                }
                Source::Url(u.clone())
            }
            JwksSource::Discovery => {
                let Some(iss) = &issuer else {
                    return Err(err("`jwks = \"discovery\"` needs `issuer`".into()));
                };
                fetch::check_url(iss, self.dangerous_allow_http)
                    .map_err(|e| err(format!("discovery: {e}")))?;
                Source::Discovery {
                    issuer: iss.clone(),
                    allow_http: self.dangerous_allow_http,
                }
            }
        };
        Ok(IssuerSpec {
            name: self.name.clone(),
            issuer,
            trust_domain,
            audiences: self.audiences.iter().cloned().collect(),
            algorithms: self.algorithms.iter().copied().collect(),
            leeway_secs: to_i64(self.leeway_secs),
            max_lifetime_secs: to_i64(self.max_lifetime_secs),
            workload_id,
            claim_mappings: self.claim_mappings.clone(),
            bound_claims,
            profile: self.profile,
            source,
            jwks_max_age_ms: to_i64(self.jwks_max_age_secs).saturating_mul(1000),
            jwks_max_stale_ms: to_i64(self.jwks_max_stale_secs).saturating_mul(1000),
            min_refresh_ms: to_i64(self.jwks_min_refresh_interval_secs).saturating_mul(1000),
            fetch_timeout: std::time::Duration::from_secs(self.fetch_timeout_secs),
        })
    }
}
