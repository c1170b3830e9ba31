//! Tasks: starting one (or a sub-task, never holding more than its parent),
//! reading, listing and keeping one alive, and ending one with its whole
//! sub-tree.

use std::borrow::Cow;
use std::sync::atomic::Ordering;

use keymint_core::audit::AuditDraft;
use keymint_core::model::{Role, Task, TaskStatus};
use keymint_core::rules::{self, RuleError, TaskGrant, TaskLimits, TaskRequest};
use keymint_core::{Timestamp, id};
use keymint_policy::{Action, RequestFacts, Verdict};
use keymint_proto::{EndStatus, StartTask};
use keymint_store::{END_TASK_LEASES, EndedTree, TaskEnd, TaskFilter, TaskGrantFn};

use super::{Broker, BrokerError, Principal, Result};

/// The task a task-token holder may act through: its task narrowed to the
/// token's own scopes and expiry, so that a token can never mint a lease or
/// a sub-task with more than it holds itself. Admins are not narrowed.
/// Borrowed as it is when there is nothing to narrow (an admin's request:
/// no copy of the task per issuance).
pub(super) fn narrowed<'t>(t: &'t Task, bound: Option<&(Vec<String>, Timestamp)>) -> Cow<'t, Task> {
    match bound {
        None => Cow::Borrowed(t),
        Some(_) => Cow::Owned(narrow(t.clone(), bound)),
    }
}

/// [`narrowed`], in place.
pub(super) fn narrow(mut t: Task, bound: Option<&(Vec<String>, Timestamp)>) -> Task {
    if let Some((scopes, expires)) = bound {
        t.scopes.retain(|s| scopes.contains(s));
        t.expires_at = t.expires_at.min(*expires);
    }
    t
}

/// A refusal against a task as a token narrows it ([`narrowed`]) names the
/// token where the token is the limit: the task itself may have the time
/// or the scope that the token acting for it lacks, and a message naming
/// only the task would send its reader to the wrong place.
pub(super) fn at_credential(
    e: RuleError,
    narrowed: Option<&Task>,
    bound: Option<&(Vec<String>, Timestamp)>,
) -> RuleError {
    let (Some(narrowed), Some((scopes, expires))) = (narrowed, bound) else {
        return e;
    };
    match e {
        RuleError::TtlPastTaskEnd {
            requested,
            remaining,
            task,
        } if narrowed.expires_at == *expires => RuleError::TtlPastCredentialEnd {
            requested,
            remaining,
            task,
        },
        RuleError::ScopeNotGranted {
            scope, position, ..
        } if scope.as_ref().is_none_or(|s| !scopes.contains(s)) => RuleError::ScopeNotGranted {
            scope,
            position,
            holder: format!("the credential acting for task `{}`", narrowed.id),
        },
        e => e,
    }
}

impl Broker {
    pub async fn start_task(&self, p: &Principal, req: StartTask) -> Result<Task> {
        self.start_task_as(p, req, false).await
    }

    /// Starts a task; `approved` when a human approved exactly this request
    /// (a redeemed approval).
    pub(crate) async fn start_task_as(
        &self,
        p: &Principal,
        req: StartTask,
        approved: bool,
    ) -> Result<Task> {
        let subject = req.parent.clone();
        let held = serde_json::to_value(&req).unwrap_or_default();
        match self.start_task_inner(p, req, approved).await {
            Ok(t) => Ok(t),
            Err(BrokerError::Policy {
                verdict: Verdict::NeedsApproval,
                policies,
                action,
                workload,
                role,
                ..
            }) if !approved => Err(self
                .hold(p, action, workload, role, subject, held, policies)
                .await),
            Err(e) => {
                if matches!(
                    e,
                    BrokerError::Rule(_) | BrokerError::Forbidden(_) | BrokerError::Policy { .. }
                ) {
                    self.deny("task.denied", p, subject.as_deref(), &e).await;
                }
                Err(e)
            }
        }
    }

