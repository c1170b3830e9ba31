//! Suspensions by misuse monitoring (docs/design/0033): a task's
//! credentials, a workload's tasks or an upstream key, refused everywhere
//! until an operator lifts them.
//!
//! The store holds them ([`Store::suspend`], one active per subject); every
//! process keeps the active ones in memory ([`Suspensions`]), changed at
//! once by its own suspensions and lifts and re-read from the store every
//! second ([`Broker::run_suspension_refresh`]), so a suspension or a lift
//! made by another replica is in force here within that second. The check
//! sits after the token cache (`live_access_token`), so the API and the
//! proxy refuse a suspended task's token alike, and a lift needs no cache
//! flush: the token works again if its lease and task are still live.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use keymint_core::audit::AuditDraft;
use keymint_core::model::Task;
use keymint_core::monitor::{Scope, Suspension};
use keymint_core::rules::MAX_DELEGATION_DEPTH;

use super::{Broker, BrokerError, Principal, Result};

/// The active suspensions, by scope and subject → id.
#[derive(Debug, Default)]
pub struct Suspensions {
    active: RwLock<HashMap<(Scope, String), String>>,
    /// Bumped by this process's own suspensions and lifts: a refresh whose
    /// read began before one of them would undo it, so it is skipped.
    changes: AtomicU64,
}

impl Suspensions {
    fn get(&self, scope: Scope, subject: &str) -> Option<String> {
        let m = self.active.read().unwrap_or_else(|p| p.into_inner());
        if m.is_empty() {
            return None;
        }
        m.get(&(scope, subject.to_owned())).cloned()
    }

    /// Why credentials of a task are refused, if they are: `chain` is the
    /// task and the tasks it was delegated from, nearest first, each as
    /// (task id, workload). A suspended task suspends the tasks delegated
    /// from it, and a suspended workload every task it delegated, so that
    /// a sub-agent's token cannot carry on what its parent was stopped for.
    /// A task id that is empty (a task about to start) matches no task.
    pub fn refusal(&self, chain: &[(String, String)]) -> Option<String> {
        let m = self.active.read().unwrap_or_else(|p| p.into_inner());
        if m.is_empty() {
            return None;
        }
        chain.iter().enumerate().find_map(|(i, (task, workload))| {
            let own = i == 0;
            let (id, what) = if let Some(id) = m.get(&(Scope::Task, task.clone())) {
                let what = if own {
                    "the task's credentials are"
                } else {
                    "the credentials of a task this task was delegated from are"
                };
                (id, what)
            } else {
                let id = m.get(&(Scope::Workload, workload.clone()))?;
                let what = if own {
                    "the workload's tasks are"
                } else {
                    "the tasks of a workload this task was delegated from are"
                };
                (id, what)
            };
            Some(format!(
                "{what} suspended by misuse monitoring (`{id}`); an operator can lift it"
            ))
        })
    }

    fn is_empty(&self) -> bool {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// The suspension of `upstream`'s key, if any (its id).
    pub fn upstream(&self, upstream: &str) -> Option<String> {
        self.get(Scope::Upstream, upstream)
    }

    /// Takes `list` (read from the store after `seen` was taken) as the
    /// active set, unless this process changed the set since.
    fn replace(&self, list: &[Suspension], seen: u64) {
        let next: HashMap<_, _> = list
            .iter()
            .filter(|s| s.is_active())
            .map(|s| ((s.scope, s.subject.clone()), s.id.clone()))
            .collect();
        let mut m = self.active.write().unwrap_or_else(|p| p.into_inner());
        if self.changes.load(Ordering::Acquire) == seen {
            *m = next;
        }
    }

    fn insert(&self, s: &Suspension) {
        let mut m = self.active.write().unwrap_or_else(|p| p.into_inner());
        self.changes.fetch_add(1, Ordering::AcqRel);
        m.insert((s.scope, s.subject.clone()), s.id.clone());
    }

    fn remove(&self, s: &Suspension) {
        let mut m = self.active.write().unwrap_or_else(|p| p.into_inner());
        self.changes.fetch_add(1, Ordering::AcqRel);
        if m.get(&(s.scope, s.subject.clone())) == Some(&s.id) {
            m.remove(&(s.scope, s.subject.clone()));
        }
    }
}

/// Suspensions listed at most per `GET /v1/suspensions`.
const LIST_LIMIT: u32 = 1000;
/// The `rule` of a suspension an operator made by hand.
pub const MANUAL: &str = "manual";
const MAX_REASON: usize = 500;

impl Broker {
    /// The active suspensions this process enforces.
    pub fn suspensions(&self) -> &Arc<Suspensions> {
        &self.suspensions
    }

