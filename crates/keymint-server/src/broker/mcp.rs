//! The broker's side of the MCP route (docs/design/0031-mcp-route.md): an
//! access token presented at a resource, checked against that resource and
//! its lease; a `tools/call` decided by Cedar and audited.
//!
//! The lease check is the one `kmt_` tokens get ([`Broker::live_access_token`]:
//! cached until the revocation epoch moves), so a token of an ended task is
//! refused at the MCP route within the same bound as a `kmt_` token at the
//! egress proxy.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use keymint_core::audit::{AuditDraft, Outcome};
use keymint_policy::{Action, McpFacts, Verdict};
use serde_json::Value;

use super::oauth::AT_JWT;
use super::token_cache::LiveToken;
use super::{Broker, BrokerError, Principal};

/// Longest token accepted at a resource.
const MAX_TOKEN: usize = 16 * 1024;

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
}

/// A `tools/call` policy refused. `reason` names the deciding policies.
#[derive(Debug, Clone)]
pub struct ToolDenied {
    pub reason: String,
}

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
        Ok(ResourceToken {
            jkt: data["jkt"].as_str().map(str::to_owned),
            scopes: live.lease.scopes.clone(),
            live,
        })
    }

    /// Cedar decides one `tools/call` (action `call_tool`, resource the
    /// server's role, `context.mcp` the tool and its arguments' shape);
    /// allowed or not, the call is audited (`mcp.tool_call`) with the tool's
    /// name and argument keys, never their values or the token.
    ///
    /// INVARIANT (DESIGN.md 5): policy fails closed; an error, a timeout
    /// or a hold for approval (tool calls are not held) denies.
    pub(crate) async fn decide_tool_call(
        &self,
        token: &ResourceToken,
        server: &str,
        role: &str,
        facts: McpFacts,
    ) -> Result<Vec<String>, ToolDenied> {
        let (task, lease) = (&token.live.task, &token.live.lease);
        let tool = facts.tool.clone();
        let keys = facts.argument_keys.clone();
        let decided = match self.roles.get(role) {
            Some(r) => {
                let mut ctx = Self::task_facts(task, lease.scopes.clone(), 0);
                ctx.destination = format!("mcp:{server}");
                ctx.mcp = Some(facts);
                let p = Principal::Task {
                    task: Box::new(task.clone()),
                    lease: Box::new(lease.clone()),
                };
                self.authorize(&p, Action::CallTool, &task.workload, r, ctx)
            }
            None => Err(BrokerError::Forbidden("the server's role is gone".into())),
        };
        let mut ev = AuditDraft::new(
            self.now(),
            "mcp.tool_call",
            format!("workload:{}", task.workload),
        )
        .task(task.id.clone())
        .lease(lease.id.clone())
        .workload(task.workload.clone())
        .role(role.to_owned())
        .data("server", server)
        .data("tool", tool)
        .data("argument_keys", keys);
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
                            // A tool call is not held: it is answered now.
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
                Err(ToolDenied { reason })
            }
        };
        if let Err(e) = self.store.append_audit(ev).await {
            tracing::error!(error = %e, "mcp: could not audit a tool call");
            // An allowed call is only made once it is on the record.
            return Err(ToolDenied {
                reason: "the call cannot be audited now".into(),
            });
        }
        self.notify_audit();
        out
    }
}
