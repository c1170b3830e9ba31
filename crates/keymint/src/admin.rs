//! Subcommands for the engines' own keys and credentials:
//! `keymint database rotate NAME`, `keymint ssh ca NAME`,
//! `keymint ssh krl NAME --out FILE`.

use std::process::ExitCode;

use clap::Subcommand;
use keymint_client::encode;
use keymint_proto::{DatabaseRotated, SshCa};

use crate::cli::ClientOpts;
use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum DatabaseCmd {
    /// Set a new random password for keymint's admin user on a database,
    /// kept sealed by keymint and never shown (admin only).
    Rotate {
        /// The `[[databases]]` entry's name.
        name: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

pub async fn database(cmd: DatabaseCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        DatabaseCmd::Rotate { name, opts } => {
            let r: DatabaseRotated = opts
                .client()?
                .post_empty(&format!("/v1/databases/{}/rotate", encode(&name)))
                .await
                .map_err(crate::cli::api_err)?;
            match opts.format() {
                Format::Json => output::json(&r),
                Format::Table => println!(
                    "rotated the admin password of `{}` ({}) at {}; fingerprint {}",
                    r.database, r.engine, r.rotated_at, r.fingerprint
                ),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
pub enum IssuerCmd {
    /// Start a rotation of the issuer's signing keys (admin): the new keys
    /// are published at once and sign after `[issuer] publish_ahead`; the
    /// old ones stay published until their last token expires.
    Rotate {
        #[command(flatten)]
        opts: ClientOpts,
    },
}

pub async fn issuer(cmd: IssuerCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        IssuerCmd::Rotate { opts } => {
            let r: Vec<serde_json::Value> = opts
                .client()?
                .post_empty("/v1/issuer/rotate")
                .await
                .map_err(crate::cli::api_err)?;
            match opts.format() {
                Format::Json => output::json(&r),
                Format::Table => {
                    for k in &r {
                        let from = k["signs_from"]
                            .as_i64()
                            .map(|ms| keymint_core::Timestamp::from_millis(ms).rfc3339())
                            .unwrap_or_default();
                        println!(
                            "{} key {} published; signs from {from} (replaces {})",
                            k["alg"].as_str().unwrap_or("?"),
                            k["kid"].as_str().unwrap_or("?"),
                            k["replaces"].as_str().unwrap_or("none"),
                        );
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
pub enum SshCmd {
    /// Print a CA's public key (for sshd's `TrustedUserCAKeys`).
    Ca {
        name: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Import an existing Ed25519 CA key (OpenSSH format, unencrypted) from
    /// a file or stdin; it is sealed and never shown again.
    Import {
        name: String,
        /// The private key file (`-` or absent: standard input).
        #[arg(long)]
        key_file: Option<std::path::PathBuf>,
        /// Replace a key the CA already has.
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Fetch a CA's key revocation list (for sshd's `RevokedKeys`) and
    /// write it to a file, replacing it atomically.
    Krl {
        name: String,
        #[arg(long)]
        out: std::path::PathBuf,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

pub async fn ssh(cmd: SshCmd) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    match cmd {
        SshCmd::Ca { name, opts } => {
            let ca: SshCa = opts
                .client()?
                .get(&format!("/v1/ssh/cas/{}", encode(&name)))
                .await
                .map_err(crate::cli::api_err)?;
            match opts.format() {
                Format::Json => output::json(&ca),
                Format::Table => println!("{}", ca.public_key),
            }
        }
        SshCmd::Import {
            name,
            key_file,
            replace,
            opts,
        } => {
            let key = crate::cli::read_key(key_file.as_deref())?;
            let ca: SshCa = opts
                .client()?
                .post(
                    &format!("/v1/ssh/cas/{}/key", encode(&name)),
                    &serde_json::json!({"private_key": key.as_str(), "replace": replace}),
                )
                .await
                .map_err(crate::cli::api_err)?;
            match opts.format() {
                Format::Json => output::json(&ca),
                Format::Table => println!("{}", ca.public_key),
            }
        }
        SshCmd::Krl { name, out, opts } => {
            let krl = opts
                .client()?
                .get_bytes(&format!("/v1/ssh/cas/{}/krl", encode(&name)))
                .await
                .map_err(crate::cli::api_err)?;
            // Renamed into place: sshd never reads a half-written list.
            keymint_core::outfile::replace(&out, &krl, 0o644)
                .with_context(|| format!("cannot write `{}`", out.display()))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
