//! `keymint scan`: the flags and the entry point that the `keymint` binary
//! calls. [`execute`] does the work against any writers so tests can capture
//! its output; [`run`] wraps it with the process's stdio.
//!
//! Exit codes: 0 when nothing was found, 1 when something was found (after
//! the baseline), 2 on error (bad flags or rules, or an input that could not
//! be scanned and nothing was found elsewhere).

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::engine::Engine;
use crate::finding::Fingerprinter;
use crate::output::{self, Format};
use crate::pipeline::{Progress, ScanOptions, Scanner, Stats, Target};
use crate::report::{self, Baseline};

/// Exit code: nothing found.
pub const EXIT_CLEAN: u8 = 0;
/// Exit code: secrets found.
pub const EXIT_FOUND: u8 = 1;
/// Exit code: an error.
pub const EXIT_ERROR: u8 = 2;

/// Find leaked AI keys and other secrets in files, git history, container
/// images, exports and process environments.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ScanArgs {
    /// Files and directories to scan (`-` reads standard input). With
    /// `--git`, git repositories whose whole history is scanned. Default: `.`
    #[arg(value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Scan the full history of the git repositories given as paths: every
    /// blob once, attributed to the commit that introduced it.
    #[arg(long)]
    pub git: bool,
    /// Scan a container image tarball (`docker save` or OCI layout), layer
    /// by layer, and its config. Repeatable.
    #[arg(long, value_name = "TAR")]
    pub image: Vec<PathBuf>,
    /// Scan standard input.
    #[arg(long)]
    pub stdin: bool,
    /// Scan the environments and command lines of running processes this
    /// user may read (Linux).
    #[arg(long)]
    pub processes: bool,
    /// Leave out paths matching this glob (`*` also crosses `/`), in the
    /// walked directories and in git history. Repeatable.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Follow symbolic links while walking directories.
    #[arg(long)]
    pub follow: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    pub format: Format,
    /// Write the report to this file instead of standard output (a new
    /// file, mode 0600, renamed over FILE; a symbolic link there is refused).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Do not report findings listed in this baseline file.
    #[arg(long, value_name = "FILE")]
    pub baseline: Option<PathBuf>,
    /// Write every finding of this scan to a baseline file (and exit 0
    /// unless an error occurred).
    #[arg(long, value_name = "FILE")]
    pub write_baseline: Option<PathBuf>,
    /// Show the secrets themselves in human and JSON output (never in SARIF).
    #[arg(long)]
    pub show_secrets: bool,
    /// Extra rules file (same format as the built-in rules). Repeatable.
    #[arg(long, value_name = "FILE")]
    pub rules: Vec<PathBuf>,
    /// A file whose bytes key the HMAC fingerprints (default: a fixed public key).
    #[arg(long, value_name = "FILE")]
    pub fingerprint_key_file: Option<PathBuf>,
    /// Worker threads (default: one per core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// No progress line on stderr.
    #[arg(long)]
    pub no_progress: bool,
    /// No summary on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Print the rules (id, confidence, name) and exit.
    #[arg(long)]
    pub list_rules: bool,
    /// The proc filesystem to read with `--processes`.
    #[arg(long, value_name = "DIR", default_value = "/proc", hide = true)]
    pub proc_root: PathBuf,
}

/// Runs `keymint scan` with the process's stdin, stdout and stderr.
pub fn run(args: &ScanArgs) -> ExitCode {
    let progress = !args.no_progress && std::io::stderr().is_terminal();
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    // Not locked: the progress thread writes to stderr too.
    let mut stderr = std::io::stderr();
    let code = execute_with(args, Some(&mut stdin), progress, &mut stdout, &mut stderr);
    ExitCode::from(code)
}

/// Runs `keymint scan` without standard input or progress line.
pub fn execute(args: &ScanArgs, stdout: &mut dyn Write, stderr: &mut dyn Write) -> u8 {
    execute_with(args, None, false, stdout, stderr)
}

/// Runs `keymint scan`; returns the exit code.
pub fn execute_with(
    args: &ScanArgs,
    stdin: Option<&mut dyn Read>,
    progress: bool,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> u8 {
    match execute_inner(args, stdin, progress, stdout, stderr) {
        Ok(code) => code,
        Err(msg) => {
            let _ = writeln!(stderr, "error: {msg}");
            EXIT_ERROR
        }
    }
}

fn read_file(path: &PathBuf, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} `{}`: {e}", path.display()))
}

/// A finished scan: the scanner (for its rules) and the report. The
/// `keymint` binary can act on the report (send findings to a server,
/// revoke leaked `kmt_` tokens) between [`scan`] and [`emit`].
#[derive(Debug)]
pub struct Scanned {
    pub scanner: Scanner,
    pub report: report::Report,
}

