//! `[inventory]`: the limits the inventory's findings are judged against,
//! how often they are evaluated, where they are announced, and the leak
//! response per provider (docs/design/0027-inventory-and-leak-response.md).
//!
//! ```toml
//! [inventory]
//! max_age = "90d"          # older: `too_old`
//! unused_after = "30d"     # not used for longer: `unused`
//! rotation_warning = "7d"  # `rotation_due` this long before the date
//! evaluate_every = "5m"    # the duty loop; `0` turns it off
//! webhook = "https://hooks.example/keymint"  # default: [approvals] webhook
//!
//! [[inventory.responses]]
//! provider = "openai"      # openai | anthropic | openrouter
//! action = "revoke"        # revoke | suspend | alert
//! admin_key = "openai-admin"   # the [[upstreams]] entry holding the admin key
//! projects = ["proj_abc"]  # openai: the projects whose keys are searched
//! ```

use keymint_core::duration::parse_secs;
use keymint_core::inventory::FindingLimits;
use serde::Deserialize;

use keymint_proxy::config::Upstream;

use crate::config::ConfigError;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawInventory {
    max_age: Option<String>,
    unused_after: Option<String>,
    rotation_warning: Option<String>,
    evaluate_every: Option<String>,
    webhook: Option<String>,
    #[serde(default)]
    responses: Vec<RawResponse>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResponse {
    provider: String,
    action: String,
    admin_key: Option<String>,
    #[serde(default)]
    projects: Vec<String>,
}

/// A provider whose keys keymint can act on through its admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeakProvider {
    OpenAi,
    Anthropic,
    OpenRouter,
}

impl LeakProvider {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "openai" => Some(Self::OpenAi),
            "anthropic" => Some(Self::Anthropic),
            "openrouter" => Some(Self::OpenRouter),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
            Self::OpenRouter => "openrouter",
        }
    }
}

/// What to do when a provider's key is found leaked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeakAction {
    /// Delete the key (OpenAI, OpenRouter) or, where the provider cannot
    /// delete through its API (Anthropic), make it `inactive`.
    Revoke,
    /// Disable it, reversibly (OpenRouter `disabled`, Anthropic `inactive`;
    /// OpenAI has no disable, so its keys are deleted).
    Suspend,
    /// Only announce it, with its revocation path.
    Alert,
}

/// The leak response for one provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakResponseConfig {
    pub provider: LeakProvider,
    pub action: LeakAction,
    /// The `[[upstreams]]` entry with the admin key (and the API's base URL).
    pub admin_key: Option<String>,
    /// OpenAI: the projects whose keys are searched.
    pub projects: Vec<String>,
}

/// `[inventory]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryConfig {
    pub limits: FindingLimits,
    /// How often the duty loop evaluates the findings; `None`: never.
    pub evaluate_every_secs: Option<u64>,
    /// Where new findings are announced; `None`: the approvals webhook.
    pub webhook: Option<String>,
    pub responses: Vec<LeakResponseConfig>,
}

impl Default for InventoryConfig {
    fn default() -> Self {
        Self {
            limits: FindingLimits::default(),
            evaluate_every_secs: Some(300),
            webhook: None,
            responses: Vec::new(),
        }
    }
}

impl LeakResponseConfig {
    /// Whether the response deletes the key (so a key no longer listed
    /// was deleted already).
    pub fn deletes(&self) -> bool {
        match self.provider {
            LeakProvider::OpenAi => self.action != LeakAction::Alert,
            LeakProvider::OpenRouter => self.action == LeakAction::Revoke,
            LeakProvider::Anthropic => false,
        }
    }
}

impl InventoryConfig {
    /// The response configured for `provider`.
    pub fn response(&self, provider: &str) -> Option<&LeakResponseConfig> {
        let p = LeakProvider::parse(provider)?;
        self.responses.iter().find(|r| r.provider == p)
    }
}

