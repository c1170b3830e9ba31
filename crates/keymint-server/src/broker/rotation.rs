//! Rotation of the upstream keys keymint holds (docs/design/0035-key-rotation.md).
//!
//! One rotation, in named steps:
//!
//! 1. `current`: the key in use, its fingerprint, hint and what keymint
//!    knows of it at the provider (the reference it kept when it made it);
//! 2. `obtain`: a new key, made through the provider's admin API
//!    (OpenRouter `POST /keys`, OpenAI a project service account with its
//!    key) or supplied by the operator (Anthropic's Admin API and a manual
//!    upstream cannot make keys);
//! 3. `verify`: one cheap authenticated call with the new key (OpenRouter
//!    `GET /key`, OpenAI `GET /models`, Anthropic `GET /v1/models`) before
//!    it carries any request; a refusal deletes a key keymint made and
//!    leaves the old key in use;
//! 4. `switch`: the new key sealed in the store (`Proxy::set_key`), taken
//!    at once by this process and within [`keymint_proxy::keys::KEY_REFRESH`]
//!    by every other; requests in flight keep the key they started with;
//! 5. `record`: the inventory entry of the old key retired, a new one with
//!    `created_at`, `rotated_at` and `rotate_by`;
//! 6. `revoke_old`: after the grace period (every process switched, every
//!    request sent with the old key arrived), the old key is deleted at the
//!    provider (OpenRouter, OpenAI), set `inactive` (Anthropic) or left to
//!    the operator with the documented step (manual).
//!
//! Every step is audited with fingerprints and hints only, never a key.
//! On demand (`POST /v1/upstreams/{name}/rotate`, admin only) and on a
//! schedule (`rotate_every`), the schedule a duty of the one replica that
//! holds the duties (docs/design/0022).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use http::{Method, StatusCode};
use keymint_core::Timestamp;
use keymint_core::audit::{AuditDraft, Outcome};
use keymint_core::inventory::{self, InventoryItem, ItemStatus, Origin};
use keymint_core::role::UpstreamKind;
use keymint_engines::EngineError;
use keymint_engines::provider::{AdminApi, AdminKeys, segment};
use keymint_proto::UpstreamRotated;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::{Broker, BrokerError, Principal, Result};
use crate::admin_keys::SealedAdminKeys;
use crate::inventory_config::LeakAction;
use crate::rotation_config::{DEFAULT_GRACE_SECS, RotationConfig, RotationProvider};

/// The longest a provider call of a rotation may take.
const CALL_DEADLINE: Duration = Duration::from_secs(30);
/// How long a rotation holds its lock across replicas (it obtains,
/// verifies and switches within a few provider calls); the lock is released
/// as soon as the rotation ends, succeeded or failed.
const CLAIM_MS: i64 = 120_000;
/// A retiring entry written before the switch is due this long after the
/// grace period at the latest, if the rotation never confirmed it (the
/// switch is one store write after it).
const SWITCH_MARGIN_MS: i64 = 10_000;
/// The longest wait between two attempts to revoke an old key.
const MAX_BACKOFF_SECS: i64 = 600;

/// What the broker needs to rotate: the configuration, the upstreams, and
/// the proxy whose keys are switched.
#[derive(Debug)]
pub struct RotationSettings {
    pub rotations: Vec<RotationConfig>,
    /// Every static-key upstream: its kind, base URL and timeout.
    pub upstreams: HashMap<String, (UpstreamKind, String, Duration)>,
    pub proxy: Arc<keymint_proxy::Proxy>,
}

/// Rotations under way in this process, by upstream.
#[derive(Debug, Default)]
pub(crate) struct InFlight(Mutex<HashSet<String>>);

/// Removes the upstream from [`InFlight`] when the rotation ends.
struct Running<'a>(&'a InFlight, String);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

/// What keymint knows of a key it made at a provider, kept sealed next to
/// the key (`upstream/<name>/key-ref`) so the key can be revoked by id
/// rather than found by its hint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct KeyRef {
    /// The key's fingerprint: the reference is for this key only.
    fingerprint: String,
    /// OpenRouter's key `hash`, OpenAI's key `id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    /// OpenAI: the service account keymint made for the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service_account: Option<String>,
}

fn ref_secret_name(upstream: &str) -> String {
    format!("upstream/{upstream}/key-ref")
}

/// An old key waiting for its revocation, kept sealed in the store
/// (`upstream/<name>/retiring`, a list) so a crash or restart cannot drop
/// it: written before the switch, driven by the duty holder when due
/// ([`Broker::run_rotation`]) and kept until the provider confirms.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Retiring {
    fingerprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_ref: Option<KeyRef>,
    actor: String,
    due_ms: i64,
    /// Whether the rotation confirmed its switch (`false`: written just
    /// before the switch; the duty looks at the key in use to know).
    #[serde(default = "switched_default")]
    switched: bool,
    /// When the entry was written.
    #[serde(default)]
    written_ms: i64,
    /// Attempts made at the provider so far.
    #[serde(default)]
    attempts: u32,
    /// A process is calling the provider for it until then; after, another
    /// may (the call was interrupted).
    #[serde(default)]
    claimed_until_ms: i64,
}

const fn switched_default() -> bool {
    true
}

/// The lock one rotation of an upstream holds across replicas
/// (`upstream/<name>/rotating`), released when the rotation ends.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RotationLock {
    until_ms: i64,
}

/// What one attempt to revoke an old key came to.
enum Revoked {
    /// The provider confirmed (or no longer lists the key).
    Confirmed(String),
    /// The call failed or was refused: tried again later.
    Retry(String),
    /// Nothing keymint can do (a manual upstream): the operator's step.
    Manual(String),
}

fn retiring_secret_name(upstream: &str) -> String {
    format!("upstream/{upstream}/retiring")
}

/// An admin "key" that is the new key itself: the verification call.
#[derive(Debug)]
struct FixedKey(Zeroizing<String>);

#[async_trait]
impl AdminKeys for FixedKey {
    async fn admin_key(
        &self,
        _: &str,
    ) -> std::result::Result<Option<Zeroizing<String>>, EngineError> {
        Ok(Some(self.0.clone()))
    }
}

/// Why a rotation is being done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    OnDemand,
    Schedule,
}

