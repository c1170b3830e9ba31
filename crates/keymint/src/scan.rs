//! `keymint scan`: the scanner of `keymint-scan`, plus the closed loop with
//! a server (`--report-to`): findings are recorded in the server's audit
//! trail and every live `kmt_` token found is revoked as leaked.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use keymint_client::Client;
use keymint_proto::{LeakReport, LeakedFinding, LeaksRecorded};
use keymint_scan::cli::{self as scan, EXIT_ERROR, ScanArgs};
use keymint_scan::finding::Finding;

/// Findings per request: keeps every request far below the server's body
/// limit.
const BATCH: usize = 100;
/// How long one batch of the report is waited for.
const REPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
/// Locations sent per finding; the rest are counted.
const LOCATIONS: usize = 5;

#[derive(Debug, Args)]
pub struct ScanCmd {
    #[command(flatten)]
    pub scan: ScanArgs,
    /// Send the findings to this keymint server (e.g. http://127.0.0.1:8200):
    /// they are recorded in its audit trail, and every live `kmt_` token
    /// found is revoked at once as leaked. Needs an admin token.
    #[arg(long, value_name = "URL")]
    pub report_to: Option<String>,
    /// The environment the scanned tree belongs to (`prod`, `staging`, …),
    /// recorded with each location in the server's inventory: a key seen
    /// in two environments is a finding.
    #[arg(long, value_name = "NAME")]
    pub environment: Option<String>,
    /// Admin token for `--report-to`.
    #[arg(long, env = "KEYMINT_TOKEN", hide_env_values = true)]
    pub report_token: Option<String>,
    /// Read the admin token for `--report-to` from a file instead (wins
    /// over `KEYMINT_TOKEN`).
    #[arg(long, value_name = "FILE")]
    pub report_token_file: Option<PathBuf>,
    /// Ask the providers whether the keys found still work (OpenAI and
    /// Anthropic API keys, with a read-only model listing). Off by default:
    /// it sends each such key to its provider.
    #[arg(long)]
    pub verify: bool,
    #[arg(long, hide = true, default_value = "https://api.openai.com/v1")]
    pub verify_openai_base: String,
    #[arg(long, hide = true, default_value = "https://api.anthropic.com")]
    pub verify_anthropic_base: String,
}

/// Asks each provider whether its keys in the report are live; sets
/// `live` on the findings it could decide (a 200 is live, a 401 or 403 is
/// not, anything else is left undecided).
async fn verify_live(cmd: &ScanCmd, report: &mut keymint_scan::report::Report) {
    let client = keymint_server::webhook::Client::new();
    for f in &mut report.findings {
        let secret = f.secret.expose();
        let (url, headers): (String, Vec<(&str, String)>) = match f.rule_id.as_str() {
            "openai.legacy-key" | "openai.project-key" | "openai.service-account-key" => (
                format!("{}/models", cmd.verify_openai_base.trim_end_matches('/')),
                vec![("authorization", format!("Bearer {secret}"))],
            ),
            "anthropic.api-key" => (
                format!(
                    "{}/v1/models",
                    cmd.verify_anthropic_base.trim_end_matches('/')
                ),
                vec![
                    ("x-api-key", secret.to_owned()),
                    ("anthropic-version", "2023-06-01".to_owned()),
                ],
            ),
            _ => continue,
        };
        f.live = match client.get_status(&url, &headers).await {
            Ok(200) => Some(true),
            Ok(401 | 403) => Some(false),
            Ok(_) | Err(_) => None,
        };
    }
}

/// Scans, reports to the server, then writes the report as `scan` would.
/// A failed report is an error (exit 2) even when the scan found nothing.
pub async fn run_and_report(cmd: ScanCmd) -> anyhow::Result<ExitCode> {
    if cmd.report_to.is_none() && !cmd.verify {
        return Ok(scan::run(&cmd.scan));
    }
    let args = cmd.scan.clone();
    let scanned = tokio::task::spawn_blocking(move || scan::scan(&args, None, false))
        .await
        .context("the scan stopped")?;
    let mut scanned = match scanned {
        Ok(s) => s,
        Err(msg) => {
            eprintln!("error: {msg}");
            return Ok(ExitCode::from(EXIT_ERROR));
        }
    };
    if cmd.verify {
        verify_live(&cmd, &mut scanned.report).await;
    }
    if let Some(url) = cmd.report_to.clone() {
        report(&cmd, &url, &scanned).await?;
    }
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    let code = match scan::emit(&cmd.scan, &scanned, &mut stdout, &mut stderr) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("error: {msg}");
            EXIT_ERROR
        }
    };
    Ok(ExitCode::from(code))
}