    /// Starts one task as a sequence of steps: the parent, the role and the
    /// workload; what the rules would grant; what policy decides on it; then
    /// one transaction that grants again against the parent as it is then
    /// and records the task with its audit event.
    pub(super) async fn start_task_inner(
        &self,
        p: &Principal,
        req: StartTask,
        approved: bool,
    ) -> Result<Task> {
        let (parent_id, parent) = self.task_parent(p, req.parent.as_deref()).await?;
        let role_name = role_name(req.role.as_deref(), parent.as_ref())?;
        let workload = task_workload(req.workload.as_deref(), p, parent.is_some())?;
        self.refuse_suspended(Some(&workload), parent.as_ref())
            .await?;
        let role = self.role(&role_name)?.clone();
        let limits = self.limits;
        let bound = p.bound();
        let now = self.now();
        let actor = p.actor();
        let treq = TaskRequest {
            workload,
            intent: req.intent,
            purpose: req.purpose,
            environment: req.environment,
            ttl_secs: req.ttl_secs,
            idle_timeout_secs: req.idle_timeout_secs,
            scopes: req.scopes,
        };
        // What the rules would grant now: the facts policy decides on. The
        // store grants again inside its transaction, against the parent as
        // it is then, and can only narrow this.
        let bounded_parent = parent.as_ref().map(|t| narrowed(t, bound.as_ref()));
        let preview = rules::grant_task(&treq, &role, bounded_parent.as_deref(), &limits, now)
            .map_err(|e| at_credential(e, bounded_parent.as_deref(), bound.as_ref()))?;
        let (action, policy_workload, facts) =
            start_facts(&treq, &role, parent.as_ref(), &preview, approved, now);
        let decided_by = self.authorize(p, action, &policy_workload, &role, facts)?;
        let record = task_record(treq, role, bound, limits, now, actor, decided_by);
        let task = self.store.create_task(parent_id.as_deref(), record).await?;
        self.metrics.tasks_started.fetch_add(1, Ordering::Relaxed);
        self.notify_audit();
        Ok(task)
    }

    /// The parent of a new task: the one asked for (which the caller must
    /// be able to act on), else a task token's own task; with its row.
    async fn task_parent(
        &self,
        p: &Principal,
        asked: Option<&str>,
    ) -> Result<(Option<String>, Option<Task>)> {
        let parent_id = match (p, asked) {
            (_, Some(id)) => Some(self.task_for(p, id).await?.id),
            (Principal::Task { task, .. }, None) => Some(task.id.clone()),
            (Principal::Admin | Principal::Workload { .. }, None) => None,
            (Principal::Operator { .. }, None) => {
                return Err(BrokerError::Forbidden(
                    "an operator token approves requests; it does not start tasks".into(),
                ));
            }
            (Principal::Node { .. }, None) => {
                return Err(BrokerError::Forbidden(
                    "a node starts tasks only for a workload of its entries (`X-Keymint-Entry`)"
                        .into(),
                ));
            }
        };
        let parent = match &parent_id {
            Some(id) => self.store.get_task(id).await?,
            None => None,
        };
        Ok((parent_id, parent))
    }

    pub async fn get_task(&self, p: &Principal, id: &str) -> Result<Task> {
        self.task_for(p, id).await
    }

    pub async fn list_tasks(&self, p: &Principal, f: TaskFilter) -> Result<Vec<Task>> {
        Self::require_admin(p)?;
        Ok(self.store.list_tasks(&f).await?)
    }

    pub async fn heartbeat(&self, p: &Principal, id: &str) -> Result<Task> {
        let t = self.task_for(p, id).await?;
        self.store
            .touch_task(&t.id, self.now())
            .await?
            .ok_or(BrokerError::Rule(RuleError::TaskNotActive(t.id)))
    }

    /// Ends a task (`completed`, `failed`) or revokes it (`None`, admin or an
    /// ancestor task). Revokes every lease and sub-task under it. See
    /// [`Self::end_task_once`] for a task that has already ended.
    pub async fn end_task(
        &self,
        p: &Principal,
        id: &str,
        status: Option<EndStatus>,
        reason: Option<String>,
    ) -> Result<Task> {
        Ok(self.end_task_once(p, id, status, reason).await?.0)
    }

