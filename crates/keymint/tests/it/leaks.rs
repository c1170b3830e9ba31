//! `keymint scan --report-to`: the closed loop. A `kmt_` token leaked into
//! a file is found by the real binary, reported to the server, revoked at
//! once and audited as leaked; bad reports change nothing.

use std::process::Command;

use keymint_proto::{
    AuditEvent, LeakReport, LeakedFinding, LeaksRecorded, Lease, LeaseState, List,
};
use keymint_testkit::TestServer;

use crate::{introspect, issue, start_task};

const BIN: &str = env!("CARGO_BIN_EXE_keymint");

async fn audit(admin: &keymint_client::Client) -> Vec<AuditEvent> {
    admin
        .get::<List<AuditEvent>>("/v1/audit?limit=500")
        .await
        .unwrap()
        .items
}

#[tokio::test]
async fn a_leaked_token_found_by_the_scanner_is_revoked_and_audited() {
    let srv = TestServer::start().await.unwrap();
    let admin = srv.admin();
    let task = start_task(&admin, "ci-agent").await;
    let (leaked, leaked_token) = issue(&admin, &task.id).await;
    let (kept, kept_token) = issue(&admin, &task.id).await;
    assert!(introspect(&admin, &leaked_token).await.active);

    let repo = tempfile::tempdir().unwrap();
    std::fs::write(
        repo.path().join(".env"),
        format!("# agent settings\nOPENAI_API_KEY={leaked_token}\n"),
    )
    .unwrap();

    let url = srv.url();
    let token = srv.admin_token.clone();
    let dir = repo.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args([
                "scan",
                "--no-progress",
                "--format",
                "json",
                "--report-to",
                &url,
            ])
            .arg(&dir)
            .env("KEYMINT_TOKEN", token)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "found → exit 1; {stderr}");
    assert!(
        stderr.contains("1 keymint token(s) revoked as leaked"),
        "{stderr}"
    );
    // The report names the finding but shows no secret.
    assert!(stdout.contains("keymint.token"), "{stdout}");
    assert!(!stdout.contains(&leaked_token) && !stderr.contains(&leaked_token));

    // The leaked token is dead at once; the other one of the task is not.
    assert!(!introspect(&admin, &leaked_token).await.active);
    assert!(introspect(&admin, &kept_token).await.active);
    let l: Lease = admin
        .get(&format!("/v1/leases/{}", leaked.lease.id))
        .await
        .unwrap();
    assert_eq!(l.state, LeaseState::Revoked);
    assert_eq!(l.end_reason.map(|r| r.as_str()), Some("leaked"));
    let k: Lease = admin
        .get(&format!("/v1/leases/{}", kept.lease.id))
        .await
        .unwrap();
    assert_eq!(k.state, LeaseState::Active);
    let refused = srv
        .client(&leaked_token)
        .get::<keymint_proto::Task>(&format!("/v1/tasks/{}", task.id))
        .await;
    assert!(refused.is_err(), "a leaked token must be refused");

    // Audited as leaked, with where it was found and never the token.
    let events = audit(&admin).await;
    let report = events
        .iter()
        .find(|e| e.kind == "leak.reported")
        .expect("a leak.reported event");
    assert_eq!(report.lease.as_deref(), Some(leaked.lease.id.as_str()));
    assert_eq!(report.data["rule"], "keymint.token");
    assert!(
        report.data["locations"][0]
            .as_str()
            .unwrap()
            .contains(".env:2:")
    );
    assert!(
        events
            .iter()
            .any(|e| e.lease.as_deref() == Some(leaked.lease.id.as_str())
                && e.reason.as_deref() == Some("leaked"))
    );
    let all = serde_json::to_string(&events).unwrap();
    assert!(!all.contains(&leaked_token));
    let verified: keymint_proto::ChainReport = admin.get("/v1/audit/verify").await.unwrap();
    assert!(verified.ok(), "{verified:?}");

    // Reporting the same file again: already ended, nothing revoked twice.
    let again: LeaksRecorded = admin
        .post(
            "/v1/leaks",
            &LeakReport {
                source: "keymint scan".into(),
                findings: vec![LeakedFinding {
                    rule: "keymint.token".into(),
                    fingerprint: "00ff".into(),
                    locations: vec![".env:2".into()],
                    more_locations: 0,
                    token: Some(leaked_token.clone()),
                    hint: None,
                    environment: None,
                }],
            },
        )
        .await
        .unwrap();
    assert_eq!(again.revoked, Vec::<String>::new());
    assert_eq!(again.already_ended, vec![leaked.lease.id.clone()]);
}

fn finding(token: Option<String>) -> LeakedFinding {
    LeakedFinding {
        rule: "keymint.token".into(),
        fingerprint: "00ff".into(),
        locations: vec!["notes.txt:1".into()],
        more_locations: 0,
        token,
        hint: None,
        environment: None,
    }
}