    /// Re-reads the active suspensions from the store: every one of them.
    /// A refresh that read only the newest (it read 1,000 until session
    /// 27) dropped the older ones from what every replica enforces, so
    /// the 1,001st suspension lifted the oldest without anyone lifting it.
    pub async fn refresh_suspensions(&self) -> Result<()> {
        let seen = self.suspensions.changes.load(Ordering::Acquire);
        let list = self.store.active_suspensions().await?;
        self.suspensions.replace(&list, seen);
        Ok(())
    }

    /// Every second, the active suspensions from the store (every replica
    /// runs this, not only the duty holder).
    pub async fn run_suspension_refresh(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Err(e) = self.refresh_suspensions().await {
                tracing::warn!(error = %e, "cannot read the suspensions");
            }
        }
    }

    /// Stores a suspension (audited as `monitor.suspended`) and enforces it
    /// here at once; `false` if the subject was already suspended.
    pub(crate) async fn suspend(&self, s: Suspension, audit: AuditDraft) -> Result<bool> {
        let stored = self.store.suspend(s.clone(), audit).await?;
        if stored {
            self.suspensions.insert(&s);
            self.notify_audit();
        }
        Ok(stored)
    }

    /// The task and the tasks it was delegated from, nearest first, as
    /// (task id, workload): what a suspension is checked against. A root
    /// task costs no read; a sub-task one per ancestor (at most the
    /// delegation depth).
    pub(crate) async fn ancestry(&self, task: &Task) -> Result<Vec<(String, String)>> {
        let mut chain = vec![(task.id.clone(), task.workload.clone())];
        let mut next = task.parent.clone();
        while let Some(id) = next {
            if chain.len() > MAX_DELEGATION_DEPTH {
                break;
            }
            match self.store.get_task(&id).await? {
                Some(t) => {
                    next = t.parent;
                    chain.push((t.id, t.workload));
                }
                // Removed by retention: it ended, and its sub-tasks with it.
                None => break,
            }
        }
        Ok(chain)
    }

    /// Refuses to give out credentials (start a task for `workload`, under
    /// `task` when it is a sub-task, or issue or renew in `task`) while
    /// misuse monitoring suspends the task, a task it descends from, or the
    /// workload of any of them: a suspension stops new credentials, not
    /// only the use of the tokens already out (docs/design/0033). Whoever
    /// asks, the admin included: an operator lifts the suspension first.
    pub(crate) async fn refuse_suspended(
        &self,
        workload: Option<&str>,
        task: Option<&Task>,
    ) -> Result<()> {
        if self.suspensions.is_empty() {
            return Ok(());
        }
        let mut chain = Vec::new();
        if let Some(w) = workload {
            chain.push((String::new(), w.to_owned()));
        }
        if let Some(t) = task {
            chain.extend(self.ancestry(t).await?);
        }
        match self.suspensions.refusal(&chain) {
            Some(m) => Err(BrokerError::Forbidden(m)),
            None => Ok(()),
        }
    }

