//! The connections to one upstream (docs/design/0029-proxy-hot-path.md,
//! "Third pass"): hyper's connection-level senders, kept per upstream,
//! instead of hyper-util's general client with its pool keyed by scheme and
//! host.
//!
//! What the general client did and this keeps:
//!
//! - connections through the same connector (TLS with the web PKI roots,
//!   `TCP_NODELAY`, a connect timeout), HTTP/1.1 or HTTP/2 as ALPN decides;
//! - reuse: an HTTP/1.1 connection goes back to the pool once its response
//!   was read to the end (a response dropped before its end closes the
//!   connection, as hyper must); an HTTP/2 connection is shared;
//! - idle connections: at most [`MAX_IDLE`] per upstream, the most recently
//!   used first, and one idle longer than [`IDLE_TIMEOUT`] is closed when
//!   the pool is next used (the general client, built without a timer as
//!   it was, expired them the same way);
//! - a connection the upstream closed: found closed (or failing to become
//!   ready) at checkout, it is dropped before anything is written to it.
//!   A request is sent again on another connection only where hyper hands
//!   it back unsent (`TrySendError::take_message`) on a connection taken
//!   from the pool, exactly the case the general client retried
//!   (`retry_canceled_requests`); a request that may have reached the
//!   upstream is never sent twice;
//! - HTTP/1.1 requests in origin form with a `Host` header (the request's
//!   own if it has one).
//!
//! What it saves per request: the general client's pool key (scheme and
//! authority copied per request), its checkout and connect race, and the
//! task it spawned per HTTP/1.1 response to wait for the connection to be
//! ready again.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::TokioExecutor;
use tower::ServiceExt;

/// The connector: TCP (with `TCP_NODELAY` and a connect timeout), then TLS
/// for `https`.
pub(crate) type Https = HttpsConnector<HttpConnector>;

/// The connector the proxy uses for every upstream: TCP with
/// `TCP_NODELAY` and `connect_timeout`, then TLS (web PKI roots) for
/// `https`, HTTP/1.1 or HTTP/2 as ALPN decides.
pub(crate) fn connector(connect_timeout: Duration) -> Https {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
}

/// Idle connections kept per upstream at most.
pub(crate) const MAX_IDLE: usize = 256;
/// An idle connection unused this long is closed rather than reused.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

type Body1 = Full<Bytes>;

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// No connection could be made: nothing was sent.
    #[error("cannot connect to the upstream")]
    Connect,
    /// The connection failed around the request: it may have reached the
    /// upstream.
    #[error("the upstream request failed")]
    Send(#[source] hyper::Error),
}

impl SendError {
    pub(crate) const fn is_connect(&self) -> bool {
        matches!(self, Self::Connect)
    }
}

