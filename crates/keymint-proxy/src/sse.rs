//! A streamed (SSE) response on its way to the client: every chunk is passed
//! on as soon as it arrives, while complete events are read on the side for
//! usage (an `http` upstream's stream passes unread: it is counted by
//! request). When the proxy asked an OpenAI stream for its usage chunk on the
//! client's behalf, events are passed on as each one completes, and that
//! chunk is left out. The upstream's key is redacted from what passes,
//! wherever the chunks cut it (`reflect::StreamRedactor`). When the
//! upstream's stream ends, the settle is recorded in the store before the
//! client sees the end of the body. A stream whose caller may no longer be
//! answered (its token revoked, its task ended or suspended, the upstream's
//! key suspended) is cut within about a second ([`Liveness`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::pool::UpstreamBody;
use bytes::Bytes;
use http_body::{Body, Frame};
use tokio::time::Sleep;

use crate::gate::{Caller, GateError};
use crate::provider::{Endpoint, StreamMeter};
use crate::reflect::StreamRedactor;
use crate::{Proxy, Settlement};

/// Longest event the meter reads; a longer one passes unread.
const MAX_EVENT: usize = 1024 * 1024;

/// How often a stream in flight asks whether its caller may still be
/// answered.
const LIVE_CHECK: Duration = Duration::from_secs(1);

/// Why a stream's caller may no longer be answered, once the check says so.
type Check = Pin<Box<dyn Future<Output = Option<String>> + Send>>;

/// Asks, every [`LIVE_CHECK`] while a stream is passed on, what a new
/// request would be asked after its token was read: is the lease still
/// active and its task live and not suspended (the broker's cached lookup,
/// a store read only after a revocation moved the epoch), and is the
/// upstream's key not suspended. A stream opened just before its task ended
/// thus ends within about a second, as the next request is refused.
// INVARIANT (DESIGN.md 1): nothing reaches an agent through keymint after
// its task ended, a stream opened before included.
pub(crate) struct Liveness {
    proxy: Arc<Proxy>,
    upstream: String,
    caller: Arc<Caller>,
    tick: Pin<Box<Sleep>>,
    check: Option<Check>,
}

impl Liveness {
    pub(crate) fn new(proxy: Arc<Proxy>, upstream: &str, caller: Arc<Caller>) -> Self {
        Self {
            proxy,
            upstream: upstream.to_owned(),
            caller,
            tick: Box::pin(tokio::time::sleep(LIVE_CHECK)),
            check: None,
        }
    }

    /// Ready with the reason once the caller may no longer be answered;
    /// else pending, to be woken by the next tick or the check's answer. A
    /// store that cannot be read does not end the stream (asked again at
    /// the next tick).
    fn poll_refused(&mut self, cx: &mut Context<'_>) -> Poll<String> {
        loop {
            if let Some(check) = self.check.as_mut() {
                let answer = std::task::ready!(check.as_mut().poll(cx));
                self.check = None;
                if let Some(why) = answer {
                    return Poll::Ready(why);
                }
            }
            std::task::ready!(self.tick.as_mut().poll(cx));
            self.tick
                .as_mut()
                .reset(tokio::time::Instant::now() + LIVE_CHECK);
            let proxy = Arc::clone(&self.proxy);
            let caller = Arc::clone(&self.caller);
            let upstream = self.upstream.clone();
            self.check = Some(Box::pin(async move {
                if let Some(why) = proxy.upstream_suspended(&upstream) {
                    return Some(format!(
                        "upstream `{upstream}` is suspended by misuse monitoring ({why})"
                    ));
                }
                match proxy.gate.still_live(&caller).await {
                    Err(GateError::Refused(m)) => Some(m),
                    Ok(()) | Err(GateError::Unavailable) => None,
                }
            }));
        }
    }
}

pub struct MeteredStream {
    inner: UpstreamBody,
    /// `None` for an `http` upstream's stream, counted by request only.
    events: Option<EventReader>,
    /// The upstream's key taken out of what passes (design 0044); `None`
    /// for a key too short to search for.
    redactor: Option<StreamRedactor>,
    settlement: Option<Settlement>,
    /// The settle being recorded at the end of the stream, and what is
    /// still to be passed on after it.
    settling: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    tail: Option<Bytes>,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    /// Ends the stream when its caller may no longer be answered.
    live: Option<Liveness>,
    done: bool,
}

