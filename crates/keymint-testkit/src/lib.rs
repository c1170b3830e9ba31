//! An in-process keymint server for tests: a temporary data directory, the
//! embedded store, generated keys, a listener on 127.0.0.1 port 0, and a
//! client holding the admin token.
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! let server = keymint_testkit::TestServer::start().await?;
//! let health: keymint_proto::Health = server.admin().get("/v1/health").await?;
//! # Ok(()) }
//! ```
//!
//! [`upstream::FakeUpstream`] stands in for the LLM providers behind the
//! egress proxy.

pub mod anthropic_admin;
pub mod federation;
pub mod openai_admin;
pub mod openrouter;
pub mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keymint_client::Client;
use keymint_core::model::Role;
use keymint_core::{Clock, ManualClock, SystemClock};
use keymint_server::Running;
use keymint_server::broker::Broker;
use keymint_server::config::Config;
use tokio::sync::oneshot;

/// How to start a [`TestServer`].
#[derive(Debug, Default)]
pub struct Builder {
    clock: Option<ManualClock>,
    roles: Vec<Role>,
    data_dir: Option<PathBuf>,
    audit_file: Option<Option<PathBuf>>,
    max_body: Option<usize>,
    databases: Vec<keymint_server::config::DatabaseConfig>,
    policy: Option<String>,
    extra_toml: Vec<String>,
    storage: Option<keymint_server::config::StorageBackend>,
    publish_ahead_secs: Option<u64>,
}

/// The policy a [`TestServer`] runs with unless the test gives one: every
/// request the rules allow is permitted, so that tests of other features
/// need not write policy.
pub const PERMIT_ALL: &str = "@id(\"testkit-permit-all\")\npermit(principal, action, resource);\n";

impl Builder {
    /// Use a manual clock (the background sweeper still runs, but time moves
    /// only when the test says so).
    #[must_use]
    pub fn clock(mut self, c: ManualClock) -> Self {
        self.clock = Some(c);
        self
    }

    /// Make keymint an OIDC issuer whose new keys sign `secs` after they
    /// are published: below the least `[issuer] publish_ahead` the
    /// configuration file accepts (5m30s), so that a test can walk a key
    /// rotation in seconds.
    #[must_use]
    pub fn issuer_publish_ahead_secs(mut self, secs: u64) -> Self {
        self.publish_ahead_secs = Some(secs);
        self
    }

    /// Add a role next to the sample role `demo`.
    #[must_use]
    pub fn role(mut self, r: Role) -> Self {
        self.roles.push(r);
        self
    }

    /// Reuse a data directory (to test restarts).
    #[must_use]
    pub fn data_dir(mut self, d: &Path) -> Self {
        self.data_dir = Some(d.to_owned());
        self
    }

    /// Write the audit trail to this file (default: `audit.jsonl` in the data directory).
    #[must_use]
    pub fn audit_file(mut self, f: Option<PathBuf>) -> Self {
        self.audit_file = Some(f);
        self
    }

    /// Add a database keymint may create users in.
    #[must_use]
    pub fn postgres(mut self, name: &str, connection: &str) -> Self {
        self.databases.push(keymint_server::config::DatabaseConfig {
            name: name.into(),
            engine: keymint_core::role::EngineKind::Postgres,
            connection: connection.into(),
            tls: keymint_server::config::DbTls::Disable,
        });
        self
    }

    /// Add a database with its settings as given (TLS among them).
    #[must_use]
    pub fn database(mut self, d: keymint_server::config::DatabaseConfig) -> Self {
        self.databases.push(d);
        self
    }

    /// Run with this Cedar policy (in `DATA_DIR/policies/test.cedar`)
    /// instead of [`PERMIT_ALL`].
    #[must_use]
    pub fn policy(mut self, src: &str) -> Self {
        self.policy = Some(src.to_owned());
        self
    }

    /// Adds configuration in the file's TOML (`[[upstreams]]`, `[[roles]]`
    /// with `upstream` and `[roles.proxy]`, `[prices]`, `[proxy]`, `[[operators]]`,
    /// `[[nodes]]`: a relative node `token_file` is under the data directory), parsed
    /// by the real configuration loader.
    #[must_use]
    pub fn config_toml(mut self, toml: &str) -> Self {
        self.extra_toml.push(toml.to_owned());
        self
    }

    /// Add a MySQL/MariaDB server keymint may create users on
    /// (`mysql://user:password@host:port/db`).
    #[must_use]
    pub fn mysql(mut self, name: &str, url: &str) -> Self {
        self.databases.push(keymint_server::config::DatabaseConfig {
            name: name.into(),
            engine: keymint_core::role::EngineKind::Mysql,
            connection: url.into(),
            tls: keymint_server::config::DbTls::Disable,
        });
        self
    }

    /// Keep the state in this store instead of SQLite in the data
    /// directory (several servers on one PostgreSQL database: give each the
    /// same root key and admin token files, through `data_dir`).
    #[must_use]
    pub fn storage(mut self, s: keymint_server::config::StorageBackend) -> Self {
        self.storage = Some(s);
        self
    }

    #[must_use]
    pub fn max_body(mut self, n: usize) -> Self {
        self.max_body = Some(n);
        self
    }

