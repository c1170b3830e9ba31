//! The shared store: PostgreSQL, for several keymint replicas on one
//! database (docs/design/0014-postgres-store.md).
//!
//! Writes go through one writer task per process (`writer`): it batches
//! every queued job into one transaction, each job in its own savepoint,
//! and every transaction first locks the chain-head row. That lock orders
//! all writers of all replicas: one audit chain with no gap or fork, and
//! every state change decided on the latest committed state. Reads use the
//! bounded connection pool directly.
//!
//! A transaction that moves leases out of `active` (a task end, a
//! revocation, an expiry) bumps `audit_head.revocation_epoch` and sends a
//! `NOTIFY`; [`Store::watch_revocations`] listens for both (the counter is
//! polled every [`EPOCH_POLL`], so a lost notification costs at most that)
//! and bumps the caller's epoch, which invalidates its token cache.
//!
//! The parts: `schema` (migrations under an advisory lock), `writer`,
//! `tls` (rustls for tokio-postgres), `row` (helpers), and the queries:
//! `tasks`, `leases` (with their lifecycle), `misc` (audit, cursors,
//! secrets, approvals, entries, retention, counts).

mod bench;
mod budgets;
mod inventory;
mod leases;
mod misc;
mod monitor;
mod rates;
pub mod replicas;
mod row;
mod schema;
mod tasks;
pub mod tls;
mod writer;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Object, Pool};
use keymint_core::Timestamp;
use keymint_core::audit::{AuditDraft, AuditEvent};
use keymint_core::model::{Approval, ApprovalStatus, EndReason, Lease, RegistrationEntry, Task};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::config::{Host, SslMode};
use zeroize::Zeroizing;

use self::tls::RustlsConnect;
pub use self::writer::MAX_BATCH;
use self::writer::{BoxFut, CHANNEL, Failure, FnJob, Job, PgWriter, writer_loop};
use crate::{
    ApprovalChange, BudgetFn, BudgetReservation, BudgetSettle, ChunkSettle, Counts, EndedTree,
    LeaseFilter, LeaseGrantFn, LeaseSelector, Pruned, RenewFn, ReservationFor, Result,
    RevocationDone, Store, StoreError, SummaryFn, TaskEnd, TaskFilter, TaskGrantFn, Usage,
};

/// How often a replica reads the revocation epoch, in case a notification
/// was lost (a dropped listener connection): the most a lost notification
/// can delay a revocation on another replica.
pub const EPOCH_POLL: Duration = Duration::from_secs(1);
/// The default number of connections (the writer holds one).
pub const DEFAULT_POOL_SIZE: usize = 8;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const POOL_WAIT: Duration = Duration::from_secs(10);

/// TLS to the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgTls {
    /// Plain TCP (or a Unix socket).
    Disable,
    /// TLS required; the server's certificate must chain to `ca_file` (or
    /// the Mozilla roots) and name the host.
    Require { ca_file: Option<PathBuf> },
}

/// How to reach the database. The password is kept apart from the URL and
/// never shown.
#[derive(Clone)]
pub struct PostgresOptions {
    config: tokio_postgres::Config,
    pub pool_size: usize,
    pub tls: PgTls,
}

impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("hosts", &self.config.get_hosts())
            .field("ports", &self.config.get_ports())
            .field("dbname", &self.config.get_dbname())
            .field("user", &self.config.get_user())
            .field("password", &"(not shown)")
            .field("pool_size", &self.pool_size)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Why the options were refused; names the setting, never its value.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("`url` is not a PostgreSQL connection URL (postgres://user@host:port/db)")]
    BadUrl,
    #[error("`url` must not hold a password: put it in the file named by `password_file`")]
    PasswordInUrl,
    #[error("`url` names no database")]
    NoDatabase,
    #[error("`pool_size` must be between 2 and 256")]
    PoolSize,
}

