//! The syncer thread: makes the batches the writer committed durable
//! (one `fdatasync` of the WAL for all that queued up), then answers their
//! callers; and what the writer, the syncer and the readers share about
//! durability.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Weak};

use super::writer::{Job, ToWriter};

/// State the writer, the syncer and the readers share.
#[derive(Debug, Default)]
pub(super) struct Durability {
    /// The newest audit sequence number known to be on disk. Readers of the
    /// audit chain (sinks, the API) see nothing newer, so no sink can hold
    /// an event that a power loss could still take back.
    pub(super) audit_seq: std::sync::atomic::AtomicU64,
    /// Set when an fsync failed: the kernel may have dropped dirty pages, so
    /// no later write can be promised durable. The store refuses writes
    /// until keymint restarts (and SQLite recovers the WAL).
    pub(super) poisoned: std::sync::atomic::AtomicBool,
    /// Why the last write batch failed (`None` once one commits).
    pub(super) last_failure: std::sync::Mutex<Option<String>>,
}

impl Durability {
    pub(super) fn write_failed(&self, why: Option<&str>) {
        let mut g = self
            .last_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *g = why.map(str::to_owned);
    }
}

pub(super) const POISONED: &str =
    "the store stopped accepting writes after a failed fsync; restart keymint";

/// Makes committed batches durable, then answers their callers. One
/// `fdatasync` covers every batch committed before it started.
///
/// After each sync it wakes the writer (through `writer`, while the store
/// still holds it), which may be holding a transaction open until the
/// syncer is free.
pub(super) fn syncer_loop(
    wal: PathBuf,
    batches: mpsc::Receiver<(Vec<Box<dyn Job>>, u64)>,
    durability: Arc<Durability>,
    writer: Weak<mpsc::Sender<ToWriter>>,
) {
    use std::sync::atomic::Ordering;
    let mut file: Option<std::fs::File> = None;
    while let Ok(first) = batches.recv() {
        let mut ready = vec![first];
        while let Ok(b) = batches.try_recv() {
            ready.push(b);
        }
        let head = ready.iter().map(|(_, seq)| *seq).max().unwrap_or(0);
        let synced = |n: usize| {
            if let Some(w) = writer.upgrade() {
                let _ = w.send(ToWriter::Synced(n));
            }
        };
        if durability.poisoned.load(Ordering::SeqCst) {
            synced(ready.len());
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
        synced(ready.len());
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
