//! Git history: every blob of the object database, scanned once. A blob
//! that a commit holds is attributed to the commit, author, date and path
//! where it first appeared (the earliest in topological order), including
//! blobs that a later commit deleted and commits that no ref reaches any
//! more (force-pushed away, dangling); a blob that no commit holds is
//! reported with no commit.
//!
//! Shells out to the `git` CLI: `git log --raw` lists which blob each commit
//! introduced, `git cat-file --batch` streams the blobs. A corrupt or missing
//! object is reported and skipped; `cat-file` is restarted after a crash.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use crossbeam_channel::Sender;

use crate::content::ContentScanner;
use crate::finding::Source;
use crate::pipeline::{QUEUE_BLOB_MAX, Severity, Shared, Work};

#[derive(Debug, Clone)]
struct Commit {
    id: String,
    author: String,
    date: String,
}

#[derive(Debug, Clone)]
struct BlobRef {
    blob: String,
    commit: usize,
    path: String,
}

/// `git -C repo` with the repository's own configuration kept from running
/// anything or changing what is parsed: a scanned repository may come from
/// anyone (an unpacked archive, a CI workspace), and its `.git/config` is
/// theirs. `core.fsmonitor` names a command that `git log --all` runs;
/// `i18n.logOutputEncoding` re-encodes the headers parsed here (UTF-16 hid
/// every commit); replacement refs and grafts show other commits than the
/// stored ones; a partial clone would fetch missing objects from its remote.
fn git(repo: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(repo)
        .args([
            "--no-replace-objects",
            "-c",
            "core.fsmonitor=false",
            "-c",
            "i18n.logOutputEncoding=UTF-8",
            "-c",
            "log.showSignature=false",
            "-c",
            "color.ui=never",
        ])
        .env("GIT_NO_LAZY_FETCH", "1")
        .env("GIT_TERMINAL_PROMPT", "0");
    cmd
}

/// Blobs requested from `cat-file` at once (small enough that the requests
/// fit in a pipe buffer, so writing never waits on reading).
const BATCH: usize = 256;

/// `excluded` says whether a path inside the repository is left out
/// (`--exclude`); a blob is attributed to its first path that is not.
pub(crate) fn scan_history(
    repo: &Path,
    tx: &Sender<Work>,
    shared: &Shared<'_>,
    cs: &mut ContentScanner<'_>,
    excluded: &dyn Fn(&str) -> bool,
) {
    let repo_name = repo.display().to_string();
    let (commits, blobs) = match list_blobs(repo, shared, &repo_name, excluded) {
        Ok(v) => v,
        Err(e) => {
            shared.issue(Severity::Error, repo_name, e);
            return;
        }
    };
    let mut i = 0;
    while i < blobs.len() {
        let mut cat = match CatFile::spawn(repo) {
            Ok(c) => c,
            Err(e) => {
                shared.issue(
                    Severity::Error,
                    repo_name,
                    format!("cannot run `git cat-file`: {e}"),
                );
                return;
            }
        };
        // Runs until the end or until cat-file dies; then restarts after the
        // blob that killed it.
        loop {
            if i >= blobs.len() {
                break;
            }
            let batch = &blobs[i..(i + BATCH).min(blobs.len())];
            match cat.request(batch) {
                Ok(()) => {}
                Err(e) => {
                    shared.issue(
                        Severity::Error,
                        repo_name.clone(),
                        format!("`git cat-file` failed: {e}"),
                    );
                    i += 1;
                    break;
                }
            }
            let mut dead = false;
            for b in batch {
                let source = Source::Git {
                    repository: repo_name.clone(),
                    commit: commits[b.commit].id.clone(),
                    author: commits[b.commit].author.clone(),
                    date: commits[b.commit].date.clone(),
                    path: b.path.clone(),
                    blob: b.blob.clone(),
                };
                match cat.read_one(&b.blob, &source, &b.path, tx, shared, cs) {
                    Ok(()) => i += 1,
                    Err(e) => {
                        shared.issue(
                            Severity::Error,
                            format!("{repo_name}: blob {} ({})", b.blob, b.path),
                            format!("cannot read object, skipped: {e}"),
                        );
                        i += 1;
                        dead = true;
                        break;
                    }
                }
            }
            if dead {
                break;
            }
        }
        cat.finish();
    }
}

