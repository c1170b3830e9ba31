//! The compliance report (docs/design/0034): a server with a known state
//! (a key with owner and expiry, one without either, a leaked `kmt_`
//! token revoked at once, a leaked third-party key alerted only, a task
//! ended), its JSON validated against `docs/report.schema.json` with
//! Python's `jsonschema`, its counts and statuses checked, its HTML
//! opened in Debian's Chromium through Playwright (headings, no console
//! error, axe-core, a screenshot), its Markdown checked for every
//! framework, stored strings escaped everywhere, and non-admins refused.
//! Outside CI a missing browser, Playwright, axe-core or `jsonschema`
//! skips the browser or schema part with a message; under `CI=true` it
//! fails.

use std::path::PathBuf;

use keymint_core::inventory::InventoryItem;
use keymint_core::{Clock, SystemClock};
use keymint_proto::inventory::InventoryChange;
use keymint_proto::{AuditEvent, LeakReport, LeakedFinding, LeaksRecorded, List};
use keymint_testkit::TestServer;
use serde_json::Value;

use crate::postgres::in_ci;
use crate::{issue, start_task};

const BIN: &str = env!("CARGO_BIN_EXE_keymint");
const CHROMIUM: &str = "/usr/bin/chromium";
/// A policy id a person wrote: it reaches the report as written.
const POLICY: &str = r#"
@id("everyone <b>works</b>")
permit(principal, action, resource);
"#;
const HOSTILE_PURPOSE: &str = "<script>window.pwned = 1</script> nightly export";
const HOSTILE_LOCATION: &str = "src/<img src=x onerror=\"window.pwned=2\">.env:3";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn hex64() -> String {
    hex::encode(keymint_core::token::random_base62(32).unwrap().as_bytes())
}

async fn report(admin: &keymint_client::Client) -> Value {
    let r = admin
        .raw(http::Method::GET, "/v1/report", None, vec![])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json().unwrap()
}

fn status<'a>(r: &'a Value, id: &str) -> &'a str {
    r["frameworks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| f["controls"].as_array().unwrap())
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no control `{id}`"))["status"]
        .as_str()
        .unwrap()
}

/// Validates `doc` against the committed schema with Python's
/// `jsonschema` (Draft 2020-12); `Err` when the tool is missing.
async fn validate(doc: &Value) -> Result<(), String> {
    let ok = tokio::process::Command::new("python3")
        .args(["-c", "import jsonschema"])
        .output()
        .await
        .is_ok_and(|o| o.status.success());
    if !ok {
        return Err("python3 with `jsonschema` is missing (pip install jsonschema)".into());
    }
    let dir = tempfile::tempdir().unwrap();
    let doc_file = dir.path().join("report.json");
    std::fs::write(&doc_file, serde_json::to_vec(doc).unwrap()).unwrap();
    let out = tokio::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys, jsonschema\n\
             schema = json.load(open(sys.argv[1]))\n\
             jsonschema.Draft202012Validator.check_schema(schema)\n\
             v = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())\n\
             errors = [f'{list(e.absolute_path)}: {e.message}' for e in v.iter_errors(json.load(open(sys.argv[2])))]\n\
             print('\\n'.join(errors))\n\
             sys.exit(1 if errors else 0)",
        ])
        .arg(repo().join("docs/report.schema.json"))
        .arg(&doc_file)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "the report does not match docs/report.schema.json:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The real binary, off the runtime's thread (the server runs on it).
