//! keymint's policy as code, in Cedar.
//!
//! - [`SCHEMA`]: the schema every policy is validated against (strict mode);
//! - [`PolicySet::load`]: policies from files, parsed, named and validated
//!   as a whole (an invalid set is refused whole, so the caller keeps the
//!   previous one in force);
//! - [`PolicySet::decide`]: one [`Query`] in, one [`Decision`] out, which
//!   names the policies that decided it. Any error, missing entity or
//!   overrun of the time budget denies;
//! - [`cases`]: `keymint policy test`, expected decisions checked like code.
//!
//! A permit policy annotated `@approval("required")` (any value) allows
//! only once a human approved the request: the decision is
//! [`Verdict::NeedsApproval`] until the context says `approved`.

pub mod cases;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId, EntityTypeName,
    EntityUid, Policy, PolicyId, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};

/// The Cedar schema (`keymint.cedarschema`).
pub const SCHEMA: &str = include_str!("keymint.cedarschema");

/// The annotation that makes a permit policy wait for a human.
pub const APPROVAL_ANNOTATION: &str = "approval";

/// A policy file larger than this is refused.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// More policies than this in one set are refused.
pub const MAX_POLICIES: usize = 10_000;
/// A decision that takes longer than this denies.
pub const DECISION_BUDGET: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file `{path}`: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("policy file `{path}` is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("policy file `{path}` does not parse: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("policy id `{id}` is used twice (in `{first}` and `{second}`)")]
    DuplicateId {
        id: String,
        first: String,
        second: String,
    },
    #[error("more than {MAX_POLICIES} policies")]
    TooMany,
    #[error("the policies do not validate against keymint's schema:\n{0}")]
    Invalid(String),
    #[error("the policy schema does not load: {0}")]
    Schema(String),
    /// A policy could not join the set of a role it applies to: refused,
    /// because a policy left out (a `forbid`, say) would fail open.
    #[error("policy `{id}` cannot be indexed for role `{role}`: {reason}")]
    Index {
        id: String,
        role: String,
        reason: String,
    },
}

/// The loaded schema: parsed once.
#[derive(Debug, Clone)]
pub struct PolicySchema {
    schema: Schema,
    actions: Entities,
    names: Names,
}

impl PolicySchema {
    pub fn new() -> Result<Self, PolicyError> {
        let (schema, _warnings) =
            Schema::from_cedarschema_str(SCHEMA).map_err(|e| PolicyError::Schema(e.to_string()))?;
        let actions = schema
            .action_entities()
            .map_err(|e| PolicyError::Schema(e.to_string()))?;
        let names = Names::new().map_err(PolicyError::Schema)?;
        Ok(Self {
            schema,
            actions,
            names,
        })
    }
}

/// The entity types and action entities a decision names, parsed once.
/// `EntityTypeName::from_str` runs Cedar's grammar over the name every
/// time (thousands of instructions), and a decision names three of them
/// (docs/design/0036, "Eleventh pass").
#[derive(Debug, Clone)]
struct Names {
    workload: EntityTypeName,
    operator: EntityTypeName,
    role: EntityTypeName,
    /// `Keymint::Action::"…"` of each action, in [`Action::ALL`]'s order
    /// (the enum's, as [`Shapes`] reads it).
    actions: Vec<EntityUid>,
}

impl Names {
    fn new() -> Result<Self, String> {
        let ty =
            |t: &str| EntityTypeName::from_str(t).map_err(|e| format!("entity type `{t}`: {e}"));
        let action = ty("Keymint::Action")?;
        Ok(Self {
            workload: ty("Keymint::Workload")?,
            operator: ty("Keymint::Operator")?,
            role: ty("Keymint::Role")?,
            actions: Action::ALL
                .iter()
                .map(|a| {
                    EntityUid::from_type_name_and_id(action.clone(), EntityId::new(a.as_str()))
                })
                .collect(),
        })
    }