/// The connections to one upstream.
pub(crate) struct Pool {
    connector: Https,
    idle: Mutex<Idle>,
    /// The `Host` header of the first authority written: a pool serves one
    /// upstream, so it is made once rather than formatted per request.
    host: OnceLock<(Authority, HeaderValue)>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Idle {
    /// HTTP/1.1 connections waiting for a request, the oldest in front.
    h1: VecDeque<(http1::SendRequest<Body1>, Instant)>,
    /// The HTTP/2 connection, shared by every request.
    h2: Option<http2::SendRequest<Body1>>,
}

enum Conn {
    H1(http1::SendRequest<Body1>),
    H2(http2::SendRequest<Body1>),
}

impl Pool {
    pub(crate) fn new(connector: Https) -> Self {
        Self {
            connector,
            idle: Mutex::new(Idle::default()),
            host: OnceLock::new(),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `req` (absolute URI) on a pooled connection or a new one.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut req: Request<Body1>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let uri = req.uri().clone();
        loop {
            let (conn, reused) = match self.checkout().await {
                Some(c) => (c, true),
                // Boxed: the connect and the handshakes (HTTP/2's above all)
                // are a large state that every request's future would
                // otherwise carry and move, for a path taken once per
                // connection.
                None => (Box::pin(self.connect(&uri)).await?, false),
            };
            let unsent = match conn {
                Conn::H1(mut tx) => {
                    self.h1_form(&mut req, &uri);
                    match tx.try_send_request(req).await {
                        Ok(r) => {
                            let back = Checkin {
                                pool: Arc::downgrade(self),
                                tx,
                            };
                            return Ok(r.map(|b| UpstreamBody::new(b, Some(back))));
                        }
                        Err(mut e) => match e.take_message() {
                            Some(r) if reused => r,
                            _ => return Err(SendError::Send(e.into_error())),
                        },
                    }
                }
                Conn::H2(mut tx) => match tx.try_send_request(req).await {
                    Ok(r) => return Ok(r.map(|b| UpstreamBody::new(b, None))),
                    Err(mut e) => match e.take_message() {
                        Some(r) if reused => {
                            self.forget_h2(&tx);
                            r
                        }
                        _ => {
                            self.forget_h2(&tx);
                            return Err(SendError::Send(e.into_error()));
                        }
                    },
                },
            };
            // INVARIANT: hyper handed the request back unwritten, on a
            // connection from the pool: sending it again cannot send it
            // twice (the general client's `retry_canceled_requests`).
            req = unsent;
            *req.uri_mut() = uri.clone();
        }
    }

    /// A connection from the pool that is ready for a request.
    async fn checkout(&self) -> Option<Conn> {
        loop {
            let mut tx = {
                let mut idle = self.idle();
                if let Some(h2) = &idle.h2 {
                    if !h2.is_closed() {
                        return Some(Conn::H2(h2.clone()));
                    }
                    idle.h2 = None;
                }
                let now = Instant::now();
                while idle
                    .h1
                    .front()
                    .is_some_and(|(_, since)| now.duration_since(*since) > IDLE_TIMEOUT)
                {
                    idle.h1.pop_front();
                }
                idle.h1.pop_back()?.0
            };
            if tx.is_closed() {
                continue;
            }
            // Back in the pool once its response was read; ready as soon as
            // the connection's task has seen that. An error: it closed.
            if tx.ready().await.is_ok() {
                return Some(Conn::H1(tx));
            }
        }
    }

    /// A new connection to `uri`'s host, its task spawned.
    async fn connect(&self, uri: &Uri) -> Result<Conn, SendError> {
        let io = self
            .connector
            .clone()
            .oneshot(uri.clone())
            .await
            .map_err(|e| {
                tracing::debug!(error = %e, "proxy: upstream connect failed");
                SendError::Connect
            })?;
        if io.connected().is_negotiated_h2() {
            let (mut tx, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(SendError::Send)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "proxy: upstream connection ended");
                }
            });
            tx.ready().await.map_err(SendError::Send)?;
            self.idle().h2 = Some(tx.clone());
            Ok(Conn::H2(tx))
        } else {
            let (tx, conn) = http1::handshake(io).await.map_err(SendError::Send)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "proxy: upstream connection ended");
                }
            });
            Ok(Conn::H1(tx))
        }
    }

    fn checkin(&self, tx: http1::SendRequest<Body1>) {
        if tx.is_closed() {
            return;
        }
        let mut idle = self.idle();
        if idle.h1.len() < MAX_IDLE {
            idle.h1.push_back((tx, Instant::now()));
        }
    }

    /// Drops the shared HTTP/2 connection if it is `tx`'s and unusable.
    fn forget_h2(&self, tx: &http2::SendRequest<Body1>) {
        if tx.is_closed() {
            let mut idle = self.idle();
            if idle.h2.as_ref().is_some_and(http2::SendRequest::is_closed) {
                idle.h2 = None;
            }
        }
    }

    #[cfg(test)]
    fn idle_h1(&self) -> usize {
        self.idle().h1.len()
    }

    /// HTTP/1.1 wants the origin form and a `Host` header, as the general
    /// client wrote them.
    fn h1_form(&self, req: &mut Request<Body1>, uri: &Uri) {
        if !req.headers().contains_key(HOST)
            && let Some(authority) = uri.authority()
        {
            let made = match self.host.get() {
                Some((a, v)) if a == authority => Some(v.clone()),
                _ => host_header(uri).inspect(|v| {
                    let _ = self.host.set((authority.clone(), v.clone()));
                }),
            };
            if let Some(v) = made {
                req.headers_mut().insert(HOST, v);
            }
        }
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(path);
    }
}

