//! Dynamic PostgreSQL users.
//!
//! Each lease is a role of its own, `keymint_<lease id>`: created with
//! `LOGIN`, a generated password and `VALID UNTIL` the lease's end (a safety
//! net that holds even if keymint is gone, for password authentication),
//! commented with its lease and task, and granted what the keymint role's
//! creation statements say. Revoking sets `NOLOGIN`, terminates the user's
//! sessions, and drops what it owns and the role itself. Every step is
//! idempotent, so a revocation can be retried after any failure.
//!
//! keymint's own queries name every catalog table, function and operator
//! with its schema (`pg_catalog.starts_with`, `OPERATOR(pg_catalog.=)`): a
//! leased user that may create functions in a schema on the admin's
//! `search_path` (`public` before PostgreSQL 15, or one a role grants
//! `CREATE` on) could otherwise plant a function that matches an argument
//! type better than the built-in (`starts_with(name, text)`, the
//! CVE-2018-1058 pattern), and keymint would run it as its admin.
//!
//! Identifiers and literals are always quoted by `postgres_protocol`'s
//! [`escape_identifier`] and [`escape_literal`]; the only values
//! interpolated are the generated user name, the generated password and the
//! lease's own ids. The creation statements come from the operator's
//! configuration and name the user as `{{name}}`.
//!
//! Admin connections come from a bounded pool per database
//! (`deadpool-postgres`): at most [`POOL_MAX`] open at once, a caller waits
//! at most [`POOL_WAIT`] for one, and a connection found closed is not
//! handed out again. A new admin password replaces the database's pool, so
//! new connections use it and the old pool's connections are closed.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use keymint_core::model::{Lease, Revocability};
use keymint_core::role::EngineKind;
use keymint_core::token::random_base62;
use keymint_proto::{Credential, SecretString};
use postgres_protocol::escape::{escape_identifier, escape_literal};
use tokio_postgres::{Client, NoTls};

use crate::DbTls;
use zeroize::Zeroizing;

use crate::{Engine, EngineError, IssueContext, Prepared};

pub const USER_PREFIX: &str = "keymint_";

/// PBKDF2 iterations of the SCRAM verifiers keymint computes. Stretching
/// protects guessable passwords; keymint's are 32 random base62 characters
/// (190 bits), so a verifier is out of reach of guessing whatever the count,
/// and the server need not spend 4,096 iterations on every new user.
pub const SCRAM_ITERATIONS: u32 = 128;

/// The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802,
/// RFC 7677): `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
/// Sending it instead of the password means the server never sees the
/// password and does no hashing of its own.
pub fn scram_verifier(password: &str, salt: &[u8; 16], iterations: u32) -> String {
    use base64::Engine as _;
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};
    type H = Hmac<Sha256>;
    let hmac = |key: &[u8], data: &[&[u8]]| -> [u8; 32] {
        // HMAC accepts keys of any length.
        let mut m = <H as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
        for d in data {
            m.update(d);
        }
        m.finalize().into_bytes().into()
    };
    // PBKDF2-HMAC-SHA256, one 32-byte block.
    let mut u = hmac(password.as_bytes(), &[salt, &1u32.to_be_bytes()]);
    let mut salted = u;
    for _ in 1..iterations {
        u = hmac(password.as_bytes(), &[&u]);
        for (s, x) in salted.iter_mut().zip(u) {
            *s ^= x;
        }
    }
    let client_key = hmac(&salted, &[b"Client Key"]);
    let stored_key = Sha256::digest(client_key);
    let server_key = hmac(&salted, &[b"Server Key"]);
    let b64 = base64::engine::general_purpose::STANDARD;
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        b64.encode(salt),
        b64.encode(stored_key),
        b64.encode(server_key)
    )
}

