//! Human in the loop. A permit policy annotated `@approval(...)` holds a
//! request instead of granting it: the request is stored as a pending
//! [`Approval`] (the reply is 202 with its id), announced to a webhook, and
//! decided by an operator who is authorised to approve (Cedar action
//! `approve`) and is not the requester. Approval grants nothing by itself:
//! the requester redeems it, once, with the same token, before it expires,
//! and gets exactly what it asked for (the stored request is replayed with
//! `context.approved = true`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use keymint_core::audit::{AuditDraft, Outcome};
use keymint_core::id;
use keymint_core::model::{Approval, ApprovalStatus};
use keymint_policy::{Action, RequestFacts, Verdict};
use keymint_proto::{IssueLease, IssuedLease, StartTask, Task};
use keymint_store::ApprovalChange;

use super::{Broker, BrokerError, Principal, Result, backoff_ms};

/// What redeeming an approval gave.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum Redeemed {
    Task(Box<Task>),
    Lease(Box<IssuedLease>),
}

const NOTE_MAX: usize = 1024;

impl Broker {
    /// Stores a held request as a pending approval and returns the error
    /// that tells the caller to wait for it.
    #[allow(clippy::too_many_arguments, reason = "the facts of one held request")]
    pub(crate) async fn hold(
        &self,
        p: &Principal,
        action: Action,
        workload: String,
        role: String,
        task: Option<String>,
        request: serde_json::Value,
        policies: Vec<String>,
    ) -> BrokerError {
        let now = self.now();
        let a = Approval {
            id: id::approval_id(now),
            action: action.as_str().to_owned(),
            status: ApprovalStatus::Pending,
            requester: p.actor(),
            requester_key: p.requester_key(),
            workload,
            role,
            task,
            request,
            policies,
            created_at: now,
            expires_at: now.plus_secs(self.approval_ttl_secs),
            decided_by: None,
            decided_at: None,
            note: None,
        };
        let mut ev = AuditDraft::new(now, "approval.requested", p.actor())
            .outcome(Outcome::Denied)
            .workload(&a.workload)
            .role(&a.role)
            .reason("held for human approval")
            .data("approval", a.id.clone())
            .data("action", a.action.clone())
            .data("policies", a.policies.clone())
            .data("expires_at", a.expires_at.rfc3339());
        if let Some(t) = &a.task {
            ev = ev.task(t);
        }
        if let Err(e) = self.store.create_approval(a.clone(), ev).await {
            return e.into();
        }
        self.metrics
            .denials
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.notify_audit();
        self.approval_wake.notify_one();
        BrokerError::Held(Box::new(a))
    }

    /// Approvals, newest first (admin and operators).
    pub async fn list_approvals(
        &self,
        p: &Principal,
        status: Option<ApprovalStatus>,
        limit: u32,
    ) -> Result<Vec<Approval>> {
        match p {
            Principal::Admin | Principal::Operator { .. } => {
                Ok(self.store.list_approvals(status, limit).await?)
            }
            Principal::Task { .. } | Principal::Workload { .. } | Principal::Node { .. } => {
                Err(BrokerError::Forbidden(
                    "listing approvals needs the admin or an operator token".into(),
                ))
            }
        }
    }

    /// One approval: for the admin, operators, and its requester.
    pub async fn get_approval(&self, p: &Principal, id: &str) -> Result<Approval> {
        let a = self.approval(id).await?;
        match p {
            Principal::Admin | Principal::Operator { .. } => Ok(a),
            _ if a.requester_key == p.requester_key() => Ok(a),
            _ => Err(BrokerError::NotFound("approval")),
        }
    }

    /// Whether workload `name` asked for `a` through the task it is for:
    /// that task is `name`'s, or `name` delegated down to it. A request
    /// made in a sub-task, with the delegating agent's token or the
    /// sub-agent's (which the delegating workload may present), is the
    /// delegating workload's own; its operator may not decide it.
    async fn asked_under(&self, a: &Approval, name: &str) -> Result<bool> {
        let Some(task) = &a.task else {
            return Ok(false);
        };
        Ok(self
            .store
            .get_task(task)
            .await?
            .is_some_and(|t| t.workload == name || t.delegation.iter().any(|w| w == name)))
    }

    async fn approval(&self, id: &str) -> Result<Approval> {
        if !id::is_valid("apr_", id) {
            return Err(BrokerError::NotFound("approval"));
        }
        self.store
            .get_approval(id)
            .await?
            .ok_or(BrokerError::NotFound("approval"))
    }

