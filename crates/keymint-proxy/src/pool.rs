//! The connections to one upstream (docs/design/0029-proxy-hot-path.md,
//! "Third pass" and "Sixth pass"): kept per upstream, instead of
//! hyper-util's general client with its pool keyed by scheme and host.
//!
//! What the general client did and this keeps:
//!
//! - connections through the same connector (TLS with the web PKI roots,
//!   `TCP_NODELAY`, a connect timeout), HTTP/1.1 or HTTP/2 as ALPN decides;
//! - reuse: an HTTP/1.1 connection goes back to the pool once its response
//!   was read to the end (a response dropped before its end closes the
//!   connection); an HTTP/2 connection is shared;
//! - idle connections: at most [`MAX_IDLE`] per upstream (the oldest closed
//!   to keep one more), the most recently
//!   used first, and one idle longer than [`IDLE_TIMEOUT`] is closed when
//!   the pool is next used (the general client, built without a timer as
//!   it was, expired them the same way);
//! - a connection the upstream closed: found closed (or with bytes nobody
//!   asked for) at checkout, it is dropped before anything is written to
//!   it, and the request goes on another. A request that may have reached
//!   the upstream is never sent twice: on HTTP/2 a request is sent again
//!   only where hyper hands it back unsent (`TrySendError::take_message`),
//!   exactly the case the general client retried
//!   (`retry_canceled_requests`);
//! - HTTP/1.1 requests in origin form with a `Host` header (the request's
//!   own if it has one).
//!
//! HTTP/1.1 is spoken by [`crate::h1`] in the request's own task; HTTP/2
//! by hyper, whose connection task multiplexes the streams.
//!
//! Where connections are served on one single-threaded runtime per core
//! ([`set_home`]), an idle HTTP/1.1 connection is taken only by a request
//! on the runtime that made it: its socket is registered with that
//! runtime's reactor, and a request on another core would be woken by
//! that reactor, through the other thread, at every read.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::uri::Authority;
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::TokioExecutor;
use tower::ServiceExt;

use crate::h1::{self, H1Body};

/// The connector: TCP (with `TCP_NODELAY` and a connect timeout), then TLS
/// for `https`.
pub(crate) type Https = HttpsConnector<HttpConnector>;

/// The connector the proxy uses for every upstream: TCP with
/// `TCP_NODELAY` and `connect_timeout`, then TLS (web PKI roots) for
/// `https`, HTTP/1.1 or HTTP/2 as ALPN decides.
pub(crate) fn connector(connect_timeout: Duration) -> Https {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp(connect_timeout))
}

/// The same connector trusting `tls`'s roots instead (tests: an upstream
/// with a certificate of their own).
#[cfg(test)]
fn connector_with(tls: rustls::ClientConfig, connect_timeout: Duration) -> Https {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp(connect_timeout))
}

fn tcp(connect_timeout: Duration) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http
}

/// Idle connections kept per upstream at most.
pub(crate) const MAX_IDLE: usize = 256;
/// An idle connection unused this long is closed rather than reused.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

type Body1 = Full<Bytes>;

