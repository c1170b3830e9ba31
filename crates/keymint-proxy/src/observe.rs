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

fn forwarded_for(h: &HeaderMap) -> Option<String> {
    let v = h.get("x-forwarded-for")?.to_str().ok()?;
    (v.len() <= MAX_FORWARDED).then(|| v.to_owned())
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
