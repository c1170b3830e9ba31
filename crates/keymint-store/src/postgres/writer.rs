//! The writer task of one process: it takes every queued write job (up to
//! [`MAX_BATCH`]) and runs them in one transaction, each inside its own
//! savepoint when there are several.
//!
//! Every transaction first locks the chain head row (`audit_head ... FOR
//! UPDATE`). That one lock serialises writers across all replicas: the
//! audit sequence is extended by one holder at a time, commits in order
//! (the lock is released only at commit, after the commit is visible), and
//! every state change is decided on the latest committed state. A batch
//! amortises the lock and the commit over many jobs, as the SQLite writer
//! amortises its fsync.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use deadpool_postgres::{ClientWrapper, Object, Pool};
use keymint_core::audit::{AuditDraft, AuditEvent};
use keymint_core::model::{Lease, Task};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Statement;
use tokio_postgres::types::ToSql;

use super::{leases, pg_err, tasks};
use crate::{Result, StoreError};

/// The most jobs one transaction takes.
pub const MAX_BATCH: usize = 256;

/// The channel on which a committed revocation is announced; the payload is
/// the schema, so stores in other schemas of the database ignore it.
pub(super) const CHANNEL: &str = "keymint_revocations";

#[derive(Debug, Clone)]
struct Chain {
    seq: u64,
    hash: String,
}

/// What a write job sees: the connection inside the open transaction and
/// the head of the audit chain.
#[derive(Debug)]
pub(super) struct PgWriter {
    client: Object,
    chain: Chain,
    revoked: bool,
    /// The savepoint of the job before is still to be released: the next
    /// job's `SAVEPOINT` carries the `RELEASE` (COMMIT releases the last).
    release_pending: bool,
    /// The number in the name of the current job's savepoint (`j<n>`):
    /// each job has its own name, so rolling back can only ever reach the
    /// failed job's own savepoint, never an earlier job's.
    savepoint: u32,
    /// Tasks read by lease-insert jobs of this batch ([`Self::task_cached`]).
    /// Only jobs that change no task keep it; every other job empties it
    /// before and after it runs, so a cached task is always the task as
    /// this transaction sees it.
    tasks: HashMap<String, Option<Task>>,
    /// Lease rows and audit events of issuances not yet sent: they go to
    /// the database as two multi-row inserts before the next job that is
    /// not an issuance, and before the head update ([`Self::flush`]).
    deferred: Deferred,
}

/// Rows kept for [`PgWriter::flush`], one vector per column.
#[derive(Debug, Default)]
pub(super) struct Deferred {
    pub(super) lease_id: Vec<String>,
    pub(super) task_id: Vec<String>,
    pub(super) workload: Vec<String>,
    pub(super) role: Vec<String>,
    pub(super) engine: Vec<&'static str>,
    pub(super) scopes: Vec<String>,
    pub(super) state: Vec<&'static str>,
    pub(super) revocability: Vec<&'static str>,
    pub(super) fingerprint: Vec<String>,
    pub(super) created_ms: Vec<i64>,
    pub(super) expires_ms: Vec<i64>,
    pub(super) engine_data: Vec<Option<String>>,
    pub(super) seq: Vec<i64>,
    pub(super) hash: Vec<String>,
    pub(super) event: Vec<String>,
}

impl PgWriter {
    pub(super) fn c(&self) -> &ClientWrapper {
        &self.client
    }

    /// Appends an event to the chain, in this transaction.
    pub(super) async fn audit(&mut self, draft: AuditDraft) -> Result<AuditEvent> {
        let (event, line) = self.seal(draft);
        self.append(&event, &line).await?;
        Ok(event)
    }

    /// Seals the next event of the chain (no I/O): the head moves to it,
    /// and [`Self::append`] must write it in this job, or the job fail
    /// (a failed job's head is restored). Split from `append` so that a
    /// job can send the event's insert together with its other writes.
    /// Returns the event and its stored line, made from the serialisation
    /// the hash was computed on ([`AuditDraft::seal_line`]).
    pub(super) fn seal(&mut self, draft: AuditDraft) -> (AuditEvent, String) {
        let seq = self.chain.seq + 1;
        let (event, line) = draft.seal_line(seq, &self.chain.hash);
        self.chain.seq = seq;
        self.chain.hash.clone_from(&event.hash);
        (event, line)
    }

