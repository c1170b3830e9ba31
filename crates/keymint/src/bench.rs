//! Load tools behind the figures in `docs/benchmarks.md`. Every loop is
//! bounded in count and time and talks to loopback only.

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use keymint_client::Client;
use keymint_core::model::{Lease, LeaseState, Task};
use keymint_core::{Clock, SystemClock};
use keymint_proto::{IssueLease, IssuedLease, StartTask};
use keymint_store::{SqliteStore, conformance};

#[derive(Debug, Args)]
pub struct Target {
    /// The server's address; several replicas of one deployment as a
    /// comma-separated list (the load is spread over them round robin).
    #[arg(long, env = "KEYMINT_ADDR", default_value = "http://127.0.0.1:8200")]
    addr: String,
    #[arg(long, env = "KEYMINT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
}

impl Target {
    /// One admin client per address of `--addr`.
    fn clients(&self) -> anyhow::Result<Vec<Client>> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)?.trim().to_owned(),
            (None, None) => {
                bail!("the admin token is needed (--token, --token-file or KEYMINT_TOKEN)")
            }
        };
        let clients = self
            .addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| Client::new(a, Some(token.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        if clients.is_empty() {
            bail!("`--addr` names no server");
        }
        Ok(clients)
    }
}

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Issue `kmt_` tokens through the HTTP API (durable lease + audit
    /// event each) and report throughput and latency.
    Issue {
        /// Requests in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// How long to run, e.g. 10s.
        #[arg(long, default_value = "10s", value_parser = keymint_core::duration::parse_secs)]
        duration: u64,
        /// Target request rate per second (open loop); default: as fast as possible.
        #[arg(long)]
        rate: Option<u64>,
        /// Stop after this many requests whatever the time.
        #[arg(long, default_value_t = 5_000_000)]
        max_requests: u64,
        /// Role to issue from.
        #[arg(long, default_value = "demo")]
        role: String,
        #[command(flatten)]
        target: Target,
    },
    /// Issue tokens by calling the broker in-process (no HTTP): the cost of
    /// the decision, the durable lease and the audit event alone.
    Broker {
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value = "10s", value_parser = keymint_core::duration::parse_secs)]
        duration: u64,
        /// An empty directory for the store.
        #[arg(long)]
        data_dir: PathBuf,
        /// Run without the audit file sink (events still go to the store).
        #[arg(long)]
        no_audit_file: bool,
    },
    /// Fill a fresh data directory with N active leases, start `keymint dev`
    /// on it, and time how long until it answers /v1/health.
    Restart {
        #[arg(long, default_value_t = 1_000_000)]
        leases: u64,
        #[arg(long)]
        data_dir: PathBuf,
        /// Loopback port for the server under test.
        #[arg(long, default_value_t = 18_299)]
        port: u16,
        /// Fill the PostgreSQL store of this configuration file instead
        /// (`[storage] backend = "postgres"`, an empty schema) and start
        /// `keymint server --config FILE`; `--port` must be its listener's.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Revocation propagation across replicas: for each sample, start a
    /// task and issue a token on one replica, check that every replica
    /// accepts it, end the task on that replica, and time until every
    /// other replica refuses the token. The replica that ends rotates.
    Revocation {
        /// Samples to take (each a task of its own).
        #[arg(long, default_value_t = 200)]
        samples: usize,
        /// Role to issue from.
        #[arg(long, default_value = "demo")]
        role: String,
        #[command(flatten)]
        target: Target,
    },
    /// Access tokens from the OAuth token endpoint per second (RFC 8693
    /// exchanges of one `kmt_` token: decision, durable lease, audit event,
    /// JWT signature each), next to the ceiling of the signature algorithm
    /// alone on this machine (signatures/s of keymint's signing key,
    /// measured first, in the same run).
    Oauth {
        /// The resource to ask tokens for (the `audience` of a `jwt` role).
        #[arg(long)]
        resource: String,
        /// A `token` role for the subject task.
        #[arg(long, default_value = "demo")]
        role: String,
        /// The algorithm of the resource's role (for the ceiling).
        #[arg(long, default_value = "ES256", value_parser = signing_alg)]
        alg: keymint_core::role::SigningAlg,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value = "10s", value_parser = keymint_core::duration::parse_secs)]
        duration: u64,
        #[command(flatten)]
        target: Target,
    },
    /// The cost of one Cedar decision with a generated, realistic policy
    /// set: per-role permits on workload tags, environments and TTLs,
    /// forbids, approval holds; a mix of allowed, denied and held queries.
    Policy {
        /// How many policies to generate (at least 100 for the figure).
        #[arg(long, default_value_t = 200)]
        policies: usize,
        /// How many decisions to time.
        #[arg(long, default_value_t = 50_000)]
        decisions: usize,
    },
}

