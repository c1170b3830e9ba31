//! HTTP/1.1 to an upstream, in the proxied request's own task
//! (docs/design/0029-proxy-hot-path.md, "Sixth pass").
//!
//! hyper's client runs each connection as a task of its own: the request
//! goes to it over a channel, the response head comes back over another,
//! and every body frame over a third, each hand-over a wake-up. A
//! pass-through request needs none of that: it writes one request and reads
//! one response on a connection nobody else is using. Here the request's
//! task writes the request itself and reads the response from the socket
//! as its body is polled.
//!
//! What it does, after RFC 9112:
//!
//! - the request in origin form, with the pool's `Host`, the caller's
//!   headers except the framing and hop-by-hop ones, and a
//!   `content-length` of its own (the body is always whole);
//! - an answer that arrives while the upstream is not taking the request's
//!   body ends the write (§9.3: a `413` to a large body, say); the answer
//!   is the response and the connection is not reused ([`Sent`]);
//! - the response head parsed by `httparse` (hyper's parser), at most
//!   [`MAX_HEAD`] bytes and [`MAX_HEADERS`] fields; interim `1xx` heads are
//!   read past, `101` is an error (nothing asks to switch protocols);
//! - the body's length as §6.3 says: none for `HEAD`, `1xx`, `204` and
//!   `304`; `chunked` when it is the final transfer coding (then any
//!   `content-length` is ignored and the connection is not reused); a
//!   `content-length` whose values all agree (any other is an error, the
//!   response is not forwarded); otherwise the body runs to the close;
//! - chunk sizes of at most 16 hex digits, extensions and trailers read
//!   and dropped (bounded), every line ending in CRLF;
//! - the connection goes back to the pool only when its response was read
//!   to the end with nothing after it, on HTTP/1.1 without
//!   `Connection: close`.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Weak;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::pool::Pool;

/// Longest response head read.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head.
pub(crate) const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (size and extensions), and longest trailer
/// section.
const MAX_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;
/// The request buffer an idle connection keeps at most; a larger one is
/// freed (the read buffer is never kept).
const KEEP_IDLE: usize = 16 * 1024;
/// What a read asks the socket for at least.
const READ_AT_LEAST: usize = 8 * 1024;
/// A body up to this size is written in the same buffer as the head: one
/// write, one segment.
const INLINE_BODY: usize = 64 * 1024;

/// An HTTP/1.1 connection to an upstream: TCP, or TLS over TCP.
pub(crate) enum Io {
    Tcp(TcpStream),
    Tls(Box<TlsIo>),
}

/// TLS as the connector makes it (its TCP stream wrapped for hyper's I/O
/// traits and back).
pub(crate) type TlsIo = tokio_rustls::client::TlsStream<TokioIo<TokioIo<TcpStream>>>;

