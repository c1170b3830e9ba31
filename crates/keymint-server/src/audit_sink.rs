//! Delivery of the audit chain to a JSON-lines file.
//!
//! The store is the spool: requests append events to the store in the same
//! transaction as the change they record and never wait for a sink. This
//! worker copies events after the sink's cursor to the file, syncs it, then
//! moves the cursor. A crash between the two is healed at start: the file's
//! last complete line says what it already has, and a torn last line is cut
//! off, so the file never holds a duplicate or a half event.
//!
//! With several replicas on one store, each replica's file holds the whole
//! chain (every replica's events), resumed from the file's own last event;
//! `keymint audit verify --file` checks any of them whole
//! (docs/design/0022).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use keymint_core::audit::AuditEvent;

use crate::broker::Broker;

pub const SINK_NAME: &str = "file";
const BATCH: u32 = 2000;
/// How long events gather before a write and a sync of the file.
const COALESCE: std::time::Duration = std::time::Duration::from_millis(50);

/// The seq and hash of the last event a sink file holds.
type LastEvent = Option<(u64, String)>;

/// Opens the sink file for appending after cutting a torn last line, and
/// returns the seq and hash of the last event it holds.
pub fn open_sink(path: &Path) -> std::io::Result<(File, LastEvent)> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok((f, None));
    }
    // Read the tail and find the last complete line.
    let tail_len = len.min(256 * 1024);
    f.seek(SeekFrom::Start(len - tail_len))?;
    let mut tail = Vec::with_capacity(tail_len as usize);
    (&mut f).take(tail_len).read_to_end(&mut tail)?;
    let keep = match tail.iter().rposition(|&b| b == b'\n') {
        Some(i) => len - tail_len + i as u64 + 1,
        // No line end in the whole file: it holds only a torn first event.
        None if tail_len == len => 0,
        // Events are far smaller than the tail read; a tail without a line
        // end is not keymint's file, or is corrupt. Never cut blindly.
        None => {
            return Err(std::io::Error::other(format!(
                "the audit file `{}` ends in more than 256 KiB without a line end; \
                 check it (keymint audit verify --file) and move it aside",
                path.display()
            )));
        }
    };
    if keep < len {
        tracing::warn!(path = %path.display(), "cutting a torn last line from the audit file");
        f.set_len(keep)?;
        f.sync_all()?;
    }
    let complete = &tail[..(keep - (len - tail_len)) as usize];
    let last_line = complete
        .strip_suffix(b"\n")
        .unwrap_or(complete)
        .rsplit(|&b| b == b'\n')
        .next()
        .unwrap_or_default();
    if last_line.is_empty() {
        return Ok((f, None));
    }
    // Never guess: resuming from a wrong position would duplicate or skip
    // events in what the SIEM receives.
    let last = serde_json::from_slice::<AuditEvent>(last_line)
        .map(|e| (e.seq, e.hash))
        .map_err(|_| {
            std::io::Error::other(format!(
                "the last line of the audit file `{}` is not an audit event; \
                 check the file (keymint audit verify --file) and move it aside",
                path.display()
            ))
        })?;
    Ok((f, Some(last)))
}

/// Refuses a file whose last event (`seq`, `hash`) is not this store's:
/// the file holds another chain (the store was started afresh or restored
/// from an older backup, or the file is another deployment's). Resuming
/// after it would splice this chain onto that one, and never deliver this
/// chain's events up to `seq`. Never guess: the operator moves the file
/// aside, and the next attempt writes the whole chain to a new one.
async fn same_chain(broker: &Broker, path: &Path, seq: u64, hash: &str) -> anyhow::Result<()> {
    let stored = broker
        .store
        .audit_lines_after(seq.saturating_sub(1), 1)
        .await?;
    let same = stored.first().is_some_and(|(s, line)| {
        *s == seq && serde_json::from_str::<AuditEvent>(line).is_ok_and(|e| e.hash == hash)
    });
    if !same {
        anyhow::bail!(
            "the audit file `{}` holds another chain: its last event (seq {seq}) is not this \
             store's (a store started afresh or restored from a backup, or another \
             deployment's file); move it aside and the whole chain is written to a new one",
            path.display()
        );
    }
    Ok(())
}

