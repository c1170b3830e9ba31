//! The broker: tasks, leases, revocation and expiry, on top of a [`Store`],
//! a [`Clock`], the [`Keyring`] and the engines.
//!
//! Every public method takes the caller's [`Principal`] and decides what it
//! may do; handlers only translate HTTP.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use keymint_core::audit::{AuditDraft, ChainReport, GENESIS, Outcome, verify_from};
use keymint_core::keyring::Keyring;
use keymint_core::model::{EndReason, Lease, LeaseState, Role, Task, TaskStatus};
use keymint_core::rules::{self, RuleError, TaskLimits, TaskRequest};
use keymint_core::token::{self, TokenKind};
use keymint_core::{Clock, Timestamp, id};
use keymint_engines::{Engine, EngineError, IssueContext};
use keymint_policy::{Action, RequestFacts, Verdict};
use keymint_proto::{
    EndStatus, Introspection, IssueLease, IssuedLease, RenewLease, Renewed, StartTask,
};
use keymint_store::{
    LeaseFilter, LeaseSelector, RevocationDone, Store, StoreError, TaskEnd, TaskFilter,
};
use subtle::ConstantTimeEq;
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::policy::PolicyState;

mod admin_credentials;
mod auth_audit;
pub use auth_audit::{AUTH_AUDIT_BURST, AUTH_AUDIT_WINDOW_MS};
mod proxy_gate;
mod ssh_authority;
mod token_cache;

/// The task a task-token holder may act through: its task narrowed to the
/// token's own scopes and expiry, so that a token can never mint a lease or
/// a sub-task with more than it holds itself. Admins are not narrowed.
fn narrowed(t: &Task, bound: Option<&(Vec<String>, keymint_core::Timestamp)>) -> Task {
    let mut t = t.clone();
    if let Some((scopes, expires)) = bound {
        t.scopes.retain(|s| scopes.contains(s));
        t.expires_at = t.expires_at.min(*expires);
    }
    t
}

tokio::task_local! {
    /// The address of the peer of the request being served, set by the API
    /// around each request; policy sees it as `context.source_ip`.
    pub static SOURCE_IP: std::net::IpAddr;
}

/// Where a role's credentials are used, for policy (`context.destination`):
/// `upstream:NAME` for the egress proxy, `database:NAME`, `ssh-ca:NAME`, or
/// `""` for a plain keymint token.
fn destination(role: &Role) -> String {
    let get = |k: &str| role.settings.get(k).and_then(|v| v.as_str());
    if let Some(u) = get("upstream") {
        format!("upstream:{u}")
    } else if let Some(d) = get("database") {
        format!("database:{d}")
    } else if let Some(c) = get("ca") {
        format!("ssh-ca:{c}")
    } else {
        String::new()
    }
}

/// Three dot-separated parts, the first a base64url JSON object.
fn looks_like_jwt(s: &str) -> bool {
    s.starts_with("eyJ") && s.bytes().filter(|b| *b == b'.').count() == 2
}

/// What kind of credential a refused bearer was, for the audit trail.
fn credential_kind(s: &str) -> &'static str {
    if looks_like_jwt(s) {
        "jwt"
    } else if s.starts_with("kmt_") {
        "kmt"
    } else if s.starts_with("kma_") {
        "kma"
    } else {
        "unknown"
    }
}

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Principal {
    /// Holder of the admin token.
    Admin,
    /// Holder of a live `kmt_` token: may act on its own task and the tasks
    /// below it.
    Task { task: Box<Task>, lease: Box<Lease> },
    /// A named human who approves requests that policy held; nothing else.
    Operator { name: String },
    /// A node's agent (`[[nodes]]`): may list its registration entries and
    /// act for their workloads (`X-Keymint-Entry`), nothing else.
    Node { name: String },
    /// A workload that proved what it is: a JWT from a configured issuer
    /// (`name` is `ISSUER_NAME/ID`: ids are unique only per issuer), or a
    /// local process attested over the Unix socket (`name` is its
    /// registration entry's workload).
    Workload { name: String, identity: Box<Proven> },
}