impl Trigger {
    const fn as_str(self) -> &'static str {
        match self {
            Self::OnDemand => "on_demand",
            Self::Schedule => "schedule",
        }
    }
}

/// A failed step: what the operator reads and the audit records (provider,
/// step and status only).
struct Failed {
    step: &'static str,
    detail: String,
    /// The operator's own key was refused (a bad request, not an outage).
    supplied_refused: bool,
}

impl Broker {
    /// Gives the broker its rotation settings (at start).
    pub fn set_rotation(&self, s: RotationSettings) {
        let _ = self.rotation.set(Arc::new(s));
    }

    fn rotation_config(&self, upstream: &str) -> Option<RotationConfig> {
        self.rotation
            .get()?
            .rotations
            .iter()
            .find(|r| r.upstream == upstream)
            .cloned()
    }

    /// When a key of `upstream` that came in at `now` is due for rotation.
    pub(crate) fn rotate_by(&self, upstream: &str, now: Timestamp) -> Option<Timestamp> {
        let every = self.rotation_config(upstream)?.rotate_every_secs?;
        Some(now.plus_secs(every))
    }

    /// How the key of `upstream` is revoked, for the inventory.
    pub(crate) fn upstream_revocation(&self, upstream: &str) -> String {
        match self.rotation_config(upstream).map(|c| c.provider) {
            Some(p @ (RotationProvider::OpenRouter | RotationProvider::OpenAi)) => format!(
                "automatic: `keymint upstream rotate {upstream}` makes a new key and deletes this one ({} admin API)",
                p.as_str()
            ),
            Some(RotationProvider::Anthropic) => format!(
                "automatic once replaced: `keymint upstream rotate {upstream} --key-file NEW` sets this key inactive (anthropic Admin API)"
            ),
            _ => format!(
                "manual: `keymint upstream rotate {upstream} --key-file NEW`, then revoke the old key in the provider's console"
            ),
        }
    }

    /// Rotates `upstream`'s key on an operator's demand (the admin token
    /// only), with `key` if the operator supplies the new one.
    pub async fn rotate_upstream(
        self: &Arc<Self>,
        p: &Principal,
        upstream: &str,
        key: Option<Zeroizing<String>>,
    ) -> Result<UpstreamRotated> {
        if let Err(e) = Self::require_admin(p) {
            self.deny("upstream.rotate", p, Some(upstream), &e).await;
            return Err(e);
        }
        self.rotate(upstream, key, &p.actor(), Trigger::OnDemand)
            .await
    }

    /// One rotation (see the module's steps).
    pub(crate) async fn rotate(
        self: &Arc<Self>,
        upstream: &str,
        supplied: Option<Zeroizing<String>>,
        actor: &str,
        trigger: Trigger,
    ) -> Result<UpstreamRotated> {
        let Some(settings) = self.rotation.get().cloned() else {
            return Err(BrokerError::NotFound("upstream"));
        };
        let Some((kind, base_url, _)) = settings.upstreams.get(upstream).cloned() else {
            return Err(BrokerError::NotFound("upstream"));
        };
        let cfg = self.rotation_config(upstream).unwrap_or(RotationConfig {
            upstream: upstream.to_owned(),
            provider: RotationProvider::Manual,
            admin_key: None,
            rotate_every_secs: None,
            grace_secs: DEFAULT_GRACE_SECS,
            project: None,
        });
        if supplied.is_none() && !cfg.provider.creates_keys() {
            let why = match cfg.provider {
                RotationProvider::Anthropic => "anthropic's Admin API cannot create API keys",
                _ => "this upstream has no provider that keymint can create keys at",
            };
            return Err(BrokerError::BadRequest(format!(
                "{why}; make a new key in the provider's console and supply it: \
                 `keymint upstream rotate {upstream} --key-file FILE`"
            )));
        }
        if let Some(k) = &supplied {
            check_key(k)?;
        }
        // One rotation of a key at a time: in this process, and across
        // replicas by a lock in the store, released when the rotation ends
        // so a failed one can be retried at once.
        let _running = {
            let mut f = self.rotations.0.lock().unwrap_or_else(|p| p.into_inner());
            if !f.insert(upstream.to_owned()) {
                return Err(BrokerError::Conflict(format!(
                    "a rotation of upstream `{upstream}` is already under way"
                )));
            }
            Running(&self.rotations, upstream.to_owned())
        };
        let now = self.now();
        let lock = if self.store.shared() {
            match self.lock_rotation(upstream, now).await? {
                Some(l) => Some(l),
                None => {
                    return Err(BrokerError::Conflict(format!(
                        "a rotation of upstream `{upstream}` is already under way on another replica"
                    )));
                }
            }
        } else {
            None
        };
        // 1. current, read under the locks: read before them, a rotation
        // that ended in between would have its new key replaced without
        // being retired, live at the provider.
        let done = async {
            let old = self.current_key(upstream).await?.ok_or_else(|| {
                BrokerError::BadRequest(format!(
                    "upstream `{upstream}` has no key to rotate; set one with `keymint upstream set {upstream}`"
                ))
            })?;
            if supplied
                .as_ref()
                .is_some_and(|k| k.as_str() == old.as_str())
            {
                return Err(BrokerError::BadRequest(
                    "the key supplied is the key in use".into(),
                ));
            }
            self.rotate_locked(
                &settings, &cfg, kind, &base_url, upstream, supplied, actor, trigger, old,
            )
            .await
        }
        .await;
        if let Some(l) = lock
            && let Err(e) = self.unlock_rotation(upstream, l).await
        {
            tracing::warn!(upstream, error = %e, "cannot release the rotation lock; it runs out by itself");
        }
        done
    }

