//! Provider federation (docs/design/0028-provider-federation.md): keymint
//! signs a JWT with its OIDC issuer's key and trades it at the provider's
//! token endpoint for the provider's own short-lived access token, so no
//! long-lived provider key exists anywhere, keymint's included.
//!
//! - [`FederationEngine`]: `federated` roles, a token per lease for the
//!   task's workload (`sub` the workload, `exp` never past the task's end).
//!   Expire-only: a provider's access token cannot be recalled, and the
//!   token's own expiry is checked against the task's end.
//! - [`FederatedTokens`]: the tokens keymint itself holds for egress-proxy
//!   upstreams that have no static key (`[upstreams.federation]`), refreshed
//!   before they expire, one exchange at a time per upstream, each under a
//!   deadline, and failing fast for a moment after a failed exchange so an
//!   outage answers 503 at once instead of queueing every request.
//!
//! Requests follow each provider's documentation: OpenAI, RFC 8693 in JSON
//! (`identity_provider_id`, `service_account_id`); Anthropic, RFC 7523
//! `jwt-bearer` in JSON with its `anthropic-beta` header
//! (`federation_rule_id`, `organization_id`, `service_account_id`,
//! `workspace_id`); OpenRouter, RFC 8693 form-encoded
//! (`federation_policy_id`). Every answer is the RFC 6749 §5.1 shape:
//! `access_token`, `token_type`, `expires_in`.
//!
//! Errors name the provider, the step, the HTTP status and (when it is a
//! plain name) the OAuth `error` code: never the provider's body, the JWT or
//! a token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use keymint_client::http::{HttpClient, HttpError};
use keymint_core::model::{Lease, Revocability};
use keymint_core::role::{EngineKind, FederatedProvider, Federation, RoleKind};
use keymint_core::{Clock, Timestamp};
use keymint_issuer::Issuer;
use keymint_proto::{Credential, SecretString};
use serde_json::{Map, Value, json};
use zeroize::Zeroizing;

use crate::{Engine, EngineError, IssueContext, Prepared};

/// The largest token endpoint answer read.
const MAX_ANSWER: usize = 64 * 1024;
/// The longest access token accepted (it goes into a header).
const MAX_TOKEN: usize = 8192;
/// OpenAI's and OpenRouter's RFC 8693 grant.
pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// Anthropic's RFC 7523 grant.
pub const GRANT_JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const TOKEN_TYPE_ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";
/// The beta flags Anthropic's SDK sends on a `jwt-bearer` exchange.
pub const ANTHROPIC_EXCHANGE_BETA: &str = "oauth-2025-04-20,oidc-federation-2026-04-01";
/// The beta flag Anthropic requires beside a federated bearer token.
pub const ANTHROPIC_OAUTH_BETA: &str = "oauth-2025-04-20";
/// How far a provider's clock may run ahead of keymint's when it reports
/// a token's life.
const CLOCK_SKEW_SECS: i64 = 60;

/// A provider's access token and how long it lives.
#[derive(Debug)]
pub struct Exchanged {
    pub access_token: SecretString,
    pub expires_in: u64,
}

/// The OAuth `error` of a refusal, if it is a plain name.
fn oauth_error(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            // RFC 6749 `error`, or Anthropic's `{"error": {"type": …}}`.
            v.get("error")
                .and_then(|e| e.as_str().or_else(|| e.get("type").and_then(Value::as_str)))
                .map(str::to_owned)
        })
        .filter(|c| {
            !c.is_empty()
                && c.len() <= 64
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        })
        .unwrap_or_else(|| "no error code".into())
}

/// Reads an RFC 6749 §5.1 answer.
pub fn parse_answer(body: &[u8]) -> Option<Exchanged> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let token = v.get("access_token")?.as_str()?;
    if token.is_empty()
        || token.len() > MAX_TOKEN
        || !token.bytes().all(|b| (0x21..0x7f).contains(&b))
    {
        return None;
    }
    if let Some(t) = v.get("token_type")
        && !t.as_str().is_some_and(|t| t.eq_ignore_ascii_case("bearer"))
    {
        return None;
    }
    let expires_in = v.get("expires_in")?;
    let expires_in = expires_in
        .as_u64()
        .or_else(|| expires_in.as_f64().filter(|f| *f >= 1.0).map(|f| f as u64))?;
    if expires_in == 0 {
        return None;
    }
    Some(Exchanged {
        access_token: SecretString::new(token.to_owned()),
        expires_in,
    })
}