/// What a workload proved, for policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proven {
    /// `jwt`, `spiffe` or `unix`.
    pub method: &'static str,
    /// The token issuer or trust domain; `""` for local processes.
    pub issuer: String,
    /// Mapped claims, or what attestation observed (uid, exe_sha256, ...).
    pub attributes: std::collections::BTreeMap<String, String>,
}

impl Principal {
    /// For a task token: its lease's scopes and expiry.
    fn bound(&self) -> Option<(Vec<String>, keymint_core::Timestamp)> {
        match self {
            Self::Admin | Self::Operator { .. } | Self::Node { .. } | Self::Workload { .. } => None,
            Self::Task { lease, .. } => Some((lease.scopes.clone(), lease.expires_at)),
        }
    }

    /// How the workload behind the request is known, for policy.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Admin | Self::Operator { .. } => "operator",
            Self::Node { .. } => "node",
            Self::Task { .. } => "task",
            Self::Workload { identity, .. } => identity.method,
        }
    }

    pub fn actor(&self) -> String {
        match self {
            Self::Admin => "admin".into(),
            Self::Task { task, .. } => format!("workload:{}", task.workload),
            Self::Operator { name } => format!("operator:{name}"),
            Self::Node { name } => format!("node:{name}"),
            // Through a node agent: the audit trail says which node vouched.
            Self::Workload { name, identity } if identity.issuer.starts_with("node:") => {
                format!("workload:{name} via {}", identity.issuer)
            }
            Self::Workload { name, .. } => format!("workload:{name}"),
        }
    }

    /// Who may redeem what this principal asked for: the admin token, or
    /// exactly the task token (lease) that asked.
    pub fn requester_key(&self) -> String {
        match self {
            Self::Admin => "admin".into(),
            Self::Task { lease, .. } => format!("lease:{}", lease.id),
            Self::Operator { name } => format!("operator:{name}"),
            Self::Node { name } => format!("node:{name}"),
            Self::Workload { name, .. } => format!("identity:{name}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(StoreError),
    /// Something keymint needs (an issuer's keys) cannot be reached now.
    #[error("{0}")]
    Unavailable(String),
    /// Policy denied the request, or holds it for a human.
    #[error("{reason}")]
    Policy {
        verdict: Verdict,
        reason: String,
        policies: Vec<String>,
        action: Action,
        workload: String,
        role: String,
    },
    /// Policy held the request: it waits as this pending approval.
    #[error("held for approval as `{}`", .0.id)]
    Held(Box<keymint_core::model::Approval>),
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Rule(r) => Self::Rule(r),
            StoreError::NotFound(w) => Self::NotFound(w),
            other => Self::Store(other),
        }
    }
}

pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

/// Retry delay after `attempts` failed revocations: 1 s, 2 s, 4 s … 5 min.
pub fn backoff_ms(attempts: u32) -> i64 {
    let exp = attempts.saturating_sub(1).min(9);
    (1000_i64 << exp).min(300_000)
}

const SWEEP_BATCH: u32 = 1000;
const MAX_DEPTH: usize = 32;

#[derive(Debug)]
pub struct Broker {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) keyring: Arc<Keyring>,
    roles: HashMap<String, Role>,
    engines: HashMap<&'static str, Arc<dyn Engine>>,
    limits: TaskLimits,
    admin_fingerprint: String,
    issuer: String,
    pub metrics: Metrics,
    /// Woken when a pending lease is left for the sweeper (its task ended
    /// while the provider was minting). New deadlines need no wake-up: the
    /// sweeper never sleeps more than a second, and keymint refuses an
    /// expired credential at use whether or not it was swept.
    pub(crate) wake: Notify,
    /// Woken when audit events were appended.
    pub(crate) audit_wake: Notify,
    /// Woken when a request was held for approval (the webhook).
    pub(crate) approval_wake: Notify,
    pub(crate) policy: Arc<PolicyState>,
    identity: Option<Arc<keymint_identity::Verifier>>,
    /// Operator token fingerprints → names.
    operators: HashMap<String, String>,
    /// Node join-token fingerprints → node names.
    node_tokens: HashMap<String, String>,
    /// Workload identities (JWT `ISSUER/ID`, SPIFFE IDs) → node names.
    node_identities: HashMap<String, String>,
    /// Bounds the `auth.failed` events a flood can write.
    pub(crate) auth_audit: std::sync::Mutex<auth_audit::AuthAuditWindow>,
    /// Serialises entry changes, so that two creations cannot together
    /// make a node's entries ambiguous.
    pub(crate) entry_lock: tokio::sync::Mutex<()>,
    pub(crate) approval_ttl_secs: u64,
    /// Bumped whenever leases leave `active` (revoked, task ended, expired),
    /// so that caches of live tokens (the egress proxy's) drop at once.
    revocation_epoch: Arc<std::sync::atomic::AtomicU64>,
    /// Live `kmt_` tokens, for the API and the egress proxy alike.
    token_cache: token_cache::TokenCache,
    /// Bounds the `proxy.denied` events a token holder can write.
    proxy_denials: std::sync::Mutex<auth_audit::AuditWindow<proxy_gate::ProxyDenials>>,
}

