//! The credential inventory: one entry per credential keymint knows, held,
//! issued or found (docs/design/0027-inventory-and-leak-response.md), and
//! the findings evaluated on it.
//!
//! An entry never holds a secret. A key keymint did not make is known by a
//! keyed fingerprint (hex) and a redacted hint (a few characters at each
//! end, the form providers show in their consoles); only a key an operator
//! imports into custody is kept, sealed, under its own secret name.
//!
//! The findings are a pure function of an entry, the time and the limits
//! the configuration sets ([`evaluate`]), so they are tested here with no
//! store and no clock.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;

/// Where an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// An upstream key keymint holds (`[[upstreams]]`, sealed).
    Upstream,
    /// A credential keymint issued (a lease).
    Issued,
    /// A static key an operator registered.
    Registered,
    /// A key a scan reported.
    Scan,
    /// A key an operator imported into keymint's custody (sealed).
    Imported,
}

/// An entry's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    #[default]
    Active,
    /// Disabled at the provider (OpenRouter `disabled`, Anthropic `inactive`);
    /// may be enabled again there.
    Suspended,
    /// Deleted or revoked at the provider (or by keymint).
    Revoked,
    /// Taken out of service by an operator; kept for the record.
    Retired,
}

/// One place a key was seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Sighting {
    /// `path:line`, `image:layer/path:3`, `git:commit:path:line`, …
    pub location: String,
    /// What reported it: `keymint scan`, an operator, a workload.
    pub source: String,
    /// The environment the place belongs to, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    pub seen_at: Timestamp,
}

/// One credential keymint knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InventoryItem {
    /// `inv_…`.
    pub id: String,
    /// Bumped by every change; a write names the version it read, so two
    /// concurrent changes cannot both pass.
    pub version: u64,
    pub origin: Origin,
    pub status: ItemStatus,
    /// A short name for people.
    pub name: String,
    /// `openai`, `anthropic`, `openrouter`, `keymint`, `aws`, … or the
    /// scanner's rule family.
    pub provider: String,
    /// The scanner rule that recognised it, when a scan did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// A keyed fingerprint of the secret (HMAC-SHA-256, hex); never the
    /// secret.
    pub fingerprint: String,
    /// The secret's first characters and its last four (`sk-proj-Ab3…9xQz`),
    /// enough to find it in a provider's key list, never enough to use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub business_owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub technical_owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// Workloads known to use it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    pub created_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<Timestamp>,
    /// When it must be rotated by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_by: Option<Timestamp>,
    /// When keymint last rotated the key it replaces (held upstream keys:
    /// this entry's key came in by that rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_at: Option<Timestamp>,
    /// Where it was seen (at most [`MAX_SIGHTINGS`], newest kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sightings: Vec<Sighting>,
    /// When a scan first found it where it should not be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaked_at: Option<Timestamp>,
    /// How it is revoked: `automatic (<provider> admin API)` or the
    /// documented manual step an operator set.
    pub revocation: String,
    /// The lease it is, for issued credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// The upstream that holds it, for held and imported keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Findings already announced (audited and notified), so the duty loop
    /// announces each one once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub announced: Vec<FindingKind>,
    /// A leak response keymint still owes at the provider: written with
    /// the sighting that asks for it, cleared when the provider confirms
    /// or refuses for good, retried meanwhile (docs/design/0049).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_due: Option<ResponseDue>,
    pub updated_at: Timestamp,
}

/// A leak response not yet settled at the provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResponseDue {
    /// Attempts started so far.
    pub attempts: u32,
    /// When the next attempt may start: after a failure, its backoff;
    /// while an attempt is under way, the end of its claim (so an attempt
    /// cut short by a crash is taken up once the claim runs out).
    pub next_at: Timestamp,
}

/// The most sightings an entry keeps.
pub const MAX_SIGHTINGS: usize = 50;