    /// Writes an event [`Self::seal`] made, as its line.
    pub(super) async fn append(&self, event: &AuditEvent, line: &str) -> Result<()> {
        let stmt = self
            .client
            .prepare_cached("INSERT INTO audit (seq, hash, event) VALUES ($1, $2, $3)")
            .await
            .map_err(|e| pg_err("audit append", &e))?;
        self.client
            .execute(&stmt, &[&(event.seq as i64), &event.hash, &line])
            .await
            .map_err(|e| pg_err("audit append", &e))?;
        Ok(())
    }

    /// Records that this job moved leases out of `active`: the commit bumps
    /// the revocation epoch and notifies every replica.
    pub(super) fn revoked(&mut self) {
        self.revoked = true;
    }

    pub(super) async fn task(&self, id: &str) -> Result<Option<Task>> {
        tasks::get(self.c(), id).await
    }

    /// [`Self::task`], read once per batch for as long as only jobs that
    /// change no task have run (see [`PgWriter::tasks`]): the issuances of
    /// one task queued together cost one read, not one round trip each.
    pub(super) async fn task_cached(&mut self, id: &str) -> Result<Option<Task>> {
        if let Some(t) = self.tasks.get(id) {
            return Ok(t.clone());
        }
        let t = tasks::get(self.c(), id).await?;
        self.tasks.insert(id.to_owned(), t.clone());
        Ok(t)
    }

    /// Sends a statement of this transaction without waiting for its
    /// answer (see [`send_only`]), so the jobs of a batch do not each wait
    /// a round trip under the chain head's lock. Its failure aborts the
    /// transaction: every later statement then fails, including the head
    /// update that [`run_batch`] always awaits before COMMIT once the chain
    /// moved, and the whole batch fails with nothing committed. Only for
    /// statements that fail solely when the database does (not on a rule).
    pub(super) fn send(&self, stmt: &Statement, params: &[&(dyn ToSql + Sync)]) -> Result<()> {
        let mut fut = std::pin::pin!(self.client.execute(stmt, params));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match fut.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(Err(e)) => Err(pg_err("statement", &e)),
            _ => Ok(()),
        }
    }

    /// The rows an issuance adds, kept to be sent with the other
    /// issuances' of this batch ([`Self::flush`]).
    pub(super) fn deferred(&mut self) -> &mut Deferred {
        &mut self.deferred
    }

    /// Sends the kept lease rows and events, one multi-row insert each,
    /// without waiting for their answers ([`Self::send`]): fresh ids and
    /// the next chain positions cannot clash, so they fail only when the
    /// database does, and then the transaction is aborted and the whole
    /// batch fails at its awaited head update. Called before any job that
    /// is not an issuance (which may read or move these leases) and before
    /// the head update, so every statement sees them where the jobs were
    /// queued.
    async fn flush(&mut self) -> Result<()> {
        if self.deferred.lease_id.is_empty() && self.deferred.seq.is_empty() {
            return Ok(());
        }
        let d = std::mem::take(&mut self.deferred);
        if !d.lease_id.is_empty() {
            let stmt = self
                .client
                .prepare_cached(
                    "INSERT INTO leases (id, task_id, workload, role, engine, scopes, state, \
                     revocability, fingerprint, created_ms, expires_ms, engine_data) \
                     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], \
                     $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::int8[], \
                     $11::int8[], $12::text[])",
                )
                .await
                .map_err(|e| pg_err("prepare", &e))?;
            self.send(
                &stmt,
                &[
                    &d.lease_id,
                    &d.task_id,
                    &d.workload,
                    &d.role,
                    &d.engine,
                    &d.scopes,
                    &d.state,
                    &d.revocability,
                    &d.fingerprint,
                    &d.created_ms,
                    &d.expires_ms,
                    &d.engine_data,
                ],
            )?;
        }
        if !d.seq.is_empty() {
            let stmt = self
                .client
                .prepare_cached(
                    "INSERT INTO audit (seq, hash, event) \
                     SELECT * FROM unnest($1::int8[], $2::text[], $3::text[])",
                )
                .await
                .map_err(|e| pg_err("audit append", &e))?;
            self.send(&stmt, &[&d.seq, &d.hash, &d.event])?;
        }
        Ok(())
    }

    pub(super) async fn lease(&self, id: &str) -> Result<Option<Lease>> {
        leases::get(self.c(), id).await
    }
}