/// A database keymint manages users in.
#[derive(Clone)]
pub struct Database {
    pub name: String,
    /// The admin connection (libpq key=value or URL form).
    pub config: tokio_postgres::Config,
    /// TLS to the server (`None`: plain text, see [`Database::with_tls`]).
    tls: Option<keymint_client::postgres_tls::RustlsConnect>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection may hold the admin password.
        f.debug_struct("Database")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Database {
    pub fn parse(name: &str, conn: &str) -> Result<Self, String> {
        let config: tokio_postgres::Config = conn
            .parse()
            .map_err(|_| format!("database `{name}`: the connection string is not valid"))?;
        // `sslmode=require` in the connection string is honoured, as
        // `tls = "require"` (verified); anything else is plain text unless
        // [`Database::with_tls`] says otherwise.
        let asks = config.get_ssl_mode() == tokio_postgres::config::SslMode::Require;
        let db = Self {
            name: name.to_owned(),
            config,
            tls: None,
        };
        db.with_tls(&if asks {
            DbTls::Require { ca_file: None }
        } else {
            DbTls::Disable
        })
    }

    /// Whether the connection string itself says `sslmode=require`.
    pub fn asks_for_tls(conn: &str) -> bool {
        conn.parse::<tokio_postgres::Config>()
            .is_ok_and(|c| c.get_ssl_mode() == tokio_postgres::config::SslMode::Require)
    }

    /// Speaks TLS to the server (`Require`: verified, never downgraded) or
    /// plain text (`Disable`). A CA file that cannot be read is an error
    /// here, at load, naming the file.
    pub fn with_tls(mut self, tls: &DbTls) -> Result<Self, String> {
        use tokio_postgres::config::SslMode;
        match tls {
            DbTls::Disable => {
                self.config.ssl_mode(SslMode::Disable);
                self.tls = None;
            }
            DbTls::Require { ca_file } => {
                let connector =
                    keymint_client::postgres_tls::RustlsConnect::new(ca_file.as_deref())
                        .map_err(|e| format!("database `{}`: {e}", self.name))?;
                // `Require`: a server that answers the TLS request with "no"
                // is refused (tokio-postgres' `Prefer` would go on in clear
                // text). The certificate is checked by rustls.
                self.config.ssl_mode(SslMode::Require);
                self.tls = Some(connector);
            }
        }
        Ok(self)
    }

    /// Whether admin connections are encrypted.
    pub fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether every host of the admin connection is on this machine (a
    /// Unix socket or a loopback address): the only place keymint's
    /// unencrypted admin connection may go.
    pub fn is_local(&self) -> bool {
        self.config.get_hosts().iter().all(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => crate::is_loopback_host(h),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(_) => true,
        }) && self
            .config
            .get_hostaddrs()
            .iter()
            .all(std::net::IpAddr::is_loopback)
    }

    fn host_port(&self) -> (String, u16) {
        let host = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        (
            host,
            self.config.get_ports().first().copied().unwrap_or(5432),
        )
    }
}

/// The most admin connections keymint holds open to one database.
pub const POOL_MAX: usize = 8;

/// How long a caller waits for a free admin connection, and how long
/// opening one may take.
pub const POOL_WAIT: Duration = Duration::from_secs(10);

/// How long opening an admin connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The server-side `statement_timeout` of admin connections.
pub const STATEMENT_TIMEOUT_MS: u64 = 10_000;

#[derive(Debug, Default)]
pub struct PostgresEngine {
    databases: HashMap<String, Database>,
    /// This keymint installation's id (from its root key): the tag that
    /// tells its users from another installation's on a shared server.
    installation: String,
    /// The admin connection pool of each database, made at first use with
    /// the admin password of that moment.
    pools: std::sync::RwLock<HashMap<String, deadpool_postgres::Pool>>,
    /// Admin passwords that replace the configuration's (sealed in the
    /// store, set after a rotation), per database.
    passwords: std::sync::RwLock<HashMap<String, Zeroizing<String>>>,
}

/// An admin connection from a pool; it goes back when dropped.
type Pooled = deadpool_postgres::Object;

fn db_error(what: &str, e: &tokio_postgres::Error) -> EngineError {
    // The server's message and SQLSTATE, never the statement (which may
    // hold a password).
    let detail = match e.as_db_error() {
        Some(db) => format!("{what}: {} ({})", db.message(), db.code().code()),
        None if e.is_closed() => format!("{what}: connection closed"),
        // A refused certificate, or a server without TLS when it is
        // required: said as such, in rustls' or tokio-postgres' words.
        None if crate::tls_failure(e).is_some() || e.to_string().contains("TLS") => {
            match crate::tls_failure(e) {
                Some(t) => format!("{what}: TLS handshake failed: {t}"),
                None => format!("{what}: {e}"),
            }
        }
        None => format!("{what}: cannot reach the database"),
    };
    EngineError::Unavailable(detail)
}

/// Whether PostgreSQL refused for a concurrent change that a retry can get
/// past: serialization failures, deadlocks, and catalog rows updated by a
/// concurrent `GRANT`/`DROP` ("tuple concurrently updated").
fn retryable(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        matches!(db.code().code(), "40001" | "40P01")
            || (db.code().code() == "XX000" && db.message().contains("concurrently"))
    })
}