fn ms(field: &str, v: Option<String>, default: Option<i64>) -> Result<Option<i64>, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => {
            let secs = parse_secs(&s)
                .map_err(|e| ConfigError::Invalid(format!("`inventory.{field}`: {e}")))?;
            if secs > 10 * 365 * 86_400 {
                return Err(ConfigError::Invalid(format!(
                    "`inventory.{field}` must be at most 10 years"
                )));
            }
            Ok((secs > 0).then(|| i64::try_from(secs).unwrap_or(i64::MAX).saturating_mul(1000)))
        }
    }
}

pub(crate) fn inventory_config(
    raw: Option<RawInventory>,
    upstreams: &[Upstream],
) -> Result<InventoryConfig, ConfigError> {
    let Some(raw) = raw else {
        return Ok(InventoryConfig::default());
    };
    let d = FindingLimits::default();
    let limits = FindingLimits {
        max_age_ms: ms("max_age", raw.max_age, d.max_age_ms)?,
        unused_ms: ms("unused_after", raw.unused_after, d.unused_ms)?,
        rotation_warning_ms: ms(
            "rotation_warning",
            raw.rotation_warning,
            Some(d.rotation_warning_ms),
        )?
        .unwrap_or(0),
    };
    let evaluate_every_secs = match raw.evaluate_every {
        None => Some(300),
        Some(s) => {
            let secs = parse_secs(&s)
                .map_err(|e| ConfigError::Invalid(format!("`inventory.evaluate_every`: {e}")))?;
            (secs > 0).then_some(secs.max(1))
        }
    };
    let webhook = match raw.webhook {
        Some(u) if u.starts_with("https://") || u.starts_with("http://") => Some(u),
        Some(_) => {
            return Err(ConfigError::Invalid(
                "`inventory.webhook` is not an http(s) URL".into(),
            ));
        }
        None => None,
    };
    let mut responses: Vec<LeakResponseConfig> = Vec::new();
    for r in raw.responses {
        let provider = LeakProvider::parse(&r.provider).ok_or_else(|| {
            ConfigError::Invalid(format!(
                "`inventory.responses`: provider `{}` must be openai, anthropic or openrouter",
                r.provider
            ))
        })?;
        let action = match r.action.as_str() {
            "revoke" => LeakAction::Revoke,
            "suspend" => LeakAction::Suspend,
            "alert" => LeakAction::Alert,
            other => {
                return Err(ConfigError::Invalid(format!(
                    "`inventory.responses` ({}): action `{other}` must be revoke, suspend or alert",
                    provider.as_str()
                )));
            }
        };
        if responses.iter().any(|x| x.provider == provider) {
            return Err(ConfigError::Invalid(format!(
                "`inventory.responses`: provider `{}` is listed twice",
                provider.as_str()
            )));
        }
        if action != LeakAction::Alert {
            let Some(name) = &r.admin_key else {
                return Err(ConfigError::Invalid(format!(
                    "`inventory.responses` ({}): `{}` needs `admin_key`, the upstream holding the provider's admin key",
                    provider.as_str(),
                    r.action
                )));
            };
            if !upstreams.iter().any(|u| &u.name == name) {
                return Err(ConfigError::Invalid(format!(
                    "`inventory.responses` ({}): no upstream is named `{name}`",
                    provider.as_str()
                )));
            }
            if provider == LeakProvider::OpenAi && r.projects.is_empty() {
                return Err(ConfigError::Invalid(
                    "`inventory.responses` (openai): `projects` must name the projects to search"
                        .into(),
                ));
            }
        }
        if r.projects.iter().any(|p| {
            p.is_empty()
                || p.len() > 128
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        }) {
            return Err(ConfigError::Invalid(
                "`inventory.responses`: a project id must be 1-128 of A-Z, a-z, 0-9, `_`, `-`"
                    .into(),
            ));
        }
        responses.push(LeakResponseConfig {
            provider,
            action,
            admin_key: r.admin_key,
            projects: r.projects,
        });
    }
    Ok(InventoryConfig {
        limits,
        evaluate_every_secs,
        webhook,
        responses,
    })
}
