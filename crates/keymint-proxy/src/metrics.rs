//! The proxy's Prometheus counters, rendered after the server's own. Labels
//! are upstream names and fixed reasons, never tokens, keys or models.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a request was refused.
pub const DENIAL_REASONS: [&str; 11] = [
    "auth", "upstream", "endpoint", "model", "budget", "rate", "secret", "size", "path", "price",
    "encoding",
];

#[derive(Debug, Default)]
pub struct UpstreamCounters {
    pub forwarded: AtomicU64,
    pub upstream_errors: AtomicU64,
    pub input_tokens: AtomicU64,
    pub output_tokens: AtomicU64,
    pub spend_nusd: AtomicU64,
    pub streams: AtomicU64,
    pub redactions: AtomicU64,
    /// Responses that carried the upstream's own key back (redacted).
    pub key_reflections: AtomicU64,
    /// Responses that carried headers acting on keymint's origin
    /// (`Set-Cookie`, `Alt-Svc`, ...: `request::ORIGIN_BOUND`), dropped.
    pub origin_headers_dropped: AtomicU64,
}

#[derive(Debug, Default)]
pub struct ProxyMetrics {
    pub upstreams: BTreeMap<String, UpstreamCounters>,
    pub denials: [AtomicU64; DENIAL_REASONS.len()],
}

impl ProxyMetrics {
    pub fn new<'a>(names: impl Iterator<Item = &'a str>) -> Self {
        Self {
            upstreams: names
                .map(|n| (n.to_owned(), UpstreamCounters::default()))
                .collect(),
            denials: Default::default(),
        }
    }

    pub fn denied(&self, reason: &str) {
        if let Some(i) = DENIAL_REASONS.iter().position(|r| *r == reason) {
            self.denials[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn upstream(&self, name: &str) -> Option<&UpstreamCounters> {
        self.upstreams.get(name)
    }

    pub fn render(&self, o: &mut String) {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(
            o,
            "# HELP keymint_proxy_denials_total Proxy requests refused, by reason.\n# TYPE keymint_proxy_denials_total counter"
        );
        for (i, r) in DENIAL_REASONS.iter().enumerate() {
            let _ = writeln!(
                o,
                "keymint_proxy_denials_total{{reason=\"{r}\"}} {}",
                g(&self.denials[i])
            );
        }
        type Field = fn(&UpstreamCounters) -> &AtomicU64;
        let series: [(&str, &str, &str, Field); 9] = [
            (
                "keymint_proxy_requests_total",
                "counter",
                "Requests forwarded to the upstream.",
                |c| &c.forwarded,
            ),
            (
                "keymint_proxy_upstream_errors_total",
                "counter",
                "Upstream requests that failed or timed out.",
                |c| &c.upstream_errors,
            ),
            (
                "keymint_proxy_input_tokens_total",
                "counter",
                "Input tokens metered.",
                |c| &c.input_tokens,
            ),
            (
                "keymint_proxy_output_tokens_total",
                "counter",
                "Output tokens metered.",
                |c| &c.output_tokens,
            ),
            (
                "keymint_proxy_spend_nanodollars_total",
                "counter",
                "Spend metered from the price table, in 1e-9 USD.",
                |c| &c.spend_nusd,
            ),
            (
                "keymint_proxy_streams_total",
                "counter",
                "Streamed (SSE) responses.",
                |c| &c.streams,
            ),
            (
                "keymint_proxy_redactions_total",
                "counter",
                "Requests forwarded with secrets redacted.",
                |c| &c.redactions,
            ),
            (
                "keymint_proxy_key_reflections_total",
                "counter",
                "Upstream responses that carried the upstream's own key back; the key was redacted before the agent saw it.",
                |c| &c.key_reflections,
            ),
            (
                "keymint_proxy_origin_headers_dropped_total",
                "counter",
                "Upstream responses that carried headers acting on keymint's origin (Set-Cookie, Alt-Svc, ...); they were dropped before the agent saw them.",
                |c| &c.origin_headers_dropped,
            ),
        ];
        for (name, kind, help, f) in series {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (up, c) in &self.upstreams {
                let _ = writeln!(o, "{name}{{upstream=\"{up}\"}} {}", g(f(c)));
            }
        }
    }
}