fn is_missing_role(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|db| db.code().code() == "42704")
}

const ATTEMPTS: u32 = 8;

/// Runs `sql` (a whole transaction) again while PostgreSQL refuses it for a
/// concurrent catalog change, with a short growing pause.
async fn execute_retrying(client: &Client, sql: &str) -> Result<(), tokio_postgres::Error> {
    let mut attempt = 0;
    loop {
        match client.batch_execute(sql).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                // Leave the (pooled) connection outside any transaction.
                let _ = client.batch_execute("ROLLBACK").await;
                attempt += 1;
                if attempt >= ATTEMPTS || !retryable(&e) {
                    return Err(e);
                }
                let pause = 2u64 << attempt.min(6);
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
            }
        }
    }
}

impl PostgresEngine {
    pub fn new(databases: Vec<Database>, installation: &str) -> Self {
        Self {
            databases: databases.into_iter().map(|d| (d.name.clone(), d)).collect(),
            installation: installation.to_owned(),
            pools: std::sync::RwLock::new(HashMap::new()),
            passwords: std::sync::RwLock::new(HashMap::new()),
        }
    }

    /// The admin connection settings of `db`, with the stored password if
    /// there is one.
    fn admin_config(&self, db: &Database) -> tokio_postgres::Config {
        let mut config = db.config.clone();
        // Deadlines of their own, below the broker's provider deadline: a
        // connection attempt, and every statement on the server's side (a
        // statement waiting on a lock ends there too, not only here).
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let options = match config.get_options() {
            Some(o) if !o.trim().is_empty() => {
                format!("{o} -c statement_timeout={STATEMENT_TIMEOUT_MS}")
            }
            _ => format!("-c statement_timeout={STATEMENT_TIMEOUT_MS}"),
        };
        config.options(&options);
        if let Some(p) = self
            .passwords
            .read()
            .ok()
            .and_then(|m| m.get(&db.name).cloned())
        {
            config.password(p.as_bytes());
        }
        config
    }

