//! `keymint run --role ROLE -- CMD ARGS…`: one task for one command.
//!
//! Starts a task, issues one credential, and runs CMD with it in its
//! environment. The caller's own `KEYMINT_TOKEN` is never passed on. Signals
//! keymint receives are forwarded to CMD. When CMD exits, the task ends
//! (`completed`, or `failed` if CMD failed), which revokes everything issued
//! in it, and keymint exits with CMD's status.
//!
//! For a role that names an upstream of the egress proxy, CMD also gets what
//! the provider's SDK reads: `OPENAI_API_KEY`/`OPENAI_BASE_URL` or
//! `ANTHROPIC_API_KEY`/`ANTHROPIC_BASE_URL` (the key being the task's `kmt_`
//! token, the base URL the proxy), or `KEYMINT_PROXY_URL` for http upstreams.
//! For an openai or openrouter role the credential is the provider's own
//! key for this task: `OPENAI_API_KEY`/`OPENAI_BASE_URL` point at the
//! provider itself (and `OPENROUTER_API_KEY` for OpenRouter).
//!
//! When a node agent is listening (`--agent PATH`, else
//! `KEYMINT_AGENT_SOCKET`, else `/run/keymint/agent.sock` if it answers and
//! no token was given),
//! the task is started and the credential fetched over its socket instead:
//! `keymint run` is then whatever the agent attests it to be, with no token
//! of its own. The task belongs to that connection, so if `keymint run`
//! dies the agent ends it.

use std::process::{ExitCode, Stdio};

use anyhow::{Context, bail};
use clap::Args;
use keymint_core::duration::parse_secs;
use keymint_core::role::{EngineKind, UpstreamKind};
use keymint_proto::{Credential, EndStatus, EndTask, IssueLease, IssuedLease, StartTask, Task};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::ClientOpts;
use keymint_agent::client::AgentClient;
use keymint_agent::protocol::{FetchOp, Fetched, StartTaskOp, TaskResponse};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The role to issue from.
    #[arg(long)]
    role: String,
    /// Who the task is for (default: the command's name).
    #[arg(long)]
    workload: Option<String>,
    /// The task's time to live, e.g. 30m; the command is not stopped when
    /// it passes, but its credentials die.
    #[arg(long, value_parser = parse_secs)]
    ttl: Option<u64>,
    #[arg(long)]
    intent: Option<String>,
    #[arg(long)]
    purpose: Option<String>,
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// Use the node agent listening on this socket (default:
    /// `/run/keymint/agent.sock` when it answers and no token is given).
    #[arg(long, env = "KEYMINT_AGENT_SOCKET")]
    agent: Option<std::path::PathBuf>,
    /// Where CMD reaches the egress proxy (default: the server's address).
    #[arg(long, env = "KEYMINT_PROXY_URL")]
    proxy_url: Option<String>,
    #[command(flatten)]
    opts: ClientOpts,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// The environment a credential becomes for the command.
pub fn environment(task: &Task, issued: &IssuedLease) -> Vec<(String, String)> {
    let mut env = vec![
        ("KEYMINT_TASK_ID".to_owned(), task.id.clone()),
        ("KEYMINT_LEASE_ID".to_owned(), issued.lease.id.clone()),
    ];
    match &issued.credential {
        Credential::Bearer { token } => {
            env.push(("KEYMINT_TOKEN".into(), token.expose().to_owned()));
        }
        Credential::Database {
            engine,
            host,
            port,
            database,
            username,
            password,
        } if *engine == EngineKind::Postgres => {
            let enc = keymint_client::encode;
            env.extend([
                ("PGHOST".to_owned(), host.clone()),
                ("PGPORT".to_owned(), port.to_string()),
                ("PGDATABASE".to_owned(), database.clone()),
                ("PGUSER".to_owned(), username.clone()),
                ("PGPASSWORD".to_owned(), password.expose().to_owned()),
                (
                    "DATABASE_URL".to_owned(),
                    format!(
                        "postgres://{}:{}@{host}:{port}/{}",
                        enc(username),
                        enc(password.expose()),
                        enc(database)
                    ),
                ),
            ]);
        }
        Credential::Database {
            engine,
            host,
            port,
            database,
            username,
            password,
        } if *engine == EngineKind::Mysql => env.extend(mysql_environment(
            host,
            *port,
            database,
            username,
            password.expose(),
        )),
        Credential::ApiKey {
            provider,
            api_key,
            base_url,
            ..
        } => {
            // Both providers speak OpenAI's API: the openai SDK (and most
            // others) reads these two.
            env.extend(sdk_environment(
                UpstreamKind::Openai,
                base_url,
                api_key.expose(),
            ));
            if *provider == EngineKind::Openrouter {
                env.push(("OPENROUTER_API_KEY".into(), api_key.expose().to_owned()));
            }
        }
        Credential::Database { .. } | Credential::SshCertificate { .. } => {}
    }
    env
}