fn execute_inner(
    args: &ScanArgs,
    stdin: Option<&mut dyn Read>,
    progress: bool,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<u8, String> {
    if args.list_rules {
        let engine = load_engine(args)?;
        for r in engine.rules() {
            writeln!(
                stdout,
                "{:<36} {:<7} {}",
                r.spec.id,
                r.spec.confidence.as_str(),
                r.spec.name
            )
            .map_err(|e| e.to_string())?;
        }
        return Ok(EXIT_CLEAN);
    }
    let scanned = scan(args, stdin, progress)?;
    emit(args, &scanned, stdout, stderr)
}

fn load_engine(args: &ScanArgs) -> Result<Engine, String> {
    let mut user_rules = Vec::new();
    for p in &args.rules {
        let text = String::from_utf8(read_file(p, "rules file")?)
            .map_err(|_| format!("rules file `{}` is not UTF-8", p.display()))?;
        user_rules.push((p.display().to_string(), text));
    }
    Engine::with_rules(&user_rules).map_err(|e| e.to_string())
}

/// Runs the scan that `args` describe; the error is a message for the user.
pub fn scan(
    args: &ScanArgs,
    stdin: Option<&mut dyn Read>,
    progress: bool,
) -> Result<Scanned, String> {
    let engine = load_engine(args)?;
    let fingerprinter = match &args.fingerprint_key_file {
        Some(p) => Fingerprinter::new(&read_file(p, "fingerprint key file")?),
        None => Fingerprinter::default(),
    };
    let baseline: Option<Baseline> = match &args.baseline {
        Some(p) => Some(
            serde_json::from_slice(&read_file(p, "baseline")?)
                .map_err(|e| format!("invalid baseline `{}`: {e}", p.display()))?,
        ),
        None => None,
    };
    let targets = targets(args)?;
    let mut options = ScanOptions {
        exclude: args.exclude.clone(),
        follow_symlinks: args.follow,
        proc_root: args.proc_root.clone(),
        ..ScanOptions::default()
    };
    if let Some(n) = args.threads {
        options.threads = n.max(1);
    }
    let scanner = Scanner::new(engine, fingerprinter, options).map_err(|e| e.to_string())?;
    let stats = Arc::new(Stats::default());
    let bar = progress.then(|| Progress::start(stats.clone()));
    let out = scanner.scan(&targets, stdin, &stats);
    drop(bar);
    let report = report::build(scanner.engine(), out, baseline.as_ref());
    Ok(Scanned { scanner, report })
}

/// Writes the report, the summary and the baseline that `args` ask for;
/// returns the exit code.
pub fn emit(
    args: &ScanArgs,
    scanned: &Scanned,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<u8, String> {
    let report = &scanned.report;
    let engine = scanned.scanner.engine();
    match &args.output {
        Some(p) => {
            // Rendered whole, then written as a new file renamed over `p`,
            // never through a link there; private: it may show secrets.
            let mut buf = Vec::new();
            output::write(args.format, engine, report, args.show_secrets, &mut buf)
                .map_err(|e| format!("cannot write `{}`: {e}", p.display()))?;
            keymint_core::outfile::replace(p, &buf, 0o600)
                .map_err(|e| format!("cannot write `{}`: {e}", p.display()))?;
        }
        None => output::write(args.format, engine, report, args.show_secrets, stdout)
            .map_err(|e| format!("cannot write the report: {e}"))?,
    }
    if !args.quiet {
        let _ = output::write_summary(report, stderr);
    }
    if let Some(p) = &args.write_baseline {
        let all = report.findings.iter().chain(report.suppressed.iter());
        let b = Baseline::from_findings(all);
        let text = serde_json::to_string_pretty(&b).map_err(|e| e.to_string())?;
        keymint_core::outfile::replace(p, (text + "\n").as_bytes(), 0o644)
            .map_err(|e| format!("cannot write baseline `{}`: {e}", p.display()))?;
        return Ok(if report.has_errors() {
            EXIT_ERROR
        } else {
            EXIT_CLEAN
        });
    }
    Ok(if !report.findings.is_empty() {
        EXIT_FOUND
    } else if report.has_errors() {
        EXIT_ERROR
    } else {
        EXIT_CLEAN
    })
}

/// What `args` ask to scan.
fn targets(args: &ScanArgs) -> Result<Vec<Target>, String> {
    let mut targets = Vec::new();
    let mut want_stdin = args.stdin;
    for p in &args.paths {
        if p.as_os_str() == "-" {
            want_stdin = true;
        } else if args.git {
            targets.push(Target::Git(p.clone()));
        } else {
            targets.push(Target::Path(p.clone()));
        }
    }
    if want_stdin {
        targets.push(Target::Stdin);
    }
    targets.extend(args.image.iter().cloned().map(Target::Image));
    if args.processes {
        targets.push(Target::Processes);
    }
    if targets.is_empty() {
        targets.push(if args.git {
            Target::Git(PathBuf::from("."))
        } else {
            Target::Path(PathBuf::from("."))
        });
    }
    for t in &targets {
        if let Target::Path(p) | Target::Git(p) | Target::Image(p) = t
            && std::fs::symlink_metadata(p).is_err()
        {
            return Err(format!("`{}` does not exist", p.display()));
        }
    }

    Ok(targets)
}
