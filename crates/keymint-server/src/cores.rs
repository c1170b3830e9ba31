//! A TCP listener's connections (plain HTTP or TLS), served on one
//! single-threaded runtime per core (design 0029, "Seventh pass" and
//! "Twelfth pass").
//!
//! The process's multi-threaded runtime accepts; each accepted connection
//! is handed, in turn, to one of N threads that each run a current-thread
//! tokio runtime, and lives there until it closes: its TLS handshake is
//! made and its requests are read, checked, proxied and answered on that
//! one thread, with no work stealing between workers and no wake-ups of
//! another worker per request. The background duties, the store's threads
//! and the local socket stay where they were.
//!
//! The runtimes are made once per process, on the first listener that uses
//! them, and live as long as the process (as the main runtime does): a task
//! a request spawns (a settlement after a response, a budget refill, a
//! database connection's driver) runs there until it ends, whatever
//! happened to the listener. `KEYMINT_FRONT_THREADS` sets N (default: the
//! cores this process may use; the binary reads it and calls
//! [`set_front_threads`]); 1 or fewer serves the connections on the main
//! runtime instead, as before.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::Front;

/// The next per-core runtime's number for the proxy's connection pools (0
/// is the main runtime's).
static NEXT_HOME: AtomicUsize = AtomicUsize::new(1);

/// The most threads `KEYMINT_FRONT_THREADS` may ask for.
const MAX_THREADS: usize = 256;

/// One accepted connection on its way to a core, with what it is served
/// with and its place in the listener's [`Drain`].
struct Handoff {
    tcp: std::net::TcpStream,
    addr: SocketAddr,
    front: Front,
    member: Member,
    listener: Listener,
}

/// What a TCP listener's connections speak.
#[derive(Clone)]
pub(crate) enum Listener {
    /// Plain HTTP (loopback only, or behind a TLS-terminating proxy).
    Plain,
    /// TLS, the handshake made on the connection's core.
    Tls(tokio_rustls::TlsAcceptor),
}

impl Listener {
    const fn name(&self) -> &'static str {
        match self {
            Self::Plain => "http",
            Self::Tls(_) => "tls",
        }
    }
}

/// How long a listener that is shutting down waits for its connections to
/// finish the requests they are answering before the process goes on
/// without them (what is still open then ends with the process). Thirty
/// seconds, as Kubernetes waits between its `SIGTERM` and its `SIGKILL`.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The connections of one listener, told to stop together and waited for
/// together at shutdown.
#[derive(Debug)]
pub(crate) struct Drain {
    /// Dropped at shutdown: every member's `stop` then changes.
    stop: watch::Sender<()>,
    /// Closed once every member has been dropped.
    open: watch::Sender<()>,
}

/// A connection's place in its listener's [`Drain`]: held until the
/// connection has closed.
#[derive(Debug)]
pub(crate) struct Member {
    stop: watch::Receiver<()>,
    _open: watch::Receiver<()>,
}

impl Drain {
    pub(crate) fn new() -> Self {
        Self {
            stop: watch::channel(()).0,
            open: watch::channel(()).0,
        }
    }

    /// A place for a new connection.
    pub(crate) fn member(&self) -> Member {
        Member {
            stop: self.stop.subscribe(),
            _open: self.open.subscribe(),
        }
    }

    /// Tells every connection to finish the request it is answering and
    /// close (an idle one closes at once), then waits for them all, at
    /// most `grace`. Answers how many were still open then.
    pub(crate) async fn finish(self, grace: Duration, listener: &str) -> usize {
        let Self { stop, open } = self;
        drop(stop);
        if tokio::time::timeout(grace, open.closed()).await.is_ok() {
            return 0;
        }
        let left = open.receiver_count();
        tracing::warn!(
            listener,
            connections = left,
            grace_secs = grace.as_secs(),
            "connections still answering after the shutdown grace; they end with the process"
        );
        left
    }
}

/// The per-core runtimes: where each handed-off connection goes.
pub(crate) struct Cores {
    queues: Vec<mpsc::UnboundedSender<Handoff>>,
    next: AtomicUsize,
}