    /// [`Self::end_task`], saying whether the task had already ended. The
    /// first end of a task stands: the same end again changes nothing and
    /// answers `(task, true)`; an end with another status (or revoking an
    /// ended task) is refused with a conflict naming the status it has.
    pub async fn end_task_once(
        &self,
        p: &Principal,
        id: &str,
        status: Option<EndStatus>,
        reason: Option<String>,
    ) -> Result<(Task, bool)> {
        let t = self.task_for(p, id).await?;
        if let Some(r) = &reason
            && !keymint_core::model::valid_text(r, 1024)
        {
            return Err(BrokerError::BadRequest(
                "`reason` is too long or contains control or bidirectional formatting characters"
                    .into(),
            ));
        }
        let status = match status {
            Some(EndStatus::Completed) => TaskStatus::Completed,
            Some(EndStatus::Failed) => TaskStatus::Failed,
            None => TaskStatus::Revoked,
        };
        let ended = self.end_tree(&t.id, status, &p.actor(), reason).await?;
        let now = self
            .store
            .get_task(&t.id)
            .await?
            .ok_or(BrokerError::NotFound("task"))?;
        if ended {
            return Ok((now, false));
        }
        // Not active when the store looked (before, or by a concurrent
        // end): that end stands.
        if now.status != status {
            return Err(BrokerError::Conflict(format!(
                "task `{}` has already ended as `{}`; it cannot end again as `{}`",
                now.id,
                now.status.as_str(),
                status.as_str()
            )));
        }
        Ok((now, true))
    }

    pub(super) async fn end_tree(
        &self,
        id: &str,
        status: TaskStatus,
        actor: &str,
        reason: Option<String>,
    ) -> Result<bool> {
        let Some(ended) = self.end_tree_leases(id, status, actor, reason).await? else {
            return Ok(false);
        };
        self.drive_revocations(ended.leases).await?;
        if ended.more {
            // The rest in bounded batches, each its own transaction, so
            // issuance and other writes interleave.
            for task in &ended.tasks {
                loop {
                    let batch = self
                        .store
                        .revoke_ended_leases(Some(task), self.now(), actor, END_TASK_LEASES)
                        .await?;
                    let full = batch.len() >= END_TASK_LEASES as usize;
                    self.drive_revocations(batch).await?;
                    if !full {
                        break;
                    }
                }
            }
        }
        self.notify_audit();
        Ok(true)
    }

    /// Ends the task tree in the store; returns what it ended with the
    /// first batch of leases moved to `revoking`, for the caller to drive,
    /// or `None` if the task was not active.
    pub(super) async fn end_tree_leases(
        &self,
        id: &str,
        status: TaskStatus,
        actor: &str,
        reason: Option<String>,
    ) -> Result<Option<EndedTree>> {
        let ended = self
            .store
            .end_task(TaskEnd {
                id: id.to_owned(),
                status,
                now: self.now(),
                actor: actor.to_owned(),
                reason,
            })
            .await?;
        let Some(ended) = ended else {
            return Ok(None);
        };
        self.metrics.task_ended(status);
        for _ in 1..ended.tasks.len() {
            self.metrics.task_ended(TaskStatus::Revoked);
        }
        self.notify_audit();
        Ok(Some(ended))
    }
}

/// The role of a new task: the one asked for, else its parent's.
fn role_name(asked: Option<&str>, parent: Option<&Task>) -> Result<String> {
    match (asked, parent) {
        (Some(r), _) => Ok(r.to_owned()),
        (None, Some(pt)) => Ok(pt.role.clone()),
        (None, None) => Err(BrokerError::BadRequest("`role` is required".into())),
    }
}

/// The workload a new task is for. A workload starts top-level tasks only
/// for itself; a task token's sub-task is for its own workload unless it
/// names another.
fn task_workload(asked: Option<&str>, p: &Principal, has_parent: bool) -> Result<String> {
    match (asked, p) {
        (Some(w), Principal::Workload { name, .. }) if !has_parent && w != name.as_str() => {
            Err(BrokerError::Forbidden(format!(
                "a workload starts tasks for itself (`{name}`), not for another workload; \
                 to hand work to another workload, start a sub-task of your task"
            )))
        }
        (Some(w), _) => Ok(w.to_owned()),
        (None, Principal::Task { task, .. }) => Ok(task.workload.clone()),
        (None, Principal::Workload { name, .. }) => Ok(name.clone()),
        (None, Principal::Admin | Principal::Operator { .. } | Principal::Node { .. }) => {
            Err(BrokerError::BadRequest("`workload` is required".into()))
        }
    }
}