impl InventoryItem {
    /// Records a sighting (the same location again only refreshes it);
    /// keeps the newest [`MAX_SIGHTINGS`].
    pub fn seen(&mut self, s: Sighting) {
        if let Some(old) = self
            .sightings
            .iter_mut()
            .find(|o| o.location == s.location && o.environment == s.environment)
        {
            old.seen_at = s.seen_at;
            old.source = s.source;
            return;
        }
        self.sightings.push(s);
        if self.sightings.len() > MAX_SIGHTINGS {
            let extra = self.sightings.len() - MAX_SIGHTINGS;
            self.sightings.drain(..extra);
        }
    }

    /// Whether the entry still stands for a usable credential.
    pub fn is_live(&self) -> bool {
        self.status == ItemStatus::Active
    }
}

/// What is wrong with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// Neither a business nor a technical owner.
    NoOwner,
    /// No expiry.
    NoExpiry,
    /// Older than the configured maximum age.
    TooOld,
    /// Not used for the configured number of days (or never, since then).
    Unused,
    /// Seen in more than one environment or used by more than one workload.
    Shared,
    /// Found where it should not be.
    Leaked,
    /// Past its rotation date (or within the warning window before it).
    RotationDue,
}

impl FindingKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NoOwner => "no_owner",
            Self::NoExpiry => "no_expiry",
            Self::TooOld => "too_old",
            Self::Unused => "unused",
            Self::Shared => "shared",
            Self::Leaked => "leaked",
            Self::RotationDue => "rotation_due",
        }
    }
}

/// The limits findings are judged against (from `[inventory]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FindingLimits {
    /// A credential older than this is `too_old`.
    pub max_age_ms: Option<i64>,
    /// Not used for this long is `unused` (measured from its last use, or
    /// from its creation when it was never used).
    pub unused_ms: Option<i64>,
    /// `rotation_due` this long before the rotation date.
    pub rotation_warning_ms: i64,
}

impl Default for FindingLimits {
    fn default() -> Self {
        Self {
            max_age_ms: Some(90 * 86_400_000),
            unused_ms: Some(30 * 86_400_000),
            rotation_warning_ms: 7 * 86_400_000,
        }
    }
}

/// One finding on one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Finding {
    pub item: String,
    pub kind: FindingKind,
    /// What a person reads: which fact, never a secret.
    pub detail: String,
}

/// The findings on `item` at `now`. Retired and revoked entries have none:
/// they can no longer be used.
pub fn evaluate(item: &InventoryItem, now: Timestamp, limits: &FindingLimits) -> Vec<Finding> {
    let mut out = Vec::new();
    if matches!(item.status, ItemStatus::Retired | ItemStatus::Revoked) {
        return out;
    }
    let mut add = |kind: FindingKind, detail: String| {
        out.push(Finding {
            item: item.id.clone(),
            kind,
            detail,
        });
    };
    if item.leaked_at.is_some() {
        let n = item.sightings.len();
        add(
            FindingKind::Leaked,
            format!("found in {n} place(s); revocation: {}", item.revocation),
        );
    }
    if item.business_owner.is_none() && item.technical_owner.is_none() {
        add(
            FindingKind::NoOwner,
            "neither a business nor a technical owner is set".into(),
        );
    }
    if item.expires_at.is_none() {
        add(FindingKind::NoExpiry, "the credential never expires".into());
    }
    if let Some(max) = item_limit(limits.max_age_ms)
        && item.created_at.until(now) > max
    {
        add(
            FindingKind::TooOld,
            format!(
                "created {} day(s) ago, more than the {} allowed",
                item.created_at.until(now) / 86_400_000,
                max / 86_400_000
            ),
        );
    }
    if let Some(unused) = item_limit(limits.unused_ms) {
        let since = item.last_used_at.unwrap_or(item.created_at);
        if since.until(now) > unused {
            add(
                FindingKind::Unused,
                match item.last_used_at {
                    Some(_) => format!("not used for {} day(s)", since.until(now) / 86_400_000),
                    None => format!(
                        "never used in the {} day(s) since it was created",
                        since.until(now) / 86_400_000
                    ),
                },
            );
        }
    }
    let envs: BTreeSet<&str> = item
        .sightings
        .iter()
        .filter_map(|s| s.environment.as_deref())
        .chain(item.environment.as_deref())
        .collect();
    if envs.len() > 1 || item.workloads.len() > 1 {
        add(
            FindingKind::Shared,
            format!(
                "used in {} environment(s) by {} workload(s)",
                envs.len(),
                item.workloads.len()
            ),
        );
    }
    if let Some(by) = item.rotate_by
        && now.plus_millis(limits.rotation_warning_ms) >= by
    {
        add(
            FindingKind::RotationDue,
            if now >= by {
                format!("the rotation date {by} has passed")
            } else {
                format!("must be rotated by {by}")
            },
        );
    }
    out
}

