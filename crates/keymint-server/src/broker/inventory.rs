//! The credential inventory (docs/design/0027-inventory-and-leak-response.md):
//! every credential keymint knows, with its owners, purpose, expiry, last
//! use, where it was seen and how it is revoked; and the findings on it,
//! evaluated on demand and by the duty loop, audited and announced once each.
//!
//! Stored entries are upstream keys keymint holds (synchronised from the
//! sealed `[[upstreams]]` keys), static keys an operator registered or
//! imported, keys a scan reported, and issued credentials a scan found
//! leaked. Live leases are listed beside them, made from the lease rows
//! (they have an owner, an expiry and an automatic revocation by
//! construction), so the inventory never copies what the lease table holds.
//!
//! No entry holds a secret: a fingerprint and a hint. Every change is one
//! store write with its audit event, over the version read (two operators
//! changing one entry at once cannot lose either change silently: the
//! second is refused with `conflict` and asked again).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use keymint_core::audit::AuditDraft;
use keymint_core::inventory::{
    self, Finding, FindingKind, InventoryItem, ItemStatus, Origin, Sighting,
};
use keymint_core::model::LeaseState;
use keymint_proto::inventory::{
    FindingList, InventoryChange, InventoryImport, InventoryPage, InventoryRetire,
};
use keymint_store::LeaseFilter;

use super::{Broker, BrokerError, Principal, Result};
use crate::inventory_config::InventoryConfig;

/// Longest free text (purpose, revocation step).
const MAX_TEXT: usize = 1024;
/// Longest name-like field (owners, environment, provider, workloads, scopes).
const MAX_NAME: usize = 128;
/// Most scopes or workloads on one entry.
const MAX_LIST: usize = 64;
/// How many times a write is retried when another write came first.
const CAS_TRIES: usize = 5;

/// What the broker needs for the inventory beyond itself: the
/// configuration and where each upstream's admin API is.
#[derive(Debug, Default)]
pub struct InventorySettings {
    pub config: InventoryConfig,
    /// Upstream name → (kind, base URL, timeout).
    pub upstreams: HashMap<String, (String, String, Duration)>,
    /// Where findings are announced.
    pub webhook: Option<String>,
}

pub(crate) fn check_text(what: &str, v: &str, max: usize) -> Result<()> {
    if !keymint_core::model::valid_text(v, max) {
        return Err(BrokerError::BadRequest(format!(
            "`{what}` must be at most {max} bytes without control or bidirectional formatting characters"
        )));
    }
    Ok(())
}

fn check_name(what: &str, v: &str) -> Result<()> {
    if v.is_empty()
        || v.len() > MAX_NAME
        || !v
            .chars()
            .all(|c| c.is_alphanumeric() || " ._-:/@+".contains(c))
    {
        return Err(BrokerError::BadRequest(format!(
            "`{what}` must be 1 to {MAX_NAME} letters, digits, spaces or `._-:/@+`"
        )));
    }
    Ok(())
}

fn check_fingerprint(fp: &str) -> Result<()> {
    if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(BrokerError::BadRequest(
            "`fingerprint` must be 64 hex digits (HMAC-SHA-256)".into(),
        ));
    }
    Ok(())
}

fn check_list(what: &str, v: &[String]) -> Result<()> {
    if v.len() > MAX_LIST {
        return Err(BrokerError::BadRequest(format!(
            "at most {MAX_LIST} `{what}`"
        )));
    }
    v.iter().try_for_each(|x| check_name(what, x))
}

/// Checks a change whole before anything is applied.
fn check_change(c: &InventoryChange) -> Result<()> {
    for (what, v) in [
        ("name", &c.name),
        ("provider", &c.provider),
        ("business_owner", &c.business_owner),
        ("technical_owner", &c.technical_owner),
        ("environment", &c.environment),
    ] {
        if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
            check_name(what, v)?;
        }
    }
    for (what, v) in [("purpose", &c.purpose), ("revocation", &c.revocation)] {
        if let Some(v) = v {
            check_text(what, v, MAX_TEXT)?;
        }
    }
    if let Some(fp) = &c.fingerprint {
        check_fingerprint(fp)?;
    }
    if let Some(h) = &c.hint
        && !inventory::is_hint(h)
    {
        return Err(BrokerError::BadRequest(
            "`hint` must be the key's first characters, `…` and its last four".into(),
        ));
    }
    if let Some(w) = &c.workloads {
        check_list("workloads", w)?;
    }
    if let Some(s) = &c.scopes {
        check_list("scopes", s)?;
    }
    Ok(())
}

