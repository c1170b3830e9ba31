//! The thread pipeline: one producer (walking paths, reading git history,
//! unpacking images, listing processes) feeds a bounded channel; one worker
//! per core scans. Big items are scanned by the producer in a stream so that
//! memory stays bounded: at most `threads × (CHUNK + overlap)` of content and
//! a bounded queue of small blobs are held at once.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::Serialize;

use crate::content::{ContentScanner, Hit, Outcome};
use crate::engine::Engine;
use crate::finding::{Fingerprinter, Source};

/// Blobs up to this size are queued for the workers; larger ones are
/// streamed by the producer.
pub const QUEUE_BLOB_MAX: usize = 4 << 20;

/// What to scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A file or a directory, walked recursively (dotfiles included; `.git`
    /// folders are skipped: use [`Target::Git`] for history).
    Path(PathBuf),
    /// Standard input (the reader given to [`Scanner::scan`]).
    Stdin,
    /// Every blob of a git repository's history, once.
    Git(PathBuf),
    /// A `docker save` or OCI layout tarball.
    Image(PathBuf),
    /// The environments of running processes (Linux `/proc`).
    Processes,
}

/// How a scan runs.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    pub threads: usize,
    /// Globs of paths to leave out (matched against the path as given and
    /// relative to the walked root; `*` crosses `/`).
    pub exclude: Vec<String>,
    /// Follow symbolic links while walking (loops are reported and skipped).
    pub follow_symlinks: bool,
    /// The `proc` filesystem root, for tests.
    pub proc_root: PathBuf,
}

impl Default for ScanOptions {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(2, usize::from),
            exclude: Vec::new(),
            follow_symlinks: false,
            proc_root: PathBuf::from("/proc"),
        }
    }
}

/// Something that went wrong with one input; the rest of the scan goes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Issue {
    pub severity: Severity,
    /// What the problem is about: a path, a blob, a layer.
    pub input: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Skipped on purpose (a symlink loop, an unreadable process).
    Warning,
    /// Could not be scanned (a truncated archive, a corrupt object).
    Error,
}

/// Counters, updated as the scan runs (the progress bar reads them).
#[derive(Debug, Default)]
pub struct Stats {
    pub bytes: AtomicU64,
    pub files: AtomicU64,
    pub blobs: AtomicU64,
    pub binary_skipped: AtomicU64,
    pub hits: AtomicU64,
}

/// The raw result of a scan, before grouping (see [`crate::report`]).
#[derive(Debug, Default)]
pub struct ScanOutput {
    pub hits: Vec<Hit>,
    pub issues: Vec<Issue>,
    pub bytes: u64,
    pub files: u64,
    pub blobs: u64,
    pub binary_skipped: u64,
    pub elapsed: Duration,
}

/// One unit of work for a worker.
#[derive(Debug)]
pub(crate) enum Work {
    File {
        path: PathBuf,
        display: String,
    },
    Blob {
        data: Vec<u8>,
        source: Source,
        name: String,
    },
}

/// State shared by the producer and the workers of one scan.
#[derive(Debug)]
pub(crate) struct Shared<'a> {
    pub engine: &'a Engine,
    pub fingerprinter: &'a Fingerprinter,
    pub stats: &'a Stats,
    pub issues: Mutex<Vec<Issue>>,
    pub hits: Mutex<Vec<Hit>>,
    pub whiteouts: Mutex<Vec<crate::image::ImageWhiteouts>>,
}

impl Shared<'_> {
    pub fn issue(&self, severity: Severity, input: impl Into<String>, message: impl Into<String>) {
        if let Ok(mut v) = self.issues.lock() {
            v.push(Issue {
                severity,
                input: input.into(),
                message: message.into(),
            });
        }
    }

    pub fn add_hits(&self, hits: &mut Vec<Hit>) {
        if hits.is_empty() {
            return;
        }
        self.stats
            .hits
            .fetch_add(hits.len() as u64, Ordering::Relaxed);
        if let Ok(mut v) = self.hits.lock() {
            v.append(hits);
        }
    }

    /// Scans a blob now, on this thread (used for big items and by workers).
    pub fn scan_blob(&self, cs: &mut ContentScanner<'_>, data: &[u8], source: &Source, name: &str) {
        let mut hits = Vec::new();
        let r = cs.scan_bytes(data, source, name, &mut hits);
        self.account(r, source, &mut hits, false);
    }

    /// Scans a stream now, on this thread.
    pub fn scan_stream(
        &self,
        cs: &mut ContentScanner<'_>,
        reader: impl std::io::Read,
        source: &Source,
        name: &str,
        is_file: bool,
    ) {
        let mut hits = Vec::new();
        let r = cs.scan_reader(reader, source, name, &mut hits);
        self.account(r, source, &mut hits, is_file);
    }

    pub(crate) fn account(
        &self,
        r: std::io::Result<Outcome>,
        source: &Source,
        hits: &mut Vec<Hit>,
        is_file: bool,
    ) {
        match r {
            Ok(Outcome::Scanned { bytes }) => {
                self.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
                if is_file {
                    self.stats.files.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.stats.blobs.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Outcome::Binary) => {
                self.stats.binary_skipped.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.issue(
                Severity::Error,
                source.display_path(),
                format!("read failed, scanned up to the error: {e}"),
            ),
        }
        self.add_hits(hits);
    }
}

/// A configured scanner: rules compiled once, then any number of scans.
#[derive(Debug)]
pub struct Scanner {
    engine: Engine,
    fingerprinter: Fingerprinter,
    options: ScanOptions,
    excludes: GlobSet,
}

/// Why a scanner could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Rules(#[from] crate::rules::RuleError),
    #[error("invalid exclude glob `{glob}`: {reason}")]
    Glob { glob: String, reason: String },
}

