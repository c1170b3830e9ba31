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
//! Identifiers and literals are always quoted by [`quote_ident`] and
//! [`quote_literal`]; the only values interpolated are the generated user
//! name, the generated password and the lease's own ids. The creation
//! statements come from the operator's configuration and name the user as
//! `{{name}}`.

use std::collections::HashMap;

use async_trait::async_trait;
use keymint_core::model::{Lease, Revocability, Role};
use keymint_core::token::random_base62;
use keymint_proto::{Credential, SecretString};
use serde::Deserialize;
use tokio_postgres::{Client, NoTls};
use zeroize::Zeroizing;

use crate::{Engine, EngineError, IssueContext, Prepared};

pub const USER_PREFIX: &str = "keymint_";

/// Quotes an SQL identifier: `"` around, inner `"` doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal (with `standard_conforming_strings`, the
/// default since PostgreSQL 9.1): `'` around, inner `'` doubled. Strings with
/// a NUL byte cannot be literals and are refused by the caller's checks.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A database keymint manages users in.
#[derive(Clone)]
pub struct Database {
    pub name: String,
    /// The admin connection (libpq key=value or URL form).
    pub config: tokio_postgres::Config,
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
        Ok(Self {
            name: name.to_owned(),
            config,
        })
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

/// A role's settings for this engine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgRoleSettings {
    pub database: String,
    pub creation_statements: Vec<String>,
}

impl PgRoleSettings {
    pub fn of(role: &Role) -> Result<Self, EngineError> {
        serde_json::from_value(role.settings.clone()).map_err(|_| {
            EngineError::Internal(format!(
                "role `{}` has no valid postgres settings",
                role.name
            ))
        })
    }
}

#[derive(Debug, Default)]
pub struct PostgresEngine {
    databases: HashMap<String, Database>,
}

fn db_error(what: &str, e: &tokio_postgres::Error) -> EngineError {
    // The server's message and SQLSTATE, never the statement (which may
    // hold a password).
    let detail = match e.as_db_error() {
        Some(db) => format!("{what}: {} ({})", db.message(), db.code().code()),
        None if e.is_closed() => format!("{what}: connection closed"),
        None => format!("{what}: cannot reach the database"),
    };
    EngineError::Unavailable(detail)
}

impl PostgresEngine {
    pub fn new(databases: Vec<Database>) -> Self {
        Self {
            databases: databases.into_iter().map(|d| (d.name.clone(), d)).collect(),
        }
    }

    fn database(&self, name: &str) -> Result<&Database, EngineError> {
        self.databases
            .get(name)
            .ok_or_else(|| EngineError::Internal(format!("database `{name}` is not configured")))
    }

    async fn connect(db: &Database) -> Result<Client, EngineError> {
        let connecting = db.config.connect(NoTls);
        let (client, connection) =
            tokio::time::timeout(std::time::Duration::from_secs(10), connecting)
                .await
                .map_err(|_| {
                    EngineError::Unavailable(format!(
                        "database `{}`: connection timed out",
                        db.name
                    ))
                })?
                .map_err(|e| db_error(&format!("database `{}`", db.name), &e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres admin connection ended");
            }
        });
        Ok(client)
    }

    /// The user names keymint created in `database` (for reconciliation).
    pub async fn list_users(&self, database: &str) -> Result<Vec<String>, EngineError> {
        let db = self.database(database)?;
        let client = Self::connect(db).await?;
        let rows = client
            .query(
                "SELECT rolname FROM pg_roles WHERE starts_with(rolname, $1)",
                &[&USER_PREFIX],
            )
            .await
            .map_err(|e| db_error("listing users", &e))?;
        Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
    }

    /// Drops a user keymint created, whether or not a lease names it.
    pub async fn drop_user(&self, database: &str, username: &str) -> Result<(), EngineError> {
        if !username.starts_with(USER_PREFIX) {
            return Err(EngineError::Internal(format!(
                "`{username}` is not a keymint user"
            )));
        }
        let db = self.database(database)?;
        let client = Self::connect(db).await?;
        let exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&username])
            .await
            .map_err(|e| db_error("looking up the user", &e))?
            .is_some();
        if !exists {
            return Ok(());
        }
        let user = quote_ident(username);
        // No new sessions, then end the open ones, then drop.
        for sql in [format!("ALTER ROLE {user} NOLOGIN")] {
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| db_error("disabling the user", &e))?;
        }
        client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                &[&username],
            )
            .await
            .map_err(|e| db_error("terminating sessions", &e))?;
        client
            .batch_execute(&format!(
                "BEGIN; REASSIGN OWNED BY {user} TO CURRENT_USER; DROP OWNED BY {user}; \
                 DROP ROLE IF EXISTS {user}; COMMIT;"
            ))
            .await
            .map_err(|e| db_error("dropping the user", &e))?;
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
struct EngineData {
    database: String,
    username: String,
}

