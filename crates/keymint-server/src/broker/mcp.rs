//! The broker's side of the MCP route (docs/design/0031-mcp-route.md): an
//! access token presented at a resource, checked against that resource and
//! its lease; a `tools/call`, `resources/read` or `prompts/get` decided by
//! Cedar and audited; the exchanged token keymint presents upstream.
//!
//! The lease check is the one `kmt_` tokens get ([`Broker::live_access_token`]:
//! cached until the revocation epoch moves), so a token of an ended task is
//! refused at the MCP route within the same bound as a `kmt_` token at the
//! egress proxy.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use keymint_core::audit::{AuditDraft, Outcome};
use keymint_core::model::ApprovalStatus;
use keymint_policy::{Action, McpFacts, Verdict};
use serde_json::Value;

use keymint_core::role::{RoleKind, SigningAlg};
use zeroize::Zeroizing;

use super::oauth::AT_JWT;
use super::token_cache::LiveToken;
use super::{Broker, BrokerError, Principal};

/// Longest token accepted at a resource.
const MAX_TOKEN: usize = 16 * 1024;
/// Longest life of a token keymint mints for an MCP server (one request).
const UPSTREAM_TOKEN_SECS: u64 = 60;

/// Why a token was refused at a resource. Never carries the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceTokenError {
    /// Not a live keymint access token for this resource (RFC 6750
    /// `invalid_token`). The reason is for the log; the caller gets a
    /// fixed description.
    #[error("{0}")]
    Invalid(&'static str),
    /// The store could not be read.
    #[error("the token cannot be checked now")]
    Unavailable,
}

/// A keymint access token that is live and meant for the resource.
#[derive(Debug, Clone)]
pub(crate) struct ResourceToken {
    pub live: Arc<LiveToken>,
    /// The RFC 7638 thumbprint of the key it is bound to (`cnf.jkt`).
    pub jkt: Option<String>,
    pub scopes: Vec<String>,
    /// The token's `exp` (Unix seconds).
    pub exp: i64,
}

/// A request to an MCP server policy refused. `reason` names the deciding
/// policies.
#[derive(Debug, Clone)]
pub struct ToolDenied {
    pub reason: String,
    /// The approval the request waits for (`@approval`), if it was held.
    pub approval: Option<String>,
}

/// Where a held MCP request stands with its approvals.
enum Asked {
    /// Approved and now used: the request goes through once.
    Approved(String),
    /// Waiting for a human.
    Pending(String),
    /// A human said no.
    Denied,
    /// Never asked: hold it.
    No,
}

/// Approvals looked through for a held MCP request (newest first).
const APPROVAL_SCAN: u32 = 500;

impl Broker {
    /// The `[[mcp.servers]]` whose credential is a sealed bearer token
    /// (at start).
    pub fn set_mcp_servers(&self, with_bearer: Vec<String>) {
        let _ = self.mcp_servers.set(with_bearer);
    }

    /// Seals `key` as the bearer credential keymint presents to MCP server
    /// `server` (admin). Audited by fingerprint only; never returned.
    pub async fn set_mcp_credential(
        &self,
        p: &Principal,
        server: &str,
        key: &str,
    ) -> super::Result<()> {
        Self::require_admin(p)?;
        if !self
            .mcp_servers
            .get()
            .is_some_and(|s| s.iter().any(|x| x == server))
        {
            return Err(BrokerError::NotFound("mcp server with a bearer credential"));
        }
        let key = key.trim();
        // INVARIANT: the key goes into a header; a control character or a
        // space would let it forge another.
        if key.is_empty() || key.len() > 8192 || !key.bytes().all(|b| (0x21..0x7f).contains(&b)) {
            return Err(BrokerError::BadRequest(
                "the credential must be 1-8192 printable ASCII characters without spaces".into(),
            ));
        }
        let name = crate::mcp::credential_secret_name(server);
        let sealed = self
            .keyring
            .seal(&name, key.as_bytes())
            .map_err(|_| BrokerError::Unavailable("cannot seal the credential".into()))?;
        let now = self.now();
        self.store.put_secret(&name, sealed, now).await?;
        let ev = AuditDraft::new(now, "mcp.credential_set", p.actor())
            .fingerprint(self.keyring.fingerprint(key.as_bytes()))
            .data("server", server);
        self.store.append_audit(ev).await?;
        self.notify_audit();
        Ok(())
    }

