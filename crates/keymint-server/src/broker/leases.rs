//! Leases: issuing a credential inside a task (resolve role and engine →
//! grant by the rules → decide by policy → prepare → record → apply and
//! activate → answer), reading, renewing, revoking and introspecting one.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use keymint_core::audit::{AuditDraft, Outcome};
use keymint_core::id;
use keymint_core::model::{EndReason, Lease, LeaseState};
use keymint_core::rules::{self, RuleError};
use keymint_core::token::{self, TokenKind};
use keymint_engines::IssueContext;
use keymint_policy::{Action, Verdict};
use keymint_proto::{Introspection, IssueLease, IssuedLease, RenewLease, Renewed};
use keymint_store::{LeaseFilter, LeaseSelector};

use super::decision::destination;
use super::lifecycle::backoff_ms;
use super::tasks::narrowed;
use super::{Broker, BrokerError, Principal, Result};

impl Broker {
    pub async fn issue_lease(
        &self,
        p: &Principal,
        task_id: &str,
        req: IssueLease,
    ) -> Result<IssuedLease> {
        self.issue_as(p, task_id, req, false).await
    }

    /// Issues a lease; `approved` when a human approved exactly this request.
    pub(crate) async fn issue_as(
        &self,
        p: &Principal,
        task_id: &str,
        req: IssueLease,
        approved: bool,
    ) -> Result<IssuedLease> {
        let held = serde_json::to_value(&req).unwrap_or_default();
        match self.issue_inner(p, task_id, req, approved).await {
            Ok(l) => Ok(l),
            Err(BrokerError::Policy {
                verdict: Verdict::NeedsApproval,
                policies,
                action,
                workload,
                role,
                ..
            }) if !approved => Err(self
                .hold(
                    p,
                    action,
                    workload,
                    role,
                    Some(task_id.to_owned()),
                    held,
                    policies,
                )
                .await),
            Err(e) => {
                if matches!(
                    e,
                    BrokerError::Rule(_) | BrokerError::Forbidden(_) | BrokerError::Policy { .. }
                ) {
                    self.deny("lease.denied", p, Some(task_id), &e).await;
                }
                Err(e)
            }
        }
    }