    pub async fn start(self) -> anyhow::Result<TestServer> {
        let tmp = tempfile::tempdir()?;
        let dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| tmp.path().join("data"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut config = Config::dev(&dir, addr);
        // Many test servers share two cores with the test binaries: a
        // decision missing the 50 ms production deadline there is load,
        // not a finding. Tests of the deadline set their own
        // (`PolicyState::set_decision_budget`).
        config.policy_decision_budget = std::time::Duration::from_secs(2);
        // No signing keys unless a test asks for them (`[issuer]`, or a jwt
        // or aws role): an RSA key takes seconds to make.
        config.oidc = None;
        config.roles.extend(self.roles);
        config.databases.extend(self.databases);
        if let Some(a) = self.audit_file {
            config.audit_file = a;
        }
        if let Some(m) = self.max_body {
            config.max_body_bytes = m;
        }
        if let Some(st) = self.storage {
            config.storage = st;
        }
        // A reused data directory keeps the policy it had.
        let policies = dir.join("policies");
        if !policies.exists() || self.policy.is_some() {
            std::fs::create_dir_all(&policies)?;
            std::fs::write(
                policies.join("test.cedar"),
                self.policy.as_deref().unwrap_or(PERMIT_ALL),
            )?;
        }
        if !self.extra_toml.is_empty() {
            let text = format!(
                "version = 1\n[server]\nlisten = \"{addr}\"\ndangerous_plaintext = true\n\
                 [storage]\ndata_dir = \"/nonexistent\"\n{}",
                self.extra_toml.join("\n")
            );
            let extra = Config::parse(&text)?;
            config.roles.extend(extra.roles);
            config.upstreams = extra.upstreams;
            config.prices = extra.prices;
            config.proxy = extra.proxy;
            config.inventory = extra.inventory;
            config.oauth_clients = extra.oauth_clients;
            config.rotations = extra.rotations;
            config.monitoring = extra.monitoring;
            config.mcp = extra.mcp;
            config.operators.extend(extra.operators);
            config.nodes.extend(extra.nodes);
            if extra.identity.is_some() {
                config.identity = extra.identity;
            }
            if extra.local.is_some() {
                config.local = extra.local;
            }
            config.approval_ttl_secs = extra.approval_ttl_secs;
            if extra.oidc.is_some() {
                config.oidc = extra.oidc;
            }
            // An issuer URL the test names (`[issuer] url`, `server.issuer`).
            if !extra.issuer_from_listener {
                config.issuer = extra.issuer;
                config.issuer_from_listener = false;
            }
            if extra.approval_webhook.is_some() {
                config.approval_webhook = extra.approval_webhook;
            }
        }
        if let Some(secs) = self.publish_ahead_secs {
            let mut issuer = config.oidc.take().unwrap_or_default();
            issuer.publish_ahead_secs = secs;
            config.oidc = Some(issuer);
        }
        let clock: Arc<dyn Clock> = match &self.clock {
            Some(c) => Arc::new(c.clone()),
            None => Arc::new(SystemClock),
        };
        let (running, _) = keymint_server::start(&config, clock).await?;
        let admin_token = std::fs::read_to_string(&config.admin_token_file)?
            .trim()
            .to_owned();
        let (tx, rx) = oneshot::channel::<()>();
        let router = running.router.clone();
        let server = tokio::spawn(async move {
            keymint_server::serve(listener, router, async {
                let _ = rx.await;
            })
            .await;
        });
        Ok(TestServer {
            addr,
            admin_token,
            config,
            running,
            shutdown: Some(tx),
            server,
            _tmp: tmp,
        })
    }
}

/// A running in-process server. Dropping it stops it.
#[derive(Debug)]
pub struct TestServer {
    pub addr: SocketAddr,
    pub admin_token: String,
    pub config: Config,
    running: Running,
    shutdown: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
    _tmp: tempfile::TempDir,
}

impl TestServer {
    pub fn builder() -> Builder {
        Builder::default()
    }

    pub async fn start() -> anyhow::Result<Self> {
        Builder::default().start().await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client with the admin token.
    pub fn admin(&self) -> Client {
        self.anonymous().with_token(&self.admin_token)
    }

    /// A client with no token.
    pub fn anonymous(&self) -> Client {
        // The address is always a valid http URL.
        Client::new(&self.url(), None).unwrap_or_else(|_| unreachable!())
    }

    /// A client with the given bearer token.
    pub fn client(&self, token: &str) -> Client {
        self.anonymous().with_token(token)
    }

    /// The egress proxy mounted under `/proxy/`.
    pub fn proxy(&self) -> &Arc<keymint_proxy::Proxy> {
        &self.running.proxy
    }

    /// The base URL an SDK uses for `upstream` (`OPENAI_BASE_URL`, …).
    pub fn proxy_url(&self, upstream: &str) -> String {
        format!("{}/proxy/{upstream}", self.url())
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.running.broker
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// Stops as `keymint server` does on `SIGTERM`: the listeners drain
    /// (each connection finishes the request it is answering), budget
    /// chunks give back what they hold, and the background workers stop.
    pub async fn stop(mut self) {
        self.running.stopping().cancel();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.server).await;
        self.running.drained().await;
        self.running.proxy.shutdown().await;
        self.running.stop();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.server.abort();
    }
}
