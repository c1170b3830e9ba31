//! Upstreams without a static key (docs/design/0028-provider-federation.md):
//! the proxy asks an [`UpstreamTokens`] source (the server's, which signs a
//! JWT with keymint's issuer key and exchanges it at the provider) for the
//! current access token, and audits each refresh and each failed exchange.
//! A source that cannot produce a token answers at once (it fails fast for
//! a moment after a failure, and every exchange has a deadline), so an
//! outage is a 503 `provider_unavailable`, never a hang.

use std::sync::Arc;

use async_trait::async_trait;
use keymint_core::Timestamp;
use zeroize::Zeroizing;

/// A token for an upstream, and whether getting it took a new exchange.
#[derive(Debug)]
pub struct FetchedToken {
    pub token: Arc<Zeroizing<String>>,
    /// Set when this call exchanged a new token: when it expires.
    pub refreshed: Option<Timestamp>,
}

/// Why no token could be had. The message names the provider, the step
/// and the status only: it is audited and logged, never sent to a client.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct TokenUnavailable {
    pub message: String,
    /// `true` when this call made the exchange that failed (audited);
    /// `false` when it failed fast on a recent failure (not audited again).
    pub attempted: bool,
}

#[async_trait]
pub trait UpstreamTokens: Send + Sync + std::fmt::Debug {
    /// The current access token for `upstream`, refreshed before it
    /// expires, one exchange at a time.
    async fn token(&self, upstream: &str) -> Result<FetchedToken, TokenUnavailable>;
}
