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
//! The thread ends when the writer does (its channel closes).

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::Connection;

/// How often the WAL is copied back.
pub(super) const PERIOD: Duration = Duration::from_millis(250);

/// WAL pages (4 KiB each: 200 MiB) past which a passive checkpoint that
/// could not finish is followed by a `RESTART` one.
const RESTART_FRAMES: i64 = 50_000;

/// Runs until `writer_gone` disconnects (the writer holds its sender and
/// never sends).
pub(super) fn checkpointer_loop(path: &Path, writer_gone: &mpsc::Receiver<()>) {
    let conn = match Connection::open(path).and_then(|c| {
        c.busy_timeout(Duration::from_secs(5))?;
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
    while let Err(mpsc::RecvTimeoutError::Timeout) = writer_gone.recv_timeout(PERIOD) {
        if let Err(e) = checkpoint(&conn) {
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

    use super::checkpoint;
    use crate::sqlite::schema::{WAL_SIZE_LIMIT, configure};

    /// A burst that a reader kept from being copied back grows the WAL
    /// file; once a checkpoint has copied it all, the writer's next commit
    /// starts it over and cuts the file back to the limit (SQLite's default
    /// keeps the file at its largest until the process ends).
    #[test]
    fn the_wal_file_shrinks_after_a_burst() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let wal = dir.path().join("t.db-wal");
        let size = || i64::try_from(std::fs::metadata(&wal).unwrap().len()).unwrap();
        let writer = Connection::open(&path).unwrap();
        configure(&writer).unwrap();
        writer.execute_batch("CREATE TABLE t (b BLOB)").unwrap();
        let checkpointer = Connection::open(&path).unwrap();
        // A reader on an old snapshot: no checkpoint copies past it.
        let reader = Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let n: i64 = reader
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
        let blob = vec![7u8; 1 << 20];
        for _ in 0..80 {
            writer
                .execute("INSERT INTO t VALUES (?1)", [&blob])
                .unwrap();
        }
        let (log, copied) = checkpoint(&checkpointer).unwrap();
        assert!(copied < log, "the reader holds the checkpoint back");
        assert!(size() > WAL_SIZE_LIMIT, "the WAL grew: {}", size());
        reader.execute_batch("COMMIT").unwrap();
        let (log, copied) = checkpoint(&checkpointer).unwrap();
        assert_eq!(copied, log, "copied back whole");
        writer.execute("INSERT INTO t VALUES (x'00')", []).unwrap();
        assert!(
            size() <= WAL_SIZE_LIMIT,
            "the WAL file is cut back: {} bytes",
            size()
        );
        let n: i64 = writer
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 81, "nothing lost");
    }
}