#[derive(Debug)]
pub struct BrokerParts {
    pub policy: Arc<PolicyState>,
    /// Verifies workload JWTs; `None`: only keymint's own tokens.
    pub identity: Option<Arc<keymint_identity::Verifier>>,
    /// Operators: (name, token).
    pub operators: Vec<(String, String)>,
    /// Nodes with join tokens: (name, token).
    pub node_tokens: Vec<(String, String)>,
    /// Nodes known by a verified identity: (name, workload identity).
    pub node_identities: Vec<(String, String)>,
    /// How long a held request waits for a human (and, once approved, for
    /// its requester to redeem it).
    pub approval_ttl_secs: u64,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub keyring: Arc<Keyring>,
    pub roles: Vec<Role>,
    pub engines: Vec<Arc<dyn Engine>>,
    pub limits: TaskLimits,
    pub admin_token: String,
    pub issuer: String,
}

impl Broker {
    pub fn new(p: BrokerParts) -> Self {
        let admin_fingerprint = p.keyring.fingerprint(p.admin_token.as_bytes());
        let node_tokens = p
            .node_tokens
            .iter()
            .map(|(name, token)| (p.keyring.fingerprint(token.as_bytes()), name.clone()))
            .collect();
        let operators = p
            .operators
            .iter()
            .map(|(name, token)| (p.keyring.fingerprint(token.as_bytes()), name.clone()))
            .collect();
        Self {
            store: p.store,
            clock: p.clock,
            roles: p.roles.into_iter().map(|r| (r.name.clone(), r)).collect(),
            engines: p.engines.into_iter().map(|e| (e.kind(), e)).collect(),
            keyring: p.keyring,
            limits: p.limits,
            admin_fingerprint,
            issuer: p.issuer,
            metrics: Metrics::default(),
            wake: Notify::new(),
            audit_wake: Notify::new(),
            approval_wake: Notify::new(),
            policy: p.policy,
            identity: p.identity,
            operators,
            node_tokens,
            node_identities: p
                .node_identities
                .iter()
                .map(|(name, id)| (id.clone(), name.clone()))
                .collect(),
            entry_lock: tokio::sync::Mutex::new(()),
            auth_audit: std::sync::Mutex::default(),
            approval_ttl_secs: p.approval_ttl_secs,
            revocation_epoch: Arc::default(),
            token_cache: Default::default(),
            proxy_denials: Default::default(),
        }
    }

    /// The configured nodes' names.
    pub fn node_names(&self) -> impl Iterator<Item = &str> {
        self.node_tokens
            .values()
            .chain(self.node_identities.values())
            .map(String::as_str)
    }

    /// The counter bumped whenever leases leave `active`.
    pub fn revocation_epoch(&self) -> Arc<std::sync::atomic::AtomicU64> {
        Arc::clone(&self.revocation_epoch)
    }

