//! The compliance report (docs/design/0034-compliance-report.md): live
//! state (store, audit trail, configuration) read into [`Evidence`], then
//! judged per control of four frameworks ([`controls`]) and rendered as
//! JSON (this model, `docs/report.schema.json`), HTML or Markdown
//! ([`render`]).
//!
//! Shaped as three steps that do not know of one another: `evidence`
//! gathers numbers (one pass over the inventory, one over the audit chain,
//! which it verifies on the way); `controls` is a pure function from those
//! numbers to statuses; `render` only formats, escaping every string, since
//! names, owners, purposes, locations and policy ids come from the store
//! and the configuration.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::{Config, StorageBackend};
use crate::inventory_config::LeakAction;

pub mod controls;
mod evidence;
pub mod render;

/// The schema's id; bumped when a field changes meaning or goes away.
pub const SCHEMA: &str = "https://keymint.dev/schemas/report/v1";

/// The most stored inventory entries one report reads (100 pages).
pub const MAX_ITEMS: usize = 100_000;
/// The most entries listed by name under "needs attention".
pub const MAX_ATTENTION: usize = 50;

/// What the configuration says, taken at start: evidence a report can
/// give without reading the store.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Deployment {
    /// The server's issuer name (`[server] issuer`).
    pub issuer: String,
    /// The listener serves TLS.
    pub tls: bool,
    /// Clients may present X.509-SVIDs (a client CA or trust domains).
    pub client_certificates: bool,
    /// Clients without a valid certificate are refused at the handshake.
    pub client_certificates_required: bool,
    /// Plain HTTP was allowed explicitly (`dangerous_plaintext`).
    pub plaintext: bool,
    /// `sqlite` or `postgres`.
    pub storage: String,
    /// Configured workload JWT issuers.
    pub jwt_issuers: u64,
    /// The API is served on a Unix socket to attested local processes.
    pub local_attestation: bool,
    /// Named operators (people who approve), beside the admin token.
    pub operators: u64,
    /// Node agents with join tokens or identities.
    pub nodes: u64,
    /// keymint is an OIDC issuer (provider federation instead of static keys).
    pub oidc_issuer: bool,
    /// The audit chain is also written to a file (a SIEM's input).
    pub audit_file: bool,
    /// Held requests are announced to a webhook.
    pub approval_webhook: bool,
    /// Inventory findings are announced to a webhook.
    pub findings_webhook: bool,
    /// How often the duty loop evaluates the inventory (none: never).
    pub inventory_evaluate_every_secs: Option<u64>,
    /// `[inventory] max_age`, in days (none: no limit).
    pub max_age_days: Option<i64>,
    /// `[inventory] unused_after`, in days (none: not judged).
    pub unused_after_days: Option<i64>,
    /// `[[inventory.responses]]`: provider → action.
    pub leak_responses: BTreeMap<String, String>,
    /// `[[upstreams]]` of the egress proxy.
    pub upstreams: u64,
}

impl Deployment {
    /// The facts of `config`.
    pub fn of(config: &Config) -> Self {
        let tls = config.tls.as_ref();
        let day = 86_400_000;
        Self {
            issuer: config.issuer.clone(),
            tls: tls.is_some(),
            client_certificates: tls
                .is_some_and(|t| t.client_ca_file.is_some() || !t.trust_domains.is_empty()),
            client_certificates_required: tls.is_some_and(|t| t.require_client_cert),
            plaintext: config.plaintext,
            storage: match config.storage {
                StorageBackend::Sqlite => "sqlite".into(),
                StorageBackend::Postgres { .. } => "postgres".into(),
            },
            jwt_issuers: config.identity.as_ref().map_or(0, |i| i.jwt.len() as u64),
            local_attestation: config.local.is_some(),
            operators: config.operators.len() as u64,
            nodes: config.nodes.len() as u64,
            oidc_issuer: config.oidc.is_some(),
            audit_file: config.audit_file.is_some(),
            approval_webhook: config.approval_webhook.is_some(),
            findings_webhook: config.inventory.webhook.is_some()
                || config.approval_webhook.is_some(),
            inventory_evaluate_every_secs: config.inventory.evaluate_every_secs,
            max_age_days: config.inventory.limits.max_age_ms.map(|m| m / day),
            unused_after_days: config.inventory.limits.unused_ms.map(|m| m / day),
            leak_responses: config
                .inventory
                .responses
                .iter()
                .map(|r| {
                    (
                        r.provider.as_str().to_owned(),
                        match r.action {
                            LeakAction::Revoke => "revoke",
                            LeakAction::Suspend => "suspend",
                            LeakAction::Alert => "alert",
                        }
                        .to_owned(),
                    )
                })
                .collect(),
            upstreams: config.upstreams.len() as u64,
        }
    }
}

