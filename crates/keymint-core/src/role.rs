//! Roles, typed: what a role issues is an enum checked once, when the
//! configuration is loaded, so nothing on the request path compares engine
//! names as strings or re-reads settings from JSON.
//!
//! [`Role`] holds what every role has (name, scopes, TTLs) and a
//! [`RoleKind`] with the settings of its engine. On the wire a role keeps
//! the shape `{"name", "engine", "settings", …}`: `engine` names the kind
//! and `settings` carries that kind's (never secret) settings.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use crate::federation::{FederatedProvider, Federation};

/// The engines a role can name. A lease records the engine that minted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// keymint's own `kmt_` access tokens (also for the egress proxy).
    Token,
    /// A PostgreSQL user that exists for one lease.
    Postgres,
    /// A MySQL/MariaDB user that exists for one lease.
    Mysql,
    /// An OpenSSH user certificate for the workload's own key.
    Ssh,
    /// A workload identity JWT signed by keymint as an OIDC issuer.
    Jwt,
    /// AWS temporary credentials from STS `AssumeRoleWithWebIdentity`.
    Aws,
    /// An OpenAI project service account and API key that exist for one
    /// lease (docs/design/0017-provider-keys.md).
    Openai,
    /// An OpenRouter API key that exists for one lease, with a spend limit.
    Openrouter,
    /// A provider's short-lived access token (OpenAI, Anthropic,
    /// OpenRouter), obtained by exchanging a workload JWT keymint signs
    /// (docs/design/0028-provider-federation.md).
    Federated,
}

impl EngineKind {
    pub const ALL: [Self; 9] = [
        Self::Token,
        Self::Postgres,
        Self::Mysql,
        Self::Ssh,
        Self::Jwt,
        Self::Aws,
        Self::Openai,
        Self::Openrouter,
        Self::Federated,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
            Self::Ssh => "ssh",
            Self::Jwt => "jwt",
            Self::Aws => "aws",
            Self::Openai => "openai",
            Self::Openrouter => "openrouter",
            Self::Federated => "federated",
        }
    }

    /// The names, for messages such as "available: token, postgres, …".
    pub fn names() -> String {
        Self::ALL.map(Self::as_str).join(", ")
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An engine name that keymint does not know. Never repeats the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown engine (available: token, postgres, mysql, ssh, jwt, aws, openai, openrouter, federated)"
)]
pub struct UnknownEngine;

impl FromStr for EngineKind {
    type Err = UnknownEngine;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or(UnknownEngine)
    }
}

/// A named template: which engine, which scopes, which TTLs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Role {
    pub name: String,
    pub scopes: Vec<String>,
    pub default_ttl_secs: u64,
    pub max_ttl_secs: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The engine and its settings (`"engine"` and `"settings"` on the wire).
    #[serde(flatten)]
    pub kind: RoleKind,
}

impl Role {
    pub fn engine(&self) -> EngineKind {
        self.kind.engine()
    }

    /// The egress-proxy part of a token role, if it names an upstream.
    pub fn egress(&self) -> Option<&Egress> {
        match &self.kind {
            RoleKind::Token(t) => t.egress.as_ref(),
            _ => None,
        }
    }

    /// Where the role's credentials are used, for policy
    /// (`context.destination`): `upstream:NAME` for the egress proxy,
    /// `database:NAME`, `ssh-ca:NAME`, or `""` for a plain keymint token.
    pub fn destination(&self) -> String {
        match &self.kind {
            RoleKind::Token(TokenRole { egress: Some(e) }) => format!("upstream:{}", e.upstream),
            RoleKind::Token(TokenRole { egress: None }) => String::new(),
            RoleKind::Postgres(d) | RoleKind::Mysql(d) => format!("database:{}", d.database),
            RoleKind::Ssh(s) => format!("ssh-ca:{}", s.ca),
            RoleKind::Jwt(j) => format!("audience:{}", j.audience.join(",")),
            RoleKind::Aws(a) => format!("aws-role:{}", a.role_arn),
            RoleKind::Openai(o) => format!("openai-project:{}", o.project),
            RoleKind::Openrouter(o) => format!("openrouter:{}", o.management_key),
            RoleKind::Federated(f) => format!("federated:{}", f.provider.as_str()),
        }
    }
}