impl Io {
    /// Whether a connection taken from the pool may carry a request: the
    /// upstream has neither closed it nor sent anything unasked (an idle
    /// HTTP/1.1 connection has nothing to read). Asked of the whole stack,
    /// not of the socket alone: over TLS, bytes the upstream sent after a
    /// response may already sit decrypted in rustls, where the socket
    /// shows nothing, and the next request would read them as its answer.
    /// A read is tried without waiting: only "nothing yet" is reusable.
    /// It costs no syscall when the runtime knows the socket is empty (the
    /// last read of the response was short, which cleared its readiness;
    /// a close or new bytes set it again); over TLS it also lets rustls
    /// take in post-handshake messages (session tickets, key updates),
    /// which are not data. Whatever data it finds is lost, and the
    /// connection is dropped anyway.
    pub(crate) fn is_reusable(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut b = [0u8; 1];
        let mut probe = ReadBuf::new(&mut b);
        matches!(Pin::new(self).poll_read(&mut cx, &mut probe), Poll::Pending)
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum H1Error {
    #[error("upstream connection: {0}")]
    Io(#[from] io::Error),
    #[error("the upstream closed the connection before its response ended")]
    Closed,
    #[error("the upstream's response is not valid HTTP/1.1: {0}")]
    Invalid(&'static str),
}

/// A connection and what was read from it past the last response.
pub(crate) struct Conn {
    pub(crate) io: Io,
    buf: BytesMut,
    /// The request being written (kept for the next one).
    out: Vec<u8>,
    /// Where the response head's fields sit (kept for the next one).
    fields: Vec<(usize, usize, usize, usize)>,
    /// The runtime the socket is registered with ([`crate::pool::home`]).
    pub(crate) home: usize,
}

impl Conn {
    pub(crate) fn new(io: Io) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
            fields: Vec::new(),
            home: crate::pool::home(),
        }
    }
}

/// How a request went out.
#[derive(Debug)]
pub(crate) enum Sent {
    /// Every byte of it.
    Whole,
    /// Not all of it: the upstream answered, or closed, before it took the
    /// rest. Its answer is read as usual; the connection is not reused.
    Cut,
    /// The write failed as it does when the upstream has closed or reset
    /// the connection: an answer it sent first may still wait in the
    /// socket. If none does, this is the exchange's error.
    Broken(io::Error),
}

/// Writes the request: `target` in origin form, `host`, the framing of
/// `body`, and `headers` less any framing or hop-by-hop field.
pub(crate) async fn write_request(
    conn: &mut Conn,
    method: &Method,
    target: &str,
    host: Option<&HeaderValue>,
    headers: &HeaderMap,
    body: &Bytes,
) -> io::Result<Sent> {
    let mut out = std::mem::take(&mut conn.out);
    out.clear();
    out.reserve(
        256 + target.len()
            + headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum::<usize>()
            + if body.len() <= INLINE_BODY {
                body.len()
            } else {
                0
            },
    );
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(h) = host.or_else(|| headers.get(HOST)) {
        field(&mut out, b"host", h.as_bytes());
    }
    for (k, v) in headers {
        if k == HOST || is_framing_or_hop(k) {
            continue;
        }
        field(&mut out, k.as_str().as_bytes(), v.as_bytes());
    }
    // A length whenever there is a body, or the method usually has one
    // (as hyper wrote it).
    if !body.is_empty() || matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        let mut n = itoa::Buffer::new();
        field(&mut out, b"content-length", n.format(body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    let rest: &[u8] = if body.len() <= INLINE_BODY {
        out.extend_from_slice(body);
        &[]
    } else {
        body
    };
    let sent = write_racing(conn, [&out, rest]).await;
    // Kept for the next request unless a large body made it large: an
    // idle connection holds little.
    if out.capacity() <= KEEP_IDLE {
        conn.out = out;
    }
    match sent {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) =>
        {
            Ok(Sent::Broken(e))
        }
        r => r,
    }
}

/// Writes `parts` in order and flushes them. While the connection takes no
/// more (the upstream is not reading), an answer it has begun to send, or
/// its close, ends the write: a server may answer before it has read the
/// whole request (a `413` to a large body, a refusal) and then need not
/// read the rest (RFC 9112 §9.3). A write the socket takes at once, as
/// nearly every request's is, never looks at the reading side.
async fn write_racing(conn: &mut Conn, parts: [&[u8]; 2]) -> io::Result<Sent> {
    let (mut part, mut at) = (0usize, 0usize);
    std::future::poll_fn(|cx| {
        loop {
            match parts.get(part) {
                Some(p) if at == p.len() => {
                    part += 1;
                    at = 0;
                    continue;
                }
                Some(p) => match Pin::new(&mut conn.io).poll_write(cx, &p[at..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        at += n;
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                },
                None => match Pin::new(&mut conn.io).poll_flush(cx) {
                    Poll::Ready(r) => return Poll::Ready(r.map(|()| Sent::Whole)),
                    Poll::Pending => {}
                },
            }
            // The upstream takes no more for now: has it answered?
            match ready!(poll_read_more(conn, cx)) {
                Ok(0) => return Poll::Ready(Ok(Sent::Cut)),
                Ok(_) if conn.buf.len() >= MAX_HEAD || answered(&conn.buf) => {
                    return Poll::Ready(Ok(Sent::Cut));
                }
                // An interim answer (`100 Continue`) so far: go on writing.
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    })
    .await
}

/// Whether `buf` holds the start of a final (not `1xx`) response, past any
/// whole interim ones.
pub(crate) fn answered(buf: &[u8]) -> bool {
    let mut rest = buf;
    loop {
        // "HTTP/1.1 200": the status code's first digit is the tenth byte.
        match rest.get(9) {
            None => return false,
            Some(b'1') => {}
            Some(_) => return true,
        }
        match memchr::memmem::find(rest, b"\r\n\r\n") {
            Some(end) => rest = &rest[end + 4..],
            None => return false,
        }
    }
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Fields this module writes itself (the framing) or that end at the hop
/// (the proxy's own list, [`crate::request::HOP_BY_HOP`]).
fn is_framing_or_hop(k: &HeaderName) -> bool {
    k == CONTENT_LENGTH || crate::request::HOP_BY_HOP.contains(&k.as_str())
}

/// Reads the response head (past any interim `1xx`), and returns the
/// response with its body to read from the connection.
pub(crate) async fn read_response(
    mut conn: Conn,
    method: &Method,
    pool: Weak<Pool>,
    whole: bool,
) -> Result<Response<H1Body>, H1Error> {
    loop {
        let parsed = parse_head(&mut conn.buf, &mut conn.fields)?;
        let Some(head) = parsed else {
            if conn.buf.len() >= MAX_HEAD {
                return Err(H1Error::Invalid("response head too large"));
            }
            if read_more(&mut conn).await? == 0 {
                return Err(H1Error::Closed);
            }
            continue;
        };
        let status = head.status();
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(H1Error::Invalid("unasked protocol switch"));
            }
            continue;
        }
        let (framing, mut keep) = framing(&head, method)?;
        // A connection whose request was cut short is in no state the
        // upstream and the proxy agree on.
        keep &= whole
            && head.version() == Version::HTTP_11
            && !has_token(head.headers(), &CONNECTION, "close");
        let mut body = H1Body {
            conn: Some(conn),
            framing,
            keep,
            pool,
            ready: None,
        };
        body.take_whole();
        return Ok(head.map(|()| body));
    }
}

async fn read_more(conn: &mut Conn) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_read_more(conn, cx)).await
}

fn poll_read_more(conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    conn.buf.reserve(READ_AT_LEAST);
    tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf)
}

/// One response head from the front of `buf` (removed from it), or `None`
/// while it is incomplete.
fn parse_head(
    buf: &mut BytesMut,
    at: &mut Vec<(usize, usize, usize, usize)>,
) -> Result<Option<Response<()>>, H1Error> {
    // Where each field's name and value sit in `buf` (`at`, kept with the
    // connection): the values are then slices of the head's bytes, not
    // copies, as hyper makes them. The parser's own array is left
    // uninitialised, as hyper leaves it.
    at.clear();
    let (len, version, code) = {
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut r = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut r,
            buf,
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(H1Error::Invalid("too many header fields"));
            }
            Err(_) => return Err(H1Error::Invalid("malformed response head")),
        };
        let base = buf.as_ptr() as usize;
        at.extend(r.headers.iter().map(|h| {
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            (name, name + h.name.len(), value, value + h.value.len())
        }));
        (len, r.version, r.code)
    };
    let version = match version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let status = code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(H1Error::Invalid("bad status code"))?;
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(at.len());
    for &(n0, n1, v0, v1) in at.iter() {
        let name = HeaderName::from_bytes(&head[n0..n1])
            .map_err(|_| H1Error::Invalid("bad header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
            .map_err(|_| H1Error::Invalid("bad header value"))?;
        headers.append(name, value);
    }
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.version_mut() = version;
    *resp.headers_mut() = headers;
    Ok(Some(resp))
}

/// How the body's end is found (RFC 9112 §6.3), and whether the connection
/// may carry another request after it.
fn framing(head: &Response<()>, method: &Method) -> Result<(Framing, bool), H1Error> {
    let status = head.status();
    if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Length(0), true));
    }
    let h = head.headers();
    if h.contains_key(TRANSFER_ENCODING) && head.version() != Version::HTTP_11 {
        // RFC 9112 §6.1: framing of an HTTP/1.0 message with
        // Transfer-Encoding is faulty.
        return Err(H1Error::Invalid(
            "transfer-encoding in an HTTP/1.0 response",
        ));
    }
    if h.contains_key(TRANSFER_ENCODING) {
        let last = h
            .get_all(TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .rfind(|c| !c.is_empty());
        return Ok(match last {
            Some(c) if c.eq_ignore_ascii_case(b"chunked") => (
                Framing::Chunked(Chunk::Size),
                // Both framings on one message: read as chunked, not trusted
                // with another request.
                !h.contains_key(CONTENT_LENGTH),
            ),
            _ => (Framing::ToClose, false),
        });
    }
    let mut length = None;
    for v in h.get_all(CONTENT_LENGTH) {
        for part in v.as_bytes().split(|&b| b == b',') {
            let n =
                parse_length(part.trim_ascii()).ok_or(H1Error::Invalid("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(H1Error::Invalid("conflicting content-length"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (Framing::Length(n), true),
        None => (Framing::ToClose, false),
    })
}

fn parse_length(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

fn has_token(h: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    h.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    ToClose,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// A chunk-size line next.
    Size,
    /// This many bytes of chunk data still to come.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer fields, up to an empty line; so many bytes read of them.
    Trailers(usize),
}

/// A response body read from its connection as it is polled. Read to its
/// end, the connection goes back to its pool; dropped before, it closes.
pub(crate) struct H1Body {
    conn: Option<Conn>,
    framing: Framing,
    keep: bool,
    pool: Weak<Pool>,
    /// The whole body, when it came with the head.
    ready: Option<Bytes>,
}

impl std::fmt::Debug for H1Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Body")
            .field("framing", &self.framing)
            .finish_non_exhaustive()
    }
}

impl H1Body {
    /// A body of known length that is already read: taken out now, and the
    /// connection returned before anyone polls.
    fn take_whole(&mut self) {
        let Some(conn) = &mut self.conn else { return };
        if let Framing::Length(n) = self.framing
            && conn.buf.len() as u64 >= n
        {
            // `n` fits: it is at most the buffer's length.
            let data = conn.buf.split_to(n as usize).freeze();
            self.ready = (!data.is_empty()).then_some(data);
            self.framing = Framing::Done;
            self.release();
        }
    }

    /// The body has ended: the connection goes back if it may carry
    /// another request.
    fn release(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if self.keep
            && conn.buf.is_empty()
            && let Some(pool) = self.pool.upgrade()
        {
            // A fresh read buffer: the old one's allocation may be held by
            // this response's header values and body, and an idle
            // connection should hold none of it.
            conn.buf = BytesMut::new();
            pool.checkin_h1(conn);
        }
    }

    /// The next piece of the body from what is buffered, if any.
    fn decode(&mut self) -> Result<Option<Bytes>, H1Error> {
        match &mut self.conn {
            Some(conn) => self.framing.decode(&mut conn.buf),
            None => Ok(None),
        }
    }
}

impl Framing {
    /// Takes the next piece of the body off the front of `buf`, if any:
    /// `None` when more must be read first (or the body has ended). Pure,
    /// so the tests drive it with bytes split anywhere.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, H1Error> {
        loop {
            match *self {
                Framing::Done => return Ok(None),
                Framing::Length(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    if take == 0 && n > 0 {
                        return Ok(None);
                    }
                    *self = match n - take as u64 {
                        0 => Framing::Done,
                        rest => Framing::Length(rest),
                    };
                    return Ok((take > 0).then(|| buf.split_to(take).freeze()));
                }
                Framing::ToClose => {
                    return Ok((!buf.is_empty()).then(|| buf.split().freeze()));
                }
                Framing::Chunked(Chunk::Size) => {
                    let Some(end) = find_crlf(buf) else {
                        return if buf.len() > MAX_LINE {
                            Err(H1Error::Invalid("chunk-size line too long"))
                        } else {
                            Ok(None)
                        };
                    };
                    if end > MAX_LINE {
                        return Err(H1Error::Invalid("chunk-size line too long"));
                    }
                    let size = chunk_size(&buf[..end])?;
                    buf.advance(end + 2);
                    *self = Framing::Chunked(if size == 0 {
                        Chunk::Trailers(0)
                    } else {
                        Chunk::Data(size)
                    });
                }
                Framing::Chunked(Chunk::Data(n)) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    if take == 0 {
                        return Ok(None);
                    }
                    *self = Framing::Chunked(match n - take as u64 {
                        0 => Chunk::DataEnd,
                        rest => Chunk::Data(rest),
                    });
                    return Ok(Some(buf.split_to(take).freeze()));
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(H1Error::Invalid("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Framing::Chunked(Chunk::Size);
                }
                Framing::Chunked(Chunk::Trailers(seen)) => {
                    let Some(end) = find_crlf(buf) else {
                        return if seen + buf.len() > MAX_TRAILERS {
                            Err(H1Error::Invalid("trailer section too large"))
                        } else {
                            Ok(None)
                        };
                    };
                    buf.advance(end + 2);
                    *self = if end == 0 {
                        Framing::Done
                    } else if seen + end + 2 > MAX_TRAILERS {
                        return Err(H1Error::Invalid("trailer section too large"));
                    } else {
                        Framing::Chunked(Chunk::Trailers(seen + end + 2))
                    };
                }
            }
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// The size of a chunk-size line: hex digits, then optional spaces or tabs
/// and `;` extensions, which are dropped. No control byte anywhere (a bare
/// CR or LF in a line is a framing error, not a separator).
fn chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    if line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(H1Error::Invalid("control byte in a chunk-size line"));
    }
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(H1Error::Invalid("bad chunk size"));
    }
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count()..];
    if !(rest.is_empty() || rest.starts_with(b";")) {
        return Err(H1Error::Invalid("bad chunk size"));
    }
    let mut n: u64 = 0;
    for &b in &line[..digits] {
        // At most 16 hex digits: no overflow.
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => b - b'A' + 10,
        };
        n = (n << 4) | u64::from(d);
    }
    Ok(n)
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        if let Some(data) = self.ready.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        loop {
            match self.decode() {
                Err(e) => {
                    // Not reused after an error.
                    self.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(Some(data)) => {
                    if self.framing == Framing::Done {
                        self.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) if self.framing == Framing::Done => {
                    self.release();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
            }
            let Some(conn) = &mut self.conn else {
                return Poll::Ready(None);
            };
            let read = match ready!(poll_read_more(conn, cx)) {
                Ok(n) => n,
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(H1Error::Io(e))));
                }
            };
            if read == 0 {
                if self.framing == Framing::ToClose {
                    self.framing = Framing::Done;
                    self.conn = None;
                    return Poll::Ready(None);
                }
                self.conn = None;
                return Poll::Ready(Some(Err(H1Error::Closed)));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_none() && self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.ready, self.framing) {
            (Some(d), _) => SizeHint::with_exact(d.len() as u64),
            (None, Framing::Done) => SizeHint::with_exact(0),
            (None, Framing::Length(n)) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Response<()> {
        let mut b = BytesMut::from(text.as_bytes());
        parse_head(&mut b, &mut Vec::new()).unwrap().unwrap()
    }

    fn framing_of(text: &str) -> Result<(Framing, bool), H1Error> {
        framing(&head(text), &Method::POST)
    }

    #[test]
    fn the_body_length_follows_rfc_9112() {
        use Framing::*;
        let f = |t: &str| framing_of(t).unwrap();
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            (Length(5), true)
        );
        // The same length repeated, in one field or two, is one length.
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\n"),
            (Length(5), true)
        );
        assert_eq!(f("HTTP/1.1 200 OK\r\n\r\n"), (ToClose, false));
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, Chunked\r\n\r\n"),
            (Chunked(Chunk::Size), true)
        );
        // Chunked and a length: chunked, and the connection is not trusted.
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"),
            (Chunked(Chunk::Size), false)
        );
        // chunked not last: to the close.
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n"),
            (ToClose, false)
        );
        assert_eq!(
            f("HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n"),
            (Length(0), true)
        );
        assert_eq!(f("HTTP/1.1 304 Not Modified\r\n\r\n"), (Length(0), true));
        assert_eq!(
            framing(
                &head("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n"),
                &Method::HEAD
            )
            .unwrap(),
            (Length(0), true)
        );
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 0x10\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            // RFC 9112 §6.1: faulty framing, whatever else is there.
            "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n",
        ] {
            assert!(framing_of(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn chunk_sizes_are_hex_with_extensions_and_bounded() {
        assert_eq!(chunk_size(b"1a").unwrap(), 26);
        assert_eq!(chunk_size(b"FF;name=value").unwrap(), 255);
        assert_eq!(chunk_size(b"0 ; x").unwrap(), 0);
        assert_eq!(chunk_size(b"a\t;x=\"y\"").unwrap(), 10);
        assert_eq!(chunk_size(b"ffffffffffffffff").unwrap(), u64::MAX);
        for bad in [
            &b""[..],
            b";x",
            b"1g",
            b"-1",
            b"0x10",
            b"10000000000000000",
            b"1 2",
            b"5\r",
            b"5\n",
            b"5\n;x",
            b"5;a\x01b",
            b"5\x0c",
        ] {
            assert!(
                chunk_size(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_malformed_head_is_an_error_and_a_partial_one_waits() {
        for bad in [
            &b"HTTP/1.1 2000 OK\r\n\r\n"[..],
            b"HTTP/2 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx: a\rb\r\n\r\n",
            b"garbage\r\n\r\n",
        ] {
            let mut b = BytesMut::from(bad);
            assert!(
                parse_head(&mut b, &mut Vec::new()).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut b = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-le"[..]);
        assert!(parse_head(&mut b, &mut Vec::new()).unwrap().is_none());
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        let mut b = BytesMut::from(format!("HTTP/1.1 200 OK\r\n{many}\r\n").as_bytes());
        assert!(matches!(
            parse_head(&mut b, &mut Vec::new()),
            Err(H1Error::Invalid(_))
        ));
    }

    /// xorshift: a fixed seed, so that a failing case repeats.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            // Some CR and LF among them, where a decoder could lose its way.
            (0..n)
                .map(|_| match self.below(16) {
                    0 => b'\r',
                    1 => b'\n',
                    _ => self.next() as u8,
                })
                .collect()
        }
    }

    /// What feeding `input` to `framing` in pieces (as reads would bring
    /// them, at most 64 bytes each) gave: the body, the end (`None` for an
    /// error), and the bytes after the end (buffered and unread).
    fn feed(
        mut framing: Framing,
        input: &[u8],
        rng: &mut Rng,
    ) -> (Vec<u8>, Option<Framing>, usize) {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            match framing.decode(&mut buf) {
                Err(_) => return (out, None, 0),
                Ok(Some(b)) => {
                    assert!(!b.is_empty(), "an empty piece of body");
                    out.extend_from_slice(&b);
                    continue;
                }
                Ok(None) if framing == Framing::Done => {
                    return (out, Some(framing), buf.len() + input.len() - at);
                }
                Ok(None) => {}
            }
            // Waiting for more: what is held is bounded, whatever came.
            assert!(buf.len() <= MAX_TRAILERS + 64, "{} bytes held", buf.len());
            if at == input.len() {
                return (out, Some(framing), 0);
            }
            let n = 1 + rng.below((input.len() - at).min(64));
            buf.extend_from_slice(&input[at..at + n]);
            at += n;
        }
    }

    /// `body` in chunks of random sizes, hex in either case, some with
    /// extensions, then trailers.
    fn chunked(body: &[u8], rng: &mut Rng) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = body;
        while !rest.is_empty() {
            let n = (1 + rng.below(300)).min(rest.len());
            let size = if rng.below(2) == 0 {
                format!("{n:x}")
            } else {
                format!("{n:X}")
            };
            out.extend_from_slice(size.as_bytes());
            if rng.below(4) == 0 {
                out.extend_from_slice(b" ;name=\"v;\\\"x\"");
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&rest[..n]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[n..];
        }
        out.extend_from_slice(b"0\r\n");
        for i in 0..rng.below(3) {
            out.extend_from_slice(format!("x-trailer-{i}: {}\r\n", rng.next()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    #[test]
    fn bodies_decode_the_same_however_the_reads_split_them() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..400 {
            let (n, m) = (rng.below(2000), rng.below(3) * 7);
            let body = rng.bytes(n);
            let after = rng.bytes(m);
            let mut input = chunked(&body, &mut rng);
            input.extend_from_slice(&after);
            let (out, end, left) = feed(Framing::Chunked(Chunk::Size), &input, &mut rng);
            assert_eq!(end, Some(Framing::Done), "case {case}");
            assert_eq!(out, body, "case {case}");
            assert_eq!(
                left,
                after.len(),
                "case {case}: the bytes after the body are not read"
            );

            let mut input = body.clone();
            input.extend_from_slice(&after);
            let (out, end, left) = feed(Framing::Length(body.len() as u64), &input, &mut rng);
            assert_eq!(
                (out, end, left),
                (body, Some(Framing::Done), after.len()),
                "case {case}"
            );
        }
    }

    /// Random bytes, and valid encodings with a few bytes changed: the
    /// decoder errs or ends, holds a bounded amount meanwhile, never
    /// panics and never gives out more bytes than it was given.
    #[test]
    fn bad_chunking_is_an_error_never_a_panic_or_an_unbounded_buffer() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut errors = 0;
        for _ in 0..3000 {
            let (n, m) = (rng.below(600), rng.below(500));
            let input = if rng.below(3) == 0 {
                rng.bytes(n)
            } else {
                let body = rng.bytes(m);
                let mut v = chunked(&body, &mut rng);
                for _ in 0..1 + rng.below(3) {
                    let at = rng.below(v.len());
                    match rng.below(3) {
                        0 => v[at] = rng.next() as u8,
                        1 => v.insert(at, rng.next() as u8),
                        _ => {
                            v.remove(at);
                        }
                    }
                }
                v
            };
            let (out, end, _) = feed(Framing::Chunked(Chunk::Size), &input, &mut rng);
            assert!(out.len() <= input.len());
            errors += usize::from(end.is_none());
        }
        // Most damaged encodings are refused, not read as something else.
        assert!(errors > 1500, "{errors} of 3000 refused");
        // A size line or a trailer section past its bound is refused.
        let long = [vec![b'1'], vec![b' '; MAX_LINE + 10], b"\r\n".to_vec()].concat();
        assert_eq!(feed(Framing::Chunked(Chunk::Size), &long, &mut rng).1, None);
        let trailers = [
            b"0\r\n".to_vec(),
            b"x: y\r\n".repeat(MAX_TRAILERS / 6 + 1),
            b"\r\n".to_vec(),
        ]
        .concat();
        assert_eq!(
            feed(Framing::Chunked(Chunk::Size), &trailers, &mut rng).1,
            None
        );
    }

    #[test]
    fn framing_and_hop_by_hop_fields_are_not_written_from_the_caller() {
        for n in [
            "content-length",
            "transfer-encoding",
            "connection",
            "te",
            "upgrade",
            "keep-alive",
        ] {
            assert!(is_framing_or_hop(&HeaderName::from_static(n)), "{n}");
        }
        for n in [
            "authorization",
            "content-type",
            "openai-beta",
            "accept-encoding",
        ] {
            assert!(!is_framing_or_hop(&HeaderName::from_static(n)), "{n}");
        }
    }
}
