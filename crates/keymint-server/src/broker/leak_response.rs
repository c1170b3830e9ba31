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
use std::time::Duration;

use http::{Method, StatusCode};
use keymint_core::audit::AuditDraft;
use keymint_core::clock::Timestamp;
use keymint_core::inventory::{self, InventoryItem, ItemStatus, ResponseDue};
use keymint_engines::EngineError;
use keymint_engines::provider::{AdminApi, segment};
use keymint_proto::inventory::LeakResponse;
use serde_json::{Value, json};

use super::Broker;
use crate::admin_keys::SealedAdminKeys;
use crate::inventory_config::{LeakAction, LeakProvider, LeakResponseConfig};

/// Pages read from a provider's key list at most (100 keys a page).
const MAX_PAGES: usize = 50;
/// Writes over a version read before giving up on a change.
const CAS_TRIES: usize = 5;
/// The longest wait between two attempts of a leak response.
const MAX_BACKOFF_SECS: u64 = 600;

/// 1, 2, 4 … s after the `attempt`th failure, at most 10 minutes.
fn backoff_secs(attempt: u32) -> u64 {
    1u64.checked_shl(attempt.saturating_sub(1).min(20))
        .unwrap_or(MAX_BACKOFF_SECS)
        .min(MAX_BACKOFF_SECS)
}

/// What an attempt leaves owed.
#[derive(Debug, Clone, Copy)]
enum Settle {
    /// Nothing: confirmed, refused for good, or nothing to do.
    Done,
    /// Try again at this time.
    Retry(Timestamp),
    /// Unchanged (another attempt holds it).
    Keep,
}