fn item_limit(ms: Option<i64>) -> Option<i64> {
    ms.filter(|m| *m > 0)
}

/// The hint of a secret: its first `head` characters (at most a quarter of
/// it) and its last four, joined by `…`. Enough to match a provider's
/// redacted form, never enough to use the key. A secret shorter than 32
/// characters gets no hint (`…`): what would show is too much of it.
pub fn hint(secret: &str, head: usize) -> String {
    let chars: Vec<char> = secret.chars().collect();
    let n = chars.len();
    if n < 32 {
        return "…".into();
    }
    let head = head.min(n / 4);
    let start: String = chars[..head].iter().collect();
    let end: String = chars[n - 4..].iter().collect();
    format!("{start}…{end}")
}

/// Whether a provider's redacted form of a key (`sk-abc...wxyz`,
/// `sk-ant-api03-R2D...igAA`, `sk-or-v1-0e6...1c96`) can be the key whose
/// hint is `hint`: the provider's visible head must agree with the hint's
/// head as far as both go, and the visible tails must be equal. Both sides
/// must show at least 3 characters of the head and of the tail.
pub fn hint_matches(hint: &str, redacted: &str) -> bool {
    let Some((h_head, h_tail)) = hint.split_once('…') else {
        return false;
    };
    let split = redacted
        .split_once("...")
        .or_else(|| redacted.split_once('…'));
    let Some((r_head, r_tail)) = split else {
        return false;
    };
    let common = h_head.len().min(r_head.len());
    let tail = h_tail.len().min(r_tail.len());
    common >= 3
        && tail >= 3
        && h_head.get(..common) == r_head.get(..common)
        && h_tail.get(h_tail.len() - tail..) == r_tail.get(r_tail.len() - tail..)
}

