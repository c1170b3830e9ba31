//! keymint's server: the broker, its HTTP API and its background workers.
//!
//! - [`config`]: the versioned TOML file and `keymint dev`'s defaults;
//! - [`broker`]: tasks, leases, revocation, expiry, reconciliation;
//! - [`approvals`]: requests held for a human, their decision and redemption;
//! - [`policy`]: the Cedar policies in force, reloadable;
//! - [`tls`]: TLS for the listener and mTLS with X.509-SVIDs;
//! - [`local`]: the API on a Unix socket for attested local processes;
//! - [`leaks`]: findings of secret scanners, and revocation of leaked tokens;
//! - [`audit_sink`]: delivery of the audit chain to a JSON-lines file;
//! - [`api`]: the axum router (`/v1`, problem+json errors);
//! - [`console`]: the operator console in the browser, under `/ui`;
//! - [`report`]: the compliance report (`/v1/report`), from live state;
//! - the egress proxy (`keymint-proxy`), mounted under `/proxy/<upstream>/`
//!   on the same listener;
//! - [`mcp`]: the MCP route, keymint as the protected resource in front of
//!   MCP servers, under `/mcp/<server>`;
//! - [`start`] prepares keys and the store and spawns the workers;
//!   [`serve`] runs a [`Front`] (the proxy's path, then the router) on a
//!   listener until shutdown.

pub mod admin_keys;
pub mod api;
pub mod audit_sink;
pub mod broker;
pub mod config;
pub mod console;
mod cores;
pub use cores::set_front_threads;
pub mod federated_upstreams;
mod front;
pub mod inventory_config;
pub mod local;
pub mod mcp;
pub mod metrics;
pub mod monitor;
pub mod monitoring_config;
pub mod oauth;
pub mod oauth_clients;
pub mod policy;
pub mod report;
pub mod rotation_config;
pub mod tls;
pub mod trust_domains;
pub mod webhook;

// Parts of the broker, at the paths they had before they moved under it.
pub use broker::{approvals, entries, leaks, node_watch};
pub use front::Front;

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use keymint_core::Clock;
use keymint_core::keyring::Keyring;
use keymint_core::role::{EngineKind, RoleKind};
use keymint_core::token::{self, Token, TokenKind};
use keymint_engines::token::TokenEngine;
use keymint_store::{PostgresStore, SqliteStore, Store};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use crate::broker::{Broker, BrokerParts};
use crate::config::Config;

/// Opens the configured store: SQLite in the data directory, or PostgreSQL
/// with the password read from its file (never shown in an error).
async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    match &config.storage {
        config::StorageBackend::Sqlite => {
            let db = config.data_dir.join("keymint.db");
            SqliteStore::refuse_lost_database(&db)
                .with_context(|| format!("cannot open the store at `{}`", db.display()))?;
            if !db.exists() {
                // SQLite gives its -wal and -shm files the database file's mode.
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&db)
                    .with_context(|| format!("cannot create `{}`", db.display()))?;
            }
            Ok(Arc::new(SqliteStore::open(&db).with_context(|| {
                format!("cannot open the store at `{}`", db.display())
            })?))
        }
        config::StorageBackend::Postgres {
            options,
            password_file,
        } => {
            let mut options = (**options).clone();
            if let Some(path) = password_file {
                let text = Zeroizing::new(std::fs::read_to_string(path).with_context(|| {
                    format!("cannot read `storage.password_file` `{}`", path.display())
                })?);
                let password = Zeroizing::new(text.trim_end_matches(['\r', '\n']).to_owned());
                if password.is_empty() {
                    bail!("`storage.password_file` `{}` is empty", path.display());
                }
                options = options.with_password(&password);
            }
            let store = PostgresStore::open(options)
                .await
                .context("cannot open the PostgreSQL store")?;
            tracing::info!(schema = store.schema(), "store: PostgreSQL");
            Ok(Arc::new(store))
        }
    }
}