/// The SDK environment for a role that names a proxy upstream: the role
/// says which upstream and what kind it is.
pub fn upstream_environment(
    role: &keymint_proto::Role,
    proxy_base: &str,
    token: &str,
) -> Vec<(String, String)> {
    let Some(egress) = role.egress() else {
        return Vec::new();
    };
    let base = format!(
        "{}/proxy/{}",
        proxy_base.trim_end_matches('/'),
        keymint_client::encode(&egress.upstream)
    );
    sdk_environment(egress.upstream_kind, &base, token)
}

/// What a provider's SDK reads, for an upstream of `kind` at `base`.
fn sdk_environment(kind: UpstreamKind, base: &str, token: &str) -> Vec<(String, String)> {
    let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    match kind {
        UpstreamKind::Openai => vec![pair("OPENAI_API_KEY", token), pair("OPENAI_BASE_URL", base)],
        UpstreamKind::Anthropic => vec![
            pair("ANTHROPIC_API_KEY", token),
            pair("ANTHROPIC_BASE_URL", base),
        ],
        UpstreamKind::Http => vec![pair("KEYMINT_PROXY_URL", base)],
    }
}

/// What the `mysql`/`mariadb` clients and most drivers read: `MYSQL_HOST`,
/// `MYSQL_TCP_PORT`, `MYSQL_PWD` (the clients' own variables), `USER` and
/// `LOGNAME` (the clients' default user name, except when they run as
/// root, where it is always `root`: scripts should say `-u "$MYSQL_USER"`),
/// `MYSQL_USER`/`MYSQL_DATABASE` (read by many applications) and
/// `DATABASE_URL`.
fn mysql_environment(
    host: &str,
    port: u16,
    database: &str,
    username: &str,
    password: &str,
) -> Vec<(String, String)> {
    let enc = keymint_client::encode;
    vec![
        ("MYSQL_HOST".to_owned(), host.to_owned()),
        ("MYSQL_TCP_PORT".to_owned(), port.to_string()),
        ("MYSQL_PWD".to_owned(), password.to_owned()),
        ("MYSQL_USER".to_owned(), username.to_owned()),
        ("USER".to_owned(), username.to_owned()),
        ("LOGNAME".to_owned(), username.to_owned()),
        ("MYSQL_DATABASE".to_owned(), database.to_owned()),
        (
            "DATABASE_URL".to_owned(),
            format!(
                "mysql://{}:{}@{host}:{port}/{}",
                enc(username),
                enc(password),
                enc(database)
            ),
        ),
    ]
}

/// For an SSH role, a fresh key pair in a private temporary directory
/// (removed when it is dropped, after the command exits).
async fn ssh_identity(
    client: &keymint_client::Client,
    role: &str,
) -> anyhow::Result<Option<crate::ssh_identity::Identity>> {
    let roles: keymint_proto::List<keymint_proto::Role> = client.get("/v1/roles").await?;
    if !roles
        .items
        .iter()
        .any(|r| r.name == role && r.engine() == EngineKind::Ssh)
    {
        return Ok(None);
    }
    #[allow(
        clippy::disallowed_methods,
        reason = "the binary's edge: where temporary files go"
    )]
    let tmp = std::env::temp_dir();
    crate::ssh_identity::Identity::generate(&tmp).map(Some)
}

