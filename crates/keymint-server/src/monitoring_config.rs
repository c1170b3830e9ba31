//! `[monitoring]`: misuse monitoring's rules, the GeoIP database, the
//! proxies whose `X-Forwarded-For` is believed, and where alerts go
//! (docs/design/0033-misuse-monitoring.md). Checked at load; a rule that
//! cannot be meant exactly one way is refused with the field named.
//!
//! ```toml
//! [monitoring]
//! geoip_db = "/etc/keymint/GeoLite2-Country.mmdb"  # for `new_country`
//! trusted_proxies = ["10.0.0.0/8"]  # their X-Forwarded-For is believed
//! webhook = "https://hooks.example/keymint"  # default: [approvals] webhook
//!
//! [[monitoring.rules]]
//! name = "spend-spike"
//! kind = "baseline"      # limit | baseline | new_country
//! scope = "workload"     # upstream | workload | task
//! metric = "spend_usd"   # requests | tokens | spend_usd
//! window = "1h"          # the figure: the last hour
//! factor = 3.0           # fires above 3 x the trailing average per window
//! baseline = "24h"       # the trailing period (whole hours before the window)
//! min_baseline = 1.0     # ... which must hold at least this much
//! action = "suspend_task" # alert | suspend_task | suspend_workload | suspend_upstream
//! ```

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keymint_core::duration::parse_secs;
use keymint_core::monitor::Scope;
use serde::Deserialize;

use crate::config::ConfigError;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMonitoring {
    geoip_db: Option<PathBuf>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    webhook: Option<String>,
    #[serde(default)]
    rules: Vec<RawRule>,
    usage_retention: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    kind: String,
    scope: Option<String>,
    metric: Option<String>,
    window: Option<String>,
    limit: Option<f64>,
    factor: Option<f64>,
    baseline: Option<String>,
    min_baseline: Option<f64>,
    action: Option<String>,
}

/// What a rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Requests,
    /// Input plus output tokens.
    Tokens,
    /// Spend, kept in nano-dollars.
    Spend,
}

impl Metric {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
            Self::Spend => "spend_usd",
        }
    }

    /// A configured amount in this metric's stored unit.
    fn units(self, v: f64) -> u64 {
        match self {
            Self::Spend => (v * 1e9).round() as u64,
            Self::Requests | Self::Tokens => v.round() as u64,
        }
    }

    /// A stored amount as shown (dollars for spend).
    pub fn shown(self, v: f64) -> f64 {
        match self {
            Self::Spend => v / 1e9,
            Self::Requests | Self::Tokens => v,
        }
    }
}

/// What a rule looks for.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleKind {
    /// More than `limit` (stored units) within `window_secs`.
    Limit {
        metric: Metric,
        window_secs: u64,
        limit: u64,
    },
    /// More than `factor` times the average per window over the trailing
    /// `baseline_secs` (whole hours before the window), once that period
    /// holds at least `min_baseline` (stored units).
    Baseline {
        metric: Metric,
        window_secs: u64,
        factor: f64,
        baseline_secs: u64,
        min_baseline: u64,
    },
    /// A workload calls from a country it has not called from before (the
    /// first country of a workload is learned, not alerted).
    NewCountry,
}

/// What a rule does when it fires: always an alert (audit event and
/// webhook), and optionally a suspension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Alert,
    /// The credentials of the task whose request tripped the rule.
    SuspendTask,
    /// Every task of that request's workload.
    SuspendWorkload,
    /// The upstream key the request used.
    SuspendUpstream,
}

impl Action {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Alert => "alert",
            Self::SuspendTask => "suspend_task",
            Self::SuspendWorkload => "suspend_workload",
            Self::SuspendUpstream => "suspend_upstream",
        }
    }
}

/// One `[[monitoring.rules]]` entry, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub scope: Scope,
    pub kind: RuleKind,
    pub action: Action,
}

impl Rule {
    /// The window the rule's figure is summed over (0 for `new_country`).
    pub const fn window_secs(&self) -> u64 {
        match self.kind {
            RuleKind::Limit { window_secs, .. } | RuleKind::Baseline { window_secs, .. } => {
                window_secs
            }
            RuleKind::NewCountry => 0,
        }
    }
    /// How far back the rule reads the stored hours (its baseline and
    /// window; 0 for the others).
    pub const fn history_secs(&self) -> u64 {
        match self.kind {
            RuleKind::Baseline {
                window_secs,
                baseline_secs,
                ..
            } => baseline_secs + window_secs,
            _ => 0,
        }
    }
}

/// An opened, checked GeoIP database (country lookups).
#[derive(Clone)]
pub struct GeoIp(Arc<maxminddb::Reader<Vec<u8>>>);

impl fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GeoIp")
    }
}

impl GeoIp {
    /// Opens and verifies a MaxMind-format database file.
    pub fn open(path: &Path) -> Result<Self, String> {
        let r = maxminddb::Reader::open_readfile(path).map_err(|e| e.to_string())?;
        r.verify().map_err(|e| e.to_string())?;
        Ok(Self(Arc::new(r)))
    }