/// The lock of a SQLite store for the one process that serves it (`None`
/// on PostgreSQL, which replicas share). The `keymint` binary takes it
/// before [`start`] and holds it until it exits; a second process on the
/// same data directory is refused instead of revoking the first's pending
/// leases and forking its audit chain (docs/design/0022, "One process per
/// SQLite store"). Servers started inside one process (tests) do not take it.
pub fn lock_store(config: &Config) -> anyhow::Result<Option<keymint_store::StoreLock>> {
    match &config.storage {
        config::StorageBackend::Sqlite => {
            ensure_private_dir(&config.data_dir)?;
            let db = config.data_dir.join("keymint.db");
            let lock = SqliteStore::lock(&db)
                .with_context(|| format!("cannot open the store at `{}`", db.display()))?;
            Ok(Some(lock))
        }
        config::StorageBackend::Postgres { .. } => Ok(None),
    }
}

/// A started broker: its router and its background workers.
#[derive(Debug)]
pub struct Running {
    pub broker: Arc<Broker>,
    /// The `/v1` API, `/metrics` and the egress proxy.
    pub router: Front,
    pub proxy: Arc<keymint_proxy::Proxy>,
    /// The egress proxy alone, with `/v1/health` and `/metrics`
    /// (`keymint proxy`).
    pub proxy_router: Front,
    workers: Vec<JoinHandle<()>>,
    /// Cancelled when the process is stopping: the local socket's listener
    /// stops accepting and drains its connections.
    stopping: tokio_util::sync::CancellationToken,
    /// The local socket's listener, which ends once drained.
    local: Option<JoinHandle<()>>,
}

impl Running {
    /// What stops the listeners [`start`] started (the local socket's):
    /// cancel it when the process is to stop, together with the shutdown of
    /// the listener passed to [`serve`], so that all drain at once; then
    /// [`Running::drained`].
    pub fn stopping(&self) -> tokio_util::sync::CancellationToken {
        self.stopping.clone()
    }

    /// Stops the listeners [`start`] started (if [`Running::stopping`] was
    /// not cancelled yet) and waits until each has drained: its
    /// connections finished the requests they were answering (at most
    /// 30 s).
    pub async fn drained(&mut self) {
        self.stopping.cancel();
        if let Some(local) = self.local.take() {
            let _ = local.await;
        }
    }

