//! keymint node agent (`keymint agent`): runs once per host, proves to the
//! server which node it is, attests the processes that connect to its Unix
//! socket, and fetches, renews, refreshes and delivers their credentials on
//! their behalf, for the workloads the server's registration entries assign
//! to this node. Linux only. The protocol and its reasoning are in
//! `docs/design/0012-node-agent.md`.
//!
//! - [`config`]: what it runs with (built by the binary; nothing here reads
//!   the environment);
//! - [`protocol`]: the newline-delimited JSON of the workload API, bounded
//!   line reading;
//! - [`upstream`]: node authentication, entry sync, calls on behalf of a
//!   workload;
//! - `state`: tasks and managed credentials in memory, refresh at two
//!   thirds of their life, watchers;
//! - [`deliver`]: credential files, private and replaced atomically;
//! - `socket`: the accept loop, per-connection attestation and limits;
//! - `health`: `/health` and `/ready`;
//! - the server watch (`watch_loop`): a long poll that removes files when
//!   a task ends on the server and ends the tasks of deleted entries;
//! - [`client`]: a small client of the workload API (`keymint run`).

#[cfg(not(target_os = "linux"))]
compile_error!("keymint-agent attests peers through /proc and pidfds: Linux only");

pub mod client;
pub mod config;
pub mod deliver;
mod health;
pub mod protocol;
mod socket;
mod state;
pub mod upstream;

use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keymint_core::Clock;
use tokio::sync::watch;

pub use config::{AgentConfig, Limits, NodeCredential, Timing};
pub use state::{HealthReport, backoff, schedule};