impl Cores {
    /// Starts `n` threads, each running a current-thread runtime that
    /// serves the connections handed to it.
    pub(crate) fn start(n: usize) -> std::io::Result<Self> {
        let mut queues = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            std::thread::Builder::new()
                .name(format!("keymint-front-{i}"))
                .spawn(move || {
                    // The proxy's upstream connections made here are reused
                    // here: a number no other runtime of the process has.
                    keymint_proxy::set_home(NEXT_HOME.fetch_add(1, Ordering::Relaxed));
                    rt.block_on(run(rx));
                })?;
            queues.push(tx);
        }
        Ok(Self {
            queues,
            next: AtomicUsize::new(0),
        })
    }

    /// The process's runtimes, started on first use; `None` when
    /// connections are to be served on the calling runtime (one thread
    /// wanted, or the threads could not be started).
    pub(crate) fn process() -> Option<&'static Self> {
        static CORES: OnceLock<Option<Cores>> = OnceLock::new();
        CORES
            .get_or_init(|| {
                let n = *WANTED.get_or_init(|| threads_wanted(None, available()));
                if n <= 1 {
                    return None;
                }
                match Self::start(n) {
                    Ok(c) => {
                        tracing::debug!(threads = n, "serving connections on one runtime per core");
                        Some(c)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot start the per-core runtimes; serving on the main runtime");
                        None
                    }
                }
            })
            .as_ref()
    }

    /// Hands `h` to the next core in turn; if that core is gone (it never
    /// is while the process runs), serves it on the calling runtime.
    fn hand(&self, h: Handoff) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len();
        if let Err(mpsc::error::SendError(h)) = self.queues[i].send(h) {
            spawn_connection(h);
        }
    }
}

/// The per-core runtimes wanted, once set or first used.
static WANTED: OnceLock<usize> = OnceLock::new();

/// Sets how many per-core runtimes serve the plain-HTTP listeners, from
/// `KEYMINT_FRONT_THREADS` (which the binary reads): a number, bounded to
/// 1..=256, where 1 serves every connection on the main runtime; unset,
/// empty or not a number (with a warning), the cores this process may use.
/// Takes effect only before the first listener is served.
pub fn set_front_threads(var: Option<&str>) {
    let _ = WANTED.set(threads_wanted(var, available()));
}

/// The cores this process may use.
fn available() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The threads wanted: `var` if it is a number (bounded to 1..=256), else
/// `cores`.
fn threads_wanted(var: Option<&str>, cores: usize) -> usize {
    match var.map(str::trim) {
        None | Some("") => cores,
        Some(v) => match v.parse::<usize>() {
            Ok(n) => n.clamp(1, MAX_THREADS),
            Err(_) => {
                tracing::warn!(
                    value = v,
                    "KEYMINT_FRONT_THREADS is not a number; using one thread per core"
                );
                cores
            }
        },
    }
}

/// A core's loop: every handed-off connection becomes a task of this
/// runtime.
async fn run(mut rx: mpsc::UnboundedReceiver<Handoff>) {
    while let Some(h) = rx.recv().await {
        spawn_connection(h);
    }
}

/// Serves a handed-off connection as a task of the calling runtime (this
/// core's).
fn spawn_connection(h: Handoff) {
    match tokio::net::TcpStream::from_std(h.tcp) {
        Ok(tcp) => spawn_accepted(tcp, h.addr, h.front, h.member, h.listener),
        Err(e) => tracing::debug!(peer = %h.addr, error = %e, "cannot register a connection"),
    }
}

/// Serves an accepted connection as a task of the calling runtime, as
/// `listener`'s: each kind its own task, so that a plain connection's task
/// is no larger than a plain connection needs.
fn spawn_accepted(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    front: Front,
    member: Member,
    listener: Listener,
) {
    match listener {
        Listener::Plain => {
            tokio::spawn(serve_tcp_with(
                tcp,
                addr,
                front,
                member,
                HEADER_READ_TIMEOUT,
            ));
        }
        Listener::Tls(acceptor) => {
            tokio::spawn(crate::tls::serve_connection(
                tcp, addr, acceptor, front, member,
            ));
        }
    }
}

/// Serves one plain connection until it closes, the listener shuts down
/// (after the request in progress), or it stays silent or idle for `head`
/// ([`HEADER_READ_TIMEOUT`] but in tests).
async fn serve_tcp_with(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    front: Front,
    member: Member,
    head: Duration,
) {
    serve_http(tcp, addr, front, None, member, head).await;
}

/// Serves HTTP on `io`, a connection from `addr` (plain, or TLS once its
/// handshake is done, with the client's SPIFFE ID in `svid`), through
/// [`serve_until`]: every TCP listener's connections end here.
pub(crate) async fn serve_http<I>(
    io: I,
    addr: SocketAddr,
    front: Front,
    svid: Option<crate::tls::PeerSvid>,
    member: Member,
    head: Duration,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (svc, activity) = Noting::new(connection_service(front, addr, svid));
    let builder = http_server_with(head);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    serve_until(conn, &activity, member, head, &addr, |c| {
        c.graceful_shutdown()
    })
    .await;
}

