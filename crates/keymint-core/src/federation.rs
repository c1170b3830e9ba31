//! Provider federation settings (docs/design/0028-provider-federation.md):
//! how keymint trades a JWT it signs for a provider's short-lived access
//! token. Used by `federated` roles (`[roles.federated]`, a token per lease
//! for the task's workload) and by egress-proxy upstreams without a static
//! key (`[upstreams.federation]`, a token keymint keeps for itself).
//!
//! Each provider documents its own exchange:
//!
//! - OpenAI: RFC 8693 token exchange, JSON, at
//!   `https://auth.openai.com/oauth/token` with `identity_provider_id` and
//!   `service_account_id`;
//! - Anthropic: RFC 7523 `jwt-bearer`, JSON, at `/v1/oauth/token` with
//!   `federation_rule_id`, `organization_id`, `service_account_id` and
//!   optionally `workspace_id`;
//! - OpenRouter: RFC 8693, form-encoded, at `/api/v1/oauth/token` with
//!   `federation_policy_id`; tokens live 15 minutes at most.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::role::SigningAlg;

/// A provider keymint can federate with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FederatedProvider {
    Openai,
    Anthropic,
    Openrouter,
}

impl FederatedProvider {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Anthropic => "anthropic",
            Self::Openrouter => "openrouter",
        }
    }

    /// The provider's documented token endpoint.
    pub const fn default_token_url(self) -> &'static str {
        match self {
            Self::Openai => "https://auth.openai.com/oauth/token",
            Self::Anthropic => "https://api.anthropic.com/v1/oauth/token",
            Self::Openrouter => "https://openrouter.ai/api/v1/oauth/token",
        }
    }

    /// The API base the provider's SDK takes (`OPENAI_BASE_URL`,
    /// `ANTHROPIC_BASE_URL`).
    pub const fn default_api_base_url(self) -> &'static str {
        match self {
            Self::Openai => "https://api.openai.com/v1",
            Self::Anthropic => "https://api.anthropic.com",
            Self::Openrouter => "https://openrouter.ai/api/v1",
        }
    }
}

impl fmt::Display for FederatedProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn default_rs256() -> SigningAlg {
    SigningAlg::RS256
}

/// How to exchange keymint's JWT at one provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Federation {
    pub provider: FederatedProvider,
    /// `aud` of the JWT: what the provider's trust configuration expects.
    pub audience: String,
    #[serde(default = "default_rs256")]
    pub algorithm: SigningAlg,
    /// The token endpoint (default: the provider's documented one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    /// The API the token is used against (default: the provider's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_base_url: Option<String>,
    /// OpenAI: the Workload Identity Provider configured for keymint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_provider_id: Option<String>,
    /// OpenAI (`svc_acct_…`) and Anthropic (`svac_…`): the service account
    /// the token acts as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_id: Option<String>,
    /// Anthropic: the federation rule (`fdrl_…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation_rule_id: Option<String>,
    /// Anthropic: the organisation (a UUID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization_id: Option<String>,
    /// Anthropic: the workspace (`wrkspc_…` or `default`), when the rule
    /// names several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<String>,
    /// OpenRouter: the federation policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation_policy_id: Option<String>,
    /// Upstreams only: `sub` of the JWT keymint signs for itself (default
    /// `keymint-proxy/<upstream>`). Roles use the task's workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Seconds to wait for the token endpoint (default 10, at most 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// Seconds to wait for a token endpoint when nothing is configured.
pub const DEFAULT_EXCHANGE_TIMEOUT_SECS: u64 = 10;

/// Whether `s` can be a provider id: 1-128 of ASCII letters, digits, `_`,
/// `-` (it goes into a request body, and is shown in messages).
fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn url_ok(u: &str) -> bool {
    let rest = if let Some(r) = u.strip_prefix("https://") {
        r
    } else if let Some(r) = u.strip_prefix("http://") {
        // Plain http only to this machine (the token crosses it).
        let host = r.split(['/', ':']).next().unwrap_or("");
        if !(host == "localhost" || host == "127.0.0.1" || r.starts_with("[::1]")) {
            return false;
        }
        r
    } else {
        return false;
    };
    !rest.is_empty()
        && u.len() <= 2048
        && !rest.contains('@')
        && !rest.contains('?')
        && u.chars().all(|c| c.is_ascii_graphic())
}

impl Federation {
    pub fn token_url(&self) -> &str {
        self.token_url
            .as_deref()
            .unwrap_or(self.provider.default_token_url())
    }

    /// The API base, without a trailing `/`.
    pub fn api_base_url(&self) -> &str {
        self.api_base_url
            .as_deref()
            .unwrap_or(self.provider.default_api_base_url())
            .trim_end_matches('/')
    }

