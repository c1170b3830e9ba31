//! `keymint agent`: the node agent (docs/design/0012-node-agent.md). This
//! is the edge: arguments become a `keymint_agent::AgentConfig`, the wall
//! clock is `SystemClock`, and SIGINT/SIGTERM stop it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use keymint_agent::config::{DEFAULT_DELIVER_DIR, DEFAULT_SOCKET};
use keymint_agent::{Agent, AgentConfig, NodeCredential};
use keymint_core::SystemClock;

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The keymint server.
    #[arg(long, env = "KEYMINT_ADDR")]
    server: String,
    /// This node's `kma_` join token (`[[nodes]] token_file` on the server).
    #[arg(
        long,
        conflicts_with = "jwt_file",
        required_unless_present_any = ["jwt_file", "client_cert"]
    )]
    token_file: Option<PathBuf>,
    /// A JWT naming this node's identity, read again for every call (a
    /// projected Kubernetes service account token rotates under it).
    #[arg(long)]
    jwt_file: Option<PathBuf>,
    /// The workload socket (owner-only unless `--group`).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Let this group (a numeric gid) connect too: the socket is 0660.
    #[arg(long)]
    group: Option<u32>,
    /// Where credential files are delivered (a tmpfs; created 0711).
    #[arg(long, default_value = DEFAULT_DELIVER_DIR)]
    deliver_dir: PathBuf,
    /// Serve `GET /health` and `GET /ready` here (loopback only).
    #[arg(long)]
    health: Option<SocketAddr>,
    /// Seconds between entry syncs.
    #[arg(long, default_value_t = 10)]
    sync_interval: u64,
    /// For an https:// server: trust this CA (PEM) instead of the Mozilla roots.
    #[arg(long, env = "KEYMINT_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Present this client certificate (PEM): the node's X.509-SVID. With
    /// neither `--token-file` nor `--jwt-file`, it alone proves the node
    /// (`[[nodes]] identity` = its SPIFFE ID).
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Seconds one call to the server may take before it counts as
    /// unreachable.
    #[arg(long, default_value_t = 10)]
    server_timeout: u64,
}

pub async fn run(a: AgentArgs) -> anyhow::Result<ExitCode> {
    if let Some(h) = a.health
        && !h.ip().is_loopback()
    {
        bail!("the health endpoint is served on loopback only, not on `{h}`");
    }
    if a.sync_interval == 0 {
        bail!("`--sync-interval` must be at least 1 second");
    }
    let credential = match (&a.token_file, &a.jwt_file) {
        (Some(f), None) => NodeCredential::token_file(f)?,
        (None, Some(f)) => {
            // Read once now so that a wrong path fails at start.
            std::fs::metadata(f).with_context(|| format!("cannot read `{}`", f.display()))?;
            NodeCredential::JwtFile(f.clone())
        }
        (None, None) if a.client_cert.is_some() => NodeCredential::Svid,
        _ => bail!(
            "give exactly one of `--token-file` and `--jwt-file`, or a `--client-cert` (the node's SVID)"
        ),
    };
    if a.server_timeout == 0 {
        bail!("`--server-timeout` must be at least 1 second");
    }
    let mut config = AgentConfig::new(a.server, credential);
    config.socket = a.socket;
    config.group = a.group;
    config.deliver_dir = a.deliver_dir;
    config.health = a.health;
    config.timing.sync_interval = Duration::from_secs(a.sync_interval);
    config.server_timeout = Duration::from_secs(a.server_timeout);
    config.tls = keymint_client::TlsOptions {
        ca_file: a.ca_file,
        cert_file: a.client_cert,
        key_file: a.client_key,
    };
    let agent = Agent::start(config, Arc::new(SystemClock)).await?;
    if let Some(h) = agent.health_addr() {
        tracing::info!(addr = %h, "health endpoint listening");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("keymint agent stopping");
    agent.stop().await;
    Ok(ExitCode::SUCCESS)
}