impl std::fmt::Debug for MeteredStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredStream")
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl MeteredStream {
    pub(crate) fn new(
        inner: UpstreamBody,
        ep: Option<Endpoint>,
        strip: bool,
        settlement: Settlement,
        idle: Duration,
        redactor: Option<StreamRedactor>,
        live: Option<Liveness>,
    ) -> Self {
        Self {
            inner,
            events: ep.map(|ep| EventReader::new(ep, strip)),
            redactor,
            settlement: Some(settlement),
            settling: None,
            tail: None,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            live,
            done: false,
        }
    }

    /// What the stream reported; an `http` upstream's is counted by
    /// request only.
    fn usage(&self) -> Option<(u64, u64)> {
        self.events
            .as_ref()
            .map_or(Some((0, 0)), EventReader::usage)
    }

    /// A stream that did not reach its end (the client went away, the
    /// upstream failed or stalled): settled at what it reported only once
    /// the provider's last report was seen, else at its whole reservation.
    fn finish(&mut self) {
        self.done = true;
        if let Some(mut s) = self.settlement.take() {
            let usage = self
                .events
                .as_ref()
                .map_or(Some((0, 0)), EventReader::usage_if_cut);
            s.finish(usage);
        }
    }

    /// Starts recording the settle; the body ends once it is recorded.
    fn finish_durably(&mut self) {
        if let Some(mut s) = self.settlement.take()
            && let Some(f) = s.settling(self.usage())
        {
            self.settling = Some(Box::pin(f));
        }
    }
}

/// Reads the events of a stream as its chunks pass: the usage they report,
/// and, when `strip` is set, the stream with OpenAI's usage-only chunk left
/// out. Pure (no I/O), so the fuzz target `sse` drives it directly.
#[derive(Debug)]
pub struct EventReader {
    ep: Endpoint,
    strip: bool,
    buf: Vec<u8>,
    /// How far `buf` has been searched for an event boundary (so a long
    /// event arriving in small chunks is not searched again from its start
    /// for every chunk).
    searched: usize,
    meter: StreamMeter,
}

impl EventReader {
    pub fn new(ep: Endpoint, strip: bool) -> Self {
        Self {
            ep,
            strip,
            buf: Vec::new(),
            searched: 0,
            meter: StreamMeter::default(),
        }
    }

    /// Both counts, once the stream has reported them.
    pub fn usage(&self) -> Option<(u64, u64)> {
        self.meter.usage()
    }

    /// Both counts of a stream cut before its end, once the provider's
    /// last report of them was seen ([`StreamMeter::usage_if_cut`]).
    pub fn usage_if_cut(&self) -> Option<(u64, u64)> {
        self.meter.usage_if_cut()
    }

    /// The end of the stream: reads what is left as a last event, and
    /// returns what is still to be passed on (only when stripping).
    pub fn finish(&mut self) -> Option<Bytes> {
        let rest = std::mem::take(&mut self.buf);
        self.searched = 0;
        if rest.is_empty() {
            return None;
        }
        self.inspect(&rest);
        self.strip.then(|| Bytes::from(rest))
    }

    /// Reads one complete event; `true` if it is to be left out.
    fn inspect(&mut self, event: &[u8]) -> bool {
        let mut data = Vec::new();
        for line in event.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(d) = line.strip_prefix(b"data:") {
                if !data.is_empty() {
                    data.push(b'\n');
                }
                data.extend_from_slice(d.strip_prefix(b" ").unwrap_or(d));
            }
        }
        if data.is_empty() || data == b"[DONE]" {
            return false;
        }
        match serde_json::from_slice::<serde_json::Value>(&data) {
            Ok(v) => self.meter.observe(self.ep, &v) && self.strip,
            Err(_) => false,
        }
    }

    /// One chunk of the stream in; what is to be passed on out.
    pub fn process(&mut self, chunk: Bytes) -> Bytes {
        self.buf.extend_from_slice(&chunk);
        let mut out = Vec::new();
        // A separator may straddle the previous chunk's end: look again
        // from three bytes before it.
        while let Some((end, sep)) = boundary(&self.buf, self.searched.saturating_sub(3)) {
            self.searched = 0;
            let event: Vec<u8> = self.buf.drain(..end + sep).collect();
            let drop = self.inspect(&event[..end]);
            if self.strip && !drop {
                out.extend_from_slice(&event);
            }
        }
        self.searched = self.buf.len();
        if self.buf.len() > MAX_EVENT {
            // Not an event stream we can read: pass it on unread.
            let rest = std::mem::take(&mut self.buf);
            self.searched = 0;
            if self.strip {
                out.extend_from_slice(&rest);
            }
        }
        if self.strip { Bytes::from(out) } else { chunk }
    }
}

