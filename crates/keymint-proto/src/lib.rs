//! The shapes that cross the wire: request and response bodies of the
//! `/v1` API and the stable error codes of its problem+json errors
//! (RFC 9457). Domain types ([`Task`], [`Lease`]) are shown as they are.

use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub mod json_error;

pub use keymint_core::audit::{AuditEvent, ChainReport};
pub use keymint_core::model::{Lease, LeaseState, Role, Task, TaskStatus};

/// A secret on its way to its holder. Serialises as a plain string (it is
/// the response the caller asked for) but never shows in `Debug` output, and
/// is wiped from memory when dropped.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// A plain string on the wire (the secret, once, to its holder).
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for SecretString {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some("a secret, shown once to its holder"))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for SecretString {}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A credential handed to a workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Credential {
    /// A keymint access token (`kmt_…`), used as `Authorization: Bearer`.
    Bearer { token: SecretString },
    /// A database user that exists for the lease only.
    Database {
        /// `postgres` or `mysql`.
        engine: keymint_core::role::EngineKind,
        host: String,
        port: u16,
        database: String,
        username: String,
        password: SecretString,
        /// keymint reaches this server over TLS (its `tls = "require"`):
        /// so must the user (`sslmode=require`). MySQL/MariaDB users are
        /// then created `REQUIRE SSL`, and the server refuses them in
        /// clear text; PostgreSQL has no such per-user switch (the
        /// operator's `hostssl` lines in pg_hba.conf are).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        tls: bool,
    },
    /// An OpenSSH user certificate for the workload's own key. Not a secret
    /// on its own (it is useless without the private key), but handed out
    /// once like the others.
    SshCertificate {
        /// The certificate in OpenSSH format (`ssh-ed25519-cert-v01@openssh.com AAAA…`).
        certificate: SecretString,
        serial: u64,
        key_id: String,
        principals: Vec<String>,
        /// Unix seconds.
        valid_after: u64,
        valid_before: u64,
        /// The signing CA's public key, for `TrustedUserCAKeys`.
        ca_public_key: String,
    },
    /// A workload identity JWT signed by keymint as an OIDC issuer;
    /// expire-only (it dies at `expires_at`, never after the task).
    Jwt {
        /// The compact JWS.
        token: SecretString,
        issuer: String,
        subject: String,
        audience: Vec<String>,
        /// Unix seconds (`exp`).
        expires_at: i64,
    },
    /// AWS temporary credentials from STS `AssumeRoleWithWebIdentity`;
    /// expire-only, clamped to the task.
    Aws {
        access_key_id: String,
        secret_access_key: SecretString,
        session_token: SecretString,
        /// RFC 3339, as STS gave it.
        expiration: String,
        region: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        assumed_role_arn: Option<String>,
    },
    /// A provider's own API key that exists for the lease only (OpenAI,
    /// OpenRouter), used against the provider directly at `base_url` with
    /// the provider's SDK (docs/design/0017-provider-keys.md).
    ApiKey {
        /// The engine that made it: `openai` or `openrouter`.
        provider: keymint_core::role::EngineKind,
        api_key: SecretString,
        /// The API base an SDK takes (`OPENAI_BASE_URL`).
        base_url: String,
        /// When the provider itself stops accepting the key (Unix seconds):
        /// never past the task's end.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
    },
    /// A provider's short-lived access token, obtained by exchanging a JWT
    /// keymint signed for the task (workload identity federation;
    /// docs/design/0028-provider-federation.md). Expire-only: it dies at
    /// `expires_at`, never after the task's end. Sent as
    /// `Authorization: Bearer` to `base_url`.
    ProviderToken {
        provider: keymint_core::role::FederatedProvider,
        access_token: SecretString,
        /// The API base an SDK takes (`OPENAI_BASE_URL`,
        /// `ANTHROPIC_BASE_URL`).
        base_url: String,
        /// Unix seconds.
        expires_at: u64,
    },
}

impl Credential {
    /// The secret part: the token or the password.
    pub fn secret(&self) -> &SecretString {
        match self {
            Self::Bearer { token } => token,
            Self::Database { password, .. } => password,
            Self::SshCertificate { certificate, .. } => certificate,
            Self::Jwt { token, .. } => token,
            Self::Aws {
                secret_access_key, ..
            } => secret_access_key,
            Self::ApiKey { api_key, .. } => api_key,
            Self::ProviderToken { access_token, .. } => access_token,
        }
    }