/// `Some("")` clears, `Some(x)` sets, `None` keeps.
fn apply_opt(field: &mut Option<String>, v: &Option<String>) -> bool {
    match v {
        None => false,
        Some(s) if s.is_empty() => field.take().is_some(),
        Some(s) => {
            let changed = field.as_deref() != Some(s.as_str());
            *field = Some(s.clone());
            changed
        }
    }
}

/// Applies a change's facts to an entry; the names of the fields changed.
fn apply(item: &mut InventoryItem, c: &InventoryChange) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if let Some(n) = c.name.as_ref().filter(|n| !n.is_empty())
        && *n != item.name
    {
        item.name.clone_from(n);
        changed.push("name");
    }
    for (name, field, v) in [
        (
            "business_owner",
            &mut item.business_owner,
            &c.business_owner,
        ),
        (
            "technical_owner",
            &mut item.technical_owner,
            &c.technical_owner,
        ),
        ("purpose", &mut item.purpose, &c.purpose),
        ("environment", &mut item.environment, &c.environment),
    ] {
        if apply_opt(field, v) {
            changed.push(name);
        }
    }
    if let Some(r) = c.revocation.as_ref().filter(|r| !r.is_empty())
        && *r != item.revocation
    {
        item.revocation.clone_from(r);
        changed.push("revocation");
    }
    if let Some(w) = &c.workloads
        && *w != item.workloads
    {
        item.workloads.clone_from(w);
        changed.push("workloads");
    }
    if let Some(s) = &c.scopes
        && *s != item.scopes
    {
        item.scopes.clone_from(s);
        changed.push("scopes");
    }
    if let Some(v) = c.created_at
        && item.created_at != v
    {
        item.created_at = v;
        changed.push("created_at");
    }
    for (name, field, v) in [
        ("expires_at", &mut item.expires_at, c.expires_at),
        ("last_used_at", &mut item.last_used_at, c.last_used_at),
        ("rotate_by", &mut item.rotate_by, c.rotate_by),
    ] {
        if v.is_some() && *field != v {
            *field = v;
            changed.push(name);
        }
    }
    changed
}

/// How a provider's keys are revoked, in words, for entries and alerts.
pub(crate) fn revocation_path(provider: &str, automatic: bool) -> String {
    match (provider, automatic) {
        ("keymint", _) => "automatic: keymint revokes the lease (`keymint lease revoke ID`)".into(),
        ("openai", true) => "automatic: OpenAI Admin API, DELETE /v1/organization/projects/{project}/api_keys/{key}".into(),
        ("anthropic", true) => "automatic: Anthropic Admin API, POST /v1/organizations/api_keys/{key} with status `inactive`".into(),
        ("openrouter", true) => "automatic: OpenRouter API, PATCH /api/v1/keys/{hash} with disabled, then DELETE".into(),
        ("openai", false) => "manual: delete the key at https://platform.openai.com/api-keys (or configure [[inventory.responses]] for openai)".into(),
        ("anthropic", false) => "manual: disable the key at https://console.anthropic.com/settings/keys (or configure [[inventory.responses]] for anthropic)".into(),
        ("openrouter", false) => "manual: delete the key at https://openrouter.ai/settings/keys (or configure [[inventory.responses]] for openrouter)".into(),
        (other, _) => format!("manual: revoke the key in the {other} console and replace it where it is used"),
    }
}

/// The provider a scanner rule belongs to (`openai.project-key` → `openai`).
pub(crate) fn provider_of(rule: &str) -> &str {
    rule.split('.').next().unwrap_or(rule)
}

impl Broker {
    /// Gives the broker its inventory settings (at start).
    pub fn set_inventory(&self, s: InventorySettings) {
        let _ = self.inventory.set(Arc::new(s));
    }

