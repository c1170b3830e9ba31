//! Exit codes, formats, redaction, baseline and the inline allow comment.

use crate::{Rng, anthropic_key, findings, github_token, p, run, run_json};

#[test]
fn exit_codes_are_0_clean_1_found_2_error() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("clean.txt"), "nothing to see\n").unwrap();
    assert_eq!(run(&[p(dir.path())]).0, 0);
    std::fs::write(
        dir.path().join("k.txt"),
        format!("T={}\n", github_token(&mut rng)),
    )
    .unwrap();
    assert_eq!(run(&[p(dir.path())]).0, 1);
    let (code, _, err) = run(&["--baseline", "/nonexistent/baseline.json", p(dir.path())]);
    assert_eq!(code, 2);
    assert!(err.starts_with("error: cannot read baseline"), "{err}");
}

#[test]
fn human_output_groups_by_secret_and_redacts() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let key = anthropic_key(&mut rng);
    std::fs::write(
        dir.path().join("a.env"),
        format!("ANTHROPIC_API_KEY={key}\n"),
    )
    .unwrap();
    std::fs::write(dir.path().join("b.py"), format!("# x\nkey = \"{key}\"\n")).unwrap();
    let (code, out, err) = run(&["--no-progress", p(dir.path())]);
    assert_eq!(code, 1);
    assert!(!out.contains(&key), "{out}");
    assert_eq!(
        out.matches("Anthropic API key [anthropic.api-key").count(),
        1,
        "{out}"
    );
    assert!(out.contains("a.env:1:19"), "{out}");
    assert!(out.contains("b.py:2:8"), "{out}");
    assert!(out.contains("sk-ant-api03"), "{out}");
    assert!(err.contains("1 secret found (2 locations)"), "{err}");
    assert!(err.contains("2 files"), "{err}");

    let (_, out, _) = run(&["--show-secrets", p(dir.path())]);
    assert!(out.contains(&key));
}

#[test]
fn json_and_jsonl_carry_rule_location_and_fingerprint_but_no_secret() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let key = github_token(&mut rng);
    std::fs::write(dir.path().join("a.txt"), format!("x\n  {key}\n")).unwrap();
    let (_, doc, _) = run_json(&[p(dir.path())]);
    let f = &findings(&doc)[0];
    assert_eq!(f["rule_id"], "github.token");
    assert_eq!(f["confidence"], "high");
    assert_eq!(f["locations"][0]["kind"], "file");
    assert_eq!(f["locations"][0]["line"], 2);
    assert_eq!(f["locations"][0]["column"], 3);
    assert!(f.get("secret").is_none());
    assert_eq!(doc["summary"]["findings"], 1);
    assert!(doc["summary"]["bytes"].as_u64().unwrap() > 40);

    let (code, out, _) = run(&["--format", "jsonl", p(dir.path())]);
    assert_eq!(code, 1);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["fingerprint"], f["fingerprint"]);
    assert!(!out.contains(&key));

    let (_, out, _) = run(&["--format", "jsonl", "--show-secrets", p(dir.path())]);
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(v["secret"], key.as_str());
}

#[test]
fn a_baseline_suppresses_known_findings_only() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let old = github_token(&mut rng);
    std::fs::write(data.join("old.txt"), format!("T={old}\n")).unwrap();
    let baseline = dir.path().join("baseline.json");
    let (code, _, _) = run(&["--write-baseline", p(&baseline), p(&data)]);
    assert_eq!(code, 0);
    let text = std::fs::read_to_string(&baseline).unwrap();
    assert!(!text.contains(&old), "the baseline holds no secret");
    assert_eq!(run(&["--baseline", p(&baseline), p(&data)]).0, 0);

    let new = github_token(&mut rng);
    std::fs::write(data.join("new.txt"), format!("T={new}\n")).unwrap();
    let (code, doc, err) = run_json(&["--baseline", p(&baseline), p(&data)]);
    assert_eq!(code, 1);
    assert_eq!(findings(&doc).len(), 1);
    assert!(
        findings(&doc)[0]["locations"][0]["path"]
            .as_str()
            .unwrap()
            .ends_with("new.txt")
    );
    assert_eq!(doc["summary"]["suppressed_by_baseline"], 1);
    assert!(err.contains("1 suppressed by the baseline"), "{err}");
}