    /// Stops the background workers (the store finishes queued writes) and
    /// the listeners [`start`] started, without waiting for their
    /// connections.
    pub fn stop(&self) {
        self.stopping.cancel();
        self.broker.close_node_watches();
        for w in self.workers.iter().chain(&self.local) {
            w.abort();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates `dir` (mode 0700) if needed.
pub fn ensure_private_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create `{}`", dir.display()))?;
    }
    Ok(())
}

/// Reads a secret file, creating it with `make()` (mode 0600) if it does
/// not exist. Refuses a file that others can read.
fn load_or_create_secret(
    path: &Path,
    what: &str,
    make: impl FnOnce() -> anyhow::Result<Zeroizing<String>>,
) -> anyhow::Result<(Zeroizing<String>, bool)> {
    if path.exists() {
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read `{}`", path.display()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "{what} file `{}` is readable by others (mode {mode:o}); run `chmod 600` on it",
                path.display()
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read `{}`", path.display()))?;
        return Ok((Zeroizing::new(text.trim().to_owned()), false));
    }
    if let Some(dir) = path.parent() {
        ensure_private_dir(dir)?;
    }
    let value = make()?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create `{}`", path.display()))?;
    f.write_all(value.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok((value, true))
}

/// What [`start`] created on first use, for `keymint dev` to report.
#[derive(Debug, Default, Clone, Copy)]
pub struct Created {
    pub root_key: bool,
    pub admin_token: bool,
    pub signing_key: bool,
}

/// Prepares keys and the store, reconciles what a crash left pending, and
/// spawns the expiry manager and the audit sink.
pub async fn start(config: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<(Running, Created)> {
    ensure_private_dir(&config.data_dir)?;
    let mut created = Created::default();
    let (root_hex, made) = load_or_create_secret(&config.root_key_file, "root key", || {
        Keyring::generate_root_hex().map_err(Into::into)
    })?;
    created.root_key = made;
    let keyring = Arc::new(Keyring::from_root_hex(&root_hex).with_context(|| {
        format!(
            "root key file `{}` is invalid",
            config.root_key_file.display()
        )
    })?);
    let (admin, made) = load_or_create_secret(&config.admin_token_file, "admin token", || {
        let t = Token::generate(TokenKind::Admin)
            .map_err(|_| anyhow::anyhow!("the random number generator failed"))?;
        Ok(Zeroizing::new(t.expose().to_owned()))
    })?;
    created.admin_token = made;
    if token::check(&admin) != Ok(TokenKind::Admin) {
        bail!(
            "admin token file `{}` does not hold a keymint admin token (kma_...)",
            config.admin_token_file.display()
        );
    }

    let store = open_store(config).await?;

    // The signing key for what keymint signs (audit checkpoints, JWTs and
    // certificates in later engines): generated once, sealed under the root
    // key, never written in plain text.
    const SIGNING: &str = "signing/ed25519-seed";
    // Replicas starting at once on an empty database: one seed wins.
    if store.get_secret(SIGNING).await?.is_none() {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut())
            .map_err(|_| anyhow::anyhow!("the random number generator failed"))?;
        let sealed = keyring.seal(SIGNING, seed.as_ref())?;
        created.signing_key = store
            .swap_secret(SIGNING, None, sealed, clock.now())
            .await?;
    }
    if let Some(sealed) = store.get_secret(SIGNING).await? {
        keyring.open(SIGNING, &sealed).context(
            "the stored signing key cannot be opened with this root key (wrong root key file?)",
        )?;
    }

    let policy = Arc::new(
        crate::policy::PolicyState::load(&config.policy_paths)
            .context("cannot load the policies")?,
    );
    policy.set_decision_budget(config.policy_decision_budget);
    if policy.current().is_empty() {
        tracing::warn!(
            "no policy loaded: every task start, issuance, renewal and delegation will be denied \
             (name Cedar files in [policy] paths)"
        );
    }
    let mut operators = Vec::with_capacity(config.operators.len());
    for o in &config.operators {
        let (t, _) = load_or_create_secret(&o.token_file, "operator token", || {
            let t = Token::generate(TokenKind::Admin)
                .map_err(|_| anyhow::anyhow!("the random number generator failed"))?;
            Ok(Zeroizing::new(t.expose().to_owned()))
        })?;
        if token::check(&t) != Ok(TokenKind::Admin) || t.as_str() == admin.as_str() {
            bail!(
                "operator token file `{}` does not hold a keymint operator token (kma_..., not the admin token)",
                o.token_file.display()
            );
        }
        operators.push((o.name.clone(), t.to_string()));
    }
    let mut node_tokens = Vec::new();
    let mut node_identities = Vec::new();
    for n in &config.nodes {
        match &n.credential {
            config::NodeCredential::TokenFile(f) => {
                let path = config.data_dir.join(f);
                let (t, _) = load_or_create_secret(&path, "node token", || {
                    let t = Token::generate(TokenKind::Admin)
                        .map_err(|_| anyhow::anyhow!("the random number generator failed"))?;
                    Ok(Zeroizing::new(t.expose().to_owned()))
                })?;
                if token::check(&t) != Ok(TokenKind::Admin)
                    || t.as_str() == admin.as_str()
                    || operators.iter().any(|(_, o)| o == t.as_str())
                    || node_tokens
                        .iter()
                        .any(|(_, o): &(String, String)| o == t.as_str())
                {
                    bail!(
                        "node token file `{}` does not hold a keymint node token of its own \
                         (kma_..., not the admin's or an operator's)",
                        path.display()
                    );
                }
                node_tokens.push((n.name.clone(), t.to_string()));
            }
            config::NodeCredential::Identity(id) => {
                node_identities.push((n.name.clone(), id.clone()));
            }
        }
    }
    let identity = match &config.identity {
        Some(c) => Some(Arc::new(
            keymint_identity::Verifier::from_config(c.clone())
                .context("invalid [identity] configuration")?,
        )),
        None => None,
    };
    // keymint as an OIDC issuer: its keys, before the engines that sign.
    let oidc = match config.oidc_issuer() {
        Some(o) => {
            if config.issuer_from_listener {
                tracing::info!(
                    issuer = %config.issuer,
                    "issuer URL not set ([issuer] url): using the one derived from the listener"
                );
            }
            let settings = keymint_issuer::IssuerSettings {
                url: config.issuer.clone(),
                algorithms: o.algorithms,
                publish_ahead_secs: o.publish_ahead_secs,
                max_token_secs: config.task_limits.max_ttl_secs,
                trust_domain: o.trust_domain,
            };
            Some(
                broker::oidc_issuer::open_issuer(&store, &keyring, settings, clock.now())
                    .await
                    .context("cannot load the issuer's signing keys")?,
            )
        }
        None => None,
    };
    let admin_keys: Arc<dyn keymint_engines::provider::AdminKeys> =
        Arc::new(admin_keys::SealedAdminKeys {
            store: Arc::clone(&store),
            keyring: Arc::clone(&keyring),
        });
    let mut engines = engines(config, keyring.key_id(), oidc.as_ref())?;
    if let Some(issuer) = &oidc
        && config
            .roles
            .iter()
            .any(|r| r.engine() == EngineKind::Federated)
    {
        engines.push(Arc::new(
            keymint_engines::federation::FederationEngine::new(
                Arc::clone(issuer),
                Arc::clone(&clock),
            )
            .map_err(|e| anyhow::anyhow!(e))?,
        ));
    }
    engines.extend(provider_engines(
        config,
        keyring.key_id(),
        &clock,
        &admin_keys,
    )?);
    let broker = Arc::new(Broker::new(BrokerParts {
        policy,
        identity,
        operators,
        node_tokens,
        node_identities,
        approval_ttl_secs: config.approval_ttl_secs,
        store: Arc::clone(&store),
        clock: Arc::clone(&clock),
        keyring: Arc::clone(&keyring),
        roles: config.roles.clone(),
        engines,
        limits: config.task_limits,
        admin_token: admin.to_string(),
        issuer: config.issuer.clone(),
        oidc: oidc.clone(),
    }));

    // Another replica's task end or revocation empties this one's token
    // cache too (a no-op on SQLite, which no other process writes).
    store.watch_revocations(broker.revocation_epoch());

    broker
        .load_engine_keys()
        .await
        .context("cannot load the engines' sealed keys")?;
    // Admin passwords keymint rotated replace the configuration's.
    broker
        .load_admin_credentials()
        .await
        .context("cannot load the sealed database admin credentials")?;
    broker
        .check_admin_privileges()
        .await
        .context("a database admin lacks the privileges keymint needs")?;

    // Nothing is in flight yet: every pending lease is a crash leftover.
    let healed = broker.reconcile(clock.now().plus_millis(1)).await?;
    if healed > 0 {
        tracing::warn!(
            leases = healed,
            "revoked leases left pending by an earlier crash"
        );
    }

    match broker.reconcile_engines().await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(removed = n, "removed credentials no lease accounts for"),
        // A provider that is down at start must not keep keymint down.
        Err(e) => tracing::error!(error = %e, "engine reconciliation failed at start"),
    }

    broker.set_oauth_clients(config.oauth_clients.clone());
    broker.set_mcp_servers(
        config
            .mcp
            .iter()
            .filter(|m| m.credential == mcp::CredentialKind::Bearer)
            .map(|m| m.name.clone())
            .collect(),
    );
    broker.set_inventory(broker::inventory::InventorySettings {
        config: config.inventory.clone(),
        upstreams: config
            .upstreams
            .iter()
            .map(|u| {
                let t = std::time::Duration::from_secs(u.timeout_secs);
                (
                    u.name.clone(),
                    (u.kind.as_str().to_owned(), u.base_url(), t),
                )
            })
            .collect(),
        webhook: config
            .inventory
            .webhook
            .clone()
            .or_else(|| config.approval_webhook.clone()),
    });
    // Background duties run in one process at a time: the holder of the
    // store's duty lease (always this one on SQLite; docs/design/0022).
    let mut duties: Vec<broker::duties::Duty> = Vec::new();
    let b = Arc::clone(&broker);
    duties.push(Box::new(move || tokio::spawn(Arc::clone(&b).run_expiry())));
    let b = Arc::clone(&broker);
    duties.push(Box::new(move || {
        tokio::spawn(Arc::clone(&b).run_engine_reconciliation(std::time::Duration::from_secs(300)))
    }));
    if let Some(every) = config.inventory.evaluate_every_secs {
        let b = Arc::clone(&broker);
        duties.push(Box::new(move || {
            tokio::spawn(Arc::clone(&b).run_inventory(std::time::Duration::from_secs(every)))
        }));
    }
    // Leak responses a provider failed or a crash cut short, retried until
    // the provider confirms (docs/design/0049).
    if !config.inventory.responses.is_empty() {
        let b = Arc::clone(&broker);
        duties.push(Box::new(move || {
            tokio::spawn(Arc::clone(&b).run_leak_responses())
        }));
    }
    if let Some(url) = &config.approval_webhook {
        let (b, url) = (Arc::clone(&broker), url.clone());
        duties.push(Box::new(move || {
            tokio::spawn(Arc::clone(&b).run_approval_webhook(url.clone()))
        }));
    }
    // Retention of the misuse monitor's hours and sources (docs/design/0033).
    let (b, keep) = (Arc::clone(&broker), config.monitoring.usage_retention_secs);
    duties.push(Box::new(move || {
        tokio::spawn(Arc::clone(&b).run_usage_retention(keep))
    }));
    let mut workers = Vec::new();
    if let Some(path) = &config.audit_file {
        workers.push(tokio::spawn(audit_sink::run_file_sink(
            Arc::clone(&broker),
            path.clone(),
        )));
    }
    // Misuse monitoring (docs/design/0033): every process counts what its
    // proxy settles and enforces the suspensions in the store.
    broker
        .refresh_suspensions()
        .await
        .context("cannot read the suspensions")?;
    workers.push(tokio::spawn(Arc::clone(&broker).run_suspension_refresh()));
    let (monitor, monitor_task) = monitor::start(
        Arc::clone(&broker),
        config.monitoring.clone(),
        config
            .monitoring
            .webhook
            .clone()
            .or_else(|| config.approval_webhook.clone()),
    );
    workers.push(tokio::spawn(monitor_task));
    let store_shared = store.shared();
    let proxy = Arc::new(keymint_proxy::Proxy::new(keymint_proxy::ProxyParts {
        store,
        keyring,
        clock: Arc::clone(&clock),
        gate: Arc::clone(&broker) as Arc<dyn keymint_proxy::gate::Gate>,
        upstreams: config.upstreams.clone(),
        roles: config
            .roles
            .iter()
            .filter_map(|r| Some((r.name.clone(), r.egress()?.clone())))
            .collect(),
        prices: config.prices.clone(),
        settings: config.proxy.clone(),
        tokens: federated_upstreams::source(&config.upstreams, oidc.as_ref(), &clock)?,
        monitor: Some(monitor as Arc<dyn keymint_proxy::observe::Monitor>),
    }));
    // Reservations a crash left open are charged in full and audited
    // before the first request.
    proxy
        .recover()
        .await
        .context("cannot recover the proxy's budget reservations")?;
    workers.push(tokio::spawn(Arc::clone(&proxy).run_flush()));
    // A replaced upstream key reaches every process within a second
    // (docs/design/0035); rotations themselves are the broker's.
    workers.push(tokio::spawn(Arc::clone(&proxy).run_key_refresh()));
    broker.set_rotation(broker::rotation::RotationSettings {
        rotations: config.rotations.clone(),
        upstreams: config
            .upstreams
            .iter()
            .filter(|u| u.federation.is_none())
            .map(|u| {
                let t = std::time::Duration::from_secs(u.timeout_secs);
                (u.name.clone(), (u.kind, u.base_url(), t))
            })
            .collect(),
        proxy: Arc::clone(&proxy),
    });
    // Scheduled rotations, and the old keys whose grace period ends.
    if !config.rotations.is_empty() {
        let b = Arc::clone(&broker);
        duties.push(Box::new(move || {
            tokio::spawn(Arc::clone(&b).run_rotation())
        }));
    }
    if store_shared {
        // Reservations of replicas that died are charged (and their use
        // audited) within seconds, not at the next audit interval.
        let p = Arc::clone(&proxy);
        duties.push(Box::new(move || {
            let p = Arc::clone(&p);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    p.flush().await;
                }
            })
        }));
    }
    if config.duties {
        workers.push(tokio::spawn(Arc::clone(&broker).run_duties(duties)));
    } else {
        // Another replica runs them (the configuration allows this only on
        // a shared store); this one only serves.
        tracing::info!("`server.duties = false`: this process never holds the background duties");
        drop(duties);
    }
    if store_shared {
        // Keys another replica generated, imported or rotated.
        workers.push(tokio::spawn(Arc::clone(&broker).run_key_refresh()));
    }
    let state = api::AppState {
        broker: Arc::clone(&broker),
        max_body: config.max_body_bytes,
        has_audit_file: config.audit_file.is_some(),
        proxy: Some(Arc::clone(&proxy)),
        report: Arc::new(report::Deployment::of(config)),
    };
    let console = console::router(
        Arc::clone(&broker),
        Some(Arc::clone(&proxy)),
        config.tls.is_some(),
    );
    // The proxy's path is served ahead of these routers, with the holder
    // binding (`front`).
    let router = api::router(state.clone())
        .merge(console)
        .merge(oauth::router(Arc::clone(&broker)))
        .merge(mcp::router(Arc::clone(&broker), &config.mcp));
    let router = Front::with_proxy(router, state.clone(), Arc::clone(&proxy));
    let proxy_router =
        Front::with_proxy(api::health_router(state.clone()), state, Arc::clone(&proxy));
    let stopping = tokio_util::sync::CancellationToken::new();
    // Node agents' long polls answer as soon as the process is stopping, so
    // that the listeners' drain does not wait for them.
    workers.push(tokio::spawn({
        let (broker, stopping) = (Arc::clone(&broker), stopping.clone());
        async move {
            stopping.cancelled().await;
            broker.close_node_watches();
        }
    }));
    let mut local = None;
    if let Some(local_config) = &config.local {
        let registry = Arc::new(
            keymint_attest::Registry::new(local_config.entries.clone())
                .context("invalid [local] registration entries")?,
        );
        let listener = keymint_attest::bind_private_with(
            &local_config.socket,
            &keymint_attest::BindOptions {
                group: local_config.group,
            },
        )
        .with_context(|| format!("cannot listen on `{}`", local_config.socket.display()))?;
        tracing::info!(socket = %local_config.socket.display(), entries = local_config.entries.len(), "local socket: attested workloads");
        local = Some(tokio::spawn(local::serve(
            listener,
            registry,
            local_config.max_connections_per_uid,
            Arc::clone(&broker),
            router.clone(),
            stopping.clone().cancelled_owned(),
        )));
    }
    Ok((
        Running {
            broker,
            router,
            proxy,
            proxy_router,
            workers,
            stopping,
            local,
        },
        created,
    ))
}

