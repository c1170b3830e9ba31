//! `--git`: the full history, every blob once, attributed to the commit that
//! introduced it, including keys deleted later; corrupt objects are reported.

use crate::{Rng, anthropic_key, findings, git, github_token, p, run_json};

struct Repo {
    dir: tempfile::TempDir,
}

impl Repo {
    fn new() -> Self {
        Self::with_format("sha1")
    }

    fn with_format(format: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        git(
            dir.path(),
            &[
                "init",
                "-q",
                "-b",
                "main",
                &format!("--object-format={format}"),
            ],
        );
        git(dir.path(), &["config", "user.name", "Ada Lovelace"]);
        git(dir.path(), &["config", "user.email", "ada@example.invalid"]);
        Self { dir }
    }

    fn commit(&self, files: &[(&str, Option<&str>)], msg: &str, date: &str) -> String {
        for (name, content) in files {
            let path = self.dir.path().join(name);
            match content {
                Some(c) => {
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(&path, c).unwrap();
                }
                None => std::fs::remove_file(&path).unwrap(),
            }
        }
        git(self.dir.path(), &["add", "-A"]);
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(self.dir.path())
            .args(["commit", "-q", "-m", msg])
            .env("GIT_AUTHOR_DATE", date)
            .env("GIT_COMMITTER_DATE", date)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        git(self.dir.path(), &["rev-parse", "HEAD"])
            .trim()
            .to_owned()
    }
}

fn location_of<'a>(doc: &'a serde_json::Value, rule: &str) -> Vec<&'a serde_json::Value> {
    findings(doc)
        .iter()
        .filter(|f| f["rule_id"] == rule)
        .flat_map(|f| f["locations"].as_array().unwrap())
        .collect()
}

#[test]
fn history_is_scanned_with_attribution_including_deleted_keys() {
    let mut rng = Rng::new();
    let repo = Repo::new();
    let gh = github_token(&mut rng);
    let an = anthropic_key(&mut rng);
    let c1 = repo.commit(
        &[("README.md", Some("hello\n"))],
        "init",
        "2024-01-01T10:00:00Z",
    );
    let c2 = repo.commit(
        &[("config/.env", Some(&format!("A=1\nGITHUB_TOKEN={gh}\n")))],
        "add env",
        "2024-02-01T10:00:00Z",
    );
    // Deleted in the next commit: still found, attributed to c2.
    repo.commit(
        &[("config/.env", None)],
        "oops, remove",
        "2024-02-02T10:00:00Z",
    );
    // The same content under another path later: the blob is scanned once.
    repo.commit(
        &[("copy/.env", Some(&format!("A=1\nGITHUB_TOKEN={gh}\n")))],
        "copy",
        "2024-03-01T10:00:00Z",
    );
    // A key on a side branch only.
    git(repo.dir.path(), &["checkout", "-q", "-b", "side"]);
    let c5 = repo.commit(
        &[("bot.py", Some(&format!("KEY = \"{an}\"\n")))],
        "side",
        "2024-04-01T10:00:00Z",
    );
    git(repo.dir.path(), &["checkout", "-q", "main"]);
    assert_ne!(c1, c2);

    let (code, doc, err) = run_json(&["--git", p(repo.dir.path())]);
    assert_eq!(code, 1, "{err}");
    let gh_locs = location_of(&doc, "github.token");
    assert_eq!(gh_locs.len(), 1, "one blob, one location: {gh_locs:?}");
    let l = gh_locs[0];
    assert_eq!(l["kind"], "git");
    assert_eq!(l["commit"], c2.as_str());
    assert_eq!(l["path"], "config/.env");
    assert_eq!(l["author"], "Ada Lovelace <ada@example.invalid>");
    assert!(
        l["date"]
            .as_str()
            .unwrap()
            .starts_with("2024-02-01T10:00:00")
    );
    assert_eq!(l["line"], 2);

    let an_locs = location_of(&doc, "anthropic.api-key");
    assert_eq!(an_locs.len(), 1);
    assert_eq!(an_locs[0]["commit"], c5.as_str());
    assert_eq!(an_locs[0]["path"], "bot.py");
    assert!(doc["summary"]["blobs"].as_u64().unwrap() >= 3);
    assert!(
        doc["issues"].as_array().unwrap().is_empty(),
        "{:?}",
        doc["issues"]
    );
}

