//! Configuration: a versioned TOML file parsed into a validated [`Config`].
//! Unknown keys are refused, durations are human (`15m`), and everything is
//! checked before the server starts, so a bad file fails with a message that
//! names the key, not at the first request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use keymint_core::duration::parse_secs;
use keymint_core::model::{valid_name, valid_scope};
use keymint_core::role::{
    DatabaseRole, Egress, EngineKind, OpenAiRole, OpenRouterRole, Role, RoleKind, SshRole,
    TokenRole,
};
use keymint_core::rules::TaskLimits;
use keymint_proxy::config::{
    Policy, Prices, ProxySettings, RawPrice, RawProxySettings, RawUpstream, Upstream,
};
use serde::Deserialize;

pub const CONFIG_VERSION: u32 = 1;
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;
/// How long a held request waits for a human, by default.
pub const DEFAULT_APPROVAL_TTL: u64 = 15 * 60;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    version: u32,
    server: RawServer,
    storage: RawStorage,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    tasks: RawTasks,
    #[serde(default)]
    databases: Vec<RawDatabase>,
    #[serde(default)]
    roles: Vec<RawRole>,
    /// The egress proxy's upstreams (docs/design/0007-egress-proxy.md).
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    /// Model prices in USD per million tokens, for spend budgets.
    #[serde(default)]
    prices: BTreeMap<String, RawPrice>,
    #[serde(default)]
    proxy: RawProxySettings,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    approvals: RawApprovals,
    /// Local processes attested over a Unix socket (`[local]`).
    #[serde(default)]
    local: Option<LocalConfig>,
    /// Workload identity: JWT/OIDC issuers (`[[identity.jwt]]`).
    #[serde(default)]
    identity: Option<keymint_identity::IdentityConfig>,
    #[serde(default)]
    operators: Vec<RawOperator>,
    /// Nodes whose `keymint agent` may act for their workloads (`[[nodes]]`).
    #[serde(default)]
    nodes: Vec<RawNode>,
    /// keymint as an OIDC issuer (`[issuer]`, docs/design/0016).
    #[serde(default)]
    issuer: Option<RawIssuer>,
    /// The credential inventory and leak response (`[inventory]`, docs/design/0027).
    #[serde(default)]
    inventory: Option<crate::inventory_config::RawInventory>,
    /// Registered OAuth clients (`[[oauth.clients]]`, docs/design/0026).
    #[serde(default)]
    oauth: Option<crate::oauth_clients::RawOAuth>,
    /// Rotation of the upstream keys keymint holds (`[[rotations]]`,
    /// docs/design/0035).
    #[serde(default)]
    rotations: Vec<crate::rotation_config::RawRotation>,
    /// Misuse monitoring (`[monitoring]`, docs/design/0033).
    #[serde(default)]
    monitoring: Option<crate::monitoring_config::RawMonitoring>,
    /// The MCP servers keymint fronts (`[[mcp.servers]]`, docs/design/0031).
    #[serde(default)]
    mcp: Option<crate::mcp::config::RawMcp>,
}

/// `[issuer]`: keymint as an OIDC issuer of workload JWTs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIssuer {
    /// The issuer URL (`iss`; discovery at `{url}/.well-known/...`).
    url: Option<String>,
    /// The algorithms keymint keeps signing keys for.
    algorithms: Option<Vec<keymint_core::role::SigningAlg>>,
    /// How long a new key is published before it signs (default 10m).
    publish_ahead: Option<String>,
    /// The SPIFFE trust domain of JWT-SVIDs.
    trust_domain: Option<String>,
}

/// keymint as an OIDC issuer (docs/design/0016-oidc-issuer.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcIssuerConfig {
    /// The issuer URL as configured; `None`: derived from the listener.
    pub url: Option<String>,
    pub algorithms: Vec<keymint_core::role::SigningAlg>,
    pub publish_ahead_secs: u64,
    pub trust_domain: Option<String>,
}

impl Default for OidcIssuerConfig {
    fn default() -> Self {
        Self {
            url: None,
            algorithms: keymint_core::role::SigningAlg::ALL.to_vec(),
            publish_ahead_secs: 600,
            trust_domain: None,
        }
    }
}

/// An issuer URL (`[issuer] url`, `[server] issuer`), OIDC Discovery §3:
/// `https://HOST[:PORT][/PATH]` without user info, query or fragment;
/// `http://` only when the host itself is loopback (`127.0.0.1.evil.example`
/// and `127.0.0.1@evil.example` are not).
fn check_issuer_url(field: &str, u: &str) -> Result<(), ConfigError> {
    let refused = || {
        ConfigError::Invalid(format!(
            "`{field}`: must be an https:// URL with a host and without user info, query or \
             fragment (http:// only to a loopback host)"
        ))
    };
    if u.len() > 512
        || u.contains(['?', '#', '@', '\\'])
        || u.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(refused());
    }
    let uri: http::Uri = u.parse().map_err(|_| refused())?;
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(refused)?;
    let loopback = || {
        let h = host.trim_start_matches('[').trim_end_matches(']');
        h.eq_ignore_ascii_case("localhost")
            || h.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    };
    let ok = if u.starts_with("https://") {
        true
    } else {
        u.starts_with("http://") && loopback()
    };
    if ok { Ok(()) } else { Err(refused()) }
}

/// The least `[issuer] publish_ahead`: the JWKS's `max-age` (300 s) plus
/// the 30 s in which every replica re-reads the key set
/// (docs/design/0016-oidc-issuer.md). A new key published for less could
/// sign a token before a verifier that cached the JWKS has seen it.
pub const MIN_PUBLISH_AHEAD_SECS: u64 = 300 + crate::broker::oidc_issuer::ISSUER_REFRESH.as_secs();

fn oidc_issuer(raw: RawIssuer) -> Result<OidcIssuerConfig, ConfigError> {
    let invalid = |m: &str| ConfigError::Invalid(format!("`issuer.{m}"));
    if let Some(u) = &raw.url {
        check_issuer_url("issuer.url", u)?;
    }
    let algorithms = raw
        .algorithms
        .unwrap_or_else(|| keymint_core::role::SigningAlg::ALL.to_vec());
    if algorithms.is_empty() {
        return Err(invalid("algorithms`: name at least one"));
    }
    let publish_ahead_secs = dur("issuer.publish_ahead", raw.publish_ahead.as_deref(), 600)?;
    if publish_ahead_secs < MIN_PUBLISH_AHEAD_SECS {
        return Err(invalid(
            "publish_ahead`: at least 5m30s (330 s): verifiers may cache the JWKS for 5 minutes \
             and replicas re-read the keys every 30 s, so a shorter wait lets a token carry a \
             `kid` a verifier has not seen",
        ));
    }
    if publish_ahead_secs > 7 * 86_400 {
        return Err(invalid("publish_ahead`: at most 7d"));
    }
    if let Some(td) = &raw.trust_domain {
        let ok = !td.is_empty()
            && td.len() <= 255
            && td.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
            });
        if !ok {
            return Err(invalid(
                "trust_domain`: must be a SPIFFE trust domain (a-z, 0-9, `.`, `-`, `_`)",
            ));
        }
    }
    Ok(OidcIssuerConfig {
        url: raw.url.map(|u| u.trim_end_matches('/').to_owned()),
        algorithms,
        publish_ahead_secs,
        trust_domain: raw.trust_domain,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    /// The node's join token (a `kma_` token, created 0600 if missing;
    /// a relative path is under the data directory).
    token_file: Option<PathBuf>,
    /// Or: the verified workload identity that is this node (`ISSUER/ID`
    /// of a JWT, or a SPIFFE ID).
    identity: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApprovals {
    /// How long a held request waits for a decision (and then for its
    /// requester to redeem it). Default 15m.
    ttl: Option<String>,
    /// Where each pending request is announced (JSON POST).
    webhook: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperator {
    name: String,
    /// The operator's token (created with mode 0600 if missing).
    token_file: PathBuf,
}

/// `[server.tls]`: the server's certificate and, for mTLS with X.509-SVIDs,
/// the trust bundle client certificates must chain to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM: the server certificate, then its chain.
    pub cert_file: PathBuf,
    /// PEM: its private key (PKCS#8, SEC1 or PKCS#1).
    pub key_file: PathBuf,
    /// PEM: CA certificates (a SPIFFE trust bundle) for client certificates.
    /// A client that presents one is the workload its SPIFFE ID names.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Refuse clients without a valid certificate at the handshake.
    #[serde(default)]
    pub require_client_cert: bool,
    /// `[[server.tls.trust_domains]]`: a bundle per SPIFFE trust domain
    /// (a file or a SPIFFE bundle endpoint); an SVID of a listed domain is
    /// verified against its own domain's bundle only.
    #[serde(default)]
    pub trust_domains: Vec<crate::trust_domains::TrustDomainConfig>,
}

/// `[local]`: the API on a Unix socket, where a caller without a bearer
/// token is the workload its process attests to (docs/design/0010).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// The socket (created 0600, or 0660 with `group`).
    pub socket: PathBuf,
    /// A group id that may connect too.
    #[serde(default)]
    pub group: Option<u32>,
    /// Registration entries: selectors → workload.
    #[serde(default, rename = "entry")]
    pub entries: Vec<keymint_attest::Entry>,
    /// Connections one uid may hold on the socket at once (default
    /// [`DEFAULT_LOCAL_CONNECTIONS_PER_UID`]): each is attested, its
    /// executable hashed, so one uid must not be able to take them all.
    /// Past it, a new connection is answered 503 and closed.
    #[serde(default = "default_local_connections_per_uid")]
    pub max_connections_per_uid: usize,
}

/// The default of `[local] max_connections_per_uid`: well above the pool
/// of one HTTP client, as the node agent's 32 per uid on its socket.
pub const DEFAULT_LOCAL_CONNECTIONS_PER_UID: usize = 64;

fn default_local_connections_per_uid() -> usize {
    DEFAULT_LOCAL_CONNECTIONS_PER_UID
}

/// A human who decides held requests.
#[derive(Debug, Clone)]
pub struct Operator {
    pub name: String,
    pub token_file: PathBuf,
}

/// A node whose agent may act for the workloads of its registration
/// entries (docs/design/0012).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub credential: NodeCredential,
}

