//! OpenAI API keys that exist for one lease, made with OpenAI's Admin API
//! (docs/design/0017-provider-keys.md).
//!
//! Per lease, a project service account named
//! `keymint-<installation>-<lease id>` and an API key for it:
//!
//! - without key scopes, one call: `POST
//!   /organization/projects/{project}/service_accounts` with `name` and
//!   `expires_in_seconds`, whose answer carries the account's first API key
//!   (`api_key.value`, `api_key.expires_at`);
//! - with scopes, the account alone (`create_service_account_only`), then
//!   `POST …/service_accounts/{id}/api_keys` with `name`,
//!   `expires_in_seconds` and `scopes`.
//!
//! `expires_in_seconds` runs to the task's end (never past it), so the key
//! dies with the task at OpenAI even if keymint is gone; renewing a lease
//! within its task needs no call. Revoking deletes the key (`DELETE
//! /organization/projects/{project}/api_keys/{key}`) and the account
//! (`DELETE …/service_accounts/{id}`); a 404 counts as done, so a retry
//! after a lost answer succeeds. A lease whose key id keymint never learnt
//! (a crash between the call and the record) is found by its name.
//! Reconciliation lists the project's service accounts and reports the ones
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

/// The longest `expires_in_seconds` the API takes (a year).
pub const MAX_EXPIRES_IN: i64 = 31_536_000;

/// Page size when listing service accounts (the API's maximum).
const PAGE: u32 = 100;

/// What a lease records about what it made at OpenAI (its `engine_data`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Made {
    /// The `[[upstreams]]` entry of the admin key.
    admin_key: String,
    project: String,
    /// The service account's name (`keymint-<installation>-<lease>`).
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service_account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api_key: Option<String>,
}

#[derive(Debug)]
pub struct OpenAiEngine {
    /// Admin APIs by the upstream that holds their key.
    apis: HashMap<String, AdminApi>,
    /// `(admin upstream, project)` of every openai role, for reconciliation.
    projects: BTreeSet<(String, String)>,
    installation: String,
    clock: Arc<dyn Clock>,
}

impl OpenAiEngine {
    /// `apis`: one per admin-key upstream the roles name; `projects`: the
    /// `(admin upstream, project)` pairs the roles name.
    pub fn new(
        apis: Vec<AdminApi>,
        projects: impl IntoIterator<Item = (String, String)>,
        installation: &str,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            apis: apis
                .into_iter()
                .map(|a| (a.upstream().to_owned(), a))
                .collect(),
            projects: projects.into_iter().collect(),
            installation: installation.to_owned(),
            clock,
        }
    }

    fn api(&self, upstream: &str) -> Result<&AdminApi, EngineError> {
        self.apis.get(upstream).ok_or_else(|| {
            EngineError::Internal(format!("openai: upstream `{upstream}` is not configured"))
        })
    }

    /// Every service account in `project` named by this installation, as
    /// `(lease id, account id)`.
    async fn list_accounts(
        &self,
        api: &AdminApi,
        project: &str,
    ) -> Result<Vec<(String, String)>, EngineError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        // A bound on pages, so that a provider that never says "no more"
        // cannot keep keymint listing.
        for _ in 0..1000 {
            let mut path = format!(
                "/organization/projects/{}/service_accounts?limit={PAGE}",
                segment(project)
            );
            if let Some(a) = &after {
                path.push_str("&after=");
                path.push_str(&segment(a));
            }
            let step = "listing service accounts";
            let a = api.call(Method::GET, &path, None, step).await?;
            if a.status != StatusCode::OK {
                return Err(api.unexpected(step, a.status));
            }
            let data = a.body["data"]
                .as_array()
                .ok_or_else(|| api.malformed(step))?;
            for sa in data {
                let (Some(id), Some(name)) = (sa["id"].as_str(), sa["name"].as_str()) else {
                    continue;
                };
                if let Some(lease) = lease_of(&self.installation, name) {
                    out.push((lease.to_owned(), id.to_owned()));
                }
            }
            let last = data
                .last()
                .and_then(|d| d["id"].as_str())
                .map(str::to_owned);
            match (a.body["has_more"].as_bool(), last) {
                (Some(true), Some(l)) => after = Some(l),
                _ => return Ok(out),
            }
        }
        Ok(out)
    }

    /// Deletes `path`; a 404 (already gone) counts as done.
    async fn delete(&self, api: &AdminApi, path: &str, step: &str) -> Result<(), EngineError> {
        let a = api.call(Method::DELETE, path, None, step).await?;
        match a.status {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            s => Err(api.unexpected(step, s)),
        }
    }

    /// Seconds from now to the task's end, within what the API takes.
    fn expires_in(&self, task_end: Timestamp) -> Result<i64, EngineError> {
        let secs = self.clock.now().until(task_end) / 1000;
        if secs < 1 {
            return Err(EngineError::BadRequest(
                "the task ends in less than a second: no key can be made for it".into(),
            ));
        }
        Ok(secs.min(MAX_EXPIRES_IN))
    }
}

