//! The scanner's closed loop: `keymint scan --report-to` sends what it found;
//! every finding is recorded in the audit trail, and every live keymint
//! token among them is revoked at once, with the reason `leaked`.
//!
//! The report is checked whole before anything happens, so a bad report
//! changes nothing. The server never learns a secret other than a keymint
//! token (which it needs to find the lease: it stores only a keyed hash),
//! and never writes one: audit events carry its own fingerprint.

use std::sync::atomic::Ordering;

use keymint_core::audit::AuditDraft;
use keymint_core::model::EndReason;
use keymint_core::token::{self, TokenKind};
use keymint_proto::{LeakReport, LeakedFinding, LeaksRecorded};
use keymint_store::LeaseSelector;

use super::{Broker, BrokerError, Principal, Result};

/// Findings per report: the scanner sends batches of 100.
pub const MAX_FINDINGS: usize = 1000;
/// Locations per finding.
pub const MAX_LOCATIONS: usize = 20;
const MAX_TEXT: usize = 1024;
const MAX_NAME: usize = 128;

fn check_text(what: &str, v: &str, max: usize) -> Result<()> {
    if v.is_empty() || !keymint_core::model::valid_text(v, max) {
        return Err(BrokerError::BadRequest(format!(
            "`{what}` must be 1 to {max} bytes without control or bidirectional formatting characters"
        )));
    }
    Ok(())
}

fn check(report: &LeakReport) -> Result<()> {
    check_text("source", &report.source, MAX_NAME)?;
    if report.findings.len() > MAX_FINDINGS {
        return Err(BrokerError::BadRequest(format!(
            "at most {MAX_FINDINGS} findings per report"
        )));
    }
    for (i, f) in report.findings.iter().enumerate() {
        check_finding(f).map_err(|e| match e {
            BrokerError::BadRequest(m) => BrokerError::BadRequest(format!("finding {i}: {m}")),
            other => other,
        })?;
    }
    Ok(())
}

fn check_finding(f: &LeakedFinding) -> Result<()> {
    check_text("rule", &f.rule, MAX_NAME)?;
    if f.fingerprint.is_empty()
        || f.fingerprint.len() > MAX_NAME
        || !f.fingerprint.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(BrokerError::BadRequest(
            "`fingerprint` must be 1 to 128 hex digits".into(),
        ));
    }
    if f.locations.len() > MAX_LOCATIONS {
        return Err(BrokerError::BadRequest(format!(
            "at most {MAX_LOCATIONS} locations per finding"
        )));
    }
    for l in &f.locations {
        check_text("location", l, MAX_TEXT)?;
    }
    if let Some(h) = &f.hint
        && !keymint_core::inventory::is_hint(h)
    {
        return Err(BrokerError::BadRequest(
            "`hint` must be the key's first characters, `…` and its last four".into(),
        ));
    }
    if let Some(e) = &f.environment {
        check_text("environment", e, MAX_NAME)?;
    }
    if let Some(t) = &f.token
        && token::check(t) != Ok(TokenKind::Access)
    {
        // Says why, never what: the message holds no part of the token.
        return Err(BrokerError::BadRequest(
            "`token` is not a well-formed keymint access token".into(),
        ));
    }
    Ok(())
}