/// How a node proves which node it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeCredential {
    /// A `kma_` join token in this file (relative: under the data directory).
    TokenFile(PathBuf),
    /// A verified workload identity: `ISSUER/ID` of a JWT, or a SPIFFE ID.
    Identity(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    /// Cedar policy files, or directories whose `*.cedar` files are read.
    #[serde(default)]
    paths: Vec<PathBuf>,
    /// How long one decision may take before it is refused as timed out,
    /// in milliseconds (default 50). For instrumented runs (valgrind),
    /// where everything is tens of times slower.
    decision_budget_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    name: String,
    engine: String,
    /// The admin connection, libpq `key=value` form or a URL.
    connection: String,
    /// `require` (verified TLS; the default off loopback) or `disable`
    /// (the default on loopback).
    #[serde(default)]
    tls: Option<String>,
    /// CA certificates (PEM) to trust instead of the Mozilla roots.
    #[serde(default)]
    ca_file: Option<PathBuf>,
    /// Allow `tls = "disable"` to a host that is not loopback: each new
    /// user's password would cross the network in clear text.
    #[serde(default)]
    dangerous_allow_plaintext: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: String,
    /// Serve plain HTTP instead of TLS. Only on a loopback address.
    #[serde(default)]
    dangerous_plaintext: bool,
    /// Serve TLS (and accept X.509-SVIDs from clients, with `client_ca_file`).
    #[serde(default)]
    tls: Option<TlsConfig>,
    #[serde(default)]
    max_body_bytes: Option<usize>,
    #[serde(default)]
    issuer: Option<String>,
    /// Whether this process may hold the background duties (default true).
    /// `false` keeps a replica (a `keymint proxy`) out of the election;
    /// only on a shared store, where another replica runs them.
    #[serde(default)]
    duties: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    data_dir: PathBuf,
    #[serde(default)]
    root_key_file: Option<PathBuf>,
    #[serde(default)]
    admin_token_file: Option<PathBuf>,
    /// `sqlite` (the default: `DATA_DIR/keymint.db`) or `postgres`.
    #[serde(default)]
    backend: Option<String>,
    /// PostgreSQL: `postgres://user@host:port/db`, without a password.
    #[serde(default)]
    url: Option<String>,
    /// PostgreSQL: a file holding the password (read at start).
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    pool_size: Option<usize>,
    /// PostgreSQL: `require` (the default) or `disable`.
    #[serde(default)]
    tls: Option<String>,
    /// PostgreSQL: CA certificates (PEM) to trust instead of the Mozilla roots.
    #[serde(default)]
    ca_file: Option<PathBuf>,
    /// PostgreSQL: allow `tls = "disable"` to a host that is not loopback.
    #[serde(default)]
    dangerous_allow_plaintext: bool,
}

/// Where the state lives.
#[derive(Debug, Clone)]
pub enum StorageBackend {
    /// `DATA_DIR/keymint.db`.
    Sqlite,
    /// A PostgreSQL database shared by every replica; the password (if
    /// any) is read from `password_file` at start.
    Postgres {
        /// Boxed: the options are large beside the SQLite variant.
        options: Box<keymint_store::PostgresOptions>,
        password_file: Option<PathBuf>,
    },
}

impl RawStorage {
    fn backend(&self) -> Result<StorageBackend, ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        match self.backend.as_deref().unwrap_or("sqlite") {
            "sqlite" => {
                if self.url.is_some()
                    || self.password_file.is_some()
                    || self.pool_size.is_some()
                    || self.tls.is_some()
                    || self.ca_file.is_some()
                    || self.dangerous_allow_plaintext
                {
                    return invalid(
                        "`storage.url`, `password_file`, `pool_size`, `tls`, `ca_file` and \
                         `dangerous_allow_plaintext` are for `backend = \"postgres\"`",
                    );
                }
                Ok(StorageBackend::Sqlite)
            }
            "postgres" => {
                let Some(url) = &self.url else {
                    return invalid("`storage.url` is required with `backend = \"postgres\"`");
                };
                let tls = match self.tls.as_deref().unwrap_or("require") {
                    "require" => keymint_store::PgTls::Require {
                        ca_file: self.ca_file.clone(),
                    },
                    "disable" if self.ca_file.is_some() => {
                        return invalid("`storage.ca_file` needs `tls = \"require\"`");
                    }
                    "disable" => keymint_store::PgTls::Disable,
                    _ => return invalid("`storage.tls` must be `require` or `disable`"),
                };
                let options = keymint_store::PostgresOptions::new(
                    url,
                    None,
                    self.pool_size
                        .unwrap_or(keymint_store::postgres::DEFAULT_POOL_SIZE),
                    tls,
                )
                .map_err(|e| ConfigError::Invalid(format!("[storage] {e}")))?;
                if options.tls == keymint_store::PgTls::Disable
                    && !options.is_local()
                    && !self.dangerous_allow_plaintext
                {
                    return invalid(
                        "`storage.tls = \"disable\"` sends the database password and every \
                         credential's state in plain text; only to a loopback host, or with \
                         `storage.dangerous_allow_plaintext = true`",
                    );
                }
                Ok(StorageBackend::Postgres {
                    options: Box::new(options),
                    password_file: self.password_file.clone(),
                })
            }
            _ => invalid("`storage.backend` must be `sqlite` or `postgres`"),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    #[serde(default)]
    file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTasks {
    default_ttl: Option<String>,
    max_ttl: Option<String>,
    max_idle_timeout: Option<String>,
    /// How long ended tasks and their leases are kept (default 30d; "0":
    /// forever).
    retain_ended: Option<String>,
}

/// `[[roles]]` as written: what every role has, and the keys of its
/// engine's kind, which that kind's own table checks (so a key that is
/// misspelt, or belongs to another kind, is refused by name).
#[derive(Debug, Deserialize)]
struct RawRole {
    name: String,
    engine: String,
    scopes: Vec<String>,
    default_ttl: String,
    max_ttl: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(flatten)]
    rest: toml::Table,
}

/// The keys of a token role.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenRole {
    /// For the egress proxy: which `[[upstreams]]` entry.
    #[serde(default)]
    upstream: Option<String>,
    /// With an upstream: models, endpoints, budgets, limits.
    #[serde(default)]
    proxy: Option<Policy>,
}

/// The keys of a database (postgres, mysql) role.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabaseRole {
    /// Which `[[databases]]` entry.
    #[serde(default)]
    database: Option<String>,
    /// Statements that grant the new user its rights; `{{name}}` stands for
    /// the quoted user name.
    #[serde(default)]
    creation_statements: Vec<String>,
    /// The most connections one lease's user may hold open at once
    /// (default 10, at most 1000).
    #[serde(default)]
    max_connections: Option<i64>,
}

/// The keys of an ssh role: `[roles.ssh]`, the CA, principals, options.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSshRole {
    #[serde(default)]
    ssh: Option<SshRole>,
}

/// The keys of a jwt role: `[roles.jwt]`, audience, algorithm, form.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwtRole {
    #[serde(default)]
    jwt: Option<keymint_core::role::JwtRole>,
}

/// The keys of an aws role: `[roles.aws]`, the IAM role, region, STS.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAwsRole {
    #[serde(default)]
    aws: Option<keymint_core::role::AwsRole>,
}

/// The keys of a federated role: `[roles.federated]`, the provider and
/// its federation ids (docs/design/0028-provider-federation.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFederatedRole {
    #[serde(default)]
    federated: Option<keymint_core::role::Federation>,
}

/// The keys of an openai role: `[roles.openai]`, project and admin key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOpenAiRole {
    #[serde(default)]
    openai: Option<OpenAiRole>,
}

/// The keys of an openrouter role: `[roles.openrouter]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOpenRouterRole {
    #[serde(default)]
    openrouter: Option<OpenRouterRole>,
}

pub use keymint_engines::DbTls;

/// TLS on a database's admin connections (docs/design/0025): `require`
/// (verified against `ca_file` or the Mozilla roots) or `disable`; without
/// `tls`, `require` off this machine (or with a `ca_file`, or when a
/// PostgreSQL connection string says `sslmode=require`) and `disable` on
/// loopback. Plain text off this machine only with the dangerous switch.
fn database_tls(
    d: &RawDatabase,
    local: bool,
    asks_tls: bool,
) -> Result<keymint_engines::DbTls, ConfigError> {
    use keymint_engines::DbTls;
    let name = &d.name;
    let tls = match (d.tls.as_deref(), &d.ca_file) {
        (Some("require"), ca) => DbTls::Require {
            ca_file: ca.clone(),
        },
        (Some("disable"), Some(_)) => {
            return Err(ConfigError::Invalid(format!(
                "database `{name}`: `ca_file` needs `tls = \"require\"`"
            )));
        }
        (Some("disable"), None) if asks_tls => {
            return Err(ConfigError::Invalid(format!(
                "database `{name}`: the connection string says `sslmode=require` but `tls` \
                 is `disable`"
            )));
        }
        (Some("disable"), None) => DbTls::Disable,
        (Some(_), _) => {
            return Err(ConfigError::Invalid(format!(
                "database `{name}`: `tls` must be `require` or `disable`"
            )));
        }
        (None, Some(ca)) => DbTls::Require {
            ca_file: Some(ca.clone()),
        },
        (None, None) if asks_tls || !local => DbTls::Require { ca_file: None },
        (None, None) => DbTls::Disable,
    };
    if tls == DbTls::Disable && !local {
        // Off this machine, each new user's password would cross the
        // network in clear text.
        if !d.dangerous_allow_plaintext {
            return Err(ConfigError::Invalid(format!(
                "database `{name}`: `tls = \"disable\"` to a host that is not loopback would \
                 send new users' passwords in clear text; use `tls = \"require\"`, or set \
                 `dangerous_allow_plaintext = true`"
            )));
        }
        tracing::warn!(
            database = %name,
            "dangerous_allow_plaintext: the admin connection to this database is not \
             encrypted; new users' passwords cross the network in clear text"
        );
    }
    Ok(tls)
}

