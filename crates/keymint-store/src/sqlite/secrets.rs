//! Sealed secrets by name (upstream keys, CA seeds, admin passwords): the
//! store keeps only what the keyring sealed.

use keymint_core::Timestamp;
use rusqlite::{Connection, OptionalExtension, params};

use super::writer::Writer;
use crate::Result;

pub(super) fn put(w: &mut Writer<'_>, name: &str, sealed: Vec<u8>, now: Timestamp) -> Result<()> {
    w.conn
        .prepare_cached(
            "INSERT INTO secrets (name, sealed, updated_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT(name) DO UPDATE SET sealed = excluded.sealed, updated_ms = excluded.updated_ms",
        )?
        .execute(params![name, sealed, now.millis()])?;
    Ok(())
}

/// `Store::swap_secret`: the read and the write are one write job, so no
/// other write comes between them.
pub(super) fn swap(
    w: &mut Writer<'_>,
    name: &str,
    expected: Option<Vec<u8>>,
    sealed: Vec<u8>,
    now: Timestamp,
) -> Result<bool> {
    if get(w.conn, name)? != expected {
        return Ok(false);
    }
    put(w, name, sealed, now)?;
    Ok(true)
}

pub(super) fn get(c: &Connection, name: &str) -> Result<Option<Vec<u8>>> {
    Ok(
        c.prepare_cached("SELECT sealed FROM secrets WHERE name = ?1")?
            .query_row([name], |r| r.get(0))
            .optional()?,
    )
}

/// `Store::claim_once`: inserts `once/KEY`, or takes it over if its claim
/// ended; expired claims are swept a few at a time.
pub(super) fn claim_once(
    w: &mut Writer<'_>,
    key: &str,
    until: Timestamp,
    now: Timestamp,
) -> Result<bool> {
    let name = format!("once/{key}");
    let n = w
        .conn
        .prepare_cached(
            "INSERT INTO secrets (name, sealed, updated_ms) VALUES (?1, x'', ?2) \
             ON CONFLICT(name) DO UPDATE SET updated_ms = excluded.updated_ms \
             WHERE secrets.updated_ms <= ?3",
        )?
        .execute(params![name, until.millis(), now.millis()])?;
    w.conn
        .prepare_cached(
            "DELETE FROM secrets WHERE name IN (SELECT name FROM secrets \
             WHERE name >= 'once/' AND name < 'once0' AND updated_ms <= ?1 LIMIT 16)",
        )?
        .execute(params![now.millis()])?;
    Ok(n == 1)
}
