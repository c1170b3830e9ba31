//! The embedded store: SQLite in WAL mode.
//!
//! Writes go through one writer thread. It takes every job waiting in its
//! queue (up to [`MAX_BATCH`]), runs each inside its own savepoint and
//! commits them together. The commit itself does not wait for the disk
//! (`synchronous=NORMAL`); the batch goes to a syncer thread, which
//! `fdatasync`s the WAL file once for every batch that queued up meanwhile
//! and only then answers the callers. So the writer works on the next batch
//! while the disk syncs the last ones (pipelined group commit), and nobody
//! hears "done" before the data is on disk (DESIGN.md invariant 2).
//! Concurrent readers may see a committed change a moment before it is
//! durable; whoever made it has not been told yet. The audit chain is
//! extended by the writer in the same transaction as the change it records,
//! so the chain and the state never disagree, even across a crash.
//!
//! Reads use a small pool of read-only connections on the blocking thread
//! pool, never the async workers.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, LazyLock, Mutex};

use async_trait::async_trait;
use keymint_core::Timestamp;
use keymint_core::audit::{AuditDraft, AuditEvent, GENESIS};
use keymint_core::model::{
    Approval, ApprovalStatus, EndReason, Lease, LeaseState, RegistrationEntry, Revocability, Task,
    TaskStatus,
};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};
use tokio::sync::oneshot;

use crate::{
    ApprovalChange, Counts, EndedTree, LeaseFilter, LeaseGrantFn, LeaseSelector, Pruned, RenewFn,
    Result, RevocationDone, Store, StoreError, TaskEnd, TaskFilter, TaskGrantFn,
};

/// The most jobs one transaction takes.
pub const MAX_BATCH: usize = 1024;
const READERS: usize = 4;

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
];

const TASK_COLS: &str = "id, parent_id, workload, role, intent, purpose, environment, scopes, status, \
     created_ms, expires_ms, idle_timeout_s, last_seen_ms, ended_ms, delegation";
const LEASE_COLS: &str = "id, task_id, workload, role, engine, scopes, state, revocability, fingerprint, \
     created_ms, expires_ms, ended_ms, end_reason, revoke_attempts, next_attempt_ms, last_error, engine_data";
const TASK_NCOLS: usize = 15;

fn prefixed(prefix: &str, cols: &str) -> String {
    cols.split(", ")
        .map(|c| format!("{prefix}.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

static LEASE_AND_TASK: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {}, {} FROM leases l JOIN tasks t ON t.id = l.task_id WHERE l.fingerprint = ?1",
        prefixed("t", TASK_COLS),
        prefixed("l", LEASE_COLS)
    )
});

fn bad_column(what: &str) -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(0, what.to_owned(), rusqlite::types::Type::Text)
}

fn json_list(s: &str) -> rusqlite::Result<Vec<String>> {
    serde_json::from_str(s).map_err(|_| bad_column("json list"))
}

fn to_json_list(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

fn task_from_row(r: &Row<'_>, o: usize) -> rusqlite::Result<Task> {
    let status: String = r.get(o + 8)?;
    Ok(Task {
        id: r.get(o)?,
        parent: r.get(o + 1)?,
        workload: r.get(o + 2)?,
        role: r.get(o + 3)?,
        intent: r.get(o + 4)?,
        purpose: r.get(o + 5)?,
        environment: r.get(o + 6)?,
        scopes: json_list(&r.get::<_, String>(o + 7)?)?,
        status: TaskStatus::parse(&status).ok_or_else(|| bad_column("task status"))?,
        created_at: Timestamp(r.get(o + 9)?),
        expires_at: Timestamp(r.get(o + 10)?),
        idle_timeout_secs: r.get::<_, Option<i64>>(o + 11)?.map(|v| v.max(0) as u64),
        last_seen_at: Timestamp(r.get(o + 12)?),
        ended_at: r.get::<_, Option<i64>>(o + 13)?.map(Timestamp),
        delegation: json_list(&r.get::<_, String>(o + 14)?)?,
    })
}

fn lease_from_row(r: &Row<'_>, o: usize) -> rusqlite::Result<Lease> {
    let state: String = r.get(o + 6)?;
    let revocability: String = r.get(o + 7)?;
    let end_reason: Option<String> = r.get(o + 12)?;
    let engine_data: Option<String> = r.get(o + 16)?;
    let engine: String = r.get(o + 4)?;
    Ok(Lease {
        id: r.get(o)?,
        task: r.get(o + 1)?,
        workload: r.get(o + 2)?,
        role: r.get(o + 3)?,
        engine: engine.parse().map_err(|_| bad_column("lease engine"))?,
        scopes: json_list(&r.get::<_, String>(o + 5)?)?,
        state: LeaseState::parse(&state).ok_or_else(|| bad_column("lease state"))?,
        revocability: match revocability.as_str() {
            "expire_only" => Revocability::ExpireOnly,
            _ => Revocability::Revocable,
        },
        fingerprint: r.get(o + 8)?,
        created_at: Timestamp(r.get(o + 9)?),
        expires_at: Timestamp(r.get(o + 10)?),
        ended_at: r.get::<_, Option<i64>>(o + 11)?.map(Timestamp),
        end_reason: end_reason.as_deref().and_then(EndReason::parse),
        revoke_attempts: u32::try_from(r.get::<_, i64>(o + 13)?).unwrap_or(u32::MAX),
        next_attempt_at: r.get::<_, Option<i64>>(o + 14)?.map(Timestamp),
        last_error: r.get(o + 15)?,
        engine_data: match engine_data {
            Some(s) => serde_json::from_str(&s).map_err(|_| bad_column("engine data"))?,
            None => serde_json::Value::Null,
        },
    })
}

fn revocability_str(r: Revocability) -> &'static str {
    match r {
        Revocability::Revocable => "revocable",
        Revocability::ExpireOnly => "expire_only",
    }
}

