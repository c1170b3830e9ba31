//! What may be granted: pure functions of the request, the role, the parent
//! and the time.
//!
//! INVARIANT (DESIGN.md 1): a lease never reaches past its task's end.
//! INVARIANT (DESIGN.md 6): a sub-task's scopes are a subset of its parent's,
//! its end is no later than its parent's, and its role is its parent's.

use crate::clock::Timestamp;
use crate::model::{Lease, LeaseState, Role, Task, valid_scope, valid_text};

/// Limits on tasks that come from configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskLimits {
    pub default_ttl_secs: u64,
    pub max_ttl_secs: u64,
    pub max_idle_timeout_secs: u64,
    /// How long an ended task and its finished leases stay in the store
    /// before retention deletes them (the audit trail keeps their history).
    /// 0 keeps them forever.
    pub retain_ended_secs: u64,
}

/// The default for [`TaskLimits::retain_ended_secs`]: 30 days.
pub const DEFAULT_RETAIN_ENDED_SECS: u64 = 30 * 86_400;

impl Default for TaskLimits {
    fn default() -> Self {
        Self {
            default_ttl_secs: 3600,
            max_ttl_secs: 24 * 3600,
            max_idle_timeout_secs: 24 * 3600,
            retain_ended_secs: DEFAULT_RETAIN_ENDED_SECS,
        }
    }
}

/// Why a request was refused. Every variant is the requester's to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("ttl must be at least 1 second")]
    ZeroTtl,
    #[error("ttl of {requested} seconds exceeds the limit of {limit} seconds")]
    TtlTooLong { requested: u64, limit: u64 },
    #[error(
        "ttl of {requested} seconds reaches past the end of task `{task}` ({remaining} seconds left)"
    )]
    TtlPastTaskEnd {
        requested: u64,
        remaining: u64,
        task: String,
    },
    /// [`Self::TtlPastTaskEnd`] where the end is that of the task token
    /// making the request, which ends before its task does.
    #[error(
        "ttl of {requested} seconds reaches past the end of the credential acting for task `{task}` ({remaining} seconds left)"
    )]
    TtlPastCredentialEnd {
        requested: u64,
        remaining: u64,
        task: String,
    },
    #[error("idle timeout must be between 1 and {limit} seconds")]
    IdleTimeout { limit: u64 },
    /// The 1-based position of the scope among those asked for: its text
    /// is the caller's and is never repeated back (STYLE.md).
    #[error(
        "scope {0} of those asked for is not a valid scope (1 to 128 characters of A-Z, a-z, 0-9 and `:._/*-`)"
    )]
    InvalidScope(usize),
    #[error("delegation is limited to {0} levels of sub-tasks")]
    DelegationTooDeep(usize),
    /// `scope` is named only when it is one of the role's own scopes (text
    /// the operator wrote); any other is named by its 1-based `position`
    /// among those asked for, never repeated back (STYLE.md: a caller's
    /// text, a pasted key among them, reaches neither the error body nor
    /// the audit trail).
    #[error("{} is not granted by {holder}", scope_shown(.scope.as_deref(), *.position))]
    ScopeNotGranted {
        scope: Option<String>,
        position: usize,
        holder: String,
    },
    #[error("too many scopes (at most {0})")]
    TooManyScopes(usize),
    #[error("a sub-task must use its parent's role `{0}`")]
    RoleMismatch(String),
    #[error("task `{0}` is not active")]
    TaskNotActive(String),
    #[error("lease `{0}` is not active")]
    LeaseNotActive(String),
    #[error("{field} is too long or contains a control or bidirectional formatting character")]
    BadText { field: &'static str },
    /// A workload's name (or a field that names a workload) that
    /// [`crate::model::valid_workload`] refuses.
    #[error(
        "`{field}` must be 1 to {max} bytes, not only whitespace, without control, bidirectional formatting or invisible characters",
        max = crate::model::MAX_WORKLOAD_LEN
    )]
    BadName { field: &'static str },
    /// A signed token or provider token cannot be extended once issued.
    #[error(
        "a {0} credential cannot be extended once issued (its expiry is signed into it): issue a new lease for a fresh one"
    )]
    NotRenewable(crate::role::EngineKind),
}