/// A database keymint creates users in.
#[derive(Clone)]
pub struct DatabaseConfig {
    pub name: String,
    pub engine: EngineKind,
    /// The admin connection; may hold the admin password, so never shown.
    pub connection: String,
    /// TLS on the admin connections, resolved at load.
    pub tls: keymint_engines::DbTls,
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("name", &self.name)
            .field("engine", &self.engine)
            .field("connection", &"(not shown)")
            .field("tls", &self.tls)
            .finish()
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub plaintext: bool,
    /// TLS (and mTLS) for the listener; `None` with `plaintext`.
    pub tls: Option<TlsConfig>,
    pub max_body_bytes: usize,
    pub issuer: String,
    /// No issuer URL was configured: `issuer` names the listener, and
    /// follows it to the address it is bound to ([`Config::bound_to`]).
    pub issuer_from_listener: bool,
    pub data_dir: PathBuf,
    /// SQLite in `data_dir` (the default) or PostgreSQL.
    pub storage: StorageBackend,
    pub root_key_file: PathBuf,
    pub admin_token_file: PathBuf,
    pub audit_file: Option<PathBuf>,
    pub task_limits: TaskLimits,
    pub databases: Vec<DatabaseConfig>,
    pub roles: Vec<Role>,
    /// Cedar policy files and directories; none means every request that
    /// policy decides is denied.
    pub policy_paths: Vec<PathBuf>,
    /// How long one policy decision may take (`[policy] decision_budget_ms`).
    pub policy_decision_budget: std::time::Duration,
    /// Held requests: how long they wait, where they are announced.
    pub approval_ttl_secs: u64,
    pub approval_webhook: Option<String>,
    pub operators: Vec<Operator>,
    pub nodes: Vec<Node>,
    /// The Unix socket where local processes are attested.
    pub local: Option<LocalConfig>,
    /// Workload identity providers; none means only keymint's own tokens.
    pub identity: Option<keymint_identity::IdentityConfig>,
    /// The egress proxy: upstreams (the roles that use them say so in
    /// their [`Egress`]), prices.
    pub upstreams: Vec<Upstream>,
    pub prices: Prices,
    pub proxy: ProxySettings,
    /// keymint as an OIDC issuer; `None`: off, unless a role signs JWTs
    /// (then with the defaults).
    pub oidc: Option<OidcIssuerConfig>,
    /// The inventory's findings and the leak response (docs/design/0027).
    pub inventory: crate::inventory_config::InventoryConfig,
    /// Whether this process may hold the background duties
    /// (`[server] duties`, docs/design/0022).
    pub duties: bool,
    /// OAuth clients of the `client_credentials` grant (docs/design/0026).
    pub oauth_clients: Vec<crate::oauth_clients::OAuthClient>,
    /// How held upstream keys are rotated (docs/design/0035).
    pub rotations: Vec<crate::rotation_config::RotationConfig>,
    /// Misuse monitoring: rules, GeoIP, trusted proxies (docs/design/0033).
    pub monitoring: crate::monitoring_config::MonitoringConfig,
    /// The MCP servers keymint fronts as their protected resource.
    pub mcp: Vec<crate::mcp::config::McpServer>,
}

/// The URL a client reaches a listener at.
fn listener_url(tls: bool, listen: SocketAddr) -> String {
    format!("{}://{listen}", if tls { "https" } else { "http" })
}

impl Config {
    /// The listener is bound, at `addr`: the port the system chose when the
    /// configuration said 0. An issuer named after the listener names the
    /// address it is bound to, so that discovery documents, tokens' `iss`
    /// and the OAuth metadata point where clients can reach (before, a
    /// `--listen 127.0.0.1:0` server called itself `http://127.0.0.1:0`).
    pub fn bound_to(&mut self, addr: SocketAddr) {
        if self.issuer_from_listener {
            self.issuer = listener_url(self.tls.is_some(), addr);
        }
        self.listen = addr;
    }