    pub fn keyring(&self) -> &Arc<Keyring> {
        &self.keyring
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// This installation's id (derived from the root key; shared by
    /// replicas). Engines tag what they create with it.
    pub fn installation_id(&self) -> &str {
        self.keyring.key_id()
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    pub fn roles(&self) -> Vec<Role> {
        let mut v: Vec<Role> = self.roles.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub(crate) fn role(&self, name: &str) -> Result<&Role> {
        self.roles
            .get(name)
            .ok_or_else(|| BrokerError::BadRequest(format!("unknown role `{name}`")))
    }

    fn engine(&self, name: &str) -> Result<&Arc<dyn Engine>> {
        self.engines
            .get(name)
            .ok_or_else(|| BrokerError::BadRequest(format!("engine `{name}` is not configured")))
    }

    pub(crate) fn notify_audit(&self) {
        self.audit_wake.notify_one();
    }

    // ------------------------------------------------------------ auth

    /// Resolves a bearer token to a principal. Says why a token is refused,
    /// never what it was.
    ///
    /// Every failure is counted and audited (`auth.failed`) with the reason
    /// and the kind of credential, never its contents.
    pub async fn authenticate(&self, bearer: &str) -> Result<Principal> {
        match self.authenticate_inner(bearer).await {
            Ok(p) => Ok(p),
            Err(e @ (BrokerError::Unauthorized(_) | BrokerError::Unavailable(_))) => {
                self.auth_failed(&e, credential_kind(bearer)).await;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Counts and audits a refused credential: why, and what kind it was.
    async fn auth_failed(&self, e: &BrokerError, credential: &'static str) {
        let ev = AuditDraft::new(self.now(), "auth.failed", "anonymous")
            .outcome(Outcome::Denied)
            .reason(e.to_string())
            .data("credential", credential);
        self.record_auth_failure(ev, credential).await;
    }

    /// The principal of a request on the local socket without a bearer
    /// token: the attested workload, while its process is alive. Failures
    /// are audited like any other.
    pub async fn authenticate_local(&self, found: &crate::local::Attested) -> Result<Principal> {
        use crate::local::Attested;
        let result = match (found, self.local_principal(found)) {
            (_, Some(p)) => Ok(p),
            (Attested::Workload { .. }, None) => Err(BrokerError::Unauthorized(
                "the attested process has exited".into(),
            )),
            (Attested::Refused(why), None) => Err(BrokerError::Unauthorized(format!(
                "not an attested workload: {why}"
            ))),
        };
        if let Err(e) = &result {
            self.auth_failed(e, "unix").await;
        }
        result
    }

    /// The workload a local caller attested to, while its process lives.
    pub fn local_principal(&self, found: &crate::local::Attested) -> Option<Principal> {
        match found {
            crate::local::Attested::Workload { peer, workload } if peer.is_alive() => {
                Some(Principal::Workload {
                    name: workload.workload.clone(),
                    identity: Box::new(Proven {
                        method: "unix",
                        issuer: String::new(),
                        attributes: workload.attributes.clone(),
                    }),
                })
            }
            _ => None,
        }
    }

    /// Holder binding: a task token presented by a caller that proved
    /// another workload identity is refused and audited. The holder is the
    /// lease's workload; a delegating workload may present tokens of its
    /// own sub-tasks (it is in their delegation chain).
    pub async fn check_holder_of(&self, token: &Principal, presenter: &Principal) -> Result<()> {
        let (Principal::Task { task, lease }, Principal::Workload { name, .. }) =
            (token, presenter)
        else {
            return Ok(());
        };
        if name == &lease.workload || task.delegation.contains(name) {
            return Ok(());
        }
        let e = BrokerError::Unauthorized(format!(
            "this token is bound to workload `{}` and was presented by `{name}`",
            lease.workload
        ));
        let ev = AuditDraft::new(self.now(), "auth.failed", presenter.actor())
            .outcome(Outcome::Denied)
            .reason(e.to_string())
            .task(&lease.task)
            .lease(&lease.id)
            .workload(&lease.workload)
            .fingerprint(&lease.fingerprint)
            .data("credential", "kmt")
            .data("presented_by", name.clone());
        self.record_auth_failure(ev, "kmt").await;
        Err(e)
    }

    /// The principal of an mTLS client whose X.509-SVID chained to the
    /// trust bundle (verified by the TLS layer): its SPIFFE ID.
    pub fn svid_principal(&self, spiffe_id: &str) -> Principal {
        if let Some(node) = self.node_identities.get(spiffe_id) {
            return Principal::Node { name: node.clone() };
        }
        let trust_domain = spiffe_id
            .trim_start_matches("spiffe://")
            .split('/')
            .next()
            .unwrap_or_default();
        let mut attributes = std::collections::BTreeMap::new();
        attributes.insert("trust_domain".to_owned(), trust_domain.to_owned());
        attributes.insert("svid".to_owned(), "x509".to_owned());
        Principal::Workload {
            name: spiffe_id.to_owned(),
            identity: Box::new(Proven {
                method: "spiffe",
                issuer: format!("spiffe://{trust_domain}"),
                attributes,
            }),
        }
    }

    async fn authenticate_inner(&self, bearer: &str) -> Result<Principal> {
        let fail = |m: &str| BrokerError::Unauthorized(m.to_owned());
        if looks_like_jwt(bearer) {
            let Some(v) = &self.identity else {
                return Err(fail("this server accepts no workload identity tokens"));
            };
            return match v.verify(bearer, self.now()).await {
                Ok(w) => {
                    let name = format!("{}/{}", w.issuer_name, w.id);
                    // A node's own identity makes it the node, not a workload.
                    if let Some(node) = self.node_identities.get(&name) {
                        return Ok(Principal::Node { name: node.clone() });
                    }
                    Ok(Principal::Workload {
                        name,
                        identity: Box::new(Proven {
                            method: match w.method {
                                keymint_identity::Method::Spiffe => "spiffe",
                                _ => "jwt",
                            },
                            issuer: w.issuer,
                            attributes: w.attributes,
                        }),
                    })
                }
                Err(e) if e.is_unavailable() => Err(BrokerError::Unavailable(e.to_string())),
                Err(e) => Err(fail(&format!("identity token refused: {e}"))),
            };
        }
        let kind = token::check(bearer).map_err(|e| fail(&e.to_string()))?;
        let fp = self.keyring.fingerprint(bearer.as_bytes());
        match kind {
            TokenKind::Admin => {
                if bool::from(fp.as_bytes().ct_eq(self.admin_fingerprint.as_bytes())) {
                    Ok(Principal::Admin)
                } else if let Some(name) = self.operators.get(&fp) {
                    Ok(Principal::Operator { name: name.clone() })
                } else if let Some(name) = self.node_tokens.get(&fp) {
                    Ok(Principal::Node { name: name.clone() })
                } else {
                    Err(fail("token not recognised"))
                }
            }
            TokenKind::Access => {
                let live = self.live_access_token(fp).await?;
                Ok(Principal::Task {
                    task: Box::new(live.task.clone()),
                    lease: Box::new(live.lease.clone()),
                })
            }
        }
    }

    /// Whether `p` may act on task `t`: admins on any, a task token on its
    /// own task and the tasks below it.
    async fn may_act_on(&self, p: &Principal, t: &Task) -> Result<bool> {
        let own = match p {
            Principal::Admin => return Ok(true),
            Principal::Operator { .. } | Principal::Node { .. } => return Ok(false),
            Principal::Workload { name, .. } => {
                // Its own tasks and everything below them.
                let mut cur = t.clone();
                for _ in 0..MAX_DEPTH {
                    if &cur.workload == name {
                        return Ok(true);
                    }
                    let Some(parent) = cur.parent.as_deref() else {
                        return Ok(false);
                    };
                    match self.store.get_task(parent).await? {
                        Some(next) => cur = next,
                        None => return Ok(false),
                    }
                }
                return Ok(false);
            }
            Principal::Task { task, .. } => task,
        };
        let mut cur = t.clone();
        for _ in 0..MAX_DEPTH {
            if cur.id == own.id {
                return Ok(true);
            }
            let Some(parent) = cur.parent.as_deref() else {
                return Ok(false);
            };
            match self.store.get_task(parent).await? {
                Some(next) => cur = next,
                None => return Ok(false),
            }
        }
        Ok(false)
    }

    async fn task_for(&self, p: &Principal, id: &str) -> Result<Task> {
        if !id::is_valid("tsk_", id) {
            return Err(BrokerError::NotFound("task"));
        }
        let t = self
            .store
            .get_task(id)
            .await?
            .ok_or(BrokerError::NotFound("task"))?;
        if !self.may_act_on(p, &t).await? {
            return Err(BrokerError::Forbidden(format!(
                "task `{id}` is outside the caller's task tree"
            )));
        }
        Ok(t)
    }

    async fn lease_for(&self, p: &Principal, id: &str) -> Result<Lease> {
        if !id::is_valid("lse_", id) {
            return Err(BrokerError::NotFound("lease"));
        }
        let l = self
            .store
            .get_lease(id)
            .await?
            .ok_or(BrokerError::NotFound("lease"))?;
        self.task_for(p, &l.task).await?;
        Ok(l)
    }

    pub(crate) fn require_admin(p: &Principal) -> Result<()> {
        match p {
            Principal::Admin => Ok(()),
            Principal::Task { .. }
            | Principal::Operator { .. }
            | Principal::Node { .. }
            | Principal::Workload { .. } => {
                Err(BrokerError::Forbidden("this needs the admin token".into()))
            }
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
        let mut ev = AuditDraft::new(self.now(), kind, p.actor())
            .outcome(Outcome::Denied)
            .reason(err.to_string());
        if let Some(s) = subject {
            ev = ev.task(s);
        }
        if let BrokerError::Policy {
            verdict, policies, ..
        } = err
        {
            ev = ev
                .data("decision", verdict.as_str())
                .data("policies", policies.clone());
        }
        if let Err(e) = self.store.append_audit(ev).await {
            tracing::error!(error = %e, "could not record a denial in the audit trail");
        }
        self.notify_audit();
    }

    // ------------------------------------------------------------ policy

    /// Asks the policy in force whether `p`, for `workload`, may do
    /// `action` in `role`. Returns the ids of the policies that permitted
    /// it; a denial (or a hold for approval) names the deciding policies.
    ///
    /// INVARIANT (DESIGN.md 5): policy fails closed; an error is a denial.
    fn authorize(
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
            role: keymint_policy::RoleFacts {
                name: role.name.clone(),
                engine: role.engine.clone(),
                scopes: role.scopes.clone(),
                max_ttl_secs: i64::try_from(role.max_ttl_secs).unwrap_or(i64::MAX),
            },
            context: facts,
        };
        let d = self.policy.current().decide(&q);
        match d.verdict {
            Verdict::Allow => Ok(d.policies),
            Verdict::Deny | Verdict::NeedsApproval => Err(BrokerError::Policy {
                verdict: d.verdict,
                reason: d.reason(),
                policies: d.policies,
                action,
                workload: workload.to_owned(),
                role: role.name.clone(),
            }),
        }
    }

    /// The facts of a request made inside `task`. The destination is set
    /// by the caller (see [`destination`]).
    fn task_facts(task: &Task, scopes: Vec<String>, ttl_secs: i64) -> RequestFacts {
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

    // ------------------------------------------------------------ tasks

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

    async fn start_task_inner(
        &self,
        p: &Principal,
        req: StartTask,
        approved: bool,
    ) -> Result<Task> {
        let parent_id = match (p, &req.parent) {
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
        let role_name = match (&req.role, &parent) {
            (Some(r), _) => r.clone(),
            (None, Some(pt)) => pt.role.clone(),
            (None, None) => return Err(BrokerError::BadRequest("`role` is required".into())),
        };
        let workload = match (&req.workload, p) {
            (Some(w), Principal::Workload { name, .. }) if parent.is_none() && w != name => {
                return Err(BrokerError::Forbidden(format!(
                    "a workload starts tasks for itself (`{name}`), not for `{w}`; \
                     to hand work to another workload, start a sub-task of your task"
                )));
            }
            (Some(w), _) => w.clone(),
            (None, Principal::Task { task, .. }) => task.workload.clone(),
            (None, Principal::Workload { name, .. }) => name.clone(),
            (None, Principal::Admin | Principal::Operator { .. } | Principal::Node { .. }) => {
                return Err(BrokerError::BadRequest("`workload` is required".into()));
            }
        };
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
        let preview = rules::grant_task(&treq, &role, bounded_parent.as_ref(), &limits, now)?;
        let (action, policy_workload, mut facts) = match &parent {
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
        facts.destination = destination(&role);
        facts.scopes = preview.scopes.clone();
        facts.ttl_secs = now.until(preview.expires_at) / 1000;
        facts.approved = approved;
        let decided_by = self.authorize(p, action, &policy_workload, &role, facts)?;
        let task = self
            .store
            .create_task(
                parent_id.as_deref(),
                Box::new(move |parent| {
                    let bounded = parent.map(|p| narrowed(p, bound.as_ref()));
                    let g = rules::grant_task(&treq, &role, bounded.as_ref(), &limits, now)?;
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
                }),
            )
            .await?;
        self.metrics.tasks_started.fetch_add(1, Ordering::Relaxed);
        self.notify_audit();
        Ok(task)
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
    /// ancestor task). Revokes every lease and sub-task under it.
    pub async fn end_task(
        &self,
        p: &Principal,
        id: &str,
        status: Option<EndStatus>,
        reason: Option<String>,
    ) -> Result<Task> {
        let t = self.task_for(p, id).await?;
        if let Some(r) = &reason
            && !keymint_core::model::valid_text(r, 1024)
        {
            return Err(BrokerError::BadRequest(
                "`reason` is too long or contains control characters".into(),
            ));
        }
        let status = match status {
            Some(EndStatus::Completed) => TaskStatus::Completed,
            Some(EndStatus::Failed) => TaskStatus::Failed,
            None => TaskStatus::Revoked,
        };
        self.end_tree(&t.id, status, &p.actor(), reason).await?;
        self.store
            .get_task(&t.id)
            .await?
            .ok_or(BrokerError::NotFound("task"))
    }

    async fn end_tree(
        &self,
        id: &str,
        status: TaskStatus,
        actor: &str,
        reason: Option<String>,
    ) -> Result<bool> {
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
            return Ok(false);
        };
        self.metrics.task_ended(status);
        for _ in 1..ended.tasks.len() {
            self.metrics.task_ended(TaskStatus::Revoked);
        }
        self.drive_revocations(ended.leases).await?;
        self.notify_audit();
        Ok(true)
    }

    // ------------------------------------------------------------ leases

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
        self.token_cache.forget(&renewed.fingerprint);
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

    // ------------------------------------------------------------ revocation

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
            let result = match self.engines.get(l.engine.as_str()) {
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
                    tracing::warn!(engine = engine.kind(), error = %e, "cannot list credentials to reconcile");
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
                    engine: engine.kind().to_owned(),
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
                    .data("engine", engine.kind());
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

    // ------------------------------------------------------------ audit

    pub async fn audit_verify(&self, p: &Principal) -> Result<ChainReport> {
        Self::require_admin(p)?;
        let mut report = ChainReport {
            events: 0,
            last_seq: None,
            last_hash: None,
            problem: None,
        };
        let mut after = 0u64;
        let mut prev = GENESIS.to_owned();
        loop {
            let batch = self.store.audit_after(after, 5000).await?;
            let Some(last) = batch.last() else { break };
            let next_after = last.seq;
            let r = verify_from(batch.into_iter().map(Ok), after + 1, &prev);
            report.events += r.events;
            if let Some(problem) = r.problem {
                report.problem = Some(problem);
                break;
            }
            report.last_seq = r.last_seq;
            if let Some(h) = r.last_hash.clone() {
                prev = h;
            }
            report.last_hash = r.last_hash;
            after = next_after;
        }
        Ok(report)
    }
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
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff_ms(1), 1000);
        assert_eq!(backoff_ms(2), 2000);
        assert_eq!(backoff_ms(5), 16_000);
        assert_eq!(backoff_ms(50), 300_000);
    }

    #[test]
    fn act_claim_nests_the_chain() {
        let v = act_claim(&["ci".into(), "planner".into()]);
        assert_eq!(
            v,
            serde_json::json!({"sub": "planner", "act": {"sub": "ci"}})
        );
    }
}
