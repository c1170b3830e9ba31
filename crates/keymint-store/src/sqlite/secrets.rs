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

pub(super) fn get(c: &Connection, name: &str) -> Result<Option<Vec<u8>>> {
    Ok(
        c.prepare_cached("SELECT sealed FROM secrets WHERE name = ?1")?
            .query_row([name], |r| r.get(0))
            .optional()?,
    )
}