#[test]
fn a_corrupt_object_is_reported_and_the_rest_of_the_history_is_scanned() {
    let mut rng = Rng::new();
    let repo = Repo::new();
    let good = github_token(&mut rng);
    let bad = github_token(&mut rng);
    repo.commit(
        &[("bad.txt", Some(&format!("T={bad}\n")))],
        "one",
        "2024-01-01T10:00:00Z",
    );
    repo.commit(
        &[("good.txt", Some(&format!("T={good}\n")))],
        "two",
        "2024-01-02T10:00:00Z",
    );
    let blob = git(repo.dir.path(), &["rev-parse", "HEAD:bad.txt"])
        .trim()
        .to_owned();
    let obj = repo
        .dir
        .path()
        .join(".git/objects")
        .join(&blob[..2])
        .join(&blob[2..]);
    let mut perms = std::fs::metadata(&obj).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&obj, perms).unwrap();
    std::fs::write(&obj, b"this is not a zlib stream").unwrap();

    let (code, doc, err) = run_json(&["--git", p(repo.dir.path())]);
    assert_eq!(code, 1, "{err}");
    let f = findings(&doc);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0]["locations"][0]["path"], "good.txt");
    let issues = doc["issues"].as_array().unwrap();
    assert!(
        issues
            .iter()
            .any(|i| i["severity"] == "error" && i["input"].as_str().unwrap().contains(&blob)),
        "{issues:?}"
    );
}

#[test]
fn not_a_repository_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = crate::run(&["--git", p(dir.path())]);
    assert_eq!(code, 2, "{out}");
    assert!(err.contains("git log"), "{err}");
}

/// git's error over several lines (a corrupt tree: `error: inflate …`,
/// `error: unable to unpack …`, `fatal: loose object … is corrupt`) reads
/// as one line on the terminal, its lines joined with `; `, not with a
/// literal `\n` between them.
#[test]
fn a_multi_line_git_error_reads_as_one_line() {
    let repo = Repo::new();
    repo.commit(&[("a.txt", Some("one\n"))], "one", "2024-01-01T10:00:00Z");
    let tree = git(repo.dir.path(), &["rev-parse", "HEAD^{tree}"])
        .trim()
        .to_owned();
    let obj = repo
        .dir
        .path()
        .join(".git/objects")
        .join(&tree[..2])
        .join(&tree[2..]);
    let mut perms = std::fs::metadata(&obj).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&obj, perms).unwrap();
    std::fs::write(&obj, b"this is not a zlib stream").unwrap();

    let (code, out, err) = crate::run(&["--no-progress", "--git", p(repo.dir.path())]);
    assert_eq!(code, 2, "{out}");
    let line = err
        .lines()
        .find(|l| l.contains("`git log` failed"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(!line.contains("\\n"), "{line}");
    assert!(line.contains("; fatal: "), "{line}");
}

#[test]
fn sha256_repositories_are_scanned() {
    let mut rng = Rng::new();
    let repo = Repo::with_format("sha256");
    let key = github_token(&mut rng);
    let c = repo.commit(
        &[("a.txt", Some(&format!("T={key}\n")))],
        "one",
        "2024-01-01T10:00:00Z",
    );
    assert_eq!(c.len(), 64);
    let (code, doc, err) = run_json(&["--git", p(repo.dir.path())]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(findings(&doc)[0]["locations"][0]["commit"], c.as_str());
}

#[test]
fn excluded_paths_are_left_out_of_history() {
    let mut rng = Rng::new();
    let repo = Repo::new();
    let fixture = github_token(&mut rng);
    let real = github_token(&mut rng);
    repo.commit(
        &[
            ("tests/fixtures/token.txt", Some(&format!("T={fixture}\n"))),
            ("app/.env", Some(&format!("T={real}\n"))),
        ],
        "one",
        "2024-01-01T10:00:00Z",
    );
    let (code, doc, _) = run_json(&[
        "--git",
        "--exclude",
        "tests/fixtures/**",
        p(repo.dir.path()),
    ]);
    assert_eq!(code, 1);
    let f = findings(&doc);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0]["locations"][0]["path"], "app/.env");
}