    async fn issue_inner(
        &self,
        p: &Principal,
        task_id: &str,
        req: IssueLease,
        approved: bool,
    ) -> Result<IssuedLease> {
        let bound = p.bound();
        let task = narrowed(&self.task_for(p, task_id).await?, bound.as_ref());
        let role = self.role(&task.role)?.clone();
        let engine = Arc::clone(self.engine(&role.engine)?);
        let now = self.now();
        let grant = rules::grant_lease(&task, &role, req.ttl_secs, req.scopes.as_deref(), now)?;
        let mut facts = Self::task_facts(
            &task,
            grant.scopes.clone(),
            now.until(grant.expires_at) / 1000,
        );
        facts.approved = approved;
        facts.destination = destination(&role);
        // SSH: the principals the certificate will carry, for policy.
        if role.engine == "ssh" {
            facts.principals = match &req.principals {
                Some(asked) => asked.clone(),
                None => role
                    .settings
                    .get("principals")
                    .and_then(|v| serde_json::from_value(v.clone()).ok())
                    .unwrap_or_default(),
            };
        } else if req.principals.is_some() {
            return Err(BrokerError::BadRequest(format!(
                "`principals` is for ssh roles; role `{}` issues {} credentials",
                role.name, role.engine
            )));
        }
        let decided_by = self.authorize(p, Action::Issue, &task.workload, &role, facts)?;
        let lease_id = id::lease_id(now);
        let public_key = req.public_key.clone();
        if public_key.is_some() && role.engine != "ssh" {
            return Err(BrokerError::BadRequest(format!(
                "`public_key` is for ssh roles; role `{}` issues {} credentials",
                role.name, role.engine
            )));
        }
        let ctx = IssueContext {
            lease_id: &lease_id,
            task: &task,
            role: &role,
            expires_at: grant.expires_at,
            public_key: public_key.as_deref(),
            principals: req.principals.as_deref(),
        };
        let prepared = engine.prepare(&ctx)?;
        let fingerprint = self.keyring.fingerprint(&prepared.fingerprint_material);
        let local = engine.is_local();
        let actor = p.actor();
        let (lid, fp, engine_kind, revocability) = (
            lease_id.clone(),
            fingerprint.clone(),
            engine.kind(),
            engine.revocability(),
        );
        let engine_data = prepared.engine_data.clone();
        let role2 = role.clone();
        // INVARIANT (DESIGN.md 2): the lease is on disk before the provider
        // is called (pending) or, for local engines, before the secret is
        // returned (active).
        let lease = self
            .store
            .insert_lease(
                &task.id,
                Box::new(move |t| {
                    let t = &narrowed(t, bound.as_ref());
                    let g =
                        rules::grant_lease(t, &role2, req.ttl_secs, req.scopes.as_deref(), now)?;
                    let lease = Lease {
                        id: lid,
                        task: t.id.clone(),
                        workload: t.workload.clone(),
                        role: role2.name.clone(),
                        engine: engine_kind.to_owned(),
                        scopes: g.scopes,
                        state: if local {
                            LeaseState::Active
                        } else {
                            LeaseState::Pending
                        },
                        revocability,
                        fingerprint: fp,
                        created_at: now,
                        expires_at: g.expires_at,
                        ended_at: None,
                        end_reason: None,
                        revoke_attempts: 0,
                        next_attempt_at: None,
                        last_error: None,
                        engine_data,
                    };
                    let ev = AuditDraft::new(
                        now,
                        if local {
                            "lease.issued"
                        } else {
                            "lease.recorded"
                        },
                        actor,
                    )
                    .task(&t.id)
                    .lease(&lease.id)
                    .workload(&lease.workload)
                    .role(&lease.role)
                    .fingerprint(&lease.fingerprint)
                    .data("engine", engine_kind)
                    .data("scopes", lease.scopes.clone())
                    .data("expires_at", lease.expires_at.rfc3339())
                    .data("policies", decided_by);
                    Ok((lease, ev))
                }),
            )
            .await?;
        let mut lease = lease;
        if !local {
            // The provider's own expiry is the one recorded in the
            // transaction, not the one checked before it.
            let ctx = IssueContext {
                expires_at: lease.expires_at,
                ..ctx
            };
            if let Err(e) = engine.apply(&ctx, &prepared).await {
                let leases = self
                    .store
                    .request_revocation(
                        LeaseSelector::Id(lease.id.clone()),
                        EndReason::Revoked,
                        self.now(),
                        "system",
                    )
                    .await?;
                self.drive_revocations(leases).await?;
                return Err(e.into());
            }
            let ev = AuditDraft::new(self.now(), "lease.issued", p.actor())
                .task(&lease.task)
                .lease(&lease.id)
                .fingerprint(&lease.fingerprint);
            if !self.store.activate_lease(&lease.id, ev).await? {
                // The task ended while the provider was minting. Its
                // revocation may have run before `apply` committed (and found
                // nothing to remove), so remove what `apply` made now; if
                // that fails, the lease goes back to `revoking` and is retried.
                if let Err(e) = engine.revoke(&lease).await {
                    let now = self.now();
                    let msg = e.to_string();
                    let ev = AuditDraft::new(now, "lease.revoke_failed", "system")
                        .outcome(Outcome::Failure)
                        .task(&lease.task)
                        .lease(&lease.id)
                        .fingerprint(&lease.fingerprint)
                        .reason(msg.clone());
                    self.store
                        .revocation_failed(&lease.id, now.plus_millis(backoff_ms(1)), &msg, ev)
                        .await?;
                }
                return Err(RuleError::TaskNotActive(lease.task).into());
            }
            lease.state = LeaseState::Active;
        }
        self.metrics.leases_issued.fetch_add(1, Ordering::Relaxed);
        self.notify_audit();
        Ok(IssuedLease {
            lease,
            credential: prepared.credential,
        })
    }

    pub async fn get_lease(&self, p: &Principal, id: &str) -> Result<Lease> {
        self.lease_for(p, id).await
    }

    pub async fn list_leases(&self, p: &Principal, f: LeaseFilter) -> Result<Vec<Lease>> {
        Self::require_admin(p)?;
        Ok(self.store.list_leases(&f).await?)
    }

