//! The provider admin keys the `openai` and `openrouter` engines use: the
//! sealed key of an `[[upstreams]]` entry (`keymint upstream set NAME`,
//! stored by the proxy under `upstream/NAME/key`), opened from the store at
//! each use, so a rotated key takes effect at once and no copy lingers.

use std::sync::Arc;

use async_trait::async_trait;
use keymint_core::keyring::Keyring;
use keymint_engines::EngineError;
use keymint_engines::provider::AdminKeys;
use keymint_store::Store;
use zeroize::Zeroizing;

#[derive(Debug)]
pub struct SealedAdminKeys {
    pub store: Arc<dyn Store>,
    pub keyring: Arc<Keyring>,
}

#[async_trait]
impl AdminKeys for SealedAdminKeys {
    async fn admin_key(&self, name: &str) -> Result<Option<Zeroizing<String>>, EngineError> {
        let secret = keymint_proxy::key_secret_name(name);
        let sealed = self.store.get_secret(&secret).await.map_err(|e| {
            tracing::error!(error = %e, "cannot read a provider admin key");
            EngineError::Internal("cannot read the admin key from the store".into())
        })?;
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        let opened = self.keyring.open(&secret, &sealed).map_err(|_| {
            EngineError::Internal(format!(
                "the admin key of upstream `{name}` cannot be opened"
            ))
        })?;
        String::from_utf8(opened.to_vec())
            .map(|s| Some(Zeroizing::new(s)))
            .map_err(|_| {
                EngineError::Internal(format!("the admin key of upstream `{name}` is not text"))
            })
    }
}