    /// The principal of a decision: an operator (for approvals) or a
    /// workload.
    fn principal(&self, operator: bool, id: &str) -> EntityUid {
        let t = if operator {
            &self.operator
        } else {
            &self.workload
        };
        EntityUid::from_type_name_and_id(t.clone(), EntityId::new(id))
    }

    fn role(&self, name: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(self.role.clone(), EntityId::new(name))
    }

    /// `action`'s entity; an action missing from [`Action::ALL`] is named
    /// by parsing, as before.
    fn action(&self, action: Action) -> Result<EntityUid, String> {
        match self.actions.get(action as usize) {
            Some(uid) => Ok(uid.clone()),
            None => uid("Keymint::Action", action.as_str()),
        }
    }
}

/// What a request asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    StartTask,
    Issue,
    Renew,
    Delegate,
    Use,
    Approve,
    /// An MCP `tools/call` through keymint's MCP route (docs/design/0031).
    CallTool,
    /// An MCP `resources/read` through the MCP route (docs/design/0031).
    ReadResource,
    /// An MCP `prompts/get` through the MCP route (docs/design/0031).
    GetPrompt,
}

impl Action {
    /// Every action, in declaration order.
    pub const ALL: [Self; 9] = [
        Self::StartTask,
        Self::Issue,
        Self::Renew,
        Self::Delegate,
        Self::Use,
        Self::Approve,
        Self::CallTool,
        Self::ReadResource,
        Self::GetPrompt,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::StartTask => "start_task",
            Self::Issue => "issue",
            Self::Renew => "renew",
            Self::Delegate => "delegate",
            Self::Use => "use",
            Self::Approve => "approve",
            Self::CallTool => "call_tool",
            Self::ReadResource => "read_resource",
            Self::GetPrompt => "get_prompt",
        }
    }
}

/// Who asks: a workload, or (for [`Action::Approve`]) an operator.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Principal {
    /// The workload id (or the operator's name).
    pub id: String,
    #[serde(default)]
    pub method: String,
    #[serde(default)]
    pub issuer: String,
    /// Attributes from the identity's claim mappings (Cedar tags).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// The role asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleFacts {
    pub name: String,
    #[serde(default)]
    pub engine: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub max_ttl_secs: i64,
}

/// What the request is for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestFacts {
    pub intent: String,
    pub purpose: String,
    pub environment: String,
    pub subject: String,
    pub destination: String,
    pub time: i64,
    pub source_ip: Option<IpAddr>,
    pub approved: bool,
    pub scopes: Vec<String>,
    pub principals: Vec<String>,
    pub ttl_secs: i64,
    pub task: String,
    pub parent_task: String,
    pub delegation_depth: i64,
    pub delegation_chain: Vec<String>,
    /// OAuth token requests only.
    pub oauth: Option<OAuthFacts>,
    /// MCP requests only (`call_tool`, `read_resource`, `get_prompt`).
    pub mcp: Option<McpFacts>,
}

/// What an MCP request asks for (the `mcp` record of the context): the
/// JSON-RPC method, the tool, resource URI or prompt it names, and the
/// shape of its arguments, never their values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct McpFacts {
    /// The `[[mcp.servers]]` entry's name.
    pub server: String,
    /// The JSON-RPC method: `tools/call`, `resources/read` or `prompts/get`.
    pub method: String,
    /// The tool's name (`params.name` of a `tools/call`; else "").
    pub tool: String,
    /// The resource's URI (`params.uri` of a `resources/read`; else "").
    pub uri: String,
    /// The prompt's name (`params.name` of a `prompts/get`; else "").
    pub prompt: String,
    /// The top-level keys of `params.arguments`.
    pub argument_keys: Vec<String>,
    /// The same keys with their JSON types, as `key:type` (`type` one of
    /// `string`, `number`, `boolean`, `object`, `array`, `null`).
    pub argument_types: Vec<String>,
}

/// What an OAuth token request asks for (the `oauth` record of the context).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OAuthFacts {
    pub grant_type: String,
    pub resource: String,
    pub client_id: String,
    pub actor_chain: Vec<String>,
    pub dpop: bool,
}