impl PostgresOptions {
    /// Parses `url` (a `postgres://` URL or `key=value` string without a
    /// password); `password` comes from a file the caller read.
    pub fn new(
        url: &str,
        password: Option<Zeroizing<String>>,
        pool_size: usize,
        tls: PgTls,
    ) -> Result<Self, OptionsError> {
        let mut config = tokio_postgres::Config::from_str(url).map_err(|_| OptionsError::BadUrl)?;
        if config.get_password().is_some() {
            return Err(OptionsError::PasswordInUrl);
        }
        if config.get_dbname().is_none() {
            return Err(OptionsError::NoDatabase);
        }
        if !(2..=256).contains(&pool_size) {
            return Err(OptionsError::PoolSize);
        }
        if let Some(p) = password {
            config.password(p.as_bytes());
        }
        config.ssl_mode(match tls {
            PgTls::Disable => SslMode::Disable,
            PgTls::Require { .. } => SslMode::Require,
        });
        config.connect_timeout(CONNECT_TIMEOUT);
        if config.get_application_name().is_none() {
            config.application_name("keymint");
        }
        Ok(Self {
            config,
            pool_size,
            tls,
        })
    }

    /// The same options with the password (read from its file at start).
    #[must_use]
    pub fn with_password(mut self, password: &Zeroizing<String>) -> Self {
        self.config.password(password.as_bytes());
        self
    }

    /// Whether every host is on this machine (a loopback address,
    /// `localhost`, or a Unix socket), where plain TCP is acceptable.
    pub fn is_local(&self) -> bool {
        let addrs_ok = self.config.get_hostaddrs().iter().all(|a| a.is_loopback());
        let hosts_ok = self.config.get_hosts().iter().all(|h| match h {
            Host::Tcp(name) => {
                name.eq_ignore_ascii_case("localhost")
                    || name
                        .trim_matches(|c| c == '[' || c == ']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            Host::Unix(_) => true,
        });
        addrs_ok && hosts_ok
    }
}

/// The PostgreSQL store.
#[derive(Debug)]
pub struct PostgresStore {
    pool: Pool,
    jobs: mpsc::UnboundedSender<Box<dyn Job>>,
    options: PostgresOptions,
    tls: RustlsConnect,
    schema: String,
    /// The listener of [`Store::watch_revocations`], stopped on drop.
    listener: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// This process among the replicas (`rep_…`, new at each open).
    me: String,
    /// What this store last learnt of its hold on the duty lease.
    fence: std::sync::Mutex<replicas::Fence>,
    /// Why the last write batch failed, if it did.
    failure: Failure,
    /// The heartbeat task, stopped on drop.
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        if let Ok(mut l) = self.listener.lock()
            && let Some(h) = l.take()
        {
            h.abort();
        }
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }
}

/// Queues a write job and waits for its answer.
async fn send_job<T: Send + 'static>(
    jobs: &mpsc::UnboundedSender<Box<dyn Job>>,
    f: impl for<'a> FnOnce(&'a mut PgWriter) -> BoxFut<'a, Result<T>> + Send + 'static,
) -> Result<T> {
    queue_job(jobs, None, f).await
}

/// Queues a write job; `issuance` names the task of a lease insert, which
/// changes no task and may read it with [`PgWriter::task_cached`] (see
/// [`writer::FnJob::issuance`]).
async fn queue_job<T: Send + 'static>(
    jobs: &mpsc::UnboundedSender<Box<dyn Job>>,
    issuance: Option<String>,
    f: impl for<'a> FnOnce(&'a mut PgWriter) -> BoxFut<'a, Result<T>> + Send + 'static,
) -> Result<T> {
    let (reply, rx) = oneshot::channel();
    let job: Box<dyn Job> = Box::new(FnJob {
        f: Some(Box::new(f)),
        issuance,
        out: None,
        reply,
    });
    jobs.send(job).map_err(|_| StoreError::Closed)?;
    rx.await.map_err(|_| StoreError::Closed)?
}

