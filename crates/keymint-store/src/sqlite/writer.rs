//! The single writer thread (group commit: see the documentation of the
//! `sqlite` module): it takes every queued job, runs each inside its own
//! savepoint, commits the batch, and hands it to the syncer.
//! [`Writer`] is what a job sees, and the only way to extend the audit
//! chain.

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
    pub(super) fn task(&self, id: &str) -> Result<Option<Task>> {
        super::tasks::get(self.conn, id)
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
    fn run(&mut self, w: &mut Writer<'_>);
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
}

impl<T: Send> Job for FnJob<T> {
    fn keeps_tasks(&self) -> bool {
        self.keeps_tasks
    }

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
        let run = |j: &mut Box<dyn Job>, chain: &mut Chain| {
            j.run(&mut Writer { conn: &conn, chain });
            // SQLite rolls the whole transaction back on some errors
            // (SQLITE_FULL, IOERR, NOMEM). Then the savepoints of later jobs
            // would each commit on their own: stop here instead.
            conn.is_autocommit()
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
            if changes_tasks {
                tasks.changed();
            }
            chain = before;
            durability.write_failed(Some("the database rolled the transaction back"));
            for j in batch {
                j.finish(Err("the database rolled the transaction back".into()));
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