/// The `Host` header of `uri`: its host, and its port when not the
/// scheme's default.
fn host_header(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    match uri.port_u16() {
        Some(p) if !is_default_port(uri, p) => HeaderValue::from_str(&format!("{host}:{p}")),
        _ => HeaderValue::from_str(host),
    }
    .ok()
}

fn is_default_port(uri: &Uri, port: u16) -> bool {
    match uri.scheme_str() {
        Some("http") => port == 80,
        Some("https") => port == 443,
        _ => false,
    }
}

/// An HTTP/1.1 connection to put back once its response is read.
struct Checkin {
    pool: Weak<Pool>,
    tx: http1::SendRequest<Body1>,
}

/// An upstream response's body; read to its end, it gives its HTTP/1.1
/// connection back to the pool.
pub(crate) struct UpstreamBody {
    inner: Incoming,
    back: Option<Checkin>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").finish_non_exhaustive()
    }
}

impl UpstreamBody {
    fn new(inner: Incoming, back: Option<Checkin>) -> Self {
        let mut b = Self { inner, back };
        if b.inner.is_end_stream() {
            b.done();
        }
        b
    }

    fn done(&mut self) {
        if let Some(c) = self.back.take()
            && let Some(pool) = c.pool.upgrade()
        {
            pool.checkin(c.tx);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &r {
            Some(Ok(_)) if self.inner.is_end_stream() => self.done(),
            None => self.done(),
            // An error: the connection is not reused.
            Some(Err(_)) => self.back = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn pool() -> Arc<Pool> {
        Arc::new(Pool::new(connector(Duration::from_secs(10))))
    }

    fn host_of(pool: &Pool, uri: &str) -> (Option<String>, String) {
        let uri: Uri = uri.parse().unwrap();
        let mut req = Request::new(Full::new(Bytes::new()));
        pool.h1_form(&mut req, &uri);
        let host = req
            .headers()
            .get(HOST)
            .map(|v| v.to_str().unwrap().to_owned());
        (host, req.uri().to_string())
    }

    #[test]
    fn the_host_header_is_made_once_per_authority_as_the_general_client_made_it() {
        let p = pool();
        let first = host_of(&p, "http://127.0.0.1:8080/v1/chat/completions?a=1");
        assert_eq!(
            first,
            (
                Some("127.0.0.1:8080".into()),
                "/v1/chat/completions?a=1".into()
            )
        );
        // Kept for the pool's authority, and the same when reused.
        assert!(p.host.get().is_some());
        assert_eq!(host_of(&p, "http://127.0.0.1:8080/v1/models").0, first.0);
        // Another authority still gets its own (default ports left out).
        assert_eq!(
            host_of(&p, "https://api.example.com:443/v1").0,
            Some("api.example.com".into())
        );
        assert_eq!(
            host_of(&p, "http://example.com:80/").0,
            Some("example.com".into())
        );
        assert_eq!(
            host_of(&p, "https://example.com:8443/").0,
            Some("example.com:8443".into())
        );
        // A request's own `Host` is kept.
        let mut req = Request::new(Full::new(Bytes::new()));
        req.headers_mut()
            .insert(HOST, HeaderValue::from_static("chosen"));
        p.h1_form(&mut req, &"http://127.0.0.1:8080/x".parse().unwrap());
        assert_eq!(req.headers()[HOST], "chosen");
    }

    /// A stand-in upstream on a fresh port: `conn` runs for every accepted
    /// connection. Returns the port and the count of connections accepted.
    async fn upstream<F, Fut>(conn: F) -> (u16, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(conn(s));
            }
        });
        (port, accepted)
    }

