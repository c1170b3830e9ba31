//! `keymint approval`: the human in the loop. Operators (with an operator
//! token) list, approve and deny requests that policy held; the requester
//! (with the token that asked) redeems an approved one, once.

use std::process::ExitCode;

use clap::Subcommand;
use keymint_client::encode;
use keymint_core::model::Approval;
use keymint_proto::List;

use crate::cli::{ClientOpts, api_err};
use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum ApprovalCmd {
    /// Held requests, newest first.
    List {
        /// Only those in this state (pending, approved, denied, expired, used,
        /// cancelled).
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// One held request.
    Show {
        id: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Approve a held request (operator token; not your own request).
    Approve {
        id: String,
        /// Why, for the audit trail.
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Deny a held request (operator token).
    Deny {
        id: String,
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Redeem an approved request, once, with the token that made it:
    /// prints the task or the credential it asked for.
    Redeem {
        id: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

pub async fn run(cmd: ApprovalCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ApprovalCmd::List { status, opts } => {
            let q = status.map_or(String::new(), |s| format!("?status={}", encode(&s)));
            let l: List<Approval> = opts
                .client()?
                .get(&format!("/v1/approvals{q}"))
                .await
                .map_err(api_err)?;
            if opts.format() == Format::Json {
                output::json(&l.items);
            } else {
                println!(
                    "{:<32} {:<9} {:<10} {:<20} {:<16} EXPIRES",
                    "ID", "STATUS", "ACTION", "WORKLOAD", "ROLE"
                );
                for a in &l.items {
                    println!(
                        "{:<32} {:<9} {:<10} {:<20} {:<16} {}",
                        a.id,
                        a.status.as_str(),
                        a.action,
                        a.workload,
                        a.role,
                        a.expires_at.rfc3339()
                    );
                }
            }
        }
        ApprovalCmd::Show { id, opts } => {
            let a: Approval = opts
                .client()?
                .get(&format!("/v1/approvals/{}", encode(&id)))
                .await
                .map_err(api_err)?;
            output::json(&a);
        }
        ApprovalCmd::Approve { id, note, opts } => decide(&id, note, &opts, "approve").await?,
        ApprovalCmd::Deny { id, note, opts } => decide(&id, note, &opts, "deny").await?,
        ApprovalCmd::Redeem { id, opts } => {
            let v: serde_json::Value = opts
                .client()?
                .post_empty(&format!("/v1/approvals/{}/redeem", encode(&id)))
                .await
                .map_err(api_err)?;
            output::json(&v);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn decide(
    id: &str,
    note: Option<String>,
    opts: &ClientOpts,
    verb: &str,
) -> anyhow::Result<()> {
    let a: Approval = opts
        .client()?
        .post(
            &format!("/v1/approvals/{}/{verb}", encode(id)),
            &serde_json::json!({ "note": note }),
        )
        .await
        .map_err(api_err)?;
    if opts.format() == Format::Json {
        output::json(&a);
    } else {
        println!("{} is {}", a.id, a.status.as_str());
    }
    Ok(())
}