/// One authorization question.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Query {
    pub action: Action,
    pub principal: Principal,
    pub role: RoleFacts,
    pub context: RequestFacts,
}

/// The answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
    /// Allowed once a human approves this request.
    #[serde(rename = "approval")]
    NeedsApproval,
}

impl Verdict {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::NeedsApproval => "approval",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A decision and why: the policies that decided it (the permits that
/// applied, or the forbids that applied), and any errors, which deny.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub policies: Vec<String>,
    pub errors: Vec<String>,
    /// The decision ran over its time budget and so denied without
    /// deciding: the same request may well pass when asked again.
    pub timed_out: bool,
}

impl Decision {
    fn deny_because(e: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Deny,
            policies: Vec::new(),
            errors: vec![e.into()],
            timed_out: false,
        }
    }

    /// One line for an audit event or an error message.
    pub fn reason(&self) -> String {
        if !self.errors.is_empty() {
            return format!("policy error: {}", self.errors.join("; "));
        }
        match (self.verdict, self.policies.is_empty()) {
            (Verdict::Deny, true) => "no policy permits this request".into(),
            (Verdict::Deny, false) => format!("forbidden by {}", self.policies.join(", ")),
            (Verdict::Allow, _) => format!("permitted by {}", self.policies.join(", ")),
            (Verdict::NeedsApproval, _) => {
                format!("needs approval by {}", self.policies.join(", "))
            }
        }
    }
}

/// A validated set of policies, each named by its `@id` annotation or by
/// `file:N` (its place in its file, from 1).
#[derive(Debug, Clone)]
pub struct PolicySet {
    set: cedar_policy::PolicySet,
    /// The policies that can apply to one role: those scoped to it
    /// (`resource == Keymint::Role::"r"` or `in`) and those not scoped to a
    /// role. Cedar evaluates every policy of the set it is given, so a
    /// decision uses its role's subset: a set of hundreds of policies costs
    /// what the role's few do (docs/benchmarks.md).
    by_role: std::collections::HashMap<String, cedar_policy::PolicySet>,
    /// The policies not scoped to one role: for roles no policy names.
    general: cedar_policy::PolicySet,
    schema: PolicySchema,
    sources: Vec<PathBuf>,
    approval: HashSet<PolicyId>,
    /// The entities of recent (principal, role) pairs, built and validated
    /// once (see [`EntityCache`]). A reload makes a new set, and with it an
    /// empty cache.
    entities: EntityCache,
    /// Cedar `ip` values of recent source addresses (see [`IpValues`]).
    ips: IpValues,
    /// The request shapes already validated against the schema (see
    /// [`Shapes`]).
    shapes: Shapes,
    /// Recent decisions, by their whole query (see [`Decisions`]).
    decisions: Decisions,
}

/// Values kept by key, at most `N`: past it one kept entry is dropped to
/// make room (a bound, not a policy: a miss only costs the value's
/// construction). Dropping one, not clearing the map, keeps the cost of
/// any one decision bounded: dropping thousands of entity stores at once
/// took longer than a decision's budget in a debug build. A
/// copy of a policy set starts with an empty map, as a reload does. A
/// panic elsewhere while the map was held leaves it usable: it holds only
/// finished entries.
struct Kept<K, V, const N: usize>(std::sync::Mutex<std::collections::HashMap<K, V>>);

impl<K: std::hash::Hash + Eq + Clone, V: Clone, const N: usize> Kept<K, V, N> {
    fn get(&self, k: &K) -> Option<V> {
        self.lock().get(k).cloned()
    }

    fn put(&self, k: K, v: V) {
        let mut map = self.lock();
        if map.len() >= N
            && !map.contains_key(&k)
            && let Some(old) = map.keys().next().cloned()
        {
            map.remove(&old);
        }
        map.insert(k, v);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<K, V>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<K, V, const N: usize> Default for Kept<K, V, N> {
    fn default() -> Self {
        Self(std::sync::Mutex::new(std::collections::HashMap::new()))
    }
}

impl<K, V, const N: usize> Clone for Kept<K, V, N> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<K, V, const N: usize> fmt::Debug for Kept<K, V, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kept")
    }
}