/// A control's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Met,
    Partly,
    NotMet,
    NotApplicable,
}

impl Status {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Met => "met",
            Self::Partly => "partly",
            Self::NotMet => "not_met",
            Self::NotApplicable => "not_applicable",
        }
    }

    /// For people.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Met => "Met",
            Self::Partly => "Partly met",
            Self::NotMet => "Not met",
            Self::NotApplicable => "Not applicable",
        }
    }
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    #[serde(rename = "$schema")]
    pub schema: &'static str,
    /// RFC 3339.
    pub generated_at: String,
    /// The server's issuer name.
    pub issuer: String,
    pub summary: Summary,
    pub evidence: Evidence,
    pub frameworks: Vec<Framework>,
}

/// How many controls have each status, over every framework.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub met: u64,
    pub partly: u64,
    pub not_met: u64,
    pub not_applicable: u64,
}

/// One framework and its controls.
#[derive(Debug, Clone, Serialize)]
pub struct Framework {
    /// `owasp-nhi-2025`, `owasp-agentic-2026`, `nist-ai-rmf-600-1`, `nist-csf-2.0`.
    pub id: &'static str,
    pub name: &'static str,
    /// Where the control ids and names come from.
    pub source: &'static str,
    pub controls: Vec<Control>,
}

/// One control, judged.
#[derive(Debug, Clone, Serialize)]
pub struct Control {
    pub id: &'static str,
    pub name: &'static str,
    pub status: Status,
    /// What the status was computed from.
    pub evidence: Vec<String>,
    /// What is missing for `met`, and what keymint cannot see.
    pub missing: Vec<String>,
}

/// Everything the controls are judged on.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Evidence {
    pub inventory: InventoryEvidence,
    pub leaks: LeakEvidence,
    pub leases: LeaseEvidence,
    pub tasks: TaskEvidence,
    pub approvals: ApprovalEvidence,
    pub policy: PolicyEvidence,
    pub audit: AuditEvidence,
    pub monitoring: MonitoringEvidence,
    pub deployment: Deployment,
}

/// The stored inventory (docs/design/0027), and the live leases beside it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InventoryEvidence {
    /// Stored entries read.
    pub entries: u64,
    /// More than [`MAX_ITEMS`] entries: the counts cover the newest only.
    pub truncated: bool,
    /// Entries that can still be used (active or suspended).
    pub live: u64,
    pub by_status: BTreeMap<String, u64>,
    pub by_origin: BTreeMap<String, u64>,
    /// Live entries that are not keymint's own (a provider's keys).
    pub third_party_live: u64,
    /// Of those, revoked automatically through a provider API when leaked.
    pub third_party_automatic_revocation: u64,
    /// Live entries without an environment.
    pub without_environment: u64,
    /// Findings on live entries, by kind (`no_owner`, `no_expiry`, …).
    pub findings: BTreeMap<String, u64>,
    /// The oldest live entry.
    pub oldest: Option<Oldest>,
    /// Live entries by age.
    pub age_buckets: Vec<Bucket>,
    /// Live entries with findings, by name (at most [`MAX_ATTENTION`]).
    pub attention: Vec<Attention>,
    /// Live leases (issued credentials; each has an owner, an expiry and
    /// an automatic revocation by construction).
    pub live_leases: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Oldest {
    pub id: String,
    pub name: String,
    pub provider: String,
    /// RFC 3339.
    pub created_at: String,
    pub age_days: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    pub label: &'static str,
    pub count: u64,
}

/// An entry that needs someone's attention.
#[derive(Debug, Clone, Serialize)]
pub struct Attention {
    pub id: String,
    pub name: String,
    pub provider: String,
    pub owner: Option<String>,
    pub purpose: Option<String>,
    pub environment: Option<String>,
    /// Where it was seen (at most 3).
    pub locations: Vec<String>,
    pub findings: Vec<String>,
}