    /// The variables the providers' own SDKs read for this credential
    /// (`keymint run` and the node agent's `env` delivery set them): the
    /// provider-native kinds only; keymint's own token, database and SSH
    /// credentials are mapped by their callers. Holds secrets: never log it.
    pub fn sdk_environment(&self) -> Vec<(&'static str, String)> {
        use keymint_core::role::{EngineKind, FederatedProvider};
        match self {
            Self::Aws {
                access_key_id,
                secret_access_key,
                session_token,
                expiration,
                region,
                ..
            } => vec![
                ("AWS_ACCESS_KEY_ID", access_key_id.clone()),
                (
                    "AWS_SECRET_ACCESS_KEY",
                    secret_access_key.expose().to_owned(),
                ),
                ("AWS_SESSION_TOKEN", session_token.expose().to_owned()),
                ("AWS_REGION", region.clone()),
                ("AWS_DEFAULT_REGION", region.clone()),
                ("AWS_CREDENTIAL_EXPIRATION", expiration.clone()),
            ],
            Self::ApiKey {
                provider,
                api_key,
                base_url,
                ..
            } => {
                // Both providers speak OpenAI's API: the openai SDK reads these.
                let mut v = vec![
                    ("OPENAI_API_KEY", api_key.expose().to_owned()),
                    ("OPENAI_BASE_URL", base_url.clone()),
                ];
                if *provider == EngineKind::Openrouter {
                    v.push(("OPENROUTER_API_KEY", api_key.expose().to_owned()));
                }
                v
            }
            Self::ProviderToken {
                provider,
                access_token,
                base_url,
                ..
            } => match provider {
                // OpenAI takes a federated access token where an API key
                // goes (`Authorization: Bearer`).
                FederatedProvider::Openai => vec![
                    ("OPENAI_API_KEY", access_token.expose().to_owned()),
                    ("OPENAI_BASE_URL", base_url.clone()),
                ],
                FederatedProvider::Openrouter => vec![
                    ("OPENAI_API_KEY", access_token.expose().to_owned()),
                    ("OPENAI_BASE_URL", base_url.clone()),
                    ("OPENROUTER_API_KEY", access_token.expose().to_owned()),
                ],
                // Anthropic's token is a bearer token, not an `x-api-key`:
                // its SDK sends `ANTHROPIC_AUTH_TOKEN` as
                // `Authorization: Bearer`.
                FederatedProvider::Anthropic => vec![
                    ("ANTHROPIC_AUTH_TOKEN", access_token.expose().to_owned()),
                    ("ANTHROPIC_BASE_URL", base_url.clone()),
                ],
            },
            Self::Jwt { token, .. } => vec![("KEYMINT_JWT", token.expose().to_owned())],
            Self::Bearer { .. } | Self::Database { .. } | Self::SshCertificate { .. } => Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StartTask {
    /// Who the task is for. Required for admins; for a task token, the
    /// sub-agent's workload name.
    pub workload: Option<String>,
    pub role: Option<String>,
    pub intent: Option<String>,
    pub purpose: Option<String>,
    pub environment: Option<String>,
    pub ttl_secs: Option<u64>,
    pub idle_timeout_secs: Option<u64>,
    pub scopes: Option<Vec<String>>,
    /// Start as a sub-task of this task (defaults to the caller's own task
    /// when the caller authenticates with a task token).
    pub parent: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EndStatus {
    Completed,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EndTask {
    pub status: EndStatus,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct IssueLease {
    pub ttl_secs: Option<u64>,
    pub scopes: Option<Vec<String>>,
    /// For SSH roles: the workload's own public key (OpenSSH format) to
    /// certify. keymint never sees the private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// For SSH roles: the principals to certify, a subset of the role's
    /// (default: all of them). Policy sees them as `context.principals`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principals: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IssuedLease {
    pub lease: Lease,
    pub credential: Credential,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RenewLease {
    pub increment_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Renewed {
    pub lease: Lease,
    /// The renewal was cut short by the role's maximum TTL or the task's end.
    pub capped: bool,
}

/// Revoke every pending or active lease of one task, workload or role.
/// Exactly one field must be set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RevokeLeases {
    pub task: Option<String>,
    pub workload: Option<String>,
    pub role: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Revoked {
    pub revoked: Vec<Lease>,
}

/// An SSH certificate authority: its public key in OpenSSH format, for
/// sshd's `TrustedUserCAKeys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SshCa {
    pub name: String,
    pub public_key: String,
}

/// The answer to `POST /v1/databases/{name}/rotate`: keymint set a new
/// password for its admin user on that database and keeps it sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DatabaseRotated {
    pub database: String,
    pub engine: keymint_core::role::EngineKind,
    pub rotated_at: keymint_core::Timestamp,
    /// The HMAC fingerprint of the new password (never the password).
    pub fingerprint: String,
}

/// What a rotation of an upstream's key did (`POST
/// /v1/upstreams/{name}/rotate`, docs/design/0035). Never a key: only
/// fingerprints and the new key's hint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UpstreamRotated {
    pub upstream: String,
    /// `openrouter`, `openai`, `anthropic` or `manual`.
    pub provider: String,
    /// Whether keymint made the new key at the provider (else an operator
    /// supplied it).
    pub created: bool,
    /// How the new key was checked before the switch (`GET /key`, …), or
    /// why it could not be.
    pub verified: String,
    pub rotated_at: keymint_core::Timestamp,
    /// The HMAC fingerprint of the new key.
    pub fingerprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// The HMAC fingerprint of the key it replaced.
    pub old_fingerprint: String,
    /// When the old key is revoked (after the grace period), and how.
    pub revoke_old_at: keymint_core::Timestamp,
    pub old_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct List<T> {
    pub items: Vec<T>,
}

/// The policies in force (`GET /v1/policy`, `POST /v1/policy/reload`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PolicyInfo {
    /// Policy ids: the `@id` annotation, or `file:N`.
    pub policies: Vec<String>,
    /// The files they were read from.
    pub sources: Vec<String>,
}

pub mod inventory;

/// Findings of a secret scan sent to the server (`POST /v1/leaks`, admin).
/// Each finding is recorded in the audit trail; every live keymint token
/// among them is revoked at once as leaked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LeakReport {
    /// Who found them, e.g. `keymint scan`.
    pub source: String,
    pub findings: Vec<LeakedFinding>,
}

/// One finding: never the secret itself, except for a keymint token, which
/// the server needs in order to find its lease (it stores only a keyed hash).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LeakedFinding {
    /// The scanner's rule id, e.g. `openai.project-key` or `keymint.token`.
    pub rule: String,
    /// The scanner's fingerprint of the secret (an HMAC, hex).
    pub fingerprint: String,
    /// Where it was found, e.g. `src/app.py:12` or `image:layer/path:3`.
    #[serde(default)]
    pub locations: Vec<String>,
    /// Locations not sent.
    #[serde(default)]
    pub more_locations: u64,
    /// The `kmt_` token, for the keymint rule only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The secret's first characters and last four (`sk-proj-Ab3…9xQz`),
    /// to find it in a provider's key list (docs/design/0027).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// The environment the scanned tree belongs to (`keymint scan --environment`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
}

impl fmt::Debug for LeakedFinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeakedFinding")
            .field("rule", &self.rule)
            .field("fingerprint", &self.fingerprint)
            .field("locations", &self.locations)
            .field("more_locations", &self.more_locations)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("hint", &self.hint)
            .field("environment", &self.environment)
            .finish()
    }
}

/// What the server did with a [`LeakReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeaksRecorded {
    /// Findings recorded in the audit trail.
    pub recorded: u64,
    /// Leases revoked because their token leaked.
    pub revoked: Vec<String>,
    /// Leases whose leaked token had already ended (nothing to revoke).
    pub already_ended: Vec<String>,
    /// Tokens that are well-formed but that this server never issued (or
    /// whose records are gone).
    pub unknown_tokens: u64,
    /// What the leak response did for each key that is not a keymint token
    /// (docs/design/0027).
    #[serde(default)]
    pub responses: Vec<inventory::LeakResponse>,
}

