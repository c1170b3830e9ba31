//! The leak response (docs/design/0027): what keymint does at the provider
//! when a scan reports one of its keys, as `[[inventory.responses]]` says:
//!
//! - OpenAI: the project key is found by its redacted value in
//!   `GET /v1/organization/projects/{project}/api_keys` and deleted
//!   (`DELETE …/api_keys/{id}`); OpenAI has no way to disable a key, so
//!   `suspend` deletes too.
//! - Anthropic: the key is found by its `partial_key_hint` in
//!   `GET /v1/organizations/api_keys` and set `inactive`
//!   (`POST /v1/organizations/api_keys/{id}`); the Admin API cannot delete
//!   keys, and `inactive` stops it at once.
//! - OpenRouter: found by its `label` in `GET /api/v1/keys`, disabled
//!   (`PATCH /keys/{hash}`), and for `revoke` then deleted.
//!
//! The key is matched by its hint only (keymint never has the key itself);
//! no match or more than one match changes nothing at the provider and is
//! reported as `failed` with the revocation path, so an operator acts.
//! Every response is audited (`leak.response`) with the finding's
//! locations.

use std::sync::Arc;

use http::{Method, StatusCode};
use keymint_core::audit::AuditDraft;
use keymint_core::inventory::{self, InventoryItem, ItemStatus};
use keymint_engines::EngineError;
use keymint_engines::provider::{AdminApi, segment};
use keymint_proto::inventory::LeakResponse;
use serde_json::{Value, json};

use super::Broker;
use crate::admin_keys::SealedAdminKeys;
use crate::inventory_config::{LeakAction, LeakProvider, LeakResponseConfig};

/// Pages read from a provider's key list at most (100 keys a page).
const MAX_PAGES: usize = 50;

/// What a provider call ended in.
pub(super) enum Done {
    Revoked(String),
    Suspended(String),
}

impl Done {
    /// What was done, for people.
    pub(super) fn detail(self) -> String {
        match self {
            Self::Revoked(d) | Self::Suspended(d) => d,
        }
    }
}

impl Broker {
    /// Responds to the leak of `item` (a key keymint does not issue), as
    /// configured for its provider; audited with `locations`.
    pub(crate) async fn respond_to_leak(
        &self,
        item: &InventoryItem,
        locations: &[String],
        actor: &str,
    ) -> LeakResponse {
        let settings = self.inventory_settings();
        let cfg = settings.config.response(&item.provider).cloned();
        let (outcome, detail, status) = match (&cfg, item.status) {
            (_, ItemStatus::Revoked) => (
                "revoked",
                "already revoked at the provider".to_owned(),
                None,
            ),
            (None, _) => ("alerted", item.revocation.clone(), None),
            (Some(c), _) if c.action == LeakAction::Alert => {
                ("alerted", item.revocation.clone(), None)
            }
            (Some(c), _) => match self.act_at_provider(c, item).await {
                Ok(Done::Revoked(d)) => ("revoked", d, Some(ItemStatus::Revoked)),
                Ok(Done::Suspended(d)) => ("suspended", d, Some(ItemStatus::Suspended)),
                Err(e) => (
                    "failed",
                    format!("{e}; revoke it by hand: {}", item.revocation),
                    None,
                ),
            },
        };
        if let Some(s) = status
            && let Err(e) = self.set_item_status(&item.id, s, actor, &detail).await
        {
            tracing::error!(item = %item.id, error = %e, "cannot record a leak response's outcome");
        }
        let ev = AuditDraft::new(self.now(), "leak.response", actor.to_owned())
            .fingerprint(item.fingerprint.clone())
            .data("item", item.id.clone())
            .data("provider", item.provider.clone())
            .data("outcome", outcome)
            .data("detail", detail.clone())
            .data("locations", locations.to_vec());
        let ev = if outcome == "failed" {
            ev.outcome(keymint_core::audit::Outcome::Failure)
        } else {
            ev
        };
        if let Err(e) = self.store.append_audit(ev).await {
            tracing::error!(error = %e, "cannot audit a leak response");
        }
        self.notify_audit();
        LeakResponse {
            item: item.id.clone(),
            provider: item.provider.clone(),
            rule: item.rule.clone().unwrap_or_default(),
            outcome: outcome.to_owned(),
            detail,
        }
    }