/// Whether `s` is a hint as [`hint`] makes it (the API checks what
/// callers send): printable, without control characters, at most 64
/// bytes, one `…` between a head and a four-character tail.
pub fn is_hint(s: &str) -> bool {
    s.len() <= 64
        && !s.chars().any(crate::model::is_unsafe_char)
        && s.split_once('…').is_some_and(|(h, t)| {
            t.chars().count() == 4 && !h.is_empty() && !h.contains('…') && !t.contains('…')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    fn item() -> InventoryItem {
        InventoryItem {
            id: "inv_1".into(),
            version: 1,
            origin: Origin::Registered,
            status: ItemStatus::Active,
            name: "billing bot key".into(),
            provider: "openai".into(),
            rule: None,
            fingerprint: "ab".repeat(32),
            hint: None,
            business_owner: Some("finance".into()),
            technical_owner: None,
            purpose: None,
            environment: Some("prod".into()),
            workloads: vec![],
            scopes: vec![],
            created_at: Timestamp(10 * DAY),
            expires_at: Some(Timestamp(200 * DAY)),
            last_used_at: Some(Timestamp(11 * DAY)),
            rotate_by: None,
            rotated_at: None,
            sightings: vec![],
            leaked_at: None,
            revocation: "manual".into(),
            lease: None,
            upstream: None,
            announced: vec![],
            response_due: None,
            updated_at: Timestamp(10 * DAY),
        }
    }

    fn kinds(i: &InventoryItem, now: i64) -> Vec<FindingKind> {
        evaluate(i, Timestamp(now * DAY), &FindingLimits::default())
            .into_iter()
            .map(|f| f.kind)
            .collect()
    }

    #[test]
    fn a_well_kept_key_has_no_findings() {
        assert!(kinds(&item(), 12).is_empty());
    }

    #[test]
    fn each_finding_is_raised_by_its_fact_alone() {
        let mut i = item();
        i.business_owner = None;
        assert_eq!(kinds(&i, 12), vec![FindingKind::NoOwner]);
        let mut i = item();
        i.expires_at = None;
        assert_eq!(kinds(&i, 12), vec![FindingKind::NoExpiry]);
        // 30 days unused (exactly) is not yet unused; a day more is.
        assert!(kinds(&item(), 41).is_empty());
        assert_eq!(kinds(&item(), 42), vec![FindingKind::Unused]);
        let mut i = item();
        i.last_used_at = Some(Timestamp(100 * DAY));
        assert_eq!(kinds(&i, 101), vec![FindingKind::TooOld]);
        let mut i = item();
        i.seen(Sighting {
            location: "a.env:1".into(),
            source: "keymint scan".into(),
            environment: Some("staging".into()),
            seen_at: Timestamp(11 * DAY),
        });
        assert_eq!(kinds(&i, 12), vec![FindingKind::Shared]);
        let mut i = item();
        i.workloads = vec!["a".into(), "b".into()];
        assert_eq!(kinds(&i, 12), vec![FindingKind::Shared]);
        let mut i = item();
        i.leaked_at = Some(Timestamp(11 * DAY));
        assert_eq!(kinds(&i, 12), vec![FindingKind::Leaked]);
        let mut i = item();
        i.rotate_by = Some(Timestamp(20 * DAY));
        assert!(kinds(&i, 12).is_empty());
        assert_eq!(kinds(&i, 13), vec![FindingKind::RotationDue]);
        let mut i = item();
        i.status = ItemStatus::Retired;
        i.business_owner = None;
        i.expires_at = None;
        assert!(kinds(&i, 500).is_empty());
    }

    #[test]
    fn sightings_are_deduplicated_and_bounded() {
        let mut i = item();
        for n in 0..(MAX_SIGHTINGS + 5) {
            i.seen(Sighting {
                location: format!("f{n}:1"),
                source: "s".into(),
                environment: None,
                seen_at: Timestamp(1),
            });
        }
        i.seen(Sighting {
            location: format!("f{}:1", MAX_SIGHTINGS + 4),
            source: "s".into(),
            environment: None,
            seen_at: Timestamp(2),
        });
        assert_eq!(i.sightings.len(), MAX_SIGHTINGS);
        assert_eq!(i.sightings[0].location, "f5:1");
        assert_eq!(i.sightings.last().map(|s| s.seen_at), Some(Timestamp(2)));
    }

    #[test]
    fn hints_match_the_providers_redacted_forms_only() {
        let key =
            "sk-ant-api03-R2DxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuvwxyzigAA";
        let h = hint(key, 16);
        assert_eq!(h, "sk-ant-api03-R2D…igAA");
        assert!(is_hint(&h));
        assert!(hint_matches(&h, "sk-ant-api03-R2D...igAA"));
        assert!(hint_matches(&h, "sk-ant...igAA"));
        assert!(!hint_matches(&h, "sk-ant-api03-R2E...igAA"));
        assert!(!hint_matches(&h, "sk-ant-api03-R2D...igAB"));
        assert!(!hint_matches(&h, "sk...gAA"), "too little head to match");
        assert!(!hint_matches(&h, "garbage"));
        let or = hint("sk-or-v1-0123456789abcdef0123456789abcdef", 12);
        assert!(hint_matches(&or, "sk-or-v1-...cdef"));
        assert_eq!(hint("short", 12), "…");
        // A 32-character secret shows 8 + 4 characters at most.
        assert_eq!(hint(&"a".repeat(32), 16), format!("{}…aaaa", "a".repeat(8)));
        assert!(!is_hint("a\n…abcd"));
        assert!(!is_hint("abc…abcde"));
    }
}
