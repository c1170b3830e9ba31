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
//! group commit, so concurrent writes share an fsync) and
//! [`postgres::PostgresStore`] (several replicas on one database; one writer
//! task per process batching into transactions that lock the audit chain's
//! head row). [`conformance`] is the suite every backend must pass.

pub mod conformance;
pub mod pg_test;
pub mod postgres;
pub mod rates;
pub mod sqlite;

use async_trait::async_trait;
use keymint_core::Timestamp;
use keymint_core::audit::{AuditDraft, AuditEvent};
use keymint_core::model::{
    Approval, ApprovalStatus, EndReason, EngineKind, Lease, LeaseState, RegistrationEntry, Task,
    TaskStatus,
};
use keymint_core::rules::RuleError;

pub use postgres::{PgTls, PostgresOptions, PostgresStore};
pub use rates::{RateAsk, RateGive, RateTake};
pub use sqlite::{SqliteStore, StoreLock};

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
    /// A budget of the task or of one of its ancestors has no room for the
    /// reservation (`requests`, `input tokens`, `output tokens`, `spend`).
    /// Nothing was written.
    #[error("the task's budget of {0} is used up")]
    BudgetExhausted(&'static str),
    /// The store cannot write now (disk full, I/O error, locked): the
    /// request may pass later. Internal detail, for the log.
    #[error("storage cannot write: {0}")]
    Unavailable(String),
    /// The stored audit event with this `seq` does not read as one (its
    /// text was damaged or edited). Never skipped: a gap in what is shown
    /// would hide tampering. `keymint audit verify` places it in the chain.
    #[error("the stored audit event with `seq` {0} cannot be read")]
    AuditUnreadable(u64),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        match e.sqlite_error_code() {
            Some(
                C::DiskFull
                | C::SystemIoFailure
                | C::ReadOnly
                | C::DatabaseBusy
                | C::DatabaseLocked
                | C::CannotOpen,
            ) => Self::Unavailable(e.to_string()),
            _ => Self::Backend(e.to_string()),
        }
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

/// The most leases one [`Store::end_task`] moves to `revoking`; the rest
/// are taken with [`Store::revoke_ended_leases`] in further transactions,
/// so that ending a task with many leases never holds the writer long.
pub const END_TASK_LEASES: u32 = 1000;

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
    /// A cursor: only tasks with an id below this one (ids sort by
    /// creation), so pages follow one another without an offset.
    pub before: Option<String>,
    pub limit: u32,
}

/// Filters for listing leases; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseFilter {
    pub task: Option<String>,
    pub workload: Option<String>,
    pub role: Option<String>,
    /// Only leases of this engine, whatever role they were issued under
    /// (a KRL lists its CA's certificates even after their role is gone).
    pub engine: Option<EngineKind>,
    pub state: Option<LeaseState>,
    /// Only leases whose id sorts before this one: the list is newest
    /// first, so the last id of one page asks for the next.
    pub before: Option<String>,
    /// Only leases that expire after this moment.
    pub expires_after: Option<Timestamp>,
    /// At most this many (a backend may cap it; page with `before`).
    pub limit: u32,
}

/// A value a [`LeaseFilter`] compares a column with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FilterValue<'a> {
    Text(&'a str),
    Millis(i64),
}

