//! Every rule's examples are found through the whole pipeline (files on
//! disk, JSON report), and no negative example is.

use keymint_scan::rules::load_rules;

use crate::{findings, p, run_json};

#[test]
fn every_example_is_found_with_its_rule_and_no_negative_example_is() {
    let dir = tempfile::tempdir().unwrap();
    let rules = load_rules(&[]).unwrap();
    let mut expected = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        for (j, ex) in r.examples.iter().enumerate() {
            let path = dir.path().join(format!("pos/{i:03}-{j}.txt"));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, format!("first line\n{ex}\n")).unwrap();
            expected.push((path.display().to_string(), r.id.clone()));
        }
        for (j, ex) in r.negative_examples.iter().enumerate() {
            let path = dir.path().join(format!("neg/{i:03}-{j}.txt"));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, format!("first line\n{ex}\n")).unwrap();
        }
    }
    let (code, doc, _) = run_json(&[p(&dir.path().join("pos"))]);
    assert_eq!(code, 1);
    let got: Vec<(String, String)> = findings(&doc)
        .iter()
        .flat_map(|f| {
            f["locations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| {
                    (
                        l["path"].as_str().unwrap().to_owned(),
                        f["rule_id"].as_str().unwrap().to_owned(),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let missing: Vec<_> = expected.iter().filter(|e| !got.contains(e)).collect();
    assert!(missing.is_empty(), "examples not found: {missing:#?}");
    for f in findings(&doc) {
        for l in f["locations"].as_array().unwrap() {
            assert!(
                l["line"].as_u64().unwrap() >= 2,
                "examples start on line 2: {l}"
            );
        }
    }

    let (code, doc, _) = run_json(&[p(&dir.path().join("neg"))]);
    assert_eq!(findings(&doc).len(), 0, "negative examples found: {doc:#}");
    assert_eq!(code, 0);
}

#[test]
fn a_user_rule_file_adds_rules() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        r#"
[[rule]]
id = "acme.key"
name = "Acme API key"
keywords = ["acme_live_"]
pattern = 'acme_live_[a-z0-9]{16}'
confidence = "medium"
examples = ["ACME=acme_live_0123abcd4567ef89"]
"#,
    )
    .unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("x.env"), "ACME=acme_live_9f8e7d6c5b4a3210\n").unwrap();
    let (code, doc, _) = run_json(&["--rules", p(&rules), p(&data)]);
    assert_eq!(code, 1);
    assert_eq!(findings(&doc)[0]["rule_id"], "acme.key");

    std::fs::write(&rules, "[[rule]]\nid = \"bad\"\n").unwrap();
    let (code, _, err) = crate::run(&["--rules", p(&rules), p(&data)]);
    assert_eq!(code, 2);
    assert!(err.contains("rules.toml"), "{err}");
}