/// How far OpenAI's clock may run ahead of keymint's: the expiry it reports
/// is its own clock plus the seconds keymint asked for.
pub const CLOCK_SKEW_SECS: i64 = 60;

/// The key's expiry as OpenAI reports it must be set and not past the
/// task's end, give or take the two clocks' difference (DESIGN.md
/// invariant 1: what keymint asked for ends at the task's end).
fn check_expiry(expires_at: Option<i64>, task_end: Timestamp) -> Result<u64, EngineError> {
    match expires_at {
        Some(e) if e <= task_end.unix_seconds() + CLOCK_SKEW_SECS && e > 0 => Ok(e as u64),
        _ => Err(EngineError::Rejected(
            "openai: the key's expiry is missing or past the task's end".into(),
        )),
    }
}

#[async_trait]
impl Engine for OpenAiEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Openai
    }

    fn revocability(&self) -> Revocability {
        Revocability::Revocable
    }

    fn is_local(&self) -> bool {
        false
    }

    fn prepare(&self, ctx: &IssueContext<'_>) -> Result<Prepared, EngineError> {
        let RoleKind::Openai(role) = &ctx.role.kind else {
            return Err(ctx.not_for(EngineKind::Openai));
        };
        let api = self.api(&role.admin_key)?;
        let made = Made {
            admin_key: role.admin_key.clone(),
            project: role.project.clone(),
            name: managed_name(&self.installation, ctx.lease_id),
            service_account: None,
            api_key: None,
        };
        Ok(Prepared {
            // OpenAI makes the key: until it has, the lease is known by a
            // fingerprint of its own id (replaced at activation).
            fingerprint_material: Zeroizing::new(format!("pending:{}", ctx.lease_id).into_bytes()),
            credential: Credential::ApiKey {
                provider: EngineKind::Openai,
                api_key: SecretString::new(String::new()),
                base_url: api.base_url().to_owned(),
                expires_at: None,
            },
            engine_data: serde_json::to_value(&made)
                .map_err(|_| EngineError::Internal("openai: cannot record the lease".into()))?,
        })
    }

    async fn apply(&self, _: &IssueContext<'_>, _: &Prepared) -> Result<(), EngineError> {
        Err(EngineError::Internal(
            "openai: keys are minted by the provider (mint, not apply)".into(),
        ))
    }

    async fn mint(
        &self,
        ctx: &IssueContext<'_>,
        prepared: &Prepared,
    ) -> Result<Option<Prepared>, EngineError> {
        let RoleKind::Openai(role) = &ctx.role.kind else {
            return Err(ctx.not_for(EngineKind::Openai));
        };
        let mut made: Made = serde_json::from_value(prepared.engine_data.clone())
            .map_err(|_| EngineError::Internal("openai: the lease records no account".into()))?;
        let api = self.api(&made.admin_key)?;
        // INVARIANT (DESIGN.md 1): the key's own expiry is the task's end
        // at the latest.
        let task_end = ctx.task.expires_at;
        let expires_in = self.expires_in(task_end)?;
        let accounts = format!(
            "/organization/projects/{}/service_accounts",
            segment(&made.project)
        );
        let step = "creating the service account";
        let body = if role.scopes.is_empty() {
            json!({"name": made.name, "expires_in_seconds": expires_in})
        } else {
            json!({"name": made.name, "create_service_account_only": true})
        };
        let a = api.call(Method::POST, &accounts, Some(&body), step).await?;
        if !a.status.is_success() {
            return Err(api.unexpected(step, a.status));
        }
        let sa = a.body["id"]
            .as_str()
            .ok_or_else(|| api.malformed(step))?
            .to_owned();
        made.service_account = Some(sa.clone());
        let key: Value = if role.scopes.is_empty() {
            a.body["api_key"].clone()
        } else {
            let step = "creating the api key";
            let body = json!({
                "name": made.name,
                "expires_in_seconds": expires_in,
                "scopes": role.scopes,
            });
            let path = format!("{accounts}/{}/api_keys", segment(&sa));
            let k = api.call(Method::POST, &path, Some(&body), step).await?;
            if !k.status.is_success() {
                return Err(api.unexpected(step, k.status));
            }
            k.body
        };
        let step = "reading the api key";
        let (Some(value), Some(key_id)) = (key["value"].as_str(), key["id"].as_str()) else {
            return Err(api.malformed(step));
        };
        made.api_key = Some(key_id.to_owned());
        let value = Zeroizing::new(value.to_owned());
        let expires_at = check_expiry(key["expires_at"].as_i64(), task_end)?;
        tracing::info!(lease = ctx.lease_id, service_account = %sa, "openai: key created");
        Ok(Some(Prepared {
            fingerprint_material: Zeroizing::new(value.as_bytes().to_vec()),
            credential: Credential::ApiKey {
                provider: EngineKind::Openai,
                api_key: SecretString::new(value.to_string()),
                base_url: api.base_url().to_owned(),
                expires_at: Some(expires_at),
            },
            engine_data: serde_json::to_value(&made)
                .map_err(|_| EngineError::Internal("openai: cannot record the lease".into()))?,
        }))
    }

    async fn revoke(&self, lease: &Lease) -> Result<(), EngineError> {
        let made: Made = serde_json::from_value(lease.engine_data.clone()).map_err(|_| {
            EngineError::Internal(format!("lease `{}` records no openai account", lease.id))
        })?;
        let api = self.api(&made.admin_key)?;
        let project = segment(&made.project);
        if let Some(key) = &made.api_key {
            let path = format!("/organization/projects/{project}/api_keys/{}", segment(key));
            self.delete(api, &path, "deleting the api key").await?;
        }
        // The account's id, or (a crash before it was recorded) the account
        // found by its name; none at all: nothing was made.
        let sa = match &made.service_account {
            Some(sa) => Some(sa.clone()),
            None => self
                .list_accounts(api, &made.project)
                .await?
                .into_iter()
                .find(|(l, _)| *l == lease.id)
                .map(|(_, sa)| sa),
        };
        if let Some(sa) = sa {
            let path = format!(
                "/organization/projects/{project}/service_accounts/{}",
                segment(&sa)
            );
            // Deleting the account takes its keys with it.
            self.delete(api, &path, "deleting the service account")
                .await?;
            tracing::info!(lease = %lease.id, service_account = %sa, "openai: key deleted");
        }
        Ok(())
    }

    async fn managed(&self) -> Result<Vec<Managed>, EngineError> {
        let mut out = Vec::new();
        for (upstream, project) in &self.projects {
            let api = self.api(upstream)?;
            for (lease, sa) in self.list_accounts(api, project).await? {
                out.push(Managed {
                    engine_data: serde_json::to_value(Made {
                        admin_key: upstream.clone(),
                        project: project.clone(),
                        name: managed_name(&self.installation, &lease),
                        service_account: Some(sa),
                        api_key: None,
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

    #[test]
    fn a_key_without_an_expiry_or_past_the_task_is_refused() {
        let end = Timestamp::from_millis(1_000_000_000);
        assert_eq!(check_expiry(Some(999_999), end), Ok(999_999));
        assert_eq!(check_expiry(Some(1_000_060), end), Ok(1_000_060));
        assert!(check_expiry(Some(1_000_061), end).is_err());
        assert!(check_expiry(Some(31_536_000_000), end).is_err());
        assert!(check_expiry(None, end).is_err());
        assert!(check_expiry(Some(0), end).is_err());
    }
}
