//! The agent's state and the ops on it: synced entries, the tasks started
//! through the agent and their managed credentials (held in memory only,
//! refreshed at two thirds of their life, delivered to files, announced to
//! watchers).
//!
//! Locks are std mutexes held for a few map operations, never across an
//! `.await`. File writes run on the blocking pool; after each one the
//! writer checks that the task still exists and removes its directory if
//! it ended meanwhile, so a file never outlives its task.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use keymint_attest::PeerInfo;
use keymint_core::{Clock, Timestamp};
use keymint_proto::{
    Credential, EndStatus, EndTask, IssueLease, IssuedLease, Lease, RenewLease, Renewed, StartTask,
    Task,
};
use serde::Serialize;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;

use crate::config::{Limits, Timing};
use crate::deliver::{Delivery, check_id, check_name};
use crate::protocol::{
    ApiError, EndTaskOp, Event, FetchOp, Fetched, Format, RenewOp, StartTaskOp, TaskResponse,
    Whoami, code,
};
use crate::upstream::{EntrySet, NodeWatch, NodeWatchAnswer, Upstream, observed};

/// Everything the connections, the sync loop and the refreshers share.
#[derive(Debug)]
pub struct Shared {
    pub upstream: Upstream,
    pub delivery: Delivery,
    pub limits: Limits,
    pub timing: Timing,
    clock: Arc<dyn Clock>,
    entries: RwLock<Option<Arc<EntrySet>>>,
    /// The server's roles, from the last good sync (for proxy routes).
    roles: RwLock<HashMap<String, keymint_proto::Role>>,
    last_sync: Mutex<Option<Timestamp>>,
    tasks: Mutex<HashMap<String, TaskState>>,
    pub connections: AtomicUsize,
    /// Connections refused at accept (the health report's
    /// `refused_connections`).
    pub refused: AtomicU64,
    next_key: AtomicU64,
    /// Told when a task is tracked or forgotten (the server watch restarts
    /// with the new set).
    pub tasks_changed: Notify,
    /// Tasks of entries deleted on the server, forgotten here, for the
    /// server watch to end (docs/design/0024).
    orphans: Mutex<Vec<String>>,
}

/// Who is asking: the attested process of one connection, matched against
/// the entries as they are now.
#[derive(Debug, Clone)]
pub struct Caller {
    pub conn: u64,
    pub workload: String,
    pub entry: String,
    pub attributes: BTreeMap<String, String>,
    pub observed: BTreeMap<String, String>,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug)]
struct TaskState {
    workload: String,
    entry: String,
    observed: BTreeMap<String, String>,
    uid: u32,
    gid: u32,
    /// The connection it dies with, unless detached.
    owner: Option<u64>,
    events: broadcast::Sender<Event>,
    creds: HashMap<u64, Managed>,
}

/// A credential the agent keeps fresh.
#[derive(Debug)]
struct Managed {
    request: IssueLease,
    file: Option<(String, Format)>,
    lease: Lease,
    /// `None` once it expired without a replacement.
    credential: Option<Credential>,
    /// When it was received, and how long it lives (from the server's own
    /// timestamps, so clock skew does not matter).
    received: Instant,
    life: Duration,
    wake: Arc<Notify>,
}

/// When to refresh and when the credential expires: `refresh_at` of its
/// life after it was received, and at the end of it.
pub fn schedule(received: Instant, life: Duration, t: &Timing) -> (Instant, Instant) {
    let (num, den) = t.refresh_at;
    let refresh = life
        .checked_mul(num)
        .and_then(|d| d.checked_div(den.max(1)))
        .unwrap_or(life);
    // Not sooner than the first retry delay, so that a credential the
    // server cut very short does not turn into a busy loop.
    (
        received + refresh.max(t.retry_min).min(life),
        received + life,
    )
}

/// The next retry delay: doubled, at most `max`.
pub fn backoff(cur: Duration, max: Duration) -> Duration {
    cur.saturating_mul(2).min(max)
}

fn life_of(lease: &Lease) -> Duration {
    Duration::from_millis(u64::try_from(lease.created_at.until(lease.expires_at)).unwrap_or(0))
}

