//! The credential inventory (docs/design/0027): each entry a JSON document,
//! indexed by its fingerprint, written only if its version is the one the
//! caller read.

use deadpool_postgres::ClientWrapper;
use keymint_core::audit::AuditDraft;
use keymint_core::inventory::InventoryItem;
use tokio_postgres::Row;

use super::row::{bad, execute, limit, query, query_opt};
use super::writer::PgWriter;
use crate::{Result, StoreError};

fn from_row(r: &Row) -> Result<InventoryItem> {
    let doc: String = r.try_get(0).map_err(bad)?;
    serde_json::from_str(&doc)
        .map_err(|_| StoreError::Backend("stored inventory entry unreadable".into()))
}

pub(super) async fn put(
    w: &mut PgWriter,
    item: InventoryItem,
    expected: u64,
    audit: AuditDraft,
) -> Result<bool> {
    let doc = serde_json::to_string(&item).map_err(|x| StoreError::Backend(x.to_string()))?;
    let version = i64::try_from(item.version).unwrap_or(i64::MAX);
    let changed = if expected == 0 {
        execute(
            w.c(),
            "INSERT INTO inventory (id, fingerprint, version, doc) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
            &[&item.id, &item.fingerprint, &version, &doc],
        )
        .await?
    } else {
        let expected = i64::try_from(expected).unwrap_or(i64::MAX);
        execute(
            w.c(),
            "UPDATE inventory SET fingerprint = $2, version = $3, doc = $4 \
             WHERE id = $1 AND version = $5",
            &[&item.id, &item.fingerprint, &version, &doc, &expected],
        )
        .await?
    };
    if changed == 1 {
        w.audit(audit).await?;
    }
    Ok(changed == 1)
}

pub(super) async fn get(c: &ClientWrapper, id: &str) -> Result<Option<InventoryItem>> {
    query_opt(c, "SELECT doc FROM inventory WHERE id = $1", &[&id])
        .await?
        .map(|r| from_row(&r))
        .transpose()
}

pub(super) async fn by_fingerprint(c: &ClientWrapper, fp: &str) -> Result<Option<InventoryItem>> {
    query_opt(
        c,
        "SELECT doc FROM inventory WHERE fingerprint = $1",
        &[&fp],
    )
    .await?
    .map(|r| from_row(&r))
    .transpose()
}

/// Up to `n` entries older than `before`, newest first. An entry this
/// version cannot read (a newer version's, or damaged) is logged by id and
/// passed over, and the page is still filled from the entries after it
/// (as the SQLite store does).
pub(super) async fn list(
    c: &ClientWrapper,
    before: Option<&str>,
    n: u32,
) -> Result<Vec<InventoryItem>> {
    let n = n.min(1000);
    let mut cursor = before.map(str::to_owned);
    let mut out = Vec::new();
    loop {
        let want = n - u32::try_from(out.len()).unwrap_or(n);
        let rows = query(
            c,
            "SELECT id, doc FROM inventory WHERE $1::text IS NULL OR id < $1 ORDER BY id DESC LIMIT $2",
            &[&cursor, &limit(want)],
        )
        .await?;
        let full = rows.len() as u64 == u64::from(want);
        for r in &rows {
            let id: String = r.try_get(0).map_err(bad)?;
            let doc: String = r.try_get(1).map_err(bad)?;
            match serde_json::from_str(&doc) {
                Ok(i) => out.push(i),
                Err(_) => tracing::error!(id, "stored inventory entry unreadable; passed over"),
            }
            cursor = Some(id);
        }
        if !full || out.len() as u64 >= u64::from(n) {
            return Ok(out);
        }
    }
}
