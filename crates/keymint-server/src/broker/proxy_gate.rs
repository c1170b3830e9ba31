//! The broker as the egress proxy's [`Gate`]: the proxy authenticates
//! through the broker's `kmt_` path (the same cached lookup the API uses)
//! and audits its refusals within the broker's bounds.
//!
//! A refused credential is an `auth.failed` event, bounded with the API's
//! (`keymint_auth_failures_total` counts every one); any other refusal is a
//! `proxy.denied` event, bounded per window the same way and summarised as
//! `proxy.denied.suppressed` by check (the proxy's
//! `keymint_proxy_denials_total` counts every one).

use std::sync::Arc;

use keymint_core::audit::{AuditDraft, Outcome};
use keymint_core::token::{self, TokenKind};
use keymint_proxy::Presented;
use keymint_proxy::gate::{Caller, Gate, GateError};

use super::auth_audit::Bounded;
use super::authentication::credential_kind;
use super::{Broker, BrokerError};

/// The proxy's refusals of callers that presented a credential or none.
#[derive(Debug)]
pub(crate) struct ProxyDenials;

impl Bounded for ProxyDenials {
    const SUMMARY: &'static str = "proxy.denied.suppressed";
    const BY: &'static str = "by_check";
    const WHAT: &'static str = "proxy refusals";
}

const ADMIN_REFUSED: &str =
    "the admin token cannot be used with the proxy; use a task token (kmt_...)";

#[async_trait::async_trait]
impl Gate for Broker {
    async fn authenticate(
        &self,
        token: Presented<'_>,
        upstream: &str,
    ) -> Result<Arc<Caller>, GateError> {
        let (result, fingerprint, credential) = match token {
            Presented::Nothing => (
                Err(BrokerError::Unauthorized("missing keymint token".into())),
                None,
                "none",
            ),
            Presented::Repeated(header) => (
                Err(BrokerError::Unauthorized(format!(
                    "send the token once: the request has more than one `{header}` header"
                ))),
                None,
                "repeated",
            ),
            Presented::Token(token) => {
                let checked = token::check(token);
                let fp = checked
                    .is_ok()
                    .then(|| self.keyring.fingerprint(token.as_bytes()));
                let result = match (checked, &fp) {
                    (Ok(TokenKind::Access), Some(fp)) => self
                        .live_access_token(fp.clone())
                        .await
                        .map(|live| Arc::clone(&live.caller)),
                    // Operator and node tokens share the admin prefix; none
                    // of them is looked up here.
                    (Ok(_), _) => Err(BrokerError::Unauthorized(ADMIN_REFUSED.into())),
                    (Err(e), _) => Err(BrokerError::Unauthorized(e.to_string())),
                };
                (result, fp, credential_kind(token))
            }
        };
        match result {
            Ok(caller) => Ok(caller),
            Err(BrokerError::Unauthorized(m)) => {
                let mut ev = AuditDraft::new(self.now(), "auth.failed", "anonymous")
                    .outcome(Outcome::Denied)
                    .reason(m.as_str())
                    .data("credential", credential)
                    .data("upstream", upstream);
                if let Some(fp) = fingerprint {
                    ev = ev.fingerprint(fp);
                }
                self.record_auth_failure(ev, credential).await;
                Err(GateError::Refused(m))
            }
            Err(e) => {
                tracing::error!(error = %e, "proxy: token lookup failed");
                Err(GateError::Unavailable)
            }
        }
    }

    async fn still_live(&self, caller: &Caller) -> Result<(), GateError> {
        match self.live_access_token(caller.fingerprint.clone()).await {
            Ok(_) => Ok(()),
            Err(BrokerError::Unauthorized(m)) => Err(GateError::Refused(m)),
            Err(e) => {
                tracing::warn!(error = %e, "proxy: cannot check an open stream's token");
                Err(GateError::Unavailable)
            }
        }
    }

    async fn record_denial(&self, event: AuditDraft, check: &'static str) {
        self.record_bounded(&self.proxy_denials, event, check).await;
    }
}
