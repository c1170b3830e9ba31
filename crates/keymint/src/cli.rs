//! The command line. `dev` and `server` run the broker; every other command
//! is a client of the `/v1` API (`KEYMINT_ADDR`, `KEYMINT_TOKEN`).
//!
//! This is the edge: the only place that reads the environment (through
//! clap) and the wall clock (by constructing `SystemClock`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use keymint_client::{Client, ClientError, encode};
use keymint_core::SystemClock;
use keymint_core::audit::{self, AuditEvent, ChainReport};
use keymint_core::duration::parse_secs;
use keymint_proto::{
    EndStatus, EndTask, IssueLease, IssuedLease, Lease, List, RenewLease, Renewed, RevokeLeases,
    Revoked, StartTask, Task,
};
use keymint_server::config::Config;

use crate::output::{self, Format};

#[derive(Debug, Parser)]
#[command(
    name = "keymint",
    version,
    about = "Short-lived, identity-bound, task-scoped credentials for AI agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args, Clone)]
pub struct ClientOpts {
    /// keymint server address.
    #[arg(
        long,
        env = "KEYMINT_ADDR",
        default_value = "http://127.0.0.1:8200",
        global = true
    )]
    addr: String,
    /// Bearer token (admin `kma_...` or task `kmt_...`).
    #[arg(long, env = "KEYMINT_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Read the bearer token from a file instead (wins over `KEYMINT_TOKEN`).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// Output for people (table) or scripts (json).
    #[arg(long, short = 'o', value_enum, default_value = "table", global = true)]
    output: Format,
    /// For https://: trust this CA (PEM) instead of the Mozilla roots.
    #[arg(long, env = "KEYMINT_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// For mTLS: present this client certificate (PEM; an X.509-SVID).
    #[arg(
        long,
        env = "KEYMINT_CLIENT_CERT",
        global = true,
        requires = "client_key"
    )]
    client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(
        long,
        env = "KEYMINT_CLIENT_KEY",
        global = true,
        requires = "client_cert"
    )]
    client_key: Option<PathBuf>,
}

impl ClientOpts {
    pub fn format(&self) -> Format {
        self.output
    }