/// The request each provider documents, for `jwt`.
fn exchange_request(f: &Federation, jwt: &str) -> Result<http::Request<Bytes>, EngineError> {
    let p = f.provider;
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    let (content_type, body) = match p {
        FederatedProvider::Openai => (
            "application/json",
            serde_json::to_vec(&json!({
                "grant_type": GRANT_TOKEN_EXCHANGE,
                "subject_token_type": TOKEN_TYPE_JWT,
                "subject_token": jwt,
                "identity_provider_id": opt(&f.identity_provider_id),
                "service_account_id": opt(&f.service_account_id),
            })),
        ),
        FederatedProvider::Anthropic => {
            let mut b = json!({
                "grant_type": GRANT_JWT_BEARER,
                "assertion": jwt,
                "federation_rule_id": opt(&f.federation_rule_id),
                "organization_id": opt(&f.organization_id),
                "service_account_id": opt(&f.service_account_id),
            });
            if let Some(w) = &f.workspace_id {
                b["workspace_id"] = json!(w);
            }
            ("application/json", serde_json::to_vec(&b))
        }
        FederatedProvider::Openrouter => {
            let form = serde_urlencoded::to_string([
                ("grant_type", GRANT_TOKEN_EXCHANGE),
                ("subject_token_type", TOKEN_TYPE_JWT),
                ("subject_token", jwt),
                ("requested_token_type", TOKEN_TYPE_ACCESS),
                (
                    "federation_policy_id",
                    f.federation_policy_id.as_deref().unwrap_or_default(),
                ),
            ])
            .map_err(|_| EngineError::Internal(format!("{p}: cannot encode the exchange")))?;
            ("application/x-www-form-urlencoded", Ok(form.into_bytes()))
        }
    };
    let body = Zeroizing::new(
        body.map_err(|_| EngineError::Internal(format!("{p}: cannot encode the exchange")))?,
    );
    let mut req = http::Request::post(f.token_url())
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::ACCEPT, "application/json");
    if p == FederatedProvider::Anthropic {
        req = req.header("anthropic-beta", ANTHROPIC_EXCHANGE_BETA);
    }
    req.body(Bytes::from(body.to_vec()))
        .map_err(|_| EngineError::Internal(format!("{p}: the token URL is not valid")))
}

/// Trades `jwt` for the provider's access token.
pub async fn exchange(
    http: &HttpClient,
    f: &Federation,
    jwt: &str,
) -> Result<Exchanged, EngineError> {
    let p = f.provider;
    let req = exchange_request(f, jwt)?;
    let timeout = Duration::from_secs(f.timeout_secs());
    let res = http
        .with_timeout(timeout)
        .send(req)
        .await
        .map_err(|e| match e {
            HttpError::Timeout => EngineError::Unavailable(format!(
                "{p}: token exchange: no answer within {} s",
                timeout.as_secs()
            )),
            HttpError::TooLarge(_) => {
                EngineError::Unavailable(format!("{p}: token exchange: answer too large"))
            }
            HttpError::Transport(_) | HttpError::Config(_) => EngineError::Unavailable(format!(
                "{p}: token exchange: cannot reach the token endpoint"
            )),
        })?;
    let status = res.status.as_u16();
    if res.status.is_server_error() || status == 429 {
        return Err(EngineError::Unavailable(format!(
            "{p}: token exchange: HTTP {status}"
        )));
    }
    if !res.status.is_success() {
        return Err(EngineError::Rejected(format!(
            "{p} refused the token exchange: HTTP {status} ({})",
            oauth_error(&res.body)
        )));
    }
    parse_answer(&res.body).ok_or_else(|| {
        EngineError::Unavailable(format!(
            "{p}: token exchange: the answer is not the documented shape"
        ))
    })
}

fn http_client() -> Result<HttpClient, String> {
    HttpClient::builder()
        .timeout(Duration::from_secs(
            keymint_core::federation::DEFAULT_EXCHANGE_TIMEOUT_SECS,
        ))
        .connect_timeout(Duration::from_secs(5))
        .max_body(MAX_ANSWER)
        .build()
        .map_err(|e| format!("cannot build the token exchange client: {e}"))
}

