//! The schema: migrations applied in order at open, counted in
//! `keymint_schema`. Several replicas may start at once: whoever holds the
//! session advisory lock of this schema migrates, the others wait for it and
//! then find nothing left to do.

use keymint_core::audit::GENESIS;
use tokio_postgres::Client;

use super::pg_err;
use crate::{Result, StoreError};

/// Identifiers compare bytewise (`COLLATE "C"`): they start with their
/// creation time in base62, so "newest first" is "greatest first" only
/// without a language's collation.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tasks (
    id TEXT COLLATE "C" PRIMARY KEY,
    parent_id TEXT COLLATE "C",
    workload TEXT NOT NULL,
    role TEXT NOT NULL,
    intent TEXT,
    purpose TEXT,
    environment TEXT,
    scopes TEXT NOT NULL,
    status TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    idle_timeout_s BIGINT,
    last_seen_ms BIGINT NOT NULL,
    deadline_ms BIGINT NOT NULL,
    ended_ms BIGINT,
    end_reason TEXT,
    delegation TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX tasks_deadline ON tasks(deadline_ms) WHERE status = 'active';
CREATE INDEX tasks_parent ON tasks(parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX tasks_workload ON tasks(workload);
CREATE INDEX tasks_ended ON tasks(ended_ms) WHERE status <> 'active';
CREATE TABLE leases (
    id TEXT COLLATE "C" PRIMARY KEY,
    task_id TEXT COLLATE "C" NOT NULL,
    workload TEXT NOT NULL,
    role TEXT NOT NULL,
    engine TEXT NOT NULL,
    scopes TEXT NOT NULL,
    state TEXT NOT NULL,
    revocability TEXT NOT NULL,
    fingerprint TEXT NOT NULL UNIQUE,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    ended_ms BIGINT,
    end_reason TEXT,
    revoke_attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT,
    last_error TEXT,
    engine_data TEXT
);
CREATE INDEX leases_active_expiry ON leases(expires_ms) WHERE state = 'active';
CREATE INDEX leases_revoking_attempt ON leases(next_attempt_ms) WHERE state = 'revoking';
CREATE INDEX leases_pending_created ON leases(created_ms) WHERE state = 'pending';
CREATE INDEX leases_task ON leases(task_id);
CREATE INDEX leases_workload ON leases(workload, state);
CREATE INDEX leases_role ON leases(role, state);
CREATE TABLE audit (
    seq BIGINT PRIMARY KEY,
    hash TEXT NOT NULL,
    event TEXT NOT NULL
);
-- The head of the one chain every replica extends. A writer locks this row
-- (FOR UPDATE) first in each transaction, so appends are serialised across
-- processes and the sequence commits in order. The revocation epoch counts
-- transactions that moved leases out of `active`; replicas poll it in case
-- a notification was lost.
CREATE TABLE audit_head (
    id SMALLINT PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL,
    revocation_epoch BIGINT NOT NULL DEFAULT 0
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '{GENESIS}');
CREATE TABLE sink_cursors (
    sink TEXT PRIMARY KEY,
    seq BIGINT NOT NULL
);
CREATE TABLE secrets (
    name TEXT PRIMARY KEY,
    sealed BYTEA NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE TABLE approvals (
    id TEXT COLLATE "C" PRIMARY KEY,
    status TEXT NOT NULL,
    expires_ms BIGINT NOT NULL,
    requester_key TEXT NOT NULL,
    announce_ms BIGINT,
    announce_attempts BIGINT NOT NULL DEFAULT 0,
    doc TEXT NOT NULL
);
CREATE INDEX approvals_open ON approvals(expires_ms) WHERE status IN ('pending', 'approved');
CREATE INDEX approvals_announce ON approvals(announce_ms) WHERE announce_ms IS NOT NULL;
CREATE TABLE entries (
    id TEXT COLLATE "C" PRIMARY KEY,
    node TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX entries_node ON entries(node);
"#,
    r#"
-- The egress proxy's budgets: one row per task that reserved, counting the
-- task and its whole sub-tree.
CREATE TABLE budgets (
    task_id TEXT COLLATE "C" PRIMARY KEY,
    used_requests BIGINT NOT NULL DEFAULT 0,
    used_input BIGINT NOT NULL DEFAULT 0,
    used_output BIGINT NOT NULL DEFAULT 0,
    used_spend BIGINT NOT NULL DEFAULT 0,
    res_requests BIGINT NOT NULL DEFAULT 0,
    res_input BIGINT NOT NULL DEFAULT 0,
    res_output BIGINT NOT NULL DEFAULT 0,
    res_spend BIGINT NOT NULL DEFAULT 0
);
-- One row per proxied request: open while it is in flight, settled with
-- its use, deleted once summarised into the audit trail.
CREATE TABLE reservations (
    id TEXT COLLATE "C" PRIMARY KEY,
    task_id TEXT NOT NULL,
    chain TEXT NOT NULL,
    lease_id TEXT COLLATE "C" NOT NULL,
    workload TEXT NOT NULL,
    role TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    upstream TEXT NOT NULL,
    requests BIGINT NOT NULL,
    input BIGINT NOT NULL,
    output BIGINT NOT NULL,
    spend BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    settled_ms BIGINT,
    used_requests BIGINT,
    used_input BIGINT,
    used_output BIGINT,
    used_spend BIGINT,
    unmetered BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX reservations_open ON reservations(created_ms) WHERE settled_ms IS NULL;
CREATE INDEX reservations_settled ON reservations(lease_id, created_ms) WHERE settled_ms IS NOT NULL;
"#,
    r#"
-- Several replicas (docs/design/0022-duties-and-replicas.md): each one's
-- heartbeat, the one lease on the background duties (its epoch fences a
-- holder that lost it), the owner of in-flight work, SSH serials.
CREATE TABLE replicas (
    id TEXT PRIMARY KEY,
    heartbeat_ms BIGINT NOT NULL
);
CREATE TABLE duty_lease (
    id SMALLINT PRIMARY KEY CHECK (id = 1),
    holder TEXT,
    epoch BIGINT NOT NULL DEFAULT 0,
    expires_ms BIGINT NOT NULL DEFAULT 0
);
INSERT INTO duty_lease (id) VALUES (1);
ALTER TABLE leases ADD COLUMN owner TEXT
    DEFAULT NULLIF(current_setting('keymint.replica', true), '');
ALTER TABLE reservations ADD COLUMN owner TEXT
    DEFAULT NULLIF(current_setting('keymint.replica', true), '');
-- Whoever moves a lease's state or next attempt owns it from then on (the
-- claim of a revocation, a pending lease being issued).
CREATE FUNCTION keymint_lease_owner() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.owner := NULLIF(current_setting('keymint.replica', true), '');
    RETURN NEW;
END
$$;
CREATE TRIGGER leases_owner BEFORE UPDATE OF state, next_attempt_ms ON leases
    FOR EACH ROW EXECUTE FUNCTION keymint_lease_owner();
CREATE SEQUENCE ssh_serials START WITH 4611686018427387904;
"#,
    r#"
-- The credential inventory (docs/design/0027): never a secret.
CREATE TABLE inventory (
    id TEXT COLLATE "C" PRIMARY KEY,
    fingerprint TEXT NOT NULL UNIQUE,
    version BIGINT NOT NULL,
    doc TEXT NOT NULL
);
"#,
    r#"
-- Misuse monitoring (docs/design/0033): hourly use, callers' addresses,
-- suspensions. Never a secret.
CREATE TABLE usage_hours (
    scope TEXT COLLATE "C" NOT NULL,
    subject TEXT COLLATE "C" NOT NULL,
    hour_ms BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    tokens BIGINT NOT NULL,
    spend_nusd BIGINT NOT NULL,
    PRIMARY KEY (scope, subject, hour_ms)
);
CREATE TABLE monitor_sources (
    workload TEXT COLLATE "C" NOT NULL,
    address TEXT COLLATE "C" NOT NULL,
    country TEXT,
    first_ms BIGINT NOT NULL,
    last_ms BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    PRIMARY KEY (workload, address)
);
CREATE TABLE suspensions (
    id TEXT COLLATE "C" PRIMARY KEY,
    scope TEXT COLLATE "C" NOT NULL,
    subject TEXT COLLATE "C" NOT NULL,
    active BOOLEAN NOT NULL,
    doc TEXT NOT NULL
);
CREATE UNIQUE INDEX suspensions_active ON suspensions(scope, subject) WHERE active;
"#,
    r#"
-- Rate limits shared by every replica (docs/design/0040): one token bucket
-- per task and limit, its level in thousandths of a unit as of at_ms.
CREATE TABLE rate_buckets (
    key TEXT COLLATE "C" PRIMARY KEY,
    level_milli BIGINT NOT NULL,
    at_ms BIGINT NOT NULL
);
CREATE INDEX rate_buckets_at ON rate_buckets(at_ms);
"#,
];

/// The number of migrations this keymint knows.
pub(super) fn known() -> i32 {
    i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX)
}

/// Applies the migrations not yet applied, under this schema's advisory
/// lock. `client` is a connection of its own: the lock is released when
/// the function returns (or, if it fails half-way, when the connection
/// closes).
pub(super) async fn migrate(client: &Client) -> Result<()> {
    const LOCK: &str = "SELECT pg_advisory_lock(hashtext('keymint-migrate:' || current_schema()))";
    const UNLOCK: &str =
        "SELECT pg_advisory_unlock(hashtext('keymint-migrate:' || current_schema()))";
    client
        .execute(LOCK, &[])
        .await
        .map_err(|e| pg_err("cannot take the migration lock", &e))?;
    let r = migrate_locked(client).await;
    client
        .execute(UNLOCK, &[])
        .await
        .map_err(|e| pg_err("cannot release the migration lock", &e))?;
    r
}

async fn migrate_locked(client: &Client) -> Result<()> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS keymint_schema ( \
               id SMALLINT PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL); \
             INSERT INTO keymint_schema (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
        )
        .await
        .map_err(|e| pg_err("cannot create the schema version table", &e))?;
    let version: i32 = client
        .query_one("SELECT version FROM keymint_schema WHERE id = 1", &[])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(|e| pg_err("cannot read the schema version", &e))?;
    let known = known();
    if version > known {
        return Err(StoreError::Backend(format!(
            "database schema version {version} is newer than this keymint understands ({known})"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let sql = sql.replace("{GENESIS}", GENESIS);
        let next = i32::try_from(i + 1).unwrap_or(i32::MAX);
        let step = format!(
            "BEGIN; {sql}; UPDATE keymint_schema SET version = {next} WHERE id = 1; COMMIT;"
        );
        if let Err(e) = client.batch_execute(&step).await {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(pg_err(&format!("migration {next} failed"), &e));
        }
        tracing::info!(version = next, "postgres store: schema migrated");
    }
    Ok(())
}
