//! The checkpointer thread: copies the WAL back into the database file
//! from a connection of its own, so no commit of the writer ever runs a
//! checkpoint (docs/design/0036).
//!
//! SQLite's default (`wal_autocheckpoint=1000`) has the connection whose
//! commit pushes the WAL past 1,000 pages run the checkpoint inside that
//! commit: on the writer thread, with two `fsync`s (the WAL, then the
//! database), while every caller queued behind it waits. The writer turns
//! that off ([`super::schema::configure`]) and this thread runs a
//! `PASSIVE` checkpoint every [`PERIOD`] instead: it takes no write lock,
//! so the writer goes on committing meanwhile. What it does for durability
//! is what the automatic checkpoint did: SQLite syncs the WAL before it
//! copies and the database after, and the writer reuses the WAL from its
//! start only once a checkpoint has copied all of it.
//!
//! Should the WAL still grow past [`RESTART_FRAMES`] (readers holding old
//! snapshots kept the passive checkpoints from finishing), one `RESTART`
//! checkpoint waits for them and brings it back to its start.
//!
//! SQLite reuses the WAL file from its start rather than shrink it, so a
//! burst that grew it (past 1 GB under sustained issuance) would hold that
//! much disk until the process ends. Once the WAL file is larger than
//! [`WAL_SIZE_LIMIT`], everything in it is copied back and the writer has
//! added at most [`QUIET_FRAMES`] since the last round, a `TRUNCATE`
//! checkpoint empties the file. It holds the write lock while it truncates
//! (a commit arriving then waits for it), which is why it waits for writes
//! to slow down: SQLite's own `journal_size_limit` truncates inside the
//! first commit after the WAL starts over, hundreds of MB at a time under
//! load (docs/design/0036, "Seventh pass").
//!
//! The thread ends when the writer does (its channel closes).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::Connection;

/// How often the WAL is copied back.
pub(super) const PERIOD: Duration = Duration::from_millis(250);

/// WAL pages (4 KiB each: 200 MiB) past which a passive checkpoint that
/// could not finish is followed by a `RESTART` one.
const RESTART_FRAMES: i64 = 50_000;

/// How long the checkpointer waits for a lock.
const BUSY: Duration = Duration::from_secs(5);

/// The WAL file's size past which it is emptied once writes are slow.
pub(super) const WAL_SIZE_LIMIT: u64 = 64 << 20;

/// Frames the writer may add between two rounds (1 MiB in [`PERIOD`])
/// for the writes to count as slow.
const QUIET_FRAMES: i64 = 256;

/// What the checkpointer keeps between rounds.
#[derive(Debug)]
pub(super) struct Rounds {
    wal: PathBuf,
    /// Frames in the WAL after the last round.
    last: Option<i64>,
}

impl Rounds {
    pub(super) fn new(db: &Path) -> Self {
        Self {
            wal: PathBuf::from(format!("{}-wal", db.display())),
            last: None,
        }
    }

    /// One round: a checkpoint ([`checkpoint`]), then, if the WAL file
    /// is over [`WAL_SIZE_LIMIT`], all of it copied back and the writes
    /// slow, a `TRUNCATE` checkpoint. Returns whether the file was emptied.
    pub(super) fn round(&mut self, conn: &Connection) -> rusqlite::Result<bool> {
        let (log, copied) = checkpoint(conn)?;
        // After the WAL started over, every frame in it is new.
        let added = match self.last {
            Some(before) if log >= before => log - before,
            _ => log,
        };
        self.last = Some(log);
        let big = std::fs::metadata(&self.wal).is_ok_and(|m| m.len() > WAL_SIZE_LIMIT);
        if !(big && copied == log && added <= QUIET_FRAMES) {
            return Ok(false);
        }
        // New writes wait while it waits for the lock and for readers of
        // the WAL: only briefly, then it is left for a later round.
        conn.busy_timeout(Duration::from_millis(10))?;
        let busy = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            r.get::<_, i64>(0)
        });
        conn.busy_timeout(BUSY)?;
        let busy = busy?;
        if busy == 0 {
            self.last = Some(0);
        }
        Ok(busy == 0)
    }
}