async fn cli(s: &TestServer, token: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(BIN)
        .arg("report")
        .args(args)
        .args(["--addr", &s.url()])
        .env("KEYMINT_TOKEN", token)
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_report_shows_live_state_validates_renders_and_escapes_what_is_stored() {
    let ops = tempfile::tempdir().unwrap();
    let s = TestServer::builder()
        .policy(POLICY)
        .config_toml(&format!(
            "[[operators]]\nname = \"alice\"\ntoken_file = {:?}\n",
            ops.path().join("alice.token").display().to_string()
        ))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let now = SystemClock.now();

    // A key with its owners and an expiry, and one with neither.
    let owned: InventoryItem = admin
        .post(
            "/v1/inventory",
            &InventoryChange {
                fingerprint: Some(hex64()),
                hint: Some("sk-proj-Ab3x…9xQz".into()),
                provider: Some("openai".into()),
                name: Some("billing bot".into()),
                business_owner: Some("finance".into()),
                technical_owner: Some("alice@example.com".into()),
                environment: Some("prod".into()),
                expires_at: Some(now.plus_secs(30 * 86_400)),
                ..InventoryChange::default()
            },
        )
        .await
        .unwrap();
    // The report names the oldest key by its creation millisecond: let the
    // next one be made in a later millisecond, so there is one oldest.
    while SystemClock.now() <= owned.created_at {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let orphan: InventoryItem = admin
        .post(
            "/v1/inventory",
            &InventoryChange {
                fingerprint: Some(hex64()),
                hint: Some("sk-or-v1-ab12…cd34".into()),
                provider: Some("openrouter".into()),
                name: Some("legacy export key".into()),
                purpose: Some(HOSTILE_PURPOSE.into()),
                environment: Some("staging".into()),
                ..InventoryChange::default()
            },
        )
        .await
        .unwrap();

    // A task that ends (its lease revoked), and a leaked token revoked at
    // once with a third-party key found beside it, alerted only.
    let done = start_task(&admin, "nightly").await;
    let _ = issue(&admin, &done.id).await;
    let r = admin
        .raw(
            http::Method::POST,
            &format!("/v1/tasks/{}/end", done.id),
            Some("application/json"),
            br#"{"status":"completed"}"#.to_vec(),
        )
        .await
        .unwrap();
    assert!(r.status.is_success(), "{}", r.text());
    let leaky = start_task(&admin, "triage").await;
    let (lease, token) = issue(&admin, &leaky.id).await;
    let third_party_fp = hex64();
    let recorded: LeaksRecorded = admin
        .post(
            "/v1/leaks",
            &LeakReport {
                source: "keymint scan".into(),
                findings: vec![
                    LeakedFinding {
                        rule: "keymint.token".into(),
                        fingerprint: hex64(),
                        locations: vec![".env:2".into()],
                        more_locations: 0,
                        token: Some(token.clone()),
                        hint: None,
                        environment: Some("ci".into()),
                    },
                    LeakedFinding {
                        rule: "example.api-key".into(),
                        fingerprint: third_party_fp.clone(),
                        locations: vec![HOSTILE_LOCATION.into()],
                        more_locations: 0,
                        token: None,
                        hint: None,
                        environment: Some("ci".into()),
                    },
                ],
            },
        )
        .await
        .unwrap();
    assert_eq!(recorded.revoked, vec![lease.lease.id.clone()]);
    // Both revocations confirmed (the token engine answers at once; the
    // events are written as they finish).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let events: List<AuditEvent> = admin.get("/v1/audit?limit=1000").await.unwrap();
        let n = events
            .items
            .iter()
            .filter(|e| e.kind == "lease.revoked")
            .count();
        if n >= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} revocations confirmed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // ---- JSON: the schema, the counts, the statuses ----
    let j = report(&admin).await;
    match validate(&j).await {
        Ok(()) => {}
        Err(why) => {
            assert!(!in_ci(), "the report's schema test needs this in CI: {why}");
            eprintln!("skipping the schema check: {why}");
        }
    }
    let ev = &j["evidence"];
    let inv = &ev["inventory"];
    assert_eq!(inv["findings"]["no_owner"], 2, "{inv:#}");
    assert_eq!(inv["findings"]["no_expiry"], 2, "{inv:#}");
    assert_eq!(inv["findings"]["leaked"], 1, "{inv:#}");
    assert_eq!(inv["by_status"]["active"], 3, "{inv:#}");
    assert_eq!(inv["by_status"]["revoked"], 1, "{inv:#}");
    assert_eq!(inv["live"], 3);
    assert_eq!(inv["oldest"]["id"], owned.id.as_str());
    assert_eq!(inv["oldest"]["age_days"], 0);
    let attention: Vec<&str> = inv["attention"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert!(attention.contains(&orphan.id.as_str()), "{attention:?}");
    assert!(!attention.contains(&owned.id.as_str()), "{attention:?}");
    let leaks = &ev["leaks"];
    assert_eq!(leaks["reported"], 2);
    assert_eq!(leaks["leaked_entries"], 2);
    assert_eq!(leaks["revoked"], 1);
    assert_eq!(leaks["still_active"], 1);
    assert_eq!(leaks["responses"]["alerted"], 1, "{leaks:#}");
    assert_eq!(leaks["time_to_contain"]["samples"], 1, "{leaks:#}");
    let rev = &ev["leases"]["revocation"];
    assert_eq!(
        rev["samples"], 2,
        "the ended task's lease and the leaked one: {rev:#}"
    );
    assert!(rev["p99_ms"].as_i64().unwrap() >= rev["p50_ms"].as_i64().unwrap());
    assert_eq!(ev["tasks"]["ended"]["completed"], 1);
    let tasks: Value = admin.get("/v1/tasks?status=active").await.unwrap();
    assert_eq!(ev["tasks"]["active"], 1, "{:#} {tasks:#}", ev["tasks"]);
    assert_eq!(ev["audit"]["chain_intact"], true);
    assert!(ev["audit"]["events"].as_u64().unwrap() > 10);
    assert_eq!(ev["policy"]["policies"][0], "everyone <b>works</b>");
    assert!(
        ev["deployment"]["operators"].as_u64().unwrap() >= 1,
        "alice"
    );
    assert_eq!(ev["deployment"]["tls"], false);
    // The statuses follow: one leaked key still usable, keys without owner.
    assert_eq!(status(&j, "NHI2:2025"), "not_met");
    assert_eq!(status(&j, "RS.MI-01"), "not_met");
    assert_eq!(status(&j, "PR.AA-01"), "partly");
    assert_eq!(status(&j, "NHI7:2025"), "partly");
    assert_eq!(status(&j, "PR.DS-02"), "not_met", "plain HTTP in the test");
    let ps04 = if ev["deployment"]["audit_file"] == true {
        "met"
    } else {
        "partly"
    };
    assert_eq!(status(&j, "PR.PS-04"), ps04);
    assert_eq!(status(&j, "ASI05"), "not_applicable");
    let sum = &j["summary"];
    let total: u64 = ["met", "partly", "not_met", "not_applicable"]
        .iter()
        .map(|k| sum[k].as_u64().unwrap())
        .sum();
    assert_eq!(total, 36);

    // The operator retires the leaked key: contained, the status follows.
    let third: InventoryItem = admin
        .get(&format!(
            "/v1/inventory/{}",
            attention
                .iter()
                .find(|id| **id != orphan.id)
                .expect("the leaked third-party key needs attention")
        ))
        .await
        .unwrap();
    assert_eq!(third.fingerprint, third_party_fp);
    let _: InventoryItem = admin
        .post(
            &format!("/v1/inventory/{}/retire", third.id),
            &serde_json::json!({"reason": "deleted at the provider"}),
        )
        .await
        .unwrap();
    let j = report(&admin).await;
    assert_eq!(j["evidence"]["leaks"]["still_active"], 0);
    assert_eq!(status(&j, "NHI2:2025"), "met");
    assert_eq!(status(&j, "RS.MI-01"), "met");

    // ---- The API's HTML: held to no script by its own CSP ----
    let r = admin
        .raw(http::Method::GET, "/v1/report?format=html", None, vec![])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let csp = r.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );

    // ---- The CLI: HTML to a file, Markdown to standard output ----
    let dir = tempfile::tempdir().unwrap();
    let html_file = dir.path().join("report.html");
    let tok = s.admin_token.clone();
    let out = cli(
        &s,
        &tok,
        &["--format", "html", "--out", html_file.to_str().unwrap()],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = std::fs::read_to_string(&html_file).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&html_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    for bad in ["<script", "<img", "<b>works", "onerror=\""] {
        assert!(!html.contains(bad), "`{bad}` reached the HTML");
    }
    assert!(html.contains("&lt;script&gt;window.pwned = 1&lt;/script&gt;"));
    assert!(html.contains("everyone &lt;b&gt;works&lt;/b&gt;"));
    assert!(
        !html.contains("http://") || !html.contains("src=\"http"),
        "nothing fetched"
    );

    let out = cli(&s, &tok, &["--format", "md"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = String::from_utf8(out.stdout).unwrap();
    for heading in [
        "## OWASP Non-Human Identities Top 10 \\(2025\\)",
        "## OWASP Top 10 for Agentic Applications \\(2026\\)",
        "## NIST AI RMF 1.0 \\(AI 100-1\\) with the Generative AI Profile \\(AI 600-1\\)",
        "## NIST Cybersecurity Framework 2.0",
    ] {
        assert!(md.contains(heading), "no `{heading}` in:\n{md}");
    }
    for id in [
        "NHI1:2025",
        "ASI10",
        "GOVERN 1.6",
        "MANAGE 2.4",
        "PR.AA-01",
        "DE.CM-09",
    ] {
        assert!(md.contains(id), "no `{id}` in the Markdown");
    }
    assert!(!md.contains("<script") && !md.contains("<b>works"));

    let out = cli(&s, &tok, &["--format", "json"]).await;
    assert!(out.status.success());
    let cli_json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli_json["summary"], j["summary"]);

    // ---- The HTML in a real browser ----
    match browser(&html_file).await {
        Ok(()) => {}
        Err(why) => {
            assert!(
                !in_ci(),
                "the report's browser test needs this in CI: {why}"
            );
            eprintln!("skipping the browser check: {why}");
        }
    }
}

/// Where `.ci/run` installs axe-core, unless `KEYMINT_AXE_JS` names it.
#[allow(
    clippy::disallowed_methods,
    reason = "tests read their environment to find tools"
)]
fn axe_js() -> PathBuf {
    if let Ok(p) = std::env::var("KEYMINT_AXE_JS") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cache")
        });
    cache.join("keymint/npm/node_modules/axe-core/axe.min.js")
}