fn engines(
    config: &Config,
    installation: &str,
    oidc: Option<&Arc<keymint_issuer::Issuer>>,
) -> anyhow::Result<Vec<Arc<dyn keymint_engines::Engine>>> {
    let mut engines: Vec<Arc<dyn keymint_engines::Engine>> = vec![Arc::new(TokenEngine)];
    if let Some(issuer) = oidc {
        engines.push(Arc::new(keymint_engines::jwt::JwtEngine::new(Arc::clone(
            issuer,
        ))));
        if config.roles.iter().any(|r| r.engine() == EngineKind::Aws) {
            engines.push(Arc::new(
                keymint_engines::aws::AwsEngine::new(Arc::clone(issuer))
                    .map_err(|e| anyhow::anyhow!(e))?,
            ));
        }
    }
    let pg: Vec<_> = config
        .databases
        .iter()
        .filter(|d| d.engine == EngineKind::Postgres)
        .map(|d| {
            keymint_engines::postgres::Database::parse(&d.name, &d.connection)
                .and_then(|db| db.with_tls(&d.tls))
        })
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!(e))?;
    if !pg.is_empty() {
        engines.push(Arc::new(keymint_engines::postgres::PostgresEngine::new(
            pg,
            installation,
        )));
    }
    let my: Vec<_> = config
        .databases
        .iter()
        .filter(|d| d.engine == EngineKind::Mysql)
        .map(|d| {
            keymint_engines::mysql::Database::parse(&d.name, &d.connection)
                .and_then(|db| db.with_tls(&d.tls))
                .map(Arc::new)
        })
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!(e))?;
    let cas: Vec<String> = config
        .roles
        .iter()
        .filter_map(|r| match &r.kind {
            RoleKind::Ssh(s) => Some(s.ca.clone()),
            _ => None,
        })
        .collect();
    if !cas.is_empty() {
        engines.push(Arc::new(keymint_engines::ssh::SshEngine::new(cas)));
    }
    if !my.is_empty() {
        engines.push(Arc::new(keymint_engines::mysql::MysqlEngine::new(
            my,
            installation,
        )));
    }
    Ok(engines)
}

