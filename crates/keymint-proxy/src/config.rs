//! Upstreams, the proxy part of roles, and prices, as they appear in the
//! configuration file. `keymint-server`'s configuration embeds these raw
//! shapes and calls the validators here, so that a bad upstream or policy
//! fails at load with a message that names the key.

use std::collections::BTreeMap;

use http::HeaderName;
use serde::{Deserialize, Serialize};

pub use keymint_core::role::{
    ProxyPolicy as Policy, SecretAction, UpstreamKind, pattern_matches, usd_to_nusd,
};

/// `[[upstreams]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub name: String,
    pub kind: UpstreamKind,
    /// Where requests go: `https://api.openai.com/v1`, `https://api.anthropic.com`.
    /// The path after `/proxy/<name>/` is appended to it.
    pub base_url: String,
    /// The header that carries the key (default: `Authorization` with
    /// `Bearer ` for openai, `x-api-key` for anthropic; `api-key` for Azure).
    #[serde(default)]
    pub key_header: Option<String>,
    /// Written before the key in `key_header` (e.g. `Bearer `).
    #[serde(default)]
    pub key_prefix: Option<String>,
    /// For http upstreams that take the key as a query parameter.
    #[serde(default)]
    pub key_query: Option<String>,
    /// How long to wait for the upstream's response headers, and between
    /// two chunks of a response (default `300s`).
    #[serde(default)]
    pub timeout: Option<String>,
    /// Allow `http://` to a host that is not loopback (the key would cross
    /// the network in plain text).
    #[serde(default)]
    pub dangerous_plaintext: bool,
    /// Client request headers to forward besides those the upstream's
    /// kind needs (for http upstreams: `X-GitHub-Api-Version`, …). Each
    /// forwarded value is screened for secrets like a body.
    #[serde(default)]
    pub forward_headers: Vec<String>,
    /// No static key: keymint signs a JWT for itself and exchanges it at
    /// the provider for a short-lived token it refreshes
    /// (docs/design/0028-provider-federation.md).
    #[serde(default)]
    pub federation: Option<keymint_core::role::Federation>,
}

/// Where the upstream key goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPlacement {
    Header { name: HeaderName, prefix: String },
    Query { name: String },
}

/// A validated upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub kind: UpstreamKind,
    /// `https` or `http`.
    pub scheme: String,
    /// `host[:port]`.
    pub authority: String,
    /// The base path without a trailing `/` (may be empty).
    pub base_path: String,
    pub key: KeyPlacement,
    pub timeout_secs: u64,
    /// Client headers forwarded on top of the kind's own list.
    pub forward_headers: Vec<HeaderName>,
    /// Set when the upstream takes a federated token instead of a key.
    pub federation: Option<keymint_core::role::Federation>,
}