/// What a role issues, with the settings of that engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "engine", content = "settings", rename_all = "snake_case")]
pub enum RoleKind {
    Token(TokenRole),
    Postgres(DatabaseRole),
    Mysql(DatabaseRole),
    Ssh(SshRole),
    Jwt(JwtRole),
    Aws(AwsRole),
    Openai(OpenAiRole),
    Openrouter(OpenRouterRole),
    Federated(Federation),
}

impl RoleKind {
    pub const fn engine(&self) -> EngineKind {
        match self {
            Self::Token(_) => EngineKind::Token,
            Self::Postgres(_) => EngineKind::Postgres,
            Self::Mysql(_) => EngineKind::Mysql,
            Self::Ssh(_) => EngineKind::Ssh,
            Self::Jwt(_) => EngineKind::Jwt,
            Self::Aws(_) => EngineKind::Aws,
            Self::Openai(_) => EngineKind::Openai,
            Self::Openrouter(_) => EngineKind::Openrouter,
            Self::Federated(_) => EngineKind::Federated,
        }
    }
}

/// The algorithms keymint signs JWTs with as an OIDC issuer
/// (docs/design/0016-oidc-issuer.md): the JOSE names on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum SigningAlg {
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// RSASSA-PKCS1-v1_5 with SHA-256 (2048-bit keys).
    RS256,
    /// Ed25519 (RFC 8037).
    EdDSA,
}

impl SigningAlg {
    pub const ALL: [Self; 3] = [Self::ES256, Self::RS256, Self::EdDSA];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ES256 => "ES256",
            Self::RS256 => "RS256",
            Self::EdDSA => "EdDSA",
        }
    }
}

impl fmt::Display for SigningAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for SigningAlg {
    /// Exact JOSE names; anything else is refused without repeating it.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                serde::de::Error::custom("unknown `algorithm` (available: ES256, RS256, EdDSA)")
            })
    }
}

fn default_es256() -> SigningAlg {
    SigningAlg::ES256
}

fn default_rs256() -> SigningAlg {
    SigningAlg::RS256
}

/// A workload JWT role's settings (`[roles.jwt]`): keymint signs a JWT
/// for the task's workload, for this audience. The token cannot be
/// recalled, so it never lives past the task's end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JwtRole {
    /// `aud`: one audience (a string on the wire) or several.
    #[serde(deserialize_with = "one_or_many")]
    pub audience: Vec<String>,
    #[serde(default = "default_es256")]
    pub algorithm: SigningAlg,
    /// JWT-SVID form: `sub` is the workload's SPIFFE ID (in the issuer's
    /// `trust_domain` unless the workload already is one).
    #[serde(default)]
    pub spiffe: bool,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// Whether `s` can be an audience or similar claim value: 1-256 bytes
/// without control characters.
pub fn valid_claim_value(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control)
}

impl JwtRole {
    pub fn validate(&self) -> Result<(), String> {
        if self.audience.is_empty() || self.audience.len() > 16 {
            return Err("`audience` must name 1 to 16 audiences".into());
        }
        if !self.audience.iter().all(|a| valid_claim_value(a)) {
            return Err("an `audience` must be 1-256 bytes without control characters".into());
        }
        Ok(())
    }
}

/// The least STS grants (`DurationSeconds`), in seconds.
pub const AWS_MIN_SESSION_SECS: u64 = 900;
/// The most STS can grant (a role's `MaxSessionDuration` may cap it lower).
pub const AWS_MAX_SESSION_SECS: u64 = 43_200;

/// An AWS role's settings (`[roles.aws]`): keymint signs a JWT for the
/// task and exchanges it at STS (`AssumeRoleWithWebIdentity`) for
/// temporary credentials of `role_arn`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AwsRole {
    /// `arn:aws:iam::ACCOUNT:role/NAME`; its trust policy names keymint's
    /// issuer as a federated OIDC provider.
    pub role_arn: String,
    /// `AWS_REGION` for the workload; also picks the regional STS endpoint.
    pub region: String,
    /// `aud` of the JWT (the client id registered with the IAM OIDC
    /// provider).
    #[serde(default = "default_sts_audience")]
    pub audience: String,
    #[serde(default = "default_rs256")]
    pub algorithm: SigningAlg,
    /// The STS endpoint (default `https://sts.REGION.amazonaws.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sts_endpoint: Option<String>,
    /// A session policy (IAM JSON) that narrows what the role allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_policy: Option<String>,
    /// STS never grants less than 15 minutes. A task that ends sooner is
    /// refused unless this is `true`: then the credentials outlive the task
    /// by the difference, knowingly.
    #[serde(default)]
    pub allow_longer_than_task: bool,
    /// Seconds to wait for STS (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