    pub(crate) fn inventory_settings(&self) -> Arc<InventorySettings> {
        self.inventory.get().cloned().unwrap_or_default()
    }

    async fn inventory_admin(&self, p: &Principal, what: &'static str) -> Result<()> {
        if let Err(e) = Self::require_admin(p) {
            self.deny(what, p, None, &e).await;
            return Err(e);
        }
        Ok(())
    }

    /// One write of an entry over the version read, with its audit event;
    /// `conflict` if another write came first.
    pub(crate) async fn put_item(
        &self,
        mut item: InventoryItem,
        read: u64,
        audit: AuditDraft,
    ) -> Result<Option<InventoryItem>> {
        item.version = read + 1;
        item.updated_at = self.now();
        let ok = self
            .store
            .put_inventory(item.clone(), read, audit.data("item", item.id.clone()))
            .await?;
        self.notify_audit();
        Ok(ok.then_some(item))
    }

    /// A page of the inventory (admin): stored entries newest first, then,
    /// on the first page, the live leases.
    pub async fn inventory_list(
        &self,
        p: &Principal,
        before: Option<String>,
        limit: u32,
        issued: bool,
    ) -> Result<InventoryPage> {
        self.inventory_admin(p, "inventory.list").await?;
        if let Some(b) = &before
            && !keymint_core::id::is_valid("inv_", b)
        {
            return Err(BrokerError::BadRequest(
                "`before` must be an inventory id".into(),
            ));
        }
        let limit = limit.clamp(1, 1000);
        let mut items = self.store.list_inventory(before.as_deref(), limit).await?;
        let next = (items.len() as u32 == limit)
            .then(|| items.last().map(|i| i.id.clone()))
            .flatten();
        if before.is_none() && issued {
            let stored: HashSet<String> = items.iter().map(|i| i.fingerprint.clone()).collect();
            let leases = self
                .store
                .list_leases(&LeaseFilter {
                    state: Some(LeaseState::Active),
                    limit: 1000,
                    ..LeaseFilter::default()
                })
                .await?;
            items.extend(
                leases
                    .into_iter()
                    .filter(|l| !stored.contains(&l.fingerprint))
                    .map(|l| issued_item(&l)),
            );
        }
        Ok(InventoryPage { items, next })
    }

    /// One entry (admin): a stored one by `inv_…` id, or a lease by `lse_…`.
    pub async fn inventory_show(&self, p: &Principal, id: &str) -> Result<InventoryItem> {
        self.inventory_admin(p, "inventory.show").await?;
        if keymint_core::id::is_valid("lse_", id) {
            let l = self
                .store
                .get_lease(id)
                .await?
                .ok_or(BrokerError::NotFound("inventory entry"))?;
            if let Some(i) = self.store.inventory_by_fingerprint(&l.fingerprint).await? {
                return Ok(i);
            }
            return Ok(issued_item(&l));
        }
        self.stored_item(id).await
    }

    async fn stored_item(&self, id: &str) -> Result<InventoryItem> {
        if !keymint_core::id::is_valid("inv_", id) {
            return Err(BrokerError::BadRequest(
                "an inventory id is `inv_` and 22 letters or digits".into(),
            ));
        }
        self.store
            .get_inventory(id)
            .await?
            .ok_or(BrokerError::NotFound("inventory entry"))
    }

    /// Registers a static key by its fingerprint and hint (admin). A key
    /// already known (same fingerprint) gets the facts given instead.
    pub async fn inventory_register(
        &self,
        p: &Principal,
        c: InventoryChange,
    ) -> Result<InventoryItem> {
        self.inventory_admin(p, "inventory.register").await?;
        check_change(&c)?;
        let Some(fp) = c.fingerprint.clone() else {
            return Err(BrokerError::BadRequest(
                "`fingerprint` is required to register a key (keymint inventory set --key-file computes it)".into(),
            ));
        };
        self.register_with(p, c, fp, Origin::Registered, None).await
    }

