//! The workload socket: accepts connections (at most
//! [`crate::Limits::max_connections`] at once), attests each peer when it
//! is accepted, and serves its requests in order.
//!
//! Per connection, a reader task turns bytes into bounded lines
//! ([`crate::protocol::read_line`]); the connection task answers each line
//! and forwards the events of the tasks it watches. Every request matches
//! the attested peer against the entries as they are now and re-checks
//! that the very process that connected is still alive (its pidfd), so a
//! connection handed to another process, or kept after the process
//! exited, is refused and closed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use keymint_attest::PeerInfo;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, broadcast, mpsc, watch};

use crate::protocol::{self, ApiError, Event, Op, Watching, code};
use crate::state::Shared;

/// Accepts until `shutdown` turns true.
pub async fn serve(
    listener: UnixListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(shared.limits.max_connections));
    let next = AtomicU64::new(1);
    loop {
        let stream = tokio::select! {
            () = crate::stopped(&mut shutdown) => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "workload socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            let timeout = shared.limits.write_timeout;
            tokio::spawn(async move {
                let mut s = stream;
                let e = ApiError::new(code::BUSY, "too many connections; try again");
                let _ = tokio::time::timeout(timeout, s.write_all(&protocol::error_line(None, &e)))
                    .await;
            });
            continue;
        };
        let conn = next.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(&shared);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shared.connections.fetch_add(1, Ordering::Relaxed);
            connection(&shared, stream, conn, shutdown.clone()).await;
            shared.connections.fetch_sub(1, Ordering::Relaxed);
            // The workload hung up: its tasks end. The agent stopping is
            // not the workload's doing: they stay (docs/design/0012).
            if !*shutdown.borrow() {
                shared.connection_closed(conn).await;
            }
            drop(permit);
        });
    }
}

enum Input {
    Line(Vec<u8>),
    /// A last error before closing (oversized or unfinished line).
    Fatal(ApiError),
}

async fn connection(
    shared: &Arc<Shared>,
    stream: UnixStream,
    conn: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    // Attested once, when accepted; the entries are matched per request.
    let peer = match PeerInfo::from_tokio(&stream).await {
        Ok(p) => Ok(p),
        Err(e) => {
            tracing::info!(conn, error = %e, "a workload connection could not be attested");
            Err(ApiError::new(
                code::NOT_ATTESTED,
                format!("the caller could not be attested: {e}"),
            ))
        }
    };
    let (read, mut write) = stream.into_split();
    let (lines_tx, mut lines) = mpsc::channel::<Input>(1);
    let limits = shared.limits.clone();
    let reader = tokio::spawn(async move {
        let mut r = BufReader::new(read);
        loop {
            match protocol::read_line(&mut r, limits.max_line, limits.line_timeout).await {
                Ok(Some(l)) if l.iter().all(u8::is_ascii_whitespace) => {}
                Ok(Some(l)) => {
                    if lines_tx.send(Input::Line(l)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let _ = lines_tx.send(Input::Fatal(e.to_api())).await;
                    return;
                }
            }
        }
    });
    let (events_tx, mut events) = mpsc::channel::<Vec<u8>>(16);
    let mut watchers = Vec::new();
    let timeout = shared.limits.write_timeout;
    loop {
        let out = tokio::select! {
            () = crate::stopped(&mut shutdown) => break,
            Some(ev) = events.recv() => ev,
            input = lines.recv() => match input {
                None => break,
                Some(Input::Fatal(e)) => {
                    let _ = send(&mut write, &protocol::error_line(None, &e), timeout).await;
                    break;
                }
                Some(Input::Line(l)) => {
                    let (out, close) = match &peer {
                        Ok(p) => request(shared, p, conn, &l, &events_tx, &mut watchers).await,
                        Err(e) => {
                            let id = protocol::parse(&l).map_or_else(|(id, _)| id, |r| r.id);
                            (protocol::error_line(id, e), false)
                        }
                    };
                    if close {
                        let _ = send(&mut write, &out, timeout).await;
                        break;
                    }
                    out
                }
            },
        };
        if send(&mut write, &out, timeout).await.is_err() {
            break;
        }
    }
    reader.abort();
    for w in watchers {
        w.abort();
    }
}

async fn send<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
    timeout: std::time::Duration,
) -> Result<(), ()> {
    match tokio::time::timeout(timeout, w.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Answers one line; the flag says to close the connection after it.
async fn request(
    shared: &Arc<Shared>,
    peer: &PeerInfo,
    conn: u64,
    line: &[u8],
    events: &mpsc::Sender<Vec<u8>>,
    watchers: &mut Vec<tokio::task::JoinHandle<()>>,
) -> (Vec<u8>, bool) {
    let req = match protocol::parse(line) {
        Ok(r) => r,
        Err((id, e)) => return (protocol::error_line(id, &e), false),
    };
    let id = req.id;
    let caller = match shared.caller(peer, conn) {
        Ok(c) => c,
        Err(e) => {
            let close = !peer.is_alive();
            return (protocol::error_line(id, &e), close);
        }
    };
    let result = match req.op {
        Op::Health => to_value(&shared.health()),
        Op::Whoami => to_value(&Shared::whoami(&caller)),
        Op::StartTask(op) => shared
            .start_task(&caller, op)
            .await
            .and_then(|r| to_value(&r)),
        Op::EndTask(op) => shared
            .end_task(&caller, op)
            .await
            .and_then(|r| to_value(&r)),
        Op::Fetch(op) => shared.fetch(&caller, op).await.and_then(|r| to_value(&r)),
        Op::Renew(op) => shared.renew(&caller, op).await.and_then(|r| to_value(&r)),
        Op::Watch(op) => match shared.watch(&caller, &op.task).await {
            Ok(rx) => {
                watchers.retain(|w| !w.is_finished());
                watchers.push(tokio::spawn(forward(rx, events.clone())));
                to_value(&Watching { watching: op.task })
            }
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(v) => (protocol::ok_line(id, &v), false),
        Err(e) => (protocol::error_line(id, &e), false),
    }
}

fn to_value(v: &impl serde::Serialize) -> Result<serde_json::Value, ApiError> {
    serde_json::to_value(v).map_err(|_| ApiError::new(code::INTERNAL, "cannot encode the response"))
}

/// Forwards one task's events to the connection until the task ends.
async fn forward(mut rx: broadcast::Receiver<Event>, tx: mpsc::Sender<Vec<u8>>) {
    loop {
        match rx.recv().await {
            Ok(ev) => {
                let last = matches!(ev, Event::TaskEnded { .. });
                if tx.send(protocol::line(&ev)).await.is_err() || last {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(skipped = n, "a watcher fell behind");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