pub(super) type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
pub(super) type WriteFn<T> =
    Box<dyn for<'a> FnOnce(&'a mut PgWriter) -> BoxFut<'a, Result<T>> + Send>;

/// How a job ended inside the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ran {
    Ok,
    /// The job failed; its changes are rolled back (to its savepoint).
    Failed,
    /// The transaction itself is broken: the whole batch must fail.
    Broken,
}

pub(super) trait Job: Send {
    fn run<'a>(&'a mut self, w: &'a mut PgWriter, savepoint: bool) -> BoxFut<'a, Ran>;
    /// The task of an issuance ([`FnJob::issuance`]): the batch reads it
    /// together with the head's lock.
    fn prefetch(&self) -> Option<&str>;
    fn finish(self: Box<Self>, commit: std::result::Result<(), String>);
}

impl std::fmt::Debug for dyn Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

pub(super) struct FnJob<T> {
    pub(super) f: Option<WriteFn<T>>,
    /// An issuance, on this task. It changes no task, so the batch's task
    /// cache stays valid across it ([`PgWriter::task_cached`]); it reads
    /// the task first (the batch reads it with the head's lock) and writes
    /// nothing but the rows it keeps for [`PgWriter::flush`], so it needs
    /// no savepoint of its own. `None`: any other job.
    pub(super) issuance: Option<String>,
    pub(super) out: Option<Result<T>>,
    pub(super) reply: oneshot::Sender<Result<T>>,
}

impl<T: Send> Job for FnJob<T> {
    fn prefetch(&self) -> Option<&str> {
        self.issuance.as_deref()
    }

    fn run<'a>(&'a mut self, w: &'a mut PgWriter, savepoint: bool) -> BoxFut<'a, Ran> {
        Box::pin(async move {
            let Some(f) = self.f.take() else {
                return Ran::Ok;
            };
            // An issuance writes nothing itself: no savepoint to roll back
            // to. Any other job may read or move what the issuances before
            // it kept, so those go first.
            let issuance = self.issuance.is_some();
            let savepoint = savepoint && !issuance;
            if !issuance && let Err(e) = w.flush().await {
                self.out = Some(Err(e));
                return Ran::Broken;
            }
            if savepoint {
                // Sent ahead of the job's first statement, not waited for
                // (one round trip less per job); see `send_only`.
                let before = w.savepoint;
                w.savepoint += 1;
                let sql = if w.release_pending {
                    format!("RELEASE SAVEPOINT j{before}; SAVEPOINT j{}", w.savepoint)
                } else {
                    format!("SAVEPOINT j{}", w.savepoint)
                };
                if !send_only(&w.client, &sql) {
                    self.out = Some(Err(StoreError::Backend(
                        "postgres store: the connection is closed".into(),
                    )));
                    return Ran::Broken;
                }
                w.release_pending = false;
            }
            if !issuance {
                w.tasks.clear();
            }
            let (chain, revoked) = (w.chain.clone(), w.revoked);
            let r = f(w).await;
            if !issuance {
                w.tasks.clear();
            }
            let ok = r.is_ok();
            if !ok {
                w.chain = chain;
                w.revoked = revoked;
            }
            self.out = Some(r);
            if savepoint {
                if ok {
                    // Released by the next job's savepoint, or by COMMIT.
                    w.release_pending = true;
                } else if w
                    .client
                    .batch_execute(&format!(
                        "ROLLBACK TO SAVEPOINT j{0}; RELEASE SAVEPOINT j{0}",
                        w.savepoint
                    ))
                    .await
                    .is_err()
                {
                    return Ran::Broken;
                }
            }
            if ok { Ran::Ok } else { Ran::Failed }
        })
    }