/// What a connection's watcher ([`ended`]) reads: whether a request has
/// come, and for an HTTP/2 connection how many of its streams are open and
/// when one last started or ended.
#[derive(Debug)]
pub(crate) struct Activity {
    started: tokio::time::Instant,
    served: AtomicBool,
    h2: AtomicBool,
    open: AtomicUsize,
    /// Milliseconds after `started` of the last stream's start or end.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            started: tokio::time::Instant::now(),
            served: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// An HTTP/2 stream of a connection, open until its answer has been sent
/// (or the stream was reset); its end counts as the connection's last
/// activity.
struct Stream(Arc<Activity>);

impl Stream {
    fn open(a: &Arc<Activity>) -> Self {
        a.h2.store(true, Ordering::Relaxed);
        a.open.fetch_add(1, Ordering::Relaxed);
        a.touch();
        Self(Arc::clone(a))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.touch();
        // Release: a watcher that sees the count fall sees the touch.
        self.0.open.fetch_sub(1, Ordering::Release);
    }
}

/// A response body that holds its HTTP/2 stream open until it is sent.
struct Streaming {
    body: axum::body::Body,
    _stream: Stream,
}

impl http_body::Body for Streaming {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A service that notes each request on its connection's [`Activity`]:
/// an HTTP/2 request's stream is open until its answer is sent; an
/// HTTP/1 request is only noted (hyper's head timeout closes an idle
/// HTTP/1 connection), and costs nothing more.
pub(crate) struct Noting<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Noting<S> {
    /// `inner`, and the activity it notes.
    pub(crate) fn new(inner: S) -> (Self, Arc<Activity>) {
        let activity = Arc::new(Activity::new());
        let s = Self {
            inner,
            activity: Arc::clone(&activity),
        };
        (s, activity)
    }
}

/// Serves `conn` (a connection whose service is a [`Noting`] with
/// `activity`, from `peer`) to its end, or until
///
/// - its listener shuts down (`member`'s stop): `shutdown` (HTTP/1 closes
///   after the answer in progress, HTTP/2 sends GOAWAY), then the
///   connection is served to its end; the listener's [`Drain`] bounds how
///   long it waits for that;
/// - [`ended`] with `head` finds it silent (closed at once) or idle
///   (`shutdown`, then at most `head` again for the connection to end).
///
/// Every listener's connections (plain, TLS, the local socket) are served
/// through this.
pub(crate) async fn serve_until<F, E>(
    conn: F,
    activity: &Activity,
    member: Member,
    head: Duration,
    peer: &(dyn std::fmt::Display + Sync),
    shutdown: impl FnOnce(Pin<&mut F>),
) where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let Member { mut stop, _open } = member;
    tokio::pin!(conn);
    let bound = tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::trace!(%peer, error = %e, "connection ended");
            }
            return;
        }
        _ = stop.changed() => None,
        e = ended(activity, head) => {
            tracing::debug!(%peer, ending = ?e, "connection closed for inactivity");
            if e == Ending::Silent {
                return;
            }
            Some(head)
        }
    };
    shutdown(conn.as_mut());
    match bound {
        None => {
            let _ = conn.await;
        }
        Some(limit) => {
            let _ = tokio::time::timeout(limit, conn).await;
        }
    }
}

/// What a [`Noting`] answers with.
type Answer<E> = Result<http::Response<axum::body::Body>, E>;

impl<S, B> hyper::service::Service<http::Request<B>> for Noting<S>
where
    S: hyper::service::Service<http::Request<B>, Response = http::Response<axum::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<axum::body::Body>;
    type Error = S::Error;
    type Future = tokio_util::either::Either<
        S::Future,
        Pin<Box<dyn Future<Output = Answer<S::Error>> + Send>>,
    >;

    fn call(&self, req: http::Request<B>) -> Self::Future {
        self.activity.served.store(true, Ordering::Relaxed);
        if req.version() != http::Version::HTTP_2 {
            return tokio_util::either::Either::Left(self.inner.call(req));
        }
        let stream = Stream::open(&self.activity);
        let answer = self.inner.call(req);
        tokio_util::either::Either::Right(Box::pin(async move {
            let r = answer.await?;
            Ok(r.map(|body| {
                axum::body::Body::new(Streaming {
                    body,
                    _stream: stream,
                })
            }))
        }))
    }
}

/// Why a connection's watcher ended it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// No request came within the limit of the connection's start.
    Silent,
    /// An HTTP/2 connection had no stream open for the limit.
    Idle,
}