    /// A rotation under its lock, from the audit of its start.
    #[allow(clippy::too_many_arguments)]
    async fn rotate_locked(
        self: &Arc<Self>,
        settings: &RotationSettings,
        cfg: &RotationConfig,
        kind: UpstreamKind,
        base_url: &str,
        upstream: &str,
        supplied: Option<Zeroizing<String>>,
        actor: &str,
        trigger: Trigger,
        old: Zeroizing<String>,
    ) -> Result<UpstreamRotated> {
        let now = self.now();
        let old_fp = self.keyring.fingerprint(old.as_bytes());
        let old_hint = Some(inventory::hint(&old, 8)).filter(|h| inventory::is_hint(h));
        let old_ref = self
            .key_ref(upstream)
            .await
            .filter(|r| r.fingerprint == old_fp);
        // The key being replaced has its inventory entry, to retire.
        if let Err(e) = self.sync_upstream_inventory().await {
            tracing::warn!(error = %e, "cannot bring the upstream keys into the inventory");
        }
        let started = AuditDraft::new(now, "upstream.rotation_started", actor.to_owned())
            .fingerprint(old_fp.clone())
            .data("upstream", upstream)
            .data("provider", cfg.provider.as_str())
            .data("trigger", trigger.as_str())
            .data(
                "new_key",
                if supplied.is_some() {
                    "supplied"
                } else {
                    "created"
                },
            );
        self.store.append_audit(started).await?;
        self.notify_audit();

        let created = supplied.is_none();
        // The old key's revocation, written to the store before the switch
        // (and confirmed after it): no crash between the two loses it.
        let pending = Retiring {
            fingerprint: old_fp.clone(),
            hint: old_hint,
            key_ref: old_ref,
            actor: actor.to_owned(),
            due_ms: 0,
            switched: false,
            written_ms: 0,
            attempts: 0,
            claimed_until_ms: 0,
        };
        let done = self
            .obtain_verify_switch(settings, cfg, kind, base_url, supplied, actor, pending)
            .await;
        let (new_key, new_ref, verified) = match done {
            Ok(v) => v,
            Err(f) => {
                tracing::warn!(upstream, step = f.step, detail = %f.detail, "upstream key rotation failed; the old key stays in use");
                let ev = AuditDraft::new(self.now(), "upstream.rotation_failed", actor.to_owned())
                    .outcome(Outcome::Failure)
                    .fingerprint(old_fp.clone())
                    .data("upstream", upstream)
                    .data("provider", cfg.provider.as_str())
                    .data("trigger", trigger.as_str())
                    .data("step", f.step)
                    .reason(format!("{}; the old key stays in use", f.detail));
                if let Err(e) = self.store.append_audit(ev).await {
                    tracing::error!(error = %e, "cannot audit a failed rotation");
                }
                self.notify_audit();
                let msg = format!(
                    "the rotation of upstream `{upstream}` failed at `{}`: {}; the old key stays in use",
                    f.step, f.detail
                );
                return Err(if f.supplied_refused {
                    BrokerError::BadRequest(msg)
                } else {
                    BrokerError::Unavailable(msg)
                });
            }
        };
        let rotated_at = self.now();
        let fp = self.keyring.fingerprint(new_key.as_bytes());
        let hint = Some(inventory::hint(&new_key, 8)).filter(|h| inventory::is_hint(h));
        // 5. record
        if let Err(e) = self
            .record_rotation(upstream, &old_fp, &fp, hint.clone(), rotated_at, actor)
            .await
        {
            tracing::error!(upstream, error = %e, "cannot record a rotation in the inventory");
        }
        if let Some(r) = new_ref
            && let Err(e) = self.put_key_ref(upstream, &r).await
        {
            tracing::error!(upstream, error = %e, "cannot keep the provider's reference of a new key");
        }
        let revoke_old_at = rotated_at.plus_secs(cfg.grace_secs);
        let old_key = match cfg.provider {
            RotationProvider::Manual => format!(
                "revoke it by hand in the provider's console after {}s",
                cfg.grace_secs
            ),
            RotationProvider::Anthropic => {
                format!(
                    "set inactive after {}s (anthropic Admin API)",
                    cfg.grace_secs
                )
            }
            p => format!(
                "deleted after {}s ({} admin API)",
                cfg.grace_secs,
                p.as_str()
            ),
        };
        let ev = AuditDraft::new(rotated_at, "upstream.rotated", actor.to_owned())
            .fingerprint(fp.clone())
            .data("upstream", upstream)
            .data("provider", cfg.provider.as_str())
            .data("trigger", trigger.as_str())
            .data("created", created)
            .data("verified", verified.clone())
            .data("old_fingerprint", old_fp.clone())
            .data("revoke_old_at", revoke_old_at.rfc3339());
        let ev = match &hint {
            Some(h) => ev.data("hint", h.clone()),
            None => ev,
        };
        if let Err(e) = self.store.append_audit(ev).await {
            tracing::error!(error = %e, "cannot audit a rotation");
        }
        self.notify_audit();
        tracing::info!(
            upstream,
            provider = cfg.provider.as_str(),
            trigger = trigger.as_str(),
            "upstream key rotated; the old key is revoked after the grace period"
        );
        // 6. revoke_old, after the grace period: recorded in the store
        // before the switch, confirmed now, driven by the duty holder when
        // due and kept until the provider confirms, so no crash drops it.
        let provider = cfg.provider.as_str().to_owned();
        let due_ms = revoke_old_at.millis();
        let confirmed = self
            .edit_retiring(upstream, |list| {
                for r in list.iter_mut().filter(|r| r.fingerprint == old_fp) {
                    r.switched = true;
                    r.due_ms = due_ms;
                }
            })
            .await;
        if let Err(e) = confirmed {
            tracing::warn!(upstream, error = %e, "cannot confirm the old key's revocation; it is revoked a little later");
        }
        Ok(UpstreamRotated {
            upstream: upstream.to_owned(),
            provider,
            created,
            verified,
            rotated_at,
            fingerprint: fp,
            hint,
            old_fingerprint: old_fp,
            revoke_old_at,
            old_key,
        })
    }

    /// The key in use (sealed in the store), if one is set.
    async fn current_key(&self, upstream: &str) -> Result<Option<Zeroizing<String>>> {
        let name = keymint_proxy::key_secret_name(upstream);
        let Some(sealed) = self.store.get_secret(&name).await? else {
            return Ok(None);
        };
        let opened = self.keyring.open(&name, &sealed).map_err(|_| {
            BrokerError::Unavailable(format!("the key of upstream `{upstream}` cannot be opened"))
        })?;
        let key = String::from_utf8(opened.to_vec()).map_err(|_| {
            BrokerError::Unavailable(format!("the key of upstream `{upstream}` is not text"))
        })?;
        Ok(Some(Zeroizing::new(key)))
    }

