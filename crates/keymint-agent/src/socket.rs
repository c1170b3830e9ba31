//! The workload socket: accepts connections (at most
//! [`crate::Limits::max_connections`] at once, and
//! [`crate::Limits::max_connections_per_uid`] per uid), attests each peer
//! when it is accepted, and serves its requests in order.
//!
//! Per connection, a reader task turns bytes into bounded lines
//! ([`crate::protocol::read_line`]), reading with `recvmsg` so that the
//! kernel names the process that wrote each chunk
//! ([`keymint_attest::SenderCheckedRead`]); the connection task answers
//! each line and forwards the events of the tasks it watches. Every request
//! re-checks that the very process that connected is still alive (its
//! pidfd), still runs the executable that was attested (device and inode
//! of `/proc/PID/exe`, and its start time), and wrote the request itself
//! (not a forked child or a process the descriptor was passed to), then
//! matches it against the entries as they are now. A connection that fails
//! any of these, or whose peer matches no entry, is answered and closed. A
//! connection idle for [`crate::Limits::idle_timeout`] with no task and no
//! watch is closed. docs/design/0024-agent-hardening.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use keymint_attest::{PeerInfo, SenderCheckedRead, Senders, UidSlots};
use tokio::io::{AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, broadcast, mpsc, watch};
use tokio::time::Instant;

use crate::protocol::{self, ApiError, Attached, Event, Op, Watching, code};
use crate::state::Shared;

/// Answers `busy` (bounded by the write timeout) and closes.
fn busy(stream: UnixStream, timeout: std::time::Duration, why: &'static str) {
    tokio::spawn(async move {
        let mut s = stream;
        let e = ApiError::new(code::BUSY, why);
        let _ = tokio::time::timeout(timeout, s.write_all(&protocol::error_line(None, &e))).await;
    });
}

/// Connections refused at accept: counted for the health report and
/// logged at most once a minute with how many were refused since the last
/// line. A uid at its limit can connect as fast as it likes; a line each
/// would let it fill the agent's log.
#[derive(Debug, Default)]
struct Refusals {
    since_line: u64,
    last_line: Option<Instant>,
}

impl Refusals {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(60);

    fn note(&mut self, shared: &Shared, uid: u32, why: &'static str) {
        shared.refused.fetch_add(1, Ordering::Relaxed);
        self.since_line += 1;
        let now = Instant::now();
        if self
            .last_line
            .is_none_or(|t| now.duration_since(t) >= Self::EVERY)
        {
            tracing::warn!(
                uid,
                refused = self.since_line,
                reason = why,
                "workload socket: connections refused (every refusal is counted in the health report's refused_connections; this line at most once a minute)"
            );
            self.since_line = 0;
            self.last_line = Some(now);
        }
    }
}