    /// An operator approves (`approve = true`) or denies a pending request.
    /// The operator must be permitted the Cedar action `approve` on the
    /// role, and must not be the requester. Refusals are audited.
    pub async fn decide_approval(
        &self,
        p: &Principal,
        id: &str,
        approve: bool,
        note: Option<String>,
    ) -> Result<Approval> {
        let kind = if approve {
            "approval.approved"
        } else {
            "approval.denied"
        };
        match self.decide_inner(p, id, approve, note, kind).await {
            Ok(a) => Ok(a),
            Err(e) => {
                if matches!(e, BrokerError::Forbidden(_) | BrokerError::Policy { .. }) {
                    self.deny("approval.refused", p, None, &e).await;
                }
                Err(e)
            }
        }
    }

    async fn decide_inner(
        &self,
        p: &Principal,
        id: &str,
        approve: bool,
        note: Option<String>,
        kind: &'static str,
    ) -> Result<Approval> {
        let Principal::Operator { name } = p else {
            return Err(BrokerError::Forbidden(
                "deciding an approval needs an operator token".into(),
            ));
        };
        if let Some(n) = &note
            && !keymint_core::model::valid_text(n, NOTE_MAX)
        {
            return Err(BrokerError::BadRequest(format!(
                "`note` must be at most {NOTE_MAX} bytes without control or bidirectional formatting characters"
            )));
        }
        let a = self.approval(id).await?;
        if a.requester_key == p.requester_key()
            || &a.workload == name
            || self.asked_under(&a, name).await?
        {
            return Err(BrokerError::Forbidden(format!(
                "operator `{name}` may not decide a request of their own"
            )));
        }
        // A request is for its task: once the task has ended (or is past
        // its deadline, not yet swept) there is nothing left to approve.
        // An expired approval says so itself (below).
        if approve
            && self.now() < a.expires_at
            && let Some(task) = &a.task
        {
            let ended = match self.store.get_task(task).await? {
                Some(t) if t.status.is_active() && self.now() < t.expires_at => None,
                Some(t) if t.status.is_active() => Some("timed_out"),
                Some(t) => Some(t.status.as_str()),
                None => Some("gone"),
            };
            if let Some(how) = ended {
                return Err(BrokerError::Conflict(format!(
                    "approval `{}` is for task `{task}`, which has ended (`{how}`); \
                     nothing was approved",
                    a.id
                )));
            }
        }
        let role = self.role(&a.role)?.clone();
        let facts = RequestFacts {
            subject: a.workload.clone(),
            task: a.task.clone().unwrap_or_default(),
            intent: text_field(&a.request, "intent"),
            purpose: text_field(&a.request, "purpose"),
            environment: text_field(&a.request, "environment"),
            ..RequestFacts::default()
        };
        // Who may approve is policy too: the operator is the principal.
        let q = keymint_policy::Query {
            action: Action::Approve,
            principal: keymint_policy::Principal {
                id: name.clone(),
                method: "operator".into(),
                issuer: String::new(),
                attributes: Default::default(),
            },
            role: super::decision::role_facts(&role),
            context: RequestFacts {
                time: self.now().unix_seconds(),
                source_ip: super::SOURCE_IP.try_with(|ip| *ip).ok(),
                ..facts
            },
        };
        let d = self
            .policy
            .current()
            .decide_within(&q, self.policy.decision_budget());
        if d.verdict != Verdict::Allow {
            return Err(BrokerError::Policy {
                verdict: Verdict::Deny,
                reason: format!("operator `{name}` may not approve here: {}", d.reason()),
                policies: d.policies,
                action: Action::Approve,
                workload: a.workload,
                role: a.role,
                timed_out: d.timed_out,
            });
        }
        let now = self.now();
        let mut ev = AuditDraft::new(now, kind, p.actor())
            .workload(&a.workload)
            .role(&a.role)
            .data("approval", a.id.clone())
            .data("action", a.action.clone())
            .data("requester", a.requester.clone())
            .data("policies", d.policies);
        if let Some(t) = &a.task {
            ev = ev.task(t);
        }
        if let Some(n) = &note {
            ev = ev.data("note", n.clone());
        }
        let to = if approve {
            ApprovalStatus::Approved
        } else {
            ApprovalStatus::Denied
        };
        let changed = self
            .store
            .transition_approval(ApprovalChange {
                id: a.id.clone(),
                from: ApprovalStatus::Pending,
                to,
                by: Some(name.clone()),
                note,
                now,
                audit: ev,
            })
            .await?;
        self.notify_audit();
        match changed {
            Some(a) => Ok(a),
            None => Err(self.not_open_now(&a, now).await),
        }
    }

