//! Tasks, leases and roles, as stored and as shown on the wire.

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;

/// How a task ended, or that it has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Active,
    Completed,
    Failed,
    TimedOut,
    Revoked,
}

impl TaskStatus {
    pub const ALL: [Self; 5] = [
        Self::Active,
        Self::Completed,
        Self::Failed,
        Self::TimedOut,
        Self::Revoked,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub const fn is_active(self) -> bool {
        matches!(self, Self::Active)
    }
}

/// The life of one issued credential.
///
/// `pending` (recorded, provider not yet called or not yet confirmed) →
/// `active` → `revoking` (revocation requested, provider not yet confirmed)
/// → `revoked` or `expired`. A lease in `revoking` is already refused by
/// keymint itself; the state says the provider has not confirmed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    Pending,
    Active,
    Revoking,
    Revoked,
    Expired,
}

impl LeaseState {
    pub const ALL: [Self; 5] = [
        Self::Pending,
        Self::Active,
        Self::Revoking,
        Self::Revoked,
        Self::Expired,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Revoking => "revoking",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub const fn is_final(self) -> bool {
        matches!(self, Self::Revoked | Self::Expired)
    }
}

/// Whether the provider can take a credential back before it expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Revocability {
    /// keymint (or the provider) can kill it at once.
    Revocable,
    /// It lives until its own expiry (a signed certificate); so it is never
    /// issued past its task's end.
    ExpireOnly,
}

/// Why a lease stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// Revoked one by one through the API.
    Revoked,
    /// Its task ended (completed, failed, timed out or revoked).
    TaskEnded,
    /// Its TTL ran out.
    Expired,
    /// Found somewhere it should not be (the scanner's closed loop).
    Leaked,
    /// Found pending after a crash and not accounted for.
    Reconciled,
}

impl EndReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Revoked => "revoked",
            Self::TaskEnded => "task_ended",
            Self::Expired => "expired",
            Self::Leaked => "leaked",
            Self::Reconciled => "reconciled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Revoked,
            Self::TaskEnded,
            Self::Expired,
            Self::Leaked,
            Self::Reconciled,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

    /// The final state a lease ending for this reason reaches.
    pub const fn final_state(self) -> LeaseState {
        match self {
            Self::Expired => LeaseState::Expired,
            _ => LeaseState::Revoked,
        }
    }
}

/// A bounded piece of agent work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Task {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub workload: String,
    pub role: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    pub scopes: Vec<String>,
    pub status: TaskStatus,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
    pub last_seen_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<Timestamp>,
    /// The workloads that delegated down to this task, outermost first
    /// (the RFC 8693 `act` chain, flattened).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delegation: Vec<String>,
}

impl Task {
    /// When the task times out if nothing else happens: its TTL or its idle
    /// timeout, whichever comes first.
    pub fn deadline(&self) -> Timestamp {
        match self.idle_timeout_secs {
            Some(idle) => self.expires_at.min(self.last_seen_at.plus_secs(idle)),
            None => self.expires_at,
        }
    }

    /// Active and within its deadline at `now`.
    pub fn is_live(&self, now: Timestamp) -> bool {
        self.status.is_active() && now < self.deadline()
    }
}

/// One issued credential inside a task. Never holds the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Lease {
    pub id: String,
    pub task: String,
    pub workload: String,
    pub role: String,
    pub engine: EngineKind,
    pub scopes: Vec<String>,
    pub state: LeaseState,
    pub revocability: Revocability,
    /// HMAC-SHA256 of the secret under the fingerprint key.
    pub fingerprint: String,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<EndReason>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revoke_attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<Timestamp>,
    /// The last revocation error, already stripped of anything secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Engine-specific, non-secret facts needed to revoke (a database user
    /// name, a certificate serial).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub engine_data: serde_json::Value,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Lease {
    /// Usable at `now`: active and not past its expiry.
    pub fn is_usable(&self, now: Timestamp) -> bool {
        self.state == LeaseState::Active && now < self.expires_at
    }
}

pub use crate::role::{EngineKind, Role, RoleKind};

/// Checks a role, engine or similar name: 1–64 of `[a-z0-9._-]`, starting
/// with a letter or digit.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// Checks a scope: 1–128 of `[A-Za-z0-9:._/*-]`.
pub fn valid_scope(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":._/*-".contains(&b))
}

/// Checks free text such as a workload name, intent or purpose: at most
/// `max` bytes and no character [`is_unsafe_char`] refuses.
pub fn valid_text(s: &str, max: usize) -> bool {
    s.len() <= max && !s.chars().any(is_unsafe_char)
}

