//! The single writer thread (group commit: see the documentation of the
//! `sqlite` module): it takes every queued job, runs each inside its own
//! savepoint (or none: [`Undo`]), commits the batch, and hands it to the
//! syncer.
//! [`Writer`] is what a job sees, and the only way to extend the audit
//! chain.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc;

use keymint_core::audit::{AuditDraft, AuditEvent};
use keymint_core::model::{Lease, Task};
use rusqlite::{Connection, params};
use tokio::sync::oneshot;

use super::syncer::{Durability, POISONED};
use super::task_cache::TaskCache;
use crate::{Result, StoreError};

/// The most jobs one transaction takes.
pub const MAX_BATCH: usize = 1024;

#[derive(Debug, Clone)]
pub(super) struct Chain {
    pub(super) seq: u64,
    pub(super) hash: String,
}

/// What a write job sees: the connection inside the open transaction and
/// the head of the audit chain.
#[derive(Debug)]
pub(super) struct Writer<'c> {
    pub(super) conn: &'c Connection,
    chain: &'c mut Chain,
    /// For a job that writes no task row: the tasks this transaction's
    /// jobs read since the last job that may have changed one (those
    /// empty it before and after they run), so a batch of issuances in
    /// one task reads it once, as the PostgreSQL writer does (design 0036,
    /// "Seventh pass"). `None` for a job that may change tasks itself.
    seen: Option<&'c mut HashMap<String, Task>>,
}

impl Writer<'_> {
    pub(super) fn audit(&mut self, draft: AuditDraft) -> Result<AuditEvent> {
        let seq = self.chain.seq + 1;
        // The stored line is the serialisation the hash was made from.
        let (event, line) = draft.seal_line(seq, &self.chain.hash);
        self.conn
            .prepare_cached("INSERT INTO audit (seq, hash, event) VALUES (?1, ?2, ?3)")?
            .execute(params![seq as i64, event.hash, line])?;
        self.chain.seq = seq;
        self.chain.hash.clone_from(&event.hash);
        Ok(event)
    }

    /// The task as this transaction sees it ([`super::tasks::get`]).
    pub(super) fn task(&mut self, id: &str) -> Result<Option<Task>> {
        let Some(seen) = self.seen.as_deref_mut() else {
            return super::tasks::get(self.conn, id);
        };
        if let Some(t) = seen.get(id) {
            return Ok(Some(t.clone()));
        }
        let t = super::tasks::get(self.conn, id)?;
        if let Some(t) = &t {
            seen.insert(t.id.clone(), t.clone());
        }
        Ok(t)
    }

    /// The lease as this transaction sees it ([`super::leases::get`]).
    pub(super) fn lease(&self, id: &str) -> Result<Option<Lease>> {
        super::leases::get(self.conn, id)
    }
}

pub(super) trait Job: Send {
    /// Whether the job leaves every task row as it found it (a lease's
    /// insert or activation, an audit append): a batch of only such jobs
    /// leaves the [`TaskCache`] valid.
    fn keeps_tasks(&self) -> bool;
    /// Runs the job; `true` when the batch must be rolled back (an
    /// [`Undo::Batch`] job failed after a write of its own).
    fn run(&mut self, w: &mut Writer<'_>) -> bool;
    fn finish(self: Box<Self>, commit: std::result::Result<(), String>);
}

/// What the writer's queue carries: a job, or the syncer's word that it
/// has synced `n` more of the batches the writer handed it (a writer
/// holding its transaction open until the syncer is free waits for it).
pub(super) enum ToWriter {
    Job(Box<dyn Job>),
    Synced(usize),
}

pub(super) type WriteFn<T> = Box<dyn for<'a> FnOnce(&mut Writer<'a>) -> Result<T> + Send>;

pub(super) struct FnJob<T> {
    pub(super) f: Option<WriteFn<T>>,
    pub(super) out: Option<Result<T>>,
    pub(super) reply: oneshot::Sender<Result<T>>,
    /// Set only for jobs that write no task row.
    pub(super) keeps_tasks: bool,
    pub(super) undo: Undo,
}

/// How a failed job's writes are undone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Undo {
    /// The job runs in a savepoint of its own: its failure undoes its own
    /// writes and nothing else.
    Savepoint,
    /// No savepoint. A failure before the job's first completed statement
    /// that changed a row leaves nothing to undo and fails the job alone; a
    /// failure after one rolls the whole batch back (every job of it
    /// answered as failed, so a retry is safe). Only for jobs that decide
    /// everything before they write, whose writes fail only when the
    /// database does (a lease's insert). Why: inside a savepoint SQLite
    /// copies every page the job changes that an earlier job of the batch
    /// had changed to the statement journal, in case the savepoint is
    /// rolled back; on issuance that was a tenth of the writer's time
    /// (docs/design/0036, "Seventh pass").
    Batch,
}

