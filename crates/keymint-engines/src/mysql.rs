//! Dynamic MySQL/MariaDB users.
//!
//! Each lease is an account of its own, `` `km_<lease id body>`@`%` `` (25
//! characters: under MySQL's 32-character limit), created with a generated
//! password and granted what the keymint role's creation statements say.
//!
//! MySQL and MariaDB have no comment on accounts that both support, so the
//! tag is a row in a keymint-owned bookkeeping table, `keymint.users` (user,
//! host, lease, task, role, workload, installation, expiry), written
//! *before* the account is created and removed *after* it is dropped. An
//! account counts as keymint's only when its name has keymint's shape *and* a
//! row with this installation's id names it with the matching lease.
//!
//! Neither server has PostgreSQL's `VALID UNTIL`. The safety net is one
//! MariaDB/MySQL event, `keymint.expire_users`, that every few seconds drops
//! the accounts whose bookkeeping row has passed its expiry and kills their
//! sessions; it runs inside the server, so it holds when keymint is gone,
//! provided the server's `event_scheduler` is `ON`
//! (docs/design/0005-mysql-users.md).
//!
//! Revoking drops the account (so nothing new can log in), kills its open
//! sessions, and deletes the bookkeeping row. Every step is idempotent.
//!
//! Identifiers are quoted by [`quote_ident`] (backticks, inner backticks
//! doubled) and literals by [`quote_literal`]; values that can be bound as
//! parameters (everything in the bookkeeping table, session lookups) are.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use keymint_core::Timestamp;
use keymint_core::model::{Lease, Revocability};
use keymint_core::role::EngineKind;
use keymint_core::token::random_base62;
use keymint_proto::{Credential, SecretString};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts};

use crate::DbTls;
use zeroize::Zeroizing;

use crate::{Engine, EngineError, IssueContext, Managed, Prepared};

/// The prefix of every user name keymint creates.
pub const USER_PREFIX: &str = "km_";
/// The host part of every account keymint creates.
pub const USER_HOST: &str = "%";
/// The schema that holds keymint's bookkeeping table and expiry event.
pub const SCHEMA: &str = "keymint";
/// How often the server-side expiry event runs.
pub const EXPIRY_EVENT_EVERY_SECS: u32 = 5;

/// Quotes a MySQL identifier: backticks around, inner backticks doubled.
pub fn quote_ident(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
}

/// Quotes a MySQL string literal: `'` around, `'` doubled, `\` escaped and
/// NUL written as `\0`. Safe under the default SQL mode and under
/// `NO_BACKSLASH_ESCAPES` (where a backslash would then stand for two, but
/// nothing can end the literal early).
pub fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// The account `` `user`@`host` `` as MySQL names it in `GRANT … TO`.
pub fn account(user: &str) -> String {
    format!("{}@{}", quote_ident(user), quote_ident(USER_HOST))
}

/// The `mysql_native_password` hash of `password`, as MariaDB stores it:
/// `*` and the upper-case hex of SHA1(SHA1(password)).
pub fn native_password_hash(password: &str) -> String {
    use sha1::{Digest, Sha1};
    let inner = Sha1::digest(password.as_bytes());
    let outer = Sha1::digest(inner);
    let mut out = String::with_capacity(41);
    out.push('*');
    for b in outer {
        out.push_str(&format!("{b:02X}"));
    }
    out
}

/// The `IDENTIFIED BY …` clause that sets `password`. MariaDB writes a
/// statement to its general query log, slow log and binary log as sent,
/// password and all (MySQL rewrites it), so MariaDB is sent the
/// password's hash (`IDENTIFIED BY PASSWORD '*…'`, the same
/// `mysql_native_password` account) and never sees the password.
fn identified_by(password: &str, mariadb: bool) -> Zeroizing<String> {
    Zeroizing::new(if mariadb {
        format!(
            "IDENTIFIED BY PASSWORD {}",
            quote_literal(&native_password_hash(password))
        )
    } else {
        format!("IDENTIFIED BY {}", quote_literal(password))
    })
}

/// The `CREATE USER` statement of a leased account: its password
/// (`identified`), `REQUIRE SSL` when keymint's own connection to the
/// server is TLS (so the server refuses the user in clear text), and at
/// most `max_connections` sessions at once (so one workload cannot take
/// every connection the server allows). docs/design/0005-mysql-users.md.
fn create_user(user: &str, identified: &str, tls: bool, max_connections: u32) -> String {
    format!(
        "CREATE USER {} {identified}{} WITH MAX_USER_CONNECTIONS {max_connections}",
        account(user),
        if tls { " REQUIRE SSL" } else { "" },
    )
}