    fn get(port: u16, path: &str) -> Request<Body1> {
        Request::builder()
            .uri(format!("http://127.0.0.1:{port}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    /// Reads one request head (and no body: the tests send none).
    async fn read_head(s: &mut tokio::net::TcpStream) -> Option<String> {
        let mut buf = Vec::new();
        let mut b = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).await.ok()? == 0 {
                return None;
            }
            buf.push(b[0]);
        }
        Some(String::from_utf8_lossy(&buf).into_owned())
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    /// Reads one request, counts it in `n` and answers it.
    async fn answer_once(s: &mut tokio::net::TcpStream, n: &AtomicUsize) {
        if read_head(s).await.is_some() {
            n.fetch_add(1, Ordering::SeqCst);
            s.write_all(OK).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_was_read() {
        let heads = Arc::new(Mutex::new(Vec::new()));
        let h = Arc::clone(&heads);
        let (port, accepted) = upstream(move |mut s| {
            let h = Arc::clone(&h);
            async move {
                while let Some(head) = read_head(&mut s).await {
                    h.lock().unwrap().push(head);
                    s.write_all(OK).await.unwrap();
                }
            }
        })
        .await;
        let p = pool();
        for _ in 0..3 {
            let r = p.send(get(port, "/v1/x?a=1")).await.unwrap();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(p.idle_h1(), 1);
        // Origin form and the Host header, as the general client sent them.
        let heads = heads.lock().unwrap();
        assert!(
            heads[0].starts_with("GET /v1/x?a=1 HTTP/1.1\r\n"),
            "{}",
            heads[0]
        );
        assert!(
            heads[0]
                .to_ascii_lowercase()
                .contains(&format!("host: 127.0.0.1:{port}\r\n"))
        );
    }

    #[tokio::test]
    async fn a_response_dropped_before_its_end_does_not_return_its_connection() {
        let (port, accepted) = upstream(|mut s| async move {
            while read_head(&mut s).await.is_some() {
                // Promises 10 bytes, sends 2.
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nok")
                    .await;
            }
        })
        .await;
        let p = pool();
        let r = p.send(get(port, "/")).await.unwrap();
        drop(r);
        assert_eq!(p.idle_h1(), 0);
        let r = p.send(get(port, "/")).await.unwrap();
        drop(r);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// The upstream closes each connection after answering, without
    /// saying so: the next request finds the pooled connection closed and
    /// goes out once, on a new connection.
    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_used_and_nothing_is_sent_twice() {
        let requests = Arc::new(AtomicUsize::new(0));
        let r2 = Arc::clone(&requests);
        let (port, _) = upstream(move |mut s| {
            let r2 = Arc::clone(&r2);
            async move {
                answer_once(&mut s, &r2).await;
                // Dropped: closed.
            }
        })
        .await;
        let p = pool();
        for i in 1..=3 {
            let r = p.send(get(port, "/")).await.unwrap();
            r.into_body().collect().await.unwrap();
            // Let the connection's task see the close.
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(requests.load(Ordering::SeqCst), i);
        }
    }

    /// A request that reached the upstream and got no answer (the
    /// connection closed after reading it) is an error, never resent.
    #[tokio::test]
    async fn a_request_that_may_have_arrived_is_not_sent_again() {
        let requests = Arc::new(AtomicUsize::new(0));
        let r2 = Arc::clone(&requests);
        let (port, _) = upstream(move |mut s| {
            let r2 = Arc::clone(&r2);
            async move {
                // The first request on the connection is answered, the
                // second read and left unanswered.
                answer_once(&mut s, &r2).await;
                if read_head(&mut s).await.is_some() {
                    r2.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
        .await;
        let p = pool();
        let r = p.send(get(port, "/")).await.unwrap();
        r.into_body().collect().await.unwrap();
        let e = p.send(get(port, "/")).await.unwrap_err();
        assert!(!e.is_connect());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(requests.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn no_listener_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let e = pool().send(get(port, "/")).await.unwrap_err();
        assert!(e.is_connect());
    }
}
