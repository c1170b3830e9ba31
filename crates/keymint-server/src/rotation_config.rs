//! `[[rotations]]`: how the upstream keys keymint holds are rotated
//! (docs/design/0035-key-rotation.md).
//!
//! ```toml
//! [[rotations]]
//! upstream = "openrouter"       # the [[upstreams]] entry whose key is rotated
//! provider = "openrouter"       # openrouter | openai | anthropic | manual
//! admin_key = "openrouter-mgmt" # the [[upstreams]] entry holding the admin key
//! rotate_every = "30d"          # on a schedule; absent: on demand only
//! grace = "60s"                 # the old key lives this long after the switch
//! project = "proj_abc"          # openai: the project the new key is made in
//! ```
//!
//! An upstream without an entry is rotated on demand with a key the
//! operator supplies (`keymint upstream rotate NAME --key-file F`), checked
//! by its kind, and its old key is revoked by hand.

use keymint_core::duration::parse_secs;
use keymint_core::role::UpstreamKind;
use keymint_proxy::config::Upstream;
use serde::Deserialize;

use crate::config::ConfigError;

/// The default time between the switch and the revocation of the old key.
pub const DEFAULT_GRACE_SECS: u64 = 60;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRotation {
    upstream: String,
    provider: String,
    admin_key: Option<String>,
    rotate_every: Option<String>,
    grace: Option<String>,
    project: Option<String>,
}

/// Who can make a new key, and how the old one is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationProvider {
    /// Creates keys (`POST /keys`), deletes the old (`DELETE /keys/{hash}`).
    OpenRouter,
    /// Creates a project service account with its key, deletes the old key
    /// (and the account keymint made for it).
    OpenAi,
    /// Cannot create keys by API: the operator supplies the new key; the
    /// old one is set `inactive` through the Admin API.
    Anthropic,
    /// No admin API: the operator supplies the new key and revokes the old
    /// one in the provider's console.
    Manual,
}

impl RotationProvider {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "openrouter" => Some(Self::OpenRouter),
            "openai" => Some(Self::OpenAi),
            "anthropic" => Some(Self::Anthropic),
            "manual" => Some(Self::Manual),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::OpenRouter => "openrouter",
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
            Self::Manual => "manual",
        }
    }

    /// Whether keymint makes the new key itself.
    pub const fn creates_keys(self) -> bool {
        matches!(self, Self::OpenRouter | Self::OpenAi)
    }
}

/// One upstream's rotation, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationConfig {
    pub upstream: String,
    pub provider: RotationProvider,
    /// The `[[upstreams]]` entry holding the provider's admin key.
    pub admin_key: Option<String>,
    /// `None`: on demand only.
    pub rotate_every_secs: Option<u64>,
    pub grace_secs: u64,
    /// OpenAI: the project new keys are made in.
    pub project: Option<String>,
}

fn secs(upstream: &str, field: &str, v: &str) -> Result<u64, ConfigError> {
    parse_secs(v)
        .map_err(|e| ConfigError::Invalid(format!("`rotations` ({upstream}): `{field}`: {e}")))
}