    /// The issuer settings in force, if keymint is an issuer: the `[issuer]`
    /// table, or the defaults when a `jwt` or `aws` role needs one.
    pub fn oidc_issuer(&self) -> Option<OidcIssuerConfig> {
        let needed = self.roles.iter().any(|r| {
            matches!(
                r.kind,
                RoleKind::Jwt(_) | RoleKind::Aws(_) | RoleKind::Federated(_)
            )
        }) || self.upstreams.iter().any(|u| u.federation.is_some());
        match &self.oidc {
            Some(c) => Some(c.clone()),
            None if needed => Some(OidcIssuerConfig::default()),
            None => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The reason is in the message and not a `source`: an error chain
    /// printed whole (`{:#}`) would say it twice.
    #[error("cannot read `{path}`: {reason}")]
    Read {
        path: String,
        reason: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// A TOML or shape error without the configuration's values: toml's own
/// rendering quotes the offending line, which may hold a database password,
/// and serde's messages quote values (`invalid type: string "…"`). Say where
/// (line and column) and what, with every quoted value left out; key names,
/// in backticks, stay.
fn parse_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let mut message = String::with_capacity(e.message().len());
    let (mut quoted, mut named) = (false, false);
    for c in e.message().chars() {
        match c {
            // A name in backticks (a key, or what the syntax expected) stays.
            '`' if !quoted => {
                named = !named;
                message.push(c);
            }
            '"' if !named => {
                if !quoted {
                    message.push_str("\"…");
                }
                quoted = !quoted;
                if !quoted {
                    message.push('"');
                }
            }
            _ if quoted => {}
            c => message.push(c),
        }
    }
    let at = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!("line {line}, column {column}: ")
    });
    ConfigError::Parse(format!("{}{message}", at.unwrap_or_default()))
}

fn dur(key: &str, v: Option<&str>, default: u64) -> Result<u64, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => parse_secs(s).map_err(|e| ConfigError::Invalid(format!("`{key}`: {e}"))),
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|reason| ConfigError::Read {
            path: path.display().to_string(),
            reason,
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| parse_error(text, &e))?;
        if raw.version != CONFIG_VERSION {
            return Err(ConfigError::Invalid(format!(
                "`version` is {}, this keymint reads version {CONFIG_VERSION}",
                raw.version
            )));
        }
        let listen: SocketAddr = raw.server.listen.parse().map_err(|_| {
            ConfigError::Invalid(format!(
                "`server.listen`: `{}` is not an address such as 127.0.0.1:8200",
                raw.server.listen
            ))
        })?;
        match (&raw.server.tls, raw.server.dangerous_plaintext) {
            (Some(_), true) => {
                return Err(ConfigError::Invalid(
                    "`server.tls` and `server.dangerous_plaintext` exclude each other".into(),
                ));
            }
            (None, false) => {
                return Err(ConfigError::Invalid(
                    "set `[server.tls]` (cert_file, key_file) to serve TLS, or \
                     `server.dangerous_plaintext = true` to serve plain HTTP on a loopback address"
                        .into(),
                ));
            }
            _ => {}
        }
        if raw.server.tls.is_none() && !listen.ip().is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "`server.listen`: plain HTTP is only served on loopback, not on `{listen}`"
            )));
        }
        let storage = raw.storage.backend()?;
        let data_dir = raw.storage.data_dir;
        let tasks = TaskLimits {
            default_ttl_secs: dur("tasks.default_ttl", raw.tasks.default_ttl.as_deref(), 3600)?,
            max_ttl_secs: dur("tasks.max_ttl", raw.tasks.max_ttl.as_deref(), 86_400)?,
            max_idle_timeout_secs: dur(
                "tasks.max_idle_timeout",
                raw.tasks.max_idle_timeout.as_deref(),
                86_400,
            )?,
            retain_ended_secs: dur(
                "tasks.retain_ended",
                raw.tasks.retain_ended.as_deref(),
                keymint_core::rules::DEFAULT_RETAIN_ENDED_SECS,
            )?,
        };
        if tasks.default_ttl_secs == 0 || tasks.default_ttl_secs > tasks.max_ttl_secs {
            return Err(ConfigError::Invalid(
                "`tasks.default_ttl` must be between 1s and `tasks.max_ttl`".into(),
            ));
        }
        let mut databases: Vec<DatabaseConfig> = Vec::new();
        for d in raw.databases {
            if !valid_name(&d.name) {
                return Err(ConfigError::Invalid(format!(
                    "database name `{}` must be 1-64 of a-z, 0-9, `.`, `_`, `-`",
                    d.name
                )));
            }
            let (engine, local, asks_tls) = match d.engine.parse::<EngineKind>() {
                Ok(e @ EngineKind::Postgres) => (
                    e,
                    keymint_engines::postgres::Database::parse(&d.name, &d.connection)
                        .map_err(ConfigError::Invalid)?
                        .is_local(),
                    keymint_engines::postgres::Database::asks_for_tls(&d.connection),
                ),
                Ok(e @ EngineKind::Mysql) => (
                    e,
                    keymint_engines::mysql::Database::parse(&d.name, &d.connection)
                        .map_err(ConfigError::Invalid)?
                        .is_local(),
                    false,
                ),
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "database `{}`: unknown engine `{}` (available: postgres, mysql)",
                        d.name, d.engine
                    )));
                }
            };
            if databases.iter().any(|x| x.name == d.name) {
                return Err(ConfigError::Invalid(format!(
                    "database `{}` is defined twice",
                    d.name
                )));
            }
            let tls = database_tls(&d, local, asks_tls)?;
            databases.push(DatabaseConfig {
                name: d.name,
                engine,
                connection: d.connection,
                tls,
            });
        }
        let secs = |s: &str| parse_secs(s).map_err(|e| e.to_string());
        let mut upstreams: Vec<Upstream> = Vec::new();
        for u in raw.upstreams {
            let u =
                keymint_proxy::config::validate_upstream(u, secs).map_err(ConfigError::Invalid)?;
            if upstreams.iter().any(|x| x.name == u.name) {
                return Err(ConfigError::Invalid(format!(
                    "upstream `{}` is defined twice",
                    u.name
                )));
            }
            upstreams.push(u);
        }
        let prices = Prices::parse(raw.prices)
            .map_err(|e| ConfigError::Invalid(format!("`prices`: {e}")))?;
        let proxy = ProxySettings::parse(raw.proxy, secs).map_err(ConfigError::Invalid)?;
        let approval_ttl_secs = dur(
            "approvals.ttl",
            raw.approvals.ttl.as_deref(),
            DEFAULT_APPROVAL_TTL,
        )?;
        if approval_ttl_secs == 0 || approval_ttl_secs > 7 * 86_400 {
            return Err(ConfigError::Invalid(
                "`approvals.ttl` must be between 1s and 7d".into(),
            ));
        }
        let policy_decision_budget = match raw.policy.decision_budget_ms {
            None => keymint_policy::DECISION_BUDGET,
            Some(ms @ 1..=60_000) => std::time::Duration::from_millis(ms),
            Some(_) => {
                return Err(ConfigError::Invalid(
                    "`policy.decision_budget_ms` must be between 1 and 60000".into(),
                ));
            }
        };
        let approval_webhook = match raw.approvals.webhook {
            Some(u) if u.starts_with("https://") || u.starts_with("http://") => Some(u),
            Some(u) => {
                return Err(ConfigError::Invalid(format!(
                    "`approvals.webhook`: `{u}` is not an http(s) URL"
                )));
            }
            None => None,
        };
        let mut operators: Vec<Operator> = Vec::new();
        for o in raw.operators {
            if !valid_name(&o.name) {
                return Err(ConfigError::Invalid(format!(
                    "operator name `{}` must be 1-64 of a-z, 0-9, `.`, `_`, `-`",
                    o.name
                )));
            }
            if operators.iter().any(|x| x.name == o.name) {
                return Err(ConfigError::Invalid(format!(
                    "operator `{}` is defined twice",
                    o.name
                )));
            }
            operators.push(Operator {
                name: o.name,
                token_file: o.token_file,
            });
        }
        let mut nodes: Vec<Node> = Vec::new();
        for n in raw.nodes {
            if !valid_name(&n.name) {
                return Err(ConfigError::Invalid(format!(
                    "node name `{}` must be 1-64 of a-z, 0-9, `.`, `_`, `-`",
                    n.name
                )));
            }
            if nodes.iter().any(|x| x.name == n.name) {
                return Err(ConfigError::Invalid(format!(
                    "node `{}` is defined twice",
                    n.name
                )));
            }
            let credential = match (n.token_file, n.identity) {
                (Some(f), None) => NodeCredential::TokenFile(f),
                (None, Some(i)) if !i.is_empty() && !i.chars().any(char::is_control) => {
                    if nodes
                        .iter()
                        .any(|x| x.credential == NodeCredential::Identity(i.clone()))
                    {
                        return Err(ConfigError::Invalid(format!(
                            "identity `{i}` is given to two nodes"
                        )));
                    }
                    NodeCredential::Identity(i)
                }
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "node `{}` needs exactly one of `token_file` and `identity`",
                        n.name
                    )));
                }
            };
            nodes.push(Node {
                name: n.name,
                credential,
            });
        }
        let oidc = raw.issuer.map(oidc_issuer).transpose()?;
        let mut roles = Vec::new();
        for r in raw.roles {
            let role = validate_role(r, &databases, &upstreams, &prices)?;
            if roles.iter().any(|x: &Role| x.name == role.name) {
                return Err(ConfigError::Invalid(format!(
                    "role `{}` is defined twice",
                    role.name
                )));
            }
            roles.push(role);
        }
        let td = oidc.as_ref().and_then(|o| o.trust_domain.as_ref());
        if let Some(r) = roles
            .iter()
            .find(|r| matches!(&r.kind, RoleKind::Jwt(j) if j.spiffe) && td.is_none())
        {
            return Err(ConfigError::Invalid(format!(
                "role `{}`: `spiffe = true` needs `[issuer] trust_domain`",
                r.name
            )));
        }
        check_admin_upstreams(&roles)?;
        let inventory = crate::inventory_config::inventory_config(raw.inventory, &upstreams)?;
        let duties = raw.server.duties.unwrap_or(true);
        if !duties && matches!(storage, StorageBackend::Sqlite) {
            return Err(ConfigError::Invalid(
                "`server.duties = false` needs `[storage] backend = \"postgres\"`: on SQLite this \
                 process is the only one, and expiry, revocation retries and retention would never run"
                    .into(),
            ));
        }
        if raw
            .local
            .as_ref()
            .is_some_and(|l| l.max_connections_per_uid == 0)
        {
            return Err(ConfigError::Invalid(
                "`local.max_connections_per_uid` must be at least 1".into(),
            ));
        }
        let oauth_clients = crate::oauth_clients::oauth_clients(raw.oauth, &roles)?;
        let rotations = crate::rotation_config::rotation_config(raw.rotations, &upstreams)?;
        let monitoring = crate::monitoring_config::monitoring_config(raw.monitoring, &data_dir)?;
        // One issuer: `[issuer] url` when set, else `server.issuer`, else
        // the listener (https when it serves TLS).
        if let Some(u) = &raw.server.issuer {
            check_issuer_url("server.issuer", u)?;
        }
        let configured = oidc
            .as_ref()
            .and_then(|o| o.url.clone())
            .or(raw.server.issuer);
        let issuer_from_listener = configured.is_none();
        let issuer = configured.unwrap_or_else(|| listener_url(raw.server.tls.is_some(), listen));
        let mcp = crate::mcp::config::validate(raw.mcp, &issuer, &roles)?;
        let config = Self {
            listen,
            plaintext: raw.server.tls.is_none(),
            tls: raw.server.tls.clone(),
            max_body_bytes: raw.server.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY),
            issuer,
            issuer_from_listener,
            root_key_file: raw
                .storage
                .root_key_file
                .unwrap_or_else(|| data_dir.join("root.key")),
            admin_token_file: raw
                .storage
                .admin_token_file
                .unwrap_or_else(|| data_dir.join("admin.token")),
            audit_file: raw.audit.file,
            data_dir,
            storage,
            task_limits: tasks,
            databases,
            roles,
            policy_paths: raw.policy.paths,
            policy_decision_budget,
            approval_ttl_secs,
            approval_webhook,
            operators,
            nodes,
            identity: raw.identity,
            local: raw.local,
            upstreams,
            prices,
            proxy,
            oidc,
            inventory,
            duties,
            oauth_clients,
            rotations,
            monitoring,
            mcp,
        };
        config.check_signing_algorithms()?;
        Ok(config)
    }

    /// Every algorithm a role or a federated upstream signs with is one the
    /// issuer keeps a key for (`[issuer] algorithms`): otherwise the
    /// mistake would first show at run time, as a 503 on every issuance.
    fn check_signing_algorithms(&self) -> Result<(), ConfigError> {
        let Some(issuer) = self.oidc_issuer() else {
            return Ok(());
        };
        let missing = |alg: keymint_core::role::SigningAlg| !issuer.algorithms.contains(&alg);
        for r in &self.roles {
            let alg = match &r.kind {
                RoleKind::Jwt(j) => j.algorithm,
                RoleKind::Aws(a) => a.algorithm,
                RoleKind::Federated(f) => f.algorithm,
                _ => continue,
            };
            if missing(alg) {
                return Err(ConfigError::Invalid(format!(
                    "`roles.{}.algorithm`: {} is not in `[issuer] algorithms`",
                    r.name,
                    alg.as_str()
                )));
            }
        }
        for u in &self.upstreams {
            if let Some(f) = &u.federation
                && missing(f.algorithm)
            {
                return Err(ConfigError::Invalid(format!(
                    "`upstreams.{}.federation.algorithm`: {} is not in `[issuer] algorithms`",
                    u.name,
                    f.algorithm.as_str()
                )));
            }
        }
        Ok(())
    }

    /// The zero-set-up configuration of `keymint dev`: everything under
    /// `data_dir`, plain HTTP on loopback, one sample role.
    pub fn dev(data_dir: &Path, listen: SocketAddr) -> Self {
        Self {
            listen,
            plaintext: true,
            tls: None,
            max_body_bytes: DEFAULT_MAX_BODY,
            issuer: listener_url(false, listen),
            issuer_from_listener: true,
            data_dir: data_dir.to_owned(),
            storage: StorageBackend::Sqlite,
            root_key_file: data_dir.join("root.key"),
            admin_token_file: data_dir.join("admin.token"),
            audit_file: Some(data_dir.join("audit.jsonl")),
            task_limits: TaskLimits::default(),
            databases: Vec::new(),
            roles: vec![sample_role()],
            policy_paths: vec![data_dir.join("policies")],
            policy_decision_budget: keymint_policy::DECISION_BUDGET,
            approval_ttl_secs: DEFAULT_APPROVAL_TTL,
            approval_webhook: None,
            identity: None,
            local: None,
            operators: vec![Operator {
                name: "approver".into(),
                token_file: data_dir.join("approver.token"),
            }],
            nodes: vec![Node {
                name: "dev".into(),
                // Relative: node token files are under the data directory
                // (joining `data_dir` here too made `DIR/DIR/…` of a
                // relative `--data-dir`).
                credential: NodeCredential::TokenFile(PathBuf::from("node-dev.token")),
            }],
            upstreams: Vec::new(),
            prices: Prices::default(),
            proxy: ProxySettings::default(),
            oidc: Some(OidcIssuerConfig::default()),
            inventory: crate::inventory_config::InventoryConfig::default(),
            duties: true,
            oauth_clients: Vec::new(),
            rotations: Vec::new(),
            monitoring: crate::monitoring_config::MonitoringConfig::default(),
            mcp: Vec::new(),
        }
    }
}

/// The policy `keymint dev` writes to `DATA_DIR/policies/sample.cedar` the
/// first time it starts (after that, the file is the operator's).
pub const SAMPLE_POLICY: &str = r#"// keymint dev's sample policy (Cedar; schema: `keymint policy schema`).
// Edit it, then `keymint policy reload`; a set that does not validate is
// refused and the previous one stays in force.

// Any workload may work in the `demo` role for up to an hour.
@id("demo-role")
permit(
  principal,
  action in [Keymint::Action::"start_task", Keymint::Action::"issue",
             Keymint::Action::"renew", Keymint::Action::"delegate"],
  resource == Keymint::Role::"demo"
) when { context.ttl_secs <= 3600 };

// Anything that means to delete in production waits for a human: the
// request is held (HTTP 202) until an operator approves it, and the
// requester then redeems it once (`keymint approval ...`).
@id("prod-deletes-need-a-human")
@approval("required")
permit(
  principal,
  action in [Keymint::Action::"start_task", Keymint::Action::"issue"],
  resource == Keymint::Role::"demo"
) when { context.environment == "prod" && context.intent like "*delete*" };

// A head names one role; for several, list them in the condition:
//   permit(principal, action == Keymint::Action::"issue", resource is Keymint::Role)
//   when { [Keymint::Role::"demo", Keymint::Role::"reports"].contains(resource) };
// (`resource in [Keymint::Role::"a", …]` in the head does not parse.)

// Operators may decide held requests in any role (never their own).
@id("operators-approve")
permit(principal is Keymint::Operator, action == Keymint::Action::"approve", resource);
"#;
/// The role `keymint dev` loads.
pub fn sample_role() -> Role {
    Role {
        name: "demo".into(),
        scopes: vec![
            "llm:chat".into(),
            "llm:embeddings".into(),
            "http:read".into(),
        ],
        default_ttl_secs: 15 * 60,
        max_ttl_secs: 3600,
        description: Some("sample role loaded by `keymint dev`".into()),
        kind: RoleKind::Token(TokenRole::default()),
    }
}