    async fn key_ref(&self, upstream: &str) -> Option<KeyRef> {
        let name = ref_secret_name(upstream);
        let sealed = self.store.get_secret(&name).await.ok()??;
        let opened = self.keyring.open(&name, &sealed).ok()?;
        serde_json::from_slice(&opened).ok()
    }

    async fn put_key_ref(&self, upstream: &str, r: &KeyRef) -> Result<()> {
        let name = ref_secret_name(upstream);
        let bytes = serde_json::to_vec(r)
            .map_err(|_| BrokerError::Unavailable("cannot encode a key reference".into()))?;
        let sealed = self
            .keyring
            .seal(&name, &bytes)
            .map_err(|_| BrokerError::Unavailable("cannot seal a key reference".into()))?;
        self.store.put_secret(&name, sealed, self.now()).await?;
        Ok(())
    }

    /// The admin API of a rotation's provider.
    fn rotation_admin(
        &self,
        settings: &RotationSettings,
        cfg: &RotationConfig,
    ) -> std::result::Result<AdminApi, EngineError> {
        let name = cfg.admin_key.as_deref().unwrap_or_default();
        let Some((_, base, timeout)) = settings.upstreams.get(name) else {
            return Err(EngineError::Rejected(format!(
                "no upstream is named `{name}`"
            )));
        };
        let keys = Arc::new(SealedAdminKeys {
            store: Arc::clone(&self.store),
            keyring: Arc::clone(&self.keyring),
        });
        let api = AdminApi::new(
            cfg.provider.as_str(),
            name,
            base,
            (*timeout).min(CALL_DEADLINE),
            keys,
        )?;
        Ok(match cfg.provider {
            RotationProvider::Anthropic => anthropic_headers(api),
            _ => api,
        })
    }