/// `federated` roles: a provider token per lease.
#[derive(Debug)]
pub struct FederationEngine {
    issuer: Arc<Issuer>,
    http: HttpClient,
    clock: Arc<dyn Clock>,
}

impl FederationEngine {
    pub fn new(issuer: Arc<Issuer>, clock: Arc<dyn Clock>) -> Result<Self, String> {
        Ok(Self {
            issuer,
            http: http_client()?,
            clock,
        })
    }
}

fn federation<'a>(ctx: &'a IssueContext<'_>) -> Result<&'a Federation, EngineError> {
    match &ctx.role.kind {
        RoleKind::Federated(f) => Ok(f),
        _ => Err(ctx.not_for(EngineKind::Federated)),
    }
}

/// Whether a token that lives `expires_in` seconds from `now` dies by
/// `end` (give or take the providers' clocks).
pub fn fits(now: Timestamp, expires_in: u64, end: Timestamp) -> bool {
    let exp = now
        .unix_seconds()
        .saturating_add(i64::try_from(expires_in).unwrap_or(i64::MAX));
    exp <= end.unix_seconds().saturating_add(CLOCK_SKEW_SECS)
}

#[async_trait]
impl Engine for FederationEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Federated
    }

    fn revocability(&self) -> Revocability {
        // A provider's access token cannot be recalled; its life is checked
        // against the task's end.
        Revocability::ExpireOnly
    }

    fn is_local(&self) -> bool {
        false
    }

    fn prepare(&self, ctx: &IssueContext<'_>) -> Result<Prepared, EngineError> {
        let f = federation(ctx)?;
        let s = crate::jwt::sign_workload_token(
            &self.issuer,
            ctx,
            std::slice::from_ref(&f.audience),
            f.algorithm,
            false,
        )?;
        Ok(Prepared {
            // Until the provider answers, the lease is known by the JWT.
            fingerprint_material: Zeroizing::new(s.token.as_bytes().to_vec()),
            engine_data: json!({
                "provider": f.provider.as_str(),
                "kid": s.kid,
                "sub": s.subject,
                "jwt_expires_at": s.expires_at.unix_seconds(),
            }),
            credential: Credential::Jwt {
                token: SecretString::new(s.token),
                issuer: self.issuer.url().to_owned(),
                subject: s.subject,
                audience: vec![f.audience.clone()],
                expires_at: s.expires_at.unix_seconds(),
            },
        })
    }

    async fn apply(&self, ctx: &IssueContext<'_>, prepared: &Prepared) -> Result<(), EngineError> {
        self.mint(ctx, prepared).await.map(|_| ())
    }

    async fn mint(
        &self,
        ctx: &IssueContext<'_>,
        prepared: &Prepared,
    ) -> Result<Option<Prepared>, EngineError> {
        let f = federation(ctx)?;
        let Credential::Jwt { token, .. } = &prepared.credential else {
            return Err(EngineError::Internal("no JWT to exchange".into()));
        };
        let got = exchange(&self.http, f, token.expose()).await?;
        let now = self.clock.now();
        // INVARIANT (DESIGN.md 1): an expire-only credential never outlives
        // its task. The provider sets the token's life; one that would
        // outlive the task is not handed out (it dies on its own).
        if !fits(now, got.expires_in, ctx.task.expires_at) {
            return Err(EngineError::Rejected(format!(
                "{}: the provider's token would live {} s, past the task's end: not handed out",
                f.provider, got.expires_in
            )));
        }
        let expires_at = u64::try_from(now.unix_seconds())
            .unwrap_or(0)
            .saturating_add(got.expires_in);
        tracing::info!(
            lease = ctx.lease_id,
            provider = %f.provider,
            expires_in = got.expires_in,
            "provider issued a federated access token"
        );
        let mut engine_data = prepared.engine_data.clone();
        engine_data["token_expires_at"] = json!(expires_at);
        Ok(Some(Prepared {
            fingerprint_material: Zeroizing::new(got.access_token.expose().as_bytes().to_vec()),
            credential: Credential::ProviderToken {
                provider: f.provider,
                access_token: got.access_token,
                base_url: f.api_base_url().to_owned(),
                expires_at,
            },
            engine_data,
        }))
    }

    async fn revoke(&self, _lease: &Lease) -> Result<(), EngineError> {
        // Nothing to call: the token dies at its own expiry, which was
        // checked against the task's end.
        Ok(())
    }
}