/// Checks a role as written and types it: its common keys, then the keys
/// of its engine's kind.
fn validate_role(
    r: RawRole,
    databases: &[DatabaseConfig],
    upstreams: &[Upstream],
    prices: &Prices,
) -> Result<Role, ConfigError> {
    if !valid_name(&r.name) {
        return Err(ConfigError::Invalid(format!(
            "role name `{}` must be 1-64 of a-z, 0-9, `.`, `_`, `-`",
            r.name
        )));
    }
    let invalid = |m: String| ConfigError::Invalid(format!("role `{}`: {m}", r.name));
    let Ok(engine) = r.engine.parse::<EngineKind>() else {
        return Err(invalid(format!(
            "unknown engine `{}` (available: {})",
            r.engine,
            EngineKind::names()
        )));
    };
    let kind = match engine {
        EngineKind::Token => {
            let raw = kind_table(r.rest.clone(), engine, &invalid)?;
            RoleKind::Token(token_role(&r.name, raw, upstreams, prices)?)
        }
        EngineKind::Postgres | EngineKind::Mysql => {
            let d = database_role(
                kind_table(r.rest.clone(), engine, &invalid)?,
                engine,
                databases,
            )
            .map_err(invalid)?;
            if engine == EngineKind::Postgres {
                RoleKind::Postgres(d)
            } else {
                RoleKind::Mysql(d)
            }
        }
        EngineKind::Ssh => {
            let raw: RawSshRole = kind_table(r.rest.clone(), engine, &invalid)?;
            let Some(ssh) = raw.ssh else {
                return Err(invalid(
                    "`[roles.ssh]` with `ca` and `principals` is required".into(),
                ));
            };
            ssh.validate().map_err(invalid)?;
            RoleKind::Ssh(ssh)
        }
        EngineKind::Jwt => {
            let raw: RawJwtRole = kind_table(r.rest.clone(), engine, &invalid)?;
            let Some(jwt) = raw.jwt else {
                return Err(invalid("`[roles.jwt]` with `audience` is required".into()));
            };
            jwt.validate().map_err(invalid)?;
            RoleKind::Jwt(jwt)
        }
        EngineKind::Aws => {
            let raw: RawAwsRole = kind_table(r.rest.clone(), engine, &invalid)?;
            let Some(aws) = raw.aws else {
                return Err(invalid(
                    "`[roles.aws]` with `role_arn` and `region` is required".into(),
                ));
            };
            aws.validate().map_err(invalid)?;
            RoleKind::Aws(aws)
        }
        EngineKind::Openai => {
            let raw: RawOpenAiRole = kind_table(r.rest.clone(), engine, &invalid)?;
            let Some(o) = raw.openai else {
                return Err(invalid(
                    "`[roles.openai]` with `project` and `admin_key` is required".into(),
                ));
            };
            openai_role(&o, upstreams).map_err(invalid)?;
            RoleKind::Openai(o)
        }
        EngineKind::Openrouter => {
            let raw: RawOpenRouterRole = kind_table(r.rest.clone(), engine, &invalid)?;
            let Some(o) = raw.openrouter else {
                return Err(invalid(
                    "`[roles.openrouter]` with `management_key` is required".into(),
                ));
            };
            openrouter_role(&o, upstreams).map_err(invalid)?;
            RoleKind::Openrouter(o)
        }
        EngineKind::Federated => {
            let raw: RawFederatedRole = kind_table(r.rest.clone(), engine, &invalid)?;
            let Some(f) = raw.federated else {
                return Err(invalid(
                    "`[roles.federated]` with `provider` and `audience` is required".into(),
                ));
            };
            f.validate().map_err(invalid)?;
            if f.subject.is_some() {
                return Err(invalid(
                    "`subject` applies to upstreams only: a role's tokens name the task's workload"
                        .into(),
                ));
            }
            RoleKind::Federated(f)
        }
    };
    if let Some(s) = r.scopes.iter().find(|s| !valid_scope(s)) {
        return Err(invalid(format!("invalid scope `{s}`")));
    }
    let default_ttl_secs = dur(
        &format!("roles.{}.default_ttl", r.name),
        Some(&r.default_ttl),
        0,
    )?;
    let max_ttl_secs = dur(&format!("roles.{}.max_ttl", r.name), Some(&r.max_ttl), 0)?;
    if default_ttl_secs == 0 || default_ttl_secs > max_ttl_secs {
        return Err(invalid("default_ttl must be between 1s and max_ttl".into()));
    }
    Ok(Role {
        name: r.name,
        scopes: r.scopes,
        default_ttl_secs,
        max_ttl_secs,
        description: r.description,
        kind,
    })
}

/// Reads the keys of one kind of role from what is left of the table;
/// a key that kind does not have is named in the error.
fn kind_table<T: serde::de::DeserializeOwned>(
    rest: toml::Table,
    engine: EngineKind,
    invalid: &impl Fn(String) -> ConfigError,
) -> Result<T, ConfigError> {
    T::deserialize(toml::Value::Table(rest))
        .map_err(|e| invalid(format!("{} (engine `{engine}`)", e.message())))
}

/// A token role, with the egress-proxy part checked against its upstream.
fn token_role(
    role: &str,
    r: RawTokenRole,
    upstreams: &[Upstream],
    prices: &Prices,
) -> Result<TokenRole, ConfigError> {
    let invalid = |m: &str| ConfigError::Invalid(format!("role `{role}`: {m}"));
    let Some(name) = r.upstream else {
        if r.proxy.is_some() {
            return Err(invalid("`proxy` needs `upstream`"));
        }
        return Ok(TokenRole { egress: None });
    };
    let Some(up) = upstreams.iter().find(|u| u.name == name) else {
        return Err(invalid(&format!(
            "upstream `{name}` is not a configured upstream"
        )));
    };
    let Some(proxy) = r.proxy else {
        return Err(invalid(
            "a role with an upstream needs a `[roles.proxy]` table (models, endpoints)",
        ));
    };
    keymint_proxy::config::validate_policy(role, &proxy, up, prices)
        .map_err(ConfigError::Invalid)?;
    Ok(TokenRole {
        egress: Some(Egress {
            upstream: name,
            upstream_kind: up.kind,
            proxy,
        }),
    })
}

/// The upstream that holds a provider's admin key must be configured and
/// of the provider's kind (its `base_url` is the provider's API).
fn admin_upstream(key: &str, name: &str, upstreams: &[Upstream]) -> Result<(), String> {
    match upstreams.iter().find(|u| u.name == name) {
        Some(u) if u.kind == keymint_core::role::UpstreamKind::Openai => Ok(()),
        Some(_) => Err(format!(
            "`{key}`: upstream `{name}` must be of kind `openai`"
        )),
        None => Err(format!(
            "`{key}`: upstream `{name}` is not a configured upstream"
        )),
    }
}

/// An openai role: a project id fit for a URL path, a configured admin-key
/// upstream, scopes without spaces or control characters.
fn openai_role(o: &OpenAiRole, upstreams: &[Upstream]) -> Result<(), String> {
    if !keymint_core::role::valid_project_id(&o.project) {
        return Err("`project` must be an OpenAI project id (letters, digits, `_`, `-`)".into());
    }
    admin_upstream("admin_key", &o.admin_key, upstreams)?;
    if o.scopes.iter().any(|s| {
        s.is_empty() || s.len() > 128 || s.chars().any(|c| c.is_control() || c.is_whitespace())
    }) {
        return Err("`scopes`: each scope is 1-128 characters without spaces".into());
    }
    Ok(())
}

/// An openrouter role: a configured management-key upstream and a finite,
/// positive limit.
fn openrouter_role(o: &OpenRouterRole, upstreams: &[Upstream]) -> Result<(), String> {
    admin_upstream("management_key", &o.management_key, upstreams)?;
    if o.max_spend_usd.is_some_and(|l| !l.is_finite() || l <= 0.0) {
        return Err("`max_spend_usd` must be a positive number of dollars".into());
    }
    Ok(())
}

/// The upstreams whose sealed key is a provider's admin key: no token role
/// may reach them through the proxy, which would hand agents the admin key.
fn check_admin_upstreams(roles: &[Role]) -> Result<(), ConfigError> {
    let admin: Vec<&str> = roles
        .iter()
        .filter_map(|r| match &r.kind {
            RoleKind::Openai(o) => Some(o.admin_key.as_str()),
            RoleKind::Openrouter(o) => Some(o.management_key.as_str()),
            _ => None,
        })
        .collect();
    for r in roles {
        if let Some(e) = r.egress()
            && admin.contains(&e.upstream.as_str())
        {
            return Err(ConfigError::Invalid(format!(
                "role `{}`: upstream `{}` holds a provider admin key; no role may reach it through the proxy",
                r.name, e.upstream
            )));
        }
    }
    Ok(())
}