impl LeaseFilter {
    /// The filter's conditions, only those it sets, as `(column, operator,
    /// value)`: a backend writes them as `column operator placeholder`
    /// joined by `AND`. A condition left out rather than written as
    /// `(? IS NULL OR column = ?)` lets the database plan with the index
    /// of the one that narrows (the task's, the workload's, the role's);
    /// the `OR` form planned as a walk of the whole table.
    pub(crate) fn conditions(&self) -> Vec<(&'static str, &'static str, FilterValue<'_>)> {
        fn text<'a>(
            col: &'static str,
            v: Option<&'a str>,
        ) -> Option<(&'static str, &'static str, FilterValue<'a>)> {
            v.map(|v| (col, "=", FilterValue::Text(v)))
        }
        [
            text("task_id", self.task.as_deref()),
            text("workload", self.workload.as_deref()),
            text("role", self.role.as_deref()),
            text("state", self.state.map(LeaseState::as_str)),
            text("engine", self.engine.map(EngineKind::as_str)),
            self.before
                .as_deref()
                .map(|v| ("id", "<", FilterValue::Text(v))),
            self.expires_after
                .map(|t| ("expires_ms", ">", FilterValue::Millis(t.millis()))),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
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
    /// Leases moved to `revoking` (at most [`END_TASK_LEASES`]); the
    /// caller drives their revocation.
    pub leases: Vec<Lease>,
    /// Whether the batch was full: pending or active leases of the tree
    /// may remain, for [`Store::revoke_ended_leases`].
    pub more: bool,
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

/// Use counted against a budget: requests, input and output tokens, and
/// spend in nano-dollars (USD × 10⁹, integers only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub requests: u64,
    pub input: u64,
    pub output: u64,
    pub spend_nusd: u64,
}

impl Usage {
    /// `self + o`, saturating.
    #[must_use]
    pub fn plus(self, o: Self) -> Self {
        Self {
            requests: self.requests.saturating_add(o.requests),
            input: self.input.saturating_add(o.input),
            output: self.output.saturating_add(o.output),
            spend_nusd: self.spend_nusd.saturating_add(o.spend_nusd),
        }
    }

    /// `self - o`, saturating at zero.
    #[must_use]
    pub fn minus(self, o: Self) -> Self {
        Self {
            requests: self.requests.saturating_sub(o.requests),
            input: self.input.saturating_sub(o.input),
            output: self.output.saturating_sub(o.output),
            spend_nusd: self.spend_nusd.saturating_sub(o.spend_nusd),
        }
    }

    /// The smaller of `self` and `o`, quantity by quantity.
    #[must_use]
    pub fn least(self, o: Self) -> Self {
        Self {
            requests: self.requests.min(o.requests),
            input: self.input.min(o.input),
            output: self.output.min(o.output),
            spend_nusd: self.spend_nusd.min(o.spend_nusd),
        }
    }

    /// Whether `o` fits in `self`, quantity by quantity.
    #[must_use]
    pub fn holds(self, o: Self) -> bool {
        self.requests >= o.requests
            && self.input >= o.input
            && self.output >= o.output
            && self.spend_nusd >= o.spend_nusd
    }

    pub fn is_zero(self) -> bool {
        self == Self::default()
    }
}

/// One task on the way from a reserving task up to its root, as its budget
/// stands: `used` and `reserved` count the task *and its whole sub-tree*
/// (a sub-task's use is its parent's use too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetLevel {
    pub task: String,
    /// The task's role: the caller knows each role's limits.
    pub role: String,
    /// Settled use.
    pub used: Usage,
    /// Held by reservations not yet settled.
    pub reserved: Usage,
}

/// Decides a reservation inside the store's transaction, from the levels
/// (the reserving task first, then its parent, … up to the root): the
/// amount to hold, or which budget has no room
/// ([`StoreError::BudgetExhausted`]).
pub type BudgetFn = Box<dyn FnOnce(&[BudgetLevel]) -> Result<Usage, &'static str> + Send>;

/// Who reserves: the lease behind the proxied request, and where it goes.
/// Kept with the reservation, so the use can be audited from the store
/// alone (after a crash too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationFor {
    pub task: String,
    pub lease: String,
    pub workload: String,
    pub role: String,
    /// The lease's fingerprint (never the token).
    pub fingerprint: String,
    pub upstream: String,
    pub now: Timestamp,
}

/// A granted reservation: `amount` is held against the task and every
/// ancestor (`chain`, the task first) until it is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetReservation {
    pub id: String,
    pub chain: Vec<String>,
    pub amount: Usage,
    pub created_at: Timestamp,
}