    /// Steps 2 to 4: a new key, checked, then switched to. A key keymint
    /// made and could not use is deleted again.
    #[allow(clippy::too_many_arguments)]
    async fn obtain_verify_switch(
        &self,
        settings: &RotationSettings,
        cfg: &RotationConfig,
        kind: UpstreamKind,
        base_url: &str,
        supplied: Option<Zeroizing<String>>,
        actor: &str,
        mut pending: Retiring,
    ) -> std::result::Result<(Zeroizing<String>, Option<KeyRef>, String), Failed> {
        let upstream = cfg.upstream.as_str();
        let fail = |step: &'static str, e: &dyn std::fmt::Display| Failed {
            step,
            detail: e.to_string(),
            supplied_refused: false,
        };
        let admin = if cfg.admin_key.is_some() {
            Some(
                self.rotation_admin(settings, cfg)
                    .map_err(|e| fail("obtain", &e))?,
            )
        } else {
            None
        };
        // 2. obtain
        let is_supplied = supplied.is_some();
        let (key, made) = match (supplied, &admin) {
            (Some(k), _) => (k, None),
            (None, Some(api)) => {
                let name = format!("keymint rotation of {upstream} {}", self.now().rfc3339());
                let (k, r) = match cfg.provider {
                    RotationProvider::OpenRouter => create_openrouter(api, &name).await,
                    RotationProvider::OpenAi => {
                        create_openai(api, cfg.project.as_deref().unwrap_or_default(), &name).await
                    }
                    _ => Err(EngineError::Rejected(format!(
                        "{} cannot create keys",
                        cfg.provider.as_str()
                    ))),
                }
                .map_err(|e| fail("obtain", &e))?;
                let fp = self.keyring.fingerprint(k.as_bytes());
                let ev = AuditDraft::new(self.now(), "upstream.key_created", actor.to_owned())
                    .fingerprint(fp.clone())
                    .data("upstream", upstream)
                    .data("provider", cfg.provider.as_str())
                    .data("key_id", r.key_id.clone().unwrap_or_default());
                if let Err(e) = self.store.append_audit(ev).await {
                    tracing::error!(error = %e, "cannot audit a created key");
                }
                (
                    k,
                    Some(KeyRef {
                        fingerprint: fp,
                        ..r
                    }),
                )
            }
            (None, None) => {
                return Err(fail("obtain", &"no admin API to create a key with"));
            }
        };
        // 3. verify
        let verified = match verify(cfg.provider, kind, upstream, base_url, &key).await {
            Ok(v) => v,
            Err(e) => {
                if let (Some(api), Some(r)) = (&admin, &made) {
                    self.discard_created(cfg, api, r, actor).await;
                }
                return Err(Failed {
                    step: "verify",
                    detail: format!("the new key was not accepted: {e}"),
                    supplied_refused: is_supplied && matches!(e, EngineError::Rejected(_)),
                });
            }
        };
        // 4. switch, the old key's revocation written first
        let now = self.now();
        pending.written_ms = now.millis();
        pending.due_ms = now.plus_secs(cfg.grace_secs).millis() + SWITCH_MARGIN_MS;
        let old_fp = pending.fingerprint.clone();
        let written = self
            .edit_retiring(upstream, |list| {
                list.retain(|r| r.fingerprint != old_fp);
                list.push(pending.clone());
            })
            .await;
        if let Err(e) = written {
            if let (Some(api), Some(r)) = (&admin, &made) {
                self.discard_created(cfg, api, r, actor).await;
            }
            return Err(fail(
                "switch",
                &format!("cannot record the old key's revocation: {e}"),
            ));
        }
        if let Err(e) = settings.proxy.set_key(upstream, key.clone(), actor).await {
            if let (Some(api), Some(r)) = (&admin, &made) {
                self.discard_created(cfg, api, r, actor).await;
            }
            let unwritten = self
                .edit_retiring(upstream, |list| {
                    list.retain(|r| r.fingerprint != old_fp || r.switched);
                })
                .await;
            if let Err(e) = unwritten {
                // Harmless: the duty never revokes the key in use.
                tracing::warn!(upstream, error = %e, "cannot take back the old key's revocation");
            }
            return Err(Failed {
                step: "switch",
                detail: e.to_string(),
                supplied_refused: is_supplied && matches!(e, keymint_proxy::KeyError::Invalid(_)),
            });
        }
        Ok((key, made, verified))
    }

    /// Deletes a key keymint made but will not use; audited either way.
    async fn discard_created(&self, cfg: &RotationConfig, api: &AdminApi, r: &KeyRef, actor: &str) {
        let res = delete_by_ref(cfg, api, r).await;
        let ev = AuditDraft::new(self.now(), "upstream.key_discarded", actor.to_owned())
            .fingerprint(r.fingerprint.clone())
            .data("upstream", cfg.upstream.clone())
            .data("provider", cfg.provider.as_str());
        let ev = match res {
            Ok(d) => ev.data("detail", d),
            Err(e) => ev
                .outcome(Outcome::Failure)
                .reason(format!("{e}; delete it by hand in the provider's console")),
        };
        if let Err(e) = self.store.append_audit(ev).await {
            tracing::error!(error = %e, "cannot audit a discarded key");
        }
    }

    /// Step 5: the old key's entry retired, the new key's entry made with
    /// the facts people set on the old one.
    async fn record_rotation(
        &self,
        upstream: &str,
        old_fp: &str,
        fp: &str,
        hint: Option<String>,
        now: Timestamp,
        actor: &str,
    ) -> Result<()> {
        let old = self.store.inventory_by_fingerprint(old_fp).await?;
        if let Some(o) = &old
            && o.status == ItemStatus::Active
        {
            let mut r = o.clone();
            r.status = ItemStatus::Retired;
            let ev = AuditDraft::new(now, "inventory.retired", actor.to_owned())
                .fingerprint(o.fingerprint.clone())
                .reason("the upstream's key was rotated");
            self.put_item(r, o.version, ev).await?;
        }
        if let Some(mut n) = self.store.inventory_by_fingerprint(fp).await? {
            // Registered meanwhile (the duty loop saw the new key first).
            let read = n.version;
            n.rotated_at = Some(now);
            n.rotate_by = self.rotate_by(upstream, now);
            let ev = AuditDraft::new(now, "inventory.updated", actor.to_owned())
                .fingerprint(fp.to_owned())
                .data("fields", vec!["rotated_at", "rotate_by"]);
            self.put_item(n, read, ev).await?;
            return Ok(());
        }
        let settings = self.inventory_settings();
        let provider = settings
            .upstreams
            .get(upstream)
            .map(|(k, _, _)| k.clone())
            .unwrap_or_default();
        let item = InventoryItem {
            id: keymint_core::id::inventory_id(now),
            version: 0,
            origin: Origin::Upstream,
            status: ItemStatus::Active,
            name: format!("upstream {upstream}"),
            provider,
            rule: None,
            fingerprint: fp.to_owned(),
            hint,
            business_owner: old.as_ref().and_then(|o| o.business_owner.clone()),
            technical_owner: old.as_ref().and_then(|o| o.technical_owner.clone()),
            purpose: old
                .as_ref()
                .and_then(|o| o.purpose.clone())
                .or_else(|| Some(format!("held by keymint for the `{upstream}` upstream"))),
            environment: old.as_ref().and_then(|o| o.environment.clone()),
            workloads: old
                .as_ref()
                .map(|o| o.workloads.clone())
                .unwrap_or_default(),
            scopes: old.as_ref().map(|o| o.scopes.clone()).unwrap_or_default(),
            created_at: now,
            expires_at: None,
            last_used_at: None,
            rotate_by: self.rotate_by(upstream, now),
            rotated_at: Some(now),
            sightings: Vec::new(),
            leaked_at: None,
            revocation: self.upstream_revocation(upstream),
            lease: None,
            upstream: Some(upstream.to_owned()),
            announced: Vec::new(),
            response_due: None,
            updated_at: now,
        };
        let ev = AuditDraft::new(now, "inventory.registered", actor.to_owned())
            .fingerprint(fp.to_owned())
            .data("origin", "upstream")
            .data("upstream", upstream.to_owned())
            .data("rotated_from", old_fp.to_owned());
        self.put_item(item, 0, ev).await?;
        Ok(())
    }

    /// Step 6: one attempt to revoke the old key at the provider; nothing
    /// audited here (the caller audits each attempt).
    async fn revoke_old(&self, cfg: &RotationConfig, r: &Retiring) -> Revoked {
        if cfg.provider == RotationProvider::Manual {
            return Revoked::Manual(
                "no admin API: revoke the old key by hand in the provider's console".into(),
            );
        }
        let Some(settings) = self.rotation.get().cloned() else {
            return Revoked::Retry("no rotation settings".into());
        };
        let api = match self.rotation_admin(&settings, cfg) {
            Ok(a) => a,
            Err(e) => return Revoked::Retry(e.to_string()),
        };
        match revoke_at_provider(cfg, &api, r.key_ref.as_ref(), r.hint.as_deref()).await {
            Ok(d) => Revoked::Confirmed(d),
            // Deleted already (an earlier attempt whose answer was lost):
            // a deleted key is no longer listed.
            Err(EngineError::Rejected(m))
                if m.ends_with(super::leak_response::NOT_LISTED) && cfg.provider.creates_keys() =>
            {
                Revoked::Confirmed(format!("{m}: deleted already"))
            }
            Err(e) => Revoked::Retry(e.to_string()),
        }
    }

    /// The longest one revocation attempt may take (a list and a delete).
    fn revoke_claim_ms(&self, cfg: &RotationConfig) -> i64 {
        let deadline = self
            .rotation
            .get()
            .and_then(|s| {
                cfg.admin_key
                    .as_deref()
                    .and_then(|n| s.upstreams.get(n))
                    .map(|(_, _, t)| *t)
            })
            .unwrap_or(CALL_DEADLINE)
            .min(CALL_DEADLINE);
        i64::try_from(deadline.as_millis()).unwrap_or(30_000) * 2 + 5_000
    }

    /// The old keys of `upstream` waiting for their revocation, as stored
    /// (the sealed bytes, for a compare-and-set) and read.
    async fn retiring(&self, upstream: &str) -> Result<(Option<Vec<u8>>, Vec<Retiring>)> {
        let name = retiring_secret_name(upstream);
        let Some(sealed) = self.store.get_secret(&name).await? else {
            return Ok((None, Vec::new()));
        };
        let list = self
            .keyring
            .open(&name, &sealed)
            .ok()
            .and_then(|b| serde_json::from_slice::<Vec<Retiring>>(&b).ok())
            .ok_or_else(|| {
                BrokerError::Unavailable("a retiring key record cannot be read".into())
            })?;
        Ok((Some(sealed), list))
    }

    /// Replaces the list read as `expected` with `list`; `false` when
    /// another process changed it meanwhile.
    async fn swap_retiring(
        &self,
        upstream: &str,
        expected: Option<Vec<u8>>,
        list: &[Retiring],
    ) -> Result<bool> {
        let name = retiring_secret_name(upstream);
        let bytes = serde_json::to_vec(list)
            .map_err(|_| BrokerError::Unavailable("cannot encode a retiring key".into()))?;
        let sealed = self
            .keyring
            .seal(&name, &bytes)
            .map_err(|_| BrokerError::Unavailable("cannot seal a retiring key".into()))?;
        Ok(self
            .store
            .swap_secret(&name, expected, sealed, self.now())
            .await?)
    }

    /// Changes the stored list by `f` (compare-and-set, read again while
    /// another process changes it).
    async fn edit_retiring(&self, upstream: &str, f: impl Fn(&mut Vec<Retiring>)) -> Result<()> {
        for _ in 0..8 {
            let (stored, mut list) = self.retiring(upstream).await?;
            f(&mut list);
            if self.swap_retiring(upstream, stored, &list).await? {
                return Ok(());
            }
        }
        Err(BrokerError::Unavailable(
            "the retiring keys kept changing".into(),
        ))
    }

    /// Drives the old keys of `cfg`'s upstream that are due: each is
    /// claimed in the stored list (compare-and-set, so no two processes
    /// call the provider for one), revoked, and leaves the list only when
    /// the provider confirmed; a failure is audited and tried again with
    /// a growing wait, an interrupted call once its claim ran out. The key
    /// in use is never revoked.
    async fn retire_due(&self, cfg: &RotationConfig) {
        let upstream = cfg.upstream.as_str();
        let (stored, list) = match self.retiring(upstream).await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(upstream, error = %e, "cannot read the retiring keys");
                return;
            }
        };
        let now = self.now().millis();
        if !list
            .iter()
            .any(|r| r.due_ms <= now && r.claimed_until_ms <= now)
        {
            return;
        }
        let in_use = match self.current_key(upstream).await {
            Ok(k) => k.map(|k| self.keyring.fingerprint(k.as_bytes())),
            Err(e) => {
                tracing::warn!(upstream, error = %e, "cannot read the key in use");
                return;
            }
        };
        let claim_ms = self.revoke_claim_ms(cfg);
        let (mut kept, mut claimed, mut kept_in_use) = (Vec::new(), Vec::new(), Vec::new());
        for mut r in list {
            if r.due_ms > now || r.claimed_until_ms > now {
                kept.push(r);
            } else if in_use.as_deref() == Some(r.fingerprint.as_str()) {
                // The switch never happened (a rotation that died before
                // it), or the key was set back: it is in use, not revoked.
                if r.switched || now >= r.written_ms + CLAIM_MS {
                    kept_in_use.push(r);
                } else {
                    kept.push(r);
                }
            } else {
                r.attempts += 1;
                r.claimed_until_ms = now + claim_ms;
                claimed.push(r.clone());
                kept.push(r);
            }
        }
        match self.swap_retiring(upstream, stored, &kept).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(upstream, error = %e, "cannot claim the retiring keys");
                return;
            }
        }
        for r in kept_in_use {
            let ev = AuditDraft::new(self.now(), "upstream.old_key_kept", r.actor.clone())
                .fingerprint(r.fingerprint.clone())
                .data("upstream", upstream.to_owned())
                .data("provider", cfg.provider.as_str())
                .reason("the key is the one in use (the rotation did not switch to a new key); it was not revoked");
            if let Err(e) = self.store.append_audit(ev).await {
                tracing::error!(error = %e, "cannot audit a kept key");
            }
        }
        for r in claimed {
            let res = self.revoke_old(cfg, &r).await;
            let at = self.now();
            let backoff = 1i64
                .checked_shl(r.attempts.saturating_sub(1).min(20))
                .unwrap_or(MAX_BACKOFF_SECS)
                .min(MAX_BACKOFF_SECS);
            let next = at.plus_secs(u64::try_from(backoff).unwrap_or(1));
            let base = |kind: &'static str| {
                AuditDraft::new(at, kind, r.actor.clone())
                    .fingerprint(r.fingerprint.clone())
                    .data("upstream", upstream.to_owned())
                    .data("provider", cfg.provider.as_str())
                    .data("attempt", r.attempts)
            };
            let (ev, done) = match &res {
                Revoked::Confirmed(d) => (
                    base("upstream.old_key_revoked").data("detail", d.clone()),
                    true,
                ),
                Revoked::Manual(d) => (
                    base("upstream.old_key_revoke_failed")
                        .outcome(Outcome::Failure)
                        .reason(d.clone()),
                    true,
                ),
                Revoked::Retry(d) => {
                    tracing::warn!(upstream, attempt = r.attempts, error = %d, "the old upstream key was not revoked; tried again later");
                    (
                        base("upstream.old_key_revoke_failed")
                            .outcome(Outcome::Failure)
                            .data("next_attempt_at", next.rfc3339())
                            .reason(format!(
                                "{d}; tried again until the provider confirms (or revoke it by hand in the provider's console)"
                            )),
                        false,
                    )
                }
            };
            if let Revoked::Confirmed(_) = res
                && let Ok(Some(item)) = self.store.inventory_by_fingerprint(&r.fingerprint).await
                && item.status != ItemStatus::Revoked
                && let Err(e) = self
                    .set_item_status(
                        &item.id,
                        ItemStatus::Revoked,
                        &r.actor,
                        "revoked after rotation",
                    )
                    .await
            {
                tracing::warn!(upstream, error = %e, "cannot mark a rotated key revoked");
            }
            // The audit first: an attempt is never unrecorded.
            if let Err(e) = self.store.append_audit(ev).await {
                tracing::error!(error = %e, "cannot audit the old key's revocation");
            }
            self.notify_audit();
            let fp = r.fingerprint.clone();
            let next_ms = next.millis();
            let updated = self
                .edit_retiring(upstream, |list| {
                    if done {
                        list.retain(|x| x.fingerprint != fp);
                    } else {
                        for x in list.iter_mut().filter(|x| x.fingerprint == fp) {
                            x.claimed_until_ms = 0;
                            x.due_ms = next_ms;
                        }
                    }
                })
                .await;
            if let Err(e) = updated {
                // The claim runs out and the next attempt finds the key
                // revoked already (deleted keys are not listed, `inactive`
                // is set again), or tries again.
                tracing::warn!(upstream, error = %e, "cannot record a revocation attempt");
            }
        }
    }

    /// Takes the rotation lock of `upstream` (`None`: another process
    /// holds it); the bytes written, to release it with.
    async fn lock_rotation(&self, upstream: &str, now: Timestamp) -> Result<Option<Vec<u8>>> {
        let name = format!("upstream/{upstream}/rotating");
        let stored = self.store.get_secret(&name).await?;
        if let Some(b) = &stored {
            let held = self
                .keyring
                .open(&name, b)
                .ok()
                .and_then(|b| serde_json::from_slice::<RotationLock>(&b).ok())
                .is_some_and(|l| l.until_ms > now.millis());
            if held {
                return Ok(None);
            }
        }
        let bytes = serde_json::to_vec(&RotationLock {
            until_ms: now.plus_millis(CLAIM_MS).millis(),
        })
        .map_err(|_| BrokerError::Unavailable("cannot encode a rotation lock".into()))?;
        let sealed = self
            .keyring
            .seal(&name, &bytes)
            .map_err(|_| BrokerError::Unavailable("cannot seal a rotation lock".into()))?;
        if self
            .store
            .swap_secret(&name, stored, sealed.clone(), now)
            .await?
        {
            Ok(Some(sealed))
        } else {
            Ok(None)
        }
    }

    /// Releases the lock taken as `held` (if still ours).
    async fn unlock_rotation(&self, upstream: &str, held: Vec<u8>) -> Result<()> {
        let name = format!("upstream/{upstream}/rotating");
        let bytes = serde_json::to_vec(&RotationLock { until_ms: 0 })
            .map_err(|_| BrokerError::Unavailable("cannot encode a rotation lock".into()))?;
        let sealed = self
            .keyring
            .seal(&name, &bytes)
            .map_err(|_| BrokerError::Unavailable("cannot seal a rotation lock".into()))?;
        self.store
            .swap_secret(&name, Some(held), sealed, self.now())
            .await?;
        Ok(())
    }
    /// The schedule: every `rotate_every`, the keys keymint can make anew
    /// are rotated; keys it cannot (Anthropic, manual) get their
    /// `rotation_due` finding from the inventory instead. A duty: it runs
    /// on the one replica that holds the duties.
    pub async fn run_rotation(self: Arc<Self>) {
        let Some(settings) = self.rotation.get().cloned() else {
            return;
        };
        let scheduled: Vec<RotationConfig> = settings
            .rotations
            .iter()
            .filter(|r| r.rotate_every_secs.is_some() && r.provider.creates_keys())
            .cloned()
            .collect();
        if settings.rotations.is_empty() {
            return;
        }
        // Every second: old keys whose grace period ended are revoked
        // (recorded in the store, so a restart resumes them); the schedule
        // is looked at every quarter of the shortest interval, at most
        // once a minute.
        let shortest = scheduled
            .iter()
            .filter_map(|r| r.rotate_every_secs)
            .min()
            .unwrap_or(60);
        let every = (shortest / 4).clamp(1, 60);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seconds = 0u64;
        loop {
            tick.tick().await;
            for r in &settings.rotations {
                self.retire_due(r).await;
            }
            seconds += 1;
            if !(seconds - 1).is_multiple_of(every) {
                continue;
            }
            if let Err(e) = self.sync_upstream_inventory().await {
                tracing::warn!(error = %e, "cannot bring the upstream keys into the inventory");
            }
            for r in &scheduled {
                if self.rotation_due(&r.upstream).await
                    && let Err(e) = self
                        .rotate(&r.upstream, None, "keymint", Trigger::Schedule)
                        .await
                {
                    tracing::warn!(upstream = %r.upstream, error = %e, "scheduled rotation failed");
                }
            }
        }
    }

    /// Whether the key in use is at or past its `rotate_by`.
    async fn rotation_due(&self, upstream: &str) -> bool {
        let Ok(Some(key)) = self.current_key(upstream).await else {
            return false;
        };
        let fp = self.keyring.fingerprint(key.as_bytes());
        match self.store.inventory_by_fingerprint(&fp).await {
            Ok(Some(item)) => item.rotate_by.is_some_and(|t| t <= self.now()),
            _ => false,
        }
    }
}