thread_local! {
    /// This thread's runtime, if it is one of the per-core ones.
    static HOME: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the calling thread as the one thread of a single-threaded runtime,
/// number `n` (at least 1): the HTTP/1.1 connections made on it are reused
/// only by requests on it. Threads never marked share number 0 (one
/// multi-threaded runtime, whose reactor any of its workers drives).
pub fn set_home(n: usize) {
    HOME.with(|h| h.set(n));
}

/// The calling thread's runtime number ([`set_home`]).
pub(crate) fn home() -> usize {
    HOME.with(std::cell::Cell::get)
}

/// An error of an upstream exchange, whichever protocol it spoke.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// No connection could be made: nothing was sent.
    #[error("cannot connect to the upstream")]
    Connect,
    /// The connection failed around the request: it may have reached the
    /// upstream.
    #[error("the upstream request failed")]
    Send(#[source] BoxError),
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
    h1: VecDeque<(h1::Conn, Instant)>,
    /// The HTTP/2 connection, shared by every request.
    h2: Option<http2::SendRequest<Body1>>,
}

enum Conn {
    H1(h1::Conn),
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

    /// Sends `req` (absolute URI, its whole body) on a pooled connection
    /// or a new one.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut req: Request<Bytes>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        loop {
            let (conn, reused) = match self.checkout() {
                Some(c) => (c, true),
                // Boxed: the connect and the handshakes (HTTP/2's above all)
                // are a large state that every request's future would
                // otherwise carry and move, for a path taken once per
                // connection.
                None => (Box::pin(self.connect(req.uri())).await?, false),
            };
            match conn {
                Conn::H1(c) => return self.send_h1(c, &req).await,
                Conn::H2(mut tx) => {
                    // The bytes are reference counted: kept for a resend.
                    let body = req.body().clone();
                    match tx.try_send_request(req.map(Full::new)).await {
                        Ok(r) => return Ok(r.map(UpstreamBody::H2)),
                        Err(mut e) => {
                            self.forget_h2(&tx);
                            match e.take_message() {
                                // INVARIANT: hyper handed the request back
                                // unwritten, on a connection from the pool:
                                // sending it again cannot send it twice (the
                                // general client's `retry_canceled_requests`).
                                Some(r) if reused => req = r.map(|_| body),
                                _ => return Err(SendError::Send(e.into_error().into())),
                            }
                        }
                    }
                }
            }
        }
    }

    /// One request and its response head on an HTTP/1.1 connection, in
    /// this task.
    async fn send_h1(
        self: &Arc<Self>,
        mut conn: h1::Conn,
        req: &Request<Bytes>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let uri = req.uri();
        let host = self.h1_host(req);
        let target = uri.path_and_query().map_or("/", |p| p.as_str());
        let sent = h1::write_request(
            &mut conn,
            req.method(),
            target,
            host.as_ref(),
            req.headers(),
            req.body(),
        )
        .await
        .map_err(|e| SendError::Send(e.into()))?;
        let whole = matches!(sent, h1::Sent::Whole);
        match (
            h1::read_response(conn, req.method(), Arc::downgrade(self), whole).await,
            sent,
        ) {
            (Ok(r), _) => Ok(r.map(UpstreamBody::H1)),
            // No answer behind the failed write: the write's error says
            // what happened.
            (Err(_), h1::Sent::Broken(e)) => Err(SendError::Send(e.into())),
            (Err(e), _) => Err(SendError::Send(e.into())),
        }
    }

    /// A pooled connection that can take a request, if there is one.
    fn checkout(&self) -> Option<Conn> {
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
        let here = home();
        // The most recently used connection of this runtime.
        while let Some(i) = idle.h1.iter().rposition(|(c, _)| c.home == here) {
            let Some((mut c, _)) = idle.h1.remove(i) else {
                break;
            };
            // Closed by the upstream, or with bytes nobody asked for:
            // dropped before anything is written to it.
            if c.io.is_reusable() {
                return Some(Conn::H1(c));
            }
        }
        None
    }

    /// A new connection to `uri`'s host (HTTP/2's task spawned).
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
                .map_err(|e| SendError::Send(e.into()))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "proxy: upstream connection ended");
                }
            });
            tx.ready().await.map_err(|e| SendError::Send(e.into()))?;
            self.idle().h2 = Some(tx.clone());
            Ok(Conn::H2(tx))
        } else {
            let io = match io {
                MaybeHttpsStream::Http(tcp) => h1::Io::Tcp(tcp.into_inner()),
                MaybeHttpsStream::Https(tls) => h1::Io::Tls(Box::new(tls.into_inner())),
            };
            Ok(Conn::H1(h1::Conn::new(io)))
        }
    }

    /// An HTTP/1.1 connection whose response was read to its end.
    pub(crate) fn checkin_h1(&self, conn: h1::Conn) {
        let mut idle = self.idle();
        // Full: the oldest goes (an idle connection of a core whose
        // clients went quiet, say), not the one just used.
        if idle.h1.len() >= MAX_IDLE {
            idle.h1.pop_front();
        }
        idle.h1.push_back((conn, Instant::now()));
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

    /// The `Host` to write on HTTP/1.1, as the general client wrote it:
    /// `None` when the request has its own.
    fn h1_host(&self, req: &Request<Bytes>) -> Option<HeaderValue> {
        if req.headers().contains_key(HOST) {
            return None;
        }
        let uri = req.uri();
        let authority = uri.authority()?;
        match self.host.get() {
            Some((a, v)) if a == authority => Some(v.clone()),
            _ => host_header(uri).inspect(|v| {
                let _ = self.host.set((authority.clone(), v.clone()));
            }),
        }
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

/// An upstream response's body; read to its end, an HTTP/1.1 response
/// gives its connection back to the pool.
#[derive(Debug)]
pub(crate) enum UpstreamBody {
    H1(H1Body),
    H2(Incoming),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = match self.get_mut() {
            Self::H1(b) => ready!(Pin::new(b).poll_frame(cx)).map(|f| f.map_err(Into::into)),
            Self::H2(b) => ready!(Pin::new(b).poll_frame(cx)).map(|f| f.map_err(Into::into)),
        };
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::H1(b) => b.is_end_stream(),
            Self::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::H1(b) => b.size_hint(),
            Self::H2(b) => b.size_hint(),
        }
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

    fn host_of(pool: &Pool, uri: &str) -> Option<String> {
        let req = Request::builder().uri(uri).body(Bytes::new()).unwrap();
        pool.h1_host(&req).map(|v| v.to_str().unwrap().to_owned())
    }

    #[test]
    fn the_host_header_is_made_once_per_authority_as_the_general_client_made_it() {
        let p = pool();
        let first = host_of(&p, "http://127.0.0.1:8080/v1/chat/completions?a=1");
        assert_eq!(first.as_deref(), Some("127.0.0.1:8080"));
        // Kept for the pool's authority, and the same when reused.
        assert!(p.host.get().is_some());
        assert_eq!(host_of(&p, "http://127.0.0.1:8080/v1/models"), first);
        // Another authority still gets its own (default ports left out).
        assert_eq!(
            host_of(&p, "https://api.example.com:443/v1").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(
            host_of(&p, "http://example.com:80/").as_deref(),
            Some("example.com")
        );
        assert_eq!(
            host_of(&p, "https://example.com:8443/").as_deref(),
            Some("example.com:8443")
        );
        // A request's own `Host` is kept (written from its headers).
        let mut req = Request::builder()
            .uri("http://127.0.0.1:8080/x")
            .body(Bytes::new())
            .unwrap();
        req.headers_mut()
            .insert(HOST, HeaderValue::from_static("chosen"));
        assert_eq!(p.h1_host(&req), None);
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

    fn get(port: u16, path: &str) -> Request<Bytes> {
        Request::builder()
            .uri(format!("http://127.0.0.1:{port}{path}"))
            .body(Bytes::new())
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

    /// A connection made on one per-core runtime is reused there and not
    /// by a request on another (whose wake-ups its reactor would carry).
    #[tokio::test]
    async fn an_idle_connection_is_reused_only_on_the_runtime_that_made_it() {
        let (port, accepted) = upstream(|mut s| async move {
            while read_head(&mut s).await.is_some() {
                s.write_all(OK).await.unwrap();
            }
        })
        .await;
        let p = pool();
        let send = |p: Arc<Pool>| async move {
            let r = p.send(get(port, "/")).await.unwrap();
            assert_eq!(
                &r.into_body().collect().await.unwrap().to_bytes()[..],
                b"ok"
            );
        };
        for (home, connections) in [(1, 1), (1, 1), (2, 2), (1, 2), (0, 3), (2, 3), (0, 3)] {
            set_home(home);
            send(Arc::clone(&p)).await;
            assert_eq!(accepted.load(Ordering::SeqCst), connections, "home {home}");
        }
        assert_eq!(p.idle_h1(), 3);
        set_home(0);
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

    /// The `content-length` of a request head the pool wrote (0 without).
    fn content_length(head: &str) -> usize {
        head.to_ascii_lowercase()
            .lines()
            .find_map(|l| l.strip_prefix("content-length: ").map(str::to_owned))
            .map_or(0, |v| v.trim().parse::<usize>().unwrap())
    }

    /// An upstream that reads one request (head and `content-length`
    /// body) per exchange and answers each with the next of `answers`,
    /// written in pieces `split` bytes long, a pause between them; the
    /// requests it read are kept.
    async fn scripted(
        answers: Vec<Vec<u8>>,
        split: usize,
    ) -> (u16, Arc<AtomicUsize>, Arc<Mutex<Vec<Vec<u8>>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(answers);
        let next = Arc::new(AtomicUsize::new(0));
        let s2 = Arc::clone(&seen);
        let (port, accepted) = upstream(move |mut s| {
            let (seen, answers, next) = (Arc::clone(&s2), Arc::clone(&answers), Arc::clone(&next));
            async move {
                while let Some(head) = read_head(&mut s).await {
                    let mut body = vec![0u8; content_length(&head)];
                    s.read_exact(&mut body).await.unwrap();
                    let mut req = head.into_bytes();
                    req.extend_from_slice(&body);
                    seen.lock().unwrap().push(req);
                    let Some(a) = answers.get(next.fetch_add(1, Ordering::SeqCst)) else {
                        return;
                    };
                    for piece in a.chunks(split.max(1)) {
                        if s.write_all(piece).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }
        })
        .await;
        (port, accepted, seen)
    }

    async fn body_of(r: Response<UpstreamBody>) -> Result<Vec<u8>, BoxError> {
        Ok(r.into_body().collect().await?.to_bytes().to_vec())
    }

    #[tokio::test]
    async fn chunked_responses_are_decoded_in_any_pieces_and_the_connection_reused() {
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n1A \r\n, streamed in small pieces\r\n0\r\nx-trailer: t\r\n\r\n"
            .to_vec();
        for split in [1, 3, 7, 4096] {
            let (port, accepted, _) = scripted(vec![chunked.clone(), OK.to_vec()], split).await;
            let p = pool();
            let r = p.send(get(port, "/")).await.unwrap();
            assert_eq!(
                body_of(r).await.unwrap(),
                b"hello, streamed in small pieces",
                "split {split}"
            );
            assert_eq!(p.idle_h1(), 1, "split {split}");
            let r = p.send(get(port, "/")).await.unwrap();
            assert_eq!(body_of(r).await.unwrap(), b"ok");
            assert_eq!(accepted.load(Ordering::SeqCst), 1);
        }
    }

    #[tokio::test]
    async fn a_streamed_body_arrives_piece_by_piece_before_its_end() {
        let (port, _, _) = scripted(
            vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nfirst\n\r\n".to_vec()],
            4096,
        )
        .await;
        let r = pool().send(get(port, "/")).await.unwrap();
        let mut body = r.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"first\n");
        // The rest waits for the upstream, which has not ended the body.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), body.frame())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn interim_heads_are_read_past_and_bodies_end_as_rfc_9112_says() {
        let (port, accepted, _) = scripted(
            vec![
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                b"HTTP/1.1 204 No Content\r\ncontent-length: 10\r\n\r\n".to_vec(),
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok".to_vec(),
            ],
            4096,
        )
        .await;
        let p = pool();
        let r = p.send(get(port, "/")).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(body_of(r).await.unwrap(), b"ok");
        let r = p.send(get(port, "/")).await.unwrap();
        assert_eq!(r.status(), 204);
        assert!(r.body().is_end_stream());
        assert_eq!(body_of(r).await.unwrap(), b"");
        assert_eq!(p.idle_h1(), 1);
        // `Connection: close`: read, and not kept.
        let r = p.send(get(port, "/")).await.unwrap();
        assert_eq!(body_of(r).await.unwrap(), b"ok");
        assert_eq!(p.idle_h1(), 0);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_without_length_runs_to_the_close_and_its_connection_is_not_kept() {
        let (port, accepted) = upstream(|mut s| async move {
            if read_head(&mut s).await.is_some() {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil the end").await;
            }
        })
        .await;
        let p = pool();
        let r = p.send(get(port, "/")).await.unwrap();
        assert_eq!(body_of(r).await.unwrap(), b"until the end");
        assert_eq!(p.idle_h1(), 0);
        let r = p.send(get(port, "/")).await.unwrap();
        assert_eq!(body_of(r).await.unwrap(), b"until the end");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn responses_that_are_not_http_1_1_are_errors_and_close_their_connection() {
        let huge = format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n",
            "a".repeat(crate::h1::MAX_HEAD)
        );
        for bad in [
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok".to_vec(),
            b"HTTP/1.1 200 OK\r\ncontent-length: 1e3\r\n\r\nok".to_vec(),
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n".to_vec(),
            b"SSH-2.0-OpenSSH_9.2\r\n\r\n".to_vec(),
            huge.into_bytes(),
        ] {
            let (port, _, _) = scripted(vec![bad.clone()], 4096).await;
            let p = pool();
            let e = p.send(get(port, "/")).await.unwrap_err();
            assert!(!e.is_connect(), "{e}");
            assert_eq!(p.idle_h1(), 0);
        }
        // Bad chunking: the body fails, and its connection is not kept.
        for bad in [
            &b"zz\r\nok\r\n0\r\n\r\n"[..],
            b"2\r\nokX\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
        ] {
            let mut answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            answer.extend_from_slice(bad);
            let (port, _, _) = scripted(vec![answer], 4096).await;
            let p = pool();
            let r = p.send(get(port, "/")).await.unwrap();
            assert!(body_of(r).await.is_err());
            assert_eq!(p.idle_h1(), 0);
        }
    }

    #[tokio::test]
    async fn bytes_after_a_response_or_both_framings_keep_the_connection_out_of_the_pool() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ] {
            let (port, _, _) = scripted(vec![answer.to_vec()], 4096).await;
            let p = pool();
            let r = p.send(get(port, "/")).await.unwrap();
            assert_eq!(body_of(r).await.unwrap(), b"ok");
            assert_eq!(p.idle_h1(), 0, "{}", String::from_utf8_lossy(answer));
        }
    }

    #[tokio::test]
    async fn the_request_goes_out_with_its_own_framing_and_a_large_body_whole() {
        let (port, _, seen) = scripted(vec![OK.to_vec(), OK.to_vec()], 4096).await;
        let p = pool();
        let big = Bytes::from(vec![b'x'; 200_000]);
        let mut req = Request::builder()
            .method("POST")
            .uri(format!("http://127.0.0.1:{port}/v1/upload"))
            .body(big.clone())
            .unwrap();
        // Framing and hop-by-hop fields from the caller are not written;
        // its own Host is.
        for (k, v) in [
            ("host", "chosen.example"),
            ("content-length", "3"),
            ("transfer-encoding", "chunked"),
            ("connection", "close"),
            ("x-kept", "1"),
        ] {
            req.headers_mut().insert(
                http::HeaderName::from_static(k),
                HeaderValue::from_static(v),
            );
        }
        body_of(p.send(req).await.unwrap()).await.unwrap();
        let empty = Request::builder()
            .method("POST")
            .uri(format!("http://127.0.0.1:{port}/v1/empty"))
            .body(Bytes::new())
            .unwrap();
        body_of(p.send(empty).await.unwrap()).await.unwrap();
        let seen = seen.lock().unwrap();
        let first =
            String::from_utf8_lossy(&seen[0][..seen[0].len() - big.len()]).to_ascii_lowercase();
        assert!(first.starts_with("post /v1/upload http/1.1\r\n"), "{first}");
        assert!(first.contains("host: chosen.example\r\n"), "{first}");
        assert!(first.contains("x-kept: 1\r\n"), "{first}");
        assert!(first.contains("content-length: 200000\r\n"), "{first}");
        assert!(!first.contains("transfer-encoding"), "{first}");
        assert!(!first.contains("connection"), "{first}");
        assert_eq!(first.matches("content-length").count(), 1, "{first}");
        assert_eq!(&seen[0][seen[0].len() - big.len()..], &big[..]);
        let second = String::from_utf8_lossy(&seen[1]).to_ascii_lowercase();
        assert!(second.contains("content-length: 0\r\n"), "{second}");
    }

    /// A self-signed certificate for 127.0.0.1, made by openssl now.
    fn self_signed(
        dir: &std::path::Path,
    ) -> (
        rustls::pki_types::CertificateDer<'static>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        use rustls::pki_types::pem::PemObject;
        let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
            ])
            .args([
                "-subj",
                "/CN=upstream.test",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                // A leaf, not a CA: rustls refuses a CA certificate as a
                // server's own.
                "-addext",
                "basicConstraints=critical,CA:FALSE",
                "-days",
                "1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl is needed for the TLS upstream tests");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            rustls::pki_types::CertificateDer::from_pem_file(&cert).unwrap(),
            rustls::pki_types::PrivateKeyDer::from_pem_file(&key).unwrap(),
        )
    }

    /// A self-signed upstream certificate, the server's TLS settings for
    /// it, and a pool that trusts it.
    struct TlsKit {
        provider: Arc<rustls::crypto::CryptoProvider>,
        cert: rustls::pki_types::CertificateDer<'static>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
        _dir: tempfile::TempDir,
    }

    impl TlsKit {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let (cert, key) = self_signed(dir.path());
            Self {
                provider: Arc::new(rustls::crypto::ring::default_provider()),
                cert,
                key,
                _dir: dir,
            }
        }

        /// The upstream's settings, offering `alpn` alone.
        fn server(&self, alpn: &[u8]) -> rustls::ServerConfig {
            let mut server =
                rustls::ServerConfig::builder_with_provider(Arc::clone(&self.provider))
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_no_client_auth()
                    .with_single_cert(vec![self.cert.clone()], self.key.clone_key())
                    .unwrap();
            server.alpn_protocols = vec![alpn.to_vec()];
            server
        }

        fn pool(&self) -> Arc<Pool> {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.cert.clone()).unwrap();
            let client = rustls::ClientConfig::builder_with_provider(Arc::clone(&self.provider))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            Arc::new(Pool::new(connector_with(client, Duration::from_secs(10))))
        }
    }

    /// TLS with ALPN: the pool speaks HTTP/1.1 in the request's task or
    /// HTTP/2 through hyper, as the upstream chooses, and reuses the
    /// connection either way.
    #[tokio::test]
    async fn tls_upstreams_speak_http_1_1_or_http_2_as_alpn_decides() {
        use hyper_util::rt::TokioIo;
        let kit = TlsKit::new();
        for (alpn, version) in [
            (&b"http/1.1"[..], http::Version::HTTP_11),
            (b"h2", http::Version::HTTP_2),
        ] {
            let server = kit.server(alpn);
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
            let versions = Arc::new(Mutex::new(Vec::new()));
            let v2 = Arc::clone(&versions);
            let (port, accepted) = upstream(move |s| {
                let (acceptor, versions) = (acceptor.clone(), Arc::clone(&v2));
                async move {
                    let Ok(tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |r: Request<Incoming>| {
                        versions.lock().unwrap().push(r.version());
                        async move {
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from_static(b"ok"),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                }
            })
            .await;
            let p = kit.pool();
            for _ in 0..3 {
                let req = Request::builder()
                    .method("POST")
                    .uri(format!("https://127.0.0.1:{port}/v1/x"))
                    .body(Bytes::from_static(b"{}"))
                    .unwrap();
                let r = p.send(req).await.unwrap();
                assert_eq!(body_of(r).await.unwrap(), b"ok");
            }
            assert_eq!(*versions.lock().unwrap(), vec![version; 3]);
            assert_eq!(accepted.load(Ordering::SeqCst), 1, "{version:?}");
            assert_eq!(p.idle_h1(), usize::from(version == http::Version::HTTP_11));
        }
    }

    /// Over TLS, bytes an upstream sends after a response arrive through
    /// rustls, and may sit decrypted there where the socket shows nothing:
    /// here a `HEAD` answered with a whole second response in the same TCP
    /// write. Whether rustls hands both over at once (this rustls does) or
    /// keeps the second, the next request must not read that response as
    /// its own: the connection is dropped (the pool's check reads through
    /// the whole stack, not the socket alone).
    #[tokio::test]
    async fn a_tls_connection_with_unasked_bytes_is_not_reused() {
        use std::io::Write as _;
        let kit = TlsKit::new();
        let mut server = kit.server(b"http/1.1");
        // No session tickets after the handshake: the only bytes after the
        // answer to HEAD are the unasked response.
        server.send_tls13_tickets = 0;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let answered = Arc::new(AtomicUsize::new(0));
        let a2 = Arc::clone(&answered);
        let (port, accepted) = upstream(move |s| {
            let (acceptor, answered) = (acceptor.clone(), Arc::clone(&a2));
            async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                loop {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match tls.read(&mut b).await {
                            Ok(1) => head.push(b[0]),
                            _ => return,
                        }
                    }
                    if answered.fetch_add(1, Ordering::SeqCst) == 0 {
                        // Two records, one TCP write: the answer to HEAD,
                        // then a response nobody asked for.
                        let (_, conn) = tls.get_mut();
                        conn.writer()
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
                            .unwrap();
                        conn.writer()
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nWRONG")
                            .unwrap();
                    } else {
                        tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nright")
                            .await
                            .unwrap();
                    }
                    tls.flush().await.unwrap();
                }
            }
        })
        .await;
        let p = kit.pool();
        let head = Request::builder()
            .method("HEAD")
            .uri(format!("https://127.0.0.1:{port}/"))
            .body(Bytes::new())
            .unwrap();
        let r = p.send(head).await.unwrap();
        assert_eq!(body_of(r).await.unwrap(), b"");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let get = Request::builder()
            .uri(format!("https://127.0.0.1:{port}/"))
            .body(Bytes::new())
            .unwrap();
        let r = p.send(get).await.unwrap();
        assert_eq!(body_of(r).await.unwrap(), b"right");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn no_listener_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let e = pool().send(get(port, "/")).await.unwrap_err();
        assert!(e.is_connect());
    }

    const TOO_LARGE: &[u8] =
        b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 9\r\n\r\ntoo large";

    /// Larger than what the two sockets' buffers take: its write cannot end
    /// unless the upstream reads it.
    fn large_body() -> Bytes {
        Bytes::from(vec![b'x'; 8 << 20])
    }

    fn post(url: String, body: Bytes) -> Request<Bytes> {
        Request::builder()
            .method("POST")
            .uri(url)
            .body(body)
            .unwrap()
    }

    /// Reads a request head and answers `413` at once without reading the
    /// body; then holds the connection open, still not reading, or closes
    /// it (with the body unread: a reset).
    async fn refuse_unread<S>(mut s: S, hold: bool)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut b).await {
                Ok(1) => head.push(b[0]),
                _ => return,
            }
        }
        if s.write_all(TOO_LARGE).await.is_err() || s.flush().await.is_err() {
            return;
        }
        if hold {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    }

    /// An upstream may answer before it has read the whole request (RFC
    /// 9112 §9.3). Its answer is the response, whether it then closes the
    /// connection or holds it without reading, over TCP or TLS; and a
    /// connection whose request was cut short is never reused.
    #[tokio::test]
    async fn an_answer_before_the_whole_body_is_the_response_and_its_connection_dropped() {
        let kit = TlsKit::new();
        let body = large_body();
        for tls in [false, true] {
            for hold in [false, true] {
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(kit.server(b"http/1.1")));
                let (port, accepted) = upstream(move |s| {
                    let acceptor = acceptor.clone();
                    async move {
                        s.set_nodelay(true).unwrap();
                        if !tls {
                            refuse_unread(s, hold).await;
                        } else if let Ok(t) = acceptor.accept(s).await {
                            refuse_unread(t, hold).await;
                        }
                    }
                })
                .await;
                let (p, scheme) = if tls {
                    (kit.pool(), "https")
                } else {
                    (pool(), "http")
                };
                for n in 1..=2 {
                    let req = post(format!("{scheme}://127.0.0.1:{port}/upload"), body.clone());
                    let r = tokio::time::timeout(Duration::from_secs(5), p.send(req))
                        .await
                        .unwrap_or_else(|_| panic!("tls {tls}, hold {hold}: no answer"))
                        .unwrap_or_else(|e| panic!("tls {tls}, hold {hold}: {e:?}"));
                    assert_eq!(r.status(), 413, "tls {tls}, hold {hold}");
                    assert_eq!(body_of(r).await.unwrap(), b"too large");
                    assert_eq!(accepted.load(Ordering::SeqCst), n, "tls {tls}, hold {hold}");
                }
                assert_eq!(p.idle_h1(), 0);
            }
        }
    }

    /// A `100 Continue` that arrives while the body is being written does
    /// not stop it: the whole body goes, the final answer is the response,
    /// and the connection is reused.
    #[tokio::test]
    async fn an_interim_answer_does_not_cut_the_body_short() {
        let got = Arc::new(AtomicUsize::new(0));
        let g2 = Arc::clone(&got);
        let (port, accepted) = upstream(move |mut s| {
            let got = Arc::clone(&g2);
            async move {
                while let Some(head) = read_head(&mut s).await {
                    s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.unwrap();
                    // The pool's write fills the sockets meanwhile.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let mut body = vec![0u8; content_length(&head)];
                    s.read_exact(&mut body).await.unwrap();
                    got.fetch_add(
                        body.iter().filter(|&&b| b == b'x').count(),
                        Ordering::SeqCst,
                    );
                    s.write_all(OK).await.unwrap();
                }
            }
        })
        .await;
        let p = pool();
        let body = large_body();
        for n in 1..=2 {
            let req = post(format!("http://127.0.0.1:{port}/"), body.clone());
            let r = tokio::time::timeout(Duration::from_secs(10), p.send(req))
                .await
                .expect("answered")
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(body_of(r).await.unwrap(), b"ok");
            assert_eq!(got.load(Ordering::SeqCst), n * body.len());
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn an_answer_is_told_from_interim_ones() {
        for (buf, answered) in [
            (&b""[..], false),
            (b"HTTP/1.1 ", false),
            (b"HTTP/1.1 4", true),
            (b"HTTP/1.1 100 Continue\r\n", false),
            (b"HTTP/1.1 100 Continue\r\n\r\n", false),
            (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413", true),
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\n",
                false,
            ),
            (
                b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n",
                true,
            ),
            // Not HTTP: read as an answer, which the head's parse refuses.
            (b"garbage from the upstream", true),
        ] {
            assert_eq!(
                h1::answered(buf),
                answered,
                "{}",
                String::from_utf8_lossy(buf)
            );
        }
    }
}
