//! Background duties on exactly one replica (docs/design/0022-duties-and-replicas.md).
//!
//! Expiry sweeps, revocation retries, engine reconciliation, the approval
//! webhook and retention run only in the process that holds the store's
//! duty lease ([`keymint_store::Store::hold_duties`]). Every process asks
//! every [`DUTY_RENEW`]; the holder renews for [`DUTY_LEASE_MS`], so when it
//! dies another takes the lease within that time plus one renewal. A
//! process that cannot renew stops its duties at once, and the store
//! fences the duty writes of a holder that lost the lease without knowing
//! it (a paused process), so no duty runs twice at once.
//!
//! The holder also takes over what dead replicas left in flight: their
//! revocation claims fall due at once, their pending leases are
//! reconciled. A live replica's work is never touched (the store knows
//! each row's owner and each replica's heartbeat).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::Broker;

/// How long a holder's lease lasts without renewal: a dead holder's duties
/// are taken over within this plus [`DUTY_RENEW`].
pub const DUTY_LEASE_MS: u32 = 3_000;
/// How often every process renews or asks for the lease.
pub const DUTY_RENEW: Duration = Duration::from_secs(1);
/// A pending lease this process recorded longer ago than this is a
/// leftover (issuance finishes within the provider deadline, 15 s).
const PENDING_GRACE_MS: i64 = 60_000;

/// Starts one duty (a worker that runs until aborted).
pub type Duty = Box<dyn Fn() -> JoinHandle<()> + Send + Sync>;

/// The duties running here; stopped when the lease is lost and when
/// [`Broker::run_duties`] itself is stopped (dropped).
struct Running(Vec<JoinHandle<()>>);

impl Running {
    fn stop(&mut self) {
        for d in self.0.drain(..) {
            d.abort();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Broker {
    /// Holds the duty lease when it can and runs `duties` while it does,
    /// forever. On a store only this process opens, the lease is always
    /// held: the duties start at once and never stop.
    pub async fn run_duties(self: Arc<Self>, duties: Vec<Duty>) {
        let mut running = Running(Vec::new());
        let mut reconciling: Option<JoinHandle<()>> = None;
        let mut tick = tokio::time::interval(DUTY_RENEW);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let held = match self.store.hold_duties(DUTY_LEASE_MS).await {
                Ok(h) => h,
                Err(e) => {
                    // Unknown is not held: the lease may run out meanwhile.
                    tracing::warn!(error = %e, "cannot renew the duty lease");
                    None
                }
            };
            match held {
                Some(epoch) if running.0.is_empty() => {
                    tracing::info!(epoch, "holding the background duties");
                    self.metrics.duties_held.store(1, Ordering::Relaxed);
                    self.metrics.duties_taken.fetch_add(1, Ordering::Relaxed);
                    running.0 = duties.iter().map(|d| d()).collect();
                }
                Some(_) => {}
                None if !running.0.is_empty() => {
                    tracing::warn!("lost the background duties; stopping them");
                    self.metrics.duties_held.store(0, Ordering::Relaxed);
                    running.stop();
                }
                None => {}
            }
            if held.is_some() && self.store.shared() {
                self.take_over_dead(&mut reconciling).await;
            }
        }
    }

    /// Moves to `revoking` the leases left active in ended tasks (what a
    /// replica that died between two batches of a task's end left), and
    /// drives them; tried again until the store answers.
    async fn revoke_ended_left_by_the_dead(self: Arc<Self>) {
        let mut wait = DUTY_RENEW;
        loop {
            match self.revoke_ended(None, false).await {
                Ok(0) => return,
                Ok(n) => {
                    tracing::warn!(
                        leases = n,
                        "revoking leases a replica that died left active in ended tasks"
                    );
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot take the leases a dead replica left active in ended tasks; retrying");
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }

    /// What replicas that died left in flight: their revocation claims fall
    /// due (the sweeper drives them at once), their pending leases and this
    /// process's old ones are revoked.
    async fn take_over_dead(self: &Arc<Self>, reconciling: &mut Option<JoinHandle<()>>) {
        let now = self.now();
        match self.store.take_over_dead_claims(now).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(
                    leases = n,
                    "took over revocations claimed by a replica that died"
                );
                self.wake.notify_one();
                // A replica that died while ending a task with more leases
                // than one batch left the rest active; its claims are the
                // sign (docs/design/0020).
                let b = Arc::clone(self);
                tokio::spawn(async move { b.revoke_ended_left_by_the_dead().await });
            }
            Err(e) => tracing::error!(error = %e, "cannot take over dead replicas' claims"),
        }
        if reconciling.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let b = Arc::clone(self);
        // Provider calls under their deadlines: not on the renewal loop.
        *reconciling = Some(tokio::spawn(async move {
            match b.reconcile(now.plus_millis(-PENDING_GRACE_MS)).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    leases = n,
                    "revoked leases left pending by a replica that died"
                ),
                Err(e) => tracing::error!(error = %e, "reconciling dead replicas' leases failed"),
            }
        }));
    }
}