impl Upstream {
    /// The base URL as configured (never holds a secret).
    pub fn base_url(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Checks an upstream. `parse_secs` parses human durations (`300s`).
pub fn validate_upstream(
    r: RawUpstream,
    parse_secs: impl Fn(&str) -> Result<u64, String>,
) -> Result<Upstream, String> {
    let n = &r.name;
    if !keymint_core::model::valid_name(n) {
        return Err(format!(
            "upstream name `{n}` must be 1-64 of a-z, 0-9, `.`, `_`, `-`"
        ));
    }
    let uri: http::Uri = r
        .base_url
        .parse()
        .map_err(|_| format!("upstream `{n}`: `base_url` is not a URL"))?;
    let scheme = uri.scheme_str().unwrap_or("").to_ascii_lowercase();
    if scheme != "https" && scheme != "http" {
        return Err(format!(
            "upstream `{n}`: `base_url` must start with https:// (or http:// on loopback)"
        ));
    }
    let Some(auth) = uri.authority() else {
        return Err(format!("upstream `{n}`: `base_url` has no host"));
    };
    if auth.as_str().contains('@') {
        return Err(format!(
            "upstream `{n}`: `base_url` must not hold credentials; set the key with `keymint upstream set`"
        ));
    }
    if uri.query().is_some() {
        return Err(format!("upstream `{n}`: `base_url` must not have a query"));
    }
    if scheme == "http" && !is_loopback_host(auth.host()) && !r.dangerous_plaintext {
        return Err(format!(
            "upstream `{n}`: plain http:// is only allowed to loopback; \
             set `dangerous_plaintext = true` to send the key in clear text"
        ));
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    if let Some(f) = &r.federation {
        f.validate()
            .map_err(|e| format!("upstream `{n}`: `[upstreams.federation]`: {e}"))?;
        let speaks = match f.provider {
            keymint_core::role::FederatedProvider::Anthropic => UpstreamKind::Anthropic,
            _ => UpstreamKind::Openai,
        };
        if r.kind != speaks {
            return Err(format!(
                "upstream `{n}`: a {} federation needs `kind = \"{}\"`",
                f.provider,
                speaks.as_str()
            ));
        }
        if r.key_header.is_some() || r.key_query.is_some() || r.key_prefix.is_some() {
            return Err(format!(
                "upstream `{n}`: a federated token always goes in `Authorization: Bearer`; \
                 remove `key_header`, `key_prefix` and `key_query`"
            ));
        }
    }
    let key = match (r.kind, r.key_header, r.key_query) {
        // Every provider takes its federated token as a bearer token.
        _ if r.federation.is_some() => KeyPlacement::Header {
            name: http::header::AUTHORIZATION,
            prefix: "Bearer ".into(),
        },
        (_, Some(_), Some(_)) => {
            return Err(format!(
                "upstream `{n}`: set `key_header` or `key_query`, not both"
            ));
        }
        (UpstreamKind::Http, None, None) => {
            return Err(format!(
                "upstream `{n}`: an http upstream needs `key_header` or `key_query`"
            ));
        }
        (UpstreamKind::Http, None, Some(q)) => {
            if q.is_empty()
                || !q
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
            {
                return Err(format!("upstream `{n}`: `key_query` is not a plain name"));
            }
            KeyPlacement::Query { name: q }
        }
        (_, None, Some(_)) => {
            return Err(format!("upstream `{n}`: `key_query` is for http upstreams"));
        }
        (kind, h, None) => {
            let (default_name, default_prefix) = match kind {
                UpstreamKind::Anthropic => ("x-api-key", ""),
                _ => ("authorization", "Bearer "),
            };
            let name = h.as_deref().unwrap_or(default_name);
            let name = HeaderName::try_from(name)
                .map_err(|_| format!("upstream `{n}`: `key_header` is not a header name"))?;
            let prefix = r.key_prefix.unwrap_or_else(|| {
                if h.is_some() && name != http::header::AUTHORIZATION {
                    String::new()
                } else {
                    default_prefix.to_owned()
                }
            });
            if prefix.chars().any(char::is_control) {
                return Err(format!(
                    "upstream `{n}`: `key_prefix` holds a control character"
                ));
            }
            KeyPlacement::Header { name, prefix }
        }
    };
    let timeout_secs = match r.timeout.as_deref() {
        None => 300,
        Some(t) => parse_secs(t).map_err(|e| format!("upstream `{n}`: `timeout`: {e}"))?,
    };
    if timeout_secs == 0 {
        return Err(format!("upstream `{n}`: `timeout` must be at least 1s"));
    }
    let mut forward_headers = Vec::with_capacity(r.forward_headers.len());
    for h in &r.forward_headers {
        let name = HeaderName::try_from(h.as_str()).map_err(|_| {
            format!("upstream `{n}`: `forward_headers` holds something that is not a header name")
        })?;
        if NEVER_FORWARDED.contains(&name.as_str()) {
            return Err(format!(
                "upstream `{n}`: `forward_headers` may not name `{name}` (credentials, cookies, \
                 hop-by-hop and framing headers, the body's coding, method and path overrides \
                 and keymint's own headers never leave)"
            ));
        }
        forward_headers.push(name);
    }
    Ok(Upstream {
        name: r.name,
        kind: r.kind,
        scheme,
        authority: auth.as_str().to_owned(),
        base_path,
        key,
        timeout_secs,
        forward_headers,
        federation: r.federation,
    })
}

/// Headers no configuration can forward: the client's credentials
/// (keymint's token), cookies, hop-by-hop and framing headers, the body's
/// coding (`content-encoding`: the screen and the budget read the body as
/// sent, so a compressed one would pass them and be decoded upstream),
/// headers that make a server take another method or path than the one
/// the role's endpoint rules allowed, the OpenAI billing headers a role
/// sets, and keymint's own.
pub const NEVER_FORWARDED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "cookie",
    "host",
    "content-length",
    "transfer-encoding",
    "content-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "http2-settings",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
    "forwarded",
    "x-forwarded-for",
    "accept-encoding",
    "openai-organization",
    "openai-project",
    "x-keymint-identity",
    "x-keymint-entry",
    "x-keymint-attested",
];

/// Checks a role's policy against its upstream.
pub fn validate_policy(
    role: &str,
    p: &Policy,
    up: &Upstream,
    prices: &Prices,
) -> Result<(), String> {
    if up.kind != UpstreamKind::Http && p.models.is_empty() {
        return Err(format!(
            "role `{role}`: `proxy.models` is required (`[\"*\"]` allows any model)"
        ));
    }
    if p.endpoints.is_empty() {
        return Err(format!("role `{role}`: `proxy.endpoints` is required"));
    }
    for e in &p.endpoints {
        let ok = match up.kind {
            UpstreamKind::Http => e
                .split_once(' ')
                .is_some_and(|(m, path)| !m.is_empty() && path.starts_with('/')),
            k => k.endpoints().contains(&e.as_str()),
        };
        if !ok {
            let hint = match up.kind {
                UpstreamKind::Http => "`METHOD /path` or `METHOD /prefix*`".to_owned(),
                k => k.endpoints().join(", "),
            };
            return Err(format!(
                "role `{role}`: endpoint `{e}` is not valid for a {} upstream (use {hint})",
                up.kind.as_str()
            ));
        }
    }
    if let Some(s) = p.max_spend_usd {
        if !(s.is_finite() && s >= 0.0) {
            return Err(format!("role `{role}`: `proxy.max_spend_usd` must be >= 0"));
        }
        // Unknown cost fails closed at request time; say so now where we can.
        for m in p.models.iter().filter(|m| !m.ends_with('*')) {
            if prices.get(m).is_none() {
                return Err(format!(
                    "role `{role}`: model `{m}` has no entry in `[prices]`, but the role has a spend budget"
                ));
            }
        }
    }
    for (k, v) in [("organization", &p.organization), ("project", &p.project)] {
        let Some(v) = v else { continue };
        if up.kind != UpstreamKind::Openai {
            return Err(format!(
                "role `{role}`: `proxy.{k}` is for openai upstreams"
            ));
        }
        // Sent as a header value: printable ASCII, no spaces.
        if v.is_empty() || v.len() > 256 || !v.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "role `{role}`: `proxy.{k}` must be 1-256 printable ASCII characters without spaces"
            ));
        }
    }
    for (k, v) in [
        ("requests_per_minute", p.requests_per_minute),
        ("tokens_per_minute", p.tokens_per_minute),
        ("default_max_tokens", p.default_max_tokens),
    ] {
        if v == Some(0) {
            return Err(format!("role `{role}`: `proxy.{k}` must be at least 1"));
        }
    }
    Ok(())
}