    /// The ISO 3166-1 country code of `ip` (`country.iso_code`, or the
    /// `registered_country` when the database has no `country`).
    pub fn country(&self, ip: IpAddr) -> Option<String> {
        use maxminddb::PathElement::Key;
        let found = self.0.lookup(ip).ok()?;
        let code = found
            .decode_path::<String>(&[Key("country"), Key("iso_code")])
            .ok()
            .flatten()
            .or_else(|| {
                found
                    .decode_path::<String>(&[Key("registered_country"), Key("iso_code")])
                    .ok()
                    .flatten()
            })?;
        (code.len() == 2 && code.bytes().all(|b| b.is_ascii_alphabetic()))
            .then(|| code.to_ascii_uppercase())
    }
}

/// An address range (`10.0.0.0/8`, `2001:db8::/32`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Self> {
        let (a, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b.parse::<u8>().ok()?)),
            None => (s, None),
        };
        let net: IpAddr = a.parse().ok()?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        (bits <= max).then_some(Self { net, bits })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 @ IpAddr::V4(_) => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// `[monitoring]`, checked.
#[derive(Debug, Clone)]
pub struct MonitoringConfig {
    pub rules: Vec<Rule>,
    pub geoip: Option<GeoIp>,
    pub trusted_proxies: Vec<Cidr>,
    /// Where alerts go; `None`: the approvals webhook.
    pub webhook: Option<String>,
    /// How long the hourly usage figures and the source addresses are
    /// kept (`usage_retention`, default [`DEFAULT_USAGE_RETENTION_SECS`]).
    pub usage_retention_secs: u64,
}

/// The hourly figures and source addresses are kept 90 days by default
/// (or a rule's baseline and window, if longer).
pub const DEFAULT_USAGE_RETENTION_SECS: u64 = 90 * 86_400;

impl Default for MonitoringConfig {
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            geoip: None,
            trusted_proxies: Vec::new(),
            webhook: None,
            usage_retention_secs: DEFAULT_USAGE_RETENTION_SECS,
        }
    }
}

fn err(rule: &str, m: impl fmt::Display) -> ConfigError {
    ConfigError::Invalid(format!("`monitoring.rules` (`{rule}`): {m}"))
}

fn secs(rule: &str, field: &str, v: Option<String>) -> Result<u64, ConfigError> {
    let Some(v) = v else {
        return Err(err(rule, format!("`{field}` is required")));
    };
    parse_secs(&v).map_err(|e| err(rule, format!("`{field}`: {e}")))
}

fn amount(rule: &str, field: &str, v: Option<f64>) -> Result<f64, ConfigError> {
    match v {
        None => Err(err(rule, format!("`{field}` is required"))),
        Some(x) if !x.is_finite() || x <= 0.0 || x > 1e12 => {
            Err(err(rule, format!("`{field}` must be a positive number")))
        }
        Some(x) => Ok(x),
    }
}

fn unexpected(rule: &str, kind: &str, fields: &[(&str, bool)]) -> Result<(), ConfigError> {
    match fields.iter().find(|(_, set)| *set) {
        Some((name, _)) => Err(err(
            rule,
            format!("`{name}` has no meaning for kind `{kind}`"),
        )),
        None => Ok(()),
    }
}

fn metric(rule: &str, v: Option<&str>) -> Result<Metric, ConfigError> {
    match v {
        Some("requests") => Ok(Metric::Requests),
        Some("tokens") => Ok(Metric::Tokens),
        Some("spend_usd") => Ok(Metric::Spend),
        Some(_) => Err(err(rule, "`metric` must be requests, tokens or spend_usd")),
        None => Err(err(rule, "`metric` is required")),
    }
}

fn window(rule: &str, v: Option<String>) -> Result<u64, ConfigError> {
    let w = secs(rule, "window", v)?;
    if !(60..=86_400).contains(&w) || w % 60 != 0 {
        return Err(err(rule, "`window` must be whole minutes, from 1m to 24h"));
    }
    Ok(w)
}