    /// The admin connection pool of `db`, made now if it has none.
    fn pool(&self, db: &Database) -> Result<deadpool_postgres::Pool, EngineError> {
        let poisoned = || EngineError::Internal("the connection pool lock is poisoned".into());
        if let Some(p) = self.pools.read().map_err(|_| poisoned())?.get(&db.name) {
            return Ok(p.clone());
        }
        let mut pools = self.pools.write().map_err(|_| poisoned())?;
        if let Some(p) = pools.get(&db.name) {
            return Ok(p.clone());
        }
        let manager_config = deadpool_postgres::ManagerConfig {
            // `is_closed` only: a query per checkout would cost a round
            // trip on every issuance; a connection that broke since is
            // met by the statement's error (and a retry by the caller).
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        };
        let manager = match &db.tls {
            Some(tls) => deadpool_postgres::Manager::from_config(
                self.admin_config(db),
                tls.clone(),
                manager_config,
            ),
            None => deadpool_postgres::Manager::from_config(
                self.admin_config(db),
                NoTls,
                manager_config,
            ),
        };
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(POOL_MAX)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(POOL_WAIT))
            .recycle_timeout(Some(POOL_WAIT))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|_| {
                EngineError::Internal(format!(
                    "database `{}`: cannot make the connection pool",
                    db.name
                ))
            })?;
        pools.insert(db.name.clone(), pool.clone());
        Ok(pool)
    }

    /// An admin connection from the pool: an idle one, a new one while
    /// fewer than [`POOL_MAX`] are open, or the first one given back within
    /// [`POOL_WAIT`].
    async fn admin(&self, db: &Database) -> Result<Pooled, EngineError> {
        use deadpool_postgres::PoolError;
        let name = &db.name;
        self.pool(db)?.get().await.map_err(|e| match e {
            PoolError::Backend(e) => db_error(&format!("database `{name}`"), &e),
            PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => EngineError::Unavailable(
                format!("database `{name}`: no admin connection free within {POOL_WAIT:?}"),
            ),
            PoolError::Timeout(_) => {
                EngineError::Unavailable(format!("database `{name}`: connection timed out"))
            }
            _ => EngineError::Unavailable(format!(
                "database `{name}`: no admin connection available"
            )),
        })
    }

    fn database(&self, name: &str) -> Result<&Database, EngineError> {
        self.databases
            .get(name)
            .ok_or_else(|| EngineError::Internal(format!("database `{name}` is not configured")))
    }

    async fn connect(
        db: &Database,
        config: &tokio_postgres::Config,
    ) -> Result<Client, EngineError> {
        let name = &db.name;
        let timed_out =
            |_| EngineError::Unavailable(format!("database `{name}`: connection timed out"));
        let failed = |e| db_error(&format!("database `{name}`"), &e);
        let within = std::time::Duration::from_secs(10);
        let client = match &db.tls {
            Some(tls) => {
                let (client, connection) =
                    tokio::time::timeout(within, config.connect(tls.clone()))
                        .await
                        .map_err(timed_out)?
                        .map_err(failed)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "postgres admin connection ended");
                    }
                });
                client
            }
            None => {
                let (client, connection) = tokio::time::timeout(within, config.connect(NoTls))
                    .await
                    .map_err(timed_out)?
                    .map_err(failed)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "postgres admin connection ended");
                    }
                });
                client
            }
        };
        Ok(client)
    }

    /// The users this installation created in `database`: named
    /// `keymint_<lease id>` *and* commented `keymint lease <lease id> task
    /// <task id> installation <id>` with this installation's id. A user
    /// without both marks, or made by another installation sharing the
    /// server, is never listed.
    pub async fn list_users(&self, database: &str) -> Result<Vec<(String, String)>, EngineError> {
        let db = self.database(database)?;
        let client = self.admin(db).await?;
        let rows = client
            .query(
                "SELECT r.rolname, d.description FROM pg_catalog.pg_roles r \
                 JOIN pg_catalog.pg_shdescription d ON d.objoid OPERATOR(pg_catalog.=) r.oid \
                 AND d.classoid OPERATOR(pg_catalog.=) 'pg_catalog.pg_authid'::pg_catalog.regclass \
                 WHERE pg_catalog.starts_with(r.rolname::pg_catalog.text, $1) \
                 AND pg_catalog.starts_with(d.description, 'keymint lease ')",
                &[&USER_PREFIX],
            )
            .await
            .map_err(|e| db_error("listing users", &e))?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let name: String = r.get(0);
                let comment: String = r.get(1);
                let lease = name.strip_prefix(USER_PREFIX)?.to_owned();
                let words: Vec<&str> = comment.split(' ').collect();
                let tagged = matches!(
                    words.as_slice(),
                    ["keymint", "lease", l, "task", _, "installation", i]
                        if *l == lease && *i == self.installation
                );
                tagged.then_some((name, lease))
            })
            .collect())
    }

    /// Drops a user keymint created, whether or not a lease names it.
    pub async fn drop_user(&self, database: &str, username: &str) -> Result<(), EngineError> {
        if !username.starts_with(USER_PREFIX) {
            return Err(EngineError::Internal(format!(
                "`{username}` is not a keymint user"
            )));
        }
        let db = self.database(database)?;
        let client = self.admin(db).await?;
        let oid: u32 = match client
            .query_opt(
                "SELECT oid FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) $1",
                &[&username],
            )
            .await
            .map_err(|e| db_error("looking up the user", &e))?
        {
            Some(row) => row.get(0),
            None => return Ok(()),
        };
        let user = escape_identifier(username);
        // Keymint's admin takes membership in the user first: PostgreSQL
        // lets a non-superuser end a role's sessions and reassign or drop
        // what it owns only with the privileges of that role (PostgreSQL
        // 15: "permission denied to reassign objects"). CREATEROLE (15) or
        // the ADMIN OPTION its creator holds (16+) allows the grant. Then
        // no new sessions, then end the open ones, then drop. A user that
        // vanished meanwhile (a concurrent revocation) counts as dropped.
        let disable =
            format!("BEGIN; ALTER ROLE {user} NOLOGIN; GRANT {user} TO CURRENT_USER; COMMIT;");
        match execute_retrying(&client, &disable).await {
            Err(e) if is_missing_role(&e) => return Ok(()),
            Err(e) => return Err(db_error("disabling the user", &e)),
            Ok(()) => {}
        }
        client
            .execute(
                "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity \
                 WHERE usename OPERATOR(pg_catalog.=) $1",
                &[&username],
            )
            .await
            .map_err(|e| db_error("terminating sessions", &e))?;
        self.drop_owned_elsewhere(db, &client, oid, &user).await?;
        // What the user owns goes with it (`DROP OWNED`: its objects and
        // the privileges granted to it), never to keymint's admin: a view
        // is read with its owner's rights and a SECURITY DEFINER function
        // runs as its owner, so what a workload wrote would have run as
        // the admin (a superuser, in many installations) for whoever it
        // had granted it to. Objects that must outlive a lease belong to a
        // role the user acts as (`SET ROLE`; docs/design/0003). No
        // CASCADE: if another role's object depends on one of them, the
        // drop fails and is retried, the user unable to log in meanwhile.
        //
        // The role's sessions are ended a second time, by its oid, inside
        // the drop: a login that passed PostgreSQL's `rolcanlogin` check
        // just before `NOLOGIN` committed is listed in `pg_stat_activity`
        // only once its start-up ends, which can be after the termination
        // above, and a session outlives the drop of its role. One still in
        // its start-up when the drop commits fails on its own ("invalid
        // role OID"). The oid is the server's own number.
        let drop = format!(
            "BEGIN; DROP OWNED BY {user}; DROP ROLE IF EXISTS {user}; \
             SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity \
             WHERE usesysid OPERATOR(pg_catalog.=) {oid}::pg_catalog.oid; COMMIT;"
        );
        match execute_retrying(&client, &drop).await {
            Ok(()) => Ok(()),
            Err(e) if is_missing_role(&e) => Ok(()),
            Err(e) => Err(db_error("dropping the user", &e)),
        }
    }

    /// Drops what the user owns, and the privileges granted to it, in the
    /// cluster's other databases. `DROP OWNED` reaches only the database
    /// it runs in, and `DROP ROLE` fails while the role owns anything
    /// anywhere; a user needs no privilege to own something in any database
    /// it may connect to (a large object, `lo_create`; default privileges,
    /// `ALTER DEFAULT PRIVILEGES`), and `PUBLIC` may connect to `postgres`
    /// and `template1` by default. Without this a leased user could make
    /// its own revocation fail at every retry and leave its role behind
    /// (docs/design/0003). The databases come from `pg_shdepend`; each is
    /// reached with a connection of its own, with the admin's settings.
    async fn drop_owned_elsewhere(
        &self,
        db: &Database,
        client: &Client,
        oid: u32,
        user: &str,
    ) -> Result<(), EngineError> {
        let rows = client
            .query(
                "SELECT DISTINCT d.datname::pg_catalog.text FROM pg_catalog.pg_shdepend s \
                 JOIN pg_catalog.pg_database d ON d.oid OPERATOR(pg_catalog.=) s.dbid \
                 WHERE s.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_authid'::pg_catalog.regclass \
                 AND s.refobjid OPERATOR(pg_catalog.=) $1 \
                 AND d.datname OPERATOR(pg_catalog.<>) pg_catalog.current_database()",
                &[&oid],
            )
            .await
            .map_err(|e| db_error("finding what the user owns in other databases", &e))?;
        for row in rows {
            let other: String = row.get(0);
            let mut config = self.admin_config(db);
            config.dbname(&other);
            let conn = Self::connect(db, &config).await?;
            match execute_retrying(&conn, &format!("BEGIN; DROP OWNED BY {user}; COMMIT;")).await {
                Ok(()) => {}
                Err(e) if is_missing_role(&e) => {}
                Err(e) => {
                    return Err(db_error(
                        &format!("dropping what the user owns in database `{other}`"),
                        &e,
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether keymint's admin on `database` may create and drop users:
    /// superuser, or CREATEROLE (docs/design/0003). `Rejected` with what is
    /// missing when it may not; `Unavailable` when the database cannot be
    /// asked now.
    pub async fn check_admin(&self, database: &str) -> Result<(), EngineError> {
        let db = self.database(database)?;
        let client = self.admin(db).await?;
        let row = client
            .query_one(
                "SELECT rolsuper, rolcreaterole FROM pg_catalog.pg_roles \
                 WHERE rolname OPERATOR(pg_catalog.=) current_user",
                &[],
            )
            .await
            .map_err(|e| db_error("reading the admin's privileges", &e))?;
        let (superuser, createrole): (bool, bool) = (row.get(0), row.get(1));
        if superuser || createrole {
            Ok(())
        } else {
            Err(EngineError::Rejected(format!(
                "database `{database}`: keymint's admin role has neither CREATEROLE nor \
                 superuser, so it cannot create or drop users; grant it CREATEROLE \
                 (see docs/design/0003-postgres-users.md)"
            )))
        }
    }
}

#[async_trait]
impl Engine for PostgresEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Postgres
    }

    fn revocability(&self) -> Revocability {
        Revocability::Revocable
    }

    fn is_local(&self) -> bool {
        false
    }

    fn prepare(&self, ctx: &IssueContext<'_>) -> Result<Prepared, EngineError> {
        let settings = ctx.database_role(EngineKind::Postgres)?;
        let db = self.database(&settings.database)?;
        let username = format!("{USER_PREFIX}{}", ctx.lease_id);
        let password = random_base62(32)
            .map_err(|_| EngineError::Internal("the random number generator failed".into()))?;
        let (host, port) = db.host_port();
        Ok(Prepared {
            fingerprint_material: Zeroizing::new(password.as_bytes().to_vec()),
            credential: Credential::Database {
                engine: EngineKind::Postgres,
                host,
                port,
                database: db.config.get_dbname().unwrap_or("postgres").to_owned(),
                username: username.clone(),
                password: SecretString::new(password.to_string()),
                // PostgreSQL has no per-role TLS requirement (that is
                // `hostssl` in pg_hba.conf); the credential tells clients
                // to use TLS where keymint's own connection does.
                tls: db.uses_tls(),
            },
            engine_data: serde_json::json!({"database": settings.database, "username": username}),
        })
    }

    async fn apply(&self, ctx: &IssueContext<'_>, prepared: &Prepared) -> Result<(), EngineError> {
        let settings = ctx.database_role(EngineKind::Postgres)?;
        let db = self.database(&settings.database)?;
        let Credential::Database {
            username, password, ..
        } = &prepared.credential
        else {
            return Err(EngineError::Internal(
                "prepared credential is not a database user".into(),
            ));
        };
        let user = escape_identifier(username);
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt)
            .map_err(|_| EngineError::Internal("the random number generator failed".into()))?;
        let verifier = scram_verifier(password.expose(), &salt, SCRAM_ITERATIONS);
        // At most this many sessions at once: without it one leased user
        // could open connections until the server's `max_connections` and
        // lock everyone else out, keymint's admin included when it is not
        // a superuser (docs/design/0003-postgres-users.md).
        let limit = settings.connection_limit().map_err(EngineError::Internal)?;
        let mut sql = Zeroizing::new(format!(
            "BEGIN; CREATE ROLE {user} WITH LOGIN CONNECTION LIMIT {limit} PASSWORD {} VALID UNTIL {}; COMMENT ON ROLE {user} IS {};",
            escape_literal(&verifier),
            escape_literal(&ctx.expires_at.rfc3339()),
            escape_literal(&format!(
                "keymint lease {} task {} installation {}",
                ctx.lease_id, ctx.task.id, self.installation
            )),
        ));
        for stmt in &settings.creation_statements {
            sql.push(' ');
            sql.push_str(&stmt.replace("{{name}}", &user));
            if !stmt.trim_end().ends_with(';') {
                sql.push(';');
            }
        }
        sql.push_str(" COMMIT;");
        let client = self.admin(db).await?;
        execute_retrying(&client, &sql)
            .await
            .map_err(|e| db_error("creating the user", &e))
    }

    async fn managed(&self) -> Result<Vec<crate::Managed>, EngineError> {
        let mut out = Vec::new();
        let mut names: Vec<&String> = self.databases.keys().collect();
        names.sort();
        for db in names {
            for (username, lease_id) in self.list_users(db).await? {
                out.push(crate::Managed {
                    lease_id,
                    engine_data: serde_json::json!({"database": db, "username": username}),
                });
            }
        }
        Ok(out)
    }

    async fn renew(
        &self,
        lease: &Lease,
        expires_at: keymint_core::Timestamp,
    ) -> Result<(), EngineError> {
        let data = crate::DatabaseUser::of(lease)?;
        let db = self.database(&data.database)?;
        let client = self.admin(db).await?;
        let sql = format!(
            "ALTER ROLE {} VALID UNTIL {}",
            escape_identifier(&data.username),
            escape_literal(&expires_at.rfc3339())
        );
        execute_retrying(&client, &sql)
            .await
            .map_err(|e| db_error("extending the user", &e))
    }

    async fn revoke(&self, lease: &Lease) -> Result<(), EngineError> {
        let data = crate::DatabaseUser::of(lease)?;
        self.drop_user(&data.database, &data.username).await
    }

    fn admin_connections(&self) -> Vec<String> {
        let mut v: Vec<String> = self.databases.keys().cloned().collect();
        v.sort();
        v
    }

    async fn check_admin(&self, connection: &str) -> Result<(), EngineError> {
        PostgresEngine::check_admin(self, connection).await
    }

    async fn rotate_admin_password(
        &self,
        database: &str,
        password: &str,
    ) -> Result<(), EngineError> {
        let db = self.database(database)?;
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt)
            .map_err(|_| EngineError::Internal("the random number generator failed".into()))?;
        // The server stores the verifier and never sees the password.
        let verifier = scram_verifier(password, &salt, 4096);
        let client = self.admin(db).await?;
        // The role keymint logs in as: an admin that acts as a group role
        // (`ALTER ROLE … SET role`, `-c role=…`) has that group as
        // `CURRENT_USER`, which would get the password instead. `SET LOCAL
        // ROLE NONE` makes the login role current for this transaction,
        // so it changes its own password.
        execute_retrying(
            &client,
            &format!(
                "BEGIN; SET LOCAL ROLE NONE; ALTER ROLE CURRENT_USER PASSWORD {}; COMMIT;",
                escape_literal(&verifier)
            ),
        )
        .await
        .map_err(|e| db_error("setting the admin password", &e))?;
        drop(client);
        self.use_admin_password(database, password)
    }

    fn use_admin_password(&self, database: &str, password: &str) -> Result<(), EngineError> {
        self.database(database)?;
        if let Ok(mut m) = self.passwords.write() {
            m.insert(database.to_owned(), Zeroizing::new(password.to_owned()));
        }
        // The pool's connections were opened with the old password: the
        // next caller makes a new pool, which opens connections with the
        // new one. Closing the old pool drops its idle connections now and
        // those in use when they are given back.
        let old = self
            .pools
            .write()
            .map_err(|_| EngineError::Internal("the connection pool lock is poisoned".into()))?
            .remove(database);
        if let Some(old) = old {
            old.close();
        }
        Ok(())
    }

    async fn admin_password_works(
        &self,
        database: &str,
        password: &str,
    ) -> Result<bool, EngineError> {
        let db = self.database(database)?;
        let mut config = db.config.clone();
        config.password(password.as_bytes());
        match Self::connect(db, &config).await {
            Ok(_) => Ok(true),
            Err(_) => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_neutralises_injection() {
        assert_eq!(
            escape_identifier(r#"a"; DROP ROLE postgres; --"#),
            r#""a""; DROP ROLE postgres; --""#
        );
        assert_eq!(
            escape_literal("it's'; DROP TABLE x; --"),
            "'it''s''; DROP TABLE x; --'"
        );
        assert_eq!(escape_identifier("keymint_lse_0Ab"), "\"keymint_lse_0Ab\"");
        // A backslash cannot end the literal early whatever
        // `standard_conforming_strings` says.
        assert_eq!(escape_literal(r"a\'b"), r" E'a\\''b'");
    }

    #[test]
    fn scram_verifier_matches_an_independent_computation() {
        // Computed with Python's hashlib.pbkdf2_hmac and hmac (see
        // docs/design/0003-postgres-users.md).
        let salt: [u8; 16] = core::array::from_fn(|i| i as u8);
        assert_eq!(
            scram_verifier("kmEXAMPLEpassword0123456789ABCDE", &salt, 128),
            "SCRAM-SHA-256$128:AAECAwQFBgcICQoLDA0ODw==$ZDMGR3eqi2wSNptGH3IXpkQPhKsweayiZGPj4FomHU0=:/Pk4mBIMSGvv+PWdlK8kS+KbRdaHDoF4o3cDuI3636Y="
        );
    }

    #[test]
    fn connection_strings_are_parsed_and_never_printed() {
        let db = Database::parse(
            "main",
            "host=127.0.0.1 port=5433 user=admin password=hunter2 dbname=app",
        )
        .unwrap();
        assert_eq!(db.host_port(), ("127.0.0.1".to_owned(), 5433));
        assert!(!format!("{db:?}").contains("hunter2"));
        let e = Database::parse("main", "host=127.0.0.1 port=notaport").unwrap_err();
        assert!(!e.contains("notaport") || e.contains("not valid"));
    }
}
