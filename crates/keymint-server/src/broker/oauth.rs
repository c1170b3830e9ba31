//! The OAuth 2 token service (docs/design/0026-oauth-token-service.md):
//! RFC 8693 token exchange into RFC 9068 access tokens, audience-bound to a
//! resource (RFC 8707), tied to a task, optionally bound to a DPoP key
//! (RFC 9449); their introspection (RFC 7662) and revocation (RFC 7009).
//!
//! An access token is a lease: recorded (with its fingerprint, never the
//! token) in the task of the token it was exchanged from, under the `jwt`
//! role whose `audience` names the resource. So ending the task revokes it,
//! introspection answers from the lease, and the audit trail has it like any
//! other credential. The role is the resource's template: its scopes are
//! the most a token for the resource can carry, its TTLs the longest.

use keymint_core::audit::AuditDraft;
use keymint_core::model::{Lease, LeaseState, Revocability, Role, Task};
use keymint_core::role::{EngineKind, RoleKind, SigningAlg};
use keymint_core::rules::RuleError;
use keymint_core::token::{self, TokenKind};
use keymint_core::{Timestamp, id};
use keymint_policy::{Action, OAuthFacts, Verdict};
use keymint_store::LeaseSelector;
use serde_json::{Map, Value};

use super::{Broker, BrokerError, Principal};

/// RFC 8693 token type URIs.
pub const TT_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
pub const TT_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
/// The grant types.
pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const GRANT_JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
pub const GRANT_CLIENT_CREDENTIALS: &str = "client_credentials";
/// keymint's subject token type for an mTLS caller: `subject_token` is the
/// SPIFFE ID of the X.509-SVID the connection was authenticated with.
pub const TT_X509_SVID: &str = "urn:keymint:params:oauth:token-type:x509-svid";
/// The `typ` of an RFC 9068 access token.
pub const AT_JWT: &str = "at+jwt";
/// Longest accepted token string (subject, actor).
pub(super) const MAX_TOKEN: usize = 16 * 1024;
/// Most tokens one access token may have been exchanged from in a row
/// (each is looked up when the token is checked).
pub(super) const MAX_EXCHANGES: usize = 16;
/// Most scopes in one request, and the longest scope.
const MAX_SCOPES: usize = 64;
const MAX_SCOPE_LEN: usize = 128;

/// An RFC 6749 §5.2 error. The description never carries the caller's
/// values, only what was wrong with which parameter.
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    InvalidGrant(String),
    #[error("{0}")]
    InvalidScope(String),
    #[error("{0}")]
    InvalidTarget(String),
    #[error("grant type not supported")]
    UnsupportedGrantType,
    #[error("{0}")]
    InvalidClient(String),
    #[error("{0}")]
    InvalidDpopProof(String),
    /// The DPoP proof must carry the nonce the server hands out.
    #[error("the DPoP proof must carry the server's nonce")]
    UseDpopNonce,
    #[error("{0}")]
    AccessDenied(String),
    /// Policy holds the request for a human: ask again with `approval`.
    #[error("held for approval")]
    AuthorizationPending { approval: String },
    #[error("{0}")]
    Unavailable(String),
    #[error("the token service failed")]
    ServerError,
    /// The form is larger than the endpoint reads: `invalid_request`,
    /// answered with 413.
    #[error("the body exceeds {limit} bytes")]
    BodyTooLarge { limit: usize },
}

impl OAuthError {
    /// The RFC 6749 / 8693 / 8707 / 9449 `error` code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) | Self::BodyTooLarge { .. } => "invalid_request",
            Self::InvalidGrant(_) => "invalid_grant",
            Self::InvalidScope(_) => "invalid_scope",
            Self::InvalidTarget(_) => "invalid_target",
            Self::UnsupportedGrantType => "unsupported_grant_type",
            Self::InvalidClient(_) => "invalid_client",
            Self::InvalidDpopProof(_) => "invalid_dpop_proof",
            Self::UseDpopNonce => "use_dpop_nonce",
            Self::AccessDenied(_) => "access_denied",
            Self::AuthorizationPending { .. } => "authorization_pending",
            Self::Unavailable(_) => "temporarily_unavailable",
            Self::ServerError => "server_error",
        }
    }
}

pub(super) fn bad(m: &str) -> OAuthError {
    OAuthError::InvalidRequest(m.to_owned())
}

/// A token request, parsed from the form. Only what the grant needs is
/// read; unknown parameters are ignored (RFC 6749 §3.2).
#[derive(Debug, Default, Clone)]
pub struct TokenRequest {
    pub grant_type: String,
    pub subject_token: Option<String>,
    pub subject_token_type: Option<String>,
    pub actor_token: Option<String>,
    pub actor_token_type: Option<String>,
    /// RFC 8707 `resource` (or RFC 8693 `audience`): exactly one.
    pub resources: Vec<String>,
    pub scope: Option<String>,
    /// The lifetime asked for, in seconds (`requested_lifetime`); at most
    /// what the subject and the role allow, else refused.
    pub lifetime_secs: Option<u64>,
    /// The thumbprint of the DPoP key that proved possession on this
    /// request (checked by the HTTP layer), to bind the token to.
    pub dpop_jkt: Option<String>,
    /// A held request approved by a human, asked again.
    pub approval: Option<String>,
    /// RFC 7523: the JWT used as the grant.
    pub assertion: Option<String>,
    /// RFC 7523 §2.2 client authentication (`private_key_jwt`).
    pub client_id: Option<String>,
    pub client_assertion: Option<String>,
    pub client_assertion_type: Option<String>,
    /// The SPIFFE ID of the X.509-SVID the TLS layer verified on this
    /// connection (mTLS), set by the HTTP layer, never from the form.
    pub peer_svid: Option<String>,
    /// Set by a grant once it redeemed an approval for this request (the
    /// token's decision then has `context.approved`); never from the form.
    pub approved: bool,
}

/// A token issued.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub issued_token_type: &'static str,
    /// `Bearer`, or `DPoP` for a token bound to a key.
    pub token_type: &'static str,
    pub expires_in: i64,
    pub scope: String,
}