    fn finish(self: Box<Self>, commit: std::result::Result<(), String>) {
        let out = match (self.out, commit) {
            // Nothing committed: the database's failure, not the job's.
            (Some(Err(_)), Err(e)) => Err(StoreError::Unavailable(e)),
            (Some(Err(e)), Ok(())) => Err(e),
            (Some(Ok(v)), Ok(())) => Ok(v),
            // The batch did not commit: the database cannot take writes
            // now (unreachable, read-only, failing over).
            (Some(Ok(_)), Err(e)) => Err(StoreError::Unavailable(e)),
            (None, Err(e)) => Err(StoreError::Unavailable(e)),
            (None, Ok(())) => Err(StoreError::Closed),
        };
        let _ = self.reply.send(out);
    }
}

/// Why the last batch failed, or `None` once one commits
/// ([`crate::Store::write_failure`]).
pub(super) type Failure = std::sync::Arc<std::sync::Mutex<Option<String>>>;

fn set_failure(failure: &Failure, why: Option<String>) {
    if let Ok(mut f) = failure.lock() {
        *f = why;
    }
}

/// Sends `sql` (a simple-query batch) without waiting for its answer:
/// tokio-postgres queues a request on the first poll of its future, and
/// its connection reads and drops the answer of a request whose future is
/// gone. Only for statements whose failure the transaction's next awaited
/// statement reports: an error aborts a PostgreSQL transaction, and every
/// later statement but `ROLLBACK` then fails (`run_batch` ends every batch
/// that used this with an awaited statement before its COMMIT). `false`
/// when the request could not be queued (the connection is closed).
fn send_only(client: &Object, sql: &str) -> bool {
    let mut fut = std::pin::pin!(client.batch_execute(sql));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    !matches!(fut.as_mut().poll(&mut cx), std::task::Poll::Ready(Err(_)))
}

/// Runs the write jobs of the replica `me` (its id marks the rows it
/// owns, `replicas.rs`).
pub(super) async fn writer_loop(
    pool: Pool,
    mut jobs: mpsc::UnboundedReceiver<Box<dyn Job>>,
    me: String,
    failure: Failure,
) {
    let mut conn: Option<Object> = None;
    while let Some(first) = jobs.recv().await {
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let client = match conn.take() {
            Some(c) if !c.is_closed() => c,
            _ => match pool.get().await {
                Ok(c) => c,
                Err(e) => {
                    let msg = format!("postgres store: no connection: {e}");
                    tracing::error!(error = %msg, "write batch failed");
                    set_failure(&failure, Some(msg.clone()));
                    for j in batch {
                        j.finish(Err(msg.clone()));
                    }
                    continue;
                }
            },
        };
        let (client, result) = run_batch(client, &mut batch, &me).await;
        match &result {
            Err(msg) => {
                tracing::error!(error = %msg, jobs = batch.len(), "write batch failed");
                set_failure(&failure, Some(msg.clone()));
            }
            Ok(()) => set_failure(&failure, None),
        }
        for j in batch {
            j.finish(result.clone());
        }
        if !client.is_closed() {
            conn = Some(client);
        }
    }
}

