//! Where keymint keeps tasks, leases, sealed secrets and the audit chain.
//!
//! [`Store`] is shaped by the domain, not by a database: every method is one
//! atomic step of the broker (start a task with its audit event, end a task
//! tree and mark its leases for revocation, …). Decisions that need the
//! current row (may this lease be issued inside this task?) are passed in as
//! closures over [`keymint_core::rules`], so that the check and the write are
//! one transaction on every backend.
//!
//! Backends: [`sqlite::SqliteStore`] (embedded; WAL; one writer thread with
//! group commit, so concurrent writes share an fsync). PostgreSQL follows in
//! a later change. [`conformance`] is the suite every backend must pass.

pub mod conformance;
pub mod sqlite;

use async_trait::async_trait;
use keymint_core::Timestamp;
use keymint_core::audit::{AuditDraft, AuditEvent};
use keymint_core::model::{
    Approval, ApprovalStatus, EndReason, Lease, LeaseState, RegistrationEntry, Task, TaskStatus,
};
use keymint_core::rules::RuleError;

pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error(transparent)]
    Rule(#[from] RuleError),
    /// Internal detail for the log, never for a response body.
    #[error("storage backend: {0}")]
    Backend(String),
    #[error("the store is shut down")]
    Closed,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Backend(e.to_string())
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What one [`Store::prune_ended`] call deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub tasks: u64,
    pub leases: u64,
}

/// How long a lease moved to `revoking` belongs to whoever moved it: the
/// caller drives the revocation at once, and only if it has neither
/// finished nor recorded a failure by then (it crashed) does the sweeper
/// take the lease. Without this, the two would revoke it side by side.
pub const REVOCATION_CLAIM_MS: i64 = 30_000;

/// Decides a new task from its parent (if any), inside the transaction.
pub type TaskGrantFn =
    Box<dyn FnOnce(Option<&Task>) -> Result<(Task, AuditDraft), RuleError> + Send>;
/// Decides a new lease from its task, inside the transaction.
pub type LeaseGrantFn = Box<dyn FnOnce(&Task) -> Result<(Lease, AuditDraft), RuleError> + Send>;
/// Decides a renewal from the lease and its task, inside the transaction.
pub type RenewFn =
    Box<dyn FnOnce(&Lease, &Task) -> Result<(Timestamp, AuditDraft), RuleError> + Send>;

/// Filters for listing tasks; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskFilter {
    pub status: Option<TaskStatus>,
    pub workload: Option<String>,
    pub role: Option<String>,
    pub parent: Option<String>,
    pub limit: u32,
}

/// Filters for listing leases; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseFilter {
    pub task: Option<String>,
    pub workload: Option<String>,
    pub role: Option<String>,
    pub state: Option<LeaseState>,
    pub limit: u32,
}

/// Which leases a bulk revocation takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseSelector {
    Id(String),
    Task(String),
    Workload(String),
    Role(String),
    Fingerprint(String),
}

/// Ending a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskEnd {
    pub id: String,
    pub status: TaskStatus,
    pub now: Timestamp,
    pub actor: String,
    pub reason: Option<String>,
}

/// What ending a task changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndedTree {
    /// The task and every sub-task that was still active, root first.
    pub tasks: Vec<String>,
    /// Leases moved to `revoking`; the caller drives their revocation.
    pub leases: Vec<Lease>,
}

/// A finished revocation.
#[derive(Debug, Clone, PartialEq)]
pub struct RevocationDone {
    pub lease: String,
    pub audit: AuditDraft,
}

/// Counts for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub tasks_active: u64,
    pub leases: Vec<(LeaseState, u64)>,
    pub audit_head: u64,
}

/// One step in an approval's life, for [`Store::transition_approval`].
#[derive(Debug, Clone)]
pub struct ApprovalChange {
    pub id: String,
    pub from: ApprovalStatus,
    pub to: ApprovalStatus,
    /// The approver, for `approved` and `denied`.
    pub by: Option<String>,
    pub note: Option<String>,
    pub now: Timestamp,
    pub audit: AuditDraft,
}

