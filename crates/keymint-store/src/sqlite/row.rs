//! Small helpers shared by the query modules: JSON list columns, a column
//! that cannot be read, and the bounds of a query.

pub(super) fn bad_column(what: &str) -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(0, what.to_owned(), rusqlite::types::Type::Text)
}

pub(super) fn json_list(s: &str) -> rusqlite::Result<Vec<String>> {
    serde_json::from_str(s).map_err(|_| bad_column("json list"))
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
