//! `--processes`: environments of running processes.

use crate::{Rng, findings, github_token, p, run_json};

#[test]
fn a_proc_tree_is_read_and_findings_name_the_variable() {
    let mut rng = Rng::new();
    let root = tempfile::tempdir().unwrap();
    let key = github_token(&mut rng);
    std::fs::create_dir_all(root.path().join("4242")).unwrap();
    std::fs::write(
        root.path().join("4242/environ"),
        format!("HOME=/root\0GITHUB_TOKEN={key}\0TERM=xterm\0"),
    )
    .unwrap();
    std::fs::write(root.path().join("4242/comm"), "agent\n").unwrap();
    let arg_key = github_token(&mut rng);
    std::fs::write(
        root.path().join("4242/cmdline"),
        format!("python3\0agent.py\0--token\0{arg_key}\0"),
    )
    .unwrap();
    std::fs::create_dir_all(root.path().join("self")).unwrap();
    let (code, doc, _) = run_json(&["--processes", "--proc-root", p(root.path())]);
    assert_eq!(code, 1);
    let mut contexts: Vec<String> = findings(&doc)
        .iter()
        .map(|f| {
            let l = &f["locations"][0];
            assert_eq!(l["kind"], "process");
            assert_eq!(l["pid"], 4242);
            assert_eq!(l["command"], "agent");
            l["context"].as_str().unwrap().to_owned()
        })
        .collect();
    contexts.sort();
    assert_eq!(
        contexts,
        [
            "command line, argument 3",
            "environment variable GITHUB_TOKEN"
        ]
    );
}

#[cfg(target_os = "linux")]
#[test]
fn a_real_child_process_environment_is_found() {
    let mut rng = Rng::new();
    let key = github_token(&mut rng);
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .env("KEYMINT_SCAN_TEST_TOKEN", &key)
        .spawn()
        .unwrap();
    let (code, doc, _) = run_json(&["--processes"]);
    let pid = child.id();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(code, 1);
    let found = findings(&doc)
        .iter()
        .flat_map(|f| f["locations"].as_array().unwrap())
        .any(|l| l["pid"] == pid && l["context"] == "environment variable KEYMINT_SCAN_TEST_TOKEN");
    assert!(found, "{doc:#}");
}
