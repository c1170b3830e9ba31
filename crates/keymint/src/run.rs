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
//! Without a node agent, the task gets a short idle timeout (`--idle-timeout`,
//! 15 s by default) that `keymint run` heartbeats every third of it, so a
//! `keymint run` killed with SIGKILL leaves a task that ends within seconds.
//! CMD is started with `PR_SET_PDEATHSIG` (SIGKILL): it dies with its
//! supervisor instead of running on without credentials
//! (docs/design/0021-supervision-and-agent.md). Only CMD itself: processes
//! it started (a shell's, a server's workers) are reparented when it is
//! killed and run on, their credentials ended with the task. Nothing that
//! `keymint run` could do after a SIGKILL would reach them; a supervisor
//! that outlives it (systemd's `KillMode=control-group`, a container) does.
//!
//! The task is for the workload `--workload` names, or, without it, the one
//! the caller's identity proves (a workload JWT, a task token, an mTLS
//! SVID); an admin or operator token has none, so it must name one.
//!
//! With `--resource URI` (roles that issue `kmt_` task tokens), the task's
//! token is also exchanged at the token service (RFC 8693) for an OAuth
//! access token to that resource, which CMD gets as
//! `KEYMINT_ACCESS_TOKEN` (and the resource as `KEYMINT_ACCESS_TOKEN_RESOURCE`);
//! the token lives in the task, so it dies when CMD exits
//! (docs/design/0026-oauth-token-service.md). Through the node agent too:
//! the task token the agent fetched is the subject of the exchange, sent
//! to the token endpoint of the server `--addr` (`KEYMINT_ADDR`) names
//! (an anonymous endpoint: the subject token is the proof).
//!
//! When a node agent is listening (`--agent PATH`, else
//! `KEYMINT_AGENT_SOCKET`, else `/run/keymint/agent.sock` if it answers and
//! no token was given),
//! the task is started and the credential fetched over its socket instead:
//! `keymint run` is then whatever the agent attests it to be, with no token
//! of its own. The task belongs to that connection, so if `keymint run`
//! dies the agent ends it. When the agent restarts while CMD runs (which
//! closes the connection and does not end the task), `keymint run`
//! connects again and `attach`es the task, and ends it on the new
//! connection when CMD exits. The task has the idle timeout there too; the
//! agent heartbeats it while this connection owns it, so if the agent and
//! `keymint run` both die it ends within seconds
//! (docs/design/0012-node-agent.md).

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use keymint_core::duration::parse_secs;
use keymint_core::role::{EngineKind, UpstreamKind};
use keymint_proto::{Credential, EndStatus, EndTask, IssueLease, IssuedLease, StartTask, Task};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::ClientOpts;
use keymint_agent::client::{AgentClient, ClientError};
use keymint_agent::protocol::{FetchOp, Fetched, StartTaskOp, TaskResponse};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The role to issue from.
    #[arg(long)]
    role: String,
    /// Who the task is for (default: the workload the caller's identity
    /// proves; required with an admin or operator token).
    #[arg(long)]
    workload: Option<String>,
    /// End the task after this long without a heartbeat from `keymint run`
    /// (which sends one every third of it), e.g. 15s, 2m; 0 for none (the
    /// task then lives to its TTL if `keymint run` is killed).
    #[arg(long, value_parser = parse_secs, default_value = "15s")]
    idle_timeout: u64,
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
    /// Also hand CMD an OAuth access token for this resource (RFC 8707)
    /// as `KEYMINT_ACCESS_TOKEN`, exchanged from the task's token.
    #[arg(long)]
    resource: Option<String>,
    /// Scopes of that access token (default: all the role of the resource
    /// allows).
    #[arg(long = "resource-scope", requires = "resource")]
    resource_scopes: Vec<String>,
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
            tls,
        } if *engine == EngineKind::Postgres => env.extend(postgres_environment(
            host,
            *port,
            database,
            username,
            password.expose(),
            *tls,
        )),
        Credential::Database {
            engine,
            host,
            port,
            database,
            username,
            password,
            ..
        } if *engine == EngineKind::Mysql => env.extend(mysql_environment(
            host,
            *port,
            database,
            username,
            password.expose(),
        )),
        // The provider-native kinds: the variables each SDK reads
        // (AWS_*, OPENAI_*, ANTHROPIC_*, KEYMINT_JWT), from one mapping the
        // node agent's `env` delivery shares.
        c @ (Credential::Jwt { .. }
        | Credential::Aws { .. }
        | Credential::ApiKey { .. }
        | Credential::ProviderToken { .. }) => env.extend(
            c.sdk_environment()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v)),
        ),
        Credential::Database { .. } | Credential::SshCertificate { .. } => {}
    }
    env
}

