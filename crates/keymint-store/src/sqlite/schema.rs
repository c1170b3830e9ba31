//! The schema: migrations applied in order at open (`user_version` counts
//! the ones done), and the connection settings of the writer.

use rusqlite::Connection;

use crate::{Result, StoreError};

const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    parent_id TEXT,
    workload TEXT NOT NULL,
    role TEXT NOT NULL,
    intent TEXT,
    purpose TEXT,
    environment TEXT,
    scopes TEXT NOT NULL,
    status TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    idle_timeout_s INTEGER,
    last_seen_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    end_reason TEXT,
    delegation TEXT NOT NULL DEFAULT '[]'
) STRICT;
CREATE INDEX tasks_deadline ON tasks(deadline_ms) WHERE status = 'active';
CREATE INDEX tasks_parent ON tasks(parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX tasks_workload ON tasks(workload);
CREATE TABLE leases (
    id TEXT PRIMARY KEY,
    task_id TEXT NOT NULL,
    workload TEXT NOT NULL,
    role TEXT NOT NULL,
    engine TEXT NOT NULL,
    scopes TEXT NOT NULL,
    state TEXT NOT NULL,
    revocability TEXT NOT NULL,
    fingerprint TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    end_reason TEXT,
    revoke_attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER,
    last_error TEXT,
    engine_data TEXT
) STRICT;
-- Identifiers sort by creation time, so the primary keys grow at their right
-- edge. The state indexes are partial: only live leases pay for them.
CREATE INDEX leases_active_expiry ON leases(expires_ms) WHERE state = 'active';
CREATE INDEX leases_revoking_attempt ON leases(next_attempt_ms) WHERE state = 'revoking';
CREATE INDEX leases_pending_created ON leases(created_ms) WHERE state = 'pending';
CREATE INDEX leases_task ON leases(task_id);
CREATE INDEX leases_workload ON leases(workload, state);
CREATE INDEX leases_role ON leases(role, state);
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    event TEXT NOT NULL
) STRICT;
CREATE TABLE sink_cursors (
    sink TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
) STRICT;
CREATE TABLE secrets (
    name TEXT PRIMARY KEY,
    sealed BLOB NOT NULL,
    updated_ms INTEGER NOT NULL
) STRICT;
",
    r"
CREATE TABLE approvals (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    requester_key TEXT NOT NULL,
    announce_ms INTEGER,
    announce_attempts INTEGER NOT NULL DEFAULT 0,
    doc TEXT NOT NULL
) STRICT;
CREATE INDEX approvals_open ON approvals(expires_ms) WHERE status IN ('pending', 'approved');
CREATE INDEX approvals_announce ON approvals(announce_ms) WHERE announce_ms IS NOT NULL;
",
    r"
CREATE TABLE entries (
    id TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    doc TEXT NOT NULL
) STRICT;
CREATE INDEX entries_node ON entries(node);
",
    r"
CREATE INDEX tasks_ended ON tasks(ended_ms) WHERE status != 'active';
",
    r"