/// Whether this report may call the provider now.
#[derive(Debug)]
enum Claim {
    /// Yes: the attempt with this number.
    Took(u32),
    /// Nothing is recorded as due: one unrecorded attempt.
    NotOwed(u32),
    /// Not before this time.
    NotDue(Timestamp),
}

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
    /// configured for its provider; audited with `locations`. A provider
    /// that fails for now (unreachable, busy, 5xx) leaves the response due
    /// in the entry, and [`Broker::run_leak_responses`] tries again with
    /// backoff until the provider confirms (docs/design/0049).
    pub(crate) async fn respond_to_leak(
        &self,
        item: &InventoryItem,
        locations: &[String],
        actor: &str,
    ) -> LeakResponse {
        let settings = self.inventory_settings();
        let cfg = settings.config.response(&item.provider).cloned();
        let mut attempt = 0;
        let (outcome, detail, status, settle) = match (&cfg, item.status) {
            (_, ItemStatus::Revoked) => (
                "revoked",
                "already revoked at the provider".to_owned(),
                None,
                Settle::Done,
            ),
            (None, _) => ("alerted", item.revocation.clone(), None, Settle::Done),
            (Some(c), _) if c.action == LeakAction::Alert => {
                ("alerted", item.revocation.clone(), None, Settle::Done)
            }
            (Some(c), _) => match self.claim_response(c, item, actor).await {
                Claim::NotDue(at) => (
                    "pending",
                    format!(
                        "an attempt is under way or scheduled (next at {}); retried until the provider confirms",
                        at.rfc3339()
                    ),
                    None,
                    Settle::Keep,
                ),
                Claim::Took(n) | Claim::NotOwed(n) => {
                    attempt = n;
                    self.attempt_response(c, item, n).await
                }
            },
        };
        if let Some(s) = status
            && let Err(e) = self.set_item_status(&item.id, s, actor, &detail).await
        {
            tracing::error!(item = %item.id, error = %e, "cannot record a leak response's outcome");
        }
        let mut ev = AuditDraft::new(self.now(), "leak.response", actor.to_owned())
            .fingerprint(item.fingerprint.clone())
            .data("item", item.id.clone())
            .data("provider", item.provider.clone())
            .data("outcome", outcome)
            .data("detail", detail.clone())
            .data("locations", locations.to_vec());
        if attempt > 0 {
            ev = ev.data("attempt", attempt);
        }
        if let Settle::Retry(at) = settle {
            ev = ev.data("next_attempt_at", at.rfc3339());
        }
        let ev = if outcome == "failed" {
            ev.outcome(keymint_core::audit::Outcome::Failure)
        } else {
            ev
        };
        self.settle_response(&item.id, settle, ev).await;
        if matches!(settle, Settle::Retry(_)) {
            self.leak_wake.notify_one();
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

    /// One call at the provider, and what it settles.
    async fn attempt_response(
        &self,
        c: &LeakResponseConfig,
        item: &InventoryItem,
        attempt: u32,
    ) -> (&'static str, String, Option<ItemStatus>, Settle) {
        match self.act_at_provider(c, item).await {
            Ok(Done::Revoked(d)) => ("revoked", d, Some(ItemStatus::Revoked), Settle::Done),
            Ok(Done::Suspended(d)) => ("suspended", d, Some(ItemStatus::Suspended), Settle::Done),
            // An earlier attempt's deletion reached the provider but its
            // answer did not reach keymint (a crash, a time-out): a
            // deleted key is no longer listed.
            Err(EngineError::Rejected(m))
                if attempt > 1 && m.ends_with(NOT_LISTED) && c.deletes() =>
            {
                (
                    "revoked",
                    format!("{m}: deleted by an earlier attempt"),
                    Some(ItemStatus::Revoked),
                    Settle::Done,
                )
            }
            Err(e @ EngineError::Unavailable(_)) if attempt > 0 => {
                let at = self.now().plus_secs(backoff_secs(attempt));
                (
                    "failed",
                    format!(
                        "{e}; tried again at {} until the provider confirms, or revoke it by hand: {}",
                        at.rfc3339(),
                        item.revocation
                    ),
                    None,
                    Settle::Retry(at),
                )
            }
            Err(e) => (
                "failed",
                format!("{e}; revoke it by hand: {}", item.revocation),
                None,
                Settle::Done,
            ),
        }
    }

    /// Takes the response due on `item` for one attempt (compare-and-set
    /// on the entry, audited `leak.response_started`), so two processes
    /// never call the provider for it at once and a crash mid-call is
    /// taken up once the claim runs out.
    async fn claim_response(
        &self,
        c: &LeakResponseConfig,
        item: &InventoryItem,
        actor: &str,
    ) -> Claim {
        let claim_ms = self.response_claim_ms(c);
        for _ in 0..CAS_TRIES {
            let cur = match self.store.get_inventory(&item.id).await {
                Ok(Some(i)) => i,
                Ok(None) => return Claim::NotOwed(0),
                Err(e) => {
                    tracing::error!(item = %item.id, error = %e, "cannot read a leak response's entry");
                    return Claim::NotDue(self.now());
                }
            };
            let Some(due) = cur.response_due.clone() else {
                // Nothing recorded (no hint to find the key by): one
                // attempt, which says why it cannot be done.
                return Claim::NotOwed(0);
            };
            let now = self.now();
            if due.next_at > now {
                return Claim::NotDue(due.next_at);
            }
            let n = due.attempts.saturating_add(1);
            let read = cur.version;
            let mut next = cur;
            next.response_due = Some(ResponseDue {
                attempts: n,
                next_at: now.plus_millis(claim_ms),
            });
            let ev = AuditDraft::new(now, "leak.response_started", actor.to_owned())
                .fingerprint(next.fingerprint.clone())
                .data("provider", next.provider.clone())
                .data("attempt", n);
            match self.put_item(next, read, ev).await {
                Ok(Some(_)) => return Claim::Took(n),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(item = %item.id, error = %e, "cannot claim a leak response");
                    return Claim::NotDue(self.now());
                }
            }
        }
        Claim::NotDue(self.now())
    }

    /// How long one attempt holds its claim: two admin-call deadlines
    /// (list, then act) and 5 s.
    fn response_claim_ms(&self, c: &LeakResponseConfig) -> i64 {
        let settings = self.inventory_settings();
        let timeout = c
            .admin_key
            .as_deref()
            .and_then(|u| settings.upstreams.get(u))
            .map_or(Duration::from_secs(30), |(_, _, t)| *t)
            .min(Duration::from_secs(30));
        i64::try_from(timeout.as_millis())
            .unwrap_or(30_000)
            .saturating_mul(2)
            .saturating_add(5_000)
    }

    /// Records what an attempt settled, with its `leak.response` event in
    /// the same write when the entry changes; the event alone otherwise.
    async fn settle_response(&self, id: &str, settle: Settle, ev: AuditDraft) {
        if !matches!(settle, Settle::Keep) {
            for _ in 0..CAS_TRIES {
                let cur = match self.store.get_inventory(id).await {
                    Ok(Some(i)) => i,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(item = %id, error = %e, "cannot read a leak response's entry");
                        break;
                    }
                };
                let due = match settle {
                    // Settled meanwhile (another attempt confirmed):
                    // nothing is owed any more.
                    Settle::Retry(at) if cur.status != ItemStatus::Revoked => {
                        cur.response_due.as_ref().map(|d| ResponseDue {
                            attempts: d.attempts,
                            next_at: at,
                        })
                    }
                    _ => None,
                };
                if due == cur.response_due {
                    break;
                }
                let read = cur.version;
                let mut next = cur;
                next.response_due = due;
                match self.put_item(next, read, ev.clone()).await {
                    Ok(Some(_)) => return,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(item = %id, error = %e, "cannot record a leak response");
                        break;
                    }
                }
            }
        }
        if let Err(e) = self.store.append_audit(ev).await {
            tracing::error!(error = %e, "cannot audit a leak response");
        }
    }

    /// Drives the leak responses left due (a provider that failed, a
    /// process that died mid-call): a duty, so one process at a time.
    /// Looks again when the earliest falls due, when a response was left
    /// due here, and at least every minute (a replica's failures).
    pub async fn run_leak_responses(self: Arc<Self>) {
        loop {
            let next = match self.retry_due_responses().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the leak responses due");
                    None
                }
            };
            let wait = next
                .map_or(60_000, |t| self.now().until(t))
                .clamp(200, 60_000);
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(wait.unsigned_abs())) => {}
                () = self.leak_wake.notified() => {}
            }
        }
    }

    /// Attempts every response due now; answers when the next one is.
    async fn retry_due_responses(&self) -> super::Result<Option<Timestamp>> {
        let mut before: Option<String> = None;
        let mut next: Option<Timestamp> = None;
        loop {
            let page = self.store.list_inventory(before.as_deref(), 500).await?;
            let Some(last) = page.last() else { break };
            before = Some(last.id.clone());
            let full = page.len() == 500;
            for item in page {
                let Some(due) = &item.response_due else {
                    continue;
                };
                if due.next_at > self.now() {
                    next = Some(next.map_or(due.next_at, |n| n.min(due.next_at)));
                    continue;
                }
                let locations: Vec<String> = item
                    .sightings
                    .iter()
                    .rev()
                    .take(super::leaks::MAX_LOCATIONS)
                    .map(|s| s.location.clone())
                    .collect();
                self.respond_to_leak(&item, &locations, "keymint").await;
                // Its new due time, if any, is read on the next pass.
                let soon = self.now().plus_millis(200);
                next = Some(next.map_or(soon, |n| n.min(soon)));
            }
            if !full {
                break;
            }
        }
        Ok(next)
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