#[tokio::test]
async fn bad_or_unauthorised_reports_change_nothing() {
    let srv = TestServer::start().await.unwrap();
    let admin = srv.admin();
    let task = start_task(&admin, "agent").await;
    let (_, token) = issue(&admin, &task.id).await;
    let before = audit(&admin).await.len();

    // A task token may not report (it could revoke other tasks' tokens).
    let own = srv
        .client(&token)
        .post::<_, LeaksRecorded>(
            "/v1/leaks",
            &LeakReport {
                source: "x".into(),
                findings: vec![finding(Some(token.clone()))],
            },
        )
        .await;
    assert!(own.is_err());
    let events = audit(&admin).await;
    assert_eq!(events.len(), before + 1, "the refusal is audited");
    let last = events.last().unwrap();
    assert_eq!(last.kind, "leak.report");
    assert_eq!(last.outcome, keymint_core::audit::Outcome::Denied);
    let before = before + 1;

    // A good finding followed by a bad one: refused whole, nothing revoked.
    let mut bad = finding(None);
    bad.locations = vec!["x\n{\"forged\":true}".into()];
    let r = admin
        .raw(
            http::Method::POST,
            "/v1/leaks",
            Some("application/json"),
            serde_json::to_vec(&LeakReport {
                source: "keymint scan".into(),
                findings: vec![finding(Some(token.clone())), bad],
            })
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("finding 1"), "{}", r.text());
    assert!(introspect(&admin, &token).await.active);

    // A forged token (checksum wrong): refused, and not echoed back.
    let mut forged = token.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let r = admin
        .raw(
            http::Method::POST,
            "/v1/leaks",
            Some("application/json"),
            serde_json::to_vec(&LeakReport {
                source: "keymint scan".into(),
                findings: vec![finding(Some(forged.clone()))],
            })
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(!r.text().contains(&forged[4..20]));

    // Unknown fields and oversized reports are refused.
    let r = admin
        .raw(
            http::Method::POST,
            "/v1/leaks",
            Some("application/json"),
            br#"{"source":"s","findings":[],"revoke_everything":true}"#.to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);

    assert!(introspect(&admin, &token).await.active);
    assert_eq!(
        audit(&admin).await.len(),
        before,
        "bad reports change nothing"
    );

    // A well-formed token this server never issued is counted, not an error.
    let stranger =
        keymint_core::token::Token::generate(keymint_core::token::TokenKind::Access).unwrap();
    let got: LeaksRecorded = admin
        .post(
            "/v1/leaks",
            &LeakReport {
                source: "keymint scan".into(),
                findings: vec![finding(Some(stranger.expose().to_owned()))],
            },
        )
        .await
        .unwrap();
    assert_eq!(got.unknown_tokens, 1);
    assert_eq!(got.recorded, 1);
    assert!(introspect(&admin, &token).await.active);
}

fn random_key_chars(n: usize) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).unwrap();
    b.iter()
        .map(|x| char::from(A[usize::from(*x) % A.len()]))
        .collect()
}

#[tokio::test]
async fn live_verification_is_opt_in_and_asks_the_provider() {
    use keymint_testkit::upstream::FakeUpstream;
    let openai_live = format!(
        "sk-proj-{}T3BlbkFJ{}",
        random_key_chars(74),
        random_key_chars(74)
    );
    let openai_dead = format!(
        "sk-proj-{}T3BlbkFJ{}",
        random_key_chars(74),
        random_key_chars(74)
    );
    let anthropic_live = format!("sk-ant-api03-{}AA", random_key_chars(93));
    let openai = FakeUpstream::start(&openai_live).await.unwrap();
    let anthropic = FakeUpstream::start(&anthropic_live).await.unwrap();
    let repo = tempfile::tempdir().unwrap();
    std::fs::write(
        repo.path().join(".env"),
        format!("A={openai_live}\nB={openai_dead}\nC={anthropic_live}\n"),
    )
    .unwrap();
    let run = |verify: bool| {
        let dir = repo.path().to_owned();
        let (o, a) = (openai.url(), anthropic.url());
        tokio::task::spawn_blocking(move || {
            let mut c = Command::new(BIN);
            c.args(["scan", "--no-progress", "-q", "--format", "json"]);
            if verify {
                c.args(["--verify", "--verify-openai-base", &format!("{o}/v1")])
                    .args(["--verify-anthropic-base", &a]);
            }
            let out = c.arg(&dir).output().unwrap();
            assert_eq!(out.status.code(), Some(1));
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
        })
    };
    let live_of = |doc: &serde_json::Value, rule: &str, n: usize| {
        let f: Vec<&serde_json::Value> = doc["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["rule_id"] == rule)
            .collect();
        f.get(n).map(|f| f["live"].clone())
    };
    // Off by default: no provider is asked.
    let doc = run(false).await.unwrap();
    assert_eq!(
        live_of(&doc, "openai.project-key", 0),
        Some(serde_json::Value::Null)
    );
    assert!(openai.received().is_empty() && anthropic.received().is_empty());

    let doc = run(true).await.unwrap();
    let openai_findings: Vec<bool> = doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["rule_id"] == "openai.project-key")
        .map(|f| f["live"].as_bool().unwrap())
        .collect();
    let mut sorted = openai_findings.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [false, true], "one live, one refused: {doc}");
    assert_eq!(
        live_of(&doc, "anthropic.api-key", 0),
        Some(serde_json::json!(true))
    );
    // The report never shows the keys, live or not.
    let text = doc.to_string();
    assert!(!text.contains(&openai_live) && !text.contains(&anthropic_live));
}