    /// Checks an access token presented at `resource`: the issuer's
    /// signature (keymint's own published keys), `typ: at+jwt`, `iss`,
    /// `exp`, `nbf`, `aud` = `resource`, then the lease behind it: an OAuth
    /// lease, active, its task live, recorded for this audience.
    pub(crate) async fn resource_token(
        &self,
        token: &str,
        resource: &str,
    ) -> Result<ResourceToken, ResourceTokenError> {
        use ResourceTokenError::Invalid;
        if token.len() > MAX_TOKEN {
            return Err(Invalid("the token is too long"));
        }
        let issuer = self.oidc().ok_or(Invalid("this server issues no tokens"))?;
        let now = self.now();
        let v = keymint_identity::jws::verify_with_set(token, &issuer.jwks(now))
            .map_err(|_| Invalid("the signature does not verify with the issuer's keys"))?;
        let c = &v.claims;
        let t = now.unix_seconds();
        if v.header.get("typ").and_then(Value::as_str) != Some(AT_JWT) {
            return Err(Invalid("not an access token (`typ`)"));
        }
        if c.get("iss").and_then(Value::as_str) != Some(issuer.url()) {
            return Err(Invalid("another issuer"));
        }
        if c.get("exp").and_then(Value::as_i64).is_none_or(|e| e <= t) {
            return Err(Invalid("expired"));
        }
        if c.get("nbf").and_then(Value::as_i64).is_some_and(|n| n > t) {
            return Err(Invalid("not yet valid"));
        }
        let aud_ok = match c.get("aud") {
            Some(Value::String(a)) => a == resource,
            Some(Value::Array(a)) => a.iter().any(|a| a.as_str() == Some(resource)),
            _ => false,
        };
        if !aud_ok {
            return Err(Invalid("the token is for another audience"));
        }
        let fp = self.keyring.fingerprint(token.as_bytes());
        let live = match self.live_access_token(fp).await {
            Ok(l) => l,
            Err(BrokerError::Unauthorized(_)) => {
                return Err(Invalid("the token's lease or task has ended"));
            }
            Err(e) => {
                tracing::error!(error = %e, "mcp: cannot check a token's lease");
                return Err(ResourceTokenError::Unavailable);
            }
        };
        let data = &live.lease.engine_data;
        if data["oauth"] != true || data["aud"].as_str() != Some(resource) {
            return Err(Invalid(
                "the lease is not an access token for this resource",
            ));
        }
        let exp = c.get("exp").and_then(Value::as_i64).unwrap_or(0);
        Ok(ResourceToken {
            jkt: data["jkt"].as_str().map(str::to_owned),
            scopes: live.lease.scopes.clone(),
            exp,
            live,
        })
    }