fn default_sts_audience() -> String {
    "sts.amazonaws.com".into()
}

impl AwsRole {
    pub fn validate(&self) -> Result<(), String> {
        let arn_ok = self.role_arn.starts_with("arn:")
            && self.role_arn.split(':').count() == 6
            && self.role_arn.contains(":role/")
            && self.role_arn.len() <= 2048
            && self
                .role_arn
                .chars()
                .all(|c| c.is_ascii_graphic() && c != '"' && c != '<' && c != '>');
        if !arn_ok {
            return Err(
                "`role_arn` must be an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)".into(),
            );
        }
        let region_ok = !self.region.is_empty()
            && self.region.len() <= 32
            && self
                .region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !region_ok {
            return Err("`region` must be an AWS region such as `us-east-1`".into());
        }
        if !valid_claim_value(&self.audience) {
            return Err("`audience` must be 1-256 bytes without control characters".into());
        }
        if let Some(e) = &self.sts_endpoint
            && !(e.starts_with("https://") || e.starts_with("http://"))
        {
            return Err("`sts_endpoint` must be an http(s) URL".into());
        }
        if let Some(p) = &self.session_policy {
            // STS takes at most 2,048 characters of plain-text policy.
            if p.len() > 2048 || serde_json::from_str::<serde_json::Value>(p).is_err() {
                return Err(
                    "`session_policy` must be an IAM policy in JSON, at most 2048 characters"
                        .into(),
                );
            }
        }
        if self.timeout_secs.is_some_and(|t| t == 0 || t > 120) {
            return Err("`timeout_secs` must be between 1 and 120".into());
        }
        Ok(())
    }

    /// The STS endpoint to call.
    pub fn endpoint(&self) -> String {
        self.sts_endpoint
            .clone()
            .unwrap_or_else(|| format!("https://sts.{}.amazonaws.com/", self.region))
    }
}

/// A token role: `kmt_` tokens, optionally for one egress-proxy upstream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenRole {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Egress>,
}

/// The egress-proxy part of a token role: the one upstream its tokens
/// reach, and what they may do and spend there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Egress {
    /// The `[[upstreams]]` entry.
    pub upstream: String,
    /// What that upstream speaks (so `keymint run` and the agent know which
    /// SDK variables to set).
    pub upstream_kind: UpstreamKind,
    pub proxy: ProxyPolicy,
}

/// A database role: a user per lease in one configured database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DatabaseRole {
    /// The `[[databases]]` entry.
    pub database: String,
    /// Statements that grant the new user its rights; `{{name}}` stands
    /// for the quoted user name.
    #[serde(default)]
    pub creation_statements: Vec<String>,
    /// The most connections one lease's user may hold open at once
    /// (PostgreSQL `CONNECTION LIMIT`, MySQL/MariaDB
    /// `MAX_USER_CONNECTIONS`), so that one workload cannot take every
    /// connection the server allows (docs/design/0003-postgres-users.md).
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

/// A leased database user's connection limit when the role sets none.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10;

/// The highest connection limit a database role may set: above it the
/// limit protects nothing on any ordinary server (PostgreSQL's default
/// `max_connections` is 100, MariaDB's 151).
pub const MAX_MAX_CONNECTIONS: u32 = 1000;

fn default_max_connections() -> u32 {
    DEFAULT_MAX_CONNECTIONS
}

impl DatabaseRole {
    /// The connection limit, when it is one a server reads as a limit:
    /// 1 to [`MAX_MAX_CONNECTIONS`]. Zero is refused rather than passed
    /// on: PostgreSQL reads it as "no connection" but MySQL and MariaDB
    /// as "no limit".
    pub fn connection_limit(&self) -> Result<u32, String> {
        check_max_connections(i64::from(self.max_connections))
    }
}

/// Checks a configured `max_connections`: 1 to [`MAX_MAX_CONNECTIONS`].
pub fn check_max_connections(n: i64) -> Result<u32, String> {
    match u32::try_from(n) {
        Ok(n @ 1..=MAX_MAX_CONNECTIONS) => Ok(n),
        _ => Err(format!(
            "`max_connections` must be 1 to {MAX_MAX_CONNECTIONS} (the connections one lease's \
             user may hold open at once), not `{n}`"
        )),
    }
}