    fn require_operator(p: &Principal) -> Result<()> {
        match p {
            Principal::Admin | Principal::Operator { .. } => Ok(()),
            Principal::Task { .. } | Principal::Node { .. } | Principal::Workload { .. } => Err(
                BrokerError::Forbidden("this needs the admin token or an operator's".into()),
            ),
        }
    }

    /// The suspensions (admin, operators): active ones, or all.
    pub async fn suspensions_list(&self, p: &Principal, all: bool) -> Result<Vec<Suspension>> {
        if let Err(e) = Self::require_operator(p) {
            self.deny("suspensions.list", p, None, &e).await;
            return Err(e);
        }
        Ok(self.store.list_suspensions(!all, LIST_LIMIT).await?)
    }

    /// Retention of the misuse monitor's history (a duty): every hour,
    /// the hourly figures and source addresses older than `keep_secs` are
    /// deleted; the first pass at once.
    pub async fn run_usage_retention(self: Arc<Self>, keep_secs: u64) {
        let keep_ms = i64::try_from(keep_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        let mut tick = tokio::time::interval(Duration::from_secs(3_600));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let before = self.now().plus_millis(-keep_ms);
            match self.store.prune_usage(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(rows = n, "usage retention removed old hours and sources"),
                Err(e) => tracing::warn!(error = %e, "usage retention failed; retrying next hour"),
            }
        }
    }

