//! Prometheus metrics, kept as atomics and rendered in the text format.
//! Counters count events in this process; gauges of leases and tasks are
//! read from the store at scrape time, so they are right after a restart.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use keymint_core::model::TaskStatus;
use keymint_store::Counts;

#[derive(Debug, Default)]
pub struct Metrics {
    pub tasks_started: AtomicU64,
    pub tasks_ended: [AtomicU64; 5],
    pub leases_issued: AtomicU64,
    pub leases_renewed: AtomicU64,
    pub leases_revoked: AtomicU64,
    pub leases_expired: AtomicU64,
    pub revocation_failures: AtomicU64,
    pub krl_builds: AtomicU64,
    pub denials: AtomicU64,
    pub auth_failures: AtomicU64,
    pub http_requests: [AtomicU64; 5],
    pub audit_sink_failures: AtomicU64,
    pub audit_sink_delivered: AtomicU64,
    pub leaks_reported: AtomicU64,
    pub leaked_tokens_revoked: AtomicU64,
    pub webhook_failures: AtomicU64,
    /// 1 while this process holds the background duties (docs/design/0022).
    pub duties_held: AtomicU64,
    /// How often this process took the duties.
    pub duties_taken: AtomicU64,
    /// Local socket connections refused because their uid held its share
    /// (`[local] max_connections_per_uid`); never attested.
    pub local_refused: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    pub fn task_ended(&self, s: TaskStatus) {
        let i = TaskStatus::ALL.iter().position(|x| *x == s).unwrap_or(0);
        inc(&self.tasks_ended[i]);
    }

    pub fn http(&self, status: u16) {
        let i = usize::from((status / 100).clamp(1, 5)) - 1;
        inc(&self.http_requests[i]);
    }

    pub fn render(&self, counts: Option<&Counts>, sink_lag: Option<u64>) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut o = String::with_capacity(2048);
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            "keymint_tasks_started_total",
            "Tasks started.",
            g(&self.tasks_started),
        );
        counter(
            "keymint_leases_issued_total",
            "Leases issued.",
            g(&self.leases_issued),
        );
        counter(
            "keymint_leases_renewed_total",
            "Leases renewed.",
            g(&self.leases_renewed),
        );
        counter(
            "keymint_leases_revoked_total",
            "Revocations confirmed.",
            g(&self.leases_revoked),
        );
        counter(
            "keymint_leases_expired_total",
            "Leases that reached their expiry.",
            g(&self.leases_expired),
        );
        counter(
            "keymint_revocation_failures_total",
            "Failed revocation attempts (each is retried).",
            g(&self.revocation_failures),
        );
        counter(
            "keymint_ssh_krl_builds_total",
            "SSH KRLs built (after an SSH revocation; otherwise served built).",
            g(&self.krl_builds),
        );
        counter(
            "keymint_denials_total",
            "Requests refused by rules or permissions.",
            g(&self.denials),
        );
        counter(
            "keymint_auth_failures_total",
            "Requests with a bad or unknown token.",
            g(&self.auth_failures),
        );
        counter(
            "keymint_audit_sink_failures_total",
            "Failed deliveries to the audit file sink (retried).",
            g(&self.audit_sink_failures),
        );
        counter(
            "keymint_audit_sink_delivered_total",
            "Audit events delivered to the file sink.",
            g(&self.audit_sink_delivered),
        );
        counter(
            "keymint_approval_webhook_failures_total",
            "Failed approval webhook deliveries (retried).",
            g(&self.webhook_failures),
        );
        counter(
            "keymint_leaks_reported_total",
            "Leaked secrets reported by scanners.",
            g(&self.leaks_reported),
        );
        counter(
            "keymint_leaked_tokens_revoked_total",
            "Leases revoked because their token was found leaked.",
            g(&self.leaked_tokens_revoked),
        );
        counter(
            "keymint_duties_taken_total",
            "Times this process took the background duties.",
            g(&self.duties_taken),
        );
        counter(
            "keymint_local_connections_refused_total",
            "Local socket connections refused because their uid held its share (never attested).",
            g(&self.local_refused),
        );
        let _ = writeln!(
            o,
            "# HELP keymint_duties_held 1 while this process holds the background duties.\n\
             # TYPE keymint_duties_held gauge\nkeymint_duties_held {}",
            g(&self.duties_held)
        );
        let _ = writeln!(
            o,
            "# HELP keymint_tasks_ended_total Tasks ended, by status.\n# TYPE keymint_tasks_ended_total counter"
        );
        for (i, s) in TaskStatus::ALL.iter().enumerate().skip(1) {
            let _ = writeln!(
                o,
                "keymint_tasks_ended_total{{status=\"{}\"}} {}",
                s.as_str(),
                g(&self.tasks_ended[i])
            );
        }
        let _ = writeln!(
            o,
            "# HELP keymint_http_requests_total HTTP responses, by status class.\n# TYPE keymint_http_requests_total counter"
        );
        for (i, c) in self.http_requests.iter().enumerate() {
            let _ = writeln!(
                o,
                "keymint_http_requests_total{{class=\"{}xx\"}} {}",
                i + 1,
                g(c)
            );
        }
        if let Some(c) = counts {
            let _ = writeln!(
                o,
                "# HELP keymint_tasks_active Tasks currently active.\n# TYPE keymint_tasks_active gauge\nkeymint_tasks_active {}",
                c.tasks_active
            );
            let _ = writeln!(
                o,
                "# HELP keymint_leases Leases by state (live states only).\n# TYPE keymint_leases gauge"
            );
            for (s, n) in &c.leases {
                let _ = writeln!(o, "keymint_leases{{state=\"{}\"}} {n}", s.as_str());
            }
            let _ = writeln!(
                o,
                "# HELP keymint_audit_head_seq Sequence number of the newest audit event.\n# TYPE keymint_audit_head_seq gauge\nkeymint_audit_head_seq {}",
                c.audit_head
            );
        }
        if let Some(lag) = sink_lag {
            let _ = writeln!(
                o,
                "# HELP keymint_audit_sink_lag Audit events not yet delivered to the file sink.\n# TYPE keymint_audit_sink_lag gauge\nkeymint_audit_sink_lag {lag}"
            );
        }
        o
    }
}
