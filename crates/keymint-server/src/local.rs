//! The API on a Unix socket, for processes on this host (`[local]`). Each
//! connection's peer is attested once (uid, pidfd, executable hash,
//! cgroup; `keymint-attest`) and matched against the registration entries;
//! a request on that connection without a bearer token acts as the matched
//! workload, only while the attested process is still alive, and only if
//! every byte on the connection so far was written by that process
//! (`SO_PASSCRED`: a descriptor passed to another process, or inherited by
//! a child that runs another executable, writes under its own pid; the
//! node agent checks the same, docs/design/0024). A request with a bearer
//! token is authenticated as on TCP.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use keymint_attest::{AttestedWorkload, PeerInfo, Registry, SenderCheckedRead, Senders};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixListener;
use tokio::net::unix::OwnedWriteHalf;

/// What attestation found for a connection.
#[derive(Debug, Clone)]
pub struct LocalPeer(pub Arc<Attested>);

#[derive(Debug)]
pub enum Attested {
    Workload {
        peer: PeerInfo,
        workload: AttestedWorkload,
        /// Who wrote on the connection: a request written by another
        /// process than `peer` acts as nobody.
        senders: Senders,
    },
    /// Why the caller is nobody: it says what was seen (uid, executable,
    /// hash), never anything secret.
    Refused(String),
}

/// What the peer `found` of a connection attests to; `senders` tells who
/// writes on the connection later.
fn attest(
    found: Result<PeerInfo, keymint_attest::PeerError>,
    registry: &Registry,
    senders: Senders,
) -> Attested {
    let peer = match found {
        Ok(p) => p,
        Err(e) => return Attested::Refused(format!("cannot attest the caller: {e}")),
    };
    match registry.attest(&peer) {
        Ok(workload) => Attested::Workload {
            peer,
            workload,
            senders,
        },
        Err(e) => Attested::Refused(e.to_string()),
    }
}

/// A connection whose reads record each chunk's writer
/// ([`SenderCheckedRead`]); writes go out as they are.
struct Checked {
    read: SenderCheckedRead,
    write: OwnedWriteHalf,
}

impl AsyncRead for Checked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for Checked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.write).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.write).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.write.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.write).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.write).poll_shutdown(cx)
    }
}

/// What a connection past its uid's share is answered before it is closed:
/// a 503 with the API's problem body (`unavailable`) and `Retry-After`.
fn busy() -> Vec<u8> {
    let problem = keymint_proto::ErrorCode::Unavailable
        .problem("too many connections from this uid on the local socket; try again");
    let body = serde_json::to_vec(&problem).unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Answers a connection past its uid's share with [`busy`] and closes it,
/// within a second: the answer, then the request read and dropped until
/// the client closes (a client still writing its request would otherwise
/// get a broken pipe instead of the answer).
async fn refuse(mut stream: tokio::net::UnixStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        stream.write_all(&busy()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut read = 0;
        while read < 64 * 1024 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => read += n,
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Serves `router` on the Unix socket until `shutdown` completes, attesting
/// each connection's peer first; then lets every connection finish the
/// request it is answering and waits for them all (at most 30 s), as the
/// TCP listeners do. One uid holds at most `per_uid` connections at once
/// (each is attested, its executable hashed on the blocking pool); past
/// it a connection is answered 503 and closed, never attested, and counted
/// in the broker's metrics (`keymint_local_connections_refused_total`).
pub async fn serve(
    listener: UnixListener,
    registry: Arc<Registry>,
    per_uid: usize,
    broker: Arc<crate::broker::Broker>,
    router: crate::Front,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::TokioIo;
    use tower::ServiceExt as _;
    let drain = crate::cores::Drain::new();
    // Every connection accepted inherits it: each chunk read names its
    // writer's pid.
    if let Err(e) = keymint_attest::pass_credentials(&listener) {
        tracing::error!(error = %e, "local socket: cannot turn on SO_PASSCRED; no request will act as an attested workload");
    }
    tokio::pin!(shutdown);
    let slots = Arc::new(keymint_attest::UidSlots::default());
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "local socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // The uid that connected (SO_PEERCRED, no /proc read).
        let Ok(uid) = stream.peer_cred().map(|c| c.uid()) else {
            continue;
        };
        let Some(slot) = slots.take(uid, per_uid) else {
            // Counted for the metrics; logged at debug, not info: each
            // refusal is cheap for the caller, and a log line each would
            // let it flood the log instead.
            broker
                .metrics
                .local_refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(uid, "local socket: a uid reached its connection limit");
            tokio::spawn(refuse(stream));
            continue;
        };
        let registry = Arc::clone(&registry);
        let router = router.clone();
        let member = drain.member();
        tokio::spawn(async move {
            let _slot = slot;
            // Set again in case a kernel does not pass it on from the
            // listener; without it no chunk names its writer, and the
            // connection acts as nobody.
            let _ = keymint_attest::pass_credentials(&stream);
            let peer = PeerInfo::from_tokio(&stream).await;
            let pid = peer.as_ref().map_or(0, PeerInfo::pid);
            let (read, write) = stream.into_split();
            let (read, senders) = SenderCheckedRead::new(read, pid);
            let stream = Checked { read, write };
            let found = LocalPeer(Arc::new(attest(peer, &registry, senders)));
            // `Front` bounds a body to the API in time, as on every listener.
            let svc = router.map_request(move |mut req: http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(found.clone());
                req
            });
            let (svc, activity) =
                crate::cores::Noting::new(hyper_util::service::TowerToHyperService::new(svc));
            let server = crate::cores::http_server();
            let conn = server.serve_connection(TokioIo::new(stream), svc);
            crate::cores::serve_until(
                conn,
                &activity,
                member,
                crate::cores::HEADER_READ_TIMEOUT,
                &"local socket",
                |c| c.graceful_shutdown(),
            )
            .await;
        });
    }
    drop(listener);
    drain.finish(crate::cores::SHUTDOWN_GRACE, "local").await;
}
