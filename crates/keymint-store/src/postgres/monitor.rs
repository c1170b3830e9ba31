//! Misuse monitoring (docs/design/0033): hourly use added up per scope and
//! subject, the source addresses of each workload, and suspensions (a JSON
//! document each, at most one active per scope and subject).

use deadpool_postgres::ClientWrapper;
use keymint_core::Timestamp;
use keymint_core::audit::AuditDraft;
use keymint_core::monitor::{Scope, SourceSeen, Suspension, UsageHour};
use tokio_postgres::Row;

use super::row::{bad, execute, limit, query, query_opt};
use super::writer::PgWriter;
use crate::{Result, StoreError};

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(super) async fn add_hours(w: &mut PgWriter, rows: Vec<UsageHour>) -> Result<()> {
    for r in rows {
        execute(
            w.c(),
            "INSERT INTO usage_hours (scope, subject, hour_ms, requests, tokens, spend_nusd) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (scope, subject, hour_ms) DO UPDATE SET \
               requests = usage_hours.requests + excluded.requests, \
               tokens = usage_hours.tokens + excluded.tokens, \
               spend_nusd = usage_hours.spend_nusd + excluded.spend_nusd",
            &[
                &r.scope.as_str(),
                &r.subject,
                &r.hour.0,
                &i(r.requests),
                &i(r.tokens),
                &i(r.spend_nusd),
            ],
        )
        .await?;
    }
    Ok(())
}

pub(super) async fn hours(
    c: &ClientWrapper,
    scope: Scope,
    subject: &str,
    from: Timestamp,
    to: Timestamp,
) -> Result<Vec<UsageHour>> {
    query(
        c,
        "SELECT hour_ms, requests, tokens, spend_nusd FROM usage_hours \
         WHERE scope = $1 AND subject = $2 AND hour_ms >= $3 AND hour_ms < $4 \
         ORDER BY hour_ms LIMIT 10000",
        &[&scope.as_str(), &subject, &from.0, &to.0],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(UsageHour {
            hour: Timestamp(r.try_get(0).map_err(bad)?),
            scope,
            subject: subject.to_owned(),
            requests: u(r.try_get(1).map_err(bad)?),
            tokens: u(r.try_get(2).map_err(bad)?),
            spend_nusd: u(r.try_get(3).map_err(bad)?),
        })
    })
    .collect()
}

pub(super) async fn note_sources(w: &mut PgWriter, rows: Vec<SourceSeen>) -> Result<()> {
    for r in rows {
        execute(
            w.c(),
            "INSERT INTO monitor_sources (workload, address, country, first_ms, last_ms, requests) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (workload, address) DO UPDATE SET \
               country = COALESCE(excluded.country, monitor_sources.country), \
               last_ms = GREATEST(monitor_sources.last_ms, excluded.last_ms), \
               requests = monitor_sources.requests + excluded.requests",
            &[
                &r.workload,
                &r.address,
                &r.country,
                &r.first_seen.0,
                &r.last_seen.0,
                &i(r.requests),
            ],
        )
        .await?;
    }
    Ok(())
}

pub(super) async fn countries(c: &ClientWrapper, workload: &str) -> Result<Vec<String>> {
    query(
        c,
        "SELECT DISTINCT country FROM monitor_sources \
         WHERE workload = $1 AND country IS NOT NULL ORDER BY country LIMIT 1000",
        &[&workload],
    )
    .await?
    .iter()
    .map(|r| r.try_get(0).map_err(bad))
    .collect()
}

fn doc(s: &Suspension) -> Result<String> {
    serde_json::to_string(s).map_err(|x| StoreError::Backend(x.to_string()))
}

fn from_row(r: &Row) -> Result<Suspension> {
    let d: String = r.try_get(0).map_err(bad)?;
    serde_json::from_str(&d).map_err(|_| StoreError::Backend("stored suspension unreadable".into()))
}

pub(super) async fn suspend(w: &mut PgWriter, s: Suspension, audit: AuditDraft) -> Result<bool> {
    let n = execute(
        w.c(),
        "INSERT INTO suspensions (id, scope, subject, active, doc) VALUES ($1, $2, $3, TRUE, $4) \
         ON CONFLICT DO NOTHING",
        &[&s.id, &s.scope.as_str(), &s.subject, &doc(&s)?],
    )
    .await?;
    if n == 1 {
        w.audit(audit).await?;
    }
    Ok(n == 1)
}

pub(super) async fn lift(
    w: &mut PgWriter,
    id: String,
    by: String,
    now: Timestamp,
    audit: AuditDraft,
) -> Result<Option<Suspension>> {
    let Some(row) = query_opt(
        w.c(),
        "SELECT doc FROM suspensions WHERE id = $1 AND active FOR UPDATE",
        &[&id],
    )
    .await?
    else {
        return Ok(None);
    };
    let mut s = from_row(&row)?;
    s.lifted_at = Some(now);
    s.lifted_by = Some(by);
    execute(
        w.c(),
        "UPDATE suspensions SET active = FALSE, doc = $2 WHERE id = $1",
        &[&id, &doc(&s)?],
    )
    .await?;
    w.audit(audit).await?;
    Ok(Some(s))
}

pub(super) async fn active(c: &ClientWrapper) -> Result<Vec<Suspension>> {
    query(c, "SELECT doc FROM suspensions WHERE active", &[])
        .await?
        .iter()
        .map(from_row)
        .collect()
}

pub(super) async fn list(c: &ClientWrapper, active_only: bool, n: u32) -> Result<Vec<Suspension>> {
    query(
        c,
        "SELECT doc FROM suspensions WHERE (NOT $1 OR active) ORDER BY id DESC LIMIT $2",
        &[&active_only, &limit(n.min(1000))],
    )
    .await?
    .iter()
    .map(from_row)
    .collect()
}

pub(super) async fn prune(w: &mut PgWriter, before: Timestamp) -> Result<u64> {
    let hours = execute(
        w.c(),
        "DELETE FROM usage_hours WHERE hour_ms < $1",
        &[&before.0],
    )
    .await?;
    let sources = execute(
        w.c(),
        "DELETE FROM monitor_sources WHERE last_ms < $1",
        &[&before.0],
    )
    .await?;
    Ok(hours + sources)
}