impl LeaksRecorded {
    pub fn merge(&mut self, other: LeaksRecorded) {
        self.recorded += other.recorded;
        self.revoked.extend(other.revoked);
        self.already_ended.extend(other.already_ended);
        self.unknown_tokens += other.unknown_tokens;
        self.responses.extend(other.responses);
    }
}

/// RFC 7662 token introspection response, with keymint's own fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Introspection {
    pub active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// The workload the token was issued to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// The lease id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// OAuth access tokens: the resource the token is for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// RFC 9449 §6.2: the thumbprint of the DPoP key the token is bound to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
}

/// RFC 7800 confirmation of a DPoP-bound token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Confirmation {
    pub jkt: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    pub status: String,
    pub version: String,
}

/// An RFC 9457 problem document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// A stable, machine-readable code (one of [`ErrorCode`]).
    #[cfg_attr(feature = "openapi", schema(schema_with = error_code_schema))]
    pub code: String,
}

/// `Problem.code` in the OpenAPI document: one of the stable codes.
#[cfg(feature = "openapi")]
fn error_code_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(ErrorCode::ALL.iter().map(|c| c.as_str())))
        .description(Some(
            "a stable, machine-readable code; its meaning never changes",
        ))
        .build()
}

/// Stable error codes. Their strings never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidJson,
    InvalidRequest,
    UnsupportedMediaType,
    PayloadTooLarge,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    TtlExceedsLimit,
    ScopeNotGranted,
    TaskNotActive,
    LeaseNotActive,
    PolicyDenied,
    ApprovalRequired,
    Internal,
    Unavailable,
    /// The provider that mints a credential (a database, a CA) cannot be
    /// reached or failed; the detail is in the server log only.
    ProviderUnavailable,
    /// The provider refused to mint the credential; the detail is in the
    /// server log only.
    IssuanceFailed,
    /// The request conflicts with work already under way (a second
    /// rotation while one is pending); asking again later may succeed.
    Conflict,
}