/// The life of an issued credential: its lease's, or less when the
/// provider's token dies first (a federated token lives minutes), so the
/// refresher replaces it before the provider stops taking it.
fn life_of_issued(issued: &keymint_proto::IssuedLease) -> Duration {
    let lease = life_of(&issued.lease);
    match &issued.credential {
        keymint_proto::Credential::ProviderToken { expires_at, .. } => {
            let end_ms = i64::try_from(*expires_at)
                .unwrap_or(i64::MAX)
                .saturating_mul(1000);
            let token = u64::try_from(end_ms - issued.lease.created_at.millis()).unwrap_or(0);
            lease.min(Duration::from_millis(token))
        }
        _ => lease,
    }
}

/// The health report (the endpoint and the `health` op).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct HealthReport {
    /// `ok`, or `degraded` while the server is unreachable or no entry
    /// sync has succeeded yet.
    pub status: String,
    /// `reachable`, `unreachable`, or `unauthorized` (the server answers
    /// but refuses the node's credential).
    pub server: String,
    pub last_sync: Option<String>,
    pub entries: usize,
    pub connections: usize,
    /// Connections refused since the agent started: a uid past its share
    /// (`max_connections_per_uid`) or the socket past `max_connections`.
    #[serde(default)]
    pub refused_connections: u64,
    pub tasks: usize,
    pub credentials: usize,
    /// Where delivered files are: `memory` (tmpfs, ramfs) or `disk`, where
    /// a credential file may outlive the agent and the machine's power
    /// (docs/design/0012).
    pub delivery: String,
}

impl HealthReport {
    pub fn ready(&self) -> bool {
        self.status == "ok"
    }
}