/// The most source addresses whose Cedar `ip` value is kept.
const IP_VALUES_MAX: usize = 1024;

/// `RestrictedExpression::new_ip` parses the name of the `ip` extension
/// function with Cedar's grammar on every call: about 47,000 instructions,
/// a quarter of a whole decision in a release build. The value made for one
/// address is always the same, so it is made once per address and cloned.
type IpValues = Kept<IpAddr, RestrictedExpression, IP_VALUES_MAX>;

impl IpValues {
    fn value(&self, ip: IpAddr) -> RestrictedExpression {
        if let Some(v) = self.get(&ip) {
            return v;
        }
        let v = RestrictedExpression::new_ip(ip.to_string());
        self.put(ip, v.clone());
        v
    }
}

/// What a request's validation against the schema depends on, and all it
/// depends on: the action (which also fixes the principal's entity type,
/// `Operator` for approvals, else `Workload`) and which of the context's
/// optional attributes are present. Everything else in a request is built
/// by [`PolicySet::decide`] from the same Rust types every time: the
/// resource is a `Role`, each context attribute has one Cedar type
/// (strings, longs, booleans, sets of strings, records of those, an `ip`),
/// and no attribute holds an entity. So a shape that validated once
/// validates always, and later requests of that shape are built without
/// the schema: Cedar's request validation was about 62,000 of a decision's
/// 135,000 instructions in a release build (docs/design/0036). The first
/// request of each shape, after every load or reload, is still validated
/// in full; a shape that fails is never recorded, so it fails every time.
/// The test `every_request_shape_validates_and_decides_as_when_validated`
/// builds every shape and compares the decisions with and without the
/// schema.
#[derive(Default)]
struct Shapes([std::sync::atomic::AtomicU8; Action::ALL.len()]);

impl Shapes {
    /// The bit of `q`'s shape among its action's eight, and its action's
    /// slot.
    fn of(q: &Query) -> (usize, u8) {
        let c = &q.context;
        let bit = u8::from(c.oauth.is_some())
            | (u8::from(c.mcp.is_some()) << 1)
            | (u8::from(c.source_ip.is_some()) << 2);
        (q.action as usize, 1 << bit)
    }

    /// An action without a slot (one added to [`Action`] but not to
    /// [`Action::ALL`]) is never recorded: its requests are always
    /// validated.
    fn validated(&self, q: &Query) -> bool {
        let (slot, bit) = Self::of(q);
        self.0
            .get(slot)
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Acquire) & bit != 0)
    }

    fn record(&self, q: &Query) {
        let (slot, bit) = Self::of(q);
        if let Some(s) = self.0.get(slot) {
            s.fetch_or(bit, std::sync::atomic::Ordering::Release);
        }
    }
}

impl Clone for Shapes {
    /// A copy starts again, as a reload does: its first requests are
    /// validated.
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl fmt::Debug for Shapes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Shapes")
    }
}

/// The most recent decisions kept.
const DECISIONS_MAX: usize = 4096;

/// A decision depends on the policy set and the query, and on nothing
/// else: Cedar evaluates without a clock, I/O or randomness (`context.time`
/// is the query's own, in seconds), the entities are built from the query
/// (see [`EntityCache`]), and the approval rule reads the set and
/// `context.approved`. So a query asked again is answered with the decision
/// made for it before: a task issuing many credentials within one second
/// asks the same query each time, and building its Cedar context alone
/// was the largest part of a decision (docs/design/0036, "Twelfth pass").
/// An entry is found by a hash of the whole query (seeded per set, so that
/// nobody can aim queries at one slot) and served only when the query it
/// holds equals the one asked, field by field: any fact that differs is a
/// new decision. Kept are decisions made within their time budget and
/// without errors; a reload makes a new set, and with it an empty map.
#[derive(Default)]
struct Decisions {
    seed: foldhash::quality::RandomState,
    kept: Kept<u64, Arc<(Query, Decision)>, DECISIONS_MAX>,
}