fn deadline_ms(t: &Task) -> i64 {
    t.deadline().millis()
}

fn secs_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn limit(n: u32) -> i64 {
    i64::from(n.clamp(1, 10_000))
}

// ---------------------------------------------------------------- writer

#[derive(Debug, Clone)]
struct Chain {
    seq: u64,
    hash: String,
}

/// What a write job sees: the connection inside the open transaction and
/// the head of the audit chain.
#[derive(Debug)]
pub struct Writer<'c> {
    conn: &'c Connection,
    chain: &'c mut Chain,
}

impl Writer<'_> {
    fn audit(&mut self, draft: AuditDraft) -> Result<AuditEvent> {
        let seq = self.chain.seq + 1;
        let event = draft.seal(seq, &self.chain.hash);
        self.conn
            .prepare_cached("INSERT INTO audit (seq, hash, event) VALUES (?1, ?2, ?3)")?
            .execute(params![seq as i64, event.hash, event.to_json()])?;
        self.chain.seq = seq;
        self.chain.hash.clone_from(&event.hash);
        Ok(event)
    }

    fn task(&self, id: &str) -> Result<Option<Task>> {
        Ok(self
            .conn
            .prepare_cached(&format!("SELECT {TASK_COLS} FROM tasks WHERE id = ?1"))?
            .query_row([id], |r| task_from_row(r, 0))
            .optional()?)
    }

    fn lease(&self, id: &str) -> Result<Option<Lease>> {
        Ok(self
            .conn
            .prepare_cached(&format!("SELECT {LEASE_COLS} FROM leases WHERE id = ?1"))?
            .query_row([id], |r| lease_from_row(r, 0))
            .optional()?)
    }
}

trait Job: Send {
    fn run(&mut self, w: &mut Writer<'_>);
    fn finish(self: Box<Self>, commit: std::result::Result<(), String>);
}

type WriteFn<T> = Box<dyn for<'a> FnOnce(&mut Writer<'a>) -> Result<T> + Send>;

struct FnJob<T> {
    f: Option<WriteFn<T>>,
    out: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T: Send> Job for FnJob<T> {
    fn run(&mut self, w: &mut Writer<'_>) {
        let Some(f) = self.f.take() else { return };
        let before = w.chain.clone();
        let conn = w.conn;
        let exec = |sql: &str| -> rusqlite::Result<()> {
            conn.prepare_cached(sql)?.execute([]).map(|_| ())
        };
        if let Err(e) = exec("SAVEPOINT job") {
            self.out = Some(Err(e.into()));
            return;
        }
        let r = f(w);
        let end = if r.is_ok() {
            exec("RELEASE job")
        } else {
            *w.chain = before;
            exec("ROLLBACK TO job").and_then(|()| exec("RELEASE job"))
        };
        self.out = Some(match end {
            Ok(()) => r,
            Err(e) => Err(e.into()),
        });
    }

    fn finish(self: Box<Self>, commit: std::result::Result<(), String>) {
        let out = match (self.out, commit) {
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (Some(Ok(_)), Err(e)) => Err(StoreError::Backend(e)),
            (None, _) => Err(StoreError::Closed),
        };
        let _ = self.reply.send(out);
    }
}

/// State the writer, the syncer and the readers share.
#[derive(Debug, Default)]
struct Durability {
    /// The newest audit sequence number known to be on disk. Readers of the
    /// audit chain (sinks, the API) see nothing newer, so no sink can hold
    /// an event that a power loss could still take back.
    audit_seq: std::sync::atomic::AtomicU64,
    /// Set when an fsync failed: the kernel may have dropped dirty pages, so
    /// no later write can be promised durable. The store refuses writes
    /// until keymint restarts (and SQLite recovers the WAL).
    poisoned: std::sync::atomic::AtomicBool,
}

const POISONED: &str = "the store stopped accepting writes after a failed fsync; restart keymint";

fn writer_loop(
    conn: Connection,
    jobs: mpsc::Receiver<Box<dyn Job>>,
    mut chain: Chain,
    synced: mpsc::Sender<(Vec<Box<dyn Job>>, u64)>,
    durability: Arc<Durability>,
) {
    use std::sync::atomic::Ordering;
    while let Ok(first) = jobs.recv() {
        let mut batch = Vec::with_capacity(64);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        if durability.poisoned.load(Ordering::SeqCst) {
            for j in batch {
                j.finish(Err(POISONED.into()));
            }
            continue;
        }
        let before = chain.clone();
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let msg = e.to_string();
            for j in batch {
                j.finish(Err(msg.clone()));
            }
            continue;
        }
        let mut aborted = false;
        for j in &mut batch {
            j.run(&mut Writer {
                conn: &conn,
                chain: &mut chain,
            });
            // SQLite rolls the whole transaction back on some errors
            // (SQLITE_FULL, IOERR, NOMEM). Then the savepoints of later jobs
            // would each commit on their own: stop here instead.
            if conn.is_autocommit() {
                aborted = true;
                break;
            }
        }
        if aborted {
            chain = before;
            for j in batch {
                j.finish(Err("the database rolled the transaction back".into()));
            }
            continue;
        }
        match conn.execute_batch("COMMIT") {
            // Answered by the syncer once the WAL is on disk.
            Ok(()) => {
                if let Err(mpsc::SendError((batch, _))) = synced.send((batch, chain.seq)) {
                    for j in batch {
                        j.finish(Err("the store is shutting down".into()));
                    }
                }
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                chain = before;
                let msg = e.to_string();
                for j in batch {
                    j.finish(Err(msg.clone()));
                }
            }
        }
    }
}