-- The egress proxy's budgets: one row per task that reserved, counting the
-- task and its whole sub-tree.
CREATE TABLE budgets (
    task_id TEXT PRIMARY KEY,
    used_requests INTEGER NOT NULL DEFAULT 0,
    used_input INTEGER NOT NULL DEFAULT 0,
    used_output INTEGER NOT NULL DEFAULT 0,
    used_spend INTEGER NOT NULL DEFAULT 0,
    res_requests INTEGER NOT NULL DEFAULT 0,
    res_input INTEGER NOT NULL DEFAULT 0,
    res_output INTEGER NOT NULL DEFAULT 0,
    res_spend INTEGER NOT NULL DEFAULT 0
) STRICT;
-- One row per proxied request: open while it is in flight, settled with
-- its use, deleted once summarised into the audit trail.
CREATE TABLE reservations (
    id TEXT PRIMARY KEY,
    task_id TEXT NOT NULL,
    chain TEXT NOT NULL,
    lease_id TEXT NOT NULL,
    workload TEXT NOT NULL,
    role TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    upstream TEXT NOT NULL,
    requests INTEGER NOT NULL,
    input INTEGER NOT NULL,
    output INTEGER NOT NULL,
    spend INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    settled_ms INTEGER,
    used_requests INTEGER,
    used_input INTEGER,
    used_output INTEGER,
    used_spend INTEGER,
    unmetered INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX reservations_open ON reservations(created_ms) WHERE settled_ms IS NULL;
CREATE INDEX reservations_settled ON reservations(lease_id, created_ms) WHERE settled_ms IS NOT NULL;
",
    r"
-- The credential inventory (docs/design/0027): never a secret.
CREATE TABLE inventory (
    id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL UNIQUE,
    version INTEGER NOT NULL,
    doc TEXT NOT NULL
) STRICT;
",
    r"
-- Misuse monitoring (docs/design/0033): hourly use, callers' addresses,
-- suspensions. Never a secret.
CREATE TABLE usage_hours (
    scope TEXT NOT NULL,
    subject TEXT NOT NULL,
    hour_ms INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    spend_nusd INTEGER NOT NULL,
    PRIMARY KEY (scope, subject, hour_ms)
) STRICT, WITHOUT ROWID;
CREATE TABLE monitor_sources (
    workload TEXT NOT NULL,
    address TEXT NOT NULL,
    country TEXT,
    first_ms INTEGER NOT NULL,
    last_ms INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    PRIMARY KEY (workload, address)
) STRICT, WITHOUT ROWID;
CREATE TABLE suspensions (
    id TEXT PRIMARY KEY,
    scope TEXT NOT NULL,
    subject TEXT NOT NULL,
    active INTEGER NOT NULL,
    doc TEXT NOT NULL
) STRICT;
CREATE UNIQUE INDEX suspensions_active ON suspensions(scope, subject) WHERE active = 1;
",
    r"
-- Rate limits shared by every process (docs/design/0040): one token bucket
-- per task and limit, its level in thousandths of a unit as of at_ms.
CREATE TABLE rate_buckets (
    key TEXT PRIMARY KEY,
    level_milli INTEGER NOT NULL,
    at_ms INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
CREATE INDEX rate_buckets_at ON rate_buckets(at_ms);
",
];

pub(super) fn configure(conn: &Connection) -> Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // WAL: readers never block the writer. synchronous=NORMAL: a commit
    // does not wait for the disk; the syncer thread fdatasyncs the WAL before
    // any caller is answered (see the module documentation). SQLite itself
    // syncs the WAL before a checkpoint and the database after it.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    // 8 MiB of page cache for the writer (allocated only as pages are
    // used). Larger keeps more index pages in memory, but a commit after a
    // b-tree split walks the whole cache (SQLite re-keys a page through
    // the lock page's number while it orders a split's pages, and the
    // truncate at commit then visits every bucket): with 64 MiB that walk
    // cost more than the reads it saved, on a fresh store and on one of a
    // million leases, and lengthened the tail (docs/design/0036, "Ninth
    // pass").
    conn.pragma_update(None, "cache_size", -8_192)?;
    conn.set_prepared_statement_cache_capacity(64);
    // Statement journals (most write jobs run in a savepoint) in memory:
    // SQLite's default spills one past 64 KiB to a new file in /var/tmp,
    // created, written and deleted inside the writer's transaction.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // No checkpoint inside a commit: the checkpointer thread copies the
    // WAL back from its own connection (checkpointer.rs).
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // No `journal_size_limit`: with one, the first commit after the WAL
    // starts over truncates the file on the writer thread, which under
    // sustained load cut hundreds of MB at a time inside a commit (wrk's
    // p99 108-354 ms against 27-49 ms without). The checkpointer shrinks
    // a grown WAL once writes are slow instead (checkpointer.rs).
    Ok(())
}

pub(super) fn migrate(conn: &mut Connection) -> Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::Backend(format!(
            "database schema version {version} is newer than this keymint understands ({known})"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}