/// Writes this replica's heartbeat every [`replicas::HEARTBEAT`], through
/// the writer (so a database that stops taking writes shows in
/// [`Store::write_failure`] within a beat), and forgets long-silent
/// replicas now and then.
async fn beat(jobs: mpsc::UnboundedSender<Box<dyn Job>>, me: String) {
    let mut n: u64 = 0;
    loop {
        let me = me.clone();
        let forget = n.is_multiple_of(600);
        let r = send_job(&jobs, move |w| {
            Box::pin(async move {
                replicas::heartbeat(w, &me).await?;
                if forget {
                    replicas::forget_old(w).await?;
                }
                Ok(())
            })
        })
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "replica heartbeat failed");
        }
        n = n.wrapping_add(1);
        tokio::time::sleep(replicas::HEARTBEAT).await;
    }
}

/// A PostgreSQL error for the log: the server's message and code, never a
/// parameter (the server's DETAIL can quote values, so it is left out).
/// A lost connection or a server that is going away is an outage
/// ([`StoreError::Unavailable`], answered 503 with `Retry-After`): a retry
/// on another connection may pass. Anything else is keymint's own fault.
pub(super) fn pg_err(context: &str, e: &tokio_postgres::Error) -> StoreError {
    let text = pg_text(context, e);
    if connection_lost(e) {
        StoreError::Unavailable(text)
    } else {
        StoreError::Backend(text)
    }
}

/// `e` for the log: the server's message and SQLSTATE, or the client's.
fn pg_text(context: &str, e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{context}: {} (SQLSTATE {})", d.message(), d.code().code()),
        None => format!("{context}: {e}"),
    }
}

/// Whether `e` says the connection, not the statement, failed: closed,
/// an I/O error, SQLSTATE class 08 (connection exception), 57P01-57P03
/// (the server is shutting down, crashed or not yet accepting), 53300
/// (too many connections).
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            let code = code.code();
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
        }
        None => std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()),
    }
}

async fn connect(
    options: &PostgresOptions,
    tls: &RustlsConnect,
) -> Result<(
    tokio_postgres::Client,
    tokio_postgres::Connection<tokio_postgres::Socket, tls::RustlsStream<tokio_postgres::Socket>>,
)> {
    tokio::time::timeout(CONNECT_TIMEOUT, options.config.connect(tls.clone()))
        .await
        .map_err(|_| StoreError::Backend("cannot connect to PostgreSQL: timed out".into()))?
        .map_err(|e| StoreError::Backend(pg_text("cannot connect to PostgreSQL", &e)))
}

impl PostgresStore {
    /// Connects, applies the migrations (under an advisory lock, so several
    /// replicas may start at once) and starts the writer. Opening reads
    /// nothing but the schema version, whatever the number of leases.
    pub async fn open(options: PostgresOptions) -> Result<Self> {
        let tls = match &options.tls {
            PgTls::Disable => tls::connector(None)?,
            PgTls::Require { ca_file } => tls::connector(ca_file.as_deref())?,
        };
        let (client, connection) = connect(&options, &tls).await?;
        let conn_task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres migration connection ended");
            }
        });
        let migrated = schema::migrate(&client).await;
        let schema: Result<String> = client
            .query_one("SELECT current_schema()", &[])
            .await
            .and_then(|r| r.try_get::<_, Option<String>>(0))
            .map_err(|e| pg_err("cannot read the current schema", &e))
            .and_then(|s| s.ok_or_else(|| StoreError::Backend("no current schema".into())));
        drop(client);
        conn_task.abort();
        migrated?;
        let schema = schema?;

        let manager = deadpool_postgres::Manager::from_config(
            options.config.clone(),
            tls.clone(),
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(POOL_WAIT))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|_| StoreError::Backend("cannot make the connection pool".into()))?;
        let (tx, rx) = mpsc::unbounded_channel::<Box<dyn Job>>();
        // `rep_` and the random part of an identifier: letters and digits.
        let id = keymint_core::id::task_id(keymint_core::Timestamp::from_millis(0));
        let me = format!("rep_{}", id.get(12..).unwrap_or(&id));
        let failure = Failure::default();
        tokio::spawn(writer_loop(pool.clone(), rx, me.clone(), failure.clone()));
        let heartbeat = Some(tokio::spawn(beat(tx.clone(), me.clone())));
        Ok(Self {
            pool,
            jobs: tx,
            options,
            tls,
            schema,
            listener: std::sync::Mutex::new(None),
            me,
            fence: std::sync::Mutex::new(None),
            failure,
            heartbeat,
        })
    }

    /// This process's replica id (new at each open).
    pub fn replica(&self) -> &str {
        &self.me
    }

    fn fence(&self) -> replicas::Fence {
        self.fence.lock().ok().and_then(|f| f.clone())
    }

    /// The schema this store's tables are in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    async fn conn(&self) -> Result<Object> {
        self.pool.get().await.map_err(|e| match e {
            // The database cannot be reached: a retry may pass (503).
            deadpool_postgres::PoolError::Backend(e) => {
                StoreError::Unavailable(pg_err("postgres connection", &e).to_string())
            }
            deadpool_postgres::PoolError::Timeout(_) => {
                StoreError::Unavailable("postgres: no connection free in time".into())
            }
            _ => StoreError::Closed,
        })
    }

    async fn write<T: Send + 'static>(
        &self,
        f: impl for<'a> FnOnce(&'a mut PgWriter) -> BoxFut<'a, Result<T>> + Send + 'static,
    ) -> Result<T> {
        send_job(&self.jobs, f).await
    }
}

