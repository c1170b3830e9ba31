//! The command line. `dev` and `server` run the broker; every other command
//! is a client of the `/v1` API (`KEYMINT_ADDR`, `KEYMINT_TOKEN`).
//!
//! The binary is the edge: the only place that reads the environment (through
//! clap) and the wall clock (by constructing `SystemClock`).
//!
//! This file holds the top-level [`Command`], the [`ClientOpts`] every
//! client command shares, and the dispatch; each command group lives beside
//! it with its clap types and its `run` (`task`, `lease`, `audit`,
//! `upstream`, `approval`, `entry`, `policy`, `report`, `admin` for `database` and
//! `ssh`, `server` for `dev`/`server`/`proxy`, `run`, `agent`, `scan`,
//! `bench`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use keymint_client::{Client, ClientError, encode};

use crate::output::Format;

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
        Ok(Client::with_tls(&self.addr, self.token()?, &self.tls())?)
    }

    /// Whether the caller proves a workload identity: a workload JWT, a
    /// task token, or no token at all (an mTLS SVID or the local socket),
    /// as opposed to an admin, operator or node token (`kma_`).
    pub fn carries_identity(&self) -> anyhow::Result<bool> {
        Ok(!self.token()?.is_some_and(|t| t.starts_with("kma_")))
    }

    fn token(&self) -> anyhow::Result<Option<String>> {
        Ok(match (&self.token, &self.token_file) {
            (_, Some(f)) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read token file `{}`", f.display()))?
                    .trim()
                    .to_owned(),
            ),
            (Some(t), None) => Some(t.trim().to_owned()),
            (None, None) => None,
        })
    }

    /// The bearer token given (flag, file or environment), if any.
    pub fn bearer(&self) -> anyhow::Result<Option<String>> {
        self.token()
    }

    /// A client that sends no bearer token (the OAuth endpoints take their
    /// tokens in the form), with the same address and TLS.
    pub fn anonymous_client(&self) -> anyhow::Result<Client> {
        Ok(Client::with_tls(&self.addr, None, &self.tls())?)
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
    Task(crate::task::TaskCmd),
    /// Issue, list, renew and revoke leases.
    #[command(subcommand)]
    Lease(crate::lease::LeaseCmd),
    /// Read and verify the audit trail.
    #[command(subcommand)]
    Audit(crate::audit::AuditCmd),
    /// Run a command with credentials that exist for its run only.
    Run(crate::run::RunArgs),
    /// Run the node agent: attest local processes on a Unix socket and
    /// fetch, refresh and deliver their credentials on their behalf.
    Agent(crate::agent::AgentArgs),
    /// Upstreams of the egress proxy: set a provider key, list them.
    #[command(subcommand)]
    Upstream(crate::upstream::UpstreamCmd),
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
    /// keymint as an OIDC issuer: rotate its signing keys.
    #[command(subcommand)]
    Issuer(crate::admin::IssuerCmd),
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
    /// The credential inventory: every key keymint holds, issued or found,
    /// with owners, expiry, where it was seen, and its findings.
    #[command(subcommand)]
    Inventory(crate::inventory::InventoryCmd),
    /// OAuth access tokens: exchange yours for one to a resource,
    /// introspect, revoke.
    #[command(subcommand)]
    Token(crate::token::TokenCmd),
    /// What misuse monitoring suspended (tasks, workloads, upstream keys);
    /// lift a suspension.
    #[command(subcommand)]
    Suspensions(crate::suspensions::SuspensionsCmd),
    /// Validate and test Cedar policies; show or reload the server's.
    #[command(subcommand)]
    Policy(crate::policy::PolicyCmd),
    /// The compliance report: live state against OWASP NHI and Agentic Top
    /// 10, NIST AI RMF (AI 600-1) and NIST CSF 2.0, as HTML, JSON or Markdown.
    Report(crate::report::ReportArgs),
    /// Find leaked AI keys and other secrets in files, git history, images,
    /// exports and process environments.
    Scan(crate::scan::ScanCmd),
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
    front_threads();
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
            // The reader of the output went away (`| head`): nothing to
            // say, as for `SIGPIPE` (see `quiet_on_a_closed_pipe`).
            let closed_pipe = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            });
            if closed_pipe {
                return ExitCode::from(141);
            }
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// How many per-core runtimes serve the plain-HTTP listeners
/// (`KEYMINT_FRONT_THREADS`; docs/design/0029, "Seventh pass").
fn front_threads() {
    #[expect(
        clippy::disallowed_methods,
        reason = "configuration is read here, at the edge, and handed to the server"
    )]
    let var = std::env::var("KEYMINT_FRONT_THREADS").ok();
    keymint_server::set_front_threads(var.as_deref());
}