#[async_trait]
impl Engine for PostgresEngine {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn revocability(&self) -> Revocability {
        Revocability::Revocable
    }

    fn is_local(&self) -> bool {
        false
    }

    fn prepare(&self, ctx: &IssueContext<'_>) -> Result<Prepared, EngineError> {
        let settings = PgRoleSettings::of(ctx.role)?;
        let db = self.database(&settings.database)?;
        let username = format!("{USER_PREFIX}{}", ctx.lease_id);
        let password = random_base62(32)
            .map_err(|_| EngineError::Internal("the random number generator failed".into()))?;
        let (host, port) = db.host_port();
        Ok(Prepared {
            fingerprint_material: Zeroizing::new(password.as_bytes().to_vec()),
            credential: Credential::Database {
                engine: "postgres".into(),
                host,
                port,
                database: db.config.get_dbname().unwrap_or("postgres").to_owned(),
                username: username.clone(),
                password: SecretString::new(password.to_string()),
            },
            engine_data: serde_json::json!({"database": settings.database, "username": username}),
        })
    }

    async fn apply(&self, ctx: &IssueContext<'_>, prepared: &Prepared) -> Result<(), EngineError> {
        let settings = PgRoleSettings::of(ctx.role)?;
        let db = self.database(&settings.database)?;
        let Credential::Database {
            username, password, ..
        } = &prepared.credential
        else {
            return Err(EngineError::Internal(
                "prepared credential is not a database user".into(),
            ));
        };
        let user = quote_ident(username);
        let mut sql = Zeroizing::new(format!(
            "BEGIN; CREATE ROLE {user} WITH LOGIN PASSWORD {} VALID UNTIL {}; COMMENT ON ROLE {user} IS {};",
            quote_literal(password.expose()),
            quote_literal(&ctx.expires_at.rfc3339()),
            quote_literal(&format!(
                "keymint lease {} task {}",
                ctx.lease_id, ctx.task.id
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
        let client = Self::connect(db).await?;
        if let Err(e) = client.batch_execute(&sql).await {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(db_error("creating the user", &e));
        }
        Ok(())
    }

    async fn revoke(&self, lease: &Lease) -> Result<(), EngineError> {
        let data: EngineData = serde_json::from_value(lease.engine_data.clone()).map_err(|_| {
            EngineError::Internal(format!("lease `{}` has no database user", lease.id))
        })?;
        self.drop_user(&data.database, &data.username).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_neutralises_injection() {
        assert_eq!(
            quote_ident(r#"a"; DROP ROLE postgres; --"#),
            r#""a""; DROP ROLE postgres; --""#
        );
        assert_eq!(
            quote_literal("it's'; DROP TABLE x; --"),
            "'it''s''; DROP TABLE x; --'"
        );
        assert_eq!(quote_ident("keymint_lse_0Ab"), "\"keymint_lse_0Ab\"");
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