/// `KEYMINT_REPORT_SCREENSHOT`: where to save the screenshot (relative to
/// the repository), e.g. `docs/report-screenshot.png`; a temporary file
/// otherwise.
#[allow(
    clippy::disallowed_methods,
    reason = "tests read their environment to find tools"
)]
fn screenshot_target(dir: &std::path::Path) -> PathBuf {
    std::env::var("KEYMINT_REPORT_SCREENSHOT")
        .map(|p| repo().join(p))
        .unwrap_or_else(|_| dir.join("report.png"))
}

async fn browser(html_file: &std::path::Path) -> Result<(), String> {
    if !std::path::Path::new(CHROMIUM).exists() {
        return Err(format!("{CHROMIUM} is missing (apt-get install chromium)"));
    }
    let ok = tokio::process::Command::new("python3")
        .args(["-c", "import playwright.sync_api"])
        .output()
        .await
        .is_ok_and(|o| o.status.success());
    if !ok {
        return Err("python3 with `playwright` is missing (pip install playwright)".into());
    }
    let axe = axe_js();
    if !axe.exists() {
        return Err(format!("axe-core is missing at `{}`", axe.display()));
    }
    let dir = tempfile::tempdir().unwrap();
    let shot = screenshot_target(dir.path());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/report/report_e2e.py");
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(180),
        tokio::process::Command::new("python3")
            .arg(&script)
            .env("KEYMINT_REPORT_HTML", html_file)
            .env("KEYMINT_AXE_JS", &axe)
            .env("KEYMINT_CHROMIUM", CHROMIUM)
            .env("KEYMINT_SCREENSHOT", &shot)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("the browser test took over 3 minutes"))
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(found["ok"], true, "{found}");
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a screenshot was saved"
    );
    Ok(())
}