/// Logs on standard error: `KEYMINT_LOG` filters (default `info` for a
/// server, `warn` otherwise); `KEYMINT_LOG_FORMAT=json` writes one JSON
/// object per line (for a log collector); colours only on a terminal, so
/// that a log file, a pipe or journald gets no escape sequences.
fn init_tracing(server: bool) {
    use std::io::IsTerminal;
    let default = if server { "info" } else { "warn" };
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("KEYMINT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // tokio-postgres logs at debug the text of every statement batch and
    // the values of every statement's parameters: keymint's `CREATE ROLE`
    // carries the new user's SCRAM verifier, an admin password rotation
    // the admin's (DESIGN.md invariant 4). Held at info unless
    // `KEYMINT_LOG` names it itself.
    #[expect(
        clippy::disallowed_methods,
        reason = "configuration is read here, at the edge"
    )]
    let names_postgres = std::env::var("KEYMINT_LOG").is_ok_and(|v| v.contains("tokio_postgres"));
    if !names_postgres && let Ok(d) = "tokio_postgres=info".parse() {
        filter = filter.add_directive(d);
    }
    #[expect(
        clippy::disallowed_methods,
        reason = "configuration is read here, at the edge"
    )]
    let json = std::env::var("KEYMINT_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    // A line that cannot be written (its disk is full) is dropped: the
    // library's report of the failure goes to standard error with
    // `eprintln!`, which panics when that is what failed, killing the
    // request or worker that logged.
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .with_target(false);
    let _ = if json {
        fmt.json().flatten_event(true).try_init()
    } else {
        fmt.with_ansi(std::io::stderr().is_terminal()).try_init()
    };
}

async fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Dev { data_dir, listen } => crate::server::dev(&data_dir, listen).await,
        Command::Server { config } => crate::server::server(&config).await,
        Command::Task(c) => crate::task::run(c).await,
        Command::Lease(c) => crate::lease::run(c).await,
        Command::Audit(c) => crate::audit::run(c).await,
        Command::Bench(c) => crate::bench::run(c).await,
        Command::Run(a) => crate::run::run(a).await,
        Command::Agent(a) => crate::agent::run(a).await,
        Command::Scan(c) => crate::scan::run_and_report(c).await,
        Command::Policy(c) => crate::policy::run(c).await,
        Command::Token(c) => crate::token::run(c).await,
        Command::Approval(c) => crate::approval::run(c).await,
        Command::Upstream(c) => crate::upstream::run(c).await,
        Command::Entry(c) => crate::entry::run(c).await,
        Command::Inventory(c) => crate::inventory::run(c).await,
        Command::Report(a) => crate::report::run(a).await,
        Command::Suspensions(c) => crate::suspensions::run(c).await,
        Command::Proxy { config, listen } => crate::server::proxy(&config, listen).await,
        Command::Database(c) => crate::admin::database(c).await,
        Command::Ssh(c) => crate::admin::ssh(c).await,
        Command::Issuer(c) => crate::admin::issuer(c).await,
    }
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

pub(crate) fn query(pairs: &[(&str, Option<String>)]) -> String {
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