#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    // ---- tasks ----

    /// Starts a task. With `parent`, the grant sees the parent as it is in
    /// the same transaction, so a parent ending concurrently cannot be missed.
    async fn create_task(&self, parent: Option<&str>, grant: TaskGrantFn) -> Result<Task>;
    async fn get_task(&self, id: &str) -> Result<Option<Task>>;
    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<Task>>;
    /// Records a heartbeat on an active task; returns it, or `None` if it is
    /// not active.
    async fn touch_task(&self, id: &str, now: Timestamp) -> Result<Option<Task>>;
    /// Ends the task and every active task below it, and moves every pending
    /// or active lease of that tree to `revoking`. `None` if the task was not
    /// active. The root gets `end.status`; sub-tasks get `revoked`.
    async fn end_task(&self, end: TaskEnd) -> Result<Option<EndedTree>>;
    /// Active tasks whose deadline (TTL or idle timeout) has passed.
    async fn timed_out_tasks(&self, now: Timestamp, limit: u32) -> Result<Vec<String>>;

    // ---- leases ----

    /// Records a lease. The grant decides it from the task; the lease is
    /// stored in the state the grant sets (`pending` before a provider call,
    /// `active` for credentials keymint mints itself).
    async fn insert_lease(&self, task: &str, grant: LeaseGrantFn) -> Result<Lease>;
    /// Moves a pending lease to active. `false` if it is no longer pending
    /// (its task ended meanwhile): the caller must not hand it out.
    async fn activate_lease(&self, id: &str, audit: AuditDraft) -> Result<bool>;
    /// Moves a pending lease to active with the fingerprint and engine data
    /// of the secret the provider made (an API key keymint could not know
    /// when it recorded the lease). `false` as for [`Store::activate_lease`].
    async fn activate_minted_lease(
        &self,
        id: &str,
        fingerprint: &str,
        engine_data: serde_json::Value,
        audit: AuditDraft,
    ) -> Result<bool>;
    async fn get_lease(&self, id: &str) -> Result<Option<Lease>>;
    /// The lease with this fingerprint and its task.
    async fn lease_by_fingerprint(&self, fingerprint: &str) -> Result<Option<(Lease, Task)>>;
    async fn list_leases(&self, filter: &LeaseFilter) -> Result<Vec<Lease>>;
    async fn renew_lease(&self, id: &str, renew: RenewFn) -> Result<Lease>;
    /// Moves the selected pending or active leases to `revoking`, with one
    /// audit event each (`lease.revoke_requested`). The caller drives them;
    /// they fall due for the sweeper after [`REVOCATION_CLAIM_MS`].
    async fn request_revocation(
        &self,
        selector: LeaseSelector,
        reason: EndReason,
        now: Timestamp,
        actor: &str,
    ) -> Result<Vec<Lease>>;
    /// Moves active leases past their expiry to `revoking` with reason
    /// `expired` (at most `limit`), claimed like [`Store::request_revocation`].
    async fn expire_due(&self, now: Timestamp, limit: u32) -> Result<Vec<Lease>>;
    /// Leases in `revoking` whose next attempt is due.
    async fn due_revocations(&self, now: Timestamp, limit: u32) -> Result<Vec<Lease>>;
    /// Leases still `pending` that were created before `before` (a crash
    /// between recording and activating them).
    async fn stale_pending(&self, before: Timestamp, limit: u32) -> Result<Vec<Lease>>;
    /// Marks revocations confirmed; each lease reaches the final state its
    /// end reason names. Leases not in `revoking` are left alone.
    async fn finish_revocations(&self, done: Vec<RevocationDone>, now: Timestamp) -> Result<()>;
    /// Records a failed attempt; the lease stays in (or, if a concurrent
    /// path marked it revoked before the provider had finished creating it,
    /// returns to) `revoking`, so the attempt is retried.
    async fn revocation_failed(
        &self,
        id: &str,
        next_attempt: Timestamp,
        error: &str,
        audit: AuditDraft,
    ) -> Result<()>;
    /// Retention: deletes up to `limit` tasks that ended before `before`
    /// and hold no lease still pending, active or revoking and no live
    /// sub-task, with their leases, and records one `store.pruned` audit
    /// event (`now`) with the counts in the same transaction (none if
    /// nothing was pruned). The audit trail keeps their history.
    async fn prune_ended(&self, before: Timestamp, now: Timestamp, limit: u32) -> Result<Pruned>;
    /// The earliest moment anything (a task deadline, a lease expiry, a
    /// revocation retry) needs attention.
    async fn next_deadline(&self) -> Result<Option<Timestamp>>;

    // ---- approvals ----

    /// Records a request that policy held for a human (`pending`), with its
    /// audit event.
    async fn create_approval(&self, approval: Approval, audit: AuditDraft) -> Result<()>;
    async fn get_approval(&self, id: &str) -> Result<Option<Approval>>;
    /// Newest first, optionally only those in `status`.
    async fn list_approvals(
        &self,
        status: Option<ApprovalStatus>,
        limit: u32,
    ) -> Result<Vec<Approval>>;
    /// Moves an approval from `from` to `to` (recording who and why for a
    /// decision) if it is in `from` and not past its expiry at `now`, with
    /// the audit event in the same transaction. `None` if it was not.
    async fn transition_approval(&self, change: ApprovalChange) -> Result<Option<Approval>>;
    /// Pending or approved approvals past their expiry become `expired`
    /// (at most `limit`), one `approval.expired` audit event each.
    async fn expire_approvals(&self, now: Timestamp, limit: u32) -> Result<Vec<Approval>>;
    /// Pending approvals whose announcement (the webhook) is due.
    async fn approvals_to_announce(&self, now: Timestamp, limit: u32) -> Result<Vec<Approval>>;
    /// Records an announcement: delivered, or failed with the next attempt.
    async fn approval_announced(&self, id: &str, next_attempt: Option<Timestamp>) -> Result<()>;

    // ---- registration entries (node agents) ----

    /// Records a new entry, with its audit event. An entry with the same id
    /// is an error.
    async fn create_entry(&self, entry: RegistrationEntry, audit: AuditDraft) -> Result<()>;
    async fn get_entry(&self, id: &str) -> Result<Option<RegistrationEntry>>;
    /// Oldest first; only `node`'s when given.
    async fn list_entries(&self, node: Option<&str>) -> Result<Vec<RegistrationEntry>>;
    /// Deletes an entry with its audit event; `None` (and no event) if there
    /// was none.
    async fn delete_entry(&self, id: &str, audit: AuditDraft) -> Result<Option<RegistrationEntry>>;

    // ---- audit ----

    async fn append_audit(&self, draft: AuditDraft) -> Result<AuditEvent>;
    /// Events with `seq > after`, oldest first; only events known to be on
    /// disk, so nothing a power loss could take back reaches a sink.
    async fn audit_after(&self, after: u64, limit: u32) -> Result<Vec<AuditEvent>>;
    /// The same events as [`Store::audit_after`], as the JSON lines they
    /// are stored as (`(seq, line)`), for sinks that copy them unparsed.
    async fn audit_lines_after(&self, after: u64, limit: u32) -> Result<Vec<(u64, String)>>;
    /// The newest events, oldest first.
    async fn audit_tail(&self, limit: u32) -> Result<Vec<AuditEvent>>;
    async fn sink_cursor(&self, sink: &str) -> Result<u64>;
    async fn set_sink_cursor(&self, sink: &str, seq: u64) -> Result<()>;

    // ---- sealed secrets ----

    async fn put_secret(&self, name: &str, sealed: Vec<u8>, now: Timestamp) -> Result<()>;
    async fn get_secret(&self, name: &str) -> Result<Option<Vec<u8>>>;

    // ---- operations ----

    async fn counts(&self) -> Result<Counts>;
}