    pub fn client(&self) -> anyhow::Result<Client> {
        let token = match (&self.token, &self.token_file) {
            (_, Some(f)) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read token file `{}`", f.display()))?
                    .trim()
                    .to_owned(),
            ),
            (Some(t), None) => Some(t.trim().to_owned()),
            (None, None) => None,
        };
        Ok(Client::with_tls(&self.addr, token, &self.tls())?)
    }

    /// Whether a bearer token was given (flag, file or environment).
    pub fn has_token(&self) -> bool {
        self.token.is_some() || self.token_file.is_some()
    }

    /// The TLS settings for an https:// server.
    pub fn tls(&self) -> keymint_client::TlsOptions {
        keymint_client::TlsOptions {
            ca_file: self.ca_file.clone(),
            cert_file: self.client_cert.clone(),
            key_file: self.client_key.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run keymint for development: embedded store in a data folder, generated keys, a sample role.
    Dev {
        /// Where keymint keeps its store, keys and audit file.
        #[arg(long, default_value = "./keymint-data")]
        data_dir: PathBuf,
        /// Address to listen on (loopback only).
        #[arg(long, default_value = "127.0.0.1:8200")]
        listen: SocketAddr,
    },
    /// Run the keymint server from a configuration file.
    Server {
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
    /// Start, end, list and show tasks.
    #[command(subcommand)]
    Task(TaskCmd),
    /// Issue, list, renew and revoke leases.
    #[command(subcommand)]
    Lease(LeaseCmd),
    /// Read and verify the audit trail.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Run a command with credentials that exist for its run only.
    Run(crate::run::RunArgs),
    /// Run the node agent: attest local processes on a Unix socket and
    /// fetch, refresh and deliver their credentials on their behalf.
    Agent(crate::agent::AgentArgs),
    /// Upstreams of the egress proxy: set a provider key, list them.
    #[command(subcommand)]
    Upstream(UpstreamCmd),
    /// Run the egress proxy alone (`/proxy/...`, `/v1/health`, `/metrics`;
    /// no `/v1` API) from a configuration file.
    Proxy {
        #[arg(long, short = 'c')]
        config: PathBuf,
        /// Listen here instead of `server.listen` (loopback only).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Manage keymint's own admin credentials on databases.
    #[command(subcommand)]
    Database(crate::admin::DatabaseCmd),
    /// SSH certificate authorities: public keys and revocation lists.
    #[command(subcommand)]
    Ssh(crate::admin::SshCmd),
    /// Load tools for the figures in docs/benchmarks.md.
    #[command(subcommand)]
    Bench(crate::bench::BenchCmd),
    /// Requests that policy held for a human: list, show, approve, deny,
    /// redeem.
    #[command(subcommand)]
    Approval(crate::approval::ApprovalCmd),
    /// Registration entries: which processes on which node are which
    /// workload (for `keymint agent`).
    #[command(subcommand)]
    Entry(crate::entry::EntryCmd),
    /// Validate and test Cedar policies; show or reload the server's.
    #[command(subcommand)]
    Policy(crate::policy::PolicyCmd),
    /// Find leaked AI keys and other secrets in files, git history, images,
    /// exports and process environments.
    Scan(crate::scan::ScanCmd),
}

#[derive(Debug, Subcommand)]
enum TaskCmd {
    /// Start a task (or, with a task token, a sub-task of the caller's task).
    Start {
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        workload: Option<String>,
        #[arg(long)]
        intent: Option<String>,
        #[arg(long)]
        purpose: Option<String>,
        #[arg(long = "env")]
        environment: Option<String>,
        /// Time to live, e.g. 30m.
        #[arg(long, value_parser = parse_secs)]
        ttl: Option<u64>,
        /// End the task after this long without a heartbeat, e.g. 5m.
        #[arg(long, value_parser = parse_secs)]
        idle_timeout: Option<u64>,
        /// Narrow the scopes (repeat for several).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        #[arg(long)]
        parent: Option<String>,
        /// Also issue a credential and print it.
        #[arg(long)]
        issue: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// End a task as completed (or failed); revokes everything under it.
    End {
        id: String,
        #[arg(long)]
        failed: bool,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Revoke a task, its leases and its sub-tasks.
    Revoke {
        id: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        workload: Option<String>,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        parent: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        opts: ClientOpts,
    },
    Show {
        id: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Record activity on a task (resets its idle timeout).
    Heartbeat {
        id: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

#[derive(Debug, Subcommand)]
enum LeaseCmd {
    /// Issue a credential inside a task; prints the secret once.
    Issue {
        task: String,
        #[arg(long, value_parser = parse_secs)]
        ttl: Option<u64>,
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// For SSH roles: the OpenSSH public key file to certify.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// For SSH roles: a principal to certify (repeatable; default: all
        /// the role grants).
        #[arg(long = "principal")]
        principals: Vec<String>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    List {
        #[arg(long)]
        task: Option<String>,
        #[arg(long)]
        workload: Option<String>,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        opts: ClientOpts,
    },
    Show {
        id: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    Renew {
        id: String,
        #[arg(long, value_parser = parse_secs)]
        increment: Option<u64>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Revoke one lease, or every live lease of a task, workload or role.
    Revoke {
        id: Option<String>,
        #[arg(long, conflicts_with_all = ["id", "workload", "role"])]
        task: Option<String>,
        #[arg(long, conflicts_with_all = ["id", "task", "role"])]
        workload: Option<String>,
        #[arg(long, conflicts_with_all = ["id", "task", "workload"])]
        role: Option<String>,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

#[derive(Debug, Subcommand)]
enum UpstreamCmd {
    /// Set an upstream's provider key, read from a file or standard input
    /// (never from an argument). Stored sealed; never shown again.
    Set {
        name: String,
        /// The file holding the key (`-` or nothing: standard input).
        #[arg(long)]
        key_file: Option<PathBuf>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// List upstreams and whether each has a key.
    List {
        #[command(flatten)]
        opts: ClientOpts,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Show the newest audit events.
    Tail {
        #[arg(long, short = 'n', default_value_t = 20)]
        lines: u32,
        /// Keep printing new events.
        #[arg(long, short = 'f')]
        follow: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Check the hash chain: of a JSON-lines audit file (`--file`), or of
    /// the server's store. Exits 1 and names the first bad place if broken.
    Verify {
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // A scan is synchronous work on its own threads; it needs the runtime
    // only to report to a server.
    let cli = match cli.command {
        Command::Scan(cmd) if cmd.report_to.is_none() && !cmd.verify => {
            return keymint_scan::cli::run(&cmd.scan);
        }
        command => Cli { command },
    };
    init_tracing(matches!(
        cli.command,
        Command::Dev { .. } | Command::Server { .. } | Command::Proxy { .. } | Command::Agent(_)
    ));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            // A held request is not a failure, but nothing was granted yet:
            // exit 3 so that scripts can tell.
            if let Some(held @ ClientError::Held { .. }) = e.downcast_ref::<ClientError>() {
                eprintln!("{held}");
                return ExitCode::from(3);
            }
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing(server: bool) {
    let default = if server { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYMINT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

async fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Dev { data_dir, listen } => dev(&data_dir, listen).await,
        Command::Server { config } => {
            let config = Config::load(&config)?;
            serve(&config, false).await
        }
        Command::Task(c) => task(c).await,
        Command::Lease(c) => lease(c).await,
        Command::Audit(c) => audit_cmd(c).await,
        Command::Bench(c) => crate::bench::run(c).await,
        Command::Run(a) => crate::run::run(a).await,
        Command::Agent(a) => crate::agent::run(a).await,
        Command::Scan(c) => crate::scan::run_and_report(c).await,
        Command::Policy(c) => crate::policy::run(c).await,
        Command::Approval(c) => crate::approval::run(c).await,
        Command::Upstream(c) => upstream_cmd(c).await,
        Command::Entry(c) => crate::entry::run(c).await,
        Command::Proxy { config, listen } => {
            let mut config = Config::load(&config)?;
            if let Some(l) = listen {
                if !l.ip().is_loopback() {
                    bail!("plain HTTP is only served on loopback, not on `{l}`");
                }
                config.listen = l;
            }
            serve_proxy(&config).await
        }
        Command::Database(c) => crate::admin::database(c).await,
        Command::Ssh(c) => crate::admin::ssh(c).await,
    }
}

async fn dev(data_dir: &Path, listen: SocketAddr) -> anyhow::Result<ExitCode> {
    if !listen.ip().is_loopback() {
        bail!("`keymint dev` listens on loopback only, not on `{listen}`");
    }
    let config = Config::dev(data_dir, listen);
    keymint_server::write_sample_policy(data_dir)?;
    serve(&config, true).await
}

async fn serve(config: &Config, dev: bool) -> anyhow::Result<ExitCode> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on `{}`", config.listen))?;
    let (running, created) = keymint_server::start(config, Arc::new(SystemClock)).await?;
    let addr = listener.local_addr()?;
    #[cfg(unix)]
    {
        // SIGHUP reads the policy files again, like `keymint policy reload`.
        let broker = Arc::clone(&running.broker);
        if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    match broker.reload_policy_by("signal").await {
                        Ok(ids) => tracing::info!(policies = ids.len(), "policies reloaded"),
                        Err(e) => tracing::error!(error = %e, "policy reload refused"),
                    }
                }
            });
        }
    }
    if dev {
        let token_file = config.admin_token_file.display();
        eprintln!(
            "\nWARNING: keymint dev is for development only: plain HTTP, keys stored next to the data,\n\
             a sample role. Use `keymint server --config FILE` for anything else.\n"
        );
        eprintln!("keymint dev listening on http://{addr}");
        eprintln!(
            "  data:        {}{}",
            config.data_dir.display(),
            if created.root_key { " (new)" } else { "" }
        );
        eprintln!("  admin token: {token_file} (mode 0600)");
        eprintln!(
            "  audit file:  {}",
            config
                .audit_file
                .as_ref()
                .map_or("-".into(), |p| p.display().to_string())
        );
        eprintln!("  sample role: demo (engine token; scopes llm:chat llm:embeddings http:read)");
        eprintln!(
            "  policies:    {} (Cedar; edit, then `keymint policy reload`)",
            config.data_dir.join("policies").display()
        );
        eprintln!(
            "  node `dev`:  {} (the token `keymint agent --token-file` uses)\n",
            config.data_dir.join("node-dev.token").display()
        );
        eprintln!("Try:");
        eprintln!("  export KEYMINT_ADDR=http://{addr} KEYMINT_TOKEN=$(cat {token_file})");
        eprintln!("  keymint task start --role demo --workload my-agent --ttl 30m --issue");
        eprintln!("  keymint lease list");
        eprintln!(
            "  keymint task start --role demo --workload my-agent --env prod --intent 'delete old rows'   # held for a human"
        );
        eprintln!(
            "  keymint approval list --token-file {}",
            config.data_dir.join("approver.token").display()
        );
        eprintln!("  keymint audit tail");
        eprintln!(
            "  keymint audit verify --file {}\n",
            config
                .audit_file
                .as_ref()
                .map_or("audit.jsonl".into(), |p| p.display().to_string())
        );
    } else {
        match &config.tls {
            Some(t) => tracing::info!(
                %addr,
                mtls = t.client_ca_file.is_some(),
                "keymint server listening (TLS)"
            ),
            None => tracing::info!(%addr, "keymint server listening (plain HTTP on loopback)"),
        }
    }
    let shutdown = async {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
    };
    match &config.tls {
        Some(t) => {
            let acceptor = keymint_server::tls::acceptor(t)?;
            keymint_server::tls::serve(listener, acceptor, running.router.clone(), shutdown).await;
        }
        None => keymint_server::serve(listener, running.router.clone(), shutdown).await?,
    }
    // Use through the proxy since the last interval goes to the audit trail.
    running.proxy.flush().await;
    running.stop();
    tracing::info!("keymint stopped");
    Ok(ExitCode::SUCCESS)
}

/// `keymint proxy`: the broker core and the egress proxy, serving only the
/// proxy's routes (one process per data directory).
async fn serve_proxy(config: &Config) -> anyhow::Result<ExitCode> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on `{}`", config.listen))?;
    let (running, _) = keymint_server::start(config, Arc::new(SystemClock)).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, upstreams = config.upstreams.len(), "keymint proxy listening (plain HTTP on loopback)");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    keymint_server::serve(listener, running.proxy_router.clone(), shutdown).await?;
    running.proxy.flush().await;
    running.stop();
    Ok(ExitCode::SUCCESS)
}

async fn upstream_cmd(cmd: UpstreamCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        UpstreamCmd::Set {
            name,
            key_file,
            opts,
        } => {
            let key = read_key(key_file.as_deref())?;
            let body = zeroize::Zeroizing::new(
                serde_json::to_vec(&serde_json::json!({"key": key.trim()}))
                    .context("cannot encode the key")?,
            );
            let r = opts
                .client()?
                .raw(
                    http::Method::POST,
                    &format!("/v1/upstreams/{}/key", encode(&name)),
                    Some("application/json"),
                    body.to_vec(),
                )
                .await
                .map_err(api_err)?;
            if !r.status.is_success() {
                let p: keymint_proto::Problem = r.json().map_err(api_err)?;
                return Err(api_err(ClientError::Api(p)));
            }
            eprintln!("the key of upstream `{name}` is set (sealed; it is never shown again)");
        }
        UpstreamCmd::List { opts } => {
            let l: List<serde_json::Value> =
                opts.client()?.get("/v1/upstreams").await.map_err(api_err)?;
            if opts.output == Format::Json {
                output::json(&l.items);
            } else {
                println!("{:<20} {:<10} {:<8} BASE URL", "NAME", "KIND", "KEY");
                for u in &l.items {
                    println!(
                        "{:<20} {:<10} {:<8} {}",
                        u["name"].as_str().unwrap_or(""),
                        u["kind"].as_str().unwrap_or(""),
                        if u["key_set"].as_bool() == Some(true) {
                            "set"
                        } else {
                            "missing"
                        },
                        u["base_url"].as_str().unwrap_or("")
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A secret from a file, or from standard input when the path is absent or
/// `-`: never from an argument, where it would show in `ps` and history.
pub(crate) fn read_key(file: Option<&Path>) -> anyhow::Result<zeroize::Zeroizing<String>> {
    use std::io::Read;
    let mut key = zeroize::Zeroizing::new(String::new());
    match file {
        Some(f) if f != Path::new("-") => {
            std::fs::File::open(f)
                .and_then(|mut h| h.read_to_string(&mut key))
                .with_context(|| format!("cannot read key file `{}`", f.display()))?;
        }
        _ => {
            std::io::stdin()
                .read_to_string(&mut key)
                .context("cannot read the key from standard input")?;
        }
    }
    Ok(key)
}

pub(crate) fn api_err(e: ClientError) -> anyhow::Error {
    anyhow::Error::new(e)
}

fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

fn print_issued(fmt: Format, issued: &IssuedLease) {
    if fmt == Format::Json {
        return output::json(issued);
    }
    println!("lease    {}", issued.lease.id);
    println!("expires  {}", issued.lease.expires_at);
    match &issued.credential {
        keymint_proto::Credential::Bearer { token } => println!("token    {}", token.expose()),
        keymint_proto::Credential::Database {
            engine,
            host,
            port,
            database,
            username,
            password,
        } => {
            println!("engine   {engine}");
            println!("host     {host}:{port}");
            println!("database {database}");
            println!("username {username}");
            println!("password {}", password.expose());
        }
        keymint_proto::Credential::SshCertificate {
            certificate,
            serial,
            key_id,
            principals,
            valid_before,
            ..
        } => {
            println!("serial      {serial}");
            println!("key id      {key_id}");
            println!("principals  {}", principals.join(","));
            println!("valid until {valid_before} (Unix seconds)");
            println!("certificate {}", certificate.expose());
        }
    }
}

async fn task(cmd: TaskCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TaskCmd::Start {
            role,
            workload,
            intent,
            purpose,
            environment,
            ttl,
            idle_timeout,
            scopes,
            parent,
            issue,
            opts,
        } => {
            let c = opts.client()?;
            let req = StartTask {
                workload,
                role,
                intent,
                purpose,
                environment,
                ttl_secs: ttl,
                idle_timeout_secs: idle_timeout,
                scopes: if scopes.is_empty() {
                    None
                } else {
                    Some(scopes)
                },
                parent,
            };
            let t: Task = c.post("/v1/tasks", &req).await.map_err(api_err)?;
            if issue {
                let issued: IssuedLease = c
                    .post(
                        &format!("/v1/tasks/{}/leases", t.id),
                        &IssueLease::default(),
                    )
                    .await
                    .map_err(api_err)?;
                if opts.output == Format::Json {
                    output::json(
                        &serde_json::json!({"task": t, "lease": issued.lease, "credential": issued.credential}),
                    );
                } else {
                    println!("task     {}", t.id);
                    print_issued(opts.output, &issued);
                }
            } else {
                output::task(opts.output, &t);
            }
        }
        TaskCmd::End {
            id,
            failed,
            reason,
            opts,
        } => {
            let status = if failed {
                EndStatus::Failed
            } else {
                EndStatus::Completed
            };
            let t: Task = opts
                .client()?
                .post(
                    &format!("/v1/tasks/{}/end", encode(&id)),
                    &EndTask { status, reason },
                )
                .await
                .map_err(api_err)?;
            output::task(opts.output, &t);
        }
        TaskCmd::Revoke { id, opts } => {
            let t: Task = opts
                .client()?
                .post_empty(&format!("/v1/tasks/{}/revoke", encode(&id)))
                .await
                .map_err(api_err)?;
            output::task(opts.output, &t);
        }
        TaskCmd::List {
            status,
            workload,
            role,
            parent,
            limit,
            opts,
        } => {
            let q = query(&[
                ("status", status),
                ("workload", workload),
                ("role", role),
                ("parent", parent),
                ("limit", Some(limit.to_string())),
            ]);
            let l: List<Task> = opts
                .client()?
                .get(&format!("/v1/tasks{q}"))
                .await
                .map_err(api_err)?;
            output::tasks(opts.output, &l.items);
        }
        TaskCmd::Show { id, opts } => {
            let t: Task = opts
                .client()?
                .get(&format!("/v1/tasks/{}", encode(&id)))
                .await
                .map_err(api_err)?;
            output::task(opts.output, &t);
        }
        TaskCmd::Heartbeat { id, opts } => {
            let t: Task = opts
                .client()?
                .post_empty(&format!("/v1/tasks/{}/heartbeat", encode(&id)))
                .await
                .map_err(api_err)?;
            output::task(opts.output, &t);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn lease(cmd: LeaseCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        LeaseCmd::Issue {
            task,
            ttl,
            scopes,
            public_key,
            principals,
            opts,
        } => {
            let public_key = match public_key {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read `{}`", path.display()))?,
                ),
                None => None,
            };
            let req = IssueLease {
                ttl_secs: ttl,
                scopes: if scopes.is_empty() {
                    None
                } else {
                    Some(scopes)
                },
                public_key,
                principals: (!principals.is_empty()).then_some(principals),
            };
            let issued: IssuedLease = opts
                .client()?
                .post(&format!("/v1/tasks/{}/leases", encode(&task)), &req)
                .await
                .map_err(api_err)?;
            print_issued(opts.output, &issued);
        }
        LeaseCmd::List {
            task,
            workload,
            role,
            state,
            limit,
            opts,
        } => {
            let q = query(&[
                ("task", task),
                ("workload", workload),
                ("role", role),
                ("state", state),
                ("limit", Some(limit.to_string())),
            ]);
            let l: List<Lease> = opts
                .client()?
                .get(&format!("/v1/leases{q}"))
                .await
                .map_err(api_err)?;
            output::leases(opts.output, &l.items);
        }
        LeaseCmd::Show { id, opts } => {
            let l: Lease = opts
                .client()?
                .get(&format!("/v1/leases/{}", encode(&id)))
                .await
                .map_err(api_err)?;
            output::leases(opts.output, &[l]);
        }
        LeaseCmd::Renew {
            id,
            increment,
            opts,
        } => {
            let r: Renewed = opts
                .client()?
                .post(
                    &format!("/v1/leases/{}/renew", encode(&id)),
                    &RenewLease {
                        increment_secs: increment,
                    },
                )
                .await
                .map_err(api_err)?;
            if opts.output == Format::Json {
                output::json(&r);
            } else {
                output::leases(opts.output, &[r.lease]);
                if r.capped {
                    eprintln!(
                        "note: the renewal was capped by the role's maximum TTL or the task's end"
                    );
                }
            }
        }
        LeaseCmd::Revoke {
            id,
            task,
            workload,
            role,
            opts,
        } => {
            let c = opts.client()?;
            let leases = match id {
                Some(id) => vec![
                    c.post_empty::<Lease>(&format!("/v1/leases/{}/revoke", encode(&id)))
                        .await
                        .map_err(api_err)?,
                ],
                None => {
                    if task.is_none() && workload.is_none() && role.is_none() {
                        bail!("name a lease id, or one of --task, --workload, --role");
                    }
                    let r: Revoked = c
                        .post(
                            "/v1/leases/revoke",
                            &RevokeLeases {
                                task,
                                workload,
                                role,
                            },
                        )
                        .await
                        .map_err(api_err)?;
                    r.revoked
                }
            };
            output::leases(opts.output, &leases);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Verifies a JSON-lines audit file, streaming it line by line.
pub fn verify_file(path: &Path) -> anyhow::Result<ChainReport> {
    use std::io::BufRead;
    let f =
        std::fs::File::open(path).with_context(|| format!("cannot open `{}`", path.display()))?;
    let lines = std::io::BufReader::new(f).lines().map(|l| match l {
        Ok(l) => serde_json::from_str::<AuditEvent>(&l).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    });
    Ok(audit::verify(lines))
}

fn print_report(fmt: Format, r: &ChainReport, what: &str) -> ExitCode {
    if fmt == Format::Json {
        output::json(r);
    } else if let Some(p) = &r.problem {
        println!(
            "audit chain of {what} is BROKEN after {} good events: {p}",
            r.events
        );
    } else {
        println!(
            "audit chain of {what} is intact: {} events, head seq {} hash {}",
            r.events,
            r.last_seq.unwrap_or(0),
            r.last_hash.as_deref().unwrap_or("-")
        );
    }
    if r.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn audit_cmd(cmd: AuditCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCmd::Verify {
            file: Some(f),
            opts,
        } => {
            let r = verify_file(&f)?;
            Ok(print_report(opts.output, &r, &format!("`{}`", f.display())))
        }
        AuditCmd::Verify { file: None, opts } => {
            let r: ChainReport = opts
                .client()?
                .get("/v1/audit/verify")
                .await
                .map_err(api_err)?;
            Ok(print_report(opts.output, &r, "the server's store"))
        }
        AuditCmd::Tail {
            lines,
            follow,
            opts,
        } => {
            let c = opts.client()?;
            let l: List<AuditEvent> = c
                .get(&format!("/v1/audit?limit={}", lines.clamp(1, 1000)))
                .await
                .map_err(api_err)?;
            output::events(opts.output, &l.items);
            if !follow {
                return Ok(ExitCode::SUCCESS);
            }
            let mut after = l.items.last().map_or(0, |e| e.seq);
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                let l: List<AuditEvent> = c
                    .get(&format!("/v1/audit?after={after}&limit=1000"))
                    .await
                    .map_err(api_err)?;
                if let Some(last) = l.items.last() {
                    after = last.seq;
                    if opts.output == Format::Json {
                        output::events(opts.output, &l.items);
                    } else {
                        for e in &l.items {
                            output::events(Format::Json, std::slice::from_ref(e));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// clap's own consistency checks over every subcommand (unique argument
    /// names across flattened options, valid `requires`, …), which would
    /// otherwise only fire when that subcommand is run.
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory as _;
        super::Cli::command().debug_assert();
    }
}
