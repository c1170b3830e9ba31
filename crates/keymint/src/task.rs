//! `keymint task`: start, end, revoke, list and show tasks, and keep one
//! alive by heartbeat.

use std::process::ExitCode;

use clap::Subcommand;
use keymint_client::encode;
use keymint_core::duration::parse_secs;
use keymint_proto::{EndStatus, EndTask, IssueLease, IssuedLease, List, StartTask, Task};

use crate::cli::{ClientOpts, api_err, query};
use crate::lease::print_issued;
use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum TaskCmd {
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
    /// List tasks, newest first.
    List {
        /// Only tasks with this status: active, completed, failed,
        /// timed_out or revoked.
        #[arg(long)]
        status: Option<String>,
        /// Only the tasks of this workload.
        #[arg(long)]
        workload: Option<String>,
        /// Only the tasks of this role.
        #[arg(long)]
        role: Option<String>,
        /// Only the sub-tasks of this task.
        #[arg(long)]
        parent: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Show one task.
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

pub async fn run(cmd: TaskCmd) -> anyhow::Result<ExitCode> {
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
                if opts.format() == Format::Json {
                    output::json(
                        &serde_json::json!({"task": t, "lease": issued.lease, "credential": issued.credential}),
                    );
                } else {
                    println!("task     {}", t.id);
                    print_issued(opts.format(), &issued);
                }
            } else {
                output::task(opts.format(), &t);
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
            let (t, headers): (Task, _) = opts
                .client()?
                .post_with_headers(
                    &format!("/v1/tasks/{}/end", encode(&id)),
                    &EndTask { status, reason },
                )
                .await
                .map_err(api_err)?;
            say_if_already_ended(&t, &headers);
            output::task(opts.format(), &t);
        }
        TaskCmd::Revoke { id, opts } => {
            let (t, headers): (Task, _) = opts
                .client()?
                .post_with_headers(
                    &format!("/v1/tasks/{}/revoke", encode(&id)),
                    &serde_json::json!({}),
                )
                .await
                .map_err(api_err)?;
            say_if_already_ended(&t, &headers);
            output::task(opts.format(), &t);
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
            output::tasks(opts.format(), &l.items);
        }
        TaskCmd::Show { id, opts } => {
            let t: Task = opts
                .client()?
                .get(&format!("/v1/tasks/{}", encode(&id)))
                .await
                .map_err(api_err)?;
            output::task(opts.format(), &t);
        }
        TaskCmd::Heartbeat { id, opts } => {
            let t: Task = opts
                .client()?
                .post_empty(&format!("/v1/tasks/{}/heartbeat", encode(&id)))
                .await
                .map_err(api_err)?;
            output::task(opts.format(), &t);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The server answered an end or a revocation of a task that had already
/// ended so (`Keymint-Already-Ended: true`): nothing changed, and the
/// person is told so on stderr (stdout stays the task, for scripts). An
/// end with another status is refused by the server (409, naming the
/// status the task has) and exits non-zero.
fn say_if_already_ended(t: &Task, headers: &http::HeaderMap) {
    if headers
        .get("keymint-already-ended")
        .is_some_and(|v| v.as_bytes() == b"true")
    {
        eprintln!(
            "task `{}` had already ended as `{}`; nothing changed",
            t.id,
            t.status.as_str()
        );
    }
}