/// Runs until `writer_gone` disconnects (the writer holds its sender and
/// never sends).
pub(super) fn checkpointer_loop(path: &Path, writer_gone: &mpsc::Receiver<()>) {
    let conn = match Connection::open(path).and_then(|c| {
        c.busy_timeout(BUSY)?;
        Ok(c)
    }) {
        Ok(c) => c,
        Err(e) => {
            // The writer then keeps its WAL growing until keymint restarts;
            // say so rather than fail writes that are still durable.
            tracing::error!(error = %e, "the checkpointer cannot open the database; the WAL will not be copied back");
            return;
        }
    };
    let mut rounds = Rounds::new(path);
    while let Err(mpsc::RecvTimeoutError::Timeout) = writer_gone.recv_timeout(PERIOD) {
        if let Err(e) = rounds.round(&conn) {
            tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
        }
    }
    // The writer is gone: copy what is left, so the next open starts on a
    // short WAL.
    let _ = checkpoint(&conn);
}

/// One passive checkpoint, and a restart one if the WAL is too long.
/// Returns the frames left in the WAL and the frames copied.
pub(super) fn checkpoint(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    let run = |mode: &str| {
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        })
    };
    let (log, copied) = run("PASSIVE")?;
    if log > RESTART_FRAMES && copied < log {
        return run("RESTART");
    }
    Ok((log, copied))
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::{Rounds, WAL_SIZE_LIMIT};
    use crate::sqlite::schema::configure;

    /// A burst that a reader kept from being copied back grows the WAL
    /// file; the writer's commits do not cut it (no truncation inside a
    /// commit), a round while writes are fast does not either, and the
    /// first round after the writes slowed down empties it. Nothing is
    /// lost.
    #[test]
    fn the_wal_file_shrinks_once_writes_slow_down() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let wal = dir.path().join("t.db-wal");
        let size = || std::fs::metadata(&wal).unwrap().len();
        let writer = Connection::open(&path).unwrap();
        configure(&writer).unwrap();
        writer.execute_batch("CREATE TABLE t (b BLOB)").unwrap();
        let checkpointer = Connection::open(&path).unwrap();
        let mut rounds = Rounds::new(&path);
        let blob = vec![7u8; 1 << 20];
        let burst = || {
            for _ in 0..80 {
                writer
                    .execute("INSERT INTO t VALUES (?1)", [&blob])
                    .unwrap();
            }
        };
        // A reader on an old snapshot: no checkpoint copies past it.
        let reader = Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let n: i64 = reader
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
        burst();
        assert!(!rounds.round(&checkpointer).unwrap(), "the reader holds it");
        assert!(size() > WAL_SIZE_LIMIT, "the WAL grew: {}", size());
        reader.execute_batch("COMMIT").unwrap();
        // Copied back whole, and the writer starts the WAL over: the file
        // keeps its size.
        writer.execute("INSERT INTO t VALUES (x'00')", []).unwrap();
        assert!(size() > WAL_SIZE_LIMIT, "no commit truncates: {}", size());
        assert!(rounds.round(&checkpointer).unwrap(), "writes are slow now");
        assert!(size() <= WAL_SIZE_LIMIT, "emptied: {} bytes", size());
        // Fast writes again: not while they go on.
        burst();
        assert!(
            !rounds.round(&checkpointer).unwrap(),
            "80 MiB since the last round"
        );
        assert!(size() > WAL_SIZE_LIMIT);
        assert!(rounds.round(&checkpointer).unwrap());
        assert!(size() <= WAL_SIZE_LIMIT);
        writer.execute("INSERT INTO t VALUES (x'00')", []).unwrap();
        let n: i64 = writer
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 162, "nothing lost");
        drop((writer, checkpointer));
        let n: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 162, "nothing lost after a reopen");
    }
}