/// Starting the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Config(String),
    #[error("cannot create the workload socket")]
    Bind(#[from] keymint_attest::BindError),
    /// Another agent runs with this delivery directory; nothing was
    /// touched.
    #[error(
        "another keymint agent is running with the delivery directory `{0}` (its lock is held); \
         nothing was changed"
    )]
    Running(PathBuf),
    #[error("cannot prepare the delivery directory `{path}`")]
    Deliver {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve health on `{addr}`")]
    Health {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running agent. Dropping it stops it (as [`Agent::stop`] without
/// waiting).
#[derive(Debug)]
pub struct Agent {
    shared: Arc<state::Shared>,
    /// Held for the agent's life: no second agent cleans our files.
    _lock: nix::fcntl::Flock<std::fs::File>,
    socket: PathBuf,
    health: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Agent {
    /// Prepares the delivery directory (removing what an earlier agent
    /// left), binds the socket, and starts serving, syncing and (if asked)
    /// the health endpoint. The server need not be reachable yet. Must be
    /// called within a tokio runtime.
    pub async fn start(config: AgentConfig, clock: Arc<dyn Clock>) -> Result<Self, AgentError> {
        let upstream = upstream::Upstream::new(
            &config.server,
            config.credential.clone(),
            &config.tls,
            config.server_timeout,
        )
        .map_err(|e| AgentError::Config(e.to_string()))?;
        // INVARIANT (docs/design/0024): a second agent started by mistake
        // touches nothing. First the lock next to the delivery directory
        // (held for the agent's life), then the socket (a live agent
        // answering there is `InUse`), and only then is the delivery
        // directory cleaned.
        let lock = lock_delivery(&config.deliver_dir)?;
        let listener = keymint_attest::bind_private_with(
            &config.socket,
            &keymint_attest::BindOptions {
                group: config.group,
            },
        )?;
        let delivery = match deliver::Delivery::prepare(&config.deliver_dir) {
            Ok(d) => d,
            Err(source) => {
                let _ = std::fs::remove_file(&config.socket);
                return Err(AgentError::Deliver {
                    path: config.deliver_dir.clone(),
                    source,
                });
            }
        };
        if !delivery.is_in_memory() {
            tracing::warn!(
                dir = %config.deliver_dir.display(),
                "the delivery directory is not on a tmpfs: credential files written there reach \
                 the disk and stay on it if the agent is killed; use a tmpfs (/run is one)"
            );
        }
        let shared = Arc::new(state::Shared::new(
            upstream,
            delivery,
            config.limits.clone(),
            config.timing.clone(),
            clock,
        ));
        let (shutdown, rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut health = None;
        if let Some(addr) = config.health {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Health { addr, source })?;
            health = Some(
                l.local_addr()
                    .map_err(|source| AgentError::Health { addr, source })?,
            );
            let router = health::router(Arc::clone(&shared));
            let mut rx = rx.clone();
            tasks.push(tokio::spawn(async move {
                let stop = async move {
                    let _ = rx.wait_for(|s| *s).await;
                };
                if let Err(e) = axum::serve(l, router).with_graceful_shutdown(stop).await {
                    tracing::error!(error = %e, "the health endpoint stopped");
                }
            }));
        }
        tasks.push(tokio::spawn(sync_loop(Arc::clone(&shared), rx.clone())));
        tasks.push(tokio::spawn(watch_loop(Arc::clone(&shared), rx.clone())));
        tasks.push(tokio::spawn(socket::serve(
            listener,
            Arc::clone(&shared),
            rx,
        )));
        tracing::info!(socket = %config.socket.display(), server = %config.server, "keymint agent started");
        Ok(Self {
            shared,
            _lock: lock,
            socket: config.socket,
            health,
            shutdown,
            tasks,
        })
    }

    /// The workload socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Where `/health` is served, if it is.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health
    }

    /// The health report.
    pub fn health(&self) -> HealthReport {
        self.shared.health()
    }

    /// Syncs the entries now (they are also synced every
    /// [`Timing::sync_interval`]).
    pub async fn sync_now(&self) -> Result<usize, protocol::ApiError> {
        self.shared.sync_entries().await
    }

    /// Stops accepting, closes the connections and stops the background
    /// work. Tasks are not ended and delivered files stay until the next
    /// start (a restart for an upgrade must not revoke running workloads'
    /// credentials); the socket is removed.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Takes `DIR.lock` (a sibling of the delivery directory) for the agent's
/// life, without waiting: a second agent with the same directory stops
/// here, before it changes anything.
fn lock_delivery(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, AgentError> {
    let mut name = dir.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let io = |source| AgentError::Deliver {
        path: path.clone(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(&path)
        .map_err(io)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        if e == nix::errno::Errno::EWOULDBLOCK {
            AgentError::Running(dir.to_owned())
        } else {
            io(e.into())
        }
    })
}

/// Watches the server for the end of the tasks the agent holds and for
/// changed entries (a long poll), so that files go when a task ends on
/// the server, not at the next refresh (docs/design/0024).
async fn watch_loop(shared: Arc<state::Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut retry = shared.timing.retry_min;
    loop {
        let wait = shared.upstream.watch_wait();
        let Some(req) = shared.watch_request(wait) else {
            tokio::select! {
                () = crate::stopped(&mut shutdown) => return,
                () = shared.tasks_changed.notified() => {}
            }
            continue;
        };
        let answer = tokio::select! {
            () = crate::stopped(&mut shutdown) => return,
            // A task tracked or forgotten: ask again with the new set
            // (unless this round ends orphans: let it finish).
            () = shared.tasks_changed.notified(), if req.end.is_empty() => continue,
            a = shared.upstream.node_watch(&req) => a,
        };
        match answer {
            Ok(a) => {
                retry = shared.timing.retry_min;
                shared.watch_answer(&req, a).await;
                if wait.is_zero() {
                    // A server timeout too short to hold a poll: poll.
                    tokio::select! {
                        () = crate::stopped(&mut shutdown) => return,
                        () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    }
                }
            }
            Err(e) => {
                tracing::debug!(code = %e.code, "server watch failed; retrying");
                if e.code != protocol::code::UNAVAILABLE && !req.end.is_empty() {
                    tracing::warn!(code = %e.code, "the server refused to end the tasks of a deleted entry");
                } else {
                    shared.retry_orphans(req.end);
                }
                tokio::select! {
                    () = crate::stopped(&mut shutdown) => return,
                    () = tokio::time::sleep(retry) => {}
                    () = shared.upstream.returned() => {}
                }
                retry = backoff(retry, shared.timing.retry_max);
            }
        }
    }
}

/// Completes when `shutdown` turns true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Syncs the entries at start and every interval; a failure keeps the last
/// good set (and shows in health).
async fn sync_loop(shared: Arc<state::Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        match shared.sync_entries().await {
            Ok(n) => tracing::debug!(entries = n, "entries synced"),
            Err(e) => {
                tracing::warn!(code = %e.code, "entry sync failed; keeping the last good set")
            }
        }
        tokio::select! {
            () = crate::stopped(&mut shutdown) => return,
            () = tokio::time::sleep(shared.timing.sync_interval) => {}
        }
    }
}