/// Keys in objects that no branch reaches: a commit force-pushed away (its
/// branch deleted, the reflog expired), a pull-request ref of a mirror, and
/// a blob that no commit holds at all.
#[test]
fn objects_no_branch_reaches_are_scanned() {
    let mut rng = Rng::new();
    let repo = Repo::new();
    let dir = repo.dir.path();
    let on_main = github_token(&mut rng);
    let pushed_away = github_token(&mut rng);
    let in_pull = anthropic_key(&mut rng);
    let loose = github_token(&mut rng);
    repo.commit(
        &[("main.txt", Some(&format!("T={on_main}\n")))],
        "one",
        "2024-01-01T10:00:00Z",
    );
    git(dir, &["checkout", "-q", "-b", "gone"]);
    let gone = repo.commit(
        &[("leak.env", Some(&format!("T={pushed_away}\n")))],
        "leak",
        "2024-01-02T10:00:00Z",
    );
    git(dir, &["checkout", "-q", "main"]);
    git(dir, &["branch", "-q", "-D", "gone"]);
    git(dir, &["reflog", "expire", "--expire=now", "--all"]);
    // A mirror keeps pull requests under refs/pull/, not under refs/heads/.
    git(dir, &["checkout", "-q", "-b", "pr"]);
    let pr = repo.commit(
        &[("pr.py", Some(&format!("KEY = \"{in_pull}\"\n")))],
        "pr",
        "2024-01-03T10:00:00Z",
    );
    git(dir, &["checkout", "-q", "main"]);
    git(dir, &["update-ref", "refs/pull/1/head", &pr]);
    git(dir, &["branch", "-q", "-D", "pr"]);
    let blob_path = dir.join("loose.txt");
    std::fs::write(&blob_path, format!("T={loose}\n")).unwrap();
    let blob = git(dir, &["hash-object", "-w", "loose.txt"])
        .trim()
        .to_owned();
    std::fs::remove_file(&blob_path).unwrap();
    // Nothing but the object database holds them now.
    let reachable = git(dir, &["log", "--all", "--format=%H"]);
    assert!(!reachable.contains(&gone), "{reachable}");

    let (code, doc, err) = run_json(&["--git", p(dir)]);
    assert_eq!(code, 1, "{err}");
    let gh = location_of(&doc, "github.token");
    assert_eq!(gh.len(), 3, "{gh:?}");
    let at = |secret_path: &str| {
        gh.iter()
            .find(|l| l["path"] == secret_path)
            .unwrap_or_else(|| panic!("no finding at {secret_path}: {gh:?}"))
    };
    assert_eq!(at("main.txt")["kind"], "git");
    assert_eq!(at("leak.env")["commit"], gone.as_str());
    let orphan = gh
        .iter()
        .find(|l| l["blob"] == blob.as_str())
        .unwrap_or_else(|| panic!("the loose blob is not reported: {gh:?}"));
    assert_eq!(orphan["commit"], "");
    let an = location_of(&doc, "anthropic.api-key");
    assert_eq!(an.len(), 1);
    assert_eq!(an[0]["commit"], pr.as_str());
    assert_eq!(an[0]["path"], "pr.py");
    assert!(
        doc["issues"].as_array().unwrap().is_empty(),
        "{:?}",
        doc["issues"]
    );
}

/// A scanned repository's `.git/config` is whoever made it: a command in
/// `core.fsmonitor` is not run (`git log --all` would run it), a UTF-16
/// `i18n.logOutputEncoding` does not hide the history from the parser, and
/// a replacement ref does not swap a commit for a clean one.
#[test]
fn the_repository_configuration_runs_nothing_and_hides_nothing() {
    let mut rng = Rng::new();
    let repo = Repo::new();
    let dir = repo.dir.path();
    let key = github_token(&mut rng);
    let leak = repo.commit(
        &[("leak.env", Some(&format!("T={key}\n")))],
        "leak",
        "2024-01-01T10:00:00Z",
    );
    repo.commit(
        &[("leak.env", Some("T=nothing\n"))],
        "clean",
        "2024-01-02T10:00:00Z",
    );
    // A commit with the clean tree and no parent stands in for the leak.
    let tree = git(dir, &["rev-parse", "HEAD^{tree}"]);
    let stand_in = git(dir, &["commit-tree", tree.trim(), "-m", "nothing here"]);
    git(dir, &["replace", &leak, stand_in.trim()]);
    let ran = tempfile::tempdir().unwrap();
    let marker = ran.path().join("ran");
    git(
        dir,
        &["config", "core.fsmonitor", &format!("touch {}", p(&marker))],
    );
    git(dir, &["config", "i18n.logOutputEncoding", "UTF-16"]);

    let (code, doc, err) = run_json(&["--git", p(dir)]);
    assert!(!marker.exists(), "the repository's fsmonitor command ran");
    assert_eq!(code, 1, "{err}");
    let gh = location_of(&doc, "github.token");
    assert_eq!(gh.len(), 1, "{gh:?}");
    assert_eq!(gh[0]["commit"], leak.as_str(), "{gh:?}");
    assert_eq!(gh[0]["path"], "leak.env");
    assert_eq!(gh[0]["author"], "Ada Lovelace <ada@example.invalid>");
}
