//! Lifecycle: what happens to leases after they are issued. Revocation with
//! retry and backoff, the expiry manager's sweeps (timed-out tasks, expired
//! leases, due retries, stale approvals), retention, and reconciliation of
//! what a crash or a provider left behind.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use keymint_core::Timestamp;
use keymint_core::audit::{AuditDraft, Outcome};
use keymint_core::model::{EndReason, Lease, LeaseState, TaskStatus};
use keymint_engines::{Engine, EngineError};
use keymint_store::{LeaseSelector, RevocationDone};

use super::{Broker, Result};

/// Retry delay after `attempts` failed revocations: 1 s, 2 s, 4 s … 5 min.
pub fn backoff_ms(attempts: u32) -> i64 {
    let exp = attempts.saturating_sub(1).min(9);
    (1000_i64 << exp).min(300_000)
}

/// Rows one sweep, reconciliation or retention step reads at a time.
const SWEEP_BATCH: u32 = 1000;

impl Broker {
    /// Calls the engine for each lease in `revoking`; confirms the ones that
    /// succeed and schedules a retry for the others.
    ///
    /// INVARIANT (DESIGN.md 3): a failed revocation stays in `revoking` with
    /// a next attempt time; nothing ever drops it.
    pub async fn drive_revocations(&self, leases: Vec<Lease>) -> Result<()> {
        if leases.is_empty() {
            return Ok(());
        }
        // The store has already moved these leases out of `active`: caches
        // of live tokens must look again before the next use.
        self.revocation_epoch.fetch_add(1, Ordering::Release);
        let mut done = Vec::with_capacity(leases.len());
        for l in leases {
            let result = match self.engines.get(&l.engine) {
                Some(e) => e.revoke(&l).await,
                None => Err(EngineError::Internal(format!(
                    "engine `{}` is not configured",
                    l.engine
                ))),
            };
            let now = self.now();
            match result {
                Ok(()) => {
                    let reason = l.end_reason.unwrap_or(EndReason::Revoked);
                    let kind = if reason == EndReason::Expired {
                        self.metrics.leases_expired.fetch_add(1, Ordering::Relaxed);
                        "lease.expired"
                    } else {
                        self.metrics.leases_revoked.fetch_add(1, Ordering::Relaxed);
                        "lease.revoked"
                    };
                    done.push(RevocationDone {
                        lease: l.id.clone(),
                        audit: AuditDraft::new(now, kind, "system")
                            .task(&l.task)
                            .lease(&l.id)
                            .workload(&l.workload)
                            .role(&l.role)
                            .fingerprint(&l.fingerprint)
                            .reason(reason.as_str()),
                    });
                }
                Err(e) => {
                    self.metrics
                        .revocation_failures
                        .fetch_add(1, Ordering::Relaxed);
                    let attempts = l.revoke_attempts + 1;
                    let next = now.plus_millis(backoff_ms(attempts));
                    let msg = e.to_string();
                    tracing::warn!(lease = %l.id, attempts, error = %msg, "revocation failed; will retry");
                    let ev = AuditDraft::new(now, "lease.revoke_failed", "system")
                        .outcome(Outcome::Failure)
                        .task(&l.task)
                        .lease(&l.id)
                        .fingerprint(&l.fingerprint)
                        .reason(msg.clone())
                        .data("attempts", attempts)
                        .data("next_attempt_at", next.rfc3339());
                    self.store.revocation_failed(&l.id, next, &msg, ev).await?;
                }
            }
        }
        self.store.finish_revocations(done, self.now()).await?;
        self.notify_audit();
        Ok(())
    }

    /// One pass of the expiry manager at `now`: times out tasks, expires
    /// leases and retries due revocations. Works in bounded batches straight
    /// from the store's indexes; nothing is held in memory between passes.
    pub async fn sweep(&self, now: Timestamp) -> Result<()> {
        // One indexed read decides whether there is anything to do at all.
        match self.store.next_deadline().await? {
            Some(next) if next <= now => {}
            _ => return Ok(()),
        }
        loop {
            let ids = self.store.timed_out_tasks(now, SWEEP_BATCH).await?;
            for id in &ids {
                self.end_tree(
                    id,
                    TaskStatus::TimedOut,
                    "system",
                    Some("deadline passed".into()),
                )
                .await?;
            }
            if (ids.len() as u32) < SWEEP_BATCH {
                break;
            }
        }
        loop {
            let leases = self.store.expire_due(now, SWEEP_BATCH).await?;
            let n = leases.len();
            self.drive_revocations(leases).await?;
            if (n as u32) < SWEEP_BATCH {
                break;
            }
        }
        let due = self.store.due_revocations(now, SWEEP_BATCH).await?;
        self.drive_revocations(due).await?;
        Ok(())
    }