/// Resolves when the connection of `activity` should end: no request
/// `limit` after it started, or, speaking HTTP/2, no stream open for
/// `limit`. Pending for ever on an HTTP/1 connection once a request came.
///
/// hyper's head timeout covers an HTTP/1 head once the server knows the
/// connection speaks HTTP/1, and closes an HTTP/1 connection idle that
/// long. Before that, the server reads the first bytes to tell HTTP/1 from
/// HTTP/2's preface, with no limit: a client that sent nothing (or half
/// the preface) would hold the connection for ever. And hyper has no idle
/// limit for HTTP/2: a client could open connections, send one request on
/// each and keep them all.
pub(crate) async fn ended(activity: &Activity, limit: Duration) -> Ending {
    tokio::time::sleep(limit).await;
    if !activity.served.load(Ordering::Relaxed) {
        return Ending::Silent;
    }
    loop {
        if !activity.h2.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
        if activity.open.load(Ordering::Acquire) > 0 {
            // A stream is open: look again a limit later.
            tokio::time::sleep(limit).await;
            continue;
        }
        // Read after the count: the last stream's end is in it. A stream
        // opened after that read is still answered: the shutdown is
        // graceful (GOAWAY names the last stream the server took).
        let idle_at = activity.last() + limit;
        if tokio::time::Instant::now() >= idle_at {
            return Ending::Idle;
        }
        tokio::time::sleep_until(idle_at).await;
    }
}

/// How long a client has to send a request's head, counted from when the
/// connection is ready for one: a connection that sends nothing, or a head
/// a byte at a time, is closed after this long, and so is a keep-alive
/// connection left idle this long. hyper's own default, which it applies
/// only when given a timer.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP server every listener (plain, TLS, local socket) serves its
/// connections with: HTTP/1.1 or HTTP/2 as the client speaks, with
/// [`HEADER_READ_TIMEOUT`] on HTTP/1 heads. Without a timer hyper waited
/// for a head for ever, so a client could hold any number of connections
/// and their tasks open by sending nothing (slowloris).
pub(crate) fn http_server() -> auto::Builder<TokioExecutor> {
    http_server_with(HEADER_READ_TIMEOUT)
}

fn http_server_with(head: Duration) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).header_read_timeout(head);
    b
}

/// What a connection from `addr` is served with: `front`, each request
/// carrying the peer's address (and its SPIFFE ID over mTLS), and an
/// answer given before the request's body was read to its end saying
/// `connection: close`.
///
/// hyper reads once more after such an answer and, if the body has not
/// ended by then, closes the connection without saying so: a client that
/// put the connection back in its pool (the answer to an oversized body,
/// say) would send its next request into a closed socket. RFC 9112 §9.6:
/// a server that closes after a response says `close` in it. A body of at
/// most [`DRAINED`] bytes is left to hyper's read (it nearly always takes
/// it whole, and the connection stays open, as a refusal of a small
/// proxied request's body had it before); a larger one, or one of unknown
/// length, gets `close`. HTTP/2 (which has no `Connection` field) and a
/// `101` are left alone.
pub(crate) fn connection_service(
    front: Front,
    addr: SocketAddr,
    svid: Option<crate::tls::PeerSvid>,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<axum::body::Body>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<http::Response<axum::body::Body>, std::convert::Infallible>>
             + Send
             + 'static,
> + Clone
+ Send
+ 'static {
    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let mut front = front.clone();
        let svid = svid.clone();
        async move {
            let (mut parts, body) = req.into_parts();
            parts.extensions.insert(axum::extract::ConnectInfo(addr));
            let tls = svid.is_some();
            if let Some(svid) = svid {
                parts.extensions.insert(svid);
            }
            let watch = parts.version <= http::Version::HTTP_11
                && http_body::Body::size_hint(&body)
                    .exact()
                    .is_none_or(|n| n > DRAINED);
            let (body, read) = ReadToEnd::new(body, watch);
            let mut res =
                tower::Service::call(&mut front, http::Request::from_parts(parts, body)).await?;
            if read.is_some_and(|r| !r.load(Ordering::Acquire))
                && res.status() != http::StatusCode::SWITCHING_PROTOCOLS
            {
                says_close(&mut res);
            }
            if tls {
                // Replaces any other: an upstream's through the proxy
                // (`max-age=0`, `includeSubDomains`) is not keymint's host's.
                res.headers_mut().insert(
                    http::header::STRICT_TRANSPORT_SECURITY,
                    http::HeaderValue::from_static(HSTS),
                );
            }
            Ok(res)
        }
    })
}