pub const MAX_SCOPES: usize = 64;
/// How many sub-task levels a task tree may have below its root.
pub const MAX_DELEGATION_DEPTH: usize = 16;

/// What a caller asks for when starting a task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskRequest {
    pub workload: String,
    pub intent: Option<String>,
    pub purpose: Option<String>,
    pub environment: Option<String>,
    pub ttl_secs: Option<u64>,
    pub idle_timeout_secs: Option<u64>,
    pub scopes: Option<Vec<String>>,
}

/// What a task is granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskGrant {
    pub scopes: Vec<String>,
    pub expires_at: Timestamp,
    pub idle_timeout_secs: Option<u64>,
}

fn check_text(v: Option<&str>, field: &'static str, max: usize) -> Result<(), RuleError> {
    match v {
        Some(s) if !valid_text(s, max) => Err(RuleError::BadText { field }),
        _ => Ok(()),
    }
}

/// How [`RuleError::ScopeNotGranted`] names the scope.
fn scope_shown(scope: Option<&str>, position: usize) -> String {
    match scope {
        Some(s) => format!("scope `{s}`"),
        None => format!("scope {position} of those asked for"),
    }
}

/// `holder` names who holds `allowed`, for the refusal only (made then,
/// not on every grant); `known` are the role's scopes, the only ones a
/// refusal names.
fn narrow_scopes(
    requested: Option<&[String]>,
    allowed: &[String],
    known: &[String],
    holder: impl FnOnce() -> String,
) -> Result<Vec<String>, RuleError> {
    let Some(req) = requested else {
        return Ok(allowed.to_vec());
    };
    if req.len() > MAX_SCOPES {
        return Err(RuleError::TooManyScopes(MAX_SCOPES));
    }
    let mut out: Vec<String> = Vec::with_capacity(req.len());
    for (i, s) in req.iter().enumerate() {
        if !valid_scope(s) {
            return Err(RuleError::InvalidScope(i + 1));
        }
        if !allowed.iter().any(|a| a == s) {
            return Err(RuleError::ScopeNotGranted {
                scope: known.contains(s).then(|| s.clone()),
                position: i + 1,
                holder: holder(),
            });
        }
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    Ok(out)
}

/// The seconds left before `end`, rounded down, at least 0.
fn remaining_secs(now: Timestamp, end: Timestamp) -> u64 {
    u64::try_from(now.until(end).max(0) / 1000).unwrap_or(0)
}

/// Checks a workload's name, in `field`, as task start does: every place
/// that takes a workload name from a caller (a task, a registration entry,
/// a suspension of a workload) refuses the same names with the same words.
pub fn check_workload_name(field: &'static str, s: &str) -> Result<(), RuleError> {
    if crate::model::valid_workload(s, crate::model::MAX_WORKLOAD_LEN) {
        Ok(())
    } else {
        Err(RuleError::BadName { field })
    }
}

/// Grants a task (or a sub-task, when `parent` is given).
pub fn grant_task(
    req: &TaskRequest,
    role: &Role,
    parent: Option<&Task>,
    limits: &TaskLimits,
    now: Timestamp,
) -> Result<TaskGrant, RuleError> {
    check_workload_name("workload", &req.workload)?;
    check_text(req.intent.as_deref(), "intent", 1024)?;
    check_text(req.purpose.as_deref(), "purpose", 1024)?;
    check_text(req.environment.as_deref(), "environment", 64)?;

    let (allowed, holder) = match parent {
        Some(p) => {
            if !p.is_live(now) {
                return Err(RuleError::TaskNotActive(p.id.clone()));
            }
            if p.role != role.name {
                return Err(RuleError::RoleMismatch(p.role.clone()));
            }
            if p.delegation.len() >= MAX_DELEGATION_DEPTH {
                return Err(RuleError::DelegationTooDeep(MAX_DELEGATION_DEPTH));
            }
            (p.scopes.as_slice(), format!("parent task `{}`", p.id))
        }
        None => (role.scopes.as_slice(), format!("role `{}`", role.name)),
    };
    let scopes = narrow_scopes(req.scopes.as_deref(), allowed, &role.scopes, || holder)?;

    let ttl = match req.ttl_secs {
        Some(0) => return Err(RuleError::ZeroTtl),
        Some(t) if t > limits.max_ttl_secs => {
            return Err(RuleError::TtlTooLong {
                requested: t,
                limit: limits.max_ttl_secs,
            });
        }
        Some(t) => t,
        None => limits.default_ttl_secs,
    };
    let mut expires_at = now.plus_secs(ttl);
    if let Some(p) = parent {
        // The parent's hard end, not its idle deadline: heartbeats keep the
        // parent alive, and its idle expiry ends the sub-task with it.
        let parent_end = p.expires_at;
        if expires_at > parent_end {
            if req.ttl_secs.is_some() {
                return Err(RuleError::TtlPastTaskEnd {
                    requested: ttl,
                    remaining: remaining_secs(now, parent_end),
                    task: p.id.clone(),
                });
            }
            expires_at = parent_end;
        }
    }
    let idle_timeout_secs = match req.idle_timeout_secs {
        Some(i) if i == 0 || i > limits.max_idle_timeout_secs => {
            return Err(RuleError::IdleTimeout {
                limit: limits.max_idle_timeout_secs,
            });
        }
        other => other,
    };
    Ok(TaskGrant {
        scopes,
        expires_at,
        idle_timeout_secs,
    })
}

/// What a lease is granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseGrant {
    pub scopes: Vec<String>,
    pub expires_at: Timestamp,
}

