//! `keymint audit`: show the newest events and verify the hash chain, of
//! the server's store or of a JSON-lines audit file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use keymint_core::audit::{self, AuditEvent, ChainReport};
use keymint_proto::List;

use crate::cli::{ClientOpts, api_err};
use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Show the newest audit events.
    Tail {
        #[arg(long, short = 'n', default_value_t = 20)]
        lines: u32,
        /// Keep printing new events.
        #[arg(long, short = 'f')]
        follow: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Check the hash chain: of a JSON-lines audit file (`--file`), or of
    /// the server's store. Exits 1 and names the first bad place if broken.
    Verify {
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

pub async fn run(cmd: AuditCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCmd::Verify {
            file: Some(f),
            opts,
        } => {
            let r = verify_file(&f)?;
            Ok(print_report(
                opts.format(),
                &r,
                &format!("`{}`", f.display()),
            ))
        }
        AuditCmd::Verify { file: None, opts } => {
            let r: ChainReport = opts
                .client()?
                .get("/v1/audit/verify")
                .await
                .map_err(api_err)?;
            Ok(print_report(opts.format(), &r, "the server's store"))
        }
        AuditCmd::Tail {
            lines,
            follow,
            opts,
        } => {
            let c = opts.client()?;
            let l: List<AuditEvent> = c
                .get(&format!("/v1/audit?limit={}", lines.clamp(1, 1000)))
                .await
                .map_err(api_err)?;
            output::events(opts.format(), &l.items);
            if !follow {
                return Ok(ExitCode::SUCCESS);
            }
            let mut after = l.items.last().map_or(0, |e| e.seq);
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                let l: List<AuditEvent> = c
                    .get(&format!("/v1/audit?after={after}&limit=1000"))
                    .await
                    .map_err(api_err)?;
                if let Some(last) = l.items.last() {
                    after = last.seq;
                    if opts.format() == Format::Json {
                        output::events(opts.format(), &l.items);
                    } else {
                        for e in &l.items {
                            output::events(Format::Json, std::slice::from_ref(e));
                        }
                    }
                }
            }
        }
    }
}

/// Verifies a JSON-lines audit file, streaming it line by line.
pub fn verify_file(path: &Path) -> anyhow::Result<ChainReport> {
    use std::io::BufRead;
    let f =
        std::fs::File::open(path).with_context(|| format!("cannot open `{}`", path.display()))?;
    let lines = std::io::BufReader::new(f).lines().map(|l| match l {
        Ok(l) => serde_json::from_str::<AuditEvent>(&l).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    });
    Ok(audit::verify(lines))
}

fn print_report(fmt: Format, r: &ChainReport, what: &str) -> ExitCode {
    if fmt == Format::Json {
        output::json(r);
    } else if let Some(p) = &r.problem {
        println!(
            "audit chain of {what} is BROKEN after {} good events: {p}",
            r.events
        );
    } else {
        println!(
            "audit chain of {what} is intact: {} events, head seq {} hash {}",
            r.events,
            r.last_seq.unwrap_or(0),
            r.last_hash.as_deref().unwrap_or("-")
        );
    }
    if r.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
