//! Admin subcommands for the engines' own credentials:
//! `keymint database rotate NAME`.

use std::process::ExitCode;

use clap::Subcommand;
use keymint_client::encode;
use keymint_proto::DatabaseRotated;

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