/// Sent with every answer of a TLS listener, whatever route gave it (the
/// console, the API, the proxy, a 404): a browser that reached keymint once
/// over TLS comes back over TLS only (a year), so a network attacker cannot
/// downgrade a later visit to plain HTTP and take a console session or a
/// token. HSTS binds the host, not a path, so one route without it would
/// be the gap. Not `includeSubDomains`: other hosts of the domain are not
/// keymint's to pin. Never on plain HTTP (browsers ignore it there).
const HSTS: &str = "max-age=31536000";

/// Marks an HTTP/1.x answer after which hyper closes the connection
/// (RFC 9112 §9.6: a server that closes after a response says so in it).
pub(crate) fn says_close<B>(res: &mut http::Response<B>) {
    res.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
}

/// The largest request body that an answer given before reading it does
/// not close the connection for: hyper's first read buffer, which its one
/// read after the answer nearly always fills with the rest of such a body.
const DRAINED: u64 = 8 * 1024;

/// A request body that notes when it has been read to its end (`None`
/// when not `watch`ed or empty from the start: nothing to note).
struct ReadToEnd<B> {
    inner: B,
    read: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl<B: http_body::Body> ReadToEnd<B> {
    fn new(inner: B, watch: bool) -> (Self, Option<std::sync::Arc<std::sync::atomic::AtomicBool>>) {
        let read = (watch && !inner.is_end_stream())
            .then(|| std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)));
        let flag = read.clone();
        (Self { inner, read }, flag)
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for ReadToEnd<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        let ended = match &polled {
            std::task::Poll::Ready(None) => true,
            std::task::Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            _ => false,
        };
        if ended && let Some(r) = &self.read {
            r.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `front` on `listener` until `shutdown` completes, then lets every
/// connection finish the request it is answering and waits for them all
/// (at most [`SHUTDOWN_GRACE`]). Connections have `TCP_NODELAY` set.
pub(crate) async fn serve(
    listener: TcpListener,
    front: Front,
    shutdown: impl Future<Output = ()> + Send + 'static,
    cores: Option<&Cores>,
) {
    serve_as(
        listener,
        front,
        shutdown,
        cores,
        &Listener::Plain,
        SHUTDOWN_GRACE,
    )
    .await;
}

/// [`serve`] with `grace` for the shutdown's wait.
#[cfg(test)]
async fn serve_with_grace(
    listener: TcpListener,
    front: Front,
    shutdown: impl Future<Output = ()> + Send + 'static,
    cores: Option<&Cores>,
    grace: Duration,
) {
    serve_as(listener, front, shutdown, cores, &Listener::Plain, grace).await;
}

/// Serves `front` on `listener`, whose connections speak `kind`, until
/// `shutdown` completes: each connection is handed to the next core (or
/// served on the calling runtime without `cores`); then every connection
/// finishes the request it is answering, for at most `grace`.
pub(crate) async fn serve_as(
    listener: TcpListener,
    front: Front,
    shutdown: impl Future<Output = ()> + Send + 'static,
    cores: Option<&Cores>,
    kind: &Listener,
    grace: Duration,
) {
    let drain = Drain::new();
    tokio::pin!(shutdown);
    while let Some((tcp, addr)) = accept(&listener, shutdown.as_mut()).await {
        let member = drain.member();
        match cores {
            Some(c) => match tcp.into_std() {
                Ok(tcp) => c.hand(Handoff {
                    tcp,
                    addr,
                    front: front.clone(),
                    member,
                    listener: kind.clone(),
                }),
                Err(e) => {
                    tracing::debug!(peer = %addr, error = %e, "cannot hand a connection over")
                }
            },
            None => spawn_accepted(tcp, addr, front.clone(), member, kind.clone()),
        }
    }
    drop(listener);
    drain.finish(grace, kind.name()).await;
}

/// The next connection on `listener`, with `TCP_NODELAY` set, or `None`
/// once `shutdown` has completed. An error that concerns one connection
/// is skipped; any other (out of descriptors, say) waits 50 ms rather
/// than spin.
pub(crate) async fn accept<F: Future<Output = ()>>(
    listener: &TcpListener,
    mut shutdown: std::pin::Pin<&mut F>,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        let (tcp, addr) = tokio::select! {
            () = &mut shutdown => return None,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // TCP_NODELAY on every connection: a response whose body is
        // streamed (MCP, SSE, a proxied stream) goes out as headers, then
        // body; with Nagle the body waits for the client's delayed ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        return Some((tcp, addr));
    }
}

/// An accept error that concerns one connection only (it was reset before
/// it was accepted), not the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use axum::extract::ConnectInfo;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::oneshot;

    use super::{Cores, serve, threads_wanted};
    use crate::Front;

    /// Answers the serving thread's name and the peer address the request
    /// carries; `/slow` does so after 300 ms.
    fn front() -> Front {
        async fn who(ConnectInfo(peer): ConnectInfo<SocketAddr>) -> String {
            format!("{} {peer}", std::thread::current().name().unwrap_or("-"))
        }
        Front::router(axum::Router::new().route("/who", get(who)).route(
            "/slow",
            get(|c: ConnectInfo<SocketAddr>| async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                who(c).await
            }),
        ))
    }

