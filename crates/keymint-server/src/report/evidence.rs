//! Gathering the evidence: the stored inventory in pages, the lease and
//! task counts, the pending approvals, the policy in force, and one pass
//! over the whole audit chain that verifies it and counts what happened
//! on the way (revocation latencies, leak responses, approvals).

use std::collections::{BTreeMap, HashMap};

use keymint_core::Timestamp;
use keymint_core::audit::AuditEvent;
use keymint_core::inventory::{self, InventoryItem, ItemStatus, Origin};
use keymint_core::model::ApprovalStatus;

use super::{
    ApprovalEvidence, Attention, AuditEvidence, Bucket, Deployment, Evidence, InventoryEvidence,
    Latency, LeakEvidence, LeaseEvidence, MAX_ATTENTION, MAX_ITEMS, MonitoringEvidence, Oldest,
    PolicyEvidence, Report, SCHEMA, TaskEvidence, controls,
};
use crate::broker::{Broker, Principal, Result};

const DAY_MS: i64 = 86_400_000;
/// Inventory entries read per page.
const PAGE: u32 = 1000;
/// Latency samples kept per distribution (the newest beyond are dropped:
/// a report over a very long trail stays bounded in memory).
const MAX_SAMPLES: usize = 1_000_000;

/// What the audit pass found, beside the chain's state.
#[derive(Default)]
struct Trail {
    audit: AuditEvidence,
    revocation_ms: Vec<i64>,
    revocation_failures: u64,
    issued: u64,
    expired: u64,
    started: u64,
    delegated: u64,
    ended: BTreeMap<String, u64>,
    approvals: ApprovalEvidence,
    reported: u64,
    responses: BTreeMap<String, u64>,
    /// Inventory id → when a provider response contained it.
    contained_item: HashMap<String, Timestamp>,
    /// Lease id → when it was revoked as leaked.
    contained_lease: HashMap<String, Timestamp>,
    reloads: u64,
    monitoring: MonitoringEvidence,
}

impl Trail {
    /// Counts one event.
    fn see(&mut self, e: &AuditEvent, requested: &mut HashMap<String, Timestamp>) {
        if self.audit.first_event_at.is_none() {
            self.audit.first_event_at = Some(e.time.rfc3339());
        }
        *self.audit.kinds.entry(e.kind.clone()).or_default() += 1;
        if e.actor.starts_with("operator:") {
            self.monitoring.operator_actions += 1;
        } else if e.actor == "admin" {
            self.monitoring.admin_actions += 1;
        }
        let lease = e.lease.as_deref();
        match e.kind.as_str() {
            "lease.revoke_requested" => {
                if let Some(l) = lease
                    && requested.len() < MAX_SAMPLES
                {
                    requested.entry(l.to_owned()).or_insert(e.time);
                }
            }
            "lease.revoked" => {
                if let Some(l) = lease {
                    if let Some(t) = requested.remove(l)
                        && self.revocation_ms.len() < MAX_SAMPLES
                    {
                        self.revocation_ms.push(t.until(e.time).max(0));
                    }
                    if e.reason.as_deref() == Some("leaked") {
                        self.contained_lease.insert(l.to_owned(), e.time);
                    }
                }
            }
            "lease.expired" => {
                self.expired += 1;
                if let Some(l) = lease {
                    requested.remove(l);
                }
            }
            "lease.revoke_failed" => self.revocation_failures += 1,
            "lease.issued" => self.issued += 1,
            "task.started" => {
                self.started += 1;
                if e.data.contains_key("parent") {
                    self.delegated += 1;
                }
            }
            "task.ended" => {
                let status = e
                    .data
                    .get("status")
                    .and_then(|v| v.as_str())
                    .unwrap_or("unknown");
                *self.ended.entry(status.to_owned()).or_default() += 1;
            }
            "approval.requested" => self.approvals.requested += 1,
            "approval.approved" => self.approvals.approved += 1,
            "approval.denied" => self.approvals.denied += 1,
            "approval.expired" => self.approvals.expired += 1,
            "approval.redeemed" => self.approvals.redeemed += 1,
            "approval.cancelled" => self.approvals.cancelled += 1,
            "leak.reported" => self.reported += 1,
            "leak.response" => {
                let outcome = e
                    .data
                    .get("outcome")
                    .and_then(|v| v.as_str())
                    .unwrap_or("unknown");
                *self.responses.entry(outcome.to_owned()).or_default() += 1;
                if matches!(outcome, "revoked" | "suspended")
                    && let Some(item) = e.data.get("item").and_then(|v| v.as_str())
                {
                    self.contained_item.entry(item.to_owned()).or_insert(e.time);
                }
            }
            "policy.reloaded" => self.reloads += 1,
            "auth.failed" => self.monitoring.auth_failures += 1,
            "proxy.denied" => self.monitoring.proxy_denials += 1,
            "proxy.usage" => self.monitoring.usage_summaries += 1,
            "console.signed_in" => self.monitoring.console_sign_ins += 1,
            k if k.starts_with("misuse.") || k.ends_with(".suspended") => {
                self.monitoring.misuse_events += 1;
            }
            k if k.ends_with(".rotated")
                && (k.starts_with("upstream.") || k.starts_with("inventory.")) =>
            {
                self.monitoring.rotations += 1;
            }
            _ => {}
        }
    }
}