/// A key an operator supplies: what `Proxy::set_key` takes, checked before
/// any provider call.
fn check_key(k: &str) -> Result<()> {
    let k = k.trim();
    if k.is_empty() || k.len() > 8192 || !k.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(BrokerError::BadRequest(
            "`key` must be 1-8192 printable ASCII characters without spaces".into(),
        ));
    }
    Ok(())
}

fn anthropic_headers(api: AdminApi) -> AdminApi {
    api.with_key_header("x-api-key", &[("anthropic-version", "2023-06-01")])
}

fn str_of<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

/// OpenRouter: `POST /keys` with a name; the answer's `key` is shown once,
/// `data.hash` identifies it.
async fn create_openrouter(
    api: &AdminApi,
    name: &str,
) -> std::result::Result<(Zeroizing<String>, KeyRef), EngineError> {
    let a = api
        .call(
            Method::POST,
            "/keys",
            Some(&json!({"name": name})),
            "create key",
        )
        .await?;
    if a.status != StatusCode::CREATED && a.status != StatusCode::OK {
        return Err(api.unexpected("create key", a.status));
    }
    let (Some(key), Some(hash)) = (
        str_of(&a.body, "key"),
        a.body.get("data").and_then(|d| str_of(d, "hash")),
    ) else {
        return Err(api.malformed("create key"));
    };
    Ok((
        Zeroizing::new(key.to_owned()),
        KeyRef {
            key_id: Some(hash.to_owned()),
            ..KeyRef::default()
        },
    ))
}

