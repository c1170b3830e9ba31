//! What the proxy tells misuse monitoring (docs/design/0033): one
//! [`Observation`] per settled request, and the question whether an
//! upstream key is suspended. The server implements [`Monitor`]; the proxy
//! only hands over what it saw, at the one place a request is settled, and
//! never waits for it (an implementation queues and returns).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::HeaderMap;
use keymint_core::Timestamp;

use crate::gate::Caller;

/// The longest `X-Forwarded-For` value kept for the monitor.
const MAX_FORWARDED: usize = 512;

/// Who sent a request and from where, taken when it arrives.
#[derive(Debug, Clone)]
pub struct Seen {
    pub caller: Arc<Caller>,
    /// The peer of the connection, when the server knows it.
    pub peer: Option<IpAddr>,
    /// The raw `X-Forwarded-For` header (bounded); the monitor decides
    /// whether the peer is a proxy it trusts.
    pub forwarded_for: Option<String>,
}

impl Seen {
    pub(crate) fn new(caller: &Arc<Caller>, parts: &http::request::Parts) -> Self {
        Self {
            caller: Arc::clone(caller),
            peer: parts
                .extensions
                .get::<axum::extract::ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
            forwarded_for: forwarded_for(&parts.headers),
        }
    }
}

/// Every `X-Forwarded-For` line, joined in order (RFC 9110 5.3: several
/// lines are one list), keeping only the rightmost [`MAX_FORWARDED`]
/// bytes cut at an entry's start. The monitor believes the header from the
/// right, where trusted proxies append: the left is the client's own word.
/// So a client that sends a header of its own, a long one, or one with
/// bytes that are not text, must not hide what a trusted proxy added after
/// it (a proxy that adds a line of its own, as HAProxy does, or appends to
/// the client's): until session 28 only the first line was read, and a
/// value that was too long or not text was dropped whole, so the monitor
/// saw the client's chosen address, or only the trusted proxy's.
fn forwarded_for(h: &HeaderMap) -> Option<String> {
    let mut joined: Vec<u8> = Vec::new();
    for v in h.get_all("x-forwarded-for") {
        if !joined.is_empty() {
            joined.push(b',');
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if joined.is_empty() {
        return None;
    }
    let mut tail = joined.as_slice();
    if tail.len() > MAX_FORWARDED {
        let cut = &tail[tail.len() - MAX_FORWARDED..];
        // From the first entry that starts inside the kept bytes: what
        // is left of a cut entry is not an address.
        let start = cut
            .iter()
            .position(|b| *b == b',')
            .map_or(cut.len(), |i| i + 1);
        tail = &cut[start..];
    }
    Some(String::from_utf8_lossy(tail).into_owned())
}

/// One settled request.
#[derive(Debug, Clone)]
pub struct Observation {
    pub at: Timestamp,
    pub upstream: String,
    pub seen: Seen,
    /// Input and output tokens charged.
    pub tokens: u64,
    /// Nano-dollars charged.
    pub spend_nusd: u64,
}

/// Misuse monitoring, as the proxy sees it.
pub trait Monitor: Send + Sync + std::fmt::Debug {
    /// Takes note of a settled request. Must not block.
    fn observe(&self, o: Observation);

    /// Why `upstream`'s key may not be used now (`None`: it may).
    fn upstream_suspended(&self, upstream: &str) -> Option<String>;
}
