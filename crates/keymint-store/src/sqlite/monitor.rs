//! Misuse monitoring (docs/design/0033): hourly use added up per scope and
//! subject, the source addresses of each workload, and suspensions (a JSON
//! document each, at most one active per scope and subject).

use keymint_core::Timestamp;
use keymint_core::audit::AuditDraft;
use keymint_core::monitor::{Scope, SourceSeen, Suspension, UsageHour};
use rusqlite::{Connection, OptionalExtension, params};

use super::writer::Writer;
use crate::{Result, StoreError};

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(super) fn add_hours(w: &mut Writer<'_>, rows: &[UsageHour]) -> Result<()> {
    let mut stmt = w.conn.prepare_cached(
        "INSERT INTO usage_hours (scope, subject, hour_ms, requests, tokens, spend_nusd)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (scope, subject, hour_ms) DO UPDATE SET
           requests = requests + excluded.requests,
           tokens = tokens + excluded.tokens,
           spend_nusd = spend_nusd + excluded.spend_nusd",
    )?;
    for r in rows {
        stmt.execute(params![
            r.scope.as_str(),
            r.subject,
            r.hour.0,
            i(r.requests),
            i(r.tokens),
            i(r.spend_nusd)
        ])?;
    }
    Ok(())
}

pub(super) fn hours(
    c: &Connection,
    scope: Scope,
    subject: &str,
    from: Timestamp,
    to: Timestamp,
) -> Result<Vec<UsageHour>> {
    let mut stmt = c.prepare_cached(
        "SELECT hour_ms, requests, tokens, spend_nusd FROM usage_hours
         WHERE scope = ?1 AND subject = ?2 AND hour_ms >= ?3 AND hour_ms < ?4
         ORDER BY hour_ms LIMIT 10000",
    )?;
    let rows = stmt.query_map(params![scope.as_str(), subject, from.0, to.0], |r| {
        Ok(UsageHour {
            hour: Timestamp(r.get(0)?),
            scope,
            subject: subject.to_owned(),
            requests: u(r.get(1)?),
            tokens: u(r.get(2)?),
            spend_nusd: u(r.get(3)?),
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

pub(super) fn note_sources(w: &mut Writer<'_>, rows: &[SourceSeen]) -> Result<()> {
    let mut stmt = w.conn.prepare_cached(
        "INSERT INTO monitor_sources (workload, address, country, first_ms, last_ms, requests)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (workload, address) DO UPDATE SET
           country = COALESCE(excluded.country, country),
           last_ms = MAX(last_ms, excluded.last_ms),
           requests = requests + excluded.requests",
    )?;
    for r in rows {
        stmt.execute(params![
            r.workload,
            r.address,
            r.country,
            r.first_seen.0,
            r.last_seen.0,
            i(r.requests)
        ])?;
    }
    Ok(())
}

pub(super) fn countries(c: &Connection, workload: &str) -> Result<Vec<String>> {
    let mut stmt = c.prepare_cached(
        "SELECT DISTINCT country FROM monitor_sources
         WHERE workload = ?1 AND country IS NOT NULL ORDER BY country LIMIT 1000",
    )?;
    let rows = stmt.query_map([workload], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
}

fn doc(s: &Suspension) -> Result<String> {
    serde_json::to_string(s).map_err(|x| StoreError::Backend(x.to_string()))
}

fn from_doc(r: &rusqlite::Row<'_>) -> rusqlite::Result<Suspension> {
    let d: String = r.get(0)?;
    serde_json::from_str(&d).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

pub(super) fn suspend(w: &mut Writer<'_>, s: &Suspension, audit: AuditDraft) -> Result<bool> {
    let n = w
        .conn
        .prepare_cached(
            "INSERT INTO suspensions (id, scope, subject, active, doc) VALUES (?1, ?2, ?3, 1, ?4)
             ON CONFLICT DO NOTHING",
        )?
        .execute(params![s.id, s.scope.as_str(), s.subject, doc(s)?])?;
    if n == 1 {
        w.audit(audit)?;
    }
    Ok(n == 1)
}

pub(super) fn lift(
    w: &mut Writer<'_>,
    id: &str,
    by: &str,
    now: Timestamp,
    audit: AuditDraft,
) -> Result<Option<Suspension>> {
    let found = w
        .conn
        .prepare_cached("SELECT doc FROM suspensions WHERE id = ?1 AND active = 1")?
        .query_row([id], from_doc)
        .optional()?;
    let Some(mut s) = found else {
        return Ok(None);
    };
    s.lifted_at = Some(now);
    s.lifted_by = Some(by.to_owned());
    w.conn
        .prepare_cached("UPDATE suspensions SET active = 0, doc = ?2 WHERE id = ?1")?
        .execute(params![id, doc(&s)?])?;
    w.audit(audit)?;
    Ok(Some(s))
}

pub(super) fn active(c: &Connection) -> Result<Vec<Suspension>> {
    let mut stmt = c.prepare_cached("SELECT doc FROM suspensions WHERE active = 1")?;
    let rows = stmt.query_map([], from_doc)?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

pub(super) fn list(c: &Connection, active_only: bool, n: u32) -> Result<Vec<Suspension>> {
    let mut stmt = c.prepare_cached(
        "SELECT doc FROM suspensions WHERE (?1 = 0 OR active = 1) ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![i64::from(active_only), n.min(1000)], from_doc)?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

pub(super) fn prune(w: &mut Writer<'_>, before: Timestamp) -> Result<u64> {
    let hours = w
        .conn
        .execute("DELETE FROM usage_hours WHERE hour_ms < ?1", [before.0])?;
    let sources = w
        .conn
        .execute("DELETE FROM monitor_sources WHERE last_ms < ?1", [before.0])?;
    Ok((hours + sources) as u64)
}