    /// The requester redeems an approved request, once: the stored request
    /// runs again, as the same principal, with `context.approved = true`.
    /// A refused redemption (a replay, another token, a denied or expired
    /// approval) is audited.
    pub async fn redeem_approval(&self, p: &Principal, id: &str) -> Result<Redeemed> {
        match self.redeem_inner(p, id).await {
            Err(e @ BrokerError::Forbidden(_)) => {
                self.deny("approval.redeem_refused", p, None, &e).await;
                Err(e)
            }
            other => other,
        }
    }

    async fn redeem_inner(&self, p: &Principal, id: &str) -> Result<Redeemed> {
        let a = self.approval(id).await?;
        if a.requester_key != p.requester_key() {
            return Err(BrokerError::Forbidden(
                "only the token that made the request may redeem its approval".into(),
            ));
        }
        // What the approval holds is read before it is marked used: an
        // approval this route cannot carry out (another kind, such as an
        // OAuth token request) stays approved for the route that can.
        let bad = |_| BrokerError::BadRequest("this approval is not redeemed on this route".into());
        let pending = match a.action.as_str() {
            "start_task" | "delegate" => {
                Pending::Task(serde_json::from_value(a.request.clone()).map_err(bad)?)
            }
            "issue" => Pending::Lease(serde_json::from_value(a.request.clone()).map_err(bad)?),
            _ => {
                return Err(BrokerError::BadRequest(
                    "this approval is not redeemed on this route".into(),
                ));
            }
        };
        let now = self.now();
        let mut ev = AuditDraft::new(now, "approval.redeemed", p.actor())
            .workload(&a.workload)
            .role(&a.role)
            .data("approval", a.id.clone())
            .data("action", a.action.clone());
        if let Some(t) = &a.task {
            ev = ev.task(t);
        }
        let used = self
            .store
            .transition_approval(ApprovalChange {
                id: a.id.clone(),
                from: ApprovalStatus::Approved,
                to: ApprovalStatus::Used,
                by: None,
                note: None,
                now,
                audit: ev,
            })
            .await?;
        let Some(used) = used else {
            return Err(self.not_open_now(&a, now).await);
        };
        self.notify_audit();
        let done = match pending {
            Pending::Task(req) => self
                .start_task_as(p, req, true)
                .await
                .map(|t| Redeemed::Task(Box::new(t))),
            Pending::Lease(req) => {
                let task = used.task.clone().unwrap_or_default();
                self.issue_as(p, &task, req, true)
                    .await
                    .map(|l| Redeemed::Lease(Box::new(l)))
            }
        };
        if done.is_err() {
            self.give_back(&used).await;
        }
        done
    }

    /// A redemption whose request was not carried out (refused, or failed
    /// at the store or the provider) granted nothing: the approval goes
    /// back from `used` to `approved` (audited `approval.restored`), so a
    /// refused redemption changes nothing and a passing failure does not
    /// cost the requester a second human decision. Only the redeemer that
    /// used it can give it back; it still expires at its time. A crash
    /// before this leaves it used: it errs towards granting less.
    async fn give_back(&self, used: &Approval) {
        let now = self.now();
        // Its task ended while the request ran (the end's transaction saw
        // it `used` and left it): nothing can carry it out any more, so it
        // is closed as the end would have closed it, not restored.
        if let Some(t) = &used.task
            && let Ok(Some(task)) = self.store.get_task(t).await
            && !task.status.is_active()
        {
            return self.cancel_used(used, &task).await;
        }
        let mut ev = AuditDraft::new(now, "approval.restored", used.requester.clone())
            .outcome(Outcome::Failure)
            .workload(&used.workload)
            .role(&used.role)
            .reason("the approved request was not carried out; it may be redeemed again")
            .data("approval", used.id.clone());
        if let Some(t) = &used.task {
            ev = ev.task(t);
        }
        let back = self
            .store
            .transition_approval(ApprovalChange {
                id: used.id.clone(),
                from: ApprovalStatus::Used,
                to: ApprovalStatus::Approved,
                by: None,
                note: None,
                now,
                audit: ev,
            })
            .await;
        match back {
            Ok(_) => self.notify_audit(),
            Err(e) => {
                tracing::warn!(approval = %used.id, error = %e, "cannot give back an approval whose request failed");
            }
        }
    }

