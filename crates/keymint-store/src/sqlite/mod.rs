//! The embedded store: SQLite in WAL mode.
//!
//! Writes go through one writer thread. It takes every job waiting in its
//! queue (up to [`MAX_BATCH`]), runs each inside its own savepoint (a
//! lease's insert without one: its failure after a write fails the batch,
//! `writer::Undo`) and commits them together. The commit itself does not
//! wait for the disk (`synchronous=NORMAL`); the batch goes to a syncer thread, which
//! `fdatasync`s the WAL file once for every batch that queued up meanwhile
//! and only then answers the callers. So the writer works on the next batch
//! while the disk syncs the last ones (pipelined group commit), and nobody
//! hears "done" before the data is on disk (DESIGN.md invariant 2). While a
//! sync is in progress the writer keeps its transaction open for the jobs
//! that arrive, and commits when the syncer is free (docs/design/0036,
//! "Sixth pass").
//! Concurrent readers may see a committed change a moment before it is
//! durable; whoever made it has not been told yet. The audit chain is
//! extended by the writer in the same transaction as the change it records,
//! so the chain and the state never disagree, even across a crash.
//!
//! Reads use a small pool of read-only connections on the blocking thread
//! pool, never the async workers.
//!
//! The parts: `schema` (migrations and connection settings), `writer` (the
//! writer thread, its jobs and the audit chain head), `syncer` (the
//! `fdatasync`, and what is known to be durable), `checkpointer` (copies
//! the WAL back into the database off the commit path), `reader` (the read pool),
//! and one module of queries per domain area: `tasks`, `leases`,
//! `lifecycle` (expiry and revocation), `audit`, `approvals`, `entries`,
//! `secrets`, `retention`, `budgets` (the proxy's budgets and reservations). The [`Store`] implementation below only says, for
//! each method, whether it is a write job or a read, and calls into those
//! modules.

mod approvals;
mod audit;
mod budgets;
mod checkpointer;
mod entries;
mod inventory;
mod leases;
mod lifecycle;
mod monitor;
mod rates;
mod reader;
mod retention;
mod row;
mod schema;
mod secrets;
mod syncer;
mod task_cache;
mod tasks;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use keymint_core::Timestamp;
use keymint_core::audit::{AuditDraft, AuditEvent, GENESIS};
use keymint_core::model::{
    Approval, ApprovalStatus, EndReason, Lease, LeaseState, RegistrationEntry, Task,
};
use rusqlite::{Connection, OptionalExtension};
use tokio::sync::oneshot;

use self::reader::{READERS, ReadPool};
use self::schema::{configure, migrate};
use self::syncer::{Durability, syncer_loop};
use self::task_cache::TaskCache;
pub use self::writer::MAX_BATCH;
use self::writer::{Chain, FnJob, Job, ToWriter, Undo, Writer, writer_loop};
use crate::{
    ApprovalChange, BudgetFn, BudgetReservation, BudgetSettle, ChunkSettle, Counts, EndedTree,
    LeaseFilter, LeaseGrantFn, LeaseSelector, Pruned, RenewFn, ReservationFor, Result,
    RevocationDone, Store, StoreError, SummaryFn, TaskEnd, TaskFilter, TaskGrantFn, Usage,
};

/// The embedded SQLite store.
#[derive(Debug)]
pub struct SqliteStore {
    /// The writer's queue; the syncer holds it weakly (it wakes the
    /// writer), so the writer ends when the store is dropped.
    jobs: Arc<mpsc::Sender<ToWriter>>,
    durability: Arc<Durability>,
    readers: Arc<ReadPool>,
    /// At most [`READERS`] reads run at once, so a pooled connection is
    /// always free and none is opened (and its schema parsed) per read.
    read_slots: Arc<tokio::sync::Semaphore>,
    /// Tasks read before a grant, valid until the writer may have changed
    /// one (`task_cache`).
    tasks: Arc<TaskCache>,
}

/// How many times [`SqliteStore::lock`] tries the lock, and how long it
/// waits between two tries (5 s in all: a process stopping as this one
/// starts).
const LOCK_ATTEMPTS: u32 = 250;
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(20);

/// The exclusive lock of one SQLite store, held while it lives (and by the
/// kernel no longer than its process, kill -9 included).
#[derive(Debug)]
pub struct StoreLock {
    _file: std::fs::File,
}