#[test]
fn an_inline_allow_comment_allows_one_line() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let a = github_token(&mut rng);
    let b = github_token(&mut rng);
    std::fs::write(
        dir.path().join("t.py"),
        format!("FIXTURE = \"{a}\"  # keymint:allow\nREAL = \"{b}\"\n"),
    )
    .unwrap();
    let (code, doc, _) = run_json(&[p(dir.path())]);
    assert_eq!(code, 1);
    assert_eq!(findings(&doc).len(), 1);
    assert_eq!(findings(&doc)[0]["locations"][0]["line"], 2);
}

#[test]
fn output_to_a_file_and_list_rules() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("k.txt"),
        format!("T={}\n", github_token(&mut rng)),
    )
    .unwrap();
    let report = dir.path().join("out.sarif");
    let (code, out, _) = run(&[
        "--format",
        "sarif",
        "-o",
        p(&report),
        p(&dir.path().join("k.txt")),
    ]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(doc["version"], "2.1.0");

    let (code, out, _) = run(&["--list-rules"]);
    assert_eq!(code, 0);
    for id in [
        "openai.project-key",
        "anthropic.api-key",
        "keymint.token",
        "aws.access-key-id",
        "github.token",
    ] {
        assert!(out.contains(id), "{id}");
    }
}

#[test]
fn keymint_tokens_are_listed_for_revocation_with_the_raw_token_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let token =
        keymint_core::token::Token::generate(keymint_core::token::TokenKind::Access).unwrap();
    std::fs::write(
        dir.path().join("agent.env"),
        format!("OPENAI_API_KEY={}\n", token.expose()),
    )
    .unwrap();
    let a = crate::args(&[p(dir.path())]);
    let scanned = keymint_scan::cli::scan(&a, None, false).unwrap();
    let found: Vec<_> = scanned.report.keymint_tokens().collect();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].secret.expose(), token.expose());
    assert!(
        !serde_json::to_string(found[0])
            .unwrap()
            .contains(token.expose())
    );
}

/// A file name, a commit author or a symbolic link is the scanned input's
/// to choose: in the human report and the issues on stderr its control
/// characters are shown as escapes, so it can neither drive the terminal
/// (retitle it, clear the findings above) nor forge a line of the report.
#[cfg(unix)]
#[test]
fn names_from_the_input_cannot_drive_the_terminal_or_forge_report_lines() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let key = github_token(&mut rng);
    let forged = "x.txt\n  found at     forged.env:1:1";
    for name in [
        "esc\u{1b}]0;PWNED\u{7}\u{1b}[2J.txt",
        forged,
        "rtl\u{202e}txt.env",
    ] {
        std::fs::write(dir.path().join(name), format!("T={key}\n")).unwrap();
    }
    std::os::unix::fs::symlink(".", dir.path().join("loop\u{1b}[2J")).unwrap();
    let (code, out, err) = run(&["--no-progress", "--follow", p(dir.path())]);
    assert_eq!(code, 1, "{out}\n{err}");
    for text in [&out, &err] {
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}') && !text.contains('\u{202e}'),
            "{text:?}"
        );
    }
    assert!(
        out.contains("esc\\u{1b}]0;PWNED\\u{7}\\u{1b}[2J.txt:1:3"),
        "{out}"
    );
    assert!(out.contains("rtl\\u{202e}txt.env:1:3"), "{out}");
    // The forged name is one location line, its newline shown as `\n`.
    assert!(
        out.contains("x.txt\\n  found at     forged.env:1:1:1:3"),
        "{out}"
    );
    assert!(
        !out.lines()
            .any(|l| l.starts_with("  found at     forged.env")),
        "{out}"
    );
    assert!(err.contains("loop\\u{1b}[2J"), "{err}");
}
