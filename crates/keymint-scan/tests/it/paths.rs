//! Paths: directories, dotfiles, binary skip, gzip, excludes, stdin.

use std::io::Write;

use crate::{Rng, findings, github_token, openai_key, p, run_json};

#[test]
fn walks_directories_with_dotfiles_gzip_and_skips_binary_and_excluded() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("app/config")).unwrap();
    std::fs::create_dir_all(root.join("node_modules/pkg")).unwrap();
    let k_env = openai_key(&mut rng);
    let k_gz = github_token(&mut rng);
    let k_bin = github_token(&mut rng);
    let k_excl = github_token(&mut rng);
    let k_ci = github_token(&mut rng);
    std::fs::write(root.join(".env"), format!("OPENAI_API_KEY={k_env}\n")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(format!("log line\ntoken={k_gz}\n").as_bytes())
        .unwrap();
    std::fs::write(root.join("app/build.log.gz"), gz.finish().unwrap()).unwrap();
    let mut bin = vec![0x7f, b'E', b'L', b'F', 0, 0, 0, 1];
    bin.extend_from_slice(k_bin.as_bytes());
    std::fs::write(root.join("app/a.out"), bin).unwrap();
    std::fs::write(
        root.join("node_modules/pkg/index.js"),
        format!("t='{k_excl}'\n"),
    )
    .unwrap();
    std::fs::write(
        root.join("app/config/.gitlab-ci.yml"),
        format!("deploy:\n  script:\n    - curl -H 'Authorization: token {k_ci}' https://example.invalid\n"),
    )
    .unwrap();

    let (code, doc, _) = run_json(&["--exclude", "node_modules", p(root)]);
    assert_eq!(code, 1);
    let secrets_at: Vec<(String, u64)> = findings(&doc)
        .iter()
        .map(|f| {
            let l = &f["locations"][0];
            (
                l["path"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_owned(),
                l["line"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(secrets_at.contains(&(".env".into(), 1)), "{secrets_at:?}");
    assert!(
        secrets_at.contains(&("build.log.gz".into(), 2)),
        "{secrets_at:?}"
    );
    assert!(
        secrets_at.contains(&(".gitlab-ci.yml".into(), 3)),
        "{secrets_at:?}"
    );
    assert_eq!(
        secrets_at.len(),
        3,
        "binary and excluded files are not scanned: {secrets_at:?}"
    );
    assert_eq!(doc["summary"]["binary_skipped"], 1);
    // The secret is redacted everywhere in the report.
    let text = doc.to_string();
    for k in [&k_env, &k_gz, &k_ci] {
        assert!(!text.contains(k.as_str()));
    }
}

#[test]
fn the_same_secret_in_two_files_is_one_finding_with_two_locations() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let k = github_token(&mut rng);
    std::fs::write(dir.path().join("a.sh"), format!("export T={k}\n")).unwrap();
    std::fs::write(dir.path().join("b.sh"), format!("\n\nexport T={k}\n")).unwrap();
    let (_, doc, _) = run_json(&[p(dir.path())]);
    let f = findings(&doc);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0]["locations"].as_array().unwrap().len(), 2);
    assert_eq!(f[0]["fingerprint"].as_str().unwrap().len(), 64);
}

#[test]
fn stdin_is_scanned() {
    let mut rng = Rng::new();
    let k = github_token(&mut rng);
    let input = format!("hello\nGITHUB_TOKEN={k}\n");
    let a = crate::args(&["--format", "json", "-"]);
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut stdin = input.as_bytes();
    let code = keymint_scan::cli::execute_with(&a, Some(&mut stdin), false, &mut out, &mut err);
    assert_eq!(code, 1);
    let doc: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let loc = &findings(&doc)[0]["locations"][0];
    assert_eq!(loc["kind"], "stdin");
    assert_eq!(loc["line"], 2);
    assert_eq!(loc["column"], 14);
}

#[test]
fn tar_archives_are_scanned_member_by_member() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let k1 = github_token(&mut rng);
    let k2 = openai_key(&mut rng);
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("backup/app/.env", format!("A=1\nGITHUB_TOKEN={k1}\n")),
        ("backup/app/settings.py", format!("KEY = '{k2}'\n")),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_bytes()).unwrap();
    }
    let tarball = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tarball).unwrap();
    std::fs::write(dir.path().join("backup.tar"), &tarball).unwrap();
    std::fs::write(dir.path().join("backup.tgz"), gz.finish().unwrap()).unwrap();

    let (code, doc, err) = run_json(&[p(dir.path())]);
    assert_eq!(code, 1, "{err}");
    let mut paths: Vec<String> = findings(&doc)
        .iter()
        .flat_map(|f| f["locations"].as_array().unwrap())
        .map(|l| {
            let path = l["path"].as_str().unwrap();
            format!("{}:{}", path.rsplit('/').next().unwrap(), l["line"])
        })
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [".env:2", ".env:2", "settings.py:1", "settings.py:1"]
    );
    let all: Vec<&str> = findings(&doc)
        .iter()
        .flat_map(|f| f["locations"].as_array().unwrap())
        .map(|l| l["path"].as_str().unwrap())
        .collect();
    assert!(
        all.iter().any(|p| p.contains("backup.tgz!backup/app/.env")),
        "{all:?}"
    );
    assert_eq!(doc["summary"]["binary_skipped"], 0);

    // A truncated archive: reported, and the members before the damage are scanned.
    std::fs::write(
        dir.path().join("backup.tar"),
        &tarball[..tarball.len() - 1200],
    )
    .unwrap();
    std::fs::remove_file(dir.path().join("backup.tgz")).unwrap();
    let (code, doc, err) = run_json(&[p(dir.path())]);
    assert_eq!(code, 1, "{err}");
    assert!(
        findings(&doc)
            .iter()
            .any(|f| f["rule_id"] == "github.token")
    );
    assert!(
        err.contains("backup.tar") && err.contains("truncated"),
        "{err}"
    );
}