/// Sends the findings to the server at `url`.
async fn report(cmd: &ScanCmd, url: &str, scanned: &scan::Scanned) -> anyhow::Result<()> {
    let token = match (&cmd.report_token, &cmd.report_token_file) {
        (_, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read token file `{}`", f.display()))?
            .trim()
            .to_owned(),
        (Some(t), None) => t.trim().to_owned(),
        (None, None) => anyhow::bail!(
            "--report-to needs an admin token: set KEYMINT_TOKEN or pass --report-token-file"
        ),
    };
    // A report waits on each provider's leak response (an Admin API call
    // of up to 30 s): the client's usual 30 s would give up on the first
    // slow one. The server finishes a report whether or not we wait.
    let client = Client::new(url, Some(token))?.with_timeout(REPORT_TIMEOUT);
    let findings: Vec<LeakedFinding> = scanned
        .report
        .findings
        .iter()
        .chain(scanned.report.suppressed.iter())
        .map(|f| leaked(f, cmd.environment.as_deref()))
        .collect();
    let mut total = LeaksRecorded::default();
    for chunk in findings.chunks(BATCH) {
        let body = LeakReport {
            source: "keymint scan".into(),
            findings: chunk.to_vec(),
        };
        let got: LeaksRecorded = client
            .post("/v1/leaks", &body)
            .await
            .with_context(|| format!("cannot report the findings to {url}"))?;
        total.merge(got);
    }
    if !cmd.scan.quiet {
        eprintln!(
            "reported {} finding(s) to {url}: {} keymint token(s) revoked as leaked, {} already ended, {} unknown",
            total.recorded,
            total.revoked.len(),
            total.already_ended.len(),
            total.unknown_tokens
        );
    }
    Ok(())
}

/// What the server learns of a finding: never the secret, except a keymint
/// token, which the server needs to find and revoke (it stores only its
/// keyed hash, so nothing else identifies it).
fn leaked(f: &Finding, environment: Option<&str>) -> LeakedFinding {
    let token = (f.rule_id == keymint_scan::report::KEYMINT_TOKEN_RULE)
        .then(|| f.secret.expose().to_owned());
    // Enough of the key to find it in its provider's key list (which shows
    // the same head and tail), never enough to use it; none for keymint's
    // own tokens (the server has the token itself) or a PEM block.
    let hint = token
        .is_none()
        .then(|| keymint_core::inventory::hint(f.secret.expose(), 16))
        .filter(|h| keymint_core::inventory::is_hint(h));
    LeakedFinding {
        rule: f.rule_id.clone(),
        fingerprint: f.fingerprint.clone(),
        locations: f
            .locations
            .iter()
            .take(LOCATIONS)
            .map(|l| printable(&l.to_string()))
            .collect(),
        more_locations: f.locations.len().saturating_sub(LOCATIONS) as u64,
        token,
        hint,
        environment: environment.map(str::to_owned),
    }
}

/// A location as the server accepts it: control and bidirectional
/// formatting characters (a file name may hold a newline, or a Trojan
/// Source override) shown as `?`, at most 1,000 bytes.
fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(1000));
    for c in s.chars().map(|c| {
        if keymint_core::model::is_unsafe_char(c) {
            '?'
        } else {
            c
        }
    }) {
        if out.len() + c.len_utf8() > 1000 {
            out.push('…');
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn locations_are_made_acceptable_to_the_server() {
        assert_eq!(printable("a\nb.env:1:2"), "a?b.env:1:2");
        let long = "é".repeat(800);
        let p = printable(&long);
        assert!(p.len() <= 1024 && p.ends_with('…'));
    }
}