    fn admin_api(&self, c: &LeakResponseConfig) -> Result<AdminApi, EngineError> {
        let upstream = c.admin_key.as_deref().unwrap_or_default();
        let settings = self.inventory_settings();
        let Some((_, base, timeout)) = settings.upstreams.get(upstream) else {
            return Err(EngineError::Rejected(format!(
                "no upstream is named `{upstream}`"
            )));
        };
        let keys = Arc::new(SealedAdminKeys {
            store: Arc::clone(&self.store),
            keyring: Arc::clone(&self.keyring),
        });
        let timeout = (*timeout).min(std::time::Duration::from_secs(30));
        let api = AdminApi::new(c.provider.as_str(), upstream, base, timeout, keys)?;
        Ok(match c.provider {
            LeakProvider::Anthropic => {
                api.with_key_header("x-api-key", &[("anthropic-version", "2023-06-01")])
            }
            _ => api,
        })
    }

    async fn act_at_provider(
        &self,
        c: &LeakResponseConfig,
        item: &InventoryItem,
    ) -> Result<Done, EngineError> {
        let Some(hint) = item.hint.as_deref() else {
            return Err(EngineError::Rejected(
                "the report carried no hint to find the key at the provider".into(),
            ));
        };
        let api = self.admin_api(c)?;
        match c.provider {
            LeakProvider::OpenAi => openai(&api, &c.projects, hint).await,
            LeakProvider::Anthropic => anthropic(&api, hint).await,
            LeakProvider::OpenRouter => openrouter(&api, hint, c.action).await,
        }
    }
}

/// The end of the refusal when the provider lists no key with the hint (a
/// key deleted already is no longer listed).
pub(super) const NOT_LISTED: &str = "no key with this hint was found";

/// Exactly one match, or why not.
fn one<T>(mut found: Vec<T>, provider: &str) -> Result<T, EngineError> {
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(EngineError::Rejected(format!("{provider}: {NOT_LISTED}"))),
        n => Err(EngineError::Rejected(format!(
            "{provider}: {n} keys share this hint; none was changed"
        ))),
    }
}

fn str_of<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

pub(super) async fn openai(
    api: &AdminApi,
    projects: &[String],
    hint: &str,
) -> Result<Done, EngineError> {
    let mut found: Vec<(String, String)> = Vec::new();
    for project in projects {
        let mut after: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut path = format!(
                "/organization/projects/{}/api_keys?limit=100",
                segment(project)
            );
            if let Some(a) = &after {
                path.push_str(&format!("&after={}", segment(a)));
            }
            let a = api
                .call(Method::GET, &path, None, "list project keys")
                .await?;
            if a.status != StatusCode::OK {
                return Err(api.unexpected("list project keys", a.status));
            }
            let data = a
                .body
                .get("data")
                .and_then(Value::as_array)
                .ok_or_else(|| api.malformed("list project keys"))?;
            for k in data {
                if let (Some(id), Some(r)) = (str_of(k, "id"), str_of(k, "redacted_value"))
                    && inventory::hint_matches(hint, r)
                {
                    found.push((project.clone(), id.to_owned()));
                }
            }
            let more = a.body.get("has_more").and_then(Value::as_bool) == Some(true);
            after = str_of(&a.body, "last_id").map(str::to_owned);
            if !more || after.is_none() {
                break;
            }
        }
    }
    let (project, id) = one(found, "openai")?;
    let path = format!(
        "/organization/projects/{}/api_keys/{}",
        segment(&project),
        segment(&id)
    );
    let a = api
        .call(Method::DELETE, &path, None, "delete project key")
        .await?;
    if a.status != StatusCode::OK && a.status != StatusCode::NOT_FOUND {
        return Err(api.unexpected("delete project key", a.status));
    }
    Ok(Done::Revoked(format!(
        "project key `{id}` of project `{project}` deleted"
    )))
}

