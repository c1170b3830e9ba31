//! Misuse monitoring's stored records (docs/design/0033-misuse-monitoring.md):
//! hourly use per upstream key, workload and task, the source addresses a
//! workload called from, and suspensions. Pure data; the server decides.

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// What a figure or a suspension is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// An upstream key keymint holds (by the upstream's name).
    Upstream,
    /// A workload (all its tasks).
    Workload,
    /// One task (its credentials).
    Task,
}

impl Scope {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Upstream => "upstream",
            Self::Workload => "workload",
            Self::Task => "task",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "upstream" => Some(Self::Upstream),
            "workload" => Some(Self::Workload),
            "task" => Some(Self::Task),
            _ => None,
        }
    }
}

/// Use within one hour (`hour` is its first millisecond, UTC), summed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageHour {
    pub hour: Timestamp,
    pub scope: Scope,
    pub subject: String,
    pub requests: u64,
    pub tokens: u64,
    /// Nano-dollars.
    pub spend_nusd: u64,
}

/// A source address a workload called the proxy from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceSeen {
    pub workload: String,
    /// The address, as text (`203.0.113.7`, `2001:db8::1`).
    pub address: String,
    /// ISO 3166-1 alpha-2, when the GeoIP database knows the address.
    pub country: Option<String>,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
    /// Requests from it since the last write (added to the stored count).
    pub requests: u64,
}

/// A suspension: what is refused, why, and whether an operator lifted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Suspension {
    /// `sus_…`.
    pub id: String,
    /// A task's credentials, a workload's tasks, or an upstream key.
    pub scope: Scope,
    /// The task id, workload name or upstream name.
    pub subject: String,
    /// The rule that raised it (`[[monitoring.rules]]` `name`).
    pub rule: String,
    /// What the rule saw, in words (figures, never a secret).
    pub reason: String,
    pub created_at: Timestamp,
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifted_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifted_by: Option<String>,
}

impl Suspension {
    pub const fn is_active(&self) -> bool {
        self.lifted_at.is_none()
    }
}

/// The first millisecond of the hour `t` falls in.
pub const fn hour_of(t: Timestamp) -> Timestamp {
    Timestamp(t.0 - t.0.rem_euclid(3_600_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_start_on_the_hour() {
        assert_eq!(hour_of(Timestamp(7_200_000)), Timestamp(7_200_000));
        assert_eq!(hour_of(Timestamp(7_199_999)), Timestamp(3_600_000));
        assert_eq!(hour_of(Timestamp(-1)), Timestamp(-3_600_000));
    }

    #[test]
    fn scopes_round_trip() {
        for s in [Scope::Upstream, Scope::Workload, Scope::Task] {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
        }
        assert_eq!(Scope::parse("Task"), None);
    }
}
