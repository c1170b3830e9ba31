//! Throw-away schemas and databases on a shared PostgreSQL, for test suites
//! (the store's conformance run, the replica tests of the binary); keymint
//! itself never calls this.
//!
//! Each name carries its creation time (`kms_<unix seconds>_<random>`).
//! The guard ([`TestSchema`], [`TestDatabase`]) drops what it created when
//! it is dropped, also while a failed test unwinds. What a killed test run
//! left behind is dropped by [`sweep_leftovers`], which the first
//! [`TestSchema::create`] / [`TestDatabase::create`] of a process runs: it
//! takes only names older than [`LEFTOVER_AGE`], so the runs of other
//! engineers on the same server are left alone. Names from before the time
//! was part of them (`kms_<hex>`) are judged by the age of their files.

use std::ops::Deref;
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio_postgres::{Client, NoTls};

/// Schemas of the store's PostgreSQL tests start with this (and `_`).
pub const SCHEMA_PREFIX: &str = "kms";
/// Databases of the replica tests start with this (and `_`).
pub const DATABASE_PREFIX: &str = "kmr";
/// A leftover older than this belongs to no running test.
pub const LEFTOVER_AGE: Duration = Duration::from_secs(3600);

/// How long a guard's drop waits for a lock before giving up (a store
/// still holding a transaction open must not hang the test run).
const DROP_LOCK_TIMEOUT: &str = "10s";

static SWEPT: OnceCell<()> = OnceCell::const_new();

#[expect(
    clippy::disallowed_methods,
    reason = "test helper: the names of throw-away schemas carry the wall-clock time"
)]
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn fresh_name(prefix: &str) -> String {
    let random = keymint_core::token::random_base62(10)
        .map(|s| s.to_ascii_lowercase())
        .unwrap_or_default();
    format!("{prefix}_{}_{random}", unix_now())
}

/// The creation time a name carries, if it has the current form.
fn created_secs(name: &str, prefix: &str) -> Option<u64> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('_')?;
    let (secs, random) = rest.split_once('_')?;
    if random.is_empty() || !random.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    secs.parse().ok()
}

/// Whether a leftover may be dropped: by the time in its name, or for an
/// older name without one, by `touched` (the newest modification of its
/// files, seconds since the epoch, as PostgreSQL reports it).
fn is_stale(name: &str, prefix: &str, touched: Option<f64>, now: u64) -> bool {
    let age = LEFTOVER_AGE.as_secs();
    match created_secs(name, prefix) {
        Some(created) => created.saturating_add(age) < now,
        None => touched.is_some_and(|t| t > 0.0 && (t as u64).saturating_add(age) < now),
    }
}

fn valid_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Drops the leftovers of earlier runs (schemas `kms_…`, databases
/// `kmr_…`) older than [`LEFTOVER_AGE`]. A database still in use is left
/// alone (`DROP DATABASE` without `FORCE` refuses it). Returns how many
/// were dropped.
pub async fn sweep_leftovers(admin: &Client) -> Result<u64, tokio_postgres::Error> {
    let now = unix_now();
    let mut dropped = 0;
    let schemas = admin
        .query(
            "SELECT n.nspname::text, \
               (SELECT extract(epoch FROM max((pg_stat_file(pg_relation_filepath(c.oid), true)).modification))::float8 \
                  FROM pg_class c WHERE c.relnamespace = n.oid AND c.relkind IN ('r', 'i')) \
             FROM pg_namespace n WHERE n.nspname LIKE $1",
            &[&format!("{SCHEMA_PREFIX}\\_%")],
        )
        .await?;
    for row in schemas {
        let (name, touched): (String, Option<f64>) = (row.try_get(0)?, row.try_get(1)?);
        if valid_identifier(&name) && is_stale(&name, SCHEMA_PREFIX, touched, now) {
            admin
                .batch_execute(&format!(
                    "SET lock_timeout = '{DROP_LOCK_TIMEOUT}'; DROP SCHEMA IF EXISTS {name} CASCADE; RESET lock_timeout"
                ))
                .await?;
            dropped += 1;
        }
    }
    let databases = admin
        .query(
            "SELECT datname::text, \
               extract(epoch FROM (pg_stat_file('base/' || oid, true)).modification)::float8 \
             FROM pg_database WHERE datname LIKE $1",
            &[&format!("{DATABASE_PREFIX}\\_%")],
        )
        .await?;
    for row in databases {
        let (name, touched): (String, Option<f64>) = (row.try_get(0)?, row.try_get(1)?);
        if valid_identifier(&name)
            && is_stale(&name, DATABASE_PREFIX, touched, now)
            && admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
                .await
                .is_ok()
        {
            dropped += 1;
        }
    }
    Ok(dropped)
}

async fn connect(admin: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(admin, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Runs `sql` on a connection of its own, on a thread of its own, and
/// waits for it: usable from `Drop`, inside or outside a runtime.
fn run_blocking(admin: String, sql: String) {
    let handle = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            match tokio::time::timeout(Duration::from_secs(30), async {
                connect(&admin).await?.batch_execute(&sql).await
            })
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("cannot drop a test schema or database: {e}"),
                Err(_) => eprintln!("dropping a test schema or database timed out"),
            }
        });
    });
    let _ = handle.join();
}

