//! `keymint upstream`: the egress proxy's upstreams; set a provider key
//! (sealed, never shown again), list them.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use keymint_client::{ClientError, encode};
use keymint_proto::List;

use crate::cli::{ClientOpts, api_err, read_key};
use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum UpstreamCmd {
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

pub async fn run(cmd: UpstreamCmd) -> anyhow::Result<ExitCode> {
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
            if opts.format() == Format::Json {
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
