//! Refused credentials in the audit trail, bounded.
//!
//! Every refused credential is counted (`keymint_auth_failures_total`) and,
//! up to [`AUTH_AUDIT_BURST`] per [`AUTH_AUDIT_WINDOW_MS`], audited one by
//! one as `auth.failed`. Past that, an unauthenticated flood would only grow
//! the chain: further failures in the window are counted by kind of
//! credential and written as one `auth.failed.suppressed` event when the
//! window closes (on the next failure, or by the expiry manager's tick), so
//! the trail says how many there were without one event each.
//!
//! The same window bounds the egress proxy's refusals (`proxy.denied`,
//! summarised as `proxy.denied.suppressed` by check) and the console's
//! refused forms (`console.csrf_refused`, which anyone can post, signed in
//! or not; summarised as `console.csrf_refused.suppressed` by form) and
//! the MCP route's refusals of token holders (`mcp.session_refused`,
//! `mcp.denied`; summarised as `mcp.refused.suppressed` by check):
//! [`AuditWindow`] is generic over what it bounds ([`Bounded`]).

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use keymint_core::Timestamp;
use keymint_core::audit::{AuditDraft, Outcome};

use super::Broker;

/// Failures audited one by one per window.
pub const AUTH_AUDIT_BURST: u32 = 100;
/// The window, in milliseconds.
pub const AUTH_AUDIT_WINDOW_MS: i64 = 10_000;

/// What a window bounds: the kind of its summary event, the data field
/// that counts by key, and how the summary names what it counted.
pub(crate) trait Bounded {
    const SUMMARY: &'static str;
    const BY: &'static str;
    const WHAT: &'static str;
}

/// Refused credentials (`auth.failed`), counted by kind of credential.
#[derive(Debug)]
pub(crate) struct AuthFailures;

impl Bounded for AuthFailures {
    const SUMMARY: &'static str = "auth.failed.suppressed";
    const BY: &'static str = "by_credential";
    const WHAT: &'static str = "refused credentials";
}

/// Console forms refused for their origin or CSRF token
/// (`console.csrf_refused`), counted by form.
#[derive(Debug)]
pub(crate) struct CsrfRefusals;

impl Bounded for CsrfRefusals {
    const SUMMARY: &'static str = "console.csrf_refused.suppressed";
    const BY: &'static str = "by_form";
    const WHAT: &'static str = "refused console forms";
}

/// Requests the MCP route refused from a token holder (`mcp.session_refused`
/// under `session`, `mcp.denied` under its check), counted by check.
#[derive(Debug)]
pub(crate) struct McpRefusals;

impl Bounded for McpRefusals {
    const SUMMARY: &'static str = "mcp.refused.suppressed";
    const BY: &'static str = "by_check";
    const WHAT: &'static str = "refused MCP requests";
}

/// One window of bounded audit events for `K`.
#[derive(Debug)]
pub(crate) struct AuditWindow<K> {
    start: Option<Timestamp>,
    written: u32,
    suppressed: BTreeMap<&'static str, u64>,
    kind: PhantomData<K>,
}

impl<K> Default for AuditWindow<K> {
    fn default() -> Self {
        Self {
            start: None,
            written: 0,
            suppressed: BTreeMap::new(),
            kind: PhantomData,
        }
    }
}

pub(crate) type AuthAuditWindow = AuditWindow<AuthFailures>;

impl<K: Bounded> AuditWindow<K> {
    /// Closes the window if it is over at `now`, returning the summary of
    /// what it suppressed, if anything.
    fn roll(&mut self, now: Timestamp) -> Option<AuditDraft> {
        let start = self.start?;
        if now.millis() < start.millis() + AUTH_AUDIT_WINDOW_MS {
            return None;
        }
        let suppressed = std::mem::take(&mut self.suppressed);
        self.start = None;
        self.written = 0;
        let total: u64 = suppressed.values().sum();
        (total > 0).then(|| {
            AuditDraft::new(now, K::SUMMARY, "system")
                .outcome(Outcome::Denied)
                .reason(format!(
                    "{total} more {} since {} were counted, not recorded one by one",
                    K::WHAT,
                    start.rfc3339()
                ))
                .data("count", total)
                .data(K::BY, serde_json::to_value(&suppressed).unwrap_or_default())
                .data("since", start.rfc3339())
        })
    }