/// The engines that make provider keys (openai, openrouter), for the
/// roles that name them: one admin API per admin-key upstream, with that
/// upstream's base URL and timeout.
fn provider_engines(
    config: &Config,
    installation: &str,
    clock: &Arc<dyn Clock>,
    keys: &Arc<dyn keymint_engines::provider::AdminKeys>,
) -> anyhow::Result<Vec<Arc<dyn keymint_engines::Engine>>> {
    use keymint_engines::provider::AdminApi;
    let api = |provider: &'static str, name: &str| -> anyhow::Result<AdminApi> {
        let u = config
            .upstreams
            .iter()
            .find(|u| u.name == name)
            .ok_or_else(|| anyhow::anyhow!("upstream `{name}` is not configured"))?;
        AdminApi::new(
            provider,
            name,
            &u.base_url(),
            // An admin call is small: the upstream's timeout, at most 30 s.
            std::time::Duration::from_secs(u.timeout_secs.clamp(1, 30)),
            Arc::clone(keys),
        )
        .map_err(|e| anyhow::anyhow!(e))
    };
    let mut engines: Vec<Arc<dyn keymint_engines::Engine>> = Vec::new();
    let mut openai_apis = std::collections::BTreeSet::new();
    let mut projects = Vec::new();
    let mut openrouter_apis = std::collections::BTreeSet::new();
    for r in &config.roles {
        match &r.kind {
            RoleKind::Openai(o) => {
                openai_apis.insert(o.admin_key.clone());
                projects.push((o.admin_key.clone(), o.project.clone()));
            }
            RoleKind::Openrouter(o) => {
                openrouter_apis.insert(o.management_key.clone());
            }
            _ => {}
        }
    }
    if !openai_apis.is_empty() {
        let apis = openai_apis
            .iter()
            .map(|n| api("openai", n))
            .collect::<anyhow::Result<Vec<_>>>()?;
        engines.push(Arc::new(keymint_engines::openai::OpenAiEngine::new(
            apis,
            projects,
            installation,
            Arc::clone(clock),
        )));
    }
    if !openrouter_apis.is_empty() {
        let apis = openrouter_apis
            .iter()
            .map(|n| api("openrouter", n))
            .collect::<anyhow::Result<Vec<_>>>()?;
        engines.push(Arc::new(
            keymint_engines::openrouter::OpenRouterEngine::new(
                apis,
                installation,
                Arc::clone(clock),
            ),
        ));
    }
    Ok(engines)
}

/// Writes `keymint dev`'s sample policy to `DATA_DIR/policies/sample.cedar`
/// unless the folder exists (then the policies there are the operator's).
pub fn write_sample_policy(data_dir: &Path) -> anyhow::Result<()> {
    let dir = data_dir.join("policies");
    if dir.exists() {
        return Ok(());
    }
    ensure_private_dir(data_dir)?;
    std::fs::create_dir(&dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    std::fs::write(dir.join("sample.cedar"), config::SAMPLE_POLICY)
        .with_context(|| format!("cannot write the sample policy in `{}`", dir.display()))?;
    Ok(())
}

/// Serves `front` on `listener` until `shutdown` completes, then lets every
/// connection finish the request it is answering and waits for them all
/// (at most 30 s: what is still open then ends with the process).
/// Connections have `TCP_NODELAY` set, as the proxy's upstream connections
/// do: an answer goes out when written, not after the client's delayed
/// acknowledgement. They are served on one single-threaded runtime per
/// core (`KEYMINT_FRONT_THREADS`; design 0029, "Seventh pass").
pub async fn serve(
    listener: TcpListener,
    front: Front,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    cores::serve(listener, front, shutdown, cores::Cores::process()).await;
}
