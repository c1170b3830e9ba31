//! OpenRouter API keys that exist for one lease, made with a management
//! key (docs/design/0017-provider-keys.md).
//!
//! Per lease, `POST /keys` with `name` (`keymint-<installation>-<lease
//! id>`), `limit` (the role's `max_spend_usd`, in dollars), `limit_reset`
//! and `expires_at` (the task's end, ISO 8601 UTC); the answer carries the
//! key (`key`, shown once) and its `data.hash`, the id every other call
//! takes. Revoking disables the key first (`PATCH /keys/{hash}` with
//! `disabled: true`, so it stops at once even if the delete fails), then
//! deletes it (`DELETE /keys/{hash}`); a 404 counts as done. A lease whose
//! hash keymint never learnt is found by its name. Reconciliation lists the
//! keys (`GET /keys?include_disabled=true&offset=N`) and reports the ones
//! carrying this installation's names.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, StatusCode};
use keymint_core::model::{Lease, Revocability};
use keymint_core::role::{EngineKind, RoleKind};
use keymint_core::{Clock, Timestamp};
use keymint_proto::{Credential, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::provider::{AdminApi, lease_of, managed_name, segment};
use crate::{Engine, EngineError, IssueContext, Managed, Prepared};

/// What a lease records about its key (its `engine_data`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Made {
    /// The `[[upstreams]]` entry of the management key.
    management_key: String,
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hash: Option<String>,
}

#[derive(Debug)]
pub struct OpenRouterEngine {
    apis: HashMap<String, AdminApi>,
    installation: String,
    clock: Arc<dyn Clock>,
}

impl OpenRouterEngine {
    pub fn new(apis: Vec<AdminApi>, installation: &str, clock: Arc<dyn Clock>) -> Self {
        Self {
            apis: apis
                .into_iter()
                .map(|a| (a.upstream().to_owned(), a))
                .collect(),
            installation: installation.to_owned(),
            clock,
        }
    }

    fn api(&self, upstream: &str) -> Result<&AdminApi, EngineError> {
        self.apis.get(upstream).ok_or_else(|| {
            EngineError::Internal(format!(
                "openrouter: upstream `{upstream}` is not configured"
            ))
        })
    }

    /// Every key named by this installation, as `(lease id, hash)`.
    async fn list_keys(&self, api: &AdminApi) -> Result<Vec<(String, String)>, EngineError> {
        let mut out = Vec::new();
        let mut offset = 0usize;
        for _ in 0..1000 {
            let step = "listing keys";
            let path = format!("/keys?include_disabled=true&offset={offset}");
            let a = api.call(Method::GET, &path, None, step).await?;
            if a.status != StatusCode::OK {
                return Err(api.unexpected(step, a.status));
            }
            let data = a.body["data"]
                .as_array()
                .ok_or_else(|| api.malformed(step))?;
            if data.is_empty() {
                return Ok(out);
            }
            offset += data.len();
            for k in data {
                let (Some(name), Some(hash)) = (k["name"].as_str(), k["hash"].as_str()) else {
                    continue;
                };
                if let Some(lease) = lease_of(&self.installation, name) {
                    out.push((lease.to_owned(), hash.to_owned()));
                }
            }
        }
        Ok(out)
    }
}

/// The body of `POST /keys`.
fn create_body(name: &str, role: &keymint_core::role::OpenRouterRole, end: Timestamp) -> Value {
    let mut body = json!({"name": name, "expires_at": end.rfc3339()});
    if let Some(limit) = role.max_spend_usd {
        body["limit"] = json!(limit);
    }
    if let Some(reset) = role.limit_reset {
        body["limit_reset"] = json!(reset.as_str());
    }
    body
}