/// Makes committed batches durable, then answers their callers. One
/// `fdatasync` covers every batch committed before it started.
fn syncer_loop(
    wal: PathBuf,
    batches: mpsc::Receiver<(Vec<Box<dyn Job>>, u64)>,
    durability: Arc<Durability>,
) {
    use std::sync::atomic::Ordering;
    let mut file: Option<std::fs::File> = None;
    while let Ok(first) = batches.recv() {
        let mut ready = vec![first];
        while let Ok(b) = batches.try_recv() {
            ready.push(b);
        }
        let head = ready.iter().map(|(_, seq)| *seq).max().unwrap_or(0);
        if durability.poisoned.load(Ordering::SeqCst) {
            for (batch, _) in ready {
                for j in batch {
                    j.finish(Err(POISONED.into()));
                }
            }
            continue;
        }
        let result = (|| -> std::io::Result<()> {
            if file.is_none() {
                file = Some(std::fs::File::open(&wal)?);
            }
            match &file {
                Some(f) => f.sync_data(),
                None => Ok(()),
            }
        })();
        let outcome = match result {
            Ok(()) => {
                durability.audit_seq.fetch_max(head, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                // The data is committed but not known to be on disk, and a
                // later fsync could not vouch for it either (the kernel may
                // have dropped the dirty pages): fail closed.
                tracing::error!(error = %e, wal = %wal.display(), "fdatasync of the WAL failed; refusing further writes");
                durability.poisoned.store(true, Ordering::SeqCst);
                Err(format!("the write could not be made durable: {e}"))
            }
        };
        for (batch, _) in ready {
            for j in batch {
                j.finish(outcome.clone());
            }
        }
    }
}

// ---------------------------------------------------------------- readers

#[derive(Debug)]
struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReadPool {
    fn open(&self) -> Result<Connection> {
        let c = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        c.busy_timeout(std::time::Duration::from_secs(5))?;
        c.set_prepared_statement_cache_capacity(64);
        Ok(c)
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = match self.idle.lock() {
            Ok(mut idle) => idle.pop(),
            Err(_) => None,
        };
        let conn = match conn {
            Some(c) => c,
            None => self.open()?,
        };
        let r = f(&conn);
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < READERS
        {
            idle.push(conn);
        }
        r
    }
}

// ---------------------------------------------------------------- store

/// The embedded SQLite store.
#[derive(Debug)]
pub struct SqliteStore {
    jobs: mpsc::Sender<Box<dyn Job>>,
    durability: Arc<Durability>,
    readers: Arc<ReadPool>,
    /// At most [`READERS`] reads run at once, so a pooled connection is
    /// always free and none is opened (and its schema parsed) per read.
    read_slots: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for dyn Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

fn configure(conn: &Connection) -> Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // WAL: readers never block the writer. synchronous=NORMAL: a commit
    // does not wait for the disk; the syncer thread fdatasyncs the WAL before
    // any caller is answered (see the module documentation). SQLite itself
    // syncs the WAL before a checkpoint and the database after it.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    // 64 MiB of page cache for the writer (allocated only as pages are
    // used): index pages stay in memory instead of being re-read per insert.
    conn.pragma_update(None, "cache_size", -65_536)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<()> {
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

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and runs migrations.
    /// Opening reads only the head of the audit chain, whatever the number of
    /// leases, so a restart is ready at once.
    pub fn open(path: &Path) -> Result<Self> {
        let mut conn = Connection::open(path)?;
        configure(&conn)?;
        migrate(&mut conn)?;
        let chain = conn
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| {
                    Ok(Chain {
                        seq: r.get::<_, i64>(0)? as u64,
                        hash: r.get(1)?,
                    })
                },
            )
            .optional()?
            .unwrap_or(Chain {
                seq: 0,
                hash: GENESIS.to_owned(),
            });
        let (tx, rx) = mpsc::channel::<Box<dyn Job>>();
        let (sync_tx, sync_rx) = mpsc::channel::<(Vec<Box<dyn Job>>, u64)>();
        let wal = PathBuf::from(format!("{}-wal", path.display()));
        // Everything on disk at open is durable.
        let durability = Arc::new(Durability {
            audit_seq: std::sync::atomic::AtomicU64::new(chain.seq),
            poisoned: std::sync::atomic::AtomicBool::new(false),
        });
        let (d1, d2) = (Arc::clone(&durability), Arc::clone(&durability));
        std::thread::Builder::new()
            .name("keymint-sqlite-sync".into())
            .spawn(move || syncer_loop(wal, sync_rx, d1))
            .map_err(|e| StoreError::Backend(format!("cannot start the syncer thread: {e}")))?;
        std::thread::Builder::new()
            .name("keymint-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, chain, sync_tx, d2))
            .map_err(|e| StoreError::Backend(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            jobs: tx,
            durability,
            readers: Arc::new(ReadPool {
                path: path.to_owned(),
                idle: Mutex::new(Vec::new()),
            }),
            read_slots: Arc::new(tokio::sync::Semaphore::new(READERS)),
        })
    }

    async fn write<T: Send + 'static>(
        &self,
        f: impl for<'a> FnOnce(&mut Writer<'a>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(FnJob {
            f: Some(Box::new(f)),
            out: None,
            reply,
        });
        self.jobs.send(job).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let pool = Arc::clone(&self.readers);
        let slot = Arc::clone(&self.read_slots)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        tokio::task::spawn_blocking(move || {
            let r = pool.with(f);
            drop(slot);
            r
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    fn durable_audit_seq(&self) -> u64 {
        self.durability
            .audit_seq
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Inserts many active leases at once, bypassing grants and audit. For
    /// benchmarks that need a large store (the restart figure); never called
    /// by the broker.
    pub async fn bulk_load_for_bench(&self, tasks: Vec<Task>, leases: Vec<Lease>) -> Result<()> {
        self.write(move |w| {
            for t in &tasks {
                insert_task(w.conn, t)?;
            }
            for l in &leases {
                insert_lease_row(w.conn, l)?;
            }
            Ok(())
        })
        .await
    }
}

fn insert_task(conn: &Connection, t: &Task) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO tasks (id, parent_id, workload, role, intent, purpose, environment, scopes, \
         status, created_ms, expires_ms, idle_timeout_s, last_seen_ms, deadline_ms, delegation) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
    )?
    .execute(params![
        t.id,
        t.parent,
        t.workload,
        t.role,
        t.intent,
        t.purpose,
        t.environment,
        to_json_list(&t.scopes),
        t.status.as_str(),
        t.created_at.millis(),
        t.expires_at.millis(),
        t.idle_timeout_secs.map(secs_i64),
        t.last_seen_at.millis(),
        deadline_ms(t),
        to_json_list(&t.delegation),
    ])?;
    Ok(())
}

fn insert_lease_row(conn: &Connection, l: &Lease) -> Result<()> {
    let engine_data = if l.engine_data.is_null() {
        None
    } else {
        Some(l.engine_data.to_string())
    };
    conn.prepare_cached(
        "INSERT INTO leases (id, task_id, workload, role, engine, scopes, state, revocability, \
         fingerprint, created_ms, expires_ms, engine_data) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        l.id,
        l.task,
        l.workload,
        l.role,
        l.engine.as_str(),
        to_json_list(&l.scopes),
        l.state.as_str(),
        revocability_str(l.revocability),
        l.fingerprint,
        l.created_at.millis(),
        l.expires_at.millis(),
        engine_data,
    ])?;
    Ok(())
}

fn approval_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Approval> {
    let key: String = r.get(0)?;
    let doc: String = r.get(1)?;
    let mut a: Approval = serde_json::from_str(&doc).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, Box::new(e))
    })?;
    a.requester_key = key;
    Ok(a)
}

