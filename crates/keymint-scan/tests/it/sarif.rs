//! SARIF 2.1.0 output, checked against the constraints of the OASIS schema
//! (`sarif-schema-2.1.0.json`) for every object kind keymint emits: required
//! properties, no property outside the schema's list (the schema sets
//! `additionalProperties: false`), types, enums and minimums; plus what
//! GitHub code scanning requires on top (a rule id, a message text, a
//! physical location with a relative URI and a start line).

use serde_json::{Map, Value};

use crate::{Rng, github_token, openai_key, p, run};

/// (allowed properties, required properties) of each SARIF object kind.
fn schema(kind: &str) -> (&'static [&'static str], &'static [&'static str]) {
    match kind {
        "sarifLog" => (
            &[
                "version",
                "$schema",
                "runs",
                "inlineExternalProperties",
                "properties",
            ],
            &["version", "runs"],
        ),
        "run" => (
            &[
                "tool",
                "invocations",
                "conversion",
                "language",
                "versionControlProvenance",
                "originalUriBaseIds",
                "artifacts",
                "logicalLocations",
                "graphs",
                "results",
                "automationDetails",
                "runAggregates",
                "baselineGuid",
                "redactionTokens",
                "defaultEncoding",
                "defaultSourceLanguage",
                "newlineSequences",
                "columnKind",
                "externalPropertyFileReferences",
                "threadFlowLocations",
                "taxonomies",
                "addresses",
                "translations",
                "policies",
                "webRequests",
                "webResponses",
                "specialLocations",
                "properties",
            ],
            &["tool"],
        ),
        "tool" => (&["driver", "extensions", "properties"], &["driver"]),
        "toolComponent" => (
            &[
                "guid",
                "name",
                "organization",
                "product",
                "productSuite",
                "shortDescription",
                "fullDescription",
                "fullName",
                "version",
                "semanticVersion",
                "dottedQuadFileVersion",
                "releaseDateUtc",
                "downloadUri",
                "informationUri",
                "globalMessageStrings",
                "notifications",
                "rules",
                "taxa",
                "locations",
                "language",
                "contents",
                "isComprehensive",
                "localizedDataSemanticVersion",
                "minimumRequiredLocalizedDataSemanticVersion",
                "associatedComponent",
                "translationMetadata",
                "supportedTaxonomies",
                "properties",
            ],
            &["name"],
        ),
        "reportingDescriptor" => (
            &[
                "id",
                "deprecatedIds",
                "guid",
                "deprecatedGuids",
                "name",
                "deprecatedNames",
                "shortDescription",
                "fullDescription",
                "messageStrings",
                "defaultConfiguration",
                "helpUri",
                "help",
                "relationships",
                "properties",
            ],
            &["id"],
        ),
        "reportingConfiguration" => (
            &["enabled", "level", "rank", "parameters", "properties"],
            &[],
        ),
        "multiformatMessageString" => (&["text", "markdown", "properties"], &["text"]),
        "message" => (&["text", "markdown", "id", "arguments", "properties"], &[]),
        "result" => (
            &[
                "ruleId",
                "ruleIndex",
                "rule",
                "kind",
                "level",
                "message",
                "analysisTarget",
                "locations",
                "guid",
                "correlationGuid",
                "occurrenceCount",
                "partialFingerprints",
                "fingerprints",
                "stacks",
                "codeFlows",
                "graphs",
                "graphTraversals",
                "relatedLocations",
                "suppressions",
                "baselineState",
                "rank",
                "attachments",
                "hostedViewerUri",
                "workItemUris",
                "provenance",
                "fixes",
                "taxa",
                "webRequest",
                "webResponse",
                "properties",
            ],
            &["message"],
        ),
        "location" => (
            &[
                "id",
                "physicalLocation",
                "logicalLocations",
                "message",
                "annotations",
                "relationships",
                "properties",
            ],
            &[],
        ),
        "physicalLocation" => (
            &[
                "address",
                "artifactLocation",
                "region",
                "contextRegion",
                "properties",
            ],
            &[],
        ),
        "artifactLocation" => (
            &["uri", "uriBaseId", "index", "description", "properties"],
            &[],
        ),
        "region" => (
            &[
                "startLine",
                "startColumn",
                "endLine",
                "endColumn",
                "charOffset",
                "charLength",
                "byteOffset",
                "byteLength",
                "snippet",
                "message",
                "sourceLanguage",
                "properties",
            ],
            &[],
        ),
        other => panic!("no schema entry for {other}"),
    }
}

fn obj<'a>(v: &'a Value, kind: &str, path: &str) -> &'a Map<String, Value> {
    let m = v
        .as_object()
        .unwrap_or_else(|| panic!("{path}: {kind} must be an object"));
    let (allowed, required) = schema(kind);
    for k in m.keys() {
        assert!(
            allowed.contains(&k.as_str()),
            "{path}: `{k}` is not a property of {kind}"
        );
    }
    for r in required {
        assert!(m.contains_key(*r), "{path}: {kind} requires `{r}`");
    }
    if let Some(props) = m.get("properties") {
        let pm = props
            .as_object()
            .unwrap_or_else(|| panic!("{path}.properties must be an object"));
        if let Some(tags) = pm.get("tags") {
            let t = tags.as_array().unwrap();
            assert!(t.iter().all(Value::is_string), "{path}: tags are strings");
            let mut u: Vec<_> = t.iter().map(|x| x.as_str().unwrap()).collect();
            u.sort_unstable();
            u.dedup();
            assert_eq!(u.len(), t.len(), "{path}: tags are unique");
        }
    }
    m
}

fn mfms(v: &Value, path: &str) {
    let m = obj(v, "multiformatMessageString", path);
    assert!(m["text"].is_string());
}