    /// A used approval whose request was not carried out because its task
    /// ended meanwhile: `used → cancelled`, with the note and event the
    /// task's end gives its open approvals.
    async fn cancel_used(&self, used: &Approval, task: &keymint_core::model::Task) {
        let now = self.now();
        let status = task.status.as_str();
        let ev = keymint_store::cancelled_event(
            used,
            ApprovalStatus::Used,
            &task.id,
            status,
            now,
            &used.requester,
        );
        let closed = self
            .store
            .transition_approval(ApprovalChange {
                id: used.id.clone(),
                from: ApprovalStatus::Used,
                to: ApprovalStatus::Cancelled,
                by: None,
                note: Some(keymint_store::closing_note(
                    used.note.as_deref(),
                    &task.id,
                    status,
                )),
                now,
                audit: ev,
            })
            .await;
        match closed {
            Ok(_) => self.notify_audit(),
            Err(e) => {
                tracing::warn!(approval = %used.id, error = %e, "cannot close an approval whose task ended");
            }
        }
    }

    /// Why an approval did not move, as it stands now: another request may
    /// have moved it since it was read (a concurrent redemption used it).
    async fn not_open_now(&self, read: &Approval, now: keymint_core::Timestamp) -> BrokerError {
        match self.store.get_approval(&read.id).await {
            Ok(Some(a)) => not_open(&a, now),
            _ => not_open(read, now),
        }
    }

    /// Announces pending approvals to `url` (a JSON POST each), retried
    /// with backoff until delivered or no longer pending. Runs until the
    /// task is dropped.
    pub async fn run_approval_webhook(self: Arc<Self>, url: String) {
        let client = crate::webhook::Client::new();
        let mut attempts: HashMap<String, u32> = HashMap::new();
        loop {
            let now = self.now();
            match self.store.approvals_to_announce(now, 100).await {
                Ok(due) => {
                    for a in due {
                        let body = announcement(&a);
                        let next = match client.post_json(&url, &body).await {
                            Ok(()) => {
                                attempts.remove(&a.id);
                                None
                            }
                            Err(e) => {
                                let n = attempts.entry(a.id.clone()).or_insert(0);
                                *n += 1;
                                tracing::warn!(approval = %a.id, attempt = *n, error = %e, "approval webhook failed; will retry");
                                self.metrics
                                    .webhook_failures
                                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                Some(self.now().plus_millis(backoff_ms(*n)))
                            }
                        };
                        if let Err(e) = self.store.approval_announced(&a.id, next).await {
                            tracing::error!(error = %e, "cannot record an approval announcement");
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot read approvals to announce"),
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = self.approval_wake.notified() => {}
            }
        }
    }
}

/// Why an approval cannot move: expired, or no longer in the state asked.
fn not_open(a: &Approval, now: keymint_core::Timestamp) -> BrokerError {
    if now >= a.expires_at {
        return BrokerError::Forbidden(format!("approval `{}` has expired", a.id));
    }
    BrokerError::Forbidden(format!(
        "approval `{}` is {}, not open for this",
        a.id,
        a.status.as_str()
    ))
}

fn text_field(v: &serde_json::Value, k: &str) -> String {
    v.get(k)
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// The webhook's JSON: what a human needs to decide, nothing secret (held
/// requests carry no credentials).
pub fn announcement(a: &Approval) -> serde_json::Value {
    serde_json::json!({
        "type": "keymint.approval.pending",
        "approval": a.id,
        "action": a.action,
        "requester": a.requester,
        "workload": a.workload,
        "role": a.role,
        "task": a.task,
        "request": a.request,
        "policies": a.policies,
        "expires_at": a.expires_at.rfc3339(),
        "text": format!(
            "{} asks to {} in role {} for workload {} (held by {}); approve with `keymint approval approve {}` before {}",
            a.requester, a.action, a.role, a.workload, a.policies.join(", "), a.id, a.expires_at.rfc3339()
        ),
    })
}

/// A redeemable approval's request, read before the approval is used.
enum Pending {
    Task(StartTask),
    Lease(IssueLease),
}
