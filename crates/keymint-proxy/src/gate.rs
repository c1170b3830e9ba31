//! Who may call through the proxy, decided by the broker.
//!
//! The proxy does not look tokens up itself: it asks a [`Gate`] (the broker
//! implements it), so the API and the proxy share one authentication path,
//! one token cache and one bounded audit of refusals. The proxy cannot
//! depend on the server (the server depends on the proxy), hence the trait.

use std::sync::Arc;

use keymint_core::audit::AuditDraft;

use crate::request::Presented;

/// Who is calling through the proxy: the live lease behind the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub lease: String,
    pub task: String,
    pub workload: String,
    pub role: String,
    /// The lease's fingerprint (the token's HMAC), never the token.
    pub fingerprint: String,
}

/// Why a presented token is refused. Never what it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    /// The credential is missing, malformed, unknown, ended, or not a task
    /// token; the message says which.
    #[error("{0}")]
    Refused(String),
    /// The token could not be checked (the store failed).
    #[error("the token could not be checked")]
    Unavailable,
}

/// The broker, as the proxy sees it.
#[async_trait::async_trait]
pub trait Gate: Send + Sync + std::fmt::Debug {
    /// The caller behind the token the request presented (none, or its
    /// header more than once, is refused). A refusal has already been
    /// counted and audited (`auth.failed`, within the broker's bound) when
    /// this returns; `upstream` goes into that event.
    async fn authenticate(
        &self,
        token: Presented<'_>,
        upstream: &str,
    ) -> Result<Arc<Caller>, GateError>;

    /// Whether `caller` may still be answered: its lease active, its task
    /// (and every task it was delegated from) live and not suspended. Asked
    /// about once a second by a stream in flight ([`crate::sse`]): a
    /// `Refused` ends the stream, `Unavailable` (the store could not be
    /// read) does not. Nothing is audited here; the revocation or
    /// suspension that ends a stream was.
    async fn still_live(&self, caller: &Caller) -> Result<(), GateError>;

    /// Audits a refusal (`proxy.denied`) within a bound: a burst per window
    /// one by one, then one summary counted by `check`. The caller counts
    /// every refusal in its own metrics.
    async fn record_denial(&self, event: AuditDraft, check: &'static str);
}