/// The entry's age bucket.
fn bucket(age_days: i64) -> usize {
    match age_days {
        ..7 => 0,
        7..30 => 1,
        30..90 => 2,
        90..365 => 3,
        _ => 4,
    }
}

const BUCKETS: [&str; 5] = [
    "under 7 days",
    "7 to 30 days",
    "30 to 90 days",
    "90 days to a year",
    "over a year",
];

impl Broker {
    /// The compliance report (admin): live state judged per control.
    pub async fn compliance_report(
        &self,
        p: &Principal,
        deployment: &Deployment,
    ) -> Result<Report> {
        if let Err(e) = Self::require_admin(p) {
            self.deny("report.read", p, None, &e).await;
            return Err(e);
        }
        let now = self.now();
        let items = self.report_items().await?;
        let trail = self.report_trail().await?;
        let mut evidence = Evidence {
            deployment: deployment.clone(),
            ..Evidence::default()
        };
        evidence.inventory = self.inventory_evidence(&items, now, deployment).await?;
        evidence.leaks = leak_evidence(&items, &trail);
        let counts = self.store.counts().await?;
        evidence.leases = LeaseEvidence {
            by_state: counts
                .leases
                .iter()
                .map(|(s, n)| (s.as_str().to_owned(), *n))
                .collect(),
            revocation: Latency::of(trail.revocation_ms.clone()),
            revocation_failures: trail.revocation_failures,
            issued: trail.issued,
            expired: trail.expired,
        };
        evidence.tasks = TaskEvidence {
            active: counts.tasks_active,
            started: trail.started,
            delegated: trail.delegated,
            ended: trail.ended.clone(),
        };
        evidence.approvals = ApprovalEvidence {
            pending: self
                .store
                .list_approvals(Some(ApprovalStatus::Pending), 1000)
                .await?
                .len() as u64,
            ..trail.approvals.clone()
        };
        evidence.policy = self.policy_evidence(trail.reloads);
        evidence.audit = trail.audit.clone();
        evidence.monitoring = trail.monitoring.clone();
        let frameworks = controls::judge(&evidence);
        let summary = controls::summarise(&frameworks);
        Ok(Report {
            schema: SCHEMA,
            generated_at: now.rfc3339(),
            issuer: deployment.issuer.clone(),
            summary,
            evidence,
            frameworks,
        })
    }

    /// Every stored inventory entry, newest first, up to [`MAX_ITEMS`]
    /// (one more to tell that there were more).
    async fn report_items(&self) -> Result<Vec<InventoryItem>> {
        let mut out: Vec<InventoryItem> = Vec::new();
        let mut before: Option<String> = None;
        loop {
            let page = self.store.list_inventory(before.as_deref(), PAGE).await?;
            let full = page.len() as u32 == PAGE;
            before = page.last().map(|i| i.id.clone());
            out.extend(page);
            if !full || out.len() > MAX_ITEMS {
                break;
            }
        }
        Ok(out)
    }

    async fn inventory_evidence(
        &self,
        all: &[InventoryItem],
        now: Timestamp,
        d: &Deployment,
    ) -> Result<InventoryEvidence> {
        let limits = self.inventory_settings().config.limits;
        let mut ev = InventoryEvidence {
            truncated: all.len() > MAX_ITEMS,
            ..InventoryEvidence::default()
        };
        let items = &all[..all.len().min(MAX_ITEMS)];
        ev.entries = items.len() as u64;
        let mut buckets = [0u64; 5];
        let mut oldest: Option<&InventoryItem> = None;
        for i in items {
            *ev.by_status.entry(status_str(i.status).into()).or_default() += 1;
            *ev.by_origin.entry(origin_str(i.origin).into()).or_default() += 1;
            if !matches!(i.status, ItemStatus::Active | ItemStatus::Suspended) {
                continue;
            }
            ev.live += 1;
            if i.provider != "keymint" && i.lease.is_none() {
                ev.third_party_live += 1;
                if i.revocation.starts_with("automatic")
                    || d.leak_responses.contains_key(&i.provider)
                {
                    ev.third_party_automatic_revocation += 1;
                }
            }
            if i.environment.is_none() {
                ev.without_environment += 1;
            }
            let age_days = i.created_at.until(now).max(0) / DAY_MS;
            if let Some(b) = buckets.get_mut(bucket(age_days)) {
                *b += 1;
            }
            if oldest.is_none_or(|o| i.created_at < o.created_at) {
                oldest = Some(i);
            }
            let findings = inventory::evaluate(i, now, &limits);
            for f in &findings {
                *ev.findings.entry(f.kind.as_str().into()).or_default() += 1;
            }
            if !findings.is_empty() && ev.attention.len() < MAX_ATTENTION {
                ev.attention.push(Attention {
                    id: i.id.clone(),
                    name: i.name.clone(),
                    provider: i.provider.clone(),
                    owner: i
                        .business_owner
                        .clone()
                        .or_else(|| i.technical_owner.clone()),
                    purpose: i.purpose.clone(),
                    environment: i.environment.clone(),
                    locations: i
                        .sightings
                        .iter()
                        .take(3)
                        .map(|s| s.location.clone())
                        .collect(),
                    findings: findings.iter().map(|f| f.kind.as_str().into()).collect(),
                });
            }
        }
        ev.oldest = oldest.map(|o| Oldest {
            id: o.id.clone(),
            name: o.name.clone(),
            provider: o.provider.clone(),
            created_at: o.created_at.rfc3339(),
            age_days: o.created_at.until(now).max(0) / DAY_MS,
        });
        ev.age_buckets = BUCKETS
            .iter()
            .zip(buckets)
            .map(|(label, count)| Bucket { label, count })
            .collect();
        ev.live_leases = self
            .store
            .counts()
            .await?
            .leases
            .iter()
            .filter(|(s, _)| *s == keymint_core::model::LeaseState::Active)
            .map(|(_, n)| *n)
            .sum();
        Ok(ev)
    }