impl ErrorCode {
    /// Every code, in the order of the enum.
    pub const ALL: [Self; 19] = [
        Self::InvalidJson,
        Self::InvalidRequest,
        Self::UnsupportedMediaType,
        Self::PayloadTooLarge,
        Self::Unauthorized,
        Self::Forbidden,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::TtlExceedsLimit,
        Self::ScopeNotGranted,
        Self::TaskNotActive,
        Self::LeaseNotActive,
        Self::PolicyDenied,
        Self::ApprovalRequired,
        Self::Internal,
        Self::Unavailable,
        Self::ProviderUnavailable,
        Self::IssuanceFailed,
        Self::Conflict,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidRequest => "invalid_request",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::PayloadTooLarge => "payload_too_large",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::TtlExceedsLimit => "ttl_exceeds_limit",
            Self::ScopeNotGranted => "scope_not_granted",
            Self::TaskNotActive => "task_not_active",
            Self::LeaseNotActive => "lease_not_active",
            Self::PolicyDenied => "policy_denied",
            Self::ApprovalRequired => "approval_required",
            Self::Internal => "internal",
            Self::Unavailable => "unavailable",
            Self::ProviderUnavailable => "provider_unavailable",
            Self::IssuanceFailed => "issuance_failed",
            Self::Conflict => "conflict",
        }
    }

    pub const fn status(self) -> u16 {
        match self {
            Self::InvalidJson | Self::InvalidRequest | Self::TtlExceedsLimit => 400,
            Self::Unauthorized => 401,
            Self::Forbidden
            | Self::ScopeNotGranted
            | Self::PolicyDenied
            | Self::ApprovalRequired => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::TaskNotActive | Self::LeaseNotActive | Self::Conflict => 409,
            Self::PayloadTooLarge => 413,
            Self::UnsupportedMediaType => 415,
            Self::Internal => 500,
            Self::IssuanceFailed => 502,
            Self::Unavailable | Self::ProviderUnavailable => 503,
        }
    }

    pub const fn title(self) -> &'static str {
        match self {
            Self::InvalidJson => "malformed JSON",
            Self::InvalidRequest => "invalid request",
            Self::UnsupportedMediaType => "unsupported media type",
            Self::PayloadTooLarge => "request body too large",
            Self::Unauthorized => "authentication required",
            Self::Forbidden => "not allowed",
            Self::NotFound => "not found",
            Self::MethodNotAllowed => "method not allowed",
            Self::TtlExceedsLimit => "ttl exceeds limit",
            Self::ScopeNotGranted => "scope not granted",
            Self::TaskNotActive => "task not active",
            Self::LeaseNotActive => "lease not active",
            Self::PolicyDenied => "denied by policy",
            Self::ApprovalRequired => "human approval required",
            Self::Internal => "internal error",
            Self::Unavailable => "temporarily unavailable",
            Self::ProviderUnavailable => "credential provider unavailable",
            Self::IssuanceFailed => "credential provider refused",
            Self::Conflict => "conflict with work under way",
        }
    }

    pub fn problem(self, detail: impl Into<String>) -> Problem {
        Problem {
            kind: format!("urn:keymint:error:{}", self.as_str()),
            title: self.title().to_owned(),
            status: self.status(),
            detail: detail.into(),
            code: self.as_str().to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_code_all_lists_every_code_once_in_order() {
        let mut seen = std::collections::HashSet::new();
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(*code as usize, i);
            assert!(seen.insert(code.as_str()));
        }
        assert_eq!(ErrorCode::Conflict as usize + 1, ErrorCode::ALL.len());
    }
}