    /// Whether a failure at `now` is audited on its own, and the summary of
    /// a window that just closed.
    fn admit(&mut self, now: Timestamp, key: &'static str) -> (bool, Option<AuditDraft>) {
        let summary = self.roll(now);
        if self.start.is_none() {
            self.start = Some(now);
        }
        if self.written < AUTH_AUDIT_BURST {
            self.written += 1;
            (true, summary)
        } else {
            *self.suppressed.entry(key).or_default() += 1;
            (false, summary)
        }
    }
}

impl Broker {
    /// Counts a refused credential and audits `ev` within the bound.
    pub(crate) async fn record_auth_failure(&self, ev: AuditDraft, credential: &'static str) {
        self.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
        self.record_bounded(&self.auth_audit, ev, credential).await;
    }

    /// Audits a refused console form (`form`, a constant) within the bound.
    pub(crate) async fn record_csrf_refusal(&self, ev: AuditDraft, form: &'static str) {
        self.record_bounded(&self.csrf_refusals, ev, form).await;
    }

    /// Audits `ev` if `window` admits it, with the summary of a window that
    /// just closed. Counts nothing: the caller's metrics count every event.
    pub(crate) async fn record_bounded<K: Bounded>(
        &self,
        window: &Mutex<AuditWindow<K>>,
        ev: AuditDraft,
        key: &'static str,
    ) {
        let (write, summary) = window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .admit(self.now(), key);
        for ev in summary.into_iter().chain(write.then_some(ev)) {
            if let Err(se) = self.store.append_audit(ev).await {
                tracing::error!(error = %se, kind = K::SUMMARY, "could not record a bounded audit event");
            }
        }
        self.notify_audit();
    }

    /// Writes the summaries of closed windows (the expiry manager calls this
    /// on every tick, so a flood that stops is still summarised).
    pub(crate) async fn flush_auth_failures(&self, now: Timestamp) {
        self.flush_window(&self.auth_audit, now).await;
        self.flush_window(&self.proxy_denials, now).await;
        self.flush_window(&self.csrf_refusals, now).await;
        self.flush_window(&self.mcp_refusals, now).await;
    }

    async fn flush_window<K: Bounded>(&self, window: &Mutex<AuditWindow<K>>, now: Timestamp) {
        let summary = window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .roll(now);
        if let Some(ev) = summary {
            if let Err(se) = self.store.append_audit(ev).await {
                tracing::error!(error = %se, kind = K::SUMMARY, "could not record a summary of suppressed events");
            }
            self.notify_audit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_summarised_per_window() {
        let mut w = AuthAuditWindow::default();
        let t0 = Timestamp(1_800_000_000_000);
        for i in 0..AUTH_AUDIT_BURST {
            assert_eq!(w.admit(Timestamp(t0.0 + i64::from(i)), "kmt"), (true, None));
        }
        for _ in 0..7 {
            assert!(!w.admit(Timestamp(t0.0 + 500), "kmt").0);
        }
        assert!(!w.admit(Timestamp(t0.0 + 600), "jwt").0);
        // Still inside the window: nothing to flush.
        assert!(w.roll(Timestamp(t0.0 + AUTH_AUDIT_WINDOW_MS - 1)).is_none());
        // The next failure after the window is audited, with the summary.
        let (write, summary) = w.admit(Timestamp(t0.0 + AUTH_AUDIT_WINDOW_MS), "kmt");
        assert!(write);
        let s = summary.unwrap().seal(1, keymint_core::audit::GENESIS);
        assert_eq!(s.kind, "auth.failed.suppressed");
        assert_eq!(s.data["count"], 8);
        assert_eq!(s.data["by_credential"]["kmt"], 7);
        assert_eq!(s.data["by_credential"]["jwt"], 1);
        // A quiet window leaves no summary.
        assert!(w.roll(Timestamp(t0.0 + 3 * AUTH_AUDIT_WINDOW_MS)).is_none());
    }
}