    /// Cedar decides one `tools/call`, `resources/read` or `prompts/get`
    /// (action `call_tool`, `read_resource` or `get_prompt`, resource the
    /// server's role, `context.mcp` the method, the tool, URI or prompt and
    /// the arguments' shape); allowed or not, the request is audited
    /// (`mcp.tool_call`, `mcp.resource_read`, `mcp.prompt_get`) with what it
    /// names and its argument keys, never their values or the token.
    ///
    /// A request policy holds for approval (`@approval`) is refused naming
    /// its approval (held once; the same call again while pending names the
    /// same one); once approved, the same call by the same token goes
    /// through once.
    ///
    /// INVARIANT (DESIGN.md 5): policy fails closed; an error, a timeout
    /// or a hold without a used approval denies.
    pub(crate) async fn decide_mcp_request(
        &self,
        token: &ResourceToken,
        server: &str,
        role: &str,
        facts: McpFacts,
        call: String,
    ) -> Result<Vec<String>, ToolDenied> {
        let (task, lease) = (&token.live.task, &token.live.lease);
        let (action, kind) = match facts.method.as_str() {
            "resources/read" => (Action::ReadResource, "mcp.resource_read"),
            "prompts/get" => (Action::GetPrompt, "mcp.prompt_get"),
            _ => (Action::CallTool, "mcp.tool_call"),
        };
        let named: (&str, String) = match action {
            Action::ReadResource => ("uri", facts.uri.clone()),
            Action::GetPrompt => ("prompt", facts.prompt.clone()),
            _ => ("tool", facts.tool.clone()),
        };
        let keys = facts.argument_keys.clone();
        // What an approval is for: the request's facts (what the approver
        // sees; never argument values) and the HMAC of its exact params
        // (so an approval covers this call, not another with other values).
        let held = serde_json::json!({
            "mcp": {
                "server": server,
                "method": facts.method,
                "tool": facts.tool,
                "uri": facts.uri,
                "prompt": facts.prompt,
                "argument_keys": facts.argument_keys,
            },
            "call": call,
        });
        let p = Principal::Task {
            task: Box::new(task.clone()),
            lease: Box::new(lease.clone()),
        };
        let mut approval: Option<String> = None;
        let decided = match self.roles.get(role) {
            Some(r) => {
                let mut ctx = Self::task_facts(task, lease.scopes.clone(), 0);
                ctx.destination = format!("mcp:{server}");
                ctx.mcp = Some(facts);
                let first = self.authorize(&p, action, &task.workload, r, ctx.clone());
                match first {
                    Err(BrokerError::Policy {
                        verdict: Verdict::NeedsApproval,
                        ref policies,
                        timed_out: false,
                        ..
                    }) => match self.mcp_approval(&p, action, &held).await {
                        Ok(Asked::Approved(id)) => {
                            approval = Some(id);
                            ctx.approved = true;
                            self.authorize(&p, action, &task.workload, r, ctx)
                        }
                        Ok(Asked::Pending(id)) => {
                            approval = Some(id);
                            first
                        }
                        Ok(Asked::Denied) => first,
                        Ok(Asked::No) => {
                            let policies = policies.clone();
                            match self
                                .hold(
                                    &p,
                                    action,
                                    task.workload.clone(),
                                    role.to_owned(),
                                    Some(task.id.clone()),
                                    held,
                                    policies,
                                )
                                .await
                            {
                                BrokerError::Held(a) => approval = Some(a.id),
                                e => {
                                    tracing::error!(error = %e, "mcp: cannot hold a request for approval")
                                }
                            }
                            first
                        }
                        Err(e) => {
                            // Fails closed: the request is refused.
                            tracing::error!(error = %e, "mcp: cannot read approvals");
                            first
                        }
                    },
                    other => other,
                }
            }
            None => Err(BrokerError::Forbidden("the server's role is gone".into())),
        };
        let mut ev = AuditDraft::new(self.now(), kind, format!("workload:{}", task.workload))
            .task(task.id.clone())
            .lease(lease.id.clone())
            .workload(task.workload.clone())
            .role(role.to_owned())
            .data("server", server)
            .data(named.0, named.1)
            .data("argument_keys", keys);
        if let Some(a) = &approval {
            ev = ev.data("approval", a.clone());
        }
        let out = match decided {
            Ok(policies) => {
                ev = ev
                    .outcome(Outcome::Success)
                    .data("decision", "allow")
                    .data("policies", policies.clone());
                Ok(policies)
            }
            Err(e) => {
                self.metrics.denials.fetch_add(1, Ordering::Relaxed);
                let (decision, policies, timed_out) = match &e {
                    BrokerError::Policy {
                        verdict,
                        policies,
                        timed_out,
                        ..
                    } => (
                        if *timed_out {
                            "timeout"
                        } else if *verdict == Verdict::NeedsApproval {
                            // Answered now, naming the approval it waits for.
                            "approval"
                        } else {
                            "deny"
                        },
                        policies.clone(),
                        *timed_out,
                    ),
                    _ => ("deny", Vec::new(), false),
                };
                let reason = e.to_string();
                ev = ev
                    .outcome(if timed_out {
                        Outcome::Failure
                    } else {
                        Outcome::Denied
                    })
                    .reason(reason.clone())
                    .data("decision", decision)
                    .data("policies", policies);
                // Only a request still waiting names its approval.
                let waiting = if decision == "approval" {
                    approval
                } else {
                    None
                };
                Err(ToolDenied {
                    reason,
                    approval: waiting,
                })
            }
        };
        if let Err(e) = self.store.append_audit(ev).await {
            tracing::error!(error = %e, "mcp: could not audit a request");
            // An allowed call is only made once it is on the record.
            return Err(ToolDenied {
                reason: "the call cannot be audited now".into(),
                approval: None,
            });
        }
        self.notify_audit();
        out
    }

