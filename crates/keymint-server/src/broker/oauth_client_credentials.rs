//! The `client_credentials` grant for registered clients
//! (`[[oauth.clients]]`), authenticated by `private_key_jwt` (RFC 7523
//! §2.2, OpenID Connect Core §9): the client signs an assertion with a key
//! of its registered JWK Set; keymint checks the signature, `iss` = `sub` =
//! the client, `aud` naming the token endpoint or the issuer, a bounded
//! `exp`, and uses the `jti` once (in the store, so on every replica). The
//! token lives in a task of the client's workload, started as for
//! jwt-bearer (docs/design/0026-oauth-token-service.md).

use std::sync::Arc;

use keymint_core::Timestamp;
use keymint_core::audit::{AuditDraft, Outcome};
use serde_json::Value;

use super::oauth::{
    GRANT_CLIENT_CREDENTIALS, MAX_TOKEN, OAuthError, TokenRequest, TokenResponse, granted_scopes,
    one_resource, own_task_lifetime,
};
use super::{Broker, Principal, Proven};
use crate::oauth_clients::OAuthClient;

/// RFC 7523 §2.2 `client_assertion_type`.
pub const CLIENT_ASSERTION_JWT: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The longest an assertion may still be valid (`exp` − now); authlib's
/// default is an hour, and clock skew gets a minute more.
const MAX_ASSERTION_LIFE_SECS: i64 = 3600 + 60;
/// Tolerated skew for `iat` and `nbf` in the future.
const SKEW_SECS: i64 = 60;

impl Broker {
    /// Gives the broker its registered OAuth clients (at start).
    pub fn set_oauth_clients(&self, clients: Vec<OAuthClient>) {
        let _ = self.oauth_clients.set(Arc::new(clients));
    }

    pub(crate) fn oauth_clients(&self) -> Arc<Vec<OAuthClient>> {
        self.oauth_clients.get().cloned().unwrap_or_default()
    }

    /// `client_credentials`: the client authenticates with its assertion;
    /// the token is for one of its resources, its scopes within the
    /// client's and the resource's role's.
    pub(super) async fn client_credentials(
        &self,
        mut req: TokenRequest,
    ) -> Result<TokenResponse, OAuthError> {
        // The request's own checks run before the assertion is spent: a
        // client refused a resource or a scope may ask again with it.
        let mut target = None;
        let client = self
            .authenticate_client(&req, |client| {
                let resource = one_resource(&req.resources)?.to_owned();
                if !client.resources.contains(&resource) {
                    return Err(OAuthError::InvalidTarget(
                        "the client is not registered for this resource".into(),
                    ));
                }
                let role = self.resource_role(&resource)?;
                own_task_lifetime(&req, &role)?;
                granted_scopes(req.scope.as_deref(), &role, Some(client.scopes.as_slice()))?;
                target = Some((resource, role));
                Ok(())
            })
            .await?;
        let Some((resource, role)) = target else {
            return Err(OAuthError::ServerError);
        };
        let p = Principal::Workload {
            name: client.workload.clone(),
            identity: Box::new(Proven {
                method: "oauth_client",
                issuer: "oauth".into(),
                attributes: [("client_id".to_owned(), client.client_id.clone())].into(),
            }),
        };
        let (mut subject, role) = self
            .token_task(
                p,
                role,
                &resource,
                &mut req,
                Some(client.scopes.clone()),
                &[],
            )
            .await?;
        subject.client_id = Some(client.client_id.clone());
        self.grant_in_own_task(
            subject,
            &req,
            "client_credentials",
            &resource,
            role,
            Vec::new(),
        )
        .await
    }