    /// Suspends by hand (admin, operators): a task's credentials, a
    /// workload's tasks or an upstream key, enforced like a rule's
    /// (`rule` = `manual`), audited as `monitor.suspended` with the
    /// operator as actor, lifted like any other.
    pub async fn suspension_add(
        &self,
        p: &Principal,
        scope: Scope,
        subject: &str,
        reason: &str,
    ) -> Result<Suspension> {
        if let Err(e) = Self::require_operator(p) {
            self.deny("suspensions.add", p, Some(subject), &e).await;
            return Err(e);
        }
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(BrokerError::BadRequest(
                "`reason` is required: say why, for whoever lifts it".into(),
            ));
        }
        super::inventory::check_text("reason", reason, MAX_REASON)?;
        let mut workload = None;
        match scope {
            Scope::Task => {
                if !keymint_core::id::is_valid("tsk_", subject) {
                    return Err(BrokerError::BadRequest(
                        "`subject` is not a task id (`tsk_…`)".into(),
                    ));
                }
                let t = self
                    .store
                    .get_task(subject)
                    .await?
                    .ok_or(BrokerError::NotFound("task"))?;
                workload = Some(t.workload);
            }
            Scope::Workload => {
                // The subject names a workload: the same names a task
                // may start with, no more.
                keymint_core::rules::check_workload_name("subject", subject)?;
                workload = Some(subject.to_owned());
            }
            Scope::Upstream => {
                if !self.inventory_settings().upstreams.contains_key(subject) {
                    return Err(BrokerError::NotFound("upstream"));
                }
            }
        }
        let now = self.now();
        let actor = p.actor();
        let s = Suspension {
            id: keymint_core::id::suspension_id(now),
            scope,
            subject: subject.to_owned(),
            rule: MANUAL.into(),
            reason: reason.to_owned(),
            created_at: now,
            created_by: actor.clone(),
            lifted_at: None,
            lifted_by: None,
        };
        let mut ev = AuditDraft::new(now, "monitor.suspended", actor)
            .outcome(keymint_core::audit::Outcome::Denied)
            .reason(reason.to_owned())
            .data("suspension", s.id.clone())
            .data("rule", MANUAL)
            .data("scope", scope.as_str())
            .data("subject", subject.to_owned());
        ev = match (scope, &workload) {
            (Scope::Task, Some(w)) => ev.task(subject).workload(w),
            (Scope::Workload, Some(w)) => ev.workload(w),
            _ => ev.data("upstream", subject.to_owned()),
        };
        if !self.suspend(s.clone(), ev).await? {
            return Err(BrokerError::BadRequest(format!(
                "the {} that `subject` names is suspended already",
                scope.as_str()
            )));
        }
        Ok(s)
    }

    /// Lifts an active suspension (admin, operators), audited as
    /// `monitor.lifted`. The subject's credentials work again if they are
    /// still live.
    pub async fn suspension_lift(&self, p: &Principal, id: &str) -> Result<Suspension> {
        if let Err(e) = Self::require_operator(p) {
            self.deny("suspensions.lift", p, Some(id), &e).await;
            return Err(e);
        }
        if !keymint_core::id::is_valid("sus_", id) {
            return Err(BrokerError::BadRequest(
                "`id` is not a suspension id (`sus_…`)".into(),
            ));
        }
        let now = self.now();
        let actor = p.actor();
        let ev = AuditDraft::new(now, "monitor.lifted", actor.clone()).data("suspension", id);
        let Some(s) = self.store.lift_suspension(id, &actor, now, ev).await? else {
            return Err(BrokerError::NotFound("active suspension"));
        };
        self.suspensions.remove(&s);
        self.notify_audit();
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keymint_core::Timestamp;

    fn sus(scope: Scope, subject: &str) -> Suspension {
        Suspension {
            id: keymint_core::id::suspension_id(Timestamp(1_800_000_000_000)),
            scope,
            subject: subject.into(),
            rule: "r".into(),
            reason: "x".into(),
            created_at: Timestamp(1_800_000_000_000),
            created_by: "keymint".into(),
            lifted_at: None,
            lifted_by: None,
        }
    }

    #[test]
    fn a_refresh_read_before_a_local_change_does_not_undo_it() {
        let x = Suspensions::default();
        let a = sus(Scope::Task, "tsk_a");
        // A refresh that read the store before this suspension committed.
        let seen = x.changes.load(Ordering::Acquire);
        x.insert(&a);
        x.replace(&[], seen);
        let chain = |t: &str, w: &str| vec![(t.to_owned(), w.to_owned())];
        assert!(x.refusal(&chain("tsk_a", "w")).unwrap().contains(&a.id));
        // A refresh that read it before this lift.
        let seen = x.changes.load(Ordering::Acquire);
        x.remove(&a);
        x.replace(std::slice::from_ref(&a), seen);
        assert_eq!(x.refusal(&chain("tsk_a", "w")), None);
        // A refresh after the change is taken whole.
        let w = sus(Scope::Workload, "w");
        let u = sus(Scope::Upstream, "openai");
        let seen = x.changes.load(Ordering::Acquire);
        x.replace(&[w.clone(), u.clone()], seen);
        assert!(
            x.refusal(&chain("tsk_b", "w"))
                .unwrap()
                .contains("workload's tasks")
        );
        assert_eq!(x.refusal(&chain("tsk_b", "v")), None);
        assert_eq!(x.upstream("openai"), Some(u.id));
        assert_eq!(x.upstream("anthropic"), None);
        // A sub-task of a suspended task, or delegated by a suspended
        // workload, is refused too; a sibling is not.
        let t = sus(Scope::Task, "tsk_p");
        let seen = x.changes.load(Ordering::Acquire);
        x.replace(&[w.clone(), t.clone()], seen);
        let sub = vec![
            ("tsk_c".to_owned(), "v".to_owned()),
            ("tsk_p".to_owned(), "v".to_owned()),
        ];
        assert!(x.refusal(&sub).unwrap().contains(&t.id));
        let delegated = vec![
            ("tsk_c".to_owned(), "v".to_owned()),
            ("tsk_q".to_owned(), "w".to_owned()),
        ];
        assert!(x.refusal(&delegated).unwrap().contains(&w.id));
        assert_eq!(x.refusal(&chain("tsk_q2", "v")), None);
        // A task about to start: its workload only.
        assert!(x.refusal(&chain("", "w")).is_some());
    }
}
