//! The API on a Unix socket, for processes on this host (`[local]`). Each
//! connection's peer is attested once (uid, pidfd, executable hash,
//! cgroup; `keymint-attest`) and matched against the registration entries;
//! a request on that connection without a bearer token acts as the matched
//! workload, and only while the attested process is still alive. A request
//! with a bearer token is authenticated as on TCP.

use std::sync::Arc;

use keymint_attest::{AttestedWorkload, PeerInfo, Registry};
use tokio::net::UnixListener;

/// What attestation found for a connection.
#[derive(Debug, Clone)]
pub struct LocalPeer(pub Arc<Attested>);

#[derive(Debug)]
pub enum Attested {
    Workload {
        peer: PeerInfo,
        workload: AttestedWorkload,
    },
    /// Why the caller is nobody: it says what was seen (uid, executable,
    /// hash), never anything secret.
    Refused(String),
}

/// Attests the peer of `stream`.
pub async fn attest(stream: &tokio::net::UnixStream, registry: &Registry) -> Attested {
    let peer = match PeerInfo::from_tokio(stream).await {
        Ok(p) => p,
        Err(e) => return Attested::Refused(format!("cannot attest the caller: {e}")),
    };
    match registry.attest(&peer) {
        Ok(workload) => Attested::Workload { peer, workload },
        Err(e) => Attested::Refused(e.to_string()),
    }
}

/// Serves `router` on the Unix socket until `shutdown` completes, attesting
/// each connection's peer first; then lets every connection finish the
/// request it is answering and waits for them all (at most 30 s), as the
/// TCP listeners do.
pub async fn serve(
    listener: UnixListener,
    registry: Arc<Registry>,
    router: crate::Front,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::TokioIo;
    use tower::ServiceExt as _;
    let drain = crate::cores::Drain::new();
    tokio::pin!(shutdown);
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
        let registry = Arc::clone(&registry);
        let router = router.clone();
        let member = drain.member();
        tokio::spawn(async move {
            let found = LocalPeer(Arc::new(attest(&stream, &registry).await));
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