/// What an exchange starts from: the task the token will live in, who is
/// asking (for policy and approvals), and what the subject allows.
pub(super) struct Subject {
    principal: Principal,
    /// The registered client the token is issued to (`client_credentials`);
    /// otherwise the workload is the client.
    pub(super) client_id: Option<String>,
    task: Task,
    /// The most the new token may carry: scopes, audiences (`None`: any
    /// resource), end.
    scopes: Option<Vec<String>>,
    audiences: Option<Vec<String>>,
    ends_at: Timestamp,
    /// The actors so far (oldest first).
    actors: Vec<String>,
    /// A DPoP-bound subject must be exchanged with a proof of its key.
    jkt: Option<String>,
}

/// A verified keymint access token and the lease behind it.
#[derive(Debug)]
pub struct AccessToken {
    pub claims: Map<String, Value>,
    pub lease: Lease,
    pub task: Task,
}

impl Broker {
    fn oauth_issuer(&self) -> Result<&std::sync::Arc<keymint_issuer::Issuer>, OAuthError> {
        self.oidc().ok_or_else(|| {
            OAuthError::Unavailable(
                "this server has no `[issuer]`: it issues no access tokens".into(),
            )
        })
    }

    /// The token endpoint's URL: the issuer's URL + `/oauth/token`.
    pub fn token_endpoint(&self) -> Option<String> {
        self.oidc()
            .map(|i| format!("{}/oauth/token", i.url().trim_end_matches('/')))
    }

