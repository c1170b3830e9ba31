//! `keymint report`: the compliance report (docs/design/0034) from the
//! server's live state, as HTML (one self-contained file for people),
//! JSON (for machines; `docs/report.schema.json`) or Markdown (for pull
//! requests and tickets). The server renders it; this writes it out.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use keymint_client::ClientError;
use keymint_proto::Problem;

use crate::cli::{ClientOpts, api_err};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReportFormat {
    Html,
    Json,
    Md,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// `html` for people, `json` for machines, `md` for pull requests.
    #[arg(long, value_enum, default_value = "html")]
    format: ReportFormat,
    /// Write it here instead of standard output (a new file with mode
    /// 0600 renamed over FILE: the report names keys, owners and where
    /// keys were seen; a symbolic link at FILE is refused).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    #[command(flatten)]
    opts: ClientOpts,
}

pub async fn run(a: ReportArgs) -> anyhow::Result<ExitCode> {
    let format = match a.format {
        ReportFormat::Html => "html",
        ReportFormat::Json => "json",
        ReportFormat::Md => "md",
    };
    let r = a
        .opts
        .client()?
        .raw(
            http::Method::GET,
            &format!("/v1/report?format={format}"),
            None,
            vec![],
        )
        .await
        .map_err(api_err)?;
    if !r.status.is_success() {
        let e = match r.json::<Problem>() {
            Ok(p) => ClientError::Api(p),
            Err(e) => e,
        };
        return Err(api_err(e));
    }
    match &a.out {
        Some(path) => {
            keymint_core::outfile::replace(path, &r.body, 0o600)
                .with_context(|| format!("cannot write `{}`", path.display()))?;
            eprintln!("report written to {}", path.display());
        }
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(&r.body)?;
            out.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