/// Settling one reservation: `used` is what the provider reported; `None`
/// (unknown) charges the whole reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetSettle {
    pub id: String,
    pub used: Option<Usage>,
    pub now: Timestamp,
}

/// Settling part of an open reservation that holds budget for several
/// requests (a *chunk*, drawn from in the proxy's memory:
/// docs/design/0030-chunked-budgets.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSettle {
    pub id: String,
    /// What the requests finished since the last settle held: taken off
    /// the reservation (never more than it still holds).
    pub held: Usage,
    /// What those requests used (reported, or their whole share).
    pub used: Usage,
    /// How many of them had no usage reported.
    pub unmetered: u64,
    /// Taken off the reservation unused, given back to the budget.
    pub release: Usage,
    /// Gives back whatever the reservation still holds and ends it.
    pub close: bool,
    pub now: Timestamp,
}

/// The settled use of one lease since its last summary, for its audit
/// event ([`Store::summarise_usage`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSummary {
    pub lease: String,
    pub task: String,
    pub workload: String,
    pub role: String,
    pub fingerprint: String,
    pub upstream: String,
    pub used: Usage,
    /// Requests settled without reported usage (charged in full).
    pub unmetered: u64,
    /// The oldest reservation summarised.
    pub since: Timestamp,
}

/// Builds the audit event of one [`UsageSummary`].
pub type SummaryFn = Box<dyn Fn(&UsageSummary) -> AuditDraft + Send>;