/// An openai role's settings (`[roles.openai]`): per lease, a service
/// account in `project` and an API key for it, made with the admin key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OpenAiRole {
    /// The project the service accounts are made in (`proj_…`).
    pub project: String,
    /// The `[[upstreams]]` entry whose sealed key is the OpenAI admin key
    /// (`keymint upstream set`) and whose `base_url` is the API's.
    pub admin_key: String,
    /// The API key's scopes (OpenAI's names); none: the service account's
    /// default access.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
}

/// How often an OpenRouter key's spend limit resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum LimitReset {
    Daily,
    Weekly,
    Monthly,
}

impl LimitReset {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Daily => "daily",
            Self::Weekly => "weekly",
            Self::Monthly => "monthly",
        }
    }
}

/// An openrouter role's settings (`[roles.openrouter]`): per lease, an API
/// key made with the management key, with a dollar limit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OpenRouterRole {
    /// The `[[upstreams]]` entry whose sealed key is the OpenRouter
    /// management key and whose `base_url` is the API's.
    pub management_key: String,
    /// The key's spend limit in US dollars (the task's budget at
    /// OpenRouter); none: no limit of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_spend_usd: Option<f64>,
    /// When the limit resets; none: never (one budget for the key's life).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_reset: Option<LimitReset>,
}

/// Whether `s` can be an OpenAI project id: 1-128 of ASCII letters,
/// digits, `_`, `-` (it is put in a URL path).
pub fn valid_project_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn default_true() -> bool {
    true
}

/// An SSH role's settings (`[roles.ssh]`): the CA, principals, options.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SshRole {
    /// The certificate authority that signs.
    pub ca: String,
    /// The principals (user names on the hosts) the certificate is valid for.
    pub principals: Vec<String>,
    /// `force-command`: the only command the certificate may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_command: Option<String>,
    /// `source-address`: comma-separated CIDR list the certificate may be
    /// used from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<String>,
    #[serde(default = "default_true")]
    pub permit_pty: bool,
    #[serde(default)]
    pub permit_port_forwarding: bool,
    #[serde(default)]
    pub permit_agent_forwarding: bool,
    #[serde(default)]
    pub permit_x11_forwarding: bool,
    #[serde(default)]
    pub permit_user_rc: bool,
}

/// The most principals one certificate may carry: OpenSSH loads no
/// certificate with more (`SSHKEY_CERT_MAX_PRINCIPALS`).
pub const MAX_SSH_PRINCIPALS: usize = 256;

/// Whether `p` can be an SSH principal (a user name), 1–256 bytes, read
/// the same way everywhere sshd reads it: no `,` (the list separator of
/// `AuthorizedPrincipalsFile` and `AuthorizedPrincipalsCommand` output), no
/// `*`, `?` or `!` (pattern characters where sshd matches principals as
/// patterns), no white space, control, bidirectional formatting or
/// invisible characters (a name that reads as another).
pub fn valid_principal(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 256
        && p.chars().all(|c| {
            !c.is_whitespace()
                && !matches!(c, ',' | '*' | '?' | '!')
                && !crate::model::is_unsafe_char(c)
                && !crate::model::is_invisible_char(c)
        })
}

/// Whether `s` is a `source-address` list sshd accepts
/// ([`check_source_address`]).
pub fn valid_source_address(s: &str) -> bool {
    check_source_address(s).is_ok()
}

/// The characters sshd lets into a `source-address` entry
/// (`VALID_CIDR_CHARS` in OpenSSH's addrmatch.c).
const CIDR_CHARS: &str = "0123456789abcdefABCDEF.:/";

/// The longest entry sshd reads: `INET6_ADDRSTRLEN` (46) and 3 for the
/// prefix length.
const CIDR_MAX_LEN: usize = 49;

/// Checks a `source-address` list the way sshd reads the critical option
/// (`addr_match_cidr_list` with no address, OpenSSH's addrmatch.c), which
/// refuses the whole certificate when any entry is bad: comma-separated
/// entries, none empty, each at most 49 characters of hexadecimal digits,
/// `.`, `:` and `/`; an address, optionally `/` and a decimal prefix length
/// of at most 32 (IPv4) or 128 (IPv6); and no bit set after the prefix
/// (`10.0.0.1/8` is refused, `10.0.0.0/8` is not). Stricter than sshd in
/// one way: an IPv4 address must be four decimal parts without leading
/// zeros, since sshd (through `getaddrinfo`) reads `010.0.0.1` as octal
/// (8.0.0.1) and `10.1` as 10.0.0.1, not what they seem to say. The error
/// names the bad entry (by its position when it holds characters sshd
/// refuses, which may not print as they are).
pub fn check_source_address(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("`source_address` is empty".into());
    }
    for (i, entry) in s.split(',').enumerate() {
        check_cidr(entry).map_err(|why| {
            let shown = if !entry.is_empty()
                && entry.len() <= CIDR_MAX_LEN
                && entry.chars().all(|c| CIDR_CHARS.contains(c))
            {
                format!("`{entry}`")
            } else {
                format!("number {}", i + 1)
            };
            format!("`source_address` entry {shown}: {why}; sshd would refuse every certificate")
        })?;
    }
    Ok(())
}