/// The latest a lease of `role` inside `task` may expire. A revocable
/// credential follows the task's hard end: heartbeats keep a task with an
/// idle timeout alive, and when it does go idle the task ends and revokes
/// the credential. An expire-only one (an SSH certificate) cannot be taken
/// back, so it never outlives the task's current deadline, idle timeout
/// included (DESIGN.md invariant 1).
pub fn lease_end(task: &Task, role: &Role) -> Timestamp {
    match role.kind {
        crate::role::RoleKind::Ssh(_) => task.deadline(),
        _ => task.expires_at,
    }
}

/// Grants a lease inside `task`.
pub fn grant_lease(
    task: &Task,
    role: &Role,
    ttl_secs: Option<u64>,
    scopes: Option<&[String]>,
    now: Timestamp,
) -> Result<LeaseGrant, RuleError> {
    if !task.is_live(now) {
        return Err(RuleError::TaskNotActive(task.id.clone()));
    }
    let scopes = narrow_scopes(scopes, &task.scopes, &role.scopes, || {
        format!("task `{}`", task.id)
    })?;
    let end = lease_end(task, role);
    let expires_at = match ttl_secs {
        Some(0) => return Err(RuleError::ZeroTtl),
        Some(t) if t > role.max_ttl_secs => {
            return Err(RuleError::TtlTooLong {
                requested: t,
                limit: role.max_ttl_secs,
            });
        }
        Some(t) => {
            let e = now.plus_secs(t);
            if e > end {
                return Err(RuleError::TtlPastTaskEnd {
                    requested: t,
                    remaining: remaining_secs(now, end),
                    task: task.id.clone(),
                });
            }
            e
        }
        None => now.plus_secs(role.default_ttl_secs).min(end),
    };
    Ok(LeaseGrant { scopes, expires_at })
}