fn query_approvals(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Approval>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, approval_from_row)?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

fn entry_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RegistrationEntry> {
    let doc: String = r.get(0)?;
    serde_json::from_str(&doc).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn approval_doc(a: &Approval) -> Result<String> {
    serde_json::to_string(a).map_err(|e| StoreError::Backend(e.to_string()))
}

fn query_leases(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<Vec<Lease>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, |r| lease_from_row(r, 0))?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// Moves selected leases to `revoking` and audits each request.
fn mark_revoking(
    w: &mut Writer<'_>,
    where_clause: &str,
    param: &str,
    reason: EndReason,
    now: Timestamp,
    actor: &str,
) -> Result<Vec<Lease>> {
    let sql = format!(
        "UPDATE leases SET state = 'revoking', end_reason = ?2, next_attempt_ms = ?3 \
         WHERE {where_clause} AND state IN ('pending', 'active') RETURNING {LEASE_COLS}"
    );
    let claim = now.plus_millis(crate::REVOCATION_CLAIM_MS).millis();
    let leases = query_leases(w.conn, &sql, params![param, reason.as_str(), claim])?;
    for l in &leases {
        w.audit(
            AuditDraft::new(now, "lease.revoke_requested", actor)
                .task(&l.task)
                .lease(&l.id)
                .workload(&l.workload)
                .role(&l.role)
                .fingerprint(&l.fingerprint)
                .reason(reason.as_str()),
        )?;
    }
    Ok(leases)
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_task(&self, parent: Option<&str>, grant: TaskGrantFn) -> Result<Task> {
        let parent = parent.map(str::to_owned);
        self.write(move |w| {
            let parent_task = match &parent {
                Some(id) => Some(w.task(id)?.ok_or(StoreError::NotFound("parent task"))?),
                None => None,
            };
            let (task, audit) = grant(parent_task.as_ref())?;
            insert_task(w.conn, &task)?;
            w.audit(audit)?;
            Ok(task)
        })
        .await
    }

    async fn get_task(&self, id: &str) -> Result<Option<Task>> {
        let id = id.to_owned();
        self.read(move |c| {
            Ok(
                c.prepare_cached(&format!("SELECT {TASK_COLS} FROM tasks WHERE id = ?1"))?
                    .query_row([id], |r| task_from_row(r, 0))
                    .optional()?,
            )
        })
        .await
    }

    async fn list_tasks(&self, f: &TaskFilter) -> Result<Vec<Task>> {
        let f = f.clone();
        self.read(move |c| {
            let sql = format!(
                "SELECT {TASK_COLS} FROM tasks WHERE (?1 IS NULL OR status = ?1) \
                 AND (?2 IS NULL OR workload = ?2) AND (?3 IS NULL OR role = ?3) \
                 AND (?4 IS NULL OR parent_id = ?4) ORDER BY id DESC LIMIT ?5"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(
                params![
                    f.status.map(TaskStatus::as_str),
                    f.workload,
                    f.role,
                    f.parent,
                    limit(f.limit)
                ],
                |r| task_from_row(r, 0),
            )?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn touch_task(&self, id: &str, now: Timestamp) -> Result<Option<Task>> {
        let id = id.to_owned();
        self.write(move |w| {
            let Some(mut t) = w.task(&id)? else {
                return Ok(None);
            };
            if !t.is_live(now) {
                return Ok(None);
            }
            t.last_seen_at = now;
            w.conn
                .prepare_cached(
                    "UPDATE tasks SET last_seen_ms = ?2, deadline_ms = ?3 WHERE id = ?1",
                )?
                .execute(params![id, now.millis(), deadline_ms(&t)])?;
            Ok(Some(t))
        })
        .await
    }

    async fn end_task(&self, end: TaskEnd) -> Result<Option<EndedTree>> {
        self.write(move |w| {
            let Some(root) = w.task(&end.id)? else {
                return Err(StoreError::NotFound("task"));
            };
            if !root.status.is_active() {
                return Ok(None);
            }
            let mut stmt = w.conn.prepare_cached(
                "WITH RECURSIVE tree(id, depth) AS ( \
                   SELECT id, 0 FROM tasks WHERE id = ?1 \
                   UNION ALL SELECT t.id, tree.depth + 1 FROM tasks t JOIN tree ON t.parent_id = tree.id) \
                 SELECT tree.id FROM tree JOIN tasks ON tasks.id = tree.id \
                 WHERE tasks.status = 'active' ORDER BY depth",
            )?;
            let ids = stmt
                .query_map([&end.id], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            drop(stmt);
            let mut leases = Vec::new();
            for (i, id) in ids.iter().enumerate() {
                let (status, reason) = if i == 0 {
                    (end.status, end.reason.clone())
                } else {
                    (TaskStatus::Revoked, Some(format!("parent task `{}` ended", end.id)))
                };
                w.conn
                    .prepare_cached(
                        "UPDATE tasks SET status = ?2, ended_ms = ?3, end_reason = ?4 WHERE id = ?1",
                    )?
                    .execute(params![id, status.as_str(), end.now.millis(), reason])?;
                let ended = mark_revoking(w, "task_id = ?1", id, EndReason::TaskEnded, end.now, &end.actor)?;
                let mut ev = AuditDraft::new(end.now, "task.ended", end.actor.clone())
                    .task(id.clone())
                    .data("status", status.as_str())
                    .data("leases_revoked", ended.len());
                if let Some(r) = reason {
                    ev = ev.reason(r);
                }
                if i == 0 {
                    ev = ev.workload(&root.workload).role(&root.role);
                }
                w.audit(ev)?;
                leases.extend(ended);
            }
            Ok(Some(EndedTree { tasks: ids, leases }))
        })
        .await
    }

    async fn timed_out_tasks(&self, now: Timestamp, n: u32) -> Result<Vec<String>> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id FROM tasks WHERE status = 'active' AND deadline_ms <= ?1 \
                 ORDER BY deadline_ms LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![now.millis(), limit(n)], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn insert_lease(&self, task: &str, grant: LeaseGrantFn) -> Result<Lease> {
        let task = task.to_owned();
        self.write(move |w| {
            let t = w.task(&task)?.ok_or(StoreError::NotFound("task"))?;
            let (lease, audit) = grant(&t)?;
            insert_lease_row(w.conn, &lease)?;
            w.audit(audit)?;
            Ok(lease)
        })
        .await
    }

    async fn activate_lease(&self, id: &str, audit: AuditDraft) -> Result<bool> {
        let id = id.to_owned();
        self.write(move |w| {
            let n = w
                .conn
                .prepare_cached(
                    "UPDATE leases SET state = 'active' WHERE id = ?1 AND state = 'pending'",
                )?
                .execute([&id])?;
            if n == 1 {
                w.audit(audit)?;
            }
            Ok(n == 1)
        })
        .await
    }

    async fn get_lease(&self, id: &str) -> Result<Option<Lease>> {
        let id = id.to_owned();
        self.read(move |c| {
            Ok(
                c.prepare_cached(&format!("SELECT {LEASE_COLS} FROM leases WHERE id = ?1"))?
                    .query_row([id], |r| lease_from_row(r, 0))
                    .optional()?,
            )
        })
        .await
    }

    async fn lease_by_fingerprint(&self, fp: &str) -> Result<Option<(Lease, Task)>> {
        let fp = fp.to_owned();
        self.read(move |c| {
            Ok(c.prepare_cached(&LEASE_AND_TASK)?
                .query_row([fp], |r| {
                    Ok((lease_from_row(r, TASK_NCOLS)?, task_from_row(r, 0)?))
                })
                .optional()?)
        })
        .await
    }

    async fn list_leases(&self, f: &LeaseFilter) -> Result<Vec<Lease>> {
        let f = f.clone();
        self.read(move |c| {
            let sql = format!(
                "SELECT {LEASE_COLS} FROM leases WHERE (?1 IS NULL OR task_id = ?1) \
                 AND (?2 IS NULL OR workload = ?2) AND (?3 IS NULL OR role = ?3) \
                 AND (?4 IS NULL OR state = ?4) ORDER BY id DESC LIMIT ?5"
            );
            query_leases(
                c,
                &sql,
                params![
                    f.task,
                    f.workload,
                    f.role,
                    f.state.map(LeaseState::as_str),
                    limit(f.limit)
                ],
            )
        })
        .await
    }

    async fn renew_lease(&self, id: &str, renew: RenewFn) -> Result<Lease> {
        let id = id.to_owned();
        self.write(move |w| {
            let mut lease = w.lease(&id)?.ok_or(StoreError::NotFound("lease"))?;
            let task = w.task(&lease.task)?.ok_or(StoreError::NotFound("task"))?;
            let (expires, audit) = renew(&lease, &task)?;
            w.conn
                .prepare_cached("UPDATE leases SET expires_ms = ?2 WHERE id = ?1")?
                .execute(params![id, expires.millis()])?;
            w.audit(audit)?;
            lease.expires_at = expires;
            Ok(lease)
        })
        .await
    }

    async fn request_revocation(
        &self,
        selector: LeaseSelector,
        reason: EndReason,
        now: Timestamp,
        actor: &str,
    ) -> Result<Vec<Lease>> {
        let actor = actor.to_owned();
        self.write(move |w| {
            let (clause, value) = match &selector {
                LeaseSelector::Id(v) => ("id = ?1", v),
                LeaseSelector::Task(v) => ("task_id = ?1", v),
                LeaseSelector::Workload(v) => ("workload = ?1", v),
                LeaseSelector::Role(v) => ("role = ?1", v),
                LeaseSelector::Fingerprint(v) => ("fingerprint = ?1", v),
            };
            mark_revoking(w, clause, value, reason, now, &actor)
        })
        .await
    }

    async fn expire_due(&self, now: Timestamp, n: u32) -> Result<Vec<Lease>> {
        self.write(move |w| {
            let sql = format!(
                "UPDATE leases SET state = 'revoking', end_reason = 'expired', next_attempt_ms = ?3 \
                 WHERE id IN (SELECT id FROM leases WHERE state = 'active' AND expires_ms <= ?1 \
                 ORDER BY expires_ms LIMIT ?2) RETURNING {LEASE_COLS}"
            );
            let claim = now.plus_millis(crate::REVOCATION_CLAIM_MS).millis();
            query_leases(w.conn, &sql, params![now.millis(), limit(n), claim])
        })
        .await
    }

    async fn prune_ended(&self, before: Timestamp, now: Timestamp, n: u32) -> Result<Pruned> {
        self.write(move |w| {
            let ids: Vec<String> = w
                .conn
                .prepare_cached(
                    "SELECT t.id FROM tasks t WHERE t.status != 'active' AND t.ended_ms < ?1 \
                     AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.task_id = t.id \
                         AND l.state IN ('pending', 'active', 'revoking')) \
                     AND NOT EXISTS (SELECT 1 FROM tasks c WHERE c.parent_id = t.id \
                         AND c.status = 'active') \
                     ORDER BY t.ended_ms LIMIT ?2",
                )?
                .query_map(params![before.millis(), limit(n)], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut out = Pruned::default();
            for id in &ids {
                out.leases += w
                    .conn
                    .prepare_cached("DELETE FROM leases WHERE task_id = ?1")?
                    .execute([id])? as u64;
                out.tasks += w
                    .conn
                    .prepare_cached("DELETE FROM tasks WHERE id = ?1")?
                    .execute([id])? as u64;
            }
            if out.tasks > 0 {
                w.audit(
                    AuditDraft::new(now, "store.pruned", "system")
                        .reason("retention: tasks ended before the cutoff, with their leases")
                        .data("tasks", out.tasks)
                        .data("leases", out.leases)
                        .data("ended_before", before.rfc3339()),
                )?;
            }
            Ok(out)
        })
        .await
    }

    async fn due_revocations(&self, now: Timestamp, n: u32) -> Result<Vec<Lease>> {
        self.read(move |c| {
            let sql = format!(
                "SELECT {LEASE_COLS} FROM leases WHERE state = 'revoking' AND next_attempt_ms <= ?1 \
                 ORDER BY next_attempt_ms LIMIT ?2"
            );
            query_leases(c, &sql, params![now.millis(), limit(n)])
        })
        .await
    }

    async fn stale_pending(&self, before: Timestamp, n: u32) -> Result<Vec<Lease>> {
        self.read(move |c| {
            let sql = format!(
                "SELECT {LEASE_COLS} FROM leases WHERE state = 'pending' AND created_ms < ?1 \
                 ORDER BY created_ms LIMIT ?2"
            );
            query_leases(c, &sql, params![before.millis(), limit(n)])
        })
        .await
    }

    async fn finish_revocations(&self, done: Vec<RevocationDone>, now: Timestamp) -> Result<()> {
        self.write(move |w| {
            for d in done {
                let Some(l) = w.lease(&d.lease)? else {
                    continue;
                };
                if l.state != LeaseState::Revoking {
                    continue;
                }
                let fin = l.end_reason.unwrap_or(EndReason::Revoked).final_state();
                w.conn
                    .prepare_cached(
                        "UPDATE leases SET state = ?2, ended_ms = ?3, next_attempt_ms = NULL, \
                         last_error = NULL WHERE id = ?1",
                    )?
                    .execute(params![d.lease, fin.as_str(), now.millis()])?;
                w.audit(d.audit)?;
            }
            Ok(())
        })
        .await
    }

    async fn revocation_failed(
        &self,
        id: &str,
        next_attempt: Timestamp,
        error: &str,
        audit: AuditDraft,
    ) -> Result<()> {
        let (id, error) = (id.to_owned(), error.to_owned());
        self.write(move |w| {
            let n = w
                .conn
                .prepare_cached(
                    "UPDATE leases SET state = 'revoking', ended_ms = NULL, \
                     revoke_attempts = revoke_attempts + 1, next_attempt_ms = ?2, last_error = ?3 \
                     WHERE id = ?1 AND state IN ('revoking', 'revoked')",
                )?
                .execute(params![id, next_attempt.millis(), error])?;
            if n == 1 {
                w.audit(audit)?;
            }
            Ok(())
        })
        .await
    }

    async fn next_deadline(&self) -> Result<Option<Timestamp>> {
        self.read(|c| {
            let mut best: Option<i64> = None;
            for sql in [
                "SELECT deadline_ms FROM tasks WHERE status = 'active' ORDER BY deadline_ms LIMIT 1",
                "SELECT expires_ms FROM leases WHERE state = 'active' ORDER BY expires_ms LIMIT 1",
                "SELECT next_attempt_ms FROM leases WHERE state = 'revoking' \
                 ORDER BY next_attempt_ms LIMIT 1",
            ] {
                let v: Option<i64> = c
                    .prepare_cached(sql)?
                    .query_row([], |r| r.get(0))
                    .optional()?;
                if let Some(v) = v {
                    best = Some(best.map_or(v, |b| b.min(v)));
                }
            }
            Ok(best.map(Timestamp))
        })
        .await
    }

    async fn append_audit(&self, draft: AuditDraft) -> Result<AuditEvent> {
        self.write(move |w| w.audit(draft)).await
    }

    async fn audit_after(&self, after: u64, n: u32) -> Result<Vec<AuditEvent>> {
        let durable = self.durable_audit_seq();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT event FROM audit WHERE seq > ?1 AND seq <= ?3 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after as i64, limit(n), durable as i64], |r| {
                r.get::<_, String>(0)
            })?;
            let mut out = Vec::new();
            for row in rows {
                let s = row?;
                out.push(serde_json::from_str(&s).map_err(|e| {
                    StoreError::Backend(format!("stored audit event unreadable: {e}"))
                })?);
            }
            Ok(out)
        })
        .await
    }

    async fn audit_lines_after(&self, after: u64, n: u32) -> Result<Vec<(u64, String)>> {
        let durable = self.durable_audit_seq();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, event FROM audit WHERE seq > ?1 AND seq <= ?3 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after as i64, limit(n), durable as i64], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn audit_tail(&self, n: u32) -> Result<Vec<AuditEvent>> {
        let head = self.durable_audit_seq();
        self.audit_after(head.saturating_sub(u64::from(n)), n).await
    }

    async fn sink_cursor(&self, sink: &str) -> Result<u64> {
        let sink = sink.to_owned();
        self.read(move |c| {
            let v: Option<i64> = c
                .prepare_cached("SELECT seq FROM sink_cursors WHERE sink = ?1")?
                .query_row([sink], |r| r.get(0))
                .optional()?;
            Ok(v.unwrap_or(0) as u64)
        })
        .await
    }

    async fn set_sink_cursor(&self, sink: &str, seq: u64) -> Result<()> {
        let sink = sink.to_owned();
        self.write(move |w| {
            w.conn
                .prepare_cached(
                    "INSERT INTO sink_cursors (sink, seq) VALUES (?1, ?2) \
                     ON CONFLICT(sink) DO UPDATE SET seq = excluded.seq",
                )?
                .execute(params![sink, seq as i64])?;
            Ok(())
        })
        .await
    }

    async fn create_approval(&self, a: Approval, audit: AuditDraft) -> Result<()> {
        self.write(move |w| {
            let doc = approval_doc(&a)?;
            w.conn
                .prepare_cached(
                    "INSERT INTO approvals (id, status, expires_ms, requester_key, announce_ms, doc) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    a.id,
                    a.status.as_str(),
                    a.expires_at.millis(),
                    a.requester_key,
                    a.created_at.millis(),
                    doc
                ])?;
            w.audit(audit)?;
            Ok(())
        })
        .await
    }

    async fn create_entry(&self, e: RegistrationEntry, audit: AuditDraft) -> Result<()> {
        self.write(move |w| {
            let doc = serde_json::to_string(&e).map_err(|x| StoreError::Backend(x.to_string()))?;
            w.conn
                .prepare_cached("INSERT INTO entries (id, node, doc) VALUES (?1, ?2, ?3)")?
                .execute(params![e.id, e.node, doc])?;
            w.audit(audit)?;
            Ok(())
        })
        .await
    }

    async fn get_entry(&self, id: &str) -> Result<Option<RegistrationEntry>> {
        let id = id.to_owned();
        self.read(move |c| {
            Ok(c.prepare_cached("SELECT doc FROM entries WHERE id = ?1")?
                .query_row([id], entry_from_row)
                .optional()?)
        })
        .await
    }

    async fn list_entries(&self, node: Option<&str>) -> Result<Vec<RegistrationEntry>> {
        let node = node.map(str::to_owned);
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT doc FROM entries WHERE ?1 IS NULL OR node = ?1 ORDER BY id",
            )?;
            let rows = stmt.query_map([node], entry_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn delete_entry(&self, id: &str, audit: AuditDraft) -> Result<Option<RegistrationEntry>> {
        let id = id.to_owned();
        self.write(move |w| {
            let found = w
                .conn
                .prepare_cached("SELECT doc FROM entries WHERE id = ?1")?
                .query_row([&id], entry_from_row)
                .optional()?;
            if found.is_some() {
                w.conn
                    .prepare_cached("DELETE FROM entries WHERE id = ?1")?
                    .execute([&id])?;
                w.audit(audit)?;
            }
            Ok(found)
        })
        .await
    }

    async fn get_approval(&self, id: &str) -> Result<Option<Approval>> {
        let id = id.to_owned();
        self.read(move |c| {
            Ok(
                c.prepare_cached("SELECT requester_key, doc FROM approvals WHERE id = ?1")?
                    .query_row([id], approval_from_row)
                    .optional()?,
            )
        })
        .await
    }

    async fn list_approvals(
        &self,
        status: Option<ApprovalStatus>,
        n: u32,
    ) -> Result<Vec<Approval>> {
        self.read(move |c| match status {
            Some(st) => query_approvals(
                c,
                "SELECT requester_key, doc FROM approvals WHERE status = ?1 ORDER BY id DESC LIMIT ?2",
                params![st.as_str(), limit(n)],
            ),
            None => query_approvals(
                c,
                "SELECT requester_key, doc FROM approvals ORDER BY id DESC LIMIT ?1",
                params![limit(n)],
            ),
        })
        .await
    }

    async fn transition_approval(&self, ch: ApprovalChange) -> Result<Option<Approval>> {
        self.write(move |w| {
            let cur = w
                .conn
                .prepare_cached("SELECT requester_key, doc FROM approvals WHERE id = ?1")?
                .query_row([&ch.id], approval_from_row)
                .optional()?;
            let Some(mut a) = cur else {
                return Ok(None);
            };
            if a.status != ch.from || ch.now >= a.expires_at {
                return Ok(None);
            }
            a.status = ch.to;
            if ch.by.is_some() {
                a.decided_by = ch.by;
                a.decided_at = Some(ch.now);
            }
            if ch.note.is_some() {
                a.note = ch.note;
            }
            let doc = approval_doc(&a)?;
            w.conn
                .prepare_cached(
                    "UPDATE approvals SET status = ?2, doc = ?3, \
                     announce_ms = CASE WHEN ?2 = 'pending' THEN announce_ms ELSE NULL END \
                     WHERE id = ?1",
                )?
                .execute(params![a.id, a.status.as_str(), doc])?;
            w.audit(ch.audit)?;
            Ok(Some(a))
        })
        .await
    }

    async fn expire_approvals(&self, now: Timestamp, n: u32) -> Result<Vec<Approval>> {
        // The sweeper asks every second: a read decides whether to write.
        let any: bool = self
            .read(move |c| {
                Ok(c.prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM approvals \
                     WHERE status IN ('pending', 'approved') AND expires_ms <= ?1)",
                )?
                .query_row([now.millis()], |r| r.get(0))?)
            })
            .await?;
        if !any {
            return Ok(Vec::new());
        }
        self.write(move |w| {
            let due = query_approvals(
                w.conn,
                "SELECT requester_key, doc FROM approvals \
                 WHERE status IN ('pending', 'approved') AND expires_ms <= ?1 \
                 ORDER BY expires_ms LIMIT ?2",
                params![now.millis(), limit(n)],
            )?;
            let mut out = Vec::with_capacity(due.len());
            for mut a in due {
                let was = a.status;
                a.status = ApprovalStatus::Expired;
                let doc = approval_doc(&a)?;
                w.conn
                    .prepare_cached(
                        "UPDATE approvals SET status = 'expired', doc = ?2, announce_ms = NULL \
                         WHERE id = ?1",
                    )?
                    .execute(params![a.id, doc])?;
                let mut ev = AuditDraft::new(now, "approval.expired", "system")
                    .workload(&a.workload)
                    .role(&a.role)
                    .data("approval", a.id.clone())
                    .data("was", was.as_str());
                if let Some(t) = &a.task {
                    ev = ev.task(t);
                }
                w.audit(ev)?;
                out.push(a);
            }
            Ok(out)
        })
        .await
    }

    async fn approvals_to_announce(&self, now: Timestamp, n: u32) -> Result<Vec<Approval>> {
        self.read(move |c| {
            query_approvals(
                c,
                "SELECT requester_key, doc FROM approvals \
                 WHERE announce_ms IS NOT NULL AND announce_ms <= ?1 AND status = 'pending' \
                 ORDER BY announce_ms LIMIT ?2",
                params![now.millis(), limit(n)],
            )
        })
        .await
    }

    async fn approval_announced(&self, id: &str, next: Option<Timestamp>) -> Result<()> {
        let id = id.to_owned();
        self.write(move |w| {
            w.conn
                .prepare_cached(
                    "UPDATE approvals SET announce_ms = ?2, \
                     announce_attempts = announce_attempts + 1 WHERE id = ?1",
                )?
                .execute(params![id, next.map(Timestamp::millis)])?;
            Ok(())
        })
        .await
    }

    async fn put_secret(&self, name: &str, sealed: Vec<u8>, now: Timestamp) -> Result<()> {
        let name = name.to_owned();
        self.write(move |w| {
            w.conn
                .prepare_cached(
                    "INSERT INTO secrets (name, sealed, updated_ms) VALUES (?1, ?2, ?3) \
                     ON CONFLICT(name) DO UPDATE SET sealed = excluded.sealed, updated_ms = excluded.updated_ms",
                )?
                .execute(params![name, sealed, now.millis()])?;
            Ok(())
        })
        .await
    }

    async fn get_secret(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let name = name.to_owned();
        self.read(move |c| {
            Ok(
                c.prepare_cached("SELECT sealed FROM secrets WHERE name = ?1")?
                    .query_row([name], |r| r.get(0))
                    .optional()?,
            )
        })
        .await
    }

    async fn counts(&self) -> Result<Counts> {
        self.read(|c| {
            let tasks_active: i64 = c
                .prepare_cached("SELECT COUNT(*) FROM tasks WHERE status = 'active'")?
                .query_row([], |r| r.get(0))?;
            let mut leases = Vec::new();
            for s in [
                LeaseState::Pending,
                LeaseState::Active,
                LeaseState::Revoking,
            ] {
                let n: i64 = c
                    .prepare_cached("SELECT COUNT(*) FROM leases WHERE state = ?1")?
                    .query_row([s.as_str()], |r| r.get(0))?;
                leases.push((s, n as u64));
            }
            let head: Option<i64> = c.query_row("SELECT MAX(seq) FROM audit", [], |r| r.get(0))?;
            Ok(Counts {
                tasks_active: tasks_active as u64,
                leases,
                audit_head: head.unwrap_or(0) as u64,
            })
        })
        .await
    }
}