/// Takes the exclusive lock of the store at `path`: an `flock` on
/// `<path>.lock`, created (mode 0600) if missing, never removed (a lock
/// file that stays is free once its holder is gone). A separate file: a
/// second descriptor on the database itself would, when closed, drop the
/// POSIX locks SQLite holds on it.
fn lock_store(path: &Path) -> Result<StoreLock> {
    use std::os::unix::fs::OpenOptionsExt;
    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| StoreError::Backend(format!("cannot open `{}`: {e}", lock_path.display())))?;
    for _ in 0..LOCK_ATTEMPTS {
        match file.try_lock() {
            Ok(()) => return Ok(StoreLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => std::thread::sleep(LOCK_RETRY),
            // A file system without locks (some network ones) serves as
            // before: the operator keeps to one process.
            Err(std::fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
                tracing::warn!(
                    path = %lock_path.display(),
                    "the file system cannot lock the store: make sure one process serves it"
                );
                return Ok(StoreLock { _file: file });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::Backend(format!(
                    "cannot lock `{}`: {e}",
                    lock_path.display()
                )));
            }
        }
    }
    Err(StoreError::Backend(format!(
        "`{}` is open in another keymint process: one process serves a SQLite store \
         (stop the other, or run replicas on PostgreSQL)",
        path.display()
    )))
}

impl SqliteStore {
    /// The lock of the one process that serves the store at `path`:
    /// refused while another process holds it. The writer keeps the head
    /// of the audit chain in memory and a start-up revokes every pending
    /// lease as a crash leftover, so a second process on one store would
    /// revoke the first's issuances in flight and collide with its chain
    /// (docs/design/0022, "One process per SQLite store").
    pub fn lock(path: &Path) -> Result<StoreLock> {
        lock_store(path)
    }