#[tokio::test]
async fn only_the_admin_reads_the_report_and_bad_input_is_refused_without_echo() {
    let ops = tempfile::tempdir().unwrap();
    let s = TestServer::builder()
        .config_toml(&format!(
            "[[operators]]\nname = \"alice\"\ntoken_file = {:?}\n",
            ops.path().join("alice.token").display().to_string()
        ))
        .start()
        .await
        .unwrap();
    let alice = std::fs::read_to_string(ops.path().join("alice.token"))
        .unwrap()
        .trim()
        .to_owned();
    let admin = s.admin();
    let task = start_task(&admin, "reader").await;
    let (_, token) = issue(&admin, &task.id).await;
    for (who, t) in [
        ("an operator", alice.as_str()),
        ("a task token", token.as_str()),
    ] {
        for format in ["json", "html", "md"] {
            let r = s
                .client(t)
                .raw(
                    http::Method::GET,
                    &format!("/v1/report?format={format}"),
                    None,
                    vec![],
                )
                .await
                .unwrap();
            assert_eq!(r.status, 403, "{who}, {format}: {}", r.text());
            assert!(!r.text().contains("keymint compliance report"));
        }
        let out = cli(&s, t, &["--format", "json"]).await;
        assert!(!out.status.success(), "{who} through the CLI");
        assert!(out.stdout.is_empty());
    }
    let r = s
        .anonymous()
        .raw(http::Method::GET, "/v1/report", None, vec![])
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    // Every refusal is audited.
    let events: List<AuditEvent> = admin.get("/v1/audit?limit=1000").await.unwrap();
    let refused = events
        .items
        .iter()
        .filter(|e| e.kind == "report.read")
        .count();
    assert_eq!(refused, 8, "three formats and the CLI, by two principals");

    // A bad format or an unknown parameter: refused, never echoed.
    for q in [
        "format=%3Cscript%3Ealert(1)%3C%2Fscript%3E",
        "format=pdf",
        "format=json&evil=%3Cx%3E",
    ] {
        let r = admin
            .raw(http::Method::GET, &format!("/v1/report?{q}"), None, vec![])
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{q}: {}", r.text());
        let body = r.text();
        assert!(
            !body.contains("script") && !body.contains("pdf") && !body.contains("<x>"),
            "{body}"
        );
    }
}