/// The user name for a lease: `km_` and the lease id's body.
pub fn user_for_lease(lease_id: &str) -> Option<String> {
    let body = lease_id.strip_prefix("lse_")?;
    keymint_core::id::is_valid("lse_", lease_id).then(|| format!("{USER_PREFIX}{body}"))
}

/// The lease a user name was made for.
pub fn lease_for_user(user: &str) -> Option<String> {
    let lease = format!("lse_{}", user.strip_prefix(USER_PREFIX)?);
    keymint_core::id::is_valid("lse_", &lease).then_some(lease)
}

/// A MySQL/MariaDB server keymint manages users on.
pub struct Database {
    pub name: String,
    host: String,
    port: u16,
    db_name: String,
    opts: std::sync::RwLock<Opts>,
    /// Made at first use (a pool needs the tokio runtime).
    pool: std::sync::RwLock<Option<Pool>>,
    ready: AtomicBool,
    /// The server is MariaDB (read at first use): it is sent password
    /// hashes, never passwords ([`identified_by`]).
    mariadb: AtomicBool,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The options hold the admin password.
        f.debug_struct("Database")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

fn pool_for(opts: Opts) -> Pool {
    let constraints = PoolConstraints::new(0, 16).unwrap_or_default();
    let opts = OptsBuilder::from_opts(opts)
        // Connect where the URL says, never switch to a local socket (which
        // would authenticate as another account).
        .prefer_socket(false)
        // Statements waiting on a lock end on the server within 10 s
        // (names MySQL and MariaDB share); the broker's deadline bounds the
        // whole call on keymint's side (docs/design/0020).
        .init(vec![
            "SET SESSION lock_wait_timeout = 10, innodb_lock_wait_timeout = 10",
        ])
        .pool_opts(PoolOpts::default().with_constraints(constraints));
    Pool::new(opts)
}

impl Database {
    /// Parses the admin connection, a `mysql://user:password@host:port/db`
    /// URL. The error never repeats the URL (it may hold a password).
    pub fn parse(name: &str, url: &str) -> Result<Self, String> {
        let opts = Opts::from_url(url).map_err(|_| {
            format!("database `{name}`: the connection string is not a valid mysql:// URL")
        })?;
        if opts.ssl_opts().is_some() {
            // The URL's TLS switches can turn verification off
            // (`verify_ca=false`): TLS is set with `tls` and `ca_file` only.
            return Err(format!(
                "database `{name}`: set TLS with `tls` and `ca_file`, not in the URL"
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            host: opts.ip_or_hostname().to_owned(),
            port: opts.tcp_port(),
            db_name: opts.db_name().unwrap_or_default().to_owned(),
            pool: std::sync::RwLock::new(None),
            opts: std::sync::RwLock::new(opts),
            ready: AtomicBool::new(false),
            mariadb: AtomicBool::new(false),
        })
    }

    /// Speaks TLS to the server (`Require`: the certificate verified
    /// against `ca_file`, or the Mozilla roots without one, and the host
    /// name checked; a server that does not offer TLS is refused) or plain
    /// text (`Disable`). A CA file that cannot be read is an error here.
    pub fn with_tls(self, tls: &DbTls) -> Result<Self, String> {
        let ssl = match tls {
            DbTls::Disable => None,
            DbTls::Require { ca_file } => {
                let mut ssl = mysql_async::SslOpts::default();
                if let Some(ca) = ca_file {
                    // Read once, now: a bad file fails the load, not the
                    // first issuance.
                    let pem = std::fs::read(ca)
                        .ok()
                        .filter(|b| b.windows(11).any(|w| w == b"-----BEGIN "))
                        .ok_or_else(|| {
                            format!(
                                "database `{}`: cannot read a PEM certificate from `ca_file` `{}`",
                                self.name,
                                ca.display()
                            )
                        })?;
                    ssl = ssl
                        .with_root_certs(vec![pem.into()])
                        .with_disable_built_in_roots(true);
                }
                Some(ssl)
            }
        };
        {
            let mut opts = self
                .opts
                .write()
                .map_err(|_| "the options lock is poisoned".to_owned())?;
            let new: Opts = OptsBuilder::from_opts(opts.clone()).ssl_opts(ssl).into();
            *opts = new;
        }
        Ok(self)
    }

    /// Whether admin connections are encrypted.
    pub fn uses_tls(&self) -> bool {
        self.opts.read().is_ok_and(|o| o.ssl_opts().is_some())
    }

    pub fn host_port(&self) -> (String, u16) {
        (self.host.clone(), self.port)
    }

    /// Whether the admin connection stays on this machine (a loopback
    /// address): the only place keymint's unencrypted admin connection
    /// may go.
    pub fn is_local(&self) -> bool {
        crate::is_loopback_host(&self.host)
    }

    /// The admin user name (not secret).
    pub fn admin_user(&self) -> Option<String> {
        self.opts
            .read()
            .ok()
            .and_then(|o| o.user().map(str::to_owned))
    }

    fn opts_with_password(&self, password: &str) -> Result<OptsBuilder, EngineError> {
        let opts = self
            .opts
            .read()
            .map_err(|_| EngineError::Internal("the options lock is poisoned".into()))?
            .clone();
        Ok(OptsBuilder::from_opts(opts)
            .prefer_socket(false)
            .pass(Some(password)))
    }

    /// From now on, connect with `password` (after a rotation, or with the
    /// sealed password keymint stored). Connections already open stay open
    /// until the pool retires them.
    pub fn set_password(&self, password: &str) {
        let Ok(mut opts) = self.opts.write() else {
            return;
        };
        let new: Opts = OptsBuilder::from_opts(opts.clone())
            .pass(Some(password))
            .into();
        *opts = new.clone();
        if let Ok(mut pool) = self.pool.write()
            && let Some(old) = pool.replace(pool_for(new))
        {
            tokio::spawn(async move {
                let _ = old.disconnect().await;
            });
        }
    }

    fn pool(&self) -> Result<Pool, EngineError> {
        let poisoned = || EngineError::Internal("the connection pool lock is poisoned".into());
        if let Some(p) = self.pool.read().map_err(|_| poisoned())?.as_ref() {
            return Ok(p.clone());
        }
        let opts = self.opts.read().map_err(|_| poisoned())?.clone();
        let mut pool = self.pool.write().map_err(|_| poisoned())?;
        Ok(pool.get_or_insert_with(|| pool_for(opts)).clone())
    }

    /// An admin connection from the pool.
    pub async fn admin(&self) -> Result<Conn, EngineError> {
        let pool = self.pool()?;
        let conn = tokio::time::timeout(std::time::Duration::from_secs(10), pool.get_conn())
            .await
            .map_err(|_| {
                EngineError::Unavailable(format!("database `{}`: connection timed out", self.name))
            })?
            .map_err(|e| db_error(&format!("database `{}`", self.name), &e, None))?;
        Ok(conn)
    }
}

/// The server's error code and message, never the statement (which may
/// hold a password). `redact` is removed from the message, in case the
/// server quoted part of a statement that held it.
fn db_error(what: &str, e: &mysql_async::Error, redact: Option<&str>) -> EngineError {
    match e {
        mysql_async::Error::Server(s) => {
            let mut msg = s.message.clone();
            if let Some(r) = redact.filter(|r| !r.is_empty()) {
                msg = msg.replace(r, "***");
            }
            EngineError::Unavailable(format!("{what}: {msg} ({})", s.code))
        }
        mysql_async::Error::Io(io) => match crate::tls_failure(io) {
            Some(t) => EngineError::Unavailable(format!("{what}: TLS handshake failed: {t}")),
            None => EngineError::Unavailable(format!("{what}: cannot reach the database")),
        },
        mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer) => {
            EngineError::Unavailable(format!(
                "{what}: TLS is required but the server does not offer it"
            ))
        }
        _ => EngineError::Unavailable(format!("{what}: the connection failed")),
    }
}

/// Whether the server is MariaDB (its version names it).
async fn server_is_mariadb(conn: &mut Conn) -> Result<bool, EngineError> {
    let version: Option<String> = conn
        .query_first("SELECT VERSION()")
        .await
        .map_err(|e| db_error("reading the server's version", &e, None))?;
    Ok(version.is_some_and(|v| v.contains("MariaDB")))
}

/// Deadlocks and lock wait timeouts: a retry can get past them.
fn retryable(e: &mysql_async::Error) -> bool {
    matches!(e, mysql_async::Error::Server(s) if s.code == 1213 || s.code == 1205)
}

const ATTEMPTS: u32 = 8;

async fn query_retrying(conn: &mut Conn, sql: &str) -> Result<(), mysql_async::Error> {
    let mut attempt = 0;
    loop {
        match conn.query_drop(sql).await {
            Ok(()) => return Ok(()),
            Err(e) => {
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

/// The bookkeeping table and the expiry event, created if missing.
fn setup_sql() -> Vec<String> {
    let schema = quote_ident(SCHEMA);
    vec![
        format!("CREATE DATABASE IF NOT EXISTS {schema}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {schema}.`users` (\
             `user` VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL, \
             `host` VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL, \
             `lease_id` VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL, \
             `task_id` VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL, \
             `installation` VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL, \
             `role` VARCHAR(64) CHARACTER SET utf8mb4 NOT NULL, \
             `workload` VARCHAR(256) CHARACTER SET utf8mb4 NOT NULL, \
             `created_at` TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3), \
             `expires_at_ms` BIGINT NOT NULL, \
             PRIMARY KEY (`user`, `host`), KEY `by_expiry` (`expires_at_ms`)\
             ) ENGINE=InnoDB COMMENT='keymint: the users it created, one row per lease'"
        ),
        // The safety net: drops users whose lease has ended even if keymint
        // is gone, and ends their sessions. Needs event_scheduler=ON. Made
        // if missing; [`MysqlEngine::ready`] brings an existing event's
        // body up to date.
        format!(
            "CREATE EVENT IF NOT EXISTS {schema}.`expire_users` \
             ON SCHEDULE EVERY {EXPIRY_EVENT_EVERY_SECS} SECOND ON COMPLETION PRESERVE \
             COMMENT 'keymint: drops users whose lease has ended' DO {}",
            expire_body(&schema)
        ),
    ]
}

/// The body of the expiry event. It runs as keymint's admin, and its
/// table may be written by a workload a role granted writes on every
/// database (`… ON *.* TO {{name}}`): it drops only accounts of keymint's
/// shape (`km_` and a lease id's body, at `%`), so a row a workload wrote
/// cannot make it drop any other account or end its sessions.
fn expire_body(schema: &str) -> String {
    let body = keymint_core::id::ID_BODY;
    format!(
        "BEGIN \
               DECLARE done INT DEFAULT 0; \
               DECLARE u VARCHAR(32) CHARACTER SET ascii; \
               DECLARE h VARCHAR(255) CHARACTER SET ascii; \
               DECLARE c CURSOR FOR SELECT `user`, `host` FROM {schema}.`users` \
                 WHERE `expires_at_ms` <= UNIX_TIMESTAMP(NOW(3)) * 1000 \
                 AND `host` = '{USER_HOST}' AND `user` REGEXP '^{USER_PREFIX}[0-9A-Za-z]{{{body}}}$'; \
               DECLARE CONTINUE HANDLER FOR NOT FOUND SET done = 1; \
               OPEN c; \
               expire: LOOP \
                 FETCH c INTO u, h; \
                 IF done THEN LEAVE expire; END IF; \
                 SET @keymint_drop = CONCAT('DROP USER IF EXISTS ', QUOTE(u), '@', QUOTE(h)); \
                 PREPARE s FROM @keymint_drop; EXECUTE s; DEALLOCATE PREPARE s; \
                 BEGIN \
                   DECLARE gone INT DEFAULT 0; \
                   DECLARE cid BIGINT; \
                   DECLARE k CURSOR FOR SELECT `ID` FROM information_schema.`PROCESSLIST` WHERE `USER` = u; \
                   DECLARE CONTINUE HANDLER FOR NOT FOUND SET gone = 1; \
                   DECLARE CONTINUE HANDLER FOR SQLEXCEPTION BEGIN END; \
                   OPEN k; \
                   sessions: LOOP \
                     FETCH k INTO cid; \
                     IF gone THEN LEAVE sessions; END IF; \
                     KILL CONNECTION cid; \
                   END LOOP; \
                   CLOSE k; \
                 END; \
                 DELETE FROM {schema}.`users` WHERE `user` = u AND `host` = h; \
               END LOOP; \
               CLOSE c; \
             END"
    )
}

/// Expands a creation statement: `{{name}}` becomes the quoted account,
/// `{{password}}` the quoted password literal.
pub fn expand(statement: &str, user: &str, password: &str) -> Zeroizing<String> {
    Zeroizing::new(
        statement
            .replace("{{name}}", &account(user))
            .replace("{{password}}", &quote_literal(password)),
    )
}

#[derive(Debug, Default)]
pub struct MysqlEngine {
    databases: HashMap<String, std::sync::Arc<Database>>,
    installation: String,
}

impl MysqlEngine {
    pub fn new(databases: Vec<std::sync::Arc<Database>>, installation: &str) -> Self {
        Self {
            databases: databases.into_iter().map(|d| (d.name.clone(), d)).collect(),
            installation: installation.to_owned(),
        }
    }

    pub fn database(&self, name: &str) -> Result<&std::sync::Arc<Database>, EngineError> {
        self.databases
            .get(name)
            .ok_or_else(|| EngineError::Internal(format!("database `{name}` is not configured")))
    }

    /// An admin connection on a server whose bookkeeping table and expiry
    /// event exist.
    async fn ready(&self, db: &Database) -> Result<Conn, EngineError> {
        let mut conn = db.admin().await?;
        if !db.ready.load(Ordering::Acquire) {
            for sql in setup_sql() {
                query_retrying(&mut conn, &sql)
                    .await
                    .map_err(|e| db_error("creating keymint's bookkeeping table", &e, None))?;
            }
            // An event an older keymint made keeps its body through `CREATE
            // … IF NOT EXISTS`, and one whose definer was dropped fails at
            // every run: either is given this body, which also makes this
            // admin its definer (so only then).
            let body = expire_body(&quote_ident(SCHEMA));
            let current: Option<(String, i64)> = conn
                .exec_first(
                    "SELECT e.EVENT_DEFINITION, (SELECT COUNT(*) FROM mysql.user u \
                     WHERE CONCAT(u.User, '@', u.Host) = e.DEFINER) \
                     FROM information_schema.EVENTS e \
                     WHERE e.EVENT_SCHEMA = ? AND e.EVENT_NAME = 'expire_users'",
                    (SCHEMA,),
                )
                .await
                .map_err(|e| db_error("reading keymint's expiry event", &e, None))?;
            if !current.is_some_and(|(b, definers)| b == body && definers > 0) {
                let alter = format!(
                    "ALTER EVENT {}.`expire_users` ON SCHEDULE EVERY {EXPIRY_EVENT_EVERY_SECS} SECOND \
                     ON COMPLETION PRESERVE ENABLE DO {body}",
                    quote_ident(SCHEMA)
                );
                query_retrying(&mut conn, &alter)
                    .await
                    .map_err(|e| db_error("updating keymint's expiry event", &e, None))?;
            }
            db.mariadb
                .store(server_is_mariadb(&mut conn).await?, Ordering::Release);
            let scheduler: Option<String> = conn
                .query_first("SELECT @@GLOBAL.event_scheduler")
                .await
                .map_err(|e| db_error("reading event_scheduler", &e, None))?;
            if !scheduler.is_some_and(|s| s.eq_ignore_ascii_case("ON")) {
                tracing::warn!(
                    database = %db.name,
                    "event_scheduler is not ON: users are dropped at their expiry only while keymint runs (set event_scheduler=ON for the server-side safety net)"
                );
            }
            db.ready.store(true, Ordering::Release);
        }
        Ok(conn)
    }

    /// The users this installation created on `database`: `(user, lease)`.
    /// Only accounts that exist, whose name has keymint's shape, and whose
    /// bookkeeping row names the matching lease and this installation.
    pub async fn list_users(&self, database: &str) -> Result<Vec<(String, String)>, EngineError> {
        let db = self.database(database)?;
        let mut conn = self.ready(db).await?;
        let rows: Vec<(String, String)> = conn
            .exec(
                "SELECT k.`user`, k.`lease_id` FROM `keymint`.`users` k \
                 JOIN mysql.user u ON u.`User` = CONVERT(k.`user` USING utf8mb4) \
                 AND u.`Host` = CONVERT(k.`host` USING utf8mb4) \
                 WHERE k.`installation` = ? AND k.`host` = ?",
                (&self.installation, USER_HOST),
            )
            .await
            .map_err(|e| db_error("listing users", &e, None))?;
        Ok(rows
            .into_iter()
            .filter(|(user, lease)| lease_for_user(user).as_deref() == Some(lease.as_str()))
            .collect())
    }

    /// Drops a user keymint created, ends its sessions, and forgets it.
    pub async fn drop_user(&self, database: &str, username: &str) -> Result<(), EngineError> {
        if lease_for_user(username).is_none() {
            return Err(EngineError::Internal(format!(
                "`{username}` is not a keymint user"
            )));
        }
        let db = self.database(database)?;
        let mut conn = self.ready(db).await?;
        // No new logins, then end the open sessions, then forget the user.
        query_retrying(
            &mut conn,
            &format!("DROP USER IF EXISTS {}", account(username)),
        )
        .await
        .map_err(|e| db_error("dropping the user", &e, None))?;
        let sessions: Vec<u64> = conn
            .exec(
                "SELECT `ID` FROM information_schema.`PROCESSLIST` WHERE `USER` = ?",
                (username,),
            )
            .await
            .map_err(|e| db_error("listing the user's sessions", &e, None))?;
        for id in sessions {
            match conn.query_drop(format!("KILL CONNECTION {id}")).await {
                // 1094: the session ended meanwhile.
                Err(mysql_async::Error::Server(s)) if s.code == 1094 => {}
                Err(e) => return Err(db_error("ending the user's sessions", &e, None)),
                Ok(()) => {}
            }
        }
        drop_definer_objects(&mut conn, username).await?;
        conn.exec_drop(
            "DELETE FROM `keymint`.`users` WHERE `user` = ? AND `host` = ?",
            (username, USER_HOST),
        )
        .await
        .map_err(|e| db_error("forgetting the user", &e, None))
    }
}

/// What each kind of stored object is called in `DROP … IF EXISTS`, and
/// where `information_schema` lists the objects of a definer.
const DEFINER_OBJECTS: [(&str, &str); 4] = [
    (
        "VIEW",
        "SELECT `TABLE_SCHEMA`, `TABLE_NAME`, 'VIEW' FROM information_schema.`VIEWS` WHERE `DEFINER` = ?",
    ),
    (
        "TRIGGER",
        "SELECT `TRIGGER_SCHEMA`, `TRIGGER_NAME`, 'TRIGGER' FROM information_schema.`TRIGGERS` WHERE `DEFINER` = ?",
    ),
    (
        "EVENT",
        "SELECT `EVENT_SCHEMA`, `EVENT_NAME`, 'EVENT' FROM information_schema.`EVENTS` WHERE `DEFINER` = ?",
    ),
    (
        "ROUTINE",
        "SELECT `ROUTINE_SCHEMA`, `ROUTINE_NAME`, `ROUTINE_TYPE` FROM information_schema.`ROUTINES` WHERE `DEFINER` = ?",
    ),
];

/// Drops the views, triggers, events and stored routines whose definer is
/// the (dropped) account, as PostgreSQL's `DROP OWNED` does for a role
/// (docs/design/0005-mysql-users.md): dropping an account leaves them, and
/// then a trigger fails every write to its table, and a view, event or
/// routine every use, with "the user specified as a definer does not
/// exist" (1449), long after the lease. Run after the account is dropped
/// and its sessions ended, so that it cannot make more meanwhile; the
/// names come from the server and are quoted.
async fn drop_definer_objects(conn: &mut Conn, username: &str) -> Result<(), EngineError> {
    let definer = format!("{username}@{USER_HOST}");
    for (what, list) in DEFINER_OBJECTS {
        let found: Vec<(String, String, String)> =
            conn.exec(list, (&definer,)).await.map_err(|e| {
                db_error(
                    &format!("listing the user's {}s", what.to_lowercase()),
                    &e,
                    None,
                )
            })?;
        for (schema, name, kind) in found {
            // `ROUTINE_TYPE` is `PROCEDURE` or `FUNCTION` (or `PACKAGE` …
            // in Oracle mode, which keymint's users do not make).
            let kind = match kind.as_str() {
                "VIEW" | "TRIGGER" | "EVENT" | "PROCEDURE" | "FUNCTION" => kind,
                _ => continue,
            };
            let sql = format!(
                "DROP {kind} IF EXISTS {}.{}",
                quote_ident(&schema),
                quote_ident(&name)
            );
            query_retrying(conn, &sql).await.map_err(|e| {
                db_error(
                    &format!("dropping the user's {}", kind.to_lowercase()),
                    &e,
                    None,
                )
            })?;
        }
    }
    Ok(())
}

#[async_trait]
impl Engine for MysqlEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Mysql
    }

    fn revocability(&self) -> Revocability {
        Revocability::Revocable
    }

    fn is_local(&self) -> bool {
        false
    }

    fn prepare(&self, ctx: &IssueContext<'_>) -> Result<Prepared, EngineError> {
        let settings = ctx.database_role(EngineKind::Mysql)?;
        let db = self.database(&settings.database)?;
        let username = user_for_lease(ctx.lease_id)
            .ok_or_else(|| EngineError::Internal("the lease id is malformed".into()))?;
        let password = random_base62(32)
            .map_err(|_| EngineError::Internal("the random number generator failed".into()))?;
        let (host, port) = db.host_port();
        Ok(Prepared {
            fingerprint_material: Zeroizing::new(password.as_bytes().to_vec()),
            credential: Credential::Database {
                engine: EngineKind::Mysql,
                host,
                port,
                database: db.db_name.clone(),
                username: username.clone(),
                password: SecretString::new(password.to_string()),
                tls: db.uses_tls(),
            },
            engine_data: serde_json::json!({"database": settings.database, "username": username}),
        })
    }

    async fn apply(&self, ctx: &IssueContext<'_>, prepared: &Prepared) -> Result<(), EngineError> {
        let settings = ctx.database_role(EngineKind::Mysql)?;
        let db = self.database(&settings.database)?;
        let Credential::Database {
            username, password, ..
        } = &prepared.credential
        else {
            return Err(EngineError::Internal(
                "prepared credential is not a database user".into(),
            ));
        };
        let password = password.expose();
        let mut conn = self.ready(db).await?;
        // The tag first: an account keymint creates is never without one.
        conn.exec_drop(
            "INSERT INTO `keymint`.`users` (`user`, `host`, `lease_id`, `task_id`, `installation`, \
             `role`, `workload`, `expires_at_ms`) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                username,
                USER_HOST,
                ctx.lease_id,
                &ctx.task.id,
                &self.installation,
                &ctx.role.name,
                &ctx.task.workload,
                ctx.expires_at.millis(),
            ),
        )
        .await
        .map_err(|e| db_error("recording the user", &e, None))?;
        let limit = settings.connection_limit().map_err(EngineError::Internal)?;
        let create = Zeroizing::new(create_user(
            username,
            &identified_by(password, db.mariadb.load(Ordering::Acquire)),
            db.uses_tls(),
            limit,
        ));
        query_retrying(&mut conn, &create)
            .await
            .map_err(|e| db_error("creating the user", &e, Some(password)))?;
        for stmt in &settings.creation_statements {
            let sql = expand(stmt, username, password);
            query_retrying(&mut conn, &sql)
                .await
                .map_err(|e| db_error("granting the user its rights", &e, Some(password)))?;
        }
        Ok(())
    }

    async fn renew(&self, lease: &Lease, expires_at: Timestamp) -> Result<(), EngineError> {
        let data = crate::DatabaseUser::of(lease)?;
        let db = self.database(&data.database)?;
        let mut conn = self.ready(db).await?;
        conn.exec_drop(
            "UPDATE `keymint`.`users` SET `expires_at_ms` = ? WHERE `user` = ? AND `host` = ?",
            (expires_at.millis(), &data.username, USER_HOST),
        )
        .await
        .map_err(|e| db_error("extending the user", &e, None))
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

    /// Whether keymint's admin may see other accounts' sessions (`PROCESS`):
    /// without it `information_schema.PROCESSLIST` shows only the admin's
    /// own, so a revocation would find none of the user's open sessions to
    /// end and report the user revoked while they go on. `SHOW ENGINE
    /// INNODB STATUS` needs `PROCESS` (held directly or through a role) and
    /// changes nothing. Ending another account's session without
    /// `CONNECTION ADMIN`/`SUPER` is an error, so revocation fails visibly
    /// (and is retried) there.
    async fn check_admin(&self, database: &str) -> Result<(), EngineError> {
        let db = self.database(database)?;
        let mut conn = db.admin().await?;
        match conn.query_drop("SHOW ENGINE INNODB STATUS").await {
            Ok(()) => Ok(()),
            // ER_SPECIFIC_ACCESS_DENIED_ERROR
            Err(mysql_async::Error::Server(s)) if s.code == 1227 => {
                Err(EngineError::Rejected(format!(
                    "database `{database}`: keymint's admin lacks the PROCESS privilege, so it \
                     cannot find a revoked user's open sessions to end them; grant it PROCESS \
                     and CONNECTION ADMIN (or SUPER) (see docs/design/0005-mysql-users.md)"
                )))
            }
            Err(e) => Err(db_error("reading the admin's privileges", &e, None)),
        }
    }

    async fn rotate_admin_password(
        &self,
        database: &str,
        password: &str,
    ) -> Result<(), EngineError> {
        let db = self.database(database)?;
        let mut conn = db.admin().await?;
        // The account this connection authenticated as. MariaDB 10.11
        // accepts `ALTER USER CURRENT_USER() …` without changing anything,
        // so the account is named explicitly.
        let me: Option<String> = conn
            .query_first("SELECT CURRENT_USER()")
            .await
            .map_err(|e| db_error("reading the admin account", &e, None))?;
        let Some((user, host)) = me.as_deref().and_then(|m| m.rsplit_once('@')) else {
            return Err(EngineError::Internal(
                "the server did not name the admin account".into(),
            ));
        };
        let mariadb = server_is_mariadb(&mut conn).await?;
        let sql = Zeroizing::new(format!(
            "ALTER USER {}@{} {}",
            quote_literal(user),
            quote_literal(host),
            identified_by(password, mariadb).as_str()
        ));
        query_retrying(&mut conn, &sql)
            .await
            .map_err(|e| db_error("setting the admin password", &e, Some(password)))?;
        drop(conn);
        db.set_password(password);
        Ok(())
    }

    fn use_admin_password(&self, database: &str, password: &str) -> Result<(), EngineError> {
        self.database(database)?.set_password(password);
        Ok(())
    }

    async fn admin_password_works(
        &self,
        database: &str,
        password: &str,
    ) -> Result<bool, EngineError> {
        let db = self.database(database)?;
        let opts = db.opts_with_password(password)?;
        let connecting = Conn::new(opts);
        match tokio::time::timeout(std::time::Duration::from_secs(10), connecting).await {
            Ok(Ok(conn)) => {
                let _ = conn.disconnect().await;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn managed(&self) -> Result<Vec<Managed>, EngineError> {
        let mut out = Vec::new();
        let mut names: Vec<&String> = self.databases.keys().collect();
        names.sort();
        for db in names {
            for (username, lease_id) in self.list_users(db).await? {
                out.push(Managed {
                    lease_id,
                    engine_data: serde_json::json!({"database": db, "username": username}),
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_neutralises_injection() {
        assert_eq!(
            quote_ident("a`; DROP USER root; --"),
            "`a``; DROP USER root; --`"
        );
        assert_eq!(
            quote_literal("it's\\'; DROP TABLE x; --\0"),
            "'it''s\\\\''; DROP TABLE x; --\\0'"
        );
        assert_eq!(account("km_0Ab"), "`km_0Ab`@`%`");
    }

    #[test]
    fn native_password_hashes_match_the_servers() {
        // MariaDB 10.11's `SELECT PASSWORD(…)` for the same strings.
        assert_eq!(
            native_password_hash("password"),
            "*2470C0C06DEE42FD1618BB99005ADCA2EC9D1E19"
        );
        assert_eq!(
            native_password_hash("kmEXAMPLEpassword0123456789ABCDE"),
            "*2086204968FB1F4E79CF6029C29552059CB19A35"
        );
        assert!(!identified_by("pw", true).contains("'pw'"));
        assert_eq!(identified_by("pw", false).as_str(), "IDENTIFIED BY 'pw'");
    }

    #[test]
    fn new_accounts_are_limited_and_require_tls_where_keymint_uses_it() {
        assert_eq!(
            create_user("km_x", "IDENTIFIED BY PASSWORD '*AB'", false, 10),
            "CREATE USER `km_x`@`%` IDENTIFIED BY PASSWORD '*AB' WITH MAX_USER_CONNECTIONS 10"
        );
        assert_eq!(
            create_user("km_x", "IDENTIFIED BY PASSWORD '*AB'", true, 3),
            "CREATE USER `km_x`@`%` IDENTIFIED BY PASSWORD '*AB' REQUIRE SSL WITH MAX_USER_CONNECTIONS 3"
        );
    }

    #[test]
    fn user_names_fit_mysql_and_map_back_to_their_lease() {
        let lease = keymint_core::id::lease_id(Timestamp(1_800_000_000_000));
        let user = user_for_lease(&lease).unwrap();
        assert!(user.len() <= 32, "{user}");
        assert_eq!(
            user.len(),
            USER_PREFIX.len() + keymint_core::id::ID_BODY,
            "{user}"
        );
        assert_eq!(lease_for_user(&user).as_deref(), Some(lease.as_str()));
        assert_eq!(lease_for_user("km_admin"), None);
        assert_eq!(lease_for_user("root"), None);
        assert_eq!(user_for_lease("lse_'; DROP"), None);
    }

    #[test]
    fn creation_statements_get_quoted_values() {
        let sql = expand(
            "GRANT SELECT ON db.t TO {{name}}; SET PASSWORD FOR {{name}} = PASSWORD({{password}})",
            "km_x",
            "p'w",
        );
        assert_eq!(
            sql.as_str(),
            "GRANT SELECT ON db.t TO `km_x`@`%`; SET PASSWORD FOR `km_x`@`%` = PASSWORD('p''w')"
        );
    }

    #[test]
    fn connection_urls_are_parsed_and_never_printed() {
        let db = Database::parse("main", "mysql://admin:hunter2@127.0.0.1:3307/app").unwrap();
        assert_eq!(db.host_port(), ("127.0.0.1".to_owned(), 3307));
        assert_eq!(db.db_name, "app");
        assert_eq!(db.admin_user().as_deref(), Some("admin"));
        assert!(!format!("{db:?}").contains("hunter2"));
        let e = Database::parse("main", "postgres://admin:hunter2@h/x").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
