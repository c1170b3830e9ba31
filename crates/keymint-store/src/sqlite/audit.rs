//! The audit chain as the store keeps it: reading events up to the durable
//! head (see [`super::syncer::Durability`]) and the sinks' cursors. Events
//! are appended only by [`super::writer::Writer::audit`], inside the job
//! whose change they record.

use keymint_core::audit::AuditEvent;
use rusqlite::{Connection, OptionalExtension, params};

use super::row::limit;
use super::writer::Writer;
use crate::{Result, StoreError};

/// Events after `after`, never past `durable`.
pub(super) fn after(c: &Connection, after: u64, n: u32, durable: u64) -> Result<Vec<AuditEvent>> {
    let mut stmt = c.prepare_cached(
        "SELECT seq, event FROM audit WHERE seq > ?1 AND seq <= ?3 ORDER BY seq LIMIT ?2",
    )?;
    let mut rows = stmt.query(params![crate::seq_cursor(after), limit(n), durable as i64])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let seq = r.get::<_, i64>(0)? as u64;
        // Text that is not UTF-8, a blob, or JSON that is not an event:
        // all one finding, named by the row's seq.
        let event = r
            .get_ref(1)?
            .as_str()
            .ok()
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or(StoreError::AuditUnreadable(seq))?;
        out.push(event);
    }
    Ok(out)
}

/// The stored JSON lines after `after`, never past `durable`. A stored
/// value that is not UTF-8 text (damaged, or written by hand) is read
/// lossily rather than failing the read: the verifier then names it at its
/// place, and a sink copies it on (where the copy's own check finds it)
/// instead of stopping at it for good.
pub(super) fn lines_after(
    c: &Connection,
    after: u64,
    n: u32,
    durable: u64,
) -> Result<Vec<(u64, String)>> {
    use rusqlite::types::ValueRef;
    let mut stmt = c.prepare_cached(
        "SELECT seq, event FROM audit WHERE seq > ?1 AND seq <= ?3 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(
        params![crate::seq_cursor(after), limit(n), durable as i64],
        |r| {
            let line = match r.get_ref(1)? {
                ValueRef::Text(b) | ValueRef::Blob(b) => String::from_utf8_lossy(b).into_owned(),
                ValueRef::Integer(i) => i.to_string(),
                ValueRef::Real(f) => f.to_string(),
                ValueRef::Null => String::new(),
            };
            Ok((r.get::<_, i64>(0)? as u64, line))
        },
    )?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

pub(super) fn sink_cursor(c: &Connection, sink: &str) -> Result<u64> {
    let v: Option<i64> = c
        .prepare_cached("SELECT seq FROM sink_cursors WHERE sink = ?1")?
        .query_row([sink], |r| r.get(0))
        .optional()?;
    Ok(v.unwrap_or(0) as u64)
}

pub(super) fn set_sink_cursor(w: &mut Writer<'_>, sink: &str, seq: u64) -> Result<()> {
    w.conn
        .prepare_cached(
            "INSERT INTO sink_cursors (sink, seq) VALUES (?1, ?2) \
             ON CONFLICT(sink) DO UPDATE SET seq = excluded.seq",
        )?
        .execute(params![sink, seq as i64])?;
    Ok(())
}