/// Approvals that their task's end closed (`approval.cancelled`: one
/// still pending, one approved but not redeemed) are counted with the
/// others, in every format the real binary writes, and the JSON still
/// validates against the committed schema.
#[tokio::test]
async fn approvals_cancelled_by_their_tasks_end_are_counted() {
    const HELD: &str = r#"
@id("work")
permit(principal, action in [Keymint::Action::"start_task", Keymint::Action::"issue"], resource);
@id("embeddings-need-a-human")
@approval("required")
permit(principal, action == Keymint::Action::"issue", resource)
when { context.scopes.contains("llm:embeddings") };
@id("alice-approves")
permit(principal == Keymint::Operator::"alice", action == Keymint::Action::"approve", resource);
"#;
    let ops = tempfile::tempdir().unwrap();
    let s = TestServer::builder()
        .policy(HELD)
        .config_toml(&format!(
            "[[operators]]\nname = \"alice\"\ntoken_file = {:?}\n",
            ops.path().join("alice.token").display().to_string()
        ))
        .start()
        .await
        .unwrap();
    let admin = s.admin();
    let alice = s.client(
        std::fs::read_to_string(ops.path().join("alice.token"))
            .unwrap()
            .trim(),
    );
    let held = |task: String| {
        let admin = admin.clone();
        async move {
            match admin
                .post::<_, keymint_proto::IssuedLease>(
                    &format!("/v1/tasks/{task}/leases"),
                    &keymint_proto::IssueLease {
                        scopes: Some(vec!["llm:embeddings".into()]),
                        ..keymint_proto::IssueLease::default()
                    },
                )
                .await
            {
                Err(keymint_client::ClientError::Held { approval, .. }) => approval,
                other => panic!("expected a held request, got {other:?}"),
            }
        }
    };
    let end = |task: String| {
        let admin = admin.clone();
        async move {
            let r = admin
                .raw(
                    http::Method::POST,
                    &format!("/v1/tasks/{task}/end"),
                    Some("application/json"),
                    br#"{"status":"completed"}"#.to_vec(),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
        }
    };
    // Pending when its task ended.
    let first = start_task(&admin, "embedder").await;
    held(first.id.clone()).await;
    end(first.id.clone()).await;
    // Approved, not redeemed, when its task ended.
    let second = start_task(&admin, "embedder").await;
    let id = held(second.id.clone()).await;
    let _: Value = alice
        .post(
            &format!("/v1/approvals/{id}/approve"),
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    end(second.id.clone()).await;
    let events: List<AuditEvent> = admin.get("/v1/audit?limit=1000").await.unwrap();
    assert_eq!(
        events
            .items
            .iter()
            .filter(|e| e.kind == "approval.cancelled")
            .count(),
        2
    );

    let admin_token = s.admin_token.clone();
    let out = cli(&s, &admin_token, &["--format", "json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = &doc["evidence"]["approvals"];
    assert_eq!(a["requested"], 2, "{a}");
    assert_eq!(a["approved"], 1, "{a}");
    assert_eq!(a["cancelled"], 2, "{a}");
    assert_eq!(a["pending"], 0, "{a}");
    match validate(&doc).await {
        Ok(()) => {}
        Err(e) if !in_ci() => eprintln!("schema not checked: {e}"),
        Err(e) => panic!("{e}"),
    }
    let text = |format: &'static str| {
        let (s, t) = (&s, admin_token.clone());
        async move {
            let out = cli(s, &t, &["--format", format]).await;
            assert!(out.status.success(), "{format}");
            String::from_utf8(out.stdout).unwrap()
        }
    };
    let md = text("md").await;
    assert!(md.contains("0 redeemed"), "{md}");
    assert!(md.contains("2 cancelled with their task"), "{md}");
    let html = text("html").await;
    assert!(html.contains("2 / 1 / 0 / 0 / 2"), "{html}");
}

/// `--out` names a file that is already there, readable by everyone (an
/// earlier `keymint report > report.html`, a colleague's copy): the report
/// written over it is still readable by its owner only, as it would be in
/// a new file (`open(2)`'s mode applies only when it creates the file).
#[tokio::test]
async fn a_report_written_over_an_existing_file_is_still_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let s = TestServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("report.md");
    std::fs::write(&file, "an older report").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let tok = s.admin_token.clone();
    let out = cli(
        &s,
        &tok,
        &["--format", "md", "--out", file.to_str().unwrap()],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::read_to_string(&file).unwrap();
    assert!(
        md.contains("OWASP") && !md.contains("an older report"),
        "{md}"
    );
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the report is readable by others");
}

/// `--out` at a symbolic link (one planted in a shared directory, pointing
/// at another of the user's files, or at nothing yet): refused with a
/// clear error, and neither the file it points at nor the link changes.
/// `keymint scan --output` and `--write-baseline` and `keymint ssh krl
/// --out` write through the same helper (`keymint_core::outfile`).
#[tokio::test]
async fn a_report_is_never_written_through_a_symbolic_link() {
    let s = TestServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("bashrc");
    std::fs::write(&victim, "keep me").unwrap();
    let link = dir.path().join("report.html");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let dangling = dir.path().join("report.md");
    std::os::unix::fs::symlink(dir.path().join("created"), &dangling).unwrap();
    let tok = s.admin_token.clone();
    for (format, at) in [("html", &link), ("md", &dangling)] {
        let out = cli(
            &s,
            &tok,
            &["--format", format, "--out", at.to_str().unwrap()],
        )
        .await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{format}: written through a link");
        assert!(err.contains("symbolic link"), "{err}");
        assert!(
            std::fs::symlink_metadata(at)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
    assert!(!dir.path().join("created").exists());
    // Only what the test made is in the directory: no temporary file left.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);

    // The same for the scanner's report and baseline.
    let tree = tempfile::tempdir().unwrap();
    std::fs::write(tree.path().join("a.txt"), "nothing here").unwrap();
    for flag in ["--output", "--write-baseline"] {
        let out = tokio::process::Command::new(BIN)
            .args(["scan", "--quiet", flag, link.to_str().unwrap()])
            .arg(tree.path())
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag}: written through a link");
        assert!(err.contains("symbolic link"), "{flag}: {err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
    }
}
