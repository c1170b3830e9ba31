//! The egress proxy's token source for upstreams without a static key
//! (docs/design/0028-provider-federation.md): the engines' federation
//! cache ([`keymint_engines::federation::FederatedTokens`]: a JWT signed
//! with keymint's issuer key, exchanged at the provider, refreshed before
//! expiry, one exchange at a time, each under a deadline) behind the
//! proxy's [`UpstreamTokens`] trait.

use std::sync::Arc;

use async_trait::async_trait;
use keymint_core::Clock;
use keymint_engines::federation::FederatedTokens;
use keymint_proxy::config::Upstream;
use keymint_proxy::federated::{FetchedToken, TokenUnavailable, UpstreamTokens};

#[derive(Debug)]
pub struct Tokens(FederatedTokens);

/// The token source for the federated upstreams among `upstreams`, or
/// `None` when there are none.
pub fn source(
    upstreams: &[Upstream],
    issuer: Option<&Arc<keymint_issuer::Issuer>>,
    clock: &Arc<dyn Clock>,
) -> anyhow::Result<Option<Arc<dyn UpstreamTokens>>> {
    let federated: Vec<_> = upstreams
        .iter()
        .filter_map(|u| Some((u.name.clone(), u.federation.clone()?)))
        .collect();
    if federated.is_empty() {
        return Ok(None);
    }
    let Some(issuer) = issuer else {
        anyhow::bail!("federated upstreams need keymint to be an OIDC issuer");
    };
    let tokens = FederatedTokens::new(Arc::clone(issuer), Arc::clone(clock), federated)
        .map_err(|e| anyhow::anyhow!(e))?;
    Ok(Some(Arc::new(Tokens(tokens))))
}

#[async_trait]
impl UpstreamTokens for Tokens {
    async fn token(&self, upstream: &str) -> Result<FetchedToken, TokenUnavailable> {
        self.0
            .token(upstream)
            .await
            .map(|t| FetchedToken {
                token: t.token,
                refreshed: t.refreshed,
            })
            .map_err(|f| TokenUnavailable {
                message: f.error.to_string(),
                attempted: f.attempted,
            })
    }
}