/// One entry of a `source-address` list (see [`check_source_address`]).
fn check_cidr(entry: &str) -> Result<(), String> {
    use std::net::IpAddr;
    if entry.is_empty() {
        return Err("it is empty (no spaces around commas, no comma at the end)".into());
    }
    if entry.len() > CIDR_MAX_LEN {
        return Err(format!("it is longer than {CIDR_MAX_LEN} characters"));
    }
    if !entry.chars().all(|c| CIDR_CHARS.contains(c)) {
        return Err("only hexadecimal digits, `.`, `:` and `/` may appear".into());
    }
    let (addr, bits) = match entry.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (entry, None),
    };
    let ip: IpAddr = addr.parse().map_err(|_| {
        "it is not an IPv4 address (four decimal parts, no leading zeros) or an IPv6 address"
            .to_owned()
    })?;
    let max: u32 = if ip.is_ipv4() { 32 } else { 128 };
    let len = match bits {
        None => max,
        Some(b) => {
            // sshd reads it with `strtoul(…, 10)` after checking that it
            // starts with a digit: decimal digits only, leading zeros read
            // as decimal.
            if b.is_empty() || !b.bytes().all(|c| c.is_ascii_digit()) {
                return Err("the prefix length after `/` must be decimal digits".into());
            }
            let digits = b.trim_start_matches('0');
            match digits.parse::<u32>() {
                _ if digits.is_empty() => 0,
                Ok(n) if n <= max => n,
                _ => {
                    return Err(format!(
                        "the prefix length `/{b}` is longer than an {} address ({max} bits)",
                        if max == 32 { "IPv4" } else { "IPv6" }
                    ));
                }
            }
        }
    };
    // No bit set after the prefix (sshd's `addr_host_is_all0s`).
    let (value, host): (u128, u128) = match ip {
        IpAddr::V4(a) => (
            u128::from(u32::from(a)),
            u128::from(u32::MAX.checked_shr(len).unwrap_or(0)),
        ),
        IpAddr::V6(a) => (u128::from(a), u128::MAX.checked_shr(len).unwrap_or(0)),
    };
    if value & host != 0 {
        let network = match ip {
            IpAddr::V4(_) => IpAddr::from(std::net::Ipv4Addr::from((value & !host) as u32)),
            IpAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::from(value & !host)),
        };
        return Err(format!(
            "bits are set after the /{len} prefix (the network is `{network}/{len}`)"
        ));
    }
    Ok(())
}

impl SshRole {
    /// The principals a certificate of this role carries: all the role
    /// grants, or the ones `asked` for, each once, in the order first
    /// named. Refuses an empty list, a principal the role does not grant
    /// (named by its position, never by its value) and more than
    /// [`MAX_SSH_PRINCIPALS`].
    pub fn certificate_principals(
        &self,
        role: &str,
        asked: Option<&[String]>,
    ) -> Result<Vec<String>, String> {
        let wanted = match asked {
            None => &self.principals[..],
            Some([]) => return Err("`principals` must name at least one".into()),
            Some(asked) => {
                if let Some(i) = asked.iter().position(|p| !self.principals.contains(p)) {
                    return Err(format!("`principals[{i}]` is not one role `{role}` grants"));
                }
                asked
            }
        };
        let mut out: Vec<String> = Vec::new();
        for p in wanted {
            if !out.contains(p) {
                if out.len() == MAX_SSH_PRINCIPALS {
                    return Err(format!(
                        "a certificate carries at most {MAX_SSH_PRINCIPALS} principals (OpenSSH loads none with more)"
                    ));
                }
                out.push(p.clone());
            }
        }
        Ok(out)
    }