    /// The approvals of this token (`lease:ID`) for exactly this held MCP
    /// request: an approved one is used (once, compare-and-set, so two
    /// concurrent calls cannot both spend it); else a pending or denied
    /// one is reported; else none. A scan of the newest approvals: this
    /// path runs only when policy holds a request.
    async fn mcp_approval(
        &self,
        p: &Principal,
        action: Action,
        held: &Value,
    ) -> super::Result<Asked> {
        let key = p.requester_key();
        let now = self.now();
        let mine: Vec<_> = self
            .store
            .list_approvals(None, APPROVAL_SCAN)
            .await?
            .into_iter()
            .filter(|a| {
                a.requester_key == key
                    && a.action == action.as_str()
                    && &a.request == held
                    && a.expires_at > now
            })
            .collect();
        for a in mine.iter().filter(|a| a.status == ApprovalStatus::Approved) {
            let mut ev = AuditDraft::new(now, "approval.redeemed", p.actor())
                .workload(&a.workload)
                .role(&a.role)
                .data("approval", a.id.clone())
                .data("action", a.action.clone());
            if let Some(t) = &a.task {
                ev = ev.task(t);
            }
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
                .await?;
            if used.is_some() {
                self.notify_audit();
                return Ok(Asked::Approved(a.id.clone()));
            }
        }
        if let Some(a) = mine.iter().find(|a| a.status == ApprovalStatus::Pending) {
            return Ok(Asked::Pending(a.id.clone()));
        }
        if mine.iter().any(|a| a.status == ApprovalStatus::Denied) {
            return Ok(Asked::Denied);
        }
        Ok(Asked::No)
    }

    /// A session id keymint hands the agent for the MCP server's session
    /// `sid`, bound to the token's task and workload at server `server`:
    /// `kms1.<tag>.<sid>`, the tag an HMAC under the store's fingerprint
    /// key. Stateless, so it holds on every replica and across restarts.
    pub(crate) fn bind_session(&self, t: &ResourceToken, server: &str, sid: &str) -> String {
        format!("kms1.{}.{sid}", self.session_tag(t, server, sid))
    }