    pub fn timeout_secs(&self) -> u64 {
        self.timeout_secs.unwrap_or(DEFAULT_EXCHANGE_TIMEOUT_SECS)
    }

    /// Checks what the configuration gave; messages name the key, never
    /// repeat its value.
    pub fn validate(&self) -> Result<(), String> {
        if !crate::role::valid_claim_value(&self.audience) {
            return Err("`audience` must be 1-256 bytes without control characters".into());
        }
        for (k, v) in [
            ("token_url", &self.token_url),
            ("api_base_url", &self.api_base_url),
        ] {
            if let Some(u) = v
                && !url_ok(u)
            {
                return Err(format!(
                    "`{k}` must be an https:// URL without credentials or query (http:// only to loopback)"
                ));
            }
        }
        let ids = [
            ("identity_provider_id", &self.identity_provider_id),
            ("service_account_id", &self.service_account_id),
            ("federation_rule_id", &self.federation_rule_id),
            ("organization_id", &self.organization_id),
            ("workspace_id", &self.workspace_id),
            ("federation_policy_id", &self.federation_policy_id),
        ];
        for (k, v) in ids {
            if let Some(v) = v
                && !valid_id(v)
            {
                return Err(format!("`{k}` must be 1-128 of A-Z, a-z, 0-9, `_`, `-`"));
            }
        }
        let (needed, foreign): (&[&str], &[&str]) = match self.provider {
            FederatedProvider::Openai => (
                &["identity_provider_id", "service_account_id"],
                &[
                    "federation_rule_id",
                    "organization_id",
                    "workspace_id",
                    "federation_policy_id",
                ],
            ),
            FederatedProvider::Anthropic => (
                &[
                    "federation_rule_id",
                    "organization_id",
                    "service_account_id",
                ],
                &["identity_provider_id", "federation_policy_id"],
            ),
            FederatedProvider::Openrouter => (
                &["federation_policy_id"],
                &[
                    "identity_provider_id",
                    "service_account_id",
                    "federation_rule_id",
                    "organization_id",
                    "workspace_id",
                ],
            ),
        };
        let set = |k: &str| ids.iter().any(|(n, v)| *n == k && v.is_some());
        if let Some(k) = needed.iter().find(|k| !set(k)) {
            return Err(format!("`{k}` is required for {}", self.provider));
        }
        if let Some(k) = foreign.iter().find(|k| set(k)) {
            return Err(format!("`{k}` does not apply to {}", self.provider));
        }
        if let Some(s) = &self.subject
            && !crate::role::valid_claim_value(s)
        {
            return Err("`subject` must be 1-256 bytes without control characters".into());
        }
        if self.timeout_secs.is_some_and(|t| t == 0 || t > 60) {
            return Err("`timeout_secs` must be between 1 and 60".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn anthropic() -> Federation {
        Federation {
            provider: FederatedProvider::Anthropic,
            audience: "https://api.anthropic.com".into(),
            algorithm: SigningAlg::RS256,
            token_url: None,
            api_base_url: None,
            identity_provider_id: None,
            service_account_id: Some("svac_01".into()),
            federation_rule_id: Some("fdrl_01".into()),
            organization_id: Some("00000000-0000-0000-0000-000000000000".into()),
            workspace_id: None,
            federation_policy_id: None,
            subject: None,
            timeout_secs: None,
        }
    }

    #[test]
    fn each_provider_needs_its_own_ids_and_no_others() {
        let a = anthropic();
        a.validate().unwrap();
        assert_eq!(a.token_url(), "https://api.anthropic.com/v1/oauth/token");
        assert_eq!(a.api_base_url(), "https://api.anthropic.com");
        let mut b = a.clone();
        b.organization_id = None;
        assert!(b.validate().unwrap_err().contains("organization_id"));
        let mut b = a.clone();
        b.federation_policy_id = Some("p".into());
        assert!(b.validate().unwrap_err().contains("does not apply"));
        let mut b = a.clone();
        b.service_account_id = Some("svac\"; drop".into());
        let e = b.validate().unwrap_err();
        assert!(!e.contains("drop"), "{e}");
        for bad in [
            "http://example.com/token",
            "https://user:pw@example.com/",
            "ftp://x",
            "https://x/?a=b",
        ] {
            let mut b = a.clone();
            b.token_url = Some(bad.into());
            let e = b.validate().unwrap_err();
            assert!(!e.contains(bad), "{e}");
        }
        let mut b = a.clone();
        b.token_url = Some("http://127.0.0.1:9000/v1/oauth/token".into());
        b.validate().unwrap();
        let mut b = a;
        b.timeout_secs = Some(0);
        assert!(b.validate().is_err());
    }
}