pub(crate) fn rotation_config(
    raw: Vec<RawRotation>,
    upstreams: &[Upstream],
) -> Result<Vec<RotationConfig>, ConfigError> {
    let mut out: Vec<RotationConfig> = Vec::with_capacity(raw.len());
    for r in raw {
        let n = r.upstream.as_str();
        let invalid = |m: String| ConfigError::Invalid(format!("`rotations` ({n}): {m}"));
        let Some(up) = upstreams.iter().find(|u| u.name == n) else {
            return Err(ConfigError::Invalid(format!(
                "`rotations`: no upstream is named `{n}`"
            )));
        };
        if up.federation.is_some() {
            return Err(invalid(
                "the upstream authenticates by federation and holds no key to rotate".into(),
            ));
        }
        if out.iter().any(|o| o.upstream == n) {
            return Err(invalid("the upstream is listed twice".into()));
        }
        let provider = RotationProvider::parse(&r.provider).ok_or_else(|| {
            invalid(format!(
                "provider `{}` must be openrouter, openai, anthropic or manual",
                r.provider
            ))
        })?;
        let needs_admin = provider != RotationProvider::Manual;
        match (&r.admin_key, needs_admin) {
            (None, true) => {
                return Err(invalid(format!(
                    "a {} rotation needs `admin_key`, the upstream holding the provider's admin key",
                    provider.as_str()
                )));
            }
            (Some(_), false) => {
                return Err(invalid(
                    "a manual rotation uses no admin key; remove `admin_key`".into(),
                ));
            }
            (Some(a), true) => {
                if a == n {
                    return Err(invalid(
                        "`admin_key` must be another upstream than the one rotated".into(),
                    ));
                }
                if !upstreams.iter().any(|u| &u.name == a) {
                    return Err(invalid(format!("no upstream is named `{a}`")));
                }
            }
            (None, false) => {}
        }
        let speaks = match provider {
            RotationProvider::Anthropic => Some(UpstreamKind::Anthropic),
            RotationProvider::OpenAi | RotationProvider::OpenRouter => Some(UpstreamKind::Openai),
            RotationProvider::Manual => None,
        };
        if let Some(k) = speaks
            && up.kind != k
        {
            return Err(invalid(format!(
                "`{}` keys are used by a `kind = \"{}\"` upstream",
                provider.as_str(),
                k.as_str()
            )));
        }
        let project = match (provider, r.project) {
            (RotationProvider::OpenAi, None) => {
                return Err(invalid(
                    "an openai rotation needs `project`, where the new key is made".into(),
                ));
            }
            (RotationProvider::OpenAi, Some(p)) => {
                if p.is_empty()
                    || p.len() > 128
                    || !p
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    return Err(invalid("`project` is not a project id".into()));
                }
                Some(p)
            }
            (_, Some(_)) => return Err(invalid("`project` is for openai rotations".into())),
            (_, None) => None,
        };
        let rotate_every_secs = match r.rotate_every.as_deref() {
            None => None,
            Some(v) => {
                let s = secs(n, "rotate_every", v)?;
                if s == 0 {
                    return Err(invalid("`rotate_every` must be at least 1s".into()));
                }
                if s > 10 * 365 * 86_400 {
                    return Err(invalid("`rotate_every` must be at most 10 years".into()));
                }
                Some(s)
            }
        };
        let grace_secs = match r.grace.as_deref() {
            None => DEFAULT_GRACE_SECS,
            Some(v) => secs(n, "grace", v)?,
        };
        let min = keymint_proxy::keys::MIN_SWITCH_GRACE.as_secs();
        if grace_secs < min {
            return Err(invalid(format!(
                "`grace` must be at least {min}s (every replica takes the new key within a second)"
            )));
        }
        if grace_secs > 7 * 86_400 {
            return Err(invalid("`grace` must be at most 7 days".into()));
        }
        out.push(RotationConfig {
            upstream: r.upstream,
            provider,
            admin_key: r.admin_key,
            rotate_every_secs,
            grace_secs,
            project,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ups() -> Vec<Upstream> {
        let raw = |name: &str, kind| keymint_proxy::config::RawUpstream {
            name: name.into(),
            kind,
            base_url: "http://127.0.0.1:9/v1".into(),
            key_header: None,
            key_prefix: None,
            key_query: None,
            timeout: None,
            dangerous_plaintext: false,
            forward_headers: vec![],
            federation: None,
        };
        [
            raw("or", UpstreamKind::Openai),
            raw("or-mgmt", UpstreamKind::Openai),
            raw("claude", UpstreamKind::Anthropic),
        ]
        .into_iter()
        .map(|r| keymint_proxy::config::validate_upstream(r, |_| Ok(300)).unwrap())
        .collect()
    }

    fn parse(toml_src: &str) -> Result<Vec<RotationConfig>, String> {
        #[derive(Deserialize)]
        struct W {
            rotations: Vec<RawRotation>,
        }
        let w: W = toml::from_str(toml_src).map_err(|e| e.to_string())?;
        rotation_config(w.rotations, &ups()).map_err(|e| e.to_string())
    }

    #[test]
    fn a_rotation_is_checked_against_its_upstreams() {
        let ok = parse(
            r#"[[rotations]]
upstream = "or"
provider = "openrouter"
admin_key = "or-mgmt"
rotate_every = "30d"
grace = "5s""#,
        )
        .unwrap();
        assert_eq!(ok[0].rotate_every_secs, Some(30 * 86_400));
        assert_eq!(ok[0].grace_secs, 5);
        assert!(ok[0].provider.creates_keys());
        let manual = parse("[[rotations]]\nupstream = \"claude\"\nprovider = \"manual\"").unwrap();
        assert_eq!(manual[0].grace_secs, DEFAULT_GRACE_SECS);
        assert_eq!(manual[0].rotate_every_secs, None);
        for (src, needle) in [
            ("upstream = \"nope\"\nprovider = \"manual\"", "no upstream"),
            (
                "upstream = \"or\"\nprovider = \"aws\"",
                "must be openrouter",
            ),
            (
                "upstream = \"or\"\nprovider = \"openrouter\"",
                "needs `admin_key`",
            ),
            (
                "upstream = \"or\"\nprovider = \"openrouter\"\nadmin_key = \"or\"",
                "another upstream",
            ),
            (
                "upstream = \"or\"\nprovider = \"openrouter\"\nadmin_key = \"x\"",
                "no upstream is named",
            ),
            (
                "upstream = \"or\"\nprovider = \"openai\"\nadmin_key = \"or-mgmt\"",
                "needs `project`",
            ),
            (
                "upstream = \"or\"\nprovider = \"openai\"\nadmin_key = \"or-mgmt\"\nproject = \"a/b\"",
                "not a project id",
            ),
            (
                "upstream = \"claude\"\nprovider = \"openrouter\"\nadmin_key = \"or-mgmt\"",
                r#"kind = "openai""#,
            ),
            (
                "upstream = \"or\"\nprovider = \"manual\"\ngrace = \"1s\"",
                "at least 3s",
            ),
            (
                "upstream = \"or\"\nprovider = \"manual\"\nrotate_every = \"0s\"",
                "at least 1s",
            ),
            (
                "upstream = \"or\"\nprovider = \"manual\"\nadmin_key = \"or-mgmt\"",
                "no admin key",
            ),
            (
                "upstream = \"or\"\nprovider = \"manual\"\nsecret = \"x\"",
                "unknown field",
            ),
        ] {
            let e = parse(&format!("[[rotations]]\n{src}")).unwrap_err();
            assert!(e.contains(needle), "{src}: {e}");
        }
        let twice = "[[rotations]]\nupstream = \"or\"\nprovider = \"manual\"\n\
                     [[rotations]]\nupstream = \"or\"\nprovider = \"manual\"";
        assert!(parse(twice).unwrap_err().contains("twice"));
    }
}