/// Copies new audit events from the store to `path`, forever.
pub async fn run_file_sink(broker: Arc<Broker>, path: PathBuf) {
    let mut backoff_ms = 100u64;
    loop {
        match deliver(&broker, &path).await {
            Ok(()) => return,
            Err(e) => {
                broker
                    .metrics
                    .audit_sink_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(path = %path.display(), error = %e, "audit file sink failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(30_000);
            }
        }
    }
}

async fn deliver(broker: &Broker, path: &Path) -> anyhow::Result<()> {
    let p = path.to_owned();
    let (file, last) = tokio::task::spawn_blocking(move || open_sink(&p)).await??;
    let in_file = match last {
        Some((seq, hash)) => {
            same_chain(broker, path, seq, &hash).await?;
            seq
        }
        None => 0,
    };
    let mut file = Some(file);
    let stored = broker.store.sink_cursor(SINK_NAME).await?;
    // Replicas on one store each copy the whole chain to their own file:
    // the file alone says where to resume (the shared cursor is another
    // replica's too). One process: the cursor also covers a rotated file.
    let mut cursor = if broker.store.shared() {
        in_file
    } else {
        stored.max(in_file)
    };
    if cursor != stored {
        broker.store.set_sink_cursor(SINK_NAME, cursor).await?;
    }
    loop {
        let events = broker.store.audit_lines_after(cursor, BATCH).await?;
        let Some(last) = events.last().map(|(seq, _)| *seq) else {
            tokio::select! {
                () = broker.audit_wake.notified() => {
                    // Let a burst accumulate: one write and one fsync per
                    // batch, delivered within about COALESCE.
                    tokio::time::sleep(COALESCE).await;
                }
                () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            }
            continue;
        };
        let n = events.len() as u64;
        let full = events.len() >= BATCH as usize;
        let mut f = file
            .take()
            .ok_or_else(|| anyhow::anyhow!("sink file lost"))?;
        f = tokio::task::spawn_blocking(move || -> std::io::Result<File> {
            let mut buf = Vec::with_capacity(events.len() * 400);
            // The stored lines are the canonical JSON: copied, not re-encoded.
            for (_, line) in &events {
                buf.extend_from_slice(line.as_bytes());
                buf.push(b'\n');
            }
            f.write_all(&buf)?;
            f.sync_data()?;
            Ok(f)
        })
        .await??;
        file = Some(f);
        cursor = last;
        broker.store.set_sink_cursor(SINK_NAME, cursor).await?;
        broker
            .metrics
            .audit_sink_delivered
            .fetch_add(n, Ordering::Relaxed);
        // Under a steady stream of events, a batch that was not full is
        // followed by the same wait as the first event after a quiet spell:
        // one write and one sync per COALESCE rather than one for whatever
        // arrived during the last sync (about 200 syncs a second under the
        // issuance bench; docs/design/0036, "Sixth pass").
        if !full {
            tokio::time::sleep(COALESCE).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keymint_core::Timestamp;
    use keymint_core::audit::{AuditDraft, GENESIS};

    #[test]
    fn a_torn_last_line_is_cut_and_the_last_seq_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let e1 = AuditDraft::new(Timestamp(1), "a", "admin").seal(1, GENESIS);
        let e2 = AuditDraft::new(Timestamp(2), "b", "admin").seal(2, &e1.hash);
        let text = format!("{}\n{}\n{{\"seq\":3,\"ti", e1.to_json(), e2.to_json());
        std::fs::write(&path, text).unwrap();
        let (_f, last) = open_sink(&path).unwrap();
        assert_eq!(last, Some((2, e2.hash.clone())));
        let after = std::fs::read_to_string(&path).unwrap();
        assert!(after.ends_with('\n'));
        assert_eq!(after.lines().count(), 2);
    }

    #[test]
    fn an_unreadable_last_line_is_refused_not_guessed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "{\"seq\":1,\"garbage\":true}\n").unwrap();
        let e = open_sink(&path).unwrap_err().to_string();
        assert!(e.contains("not an audit event"), "{e}");
    }

    #[test]
    fn a_huge_unterminated_tail_is_refused_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut text = String::from("{\"seq\":1}\n");
        text.push_str(&"x".repeat(300 * 1024));
        std::fs::write(&path, &text).unwrap();
        let e = open_sink(&path).unwrap_err().to_string();
        assert!(e.contains("without a line end"), "{e}");
        assert_eq!(
            std::fs::read(&path).unwrap().len(),
            text.len(),
            "nothing was cut"
        );
    }

    #[test]
    fn an_empty_or_missing_file_starts_at_zero() {
        let dir = tempfile::tempdir().unwrap();
        let (_f, last) = open_sink(&dir.path().join("sub/audit.jsonl")).unwrap();
        assert_eq!(last, None);
    }
}
