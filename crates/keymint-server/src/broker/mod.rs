//! The broker: tasks, leases, revocation and expiry, on top of a [`Store`],
//! a [`Clock`], the [`Keyring`] and the engines.
//!
//! Every public method takes the caller's [`Principal`] and decides what it
//! may do; handlers only translate HTTP. The modules follow a request:
//!
//! 1. `authentication`: a bearer credential, an SVID or an attested local
//!    process becomes a [`Principal`]; refusals are audited within a bound
//!    (`auth_audit`);
//! 2. `access`: which tasks and leases that principal may act on;
//! 3. `decision`: the rules' grant, then the Cedar policy (allow, deny, or
//!    hold for [`approvals`]);
//! 4. `tasks` and `leases`: what is started, issued, renewed and ended;
//! 5. `lifecycle`: revocation with retries, expiry sweeps, retention and
//!    reconciliation.
//!
//! Beside the flow: [`approvals`] (requests held for a human), [`entries`]
//! (registration entries, node agents acting for workloads), [`leaks`]
//! (scanner findings), `audit` (verifying the chain), `admin_credentials`
//! and `ssh_authority` (what the broker keeps and serves for engines).

use std::collections::HashMap;
use std::sync::Arc;

use keymint_core::keyring::Keyring;
use keymint_core::model::{Lease, Role, Task};
use keymint_core::role::EngineKind;
use keymint_core::rules::{RuleError, TaskLimits};
use keymint_core::{Clock, Timestamp};
use keymint_engines::{Engine, EngineError};
use keymint_policy::{Action, Verdict};
use keymint_store::{Store, StoreError};
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::policy::PolicyState;

// The steps of a request (in the order listed above).
mod access;
mod auth_audit;
mod authentication;
mod decision;
mod leases;
mod lifecycle;
mod proxy_gate;
mod tasks;
mod token_cache;

// Beside the flow.
mod admin_credentials;
pub mod approvals;
mod audit;
pub mod duties;
pub mod entries;
pub mod inventory;
mod leak_response;
pub mod leaks;
pub mod mcp;
pub mod node_watch;
pub mod oauth;
pub mod oauth_client_credentials;
pub mod oidc_issuer;
pub mod rotation;
mod ssh_authority;
pub mod suspensions;

pub use auth_audit::{AUTH_AUDIT_BURST, AUTH_AUDIT_WINDOW_MS};
pub use decision::SOURCE_IP;
pub use lifecycle::{MAX_BACKOFF_MS, PROVIDER_DEADLINE, REVOCATIONS_PER_PROVIDER, backoff_ms};
pub use tasks::act_claim;

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
    /// The request conflicts with work already under way (a rotation
    /// still pending): 409, not a refusal of the caller.
    #[error("{0}")]
    Conflict(String),
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
        /// The decision ran out of time: a denial that did not decide,
        /// answered 503 so the client asks again.
        timed_out: bool,
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

#[derive(Debug)]
pub struct Broker {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) keyring: Arc<Keyring>,
    roles: HashMap<String, Role>,
    engines: HashMap<EngineKind, Arc<dyn Engine>>,
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
    /// Woken when a leak response was left due for a retry.
    pub(crate) leak_wake: Notify,
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
    /// Bounds the `console.csrf_refused` events anyone can write.
    csrf_refusals: std::sync::Mutex<auth_audit::AuditWindow<auth_audit::CsrfRefusals>>,
    /// Bounds the MCP route's refusal events a token holder can write.
    mcp_refusals: std::sync::Mutex<auth_audit::AuditWindow<auth_audit::McpRefusals>>,
    /// Revocations in flight, bounded per provider.
    revocations: lifecycle::Revocations,
    /// Built SSH KRLs, rebuilt after an SSH revocation.
    krl: ssh_authority::KrlCache,
    /// SHA-256 of each engine key and sealed admin password as last handed
    /// over, so a reload notices one another replica changed.
    engine_keys_seen: std::sync::Mutex<std::collections::HashMap<String, [u8; 32]>>,
    /// keymint as an OIDC issuer, when it is one.
    oidc: Option<oidc_issuer::OidcState>,
    /// Workloads whose entries nodes lost lately (`/v1/node/watch`'s `end`).
    deleted_entries: node_watch::DeletedEntries,
    /// The inventory's settings, set at start (`Broker::set_inventory`).
    inventory: std::sync::OnceLock<Arc<inventory::InventorySettings>>,
    /// Registered OAuth clients, set at start (`Broker::set_oauth_clients`).
    oauth_clients: std::sync::OnceLock<Arc<Vec<crate::oauth_clients::OAuthClient>>>,
    /// Rotation of held upstream keys, set at start (`Broker::set_rotation`).
    rotation: std::sync::OnceLock<Arc<rotation::RotationSettings>>,
    /// Rotations under way in this process.
    rotations: rotation::InFlight,
    /// Active suspensions by misuse monitoring (docs/design/0033).
    suspensions: Arc<suspensions::Suspensions>,
    /// The MCP servers whose credential keymint holds, set at start
    /// (`Broker::set_mcp_servers`).
    mcp_servers: std::sync::OnceLock<Vec<String>>,
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
    /// keymint as an OIDC issuer (the same `Issuer` its engines sign with).
    pub oidc: Option<Arc<keymint_issuer::Issuer>>,
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
            leak_wake: Notify::new(),
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
            deleted_entries: Default::default(),
            token_cache: Default::default(),
            proxy_denials: Default::default(),
            csrf_refusals: Default::default(),
            mcp_refusals: Default::default(),
            revocations: Default::default(),
            krl: Default::default(),
            engine_keys_seen: Default::default(),
            oidc: p.oidc.map(oidc_issuer::OidcState::new),
            inventory: std::sync::OnceLock::new(),
            oauth_clients: std::sync::OnceLock::new(),
            rotation: std::sync::OnceLock::new(),
            rotations: Default::default(),
            suspensions: Arc::default(),
            mcp_servers: std::sync::OnceLock::new(),
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

    /// The policy in force (and its decision budget).
    pub fn policy(&self) -> &PolicyState {
        &self.policy
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
            // Never the caller's value: a role name can be anything.
            .ok_or_else(|| BrokerError::BadRequest("`role` names no configured role".into()))
    }

    fn engine(&self, name: EngineKind) -> Result<&Arc<dyn Engine>> {
        self.engines
            .get(&name)
            .ok_or_else(|| BrokerError::BadRequest(format!("engine `{name}` is not configured")))
    }

    pub(crate) fn notify_audit(&self) {
        self.audit_wake.notify_one();
    }
}