    /// Checks what the configuration gave.
    pub fn validate(&self) -> Result<(), String> {
        if !crate::model::valid_name(&self.ca) {
            return Err(format!(
                "`ca` `{}` must be 1-64 of a-z, 0-9, `.`, `_`, `-`",
                self.ca
            ));
        }
        if self.principals.is_empty() {
            return Err("`principals` must name at least one user".into());
        }
        // By position, not by value: the value may be what makes it unsafe
        // to show.
        if let Some(i) = self.principals.iter().position(|p| !valid_principal(p)) {
            return Err(format!(
                "`principals[{i}]` is not a user name sshd reads literally: 1-256 bytes without `,`, `*`, `?`, `!`, white space, control, bidirectional formatting or invisible characters"
            ));
        }
        let mut distinct: Vec<&String> = self.principals.iter().collect();
        distinct.sort();
        distinct.dedup();
        if distinct.len() > MAX_SSH_PRINCIPALS {
            return Err(format!(
                "`principals` names {} users; OpenSSH loads no certificate with more than {MAX_SSH_PRINCIPALS}",
                distinct.len()
            ));
        }
        if let Some(c) = &self.force_command
            && (c.is_empty() || c.contains('\0'))
        {
            return Err("`force_command` must be a non-empty command".into());
        }
        if let Some(s) = &self.source_address {
            check_source_address(s)?;
        }
        Ok(())
    }
}

/// What an egress-proxy upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum UpstreamKind {
    /// OpenAI and every API that copies it (vLLM, Azure OpenAI, OpenRouter).
    Openai,
    /// Anthropic's Messages API.
    Anthropic,
    /// Any HTTP API; the key goes into a configured header or query parameter.
    Http,
}

impl UpstreamKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Anthropic => "anthropic",
            Self::Http => "http",
        }
    }

    /// The endpoint names a role may allow for this kind (`http` takes
    /// `METHOD /path` patterns instead).
    pub const fn endpoints(self) -> &'static [&'static str] {
        match self {
            Self::Openai => &["chat.completions", "responses", "embeddings", "models"],
            Self::Anthropic => &["messages", "messages.count_tokens", "models"],
            Self::Http => &[],
        }
    }
}

/// What to do with a secret found in an outbound request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SecretAction {
    /// Refuse the request (400).
    #[default]
    Block,
    /// Replace the secret with `[REDACTED:<kind>]` and forward.
    Redact,
}

/// The `[roles.proxy]` table of a role that names an upstream: what the
/// tokens it issues may reach and spend, per task.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ProxyPolicy {
    /// Model names; a trailing `*` matches a prefix, `*` any model.
    #[serde(default)]
    pub models: Vec<String>,
    /// Endpoint names (`chat.completions`, `messages`, …) or, for http
    /// upstreams, `METHOD /path` patterns (`GET /repos/*`, `* /search`).
    #[serde(default)]
    pub endpoints: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_input_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u64>,
    /// Spend per task in US dollars, from the price table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_spend_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Output tokens reserved (and asked of the model) when a request names
    /// no limit of its own (default 4096).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_max_tokens: Option<u64>,
    #[serde(default)]
    pub secrets: SecretAction,
    /// OpenAI upstreams: the organisation the operator's key bills to,
    /// sent as `OpenAI-Organization` (a client's own header is dropped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
    /// OpenAI upstreams: the project, sent as `OpenAI-Project` (a client's
    /// own header is dropped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

/// US dollars in nano-dollars: spend is counted in integers.
pub fn usd_to_nusd(usd: f64) -> u64 {
    // Finite and non-negative (checked at load); saturates on absurd values.
    (usd * 1e9).round() as u64
}

impl ProxyPolicy {
    /// Spend limit in nano-dollars.
    pub fn max_spend_nusd(&self) -> Option<u64> {
        self.max_spend_usd.map(usd_to_nusd)
    }

    pub fn default_max_tokens(&self) -> u64 {
        self.default_max_tokens.unwrap_or(4096)
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.models.iter().any(|m| pattern_matches(m, model))
    }

    pub fn allows_endpoint(&self, name: &str) -> bool {
        self.endpoints.iter().any(|e| e == name)
    }

    /// For http upstreams: does `METHOD /path` match an allowed pattern?
    pub fn allows_http(&self, method: &str, path: &str) -> bool {
        self.endpoints.iter().any(|e| {
            let Some((m, p)) = e.split_once(' ') else {
                return false;
            };
            (m == "*" || m.eq_ignore_ascii_case(method)) && pattern_matches(p, path)
        })
    }
}

