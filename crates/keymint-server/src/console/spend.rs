//! Usage and spend through the egress proxy, from its `proxy.usage` audit
//! events (one per lease per flush interval), read newest first back to a
//! start time and never more than [`SCAN_LIMIT`] events, so the page costs
//! the same with a long chain.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use keymint_core::Timestamp;
use keymint_core::audit::AuditEvent;
use keymint_store::Store;

/// At most this many events are read for one view.
pub const SCAN_LIMIT: u64 = 50_000;
const BATCH: u64 = 1000;

#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Use {
    pub requests: u64,
    pub input: u64,
    pub output: u64,
    pub spend_usd: f64,
}

impl Use {
    fn add(&mut self, o: &Use) {
        self.requests += o.requests;
        self.input += o.input;
        self.output += o.output;
        self.spend_usd += o.spend_usd;
    }
}

/// Use since a moment, by upstream, role, workload and hour.
#[derive(Debug, Default)]
pub struct Spend {
    pub by_upstream: BTreeMap<String, Use>,
    pub by_role: BTreeMap<String, Use>,
    pub by_workload: BTreeMap<String, Use>,
    /// Spend per hour since `since`, oldest first.
    pub hourly: Vec<f64>,
    /// The scan stopped at [`SCAN_LIMIT`] before reaching `since`.
    pub truncated: bool,
}

fn use_of(e: &AuditEvent) -> Use {
    let n = |k: &str| {
        e.data
            .get(k)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    Use {
        requests: n("requests"),
        input: n("input_tokens"),
        output: n("output_tokens"),
        spend_usd: e
            .data
            .get("spend_usd")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0),
    }
}

/// Reads `proxy.usage` events from the newest back to `since`.
pub async fn since(
    store: &dyn Store,
    since: Timestamp,
    now: Timestamp,
) -> keymint_store::Result<Spend> {
    let hours = (since.until(now).max(0) / 3_600_000 + 1) as usize;
    let mut s = Spend {
        hourly: vec![0.0; hours.min(24 * 31)],
        ..Spend::default()
    };
    let Some(head) = store.audit_tail(1).await?.first().map(|e| e.seq) else {
        return Ok(s);
    };
    let mut hi = head; // next batch ends at seq `hi` (inclusive)
    let mut scanned = 0u64;
    'scan: while hi > 0 {
        if scanned >= SCAN_LIMIT {
            s.truncated = true;
            break;
        }
        let after = hi.saturating_sub(BATCH);
        let batch = store.audit_after(after, (hi - after) as u32).await?;
        scanned += hi - after;
        for e in batch.iter().rev() {
            if e.time < since {
                break 'scan;
            }
            if e.kind != "proxy.usage" {
                continue;
            }
            let u = use_of(e);
            let upstream = e
                .data
                .get("upstream")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("?");
            s.by_upstream
                .entry(upstream.to_owned())
                .or_default()
                .add(&u);
            if let Some(r) = &e.role {
                s.by_role.entry(r.clone()).or_default().add(&u);
            }
            if let Some(w) = &e.workload {
                s.by_workload.entry(w.clone()).or_default().add(&u);
            }
            let h = (since.until(e.time) / 3_600_000) as usize;
            if let Some(slot) = s.hourly.get_mut(h) {
                *slot += u.spend_usd;
            }
        }
        hi = after;
    }
    Ok(s)
}

/// A bar chart of spend per hour, as inline SVG (attributes only: the
/// Content-Security-Policy allows no inline style).
pub fn chart(hourly: &[f64], first_hour: Timestamp) -> String {
    let (w, h, pad) = (720.0_f64, 160.0_f64, 24.0_f64);
    let max = hourly.iter().copied().fold(0.0_f64, f64::max);
    let n = hourly.len().max(1) as f64;
    let bw = (w - pad) / n;
    let mut out = String::new();
    let total: f64 = hourly.iter().sum();
    let _ = write!(
        out,
        "<svg class=\"chart\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-labelledby=\"chart-title\">\
         <title id=\"chart-title\">Spend per hour, {} hours from {}: ${total:.4} in all, at most ${max:.4} in one hour</title>",
        hourly.len(),
        super::html::ts(first_hour)
    );
    let _ = write!(
        out,
        "<line x1=\"{pad}\" y1=\"{}\" x2=\"{w}\" y2=\"{}\" stroke=\"#555\"/>",
        h - pad,
        h - pad
    );
    for (i, v) in hourly.iter().enumerate() {
        let bh = if max > 0.0 {
            (v / max) * (h - 2.0 * pad)
        } else {
            0.0
        };
        let x = pad + i as f64 * bw;
        let _ = write!(
            out,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#1d4ed8\"><title>hour {i}: ${v:.4}</title></rect>",
            h - pad - bh,
            (bw - 2.0).max(1.0)
        );
    }
    let _ = write!(
        out,
        "<text x=\"{pad}\" y=\"{}\" font-size=\"11\" fill=\"#222\">{}</text>\
         <text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"#222\" text-anchor=\"end\">now</text>\
         <text x=\"2\" y=\"14\" font-size=\"11\" fill=\"#222\">${max:.4}</text></svg>",
        h - 6.0,
        super::html::ts(first_hour),
        w,
        h - 6.0
    );
    out
}