/// The agent to use: the one asked for (an error if it does not answer),
/// or the default socket when something answers there.
async fn agent_client(a: &RunArgs) -> anyhow::Result<Option<AgentClient>> {
    if let Some(p) = &a.agent {
        return Ok(Some(AgentClient::connect(p).await?));
    }
    // A caller that brings its own token means the server; the default
    // socket is for callers that have none.
    let default = std::path::Path::new(keymint_agent::config::DEFAULT_SOCKET);
    if a.opts.has_token() || !default.exists() {
        return Ok(None);
    }
    match AgentClient::connect(default).await {
        Ok(c) => Ok(Some(c)),
        Err(e) => {
            eprintln!("warning: {e}; using the server directly");
            Ok(None)
        }
    }
}

/// `keymint run` through the node agent.
async fn run_via_agent(a: &RunArgs, mut agent: AgentClient) -> anyhow::Result<ExitCode> {
    if a.workload.is_some() {
        eprintln!("warning: `--workload` is ignored through the agent: its entry decides");
    }
    let started: TaskResponse = agent
        .call(
            "start_task",
            &StartTaskOp {
                role: Some(a.role.clone()),
                intent: a.intent.clone(),
                purpose: a.purpose.clone(),
                ttl_secs: a.ttl,
                scopes: (!a.scopes.is_empty()).then(|| a.scopes.clone()),
                ..StartTaskOp::default()
            },
        )
        .await?;
    let task = started.task;
    let fetched: Result<Fetched, _> = agent
        .call(
            "fetch",
            &FetchOp {
                task: task.id.clone(),
                ..FetchOp::default()
            },
        )
        .await;
    async fn end(
        agent: &mut AgentClient,
        task: &str,
        status: EndStatus,
    ) -> Result<TaskResponse, keymint_agent::client::ClientError> {
        agent
            .call(
                "end_task",
                &serde_json::json!({"task": task, "status": status}),
            )
            .await
    }
    let fetched = match fetched {
        Ok(f) => f,
        Err(e) => {
            let _ = end(&mut agent, &task.id, EndStatus::Failed).await;
            return Err(e.into());
        }
    };
    let issued = IssuedLease {
        lease: fetched.lease,
        credential: fetched.credential,
    };
    let mut env = environment(&task, &issued);
    // A proxy role: what the provider's SDK reads (`--proxy-url` wins over
    // the agent's server address).
    if let (Some(route), Credential::Bearer { token }) = (&fetched.proxy, &issued.credential) {
        let base = match &a.proxy_url {
            Some(p) => format!(
                "{}/proxy/{}",
                p.trim_end_matches('/'),
                keymint_client::encode(&route.upstream)
            ),
            None => route.base_url.clone(),
        };
        env.extend(sdk_environment(route.kind, &base, token.expose()));
    }
    let status = match spawn_and_wait(a, env, Vec::new()).await {
        Ok(s) => s,
        Err(e) => {
            let _ = end(&mut agent, &task.id, EndStatus::Failed).await;
            return Err(e);
        }
    };
    let outcome = if status.success() {
        EndStatus::Completed
    } else {
        EndStatus::Failed
    };
    if let Err(e) = end(&mut agent, &task.id, outcome).await {
        eprintln!(
            "error: the task `{}` could not be ended ({e}); its credentials die at its TTL",
            task.id
        );
        return Ok(ExitCode::from(2));
    }
    Ok(exit_code(status))
}