async fn admin_with_sweep(admin: &str) -> Result<Client, tokio_postgres::Error> {
    let client = connect(admin).await?;
    SWEPT
        .get_or_try_init(|| async {
            let n = sweep_leftovers(&client).await?;
            if n > 0 {
                eprintln!("dropped {n} test schemas or databases left by earlier runs");
            }
            Ok::<_, tokio_postgres::Error>(())
        })
        .await?;
    Ok(client)
}

/// A schema of its own on the test server, dropped (`CASCADE`) with the
/// guard. Derefs to its name.
#[derive(Debug)]
pub struct TestSchema {
    name: String,
    admin: String,
}

impl TestSchema {
    /// Creates `kms_<time>_<random>` through the connection string `admin`
    /// (the first call of the process also sweeps old leftovers).
    pub async fn create(admin: &str) -> Result<Self, tokio_postgres::Error> {
        let client = admin_with_sweep(admin).await?;
        let name = fresh_name(SCHEMA_PREFIX);
        client
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await?;
        Ok(Self {
            name,
            admin: admin.to_owned(),
        })
    }
}

impl Deref for TestSchema {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for TestSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        run_blocking(
            self.admin.clone(),
            format!(
                "SET lock_timeout = '{DROP_LOCK_TIMEOUT}'; DROP SCHEMA IF EXISTS {} CASCADE",
                self.name
            ),
        );
    }
}

/// A database of its own on the test server, dropped (`WITH (FORCE)`:
/// the servers of a failed test may still hold connections) with the
/// guard. Derefs to its name.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    admin: String,
}

impl TestDatabase {
    /// Creates `kmr_<time>_<random>` through the connection string `admin`
    /// (the first call of the process also sweeps old leftovers).
    pub async fn create(admin: &str) -> Result<Self, tokio_postgres::Error> {
        let client = admin_with_sweep(admin).await?;
        let name = fresh_name(DATABASE_PREFIX);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        Ok(Self {
            name,
            admin: admin.to_owned(),
        })
    }
}

impl Deref for TestDatabase {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for TestDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        run_blocking(
            self.admin.clone(),
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_old_leftovers_are_stale() {
        let now = 2_000_000_000;
        let hour = LEFTOVER_AGE.as_secs();
        let name = |t: u64| format!("kms_{t}_ab12cd34ef");
        // The time in the name decides, whatever the files say.
        assert!(is_stale(&name(now - hour - 1), "kms", None, now));
        assert!(!is_stale(&name(now - 60), "kms", Some(0.0), now));
        assert!(!is_stale(
            &name(now),
            "kms",
            Some((now - 10 * hour) as f64),
            now
        ));
        // An older name without a time: the age of its files.
        assert!(is_stale(
            "kms_0123456789abcdef",
            "kms",
            Some((now - 2 * hour) as f64),
            now
        ));
        assert!(!is_stale(
            "kms_0123456789abcdef",
            "kms",
            Some((now - 60) as f64),
            now
        ));
        // Nothing known about its age: kept.
        assert!(!is_stale("kms_0123456789abcdef", "kms", None, now));
        // Another prefix's name has no time for this one.
        assert_eq!(created_secs(&name(now), "kmr"), None);
        assert_eq!(created_secs(&name(now), "kms"), Some(now));
    }

    #[test]
    fn names_are_valid_unquoted_identifiers() {
        let n = fresh_name(SCHEMA_PREFIX);
        assert!(valid_identifier(&n), "{n}");
        assert!(created_secs(&n, SCHEMA_PREFIX).is_some(), "{n}");
        assert_ne!(n, fresh_name(SCHEMA_PREFIX));
        assert!(!valid_identifier("kms_x; DROP TABLE y"));
        assert!(!valid_identifier("KMS_X"));
    }
}