impl Shared {
    pub fn new(
        upstream: Upstream,
        delivery: Delivery,
        limits: Limits,
        timing: Timing,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            upstream,
            delivery,
            limits,
            timing,
            clock,
            entries: RwLock::new(None),
            roles: RwLock::new(HashMap::new()),
            last_sync: Mutex::new(None),
            tasks: Mutex::new(HashMap::new()),
            connections: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            next_key: AtomicU64::new(1),
            tasks_changed: Notify::new(),
            orphans: Mutex::new(Vec::new()),
        }
    }

    fn tasks(&self) -> MutexGuard<'_, HashMap<String, TaskState>> {
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn entry_set(&self) -> Option<Arc<EntrySet>> {
        self.entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Fetches this node's entries; keeps the last good set on any failure.
    pub async fn sync_entries(&self) -> Result<usize, ApiError> {
        let remote = self.upstream.entries().await?;
        let set = EntrySet::new(remote).map_err(|e| {
            tracing::error!(error = %e, "the server's entries for this node do not load; keeping the last good set");
            ApiError::new(code::INTERNAL, "the entries do not load")
        })?;
        let n = set.ids.len();
        let orphaned: Vec<String> = self
            .tasks()
            .iter()
            .filter(|(_, t)| !set.ids.contains(&t.entry))
            .map(|(id, _)| id.clone())
            .collect();
        *self
            .entries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(set));
        // An entry deleted on the server: its tasks' credentials and files
        // go now, and the server watch ends the tasks.
        for task in orphaned {
            self.forget(&task, "its registration entry was deleted");
            self.orphans
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(task);
            self.tasks_changed.notify_one();
        }
        match self.upstream.roles().await {
            Ok(roles) => {
                *self
                    .roles
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    roles.into_iter().map(|r| (r.name.clone(), r)).collect();
            }
            Err(e) => {
                tracing::warn!(error = %e.message, "cannot read the server's roles; keeping the last")
            }
        }
        *self
            .last_sync
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(self.clock.now());
        Ok(n)
    }

    pub fn health(&self) -> HealthReport {
        let entries = self.entry_set().map_or(0, |s| s.ids.len());
        let last_sync = *self
            .last_sync
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let reachable = self.upstream.reachable();
        let authorized = self.upstream.authorized();
        let (tasks, credentials) = {
            let t = self.tasks();
            (
                t.len(),
                t.values()
                    .flat_map(|s| s.creds.values())
                    .filter(|m| m.credential.is_some())
                    .count(),
            )
        };
        HealthReport {
            status: if reachable && authorized && last_sync.is_some() {
                "ok"
            } else {
                "degraded"
            }
            .into(),
            // A server that answers but refuses the node's credential is
            // not a working server for this agent.
            server: match (reachable, authorized) {
                (false, _) => "unreachable",
                (true, false) => "unauthorized",
                (true, true) => "reachable",
            }
            .into(),
            last_sync: last_sync.map(Timestamp::rfc3339),
            entries,
            connections: self.connections.load(Ordering::Relaxed),
            refused_connections: self.refused.load(Ordering::Relaxed),
            tasks,
            credentials,
            delivery: if self.delivery.is_in_memory() {
                "memory"
            } else {
                "disk"
            }
            .into(),
        }
    }

    /// Matches an attested peer against the entries as they are now; the
    /// process must still be alive.
    pub fn caller(&self, peer: &PeerInfo, conn: u64) -> Result<Caller, ApiError> {
        if !peer.is_alive() {
            return Err(ApiError::new(
                code::NOT_ATTESTED,
                format!(
                    "the attested process (pid `{}`) has exited; this connection is no longer \
                     usable",
                    peer.pid()
                ),
            ));
        }
        let Some(set) = self.entry_set() else {
            return Err(ApiError::new(
                code::UNAVAILABLE,
                "the agent has not synced its entries from the server yet",
            ));
        };
        let w = set
            .registry
            .attest(peer)
            .map_err(|e| ApiError::new(code::NOT_ATTESTED, e.to_string()))?;
        let entry = set.ids.get(w.entry).cloned().unwrap_or_default();
        Ok(Caller {
            conn,
            observed: observed(&w.attributes),
            workload: w.workload,
            entry,
            attributes: w.attributes,
            uid: peer.uid(),
            gid: peer.gid(),
        })
    }

    /// Whether connection `conn` owns a task (it dies with it).
    pub fn owns_tasks(&self, conn: u64) -> bool {
        self.tasks().values().any(|t| t.owner == Some(conn))
    }

    /// One round of the server watch: what to ask (the tracked tasks, the
    /// entry ids held, the orphans to end).
    pub fn watch_request(&self, wait: Duration) -> Option<NodeWatch> {
        let tasks: Vec<String> = self
            .tasks()
            .keys()
            .take(crate::upstream::MAX_WATCHED)
            .cloned()
            .collect();
        let end: Vec<String> = {
            let mut o = self
                .orphans
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = o.len().min(crate::upstream::MAX_WATCHED);
            o.drain(..n).collect()
        };
        if tasks.is_empty() && end.is_empty() {
            return None;
        }
        Some(NodeWatch {
            tasks,
            entries: self.entry_set().map(|s| s.ids.clone()),
            end,
            wait_secs: wait.as_secs(),
        })
    }

    /// Orphans whose end did not reach the server: tried again next round.
    pub fn retry_orphans(&self, end: Vec<String>) {
        self.orphans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(end);
    }

    /// The server's answer to a watch round: ended tasks are forgotten at
    /// once (files removed, watchers told); changed entries are synced now.
    pub async fn watch_answer(&self, asked: &NodeWatch, answer: NodeWatchAnswer) {
        // Entries first: the tasks of a deleted entry are orphans to end
        // on the server, not only tasks that are over.
        let held: Option<std::collections::BTreeSet<&String>> =
            asked.entries.as_ref().map(|e| e.iter().collect());
        let now: std::collections::BTreeSet<&String> = answer.entries.iter().collect();
        if held.is_some_and(|h| h != now)
            && let Err(e) = self.sync_entries().await
        {
            tracing::warn!(code = %e.code, "entry sync after a change failed");
        }
        for t in &answer.ended {
            if asked.tasks.contains(t) {
                self.forget(t, "the task is no longer active on the server");
            }
        }
    }

    pub fn whoami(c: &Caller) -> Whoami {
        Whoami {
            workload: c.workload.clone(),
            entry: c.entry.clone(),
            attributes: c.attributes.clone(),
        }
    }

    /// Whether `task` is known here and, if so, the caller's.
    fn check_owner(&self, c: &Caller, task: &str) -> Result<bool, ApiError> {
        match self.tasks().get(task) {
            None => Ok(false),
            Some(t) if t.workload == c.workload => Ok(true),
            Some(_) => Err(forbidden_task(task)),
        }
    }

    pub async fn start_task(
        self: &Arc<Self>,
        c: &Caller,
        op: StartTaskOp,
    ) -> Result<TaskResponse, ApiError> {
        let body = StartTask {
            workload: None,
            role: op.role,
            intent: op.intent,
            purpose: op.purpose,
            environment: op.environment,
            ttl_secs: op.ttl_secs,
            idle_timeout_secs: op.idle_timeout_secs,
            scopes: op.scopes,
            parent: op.parent,
        };
        let task: Task = self
            .upstream
            .on_behalf(&c.entry, &c.observed)?
            .post("/v1/tasks", &body)
            .await?;
        check_id("task", &task.id)?;
        self.track(c, &task, (!op.detach).then_some(c.conn));
        tracing::info!(task = %task.id, workload = %c.workload, "task started");
        Ok(TaskResponse { task })
    }

    fn track(self: &Arc<Self>, c: &Caller, task: &Task, owner: Option<u64>) {
        let new = match self.tasks().entry(task.id.clone()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(TaskState {
                    workload: c.workload.clone(),
                    entry: c.entry.clone(),
                    observed: c.observed.clone(),
                    uid: c.uid,
                    gid: c.gid,
                    owner,
                    events: broadcast::channel(64).0,
                    creds: HashMap::new(),
                });
                true
            }
        };
        if let Some(idle) = task.idle_timeout_secs.filter(|&i| new && i > 0) {
            tokio::spawn(Arc::clone(self).heartbeater(task.id.clone(), Duration::from_secs(idle)));
        }
        self.tasks_changed.notify_one();
    }

    /// Heartbeats a task that has an idle timeout, every third of it, while
    /// a connection owns it: the task lives as long as its workload stays
    /// connected, and ends at its idle timeout once nothing owns it (the
    /// agent killed, or restarted and nobody attached it again). Stops when
    /// the task is forgotten (docs/design/0012).
    async fn heartbeater(self: Arc<Self>, task: String, idle: Duration) {
        let every = (idle / 3).max(self.timing.retry_min);
        loop {
            tokio::time::sleep(every).await;
            let Some((owned, entry, observed)) = self
                .tasks()
                .get(&task)
                .map(|t| (t.owner.is_some(), t.entry.clone(), t.observed.clone()))
            else {
                return;
            };
            if !owned {
                continue;
            }
            let beat: Result<Task, ApiError> = match self.upstream.on_behalf(&entry, &observed) {
                Ok(c) => {
                    c.post(
                        &format!("/v1/tasks/{task}/heartbeat"),
                        &serde_json::json!({}),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            match beat {
                Ok(_) => {}
                Err(e) if ended(&e) => {
                    self.forget(&task, "the task is no longer active on the server");
                    return;
                }
                Err(e) => tracing::warn!(task, code = %e.code, "cannot heartbeat a task"),
            }
        }
    }

    /// Makes sure `task` is tracked: a task the agent did not start (a
    /// detached task from an earlier connection, one started elsewhere) is
    /// looked up on the server as the caller, and must be the caller's.
    async fn adopt(self: &Arc<Self>, c: &Caller, task: &str) -> Result<(), ApiError> {
        check_id("task", task)?;
        if self.check_owner(c, task)? {
            return Ok(());
        }
        let t: Task = self
            .upstream
            .on_behalf(&c.entry, &c.observed)?
            .get(&format!("/v1/tasks/{task}"))
            .await?;
        if t.workload != c.workload {
            return Err(forbidden_task(task));
        }
        if !t.status.is_active() {
            return Err(ApiError::new(
                "task_not_active",
                format!("task `{task}` has ended"),
            ));
        }
        self.track(c, &t, None);
        Ok(())
    }

    pub async fn end_task(&self, c: &Caller, op: EndTaskOp) -> Result<TaskResponse, ApiError> {
        check_id("task", &op.task)?;
        self.check_owner(c, &op.task)?;
        let task: Task = self
            .upstream
            .on_behalf(&c.entry, &c.observed)?
            .post(
                &format!("/v1/tasks/{}/end", op.task),
                &EndTask {
                    status: op.status,
                    reason: op.reason,
                },
            )
            .await?;
        self.forget(&op.task, "ended by the workload");
        Ok(TaskResponse { task })
    }

    /// Issues a credential in the caller's task, delivers it if asked, and
    /// keeps it fresh until the task ends.
    pub async fn fetch(self: &Arc<Self>, c: &Caller, op: FetchOp) -> Result<Fetched, ApiError> {
        if let Some(name) = &op.file {
            check_name(name)?;
        }
        self.adopt(c, &op.task).await?;
        let request = IssueLease {
            ttl_secs: op.ttl_secs,
            scopes: op.scopes,
            public_key: op.public_key,
            principals: op.principals,
        };
        let issued = self.issue(&op.task, &request).await?;
        let file = op.file.map(|n| (n, op.format));
        let path = match &file {
            Some((name, format)) => Some(self.deliver(&op.task, name, *format, &issued).await?),
            None => None,
        };
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let wake = Arc::new(Notify::new());
        let stored = {
            let mut tasks = self.tasks();
            match tasks.get_mut(&op.task) {
                Some(t) => {
                    t.creds.insert(
                        key,
                        Managed {
                            request,
                            file,
                            life: life_of_issued(&issued),
                            received: Instant::now(),
                            lease: issued.lease.clone(),
                            credential: Some(issued.credential.clone()),
                            wake,
                        },
                    );
                    true
                }
                None => false,
            }
        };
        if !stored {
            // The task ended while the credential was issued.
            self.cleanup_files(&op.task);
            return Err(ApiError::new(
                "task_not_active",
                format!("task `{}` ended", op.task),
            ));
        }
        tokio::spawn(Arc::clone(self).refresher(op.task.clone(), key));
        let proxy = self.proxy_route(&issued.lease.role);
        Ok(Fetched {
            lease: issued.lease,
            credential: issued.credential,
            file: path.map(|p| p.display().to_string()),
            proxy,
        })
    }

    /// The proxy upstream of `role`, if it names one.
    fn proxy_route(&self, role: &str) -> Option<crate::protocol::ProxyRoute> {
        let roles = self
            .roles
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let egress = roles.get(role)?.egress()?;
        Some(crate::protocol::ProxyRoute {
            base_url: self.upstream.proxy_url(&egress.upstream),
            upstream: egress.upstream.clone(),
            kind: egress.upstream_kind,
        })
    }

    /// One issuance on behalf of the task's workload.
    async fn issue(&self, task: &str, request: &IssueLease) -> Result<IssuedLease, ApiError> {
        let (entry, observed) = {
            let tasks = self.tasks();
            let t = tasks
                .get(task)
                .ok_or_else(|| ApiError::new("task_not_active", format!("task `{task}` ended")))?;
            (t.entry.clone(), t.observed.clone())
        };
        let issued: IssuedLease = self
            .upstream
            .on_behalf(&entry, &observed)?
            .post(&format!("/v1/tasks/{task}/leases"), request)
            .await?;
        check_id("lease", &issued.lease.id)?;
        Ok(issued)
    }

    /// Writes a delivered file; if the task ended meanwhile, removes it
    /// again.
    async fn deliver(
        &self,
        task: &str,
        name: &str,
        format: Format,
        issued: &IssuedLease,
    ) -> Result<std::path::PathBuf, ApiError> {
        let owner = {
            let tasks = self.tasks();
            let t = tasks
                .get(task)
                .ok_or_else(|| ApiError::new("task_not_active", format!("task `{task}` ended")))?;
            (t.uid, t.gid)
        };
        let contents = zeroize::Zeroizing::new(match format {
            Format::Secret => issued.credential.secret().expose().as_bytes().to_vec(),
            Format::Json => serde_json::to_vec(&issued.credential).unwrap_or_default(),
            Format::Env => crate::deliver::env_file(&issued.credential).to_vec(),
        });
        let (d, t, n) = (self.delivery.clone(), task.to_owned(), name.to_owned());
        let written = tokio::task::spawn_blocking(move || d.write(&t, &n, owner, &contents))
            .await
            .map_err(|_| ApiError::new(code::INTERNAL, "the file could not be written"))?;
        let path = written.map_err(|e| {
            tracing::error!(task, file = name, error = %e, "cannot deliver a credential file");
            ApiError::new(
                code::INTERNAL,
                format!("the file `{name}` could not be written"),
            )
        })?;
        if !self.tasks().contains_key(task) {
            self.cleanup_files(task);
            return Err(ApiError::new(
                "task_not_active",
                format!("task `{task}` ended"),
            ));
        }
        Ok(path)
    }

    fn cleanup_files(&self, task: &str) {
        if let Err(e) = self.delivery.remove_task(task) {
            tracing::error!(task, error = %e, "cannot remove a task's delivered files");
        }
    }

    pub async fn renew(&self, c: &Caller, op: RenewOp) -> Result<Renewed, ApiError> {
        check_id("lease", &op.lease)?;
        let found = {
            let tasks = self.tasks();
            tasks.iter().find_map(|(id, t)| {
                t.creds
                    .iter()
                    .find(|(_, m)| m.lease.id == op.lease)
                    .map(|(k, _)| (id.clone(), *k, t.workload == c.workload))
            })
        };
        if let Some((_, _, false)) = found {
            return Err(ApiError::new(
                code::FORBIDDEN,
                format!("lease `{}` belongs to another workload", op.lease),
            ));
        }
        let renewed: Renewed = self
            .upstream
            .on_behalf(&c.entry, &c.observed)?
            .post(
                &format!("/v1/leases/{}/renew", op.lease),
                &RenewLease {
                    increment_secs: op.increment_secs,
                },
            )
            .await?;
        if let Some((task, key, _)) = found
            && let Some(m) = self
                .tasks()
                .get_mut(&task)
                .and_then(|t| t.creds.get_mut(&key))
            && m.lease.id == renewed.lease.id
        {
            m.life = life_of(&renewed.lease);
            m.lease = renewed.lease.clone();
            m.wake.notify_one();
        }
        Ok(renewed)
    }

    /// Subscribes to a task's events (the caller's own task).
    pub async fn watch(
        self: &Arc<Self>,
        c: &Caller,
        task: &str,
    ) -> Result<broadcast::Receiver<Event>, ApiError> {
        self.adopt(c, task).await?;
        self.tasks()
            .get(task)
            .map(|t| t.events.subscribe())
            .ok_or_else(|| ApiError::new("task_not_active", format!("task `{task}` ended")))
    }

    /// Makes the caller's connection the owner of `task` (the caller's
    /// workload's, active): the task ends when this connection closes. A
    /// task owned by another connection that is still open stays its.
    /// `keymint run` attaches again after the agent restarted, so that
    /// its task still ends with it (docs/design/0012).
    pub async fn attach(self: &Arc<Self>, c: &Caller, task: &str) -> Result<(), ApiError> {
        self.adopt(c, task).await?;
        let mut tasks = self.tasks();
        let t = tasks
            .get_mut(task)
            .ok_or_else(|| ApiError::new("task_not_active", format!("task `{task}` ended")))?;
        match t.owner {
            Some(o) if o != c.conn => Err(ApiError::new(
                code::FORBIDDEN,
                format!("task `{task}` belongs to another connection"),
            )),
            _ => {
                t.owner = Some(c.conn);
                tracing::info!(task, conn = c.conn, "a connection attached to a task");
                Ok(())
            }
        }
    }

    /// Forgets a task: its credentials, its files; tells its watchers.
    pub fn forget(&self, task: &str, reason: &str) {
        let Some(t) = self.tasks().remove(task) else {
            return;
        };
        self.tasks_changed.notify_one();
        for m in t.creds.values() {
            m.wake.notify_one();
        }
        self.cleanup_files(task);
        let _ = t.events.send(Event::TaskEnded {
            task: task.to_owned(),
            reason: reason.to_owned(),
        });
        tracing::info!(task, reason, "task forgotten");
    }

    /// The agent stops: connection `conn` closes without ending its tasks
    /// (docs/design/0012), which nobody owns from now on, so nothing
    /// heartbeats them (they end at their idle timeout unless a workload
    /// attaches them to a new agent).
    pub fn disown(&self, conn: u64) {
        for t in self.tasks().values_mut() {
            if t.owner == Some(conn) {
                t.owner = None;
            }
        }
    }

    /// A connection closed: its tasks (those not detached) end as failed,
    /// which revokes their credentials. An end the server could not be
    /// reached for is tried again until it answers (docs/design/0012).
    pub async fn connection_closed(self: &Arc<Self>, conn: u64) {
        let owned: Vec<(String, String, BTreeMap<String, String>)> = self
            .tasks()
            .iter()
            .filter(|(_, t)| t.owner == Some(conn))
            .map(|(id, t)| (id.clone(), t.entry.clone(), t.observed.clone()))
            .collect();
        for (task, entry, observed) in owned {
            // Forget first: the files go at once, whatever the server says.
            self.forget(&task, "the workload's connection closed");
            if let Err(e) = self.end_closed(&task, &entry, &observed).await {
                if e.code == code::UNAVAILABLE {
                    tracing::warn!(
                        task,
                        "cannot reach the server to end the task of a closed connection; trying again until it answers"
                    );
                    tokio::spawn(Arc::clone(self).end_closed_later(task, entry, observed));
                } else {
                    tracing::warn!(task, error = %e, "the server refused to end the task of a closed connection");
                }
            }
        }
    }

    /// Ends the task of a closed connection on the server, as failed.
    async fn end_closed(
        &self,
        task: &str,
        entry: &str,
        observed: &BTreeMap<String, String>,
    ) -> Result<Task, ApiError> {
        self.upstream
            .on_behalf(entry, observed)?
            .post(
                &format!("/v1/tasks/{task}/end"),
                &EndTask {
                    status: EndStatus::Failed,
                    reason: Some("the workload's connection closed".into()),
                },
            )
            .await
    }

    /// [`Self::end_closed`] again, with backoff and at once when the
    /// server answers again, until the server answers: INVARIANT
    /// (DESIGN.md 3), the end of a task is not dropped because the server
    /// was away when its workload hung up.
    async fn end_closed_later(
        self: Arc<Self>,
        task: String,
        entry: String,
        observed: BTreeMap<String, String>,
    ) {
        let mut retry = self.timing.retry_min;
        loop {
            tokio::select! {
                () = tokio::time::sleep(retry) => {}
                () = self.upstream.returned() => {}
            }
            retry = backoff(retry, self.timing.retry_max);
            match self.end_closed(&task, &entry, &observed).await {
                Ok(_) => {
                    tracing::info!(task, "ended the task of a closed connection");
                    return;
                }
                Err(e) if e.code == code::UNAVAILABLE => {}
                Err(e) => {
                    tracing::warn!(task, error = %e, "the server refused to end the task of a closed connection");
                    return;
                }
            }
        }
    }

    /// Keeps one managed credential fresh until its task ends.
    async fn refresher(self: Arc<Self>, task: String, key: u64) {
        let mut retry = self.timing.retry_min;
        loop {
            let Some((refresh_at, expire_at, wake, fresh)) = self.with_managed(&task, key, |m| {
                let (r, e) = schedule(m.received, m.life, &self.timing);
                (r, e, Arc::clone(&m.wake), m.credential.is_some())
            }) else {
                return;
            };
            if fresh {
                tokio::select! {
                    () = tokio::time::sleep_until(refresh_at) => {}
                    () = wake.notified() => continue,
                }
            }
            let request = match self.with_managed(&task, key, |m| m.request.clone()) {
                Some(r) => r,
                None => return,
            };
            match self.issue(&task, &request).await {
                Ok(issued) => {
                    retry = self.timing.retry_min;
                    self.replace(&task, key, issued).await;
                }
                Err(e) if ended(&e) => {
                    tracing::info!(task, code = %e.code, "the server says the task is over");
                    self.forget(&task, "the task is no longer active on the server");
                    return;
                }
                Err(e) => {
                    tracing::warn!(task, code = %e.code, retry_in = ?retry, "cannot refresh a credential");
                    if Instant::now() >= expire_at {
                        self.expire(&task, key);
                    }
                    let until = if Instant::now() < expire_at {
                        (Instant::now() + retry).min(expire_at)
                    } else {
                        Instant::now() + retry
                    };
                    retry = backoff(retry, self.timing.retry_max);
                    tokio::select! {
                        () = tokio::time::sleep_until(until) => {}
                        () = wake.notified() => {}
                        // The server answers again: retry now, and the
                        // backoff starts over (docs/design/0024).
                        () = self.upstream.returned() => retry = self.timing.retry_min,
                    }
                    if Instant::now() >= expire_at {
                        self.expire(&task, key);
                    }
                }
            }
        }
    }

    fn with_managed<T>(&self, task: &str, key: u64, f: impl FnOnce(&Managed) -> T) -> Option<T> {
        self.tasks()
            .get(task)
            .and_then(|t| t.creds.get(&key))
            .map(f)
    }

    /// A refreshed credential: its file replaced, then the state, then the
    /// watchers told.
    async fn replace(&self, task: &str, key: u64, issued: IssuedLease) {
        let Some(file) = self.with_managed(task, key, |m| m.file.clone()) else {
            return;
        };
        let path = match &file {
            Some((name, format)) => match self.deliver(task, name, *format, &issued).await {
                Ok(p) => Some(p.display().to_string()),
                Err(e) => {
                    tracing::warn!(task, code = %e.code, "a refreshed credential was not delivered");
                    None
                }
            },
            None => None,
        };
        let mut tasks = self.tasks();
        let Some(t) = tasks.get_mut(task) else {
            return;
        };
        let Some(m) = t.creds.get_mut(&key) else {
            return;
        };
        let replaces = std::mem::replace(&mut m.lease, issued.lease.clone()).id;
        m.credential = Some(issued.credential.clone());
        m.received = Instant::now();
        m.life = life_of_issued(&issued);
        tracing::info!(task, lease = %issued.lease.id, replaces, "credential refreshed");
        let _ = t.events.send(Event::Credential {
            task: task.to_owned(),
            lease: Box::new(issued.lease),
            credential: issued.credential,
            file: path,
            replaces,
        });
    }

    /// A credential reached its expiry without a replacement: forget it
    /// and remove its file (the refresher keeps trying).
    fn expire(&self, task: &str, key: u64) {
        let mut tasks = self.tasks();
        let Some(t) = tasks.get_mut(task) else {
            return;
        };
        let Some(m) = t.creds.get_mut(&key) else {
            return;
        };
        if m.credential.take().is_none() {
            return;
        }
        if let Some((name, _)) = &m.file
            && let Err(e) = self.delivery.remove_file(task, name)
        {
            tracing::error!(task, error = %e, "cannot remove an expired credential's file");
        }
        tracing::warn!(task, lease = %m.lease.id, "a credential expired before it could be refreshed");
        let _ = t.events.send(Event::Expired {
            task: task.to_owned(),
            lease: m.lease.id.clone(),
        });
    }
}

/// The server's answers that mean the task will never issue again.
fn ended(e: &ApiError) -> bool {
    matches!(e.code.as_str(), "task_not_active" | "not_found")
}

fn forbidden_task(task: &str) -> ApiError {
    ApiError::new(
        code::FORBIDDEN,
        format!("task `{task}` belongs to another workload"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_comes_at_two_thirds_of_the_life() {
        let t = Timing::default();
        let now = Instant::now();
        let (r, e) = schedule(now, Duration::from_secs(90), &t);
        assert_eq!(r - now, Duration::from_secs(60));
        assert_eq!(e - now, Duration::from_secs(90));
        let (r, e) = schedule(now, Duration::ZERO, &t);
        assert_eq!((r, e), (now, now));
        let odd = Timing {
            refresh_at: (1, 0),
            ..Timing::default()
        };
        let (r, _) = schedule(now, Duration::from_secs(9), &odd);
        assert_eq!(r - now, Duration::from_secs(9), "never after the expiry");
    }

    #[test]
    fn retries_back_off_to_a_ceiling() {
        let max = Duration::from_secs(30);
        let mut d = Duration::from_millis(500);
        let mut seen = vec![];
        for _ in 0..8 {
            seen.push(d.as_millis());
            d = backoff(d, max);
        }
        assert_eq!(seen, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
    }
}