fn region(v: &Value, path: &str) {
    let m = obj(v, "region", path);
    for k in ["startLine", "startColumn", "endLine", "endColumn"] {
        if let Some(x) = m.get(k) {
            assert!(
                x.as_u64().is_some_and(|n| n >= 1),
                "{path}.{k} is an integer >= 1"
            );
        }
    }
    if let Some(msg) = m.get("message") {
        obj(msg, "message", &format!("{path}.message"));
    }
}

fn uri_reference_ok(uri: &str) -> bool {
    !uri.is_empty()
        && uri
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~:/?#[]@!$&'()*+,;=%".contains(&b))
}

/// Validates a whole log; returns the results.
fn validate(doc: &Value) -> Vec<Value> {
    let log = obj(doc, "sarifLog", "$");
    assert_eq!(log["version"], "2.1.0");
    let runs = log["runs"].as_array().expect("runs is an array");
    assert_eq!(runs.len(), 1);
    let run = obj(&runs[0], "run", "runs[0]");
    if let Some(ck) = run.get("columnKind") {
        assert!(["utf16CodeUnits", "unicodeCodePoints"].contains(&ck.as_str().unwrap()));
    }
    let tool = obj(&run["tool"], "tool", "tool");
    let driver = obj(&tool["driver"], "toolComponent", "driver");
    assert!(driver["name"].is_string());
    let rules = driver["rules"].as_array().unwrap();
    let mut ids = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let path = format!("rules[{i}]");
        let m = obj(r, "reportingDescriptor", &path);
        ids.push(m["id"].as_str().unwrap().to_owned());
        for k in ["shortDescription", "fullDescription", "help"] {
            if let Some(x) = m.get(k) {
                mfms(x, &format!("{path}.{k}"));
            }
        }
        if let Some(dc) = m.get("defaultConfiguration") {
            let c = obj(
                dc,
                "reportingConfiguration",
                &format!("{path}.defaultConfiguration"),
            );
            assert!(["none", "note", "warning", "error"].contains(&c["level"].as_str().unwrap()));
        }
        // GitHub: security-severity is a number in a string.
        let sev = m["properties"]["security-severity"].as_str().unwrap();
        assert!(sev.parse::<f64>().is_ok());
    }
    let results = run["results"].as_array().unwrap().clone();
    for (i, r) in results.iter().enumerate() {
        let path = format!("results[{i}]");
        let m = obj(r, "result", &path);
        let rule_id = m["ruleId"].as_str().expect("GitHub requires ruleId");
        if let Some(idx) = m.get("ruleIndex") {
            let idx = idx.as_u64().unwrap() as usize;
            assert_eq!(ids[idx], rule_id, "{path}: ruleIndex points at its rule");
        }
        assert!(["none", "note", "warning", "error"].contains(&m["level"].as_str().unwrap()));
        let msg = obj(&m["message"], "message", &format!("{path}.message"));
        assert!(msg["text"].as_str().is_some_and(|t| !t.is_empty()));
        let pf = m["partialFingerprints"].as_object().unwrap();
        assert!(pf.values().all(Value::is_string));
        let locs = m["locations"].as_array().unwrap();
        assert!(!locs.is_empty());
        for (j, l) in locs.iter().enumerate() {
            let lp = format!("{path}.locations[{j}]");
            let lm = obj(l, "location", &lp);
            let phys = obj(
                &lm["physicalLocation"],
                "physicalLocation",
                &format!("{lp}.physicalLocation"),
            );
            let art = obj(
                &phys["artifactLocation"],
                "artifactLocation",
                &format!("{lp}.artifactLocation"),
            );
            let uri = art["uri"].as_str().unwrap();
            assert!(uri_reference_ok(uri), "{lp}: `{uri}` is a URI reference");
            region(&phys["region"], &format!("{lp}.region"));
            assert!(
                phys["region"]["startLine"].as_u64().is_some(),
                "GitHub needs a start line"
            );
            if let Some(c) = phys.get("contextRegion") {
                region(c, &format!("{lp}.contextRegion"));
            }
        }
    }
    results
}

#[test]
fn sarif_output_follows_the_schema_and_github_requirements() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let gh = github_token(&mut rng);
    let oa = openai_key(&mut rng);
    std::fs::create_dir(dir.path().join("src dir")).unwrap();
    std::fs::write(
        dir.path().join("src dir/app.py"),
        format!("import os\nTOKEN = \"{gh}\"\n"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("nb.ipynb"),
        serde_json::json!({"cells": [{"cell_type": "code", "source": [format!("key = '{oa}'")], "outputs": []}], "nbformat": 4})
            .to_string(),
    )
    .unwrap();
    let (code, out, _) = run(&["--format", "sarif", "--show-secrets", p(dir.path())]);
    assert_eq!(code, 1);
    assert!(
        !out.contains(&gh) && !out.contains(&oa),
        "SARIF never carries the secret"
    );
    let doc: Value = serde_json::from_str(&out).unwrap();
    let results = validate(&doc);
    assert_eq!(results.len(), 2);
    let py = results
        .iter()
        .find(|r| r["ruleId"] == "github.token")
        .unwrap();
    let loc = &py["locations"][0]["physicalLocation"];
    assert!(
        loc["artifactLocation"]["uri"]
            .as_str()
            .unwrap()
            .ends_with("src%20dir/app.py")
    );
    assert_eq!(loc["region"]["startLine"], 2);
    assert_eq!(loc["region"]["startColumn"], 10);
    assert_eq!(loc["region"]["endColumn"], 50);
}

#[test]
fn an_empty_sarif_report_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.txt"), "clean\n").unwrap();
    let (code, out, _) = run(&["--format", "sarif", p(dir.path())]);
    assert_eq!(code, 0);
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert!(validate(&doc).is_empty());
}