    /// One HTTP/1.1 GET on `s`; the head (lower-cased) and the body.
    async fn get_on(s: &mut TcpStream, path: &str) -> (String, String) {
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        read_answer(s).await
    }

    /// `serve` on a fresh port: its address, the shutdown trigger, and
    /// the task that ends when `serve` returns.
    async fn start(
        front: Front,
        cores: Option<&'static Cores>,
    ) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            l,
            front,
            async {
                let _ = rx.await;
            },
            cores,
        ));
        (addr, tx, server)
    }

    #[tokio::test]
    async fn connections_are_served_on_the_cores_in_turn_and_stay_there() {
        let cores = Box::leak(Box::new(Cores::start(2).unwrap()));
        let (addr, tx, server) = start(front(), Some(cores)).await;
        let mut threads = Vec::new();
        for _ in 0..4 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let me = s.local_addr().unwrap();
            let (head, first) = get_on(&mut s, "/who").await;
            assert!(head.starts_with("http/1.1 200"), "{head}");
            let (thread, peer) = first.split_once(' ').unwrap();
            assert_eq!(
                peer,
                me.to_string(),
                "the request carries its peer's address"
            );
            // Keep-alive: the connection's next request is on the same core.
            let (_, second) = get_on(&mut s, "/who").await;
            assert_eq!(second, first);
            threads.push(thread.to_owned());
        }
        assert!(
            threads.iter().all(|t| t.starts_with("keymint-front-")),
            "{threads:?}"
        );
        assert_ne!(threads[0], threads[1], "handed out in turn: {threads:?}");
        assert_eq!(threads[0], threads[2], "{threads:?}");
        assert_eq!(threads[1], threads[3], "{threads:?}");
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("serve returns once its connections have closed")
            .unwrap();
    }

    /// Shutdown: the request in progress is answered in full, an idle
    /// connection is closed, no new connection is accepted, and `serve`
    /// returns only after the answer; with the cores and without.
    #[tokio::test]
    async fn shutdown_answers_the_request_in_progress_then_closes() {
        let cores: &'static Cores = Box::leak(Box::new(Cores::start(2).unwrap()));
        for cores in [Some(cores), None] {
            let (addr, tx, server) = start(front(), cores).await;
            let mut idle = TcpStream::connect(addr).await.unwrap();
            let _ = get_on(&mut idle, "/who").await;
            let mut busy = TcpStream::connect(addr).await.unwrap();
            let me = busy.local_addr().unwrap();
            let slow = tokio::spawn(async move { get_on(&mut busy, "/slow").await });
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.send(()).unwrap();
            let (head, body) = slow.await.unwrap();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            assert!(body.ends_with(&me.to_string()), "{body}");
            assert!(head.contains("connection: close"), "{head}");
            tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .expect("serve returns after the answer")
                .unwrap();
            let mut b = [0u8; 1];
            let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut b))
                .await
                .expect("the idle connection is closed")
                .unwrap_or(0);
            assert_eq!(n, 0);
            assert!(
                TcpStream::connect(addr).await.is_err(),
                "no connection is accepted after the shutdown"
            );
        }
    }

    /// A request that outlasts the shutdown's grace does not hold `serve`
    /// for ever: it returns once the grace has passed, the request still
    /// unanswered (it ends with the process).
    #[tokio::test]
    async fn shutdown_waits_for_answers_at_most_the_grace() {
        let front = Front::router(axum::Router::new().route(
            "/stuck",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(20)).await;
                "late"
            }),
        ));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(super::serve_with_grace(
            l,
            front,
            async {
                let _ = rx.await;
            },
            None,
            Duration::from_millis(300),
        ));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /stuck HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t0 = std::time::Instant::now();
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returns once the grace has passed")
            .unwrap();
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(250),
            "serve waited {waited:?} for the request in progress"
        );
        let mut b = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(50), s.read(&mut b))
                .await
                .is_err(),
            "the request is still in progress"
        );
    }

    /// Whether the server closes `s` within `limit` (whatever it sends
    /// first).
    async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
        let mut b = [0u8; 1024];
        tokio::time::timeout(limit, async {
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    /// Serves every connection to a fresh port with [`super::serve_tcp_with`]
    /// (`head` for the head and idle limits) until the test ends.
    async fn serve_each(front: Front, head: Duration) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let drain = super::Drain::new();
            loop {
                let (tcp, peer) = l.accept().await.unwrap();
                tokio::spawn(super::serve_tcp_with(
                    tcp,
                    peer,
                    front.clone(),
                    drain.member(),
                    head,
                ));
            }
        });
        addr
    }

    /// Slowloris: a client that sends half a head, half of HTTP/2's
    /// preface, or nothing, loses its connection after the head timeout,
    /// and so does a keep-alive connection left idle after its answer; an
    /// answer that takes longer than the timeout is still given in full
    /// (the timeout is on heads).
    #[tokio::test]
    async fn a_head_not_sent_in_time_closes_the_connection() {
        let addr = serve_each(front(), Duration::from_millis(200)).await;
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /who HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut preface = TcpStream::connect(addr).await.unwrap();
        preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let started = std::time::Instant::now();
        assert!(
            closed_within(&mut half, Duration::from_secs(5)).await,
            "half a head kept the connection open"
        );
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert!(
            closed_within(&mut silent, Duration::from_secs(5)).await,
            "a connection that sent nothing stayed open"
        );
        assert!(
            closed_within(&mut preface, Duration::from_secs(5)).await,
            "half of HTTP/2's preface kept the connection open"
        );
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let me = slow.local_addr().unwrap();
        let (head, body) = get_on(&mut slow, "/slow").await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(body.ends_with(&me.to_string()), "{body}");
        assert!(
            closed_within(&mut slow, Duration::from_secs(5)).await,
            "an idle keep-alive connection stayed open"
        );
        // The servers every listener uses have the timeout.
        assert_eq!(super::HEADER_READ_TIMEOUT, Duration::from_secs(30));
    }

    /// An HTTP/2 connection (cleartext, prior knowledge) with no stream
    /// open for the limit is closed (GOAWAY); a stream open longer than
    /// the limit, and requests that keep coming, keep it.
    #[tokio::test]
    async fn an_idle_http2_connection_is_closed() {
        use http_body_util::{BodyExt as _, Empty};
        let addr = serve_each(front(), Duration::from_millis(200)).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let me = tcp.local_addr().unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        let driver = tokio::spawn(conn);
        let mut get = async |path: &str| {
            let req = http::Request::get(format!("http://{addr}{path}"))
                .body(Empty::<bytes::Bytes>::new())
                .unwrap();
            let r = sender.send_request(req).await.unwrap();
            assert_eq!(r.version(), http::Version::HTTP_2);
            assert_eq!(r.status(), 200);
            let body = r.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8(body.to_vec()).unwrap()
        };
        // Requests every 100 ms for longer than the limit, then one that
        // takes 300 ms: all on the one connection.
        for _ in 0..4 {
            assert!(get("/who").await.ends_with(&me.to_string()));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(get("/slow").await.ends_with(&me.to_string()));
        assert!(!driver.is_finished(), "closed while in use");
        let idle = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), driver)
            .await
            .expect("an idle HTTP/2 connection stayed open")
            .unwrap()
            .unwrap();
        assert!(idle.elapsed() >= Duration::from_millis(150));
    }

    /// A request body to the API sent too slowly is refused and its
    /// connection closed once the body timeout passes ("slow POST"); a
    /// body sent in pieces within it is read whole.
    #[tokio::test]
    async fn a_body_not_sent_in_time_is_refused_and_the_connection_closed() {
        let router = axum::Router::new().route(
            "/read",
            axum::routing::post(|b: axum::body::Bytes| async move { b.len().to_string() }),
        );
        let front = Front::router(router).with_body_timeout(Duration::from_millis(300));
        let addr = serve_each(front, Duration::from_secs(30)).await;
        let head = b"POST /read HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n";
        // In pieces, within the limit: read whole.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(head).await.unwrap();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.write_all(&[b'a'; 25]).await.unwrap();
        }
        let (h, body) = read_answer(&mut s).await;
        assert!(h.starts_with("http/1.1 200"), "{h}");
        assert!(!h.contains("connection: close"), "{h}");
        assert_eq!(body, "100");
        // A byte at a time, for longer than the limit: refused, closed.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(head).await.unwrap();
        let started = std::time::Instant::now();
        let mut answer = Vec::new();
        let (mut r, mut w) = slow.split();
        let read = async {
            tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut answer)).await
        };
        let trickle = async {
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if w.write_all(b"a").await.is_err() {
                    break;
                }
            }
        };
        let done = tokio::select! {
            d = read => d,
            () = trickle => panic!("the connection stayed open while the body trickled"),
        };
        assert!(
            done.is_ok(),
            "the connection stayed open while the body trickled"
        );
        let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        // Refused, and then closed by the server (read to its end above):
        // hyper reads once more for the rest of a body the answer left
        // unread and closes when it has not come; the answer says so,
        // though the body is small (100 bytes, below `DRAINED`).
        assert!(answer.starts_with("http/1.1 400"), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
        assert!(answer.contains("not sent in time"), "{answer}");
        assert!(started.elapsed() >= Duration::from_millis(250));
    }

    #[tokio::test]
    async fn without_cores_connections_are_served_on_the_calling_runtime() {
        let (addr, tx, server) = start(front(), None).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let (_, body) = get_on(&mut s, "/who").await;
        let here = std::thread::current().name().unwrap_or("-").to_owned();
        assert!(
            body.starts_with(&format!("{here} ")),
            "{body} (test thread {here})"
        );
        drop(s);
        tx.send(()).unwrap();
        server.await.unwrap();
    }

    /// An answer given before a request body of more than 8 KiB was read
    /// says `connection: close` (hyper closes the connection after it); an
    /// answer to a body read whole, to a small body hyper reads itself, or
    /// to a request without one keeps the connection.
    #[tokio::test]
    async fn an_answer_before_the_body_was_read_closes_the_connection() {
        let router = axum::Router::new()
            .route(
                "/refuse",
                axum::routing::post(|| async { http::StatusCode::PAYLOAD_TOO_LARGE }),
            )
            .route(
                "/read",
                axum::routing::post(|b: axum::body::Bytes| async move { b.len().to_string() }),
            )
            .route("/who", get(|| async { "here" }));
        let (addr, tx, server) = start(Front::router(router), None).await;
        let post = |path: &str, len: usize| {
            let mut r = format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\n\r\n")
                .into_bytes();
            r.resize(r.len() + len, b'y');
            r
        };
        // Read whole, and no body: the connection is kept.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&post("/read", 200_000)).await.unwrap();
        let (head, body) = read_answer(&mut s).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, "200000");
        assert!(!head.contains("connection: close"), "{head}");
        let (head, _) = get_on(&mut s, "/who").await;
        assert!(!head.contains("connection: close"), "{head}");
        // Refused before a small body (4 KiB): hyper reads the rest,
        // and the connection is kept.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&post("/refuse", 4 * 1024)).await.unwrap();
        let (head, _) = read_answer(&mut s).await;
        assert!(head.starts_with("http/1.1 413"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        let (head, body) = get_on(&mut s, "/who").await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, "here");
        // Refused before a larger body: `close`, then closed.
        for len in [8 * 1024 + 1, 200_000] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let req = post("/refuse", len);
            let (r, w) = s.split();
            let (_, (head, _)) = tokio::join!(
                async move {
                    let mut w = w;
                    // The server may close before all of it is written.
                    let _ = w.write_all(&req).await;
                },
                read_answer_from(r),
            );
            assert!(head.starts_with("http/1.1 413"), "{len}: {head}");
            assert!(head.contains("connection: close"), "{len}: {head}");
            let mut b = [0u8; 1];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
                .await
                .expect("closed after the answer")
                .unwrap_or(0);
            assert_eq!(n, 0, "{len}");
        }
        tx.send(()).unwrap();
        drop(s);
        server.await.unwrap();
    }

    async fn read_answer(s: &mut TcpStream) -> (String, String) {
        let (r, _) = s.split();
        read_answer_from(r).await
    }

    /// One answer's head (lower-cased) and body, as `get_on` reads it.
    async fn read_answer_from(mut r: tokio::net::tcp::ReadHalf<'_>) -> (String, String) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = r.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before an answer: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                return (head, body);
            }
        }
    }

    #[test]
    fn the_thread_count_is_the_cores_unless_set() {
        assert_eq!(threads_wanted(None, 4), 4);
        assert_eq!(threads_wanted(Some(""), 4), 4);
        assert_eq!(threads_wanted(Some(" 3 "), 4), 3);
        assert_eq!(threads_wanted(Some("1"), 4), 1);
        assert_eq!(threads_wanted(Some("0"), 4), 1);
        assert_eq!(threads_wanted(Some("100000"), 4), 256);
        assert_eq!(threads_wanted(Some("two"), 4), 4);
        assert_eq!(threads_wanted(Some("-1"), 2), 2);
    }
}