pub async fn run(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCmd::Issue {
            concurrency,
            duration,
            rate,
            max_requests,
            role,
            target,
        } => issue(concurrency, duration, rate, max_requests, &role, &target).await,
        BenchCmd::Broker {
            concurrency,
            duration,
            data_dir,
            no_audit_file,
        } => broker(concurrency, duration, &data_dir, no_audit_file).await,
        BenchCmd::Restart {
            leases,
            data_dir,
            port,
            config,
        } => restart(leases, &data_dir, port, config.as_deref()).await,
        BenchCmd::Revocation {
            samples,
            role,
            target,
        } => revocation(samples, &role, &target).await,
        BenchCmd::Policy {
            policies,
            decisions,
        } => policy(policies, decisions),
        BenchCmd::Oauth {
            resource,
            role,
            alg,
            concurrency,
            duration,
            target,
        } => oauth(&resource, &role, alg, concurrency, duration, &target).await,
    }
}

/// A policy set of `n` policies shaped like a real deployment's: for each
/// of n/4 roles, a permit for a team's workloads on a tag, one for the
/// role's on-call in non-production, an approval hold for production and a
/// forbid on long TTLs.
fn policy_set(n: usize) -> String {
    let mut src = String::new();
    for i in 0..n.div_ceil(4) {
        src.push_str(&format!(
            "@id(\"team-{i}\") permit(principal, action in [Keymint::Action::\"start_task\", Keymint::Action::\"issue\", Keymint::Action::\"renew\"], resource == Keymint::Role::\"role-{i}\") \
             when {{ principal.hasTag(\"team\") && principal.getTag(\"team\") == \"team-{i}\" && context.ttl_secs <= 3600 }};\n\
             @id(\"oncall-{i}\") permit(principal == Keymint::Workload::\"oncall-{i}\", action, resource == Keymint::Role::\"role-{i}\") \
             when {{ context.environment != \"prod\" }};\n\
             @id(\"prod-hold-{i}\") @approval(\"required\") permit(principal, action == Keymint::Action::\"issue\", resource == Keymint::Role::\"role-{i}\") \
             when {{ context.environment == \"prod\" && context.scopes.contains(\"db:write\") }};\n\
             @id(\"no-long-{i}\") forbid(principal, action, resource == Keymint::Role::\"role-{i}\") \
             when {{ context.ttl_secs > 86400 || context.intent like \"*drop table*\" }};\n"
        ));
    }
    src
}

