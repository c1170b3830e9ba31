//! Authentication: who is calling. A bearer credential (a workload JWT, a
//! `kmt_` task token, the admin, operator or node tokens), an mTLS client's
//! SPIFFE ID or a process attested on the local socket becomes a
//! [`Principal`]; every refusal is counted and audited, within the bound
//! kept by `auth_audit`.

use keymint_core::audit::{AuditDraft, Outcome};
use keymint_core::token::{self, TokenKind};
use subtle::ConstantTimeEq;

use super::{Broker, BrokerError, Principal, Proven, Result};

/// Three dot-separated parts, the first a base64url JSON object.
fn looks_like_jwt(s: &str) -> bool {
    s.starts_with("eyJ") && s.bytes().filter(|b| *b == b'.').count() == 2
}

/// What kind of credential a refused bearer was, for the audit trail.
pub(super) fn credential_kind(s: &str) -> &'static str {
    if looks_like_jwt(s) {
        "jwt"
    } else if s.starts_with("kmt_") {
        "kmt"
    } else if s.starts_with("kma_") {
        "kma"
    } else {
        "unknown"
    }
}

impl Broker {
    /// Resolves a bearer token to a principal. Says why a token is refused,
    /// never what it was.
    ///
    /// Every failure is counted and audited (`auth.failed`) with the reason
    /// and the kind of credential, never its contents.
    pub async fn authenticate(&self, bearer: &str) -> Result<Principal> {
        match self.authenticate_inner(bearer).await {
            Ok(p) => Ok(p),
            Err(e @ (BrokerError::Unauthorized(_) | BrokerError::Unavailable(_))) => {
                self.auth_failed(&e, credential_kind(bearer)).await;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Counts and audits a refused credential: why, and what kind it was.
    async fn auth_failed(&self, e: &BrokerError, credential: &'static str) {
        let ev = AuditDraft::new(self.now(), "auth.failed", "anonymous")
            .outcome(Outcome::Denied)
            .reason(e.to_string())
            .data("credential", credential);
        self.record_auth_failure(ev, credential).await;
    }

    /// The principal of a request on the local socket without a bearer
    /// token: the attested workload, while its process is alive. Failures
    /// are audited like any other.
    pub async fn authenticate_local(&self, found: &crate::local::Attested) -> Result<Principal> {
        use crate::local::Attested;
        let result = match (found, self.local_principal(found)) {
            (_, Some(p)) => Ok(p),
            (Attested::Workload { senders, .. }, None) if senders.foreign().is_some() => {
                Err(BrokerError::Unauthorized(
                    "a request on this connection was written by another process than the \
                     attested one (a passed or inherited socket)"
                        .into(),
                ))
            }
            // INVARIANT (docs/design/0010, 0024): the identity is the
            // attested process as it was attested: alive, its pid not
            // reused, and not since `execve`d into another executable.
            (Attested::Workload { peer, .. }, None) => {
                Err(BrokerError::Unauthorized(match peer.recheck() {
                    Err(keymint_attest::PeerError::Changed { what, .. }) => format!(
                        "the attested process is no longer what was attested ({what} changed)"
                    ),
                    Err(keymint_attest::PeerError::Exited { .. }) => {
                        "the attested process has exited".into()
                    }
                    _ => "the attested process can no longer be checked".into(),
                }))
            }
            (Attested::Refused(why), None) => Err(BrokerError::Unauthorized(format!(
                "not an attested workload: {why}"
            ))),
        };
        if let Err(e) = &result {
            self.auth_failed(e, "unix").await;
        }
        result
    }

    /// The workload a local caller attested to, while its process lives
    /// and still runs the executable it was attested with
    /// ([`keymint_attest::PeerInfo::recheck`]: a poll, a stat and one
    /// small read per request).
    pub fn local_principal(&self, found: &crate::local::Attested) -> Option<Principal> {
        match found {
            crate::local::Attested::Workload {
                peer,
                workload,
                senders,
            } if senders.foreign().is_none() && peer.recheck().is_ok() => {
                Some(Principal::Workload {
                    name: workload.workload.clone(),
                    identity: Box::new(Proven {
                        method: "unix",
                        issuer: String::new(),
                        attributes: workload.attributes.clone(),
                    }),
                })
            }
            _ => None,
        }
    }

    /// The task principal of a live `kmt_` token, or `None`; nothing is
    /// counted or audited. For checks made ahead of a path that refuses and
    /// audits the token itself (holder binding in front of the egress proxy,
    /// whose gate does), so that one refusal is recorded once.
    pub async fn task_token(&self, bearer: &str) -> Option<Principal> {
        if !matches!(token::check(bearer), Ok(TokenKind::Access)) {
            return None;
        }
        let fp = self.keyring.fingerprint(bearer.as_bytes());
        let live = self.live_access_token(fp).await.ok()?;
        Some(Principal::Task {
            task: Box::new(live.task.clone()),
            lease: Box::new(live.lease.clone()),
        })
    }

    /// Holder binding: a task token presented by a caller that proved
    /// another workload identity is refused and audited. The holder is the
    /// lease's workload; a delegating workload may present tokens of its
    /// own sub-tasks (it is in their delegation chain).
    pub async fn check_holder_of(&self, token: &Principal, presenter: &Principal) -> Result<()> {
        let (Principal::Task { task, lease }, Principal::Workload { name, .. }) =
            (token, presenter)
        else {
            return Ok(());
        };
        if name == &lease.workload || task.delegation.contains(name) {
            return Ok(());
        }
        let e = BrokerError::Unauthorized(format!(
            "this token is bound to workload `{}` and was presented by `{name}`",
            lease.workload
        ));
        let ev = AuditDraft::new(self.now(), "auth.failed", presenter.actor())
            .outcome(Outcome::Denied)
            .reason(e.to_string())
            .task(&lease.task)
            .lease(&lease.id)
            .workload(&lease.workload)
            .fingerprint(&lease.fingerprint)
            .data("credential", "kmt")
            .data("presented_by", name.clone());
        self.record_auth_failure(ev, "kmt").await;
        Err(e)
    }

    /// The node a verified workload JWT is the identity of, if any: a
    /// node's own identity makes it the node (at the API, and as the
    /// subject of an exchange), never a workload with tasks of its own.
    pub(super) fn node_of(&self, w: &keymint_identity::Workload) -> Option<&String> {
        self.node_identities
            .get(&format!("{}/{}", w.issuer_name, w.id))
    }

    /// The principal of an mTLS client whose X.509-SVID chained to the
    /// trust bundle (verified by the TLS layer): its SPIFFE ID.
    pub fn svid_principal(&self, spiffe_id: &str) -> Principal {
        if let Some(node) = self.node_identities.get(spiffe_id) {
            return Principal::Node { name: node.clone() };
        }
        let trust_domain = spiffe_id
            .trim_start_matches("spiffe://")
            .split('/')
            .next()
            .unwrap_or_default();
        let mut attributes = std::collections::BTreeMap::new();
        attributes.insert("trust_domain".to_owned(), trust_domain.to_owned());
        attributes.insert("svid".to_owned(), "x509".to_owned());
        Principal::Workload {
            name: spiffe_id.to_owned(),
            identity: Box::new(Proven {
                method: "spiffe",
                issuer: format!("spiffe://{trust_domain}"),
                attributes,
            }),
        }
    }

    async fn authenticate_inner(&self, bearer: &str) -> Result<Principal> {
        let fail = |m: &str| BrokerError::Unauthorized(m.to_owned());
        if looks_like_jwt(bearer) {
            let Some(v) = &self.identity else {
                return Err(fail("this server accepts no workload identity tokens"));
            };
            return match v.verify(bearer, self.now()).await {
                Ok(w) => Ok(match self.node_of(&w) {
                    Some(node) => Principal::Node { name: node.clone() },
                    None => workload_principal(w),
                }),
                Err(e) if e.is_unavailable() => Err(BrokerError::Unavailable(e.to_string())),
                Err(e) => Err(fail(&format!("identity token refused: {e}"))),
            };
        }
        let kind = token::check(bearer).map_err(|e| fail(&e.to_string()))?;
        let fp = self.keyring.fingerprint(bearer.as_bytes());
        match kind {
            TokenKind::Admin => {
                if bool::from(fp.as_bytes().ct_eq(self.admin_fingerprint.as_bytes())) {
                    Ok(Principal::Admin)
                } else if let Some(name) = self.operators.get(&fp) {
                    Ok(Principal::Operator { name: name.clone() })
                } else if let Some(name) = self.node_tokens.get(&fp) {
                    Ok(Principal::Node { name: name.clone() })
                } else {
                    Err(fail("token not recognised"))
                }
            }
            TokenKind::Access => {
                let live = self.live_access_token(fp).await?;
                Ok(Principal::Task {
                    task: Box::new(live.task.clone()),
                    lease: Box::new(live.lease.clone()),
                })
            }
        }
    }
}

/// The principal of a workload JWT that verified: `ISSUER_NAME/ID`.
pub(super) fn workload_principal(w: keymint_identity::Workload) -> Principal {
    Principal::Workload {
        name: format!("{}/{}", w.issuer_name, w.id),
        identity: Box::new(Proven {
            method: match w.method {
                keymint_identity::Method::Spiffe => "spiffe",
                _ => "jwt",
            },
            issuer: w.issuer,
            attributes: w.attributes,
        }),
    }
}
