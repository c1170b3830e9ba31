//! Small helpers shared by the query modules: prepared (and cached)
//! statements, JSON list columns, a column that cannot be read, and the
//! bounds of a query.

use deadpool_postgres::ClientWrapper;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::pg_err;
use crate::{Result, StoreError};

pub(super) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

pub(super) async fn query(c: &ClientWrapper, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
    let stmt = c
        .prepare_cached(sql)
        .await
        .map_err(|e| pg_err("prepare", &e))?;
    c.query(&stmt, params)
        .await
        .map_err(|e| pg_err("query", &e))
}

pub(super) async fn query_opt(
    c: &ClientWrapper,
    sql: &str,
    params: Params<'_>,
) -> Result<Option<Row>> {
    let stmt = c
        .prepare_cached(sql)
        .await
        .map_err(|e| pg_err("prepare", &e))?;
    c.query_opt(&stmt, params)
        .await
        .map_err(|e| pg_err("query", &e))
}

pub(super) async fn execute(c: &ClientWrapper, sql: &str, params: Params<'_>) -> Result<u64> {
    let stmt = c
        .prepare_cached(sql)
        .await
        .map_err(|e| pg_err("prepare", &e))?;
    c.execute(&stmt, params)
        .await
        .map_err(|e| pg_err("statement", &e))
}

pub(super) fn bad(e: tokio_postgres::Error) -> StoreError {
    pg_err("stored row unreadable", &e)
}

pub(super) fn json_list(s: &str) -> Result<Vec<String>> {
    serde_json::from_str(s).map_err(|_| StoreError::Backend("stored list unreadable".into()))
}

pub(super) fn to_json_list(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

pub(super) fn secs_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn limit(n: u32) -> i64 {
    i64::from(n.clamp(1, 10_000))
}