/// A token keymint holds for an upstream, and when to replace it.
struct Cached {
    token: Arc<Zeroizing<String>>,
    expires_at: Timestamp,
    refresh_at: Timestamp,
}

#[derive(Default)]
struct SlotState {
    cached: Option<Cached>,
    /// After a failed exchange, callers fail at once until then.
    failed_until: Option<(Timestamp, EngineError)>,
}

struct Slot {
    federation: Federation,
    subject: String,
    state: Mutex<SlotState>,
    /// One exchange at a time per upstream (single flight).
    exchanging: tokio::sync::Mutex<()>,
}

/// What [`FederatedTokens::token`] hands back.
#[derive(Debug)]
pub struct UpstreamToken {
    pub token: Arc<Zeroizing<String>>,
    /// Set when this call made a new exchange: the token's expiry.
    pub refreshed: Option<Timestamp>,
}

/// Why [`FederatedTokens::token`] has no token.
#[derive(Debug, Clone)]
pub struct TokenFailure {
    pub error: EngineError,
    /// `true` when this call made the exchange that failed; `false` when it
    /// failed fast on a recent failure.
    pub attempted: bool,
}

/// How long after a failed exchange callers fail at once.
const FAIL_FAST_MS: i64 = 2_000;
/// Life of the JWT keymint signs for itself (the provider's token never
/// outlives it at OpenRouter).
const SELF_TOKEN_SECS: u64 = 15 * 60;
/// Tokens are replaced when this little of their life is left, or at two
/// thirds of it, whichever comes first.
const REFRESH_MARGIN_SECS: i64 = 60;

/// The access tokens of egress-proxy upstreams without a static key.
pub struct FederatedTokens {
    issuer: Arc<Issuer>,
    http: HttpClient,
    clock: Arc<dyn Clock>,
    slots: HashMap<String, Slot>,
}