/// OpenAI: a project service account, whose answer carries its first key
/// (`api_key.value`, `api_key.id`). The Admin API makes no other keys
/// keymint could hold without an owner.
async fn create_openai(
    api: &AdminApi,
    project: &str,
    name: &str,
) -> std::result::Result<(Zeroizing<String>, KeyRef), EngineError> {
    let path = format!(
        "/organization/projects/{}/service_accounts",
        segment(project)
    );
    let a = api
        .call(
            Method::POST,
            &path,
            Some(&json!({"name": name})),
            "create service account",
        )
        .await?;
    if a.status != StatusCode::OK && a.status != StatusCode::CREATED {
        return Err(api.unexpected("create service account", a.status));
    }
    let k = a.body.get("api_key").cloned().unwrap_or(Value::Null);
    let (Some(account), Some(value), Some(id)) =
        (str_of(&a.body, "id"), str_of(&k, "value"), str_of(&k, "id"))
    else {
        return Err(api.malformed("create service account"));
    };
    Ok((
        Zeroizing::new(value.to_owned()),
        KeyRef {
            key_id: Some(id.to_owned()),
            service_account: Some(account.to_owned()),
            ..KeyRef::default()
        },
    ))
}

/// Deletes a key keymint made, by the reference it kept (404: gone).
async fn delete_by_ref(
    cfg: &RotationConfig,
    api: &AdminApi,
    r: &KeyRef,
) -> std::result::Result<String, EngineError> {
    let ok = |s: StatusCode| {
        s == StatusCode::OK || s == StatusCode::NO_CONTENT || s == StatusCode::NOT_FOUND
    };
    match cfg.provider {
        RotationProvider::OpenRouter => {
            let hash = r.key_id.as_deref().unwrap_or_default();
            let a = api
                .call(
                    Method::DELETE,
                    &format!("/keys/{}", segment(hash)),
                    None,
                    "delete key",
                )
                .await?;
            if !ok(a.status) {
                return Err(api.unexpected("delete key", a.status));
            }
            Ok(format!("key `{hash}` deleted"))
        }
        RotationProvider::OpenAi => {
            let project = segment(cfg.project.as_deref().unwrap_or_default());
            let mut done = Vec::new();
            if let Some(id) = &r.key_id {
                let path = format!("/organization/projects/{project}/api_keys/{}", segment(id));
                let a = api
                    .call(Method::DELETE, &path, None, "delete project key")
                    .await?;
                if !ok(a.status) {
                    return Err(api.unexpected("delete project key", a.status));
                }
                done.push(format!("project key `{id}` deleted"));
            }
            if let Some(sa) = &r.service_account {
                let path = format!(
                    "/organization/projects/{project}/service_accounts/{}",
                    segment(sa)
                );
                let a = api
                    .call(Method::DELETE, &path, None, "delete service account")
                    .await?;
                if !ok(a.status) {
                    return Err(api.unexpected("delete service account", a.status));
                }
                done.push(format!("service account `{sa}` deleted"));
            }
            Ok(done.join(", "))
        }
        p => Err(EngineError::Rejected(format!(
            "{} keys are not deleted by keymint",
            p.as_str()
        ))),
    }
}

