//! Decision: after the rules (`keymint_core::rules`) have said what could be
//! granted, the Cedar policy in force decides whether it is (allow, deny, or
//! hold for approval); refusals are counted and audited with the deciding
//! policies. Also the policy set itself: what is in force, and reloading it.

use std::sync::atomic::Ordering;

use keymint_core::audit::{AuditDraft, Outcome};
use keymint_core::model::{Role, Task};
use keymint_policy::{Action, RequestFacts, Verdict};

use super::{Broker, BrokerError, Principal, Result};

tokio::task_local! {
    /// The address of the peer of the request being served, set by the API
    /// around each request; policy sees it as `context.source_ip`.
    pub static SOURCE_IP: std::net::IpAddr;
}

/// What policy sees of a role (`resource` and its attributes).
pub(super) fn role_facts(role: &Role) -> keymint_policy::RoleFacts {
    keymint_policy::RoleFacts {
        name: role.name.clone(),
        engine: role.engine().as_str().to_owned(),
        scopes: role.scopes.clone(),
        max_ttl_secs: i64::try_from(role.max_ttl_secs).unwrap_or(i64::MAX),
    }
}

impl Broker {
    /// Asks the policy in force whether `p`, for `workload`, may do
    /// `action` in `role`. Returns the ids of the policies that permitted
    /// it; a denial (or a hold for approval) names the deciding policies.
    ///
    /// INVARIANT (DESIGN.md 5): policy fails closed; an error is a denial.
    pub(super) fn authorize(
        &self,
        p: &Principal,
        action: Action,
        workload: &str,
        role: &Role,
        mut facts: RequestFacts,
    ) -> Result<Vec<String>> {
        facts.time = self.now().unix_seconds();
        facts.source_ip = SOURCE_IP.try_with(|ip| *ip).ok();
        // A workload that proved its identity brings its issuer and claims.
        let (issuer, attributes) = match p {
            Principal::Workload { name, identity } if name == workload => {
                (identity.issuer.clone(), identity.attributes.clone())
            }
            _ => (String::new(), Default::default()),
        };
        let q = keymint_policy::Query {
            action,
            principal: keymint_policy::Principal {
                id: workload.to_owned(),
                method: p.method().to_owned(),
                issuer,
                attributes,
            },
            role: role_facts(role),
            context: facts,
        };
        let d = self
            .policy
            .current()
            .decide_within(&q, self.policy.decision_budget());
        match d.verdict {
            Verdict::Allow => Ok(d.policies),
            Verdict::Deny | Verdict::NeedsApproval => Err(BrokerError::Policy {
                verdict: d.verdict,
                reason: d.reason(),
                policies: d.policies,
                action,
                workload: workload.to_owned(),
                role: role.name.clone(),
                timed_out: d.timed_out,
            }),
        }
    }

    /// The facts of a request made inside `task`. The destination is set
    /// by the caller (see [`destination`]).
    pub(super) fn task_facts(task: &Task, scopes: Vec<String>, ttl_secs: i64) -> RequestFacts {
        RequestFacts {
            intent: task.intent.clone().unwrap_or_default(),
            purpose: task.purpose.clone().unwrap_or_default(),
            environment: task.environment.clone().unwrap_or_default(),
            subject: task.workload.clone(),
            scopes,
            ttl_secs,
            task: task.id.clone(),
            parent_task: task.parent.clone().unwrap_or_default(),
            delegation_depth: i64::try_from(task.delegation.len()).unwrap_or(i64::MAX),
            delegation_chain: task.delegation.clone(),
            ..RequestFacts::default()
        }
    }

    /// Records a refusal in the audit trail and counts it.
    pub(crate) async fn deny(
        &self,
        kind: &'static str,
        p: &Principal,
        subject: Option<&str>,
        err: &BrokerError,
    ) {
        self.metrics.denials.fetch_add(1, Ordering::Relaxed);
        // A decision that ran out of time decided nothing: a failure of
        // its own kind, for alerts, not a denial on the merits.
        let timed_out = matches!(
            err,
            BrokerError::Policy {
                timed_out: true,
                ..
            }
        );
        let (kind, outcome) = if timed_out {
            ("policy.timeout", Outcome::Failure)
        } else {
            (kind, Outcome::Denied)
        };
        let mut ev = AuditDraft::new(self.now(), kind, p.actor())
            .outcome(outcome)
            .reason(err.to_string());
        if let Some(s) = subject {
            ev = ev.task(s);
        }
        if let BrokerError::Policy {
            verdict,
            policies,
            workload,
            role,
            action,
            ..
        } = err
        {
            ev = ev
                .workload(workload)
                .role(role)
                .data("action", action.as_str())
                .data(
                    "decision",
                    if timed_out {
                        "timeout"
                    } else {
                        verdict.as_str()
                    },
                )
                .data("policies", policies.clone());
        }
        if let Err(e) = self.store.append_audit(ev).await {
            tracing::error!(error = %e, "could not record a denial in the audit trail");
        }
        self.notify_audit();
    }

    /// The policies in force: their ids and the files they came from.
    pub fn policy_info(&self, p: &Principal) -> Result<keymint_proto::PolicyInfo> {
        Self::require_admin(p)?;
        let set = self.policy.current();
        Ok(keymint_proto::PolicyInfo {
            policies: set.ids(),
            sources: set
                .sources()
                .iter()
                .map(|s| s.display().to_string())
                .collect(),
        })
    }

    /// Reads the policy files again. A set that does not load or validate
    /// is refused and the previous one stays in force; both are audited.
    pub async fn reload_policy(&self, p: &Principal) -> Result<keymint_proto::PolicyInfo> {
        Self::require_admin(p)?;
        self.reload_policy_by(&p.actor()).await?;
        self.policy_info(p)
    }

    /// Reloads the policies on behalf of `actor` (the API, or `signal` for
    /// SIGHUP); returns the new ids.
    pub async fn reload_policy_by(&self, actor: &str) -> Result<Vec<String>> {
        let now = self.now();
        let result = self.policy.reload();
        let ev = AuditDraft::new(now, "policy.reloaded", actor);
        let ev = match &result {
            Ok(set) => ev.data("policies", set.ids()),
            Err(e) => ev.outcome(Outcome::Failure).reason(e.to_string()),
        };
        self.store.append_audit(ev).await?;
        self.notify_audit();
        match result {
            Ok(set) => Ok(set.ids()),
            Err(e) => Err(BrokerError::BadRequest(format!(
                "{e}\nthe previous policies stay in force"
            ))),
        }
    }
}