impl Scanner {
    pub fn new(
        engine: Engine,
        fingerprinter: Fingerprinter,
        options: ScanOptions,
    ) -> Result<Self, SetupError> {
        let mut b = GlobSetBuilder::new();
        for g in &options.exclude {
            let glob = GlobBuilder::new(g)
                .literal_separator(false)
                .build()
                .map_err(|e| SetupError::Glob {
                    glob: g.clone(),
                    reason: e.kind().to_string(),
                })?;
            b.add(glob);
        }
        let excludes = b.build().map_err(|e| SetupError::Glob {
            glob: options.exclude.join(","),
            reason: e.kind().to_string(),
        })?;
        Ok(Self {
            engine,
            fingerprinter,
            options,
            excludes,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn fingerprinter(&self) -> &Fingerprinter {
        &self.fingerprinter
    }

    /// Scans every target with all configured threads. `stdin` is read for
    /// [`Target::Stdin`]. `stats` may be watched from another thread.
    pub fn scan(
        &self,
        targets: &[Target],
        stdin: Option<&mut dyn std::io::Read>,
        stats: &Stats,
    ) -> ScanOutput {
        let started = Instant::now();
        let shared = Shared {
            engine: &self.engine,
            fingerprinter: &self.fingerprinter,
            stats,
            issues: Mutex::new(Vec::new()),
            hits: Mutex::new(Vec::new()),
            whiteouts: Mutex::new(Vec::new()),
        };
        let threads = self.options.threads.max(1);
        let (tx, rx) = crossbeam_channel::bounded::<Work>(threads * 8);
        let mut stdin = stdin;
        std::thread::scope(|s| {
            for _ in 0..threads {
                let rx = rx.clone();
                let shared = &shared;
                s.spawn(move || worker(shared, &rx));
            }
            drop(rx);
            let mut cs = ContentScanner::new(&self.engine, &self.fingerprinter);
            for t in targets {
                match t {
                    Target::Path(p) => self.walk(p, &tx, &shared),
                    Target::Stdin => match stdin.as_deref_mut() {
                        Some(r) => shared.scan_stream(&mut cs, r, &Source::Stdin, "<stdin>", true),
                        None => {
                            shared.issue(Severity::Error, "<stdin>", "no standard input to read")
                        }
                    },
                    Target::Git(p) => crate::git::scan_history(p, &tx, &shared, &mut cs, &|path| {
                        !self.excludes.is_empty() && self.excludes.is_match(path)
                    }),
                    Target::Image(p) => crate::image::scan_image(p, &tx, &shared, &mut cs),
                    Target::Processes => {
                        crate::process::scan_processes(&self.options.proc_root, &tx, &shared)
                    }
                }
            }
            drop(tx);
        });
        let stats_snapshot = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut hits = shared.hits.into_inner().unwrap_or_default();
        let whiteouts = shared.whiteouts.into_inner().unwrap_or_default();
        crate::image::apply_whiteouts(&whiteouts, &mut hits);
        ScanOutput {
            hits,
            issues: shared.issues.into_inner().unwrap_or_default(),
            bytes: stats_snapshot(&stats.bytes),
            files: stats_snapshot(&stats.files),
            blobs: stats_snapshot(&stats.blobs),
            binary_skipped: stats_snapshot(&stats.binary_skipped),
            elapsed: started.elapsed(),
        }
    }

    fn excluded(&self, path: &Path, root: &Path) -> bool {
        if self.excludes.is_empty() {
            return false;
        }
        if self.excludes.is_match(path) {
            return true;
        }
        path.strip_prefix(root)
            .is_ok_and(|rel| !rel.as_os_str().is_empty() && self.excludes.is_match(rel))
    }

    fn walk(&self, root: &Path, tx: &Sender<Work>, shared: &Shared<'_>) {
        let walker = walkdir::WalkDir::new(root)
            .follow_links(self.options.follow_symlinks)
            .follow_root_links(true)
            .into_iter()
            .filter_entry(|e| {
                let is_git_dir = e.depth() > 0 && e.file_type().is_dir() && e.file_name() == ".git";
                !is_git_dir && !self.excluded(e.path(), root)
            });
        for entry in walker {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    let input = e
                        .path()
                        .map_or_else(|| root.display().to_string(), |p| p.display().to_string());
                    if let Some(anc) = e.loop_ancestor() {
                        shared.issue(
                            Severity::Warning,
                            input,
                            format!("symbolic link loop back to `{}`: skipped", anc.display()),
                        );
                    } else {
                        let msg = e
                            .io_error()
                            .map_or_else(|| e.to_string(), ToString::to_string);
                        shared.issue(Severity::Error, input, format!("cannot read: {msg}"));
                    }
                    continue;
                }
            };
            if !entry.file_type().is_file() {
                if entry.depth() == 0 && !entry.file_type().is_dir() {
                    // Named on the command line: a pipe is read (`keymint
                    // scan <(kubectl get secret -o yaml)`), anything else
                    // is said to be unscanned rather than passed over.
                    if is_pipe(&entry.file_type()) {
                        let path = entry.into_path();
                        let display = path.display().to_string();
                        if tx.send(Work::File { path, display }).is_err() {
                            return;
                        }
                    } else {
                        shared.issue(
                            Severity::Error,
                            entry.path().display().to_string(),
                            "not a regular file, a directory or a pipe: not scanned",
                        );
                    }
                }
                continue;
            }
            let path = entry.into_path();
            let display = path.display().to_string();
            if tx.send(Work::File { path, display }).is_err() {
                return;
            }
        }
    }
}

/// A named pipe (FIFO), which `<(…)` in a shell also gives.
#[cfg(unix)]
fn is_pipe(t: &std::fs::FileType) -> bool {
    std::os::unix::fs::FileTypeExt::is_fifo(t)
}

#[cfg(not(unix))]
fn is_pipe(_: &std::fs::FileType) -> bool {
    false
}

fn worker(shared: &Shared<'_>, rx: &Receiver<Work>) {
    let mut cs = ContentScanner::new(shared.engine, shared.fingerprinter);
    for work in rx {
        match work {
            Work::File { path, display } => {
                let source = Source::File {
                    path: display.clone(),
                };
                match File::open(&path) {
                    Ok(f) => {
                        let mut hits = Vec::new();
                        let len = f.metadata().map_or(0, |m| m.len());
                        let r = cs.scan_reader_of_len(f, len, &source, &display, &mut hits);
                        if matches!(r, Ok(Outcome::Binary)) && cs.last_was_tar() {
                            shared.add_hits(&mut hits);
                            scan_archive(shared, &mut cs, &path, &display);
                        } else {
                            shared.account(r, &source, &mut hits, true);
                        }
                    }
                    Err(e) => shared.issue(Severity::Error, display, format!("cannot open: {e}")),
                }
            }
            Work::Blob { data, source, name } => shared.scan_blob(&mut cs, &data, &source, &name),
        }
    }
}

/// A tar archive (or `.tar.gz`) met while walking: every regular file in it
/// is scanned, located as `archive!member`. A damaged archive is scanned up
/// to the damage and reported.
fn scan_archive(shared: &Shared<'_>, cs: &mut ContentScanner<'_>, path: &Path, display: &str) {
    let result = (|| -> std::io::Result<()> {
        let mut f = std::io::BufReader::new(File::open(path)?);
        let gz = crate::content::is_gzip(std::io::BufRead::fill_buf(&mut f)?);
        let reader: Box<dyn std::io::Read> = if gz {
            Box::new(flate2::read::MultiGzDecoder::new(f))
        } else {
            Box::new(f)
        };
        let mut archive = tar::Archive::new(reader);
        for entry in archive.entries()? {
            let mut entry = entry?;
            let kind = entry.header().entry_type();
            if !(kind.is_file() || kind == tar::EntryType::Continuous) {
                continue;
            }
            let member = entry.path()?.to_string_lossy().into_owned();
            let source = Source::File {
                path: format!("{display}!{member}"),
            };
            shared.scan_stream(cs, &mut entry, &source, &member, false);
        }
        Ok(())
    })();
    shared.stats.files.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = result {
        shared.issue(
            Severity::Error,
            display,
            format!("archive truncated or corrupt, scanned up to the damage: {e}"),
        );
    }
}

/// Prints a progress line to stderr while a scan runs; stops when dropped.
#[derive(Debug)]
pub struct Progress {
    stop: std::sync::Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    /// Starts the progress thread over `stats`. Call only when stderr is a
    /// terminal.
    pub fn start(stats: std::sync::Arc<Stats>) -> Self {
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            use std::io::Write;
            let started = Instant::now();
            let mut shown = false;
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                // Short scans draw nothing.
                if started.elapsed() < Duration::from_secs(1) {
                    continue;
                }
                let secs = started.elapsed().as_secs_f64().max(0.001);
                let bytes = stats.bytes.load(Ordering::Relaxed);
                let line = format!(
                    "\r\x1b[2Kscanning: {} in {} files, {} blobs, {} findings, {}/s",
                    human_bytes(bytes),
                    stats.files.load(Ordering::Relaxed),
                    stats.blobs.load(Ordering::Relaxed),
                    stats.hits.load(Ordering::Relaxed),
                    human_bytes((bytes as f64 / secs) as u64),
                );
                let _ = std::io::stderr().write_all(line.as_bytes());
                shown = true;
            }
            if shown {
                let _ = std::io::stderr().write_all(b"\r\x1b[2K");
            }
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// `1.5 GiB`, `12.0 MiB`, `300 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}