impl Decisions {
    fn key(&self, q: &Query) -> u64 {
        std::hash::BuildHasher::hash_one(&self.seed, q)
    }

    /// The decision kept for `q` (under `key`), if it was asked before.
    fn get(&self, key: u64, q: &Query) -> Option<Decision> {
        self.kept
            .get(&key)
            .filter(|kept| kept.0 == *q)
            .map(|kept| kept.1.clone())
    }

    fn put(&self, key: u64, q: &Query, d: &Decision) {
        self.kept.put(key, Arc::new((q.clone(), d.clone())));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept.lock().len()
    }
}

impl Clone for Decisions {
    /// A copy starts empty, as a reload does.
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl fmt::Debug for Decisions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Decisions")
    }
}

/// The most (principal, role) pairs whose entities are kept.
const ENTITY_CACHE_MAX: usize = 4096;

/// The entity store of a decision (the schema's actions, the principal's
/// entity and the role's) depends only on the principal's and the role's
/// facts, not on the request: it is built and validated against the
/// schema once per pair and reused while those facts are unchanged. Each
/// hit compares the whole facts, so a role or identity that changed (a
/// role's scopes edited in the configuration, other claims) is built again,
/// never served from the cache.
type EntityCache = Kept<(bool, String, String), Arc<CachedEntities>, ENTITY_CACHE_MAX>;

struct CachedEntities {
    principal: Principal,
    role: RoleFacts,
    entities: Entities,
}

impl EntityCache {
    /// The entities for `q`'s principal and role (`operator`: the principal
    /// is an operator, for [`Action::Approve`]), built by `build` on a miss.
    fn get_or_build(
        &self,
        q: &Query,
        operator: bool,
        build: impl FnOnce() -> Result<Entities, String>,
    ) -> Result<Arc<CachedEntities>, String> {
        let key = (operator, q.principal.id.clone(), q.role.name.clone());
        if let Some(c) = self.get(&key)
            && c.principal == q.principal
            && c.role == q.role
        {
            return Ok(c);
        }
        let built = Arc::new(CachedEntities {
            principal: q.principal.clone(),
            role: q.role.clone(),
            entities: build()?,
        });
        self.put(key, Arc::clone(&built));
        Ok(built)
    }
}

impl PolicySet {
    /// No policy: every request is denied.
    pub fn empty(schema: PolicySchema) -> Self {
        Self {
            set: cedar_policy::PolicySet::new(),
            by_role: std::collections::HashMap::new(),
            general: cedar_policy::PolicySet::new(),
            schema,
            sources: Vec::new(),
            approval: HashSet::new(),
            entities: EntityCache::default(),
            ips: IpValues::default(),
            shapes: Shapes::default(),
            decisions: Decisions::default(),
        }
    }

