//! The credential inventory (docs/design/0027): each entry a JSON document,
//! indexed by its fingerprint, written only if its version is the one the
//! caller read.

use keymint_core::audit::AuditDraft;
use keymint_core::inventory::InventoryItem;
use rusqlite::{Connection, OptionalExtension, params};

use super::writer::Writer;
use crate::{Result, StoreError};

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<InventoryItem> {
    let doc: String = r.get(0)?;
    serde_json::from_str(&doc).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

pub(super) fn put(
    w: &mut Writer<'_>,
    item: &InventoryItem,
    expected: u64,
    audit: AuditDraft,
) -> Result<bool> {
    let doc = serde_json::to_string(item).map_err(|x| StoreError::Backend(x.to_string()))?;
    let version = i64::try_from(item.version).unwrap_or(i64::MAX);
    let changed = if expected == 0 {
        w.conn
            .prepare_cached(
                "INSERT INTO inventory (id, fingerprint, version, doc) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT DO NOTHING",
            )?
            .execute(params![item.id, item.fingerprint, version, doc])?
    } else {
        w.conn
            .prepare_cached(
                "UPDATE inventory SET fingerprint = ?2, version = ?3, doc = ?4
                 WHERE id = ?1 AND version = ?5",
            )?
            .execute(params![
                item.id,
                item.fingerprint,
                version,
                doc,
                i64::try_from(expected).unwrap_or(i64::MAX)
            ])?
    };
    if changed == 1 {
        w.audit(audit)?;
    }
    Ok(changed == 1)
}

pub(super) fn get(c: &Connection, id: &str) -> Result<Option<InventoryItem>> {
    Ok(c.prepare_cached("SELECT doc FROM inventory WHERE id = ?1")?
        .query_row([id], from_row)
        .optional()?)
}

pub(super) fn by_fingerprint(c: &Connection, fp: &str) -> Result<Option<InventoryItem>> {
    Ok(
        c.prepare_cached("SELECT doc FROM inventory WHERE fingerprint = ?1")?
            .query_row([fp], from_row)
            .optional()?,
    )
}

/// Up to `n` entries older than `before`, newest first. An entry this
/// version cannot read (a newer version's, or damaged) is logged by id and
/// passed over, and the page is still filled from the entries after it:
/// one such entry failing every page stopped the leak response duty and
/// the listing (until the sweep of 2026-12-06).
pub(super) fn list(c: &Connection, before: Option<&str>, n: u32) -> Result<Vec<InventoryItem>> {
    let n = n.min(1000) as usize;
    let mut stmt = c.prepare_cached(
        "SELECT id, doc FROM inventory WHERE ?1 IS NULL OR id < ?1 ORDER BY id DESC",
    )?;
    let mut rows = stmt.query(params![before])?;
    let mut out = Vec::new();
    while out.len() < n {
        let Some(r) = rows.next()? else { break };
        let id: String = r.get(0)?;
        let doc: String = r.get(1)?;
        match serde_json::from_str(&doc) {
            Ok(i) => out.push(i),
            Err(_) => tracing::error!(id, "stored inventory entry unreadable; passed over"),
        }
    }
    Ok(out)
}