pub async fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    if a.command.is_empty() {
        bail!("no command given (put it after `--`)");
    }
    if let Some(agent) = agent_client(&a).await? {
        return run_via_agent(&a, agent).await;
    }
    let client = a.opts.client()?;
    let Some(program) = a.command.first() else {
        bail!("no command given (put it after `--`)");
    };
    let workload = a.workload.clone().unwrap_or_else(|| {
        std::path::Path::new(program)
            .file_name()
            .map_or_else(|| program.clone(), |n| n.to_string_lossy().into_owned())
    });
    let task: Task = client
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some(workload),
                role: Some(a.role.clone()),
                intent: a.intent.clone(),
                purpose: a.purpose.clone(),
                ttl_secs: a.ttl,
                scopes: if a.scopes.is_empty() {
                    None
                } else {
                    Some(a.scopes.clone())
                },
                ..StartTask::default()
            },
        )
        .await?;
    let end = |status| {
        let (client, id) = (client.clone(), task.id.clone());
        async move {
            client
                .post::<_, Task>(
                    &format!("/v1/tasks/{id}/end"),
                    &EndTask {
                        status,
                        reason: None,
                    },
                )
                .await
        }
    };
    // SSH roles certify a key pair made here for the command.
    let identity = match ssh_identity(&client, &a.role).await {
        Ok(i) => i,
        Err(e) => {
            let _ = end(EndStatus::Failed).await;
            return Err(e);
        }
    };
    let public_key = match identity
        .as_ref()
        .map(crate::ssh_identity::Identity::public_key)
    {
        Some(Ok(k)) => Some(k),
        Some(Err(e)) => {
            let _ = end(EndStatus::Failed).await;
            return Err(e);
        }
        None => None,
    };
    let issued: IssuedLease = match client
        .post(
            &format!("/v1/tasks/{}/leases", task.id),
            &IssueLease {
                public_key,
                ..IssueLease::default()
            },
        )
        .await
    {
        Ok(i) => i,
        Err(e) => {
            let _ = end(EndStatus::Failed).await;
            return Err(e.into());
        }
    };
    let mut extra_env = Vec::new();
    if let (Some(id), Credential::SshCertificate { certificate, .. }) =
        (&identity, &issued.credential)
    {
        match id.write(certificate.expose()) {
            Ok(env) => extra_env = env,
            Err(e) => {
                let _ = end(EndStatus::Failed).await;
                return Err(e);
            }
        }
    }

    let mut env = environment(&task, &issued);
    if let Credential::Bearer { token } = &issued.credential {
        let roles: Result<keymint_proto::List<keymint_proto::Role>, _> =
            client.get("/v1/roles").await;
        match roles {
            Ok(l) => {
                if let Some(role) = l.items.iter().find(|r| r.name == a.role) {
                    let base = a.proxy_url.as_deref().unwrap_or(client.base());
                    env.extend(upstream_environment(role, base, token.expose()));
                }
            }
            Err(e) => eprintln!(
                "warning: cannot read role `{}` ({e}); no SDK environment set",
                a.role
            ),
        }
    }
    let status = match spawn_and_wait(&a, env, extra_env).await {
        Ok(s) => s,
        Err(e) => {
            let _ = end(EndStatus::Failed).await;
            return Err(e);
        }
    };
    let outcome = if status.success() {
        EndStatus::Completed
    } else {
        EndStatus::Failed
    };
    if let Err(e) = end(outcome).await {
        eprintln!(
            "error: the task `{}` could not be ended ({e}); its credentials die at its TTL",
            task.id
        );
        return Ok(ExitCode::from(2));
    }
    Ok(exit_code(status))
}

/// Runs the command with `env` (the caller's `KEYMINT_TOKEN` removed),
/// forwarding SIGINT, SIGTERM and SIGHUP, until it exits.
async fn spawn_and_wait(
    a: &RunArgs,
    env: Vec<(String, String)>,
    extra_env: Vec<(String, String)>,
) -> anyhow::Result<std::process::ExitStatus> {
    let Some(program) = a.command.first() else {
        bail!("no command given (put it after `--`)");
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&a.command[1..])
        .env_remove("KEYMINT_TOKEN")
        .envs(env)
        .envs(extra_env)
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{program}`"))?;
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(Pid::from_raw);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let status = loop {
        let forward = tokio::select! {
            s = child.wait() => break s?,
            _ = sigint.recv() => Signal::SIGINT,
            _ = sigterm.recv() => Signal::SIGTERM,
            _ = sighup.recv() => Signal::SIGHUP,
        };
        if let Some(pid) = pid {
            let _ = kill(pid, forward);
        }
    };
    Ok(status)
}

/// The command's exit code (128 + the signal that killed it).
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