    /// Revokes leases left `pending` by a crash between recording them and
    /// confirming them with the provider (DESIGN.md invariant 2).
    pub async fn reconcile(&self, before: Timestamp) -> Result<usize> {
        let mut total = 0;
        loop {
            let stale = self.store.stale_pending(before, SWEEP_BATCH).await?;
            if stale.is_empty() {
                break;
            }
            for l in &stale {
                let leases = self
                    .store
                    .request_revocation(
                        LeaseSelector::Id(l.id.clone()),
                        EndReason::Reconciled,
                        self.now(),
                        "system",
                    )
                    .await?;
                total += leases.len();
                self.drive_revocations(leases).await?;
            }
        }
        Ok(total)
    }

    /// Removes credentials that engines find at their providers, tagged by
    /// keymint, that no live lease accounts for (a lease that is unknown,
    /// revoked or expired). Credentials keymint did not tag are never
    /// listed by an engine, so never touched. Returns how many were removed.
    pub async fn reconcile_engines(&self) -> Result<usize> {
        let mut removed = 0;
        let mut engines: Vec<&Arc<dyn Engine>> = self.engines.values().collect();
        engines.sort_by_key(|e| e.kind());
        for engine in engines {
            let managed = match engine.managed().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(engine = engine.kind().as_str(), error = %e, "cannot list credentials to reconcile");
                    continue;
                }
            };
            for m in managed {
                let accounted = match self.store.get_lease(&m.lease_id).await? {
                    Some(l) => !l.state.is_final(),
                    None => false,
                };
                if accounted {
                    continue;
                }
                let now = self.now();
                let orphan = Lease {
                    id: m.lease_id.clone(),
                    task: String::new(),
                    workload: String::new(),
                    role: String::new(),
                    engine: engine.kind(),
                    scopes: Vec::new(),
                    state: LeaseState::Revoking,
                    revocability: engine.revocability(),
                    fingerprint: String::new(),
                    created_at: now,
                    expires_at: now,
                    ended_at: None,
                    end_reason: Some(EndReason::Reconciled),
                    revoke_attempts: 0,
                    next_attempt_at: None,
                    last_error: None,
                    engine_data: m.engine_data.clone(),
                };
                let outcome = engine.revoke(&orphan).await;
                let mut ev = AuditDraft::new(now, "credential.orphan_removed", "system")
                    .lease(&m.lease_id)
                    .reason("no live lease accounts for it")
                    .data("engine", engine.kind().as_str());
                if let Err(e) = &outcome {
                    ev = ev.outcome(Outcome::Failure).data("error", e.to_string());
                }
                self.store.append_audit(ev).await?;
                if outcome.is_ok() {
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            self.notify_audit();
        }
        Ok(removed)
    }

    /// Reconciles engines every `every` until the task is dropped.
    pub async fn run_engine_reconciliation(self: Arc<Self>, every: std::time::Duration) {
        loop {
            tokio::time::sleep(every).await;
            match self.reconcile_engines().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(removed = n, "removed credentials no lease accounts for"),
                Err(e) => tracing::error!(error = %e, "engine reconciliation failed"),
            }
        }
    }

    /// Retention: deletes tasks that ended more than
    /// `tasks.retain_ended` ago, with their leases, in bounded batches.
    pub async fn prune(&self, now: Timestamp) -> Result<keymint_store::Pruned> {
        let keep = self.limits.retain_ended_secs;
        let mut total = keymint_store::Pruned::default();
        if keep == 0 {
            return Ok(total);
        }
        let before = now.plus_millis(-i64::try_from(keep.saturating_mul(1000)).unwrap_or(i64::MAX));
        loop {
            let p = self.store.prune_ended(before, now, SWEEP_BATCH).await?;
            total.tasks += p.tasks;
            total.leases += p.leases;
            if p.tasks > 0 {
                self.notify_audit();
            }
            if p.tasks < u64::from(SWEEP_BATCH) {
                return Ok(total);
            }
        }
    }

    /// Runs the expiry manager until the task is dropped.
    pub async fn run_expiry(self: Arc<Self>) {
        let mut next_prune = self.now();
        loop {
            let now = self.now();
            if let Err(e) = self.sweep(now).await {
                tracing::error!(error = %e, "expiry sweep failed; retrying");
            }
            self.flush_auth_failures(now).await;
            if now >= next_prune {
                next_prune = now.plus_secs(60);
                match self.prune(now).await {
                    Ok(p) if p.tasks > 0 => tracing::info!(
                        tasks = p.tasks,
                        leases = p.leases,
                        "retention removed ended tasks"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "retention failed; retrying"),
                }
            }
            match self.store.expire_approvals(now, SWEEP_BATCH).await {
                Ok(gone) if !gone.is_empty() => self.notify_audit(),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "approval expiry failed; retrying"),
            }
            let next = self.store.next_deadline().await.ok().flatten();
            let wait_ms = next.map_or(1000, |t| self.now().until(t)).clamp(10, 1000);
            tokio::select! {
                () = tokio::time::sleep(std::time::Duration::from_millis(wait_ms as u64)) => {}
                () = self.wake.notified() => {
                    // Coalesce bursts of wake-ups.
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff_ms(1), 1000);
        assert_eq!(backoff_ms(2), 2000);
        assert_eq!(backoff_ms(5), 16_000);
        assert_eq!(backoff_ms(50), 300_000);
    }
}