/// A workload JWT in a file, for tools that read tokens from files (as
/// with `AWS_WEB_IDENTITY_TOKEN_FILE`): mode 0600 in a 0700 temporary
/// directory, removed when this is dropped (after the command exits).
#[derive(Debug)]
struct TokenFile {
    dir: std::path::PathBuf,
}

impl TokenFile {
    fn write(token: &str) -> anyhow::Result<(Self, Vec<(String, String)>)> {
        use std::io::Write as _;
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        #[allow(
            clippy::disallowed_methods,
            reason = "the binary's edge: where temporary files go"
        )]
        let tmp = std::env::temp_dir();
        let mut name = [0u8; 12];
        getrandom::fill(&mut name)
            .map_err(|_| anyhow::anyhow!("the random number generator failed"))?;
        let dir = tmp.join(format!("keymint-jwt-{}", hex::encode(name)));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create `{}`", dir.display()))?;
        let this = Self { dir };
        let path = this.dir.join("token");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create `{}`", path.display()))?;
        f.write_all(token.as_bytes())?;
        Ok((
            this,
            vec![("KEYMINT_JWT_FILE".to_owned(), path.display().to_string())],
        ))
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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

/// What libpq (`psql`, and the drivers built on it) reads: `PG*` and
/// `DATABASE_URL`. Where keymint reaches the server over TLS, so must the
/// user: `PGSSLMODE=require` and `sslmode=require` in the URL, so that a
/// client never falls back to clear text (libpq's default, `prefer`,
/// would). PostgreSQL cannot require TLS of one role; the operator's
/// `hostssl` lines can (docs/design/0025-database-tls-and-trust-domains.md).
fn postgres_environment(
    host: &str,
    port: u16,
    database: &str,
    username: &str,
    password: &str,
    tls: bool,
) -> Vec<(String, String)> {
    let enc = keymint_client::encode;
    let mut env = vec![
        ("PGHOST".to_owned(), host.to_owned()),
        ("PGPORT".to_owned(), port.to_string()),
        ("PGDATABASE".to_owned(), database.to_owned()),
        ("PGUSER".to_owned(), username.to_owned()),
        ("PGPASSWORD".to_owned(), password.to_owned()),
        (
            "DATABASE_URL".to_owned(),
            format!(
                "postgres://{}:{}@{host}:{port}/{}{}",
                enc(username),
                enc(password),
                enc(database),
                if tls { "?sslmode=require" } else { "" }
            ),
        ),
    ];
    if tls {
        env.push(("PGSSLMODE".to_owned(), "require".to_owned()));
    }
    env
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

/// The agent to use, and its socket: the one asked for (an error if it
/// does not answer), or the default socket when something answers there.
async fn agent_client(a: &RunArgs) -> anyhow::Result<Option<(AgentClient, PathBuf)>> {
    if let Some(p) = &a.agent {
        return Ok(Some((AgentClient::connect(p).await?, p.clone())));
    }
    // A caller that brings its own token means the server; the default
    // socket is for callers that have none.
    let default = std::path::Path::new(keymint_agent::config::DEFAULT_SOCKET);
    if a.opts.has_token() || !default.exists() {
        return Ok(None);
    }
    match AgentClient::connect(default).await {
        Ok(c) => Ok(Some((c, default.to_owned()))),
        Err(e) => {
            eprintln!("warning: {e}; using the server directly");
            Ok(None)
        }
    }
}

/// How long `keymint run` tries to reach a restarted agent to end its task
/// after CMD exited.
const AGENT_RETURN: Duration = Duration::from_secs(10);
/// Bounds one connect-and-call to a restarted agent.
const AGENT_CALL: Duration = Duration::from_secs(5);

/// Whether talking to the agent may work on another try (it is restarting,
/// or has not synced its entries yet), or the answer is final.
fn agent_retry(e: &ClientError) -> bool {
    match e {
        ClientError::Api(e) => matches!(e.code.as_str(), "unavailable" | "busy" | "internal"),
        _ => true,
    }
}

/// One connection to the agent at `path` and one call on it, bounded.
async fn agent_call(
    path: &Path,
    op: &str,
    fields: &serde_json::Value,
) -> Result<AgentClient, ClientError> {
    let attempt = async {
        let mut c = AgentClient::connect(path).await?;
        c.call::<serde_json::Value>(op, fields).await?;
        Ok(c)
    };
    tokio::time::timeout(AGENT_CALL, attempt)
        .await
        .unwrap_or(Err(ClientError::Closed))
}

/// While CMD runs: when the agent's connection closes (the agent stopped
/// or restarted), connects again and `attach`es the task, so that the
/// agent that runs now ends it if `keymint run` dies (an agent restart
/// does not end tasks, and a new agent does not know them). Returns the
/// connection when `stop` fires (CMD exited).
async fn keep_attached(
    mut agent: Option<AgentClient>,
    path: PathBuf,
    task: String,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Option<AgentClient> {
    let mut delay = Duration::from_millis(200);
    loop {
        if let Some(c) = agent.as_mut() {
            // No watch is open: the agent writes nothing unasked, so this
            // only returns when the connection ends.
            let lost = tokio::select! {
                _ = &mut stop => break,
                r = c.next() => r.is_err(),
            };
            if lost {
                eprintln!(
                    "warning: the keymint agent closed the connection of task `{task}`; \
                     connecting again"
                );
                agent = None;
            }
            continue;
        }
        tokio::select! {
            _ = &mut stop => break,
            () = tokio::time::sleep(delay) => {}
        }
        match agent_call(&path, "attach", &serde_json::json!({ "task": task })).await {
            Ok(c) => {
                eprintln!("keymint run: task `{task}` is attached to the keymint agent again");
                agent = Some(c);
                delay = Duration::from_millis(200);
            }
            Err(e) if agent_retry(&e) => delay = (delay * 2).min(Duration::from_secs(2)),
            Err(e) => {
                eprintln!("warning: the keymint agent refused to attach task `{task}` again: {e}");
                let _ = stop.await;
                return None;
            }
        }
    }
    agent
}

/// Ends the task through the agent: on the connection if it is still
/// there, else (the agent restarted meanwhile) on a new one, trying for
/// [`AGENT_RETURN`].
async fn end_via_agent(
    agent: Option<AgentClient>,
    path: &Path,
    task: &str,
    status: EndStatus,
) -> Result<(), ClientError> {
    let fields = serde_json::json!({"task": task, "status": status});
    let mut last = ClientError::Closed;
    if let Some(mut c) = agent {
        match c.call::<TaskResponse>("end_task", &fields).await {
            Ok(_) => return Ok(()),
            Err(e) if agent_retry(&e) => last = e,
            Err(e) => return Err(e),
        }
    }
    let deadline = tokio::time::Instant::now() + AGENT_RETURN;
    let mut delay = Duration::from_millis(100);
    while tokio::time::Instant::now() < deadline {
        match agent_call(path, "end_task", &fields).await {
            Ok(_) => return Ok(()),
            Err(e) if agent_retry(&e) => last = e,
            Err(e) => return Err(e),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
    Err(last)
}

/// `keymint run` through the node agent.
async fn run_via_agent(
    a: &RunArgs,
    mut agent: AgentClient,
    path: PathBuf,
) -> anyhow::Result<ExitCode> {
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
                // The agent heartbeats it while this connection owns it.
                idle_timeout_secs: (a.idle_timeout > 0).then_some(a.idle_timeout),
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
    // `--resource`: the agent's task token exchanged at the server's token
    // endpoint; the access token lives in the agent's task.
    if let Some(resource) = &a.resource {
        match access_token(a, &issued, resource).await {
            Ok(v) => env.extend(v),
            Err(e) => {
                let _ = end(&mut agent, &task.id, EndStatus::Failed).await;
                return Err(e);
            }
        }
    }
    // The task stays tied to this process through agent restarts.
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let attached = tokio::spawn(keep_attached(
        Some(agent),
        path.clone(),
        task.id.clone(),
        stopped,
    ));
    let status = spawn_and_wait(a, env, Vec::new()).await;
    let _ = stop.send(());
    let agent = attached.await.ok().flatten();
    let outcome = match &status {
        Ok(s) if s.success() => EndStatus::Completed,
        _ => EndStatus::Failed,
    };
    let ended = end_via_agent(agent, &path, &task.id, outcome).await;
    let status = status?;
    if let Err(e) = ended
        && !ended_before(
            matches!(&e, ClientError::Api(a) if a.code == "conflict"),
            &e,
            &task.id,
        )
    {
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
    if let Some((agent, path)) = agent_client(&a).await? {
        return run_via_agent(&a, agent, path).await;
    }
    let client = a.opts.client()?;
    // An admin or operator token proves no workload: the caller names it.
    if a.workload.is_none() && !a.opts.carries_identity()? {
        bail!(
            "name the workload the task is for with `--workload NAME`: an admin or \
             operator token proves none, and policy decides on it"
        );
    }
    let task: Task = match client
        .post(
            "/v1/tasks",
            &StartTask {
                workload: a.workload.clone(),
                role: Some(a.role.clone()),
                intent: a.intent.clone(),
                purpose: a.purpose.clone(),
                ttl_secs: a.ttl,
                idle_timeout_secs: (a.idle_timeout > 0).then_some(a.idle_timeout),
                scopes: if a.scopes.is_empty() {
                    None
                } else {
                    Some(a.scopes.clone())
                },
                ..StartTask::default()
            },
        )
        .await
    {
        Ok(t) => t,
        Err(e) => return Err(denial_context(e, &a)),
    };
    if a.workload.is_none() {
        eprintln!(
            "keymint run: task `{}` for workload `{}` (from the caller's identity) in role `{}`",
            task.id, task.workload, a.role
        );
    }
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

    // A workload JWT also goes to a file, for tools that read one.
    let mut _token_file = None;
    if let Credential::Jwt { token, .. } = &issued.credential {
        match TokenFile::write(token.expose()) {
            Ok((f, env)) => {
                _token_file = Some(f);
                extra_env.extend(env);
            }
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
    if let Some(resource) = &a.resource {
        match access_token(&a, &issued, resource).await {
            Ok(v) => env.extend(v),
            Err(e) => {
                let _ = end(EndStatus::Failed).await;
                return Err(e);
            }
        }
    }
    let heartbeat = tokio::spawn(heartbeat(client.clone(), task.id.clone(), a.idle_timeout));
    let status = spawn_and_wait(&a, env, extra_env).await;
    heartbeat.abort();
    let status = match status {
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
    if let Err(e) = end(outcome).await
        && !ended_before(e.code() == Some("conflict"), &e, &task.id)
    {
        eprintln!(
            "error: the task `{}` could not be ended ({e}); its credentials die at its TTL",
            task.id
        );
        return Ok(ExitCode::from(2));
    }
    Ok(exit_code(status))
}

/// Whether ending the task was refused because it had already ended
/// otherwise (revoked or timed out while the command ran: 409): it is
/// over all the same, so `keymint run` says so and exits as the command.
fn ended_before(conflict: bool, e: &dyn std::fmt::Display, task: &str) -> bool {
    if !conflict {
        return false;
    }
    eprintln!("keymint run: task `{task}` had already ended ({e})");
    true
}

/// `--resource`: the task's `kmt_` token exchanged for an access token to
/// the resource, as the environment CMD gets.
async fn access_token(
    a: &RunArgs,
    issued: &IssuedLease,
    resource: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let Credential::Bearer { token } = &issued.credential else {
        bail!(
            "`--resource` needs a role that issues task tokens (engine `token`); role `{}` does not",
            a.role
        );
    };
    let req = crate::token::ExchangeRequest::from_task_token(
        token.expose(),
        resource,
        a.resource_scopes.clone(),
    );
    let anonymous = a.opts.anonymous_client()?;
    match crate::token::exchange(&anonymous, &req).await? {
        Ok(v) => Ok(vec![
            (
                "KEYMINT_ACCESS_TOKEN".to_owned(),
                v["access_token"].as_str().unwrap_or_default().to_owned(),
            ),
            (
                "KEYMINT_ACCESS_TOKEN_RESOURCE".to_owned(),
                resource.to_owned(),
            ),
        ]),
        Err(approval) => bail!(
            "policy holds the access token for the resource for human approval (as \
             {approval}); `keymint run` does not wait: the task was ended"
        ),
    }
}

/// Says who was refused what, when policy refused to start the task.
fn denial_context(e: keymint_client::ClientError, a: &RunArgs) -> anyhow::Error {
    let who = match &a.workload {
        Some(w) => format!("workload `{w}`"),
        None => "the workload of the caller's identity".to_owned(),
    };
    match e.code() {
        Some("policy_denied") => anyhow::Error::new(e)
            .context(format!("policy refused {who} a task in role `{}`", a.role)),
        _ => e.into(),
    }
}

/// Keeps the task alive while the command runs: a heartbeat every third
/// of its idle timeout (none without one). A refused heartbeat means the
/// task has ended; the command runs on, but its credentials are dead.
async fn heartbeat(client: keymint_client::Client, task: String, idle_secs: u64) {
    if idle_secs == 0 {
        return;
    }
    let every = std::time::Duration::from_millis(idle_secs.saturating_mul(1000) / 3);
    // A heartbeat that takes longer than the gap is as good as lost.
    let client = client.with_timeout(every.max(std::time::Duration::from_millis(500)));
    let path = format!("/v1/tasks/{}/heartbeat", keymint_client::encode(&task));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut warned = false;
    loop {
        tick.tick().await;
        match client.post_empty::<Task>(&path).await {
            Ok(_) => warned = false,
            Err(e) if e.code() == Some("task_not_active") => {
                eprintln!(
                    "warning: the task `{task}` has ended; the command's credentials are revoked"
                );
                return;
            }
            Err(e) if !warned => {
                eprintln!("warning: heartbeat for task `{task}` failed ({e}); retrying");
                warned = true;
            }
            Err(_) => {}
        }
    }
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
    supervised::die_with_parent(&mut cmd);
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

/// The command dies with `keymint run`.
mod supervised {
    /// Has the child receive SIGKILL when `keymint run` dies
    /// (`PR_SET_PDEATHSIG`). The signal follows the death of the *thread*
    /// that spawned the child: `keymint run` spawns from the thread that
    /// runs `block_on` (the main thread), which lives as long as the
    /// process. If `keymint run` died between fork and `prctl`, the child
    /// sees another parent and exits at once instead of running
    /// unsupervised.
    #[expect(
        unsafe_code,
        reason = "pre_exec: the only way to set a flag in the child between fork and exec"
    )]
    pub(super) fn die_with_parent(cmd: &mut tokio::process::Command) {
        let parent = nix::unistd::getpid();
        // SAFETY: the closure runs in the forked child before exec and only
        // makes two system calls (prctl, getppid), both async-signal-safe;
        // it allocates nothing and takes no lock.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)?;
                // No allocation here (another thread may hold the
                // allocator's lock): an errno-only error.
                if nix::unistd::getppid() != parent {
                    return Err(nix::errno::Errno::ESRCH.into());
                }
                Ok(())
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_postgres_user_reached_over_tls_is_told_to_use_tls() {
        let get = |env: &[(String, String)], k: &str| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        };
        let pw = "QZKWJVBfakepassword";
        let env = postgres_environment("db.example", 5432, "app", "keymint_x", pw, true);
        assert_eq!(get(&env, "PGSSLMODE").as_deref(), Some("require"));
        assert_eq!(
            get(&env, "DATABASE_URL").as_deref(),
            Some("postgres://keymint_x:QZKWJVBfakepassword@db.example:5432/app?sslmode=require")
        );
        let env = postgres_environment("127.0.0.1", 5432, "app", "keymint_x", pw, false);
        assert_eq!(get(&env, "PGSSLMODE"), None);
        assert!(!get(&env, "DATABASE_URL").unwrap().contains("sslmode"));
    }
}