#[async_trait]
impl Engine for OpenRouterEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Openrouter
    }

    fn revocability(&self) -> Revocability {
        Revocability::Revocable
    }

    fn is_local(&self) -> bool {
        false
    }

    fn prepare(&self, ctx: &IssueContext<'_>) -> Result<Prepared, EngineError> {
        let RoleKind::Openrouter(role) = &ctx.role.kind else {
            return Err(ctx.not_for(EngineKind::Openrouter));
        };
        let api = self.api(&role.management_key)?;
        let made = Made {
            management_key: role.management_key.clone(),
            name: managed_name(&self.installation, ctx.lease_id),
            hash: None,
        };
        Ok(Prepared {
            fingerprint_material: Zeroizing::new(format!("pending:{}", ctx.lease_id).into_bytes()),
            credential: Credential::ApiKey {
                provider: EngineKind::Openrouter,
                api_key: SecretString::new(String::new()),
                base_url: api.base_url().to_owned(),
                expires_at: None,
            },
            engine_data: serde_json::to_value(&made)
                .map_err(|_| EngineError::Internal("openrouter: cannot record the lease".into()))?,
        })
    }

    async fn apply(&self, _: &IssueContext<'_>, _: &Prepared) -> Result<(), EngineError> {
        Err(EngineError::Internal(
            "openrouter: keys are minted by the provider (mint, not apply)".into(),
        ))
    }

    async fn mint(
        &self,
        ctx: &IssueContext<'_>,
        prepared: &Prepared,
    ) -> Result<Option<Prepared>, EngineError> {
        let RoleKind::Openrouter(role) = &ctx.role.kind else {
            return Err(ctx.not_for(EngineKind::Openrouter));
        };
        let mut made: Made = serde_json::from_value(prepared.engine_data.clone())
            .map_err(|_| EngineError::Internal("openrouter: the lease records no key".into()))?;
        let api = self.api(&made.management_key)?;
        // INVARIANT (DESIGN.md 1): the key's own expiry is the task's end.
        let end = ctx.task.expires_at;
        if self.clock.now().until(end) < 1000 {
            return Err(EngineError::BadRequest(
                "the task ends in less than a second: no key can be made for it".into(),
            ));
        }
        let step = "creating the key";
        let body = create_body(&made.name, role, end);
        let a = api.call(Method::POST, "/keys", Some(&body), step).await?;
        if !a.status.is_success() {
            return Err(api.unexpected(step, a.status));
        }
        let (Some(key), Some(hash)) = (a.body["key"].as_str(), a.body["data"]["hash"].as_str())
        else {
            return Err(api.malformed(step));
        };
        made.hash = Some(hash.to_owned());
        let key = Zeroizing::new(key.to_owned());
        tracing::info!(lease = ctx.lease_id, hash, "openrouter: key created");
        Ok(Some(Prepared {
            fingerprint_material: Zeroizing::new(key.as_bytes().to_vec()),
            credential: Credential::ApiKey {
                provider: EngineKind::Openrouter,
                api_key: SecretString::new(key.to_string()),
                base_url: api.base_url().to_owned(),
                expires_at: u64::try_from(end.unix_seconds()).ok(),
            },
            engine_data: serde_json::to_value(&made)
                .map_err(|_| EngineError::Internal("openrouter: cannot record the lease".into()))?,
        }))
    }

    async fn revoke(&self, lease: &Lease) -> Result<(), EngineError> {
        let made: Made = serde_json::from_value(lease.engine_data.clone()).map_err(|_| {
            EngineError::Internal(format!("lease `{}` records no openrouter key", lease.id))
        })?;
        let api = self.api(&made.management_key)?;
        let hash = match &made.hash {
            Some(h) => h.clone(),
            None => match self
                .list_keys(api)
                .await?
                .into_iter()
                .find(|(l, _)| *l == lease.id)
            {
                Some((_, h)) => h,
                // Nothing was made.
                None => return Ok(()),
            },
        };
        let path = format!("/keys/{}", segment(&hash));
        let step = "disabling the key";
        let a = api
            .call(Method::PATCH, &path, Some(&json!({"disabled": true})), step)
            .await?;
        if a.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        if !a.status.is_success() {
            return Err(api.unexpected(step, a.status));
        }
        let step = "deleting the key";
        let a = api.call(Method::DELETE, &path, None, step).await?;
        if !(a.status.is_success() || a.status == StatusCode::NOT_FOUND) {
            return Err(api.unexpected(step, a.status));
        }
        tracing::info!(lease = %lease.id, hash = %hash, "openrouter: key deleted");
        Ok(())
    }

    async fn managed(&self) -> Result<Vec<Managed>, EngineError> {
        let mut out = Vec::new();
        let upstreams: BTreeSet<&String> = self.apis.keys().collect();
        for upstream in upstreams {
            let api = self.api(upstream)?;
            for (lease, hash) in self.list_keys(api).await? {
                out.push(Managed {
                    engine_data: serde_json::to_value(Made {
                        management_key: upstream.clone(),
                        name: managed_name(&self.installation, &lease),
                        hash: Some(hash),
                    })
                    .unwrap_or(Value::Null),
                    lease_id: lease,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keymint_core::role::{LimitReset, OpenRouterRole};

    #[test]
    fn the_create_body_follows_the_documented_names() {
        let role = OpenRouterRole {
            management_key: "or".into(),
            max_spend_usd: Some(2.5),
            limit_reset: Some(LimitReset::Daily),
        };
        let end = Timestamp::from_millis(1_800_000_000_000);
        let b = create_body("keymint-x-lse_1", &role, end);
        assert_eq!(b["name"], "keymint-x-lse_1");
        assert_eq!(b["limit"], 2.5);
        assert_eq!(b["limit_reset"], "daily");
        assert_eq!(b["expires_at"], "2027-01-15T08:00:00.000Z");
        let none = OpenRouterRole {
            management_key: "or".into(),
            max_spend_usd: None,
            limit_reset: None,
        };
        let b = create_body("n", &none, end);
        assert!(b.get("limit").is_none() && b.get("limit_reset").is_none());
    }
}