    /// Loads, names and validates the policies in `paths` (files, or
    /// directories whose `*.cedar` files are read in name order).
    pub fn load(schema: &PolicySchema, paths: &[PathBuf]) -> Result<Self, PolicyError> {
        let mut files = Vec::new();
        for p in paths {
            if p.is_dir() {
                let rd = std::fs::read_dir(p).map_err(|e| read_err(p, &e))?;
                let mut in_dir: Vec<PathBuf> = rd
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| f.extension().is_some_and(|x| x == "cedar") && f.is_file())
                    .collect();
                in_dir.sort();
                files.extend(in_dir);
            } else {
                files.push(p.clone());
            }
        }
        let mut texts = Vec::with_capacity(files.len());
        for f in &files {
            let meta = std::fs::metadata(f).map_err(|e| read_err(f, &e))?;
            if meta.len() > MAX_FILE_BYTES {
                return Err(PolicyError::TooLarge { path: f.clone() });
            }
            let text = std::fs::read_to_string(f).map_err(|e| read_err(f, &e))?;
            texts.push((f.clone(), text));
        }
        let mut set = Self::from_sources(schema, &texts)?;
        set.sources = files;
        Ok(set)
    }

    /// Parses, names and validates policies given as (name, text) pairs.
    pub fn from_sources(
        schema: &PolicySchema,
        sources: &[(PathBuf, String)],
    ) -> Result<Self, PolicyError> {
        let mut set = cedar_policy::PolicySet::new();
        let mut origin: BTreeMap<String, String> = BTreeMap::new();
        let mut approval = HashSet::new();
        for (path, text) in sources {
            let file = path.display().to_string();
            let short = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| file.clone());
            let parsed =
                cedar_policy::PolicySet::from_str(text).map_err(|e| PolicyError::Parse {
                    path: path.clone(),
                    reason: format!("{e}"),
                })?;
            if parsed.templates().next().is_some() {
                return Err(PolicyError::Parse {
                    path: path.clone(),
                    reason: "templates are not supported; write plain policies".into(),
                });
            }
            // `from_str` numbers policies policy0, policy1, … in file order.
            let mut policies: Vec<&Policy> = parsed.policies().collect();
            policies.sort_by_key(|p| {
                p.id()
                    .to_string()
                    .trim_start_matches("policy")
                    .parse::<usize>()
                    .unwrap_or(usize::MAX)
            });
            for (n, p) in policies.into_iter().enumerate() {
                let name = match p.annotation("id") {
                    Some(id) if !id.trim().is_empty() => id.trim().to_owned(),
                    _ => format!("{short}:{}", n + 1),
                };
                if let Some(first) = origin.insert(name.clone(), file.clone()) {
                    return Err(PolicyError::DuplicateId {
                        id: name,
                        first,
                        second: file,
                    });
                }
                let id = PolicyId::new(name);
                if p.effect() == cedar_policy::Effect::Permit
                    && p.annotation(APPROVAL_ANNOTATION).is_some()
                {
                    approval.insert(id.clone());
                }
                set.add(p.new_id(id)).map_err(|e| PolicyError::Parse {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                if origin.len() > MAX_POLICIES {
                    return Err(PolicyError::TooMany);
                }
            }
        }
        let result = Validator::new(schema.schema.clone()).validate(&set, ValidationMode::Strict);
        if !result.validation_passed() {
            let msgs: Vec<String> = result
                .validation_errors()
                .map(|e| format!("- {e}"))
                .collect();
            return Err(PolicyError::Invalid(msgs.join("\n")));
        }
        let (by_role, general) = index_by_role(set.policies())?;
        Ok(Self {
            set,
            by_role,
            general,
            schema: schema.clone(),
            sources: sources.iter().map(|(p, _)| p.clone()).collect(),
            approval,
            entities: EntityCache::default(),
            ips: IpValues::default(),
            shapes: Shapes::default(),
            decisions: Decisions::default(),
        })
    }

    /// The ids of the policies, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.set.policies().map(|p| p.id().to_string()).collect();
        ids.sort();
        ids
    }

    /// The files the policies came from.
    pub fn sources(&self) -> &[PathBuf] {
        &self.sources
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Decides `q`. Fails closed: an entity or context that does not fit
    /// the schema, an error in any policy, or a decision over the time
    /// budget is a denial that says why.
    pub fn decide(&self, q: &Query) -> Decision {
        self.decide_within(q, DECISION_BUDGET)
    }

    /// [`Self::decide`] with another time budget. A decision over it is a
    /// denial marked [`Decision::timed_out`].
    pub fn decide_within(&self, q: &Query, budget: Duration) -> Decision {
        let key = self.decisions.key(q);
        if let Some(d) = self.decisions.get(key, q) {
            return d;
        }
        let started = Instant::now();
        let d = match self.decide_inner(q) {
            Ok(d) => d,
            Err(e) => Decision::deny_because(e),
        };
        if started.elapsed() > budget {
            let mut d = Decision::deny_because(format!(
                "the decision took longer than {} ms",
                budget.as_millis()
            ));
            d.timed_out = true;
            return d;
        }
        if d.errors.is_empty() {
            self.decisions.put(key, q, &d);
        }
        d
    }

    /// The entities a decision on `q` sees: the schema's actions, the
    /// principal (an operator for approvals, else a workload with its
    /// method, issuer and attributes as tags) and the role, validated
    /// against the schema.
    fn build_entities(&self, q: &Query, operator: bool) -> Result<Entities, String> {
        let s = &self.schema;
        let principal_entity = if operator {
            Entity::with_uid(s.names.principal(true, &q.principal.id))
        } else {
            let uid = s.names.principal(false, &q.principal.id);
            let attrs = [
                ("method".to_owned(), str_expr(&q.principal.method)),
                ("issuer".to_owned(), str_expr(&q.principal.issuer)),
            ];
            let tags = q
                .principal
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), str_expr(v)));
            Entity::new_with_tags(uid, attrs, [], tags)
                .map_err(|e| format!("workload entity: {e}"))?
        };
        let role = Entity::new(
            s.names.role(&q.role.name),
            [
                ("engine".to_owned(), str_expr(&q.role.engine)),
                ("scopes".to_owned(), str_set(&q.role.scopes)),
                (
                    "max_ttl_secs".to_owned(),
                    RestrictedExpression::new_long(q.role.max_ttl_secs),
                ),
            ]
            .into_iter()
            .collect(),
            HashSet::new(),
        )
        .map_err(|e| format!("role entity: {e}"))?;
        s.actions
            .clone()
            .add_entities([principal_entity, role], Some(&s.schema))
            .map_err(|e| format!("entities: {e}"))
    }

    fn decide_inner(&self, q: &Query) -> Result<Decision, String> {
        let s = &self.schema;
        let operator = q.action == Action::Approve;
        let principal = s.names.principal(operator, &q.principal.id);
        let role_uid = s.names.role(&q.role.name);
        let cached = self
            .entities
            .get_or_build(q, operator, || self.build_entities(q, operator))?;
        let entities = &cached.entities;
        let action = s.names.action(q.action)?;
        let c = &q.context;
        let mut pairs = vec![
            ("intent".to_owned(), str_expr(&c.intent)),
            ("purpose".to_owned(), str_expr(&c.purpose)),
            ("environment".to_owned(), str_expr(&c.environment)),
            ("subject".to_owned(), str_expr(&c.subject)),
            ("destination".to_owned(), str_expr(&c.destination)),
            ("time".to_owned(), RestrictedExpression::new_long(c.time)),
            (
                "approved".to_owned(),
                RestrictedExpression::new_bool(c.approved),
            ),
            ("scopes".to_owned(), str_set(&c.scopes)),
            ("principals".to_owned(), str_set(&c.principals)),
            (
                "ttl_secs".to_owned(),
                RestrictedExpression::new_long(c.ttl_secs),
            ),
            ("task".to_owned(), str_expr(&c.task)),
            ("parent_task".to_owned(), str_expr(&c.parent_task)),
            (
                "delegation_depth".to_owned(),
                RestrictedExpression::new_long(c.delegation_depth),
            ),
            ("delegation_chain".to_owned(), str_set(&c.delegation_chain)),
        ];
        if let Some(o) = &c.oauth {
            let record = RestrictedExpression::new_record([
                ("grant_type".to_owned(), str_expr(&o.grant_type)),
                ("resource".to_owned(), str_expr(&o.resource)),
                ("client_id".to_owned(), str_expr(&o.client_id)),
                ("actor_chain".to_owned(), str_set(&o.actor_chain)),
                ("dpop".to_owned(), RestrictedExpression::new_bool(o.dpop)),
            ])
            .map_err(|e| format!("context: {e}"))?;
            pairs.push(("oauth".to_owned(), record));
        }
        if let Some(m) = &c.mcp {
            let record = RestrictedExpression::new_record([
                ("server".to_owned(), str_expr(&m.server)),
                ("method".to_owned(), str_expr(&m.method)),
                ("tool".to_owned(), str_expr(&m.tool)),
                ("uri".to_owned(), str_expr(&m.uri)),
                ("prompt".to_owned(), str_expr(&m.prompt)),
                ("argument_keys".to_owned(), str_set(&m.argument_keys)),
                ("argument_types".to_owned(), str_set(&m.argument_types)),
            ])
            .map_err(|e| format!("context: {e}"))?;
            pairs.push(("mcp".to_owned(), record));
        }
        if let Some(ip) = c.source_ip {
            pairs.push(("source_ip".to_owned(), self.ips.value(ip)));
        }
        let context = Context::from_pairs(pairs).map_err(|e| format!("context: {e}"))?;
        let validated = self.shapes.validated(q);
        let schema = (!validated).then_some(&s.schema);
        let request = Request::new(principal, action, role_uid, context, schema)
            .map_err(|e| format!("request: {e}"))?;
        if !validated {
            self.shapes.record(q);
        }
        let policies = self.by_role.get(&q.role.name).unwrap_or(&self.general);
        let response = Authorizer::new().is_authorized(&request, policies, entities);
        let errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|e| e.to_string())
            .collect();
        let mut policies: Vec<String> = response
            .diagnostics()
            .reason()
            .map(|p| p.to_string())
            .collect();
        policies.sort();
        if !errors.is_empty() {
            return Ok(Decision {
                verdict: Verdict::Deny,
                policies,
                errors,
                timed_out: false,
            });
        }
        let verdict = match response.decision() {
            CedarDecision::Deny => Verdict::Deny,
            CedarDecision::Allow => {
                let held = response
                    .diagnostics()
                    .reason()
                    .any(|p| self.approval.contains(p));
                if held && !c.approved {
                    Verdict::NeedsApproval
                } else {
                    Verdict::Allow
                }
            }
        };
        Ok(Decision {
            verdict,
            policies,
            errors,
            timed_out: false,
        })
    }
}