impl<T: Send> Job for FnJob<T> {
    fn keeps_tasks(&self) -> bool {
        self.keeps_tasks
    }

    fn run(&mut self, w: &mut Writer<'_>) -> bool {
        let Some(f) = self.f.take() else {
            return false;
        };
        let before = w.chain.clone();
        let conn = w.conn;
        if self.undo == Undo::Batch {
            // A statement that fails changes nothing (SQLite undoes it), and
            // only completed statements count in `total_changes`.
            let changes = conn.total_changes();
            let r = f(w);
            let wrote = r.is_err() && conn.total_changes() != changes;
            if r.is_err() {
                *w.chain = before;
            }
            self.out = Some(r);
            return wrote;
        }
        let exec = |sql: &str| -> rusqlite::Result<()> {
            conn.prepare_cached(sql)?.execute([]).map(|_| ())
        };
        if let Err(e) = exec("SAVEPOINT job") {
            self.out = Some(Err(e.into()));
            return false;
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
        false
    }

    fn finish(self: Box<Self>, commit: std::result::Result<(), String>) {
        let out = match (self.out, commit) {
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (Some(Ok(_)), Err(e)) | (None, Err(e)) => Err(StoreError::Unavailable(e)),
            (None, Ok(())) => Err(StoreError::Closed),
        };
        let _ = self.reply.send(out);
    }
}

impl std::fmt::Debug for dyn Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

pub(super) fn writer_loop(
    conn: Connection,
    jobs: mpsc::Receiver<ToWriter>,
    mut chain: Chain,
    synced: mpsc::Sender<(Vec<Box<dyn Job>>, u64)>,
    durability: Arc<Durability>,
    tasks: Arc<TaskCache>,
) {
    use std::sync::atomic::Ordering;
    // Batches handed to the syncer and not yet synced.
    let mut syncing = 0usize;
    while let Ok(first) = jobs.recv() {
        let first = match first {
            ToWriter::Job(j) => j,
            ToWriter::Synced(n) => {
                syncing = syncing.saturating_sub(n);
                continue;
            }
        };
        let mut batch = Vec::with_capacity(64);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(ToWriter::Job(j)) => batch.push(j),
                Ok(ToWriter::Synced(n)) => syncing = syncing.saturating_sub(n),
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
        let changes_tasks = batch.iter().any(|j| !j.keeps_tasks());
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let msg = e.to_string();
            durability.write_failed(Some(&msg));
            for j in batch {
                j.finish(Err(msg.clone()));
            }
            continue;
        }
        let mut aborted = false;
        let mut changes_tasks = changes_tasks;
        let mut seen = HashMap::new();
        let mut run = |j: &mut Box<dyn Job>, chain: &mut Chain| {
            let keeps = j.keeps_tasks();
            if !keeps {
                seen.clear();
            }
            let mut w = Writer {
                conn: &conn,
                chain,
                seen: keeps.then_some(&mut seen),
            };
            // A job without a savepoint that failed after writing: its
            // writes can only be undone with the batch's.
            let undo_batch = j.run(&mut w);
            if !keeps {
                seen.clear();
            }
            // SQLite rolls the whole transaction back on some errors
            // (SQLITE_FULL, IOERR, NOMEM). Then the savepoints of later jobs
            // would each commit on their own: stop here instead.
            undo_batch || conn.is_autocommit()
        };
        for j in &mut batch {
            if run(j, &mut chain) {
                aborted = true;
                break;
            }
        }
        // While the syncer is still syncing earlier batches, a commit now
        // would only wait for its next sync: the jobs that arrive meanwhile
        // run in this same transaction, and the batch commits once the
        // syncer is free (or the batch is full). Each commit writes every
        // page it touched to the WAL again (the tables' and indexes' right
        // edges, the audit chain's last page), so fewer, larger commits
        // write less for the same jobs. A job waits for the sync in flight
        // either way; what it adds is its batch's commit, made after that
        // sync rather than beside it (docs/design/0036, "Sixth pass").
        while !aborted && batch.len() < MAX_BATCH && syncing > 0 {
            match jobs.recv() {
                Ok(ToWriter::Synced(n)) => syncing = syncing.saturating_sub(n),
                Ok(ToWriter::Job(mut j)) => {
                    changes_tasks |= !j.keeps_tasks();
                    aborted = run(&mut j, &mut chain);
                    batch.push(j);
                }
                Err(_) => break,
            }
        }
        if aborted {
            // Still open when a job without a savepoint failed after
            // writing; SQLite has rolled it back already after an I/O error.
            let why = if conn.is_autocommit() {
                "the database rolled the transaction back"
            } else {
                let _ = conn.execute_batch("ROLLBACK");
                "a write of the batch failed; the batch was rolled back"
            };
            if changes_tasks {
                tasks.changed();
            }
            chain = before;
            durability.write_failed(Some(why));
            for j in batch {
                j.finish(Err(why.into()));
            }
            continue;
        }
        let committed = conn.execute_batch("COMMIT");
        if committed.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        // INVARIANT: after the batch's changes are visible to readers and
        // before anyone is answered (the syncer answers), so no task read
        // from before them is served from the cache again.
        if changes_tasks {
            tasks.changed();
        }
        match committed {
            // Answered by the syncer once the WAL is on disk.
            Ok(()) => {
                durability.write_failed(None);
                syncing += 1;
                if let Err(mpsc::SendError((batch, _))) = synced.send((batch, chain.seq)) {
                    for j in batch {
                        j.finish(Err("the store is shutting down".into()));
                    }
                }
            }
            Err(e) => {
                chain = before;
                let msg = e.to_string();
                durability.write_failed(Some(&msg));
                for j in batch {
                    j.finish(Err(msg.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use keymint_core::Timestamp;
    use keymint_core::audit::{AuditDraft, GENESIS};
    use rusqlite::Connection;

    use super::*;
    use crate::sqlite::schema::{configure, migrate};
    use crate::sqlite::syncer::Durability;

    type Reply = oneshot::Receiver<Result<()>>;

    /// A job that stores the secret `name` with its audit event, then
    /// fails if `fail_after` says so.
    fn store(undo: Undo, name: &'static str, fail_after: bool) -> (ToWriter, Reply) {
        job(undo, true, move |w| {
            w.conn.execute(
                "INSERT INTO secrets (name, sealed, updated_ms) VALUES (?1, x'00', 0)",
                [name],
            )?;
            w.audit(AuditDraft::new(Timestamp(0), "secret.stored", name))?;
            if fail_after {
                return Err(StoreError::NotFound("the job's own failure"));
            }
            Ok(())
        })
    }

    fn job(
        undo: Undo,
        keeps_tasks: bool,
        f: impl for<'a> FnOnce(&mut Writer<'a>) -> Result<()> + Send + 'static,
    ) -> (ToWriter, Reply) {
        let (reply, rx) = oneshot::channel();
        let job = FnJob {
            f: Some(Box::new(f)),
            out: None,
            reply,
            keeps_tasks,
            undo,
        };
        (ToWriter::Job(Box::new(job)), rx)
    }

    /// Runs `jobs` through the writer as one batch (all of them queued
    /// before it starts), answers them as the syncer does, and returns the
    /// answers, the number of commits, the stored secrets and the audit
    /// chain's sequence numbers. The store holds one active task, `t`.
    fn one_batch(jobs: Vec<(ToWriter, Reply)>) -> (Vec<Result<()>>, usize, Vec<String>, Vec<i64>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut conn = Connection::open(&path).unwrap();
        configure(&conn).unwrap();
        migrate(&mut conn).unwrap();
        conn.execute_batch(
            "INSERT INTO tasks (id, workload, role, scopes, status, created_ms, expires_ms, \
             last_seen_ms, deadline_ms) VALUES ('t', 'agent', 'r', '[]', 'active', 0, 1, 0, 1)",
        )
        .unwrap();
        let (tx, rx) = mpsc::channel();
        let mut replies = Vec::new();
        for (j, r) in jobs {
            tx.send(j).unwrap();
            replies.push(r);
        }
        drop(tx);
        let (synced, batches) = mpsc::channel();
        let durability = Arc::new(Durability {
            audit_seq: 0.into(),
            poisoned: false.into(),
            last_failure: Mutex::new(None),
        });
        let chain = Chain {
            seq: 0,
            hash: GENESIS.to_owned(),
        };
        writer_loop(conn, rx, chain, synced, durability, Arc::default());
        let mut commits = 0;
        for (batch, _) in batches.try_iter() {
            commits += 1;
            for j in batch {
                j.finish(Ok(()));
            }
        }
        let answers = replies
            .into_iter()
            .map(|r| r.blocking_recv().unwrap())
            .collect();
        let read = Connection::open(&path).unwrap();
        let names = column(&read, "SELECT name FROM secrets ORDER BY name");
        let seqs = column(&read, "SELECT seq FROM audit ORDER BY seq");
        (answers, commits, names, seqs)
    }

    fn column<T: rusqlite::types::FromSql>(c: &Connection, sql: &str) -> Vec<T> {
        let mut st = c.prepare(sql).unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .map(|v| v.unwrap())
            .collect()
    }

    #[test]
    fn a_job_without_a_savepoint_that_fails_after_writing_fails_its_batch() {
        let (answers, commits, names, seqs) = one_batch(vec![
            store(Undo::Savepoint, "a", false),
            store(Undo::Batch, "b", true),
            store(Undo::Batch, "c", false),
        ]);
        assert_eq!(commits, 0, "nothing committed");
        assert!(
            matches!(&answers[0], Err(StoreError::Unavailable(_))),
            "the job before it is refused: a retry is safe ({:?})",
            answers[0]
        );
        assert!(
            matches!(&answers[1], Err(StoreError::NotFound(_))),
            "the failed job gets its own error ({:?})",
            answers[1]
        );
        assert!(
            matches!(&answers[2], Err(StoreError::Unavailable(_))),
            "the job after it is refused ({:?})",
            answers[2]
        );
        assert!(names.is_empty(), "no write kept: {names:?}");
        assert!(seqs.is_empty(), "no event kept: {seqs:?}");
    }

    #[test]
    fn a_job_without_a_savepoint_that_fails_before_writing_fails_alone() {
        let (answers, commits, names, seqs) = one_batch(vec![
            store(Undo::Savepoint, "a", false),
            // Refused before any write.
            job(Undo::Batch, true, |_| Err(StoreError::NotFound("before"))),
            store(Undo::Batch, "c", false),
            // Its first statement fails (the name is taken): SQLite undoes
            // the statement, nothing of the job was written.
            store(Undo::Batch, "a", false),
            store(Undo::Savepoint, "e", true),
            store(Undo::Batch, "f", false),
        ]);
        assert_eq!(commits, 1);
        assert!(answers[0].is_ok(), "{:?}", answers[0]);
        assert!(matches!(&answers[1], Err(StoreError::NotFound("before"))));
        assert!(answers[2].is_ok(), "{:?}", answers[2]);
        assert!(
            matches!(&answers[3], Err(StoreError::Backend(_))),
            "the taken name: {:?}",
            answers[3]
        );
        assert!(matches!(&answers[4], Err(StoreError::NotFound(_))));
        assert!(answers[5].is_ok(), "{:?}", answers[5]);
        assert_eq!(names, ["a", "c", "f"]);
        assert_eq!(seqs, [1, 2, 3], "one event per kept job, no gap");
    }

    /// A job that writes no task row reads a task once per batch; a job
    /// that may change one empties what was read, before and after it, so
    /// a job after it reads the task as it is then.
    #[test]
    fn a_task_read_in_a_batch_is_read_again_after_a_job_that_may_change_it() {
        fn status(w: &mut Writer<'_>) -> String {
            w.task("t").unwrap().unwrap().status.as_str().to_owned()
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let read = |keeps: bool, seen: &Arc<Mutex<Vec<String>>>| {
            let seen = Arc::clone(seen);
            job(Undo::Batch, keeps, move |w| {
                let s = status(w);
                seen.lock().unwrap().push(s);
                Ok(())
            })
        };
        // Changes the row behind the cache's back, as a job that keeps
        // tasks never does: only to see whether the next read is cached.
        let change = |keeps: bool, to: &'static str| {
            job(Undo::Savepoint, keeps, move |w| {
                w.conn
                    .execute("UPDATE tasks SET status = ?1 WHERE id = 't'", [to])?;
                Ok(())
            })
        };
        let (answers, commits, _, _) = one_batch(vec![
            read(true, &seen),
            change(true, "completed"),
            read(true, &seen),
            change(false, "failed"),
            read(true, &seen),
            read(false, &seen),
        ]);
        assert_eq!(commits, 1);
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        assert_eq!(
            *seen.lock().unwrap(),
            ["active", "active", "failed", "failed"],
            "cached between jobs that keep tasks, read again after one that does not"
        );
    }
}