/// Listens for revocations committed by any replica on this schema and
/// bumps `epoch` for each; polls the counter every [`EPOCH_POLL`] too, and
/// bumps on any change or whenever the listening connection was lost.
async fn listen(
    options: PostgresOptions,
    tls: RustlsConnect,
    schema: String,
    epoch: Arc<AtomicU64>,
) {
    let mut last: Option<i64> = None;
    loop {
        let (client, mut connection) = match connect(&options, &tls).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "revocation listener cannot connect; retrying");
                epoch.fetch_add(1, Ordering::Release);
                tokio::time::sleep(EPOCH_POLL).await;
                continue;
            }
        };
        let (note_tx, mut note_rx) = mpsc::unbounded_channel::<String>();
        let driver = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                        if note_tx.send(n.payload().to_owned()).is_err() {
                            break;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                }
            }
        });
        if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
            tracing::warn!(error = %pg_err("LISTEN", &e), "revocation listener failed; retrying");
            driver.abort();
            tokio::time::sleep(EPOCH_POLL).await;
            continue;
        }
        // Anything may have happened while no one listened.
        epoch.fetch_add(1, Ordering::Release);
        let mut tick = tokio::time::interval(EPOCH_POLL);
        loop {
            tokio::select! {
                note = note_rx.recv() => match note {
                    Some(s) if s == schema => { epoch.fetch_add(1, Ordering::Release); }
                    Some(_) => {}
                    None => break,
                },
                _ = tick.tick() => {
                    match client.query_one("SELECT revocation_epoch FROM audit_head WHERE id = 1", &[]).await
                        .and_then(|r| r.try_get::<_, i64>(0))
                    {
                        Ok(n) => {
                            if last.is_some_and(|l| l != n) {
                                epoch.fetch_add(1, Ordering::Release);
                            }
                            last = Some(n);
                        }
                        Err(_) => break,
                    }
                }
            }
        }
        driver.abort();
        tracing::warn!("revocation listener lost its connection; reconnecting");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn create_task(&self, parent: Option<&str>, grant: TaskGrantFn) -> Result<Task> {
        let parent = parent.map(str::to_owned);
        self.write(move |w| Box::pin(tasks::create(w, parent, grant)))
            .await
    }

    async fn get_task(&self, id: &str) -> Result<Option<Task>> {
        tasks::get(self.conn().await?.as_ref(), id).await
    }

    async fn list_tasks(&self, f: &TaskFilter) -> Result<Vec<Task>> {
        tasks::list(self.conn().await?.as_ref(), f).await
    }

    async fn touch_task(&self, id: &str, now: Timestamp) -> Result<Option<Task>> {
        let id = id.to_owned();
        self.write(move |w| Box::pin(async move { tasks::touch(w, &id, now).await }))
            .await
    }

    async fn end_task(&self, end: TaskEnd) -> Result<Option<EndedTree>> {
        self.write(move |w| Box::pin(tasks::end(w, end))).await
    }

    async fn timed_out_tasks(&self, now: Timestamp, n: u32) -> Result<Vec<String>> {
        tasks::timed_out(self.conn().await?.as_ref(), now, n).await
    }

    async fn insert_lease(&self, task: &str, grant: LeaseGrantFn) -> Result<Lease> {
        let task = task.to_owned();
        // Changes no task: the batch reads each task once (writer.rs).
        queue_job(&self.jobs, Some(task.clone()), move |w| {
            Box::pin(leases::insert(w, task, grant))
        })
        .await
    }

    async fn activate_lease(&self, id: &str, audit: AuditDraft) -> Result<bool> {
        let id = id.to_owned();
        self.write(move |w| Box::pin(leases::activate(w, id, audit)))
            .await
    }

    async fn activate_minted_lease(
        &self,
        id: &str,
        fingerprint: &str,
        engine_data: serde_json::Value,
        audit: AuditDraft,
    ) -> Result<bool> {
        let (id, fp) = (id.to_owned(), fingerprint.to_owned());
        self.write(move |w| Box::pin(leases::activate_minted(w, id, fp, engine_data, audit)))
            .await
    }

    async fn get_lease(&self, id: &str) -> Result<Option<Lease>> {
        leases::get(self.conn().await?.as_ref(), id).await
    }

    async fn lease_by_fingerprint(&self, fp: &str) -> Result<Option<(Lease, Task)>> {
        leases::by_fingerprint(self.conn().await?.as_ref(), fp).await
    }

    async fn list_leases(&self, f: &LeaseFilter) -> Result<Vec<Lease>> {
        leases::list(self.conn().await?.as_ref(), f).await
    }

    async fn renew_lease(&self, id: &str, renew: RenewFn) -> Result<Lease> {
        let id = id.to_owned();
        self.write(move |w| Box::pin(leases::renew(w, id, renew)))
            .await
    }

    async fn request_revocation(
        &self,
        selector: LeaseSelector,
        reason: EndReason,
        now: Timestamp,
        actor: &str,
    ) -> Result<Vec<Lease>> {
        let actor = actor.to_owned();
        self.write(move |w| Box::pin(leases::request_revocation(w, selector, reason, now, actor)))
            .await
    }

    async fn revoke_ended_leases(
        &self,
        task: Option<&str>,
        now: Timestamp,
        actor: &str,
        n: u32,
    ) -> Result<Vec<Lease>> {
        let (task, actor) = (task.map(str::to_owned), actor.to_owned());
        self.write(move |w| Box::pin(leases::revoke_ended_leases(w, task, now, actor, n)))
            .await
    }

    async fn expire_due(&self, now: Timestamp, n: u32) -> Result<Vec<Lease>> {
        let fence = self.fence();
        self.write(move |w| {
            Box::pin(async move {
                if !replicas::fenced(w, &fence).await? {
                    return Ok(Vec::new());
                }
                leases::expire_due(w, now, n).await
            })
        })
        .await
    }

    async fn due_revocations(&self, now: Timestamp, n: u32) -> Result<Vec<Lease>> {
        let fence = self.fence();
        self.write(move |w| {
            Box::pin(async move {
                if !replicas::fenced(w, &fence).await? {
                    return Ok(Vec::new());
                }
                leases::due_revocations(w, now, n).await
            })
        })
        .await
    }

    async fn stale_pending(&self, before: Timestamp, n: u32) -> Result<Vec<Lease>> {
        leases::stale_pending(self.conn().await?.as_ref(), &self.me, before, n).await
    }

    async fn finish_revocations(&self, done: Vec<RevocationDone>, now: Timestamp) -> Result<()> {
        self.write(move |w| Box::pin(leases::finish_revocations(w, done, now)))
            .await
    }

    async fn revocation_failed(
        &self,
        id: &str,
        next_attempt: Timestamp,
        error: &str,
        audit: AuditDraft,
    ) -> Result<()> {
        let (id, error) = (id.to_owned(), error.to_owned());
        self.write(move |w| Box::pin(leases::revocation_failed(w, id, next_attempt, error, audit)))
            .await
    }

    async fn prune_ended(&self, before: Timestamp, now: Timestamp, n: u32) -> Result<Pruned> {
        let fence = self.fence();
        self.write(move |w| {
            Box::pin(async move {
                if !replicas::fenced(w, &fence).await? {
                    return Ok(Pruned::default());
                }
                misc::prune_ended(w, before, now, n).await
            })
        })
        .await
    }

    async fn next_deadline(&self) -> Result<Option<Timestamp>> {
        leases::next_deadline(self.conn().await?.as_ref()).await
    }

    async fn create_approval(&self, a: Approval, audit: AuditDraft) -> Result<()> {
        self.write(move |w| Box::pin(misc::create_approval(w, a, audit)))
            .await
    }

    async fn get_approval(&self, id: &str) -> Result<Option<Approval>> {
        misc::get_approval(self.conn().await?.as_ref(), id).await
    }

    async fn list_approvals(
        &self,
        status: Option<ApprovalStatus>,
        n: u32,
    ) -> Result<Vec<Approval>> {
        misc::list_approvals(self.conn().await?.as_ref(), status, n).await
    }

    async fn transition_approval(&self, ch: ApprovalChange) -> Result<Option<Approval>> {
        self.write(move |w| Box::pin(misc::transition_approval(w, ch)))
            .await
    }

    async fn expire_approvals(&self, now: Timestamp, n: u32) -> Result<Vec<Approval>> {
        // The sweeper asks every second: a read decides whether to write.
        if !misc::any_expired_approval(self.conn().await?.as_ref(), now).await? {
            return Ok(Vec::new());
        }
        let fence = self.fence();
        self.write(move |w| {
            Box::pin(async move {
                if !replicas::fenced(w, &fence).await? {
                    return Ok(Vec::new());
                }
                misc::expire_approvals(w, now, n).await
            })
        })
        .await
    }

    async fn approvals_to_announce(&self, now: Timestamp, n: u32) -> Result<Vec<Approval>> {
        misc::approvals_to_announce(self.conn().await?.as_ref(), now, n).await
    }

    async fn approval_announced(&self, id: &str, next: Option<Timestamp>) -> Result<()> {
        let id = id.to_owned();
        self.write(move |w| Box::pin(misc::approval_announced(w, id, next)))
            .await
    }

    async fn create_entry(&self, e: RegistrationEntry, audit: AuditDraft) -> Result<()> {
        self.write(move |w| Box::pin(misc::create_entry(w, e, audit)))
            .await
    }

    async fn get_entry(&self, id: &str) -> Result<Option<RegistrationEntry>> {
        misc::get_entry(self.conn().await?.as_ref(), id).await
    }

    async fn list_entries(&self, node: Option<&str>) -> Result<Vec<RegistrationEntry>> {
        misc::list_entries(self.conn().await?.as_ref(), node).await
    }

    async fn delete_entry(&self, id: &str, audit: AuditDraft) -> Result<Option<RegistrationEntry>> {
        let id = id.to_owned();
        self.write(move |w| Box::pin(misc::delete_entry(w, id, audit)))
            .await
    }

    async fn append_audit(&self, draft: AuditDraft) -> Result<AuditEvent> {
        self.write(move |w| Box::pin(w.audit(draft))).await
    }

    async fn audit_after(&self, after: u64, n: u32) -> Result<Vec<AuditEvent>> {
        misc::audit_after(self.conn().await?.as_ref(), after, n).await
    }

    async fn audit_lines_after(&self, after: u64, n: u32) -> Result<Vec<(u64, String)>> {
        misc::audit_lines_after(self.conn().await?.as_ref(), after, n).await
    }

    async fn audit_tail(&self, n: u32) -> Result<Vec<AuditEvent>> {
        misc::audit_tail(self.conn().await?.as_ref(), n).await
    }

    async fn sink_cursor(&self, sink: &str) -> Result<u64> {
        misc::sink_cursor(self.conn().await?.as_ref(), sink).await
    }

    async fn set_sink_cursor(&self, sink: &str, seq: u64) -> Result<()> {
        let sink = sink.to_owned();
        self.write(move |w| Box::pin(misc::set_sink_cursor(w, sink, seq)))
            .await
    }

    async fn put_secret(&self, name: &str, sealed: Vec<u8>, now: Timestamp) -> Result<()> {
        let name = name.to_owned();
        self.write(move |w| Box::pin(misc::put_secret(w, name, sealed, now)))
            .await
    }

    async fn get_secret(&self, name: &str) -> Result<Option<Vec<u8>>> {
        misc::get_secret(self.conn().await?.as_ref(), name).await
    }

    async fn swap_secret(
        &self,
        name: &str,
        expected: Option<Vec<u8>>,
        sealed: Vec<u8>,
        now: Timestamp,
    ) -> Result<bool> {
        let name = name.to_owned();
        self.write(move |w| Box::pin(misc::swap_secret(w, name, expected, sealed, now)))
            .await
    }

    async fn take_rates(
        &self,
        asks: Vec<crate::RateAsk>,
        now: Timestamp,
    ) -> Result<crate::RateTake> {
        self.write(move |w| Box::pin(rates::take(w, asks, now)))
            .await
    }

    async fn give_rates(&self, gives: Vec<crate::RateGive>, now: Timestamp) -> Result<()> {
        if gives.is_empty() {
            return Ok(());
        }
        self.write(move |w| Box::pin(rates::give(w, gives, now)))
            .await
    }

    async fn claim_once(&self, key: &str, until: Timestamp, now: Timestamp) -> Result<bool> {
        let key = key.to_owned();
        self.write(move |w| Box::pin(misc::claim_once(w, key, until, now)))
            .await
    }

    async fn reserve_budget(
        &self,
        who: ReservationFor,
        decide: BudgetFn,
    ) -> Result<BudgetReservation> {
        self.write(move |w| Box::pin(budgets::reserve(w, who, decide)))
            .await
    }

    async fn settle_budget(&self, settles: Vec<BudgetSettle>) -> Result<()> {
        if settles.is_empty() {
            return Ok(());
        }
        self.write(move |w| Box::pin(budgets::settle(w, settles)))
            .await
    }

    async fn settle_chunks(&self, settles: Vec<ChunkSettle>) -> Result<u64> {
        if settles.is_empty() {
            return Ok(0);
        }
        self.write(move |w| Box::pin(budgets::settle_chunks(w, settles)))
            .await
    }

    async fn settle_stale_reservations(
        &self,
        before: Timestamp,
        now: Timestamp,
        n: u32,
    ) -> Result<u64> {
        // Swept periodically: a read decides whether to write.
        if !budgets::any_stale(self.conn().await?.as_ref(), &self.me, before).await? {
            return Ok(0);
        }
        let me = self.me.clone();
        self.write(move |w| {
            Box::pin(async move { budgets::settle_stale(w, &me, before, now, n).await })
        })
        .await
    }

    async fn summarise_usage(&self, n: u32, event: SummaryFn) -> Result<u64> {
        if !budgets::any_settled(self.conn().await?.as_ref()).await? {
            return Ok(0);
        }
        self.write(move |w| Box::pin(budgets::summarise(w, n, event)))
            .await
    }

    async fn budget_of(&self, task: &str) -> Result<(Usage, Usage)> {
        budgets::budget_of(self.conn().await?.as_ref(), task).await
    }

    async fn counts(&self) -> Result<Counts> {
        misc::counts(self.conn().await?.as_ref()).await
    }

    fn watch_revocations(&self, epoch: Arc<AtomicU64>) {
        let task = tokio::spawn(listen(
            self.options.clone(),
            self.tls.clone(),
            self.schema.clone(),
            epoch,
        ));
        if let Ok(mut l) = self.listener.lock()
            && let Some(old) = l.replace(task)
        {
            old.abort();
        }
    }

    fn write_failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    fn shared(&self) -> bool {
        true
    }

    async fn hold_duties(&self, ttl_ms: u32) -> Result<Option<u64>> {
        let me = self.me.clone();
        let held = self
            .write(move |w| {
                Box::pin(async move { replicas::hold(w, &me, i64::from(ttl_ms)).await })
            })
            .await;
        let fence = match &held {
            Ok(Some(epoch)) => (self.me.clone(), *epoch),
            // Not held, or not known to be: no duty write goes through.
            _ => (self.me.clone(), -1),
        };
        if let Ok(mut f) = self.fence.lock() {
            *f = Some(fence);
        }
        Ok(held?.map(|e| u64::try_from(e).unwrap_or(0)))
    }

    async fn release_duties(&self) -> Result<()> {
        if let Ok(mut f) = self.fence.lock() {
            *f = Some((self.me.clone(), -1));
        }
        let me = self.me.clone();
        self.write(move |w| Box::pin(async move { replicas::release(w, &me).await }))
            .await
    }

    async fn take_over_dead_claims(&self, now: Timestamp) -> Result<u64> {
        let (fence, me) = (self.fence(), self.me.clone());
        self.write(move |w| {
            Box::pin(async move {
                if !replicas::fenced(w, &fence).await? {
                    return Ok(0);
                }
                replicas::take_over_claims(w, &me, now).await
            })
        })
        .await
    }

    async fn next_ssh_serial(&self) -> Result<Option<u64>> {
        Ok(Some(
            replicas::next_serial(self.conn().await?.as_ref()).await?,
        ))
    }

    async fn put_inventory(
        &self,
        item: keymint_core::inventory::InventoryItem,
        expected: u64,
        audit: AuditDraft,
    ) -> Result<bool> {
        self.write(move |w| Box::pin(inventory::put(w, item, expected, audit)))
            .await
    }

    async fn get_inventory(
        &self,
        id: &str,
    ) -> Result<Option<keymint_core::inventory::InventoryItem>> {
        inventory::get(self.conn().await?.as_ref(), id).await
    }

    async fn inventory_by_fingerprint(
        &self,
        fp: &str,
    ) -> Result<Option<keymint_core::inventory::InventoryItem>> {
        inventory::by_fingerprint(self.conn().await?.as_ref(), fp).await
    }

    async fn list_inventory(
        &self,
        before: Option<&str>,
        n: u32,
    ) -> Result<Vec<keymint_core::inventory::InventoryItem>> {
        inventory::list(self.conn().await?.as_ref(), before, n).await
    }

    async fn add_usage_hours(&self, rows: Vec<keymint_core::monitor::UsageHour>) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        self.write(move |w| Box::pin(monitor::add_hours(w, rows)))
            .await
    }

    async fn usage_hours(
        &self,
        scope: keymint_core::monitor::Scope,
        subject: &str,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<keymint_core::monitor::UsageHour>> {
        monitor::hours(self.conn().await?.as_ref(), scope, subject, from, to).await
    }

    async fn note_sources(&self, rows: Vec<keymint_core::monitor::SourceSeen>) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        self.write(move |w| Box::pin(monitor::note_sources(w, rows)))
            .await
    }

    async fn prune_usage(&self, before: Timestamp) -> Result<u64> {
        self.write(move |w| Box::pin(monitor::prune(w, before)))
            .await
    }

    async fn source_countries(&self, workload: &str) -> Result<Vec<String>> {
        monitor::countries(self.conn().await?.as_ref(), workload).await
    }

    async fn suspend(
        &self,
        s: keymint_core::monitor::Suspension,
        audit: AuditDraft,
    ) -> Result<bool> {
        self.write(move |w| Box::pin(monitor::suspend(w, s, audit)))
            .await
    }

    async fn lift_suspension(
        &self,
        id: &str,
        by: &str,
        now: Timestamp,
        audit: AuditDraft,
    ) -> Result<Option<keymint_core::monitor::Suspension>> {
        let (id, by) = (id.to_owned(), by.to_owned());
        self.write(move |w| Box::pin(monitor::lift(w, id, by, now, audit)))
            .await
    }

    async fn active_suspensions(&self) -> Result<Vec<keymint_core::monitor::Suspension>> {
        monitor::active(self.conn().await?.as_ref()).await
    }
    async fn list_suspensions(
        &self,
        active_only: bool,
        n: u32,
    ) -> Result<Vec<keymint_core::monitor::Suspension>> {
        monitor::list(self.conn().await?.as_ref(), active_only, n).await
    }
}
