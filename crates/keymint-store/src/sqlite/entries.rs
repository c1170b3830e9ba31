//! Registration entries: which processes on which node are which workload,
//! each a JSON document indexed by node.

use keymint_core::audit::AuditDraft;
use keymint_core::model::RegistrationEntry;
use rusqlite::{Connection, OptionalExtension, params};

use super::writer::Writer;
use crate::{Result, StoreError};

fn entry_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RegistrationEntry> {
    let doc: String = r.get(0)?;
    serde_json::from_str(&doc).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

pub(super) fn create(w: &mut Writer<'_>, e: &RegistrationEntry, audit: AuditDraft) -> Result<()> {
    let doc = serde_json::to_string(e).map_err(|x| StoreError::Backend(x.to_string()))?;
    w.conn
        .prepare_cached("INSERT INTO entries (id, node, doc) VALUES (?1, ?2, ?3)")?
        .execute(params![e.id, e.node, doc])?;
    w.audit(audit)?;
    Ok(())
}

pub(super) fn get(c: &Connection, id: &str) -> Result<Option<RegistrationEntry>> {
    Ok(c.prepare_cached("SELECT doc FROM entries WHERE id = ?1")?
        .query_row([id], entry_from_row)
        .optional()?)
}

pub(super) fn list(c: &Connection, node: Option<&str>) -> Result<Vec<RegistrationEntry>> {
    let mut stmt =
        c.prepare_cached("SELECT doc FROM entries WHERE ?1 IS NULL OR node = ?1 ORDER BY id")?;
    let rows = stmt.query_map([node], entry_from_row)?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

pub(super) fn delete(
    w: &mut Writer<'_>,
    id: &str,
    audit: AuditDraft,
) -> Result<Option<RegistrationEntry>> {
    let found = w
        .conn
        .prepare_cached("SELECT doc FROM entries WHERE id = ?1")?
        .query_row([id], entry_from_row)
        .optional()?;
    if found.is_some() {
        w.conn
            .prepare_cached("DELETE FROM entries WHERE id = ?1")?
            .execute([id])?;
        w.audit(audit)?;
    }
    Ok(found)
}
