//! `keymint upstream`: the egress proxy's upstreams; set a provider key
//! (sealed, never shown again), rotate it (docs/design/0035), list them.

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
    /// Rotate an upstream's key: keymint makes a new key at the provider
    /// (OpenRouter, OpenAI), or takes the one given with `--key-file`
    /// (Anthropic, manual), checks it, switches every replica to it, and
    /// revokes the old key after the grace period. On any failure the old
    /// key stays in use.
    Rotate {
        name: String,
        /// The file holding the new key (`-`: standard input); for
        /// providers whose admin API cannot make keys.
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
        UpstreamCmd::Rotate {
            name,
            key_file,
            opts,
        } => {
            let body = match key_file {
                Some(f) => {
                    let key = read_key(Some(&f))?;
                    zeroize::Zeroizing::new(
                        serde_json::to_vec(&serde_json::json!({"key": key.trim()}))
                            .context("cannot encode the key")?,
                    )
                }
                None => zeroize::Zeroizing::new(b"{}".to_vec()),
            };
            let r = opts
                .client()?
                .raw(
                    http::Method::POST,
                    &format!("/v1/upstreams/{}/rotate", encode(&name)),
                    Some("application/json"),
                    body.to_vec(),
                )
                .await
                .map_err(api_err)?;
            if !r.status.is_success() {
                let p: keymint_proto::Problem = r.json().map_err(api_err)?;
                return Err(api_err(ClientError::Api(p)));
            }
            let done: keymint_proto::UpstreamRotated = r.json().map_err(api_err)?;
            if opts.format() == Format::Json {
                output::json(&done);
            } else {
                println!("upstream         {}", done.upstream);
                println!("provider         {}", done.provider);
                println!(
                    "new key          {} ({})",
                    done.hint.as_deref().unwrap_or("-"),
                    if done.created {
                        "made by keymint"
                    } else {
                        "supplied"
                    }
                );
                println!("fingerprint      {}", done.fingerprint);
                println!("verified         {}", done.verified);
                println!("rotated at       {}", done.rotated_at);
                println!("old fingerprint  {}", done.old_fingerprint);
                println!(
                    "old key          {} (at {})",
                    done.old_key, done.revoke_old_at
                );
            }
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