/// A creation statement names the user (`{{name}}`), and no placeholder
/// but those the engine fills in: an unknown one, or `{{password}}` on
/// PostgreSQL (keymint sets the password itself when it creates the
/// user), would reach the database as literal text, and a statement that
/// never names the user (`GRANT … TO PUBLIC`) grants what no revocation
/// takes back.
fn check_statement(st: &str, engine: EngineKind) -> Result<(), String> {
    let known: &[&str] = match engine {
        EngineKind::Mysql => &["name", "password"],
        _ => &["name"],
    };
    let mut rest = st;
    while let Some(i) = rest.find("{{") {
        let after = &rest[i + 2..];
        let Some(end) = after.find("}}") else {
            return Err("a `{{` is not closed by `}}`".into());
        };
        let p = &after[..end];
        if !known.contains(&p) {
            return Err(if p == "password" {
                "`{{password}}` is not filled in for this engine: keymint sets the user's \
                 password itself when it creates the user; statements only grant"
                    .into()
            } else {
                format!(
                    "unknown placeholder (this engine fills in {})",
                    known
                        .iter()
                        .map(|k| format!("`{{{{{k}}}}}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            });
        }
        rest = &after[end + 2..];
    }
    if !st.contains("{{name}}") {
        return Err(
            "it does not name the user (`{{name}}`): what it grants would outlive every lease"
                .into(),
        );
    }
    Ok(())
}

/// A database role, whose database must be configured for its engine.
fn database_role(
    r: RawDatabaseRole,
    engine: EngineKind,
    databases: &[DatabaseConfig],
) -> Result<DatabaseRole, String> {
    let Some(database) = r.database else {
        return Err("`database` is required".into());
    };
    if !databases
        .iter()
        .any(|d| d.name == database && d.engine == engine)
    {
        return Err(format!(
            "database `{database}` is not a configured {engine} database"
        ));
    }
    if r.creation_statements.iter().any(|s| s.contains('\0')) {
        return Err("a creation statement holds a NUL byte".into());
    }
    for (i, st) in r.creation_statements.iter().enumerate() {
        check_statement(st, engine).map_err(|m| format!("creation statement {}: {m}", i + 1))?;
    }
    let max_connections = match r.max_connections {
        Some(n) => keymint_core::role::check_max_connections(n)?,
        None => keymint_core::role::DEFAULT_MAX_CONNECTIONS,
    };
    Ok(DatabaseRole {
        database,
        creation_statements: r.creation_statements,
        max_connections,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
version = 1
[server]
listen = "127.0.0.1:8200"
dangerous_plaintext = true
[storage]
data_dir = "/var/lib/keymint"
[tasks]
max_ttl = "8h"
[[roles]]
name = "openai-dev"
engine = "token"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
"#;

    #[test]
    fn a_good_file_parses() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.task_limits.max_ttl_secs, 8 * 3600);
        assert_eq!(c.roles[0].default_ttl_secs, 900);
        assert_eq!(c.root_key_file, PathBuf::from("/var/lib/keymint/root.key"));
    }

    #[test]
    fn the_decision_budget_defaults_to_50_ms_and_is_bounded() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.policy_decision_budget, keymint_policy::DECISION_BUDGET);
        let set = |v: &str| Config::parse(&format!("{GOOD}\n[policy]\ndecision_budget_ms = {v}\n"));
        assert_eq!(
            set("5000").unwrap().policy_decision_budget,
            std::time::Duration::from_secs(5)
        );
        for bad in ["0", "60001"] {
            let e = set(bad).unwrap_err().to_string();
            assert!(e.contains("`policy.decision_budget_ms`"), "{bad}: {e}");
        }
    }

    /// An issuer named after the listener says https when the listener
    /// serves TLS, and names the port the system chose for port 0.
    #[test]
    fn an_issuer_derived_from_the_listener_is_where_clients_reach_it() {
        let mut c = Config::parse(&GOOD.replace(":8200", ":0")).unwrap();
        assert!(c.issuer_from_listener);
        assert_eq!(c.issuer, "http://127.0.0.1:0");
        c.bound_to("127.0.0.1:41000".parse().unwrap());
        assert_eq!(c.issuer, "http://127.0.0.1:41000");
        assert_eq!(c.listen.port(), 41000);
        let tls = GOOD.replace(
            "dangerous_plaintext = true",
            "[server.tls]\ncert_file = \"/etc/keymint/cert.pem\"\nkey_file = \"/etc/keymint/key.pem\"",
        );
        let c = Config::parse(&tls).unwrap();
        assert_eq!(c.issuer, "https://127.0.0.1:8200");
        let mut d = Config::dev(
            std::path::Path::new("/tmp/x"),
            "127.0.0.1:0".parse().unwrap(),
        );
        d.bound_to("127.0.0.1:41001".parse().unwrap());
        assert_eq!(d.issuer, "http://127.0.0.1:41001");
    }

    #[test]
    fn jwt_and_aws_roles_and_the_issuer_are_typed_at_load() {
        let jwt = format!(
            "{GOOD}\n[[roles]]\nname = \"ci-id\"\nengine = \"jwt\"\nscopes = []\n\
             default_ttl = \"5m\"\nmax_ttl = \"1h\"\n[roles.jwt]\naudience = \"https://v.example\"\n"
        );
        let c = Config::parse(&jwt).unwrap();
        let RoleKind::Jwt(j) = &c.roles[1].kind else {
            panic!("not a jwt role: {:?}", c.roles[1]);
        };
        assert_eq!(j.audience, ["https://v.example"]);
        assert_eq!(j.algorithm, keymint_core::role::SigningAlg::ES256);
        // No `[issuer]`, but a jwt role: keymint is an issuer with defaults.
        assert_eq!(c.oidc_issuer().unwrap().algorithms.len(), 3);
        assert_eq!(c.issuer, "http://127.0.0.1:8200");
        assert!(Config::parse(GOOD).unwrap().oidc_issuer().is_none());

        let aws = format!(
            "{GOOD}\n[issuer]\nurl = \"https://keymint.example/\"\nalgorithms = [\"RS256\"]\n\
             [[roles]]\nname = \"aws-agent\"\nengine = \"aws\"\nscopes = []\n\
             default_ttl = \"30m\"\nmax_ttl = \"1h\"\n[roles.aws]\n\
             role_arn = \"arn:aws:iam::123456789012:role/agent\"\nregion = \"eu-west-1\"\n"
        );
        let mut c = Config::parse(&aws).unwrap();
        assert_eq!(c.issuer, "https://keymint.example");
        assert!(!c.issuer_from_listener);
        // A configured issuer stays whatever the listener is bound to.
        c.bound_to("127.0.0.1:41000".parse().unwrap());
        assert_eq!(c.issuer, "https://keymint.example");
        let RoleKind::Aws(a) = &c.roles[1].kind else {
            panic!("not an aws role");
        };
        assert_eq!(a.audience, "sts.amazonaws.com");
        assert_eq!(a.endpoint(), "https://sts.eu-west-1.amazonaws.com/");

        for (bad, needle) in [
            (jwt.replace("audience = ", "audiance = "), "audiance"),
            (
                jwt.replace("[roles.jwt]\naudience = \"https://v.example\"\n", ""),
                "`[roles.jwt]`",
            ),
            (
                jwt.replace("audience = \"https://v.example\"", "audience = []"),
                "`audience`",
            ),
            (
                jwt.replace("[roles.jwt]\n", "[roles.jwt]\nspiffe = true\n"),
                "trust_domain",
            ),
            (
                jwt.replace("[roles.jwt]\n", "[roles.jwt]\nalgorithm = \"HS256\"\n"),
                "algorithm",
            ),
            (
                aws.replace(
                    "role_arn = \"arn:aws:iam::123456789012:role/agent\"",
                    "role_arn = \"sk-live-oops\"",
                ),
                "`role_arn`",
            ),
            (
                aws.replace("region = \"eu-west-1\"", "region = \"EU WEST\""),
                "`region`",
            ),
            (
                aws.replace(
                    "region = \"eu-west-1\"\n",
                    "region = \"eu-west-1\"\nsession_policy = \"not json\"\n",
                ),
                "`session_policy`",
            ),
            (
                aws.replace(
                    "region = \"eu-west-1\"\n",
                    "region = \"eu-west-1\"\ndatabase = \"x\"\n",
                ),
                "database",
            ),
            (
                aws.replace("https://keymint.example/", "http://keymint.example"),
                "`issuer.url`",
            ),
            (
                aws.replace("algorithms = [\"RS256\"]", "algorithms = []"),
                "algorithms",
            ),
        ] {
            let e = Config::parse(&bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
            assert!(
                !e.contains("sk-live-oops") && !e.contains("not json"),
                "{e}"
            );
        }
    }

    #[test]
    fn database_roles_name_a_configured_database() {
        let pg = format!(
            "{GOOD}\n[[databases]]\nname = \"main\"\nengine = \"postgres\"\nconnection = \"host=127.0.0.1 user=postgres dbname=test\"\n\
             [[roles]]\nname = \"analyst\"\nengine = \"postgres\"\ndatabase = \"main\"\nscopes = [\"db:read\"]\n\
             default_ttl = \"5m\"\nmax_ttl = \"1h\"\ncreation_statements = [\"GRANT SELECT ON t TO {{{{name}}}}\"]\n"
        );
        let c = Config::parse(&pg).unwrap();
        assert_eq!(c.databases.len(), 1);
        let RoleKind::Postgres(d) = &c.roles[1].kind else {
            panic!("not a postgres role: {:?}", c.roles[1]);
        };
        assert_eq!(d.database, "main");
        assert_eq!(d.creation_statements, ["GRANT SELECT ON t TO {{name}}"]);
        assert_eq!(d.max_connections, 10, "the default connection limit");
        let five = pg.replace(
            "database = \"main\"\n",
            "database = \"main\"\nmax_connections = 5\n",
        );
        let RoleKind::Postgres(d) = &Config::parse(&five).unwrap().roles[1].kind else {
            panic!("not a postgres role");
        };
        assert_eq!(d.max_connections, 5);
        // Not a number at all: refused by the role's parse, which names
        // the role and the type it wanted (as for every role field).
        let e = Config::parse(&five.replace("max_connections = 5", "max_connections = \"ten\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("analyst") && e.contains("\"ten\""), "{e}");
        for bad in ["0", "-1", "1001", "99999999999"] {
            let e = Config::parse(
                &five.replace("max_connections = 5", &format!("max_connections = {bad}")),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("max_connections") && e.contains("analyst"),
                "{bad}: {e}"
            );
        }
        for (bad, needle) in [
            (
                pg.replace("database = \"main\"", "database = \"other\""),
                "not a configured postgres database",
            ),
            (
                pg.replace("database = \"main\"\n", ""),
                "`database` is required",
            ),
            (
                pg.replace(
                    "engine = \"postgres\"\nconnection",
                    "engine = \"oracle\"\nconnection",
                ),
                "unknown engine `oracle`",
            ),
            (
                pg.replace("host=127.0.0.1 user=postgres", "port=notaport"),
                "not valid",
            ),
            // A placeholder PostgreSQL's engine does not fill in would
            // reach the database as text (every user's password the same
            // literal `{{password}}`), and a statement that never names
            // the user grants what no revocation takes back.
            (
                pg.replace(
                    "GRANT SELECT ON t TO {{name}}",
                    "ALTER ROLE {{name}} PASSWORD '{{password}}'",
                ),
                "creation statement 1: `{{password}}` is not filled in",
            ),
            (
                pg.replace(
                    "GRANT SELECT ON t TO {{name}}",
                    "GRANT SELECT ON t TO {{ name }}",
                ),
                "unknown placeholder",
            ),
            (
                pg.replace(
                    "GRANT SELECT ON t TO {{name}}",
                    "GRANT SELECT ON t TO {{name}} {{x",
                ),
                "not closed",
            ),
            (
                pg.replace(
                    "GRANT SELECT ON t TO {{name}}",
                    "GRANT SELECT ON t TO PUBLIC",
                ),
                "does not name the user",
            ),
        ] {
            let e = Config::parse(&bad).unwrap_err().to_string();
            assert!(e.contains(needle), "expected `{needle}` in `{e}`");
        }
        // Off this machine the admin connection is TLS by default; plain
        // text there is refused unless the dangerous switch says so.
        for remote in [
            "host=db.example.com user=postgres dbname=test",
            "host=10.0.0.5 user=postgres dbname=test",
            "host=127.0.0.1,db.example.com user=postgres dbname=test",
            "host=localhost hostaddr=10.0.0.5 user=postgres dbname=test",
        ] {
            let remote_pg = pg.replace("host=127.0.0.1 user=postgres dbname=test", remote);
            let c = Config::parse(&remote_pg).unwrap();
            assert_eq!(
                c.databases[0].tls,
                DbTls::Require { ca_file: None },
                "{remote}"
            );
            let plain = remote_pg.replacen(
                "engine = \"postgres\"",
                "engine = \"postgres\"\ntls = \"disable\"",
                1,
            );
            let e = Config::parse(&plain).unwrap_err().to_string();
            assert!(
                e.contains("not loopback") && e.contains("dangerous_allow_plaintext"),
                "{remote}: {e}"
            );
        }
        let allowed = pg.replace(
            "connection = \"host=127.0.0.1 user=postgres dbname=test\"",
            "connection = \"host=db.example.com user=postgres dbname=test\"\ntls = \"disable\"\ndangerous_allow_plaintext = true",
        );
        let c = Config::parse(&allowed).unwrap();
        assert_eq!(c.databases[0].tls, DbTls::Disable);
        for local in ["host=localhost", "host=::1", "host=/run/postgresql"] {
            let c = Config::parse(&pg.replace("host=127.0.0.1", local)).unwrap();
            assert_eq!(c.databases[0].tls, DbTls::Disable, "{local}");
        }
        // Asked for on loopback too: by `tls`, a `ca_file`, or `sslmode`.
        let ca = pg.replacen(
            "engine = \"postgres\"",
            "engine = \"postgres\"\nca_file = \"/nonexistent/ca.pem\"",
            1,
        );
        assert_eq!(
            Config::parse(&ca).unwrap().databases[0].tls,
            DbTls::Require {
                ca_file: Some("/nonexistent/ca.pem".into())
            }
        );
        let sslmode = pg.replace("dbname=test", "dbname=test sslmode=require");
        assert_eq!(
            Config::parse(&sslmode).unwrap().databases[0].tls,
            DbTls::Require { ca_file: None }
        );
        for (extra, needle) in [
            ("tls = \"prefer\"", "`tls` must be"),
            ("tls = \"disable\"\nca_file = \"/x.pem\"", "needs `tls"),
        ] {
            let bad = pg.replacen(
                "engine = \"postgres\"",
                &format!("engine = \"postgres\"\n{extra}"),
                1,
            );
            let e = Config::parse(&bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{extra}: {e}");
        }
        let contradiction = sslmode.replacen(
            "engine = \"postgres\"",
            "engine = \"postgres\"\ntls = \"disable\"",
            1,
        );
        assert!(
            Config::parse(&contradiction)
                .unwrap_err()
                .to_string()
                .contains("sslmode")
        );
        // The connection string, which may hold a password, is never echoed.
        let secret = pg.replace("host=127.0.0.1 user=postgres", "password=hunter2 port=nope");
        assert!(
            !Config::parse(&secret)
                .unwrap_err()
                .to_string()
                .contains("hunter2")
        );
    }

    #[test]
    fn mysql_roles_name_a_configured_mysql_database() {
        let my = format!(
            "{GOOD}\n[[databases]]\nname = \"shop\"\nengine = \"mysql\"\nconnection = \"mysql://root@127.0.0.1:3306/test\"\n\
             [[roles]]\nname = \"clerk\"\nengine = \"mysql\"\ndatabase = \"shop\"\nscopes = [\"db:read\"]\n\
             default_ttl = \"5m\"\nmax_ttl = \"1h\"\ncreation_statements = [\"GRANT SELECT ON test.* TO {{{{name}}}}\"]\n"
        );
        let c = Config::parse(&my).unwrap();
        assert_eq!(c.databases[0].engine, EngineKind::Mysql);
        let remote = my.replace("@127.0.0.1:3306", "@db.example.com:3306");
        assert_eq!(
            Config::parse(&remote).unwrap().databases[0].tls,
            DbTls::Require { ca_file: None }
        );
        let e = Config::parse(&remote.replace(
            "engine = \"mysql\"\nconnection",
            "engine = \"mysql\"\ntls = \"disable\"\nconnection",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("not loopback") && e.contains("dangerous_allow_plaintext"),
            "{e}"
        );
        // TLS switches in the URL could turn verification off: refused.
        let e = Config::parse(&my.replace("/test\"", "/test?require_ssl=true&verify_ca=false\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not in the URL"), "{e}");
        Config::parse(&my.replace("@127.0.0.1:3306", "@localhost:3306")).unwrap();
        let RoleKind::Mysql(d) = &c.roles[1].kind else {
            panic!("not a mysql role: {:?}", c.roles[1]);
        };
        assert_eq!(d.database, "shop");
        // A postgres role cannot use a mysql database.
        let e = Config::parse(&my.replace(
            "engine = \"mysql\"\ndatabase",
            "engine = \"postgres\"\ndatabase",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a configured postgres database"), "{e}");
        let e = Config::parse(&my.replace(
            "mysql://root@127.0.0.1:3306/test",
            "mysql://root:hunter2@[bad",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("not a valid mysql:// URL") && !e.contains("hunter2"),
            "{e}"
        );
    }

    #[test]
    fn ssh_roles_need_a_ca_and_valid_principals() {
        let ssh = format!(
            "{GOOD}\n[[roles]]\nname = \"deploy\"\nengine = \"ssh\"\nscopes = [\"ssh:login\"]\n\
             default_ttl = \"5m\"\nmax_ttl = \"1h\"\n[roles.ssh]\nca = \"ops\"\nprincipals = [\"deploy\"]\n\
             force_command = \"/usr/bin/uptime\"\n"
        );
        let c = Config::parse(&ssh).unwrap();
        let RoleKind::Ssh(settings) = &c.roles[1].kind else {
            panic!("not an ssh role: {:?}", c.roles[1]);
        };
        assert_eq!(settings.ca, "ops");
        assert!(settings.permit_pty);
        assert!(!settings.permit_port_forwarding);
        for (bad, needle) in [
            (ssh.replace("[\"deploy\"]", "[\"a,b\"]"), "principal"),
            (ssh.replace("[\"deploy\"]", "[]"), "principals"),
            (ssh.replace("ca = \"ops\"", "ca = \"Bad CA\""), "`ca`"),
            (ssh.replace("[roles.ssh]", "[roles.sh]"), "sh"),
            (
                ssh.replace(
                    "force_command",
                    "source_address = \"10.0.0.0/8;x\"\nforce_command",
                ),
                "source_address",
            ),
        ] {
            let e = Config::parse(&bad).unwrap_err().to_string();
            assert!(e.contains(needle), "expected `{needle}` in `{e}`");
        }
        // Principals sshd could read as patterns, or that read as another
        // name: refused at load, naming the role and the position only.
        for p in ["*", "!root", "a?", "a\u{202e}b", "a\u{200b}b"] {
            let bad = ssh.replace("[\"deploy\"]", &format!("[\"deploy\", \"{p}\"]"));
            let e = Config::parse(&bad).unwrap_err().to_string();
            // The message lists the refused characters; the value itself,
            // `!root` or a name with a bidi override, is not shown.
            assert!(
                e.contains("role `deploy`")
                    && e.contains("`principals[1]`")
                    && (p.len() == 1 || !e.contains(p)),
                "{p:?}: {e}"
            );
        }
        let many: Vec<String> = (0..257).map(|i| format!("\"u{i}\"")).collect();
        let e = Config::parse(&ssh.replace("[\"deploy\"]", &format!("[{}]", many.join(","))))
            .unwrap_err()
            .to_string();
        assert!(e.contains("role `deploy`") && e.contains("256"), "{e}");
    }

    /// One role of each kind, with an upstream for the token role.
    const EVERY_KIND: &str = r#"
[[databases]]
name = "main"
engine = "postgres"
connection = "host=127.0.0.1 user=postgres dbname=test"
[[databases]]
name = "shop"
engine = "mysql"
connection = "mysql://root@127.0.0.1:3306/test"
[[upstreams]]
name = "openai"
kind = "openai"
base_url = "https://api.openai.com/v1"
[[roles]]
name = "gpt"
engine = "token"
scopes = ["llm:chat"]
default_ttl = "5m"
max_ttl = "1h"
upstream = "openai"
[roles.proxy]
models = ["gpt-4o-mini"]
endpoints = ["chat.completions"]
max_requests = 5
[[roles]]
name = "analyst"
engine = "postgres"
scopes = ["db:read"]
default_ttl = "5m"
max_ttl = "1h"
database = "main"
creation_statements = ["GRANT SELECT ON t TO {{name}}"]
[[roles]]
name = "clerk"
engine = "mysql"
scopes = ["db:read"]
default_ttl = "5m"
max_ttl = "1h"
database = "shop"
[[roles]]
name = "deploy"
engine = "ssh"
scopes = ["ssh:login"]
default_ttl = "5m"
max_ttl = "1h"
[roles.ssh]
ca = "ops"
principals = ["deploy"]
"#;

    #[test]
    fn every_kind_of_role_is_typed_at_load() {
        let c = Config::parse(&format!("{GOOD}{EVERY_KIND}")).unwrap();
        let kinds: Vec<EngineKind> = c.roles.iter().map(Role::engine).collect();
        use EngineKind::*;
        assert_eq!(kinds, [Token, Token, Postgres, Mysql, Ssh]);
        let egress = c.roles[1].egress().unwrap();
        assert_eq!(egress.upstream, "openai");
        assert_eq!(
            egress.upstream_kind,
            keymint_core::role::UpstreamKind::Openai
        );
        assert_eq!(egress.proxy.max_requests, Some(5));
        assert_eq!(c.roles[0].egress(), None);
        assert_eq!(c.roles[2].destination(), "database:main");
        assert_eq!(c.roles[3].destination(), "database:shop");
        assert_eq!(c.roles[4].destination(), "ssh-ca:ops");
    }

    #[test]
    fn a_misspelt_key_in_any_kind_of_role_is_named() {
        let good = format!("{GOOD}{EVERY_KIND}");
        for (from, to, key) in [
            // The token role's own keys and its `[roles.proxy]` table.
            ("upstream = \"openai\"", "upstreem = \"openai\"", "upstreem"),
            ("max_requests = 5", "max_request = 5", "max_request"),
            // The database roles.
            ("database = \"main\"", "databse = \"main\"", "databse"),
            (
                "database = \"shop\"",
                "database = \"shop\"\ncreation_statement = []",
                "creation_statement",
            ),
            // The ssh role's `[roles.ssh]` table.
            (
                "principals = [\"deploy\"]",
                "pricipals = [\"deploy\"]",
                "pricipals",
            ),
            (
                "ca = \"ops\"",
                "ca = \"ops\"\npermit_ptty = true",
                "permit_ptty",
            ),
        ] {
            let bad = good.replacen(from, to, 1);
            assert_ne!(bad, good, "`{from}` is not in the sample");
            let e = Config::parse(&bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("`{key}`")),
                "expected `{key}` named in `{e}`"
            );
        }
        // A key of one kind in a role of another.
        for (after, extra, key) in [
            ("name = \"analyst\"", "upstream = \"openai\"", "upstream"),
            ("name = \"gpt\"", "database = \"main\"", "database"),
            (
                "database = \"shop\"",
                "[roles.ssh]\nca = \"ops\"\nprincipals = [\"x\"]",
                "ssh",
            ),
            (
                "name = \"deploy\"",
                "creation_statements = []",
                "creation_statements",
            ),
        ] {
            let bad = good.replacen(after, &format!("{after}\n{extra}"), 1);
            let e = Config::parse(&bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("`{key}`")),
                "expected `{key}` named in `{e}`"
            );
        }
    }

    const PROVIDERS: &str = r#"
[[upstreams]]
name = "openai-admin"
kind = "openai"
base_url = "https://api.openai.com/v1"

[[upstreams]]
name = "openrouter-mgmt"
kind = "openai"
base_url = "https://openrouter.ai/api/v1"

[[roles]]
name = "openai-agent"
engine = "openai"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.openai]
project = "proj_abc123"
admin_key = "openai-admin"
scopes = ["model.request"]

[[roles]]
name = "openrouter-agent"
engine = "openrouter"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.openrouter]
management_key = "openrouter-mgmt"
max_spend_usd = 2.5
limit_reset = "weekly"
"#;

    #[test]
    fn provider_key_roles_are_typed_and_checked_at_load() {
        use keymint_core::role::LimitReset;
        let text = format!("{GOOD}{PROVIDERS}");
        let c = Config::parse(&text).unwrap();
        let RoleKind::Openai(o) = &c.roles[1].kind else {
            panic!("not an openai role: {:?}", c.roles[1]);
        };
        assert_eq!(
            (o.project.as_str(), o.admin_key.as_str()),
            ("proj_abc123", "openai-admin")
        );
        assert_eq!(o.scopes, ["model.request"]);
        assert_eq!(c.roles[1].destination(), "openai-project:proj_abc123");
        let RoleKind::Openrouter(r) = &c.roles[2].kind else {
            panic!("not an openrouter role: {:?}", c.roles[2]);
        };
        assert_eq!(r.max_spend_usd, Some(2.5));
        assert_eq!(r.limit_reset, Some(LimitReset::Weekly));

        for (bad, says) in [
            (text.replace("[roles.openai]", "[roles.openia]"), "openia"),
            (
                text.replace("admin_key = \"openai-admin\"", "admin_key = \"nope\""),
                "`admin_key`",
            ),
            (text.replace("proj_abc123", "proj/../x"), "`project`"),
            (
                text.replace("max_spend_usd = 2.5", "max_spend_usd = -1.0"),
                "`max_spend_usd`",
            ),
            (
                text.replace("limit_reset = \"weekly\"", "limit_reset = \"hourly\""),
                "daily",
            ),
            (
                text.replace("management_key", "managment_key"),
                "managment_key",
            ),
            (text.replace("[roles.openrouter]\n", "[roles.x]\n"), "x"),
            (
                format!(
                    "{text}\n[[roles]]\nname = \"leak\"\nengine = \"token\"\nupstream = \"openai-admin\"\n\
                     scopes = []\ndefault_ttl = \"1m\"\nmax_ttl = \"1m\"\n[roles.proxy]\n\
                     models = [\"*\"]\nendpoints = [\"chat.completions\"]\n"
                ),
                "holds a provider admin key",
            ),
        ] {
            let e = Config::parse(&bad).unwrap_err().to_string();
            assert!(e.contains(says), "`{says}` not in `{e}`");
        }
    }

    #[test]
    fn configuration_errors_never_show_values() {
        let secret = "hunter2-QZKWJVB";
        let db = format!(
            "{GOOD}\n[[databases]]\nname = \"main\"\nengine = \"postgres\"\n\
             connection = \"host=127.0.0.1 user=admin password={secret}\"\n"
        );
        let c = Config::parse(&db).unwrap();
        assert!(
            !format!("{c:?}").contains(secret),
            "Debug shows the password"
        );
        for bad in [
            // A TOML syntax error on the line that holds the password.
            db.replace("password=", "password= \"broken"),
            // A value of the wrong type.
            db.replace(
                &format!("connection = \"host=127.0.0.1 user=admin password={secret}\""),
                &format!("connection = [\"{secret}\"]"),
            ),
            db.replace(
                "max_ttl = \"8h\"",
                &format!("max_ttl = [\"{secret}\"]\nx = 1"),
            ),
            format!("{db}\nnot_a_key = \"{secret}\"\n"),
        ] {
            let e = Config::parse(&bad).unwrap_err().to_string();
            assert!(!e.contains(secret), "the value is shown in `{e}`");
            assert!(e.contains("line "), "no position in `{e}`");
        }
    }

    #[test]
    fn a_relative_data_dir_keeps_dev_tokens_under_it() {
        let c = Config::dev(Path::new("rel-data"), "127.0.0.1:8200".parse().unwrap());
        for n in &c.nodes {
            let NodeCredential::TokenFile(f) = &n.credential else {
                continue;
            };
            assert!(f.is_relative() && !f.starts_with("rel-data"), "{f:?}");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let bad = GOOD.replace("[tasks]", "[tasks]\nmax_tll = \"1h\"");
        let e = Config::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("max_tll"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_with_the_key() {
        let cases = [
            (GOOD.replace("version = 1", "version = 2"), "version"),
            (GOOD.replace("127.0.0.1:8200", "0.0.0.0:8200"), "loopback"),
            (
                GOOD.replace("dangerous_plaintext = true", ""),
                "dangerous_plaintext",
            ),
            (GOOD.replace("\"8h\"", "\"8 hours\""), "tasks.max_ttl"),
            (
                GOOD.replace("engine = \"token\"", "engine = \"magic\""),
                "unknown engine",
            ),
            (
                GOOD.replace("name = \"openai-dev\"", "name = \"Bad Name\""),
                "role name",
            ),
            (GOOD.replace("\"15m\"", "\"2h\""), "default_ttl"),
        ];
        for (text, needle) in cases {
            let e = Config::parse(&text).unwrap_err().to_string();
            assert!(e.contains(needle), "expected `{needle}` in `{e}`");
        }
    }

    #[test]
    fn a_replica_stays_out_of_the_duties_only_on_a_shared_store() {
        assert!(Config::parse(GOOD).unwrap().duties, "duties by default");
        let quiet = GOOD.replace(
            "dangerous_plaintext = true",
            "dangerous_plaintext = true\nduties = false",
        );
        let e = Config::parse(&quiet).unwrap_err().to_string();
        assert!(e.contains("duties") && e.contains("postgres"), "{e}");
        let pg = quiet.replace(
            "data_dir = \"/var/lib/keymint\"",
            "data_dir = \"/var/lib/keymint\"\nbackend = \"postgres\"\n\
             url = \"postgres://keymint@127.0.0.1/keymint\"\ntls = \"disable\"",
        );
        assert!(!Config::parse(&pg).unwrap().duties);
        let bad = GOOD.replace(
            "dangerous_plaintext = true",
            "dangerous_plaintext = true\nduties = \"no\"",
        );
        assert!(Config::parse(&bad).is_err());
    }

    #[test]
    fn the_postgres_backend_is_checked_by_key_and_never_shows_values() {
        let pg = |lines: &str| {
            GOOD.replace(
                "data_dir = \"/var/lib/keymint\"",
                &format!("data_dir = \"/var/lib/keymint\"\nbackend = \"postgres\"\n{lines}"),
            )
        };
        let c = Config::parse(&pg(
            "url = \"postgres://keymint@db.internal:5432/keymint\"\n\
             password_file = \"/etc/keymint/pg.pw\"\npool_size = 12",
        ))
        .unwrap();
        let StorageBackend::Postgres {
            options,
            password_file,
        } = &c.storage
        else {
            panic!("postgres expected")
        };
        assert_eq!(options.pool_size, 12);
        assert_eq!(
            options.tls,
            keymint_store::PgTls::Require { ca_file: None },
            "TLS by default"
        );
        assert_eq!(
            password_file.as_deref(),
            Some(Path::new("/etc/keymint/pg.pw"))
        );
        assert!(matches!(
            Config::parse(GOOD).unwrap().storage,
            StorageBackend::Sqlite
        ));
        // Plain text to a loopback host is fine; elsewhere only when asked.
        Config::parse(&pg(
            "url = \"postgres://keymint@127.0.0.1/keymint\"\ntls = \"disable\"",
        ))
        .unwrap();
        Config::parse(&pg(
            "url = \"postgres://keymint@db.internal/keymint\"\ntls = \"disable\"\n\
             dangerous_allow_plaintext = true",
        ))
        .unwrap();
        let secret = "Zq9-not-a-real-password";
        let cases = [
            (
                pg("url = \"postgres://keymint@db.internal/keymint\"\ntls = \"disable\""),
                "dangerous_allow_plaintext",
            ),
            (
                pg(&format!(
                    "url = \"postgres://keymint:{secret}@db.internal/keymint\""
                )),
                "password_file",
            ),
            (pg(&format!("url = \"{secret}://\"")), "url"),
            (
                pg("url = \"postgres://keymint@db.internal\""),
                "names no database",
            ),
            (pg("password_file = \"/x\""), "storage.url"),
            (
                pg(&format!("url = \"postgres://k@h/db\"\ntls = \"{secret}\"")),
                "storage.tls",
            ),
            (
                pg("url = \"postgres://k@h/db\"\npool_size = 100000"),
                "pool_size",
            ),
            (
                GOOD.replace(
                    "data_dir = \"/var/lib/keymint\"",
                    &format!("data_dir = \"/x\"\nbackend = \"{secret}\""),
                ),
                "storage.backend",
            ),
            (
                GOOD.replace(
                    "data_dir = \"/var/lib/keymint\"",
                    "data_dir = \"/x\"\nurl = \"postgres://k@h/db\"",
                ),
                "backend = \"postgres\"",
            ),
        ];
        for (text, needle) in cases {
            let e = Config::parse(&text).unwrap_err().to_string();
            assert!(e.contains(needle), "expected `{needle}` in `{e}`");
            assert!(!e.contains(secret), "the value is shown in `{e}`");
        }
    }
}