#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Why the store cannot write now (its last write batch failed, or it
    /// stopped after a failed fsync), or `None` while writes go through.
    /// Readiness (`/v1/health`) follows it; a later successful write clears
    /// it.
    fn write_failure(&self) -> Option<String> {
        None
    }

    // ---- tasks ----

    /// Starts a task. With `parent`, the grant sees the parent as it is in
    /// the same transaction, so a parent ending concurrently cannot be missed.
    async fn create_task(&self, parent: Option<&str>, grant: TaskGrantFn) -> Result<Task>;
    async fn get_task(&self, id: &str) -> Result<Option<Task>>;
    /// The task a lease is asked in, read before its grant and decision.
    /// The write job that records the lease reads the task again inside
    /// its transaction and grants on that, so this read may come from a
    /// cache that every write which may change a task invalidates (SQLite,
    /// one process: docs/design/0036 "Fifth pass"). By default the same
    /// as [`Store::get_task`]; a store other processes write (PostgreSQL
    /// replicas) keeps that.
    async fn task_before_grant(&self, id: &str) -> Result<Option<Task>> {
        self.get_task(id).await
    }
    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<Task>>;
    /// Records a heartbeat on an active task; returns it, or `None` if it is
    /// not active.
    async fn touch_task(&self, id: &str, now: Timestamp) -> Result<Option<Task>>;
    /// Ends the task and every active task below it, and moves pending or
    /// active leases of that tree to `revoking`, at most
    /// [`END_TASK_LEASES`] of them (`EndedTree::more` when the batch was
    /// full; the caller takes the rest with [`Store::revoke_ended_leases`]
    /// per task of the tree). `None` if the task was not active. The root
    /// gets `end.status`; sub-tasks get `revoked`. Keymint refuses every
    /// lease of an ended task at once, whatever its state.
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
    /// Moves up to `limit` pending or active leases of ended tasks to
    /// `revoking` (reason `task_ended`, claimed and audited like
    /// [`Store::request_revocation`]): those of `task` if it has ended, or
    /// with `None` those of any ended task whose hard end (`expires_at`)
    /// has not passed (what a crash between two batches of
    /// [`Store::end_task`] left; past the hard end, the leases have expired
    /// and the expiry sweep takes them). An active task's leases are never
    /// taken.
    async fn revoke_ended_leases(
        &self,
        task: Option<&str>,
        now: Timestamp,
        actor: &str,
        limit: u32,
    ) -> Result<Vec<Lease>>;
    /// Moves active leases past their expiry to `revoking` with reason
    /// `expired` (at most `limit`), claimed like [`Store::request_revocation`].
    async fn expire_due(&self, now: Timestamp, limit: u32) -> Result<Vec<Lease>>;
    /// Leases in `revoking` whose next attempt is due, claimed for the
    /// caller: their next attempt moves to `now` + [`REVOCATION_CLAIM_MS`],
    /// so a concurrent sweep (another replica's) does not take them too.
    /// The caller finishes them or records a failure, which sets the retry.
    async fn due_revocations(&self, now: Timestamp, limit: u32) -> Result<Vec<Lease>>;
    /// Leases still `pending` that were created before `before` (a crash
    /// between recording and activating them). On a [`Store::shared`]
    /// store: only this process's (and unowned ones), plus any of a
    /// process whose heartbeat stopped, whatever their age; never a live
    /// replica's lease being issued.
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
    /// and hold no lease still pending, active or revoking, no expire-only
    /// lease that has not expired at `now` (a revoked SSH certificate stays
    /// in its CA's KRL until it expires), and no live sub-task, with their
    /// leases, and records one `store.pruned` audit
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
    /// Compare and set: stores `sealed` under `name` only if what is stored
    /// there now is `expected` (`None`: nothing yet), in one atomic step,
    /// and says whether it did. Replicas that generate a key at their first
    /// start, or rotate one, use it so that exactly one key wins and every
    /// replica uses that one (read it again after `false`).
    async fn swap_secret(
        &self,
        name: &str,
        expected: Option<Vec<u8>>,
        sealed: Vec<u8>,
        now: Timestamp,
    ) -> Result<bool>;

    // ---- budgets (the egress proxy) ----
    //
    // A task's budget counts its whole sub-tree: every reservation and every
    // settled use of a task is added to the task and to each of its
    // ancestors. Budgets never pass their limits, whatever the number of
    // processes or restarts: a reservation is durable before the request it
    // covers is forwarded, and is released only by a settle (or by the
    // sweep of stale reservations, which charges it in full).

    /// Reserves budget for one request of `who.task`, in one transaction:
    /// reads the levels (the task, its parent, … its root; a task without
    /// budget rows reads as zero), lets `decide` choose the amount, then
    /// adds it to `reserved` on every level and records the reservation
    /// (with `who`, for the audit). Backends must serialise concurrent
    /// reservations that share a level (SQLite: the single writer;
    /// PostgreSQL: lock the levels' budget rows root first), so that two
    /// reservations never both see room that only one of them fits in.
    /// `decide`'s refusal is [`StoreError::BudgetExhausted`] and writes
    /// nothing; an unknown task is [`StoreError::NotFound`].
    async fn reserve_budget(
        &self,
        who: ReservationFor,
        decide: BudgetFn,
    ) -> Result<BudgetReservation>;
    /// Settles reservations, each in the same transaction: the amount
    /// reserved leaves `reserved` and what was used (`used`, or the whole
    /// amount when `None`) joins `used`, on every level of its chain; the
    /// reservation is kept, settled, until [`Store::summarise_usage`]. A
    /// reservation already settled (or unknown) is left alone, so settling
    /// twice charges once.
    async fn settle_budget(&self, settles: Vec<BudgetSettle>) -> Result<()>;
    /// Settles parts of open reservations that hold budget for several
    /// requests (chunks), each in the same transaction: `held` (at most
    /// what the reservation holds) and `release` (the same) leave the
    /// reservation and `reserved`; `used` joins `used`, on every level of
    /// its chain, and is recorded as a settled reservation of the same
    /// lease (for [`Store::summarise_usage`], `unmetered` included). With
    /// `close`, everything the reservation still holds is released and it
    /// ends; one that holds nothing more ends too. A reservation that is
    /// not open (settled in full by the sweep, or unknown) is left alone:
    /// what it held was already charged. Returns how many were open.
    async fn settle_chunks(&self, settles: Vec<ChunkSettle>) -> Result<u64>;
    /// Settles, as used in full with unknown usage (every request it still
    /// holds counted as unmetered), up to `limit`
    /// reservations still open that were made before `before` (the request
    /// that held one may have been forwarded before a crash); returns how
    /// many. A later settle of one of them is a no-op. On a
    /// [`Store::shared`] store: only this process's (and unowned ones),
    /// plus any of a process whose heartbeat stopped, whatever their age;
    /// never a live replica's request in flight.
    async fn settle_stale_reservations(
        &self,
        before: Timestamp,
        now: Timestamp,
        limit: u32,
    ) -> Result<u64>;
    /// Summarises settled reservations: at most `limit` of them, grouped by
    /// lease, become one audit event per lease (built by `event`), and are
    /// deleted in the same transaction, so each use is audited exactly once
    /// even across a crash. Returns the number of events written.
    async fn summarise_usage(&self, limit: u32, event: SummaryFn) -> Result<u64>;
    /// A task's budget as it stands: `(used, reserved)` by the task and its
    /// sub-tree (zero for a task that never reserved).
    async fn budget_of(&self, task: &str) -> Result<(Usage, Usage)>;

    // ---- rate limits (docs/design/0040) ----

    /// Takes what each ask needs from its bucket, from all of them or from
    /// none ([`rates::decide`]), in one transaction serialised with every
    /// other take on the store, so that every process together never passes
    /// the limit. Also forgets a few buckets untouched for a minute (full
    /// again).
    async fn take_rates(&self, asks: Vec<RateAsk>, now: Timestamp) -> Result<RateTake>;
    /// Gives units a process took and did not spend back to their buckets
    /// (never above full; a bucket already forgotten is full).
    async fn give_rates(&self, gives: Vec<RateGive>, now: Timestamp) -> Result<()>;

    // ---- operations ----

    async fn counts(&self) -> Result<Counts>;

    /// Bumps `epoch` whenever another process sharing this store may have
    /// moved leases out of `active` (a task end, a revocation, an expiry),
    /// so caches of live tokens look again. A store no other process writes
    /// (SQLite) has nothing to announce.
    fn watch_revocations(&self, epoch: std::sync::Arc<std::sync::atomic::AtomicU64>) {
        let _ = epoch;
    }

    // ---- several processes on one store (docs/design/0022) ----

    /// Whether other processes (replicas) may use this store at the same
    /// time. On a store only one process opens (SQLite), whatever was in
    /// flight at start is a crash leftover.
    fn shared(&self) -> bool {
        false
    }

    /// Takes or renews, for this process, the one lease on the background
    /// duties (expiry sweeps, revocation retries, reconciliation, the
    /// approval webhook, retention) for `ttl_ms`, and records the process's
    /// heartbeat. Returns the lease's epoch if this process holds it now,
    /// `None` while another live process does; a new holder gets a larger
    /// epoch than any before it. Once a store has asked, its duty writes
    /// ([`Store::expire_due`], [`Store::due_revocations`],
    /// [`Store::prune_ended`], [`Store::expire_approvals`],
    /// [`Store::take_over_dead_claims`]) check in their own transaction
    /// that it still holds that epoch, and change nothing if not
    /// (fencing). A store one process opens: always held, epoch 1.
    async fn hold_duties(&self, ttl_ms: u32) -> Result<Option<u64>> {
        let _ = ttl_ms;
        Ok(Some(1))
    }

    /// Gives the duty lease up and marks this process gone (a clean
    /// shutdown), so another takes over at once.
    async fn release_duties(&self) -> Result<()> {
        Ok(())
    }

    /// Revocations claimed by processes that died (heartbeat stopped) fall
    /// due at `now`, so the next sweep drives them instead of waiting out
    /// the claim; returns how many. Nothing on a store one process opens
    /// (there, every claim is taken over at start). Fenced like the other
    /// duty writes.
    async fn take_over_dead_claims(&self, now: Timestamp) -> Result<u64> {
        let _ = now;
        Ok(0)
    }

    /// A serial number for an SSH certificate, unique across every process
    /// sharing the store; `None` where one process opens the store (its
    /// engine's own counter is then unique).
    async fn next_ssh_serial(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    // ---- single use ----

    /// Claims `key` until `until`: true if nobody held it (or the last
    /// claim ended by `now`), false if it is held. Atomic across every
    /// process on the store, so a one-time value (an assertion's or a
    /// proof's `jti`) is accepted once across replicas. Kept in the
    /// `secrets` table under `once/` with an empty value.
    async fn claim_once(&self, key: &str, until: Timestamp, now: Timestamp) -> Result<bool>;

    // ---- the credential inventory (docs/design/0027) ----

    /// Writes an inventory entry with its audit event, if the stored entry
    /// is still at version `expected` (`0`: there must be none with its id
    /// or its fingerprint). `false`, and nothing written, if another write
    /// came first: the caller reads again and decides again.
    async fn put_inventory(
        &self,
        item: keymint_core::inventory::InventoryItem,
        expected: u64,
        audit: AuditDraft,
    ) -> Result<bool> {
        let _ = (item, expected, audit);
        Err(StoreError::Backend("this store keeps no inventory".into()))
    }
    async fn get_inventory(
        &self,
        id: &str,
    ) -> Result<Option<keymint_core::inventory::InventoryItem>> {
        let _ = id;
        Ok(None)
    }
    /// The entry for the secret with this fingerprint.
    async fn inventory_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Option<keymint_core::inventory::InventoryItem>> {
        let _ = fingerprint;
        Ok(None)
    }
    /// Newest first; only ids below `before` when given (paging).
    async fn list_inventory(
        &self,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<keymint_core::inventory::InventoryItem>> {
        let _ = (before, limit);
        Ok(Vec::new())
    }

    // ---- misuse monitoring (docs/design/0033) ----

    /// Adds each row's figures to the stored hour of its scope and
    /// subject (created at zero if new). No audit event: these are
    /// measurements, summarised in `proxy.usage` already.
    async fn add_usage_hours(&self, rows: Vec<keymint_core::monitor::UsageHour>) -> Result<()> {
        let _ = rows;
        Err(StoreError::Backend(
            "this store keeps no usage history".into(),
        ))
    }
    /// The stored hours of one scope and subject with `from <= hour < to`,
    /// oldest first.
    async fn usage_hours(
        &self,
        scope: keymint_core::monitor::Scope,
        subject: &str,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<keymint_core::monitor::UsageHour>> {
        let _ = (scope, subject, from, to);
        Ok(Vec::new())
    }
    /// Records source addresses: new ones are inserted, known ones get
    /// `last_seen` and their request count added.
    async fn note_sources(&self, rows: Vec<keymint_core::monitor::SourceSeen>) -> Result<()> {
        let _ = rows;
        Err(StoreError::Backend("this store keeps no sources".into()))
    }
    /// The countries a workload has called from (distinct, sorted).
    async fn source_countries(&self, workload: &str) -> Result<Vec<String>> {
        let _ = workload;
        Ok(Vec::new())
    }
    /// Retention of the misuse monitor's history: deletes the hours that
    /// began before `before` and the source addresses last seen before it;
    /// answers how many rows went.
    async fn prune_usage(&self, before: Timestamp) -> Result<u64> {
        let _ = before;
        Ok(0)
    }
    /// Stores a new suspension with its audit event, unless one is already
    /// active for its scope and subject (`false`, nothing written).
    async fn suspend(
        &self,
        s: keymint_core::monitor::Suspension,
        audit: AuditDraft,
    ) -> Result<bool> {
        let _ = (s, audit);
        Err(StoreError::Backend(
            "this store keeps no suspensions".into(),
        ))
    }
    /// Lifts an active suspension with its audit event; the lifted
    /// suspension, or `None` (and nothing written) if there is no active
    /// one with this id.
    async fn lift_suspension(
        &self,
        id: &str,
        by: &str,
        now: Timestamp,
        audit: AuditDraft,
    ) -> Result<Option<keymint_core::monitor::Suspension>> {
        let _ = (id, by, now, audit);
        Ok(None)
    }
    /// Every active suspension, however many: what each process enforces
    /// (a listing's limit would drop the oldest from enforcement).
    async fn active_suspensions(&self) -> Result<Vec<keymint_core::monitor::Suspension>> {
        Ok(Vec::new())
    }
    /// Suspensions, newest first: only the active ones, or all (at most
    /// `limit`).
    async fn list_suspensions(
        &self,
        active_only: bool,
        limit: u32,
    ) -> Result<Vec<keymint_core::monitor::Suspension>> {
        let _ = (active_only, limit);
        Ok(Vec::new())
    }
}

/// An audit cursor (`seq`, a `u64` in the API) as SQL's signed integer. A
/// stored `seq` is at most `i64::MAX`, so a cursor past it reads as the end
/// of the chain; a cast would wrap it to a negative number and read the
/// chain from its start.
pub(crate) fn seq_cursor(after: u64) -> i64 {
    i64::try_from(after).unwrap_or(i64::MAX)
}

/// The `lease.revoke_requested` event of a lease moved to `revoking`
/// (both stores: a selected lease, or a token exchanged from one,
/// [`exchanged_revoke_event`]).
pub(crate) fn revoke_requested_event(
    now: Timestamp,
    actor: &str,
    l: &Lease,
    reason: &str,
) -> AuditDraft {
    AuditDraft::new(now, "lease.revoke_requested", actor)
        .task(&l.task)
        .lease(&l.id)
        .workload(&l.workload)
        .role(&l.role)
        .fingerprint(&l.fingerprint)
        .reason(reason)
}

/// [`revoke_requested_event`] of a token exchanged from one of the leases
/// `revoked` in the same request, naming that ancestor.
pub(crate) fn exchanged_revoke_event(
    now: Timestamp,
    actor: &str,
    l: &Lease,
    revoked: &[&str],
) -> AuditDraft {
    revoke_requested_event(now, actor, l, EndReason::Revoked.as_str())
        .data("exchanged_from", revoked_ancestor(l, revoked))
}

/// Of the leases `revoked` in one request, the one `exchanged` descends
/// from, nearest first (its `parents` name them oldest first): what the
/// audit event of a token ended with its ancestor names.
fn revoked_ancestor(exchanged: &Lease, revoked: &[&str]) -> String {
    exchanged.engine_data["parents"]
        .as_array()
        .into_iter()
        .flatten()
        .rev()
        .filter_map(serde_json::Value::as_str)
        .find(|p| revoked.contains(p))
        .unwrap_or_default()
        .to_owned()
}

/// The `approval.cancelled` event of an approval closed by its task's end
/// (both stores, and the broker for a redemption its task's end overtook:
/// `was` [`ApprovalStatus::Used`]).
pub fn cancelled_event(
    a: &Approval,
    was: ApprovalStatus,
    task: &str,
    status: &str,
    now: Timestamp,
    actor: &str,
) -> AuditDraft {
    AuditDraft::new(now, "approval.cancelled", actor)
        .task(task)
        .workload(&a.workload)
        .role(&a.role)
        .reason(match was {
            ApprovalStatus::Approved => "its task ended before the approved request was redeemed",
            ApprovalStatus::Used => "its task ended before the approved request was carried out",
            _ => "its task ended before the request was decided",
        })
        .data("approval", a.id.clone())
        .data("action", a.action.clone())
        .data("was", was.as_str())
        .data("task_status", status)
}

/// The note of an approval closed because task `task` ended as `status`:
/// what a decision's note said stays, the closing is added after it.
pub fn closing_note(note: Option<&str>, task: &str, status: &str) -> String {
    let closed = format!("closed: task `{task}` ended as `{status}`");
    match note {
        Some(n) if !n.is_empty() => format!("{n} ({closed})"),
        _ => closed,
    }
}