/// The new expiry of a renewed lease: `now + increment`, never past the
/// role's maximum TTL counted from issuance, nor the task's deadline, and
/// never earlier than the current expiry. Returns the expiry and whether a
/// limit cut the increment short.
pub fn renew_lease(
    lease: &Lease,
    task: &Task,
    role: &Role,
    increment_secs: Option<u64>,
    now: Timestamp,
) -> Result<(Timestamp, bool), RuleError> {
    if lease.state != LeaseState::Active || now >= lease.expires_at {
        return Err(RuleError::LeaseNotActive(lease.id.clone()));
    }
    if !task.is_live(now) {
        return Err(RuleError::TaskNotActive(task.id.clone()));
    }
    // A JWT, STS credentials, a provider's access token or an SSH
    // certificate carry their own expiry: extending the lease record would
    // only make keymint's books disagree with what the provider or sshd
    // accepts. Told by the engine the lease was issued by (what the
    // credential is), whatever its role has become since.
    if matches!(
        lease.engine,
        crate::role::EngineKind::Jwt
            | crate::role::EngineKind::Aws
            | crate::role::EngineKind::Federated
            | crate::role::EngineKind::Ssh
    ) {
        return Err(RuleError::NotRenewable(lease.engine));
    }
    let inc = match increment_secs {
        Some(0) => return Err(RuleError::ZeroTtl),
        // Past what the API's schema (`int64`) holds: refused as a ttl of
        // that size is at task start or issue, not capped like an
        // increment the role's limit cuts.
        Some(i) if i64::try_from(i).is_err() => {
            return Err(RuleError::TtlTooLong {
                requested: i,
                limit: role.max_ttl_secs,
            });
        }
        Some(i) => i,
        None => role.default_ttl_secs,
    };
    let wanted = now.plus_secs(inc);
    let cap = lease
        .created_at
        .plus_secs(role.max_ttl_secs)
        .min(lease_end(task, role));
    let new = wanted.min(cap).max(lease.expires_at);
    Ok((new, wanted > cap))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Revocability, TaskStatus};

    fn role() -> Role {
        Role {
            name: "r".into(),
            scopes: vec!["llm:chat".into(), "llm:embed".into()],
            default_ttl_secs: 600,
            max_ttl_secs: 3600,
            description: None,
            kind: crate::role::RoleKind::Token(crate::role::TokenRole::default()),
        }
    }

    fn task(now: Timestamp, ttl: u64) -> Task {
        Task {
            id: "tsk_parent".into(),
            parent: None,
            workload: "w".into(),
            role: "r".into(),
            intent: None,
            purpose: None,
            environment: None,
            scopes: vec!["llm:chat".into()],
            status: TaskStatus::Active,
            created_at: now,
            expires_at: now.plus_secs(ttl),
            idle_timeout_secs: None,
            last_seen_at: now,
            ended_at: None,
            delegation: vec![],
        }
    }

    fn req() -> TaskRequest {
        TaskRequest {
            workload: "agent".into(),
            ..TaskRequest::default()
        }
    }

    const NOW: Timestamp = Timestamp(1_800_000_000_000);

    #[test]
    fn task_defaults_to_role_scopes_and_default_ttl() {
        let g = grant_task(&req(), &role(), None, &TaskLimits::default(), NOW).unwrap();
        assert_eq!(g.scopes, role().scopes);
        assert_eq!(g.expires_at, NOW.plus_secs(3600));
    }

    #[test]
    fn sub_task_narrows_and_is_clamped_to_parent() {
        let parent = task(NOW, 100);
        let g = grant_task(&req(), &role(), Some(&parent), &TaskLimits::default(), NOW).unwrap();
        assert_eq!(g.scopes, vec!["llm:chat".to_owned()]);
        assert_eq!(g.expires_at, parent.expires_at);

        let wider = TaskRequest {
            scopes: Some(vec!["llm:embed".into()]),
            ..req()
        };
        let e = grant_task(&wider, &role(), Some(&parent), &TaskLimits::default(), NOW);
        assert!(matches!(e, Err(RuleError::ScopeNotGranted { .. })));
        // A scope of the role is named; any other (a pasted key) only by
        // where it stands.
        let e = e.unwrap_err().to_string();
        assert!(e.contains("scope `llm:embed` is not granted"), "{e}");
        let pasted = format!("sk-proj-{}", "A".repeat(40));
        let r = TaskRequest {
            scopes: Some(vec!["llm:chat".into(), pasted.clone()]),
            ..req()
        };
        let e = grant_task(&r, &role(), Some(&parent), &TaskLimits::default(), NOW)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("sk-proj") && !e.contains("AAAA"), "{e}");
        assert!(
            e.starts_with("scope 2 of those asked for is not granted by parent task"),
            "{e}"
        );

        let longer = TaskRequest {
            ttl_secs: Some(101),
            ..req()
        };
        let e = grant_task(&longer, &role(), Some(&parent), &TaskLimits::default(), NOW);
        assert!(matches!(
            e,
            Err(RuleError::TtlPastTaskEnd { remaining: 100, .. })
        ));

        let mut other_role = role();
        other_role.name = "other".into();
        let e = grant_task(
            &req(),
            &other_role,
            Some(&parent),
            &TaskLimits::default(),
            NOW,
        );
        assert!(matches!(e, Err(RuleError::RoleMismatch(_))));
    }

    #[test]
    fn bad_ttls_and_text_are_refused() {
        let l = TaskLimits::default();
        for (ttl, ok) in [
            (Some(0), false),
            (Some(l.max_ttl_secs + 1), false),
            (Some(1), true),
        ] {
            let r = TaskRequest {
                ttl_secs: ttl,
                ..req()
            };
            assert_eq!(
                grant_task(&r, &role(), None, &l, NOW).is_ok(),
                ok,
                "{ttl:?}"
            );
        }
        let r = TaskRequest {
            intent: Some("line\nforged".into()),
            ..req()
        };
        assert!(matches!(
            grant_task(&r, &role(), None, &l, NOW),
            Err(RuleError::BadText { field: "intent" })
        ));
        let r = TaskRequest {
            scopes: Some(vec!["llm:chat'; --".into()]),
            ..req()
        };
        assert!(matches!(
            grant_task(&r, &role(), None, &l, NOW),
            Err(RuleError::InvalidScope(_))
        ));
    }

    #[test]
    fn delegation_depth_is_bounded_and_bad_scopes_are_not_echoed() {
        let mut parent = task(NOW, 100);
        parent.delegation = vec!["w".into(); MAX_DELEGATION_DEPTH - 1];
        assert!(grant_task(&req(), &role(), Some(&parent), &TaskLimits::default(), NOW).is_ok());
        parent.delegation.push("w".into());
        assert_eq!(
            grant_task(&req(), &role(), Some(&parent), &TaskLimits::default(), NOW),
            Err(RuleError::DelegationTooDeep(MAX_DELEGATION_DEPTH))
        );
        // Markup, quotes, a backtick that would close the message's own
        // quoting, an invisible character, a long tail: none of it is
        // repeated back, only where the bad scope stands.
        for bad in [
            format!("bad scope\n{}", "x".repeat(10_000)),
            "<script>alert(1)</script>".to_owned(),
            "a`b\"c'd&e".to_owned(),
            "MARK\u{200B}ER".to_owned(),
        ] {
            let r = TaskRequest {
                scopes: Some(vec!["llm:chat".into(), bad.clone()]),
                ..req()
            };
            let Err(e) = grant_task(&r, &role(), None, &TaskLimits::default(), NOW) else {
                panic!("expected a refusal of {bad:?}");
            };
            assert!(matches!(e, RuleError::InvalidScope(..)), "{e:?}");
            let shown = e.to_string();
            assert!(shown.starts_with("scope 2 of those asked for"), "{shown}");
            for part in ["xxxx", "<script", "alert", "a`b", "MARK", "\n", "\"c"] {
                assert!(!shown.contains(part), "{part:?} echoed: {shown}");
            }
            assert!(shown.len() < 160, "{shown}");
        }
    }

    #[test]
    fn lease_never_outlives_its_task() {
        let t = task(NOW, 100);
        let g = grant_lease(&t, &role(), None, None, NOW).unwrap();
        assert_eq!(
            g.expires_at, t.expires_at,
            "default TTL 600 s is clamped to the task"
        );
        assert!(matches!(
            grant_lease(&t, &role(), Some(101), None, NOW),
            Err(RuleError::TtlPastTaskEnd { .. })
        ));
        assert!(matches!(
            grant_lease(&t, &role(), Some(3601), None, NOW),
            Err(RuleError::TtlTooLong { .. })
        ));
        assert!(matches!(
            grant_lease(&t, &role(), None, None, t.expires_at),
            Err(RuleError::TaskNotActive(_))
        ));
    }

    #[test]
    fn idle_timeout_moves_the_deadline() {
        let mut t = task(NOW, 1000);
        t.idle_timeout_secs = Some(10);
        assert_eq!(t.deadline(), NOW.plus_secs(10));
        assert!(!t.is_live(NOW.plus_secs(10)));
        t.last_seen_at = NOW.plus_secs(5);
        assert!(t.is_live(NOW.plus_secs(10)));
    }

    #[test]
    fn leases_in_an_idle_task_follow_its_hard_end_unless_expire_only() {
        let mut t = task(NOW, 1000);
        t.idle_timeout_secs = Some(10);
        // A revocable credential lives past the first idle deadline: the
        // task's heartbeats keep it alive, and its idle expiry revokes it.
        let g = grant_lease(&t, &role(), None, None, NOW).unwrap();
        assert_eq!(g.expires_at, NOW.plus_secs(600));
        assert!(grant_lease(&t, &role(), Some(900), None, NOW).is_ok());
        // An SSH certificate cannot be taken back: the idle deadline caps it.
        let mut ssh = role();
        ssh.kind = crate::role::RoleKind::Ssh(
            serde_json::from_value(serde_json::json!({"ca": "ca", "principals": ["p"]})).unwrap(),
        );
        let g = grant_lease(&t, &ssh, None, None, NOW).unwrap();
        assert_eq!(g.expires_at, NOW.plus_secs(10));
        // A sub-task is bounded by the parent's hard end, not its idle one.
        let sub = grant_task(&req(), &role(), Some(&t), &TaskLimits::default(), NOW).unwrap();
        assert_eq!(sub.expires_at, NOW.plus_secs(1000));
    }

    /// An active lease of `t` by `engine`, issued at `NOW` for 600 s.
    fn lease_of(t: &Task, engine: crate::role::EngineKind) -> Lease {
        Lease {
            id: "lse_x".into(),
            task: t.id.clone(),
            workload: "w".into(),
            role: "r".into(),
            engine,
            scopes: vec![],
            state: LeaseState::Active,
            revocability: Revocability::Revocable,
            fingerprint: String::new(),
            created_at: NOW,
            expires_at: NOW.plus_secs(600),
            ended_at: None,
            end_reason: None,
            revoke_attempts: 0,
            next_attempt_at: None,
            last_error: None,
            engine_data: serde_json::Value::Null,
        }
    }

    #[test]
    fn renewal_is_capped_by_role_and_task() {
        let t = task(NOW, 10_000);
        let lease = lease_of(&t, crate::role::EngineKind::Token);
        let later = NOW.plus_secs(3000);
        let mut l2 = lease.clone();
        l2.expires_at = NOW.plus_secs(3500);
        let (e, capped) = renew_lease(&l2, &t, &role(), Some(3000), later).unwrap();
        assert_eq!(e, NOW.plus_secs(3600), "role max TTL counts from issuance");
        assert!(capped);
        let (e, capped) = renew_lease(&lease, &t, &role(), Some(60), NOW.plus_secs(10)).unwrap();
        assert_eq!(e, NOW.plus_secs(600), "never shortens");
        assert!(!capped);
        let short_task = task(NOW, 700);
        let (e, capped) =
            renew_lease(&lease, &short_task, &role(), None, NOW.plus_secs(500)).unwrap();
        assert_eq!(e, NOW.plus_secs(700));
        assert!(capped);
        assert!(renew_lease(&lease, &t, &role(), None, NOW.plus_secs(600)).is_err());
        // The largest `int64` is capped like any increment; one past it is
        // refused as a ttl of that size is (the API's schema is `int64`).
        let (_, capped) = renew_lease(
            &lease,
            &t,
            &role(),
            Some(i64::MAX as u64),
            NOW.plus_secs(10),
        )
        .unwrap();
        assert!(capped);
        for huge in [1 << 63, u64::MAX] {
            assert_eq!(
                renew_lease(&lease, &t, &role(), Some(huge), NOW.plus_secs(10)),
                Err(RuleError::TtlTooLong {
                    requested: huge,
                    limit: 3600
                })
            );
        }
    }

    /// An SSH certificate's `valid_before` is signed into it: its lease is
    /// not renewed, whether its role is still an SSH role or not.
    #[test]
    fn an_ssh_lease_is_not_renewed() {
        let t = task(NOW, 10_000);
        let mut ssh = role();
        ssh.kind = crate::role::RoleKind::Ssh(
            serde_json::from_value(serde_json::json!({"ca": "ca", "principals": ["p"]})).unwrap(),
        );
        let mut lease = lease_of(&t, crate::role::EngineKind::Ssh);
        lease.revocability = Revocability::ExpireOnly;
        for r in [&ssh, &role()] {
            assert_eq!(
                renew_lease(&lease, &t, r, Some(60), NOW.plus_secs(10)),
                Err(RuleError::NotRenewable(crate::role::EngineKind::Ssh))
            );
        }
    }
}