/// `*` alone matches anything; a trailing `*` matches a prefix; otherwise
/// the strings must be equal.
pub fn pattern_matches(pattern: &str, s: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => s.starts_with(prefix),
        None => pattern == s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(kind: RoleKind) -> Role {
        Role {
            name: "r".into(),
            scopes: vec![],
            default_ttl_secs: 60,
            max_ttl_secs: 60,
            description: None,
            kind,
        }
    }

    #[test]
    fn engine_names_round_trip_and_unknown_ones_are_not_echoed() {
        for k in EngineKind::ALL {
            assert_eq!(k.as_str().parse::<EngineKind>(), Ok(k));
        }
        let e = "sk-live-oops".parse::<EngineKind>().unwrap_err();
        assert!(!e.to_string().contains("sk-live"));
        assert_eq!(
            EngineKind::names(),
            "token, postgres, mysql, ssh, jwt, aws, openai, openrouter, federated"
        );
    }

    #[test]
    fn the_wire_shape_names_the_engine_and_its_settings() {
        let r = role(RoleKind::Postgres(DatabaseRole {
            database: "main".into(),
            creation_statements: vec!["GRANT x TO {{name}}".into()],
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["engine"], "postgres");
        assert_eq!(v["settings"]["database"], "main");
        let back: Role = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.destination(), "database:main");
        // A role written before `max_connections` existed reads as the
        // default limit.
        let mut old = serde_json::to_value(&r).unwrap();
        old["settings"]
            .as_object_mut()
            .unwrap()
            .remove("max_connections");
        let back: Role = serde_json::from_value(old).unwrap();
        assert_eq!(back, r);

        let t = role(RoleKind::Token(TokenRole::default()));
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["engine"], "token");
        assert_eq!(serde_json::from_value::<Role>(v).unwrap(), t);
        assert_eq!(t.destination(), "");
    }

    /// An SSH role of CA `ops` granting `principals`, a pty and nothing else.
    fn ssh_role(principals: &[&str]) -> SshRole {
        SshRole {
            ca: "ops".into(),
            principals: principals.iter().map(|p| (*p).to_owned()).collect(),
            force_command: None,
            source_address: None,
            permit_pty: true,
            permit_port_forwarding: false,
            permit_agent_forwarding: false,
            permit_x11_forwarding: false,
            permit_user_rc: false,
        }
    }

    #[test]
    fn destinations_name_where_credentials_go() {
        let ssh = role(RoleKind::Ssh(ssh_role(&["deploy"])));
        assert_eq!(ssh.destination(), "ssh-ca:ops");
        let proxied = role(RoleKind::Token(TokenRole {
            egress: Some(Egress {
                upstream: "openai".into(),
                upstream_kind: UpstreamKind::Openai,
                proxy: ProxyPolicy::default(),
            }),
        }));
        assert_eq!(proxied.destination(), "upstream:openai");
        assert_eq!(
            proxied.egress().map(|e| e.upstream_kind),
            Some(UpstreamKind::Openai)
        );
    }

    #[test]
    fn certificate_principals_are_distinct_granted_and_at_most_256() {
        let mut r = ssh_role(&["deploy", "ops", "deploy"]);
        assert_eq!(
            r.certificate_principals("r", None).unwrap(),
            ["deploy", "ops"]
        );
        let many = vec!["ops".to_owned(); 1000];
        assert_eq!(r.certificate_principals("r", Some(&many)).unwrap(), ["ops"]);
        let e = r
            .certificate_principals("r", Some(&["ops".into(), "r\u{202e}oot".into()]))
            .unwrap_err();
        assert!(
            e.contains("`principals[1]`") && !e.contains('\u{202e}'),
            "{e}"
        );
        assert!(r.certificate_principals("r", Some(&[])).is_err());
        // A role of 257 distinct principals is refused at load and at issue.
        r.principals = (0..257).map(|i| format!("u{i}")).collect();
        assert!(r.validate().unwrap_err().contains("257"));
        assert!(r.certificate_principals("r", None).is_err());
        r.principals.pop();
        r.principals.push("u0".into());
        assert!(r.validate().is_ok());
        assert_eq!(r.certificate_principals("r", None).unwrap().len(), 256);
        r.principals[3] = "!root".into();
        let e = r.validate().unwrap_err();
        assert!(e.contains("`principals[3]`") && !e.contains("!root"), "{e}");
    }

    #[test]
    fn connection_limits_are_1_to_1000() {
        assert_eq!(check_max_connections(1), Ok(1));
        assert_eq!(check_max_connections(1000), Ok(1000));
        for bad in [0, -1, 1001, i64::from(u32::MAX) + 1, i64::MIN] {
            let e = check_max_connections(bad).unwrap_err();
            assert!(
                e.contains("`max_connections`") && e.contains(&format!("`{bad}`")),
                "{e}"
            );
        }
        let mut d = DatabaseRole {
            database: "main".into(),
            creation_statements: Vec::new(),
            max_connections: 0,
        };
        assert!(d.connection_limit().is_err(), "0 means no limit to MySQL");
        d.max_connections = DEFAULT_MAX_CONNECTIONS;
        assert_eq!(d.connection_limit(), Ok(10));
    }

    #[test]
    fn principals_and_source_addresses_are_checked() {
        assert!(valid_principal("deploy"));
        assert!(!valid_principal("a,b"));
        assert!(!valid_principal("a b"));
        assert!(!valid_principal(""));
        // Pattern characters, bidirectional formatting, invisible ones.
        for bad in [
            "*",
            "!root",
            "a?",
            "a\u{202e}b",
            "a\u{200b}b",
            "a\tb",
            "a\nb",
        ] {
            assert!(!valid_principal(bad), "{bad:?}");
        }
        assert!(valid_principal("deploy-01_x.y@corp"));
        assert!(valid_source_address("10.0.0.0/8,::1"));
        assert!(!valid_source_address("10.0.0.0/129"));
        assert!(!valid_source_address("host.example"));
    }

    /// Each entry with what OpenSSH 9.2's `ssh-keygen -O source-address=…`
    /// (the same `addr_match_cidr_list` sshd runs on a certificate) said
    /// of it on this machine; keymint agrees, except where it is stricter
    /// on purpose (IPv4 forms that sshd reads as octal or shorthand).
    #[test]
    fn source_addresses_are_read_as_sshd_reads_them() {
        let sshd = [
            ("10.0.0.0/8", true),
            ("10.0.0.1/8", false),
            ("10.0.0.0/33", false),
            ("10.0.0.1/", false),
            ("::1/129", false),
            ("::1/128", true),
            ("::/0", true),
            ("0.0.0.0/0", true),
            ("10.0.0.0/0", false),
            ("10.0.0.0/008", true),
            ("10.0.0.0/+8", false),
            ("fe80::/10", true),
            ("fe80::1/10", false),
            ("FE80::/10", true),
            ("::ffff:10.0.0.0/104", true),
            ("::ffff:10.0.0.1/104", false),
            ("127.0.0.1/32", true),
            ("10.0.0.1,", false),
            (",10.0.0.1", false),
            ("10.0.0.1 ", false),
            ("10.0.0.0/8,::1", true),
            ("10.0.0.0/ 8", false),
            ("10.0.0.0/8/8", false),
            ("10.0.0.0//8", false),
            ("0000:0000:0000:0000:0000:0000:0000:0001/0128", true),
            ("1.2.3.4/31", true),
            ("192.168.1.128/25", true),
            ("1:2:3:4:5:6:7::", true),
            ("::1.2.3.4", true),
            ("::01.2.3.4", false),
            ("1.2.3.4/-1", false),
            ("1.2.3.4/4294967328", false),
        ];
        for (entry, accepted) in sshd {
            assert_eq!(
                check_source_address(entry).is_ok(),
                accepted,
                "{entry}: {:?}",
                check_source_address(entry)
            );
        }
        // sshd reads these as 8.0.0.1, 10.0.0.1 and 1.2.3.4: refused.
        for stricter in ["010.0.0.1", "10.1", "01.2.3.4"] {
            assert!(check_source_address(stricter).is_err(), "{stricter}");
        }
        // The error names the entry, and the network it may have meant.
        let e = check_source_address("127.0.0.1/32,10.0.0.1/8").unwrap_err();
        assert!(
            e.contains("`10.0.0.1/8`") && e.contains("`10.0.0.0/8`") && !e.contains("127"),
            "{e}"
        );
        let e = check_source_address("::1/129").unwrap_err();
        assert!(e.contains("`::1/129`") && e.contains("IPv6"), "{e}");
        let e = check_source_address("10.0.0.0/33").unwrap_err();
        assert!(e.contains("IPv4") && e.contains("32"), "{e}");
        // An entry sshd's characters do not cover is named by position.
        let e = check_source_address("10.0.0.0/8,10.0.0.1\u{202e}").unwrap_err();
        assert!(e.contains("number 2") && !e.contains('\u{202e}'), "{e}");
        assert!(check_source_address("").is_err());
    }
}