    /// The MCP server's session id inside `presented`, if `presented` was
    /// bound by [`Broker::bind_session`] to this token's task and workload
    /// at this server; `None` for any other (another task's, another
    /// workload's, another server's, tampered, or never keymint's).
    pub(crate) fn open_session<'a>(
        &self,
        t: &ResourceToken,
        server: &str,
        presented: &'a str,
    ) -> Option<&'a str> {
        let rest = presented.strip_prefix("kms1.")?;
        let (tag, sid) = rest.split_once('.')?;
        let want = self.session_tag(t, server, sid);
        bool::from(subtle::ConstantTimeEq::ct_eq(
            tag.as_bytes(),
            want.as_bytes(),
        ))
        .then_some(sid)
    }

    fn session_tag(&self, t: &ResourceToken, server: &str, sid: &str) -> String {
        let task = &t.live.task;
        // INVARIANT: an MCP session is usable only by the task (and so the
        // workload) that opened it (MCP security best practices: session
        // hijacking); the fields are NUL-separated, none can hold a NUL.
        let bound = format!(
            "keymint mcp session\0{server}\0{}\0{}\0{sid}",
            task.id, task.workload
        );
        self.keyring.fingerprint(bound.as_bytes())
    }

    /// Audits a request that presented a session id not bound to its task
    /// (a hijack attempt, or a stale id after keymint's keys changed).
    pub(crate) async fn audit_session_refused(&self, t: &ResourceToken, server: &str) {
        let reason = "the MCP session was not opened by this task";
        self.audit_mcp_refusal(t, server, "mcp.session_refused", reason, None)
            .await;
    }

    /// Audits a request the route refused before reading it (`check`
    /// names which: `encoding` for a compressed body), as the proxy's
    /// `proxy.denied` does. The request's content is never in it.
    pub(crate) async fn audit_mcp_denied(
        &self,
        t: &ResourceToken,
        server: &str,
        check: &'static str,
        reason: &'static str,
    ) {
        self.audit_mcp_refusal(t, server, "mcp.denied", reason, Some(check))
            .await;
    }

    /// One refused MCP request's event: the task, lease and workload of
    /// its token, the server, and `check` where there is one. Within the
    /// broker's bounded window, as the proxy's refusals: a token holder
    /// asking again and again is refused every time, audited one by one up
    /// to the burst, and summarised by check (`session` for a session
    /// refused) past it.
    async fn audit_mcp_refusal(
        &self,
        t: &ResourceToken,
        server: &str,
        kind: &'static str,
        reason: &'static str,
        check: Option<&'static str>,
    ) {
        let task = &t.live.task;
        let mut ev = AuditDraft::new(self.now(), kind, format!("workload:{}", task.workload))
            .task(task.id.clone())
            .lease(t.live.lease.id.clone())
            .workload(task.workload.clone())
            .outcome(Outcome::Denied)
            .reason(reason)
            .data("server", server);
        if let Some(check) = check {
            ev = ev.data("check", check);
        }
        self.record_bounded(&self.mcp_refusals, ev, check.unwrap_or("session"))
            .await;
    }

    /// The access token keymint presents to an MCP server whose
    /// `credential` is `exchanged`: an RFC 9068 JWT signed by keymint, `aud`
    /// the MCP server's own audience, `sub` the agent's workload, `act` the
    /// agent token's actor chain with the MCP route as the current actor,
    /// `exp` at most 60 s away and never past the agent token's. Never the
    /// agent's token; not a lease (it lives for one request).
    pub(crate) fn upstream_token(
        &self,
        t: &ResourceToken,
        role: &str,
        route: &str,
        audience: &str,
    ) -> Option<Zeroizing<String>> {
        let issuer = self.oidc()?;
        let (task, lease) = (&t.live.task, &t.live.lease);
        let alg = match self.roles.get(role).map(|r| &r.kind) {
            Some(RoleKind::Jwt(j)) => j.algorithm,
            _ => SigningAlg::ES256,
        };
        let now = self.now();
        let exp = now
            .plus_secs(UPSTREAM_TOKEN_SECS)
            .unix_seconds()
            .min(t.exp)
            .min(lease.expires_at.unix_seconds());
        let mut actors: Vec<String> = lease.engine_data["act"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        actors.push(route.to_owned());
        let mut jti = [0u8; 16];
        getrandom::fill(&mut jti).ok()?;
        let jti = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, jti);
        let mut c = serde_json::Map::new();
        c.insert("iss".into(), Value::String(issuer.url().to_owned()));
        c.insert("sub".into(), Value::String(task.workload.clone()));
        c.insert("aud".into(), Value::String(audience.to_owned()));
        c.insert("exp".into(), exp.into());
        c.insert("iat".into(), now.unix_seconds().into());
        c.insert("nbf".into(), now.unix_seconds().into());
        c.insert("jti".into(), Value::String(jti));
        // RFC 9068 §2.2: the client is keymint's route, acting for the agent.
        c.insert("client_id".into(), Value::String(route.to_owned()));
        c.insert("scope".into(), Value::String(lease.scopes.join(" ")));
        c.insert("task_id".into(), Value::String(task.id.clone()));
        c.insert("act".into(), keymint_issuer::act_claim(&actors));
        match issuer.keys().sign_typed(alg, AT_JWT, &c, now) {
            Ok(tok) => Some(Zeroizing::new(tok)),
            Err(e) => {
                tracing::error!(error = %e, "mcp: cannot sign an upstream token");
                None
            }
        }
    }
}