/// One model's price, in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

/// A price in nano-dollars per token (USD per million tokens × 1000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input_nusd: u64,
    pub output_nusd: u64,
}

impl Price {
    pub fn cost(&self, input: u64, output: u64) -> u64 {
        input
            .saturating_mul(self.input_nusd)
            .saturating_add(output.saturating_mul(self.output_nusd))
    }
}

/// The price table: exact model names, or prefixes ending in `*` (the
/// longest match wins).
#[derive(Debug, Clone, Default)]
pub struct Prices(BTreeMap<String, Price>);

impl Prices {
    pub fn parse(raw: BTreeMap<String, RawPrice>) -> Result<Self, String> {
        let mut out = BTreeMap::new();
        for (model, p) in raw {
            for v in [p.input_per_mtok, p.output_per_mtok] {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(format!("price of `{model}` must be a number >= 0"));
                }
            }
            // USD per million tokens = micro-dollars per token; ×1000 = nano.
            out.insert(
                model,
                Price {
                    input_nusd: (p.input_per_mtok * 1000.0).ceil() as u64,
                    output_nusd: (p.output_per_mtok * 1000.0).ceil() as u64,
                },
            );
        }
        Ok(Self(out))
    }

    pub fn get(&self, model: &str) -> Option<Price> {
        if let Some(p) = self.0.get(model) {
            return Some(*p);
        }
        self.0
            .iter()
            .filter(|(k, _)| k.ends_with('*') && pattern_matches(k, model))
            .max_by_key(|(k, _)| k.len())
            .map(|(_, p)| *p)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The `[proxy]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxySettings {
    /// Largest request body the proxy reads (default 8 MiB).
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
    /// How often usage is written to the audit trail, aggregated per lease
    /// (default `60s`).
    #[serde(default)]
    pub audit_interval: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub max_body_bytes: usize,
    pub audit_interval_secs: u64,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            max_body_bytes: 8 * 1024 * 1024,
            audit_interval_secs: 60,
        }
    }
}

impl ProxySettings {
    pub fn parse(
        r: RawProxySettings,
        parse_secs: impl Fn(&str) -> Result<u64, String>,
    ) -> Result<Self, String> {
        let d = Self::default();
        let audit_interval_secs = match r.audit_interval.as_deref() {
            None => d.audit_interval_secs,
            Some(s) => parse_secs(s).map_err(|e| format!("`proxy.audit_interval`: {e}"))?,
        };
        if audit_interval_secs == 0 {
            return Err("`proxy.audit_interval` must be at least 1s".into());
        }
        Ok(Self {
            max_body_bytes: r.max_body_bytes.unwrap_or(d.max_body_bytes),
            audit_interval_secs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: &str) -> Result<u64, String> {
        s.trim_end_matches('s').parse().map_err(|_| "bad".into())
    }

    fn raw(kind: UpstreamKind, url: &str) -> RawUpstream {
        RawUpstream {
            name: "up".into(),
            kind,
            base_url: url.into(),
            key_header: None,
            key_prefix: None,
            key_query: None,
            timeout: None,
            dangerous_plaintext: false,
            forward_headers: vec![],
            federation: None,
        }
    }

    #[test]
    fn upstreams_are_checked() {
        let u = validate_upstream(
            raw(UpstreamKind::Openai, "https://api.openai.com/v1/"),
            secs,
        )
        .unwrap();
        assert_eq!(u.base_path, "/v1");
        assert_eq!(
            u.key,
            KeyPlacement::Header {
                name: http::header::AUTHORIZATION,
                prefix: "Bearer ".into()
            }
        );
        let a =
            validate_upstream(raw(UpstreamKind::Anthropic, "http://127.0.0.1:9/"), secs).unwrap();
        assert_eq!(a.base_path, "");
        for (r, needle) in [
            (
                raw(UpstreamKind::Openai, "http://example.com/v1"),
                "loopback",
            ),
            (raw(UpstreamKind::Openai, "ftp://x/"), "https://"),
            (raw(UpstreamKind::Openai, "https://u:p@x/"), "credentials"),
            (raw(UpstreamKind::Http, "https://x/"), "key_header"),
        ] {
            let e = validate_upstream(r, secs).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }

    /// Names that would let a body pass the screen and the budget encoded
    /// (`content-encoding`), frame or upgrade the upstream connection, or
    /// change the method or path the role's rules allowed are refused at
    /// load, in any case; a plain provider header is accepted.
    #[test]
    fn forward_headers_refuse_codings_framing_and_overrides() {
        for name in [
            "content-encoding",
            "Content-Encoding",
            "content-length",
            "transfer-encoding",
            "te",
            "trailer",
            "upgrade",
            "expect",
            "http2-settings",
            "x-http-method-override",
            "X-HTTP-Method",
            "x-method-override",
            "x-original-url",
            "x-rewrite-url",
            "authorization",
        ] {
            let mut r = raw(UpstreamKind::Openai, "https://api.openai.com/v1");
            r.forward_headers = vec![name.into()];
            let e = validate_upstream(r, secs).unwrap_err();
            assert!(
                e.contains("`forward_headers` may not name")
                    && e.contains(&format!("`{}`", name.to_ascii_lowercase())),
                "{name}: {e}"
            );
        }
        let mut r = raw(UpstreamKind::Openai, "https://api.openai.com/v1");
        r.forward_headers = vec!["x-github-api-version".into()];
        let u = validate_upstream(r, secs).unwrap();
        assert_eq!(u.forward_headers, ["x-github-api-version"]);
    }

    #[test]
    fn prices_match_exactly_or_by_longest_prefix() {
        let mut m = BTreeMap::new();
        m.insert(
            "gpt-4o*".into(),
            RawPrice {
                input_per_mtok: 2.5,
                output_per_mtok: 10.0,
            },
        );
        m.insert(
            "gpt-4o-mini*".into(),
            RawPrice {
                input_per_mtok: 0.15,
                output_per_mtok: 0.6,
            },
        );
        let p = Prices::parse(m).unwrap();
        assert_eq!(p.get("gpt-4o-mini-2024").unwrap().input_nusd, 150);
        assert_eq!(p.get("gpt-4o").unwrap().output_nusd, 10_000);
        assert!(p.get("claude").is_none());
        // 1M output tokens of gpt-4o = $10 = 1e10 nano-dollars.
        assert_eq!(p.get("gpt-4o").unwrap().cost(0, 1_000_000), 10_000_000_000);
    }

    #[test]
    fn patterns() {
        let p = Policy {
            models: vec!["gpt-4o-mini".into(), "claude-*".into()],
            endpoints: vec!["GET /repos/*".into(), "* /search".into()],
            ..Policy::default()
        };
        assert!(p.allows_model("gpt-4o-mini"));
        assert!(!p.allows_model("gpt-4o"));
        assert!(p.allows_model("claude-3-haiku"));
        assert!(p.allows_http("GET", "/repos/x"));
        assert!(!p.allows_http("POST", "/repos/x"));
        assert!(p.allows_http("POST", "/search"));
    }
}