/// Every blob of the object database once: first those the history reaches
/// (oldest first, each with the first commit and path that introduced it),
/// then those that only unreachable commits hold (pull-request refs of a
/// mirror are reached through `--all`; commits force-pushed away or left
/// dangling are walked on their own, attributed to their commit), then blobs
/// that no commit holds at all (attributed to no commit, path unknown).
fn list_blobs(
    repo: &Path,
    shared: &Shared<'_>,
    repo_name: &str,
    excluded: &dyn Fn(&str) -> bool,
) -> Result<(Vec<Commit>, Vec<BlobRef>), String> {
    let mut walk = Walk::default();
    if let Err(msg) = walk.log(repo, &["--all"], None, excluded) {
        if walk.commits.is_empty() {
            return Err(format!("`git log` failed: {msg}"));
        }
        shared.issue(
            Severity::Error,
            repo_name,
            format!("`git log` failed part-way, history scanned up to the error: {msg}"),
        );
    }
    let (commits, blobs) = match unlisted_objects(repo, &walk) {
        Ok(v) => v,
        Err(e) => {
            shared.issue(
                Severity::Error,
                repo_name,
                format!("cannot list the object database, unreachable objects not scanned: {e}"),
            );
            return Ok((walk.commits, walk.blobs));
        }
    };
    if !commits.is_empty() {
        let mut input = String::with_capacity(commits.len() * 41);
        for c in &commits {
            input.push_str(c);
            input.push('\n');
        }
        // Only what no ref reaches: the reachable part is already walked.
        if let Err(msg) = walk.log(repo, &["--not", "--all"], Some(input), excluded) {
            shared.issue(
                Severity::Error,
                repo_name,
                format!("`git log` of unreachable commits failed: {msg}"),
            );
        }
    }
    let orphans: Vec<String> = blobs
        .into_iter()
        .filter(|b| {
            hex::decode(b)
                .map(|raw| !walk.met.contains_key(raw.as_slice()))
                .unwrap_or(false)
        })
        .collect();
    if !orphans.is_empty() {
        walk.commits.push(Commit {
            id: String::new(),
            author: String::new(),
            date: String::new(),
        });
        let c = walk.commits.len() - 1;
        for blob in orphans {
            walk.blobs.push(BlobRef {
                blob,
                commit: c,
                path: UNREACHABLE_PATH.into(),
            });
        }
    }
    Ok((walk.commits, walk.blobs))
}

/// The path given to a blob that no commit holds.
pub(crate) const UNREACHABLE_PATH: &str = "(no commit holds this blob)";