/// Leaks reported, and how fast they were contained.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LeakEvidence {
    /// `leak.reported` events: findings sent by scanners.
    pub reported: u64,
    /// Stored entries a scan found leaked.
    pub leaked_entries: u64,
    /// Of those, revoked (or retired).
    pub revoked: u64,
    /// Of those, suspended at the provider (reversible).
    pub suspended: u64,
    /// Of those, still usable.
    pub still_active: u64,
    /// `leak.response` outcomes (`revoked`, `suspended`, `alerted`, `failed`).
    pub responses: BTreeMap<String, u64>,
    /// From a leak's report to its revocation or suspension.
    pub time_to_contain: Latency,
}

/// A latency distribution, in milliseconds (nearest rank).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub p50_ms: Option<i64>,
    pub p99_ms: Option<i64>,
    pub max_ms: Option<i64>,
}

impl Latency {
    /// The distribution of `v` (sorted here).
    pub fn of(mut v: Vec<i64>) -> Self {
        v.sort_unstable();
        let rank = |q: f64| -> Option<i64> {
            if v.is_empty() {
                return None;
            }
            // Nearest rank: the smallest value with at least q of the
            // samples at or below it.
            let n = v.len();
            let idx = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            v.get(idx).copied()
        };
        Self {
            samples: v.len() as u64,
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            max_ms: v.last().copied(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LeaseEvidence {
    /// Leases by state, as stored now.
    pub by_state: BTreeMap<String, u64>,
    /// From `lease.revoke_requested` to `lease.revoked`, over the trail.
    pub revocation: Latency,
    /// `lease.revoke_failed` events (each retried until it succeeds).
    pub revocation_failures: u64,
    /// `lease.issued` events.
    pub issued: u64,
    /// `lease.expired` events.
    pub expired: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TaskEvidence {
    pub active: u64,
    /// `task.started` events.
    pub started: u64,
    /// Sub-tasks among them (a parent task).
    pub delegated: u64,
    /// `task.ended` events by final status.
    pub ended: BTreeMap<String, u64>,
}

/// Requests policy held for a human (`approval.*` events).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ApprovalEvidence {
    pub requested: u64,
    pub approved: u64,
    pub denied: u64,
    pub expired: u64,
    pub redeemed: u64,
    /// Closed because their task ended first (`approval.cancelled`: pending
    /// or approved but not yet redeemed, or redeemed while the task ended).
    pub cancelled: u64,
    /// Pending now (store).
    pub pending: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PolicyEvidence {
    /// Cedar policy ids in force.
    pub policies: Vec<String>,
    pub roles: u64,
    /// Roles that reach a provider through the egress proxy.
    pub egress_roles: u64,
    /// Of those, with a budget or rate limit.
    pub egress_roles_with_limits: u64,
    /// Of those, with an allow-list of models or endpoints.
    pub egress_roles_with_allow_lists: u64,
    /// `policy.reloaded` events.
    pub reloads: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditEvidence {
    /// Events verified.
    pub events: u64,
    pub last_seq: Option<u64>,
    /// The whole chain verified.
    pub chain_intact: bool,
    /// The first problem, when not.
    pub problem: Option<String>,
    /// RFC 3339 of the first event.
    pub first_event_at: Option<String>,
    /// Events by kind.
    pub kinds: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct MonitoringEvidence {
    /// `auth.failed` events.
    pub auth_failures: u64,
    /// `proxy.denied` events (budget, rate, model, endpoint, secret in body…).
    pub proxy_denials: u64,
    /// `proxy.usage` events (metered use per lease).
    pub usage_summaries: u64,
    /// Misuse alerts and suspensions in the trail (`misuse.*`,
    /// `*.suspended`); none until misuse monitoring is configured.
    pub misuse_events: u64,
    /// Rotations of held keys in the trail (`*.rotated` of upstream or
    /// inventory keys).
    pub rotations: u64,
    /// Console sign-ins.
    pub console_sign_ins: u64,
    /// Events an operator (`operator:…`) caused.
    pub operator_actions: u64,
    /// Events the shared admin token caused.
    pub admin_actions: u64,
}
