//! `keymint suspensions`: what misuse monitoring suspended (a task's
//! credentials, a workload's tasks, an upstream key), and lifting a
//! suspension (admin or operator token; docs/design/0033).

use std::process::ExitCode;

use clap::Subcommand;
use keymint_client::encode;
use keymint_core::monitor::Suspension;
use keymint_proto::List;

use crate::cli::{ClientOpts, api_err};
use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum SuspensionsCmd {
    /// The active suspensions (with `--all`, the lifted ones too).
    List {
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Suspend by hand: `task tsk_…` (its credentials), `workload NAME`
    /// (its tasks) or `upstream NAME` (the key keymint holds), until lifted.
    Add {
        /// `task`, `workload` or `upstream`.
        scope: String,
        /// The task id, workload name or upstream name.
        subject: String,
        /// Why (shown to whoever lifts it).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Lift a suspension (`sus_…`): what it held works again if it is
    /// still live.
    Lift {
        id: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

fn rows(items: &[Suspension]) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.scope.as_str().to_owned(),
                s.subject.clone(),
                s.rule.clone(),
                s.created_at.to_string(),
                s.lifted_by
                    .clone()
                    .map_or_else(|| "active".into(), |by| format!("lifted by {by}")),
                s.reason.clone(),
            ]
        })
        .collect()
}

const HEADER: &[&str] = &["ID", "SCOPE", "SUBJECT", "RULE", "SINCE", "STATE", "REASON"];

pub async fn run(cmd: SuspensionsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        SuspensionsCmd::List { all, opts } => {
            let list: List<Suspension> = opts
                .client()?
                .get(&format!("/v1/suspensions?all={all}"))
                .await
                .map_err(api_err)?;
            if opts.format() == Format::Json {
                output::json(&list);
            } else {
                output::table(HEADER, &rows(&list.items));
            }
        }
        SuspensionsCmd::Add {
            scope,
            subject,
            reason,
            opts,
        } => {
            let s: Suspension = opts
                .client()?
                .post(
                    "/v1/suspensions",
                    &serde_json::json!({ "scope": scope, "subject": subject, "reason": reason }),
                )
                .await
                .map_err(api_err)?;
            if opts.format() == Format::Json {
                output::json(&s);
            } else {
                output::table(HEADER, &rows(std::slice::from_ref(&s)));
            }
        }
        SuspensionsCmd::Lift { id, opts } => {
            let s: Suspension = opts
                .client()?
                .post_empty(&format!("/v1/suspensions/{}/lift", encode(&id)))
                .await
                .map_err(api_err)?;
            if opts.format() == Format::Json {
                output::json(&s);
            } else {
                output::table(HEADER, &rows(std::slice::from_ref(&s)));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
