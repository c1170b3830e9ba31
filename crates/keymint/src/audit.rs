//! `keymint audit`: show the newest events and verify the hash chain, of
//! the server's store or of a JSON-lines audit file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use keymint_core::audit::{self, AuditEvent, ChainReport, RecordedHead};
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
        /// A head recorded earlier, apart from the trail (`SEQ:HASH`, as a
        /// verification prints it): the chain must reach it with that hash.
        /// A hash chain alone cannot tell that events were cut from its end.
        #[arg(long, value_name = "SEQ:HASH")]
        expect_head: Option<RecordedHead>,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

pub async fn run(cmd: AuditCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCmd::Verify {
            file: Some(f),
            expect_head,
            opts,
        } => {
            let r = verify_file(&f, expect_head.as_ref())?;
            Ok(print_report(
                opts.format(),
                &r,
                &format!("`{}`", f.display()),
            ))
        }
        AuditCmd::Verify {
            file: None,
            expect_head,
            opts,
        } => {
            let c = opts.client()?;
            let mut r: ChainReport = c.get("/v1/audit/verify").await.map_err(api_err)?;
            if let Some(head) = &expect_head {
                let at: List<AuditEvent> = c
                    .get(&format!("/v1/audit?after={}&limit=1", head.seq - 1))
                    .await
                    .map_err(api_err)?;
                let hash = at
                    .items
                    .first()
                    .filter(|e| e.seq == head.seq)
                    .map(|e| e.hash.as_str());
                r.check_head(head, hash);
            }
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

/// Verifies a JSON-lines audit file, streaming it line by line, and, with
/// `head`, that it reaches that recorded head.
pub fn verify_file(path: &Path, head: Option<&RecordedHead>) -> anyhow::Result<ChainReport> {
    use std::io::BufRead;
    let f =
        std::fs::File::open(path).with_context(|| format!("cannot open `{}`", path.display()))?;
    let mut hash_at_head = None;
    let lines = std::io::BufReader::new(f).lines().map(|l| {
        let e = match l {
            Ok(l) => serde_json::from_str::<AuditEvent>(&l).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let (Ok(e), Some(h)) = (&e, head)
            && e.seq == h.seq
        {
            hash_at_head = Some(e.hash.clone());
        }
        e
    });
    let mut r = audit::verify(lines);
    if let Some(h) = head {
        r.check_head(h, hash_at_head.as_deref());
    }
    Ok(r)
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