/// Splits `policies` into per-role subsets (each with the policies not
/// scoped to a role) and the policies not scoped to a role. A policy that
/// cannot be added to a subset is an error, never left out: a `forbid`
/// lost here would fail open.
fn index_by_role<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
) -> Result<
    (
        std::collections::HashMap<String, cedar_policy::PolicySet>,
        cedar_policy::PolicySet,
    ),
    PolicyError,
> {
    use cedar_policy::ResourceConstraint;
    let refused = |p: &Policy, role: &str, e: &dyn fmt::Display| PolicyError::Index {
        id: p.id().to_string(),
        role: role.to_owned(),
        reason: e.to_string(),
    };
    let mut scoped: std::collections::HashMap<String, Vec<Policy>> = Default::default();
    let mut general = cedar_policy::PolicySet::new();
    for p in policies {
        match p.resource_constraint() {
            ResourceConstraint::Eq(uid) | ResourceConstraint::In(uid)
                if uid.type_name().to_string() == "Keymint::Role" =>
            {
                scoped
                    .entry(uid.id().unescaped().to_owned())
                    .or_default()
                    .push(p.clone());
            }
            _ => general
                .add(p.clone())
                .map_err(|e| refused(p, "(every role)", &e))?,
        }
    }
    let mut by_role = std::collections::HashMap::with_capacity(scoped.len());
    for (role, ps) in scoped {
        let mut s = general.clone();
        for p in ps {
            s.add(p.clone()).map_err(|e| refused(&p, &role, &e))?;
        }
        by_role.insert(role, s);
    }
    Ok((by_role, general))
}

fn read_err(p: &Path, e: &std::io::Error) -> PolicyError {
    PolicyError::Read {
        path: p.to_owned(),
        reason: e.to_string(),
    }
}

fn uid(ty: &str, id: &str) -> Result<EntityUid, String> {
    let t = EntityTypeName::from_str(ty).map_err(|e| format!("entity type `{ty}`: {e}"))?;
    Ok(EntityUid::from_type_name_and_id(t, EntityId::new(id)))
}

fn str_expr(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_owned())
}

fn str_set(v: &[String]) -> RestrictedExpression {
    RestrictedExpression::new_set(v.iter().map(|s| str_expr(s)))
}

#[cfg(test)]
mod tests;