fn policy(n: usize, decisions: usize) -> anyhow::Result<ExitCode> {
    use keymint_policy::{
        Action, PolicySchema, PolicySet, Principal, Query, RequestFacts, RoleFacts, Verdict,
    };
    let schema = PolicySchema::new()?;
    let set = PolicySet::from_sources(
        &schema,
        &[(PathBuf::from("bench.cedar"), policy_set(n.max(4)))],
    )?;
    let roles = n.max(4).div_ceil(4);
    let query = |k: usize| {
        let role = k % roles;
        let team = if k.is_multiple_of(3) {
            (role + 1) % roles
        } else {
            role
        };
        Query {
            action: if k.is_multiple_of(5) {
                Action::Renew
            } else {
                Action::Issue
            },
            principal: Principal {
                id: format!("agent-{k}"),
                method: "jwt".into(),
                issuer: "https://ci.example".into(),
                attributes: [("team".to_owned(), format!("team-{team}"))].into(),
            },
            role: RoleFacts {
                name: format!("role-{role}"),
                engine: "token".into(),
                scopes: vec!["llm:chat".into(), "db:write".into()],
                max_ttl_secs: 3600,
            },
            context: RequestFacts {
                intent: "triage the queue".into(),
                environment: if k.is_multiple_of(7) {
                    "prod".into()
                } else {
                    "staging".into()
                },
                scopes: if k.is_multiple_of(2) {
                    vec!["db:write".into()]
                } else {
                    vec!["llm:chat".into()]
                },
                ttl_secs: 900,
                time: 1_800_000_000,
                ..RequestFacts::default()
            },
        }
    };
    let mut queries: Vec<Query> = (0..1024).map(query).collect();
    let mut counts = [0u64; 3];
    let mut lat = Vec::with_capacity(decisions);
    let t0 = std::time::Instant::now();
    for i in 0..decisions {
        let n = queries.len();
        let q = &mut queries[i % n];
        // A second later each time round: a new query, which the set
        // decides rather than answering from its kept decisions.
        q.context.time += 1;
        let s = std::time::Instant::now();
        let d = set.decide(q);
        lat.push(u64::try_from(s.elapsed().as_nanos()).unwrap_or(u64::MAX));
        counts[match d.verdict {
            Verdict::Allow => 0,
            Verdict::Deny => 1,
            Verdict::NeedsApproval => 2,
        }] += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    lat.sort_unstable();
    println!(
        "policy: {} policies, {decisions} decisions in {secs:.2}s ({:.0}/s on one thread); \
         per decision p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs; allow {}, deny {}, approval {}",
        set.ids().len(),
        decisions as f64 / secs,
        percentile(&lat, 0.50) as f64 / 1000.0,
        percentile(&lat, 0.99) as f64 / 1000.0,
        lat.last().copied().unwrap_or(0) as f64 / 1000.0,
        counts[0],
        counts[1],
        counts[2]
    );
    Ok(ExitCode::SUCCESS)
}

/// Starts the task a bench issues from, for `workload` with `role`.
async fn bench_task(
    c: &Client,
    workload: &str,
    role: &str,
    ttl_secs: u64,
    intent: &str,
) -> anyhow::Result<keymint_proto::Task> {
    Ok(c.post(
        "/v1/tasks",
        &StartTask {
            workload: Some(workload.into()),
            role: Some(role.into()),
            ttl_secs: Some(ttl_secs),
            intent: Some(intent.into()),
            ..StartTask::default()
        },
    )
    .await?)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn issue(
    concurrency: usize,
    duration: u64,
    rate: Option<u64>,
    max_requests: u64,
    role: &str,
    target: &Target,
) -> anyhow::Result<ExitCode> {
    let clients = target.clients()?;
    let client = clients[0].clone();
    let task = bench_task(&client, "bench", role, 3600, "keymint bench issue").await?;
    let path = format!("/v1/tasks/{}/leases", task.id);
    let concurrency = concurrency.clamp(1, 4096);
    let deadline = Instant::now() + Duration::from_secs(duration.clamp(1, 600));
    let issued = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(OnceLock::new());
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let (client, path, issued, errors, first_error) = (
            clients[w % clients.len()].clone(),
            path.clone(),
            Arc::clone(&issued),
            Arc::clone(&errors),
            Arc::clone(&first_error),
        );
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(16_384);
            let mut tick = rate.map(|r| {
                let per_worker = Duration::from_secs_f64(concurrency as f64 / r.max(1) as f64);
                let mut i = tokio::time::interval_at(
                    tokio::time::Instant::now() + per_worker.mul_f64(w as f64 / concurrency as f64),
                    per_worker,
                );
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                i
            });
            while Instant::now() < deadline {
                if issued.fetch_add(1, Ordering::Relaxed) >= max_requests {
                    break;
                }
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                let t0 = Instant::now();
                match client
                    .post::<_, IssuedLease>(&path, &IssueLease::default())
                    .await
                {
                    Ok(_) => lat.push(t0.elapsed().as_micros() as u64),
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_init(|| e.to_string());
                    }
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await?);
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let ok = all.len() as u64;
    println!(
        "issued {ok} tokens in {secs:.2}s with {concurrency} in flight{}{}: {:.0}/s; latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms; errors {}",
        rate.map_or(String::new(), |r| format!(" at a target of {r}/s")),
        if clients.len() > 1 {
            format!(" over {} replicas", clients.len())
        } else {
            String::new()
        },
        ok as f64 / secs,
        percentile(&all, 0.50) as f64 / 1000.0,
        percentile(&all, 0.90) as f64 / 1000.0,
        percentile(&all, 0.99) as f64 / 1000.0,
        all.last().copied().unwrap_or(0) as f64 / 1000.0,
        errors.load(Ordering::Relaxed),
    );
    if let Some(e) = first_error.get() {
        eprintln!("first error: {e}");
    }
    let _ = client
        .post::<_, serde_json::Value>(
            &format!("/v1/tasks/{}/end", task.id),
            &keymint_proto::EndTask {
                status: keymint_proto::EndStatus::Completed,
                reason: None,
            },
        )
        .await;
    Ok(ExitCode::SUCCESS)
}

/// An in-process run stops early after this many failed issuances: a
/// broken set-up shows as an error count, not as ten seconds of spinning.
const MAX_ERRORS: u64 = 1_000;

/// What one in-process run measured.
struct BrokerRun {
    /// Latency of each successful issuance, in µs, sorted.
    latencies: Vec<u64>,
    errors: u64,
    /// The first failure, as the broker described it.
    first_error: Option<String>,
    secs: f64,
}

async fn broker(
    concurrency: usize,
    duration: u64,
    dir: &std::path::Path,
    no_audit_file: bool,
) -> anyhow::Result<ExitCode> {
    let concurrency = concurrency.clamp(1, 4096);
    let run = broker_run(concurrency, duration, dir, no_audit_file).await?;
    let all = &run.latencies;
    println!(
        "broker in-process: issued {} tokens in {:.2}s with {concurrency} in flight: {:.0}/s; latency p50 {:.2} ms, p99 {:.2} ms; errors {}",
        all.len(),
        run.secs,
        all.len() as f64 / run.secs,
        percentile(all, 0.50) as f64 / 1000.0,
        percentile(all, 0.99) as f64 / 1000.0,
        run.errors,
    );
    if let Some(e) = &run.first_error {
        eprintln!("first error: {e}");
    }
    if all.is_empty() {
        bail!("no token was issued");
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts the broker of `keymint dev` on `dir` (which must not hold a
/// store yet) and issues tokens from the sample role `demo` for `duration`
/// seconds with `concurrency` issuances in flight.
async fn broker_run(
    concurrency: usize,
    duration: u64,
    dir: &std::path::Path,
    no_audit_file: bool,
) -> anyhow::Result<BrokerRun> {
    if dir.join("keymint.db").exists() {
        bail!(
            "`{}` already holds a store; give an empty directory",
            dir.display()
        );
    }
    // The same policy as `keymint dev` (the sample), so that a fresh
    // directory works and the decision costs what it costs over HTTP.
    keymint_server::write_sample_policy(dir)?;
    let mut config = keymint_server::config::Config::dev(dir, "127.0.0.1:0".parse()?);
    if no_audit_file {
        config.audit_file = None;
    }
    let (running, _) = keymint_server::start(&config, Arc::new(SystemClock)).await?;
    let b = Arc::clone(&running.broker);
    let admin = keymint_server::broker::Principal::Admin;
    let task = b
        .start_task(
            &admin,
            StartTask {
                workload: Some("bench".into()),
                role: Some("demo".into()),
                ttl_secs: Some(3600),
                ..StartTask::default()
            },
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(duration.clamp(1, 600));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(OnceLock::new());
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.clamp(1, 4096) {
        let (b, id, errors, first_error) = (
            Arc::clone(&b),
            task.id.clone(),
            Arc::clone(&errors),
            Arc::clone(&first_error),
        );
        workers.push(tokio::spawn(async move {
            let admin = keymint_server::broker::Principal::Admin;
            let mut lat = Vec::with_capacity(16_384);
            while Instant::now() < deadline {
                let t0 = Instant::now();
                match b.issue_lease(&admin, &id, IssueLease::default()).await {
                    Ok(_) => lat.push(t0.elapsed().as_micros() as u64),
                    Err(e) => {
                        first_error.get_or_init(|| e.to_string());
                        if errors.fetch_add(1, Ordering::Relaxed) >= MAX_ERRORS {
                            break;
                        }
                    }
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await?);
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort_unstable();
    running.stop();
    Ok(BrokerRun {
        latencies: all,
        errors: errors.load(Ordering::Relaxed),
        first_error: first_error.get().cloned(),
        secs,
    })
}

/// A memory figure of `/proc/PROC/status` in KiB: `field` is its name
/// with the colon (`VmRSS:`, `RssAnon:`), `proc` a pid or `self`.
pub(crate) fn status_kib(proc: &str, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{proc}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn restart(
    leases: u64,
    dir: &std::path::Path,
    port: u16,
    config: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    use keymint_server::config::{Config, StorageBackend};
    let pg = match config {
        Some(path) => {
            let c = Config::load(path)?;
            let StorageBackend::Postgres {
                options,
                password_file,
            } = c.storage
            else {
                bail!("`--config` is for a PostgreSQL store (`[storage] backend = \"postgres\"`)");
            };
            if c.listen.port() != port || !c.listen.ip().is_loopback() {
                bail!("the configuration's listener must be 127.0.0.1:{port} (`--port`)");
            }
            let mut options = *options;
            if let Some(f) = password_file {
                let text =
                    zeroize::Zeroizing::new(std::fs::read_to_string(&f).with_context(|| {
                        format!("cannot read `storage.password_file` `{}`", f.display())
                    })?);
                options = options.with_password(&zeroize::Zeroizing::new(
                    text.trim_end_matches(['\r', '\n']).to_owned(),
                ));
            }
            let store = keymint_store::PostgresStore::open(options).await?;
            let counts = keymint_store::Store::counts(&store).await?;
            if counts.tasks_active > 0 || counts.leases.iter().any(|(_, n)| *n > 0) {
                bail!(
                    "the PostgreSQL store already holds leases; give an empty schema or database"
                );
            }
            Some(store)
        }
        None => {
            if dir.join("keymint.db").exists() {
                bail!(
                    "`{}` already holds a store; give an empty directory",
                    dir.display()
                );
            }
            std::fs::create_dir_all(dir)?;
            None
        }
    };
    let now = SystemClock.now();
    let fill = Instant::now();
    {
        let sqlite = match pg {
            Some(_) => None,
            None => Some(SqliteStore::open(&dir.join("keymint.db"))?),
        };
        let tasks_n = (leases / 1000).max(1);
        let tasks: Vec<Task> = (0..tasks_n)
            .map(|_| conformance::task("bench", "demo", None, now, 7200))
            .collect();
        let mut i = 0u64;
        let mut first = true;
        while i < leases {
            let n = (leases - i).min(20_000);
            let batch: Vec<Lease> = (i..i + n)
                .map(|k| {
                    let t = &tasks[(k % tasks_n) as usize];
                    conformance::lease(t, LeaseState::Active, now, 3600 + k % 3600)
                })
                .collect();
            let ts = if first { tasks.clone() } else { Vec::new() };
            first = false;
            match (&sqlite, &pg) {
                (Some(s), _) => s.bulk_load_for_bench(ts, batch).await?,
                (None, Some(p)) => p.bulk_load_for_bench(ts, batch).await?,
                (None, None) => bail!("no store is open"),
            }
            i += n;
        }
    }
    drop(pg);
    println!(
        "filled {leases} active leases in {:.1}s",
        fill.elapsed().as_secs_f64()
    );

    let exe = std::env::current_exe().context("cannot find the keymint executable")?;
    let listen = format!("127.0.0.1:{port}");
    let t0 = Instant::now();
    let mut cmd = tokio::process::Command::new(exe);
    match config {
        Some(path) => cmd.arg("server").arg("--config").arg(path),
        None => cmd
            .args(["dev", "--data-dir"])
            .arg(dir)
            .args(["--listen", &listen]),
    };
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the keymint server")?;
    let client = Client::new(&format!("http://{listen}"), None)?;
    let ready = loop {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the server did not answer within 60 s");
        }
        if let Ok(h) = client.get::<keymint_proto::Health>("/v1/health").await
            && h.status == "ok"
        {
            break t0.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let pid = child.id().unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = status_kib(&pid.to_string(), "VmRSS:");
    println!(
        "restart with {leases} active leases: ready (first /v1/health 200, process start included) in {:.0} ms; resident memory 2 s later {} MiB",
        ready.as_secs_f64() * 1000.0,
        rss.map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0))
    );
    let _ = child.kill().await;
    Ok(ExitCode::SUCCESS)
}

/// How long one sample may wait for every replica to refuse the token.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(10);

/// Polls `path` with an ended task's token until the replica answers 401
/// and returns when that answer arrived.
async fn refused_at(c: Client, path: String, since: Instant) -> anyhow::Result<Instant> {
    loop {
        let r = c.raw(http::Method::GET, &path, None, Vec::new()).await?;
        match r.status.as_u16() {
            401 => return Ok(Instant::now()),
            200 => {}
            s => bail!("a replica answered {s} to a task token"),
        }
        if since.elapsed() > REFUSAL_DEADLINE {
            bail!(
                "a replica still accepted an ended task's token after {} s",
                REFUSAL_DEADLINE.as_secs()
            );
        }
    }
}

async fn revocation(samples: usize, role: &str, target: &Target) -> anyhow::Result<ExitCode> {
    let admins = target.clients()?;
    if admins.len() < 2 {
        bail!("`--addr` must name at least two replicas of one deployment");
    }
    let samples = samples.clamp(1, 10_000);
    // Per sample, until the last of the other replicas refused the token:
    // from the moment the end request was sent, and from its answer.
    let (mut from_sent, mut from_answer) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for i in 0..samples {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("stopped after 600 s with {i} samples");
        }
        let a = i % admins.len();
        let admin = &admins[a];
        let task = bench_task(
            admin,
            "bench-revocation",
            role,
            600,
            "keymint bench revocation",
        )
        .await?;
        let issued: IssuedLease = admin
            .post(
                &format!("/v1/tasks/{}/leases", task.id),
                &IssueLease::default(),
            )
            .await?;
        let token = issued.credential.secret().expose().to_owned();
        let path = format!("/v1/tasks/{}", task.id);
        let others: Vec<Client> = admins
            .iter()
            .enumerate()
            .filter(|(k, _)| *k != a)
            .map(|(_, c)| c.with_token(&token))
            .collect();
        // Every other replica accepts the live token (and caches it, so
        // what is measured is the invalidation, not a cold read).
        for c in &others {
            for _ in 0..2 {
                let r = c.raw(http::Method::GET, &path, None, Vec::new()).await?;
                if r.status.as_u16() != 200 {
                    bail!("a replica refused a live token ({})", r.status);
                }
            }
        }
        let sent = Instant::now();
        let _: keymint_proto::Task = admin
            .post(
                &format!("/v1/tasks/{}/end", task.id),
                &keymint_proto::EndTask {
                    status: keymint_proto::EndStatus::Completed,
                    reason: None,
                },
            )
            .await?;
        let answered = Instant::now();
        let polls: Vec<_> = others
            .into_iter()
            .map(|c| tokio::spawn(refused_at(c, path.clone(), sent)))
            .collect();
        let mut last = answered;
        for p in polls {
            last = last.max(p.await??);
        }
        from_sent.push(last.duration_since(sent).as_micros() as u64);
        from_answer.push(last.saturating_duration_since(answered).as_micros() as u64);
    }
    from_sent.sort_unstable();
    from_answer.sort_unstable();
    let ms = |v: &[u64], p: f64| percentile(v, p) as f64 / 1000.0;
    println!(
        "revocation across {} replicas, {samples} samples (the ending replica rotates): \
         refused on every other replica after the end was answered: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
         from the end request sent: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        admins.len(),
        ms(&from_answer, 0.50),
        ms(&from_answer, 0.99),
        ms(&from_answer, 1.0),
        ms(&from_sent, 0.50),
        ms(&from_sent, 0.99),
        ms(&from_sent, 1.0),
    );
    Ok(ExitCode::SUCCESS)
}

fn signing_alg(s: &str) -> Result<keymint_core::role::SigningAlg, String> {
    keymint_core::role::SigningAlg::ALL
        .into_iter()
        .find(|a| a.as_str() == s)
        .ok_or_else(|| "one of ES256, RS256, EdDSA".to_owned())
}

/// Signatures per second of `alg` with a key of keymint's issuer, signing
/// claims shaped like an access token's, on `threads` threads for `secs`.
fn signature_ceiling(
    alg: keymint_core::role::SigningAlg,
    threads: usize,
    secs: f64,
) -> anyhow::Result<f64> {
    let now = SystemClock.now();
    let mut keys = keymint_issuer::KeySet::default();
    keys.ensure(&[alg], now)?;
    let keys = Arc::new(keys);
    let mut claims = serde_json::Map::new();
    for (k, v) in [
        ("iss", "http://127.0.0.1:8200"),
        ("sub", "bench"),
        ("aud", "https://mcp.example/tools"),
        ("jti", "lea_01jbenchbenchbenchbenchbench"),
        ("client_id", "bench"),
        ("scope", "tools:read tools:write"),
        ("task_id", "tsk_01jbenchbenchbenchbenchbench"),
        ("role", "tools"),
    ] {
        claims.insert(k.into(), serde_json::Value::String(v.into()));
    }
    claims.insert("exp".into(), (now.unix_seconds() + 300).into());
    let claims = Arc::new(claims);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let handles: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let (keys, claims) = (Arc::clone(&keys), Arc::clone(&claims));
            std::thread::spawn(move || {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    for _ in 0..32 {
                        if keys.sign_typed(alg, "at+jwt", &claims, now).is_ok() {
                            n += 1;
                        }
                    }
                }
                n
            })
        })
        .collect();
    let mut total = 0u64;
    for h in handles {
        total += h
            .join()
            .map_err(|_| anyhow::anyhow!("a signing thread panicked"))?;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn oauth(
    resource: &str,
    role: &str,
    alg: keymint_core::role::SigningAlg,
    concurrency: usize,
    duration: u64,
    target: &Target,
) -> anyhow::Result<ExitCode> {
    // The ceiling first, so that the two do not share the CPU.
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let one = tokio::task::spawn_blocking(move || signature_ceiling(alg, 1, 3.0)).await??;
    let all = tokio::task::spawn_blocking(move || signature_ceiling(alg, cores, 3.0)).await??;
    println!(
        "{} signatures (keymint's issuer key, access-token claims): {one:.0}/s on one core, {all:.0}/s on {cores} cores",
        alg.as_str()
    );
    let clients = target.clients()?;
    let admin = clients[0].clone();
    let task = bench_task(&admin, "bench", role, 3600, "keymint bench oauth").await?;
    let issued: IssuedLease = admin
        .post(
            &format!("/v1/tasks/{}/leases", task.id),
            &IssueLease::default(),
        )
        .await?;
    let keymint_proto::Credential::Bearer { token } = &issued.credential else {
        bail!("role `{role}` does not issue task tokens (engine `token`)");
    };
    let body = format!(
        "grant_type={}&subject_token={}&subject_token_type={}&resource={}",
        keymint_client::encode("urn:ietf:params:oauth:grant-type:token-exchange"),
        keymint_client::encode(token.expose()),
        keymint_client::encode("urn:ietf:params:oauth:token-type:access_token"),
        keymint_client::encode(resource),
    );
    let concurrency = concurrency.clamp(1, 1024);
    let deadline = Instant::now() + Duration::from_secs(duration.clamp(1, 600));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(OnceLock::new());
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let anonymous = Client::new(clients[w % clients.len()].base(), None)?;
        let (body, errors, first_error) =
            (body.clone(), Arc::clone(&errors), Arc::clone(&first_error));
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(16_384);
            while Instant::now() < deadline {
                if errors.load(Ordering::Relaxed) >= MAX_ERRORS {
                    break;
                }
                let t0 = Instant::now();
                match anonymous
                    .raw(
                        http::Method::POST,
                        "/oauth/token",
                        Some("application/x-www-form-urlencoded"),
                        body.clone().into_bytes(),
                    )
                    .await
                {
                    Ok(r) if r.status == 200 => lat.push(t0.elapsed().as_micros() as u64),
                    Ok(r) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        // The server's RFC 6749 error (fixed strings).
                        first_error.get_or_init(|| format!("HTTP {}: {}", r.status, r.text()));
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_init(|| e.to_string());
                    }
                }
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for w in workers {
        lat.extend(w.await?);
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    let ok = lat.len() as f64;
    println!(
        "token endpoint: {} access tokens in {secs:.2}s with {concurrency} in flight: {:.0}/s \
         ({:.1}% of the one-core signature ceiling); latency p50 {:.2} ms, p99 {:.2} ms; errors {}",
        lat.len(),
        ok / secs,
        100.0 * ok / secs / one.max(1.0),
        percentile(&lat, 0.50) as f64 / 1000.0,
        percentile(&lat, 0.99) as f64 / 1000.0,
        errors.load(Ordering::Relaxed),
    );
    if let Some(e) = first_error.get() {
        eprintln!("first error: {e}");
    }
    let _ = admin
        .post::<_, serde_json::Value>(
            &format!("/v1/tasks/{}/end", task.id),
            &keymint_proto::EndTask {
                status: keymint_proto::EndStatus::Completed,
                reason: None,
            },
        )
        .await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 18: `keymint bench broker` on a fresh directory failed with
    /// "cannot read policy file `DIR/policies`", so the documented figures
    /// could not be reproduced.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_broker_bench_issues_tokens_on_a_fresh_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("bench");
        let run = broker_run(4, 1, &dir, false).await.unwrap();
        assert!(!run.latencies.is_empty());
        assert_eq!(run.errors, 0, "{:?}", run.first_error);
        assert!(dir.join("policies/sample.cedar").exists());
        // A directory that holds a store is refused, not reused.
        let again = broker_run(4, 1, &dir, false).await;
        assert!(again.is_err());
    }
}