impl Broker {
    /// Records the findings of a scan and revokes every leaked keymint
    /// token that is still live (admin only).
    pub async fn report_leaks(&self, p: &Principal, report: LeakReport) -> Result<LeaksRecorded> {
        if let Err(e) = Self::require_admin(p) {
            self.deny("leak.report", p, None, &e).await;
            return Err(e);
        }
        check(&report)?;
        let actor = p.actor();
        let mut out = LeaksRecorded::default();
        // keymint's own tokens first: revoking one is in keymint's hands and
        // takes a write, while another key's response waits on its
        // provider (up to 30 s a call), which must not hold a leaked token
        // live.
        let (tokens, keys): (Vec<&LeakedFinding>, Vec<&LeakedFinding>) =
            report.findings.iter().partition(|f| f.token.is_some());
        for f in tokens.into_iter().chain(keys) {
            let now = self.now();
            let mut ev = AuditDraft::new(now, "leak.reported", actor.clone())
                .data("source", report.source.as_str())
                .data("rule", f.rule.as_str())
                .data("scanner_fingerprint", f.fingerprint.as_str())
                .data("locations", f.locations.clone());
            if f.more_locations > 0 {
                ev = ev.data("more_locations", f.more_locations);
            }
            let Some(t) = &f.token else {
                self.store.append_audit(ev).await?;
                out.recorded += 1;
                // Into the inventory, then the provider's leak response
                // (docs/design/0027).
                let item = self
                    .record_leak(
                        &actor,
                        &f.fingerprint,
                        &f.rule,
                        f.hint.as_deref(),
                        None,
                        &f.locations,
                        f.environment.as_deref(),
                        &report.source,
                    )
                    .await?;
                out.responses
                    .push(self.respond_to_leak(&item, &f.locations, &actor).await);
                continue;
            };
            let fp = self.keyring.fingerprint(t.as_bytes());
            ev = ev.fingerprint(fp.clone());
            let found = self.store.lease_by_fingerprint(&fp).await?;
            let Some((lease, _)) = found else {
                self.store
                    .append_audit(ev.reason("token not issued here"))
                    .await?;
                out.recorded += 1;
                out.unknown_tokens += 1;
                continue;
            };
            self.store
                .append_audit(ev.lease(lease.id.clone()).task(lease.task.clone()))
                .await?;
            out.recorded += 1;
            let item = self
                .record_leak(
                    &actor,
                    &fp,
                    &f.rule,
                    None,
                    Some(&lease),
                    &f.locations,
                    f.environment.as_deref(),
                    &report.source,
                )
                .await?;
            let revoked = self
                .store
                .request_revocation(
                    LeaseSelector::Fingerprint(fp),
                    EndReason::Leaked,
                    now,
                    &actor,
                )
                .await?;
            if revoked.is_empty() {
                out.already_ended.push(lease.id);
            } else {
                self.metrics
                    .leaked_tokens_revoked
                    .fetch_add(revoked.len() as u64, Ordering::Relaxed);
                out.revoked.extend(revoked.iter().map(|l| l.id.clone()));
                self.drive_revocations(revoked).await?;
            }
            self.set_item_status(
                &item.id,
                keymint_core::inventory::ItemStatus::Revoked,
                &actor,
                "the leaked keymint token was revoked",
            )
            .await?;
        }
        self.metrics
            .leaks_reported
            .fetch_add(out.recorded, Ordering::Relaxed);
        self.notify_audit();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding() -> LeakedFinding {
        LeakedFinding {
            rule: "openai.project-key".into(),
            fingerprint: "ab12".into(),
            locations: vec!["src/app.py:3".into()],
            more_locations: 0,
            token: None,
            hint: None,
            environment: None,
        }
    }

    fn report(findings: Vec<LeakedFinding>) -> LeakReport {
        LeakReport {
            source: "keymint scan".into(),
            findings,
        }
    }

    #[test]
    fn a_well_formed_report_passes() {
        assert!(check(&report(vec![finding()])).is_ok());
    }

    #[test]
    fn bad_reports_are_refused_with_the_place() {
        let mut f = finding();
        f.fingerprint = "not hex".into();
        let e = check(&report(vec![finding(), f])).unwrap_err().to_string();
        assert!(e.contains("finding 1") && e.contains("fingerprint"), "{e}");

        let mut f = finding();
        f.locations = vec!["a\nforged audit line".into()];
        assert!(check(&report(vec![f])).is_err());

        let mut f = finding();
        f.token = Some("kmt_short".into());
        let e = check(&report(vec![f])).unwrap_err().to_string();
        assert!(!e.contains("kmt_short"), "{e}");

        assert!(check(&report(vec![finding(); MAX_FINDINGS + 1])).is_err());
        let mut r = report(vec![]);
        r.source = String::new();
        assert!(check(&r).is_err());
    }
}
