//! Lifecycle: what happens to leases after they are issued. Revocation with
//! retry and backoff, the expiry manager's sweeps (timed-out tasks, expired
//! leases, due retries, stale approvals), retention, and reconciliation of
//! what a crash or a provider left behind.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keymint_core::Timestamp;
use keymint_core::audit::{AuditDraft, Outcome};
use keymint_core::model::{EndReason, Lease, LeaseState, TaskStatus};
use keymint_core::role::EngineKind;
use keymint_engines::{Engine, EngineError};
use keymint_store::{END_TASK_LEASES, LeaseSelector, RevocationDone};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{Broker, Result};

/// Retry delay after `attempts` failed revocations: 1 s, 2 s, 4 s … 30 s.
/// The cap is low so that a credential of an ended task is removed within
/// 30 s of its provider answering again (docs/design/0020).
pub fn backoff_ms(attempts: u32) -> i64 {
    let exp = attempts.saturating_sub(1).min(9);
    (1000_i64 << exp).min(MAX_BACKOFF_MS)
}

/// The longest gap between two attempts at one revocation.
pub const MAX_BACKOFF_MS: i64 = 30_000;

/// Rows one sweep, reconciliation or retention step reads at a time.
const SWEEP_BATCH: u32 = 1000;

/// How many revocations run at once against one provider (one engine and
/// database), so that one slow provider holds at most this many and never
/// delays another. Below the PostgreSQL pool's size, so revocations leave
/// admin connections for issuance.
pub const REVOCATIONS_PER_PROVIDER: usize = 4;

/// How long one provider call (waiting for a turn included) may take
/// before it counts as failed and is retried later. Below
/// [`keymint_store::REVOCATION_CLAIM_MS`], so an attempt always ends before
/// its claim runs out.
pub const PROVIDER_DEADLINE: Duration = Duration::from_secs(15);

/// Confirmed revocations written to the store at once.
const FINISH_BATCH: usize = 500;

/// Which provider a revocation goes to: the engine and, for database
/// engines, the configured database.
fn provider_of(l: &Lease) -> String {
    match l.engine_data.get("database").and_then(|d| d.as_str()) {
        Some(db) => format!("{}/{db}", l.engine),
        None => l.engine.as_str().to_owned(),
    }
}

/// Revocations being driven right now, per provider: a bound on how many
/// run at once, and the leases in flight (so that a sweep never starts a
/// second attempt at a lease whose first is still waiting for its turn).
#[derive(Debug, Default)]
pub(crate) struct Revocations {
    slots: std::sync::Mutex<HashMap<String, Arc<Semaphore>>>,
    in_flight: std::sync::Mutex<HashSet<String>>,
    /// Milliseconds; 0 means [`PROVIDER_DEADLINE`].
    deadline_ms: AtomicU64,
}

impl Revocations {
    fn slots(&self, provider: &str) -> Arc<Semaphore> {
        let mut m = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(
            m.entry(provider.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(REVOCATIONS_PER_PROVIDER))),
        )
    }

    /// Marks `leases` in flight; returns those that were not already, and
    /// a guard that lets go of them all when dropped (also when the driving
    /// future is dropped half-way: a cancelled request).
    fn claim(&self, leases: Vec<Lease>) -> (Vec<Lease>, InFlight<'_>) {
        let mut set = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mine: Vec<Lease> = leases
            .into_iter()
            .filter(|l| set.insert(l.id.clone()))
            .collect();
        let ids = mine.iter().map(|l| l.id.clone()).collect();
        (mine, InFlight { of: self, ids })
    }

    fn release(&self, id: &str) {
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }

    pub(crate) fn deadline(&self) -> Duration {
        match self.deadline_ms.load(Ordering::Relaxed) {
            0 => PROVIDER_DEADLINE,
            ms => Duration::from_millis(ms),
        }
    }
}

/// Leases one driver holds in flight; let go of when dropped.
struct InFlight<'a> {
    of: &'a Revocations,
    ids: Vec<String>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut set = self
            .of
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for id in &self.ids {
            set.remove(id);
        }
    }
}

impl Broker {
    /// Sets the deadline of every provider call (default
    /// [`PROVIDER_DEADLINE`]); tests shorten it.
    pub fn set_provider_deadline(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
        self.revocations.deadline_ms.store(ms, Ordering::Relaxed);
    }

    /// The deadline of every provider call.
    pub fn provider_deadline(&self) -> Duration {
        self.revocations.deadline()
    }