fn rule(r: RawRule, geoip: bool) -> Result<Rule, ConfigError> {
    let name = r.name;
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(ConfigError::Invalid(
            "`monitoring.rules`: `name` must be 1 to 64 letters, digits, `-`, `_` or `.`".into(),
        ));
    }
    let scope = match r.scope.as_deref() {
        Some(s) => Scope::parse(s)
            .ok_or_else(|| err(&name, "`scope` must be upstream, workload or task"))?,
        None => return Err(err(&name, "`scope` is required")),
    };
    let action = match r.action.as_deref().unwrap_or("alert") {
        "alert" => Action::Alert,
        "suspend_task" => Action::SuspendTask,
        "suspend_workload" => Action::SuspendWorkload,
        "suspend_upstream" => Action::SuspendUpstream,
        _ => {
            return Err(err(
                &name,
                "`action` must be alert, suspend_task, suspend_workload or suspend_upstream",
            ));
        }
    };
    let kind = match r.kind.as_str() {
        "limit" => {
            unexpected(
                &name,
                "limit",
                &[
                    ("factor", r.factor.is_some()),
                    ("baseline", r.baseline.is_some()),
                    ("min_baseline", r.min_baseline.is_some()),
                ],
            )?;
            let metric = metric(&name, r.metric.as_deref())?;
            let window_secs = window(&name, r.window)?;
            let limit = metric.units(amount(&name, "limit", r.limit)?);
            RuleKind::Limit {
                metric,
                window_secs,
                limit,
            }
        }
        "baseline" => {
            unexpected(&name, "baseline", &[("limit", r.limit.is_some())])?;
            let metric = metric(&name, r.metric.as_deref())?;
            let window_secs = window(&name, r.window)?;
            let factor = amount(&name, "factor", r.factor)?;
            if factor <= 1.0 {
                return Err(err(&name, "`factor` must be above 1"));
            }
            let baseline_secs = secs(&name, "baseline", r.baseline)?;
            if baseline_secs < 3600
                || baseline_secs % 3600 != 0
                || baseline_secs > 90 * 86_400
                || baseline_secs < window_secs
            {
                return Err(err(
                    &name,
                    "`baseline` must be whole hours, at least 1h and the window, at most 90d",
                ));
            }
            let min_baseline = metric.units(amount(&name, "min_baseline", r.min_baseline)?);
            RuleKind::Baseline {
                metric,
                window_secs,
                factor,
                baseline_secs,
                min_baseline,
            }
        }
        "new_country" => {
            unexpected(
                &name,
                "new_country",
                &[
                    ("metric", r.metric.is_some()),
                    ("window", r.window.is_some()),
                    ("limit", r.limit.is_some()),
                    ("factor", r.factor.is_some()),
                    ("baseline", r.baseline.is_some()),
                    ("min_baseline", r.min_baseline.is_some()),
                ],
            )?;
            if scope != Scope::Workload {
                return Err(err(
                    &name,
                    "`new_country` rules have `scope = \"workload\"`",
                ));
            }
            if !geoip {
                return Err(err(
                    &name,
                    "`new_country` needs `monitoring.geoip_db`, a MaxMind-format database",
                ));
            }
            RuleKind::NewCountry
        }
        _ => {
            return Err(err(&name, "`kind` must be limit, baseline or new_country"));
        }
    };
    Ok(Rule {
        name,
        scope,
        kind,
        action,
    })
}

/// Checks `[monitoring]`; opens and verifies the GeoIP database. A path
/// that is relative is under `data_dir`.
pub(crate) fn monitoring_config(
    raw: Option<RawMonitoring>,
    data_dir: &Path,
) -> Result<MonitoringConfig, ConfigError> {
    let Some(raw) = raw else {
        return Ok(MonitoringConfig::default());
    };
    let geoip = match raw.geoip_db {
        None => None,
        Some(p) => {
            let p = if p.is_relative() { data_dir.join(p) } else { p };
            Some(GeoIp::open(&p).map_err(|e| {
                ConfigError::Invalid(format!(
                    "`monitoring.geoip_db`: cannot read `{}` as a MaxMind database: {e}",
                    p.display()
                ))
            })?)
        }
    };
    let mut trusted_proxies = Vec::new();
    for (i, t) in raw.trusted_proxies.iter().enumerate() {
        trusted_proxies.push(Cidr::parse(t).ok_or_else(|| {
            ConfigError::Invalid(format!(
                "`monitoring.trusted_proxies[{i}]` is not an address or a range (`10.0.0.0/8`)"
            ))
        })?);
    }
    let webhook = match raw.webhook {
        Some(u) if u.starts_with("https://") || u.starts_with("http://") => Some(u),
        Some(_) => {
            return Err(ConfigError::Invalid(
                "`monitoring.webhook` is not an http(s) URL".into(),
            ));
        }
        None => None,
    };
    let mut rules: Vec<Rule> = Vec::new();
    for r in raw.rules {
        let r = rule(r, geoip.is_some())?;
        if rules.iter().any(|x| x.name == r.name) {
            return Err(ConfigError::Invalid(format!(
                "`monitoring.rules`: rule `{}` is defined twice",
                r.name
            )));
        }
        rules.push(r);
    }
    if rules.len() > 100 {
        return Err(ConfigError::Invalid(
            "`monitoring.rules`: at most 100 rules".into(),
        ));
    }
    let longest = rules.iter().map(Rule::history_secs).max().unwrap_or(0);
    let usage_retention_secs = match raw.usage_retention {
        None => DEFAULT_USAGE_RETENTION_SECS.max(longest),
        Some(v) => parse_secs(&v)
            .map_err(|e| ConfigError::Invalid(format!("`monitoring.usage_retention`: {e}")))?,
    };
    if !(3_600..=3_650 * 86_400).contains(&usage_retention_secs) || usage_retention_secs < longest {
        return Err(ConfigError::Invalid(format!(
            "`monitoring.usage_retention` must be from 1h to 3650d and at least the longest \
             baseline of a rule ({longest}s)"
        )));
    }
    Ok(MonitoringConfig {
        rules,
        geoip,
        trusted_proxies,
        webhook,
        usage_retention_secs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_hold_what_they_say() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.200.3.4".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.1.1".parse().unwrap()));
        let one = Cidr::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:1::1".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/", "::/129", ""] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }
}
