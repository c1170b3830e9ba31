//! Workload identity JWTs signed by keymint as an OIDC issuer
//! (docs/design/0016-oidc-issuer.md).
//!
//! A `jwt` role issues one compact JWS per lease: `iss` keymint's issuer
//! URL, `sub` the task's workload (or its SPIFFE ID, JWT-SVID form), `aud`
//! from the role, `exp` the lease's end (never past the task's), `iat`,
//! `nbf`, `jti` the lease id, the task's id, role, intent, purpose and
//! environment, and the delegation chain as the RFC 8693 `act` claim.
//!
//! A signed token cannot be recalled: these are expire-only leases, so
//! their life is clamped to the task's end when they are signed.

use std::sync::Arc;

use async_trait::async_trait;
use keymint_core::Timestamp;
use keymint_core::model::{Lease, Revocability};
use keymint_core::role::{EngineKind, RoleKind, SigningAlg};
use keymint_issuer::Issuer;
use keymint_proto::{Credential, SecretString};
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use crate::{Engine, EngineError, IssueContext, Prepared};

/// Tokens are valid from a little before they are signed, for verifiers
/// whose clocks run behind keymint's.
pub const NOT_BEFORE_SKEW_SECS: u64 = 30;

/// The JWT engine: signs with the issuer's key in force.
#[derive(Debug)]
pub struct JwtEngine {
    issuer: Arc<Issuer>,
}

impl JwtEngine {
    pub fn new(issuer: Arc<Issuer>) -> Self {
        Self { issuer }
    }
}

/// Whether `w` can be the path of a SPIFFE ID: segments of
/// `[A-Za-z0-9._-]`, none empty, `.` or `..`.
fn spiffe_path_ok(w: &str) -> bool {
    !w.is_empty()
        && w.len() <= 1024
        && w.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        })
}

/// A signed workload token and what the lease records about it.
pub(crate) struct Signed {
    pub token: String,
    pub subject: String,
    pub expires_at: Timestamp,
    pub kid: Option<String>,
}

/// Signs the workload token of `ctx` for `audience` with `alg`.
pub(crate) fn sign_workload_token(
    issuer: &Issuer,
    ctx: &IssueContext<'_>,
    audience: &[String],
    alg: SigningAlg,
    spiffe: bool,
) -> Result<Signed, EngineError> {
    let issued_ms = crate::ssh::id_millis(ctx.lease_id)
        .ok_or_else(|| EngineError::Internal("the lease id is malformed".into()))?;
    let now = Timestamp::from_millis(i64::try_from(issued_ms).unwrap_or(i64::MAX));
    // INVARIANT (DESIGN.md 1): an expire-only credential never outlives its
    // task: `exp` is the lease's end, which the rules already cap at the
    // task's hard end (`rules::lease_end`); capped here again, in case. Not
    // the idle deadline: a supervised task (`keymint run`) heartbeats well
    // inside it, and when its supervisor dies, the command holding the token
    // dies with it (docs/design/0028-provider-federation.md).
    let expires_at = ctx.expires_at.min(ctx.task.expires_at);
    if expires_at.unix_seconds() <= now.unix_seconds() {
        return Err(EngineError::BadRequest(
            "the lease ends within the second".into(),
        ));
    }
    let subject = if !spiffe || ctx.task.workload.starts_with("spiffe://") {
        ctx.task.workload.clone()
    } else {
        let Some(td) = &issuer.settings().trust_domain else {
            return Err(EngineError::Internal(
                "JWT-SVIDs need `[issuer] trust_domain`".into(),
            ));
        };
        if !spiffe_path_ok(&ctx.task.workload) {
            return Err(EngineError::BadRequest(
                "the workload name cannot be the path of a SPIFFE ID (a-z, A-Z, 0-9, `.`, `_`, `-`, `/`)"
                    .into(),
            ));
        }
        format!("spiffe://{td}/{}", ctx.task.workload)
    };
    let mut c = Map::new();
    c.insert("iss".into(), Value::String(issuer.url().to_owned()));
    c.insert("sub".into(), Value::String(subject.clone()));
    c.insert(
        "aud".into(),
        match audience {
            [one] => Value::String(one.clone()),
            many => Value::Array(many.iter().cloned().map(Value::String).collect()),
        },
    );
    c.insert("exp".into(), expires_at.unix_seconds().into());
    c.insert("iat".into(), now.unix_seconds().into());
    if !spiffe {
        c.insert(
            "nbf".into(),
            now.unix_seconds()
                .saturating_sub(i64::try_from(NOT_BEFORE_SKEW_SECS).unwrap_or(0))
                .into(),
        );
    }
    c.insert("jti".into(), Value::String(ctx.lease_id.to_owned()));
    c.insert("task_id".into(), Value::String(ctx.task.id.clone()));
    c.insert("role".into(), Value::String(ctx.role.name.clone()));
    for (k, v) in [
        ("intent", &ctx.task.intent),
        ("purpose", &ctx.task.purpose),
        ("environment", &ctx.task.environment),
    ] {
        if let Some(v) = v {
            c.insert(k.into(), Value::String(v.clone()));
        }
    }
    if !ctx.task.delegation.is_empty() {
        c.insert(
            "act".into(),
            keymint_issuer::act_claim(&ctx.task.delegation),
        );
    }
    let keys = issuer.keys();
    let kid = keys.signing_key(alg, now).map(|k| k.kid().to_owned());
    let token = keys.sign(alg, &c, now).map_err(|e| match e {
        keymint_issuer::IssuerError::NoKey(_) => EngineError::Internal(format!(
            "the issuer has no {alg} key (add it to `[issuer] algorithms`)"
        )),
        _ => EngineError::Internal("cannot sign the token".into()),
    })?;
    Ok(Signed {
        token,
        subject,
        expires_at,
        kid,
    })
}

#[async_trait]
impl Engine for JwtEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Jwt
    }

    fn revocability(&self) -> Revocability {
        // A signed token cannot be recalled; it is clamped to the task.
        Revocability::ExpireOnly
    }

    fn is_local(&self) -> bool {
        true
    }

    fn prepare(&self, ctx: &IssueContext<'_>) -> Result<Prepared, EngineError> {
        let RoleKind::Jwt(role) = &ctx.role.kind else {
            return Err(EngineError::Internal(format!(
                "role `{}` is not a jwt role",
                ctx.role.name
            )));
        };
        let s = sign_workload_token(
            &self.issuer,
            ctx,
            &role.audience,
            role.algorithm,
            role.spiffe,
        )?;
        Ok(Prepared {
            fingerprint_material: Zeroizing::new(s.token.as_bytes().to_vec()),
            engine_data: serde_json::json!({
                "kid": s.kid,
                "alg": role.algorithm.as_str(),
                "sub": s.subject,
            }),
            credential: Credential::Jwt {
                token: SecretString::new(s.token),
                issuer: self.issuer.url().to_owned(),
                subject: s.subject,
                audience: role.audience.clone(),
                expires_at: s.expires_at.unix_seconds(),
            },
        })
    }

    async fn apply(&self, _: &IssueContext<'_>, _: &Prepared) -> Result<(), EngineError> {
        Ok(())
    }

    async fn revoke(&self, _lease: &Lease) -> Result<(), EngineError> {
        // Nothing to tell anyone: the token dies at its `exp`.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_paths_are_checked() {
        assert!(spiffe_path_ok("ci/agent-1"));
        assert!(!spiffe_path_ok("ci//a"));
        assert!(!spiffe_path_ok("../etc"));
        assert!(!spiffe_path_ok("a b"));
        assert!(!spiffe_path_ok(""));
    }
}