    pub async fn renew_lease(&self, p: &Principal, id: &str, req: RenewLease) -> Result<Renewed> {
        let lease = self.lease_for(p, id).await?;
        let role = self.role(&lease.role)?.clone();
        let now = self.now();
        let task = self
            .store
            .get_task(&lease.task)
            .await?
            .ok_or(BrokerError::NotFound("task"))?;
        let asked = req
            .increment_secs
            .map_or(role.default_ttl_secs, |s| s.min(role.max_ttl_secs));
        let mut facts = Self::task_facts(
            &task,
            lease.scopes.clone(),
            i64::try_from(asked).unwrap_or(i64::MAX),
        );
        facts.destination = destination(&role);
        let renew_policies = match self.authorize(p, Action::Renew, &task.workload, &role, facts) {
            Ok(ids) => ids,
            Err(e) => {
                self.deny("lease.renew_denied", p, Some(&lease.task), &e)
                    .await;
                return Err(e);
            }
        };
        let actor = p.actor();
        let capped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let capped2 = Arc::clone(&capped);
        let renewed = self
            .store
            .renew_lease(
                &lease.id,
                Box::new(move |l, t| {
                    let (exp, cut) = rules::renew_lease(l, t, &role, req.increment_secs, now)?;
                    capped2.store(cut, Ordering::Relaxed);
                    let ev = AuditDraft::new(now, "lease.renewed", actor)
                        .task(&l.task)
                        .lease(&l.id)
                        .workload(&l.workload)
                        .role(&l.role)
                        .fingerprint(&l.fingerprint)
                        .data("expires_at", exp.rfc3339())
                        .data("capped", cut)
                        .data("policies", renew_policies);
                    Ok((exp, ev))
                }),
            )
            .await;
        let renewed = match renewed {
            Ok(l) => l,
            Err(e) => {
                let e = BrokerError::from(e);
                if matches!(e, BrokerError::Rule(_)) {
                    self.deny("lease.renew_denied", p, Some(&lease.task), &e)
                        .await;
                }
                return Err(e);
            }
        };
        // The provider's own expiry (a database user's VALID UNTIL) follows.
        // If it cannot, the credential stops early: safe, but the caller
        // must know.
        if let Some(engine) = self.engines.get(renewed.engine.as_str()) {
            engine.renew(&renewed, renewed.expires_at).await?;
        }
        self.metrics.leases_renewed.fetch_add(1, Ordering::Relaxed);
        self.notify_audit();
        Ok(Renewed {
            lease: renewed,
            capped: capped.load(Ordering::Relaxed),
        })
    }

    pub async fn revoke_lease(&self, p: &Principal, id: &str) -> Result<Lease> {
        let lease = self.lease_for(p, id).await?;
        let leases = self
            .store
            .request_revocation(
                LeaseSelector::Id(lease.id.clone()),
                EndReason::Revoked,
                self.now(),
                &p.actor(),
            )
            .await?;
        self.drive_revocations(leases).await?;
        self.notify_audit();
        self.store
            .get_lease(&lease.id)
            .await?
            .ok_or(BrokerError::NotFound("lease"))
    }

    /// Revokes every live lease selected (admin only).
    pub async fn revoke_many(
        &self,
        p: &Principal,
        sel: LeaseSelector,
        reason: EndReason,
    ) -> Result<Vec<Lease>> {
        Self::require_admin(p)?;
        let leases = self
            .store
            .request_revocation(sel, reason, self.now(), &p.actor())
            .await?;
        let ids: Vec<String> = leases.iter().map(|l| l.id.clone()).collect();
        self.drive_revocations(leases).await?;
        self.notify_audit();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(l) = self.store.get_lease(&id).await? {
                out.push(l);
            }
        }
        Ok(out)
    }

    /// RFC 7662: whether a token is active and what it allows. Unknown,
    /// malformed, revoked and expired tokens are all simply inactive.
    pub async fn introspect(&self, p: &Principal, token: &str) -> Result<Introspection> {
        Self::require_admin(p)?;
        if token::check(token) != Ok(TokenKind::Access) {
            return Ok(Introspection::default());
        }
        let fp = self.keyring.fingerprint(token.as_bytes());
        let now = self.now();
        Ok(match self.store.lease_by_fingerprint(&fp).await? {
            Some((l, t)) if l.is_usable(now) && t.is_live(now) => Introspection {
                active: true,
                scope: Some(l.scopes.join(" ")),
                token_type: Some("Bearer".into()),
                exp: Some(l.expires_at.min(t.deadline()).unix_seconds()),
                iat: Some(l.created_at.unix_seconds()),
                sub: Some(l.workload.clone()),
                iss: Some(self.issuer.clone()),
                jti: Some(l.id.clone()),
                task_id: Some(t.id.clone()),
                role: Some(l.role.clone()),
            },
            _ => Introspection::default(),
        })
    }
}