impl std::fmt::Debug for FederatedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FederatedTokens")
            .field("upstreams", &self.slots.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl FederatedTokens {
    /// `upstreams`: each upstream's name and its federation settings.
    pub fn new(
        issuer: Arc<Issuer>,
        clock: Arc<dyn Clock>,
        upstreams: Vec<(String, Federation)>,
    ) -> Result<Self, String> {
        let slots = upstreams
            .into_iter()
            .map(|(name, federation)| {
                let subject = federation
                    .subject
                    .clone()
                    .unwrap_or_else(|| format!("keymint-proxy/{name}"));
                (
                    name,
                    Slot {
                        federation,
                        subject,
                        state: Mutex::new(SlotState::default()),
                        exchanging: tokio::sync::Mutex::new(()),
                    },
                )
            })
            .collect();
        Ok(Self {
            issuer,
            http: http_client()?,
            clock,
            slots,
        })
    }

    pub fn has(&self, upstream: &str) -> bool {
        self.slots.contains_key(upstream)
    }

    /// A token still good for use at `now`, if one is cached (`fresh`: not
    /// yet due for replacement).
    fn cached(slot: &Slot, now: Timestamp, fresh: bool) -> Option<Arc<Zeroizing<String>>> {
        let st = slot.state.lock().unwrap_or_else(|p| p.into_inner());
        st.cached
            .as_ref()
            .filter(|c| {
                if fresh {
                    now < c.refresh_at
                } else {
                    now.plus_secs(5) < c.expires_at
                }
            })
            .map(|c| Arc::clone(&c.token))
    }

    /// The access token for `upstream`: the cached one while it is fresh,
    /// else a new exchange (one at a time; the others wait for it and
    /// share its result). While a refresh fails, a cached token that has
    /// not expired is still used; without one the call fails.
    pub async fn token(&self, upstream: &str) -> Result<UpstreamToken, TokenFailure> {
        let slot = self.slots.get(upstream).ok_or_else(|| TokenFailure {
            error: EngineError::Internal(format!("upstream `{upstream}` has no federation")),
            attempted: false,
        })?;
        if let Some(t) = Self::cached(slot, self.clock.now(), true) {
            return Ok(UpstreamToken {
                token: t,
                refreshed: None,
            });
        }
        let _one = slot.exchanging.lock().await;
        let now = self.clock.now();
        // Another caller may have refreshed while this one waited.
        if let Some(t) = Self::cached(slot, now, true) {
            return Ok(UpstreamToken {
                token: t,
                refreshed: None,
            });
        }
        let failed = {
            let st = slot.state.lock().unwrap_or_else(|p| p.into_inner());
            st.failed_until
                .as_ref()
                .filter(|(until, _)| now < *until)
                .map(|(_, e)| e.clone())
        };
        if let Some(e) = failed {
            return Self::cached(slot, now, false)
                .map(|t| UpstreamToken {
                    token: t,
                    refreshed: None,
                })
                .ok_or(TokenFailure {
                    error: e,
                    attempted: false,
                });
        }
        match self.exchange_for(slot, now).await {
            Ok(c) => {
                let token = Arc::clone(&c.token);
                let expires_at = c.expires_at;
                let mut st = slot.state.lock().unwrap_or_else(|p| p.into_inner());
                st.cached = Some(c);
                st.failed_until = None;
                Ok(UpstreamToken {
                    token,
                    refreshed: Some(expires_at),
                })
            }
            Err(e) => {
                {
                    let mut st = slot.state.lock().unwrap_or_else(|p| p.into_inner());
                    st.failed_until = Some((now.plus_millis(FAIL_FAST_MS), e.clone()));
                }
                match Self::cached(slot, now, false) {
                    Some(t) => {
                        tracing::warn!(upstream, error = %e, "federated token refresh failed; the current token is still valid");
                        Ok(UpstreamToken {
                            token: t,
                            refreshed: None,
                        })
                    }
                    None => Err(TokenFailure {
                        error: e,
                        attempted: true,
                    }),
                }
            }
        }
    }

    async fn exchange_for(&self, slot: &Slot, now: Timestamp) -> Result<Cached, EngineError> {
        let f = &slot.federation;
        let mut jti = [0u8; 16];
        getrandom::fill(&mut jti)
            .map_err(|_| EngineError::Internal("no randomness for the token id".into()))?;
        let jti: String = jti.iter().map(|b| format!("{b:02x}")).collect();
        let mut c = Map::new();
        c.insert("iss".into(), Value::String(self.issuer.url().to_owned()));
        c.insert("sub".into(), Value::String(slot.subject.clone()));
        c.insert("aud".into(), Value::String(f.audience.clone()));
        let exp = now.plus_secs(SELF_TOKEN_SECS);
        c.insert("exp".into(), exp.unix_seconds().into());
        c.insert("iat".into(), now.unix_seconds().into());
        c.insert(
            "nbf".into(),
            now.unix_seconds()
                .saturating_sub(i64::try_from(crate::jwt::NOT_BEFORE_SKEW_SECS).unwrap_or(0))
                .into(),
        );
        c.insert("jti".into(), Value::String(jti));
        let jwt = Zeroizing::new(self.issuer.sign(f.algorithm, &c, now).map_err(|_| {
            EngineError::Internal(format!(
                "the issuer cannot sign with {} (add it to `[issuer] algorithms`)",
                f.algorithm
            ))
        })?);
        let got = exchange(&self.http, f, &jwt).await?;
        let life = i64::try_from(got.expires_in).unwrap_or(i64::MAX);
        let after = self.clock.now();
        let expires_at = after.plus_secs(got.expires_in);
        // Replace at two thirds of the life, or a minute before the end.
        let refresh_in = (life.saturating_mul(2) / 3).min(life - REFRESH_MARGIN_SECS.min(life / 2));
        let refresh_at = after.plus_secs(u64::try_from(refresh_in.max(1)).unwrap_or(1));
        Ok(Cached {
            token: Arc::new(Zeroizing::new(got.access_token.expose().to_owned())),
            expires_at,
            refresh_at,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn answers_are_read_and_bad_ones_refused() {
        let ok = br#"{"access_token":"sk-ant-oat01-fake","token_type":"Bearer","expires_in":600,"scope":"x"}"#;
        let e = parse_answer(ok).unwrap();
        assert_eq!(e.access_token.expose(), "sk-ant-oat01-fake");
        assert_eq!(e.expires_in, 600);
        // Without token_type (OpenAI's SDK reads only these two).
        assert!(parse_answer(br#"{"access_token":"t","expires_in":900}"#).is_some());
        for bad in [
            &br#"{"access_token":"t","token_type":"mac","expires_in":600}"#[..],
            br#"{"access_token":"","expires_in":600}"#,
            br#"{"access_token":"a b","expires_in":600}"#,
            br#"{"access_token":"a\r\nx: y","expires_in":600}"#,
            br#"{"access_token":"t","expires_in":0}"#,
            br#"{"access_token":"t","expires_in":"600"}"#,
            br#"{"access_token":"t"}"#,
            br#"[]"#,
            b"not json",
        ] {
            assert!(
                parse_answer(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn refusals_name_the_code_never_the_text() {
        assert_eq!(
            oauth_error(br#"{"error":"invalid_grant","error_description":"eyJ.."}"#),
            "invalid_grant"
        );
        assert_eq!(
            oauth_error(
                br#"{"type":"error","error":{"type":"authentication_error","message":"m"}}"#
            ),
            "authentication_error"
        );
        assert_eq!(
            oauth_error(br#"{"error":"sk-live secret"}"#),
            "no error code"
        );
        assert_eq!(oauth_error(b"<html>"), "no error code");
    }

    #[test]
    fn a_token_may_not_outlive_the_task() {
        let now = Timestamp::from_millis(1_800_000_000_000);
        assert!(fits(now, 600, now.plus_secs(600)));
        assert!(fits(now, 660, now.plus_secs(600)));
        assert!(!fits(now, 661, now.plus_secs(600)));
        assert!(!fits(now, u64::MAX, now.plus_secs(600)));
    }

    fn fed(p: FederatedProvider) -> Federation {
        Federation {
            provider: p,
            audience: "aud".into(),
            algorithm: keymint_core::role::SigningAlg::RS256,
            token_url: None,
            api_base_url: None,
            identity_provider_id: Some("idp_1".into()),
            service_account_id: Some("svc_1".into()),
            federation_rule_id: Some("fdrl_1".into()),
            organization_id: Some("org".into()),
            workspace_id: None,
            federation_policy_id: Some("pol".into()),
            subject: None,
            timeout_secs: None,
        }
    }

    #[test]
    fn requests_follow_each_providers_documentation() {
        let r = exchange_request(&fed(FederatedProvider::Openai), "J.W.T").unwrap();
        assert_eq!(r.uri(), "https://auth.openai.com/oauth/token");
        let b: Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(b["grant_type"], GRANT_TOKEN_EXCHANGE);
        assert_eq!(b["subject_token_type"], TOKEN_TYPE_JWT);
        assert_eq!(b["subject_token"], "J.W.T");
        assert_eq!(b["identity_provider_id"], "idp_1");
        assert_eq!(b["service_account_id"], "svc_1");

        let r = exchange_request(&fed(FederatedProvider::Anthropic), "J.W.T").unwrap();
        assert_eq!(r.uri(), "https://api.anthropic.com/v1/oauth/token");
        assert_eq!(r.headers()["anthropic-beta"], ANTHROPIC_EXCHANGE_BETA);
        let b: Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(b["grant_type"], GRANT_JWT_BEARER);
        assert_eq!(b["assertion"], "J.W.T");
        assert_eq!(b["federation_rule_id"], "fdrl_1");
        assert!(b.get("workspace_id").is_none());

        let r = exchange_request(&fed(FederatedProvider::Openrouter), "J.W.T").unwrap();
        assert_eq!(r.uri(), "https://openrouter.ai/api/v1/oauth/token");
        assert_eq!(
            r.headers()[http::header::CONTENT_TYPE],
            "application/x-www-form-urlencoded"
        );
        let form: HashMap<String, String> = serde_urlencoded::from_bytes(r.body()).unwrap();
        assert_eq!(form["grant_type"], GRANT_TOKEN_EXCHANGE);
        assert_eq!(form["subject_token"], "J.W.T");
        assert_eq!(form["federation_policy_id"], "pol");
    }
}
