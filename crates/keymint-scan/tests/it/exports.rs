//! Jupyter notebooks, Slack and Jira/Confluence exports: findings located by
//! cell, channel and message, issue or page.

use serde_json::json;

use crate::{Rng, findings, github_token, openai_key, p, run_json};

fn context_of(doc: &serde_json::Value, needle: &str) -> Vec<String> {
    findings(doc)
        .iter()
        .flat_map(|f| f["locations"].as_array().unwrap())
        .filter(|l| l["path"].as_str().unwrap().contains(needle))
        .map(|l| l["context"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[test]
fn a_notebook_key_in_an_output_cell_is_located_by_cell() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let in_source = openai_key(&mut rng);
    let in_output = github_token(&mut rng);
    let nb = json!({
        "nbformat": 4, "nbformat_minor": 5, "metadata": {},
        "cells": [
            {"cell_type": "markdown", "metadata": {}, "source": ["# Demo\n"]},
            {"cell_type": "code", "metadata": {}, "execution_count": 1,
             "source": ["import os\n", format!("os.environ['OPENAI_API_KEY'] = '{in_source}'\n")],
             "outputs": []},
            {"cell_type": "code", "metadata": {}, "execution_count": 2,
             "source": ["!env | grep TOKEN\n"],
             "outputs": [
                {"output_type": "stream", "name": "stdout", "text": ["PATH=/usr/bin\n"]},
                {"output_type": "stream", "name": "stdout", "text": [format!("GITHUB_TOKEN={in_output}\n")]}
             ]}
        ]
    });
    std::fs::write(
        dir.path().join("demo.ipynb"),
        serde_json::to_string_pretty(&nb).unwrap(),
    )
    .unwrap();
    let (code, doc, _) = run_json(&[p(dir.path())]);
    assert_eq!(code, 1);
    let mut ctx = context_of(&doc, "demo.ipynb");
    ctx.sort();
    assert_eq!(
        ctx,
        [
            "notebook cell 2 (code) source",
            "notebook cell 3 (code) output 2"
        ]
    );
}

#[test]
fn slack_export_findings_name_channel_and_message() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let key = github_token(&mut rng);
    std::fs::create_dir_all(dir.path().join("export/deploys")).unwrap();
    std::fs::write(
        dir.path().join("export/channels.json"),
        r#"[{"id":"C1","name":"deploys"}]"#,
    )
    .unwrap();
    let msgs = json!([
        {"type": "message", "user": "U01", "text": "deploying now", "ts": "1700000000.000100"},
        {"type": "message", "user": "U02", "text": format!("use this token: {key}"), "ts": "1700000042.000200"}
    ]);
    std::fs::write(
        dir.path().join("export/deploys/2023-11-14.json"),
        msgs.to_string(),
    )
    .unwrap();
    let (_, doc, _) = run_json(&[p(&dir.path().join("export"))]);
    assert_eq!(
        context_of(&doc, "2023-11-14.json"),
        ["slack #deploys, message ts=1700000042.000200 by U02"]
    );
}

#[test]
fn jira_and_confluence_findings_name_issue_and_page() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let k1 = github_token(&mut rng);
    let k2 = github_token(&mut rng);
    let k3 = github_token(&mut rng);
    let jira = json!({"issues": [
        {"key": "OPS-1", "fields": {"summary": "nothing", "description": "fine"}},
        {"key": "OPS-7", "fields": {"summary": "CI broken", "description": format!("token {k1} expired"),
          "comment": {"comments": [{"body": format!("try {k2}")}]}}}
    ]});
    std::fs::write(dir.path().join("jira.json"), jira.to_string()).unwrap();
    let conf = json!({"results": [{"id": "98765", "type": "page", "title": "Runbook",
        "body": {"storage": {"value": format!("<p>GITHUB_TOKEN={k3}</p>")}}}]});
    std::fs::write(dir.path().join("confluence.json"), conf.to_string()).unwrap();
    let (_, doc, _) = run_json(&[p(dir.path())]);
    let mut jira_ctx = context_of(&doc, "jira.json");
    jira_ctx.sort();
    assert_eq!(
        jira_ctx,
        [
            "jira issue OPS-7, field comment",
            "jira issue OPS-7, field description"
        ]
    );
    assert_eq!(
        context_of(&doc, "confluence.json"),
        ["confluence page \"Runbook\" (id 98765)"]
    );
}

#[test]
fn ci_logs_are_plain_files() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let key = github_token(&mut rng);
    let log = format!(
        "2024-05-01T10:00:00.000Z ##[group]Run actions/checkout@v4\n2024-05-01T10:00:01.000Z + curl -H \"Authorization: Bearer {key}\" https://api.example.invalid\n"
    );
    std::fs::write(dir.path().join("job-123.log"), log).unwrap();
    let (code, doc, _) = run_json(&[p(dir.path())]);
    assert_eq!(code, 1);
    assert_eq!(findings(&doc)[0]["locations"][0]["line"], 2);
}