pub(super) async fn anthropic(api: &AdminApi, hint: &str) -> Result<Done, EngineError> {
    // The Admin API lives under `/v1`; an upstream's base URL may or may
    // not include it.
    let v1 = if api.base_url().ends_with("/v1") {
        ""
    } else {
        "/v1"
    };
    let mut found: Vec<(String, String)> = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let mut path = format!("{v1}/organizations/api_keys?limit=100");
        if let Some(a) = &after {
            path.push_str(&format!("&after_id={}", segment(a)));
        }
        let a = api.call(Method::GET, &path, None, "list api keys").await?;
        if a.status != StatusCode::OK {
            return Err(api.unexpected("list api keys", a.status));
        }
        let data = a
            .body
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| api.malformed("list api keys"))?;
        for k in data {
            if let (Some(id), Some(h)) = (str_of(k, "id"), str_of(k, "partial_key_hint"))
                && inventory::hint_matches(hint, h)
            {
                found.push((id.to_owned(), str_of(k, "status").unwrap_or("").to_owned()));
            }
        }
        let more = a.body.get("has_more").and_then(Value::as_bool) == Some(true);
        after = str_of(&a.body, "last_id").map(str::to_owned);
        if !more || after.is_none() {
            break;
        }
    }
    let (id, status) = one(found, "anthropic")?;
    if status == "inactive" || status == "archived" {
        return Ok(Done::Suspended(format!(
            "api key `{id}` was already {status}"
        )));
    }
    let path = format!("{v1}/organizations/api_keys/{}", segment(&id));
    let a = api
        .call(
            Method::POST,
            &path,
            Some(&json!({"status": "inactive"})),
            "set key inactive",
        )
        .await?;
    if a.status != StatusCode::OK {
        return Err(api.unexpected("set key inactive", a.status));
    }
    if str_of(&a.body, "status") != Some("inactive") {
        return Err(api.malformed("set key inactive"));
    }
    Ok(Done::Suspended(format!("api key `{id}` set inactive")))
}

pub(super) async fn openrouter(
    api: &AdminApi,
    hint: &str,
    action: LeakAction,
) -> Result<Done, EngineError> {
    let mut found: Vec<String> = Vec::new();
    let mut offset = 0usize;
    for _ in 0..MAX_PAGES {
        let path = format!("/keys?include_disabled=true&offset={offset}");
        let a = api.call(Method::GET, &path, None, "list keys").await?;
        if a.status != StatusCode::OK {
            return Err(api.unexpected("list keys", a.status));
        }
        let data = a
            .body
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| api.malformed("list keys"))?;
        for k in data {
            if let (Some(h), Some(l)) = (str_of(k, "hash"), str_of(k, "label"))
                && inventory::hint_matches(hint, l)
            {
                found.push(h.to_owned());
            }
        }
        if data.is_empty() {
            break;
        }
        offset += data.len();
    }
    let hash = one(found, "openrouter")?;
    let path = format!("/keys/{}", segment(&hash));
    let a = api
        .call(
            Method::PATCH,
            &path,
            Some(&json!({"disabled": true})),
            "disable key",
        )
        .await?;
    if a.status != StatusCode::OK && a.status != StatusCode::NOT_FOUND {
        return Err(api.unexpected("disable key", a.status));
    }
    if action == LeakAction::Suspend {
        return Ok(Done::Suspended(format!("key `{hash}` disabled")));
    }
    let a = api.call(Method::DELETE, &path, None, "delete key").await?;
    if a.status != StatusCode::OK && a.status != StatusCode::NOT_FOUND {
        return Err(api.unexpected("delete key", a.status));
    }
    Ok(Done::Revoked(format!("key `{hash}` disabled and deleted")))
}