/// Whether `c` may not be in text that callers send: a control character
/// or a line or paragraph separator (U+2028, U+2029), which would let a
/// value forge lines in logs and terminals; or a Unicode bidirectional
/// embedding, override or isolate (U+202A-U+202E, U+2066-U+2069, the
/// characters rustc's lint against "Trojan Source", CVE-2021-42574, looks
/// for), which make text display in another order than it is stored: an
/// approver reading an intent, or an operator reading a workload name in
/// the console, would see something else than what is recorded. The
/// implicit marks (U+200E, U+200F, U+061C), which keyboards insert in
/// mixed right-to-left text, pass in free text; a name refuses them
/// ([`is_invisible_char`]).
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        )
}

/// Whether `c` shows as nothing where names are displayed (soft hyphen,
/// Arabic letter mark, zero-width space and joiners, the left-to-right and
/// right-to-left marks, word joiner and invisible operators, byte order
/// mark): a name may not hold one, so that two names that look the same
/// are the same name.
pub fn is_invisible_char(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2060}'..='\u{2064}'
            | '\u{FEFF}'
    )
}

/// The longest workload name, in bytes.
pub const MAX_WORKLOAD_LEN: usize = 256;

/// Checks a workload's name (free text, shown to people): [`valid_text`],
/// not blank (empty or only whitespace; whitespace around other text
/// stays), and no [`is_invisible_char`].
pub fn valid_workload(s: &str, max: usize) -> bool {
    !s.trim().is_empty() && valid_text(s, max) && !s.chars().any(is_invisible_char)
}

/// Where a request that policy held for a human stands.
///
/// `pending` → `approved` → `used` (the requester redeemed it, once), or
/// `pending` → `denied` / `expired`; `pending` or `approved` →
/// `expired` at its time, or `cancelled` when its task ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    Pending,
    Approved,
    Denied,
    Expired,
    Used,
    /// Closed by the end of its task (pending or approved, never redeemed):
    /// nothing it asked for can be carried out any more.
    Cancelled,
}

impl ApprovalStatus {
    pub const ALL: [Self; 6] = [
        Self::Pending,
        Self::Approved,
        Self::Denied,
        Self::Expired,
        Self::Used,
        Self::Cancelled,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::Expired => "expired",
            Self::Used => "used",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// A request that policy held for a human: what was asked, by whom, and
/// what became of it. Approving it lets the requester redeem exactly that
/// request, once, before `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Approval {
    pub id: String,
    /// The held action: `start_task`, `issue`, `renew` or `delegate`.
    pub action: String,
    pub status: ApprovalStatus,
    /// Who asked (`admin`, `workload:NAME`), as in audit events.
    pub requester: String,
    /// Only this principal may redeem: `admin` or `lease:ID` (the task token
    /// that asked).
    #[serde(skip)]
    pub requester_key: String,
    pub workload: String,
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// The request body, replayed as it was when redeemed.
    pub request: serde_json::Value,
    /// The policies that held it.
    pub policies: Vec<String>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A registration entry: which processes on which node are which workload
/// (docs/design/0012). A node agent attests a local process, matches it to
/// one of its node's entries and asks the server on that workload's behalf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegistrationEntry {
    /// `ent_…`.
    pub id: String,
    /// The workload a matching process is.
    pub workload: String,
    /// The node whose agent may attest it.
    pub node: String,
    /// What the process must be, all of it (`uid`, `gid`, `exe_path`,
    /// `exe_sha256`, `cgroup_prefix`, `container_id`); validated by the
    /// server with `keymint-attest`.
    pub selectors: serde_json::Value,
    /// Extra attributes for policy.
    #[serde(default)]
    pub attributes: std::collections::BTreeMap<String, String>,
    pub created_at: Timestamp,
}

#[cfg(test)]
mod text_tests {
    use super::*;

    #[test]
    fn bidirectional_and_invisible_characters_are_refused_where_they_deceive() {
        for c in [
            '\u{7}', '\u{1b}', '\n', '\u{85}', '\u{2028}', '\u{2029}', '\u{202a}', '\u{202b}',
            '\u{202c}', '\u{202d}', '\u{202e}', '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}',
        ] {
            assert!(is_unsafe_char(c), "{c:?}");
            assert!(!valid_text(&format!("a{c}b"), 64), "{c:?}");
        }
        for c in [
            '\u{ad}', '\u{61c}', '\u{200b}', '\u{200c}', '\u{200d}', '\u{200e}', '\u{200f}',
            '\u{2060}', '\u{feff}',
        ] {
            assert!(!is_unsafe_char(c), "{c:?} is allowed in free text");
            assert!(valid_text(&format!("a{c}b"), 64));
            assert!(!valid_workload(&format!("a{c}b"), 64), "{c:?} in a name");
        }
        for ok in ["agent-7", "סוכן", "وكيل", "エージェント", "a b"] {
            assert!(valid_workload(ok, 64), "{ok}");
        }
        assert!(!valid_workload("", 64));
        for blank in [" ", "   ", "\u{3000}", " \u{a0} "] {
            assert!(!valid_workload(blank, 64), "{blank:?}");
        }
        assert!(valid_workload(" a ", 64), "whitespace around a name stays");
        assert!(!valid_workload(&"a".repeat(65), 64));
    }
}