    /// RFC 8414 authorization server metadata.
    pub fn oauth_metadata(&self) -> Option<Value> {
        let i = self.oidc()?;
        let base = i.url().trim_end_matches('/');
        let algs: Vec<&str> = i.settings().algorithms.iter().map(|a| a.as_str()).collect();
        Some(serde_json::json!({
            "issuer": i.url(),
            "token_endpoint": format!("{base}/oauth/token"),
            "revocation_endpoint": format!("{base}/oauth/revoke"),
            "introspection_endpoint": format!("{base}/v1/introspect"),
            "jwks_uri": i.jwks_uri(),
            "grant_types_supported": [GRANT_TOKEN_EXCHANGE, GRANT_JWT_BEARER, GRANT_CLIENT_CREDENTIALS],
            // `none` for workloads (their grant is their proof);
            // `private_key_jwt` for registered clients.
            "token_endpoint_auth_methods_supported": ["none", "private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["ES256", "EdDSA", "RS256"],
            "revocation_endpoint_auth_methods_supported": ["none"],
            "introspection_endpoint_auth_methods_supported": ["bearer"],
            "response_types_supported": [],
            "scopes_supported": self.oauth_scopes(),
            "dpop_signing_alg_values_supported": ["ES256", "EdDSA", "RS256"],
            "access_token_signing_alg_values_supported": algs,
        }))
    }

    fn oauth_scopes(&self) -> Vec<String> {
        let mut s: Vec<String> = self
            .roles
            .values()
            .filter(|r| matches!(r.kind, RoleKind::Jwt(_)))
            .flat_map(|r| r.scopes.iter().cloned())
            .collect();
        s.sort();
        s.dedup();
        s
    }

    /// The `jwt` role that is the template for tokens to `resource`: the
    /// one whose `audience` names it. Two roles naming one resource would
    /// make the answer depend on order, so that is refused as a target.
    pub(super) fn resource_role(&self, resource: &str) -> Result<Role, OAuthError> {
        let mut found = self.roles.values().filter(|r| match &r.kind {
            RoleKind::Jwt(j) => !j.spiffe && j.audience.iter().any(|a| a == resource),
            _ => false,
        });
        match (found.next(), found.next()) {
            (Some(r), None) => Ok(r.clone()),
            (Some(_), Some(_)) => {
                tracing::warn!("two jwt roles name one resource; tokens for it are refused");
                Err(OAuthError::InvalidTarget(
                    "the resource is not served by one role".into(),
                ))
            }
            (None, _) => Err(OAuthError::InvalidTarget("unknown resource".into())),
        }
    }

    /// RFC 8693 token exchange: a `kmt_` task token or a keymint access
    /// token for an access token to one resource, never wider than the
    /// subject: its scopes, audience and end only narrow.
    pub async fn token(&self, req: TokenRequest) -> Result<TokenResponse, OAuthError> {
        let authenticates = req.client_assertion.is_some() || req.client_assertion_type.is_some();
        match req.grant_type.as_str() {
            GRANT_CLIENT_CREDENTIALS => self.client_credentials(req).await,
            // Refused, not ignored: a client that authenticates expects
            // the grant to be bound to it.
            GRANT_TOKEN_EXCHANGE | GRANT_JWT_BEARER if authenticates => {
                Err(OAuthError::InvalidClient(
                    "client authentication is only taken with `client_credentials`".into(),
                ))
            }
            GRANT_TOKEN_EXCHANGE => self.exchange_token(req).await,
            GRANT_JWT_BEARER => self.jwt_bearer(req).await,
            _ => Err(OAuthError::UnsupportedGrantType),
        }
    }

    async fn exchange_token(&self, mut req: TokenRequest) -> Result<TokenResponse, OAuthError> {
        let resource = one_resource(&req.resources)?.to_owned();
        let resource = resource.as_str();
        let mut role = self.resource_role(resource)?;
        let mut own_task = false;
        let subject = match self.subject(&req).await? {
            Ok(s) => s,
            // A workload without a task (a workload JWT, an X.509-SVID):
            // the actor is checked first, so that a refused one starts
            // nothing; then a task of its own, as for jwt-bearer.
            Err(p) => {
                let actors: Vec<String> = self.actor(&req).await?.into_iter().collect();
                let (s, r) = self
                    .token_task(p, role, resource, &mut req, None, &actors)
                    .await?;
                (role, own_task) = (r, true);
                s
            }
        };
        if let Some(jkt) = &subject.jkt
            && req.dpop_jkt.as_deref() != Some(jkt.as_str())
        {
            return Err(OAuthError::InvalidGrant(
                "the subject token is bound to a DPoP key; prove it on this request".into(),
            ));
        }
        let mut actors = subject.actors.clone();
        if let Some(actor) = self.actor(&req).await? {
            if actors.len() >= keymint_core::rules::MAX_DELEGATION_DEPTH {
                return Err(OAuthError::InvalidGrant(
                    "the actor chain is too long".into(),
                ));
            }
            actors.push(actor);
        }
        if let Some(auds) = &subject.audiences
            && !auds.iter().any(|a| a == resource)
        {
            return Err(OAuthError::InvalidTarget(
                "the resource is outside the subject token's audience".into(),
            ));
        }
        if own_task {
            return self
                .grant_in_own_task(subject, &req, "token_exchange", resource, role, actors)
                .await;
        }
        self.grant_token(subject, &req, "token_exchange", resource, role, actors)
            .await
    }

    /// [`Broker::grant_token`] in a task [`Broker::token_task`] started for
    /// this token alone: if the token is refused (policy, a race with the
    /// task's end), the task is ended too rather than left empty.
    pub(super) async fn grant_in_own_task(
        &self,
        subject: Subject,
        req: &TokenRequest,
        grant: &'static str,
        resource: &str,
        role: Role,
        actors: Vec<String>,
    ) -> Result<TokenResponse, OAuthError> {
        let (task, actor) = (subject.task.id.clone(), subject.principal.actor());
        let r = self
            .grant_token(subject, req, grant, resource, role, actors)
            .await;
        if r.is_err()
            && let Err(e) = self
                .end_tree(
                    &task,
                    keymint_core::model::TaskStatus::Failed,
                    &actor,
                    Some("its access token was refused".into()),
                )
                .await
        {
            tracing::warn!(error = %e, "cannot end the task of a refused token");
        }
        r
    }

    /// A task of its own for a principal that has none (a jwt-bearer
    /// assertion's workload, a registered client, a workload JWT or
    /// X.509-SVID subject of an exchange): started through the usual
    /// `start_task` decision with the resource's role, as long as the
    /// token asked for. What would be refused anyway (scopes, lifetime) is
    /// refused before the task starts. A hold answers
    /// `authorization_pending`; asked again with `approval`, an approval of
    /// this grant, resource, scopes, lifetime and binding, held for the
    /// same workload, is used once and both decisions see
    /// `context.approved`. Returns the subject and the role with the
    /// task's lifetime as its default.
    pub(super) async fn token_task(
        &self,
        p: Principal,
        role: Role,
        resource: &str,
        req: &mut TokenRequest,
        allowed: Option<Vec<String>>,
        actors: &[String],
    ) -> Result<(Subject, Role), OAuthError> {
        let lifetime = own_task_lifetime(req, &role)?;
        let scopes = granted_scopes(req.scope.as_deref(), &role, allowed.as_deref())?;
        // The actor too (an exchange's): a redeemed approval approves the
        // token's own decision, which sees it.
        let held = serde_json::json!({
            "grant_type": req.grant_type,
            "resource": resource,
            "scopes": scopes,
            "lifetime": lifetime,
            "dpop": req.dpop_jkt.is_some(),
            "jkt": req.dpop_jkt,
            "actors": actors,
        });
        let mut approved = false;
        if let Some(apr) = req.approval.clone()
            && self
                .redeem_token_approval(&p, &apr, &held, Action::StartTask)
                .await?
        {
            // Used: the token's own decision is approved too.
            (approved, req.approval, req.approved) = (true, None, true);
        }
        let st = keymint_proto::StartTask {
            role: Some(role.name.clone()),
            ttl_secs: Some(lifetime),
            intent: Some(format!("OAuth access token for {}", role.name)),
            ..keymint_proto::StartTask::default()
        };
        let task = match self.start_task_inner(&p, st, approved).await {
            Ok(t) => t,
            Err(BrokerError::Policy {
                verdict: Verdict::NeedsApproval,
                policies,
                action,
                workload,
                role,
                ..
            }) if !approved => {
                // Held with the OAuth request, not a `StartTask`: the
                // generic redeem route refuses it; the token endpoint
                // takes it.
                return Err(
                    match self
                        .hold(&p, action, workload, role, None, held, policies)
                        .await
                    {
                        BrokerError::Held(a) => OAuthError::AuthorizationPending { approval: a.id },
                        e => from_broker(e),
                    },
                );
            }
            Err(e) => {
                if matches!(
                    e,
                    BrokerError::Rule(_) | BrokerError::Forbidden(_) | BrokerError::Policy { .. }
                ) {
                    self.deny("task.denied", &p, None, &e).await;
                }
                return Err(match e {
                    BrokerError::Policy {
                        timed_out: true, ..
                    } => OAuthError::Unavailable("the policy decision timed out".into()),
                    BrokerError::Policy { .. } | BrokerError::Forbidden(_) => {
                        OAuthError::AccessDenied("policy does not permit this token".into())
                    }
                    BrokerError::Rule(_) => OAuthError::InvalidRequest(
                        "the token's lifetime is outside the server's task limits".into(),
                    ),
                    e => from_broker(e),
                });
            }
        };
        // The task was started for exactly this lifetime.
        req.lifetime_secs = None;
        let subject = Subject {
            principal: p,
            client_id: None,
            ends_at: task.expires_at,
            scopes: allowed,
            audiences: None,
            actors: Vec::new(),
            jkt: None,
            task,
        };
        let role = Role {
            default_ttl_secs: lifetime,
            ..role
        };
        Ok((subject, role))
    }

    /// The steps every grant shares once it knows its subject: what may be
    /// granted (scopes, end), what policy says, then the token recorded
    /// and signed.
    pub(super) async fn grant_token(
        &self,
        subject: Subject,
        req: &TokenRequest,
        grant: &'static str,
        resource: &str,
        role: Role,
        actors: Vec<String>,
    ) -> Result<TokenResponse, OAuthError> {
        let issuer = std::sync::Arc::clone(self.oauth_issuer()?);
        // Refused before policy (and an approval) is asked.
        parents_of(&subject)?;
        let scopes = granted_scopes(req.scope.as_deref(), &role, subject.scopes.as_deref())?;
        let now = self.now();
        let expires_at = granted_end(req, &role, &subject, now)?;
        let mut facts = self.oauth_facts(
            &subject, &role, resource, &scopes, &actors, req, now, expires_at,
        );
        if let Some(o) = facts.oauth.as_mut() {
            o.grant_type = grant.into();
        }
        let policies = self
            .decide_token(&subject, &role, resource, &scopes, req, facts)
            .await?;
        self.record_access_token(
            &issuer,
            subject,
            role,
            resource,
            scopes,
            actors,
            req.dpop_jkt.clone(),
            expires_at,
            (grant, policies),
        )
        .await
    }

    /// RFC 7523 §2.1 with a workload JWT (the MCP workload identity
    /// federation profile): the assertion is verified like any workload
    /// identity token (`[identity]`), must name the token endpoint in
    /// `aud`, and is used once (its `jti`, claimed in the store until it
    /// expires, so across replicas too). The token lives in a new task of
    /// the workload with the resource's role, started through the usual
    /// `start_task` decision, as long as the token.
    async fn jwt_bearer(&self, req: TokenRequest) -> Result<TokenResponse, OAuthError> {
        let resource = one_resource(&req.resources)?.to_owned();
        let role = self.resource_role(&resource)?;
        let assertion = req
            .assertion
            .as_deref()
            .ok_or_else(|| bad("`assertion` is required"))?;
        if assertion.len() > MAX_TOKEN {
            return Err(bad("`assertion` is too long"));
        }
        let endpoint = self
            .token_endpoint()
            .ok_or_else(|| OAuthError::Unavailable("no `[issuer]`".into()))?;
        let refused = || OAuthError::InvalidGrant("the assertion is not valid".into());
        let Some(verifier) = &self.identity else {
            return Err(OAuthError::InvalidGrant(
                "this server accepts no workload identity tokens".into(),
            ));
        };
        let now = self.now();
        let w = match verifier.verify(assertion, now).await {
            Ok(w) => w,
            Err(e) if e.is_unavailable() => {
                return Err(OAuthError::Unavailable(
                    "the issuer's keys cannot be fetched".into(),
                ));
            }
            Err(_) => return Err(refused()),
        };
        if self.node_of(&w).is_some() {
            return Err(OAuthError::InvalidGrant(
                "a node's identity is not a workload's: it gets no access token".into(),
            ));
        }
        // Verified above; read again for the claims RFC 7523 needs.
        let claims = keymint_identity::jws::peek_claims(assertion).map_err(|_| refused())?;
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => *a == endpoint,
            Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(endpoint.as_str())),
            _ => false,
        };
        if !aud_ok {
            return Err(OAuthError::InvalidGrant(
                "the assertion's `aud` must name the token endpoint".into(),
            ));
        }
        let jti = claims
            .get("jti")
            .and_then(Value::as_str)
            .filter(|j| !j.is_empty() && j.len() <= 256)
            .ok_or_else(|| OAuthError::InvalidGrant("the assertion needs a `jti`".into()))?;
        // Held until the assertion can no longer verify: its `exp` as the
        // verifier read it (a fractional `exp` is floored there; read here
        // as an integer it was 0, the claim ended at once and the assertion
        // could be replayed until it expired), plus more than the leeway.
        let until = w.expires_at.plus_secs(300);
        // What the request would be refused for anyway is refused before
        // the assertion is spent: a workload that asked for too much asks
        // again with the same token (a Kubernetes or CI token is one per
        // job, not one per request).
        own_task_lifetime(&req, &role)?;
        granted_scopes(req.scope.as_deref(), &role, None)?;
        let key = self
            .keyring
            .fingerprint(format!("jwt-bearer\n{}\n{jti}", w.issuer).as_bytes());
        if !self
            .store
            .claim_once(&key, until, now)
            .await
            .map_err(|e| from_broker(e.into()))?
        {
            return Err(OAuthError::InvalidGrant(
                "the assertion was already used".into(),
            ));
        }
        let p = super::authentication::workload_principal(w);
        let mut req = req;
        let (subject, role) = self
            .token_task(p, role, &resource, &mut req, None, &[])
            .await?;
        self.grant_in_own_task(subject, &req, "jwt_bearer", &resource, role, Vec::new())
            .await
    }

    #[allow(clippy::too_many_arguments, reason = "the facts of one request")]
    pub(super) fn oauth_facts(
        &self,
        subject: &Subject,
        role: &Role,
        resource: &str,
        scopes: &[String],
        actors: &[String],
        req: &TokenRequest,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> keymint_policy::RequestFacts {
        let mut facts =
            Self::task_facts(&subject.task, scopes.to_vec(), now.until(expires_at) / 1000);
        facts.destination = role.destination();
        facts.oauth = Some(OAuthFacts {
            grant_type: "token_exchange".into(),
            resource: resource.to_owned(),
            client_id: subject.client_id.clone().unwrap_or_default(),
            actor_chain: actors.to_vec(),
            dpop: req.dpop_jkt.is_some(),
        });
        facts
    }

    /// Cedar decides; a hold becomes a pending approval the caller names
    /// when it asks again (`approval`), once a human approved it.
    async fn decide_token(
        &self,
        subject: &Subject,
        role: &Role,
        resource: &str,
        scopes: &[String],
        req: &TokenRequest,
        mut facts: keymint_policy::RequestFacts,
    ) -> Result<Vec<String>, OAuthError> {
        // What the approver sees and approves, and what asking again must
        // match: whom the token acts for and the lifetime asked for too
        // (without them, an approval made for one actor gave a token
        // acting for another).
        let actors = facts
            .oauth
            .as_ref()
            .map(|o| o.actor_chain.clone())
            .unwrap_or_default();
        let held = serde_json::json!({
            "grant_type": req.grant_type,
            "resource": resource,
            "scopes": scopes,
            "dpop": req.dpop_jkt.is_some(),
            // The key the token would be bound to (its RFC 7638
            // thumbprint, public): without it, an approval asked with one
            // DPoP key was redeemed with another.
            "jkt": req.dpop_jkt,
            "actors": actors,
            "lifetime": req.lifetime_secs,
        });
        if req.approved {
            facts.approved = true;
        } else if let Some(apr) = &req.approval {
            if !self
                .redeem_token_approval(&subject.principal, apr, &held, Action::Issue)
                .await?
            {
                return Err(OAuthError::InvalidGrant(
                    "the approval does not cover this request".into(),
                ));
            }
            facts.approved = true;
        }
        let p = &subject.principal;
        match self.authorize(p, Action::Issue, &subject.task.workload, role, facts) {
            Ok(policies) => Ok(policies),
            Err(BrokerError::Policy {
                verdict: Verdict::NeedsApproval,
                policies,
                action,
                workload,
                role,
                ..
            }) if req.approval.is_none() && !req.approved => {
                match self
                    .hold(
                        p,
                        action,
                        workload,
                        role,
                        Some(subject.task.id.clone()),
                        held,
                        policies,
                    )
                    .await
                {
                    BrokerError::Held(a) => {
                        Err(OAuthError::AuthorizationPending { approval: a.id })
                    }
                    e => Err(from_broker(e)),
                }
            }
            Err(e) => {
                self.deny("oauth.denied", p, Some(&subject.task.id), &e)
                    .await;
                Err(match e {
                    BrokerError::Policy {
                        timed_out: true, ..
                    } => OAuthError::Unavailable("the policy decision timed out".into()),
                    BrokerError::Policy { .. } => {
                        OAuthError::AccessDenied("policy does not permit this token".into())
                    }
                    e => from_broker(e),
                })
            }
        }
    }

    /// A held token request, approved, asked again by the same token with
    /// the same parameters: used once. `false` (and left as it is): the
    /// approval is of the other decision of a grant that has two (the
    /// task's and the token's).
    async fn redeem_token_approval(
        &self,
        p: &Principal,
        apr: &str,
        held: &Value,
        action: Action,
    ) -> Result<bool, OAuthError> {
        use keymint_core::model::ApprovalStatus;
        let refused =
            || OAuthError::InvalidGrant("the approval does not cover this request".into());
        if !id::is_valid("apr_", apr) {
            return Err(refused());
        }
        let a = self
            .store
            .get_approval(apr)
            .await
            .map_err(|e| from_broker(e.into()))?
            .ok_or_else(refused)?;
        if a.requester_key != p.requester_key() {
            return Err(refused());
        }
        if a.action != action.as_str() && matches!(a.action.as_str(), "issue" | "start_task") {
            return Ok(false);
        }
        let jkt = |v: &Value| v.get("jkt").cloned().unwrap_or(Value::Null);
        if a.action == action.as_str() && jkt(&a.request) != jkt(held) {
            // The token would be bound to a key the approver never saw:
            // refused, said plainly, and on the record (the approval stays
            // for the key it was asked with).
            let why = "the approval covers a token bound to the DPoP key it was asked with; \
                       prove that key on this request";
            let mut ev = AuditDraft::new(self.now(), "approval.redeem_refused", p.actor())
                .outcome(keymint_core::audit::Outcome::Denied)
                .workload(&a.workload)
                .role(&a.role)
                .reason(why)
                .data("approval", a.id.clone())
                .data("action", "oauth_token")
                .data("jkt_approved", jkt(&a.request))
                .data("jkt_presented", jkt(held));
            if let Some(t) = &a.task {
                ev = ev.task(t);
            }
            if let Err(e) = self.store.append_audit(ev).await {
                tracing::error!(error = %e, "cannot audit a refused redemption");
                return Err(from_broker(e.into()));
            }
            self.notify_audit();
            return Err(OAuthError::InvalidGrant(why.into()));
        }
        if &a.request != held || a.action != action.as_str() {
            return Err(refused());
        }
        match a.status {
            ApprovalStatus::Pending => {
                return Err(OAuthError::AuthorizationPending {
                    approval: a.id.clone(),
                });
            }
            ApprovalStatus::Approved => {}
            ApprovalStatus::Denied => {
                return Err(OAuthError::AccessDenied("the request was denied".into()));
            }
            ApprovalStatus::Cancelled => {
                return Err(OAuthError::InvalidGrant(
                    "the approval was cancelled: its task ended".into(),
                ));
            }
            _ => return Err(refused()),
        }
        let now = self.now();
        let ev = AuditDraft::new(now, "approval.redeemed", p.actor())
            .workload(&a.workload)
            .role(&a.role)
            .data("approval", a.id.clone())
            .data("action", "oauth_token");
        let used = self
            .store
            .transition_approval(keymint_store::ApprovalChange {
                id: a.id.clone(),
                from: ApprovalStatus::Approved,
                to: ApprovalStatus::Used,
                by: None,
                note: None,
                now,
                audit: ev,
            })
            .await
            .map_err(|e| from_broker(e.into()))?;
        if used.is_none() {
            // Used meanwhile by a concurrent request, or expired.
            return Err(refused());
        }
        self.notify_audit();
        Ok(true)
    }

    /// Signs the token and records it as a lease in the subject's task
    /// (granted again inside the store's transaction: a task that ended
    /// meanwhile refuses it).
    #[allow(clippy::too_many_arguments, reason = "the parts of one token")]
    async fn record_access_token(
        &self,
        issuer: &keymint_issuer::Issuer,
        subject: Subject,
        role: Role,
        resource: &str,
        scopes: Vec<String>,
        actors: Vec<String>,
        jkt: Option<String>,
        expires_at: Timestamp,
        (grant, policies): (&'static str, Vec<String>),
    ) -> Result<TokenResponse, OAuthError> {
        let now = self.now();
        let lease_id = id::lease_id(now);
        let alg = match &role.kind {
            RoleKind::Jwt(j) => j.algorithm,
            _ => SigningAlg::ES256,
        };
        let task = &subject.task;
        let mut c = Map::new();
        c.insert("iss".into(), Value::String(issuer.url().to_owned()));
        c.insert("sub".into(), Value::String(task.workload.clone()));
        c.insert("aud".into(), Value::String(resource.to_owned()));
        c.insert("exp".into(), expires_at.unix_seconds().into());
        c.insert("iat".into(), now.unix_seconds().into());
        c.insert("nbf".into(), now.unix_seconds().into());
        c.insert("jti".into(), Value::String(lease_id.clone()));
        // RFC 9068 §2.2: the client the token was issued to; keymint's
        // clients are workloads.
        c.insert(
            "client_id".into(),
            Value::String(subject.client_id.clone().unwrap_or(task.workload.clone())),
        );
        c.insert("scope".into(), Value::String(scopes.join(" ")));
        c.insert("task_id".into(), Value::String(task.id.clone()));
        c.insert("role".into(), Value::String(role.name.clone()));
        if !actors.is_empty() {
            c.insert("act".into(), keymint_issuer::act_claim(&actors));
        }
        if let Some(j) = &jkt {
            c.insert("cnf".into(), serde_json::json!({ "jkt": j }));
        }
        let token = issuer
            .keys()
            .sign_typed(alg, AT_JWT, &c, now)
            .map_err(|e| {
                tracing::error!(error = %e, "cannot sign an access token");
                OAuthError::ServerError
            })?;
        let parents = parents_of(&subject)?;
        let fingerprint = self.keyring.fingerprint(token.as_bytes());
        let actor = subject.principal.actor();
        let (resource_s, jkt_s, actors_s) = (resource.to_owned(), jkt.clone(), actors.clone());
        let client_s = subject.client_id.clone();
        let role_name = role.name.clone();
        let scopes_c = scopes.clone();
        // INVARIANT (DESIGN.md 1, 2): on disk before it is returned, and
        // never past the task's end (checked again against the task as it
        // is inside the transaction).
        let lease = self
            .store
            .insert_lease(
                &task.id,
                Box::new(move |t| {
                    if !t.is_live(now) {
                        return Err(RuleError::TaskNotActive(t.id.clone()));
                    }
                    if expires_at > t.expires_at {
                        return Err(RuleError::TaskNotActive(t.id.clone()));
                    }
                    let lease = Lease {
                        id: lease_id,
                        task: t.id.clone(),
                        workload: t.workload.clone(),
                        role: role_name,
                        engine: EngineKind::Jwt,
                        scopes: scopes_c,
                        state: LeaseState::Active,
                        revocability: Revocability::Revocable,
                        fingerprint,
                        created_at: now,
                        expires_at,
                        ended_at: None,
                        end_reason: None,
                        revoke_attempts: 0,
                        next_attempt_at: None,
                        last_error: None,
                        engine_data: serde_json::json!({
                            "oauth": true,
                            "aud": resource_s,
                            "jkt": jkt_s,
                            "act": actors_s,
                            "client_id": client_s,
                            "parents": parents,
                        }),
                    };
                    let ev = AuditDraft::new(now, "oauth.token_issued", actor)
                        .task(&t.id)
                        .lease(&lease.id)
                        .workload(&lease.workload)
                        .role(&lease.role)
                        .fingerprint(&lease.fingerprint)
                        .data("resource", lease.engine_data["aud"].clone())
                        .data("grant_type", grant)
                        .data("scopes", lease.scopes.clone())
                        .data("actors", lease.engine_data["act"].clone())
                        .data("dpop", jkt_s_is_some(&lease.engine_data))
                        .data("expires_at", lease.expires_at.rfc3339())
                        .data("policies", policies);
                    Ok((lease, ev))
                }),
            )
            .await
            .map_err(|e| from_broker(e.into()))?;
        self.notify_audit();
        Ok(TokenResponse {
            access_token: token,
            issued_token_type: TT_ACCESS_TOKEN,
            token_type: if jkt.is_some() { "DPoP" } else { "Bearer" },
            expires_in: now.until(lease.expires_at) / 1000,
            scope: scopes.join(" "),
        })
    }

    /// The subject of an exchange: a task (a `kmt_` token's, an access
    /// token's), or `Err` with a workload that proved itself but has no
    /// task yet (a workload JWT of an `[identity]` issuer, or the
    /// X.509-SVID of this mTLS connection).
    async fn subject(&self, req: &TokenRequest) -> Result<Result<Subject, Principal>, OAuthError> {
        let tok = req
            .subject_token
            .as_deref()
            .ok_or_else(|| bad("`subject_token` is required"))?;
        let ty = req
            .subject_token_type
            .as_deref()
            .ok_or_else(|| bad("`subject_token_type` is required"))?;
        if tok.len() > MAX_TOKEN {
            return Err(bad("`subject_token` is too long"));
        }
        let invalid = || OAuthError::InvalidGrant("the subject token is not valid".into());
        match ty {
            TT_ACCESS_TOKEN | TT_JWT => {}
            // The caller is the SPIFFE ID its client certificate proved to
            // the TLS layer; the parameter only says which it means.
            TT_X509_SVID => {
                return match req.peer_svid.as_deref() {
                    Some(id) if id == tok => match self.svid_principal(id) {
                        p @ Principal::Workload { .. } => Ok(Err(p)),
                        _ => Err(invalid()),
                    },
                    _ => Err(OAuthError::InvalidGrant(
                        "the subject must be the X.509-SVID this connection was authenticated with"
                            .into(),
                    )),
                };
            }
            _ => return Err(bad("`subject_token_type` is not supported")),
        }
        if token::check(tok) == Ok(TokenKind::Access) {
            let p = self
                .authenticate(tok)
                .await
                .map_err(|_| OAuthError::InvalidGrant("the subject token is not valid".into()))?;
            let Principal::Task { task, lease } = &p else {
                return Err(OAuthError::InvalidGrant(
                    "the subject token is not valid".into(),
                ));
            };
            let ends_at = lease.expires_at.min(task.expires_at);
            let (task, actors) = ((**task).clone(), task.delegation.clone());
            return Ok(Ok(Subject {
                principal: p,
                client_id: None,
                task,
                scopes: None,
                audiences: None,
                ends_at,
                actors,
                jkt: None,
            }));
        }
        let Some(at) = self.verify_access_token(tok).await? else {
            // Not keymint's: a workload JWT, verified as at the API.
            if ty != TT_JWT || self.identity.is_none() {
                return Err(invalid());
            }
            return match self.authenticate(tok).await {
                Ok(p @ Principal::Workload { .. }) => Ok(Err(p)),
                Err(BrokerError::Unavailable(_)) => Err(OAuthError::Unavailable(
                    "the issuer's keys cannot be fetched".into(),
                )),
                _ => Err(invalid()),
            };
        };
        let ends_at = at.lease.expires_at.min(at.task.expires_at);
        let data = &at.lease.engine_data;
        let actors = data["act"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let audiences = data["aud"].as_str().map(|a| vec![a.to_owned()]);
        let jkt = data["jkt"].as_str().map(str::to_owned);
        let scopes = Some(at.lease.scopes.clone());
        let client_id = data["client_id"].as_str().map(str::to_owned);
        Ok(Ok(Subject {
            client_id,
            principal: Principal::Task {
                task: Box::new(at.task.clone()),
                lease: Box::new(at.lease),
            },
            task: at.task,
            scopes,
            audiences: Some(audiences.unwrap_or_default()),
            ends_at,
            actors,
            jkt,
        }))
    }

    /// The workload of the actor token, if any: a live `kmt_` token (its
    /// lease's workload) or a workload JWT from an `[identity]` issuer.
    async fn actor(&self, req: &TokenRequest) -> Result<Option<String>, OAuthError> {
        let Some(tok) = req.actor_token.as_deref() else {
            if req.actor_token_type.is_some() {
                return Err(bad("`actor_token_type` without `actor_token`"));
            }
            return Ok(None);
        };
        match req.actor_token_type.as_deref() {
            Some(TT_ACCESS_TOKEN | TT_JWT) => {}
            Some(_) => return Err(bad("`actor_token_type` is not supported")),
            None => return Err(bad("`actor_token_type` is required with `actor_token`")),
        }
        if tok.len() > MAX_TOKEN {
            return Err(bad("`actor_token` is too long"));
        }
        let refused = || OAuthError::InvalidGrant("the actor token is not valid".into());
        match self.authenticate(tok).await {
            Ok(Principal::Task { lease, .. }) => Ok(Some(lease.workload.clone())),
            Ok(Principal::Workload { name, .. }) => Ok(Some(name)),
            Ok(_) | Err(_) => Err(refused()),
        }
    }

    /// A keymint access token that verifies (signature by the issuer's
    /// published keys, `iss`, `typ`, not expired) and whose lease and task
    /// are live; `None` otherwise.
    pub async fn verify_access_token(
        &self,
        token: &str,
    ) -> Result<Option<AccessToken>, OAuthError> {
        let Some(issuer) = self.oidc() else {
            return Ok(None);
        };
        let now = self.now();
        let jwks = issuer.jwks(now);
        let Ok(v) = keymint_identity::jws::verify_with_set(token, &jwks) else {
            return Ok(None);
        };
        if v.header.get("typ").and_then(Value::as_str) != Some(AT_JWT)
            || v.claims.get("iss").and_then(Value::as_str) != Some(issuer.url())
            || v.claims
                .get("exp")
                .and_then(Value::as_i64)
                .is_none_or(|e| e <= now.unix_seconds())
        {
            return Ok(None);
        }
        // The lookup every token gets at the API, the proxy and the MCP
        // route: the lease live, its task live, and neither the task, nor
        // a task it was delegated from, nor their workloads suspended
        // (docs/design/0033). Reading the lease alone, a suspended task's
        // access token was active at introspection and exchanged for
        // fresh ones.
        let fp = self.keyring.fingerprint(token.as_bytes());
        match self.live_access_token(fp).await {
            Ok(live) if live.lease.engine_data["oauth"] == true => Ok(Some(AccessToken {
                claims: v.claims,
                lease: live.lease.clone(),
                task: live.task.clone(),
            })),
            Ok(_) | Err(BrokerError::Unauthorized(_)) => Ok(None),
            Err(e) => Err(from_broker(e)),
        }
    }

    /// RFC 7009: ends the access token or `kmt_` token presented (holding
    /// it is the authority to end it). Unknown tokens are not an error.
    pub async fn revoke_token(&self, token: &str) -> Result<(), OAuthError> {
        if token.len() > MAX_TOKEN {
            return Ok(());
        }
        let lease = if token::check(token) == Ok(TokenKind::Access) {
            let fp = self.keyring.fingerprint(token.as_bytes());
            self.store
                .lease_by_fingerprint(&fp)
                .await
                .map_err(|e| from_broker(e.into()))?
                .map(|(l, _)| l)
        } else {
            match self.oidc() {
                Some(issuer) => {
                    let jwks = issuer.jwks(self.now());
                    match keymint_identity::jws::verify_with_set(token, &jwks) {
                        Ok(_) => {
                            let fp = self.keyring.fingerprint(token.as_bytes());
                            self.store
                                .lease_by_fingerprint(&fp)
                                .await
                                .map_err(|e| from_broker(e.into()))?
                                .map(|(l, _)| l)
                        }
                        Err(_) => None,
                    }
                }
                None => None,
            }
        };
        let Some(lease) = lease else {
            return Ok(());
        };
        let leases = self
            .store
            .request_revocation(
                LeaseSelector::Id(lease.id.clone()),
                keymint_core::model::EndReason::Revoked,
                self.now(),
                &format!("workload:{}", lease.workload),
            )
            .await
            .map_err(|e| from_broker(e.into()))?;
        self.drive_revocations(leases).await.map_err(from_broker)?;
        self.notify_audit();
        Ok(())
    }
}

/// The leases a token exchanged from `subject` is exchanged from, oldest
/// first: the subject's own `parents` and the subject's lease. The token
/// is refused once any of them is no longer usable (`live_access_token`),
/// so revoking a token (or the `kmt_` token it came from) ends what was
/// exchanged from it too. None for a subject without a lease (a task
/// started for the token).
fn parents_of(subject: &Subject) -> Result<Vec<Value>, OAuthError> {
    let Principal::Task { lease, .. } = &subject.principal else {
        return Ok(Vec::new());
    };
    let mut p = lease.engine_data["parents"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    p.push(Value::String(lease.id.clone()));
    if p.len() > MAX_EXCHANGES {
        return Err(OAuthError::InvalidGrant(
            "the subject token was exchanged from too many tokens".into(),
        ));
    }
    Ok(p)
}

fn jkt_s_is_some(data: &Value) -> bool {
    data["jkt"].is_string()
}

fn from_broker(e: BrokerError) -> OAuthError {
    match e {
        BrokerError::Unavailable(m) => OAuthError::Unavailable(m),
        BrokerError::Store(keymint_store::StoreError::Unavailable(_)) => {
            OAuthError::Unavailable("the store cannot write now".into())
        }
        BrokerError::Rule(RuleError::TaskNotActive(_)) => {
            OAuthError::InvalidGrant("the subject's task has ended".into())
        }
        other => {
            tracing::error!(error = %other, "token service failure");
            OAuthError::ServerError
        }
    }
}

/// Exactly one `resource` (or `audience`), an absolute URI without a
/// fragment (RFC 8707 §2) or a plain audience name.
pub(super) fn one_resource(r: &[String]) -> Result<&str, OAuthError> {
    match r {
        [one] if keymint_core::role::valid_claim_value(one) && !one.contains('#') => Ok(one),
        [_] => Err(OAuthError::InvalidTarget(
            "the resource is not a valid URI".into(),
        )),
        [] => Err(bad("`resource` is required")),
        _ => Err(OAuthError::InvalidTarget(
            "ask for one resource per token".into(),
        )),
    }
}

/// The lifetime of a task started for one token (jwt-bearer,
/// client_credentials, workload subjects): `requested_lifetime`, else the
/// role's default; refused at zero or past the role's maximum.
pub(super) fn own_task_lifetime(req: &TokenRequest, role: &Role) -> Result<u64, OAuthError> {
    match req.lifetime_secs {
        Some(l) if l > role.max_ttl_secs => {
            Err(bad("`requested_lifetime` exceeds the resource's maximum"))
        }
        Some(0) => Err(bad("`requested_lifetime` must be positive")),
        Some(l) => Ok(l),
        None => Ok(role.default_ttl_secs.min(role.max_ttl_secs)),
    }
}

/// The scopes asked for (space separated), each within the role's and the
/// subject's; none asked: all that both allow.
pub(super) fn granted_scopes(
    asked: Option<&str>,
    role: &Role,
    subject: Option<&[String]>,
) -> Result<Vec<String>, OAuthError> {
    let allowed: Vec<String> = role
        .scopes
        .iter()
        .filter(|s| subject.is_none_or(|sub| sub.contains(s)))
        .cloned()
        .collect();
    let Some(asked) = asked else {
        return Ok(allowed);
    };
    let mut out: Vec<String> = Vec::new();
    for s in asked.split(' ').filter(|s| !s.is_empty()) {
        if s.len() > MAX_SCOPE_LEN || out.len() >= MAX_SCOPES {
            return Err(OAuthError::InvalidScope(
                "too many or too long scopes".into(),
            ));
        }
        if !s
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\')
        {
            return Err(OAuthError::InvalidScope(
                "a scope has characters outside RFC 6749 §3.3".into(),
            ));
        }
        if !allowed.iter().any(|a| a == s) {
            return Err(OAuthError::InvalidScope(
                "a scope asked for is not held by the subject or allowed for the resource".into(),
            ));
        }
        if !out.iter().any(|o| o == s) {
            out.push(s.to_owned());
        }
    }
    Ok(out)
}

/// The token's end: the lifetime asked for (else the role's default), at
/// most the role's maximum, never past the subject's end. Asking for more
/// than allowed is refused, not quietly cut.
fn granted_end(
    req: &TokenRequest,
    role: &Role,
    subject: &Subject,
    now: Timestamp,
) -> Result<Timestamp, OAuthError> {
    let remaining = now.until(subject.ends_at) / 1000;
    if remaining <= 0 {
        return Err(OAuthError::InvalidGrant(
            "the subject token has expired".into(),
        ));
    }
    let end = match req.lifetime_secs {
        Some(0) => return Err(bad("`requested_lifetime` must be positive")),
        Some(l) if l > role.max_ttl_secs => {
            return Err(bad("`requested_lifetime` exceeds the resource's maximum"));
        }
        Some(l) if i64::try_from(l).unwrap_or(i64::MAX) > remaining => {
            return Err(bad(
                "`requested_lifetime` exceeds the subject token's lifetime",
            ));
        }
        Some(l) => now.plus_secs(l),
        None => now.plus_secs(role.default_ttl_secs.min(role.max_ttl_secs)),
    };
    Ok(end.min(subject.ends_at))
}

impl Broker {
    /// RFC 7662 for a keymint access token: active while its signature,
    /// `exp`, lease and task all hold.
    pub(super) async fn introspect_access_token(
        &self,
        token: &str,
    ) -> keymint_proto::Introspection {
        let Ok(Some(at)) = self.verify_access_token(token).await else {
            return keymint_proto::Introspection::default();
        };
        let data = &at.lease.engine_data;
        let jkt = data["jkt"]
            .as_str()
            .map(|j| keymint_proto::Confirmation { jkt: j.to_owned() });
        keymint_proto::Introspection {
            active: true,
            scope: Some(at.lease.scopes.join(" ")),
            token_type: Some(if jkt.is_some() { "DPoP" } else { "Bearer" }.into()),
            exp: Some(at.lease.expires_at.min(at.task.deadline()).unix_seconds()),
            iat: Some(at.lease.created_at.unix_seconds()),
            sub: Some(at.lease.workload.clone()),
            iss: self.oidc().map(|i| i.url().to_owned()),
            jti: Some(at.lease.id.clone()),
            task_id: Some(at.task.id.clone()),
            role: Some(at.lease.role.clone()),
            aud: data["aud"].as_str().map(str::to_owned),
            client_id: at
                .claims
                .get("client_id")
                .and_then(Value::as_str)
                .map(str::to_owned),
            cnf: jkt,
        }
    }
}