/// Commits and blobs of the object database that `walk` has not met.
fn unlisted_objects(repo: &Path, walk: &Walk) -> Result<(Vec<String>, Vec<String>), String> {
    let mut child = git(repo)
        .args([
            "cat-file",
            "--batch-all-objects",
            "--unordered",
            "--batch-check=%(objecttype) %(objectname)",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `git cat-file`: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout from `git cat-file`")?;
    let err_thread = drain(child.stderr.take());
    let mut commits = Vec::new();
    let mut blobs = Vec::new();
    for line in BufReader::with_capacity(1 << 16, stdout).lines() {
        let line = line.map_err(|e| format!("reading `git cat-file`: {e}"))?;
        let Some((kind, id)) = line.split_once(' ') else {
            continue;
        };
        let Ok(raw) = hex::decode(id) else { continue };
        match kind {
            "commit" if !walk.commit_ids.contains(raw.as_slice()) => commits.push(id.to_owned()),
            "blob" if !walk.met.contains_key(raw.as_slice()) => blobs.push(id.to_owned()),
            _ => {}
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for `git cat-file`: {e}"))?;
    let err = err_thread.join().unwrap_or_default();
    if !status.success() {
        return Err(one_line(&err));
    }
    Ok((commits, blobs))
}

/// git's error output as one line: its lines trimmed and joined with
/// `; `, so that a report line holds the whole error and the terminal
/// output shows no escaped line breaks.
fn one_line(stderr: &str) -> String {
    stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

fn drain(stderr: Option<std::process::ChildStderr>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            let _ = e.read_to_string(&mut s);
        }
        s
    })
}

/// What the history walks found so far.
#[derive(Default)]
struct Walk {
    commits: Vec<Commit>,
    blobs: Vec<BlobRef>,
    commit_ids: HashSet<Box<[u8]>>,
    /// Every blob a commit introduced: `true` once attributed to a path that
    /// is not excluded (then it is in `blobs`).
    met: HashMap<Box<[u8]>, bool>,
}

impl Walk {
    /// Runs `git log` over `revs` (and the commits in `stdin`, one per line)
    /// and adds what it lists. On a failure what was read is kept.
    fn log(
        &mut self,
        repo: &Path,
        revs: &[&str],
        stdin: Option<String>,
        excluded: &dyn Fn(&str) -> bool,
    ) -> Result<(), String> {
        let mut cmd = git(repo);
        cmd.args([
            "log",
            "--no-color",
            "--reverse",
            "--topo-order",
            "--root",
            "-m",
            "--raw",
            "--no-renames",
            "--no-abbrev",
            "--no-textconv",
            "--no-ext-diff",
            "-z",
            "--format=%x01%H%x02%an <%ae>%x02%aI",
        ])
        .args(revs);
        if stdin.is_some() {
            cmd.arg("--stdin").stdin(Stdio::piped());
        } else {
            cmd.stdin(Stdio::null());
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run `git log`: {e}"))?;
        // git reads all of stdin before it writes; a thread keeps a long
        // list from filling the pipe while nobody reads.
        let writer = match (stdin, child.stdin.take()) {
            (Some(input), Some(mut pipe)) => Some(std::thread::spawn(move || {
                let _ = pipe.write_all(input.as_bytes());
            })),
            _ => None,
        };
        let stdout = child.stdout.take().ok_or("no stdout from `git log`")?;
        let err_thread = drain(child.stderr.take());
        let read = self.parse(BufReader::with_capacity(1 << 16, stdout), excluded);
        if let Some(w) = writer {
            let _ = w.join();
        }
        let status = child
            .wait()
            .map_err(|e| format!("waiting for `git log`: {e}"))?;
        let err = err_thread.join().unwrap_or_default();
        read?;
        if status.success() {
            Ok(())
        } else {
            Err(one_line(&err))
        }
    }

    fn parse(
        &mut self,
        mut reader: impl BufRead,
        excluded: &dyn Fn(&str) -> bool,
    ) -> Result<(), String> {
        let mut token = Vec::new();
        let mut pending: Option<(String, Vec<u8>)> = None; // blob waiting for its path
        loop {
            token.clear();
            let n = reader
                .read_until(0, &mut token)
                .map_err(|e| format!("reading `git log`: {e}"))?;
            if n == 0 {
                return Ok(());
            }
            if token.last() == Some(&0) {
                token.pop();
            }
            let t = token.strip_prefix(b"\n").unwrap_or(&token);
            if let Some((blob, raw)) = pending.take() {
                let path = String::from_utf8_lossy(t).into_owned();
                if excluded(&path) {
                    self.met.entry(raw.into_boxed_slice()).or_insert(false);
                    continue;
                }
                self.met.insert(raw.into_boxed_slice(), true);
                if let Some(c) = self.commits.len().checked_sub(1) {
                    self.blobs.push(BlobRef {
                        blob,
                        commit: c,
                        path,
                    });
                }
                continue;
            }
            if let Some(h) = t.strip_prefix(b"\x01") {
                let h = String::from_utf8_lossy(h);
                let mut parts = h.splitn(3, '\x02');
                let id = parts.next().unwrap_or_default().to_owned();
                if self.commits.last().is_some_and(|c| c.id == id) {
                    continue; // -m repeats the header for each parent
                }
                if let Ok(raw) = hex::decode(&id) {
                    self.commit_ids.insert(raw.into_boxed_slice());
                }
                self.commits.push(Commit {
                    id,
                    author: parts.next().unwrap_or_default().to_owned(),
                    date: parts.next().unwrap_or_default().to_owned(),
                });
            } else if t.first() == Some(&b':') {
                // :old_mode new_mode old_sha new_sha status
                let meta = String::from_utf8_lossy(t);
                let f: Vec<&str> = meta.split(' ').collect();
                if f.len() < 5 {
                    continue;
                }
                let (new_mode, new_sha) = (f[1], f[3]);
                let is_blob = new_mode.starts_with("100") || new_mode == "120000";
                // SHA-1 or SHA-256 repositories; all zeros is "no blob" (a deletion).
                let Ok(raw) = hex::decode(new_sha) else {
                    continue;
                };
                let null = raw.iter().all(|&b| b == 0);
                if is_blob && !null && self.met.get(raw.as_slice()) != Some(&true) {
                    pending = Some((new_sha.to_owned(), raw));
                } else {
                    // Still consume the path token.
                    token.clear();
                    let _ = reader.read_until(0, &mut token);
                }
            }
        }
    }
}

struct CatFile {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl CatFile {
    fn spawn(repo: &Path) -> std::io::Result<Self> {
        let mut child = git(repo)
            .args(["cat-file", "--batch"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .map(|s| BufReader::with_capacity(1 << 16, s))
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    fn request(&mut self, batch: &[BlobRef]) -> std::io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::other("closed"))?;
        let mut req = String::with_capacity(batch.len() * 41);
        for b in batch {
            req.push_str(&b.blob);
            req.push('\n');
        }
        stdin.write_all(req.as_bytes())?;
        stdin.flush()
    }

    fn read_one(
        &mut self,
        blob: &str,
        source: &Source,
        name: &str,
        tx: &Sender<Work>,
        shared: &Shared<'_>,
        cs: &mut ContentScanner<'_>,
    ) -> Result<(), String> {
        let mut header = String::new();
        let n = self
            .stdout
            .read_line(&mut header)
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("`git cat-file` stopped (corrupt object?)".into());
        }
        let fields: Vec<&str> = header.trim_end().split(' ').collect();
        match fields.as_slice() {
            [id, "missing"] if *id == blob => {
                // The process goes on; only this object is gone.
                let input = match source {
                    Source::Git {
                        repository, path, ..
                    } => format!("{repository}: blob {blob} ({path})"),
                    other => other.display_path(),
                };
                shared.issue(
                    Severity::Error,
                    input,
                    format!("git object {blob} is missing or corrupt, skipped"),
                );
                Ok(())
            }
            [id, kind, size] if *id == blob => {
                let size: u64 = size
                    .parse()
                    .map_err(|_| format!("bad header `{}`", header.trim_end()))?;
                if *kind != "blob" {
                    self.skip(size + 1)?;
                    return Ok(());
                }
                if size as usize <= QUEUE_BLOB_MAX {
                    let mut data = vec![0u8; size as usize];
                    self.stdout
                        .read_exact(&mut data)
                        .map_err(|e| e.to_string())?;
                    self.skip(1)?;
                    let work = Work::Blob {
                        data,
                        source: source.clone(),
                        name: name.to_owned(),
                    };
                    tx.send(work).map_err(|_| "workers stopped".to_string())?;
                } else {
                    let mut limited = (&mut self.stdout).take(size);
                    shared.scan_stream(cs, &mut limited, source, name, false);
                    // Drain what the scanner did not read (binary content).
                    std::io::copy(&mut limited, &mut std::io::sink()).map_err(|e| e.to_string())?;
                    self.skip(1)?;
                }
                Ok(())
            }
            _ => Err(format!("unexpected answer `{}`", header.trim_end())),
        }
    }

    fn skip(&mut self, n: u64) -> Result<(), String> {
        let copied = std::io::copy(&mut (&mut self.stdout).take(n), &mut std::io::sink())
            .map_err(|e| e.to_string())?;
        if copied == n {
            Ok(())
        } else {
            Err("`git cat-file` stopped mid-object".into())
        }
    }

    fn finish(mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