    /// The registered client whose `private_key_jwt` assertion this request
    /// carries. Every refusal is `invalid_client` (401) with a description
    /// that names the check, never the client's values; refusals are
    /// audited (`auth.failed`, bounded as for bad tokens).
    async fn authenticate_client(
        &self,
        req: &TokenRequest,
        before_spending: impl FnOnce(&OAuthClient) -> Result<(), OAuthError>,
    ) -> Result<OAuthClient, OAuthError> {
        match self.client_assertion(req, before_spending).await {
            Ok(c) => Ok(c),
            Err(e @ OAuthError::InvalidClient(_)) => {
                let ev = AuditDraft::new(self.now(), "auth.failed", "oauth_client".to_owned())
                    .outcome(Outcome::Denied)
                    .reason(e.to_string())
                    .data("credential", "private_key_jwt")
                    .data("grant_type", GRANT_CLIENT_CREDENTIALS);
                self.record_auth_failure(ev, "oauth_client").await;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// The client, once its assertion verified and `before_spending` (the
    /// request's own checks) passed; then the assertion is used up.
    async fn client_assertion(
        &self,
        req: &TokenRequest,
        before_spending: impl FnOnce(&OAuthClient) -> Result<(), OAuthError>,
    ) -> Result<OAuthClient, OAuthError> {
        let refused = |m: &str| OAuthError::InvalidClient(m.to_owned());
        match req.client_assertion_type.as_deref() {
            Some(CLIENT_ASSERTION_JWT) => {}
            Some(_) => return Err(refused("`client_assertion_type` must be jwt-bearer")),
            None => {
                return Err(refused(
                    "the client must authenticate with `private_key_jwt`",
                ));
            }
        }
        let assertion = req
            .client_assertion
            .as_deref()
            .ok_or_else(|| refused("`client_assertion` is required"))?;
        if assertion.len() > MAX_TOKEN {
            return Err(refused("`client_assertion` is too long"));
        }
        // Which client: the unverified `iss`, only to pick its keys.
        let unverified = keymint_identity::jws::peek_claims(assertion)
            .map_err(|_| refused("client authentication failed"))?;
        let named = unverified.get("iss").and_then(Value::as_str).unwrap_or("");
        let clients = self.oauth_clients();
        // Unknown client and wrong key read the same.
        let client = clients
            .iter()
            .find(|c| c.client_id == named)
            .ok_or_else(|| refused("client authentication failed"))?;
        let v = keymint_identity::jws::verify_with_set(assertion, &client.jwks)
            .map_err(|_| refused("client authentication failed"))?;
        let c = &v.claims;
        let s = |k: &str| c.get(k).and_then(Value::as_str);
        if s("iss") != Some(client.client_id.as_str())
            || s("sub") != Some(client.client_id.as_str())
        {
            return Err(refused(
                "the assertion's `iss` and `sub` must be the client",
            ));
        }
        if req
            .client_id
            .as_deref()
            .is_some_and(|id| id != client.client_id)
        {
            return Err(refused("`client_id` is not the assertion's client"));
        }
        let issuer = self
            .oidc()
            .map(|i| i.url().to_owned())
            .ok_or_else(|| OAuthError::Unavailable("no `[issuer]`".into()))?;
        let endpoint = self.token_endpoint().unwrap_or_default();
        let names_us = |a: &str| a == endpoint || a == issuer;
        let aud_ok = match c.get("aud") {
            Some(Value::String(a)) => names_us(a),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).any(names_us),
            _ => false,
        };
        if !aud_ok {
            return Err(refused(
                "the assertion's `aud` must name the token endpoint or the issuer",
            ));
        }
        let now = self.now();
        let secs = now.unix_seconds();
        // NumericDates as the workload verifier reads them: a fraction is
        // floored (RFC 7519 §2 allows one; read as integers only, an
        // assertion signed with a fractional `exp` was refused as having
        // none).
        let date = |k: &'static str| keymint_identity::jws::numeric_date(c, k);
        let exp = date("exp")
            .ok()
            .flatten()
            .ok_or_else(|| refused("the assertion needs an `exp`"))?;
        if exp <= secs {
            return Err(refused("the assertion has expired"));
        }
        if exp - secs > MAX_ASSERTION_LIFE_SECS {
            return Err(refused("the assertion's `exp` is too far ahead"));
        }
        for k in ["iat", "nbf"] {
            match date(k) {
                Ok(None) => {}
                Ok(Some(t)) if t <= secs + SKEW_SECS => {}
                Ok(Some(_)) => return Err(refused("the assertion is not valid yet")),
                Err(_) => {
                    return Err(refused(
                        "the assertion's `iat` and `nbf` must be NumericDates",
                    ));
                }
            }
        }
        let jti = s("jti")
            .filter(|j| !j.is_empty() && j.len() <= 256)
            .ok_or_else(|| refused("the assertion needs a `jti`"))?;
        before_spending(client)?;
        // Single use, on every replica, until it could no longer be valid.
        let key = self
            .keyring
            .fingerprint(format!("client-assertion\n{}\n{jti}", client.client_id).as_bytes());
        let until = Timestamp::from_millis(exp.saturating_add(SKEW_SECS).saturating_mul(1000));
        let fresh = self
            .store
            .claim_once(&key, until, now)
            .await
            .map_err(|_| OAuthError::Unavailable("the store cannot write now".into()))?;
        if !fresh {
            return Err(refused("the assertion was already used"));
        }
        Ok(client.clone())
    }
}