/// The old key revoked at its provider: by the reference keymint kept when
/// it made it, else found by its hint (as the leak response finds keys).
async fn revoke_at_provider(
    cfg: &RotationConfig,
    api: &AdminApi,
    old_ref: Option<&KeyRef>,
    old_hint: Option<&str>,
) -> std::result::Result<String, EngineError> {
    if let Some(r) = old_ref
        && cfg.provider.creates_keys()
    {
        return delete_by_ref(cfg, api, r).await;
    }
    let Some(hint) = old_hint else {
        return Err(EngineError::Rejected(
            "the old key is too short to be found by its hint".into(),
        ));
    };
    let done = match cfg.provider {
        RotationProvider::OpenRouter => {
            super::leak_response::openrouter(api, hint, LeakAction::Revoke).await?
        }
        RotationProvider::OpenAi => {
            let projects = cfg.project.clone().into_iter().collect::<Vec<_>>();
            super::leak_response::openai(api, &projects, hint).await?
        }
        RotationProvider::Anthropic => super::leak_response::anthropic(api, hint).await?,
        RotationProvider::Manual => {
            return Err(EngineError::Rejected("no admin API".into()));
        }
    };
    Ok(done.detail())
}

/// Step 3: one cheap call with the new key, as the provider documents it.
async fn verify(
    provider: RotationProvider,
    kind: UpstreamKind,
    upstream: &str,
    base_url: &str,
    key: &Zeroizing<String>,
) -> std::result::Result<String, EngineError> {
    let (name, path) = match (provider, kind) {
        (RotationProvider::OpenRouter, _) => ("openrouter", "/key"),
        (RotationProvider::OpenAi, _) | (RotationProvider::Manual, UpstreamKind::Openai) => {
            ("openai", "/models")
        }
        (RotationProvider::Anthropic, _) | (RotationProvider::Manual, UpstreamKind::Anthropic) => {
            let v1 = if base_url.trim_end_matches('/').ends_with("/v1") {
                "/models"
            } else {
                "/v1/models"
            };
            ("anthropic", v1)
        }
        (RotationProvider::Manual, UpstreamKind::Http) => {
            return Ok("not verified: an http upstream has no standard check".into());
        }
    };
    let api = AdminApi::new(
        name,
        upstream,
        base_url,
        CALL_DEADLINE,
        Arc::new(FixedKey(key.clone())),
    )?;
    let api = if name == "anthropic" {
        anthropic_headers(api)
    } else {
        api
    };
    let a = api
        .call(Method::GET, path, None, "verify the new key")
        .await
        .map_err(|e| match e {
            // The new key, not an admin key, was refused.
            EngineError::Rejected(_) => {
                EngineError::Rejected(format!("{name}: the new key was refused at GET {path}"))
            }
            e => e,
        })?;
    if a.status != StatusCode::OK {
        return Err(api.unexpected("verify the new key", a.status));
    }
    Ok(format!("GET {path} answered 200"))
}