/// Two optional pieces of a body as one (`None` when both are empty).
fn join(a: Option<Bytes>, b: Option<Bytes>) -> Option<Bytes> {
    match (a.filter(|x| !x.is_empty()), b) {
        (Some(a), Some(b)) => {
            let mut v = Vec::with_capacity(a.len() + b.len());
            v.extend_from_slice(&a);
            v.extend_from_slice(&b);
            Some(Bytes::from(v))
        }
        (a, b) => a.or(b),
    }
}

/// The end of the first event in `buf` at or after `from`, and the length
/// of its separator.
fn boundary(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' && buf[i + 1] == b'\n' {
            return Some((i, 2));
        }
        if buf[i] == b'\r' && buf[i + 1] == b'\n' && buf.get(i + 2..i + 4) == Some(b"\r\n") {
            return Some((i, 4));
        }
        i += 1;
    }
    None
}

impl Body for MeteredStream {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(f) = this.settling.as_mut() {
                if f.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.settling = None;
                this.done = true;
            }
            if this.done {
                return Poll::Ready(this.tail.take().map(|rest| Ok(Frame::data(rest))));
            }
            if let Some(live) = this.live.as_mut()
                && let Poll::Ready(why) = live.poll_refused(cx)
            {
                tracing::info!(
                    upstream = %live.upstream,
                    task = %live.caller.task,
                    reason = %why,
                    "proxy: a stream was cut: its caller may no longer be answered"
                );
                this.live = None;
                // Settled like any stream that did not reach its end.
                this.finish();
                return Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    why,
                ))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let deadline = tokio::time::Instant::now() + this.idle;
                    this.timer.as_mut().reset(deadline);
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    let mut out = match this.events.as_mut() {
                        Some(e) => e.process(data),
                        None => data,
                    };
                    if let Some(r) = this.redactor.as_mut() {
                        out = r.pass(out);
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.finish();
                    return Poll::Ready(Some(Err(std::io::Error::other(e))));
                }
                Poll::Ready(None) => {
                    this.tail = this.events.as_mut().and_then(EventReader::finish);
                    if let Some(r) = this.redactor.as_mut() {
                        let passed = this.tail.take().map(|t| r.pass(t));
                        this.tail = join(passed, r.finish());
                    }
                    this.finish_durably();
                    if this.settling.is_none() {
                        this.done = true;
                    }
                    continue;
                }
                Poll::Pending => {
                    if this.timer.as_mut().poll(cx).is_ready() {
                        this.finish();
                        return Poll::Ready(Some(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the upstream stream stalled",
                        ))));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Drop for MeteredStream {
    fn drop(&mut self) {
        // A client that goes away mid-stream pays for what the stream had
        // reported once its last report was seen, else for the whole
        // reservation. A settle already under way is finished in the
        // background.
        if let Some(f) = self.settling.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(f);
        }
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::{EventReader, boundary};
    use crate::provider::Endpoint;
    use bytes::Bytes;

    /// The usage read, and what is passed on, do not depend on where the
    /// chunks were cut, separators split across chunks included.
    #[test]
    fn events_split_anywhere_read_the_same() {
        let stream = b"data: {\"choices\":[{\"delta\":{}}]}\r\n\r\n\
            data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\r\n\r\n\
            data: [DONE]\n\n";
        for size in 1..=stream.len() {
            let mut r = EventReader::new(Endpoint::ChatCompletions, true);
            let mut out = Vec::new();
            for chunk in stream.chunks(size) {
                out.extend_from_slice(&r.process(Bytes::copy_from_slice(chunk)));
            }
            out.extend_from_slice(&r.finish().unwrap_or_default());
            assert_eq!(r.usage(), Some((7, 3)), "chunks of {size}");
            // The usage-only chunk is left out, the rest passes whole.
            let text = String::from_utf8(out).unwrap();
            assert!(
                !text.contains("usage") && text.contains("[DONE]"),
                "{size}: {text}"
            );
        }
    }

    #[test]
    fn event_boundaries() {
        assert_eq!(boundary(b"data: x\n\ndata: y", 0), Some((7, 2)));
        assert_eq!(boundary(b"data: x\r\n\r\n", 0), Some((7, 4)));
        assert_eq!(boundary(b"data: x\n", 0), None);
    }
}