/// What policy decides a new task on: `start_task` by its workload, or
/// `delegate` by the parent's workload with the delegation chain; with the
/// task's intent, purpose, environment and what the rules would grant.
fn start_facts(
    treq: &TaskRequest,
    role: &Role,
    parent: Option<&Task>,
    preview: &TaskGrant,
    approved: bool,
    now: Timestamp,
) -> (Action, String, RequestFacts) {
    let (action, policy_workload, mut facts) = match parent {
        None => (
            Action::StartTask,
            treq.workload.clone(),
            RequestFacts::default(),
        ),
        Some(pt) => {
            let mut chain = pt.delegation.clone();
            chain.push(pt.workload.clone());
            let facts = RequestFacts {
                task: pt.id.clone(),
                parent_task: pt.parent.clone().unwrap_or_default(),
                delegation_depth: i64::try_from(chain.len()).unwrap_or(i64::MAX),
                delegation_chain: chain,
                ..RequestFacts::default()
            };
            (Action::Delegate, pt.workload.clone(), facts)
        }
    };
    facts.intent = treq.intent.clone().unwrap_or_default();
    facts.purpose = treq.purpose.clone().unwrap_or_default();
    facts.environment = treq.environment.clone().unwrap_or_default();
    facts.subject = treq.workload.clone();
    facts.destination = role.destination();
    facts.scopes = preview.scopes.clone();
    facts.ttl_secs = now.until(preview.expires_at) / 1000;
    facts.approved = approved;
    (action, policy_workload, facts)
}

/// The store's half of starting a task, run inside its transaction: grants
/// the task again against the parent as it is then (narrowed to the
/// caller's token), and builds the row and its `task.started` event.
fn task_record(
    treq: TaskRequest,
    role: Role,
    bound: Option<(Vec<String>, Timestamp)>,
    limits: TaskLimits,
    now: Timestamp,
    actor: String,
    decided_by: Vec<String>,
) -> TaskGrantFn {
    Box::new(move |parent| {
        let bounded = parent.map(|p| narrowed(p, bound.as_ref()));
        let g = rules::grant_task(&treq, &role, bounded.as_deref(), &limits, now)
            .map_err(|e| at_credential(e, bounded.as_deref(), bound.as_ref()))?;
        let mut delegation = parent.map(|p| p.delegation.clone()).unwrap_or_default();
        if let Some(p) = parent {
            delegation.push(p.workload.clone());
        }
        let task = Task {
            id: id::task_id(now),
            parent: parent.map(|p| p.id.clone()),
            workload: treq.workload,
            role: role.name.clone(),
            intent: treq.intent,
            purpose: treq.purpose,
            environment: treq.environment,
            scopes: g.scopes,
            status: TaskStatus::Active,
            created_at: now,
            expires_at: g.expires_at,
            idle_timeout_secs: g.idle_timeout_secs,
            last_seen_at: now,
            ended_at: None,
            delegation,
        };
        let mut ev = AuditDraft::new(now, "task.started", actor)
            .task(&task.id)
            .workload(&task.workload)
            .role(&task.role)
            .data("policies", decided_by)
            .data("scopes", task.scopes.clone())
            .data("expires_at", task.expires_at.rfc3339());
        for (k, v) in [
            ("intent", &task.intent),
            ("purpose", &task.purpose),
            ("environment", &task.environment),
            ("parent", &task.parent),
        ] {
            if let Some(v) = v {
                ev = ev.data(k, v.clone());
            }
        }
        if !task.delegation.is_empty() {
            ev = ev.data("act", act_claim(&task.delegation));
        }
        Ok((task, ev))
    })
}

/// The RFC 8693 `act` claim for a delegation chain (outermost first): the
/// most recent actor at the top, earlier ones nested inside.
pub fn act_claim(chain: &[String]) -> serde_json::Value {
    let mut act = serde_json::Value::Null;
    for w in chain {
        let mut o = serde_json::Map::new();
        o.insert("sub".into(), serde_json::Value::String(w.clone()));
        if !act.is_null() {
            o.insert("act".into(), act);
        }
        act = serde_json::Value::Object(o);
    }
    act
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn act_claim_nests_the_chain() {
        let v = act_claim(&["ci".into(), "planner".into()]);
        assert_eq!(
            v,
            serde_json::json!({"sub": "planner", "act": {"sub": "ci"}})
        );
    }
}