    /// One pass over the whole chain: verified as `audit verify` does, and
    /// counted.
    async fn report_trail(&self) -> Result<Trail> {
        let mut t = Trail::default();
        let mut requested: HashMap<String, Timestamp> = HashMap::new();
        // Stored lines, so that an event edited into something that no
        // longer reads as one is a finding, not a failed report.
        let r = self.walk_stored_chain(|e| t.see(e, &mut requested)).await?;
        t.audit.events = r.events;
        t.audit.last_seq = r.last_seq;
        t.audit.problem = r.problem.map(|p| p.to_string());
        t.audit.chain_intact = t.audit.problem.is_none();
        Ok(t)
    }

    fn policy_evidence(&self, reloads: u64) -> PolicyEvidence {
        let roles = self.roles();
        let egress: Vec<_> = roles.iter().filter_map(|r| r.egress()).collect();
        PolicyEvidence {
            policies: self.policy.current().ids(),
            roles: roles.len() as u64,
            egress_roles: egress.len() as u64,
            egress_roles_with_limits: egress
                .iter()
                .filter(|e| {
                    let p = &e.proxy;
                    p.max_requests.is_some()
                        || p.max_input_tokens.is_some()
                        || p.max_output_tokens.is_some()
                        || p.max_spend_usd.is_some()
                        || p.requests_per_minute.is_some()
                        || p.tokens_per_minute.is_some()
                })
                .count() as u64,
            egress_roles_with_allow_lists: egress
                .iter()
                .filter(|e| !e.proxy.models.is_empty() || !e.proxy.endpoints.is_empty())
                .count() as u64,
            reloads,
        }
    }
}

fn leak_evidence(items: &[InventoryItem], t: &Trail) -> LeakEvidence {
    let mut ev = LeakEvidence {
        reported: t.reported,
        responses: t.responses.clone(),
        ..LeakEvidence::default()
    };
    let mut contain = Vec::new();
    for i in items.iter().take(MAX_ITEMS) {
        let Some(leaked) = i.leaked_at else { continue };
        ev.leaked_entries += 1;
        match i.status {
            ItemStatus::Revoked | ItemStatus::Retired => ev.revoked += 1,
            ItemStatus::Suspended => ev.suspended += 1,
            ItemStatus::Active => ev.still_active += 1,
        }
        let done = t.contained_item.get(&i.id).copied().or_else(|| {
            i.lease
                .as_ref()
                .and_then(|l| t.contained_lease.get(l).copied())
        });
        if let Some(done) = done {
            contain.push(leaked.until(done).max(0));
        }
    }
    ev.time_to_contain = Latency::of(contain);
    ev
}

fn status_str(s: ItemStatus) -> &'static str {
    match s {
        ItemStatus::Active => "active",
        ItemStatus::Suspended => "suspended",
        ItemStatus::Revoked => "revoked",
        ItemStatus::Retired => "retired",
    }
}

fn origin_str(o: Origin) -> &'static str {
    match o {
        Origin::Upstream => "upstream",
        Origin::Issued => "issued",
        Origin::Registered => "registered",
        Origin::Scan => "scan",
        Origin::Imported => "imported",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_nearest_rank() {
        let l = Latency::of((1..=100).rev().collect());
        assert_eq!(l.samples, 100);
        assert_eq!(l.p50_ms, Some(50));
        assert_eq!(l.p99_ms, Some(99));
        assert_eq!(l.max_ms, Some(100));
        let one = Latency::of(vec![7]);
        assert_eq!(
            (one.p50_ms, one.p99_ms, one.max_ms),
            (Some(7), Some(7), Some(7))
        );
        assert_eq!(Latency::of(vec![]).p50_ms, None);
    }

    #[test]
    fn ages_fall_in_their_buckets() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(6), 0);
        assert_eq!(bucket(7), 1);
        assert_eq!(bucket(89), 2);
        assert_eq!(bucket(90), 3);
        assert_eq!(bucket(365), 4);
    }
}
