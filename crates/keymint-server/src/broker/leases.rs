//! Leases: issuing a credential inside a task (resolve role and engine →
//! grant by the rules → decide by policy → prepare → record → apply and
//! activate → answer), reading, renewing, revoking and introspecting one.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use keymint_core::audit::{AuditDraft, Outcome};
use keymint_core::model::{EndReason, Lease, LeaseState, Revocability, Role, Task};
use keymint_core::role::{EngineKind, RoleKind};
use keymint_core::rules::{self, LeaseGrant, RuleError};
use keymint_core::token::{self, TokenKind};
use keymint_core::{Timestamp, id};
use keymint_engines::{Engine, IssueContext, Prepared};
use keymint_policy::{Action, RequestFacts, Verdict};
use keymint_proto::{Introspection, IssueLease, IssuedLease, RenewLease, Renewed};
use keymint_store::{LeaseFilter, LeaseSelector};

use super::lifecycle::backoff_ms;
use super::tasks::{at_credential, narrow, narrowed};
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
        // Kept for a hold; turned into JSON only then, not per issuance.
        let asked = req.clone();
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
                    serde_json::to_value(&asked).unwrap_or_default(),
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

    /// Issues one lease as a sequence of steps. Nothing is written before
    /// the rules and policy have decided, and the lease is on disk before
    /// the provider is called (record pending → apply → activate).
    async fn issue_inner(
        &self,
        p: &Principal,
        task_id: &str,
        req: IssueLease,
        approved: bool,
    ) -> Result<IssuedLease> {
        let bound = p.bound();
        let (task, role, engine) = self.issue_target(p, task_id, bound.as_ref()).await?;
        let IssueLease {
            ttl_secs,
            scopes,
            public_key,
            principals,
        } = req;
        let now = self.now();
        let asked = Asked {
            ttl_secs,
            scopes,
            bound,
            ancestors_end: self.ancestors_end(&task, engine.as_ref(), now).await?,
            now,
        };
        // The engine sees the task as far as the credential may reach: an
        // expire-only credential checks its own expiry (a provider's token,
        // an STS session) against this end.
        let task = match asked.ancestors_end {
            Some(end) if end < task.expires_at => Task {
                expires_at: end,
                ..task
            },
            _ => task,
        };
        let grant = asked
            .grant(&task, &role)
            .map_err(|e| at_credential(e, Some(&task), asked.bound.as_ref()))?;
        let facts = issue_facts(
            &task,
            &role,
            &grant,
            principals.as_deref(),
            approved,
            asked.now,
        )?;
        let decided_by = self.authorize(p, Action::Issue, &task.workload, &role, facts)?;
        let lease_id = id::lease_id(asked.now);
        check_public_key(&role, public_key.as_deref())?;
        // An SSH serial unique across replicas (docs/design/0022).
        let serial = match role.engine() {
            EngineKind::Ssh => self.store.next_ssh_serial().await?,
            _ => None,
        };
        let ctx = IssueContext {
            lease_id: &lease_id,
            task: &task,
            role: &role,
            expires_at: grant.expires_at,
            public_key: public_key.as_deref(),
            principals: principals.as_deref(),
            serial,
        };
        let prepared = engine.prepare(&ctx)?;
        let lease = self
            .record_lease(p, &ctx, engine.as_ref(), &prepared, asked, decided_by)
            .await?;
        let (lease, credential) = if engine.is_local() {
            (lease, prepared.credential)
        } else {
            self.apply_and_activate(p, engine.as_ref(), ctx, prepared, lease)
                .await?
        };
        self.metrics.leases_issued.fetch_add(1, Ordering::Relaxed);
        self.notify_audit();
        Ok(IssuedLease { lease, credential })
    }

    /// Resolves what a lease is asked in: the task the caller may act on
    /// (narrowed to its token), the task's role, and the role's engine.
    async fn issue_target(
        &self,
        p: &Principal,
        task_id: &str,
        bound: Option<&(Vec<String>, Timestamp)>,
    ) -> Result<(Task, Role, Arc<dyn Engine>)> {
        let task = narrow(self.task_to_grant_in(p, task_id).await?, bound);
        self.refuse_suspended(None, Some(&task)).await?;
        let role = self.role(&task.role)?.clone();
        let engine = Arc::clone(self.engine(role.engine())?);
        Ok((task, role, engine))
    }

    /// For a credential that cannot be taken back (`ExpireOnly`: an SSH
    /// certificate, a workload JWT, an STS session, a provider's federated
    /// token): the earliest deadline of the task's ancestors, idle timeout
    /// included. A sub-task ends with its parent but follows only its
    /// parent's hard end (`rules::grant_task`), and its holder is another
    /// workload, which the parent's supervisor does not take down with it
    /// (`keymint run`'s idle timeout, docs/design/0028): without this cap
    /// such a credential outlived the end of the whole tree by up to the
    /// sub-task's hard end (DESIGN.md invariants 1 and 6). `None` for a
    /// revocable credential (the tree's end revokes it) and for a task
    /// without a parent. For every credential, an ancestor already past its
    /// deadline (its end not yet swept) refuses the issuance: the tree has
    /// ended. A heartbeat only moves a deadline later, so a cap read before
    /// the store's transaction is never later than the one it would read
    /// there.
    async fn ancestors_end(
        &self,
        task: &Task,
        engine: &dyn Engine,
        now: Timestamp,
    ) -> Result<Option<Timestamp>> {
        let mut end: Option<Timestamp> = None;
        let mut next = task.parent.clone();
        let mut hops = 0;
        while let Some(id) = next {
            hops += 1;
            if hops > rules::MAX_DELEGATION_DEPTH {
                break;
            }
            // Removed by retention: it ended, and its sub-tree with it.
            let Some(t) = self.store.get_task(&id).await? else {
                return Err(RuleError::TaskNotActive(id).into());
            };
            if !t.is_live(now) {
                return Err(RuleError::TaskNotActive(t.id).into());
            }
            end = Some(end.map_or(t.deadline(), |e| e.min(t.deadline())));
            next = t.parent;
        }
        Ok(end.filter(|_| engine.revocability() == Revocability::ExpireOnly))
    }

    /// Records the lease, granted again inside the store's transaction
    /// against the task as it is then, with its audit event: `pending` for
    /// an engine that calls a provider (`lease.recorded`), `active` for a
    /// local one (`lease.issued`).
    async fn record_lease(
        &self,
        p: &Principal,
        ctx: &IssueContext<'_>,
        engine: &dyn Engine,
        prepared: &Prepared,
        asked: Asked,
        decided_by: Vec<String>,
    ) -> Result<Lease> {
        let fingerprint = self.keyring.fingerprint(&prepared.fingerprint_material);
        let local = engine.is_local();
        let actor = p.actor();
        let (lid, engine_kind, revocability) = (
            ctx.lease_id.to_owned(),
            engine.kind(),
            engine.revocability(),
        );
        let engine_data = prepared.engine_data.clone();
        let role = ctx.role.clone();
        // INVARIANT (DESIGN.md 2): the lease is on disk before the provider
        // is called (pending) or, for local engines, before the secret is
        // returned (active).
        let lease = self
            .store
            .insert_lease(
                &ctx.task.id,
                Box::new(move |t| {
                    let t = &*narrowed(t, asked.bound.as_ref());
                    let g = asked
                        .grant(t, &role)
                        .map_err(|e| at_credential(e, Some(t), asked.bound.as_ref()))?;
                    let now = asked.now;
                    let lease = Lease {
                        id: lid,
                        task: t.id.clone(),
                        workload: t.workload.clone(),
                        role: role.name.clone(),
                        engine: engine_kind,
                        scopes: g.scopes,
                        state: if local {
                            LeaseState::Active
                        } else {
                            LeaseState::Pending
                        },
                        revocability,
                        fingerprint,
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
                    .data("engine", engine_kind.as_str())
                    .data("scopes", lease.scopes.clone())
                    .data("expires_at", lease.expires_at.rfc3339())
                    .data("policies", decided_by);
                    Ok((lease, ev))
                }),
            )
            .await?;
        Ok(lease)
    }

    /// For an engine that calls a provider: applies the recorded lease
    /// there (or has the provider mint the secret), then moves it `pending
    /// → active`, with the minted secret's fingerprint. A failed apply is
    /// audited and revokes the lease; a task that ended meanwhile has what
    /// apply made removed. Returns the lease and the credential to hand out.
    async fn apply_and_activate(
        &self,
        p: &Principal,
        engine: &dyn Engine,
        ctx: IssueContext<'_>,
        prepared: Prepared,
        mut lease: Lease,
    ) -> Result<(Lease, keymint_proto::Credential)> {
        // The provider's own expiry is the one recorded in the
        // transaction, not the one checked before it.
        let ctx = IssueContext {
            expires_at: lease.expires_at,
            ..ctx
        };
        let minted = match self
            .within_deadline("creating the credential", engine.mint(&ctx, &prepared))
            .await
        {
            Ok(m) => m,
            Err(e) => {
                // Engine messages are free of secrets by contract.
                let ev = AuditDraft::new(self.now(), "lease.apply_failed", p.actor())
                    .outcome(Outcome::Failure)
                    .task(&lease.task)
                    .lease(&lease.id)
                    .role(&lease.role)
                    .reason(e.to_string())
                    .data("engine", engine.kind().as_str());
                self.store.append_audit(ev).await?;
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
        };
        let ev = AuditDraft::new(self.now(), "lease.issued", p.actor())
            .task(&lease.task)
            .lease(&lease.id);
        let (activated, credential) = match minted {
            None => {
                let ev = ev.fingerprint(&lease.fingerprint);
                let ok = self.store.activate_lease(&lease.id, ev).await?;
                (ok, prepared.credential)
            }
            Some(m) => {
                // The provider made the secret: the lease is known by its
                // fingerprint from now on, and revoked with what it made.
                lease.fingerprint = self.keyring.fingerprint(&m.fingerprint_material);
                lease.engine_data = m.engine_data;
                let ev = ev
                    .fingerprint(&lease.fingerprint)
                    .data("engine", engine.kind().as_str());
                let ok = self
                    .store
                    .activate_minted_lease(
                        &lease.id,
                        &lease.fingerprint,
                        lease.engine_data.clone(),
                        ev,
                    )
                    .await?;
                (ok, m.credential)
            }
        };
        if !activated {
            self.remove_applied(engine, &lease).await?;
            return Err(RuleError::TaskNotActive(lease.task).into());
        }
        lease.state = LeaseState::Active;
        Ok((lease, credential))
    }

    /// The task ended while the provider was minting. Its revocation may
    /// have run before `apply` committed (and found nothing to remove), so
    /// this removes what `apply` made; if that fails, the lease goes back
    /// to `revoking` and is retried.
    async fn remove_applied(&self, engine: &dyn Engine, lease: &Lease) -> Result<()> {
        if let Err(e) = self
            .within_deadline("removing the credential", engine.revoke(lease))
            .await
        {
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
        Ok(())
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
        if let Err(e) = self.refuse_suspended(None, Some(&task)).await {
            self.deny("lease.renew_denied", p, Some(&lease.task), &e)
                .await;
            return Err(e);
        }
        let asked = req
            .increment_secs
            .map_or(role.default_ttl_secs, |s| s.min(role.max_ttl_secs));
        let mut facts = Self::task_facts(
            &task,
            lease.scopes.clone(),
            i64::try_from(asked).unwrap_or(i64::MAX),
        );
        facts.destination = role.destination();
        let renew_policies = match self.authorize(p, Action::Renew, &task.workload, &role, facts) {
            Ok(ids) => ids,
            Err(e) => {
                self.deny("lease.renew_denied", p, Some(&lease.task), &e)
                    .await;
                return Err(e);
            }
        };
        let actor = p.actor();
        // A task token renews as it issues: through its task narrowed to
        // its own expiry, so it cannot extend itself, or a credential it
        // issued, past the moment it dies itself.
        let bound = p.bound();
        let capped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let capped2 = Arc::clone(&capped);
        let renewed = self
            .store
            .renew_lease(
                &lease.id,
                Box::new(move |l, t| {
                    let t = &*narrowed(t, bound.as_ref());
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
        self.token_cache.forget(&renewed.fingerprint);
        // The provider's own expiry (a database user's VALID UNTIL) follows.
        // If it cannot, the credential stops early: safe, but the caller
        // must know.
        if let Some(engine) = self.engines.get(&renewed.engine) {
            self.within_deadline(
                "extending the credential",
                engine.renew(&renewed, renewed.expires_at),
            )
            .await?;
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
        if token.starts_with("eyJ") {
            return Ok(self.introspect_access_token(token).await);
        }
        if token::check(token) != Ok(TokenKind::Access) {
            return Ok(Introspection::default());
        }
        let fp = self.keyring.fingerprint(token.as_bytes());
        // The lookup the API and the proxy make: a suspended task's token
        // (docs/design/0033) is as inactive here as it is refused there.
        let live = match self.live_access_token(fp).await {
            Ok(live) => live,
            Err(BrokerError::Unauthorized(_)) => return Ok(Introspection::default()),
            Err(e) => return Err(e),
        };
        let (l, t) = (&live.lease, &live.task);
        Ok(Introspection {
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
            ..Introspection::default()
        })
    }
}

/// What a lease request asks the rules for. It is granted twice: once
/// before policy decides (the facts policy sees), and again inside the
/// store's transaction against the task as it is then, which can only
/// narrow the first grant.
struct Asked {
    ttl_secs: Option<u64>,
    scopes: Option<Vec<String>>,
    /// A task token's own scopes and expiry (see `narrowed`).
    bound: Option<(Vec<String>, Timestamp)>,
    /// The earliest deadline of the task's ancestors, for a credential
    /// that cannot be taken back (`Broker::ancestors_end`).
    ancestors_end: Option<Timestamp>,
    now: Timestamp,
}

impl Asked {
    fn grant(&self, task: &Task, role: &Role) -> Result<LeaseGrant, RuleError> {
        match self.ancestors_end {
            Some(end) if end < task.expires_at => {
                let mut capped = task.clone();
                capped.expires_at = end;
                rules::grant_lease(
                    &capped,
                    role,
                    self.ttl_secs,
                    self.scopes.as_deref(),
                    self.now,
                )
            }
            _ => rules::grant_lease(task, role, self.ttl_secs, self.scopes.as_deref(), self.now),
        }
    }
}

/// The facts policy decides an issuance on: the task, the granted scopes
/// and TTL, where the credential is used, and for SSH the principals the
/// certificate will carry. `principals` for another kind of role is
/// refused.
fn issue_facts(
    task: &Task,
    role: &Role,
    grant: &LeaseGrant,
    principals: Option<&[String]>,
    approved: bool,
    now: Timestamp,
) -> Result<RequestFacts> {
    let mut facts = Broker::task_facts(
        task,
        grant.scopes.clone(),
        now.until(grant.expires_at) / 1000,
    );
    facts.approved = approved;
    facts.destination = role.destination();
    // SSH: the principals the certificate will carry, for policy.
    if let RoleKind::Ssh(ssh) = &role.kind {
        facts.principals = ssh
            .certificate_principals(&role.name, principals)
            .map_err(BrokerError::BadRequest)?;
    } else if principals.is_some() {
        return Err(BrokerError::BadRequest(format!(
            "`principals` is for ssh roles; role `{}` issues {} credentials",
            role.name,
            role.engine()
        )));
    }
    Ok(facts)
}

/// `public_key` (a key to certify) is for SSH roles only.
fn check_public_key(role: &Role, public_key: Option<&str>) -> Result<()> {
    if public_key.is_some() && role.engine() != EngineKind::Ssh {
        return Err(BrokerError::BadRequest(format!(
            "`public_key` is for ssh roles; role `{}` issues {} credentials",
            role.name,
            role.engine()
        )));
    }
    Ok(())
}