    /// Runs one provider call under the provider deadline; running out of
    /// time is a failure worth retrying.
    pub(crate) async fn within_deadline<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T, EngineError>>,
    ) -> Result<T, EngineError> {
        let d = self.provider_deadline();
        tokio::time::timeout(d, call).await.unwrap_or_else(|_| {
            Err(EngineError::Unavailable(format!(
                "{what}: no answer within {d:?}"
            )))
        })
    }

    /// Calls the engine for each lease in `revoking`; confirms the ones that
    /// succeed and schedules a retry for the others. Revocations run
    /// concurrently, at most [`REVOCATIONS_PER_PROVIDER`] per provider, each
    /// under the provider deadline, and are recorded as they finish, so a
    /// slow provider delays neither another provider's revocations nor
    /// their confirmation. Leases already being driven are skipped.
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
        if leases.iter().any(|l| l.engine == EngineKind::Ssh) {
            // The CAs' KRLs must list these certificates from now on.
            self.krl.generation.fetch_add(1, Ordering::Release);
        }
        let (leases, _in_flight) = self.revocations.claim(leases);
        let deadline = self.provider_deadline();
        let mut done = Vec::new();
        let mut calls = JoinSet::new();
        let mut result = Ok(());
        for l in leases {
            let engine = self.engines.get(&l.engine).cloned();
            match engine {
                // Nothing outside keymint to call: confirmed at once.
                Some(e) if e.is_local() => {
                    let outcome = e.revoke(&l).await;
                    if let Err(err) = self.settle(l, outcome, &mut done).await {
                        result = Err(err);
                    }
                }
                Some(e) => {
                    let slots = self.revocations.slots(&provider_of(&l));
                    calls.spawn(async move {
                        let attempt = async {
                            let _turn = slots.acquire_owned().await.map_err(|_| {
                                EngineError::Internal("the revocation slots are closed".into())
                            })?;
                            e.revoke(&l).await
                        };
                        let outcome = tokio::time::timeout(deadline, attempt)
                            .await
                            .unwrap_or_else(|_| {
                                Err(EngineError::Unavailable(format!(
                                    "no answer within {deadline:?}"
                                )))
                            });
                        (l, outcome)
                    });
                }
                None => {
                    let outcome = Err(EngineError::Internal(format!(
                        "engine `{}` is not configured",
                        l.engine
                    )));
                    if let Err(err) = self.settle(l, outcome, &mut done).await {
                        result = Err(err);
                    }
                }
            }
            if done.len() >= FINISH_BATCH {
                self.finish(&mut done).await?;
            }
        }
        self.finish(&mut done).await?;
        // Record what finished as it finishes: the calls that answered at
        // once together, without waiting for a slower one.
        while let Some(joined) = calls.join_next().await {
            let mut ready = vec![joined];
            while let Some(more) = calls.try_join_next() {
                ready.push(more);
            }
            for joined in ready {
                match joined {
                    Ok((l, outcome)) => {
                        if let Err(err) = self.settle(l, outcome, &mut done).await {
                            result = Err(err);
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "a revocation call panicked; the sweeper retries it");
                    }
                }
            }
            self.finish(&mut done).await?;
        }
        result
    }

    /// Records one provider answer: a confirmation joins `done`, a failure
    /// is written with its next attempt at once. Either way the lease is no
    /// longer in flight once this returns.
    async fn settle(
        &self,
        l: Lease,
        outcome: Result<(), EngineError>,
        done: &mut Vec<(String, RevocationDone)>,
    ) -> Result<()> {
        let now = self.now();
        match outcome {
            Ok(()) => {
                let reason = l.end_reason.unwrap_or(EndReason::Revoked);
                let kind = if reason == EndReason::Expired {
                    self.metrics.leases_expired.fetch_add(1, Ordering::Relaxed);
                    "lease.expired"
                } else {
                    self.metrics.leases_revoked.fetch_add(1, Ordering::Relaxed);
                    "lease.revoked"
                };
                done.push((
                    l.id.clone(),
                    RevocationDone {
                        lease: l.id.clone(),
                        audit: AuditDraft::new(now, kind, "system")
                            .task(&l.task)
                            .lease(&l.id)
                            .workload(&l.workload)
                            .role(&l.role)
                            .fingerprint(&l.fingerprint)
                            .reason(reason.as_str()),
                    },
                ));
                Ok(())
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
                let written = self.store.revocation_failed(&l.id, next, &msg, ev).await;
                self.revocations.release(&l.id);
                written?;
                Ok(())
            }
        }
    }

    /// Writes the confirmed revocations in `done` and lets go of them.
    async fn finish(&self, done: &mut Vec<(String, RevocationDone)>) -> Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        let (ids, batch): (Vec<String>, Vec<RevocationDone>) =
            std::mem::take(done).into_iter().unzip();
        let written = self.store.finish_revocations(batch, self.now()).await;
        for id in &ids {
            self.revocations.release(id);
        }
        written?;
        self.notify_audit();
        Ok(())
    }

    /// Drives `leases` in a task of its own; with `wait`, until every call
    /// has answered or run out its deadline, else not at all (the expiry
    /// manager goes on while a slow provider's calls run).
    async fn drive_in_background(self: &Arc<Self>, leases: Vec<Lease>, wait: bool) {
        if leases.is_empty() {
            return;
        }
        let b = Arc::clone(self);
        let driving = tokio::spawn(async move {
            if let Err(e) = b.drive_revocations(leases).await {
                tracing::error!(error = %e, "recording revocations failed; the sweeper retries them");
            }
        });
        if wait {
            let _ = driving.await;
        }
    }

    /// One pass of the expiry manager at `now`: times out tasks, expires
    /// leases and retries due revocations. Works in bounded batches straight
    /// from the store's indexes; nothing is held in memory between passes.
    /// Returns once every revocation it started has answered or run out its
    /// deadline (the expiry manager itself does not wait for them).
    pub async fn sweep(self: &Arc<Self>, now: Timestamp) -> Result<()> {
        self.sweep_pass(now, true).await
    }

    async fn sweep_pass(self: &Arc<Self>, now: Timestamp, wait: bool) -> Result<()> {
        // One indexed read decides whether there is anything to do at all.
        match self.store.next_deadline().await? {
            Some(next) if next <= now => {}
            _ => return Ok(()),
        }
        loop {
            let ids = self.store.timed_out_tasks(now, SWEEP_BATCH).await?;
            let mut leases = Vec::new();
            let mut rest = Vec::new();
            for id in &ids {
                let Some(ended) = self
                    .end_tree_leases(
                        id,
                        TaskStatus::TimedOut,
                        "system",
                        Some("deadline passed".into()),
                    )
                    .await?
                else {
                    continue;
                };
                leases.extend(ended.leases);
                if ended.more {
                    rest.extend(ended.tasks);
                }
            }
            self.drive_in_background(leases, wait).await;
            for task in &rest {
                self.revoke_ended(Some(task), wait).await?;
            }
            if (ids.len() as u32) < SWEEP_BATCH {
                break;
            }
        }
        loop {
            let leases = self.store.expire_due(now, SWEEP_BATCH).await?;
            let n = leases.len();
            self.drive_in_background(leases, wait).await;
            if (n as u32) < SWEEP_BATCH {
                break;
            }
        }
        let due = self.store.due_revocations(now, SWEEP_BATCH).await?;
        self.drive_in_background(due, wait).await;
        Ok(())
    }

    /// Takes the leases of ended tasks (of `task`, or of any) that
    /// [`keymint_store::Store::end_task`] left beyond its batch, batch by
    /// batch, and drives them in the background. Returns how many.
    pub(super) async fn revoke_ended(
        self: &Arc<Self>,
        task: Option<&str>,
        wait: bool,
    ) -> Result<usize> {
        let mut total = 0;
        loop {
            let batch = self
                .store
                .revoke_ended_leases(task, self.now(), "system", END_TASK_LEASES)
                .await?;
            let n = batch.len();
            total += n;
            self.drive_in_background(batch, wait).await;
            if n < END_TASK_LEASES as usize {
                return Ok(total);
            }
        }
    }

    /// At start nothing is in flight: a lease in `revoking` whose claim has
    /// not run out was being driven by a process that died. Drives those
    /// (and retries due within a claim's time) now instead of after the
    /// claim's [`keymint_store::REVOCATION_CLAIM_MS`]. Returns how many.
    ///
    /// On a shared store (replicas), other processes' claims are in flight
    /// too: only those of replicas that died are taken over
    /// (`Store::take_over_dead_claims`, docs/design/0022).
    pub async fn take_over_revocations(self: &Arc<Self>) -> Result<usize> {
        // Leases a crash left active in a task it had ended.
        let left = self.revoke_ended(None, true).await?;
        let horizon = if self.store.shared() {
            let now = self.now();
            self.store.take_over_dead_claims(now).await?;
            now
        } else {
            self.now().plus_millis(keymint_store::REVOCATION_CLAIM_MS)
        };
        let mut seen = HashSet::new();
        loop {
            let due = self.store.due_revocations(horizon, SWEEP_BATCH).await?;
            // A failed attempt comes back with a retry inside the horizon:
            // one attempt each here, the sweeper does the rest.
            let fresh: Vec<Lease> = due
                .into_iter()
                .filter(|l| seen.insert(l.id.clone()))
                .collect();
            if fresh.is_empty() {
                return Ok(left + seen.len());
            }
            self.drive_in_background(fresh, true).await;
        }
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
            let mut leases = Vec::new();
            for l in &stale {
                leases.extend(
                    self.store
                        .request_revocation(
                            LeaseSelector::Id(l.id.clone()),
                            EndReason::Reconciled,
                            self.now(),
                            "system",
                        )
                        .await?,
                );
            }
            total += leases.len();
            // Together: concurrent per provider, each under its deadline.
            self.drive_revocations(leases).await?;
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
            let managed = match self
                .within_deadline("listing credentials", engine.managed())
                .await
            {
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
                let outcome = self
                    .within_deadline("removing an orphan", engine.revoke(&orphan))
                    .await;
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
        // Beside the sweeps, so that a provider that hangs at start delays
        // nothing else.
        let b = Arc::clone(&self);
        tokio::spawn(async move {
            match b.take_over_revocations().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    leases = n,
                    "took over revocations an earlier process had claimed"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "taking over revocations failed; the sweeper retries them")
                }
            }
        });
        let mut next_prune = self.now();
        loop {
            let now = self.now();
            if let Err(e) = self.sweep_pass(now, false).await {
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
        assert_eq!(backoff_ms(6), 30_000);
        assert_eq!(backoff_ms(50), 30_000);
    }
}