/// Accepts until `shutdown` turns true.
pub async fn serve(
    listener: UnixListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Every chunk a peer writes carries its writer's pid from now on.
    if let Err(e) = keymint_attest::pass_credentials(&listener) {
        tracing::error!(error = %e, "cannot turn on SO_PASSCRED; requests from another process than the attested one cannot be told apart");
    }
    let permits = Arc::new(Semaphore::new(shared.limits.max_connections));
    let per_uid = Arc::new(UidSlots::default());
    let next = AtomicU64::new(1);
    let mut refusals = Refusals::default();
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
        let timeout = shared.limits.write_timeout;
        // Inherited from the listener; set again in case a kernel does not.
        if let Err(e) = keymint_attest::pass_credentials(&stream) {
            tracing::warn!(error = %e, "cannot turn on SO_PASSCRED on a connection");
        }
        // The uid that connected (SO_PEERCRED, no /proc read): one uid may
        // hold only its share of the connections.
        let Ok(uid) = stream.peer_cred().map(|c| c.uid()) else {
            continue;
        };
        let Some(slot) = per_uid.take(uid, shared.limits.max_connections_per_uid) else {
            refusals.note(&shared, uid, "a uid reached its connection limit");
            busy(
                stream,
                timeout,
                "too many connections from this uid; try again",
            );
            continue;
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            refusals.note(&shared, uid, "the socket reached its connection limit");
            busy(stream, timeout, "too many connections; try again");
            continue;
        };
        let conn = next.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(&shared);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shared.connections.fetch_add(1, Ordering::Relaxed);
            connection(&shared, stream, conn, shutdown.clone()).await;
            // The workload hung up: its tasks end. The agent stopping is
            // not the workload's doing: they stay (docs/design/0012).
            if *shutdown.borrow() {
                shared.disown(conn);
            } else {
                shared.connection_closed(conn).await;
            }
            drop(permit);
            drop(slot);
            // Counted until its places are free: a health report of 0
            // means the next connection is served, not refused `busy`.
            shared.connections.fetch_sub(1, Ordering::Relaxed);
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
    let timeout = shared.limits.write_timeout;
    // A peer that matches no entry is told what was seen and closed at
    // once: it holds no slot (docs/design/0024). Before the first entry
    // sync nobody can be matched; the connection waits as before.
    let refusal = match &peer {
        Err(e) => Some(e.clone()),
        Ok(p) => match shared.caller(p, conn) {
            Err(e) if e.code == code::NOT_ATTESTED => Some(e),
            _ => None,
        },
    };
    let (read, mut write) = stream.into_split();
    if let Some(e) = refusal {
        let _ = send(&mut write, &protocol::error_line(None, &e), timeout).await;
        return;
    }
    let (read, senders) = SenderCheckedRead::new(read, peer.as_ref().map_or(0, PeerInfo::pid));
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
    let mut watchers: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let idle = shared.limits.idle_timeout;
    let mut idle_at = Instant::now() + idle;
    loop {
        let out = tokio::select! {
            () = crate::stopped(&mut shutdown) => break,
            () = tokio::time::sleep_until(idle_at) => {
                if watchers.iter().any(|w| !w.is_finished()) || shared.owns_tasks(conn) {
                    idle_at = Instant::now() + idle;
                    continue;
                }
                tracing::debug!(conn, "closing an idle connection");
                break;
            }
            Some(ev) = events.recv() => ev,
            input = lines.recv() => match input {
                None => break,
                Some(Input::Fatal(e)) => {
                    let _ = send(&mut write, &protocol::error_line(None, &e), timeout).await;
                    break;
                }
                Some(Input::Line(l)) => {
                    let (out, close) = match &peer {
                        Ok(p) => {
                            request(shared, p, &senders, conn, &l, &events_tx, &mut watchers).await
                        }
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
        idle_at = Instant::now() + idle;
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
    senders: &Senders,
    conn: u64,
    line: &[u8],
    events: &mpsc::Sender<Vec<u8>>,
    watchers: &mut Vec<tokio::task::JoinHandle<()>>,
) -> (Vec<u8>, bool) {
    let (id, req) = match protocol::parse(line) {
        Ok(r) => (r.id.clone(), Ok(r)),
        Err((id, e)) => (id, Err(e)),
    };
    // INVARIANT (docs/design/0024): a request is answered only for the
    // process that connected, written by that process, while it still
    // runs what was attested. Checked before anything else, bad lines
    // included.
    if peer.is_alive()
        && let Err(e) = same_process(peer, senders)
    {
        tracing::warn!(conn, pid = peer.pid(), reason = %e.message, "refused a request on a connection whose process changed");
        return (protocol::error_line(id, &e), true);
    }
    let req = match req {
        Ok(r) => r,
        Err(e) => return (protocol::error_line(id, &e), false),
    };
    let caller = match shared.caller(peer, conn) {
        Ok(c) => c,
        // Gone, or no longer matching any entry: answered and closed. The
        // entries not synced yet: answered, the connection stays.
        Err(e) => {
            let close = e.code != code::UNAVAILABLE;
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
        Op::Watch(op) => {
            watchers.retain(|w| !w.is_finished());
            if watchers.len() >= shared.limits.max_watches {
                Err(ApiError::new(
                    code::BUSY,
                    format!(
                        "at most {} watches at once on one connection; this one was not started",
                        shared.limits.max_watches
                    ),
                ))
            } else {
                shared.watch(&caller, &op.task).await.and_then(|rx| {
                    watchers.push(tokio::spawn(forward(rx, events.clone())));
                    to_value(&Watching { watching: op.task })
                })
            }
        }
        Op::Attach(op) => shared
            .attach(&caller, &op.task)
            .await
            .and_then(|()| to_value(&Attached { attached: op.task })),
    };
    match result {
        Ok(v) => (protocol::ok_line(id, &v), false),
        Err(e) => (protocol::error_line(id, &e), false),
    }
}

/// The attested process wrote every byte so far on this connection, and
/// still runs the executable it was attested with.
fn same_process(peer: &PeerInfo, senders: &Senders) -> Result<(), ApiError> {
    if let Some(other) = senders.foreign() {
        let who = if other > 0 {
            format!("process `{other}`")
        } else {
            "a process the kernel did not name".to_owned()
        };
        return Err(ApiError::new(
            code::NOT_ATTESTED,
            format!(
                "a request on this connection was written by {who}, not by the attested process \
                 (pid `{}`); the connection is closed",
                peer.pid()
            ),
        ));
    }
    peer.recheck().map_err(|e| {
        ApiError::new(
            code::NOT_ATTESTED,
            format!(
                "the attested process (pid `{}`) is no longer what was attested ({e}); the \
                 connection is closed",
                peer.pid()
            ),
        )
    })
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