/// Runs one batch in one transaction. `Err` fails every job of the batch
/// (nothing was committed); with `Ok`, each job's own result stands.
async fn run_batch(
    client: Object,
    batch: &mut [Box<dyn Job>],
    me: &str,
) -> (Object, std::result::Result<(), String>) {
    // The tasks the leading jobs read (issuances, which change no task)
    // are read in the same round trip as the lock, after it: what a job
    // then finds in the cache is what its own read would have returned as
    // the first statement after the lock, one round trip less under it.
    let mut prefetch: Vec<&str> = Vec::new();
    for j in batch.iter() {
        match j.prefetch() {
            Some(t) if !prefetch.contains(&t) => prefetch.push(t),
            Some(_) => {}
            None => break,
        }
    }
    let begin = async {
        // `me` is keymint's own identifier (letters, digits, `_`): the
        // owner of the rows this transaction moves.
        let begin_sql = format!("BEGIN; SET LOCAL keymint.replica = '{me}'");
        let stmt = client
            .prepare_cached("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
            .await?;
        let tasks_stmt = if prefetch.is_empty() {
            None
        } else {
            Some(client.prepare_cached(&tasks::BY_IDS).await?)
        };
        let read_tasks = async {
            match &tasks_stmt {
                Some(s) => client.query(s, &[&prefetch]).await.map(Some),
                None => Ok(None),
            }
        };
        // BEGIN, the lock and the tasks in one round trip (every answer
        // is read; the requests go out in this order).
        let (began, row, tasks) = tokio::join!(
            client.batch_execute(&begin_sql),
            client.query_one(&stmt, &[]),
            read_tasks
        );
        began?;
        let row = row?;
        Ok::<_, tokio_postgres::Error>((
            Chain {
                seq: row.try_get::<_, i64>(0)?.max(0) as u64,
                hash: row.try_get(1)?,
            },
            tasks?,
        ))
    };
    let (chain, task_rows) = match begin.await {
        Ok(c) => c,
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            return (client, Err(pg_err("begin", &e).to_string()));
        }
    };
    let mut cached = HashMap::new();
    if let Some(rows) = task_rows {
        let read: Result<Vec<Task>> = rows.iter().map(|r| tasks::task_from_row(r, 0)).collect();
        // A row that does not map is left to the job's own read, which
        // reports it.
        if let Ok(read) = read {
            cached.extend(read.into_iter().map(|t| (t.id.clone(), Some(t))));
            for id in &prefetch {
                cached.entry((*id).to_owned()).or_insert(None);
            }
        }
    }
    let start_seq = chain.seq;
    let mut w = PgWriter {
        client,
        chain,
        revoked: false,
        release_pending: false,
        savepoint: 0,
        tasks: cached,
        deferred: Deferred::default(),
    };
    let savepoints = batch.len() > 1;
    for j in batch.iter_mut() {
        match j.run(&mut w, savepoints).await {
            Ran::Ok => {}
            // A lone job needs no savepoint: its failure rolls back the
            // whole transaction, and it alone hears of it.
            Ran::Failed if !savepoints => {
                let _ = w.client.batch_execute("ROLLBACK").await;
                if w.client.is_closed() {
                    return (
                        w.client,
                        Err("the connection to PostgreSQL was lost".into()),
                    );
                }
                return (w.client, Ok(()));
            }
            Ran::Failed => {}
            Ran::Broken => {
                let _ = w.client.batch_execute("ROLLBACK").await;
                return (
                    w.client,
                    Err("the transaction failed; the batch was rolled back".into()),
                );
            }
        }
    }
    // The issuances' rows go before the head update, whose awaited answer
    // reports their failure.
    if let Err(e) = w.flush().await {
        let _ = w.client.batch_execute("ROLLBACK").await;
        return (w.client, Err(e.to_string()));
    }
    let finish = async {
        // The head is written whenever savepoints were sent without
        // waiting, even if unchanged: PostgreSQL answers COMMIT of a
        // transaction that an earlier statement aborted with a rollback,
        // not an error, so an awaited statement must come last to report
        // such an error before anything is acknowledged.
        let write_head = w.chain.seq != start_seq || w.revoked || savepoints;
        let stmt = w
            .client
            .prepare_cached(
                "UPDATE audit_head SET seq = $1, hash = $2, \
                 revocation_epoch = revocation_epoch + $3 WHERE id = 1",
            )
            .await?;
        let notify_stmt = w
            .client
            .prepare_cached("SELECT pg_notify($1, current_schema())")
            .await?;
        let (seq, bump) = (w.chain.seq as i64, i64::from(u8::from(w.revoked)));
        let channel = CHANNEL.to_owned();
        let head = async {
            if write_head {
                w.client
                    .execute(&stmt, &[&seq, &w.chain.hash, &bump])
                    .await
                    .map(drop)
            } else {
                Ok(())
            }
        };
        let notify = async {
            if w.revoked {
                // Delivered to every listener when (and only if) this commits.
                w.client.execute(&notify_stmt, &[&channel]).await.map(drop)
            } else {
                Ok(())
            }
        };
        // One round trip: the head, the notification and the COMMIT are
        // sent together, and every answer is read. If the head or the
        // notification failed, the COMMIT that follows rolled back.
        let (head, notify, commit) = tokio::join!(head, notify, w.client.batch_execute("COMMIT"));
        head?;
        notify?;
        commit
    };
    match finish.await {
        Ok(()) => (w.client, Ok(())),
        Err(e) => {
            let _ = w.client.batch_execute("ROLLBACK").await;
            (w.client, Err(pg_err("commit", &e).to_string()))
        }
    }
}