    /// Refuses a database file that is missing or empty beside a write-ahead
    /// log that holds changes. keymint never leaves that state (setting WAL
    /// mode writes the database's first page before any log exists), so
    /// the file was lost or emptied after a crash; SQLite would open it as
    /// a new, empty database and write over the log, losing the changes it
    /// holds and starting the audit chain over.
    pub fn refuse_lost_database(path: &Path) -> Result<()> {
        let wal = PathBuf::from(format!("{}-wal", path.display()));
        let logged = std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0);
        let empty = std::fs::metadata(path).map_or(true, |m| m.len() == 0);
        if logged && empty {
            return Err(StoreError::Backend(format!(
                "the database file `{}` is missing or empty but its write-ahead log `{}` \
                 holds changes: refusing to start a new store over them (put the database \
                 file back, or move the log away to start a new store)",
                path.display(),
                wal.display()
            )));
        }
        Ok(())
    }

    /// Opens (creating if needed) the database at `path` and runs migrations.
    /// Opening reads only the head of the audit chain, whatever the number of
    /// leases, so a restart is ready at once.
    ///
    /// Nothing here stops another process from opening the same file: a
    /// process that serves the store takes [`Self::lock`] first.
    pub fn open(path: &Path) -> Result<Self> {
        Self::refuse_lost_database(path)?;
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
        let (tx, rx) = mpsc::channel::<ToWriter>();
        let (sync_tx, sync_rx) = mpsc::channel::<(Vec<Box<dyn Job>>, u64)>();
        let wal = PathBuf::from(format!("{}-wal", path.display()));
        // Everything on disk at open is durable.
        let durability = Arc::new(Durability {
            audit_seq: std::sync::atomic::AtomicU64::new(chain.seq),
            poisoned: std::sync::atomic::AtomicBool::new(false),
            last_failure: Mutex::new(None),
        });
        let tx = Arc::new(tx);
        let wake_writer = Arc::downgrade(&tx);
        let (d1, d2) = (Arc::clone(&durability), Arc::clone(&durability));
        let tasks = Arc::new(TaskCache::default());
        let writer_tasks = Arc::clone(&tasks);
        // The writer holds `alive` and never sends: when it ends, the
        // checkpointer does too.
        let (alive, writer_gone) = mpsc::channel::<()>();
        let db = path.to_owned();
        std::thread::Builder::new()
            .name("keymint-sqlite-checkpoint".into())
            .spawn(move || checkpointer::checkpointer_loop(&db, &writer_gone))
            .map_err(|e| {
                StoreError::Backend(format!("cannot start the checkpointer thread: {e}"))
            })?;
        std::thread::Builder::new()
            .name("keymint-sqlite-sync".into())
            .spawn(move || syncer_loop(wal, sync_rx, d1, wake_writer))
            .map_err(|e| StoreError::Backend(format!("cannot start the syncer thread: {e}")))?;
        std::thread::Builder::new()
            .name("keymint-sqlite-writer".into())
            .spawn(move || {
                writer_loop(conn, rx, chain, sync_tx, d2, writer_tasks);
                drop(alive);
            })
            .map_err(|e| StoreError::Backend(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            jobs: tx,
            durability,
            readers: Arc::new(ReadPool {
                path: path.to_owned(),
                idle: Mutex::new(Vec::new()),
            }),
            read_slots: Arc::new(tokio::sync::Semaphore::new(READERS)),
            tasks,
        })
    }

    /// A write job that may change tasks (every job unless it says
    /// otherwise: [`Self::write_keeping_tasks`]).
    async fn write<T: Send + 'static>(
        &self,
        f: impl for<'a> FnOnce(&mut Writer<'a>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.write_job(f, false, Undo::Savepoint).await
    }

    /// A write job that writes no task row, so it leaves the task cache
    /// valid: only for the jobs named in `task_cache`'s documentation.
    async fn write_keeping_tasks<T: Send + 'static>(
        &self,
        f: impl for<'a> FnOnce(&mut Writer<'a>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.write_job(f, true, Undo::Savepoint).await
    }

    async fn write_job<T: Send + 'static>(
        &self,
        f: impl for<'a> FnOnce(&mut Writer<'a>) -> Result<T> + Send + 'static,
        keeps_tasks: bool,
        undo: Undo,
    ) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(FnJob {
            f: Some(Box::new(f)),
            out: None,
            reply,
            keeps_tasks,
            undo,
        });
        self.jobs
            .send(ToWriter::Job(job))
            .map_err(|_| StoreError::Closed)?;
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
                tasks::insert_task(w.conn, t)?;
            }
            for l in &leases {
                leases::insert_lease_row(w.conn, l)?;
            }
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn write_failure(&self) -> Option<String> {
        if self
            .durability
            .poisoned
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Some(syncer::POISONED.to_owned());
        }
        self.durability
            .last_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    async fn create_task(&self, parent: Option<&str>, grant: TaskGrantFn) -> Result<Task> {
        let parent = parent.map(str::to_owned);
        self.write(move |w| tasks::create(w, parent.as_deref(), grant))
            .await
    }

    async fn get_task(&self, id: &str) -> Result<Option<Task>> {
        let id = id.to_owned();
        self.read(move |c| tasks::get(c, &id)).await
    }

    async fn task_before_grant(&self, id: &str) -> Result<Option<Task>> {
        if let Some(t) = self.tasks.get(id) {
            return Ok(Some(t));
        }
        // Noted before the read: a change committed meanwhile leaves this
        // epoch behind, and what is read now is not served again.
        let read_at = self.tasks.epoch();
        let id = id.to_owned();
        let t = self.read(move |c| tasks::get(c, &id)).await?;
        if let Some(t) = &t {
            self.tasks.put(read_at, t);
        }
        Ok(t)
    }

    async fn list_tasks(&self, f: &TaskFilter) -> Result<Vec<Task>> {
        let f = f.clone();
        self.read(move |c| tasks::list(c, &f)).await
    }

    async fn touch_task(&self, id: &str, now: Timestamp) -> Result<Option<Task>> {
        let id = id.to_owned();
        self.write(move |w| tasks::touch(w, &id, now)).await
    }

    async fn end_task(&self, end: TaskEnd) -> Result<Option<EndedTree>> {
        self.write(move |w| tasks::end(w, end)).await
    }

    async fn timed_out_tasks(&self, now: Timestamp, n: u32) -> Result<Vec<String>> {
        self.read(move |c| lifecycle::timed_out_tasks(c, now, n))
            .await
    }

    async fn insert_lease(&self, task: &str, grant: LeaseGrantFn) -> Result<Lease> {
        let task = task.to_owned();
        // Without a savepoint: the task is read and the grant decided
        // before the first write, and the two inserts after it fail only
        // when the database does (writer::Undo::Batch).
        self.write_job(move |w| leases::insert(w, &task, grant), true, Undo::Batch)
            .await
    }

    async fn activate_lease(&self, id: &str, audit: AuditDraft) -> Result<bool> {
        let id = id.to_owned();
        self.write_keeping_tasks(move |w| leases::activate(w, &id, audit))
            .await
    }

    async fn activate_minted_lease(
        &self,
        id: &str,
        fingerprint: &str,
        engine_data: serde_json::Value,
        audit: AuditDraft,
    ) -> Result<bool> {
        let (id, fp) = (id.to_owned(), fingerprint.to_owned());
        self.write_keeping_tasks(move |w| leases::activate_minted(w, &id, &fp, &engine_data, audit))
            .await
    }

    async fn get_lease(&self, id: &str) -> Result<Option<Lease>> {
        let id = id.to_owned();
        self.read(move |c| leases::get(c, &id)).await
    }

    async fn lease_by_fingerprint(&self, fp: &str) -> Result<Option<(Lease, Task)>> {
        let fp = fp.to_owned();
        self.read(move |c| leases::by_fingerprint(c, &fp)).await
    }

    async fn list_leases(&self, f: &LeaseFilter) -> Result<Vec<Lease>> {
        let f = f.clone();
        self.read(move |c| leases::list(c, &f)).await
    }

    async fn renew_lease(&self, id: &str, renew: RenewFn) -> Result<Lease> {
        let id = id.to_owned();
        self.write(move |w| leases::renew(w, &id, renew)).await
    }

    async fn request_revocation(
        &self,
        selector: LeaseSelector,
        reason: EndReason,
        now: Timestamp,
        actor: &str,
    ) -> Result<Vec<Lease>> {
        let actor = actor.to_owned();
        self.write(move |w| lifecycle::request_revocation(w, &selector, reason, now, &actor))
            .await
    }

    async fn revoke_ended_leases(
        &self,
        task: Option<&str>,
        now: Timestamp,
        actor: &str,
        n: u32,
    ) -> Result<Vec<Lease>> {
        let (task, actor) = (task.map(str::to_owned), actor.to_owned());
        self.write(move |w| lifecycle::revoke_ended_leases(w, task.as_deref(), now, &actor, n))
            .await
    }

    async fn expire_due(&self, now: Timestamp, n: u32) -> Result<Vec<Lease>> {
        self.write(move |w| lifecycle::expire_due(w, now, n)).await
    }

    async fn prune_ended(&self, before: Timestamp, now: Timestamp, n: u32) -> Result<Pruned> {
        self.write(move |w| retention::prune_ended(w, before, now, n))
            .await
    }

    async fn due_revocations(&self, now: Timestamp, n: u32) -> Result<Vec<Lease>> {
        self.write(move |w| lifecycle::due_revocations(w, now, n))
            .await
    }

    async fn stale_pending(&self, before: Timestamp, n: u32) -> Result<Vec<Lease>> {
        self.read(move |c| lifecycle::stale_pending(c, before, n))
            .await
    }

    async fn finish_revocations(&self, done: Vec<RevocationDone>, now: Timestamp) -> Result<()> {
        self.write(move |w| lifecycle::finish_revocations(w, done, now))
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
        self.write(move |w| lifecycle::revocation_failed(w, &id, next_attempt, &error, audit))
            .await
    }

    async fn next_deadline(&self) -> Result<Option<Timestamp>> {
        self.read(lifecycle::next_deadline).await
    }

    async fn append_audit(&self, draft: AuditDraft) -> Result<AuditEvent> {
        self.write_keeping_tasks(move |w| w.audit(draft)).await
    }

    async fn audit_after(&self, after: u64, n: u32) -> Result<Vec<AuditEvent>> {
        let durable = self.durable_audit_seq();
        self.read(move |c| audit::after(c, after, n, durable)).await
    }

    async fn audit_lines_after(&self, after: u64, n: u32) -> Result<Vec<(u64, String)>> {
        let durable = self.durable_audit_seq();
        self.read(move |c| audit::lines_after(c, after, n, durable))
            .await
    }

    async fn audit_tail(&self, n: u32) -> Result<Vec<AuditEvent>> {
        let head = self.durable_audit_seq();
        self.audit_after(head.saturating_sub(u64::from(n)), n).await
    }

    async fn sink_cursor(&self, sink: &str) -> Result<u64> {
        let sink = sink.to_owned();
        self.read(move |c| audit::sink_cursor(c, &sink)).await
    }

    async fn set_sink_cursor(&self, sink: &str, seq: u64) -> Result<()> {
        let sink = sink.to_owned();
        self.write_keeping_tasks(move |w| audit::set_sink_cursor(w, &sink, seq))
            .await
    }

    async fn create_approval(&self, a: Approval, audit: AuditDraft) -> Result<()> {
        self.write(move |w| approvals::create(w, &a, audit)).await
    }

    async fn create_entry(&self, e: RegistrationEntry, audit: AuditDraft) -> Result<()> {
        self.write(move |w| entries::create(w, &e, audit)).await
    }

    async fn get_entry(&self, id: &str) -> Result<Option<RegistrationEntry>> {
        let id = id.to_owned();
        self.read(move |c| entries::get(c, &id)).await
    }

    async fn list_entries(&self, node: Option<&str>) -> Result<Vec<RegistrationEntry>> {
        let node = node.map(str::to_owned);
        self.read(move |c| entries::list(c, node.as_deref())).await
    }

    async fn delete_entry(&self, id: &str, audit: AuditDraft) -> Result<Option<RegistrationEntry>> {
        let id = id.to_owned();
        self.write(move |w| entries::delete(w, &id, audit)).await
    }

    async fn get_approval(&self, id: &str) -> Result<Option<Approval>> {
        let id = id.to_owned();
        self.read(move |c| approvals::get(c, &id)).await
    }

    async fn list_approvals(
        &self,
        status: Option<ApprovalStatus>,
        n: u32,
    ) -> Result<Vec<Approval>> {
        self.read(move |c| approvals::list(c, status, n)).await
    }

    async fn transition_approval(&self, ch: ApprovalChange) -> Result<Option<Approval>> {
        self.write(move |w| approvals::transition(w, ch)).await
    }

    async fn expire_approvals(&self, now: Timestamp, n: u32) -> Result<Vec<Approval>> {
        // The sweeper asks every second: a read decides whether to write.
        let any: bool = self.read(move |c| approvals::any_expired(c, now)).await?;
        if !any {
            return Ok(Vec::new());
        }
        self.write(move |w| approvals::expire(w, now, n)).await
    }

    async fn approvals_to_announce(&self, now: Timestamp, n: u32) -> Result<Vec<Approval>> {
        self.read(move |c| approvals::to_announce(c, now, n)).await
    }

    async fn approval_announced(&self, id: &str, next: Option<Timestamp>) -> Result<()> {
        let id = id.to_owned();
        self.write(move |w| approvals::announced(w, &id, next))
            .await
    }

    async fn put_secret(&self, name: &str, sealed: Vec<u8>, now: Timestamp) -> Result<()> {
        let name = name.to_owned();
        self.write(move |w| secrets::put(w, &name, sealed, now))
            .await
    }

    async fn get_secret(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let name = name.to_owned();
        self.read(move |c| secrets::get(c, &name)).await
    }

    async fn swap_secret(
        &self,
        name: &str,
        expected: Option<Vec<u8>>,
        sealed: Vec<u8>,
        now: Timestamp,
    ) -> Result<bool> {
        let name = name.to_owned();
        self.write(move |w| secrets::swap(w, &name, expected, sealed, now))
            .await
    }

    async fn take_rates(
        &self,
        asks: Vec<crate::RateAsk>,
        now: Timestamp,
    ) -> Result<crate::RateTake> {
        self.write(move |w| rates::take(w, &asks, now)).await
    }

    async fn give_rates(&self, gives: Vec<crate::RateGive>, now: Timestamp) -> Result<()> {
        if gives.is_empty() {
            return Ok(());
        }
        self.write(move |w| rates::give(w, &gives, now)).await
    }

    async fn claim_once(&self, key: &str, until: Timestamp, now: Timestamp) -> Result<bool> {
        let key = key.to_owned();
        self.write(move |w| secrets::claim_once(w, &key, until, now))
            .await
    }

    async fn reserve_budget(
        &self,
        who: ReservationFor,
        decide: BudgetFn,
    ) -> Result<BudgetReservation> {
        self.write(move |w| budgets::reserve(w, &who, decide)).await
    }

    async fn settle_budget(&self, settles: Vec<BudgetSettle>) -> Result<()> {
        if settles.is_empty() {
            return Ok(());
        }
        self.write(move |w| budgets::settle(w, &settles)).await
    }

    async fn settle_chunks(&self, settles: Vec<ChunkSettle>) -> Result<u64> {
        if settles.is_empty() {
            return Ok(0);
        }
        self.write(move |w| budgets::settle_chunks(w, &settles))
            .await
    }

    async fn settle_stale_reservations(
        &self,
        before: Timestamp,
        now: Timestamp,
        n: u32,
    ) -> Result<u64> {
        // Swept periodically: a read decides whether to write.
        if !self.read(move |c| budgets::any_stale(c, before)).await? {
            return Ok(0);
        }
        self.write(move |w| budgets::settle_stale(w, before, now, n))
            .await
    }

    async fn summarise_usage(&self, n: u32, event: SummaryFn) -> Result<u64> {
        if !self.read(budgets::any_settled).await? {
            return Ok(0);
        }
        self.write(move |w| budgets::summarise(w, n, &event)).await
    }

    async fn budget_of(&self, task: &str) -> Result<(Usage, Usage)> {
        let task = task.to_owned();
        self.read(move |c| budgets::budget_of(c, &task)).await
    }

    async fn counts(&self) -> Result<Counts> {
        self.read(counts).await
    }

    async fn put_inventory(
        &self,
        item: keymint_core::inventory::InventoryItem,
        expected: u64,
        audit: AuditDraft,
    ) -> Result<bool> {
        self.write(move |w| inventory::put(w, &item, expected, audit))
            .await
    }

    async fn get_inventory(
        &self,
        id: &str,
    ) -> Result<Option<keymint_core::inventory::InventoryItem>> {
        let id = id.to_owned();
        self.read(move |c| inventory::get(c, &id)).await
    }

    async fn inventory_by_fingerprint(
        &self,
        fp: &str,
    ) -> Result<Option<keymint_core::inventory::InventoryItem>> {
        let fp = fp.to_owned();
        self.read(move |c| inventory::by_fingerprint(c, &fp)).await
    }

    async fn list_inventory(
        &self,
        before: Option<&str>,
        n: u32,
    ) -> Result<Vec<keymint_core::inventory::InventoryItem>> {
        let before = before.map(str::to_owned);
        self.read(move |c| inventory::list(c, before.as_deref(), n))
            .await
    }

    async fn add_usage_hours(&self, rows: Vec<keymint_core::monitor::UsageHour>) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        self.write(move |w| monitor::add_hours(w, &rows)).await
    }

    async fn usage_hours(
        &self,
        scope: keymint_core::monitor::Scope,
        subject: &str,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<keymint_core::monitor::UsageHour>> {
        let subject = subject.to_owned();
        self.read(move |c| monitor::hours(c, scope, &subject, from, to))
            .await
    }

    async fn note_sources(&self, rows: Vec<keymint_core::monitor::SourceSeen>) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        self.write(move |w| monitor::note_sources(w, &rows)).await
    }

    async fn prune_usage(&self, before: Timestamp) -> Result<u64> {
        self.write(move |w| monitor::prune(w, before)).await
    }

    async fn source_countries(&self, workload: &str) -> Result<Vec<String>> {
        let workload = workload.to_owned();
        self.read(move |c| monitor::countries(c, &workload)).await
    }

    async fn suspend(
        &self,
        s: keymint_core::monitor::Suspension,
        audit: AuditDraft,
    ) -> Result<bool> {
        self.write(move |w| monitor::suspend(w, &s, audit)).await
    }

    async fn lift_suspension(
        &self,
        id: &str,
        by: &str,
        now: Timestamp,
        audit: AuditDraft,
    ) -> Result<Option<keymint_core::monitor::Suspension>> {
        let (id, by) = (id.to_owned(), by.to_owned());
        self.write(move |w| monitor::lift(w, &id, &by, now, audit))
            .await
    }

    async fn active_suspensions(&self) -> Result<Vec<keymint_core::monitor::Suspension>> {
        self.read(monitor::active).await
    }
    async fn list_suspensions(
        &self,
        active_only: bool,
        n: u32,
    ) -> Result<Vec<keymint_core::monitor::Suspension>> {
        self.read(move |c| monitor::list(c, active_only, n)).await
    }
}

/// Live tasks, leases by live state and the audit head, for the metrics.
fn counts(c: &Connection) -> Result<Counts> {
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
}