    async fn register_with(
        &self,
        p: &Principal,
        c: InventoryChange,
        fp: String,
        origin: Origin,
        upstream: Option<String>,
    ) -> Result<InventoryItem> {
        let provider = c
            .provider
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into());
        for _ in 0..CAS_TRIES {
            let now = self.now();
            if let Some(old) = self.store.inventory_by_fingerprint(&fp).await? {
                let read = old.version;
                let mut item = old;
                let changed = apply(&mut item, &c);
                if item.hint.is_none() {
                    item.hint.clone_from(&c.hint);
                }
                let ev = AuditDraft::new(now, "inventory.updated", p.actor())
                    .fingerprint(fp.clone())
                    .data("fields", changed.clone());
                match self.put_item(item, read, ev).await? {
                    Some(i) => return Ok(i),
                    None => continue,
                }
            }
            let mut item = InventoryItem {
                id: keymint_core::id::inventory_id(now),
                version: 0,
                origin,
                status: ItemStatus::Active,
                name: c.name.clone().unwrap_or_else(|| format!("{provider} key")),
                revocation: revocation_path(
                    &provider,
                    self.inventory_settings()
                        .config
                        .response(&provider)
                        .is_some(),
                ),
                provider: provider.clone(),
                rule: None,
                fingerprint: fp.clone(),
                hint: c.hint.clone(),
                business_owner: None,
                technical_owner: None,
                purpose: None,
                environment: None,
                workloads: Vec::new(),
                scopes: Vec::new(),
                created_at: now,
                expires_at: None,
                last_used_at: None,
                rotate_by: None,
                rotated_at: None,
                sightings: Vec::new(),
                leaked_at: None,
                lease: None,
                upstream: upstream.clone(),
                announced: Vec::new(),
                response_due: None,
                updated_at: now,
            };
            apply(&mut item, &c);
            let ev = AuditDraft::new(now, "inventory.registered", p.actor())
                .fingerprint(fp.clone())
                .data("origin", serde_json::to_value(origin).unwrap_or_default())
                .data("provider", item.provider.clone());
            if let Some(i) = self.put_item(item, 0, ev).await? {
                return Ok(i);
            }
        }
        Err(BrokerError::Unavailable(
            "the inventory entry kept changing; try again".into(),
        ))
    }

    /// Changes an entry's facts (admin).
    pub async fn inventory_update(
        &self,
        p: &Principal,
        id: &str,
        c: InventoryChange,
    ) -> Result<InventoryItem> {
        self.inventory_admin(p, "inventory.update").await?;
        check_change(&c)?;
        if c.fingerprint.is_some() || c.provider.is_some() || c.hint.is_some() {
            return Err(BrokerError::BadRequest(
                "`fingerprint`, `hint` and `provider` are set when a key is registered, not changed"
                    .into(),
            ));
        }
        for _ in 0..CAS_TRIES {
            let item = self.stored_item(id).await?;
            let read = item.version;
            let mut item = item;
            let changed = apply(&mut item, &c);
            if changed.is_empty() {
                return Ok(item);
            }
            let ev = AuditDraft::new(self.now(), "inventory.updated", p.actor())
                .fingerprint(item.fingerprint.clone())
                .data("fields", changed);
            if let Some(i) = self.put_item(item, read, ev).await? {
                return Ok(i);
            }
        }
        Err(BrokerError::Unavailable(
            "the inventory entry kept changing; try again".into(),
        ))
    }

    /// Retires an entry (admin): it stays listed, with no findings.
    pub async fn inventory_retire(
        &self,
        p: &Principal,
        id: &str,
        r: InventoryRetire,
    ) -> Result<InventoryItem> {
        self.inventory_admin(p, "inventory.retire").await?;
        if let Some(reason) = &r.reason {
            check_text("reason", reason, MAX_TEXT)?;
        }
        for _ in 0..CAS_TRIES {
            let item = self.stored_item(id).await?;
            if item.status == ItemStatus::Retired {
                return Ok(item);
            }
            let read = item.version;
            let mut item = item;
            item.status = ItemStatus::Retired;
            let mut ev = AuditDraft::new(self.now(), "inventory.retired", p.actor())
                .fingerprint(item.fingerprint.clone());
            if let Some(reason) = &r.reason {
                ev = ev.reason(reason.clone());
            }
            if let Some(i) = self.put_item(item, read, ev).await? {
                return Ok(i);
            }
        }
        Err(BrokerError::Unavailable(
            "the inventory entry kept changing; try again".into(),
        ))
    }

    /// Imports a key into keymint's custody (admin): sealed under
    /// `inventory/<id>/key`, fingerprinted with keymint's own key, never
    /// returned.
    pub async fn inventory_import(
        &self,
        p: &Principal,
        imp: InventoryImport,
    ) -> Result<InventoryItem> {
        self.inventory_admin(p, "inventory.import").await?;
        let key = imp.key.expose();
        if key.len() < 16 || key.len() > 4096 || key.chars().any(|c| c.is_control() || c == ' ') {
            return Err(BrokerError::BadRequest(
                "`key` must be 16 to 4096 bytes without spaces or control characters".into(),
            ));
        }
        let mut facts = imp.facts;
        if facts.fingerprint.is_some() || facts.hint.is_some() {
            return Err(BrokerError::BadRequest(
                "an imported key's `fingerprint` and `hint` are computed by the server".into(),
            ));
        }
        check_change(&facts)?;
        let fp = self.keyring.fingerprint(key.as_bytes());
        facts.hint = Some(inventory::hint(key, 12));
        let item = self
            .register_with(p, facts, fp.clone(), Origin::Imported, None)
            .await?;
        let name = format!("inventory/{}/key", item.id);
        let sealed = self
            .keyring
            .seal(&name, key.as_bytes())
            .map_err(|_| BrokerError::Unavailable("cannot seal the key".into()))?;
        self.store.put_secret(&name, sealed, self.now()).await?;
        if item.origin != Origin::Imported {
            // Known before (registered or found): now in custody too.
            for _ in 0..CAS_TRIES {
                let cur = self.stored_item(&item.id).await?;
                let read = cur.version;
                let mut cur = cur;
                cur.origin = Origin::Imported;
                let ev = AuditDraft::new(self.now(), "inventory.imported", p.actor())
                    .fingerprint(fp.clone());
                if let Some(i) = self.put_item(cur, read, ev).await? {
                    return Ok(i);
                }
            }
        }
        Ok(item)
    }

    /// Brings the entries of the upstream keys keymint holds up to date:
    /// one per sealed `[[upstreams]]` key, a rotated key's old entry
    /// retired. Returns how many entries it wrote.
    pub async fn sync_upstream_inventory(&self) -> Result<u64> {
        let settings = self.inventory_settings();
        let mut written = 0;
        let stored = self.store.list_inventory(None, 1000).await?;
        for (name, (kind, _, _)) in &settings.upstreams {
            let secret = keymint_proxy::key_secret_name(name);
            let Some(sealed) = self.store.get_secret(&secret).await? else {
                continue;
            };
            let Ok(key) = self.keyring.open(&secret, &sealed) else {
                continue;
            };
            let fp = self.keyring.fingerprint(&key);
            let now = self.now();
            for old in stored.iter().filter(|i| {
                i.origin == Origin::Upstream
                    && i.upstream.as_deref() == Some(name.as_str())
                    && i.fingerprint != fp
                    && i.status == ItemStatus::Active
            }) {
                let mut o = old.clone();
                o.status = ItemStatus::Retired;
                let ev = AuditDraft::new(now, "inventory.retired", "keymint")
                    .fingerprint(o.fingerprint.clone())
                    .reason("the upstream's key was replaced");
                if self.put_item(o, old.version, ev).await?.is_some() {
                    written += 1;
                }
            }
            if self.store.inventory_by_fingerprint(&fp).await?.is_some() {
                continue;
            }
            let hint = std::str::from_utf8(&key)
                .ok()
                .map(|k| inventory::hint(k, 8))
                .filter(|h| inventory::is_hint(h));
            let item = InventoryItem {
                id: keymint_core::id::inventory_id(now),
                version: 0,
                origin: Origin::Upstream,
                status: ItemStatus::Active,
                name: format!("upstream {name}"),
                provider: kind.clone(),
                rule: None,
                fingerprint: fp.clone(),
                hint,
                business_owner: None,
                technical_owner: None,
                purpose: Some(format!("held by keymint for the `{name}` upstream")),
                environment: None,
                workloads: Vec::new(),
                scopes: Vec::new(),
                created_at: now,
                expires_at: None,
                last_used_at: None,
                rotate_by: self.rotate_by(name, now),
                rotated_at: None,
                sightings: Vec::new(),
                leaked_at: None,
                revocation: self.upstream_revocation(name),
                lease: None,
                upstream: Some(name.clone()),
                announced: Vec::new(),
                response_due: None,
                updated_at: now,
            };
            let ev = AuditDraft::new(now, "inventory.registered", "keymint")
                .fingerprint(fp)
                .data("origin", "upstream")
                .data("upstream", name.clone());
            if self.put_item(item, 0, ev).await?.is_some() {
                written += 1;
            }
        }
        Ok(written)
    }

    /// Evaluates the findings on every stored entry; those not announced
    /// before are audited (`inventory.finding`) and sent to the webhook.
    pub async fn evaluate_inventory(&self) -> Result<FindingList> {
        let settings = self.inventory_settings();
        let limits = settings.config.limits;
        let mut out = FindingList::default();
        let mut before: Option<String> = None;
        loop {
            let page = self.store.list_inventory(before.as_deref(), 500).await?;
            let Some(last) = page.last() else { break };
            before = Some(last.id.clone());
            let full = page.len() == 500;
            for item in page {
                out.evaluated += 1;
                let now = self.now();
                let found = inventory::evaluate(&item, now, &limits);
                self.announce(&item, &found, settings.webhook.as_deref())
                    .await?;
                out.findings.extend(found);
            }
            if !full {
                break;
            }
        }
        Ok(out)
    }

    /// On-demand evaluation (admin).
    pub async fn inventory_findings(&self, p: &Principal) -> Result<FindingList> {
        self.inventory_admin(p, "inventory.findings").await?;
        if let Err(e) = self.sync_upstream_inventory().await {
            tracing::warn!(error = %e, "cannot bring the upstream keys into the inventory");
        }
        self.evaluate_inventory().await
    }

    /// Audits and announces the findings on `item` not announced before,
    /// and forgets those that no longer hold (so they are announced again
    /// if they come back).
    pub(crate) async fn announce(
        &self,
        item: &InventoryItem,
        found: &[Finding],
        webhook: Option<&str>,
    ) -> Result<()> {
        let kinds: Vec<FindingKind> = found.iter().map(|f| f.kind).collect();
        let new: Vec<&Finding> = found
            .iter()
            .filter(|f| !item.announced.contains(&f.kind))
            .collect();
        if new.is_empty() && kinds.len() == item.announced.len() {
            return Ok(());
        }
        let now = self.now();
        for f in &new {
            let ev = AuditDraft::new(now, "inventory.finding", "keymint")
                .fingerprint(item.fingerprint.clone())
                .data("item", item.id.clone())
                .data("finding", f.kind.as_str())
                .data("detail", f.detail.clone())
                .data("provider", item.provider.clone());
            self.store.append_audit(ev).await?;
        }
        let mut next = item.clone();
        next.announced = kinds;
        let ev = AuditDraft::new(now, "inventory.findings_recorded", "keymint")
            .fingerprint(item.fingerprint.clone());
        // Lost to a concurrent write: the next evaluation announces again
        // only what that write did not already record.
        let _ = self.put_item(next, item.version, ev).await?;
        if let Some(url) = webhook
            && !new.is_empty()
        {
            let body = serde_json::json!({
                "type": "keymint.inventory.findings",
                "item": item.id,
                "name": item.name,
                "provider": item.provider,
                "hint": item.hint,
                "revocation": item.revocation,
                "locations": item.sightings.iter().map(|s| s.location.clone()).collect::<Vec<_>>(),
                "findings": new.iter().map(|f| serde_json::json!({"kind": f.kind.as_str(), "detail": f.detail})).collect::<Vec<_>>(),
            });
            let client = crate::webhook::Client::new();
            if let Err(e) = client.post_json(url, &body).await {
                tracing::warn!(item = %item.id, error = %e, "inventory webhook failed");
                self.metrics
                    .webhook_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// The duty loop: keeps the upstream keys' entries current and
    /// evaluates the findings every `every`.
    pub async fn run_inventory(self: Arc<Self>, every: Duration) {
        loop {
            if let Err(e) = self.sync_upstream_inventory().await {
                tracing::warn!(error = %e, "cannot bring the upstream keys into the inventory");
            }
            if let Err(e) = self.evaluate_inventory().await {
                tracing::warn!(error = %e, "cannot evaluate the inventory's findings");
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Records that a scan saw the key with fingerprint `fp` at
    /// `locations` (creating its entry if it is new) and that it leaked.
    /// Returns the entry as stored.
    #[expect(clippy::too_many_arguments, reason = "one call site, every fact named")]
    pub(crate) async fn record_leak(
        &self,
        actor: &str,
        fp: &str,
        rule: &str,
        hint: Option<&str>,
        lease: Option<&keymint_core::model::Lease>,
        locations: &[String],
        environment: Option<&str>,
        source: &str,
    ) -> Result<InventoryItem> {
        for _ in 0..CAS_TRIES {
            let now = self.now();
            let sightings = locations.iter().map(|l| Sighting {
                location: l.clone(),
                source: source.to_owned(),
                environment: environment.map(str::to_owned),
                seen_at: now,
            });
            let (mut item, read) = match self.store.inventory_by_fingerprint(fp).await? {
                Some(i) => {
                    let v = i.version;
                    (i, v)
                }
                None => {
                    let provider = if lease.is_some() {
                        "keymint".to_owned()
                    } else {
                        provider_of(rule).to_owned()
                    };
                    let automatic = lease.is_some()
                        || self
                            .inventory_settings()
                            .config
                            .response(&provider)
                            .is_some_and(|r| {
                                r.action != crate::inventory_config::LeakAction::Alert
                            });
                    let item = InventoryItem {
                        id: keymint_core::id::inventory_id(now),
                        version: 0,
                        origin: if lease.is_some() {
                            Origin::Issued
                        } else {
                            Origin::Scan
                        },
                        status: ItemStatus::Active,
                        name: match lease {
                            Some(l) => format!("lease {}", l.id),
                            None => format!("{rule} found by a scan"),
                        },
                        revocation: revocation_path(&provider, automatic),
                        provider,
                        rule: Some(rule.to_owned()),
                        fingerprint: fp.to_owned(),
                        hint: hint.map(str::to_owned),
                        business_owner: None,
                        technical_owner: lease.map(|l| format!("workload:{}", l.workload)),
                        purpose: None,
                        environment: None,
                        workloads: lease.map(|l| vec![l.workload.clone()]).unwrap_or_default(),
                        scopes: lease.map(|l| l.scopes.clone()).unwrap_or_default(),
                        created_at: lease.map_or(now, |l| l.created_at),
                        expires_at: lease.map(|l| l.expires_at),
                        last_used_at: None,
                        rotate_by: None,
                        rotated_at: None,
                        sightings: Vec::new(),
                        leaked_at: None,
                        lease: lease.map(|l| l.id.clone()),
                        upstream: None,
                        announced: Vec::new(),
                        response_due: None,
                        updated_at: now,
                    };
                    (item, 0)
                }
            };
            for s in sightings {
                item.seen(s);
            }
            if item.hint.is_none() {
                item.hint = hint.map(str::to_owned);
            }
            if item.leaked_at.is_none() {
                item.leaked_at = Some(now);
            }
            // INVARIANT: DESIGN.md invariant 3: the response owed at the
            // provider is recorded with the sighting, before any call, so
            // neither a failed call nor a crash forgets it (0049).
            if lease.is_none()
                && item.status != ItemStatus::Revoked
                && item.hint.is_some()
                && self
                    .inventory_settings()
                    .config
                    .response(&item.provider)
                    .is_some_and(|r| r.action != crate::inventory_config::LeakAction::Alert)
            {
                // A response already owed keeps its time: an attempt under
                // way holds its claim (so a second report does not call the
                // provider beside it), a failed one its backoff.
                item.response_due
                    .get_or_insert(keymint_core::inventory::ResponseDue {
                        attempts: 0,
                        next_at: now,
                    });
            }
            let ev = AuditDraft::new(now, "inventory.sighted", actor.to_owned())
                .fingerprint(fp.to_owned())
                .data("rule", rule.to_owned())
                .data("locations", locations.to_vec());
            if let Some(i) = self.put_item(item, read, ev).await? {
                return Ok(i);
            }
        }
        Err(BrokerError::Unavailable(
            "the inventory entry kept changing; try again".into(),
        ))
    }

    /// Sets an entry's status after a leak response (or a lease
    /// revocation); no-op if it is already there.
    pub(crate) async fn set_item_status(
        &self,
        id: &str,
        status: ItemStatus,
        actor: &str,
        detail: &str,
    ) -> Result<Option<InventoryItem>> {
        for _ in 0..CAS_TRIES {
            let Some(item) = self.store.get_inventory(id).await? else {
                return Ok(None);
            };
            if item.status == status {
                return Ok(Some(item));
            }
            let read = item.version;
            let mut item = item;
            item.status = status;
            let ev = AuditDraft::new(self.now(), "inventory.status", actor.to_owned())
                .fingerprint(item.fingerprint.clone())
                .data("status", serde_json::to_value(status).unwrap_or_default())
                .reason(detail.to_owned());
            if let Some(i) = self.put_item(item, read, ev).await? {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }
}

/// A live lease as an inventory entry (not stored: made from its row).
fn issued_item(l: &keymint_core::model::Lease) -> InventoryItem {
    InventoryItem {
        id: l.id.clone(),
        version: 0,
        origin: Origin::Issued,
        status: if l.state == LeaseState::Active {
            ItemStatus::Active
        } else {
            ItemStatus::Revoked
        },
        name: format!("{} lease of role {}", l.engine.as_str(), l.role),
        provider: "keymint".into(),
        rule: None,
        fingerprint: l.fingerprint.clone(),
        hint: None,
        business_owner: None,
        technical_owner: Some(format!("workload:{}", l.workload)),
        purpose: Some(format!("task {}", l.task)),
        environment: None,
        workloads: vec![l.workload.clone()],
        scopes: l.scopes.clone(),
        created_at: l.created_at,
        expires_at: Some(l.expires_at),
        last_used_at: None,
        rotate_by: None,
        rotated_at: None,
        sightings: Vec::new(),
        leaked_at: None,
        revocation: revocation_path("keymint", true),
        lease: Some(l.id.clone()),
        upstream: None,
        announced: Vec::new(),
        response_due: None,
        updated_at: l.created_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_changes_are_refused_whole_and_never_echoed() {
        let ok = InventoryChange {
            business_owner: Some("finance team".into()),
            fingerprint: Some("ab".repeat(32)),
            hint: Some("sk-proj-abc…wxyz".into()),
            ..InventoryChange::default()
        };
        assert!(check_change(&ok).is_ok());
        let bad = [
            InventoryChange {
                business_owner: Some("x\n<script>".into()),
                ..ok.clone()
            },
            InventoryChange {
                fingerprint: Some("zz".repeat(32)),
                ..ok.clone()
            },
            InventoryChange {
                hint: Some("sk-proj-the-whole-key-here".into()),
                ..ok.clone()
            },
            InventoryChange {
                purpose: Some("a".repeat(MAX_TEXT + 1)),
                ..ok.clone()
            },
            InventoryChange {
                scopes: Some(vec!["s".into(); MAX_LIST + 1]),
                ..ok.clone()
            },
            InventoryChange {
                environment: Some("../../etc/passwd\u{0}".into()),
                ..ok.clone()
            },
        ];
        for c in bad {
            let e = check_change(&c).unwrap_err().to_string();
            assert!(
                !e.contains("script") && !e.contains("passwd") && !e.contains("whole-key"),
                "{e}"
            );
        }
    }

    #[test]
    fn providers_and_revocation_paths() {
        assert_eq!(provider_of("openai.project-key"), "openai");
        assert_eq!(provider_of("keymint.token"), "keymint");
        assert!(revocation_path("anthropic", true).contains("inactive"));
        assert!(revocation_path("github", false).starts_with("manual:"));
    }
}
