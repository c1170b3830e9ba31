//! The operator console in a real browser: Debian's Chromium driven by
//! Playwright for Python (`tests/console/console_e2e.py`), with axe-core
//! for accessibility. This test starts the server, makes the tasks and
//! held requests the script acts on, runs it, then checks the API's side:
//! the ended task's token is refused, the approved request is redeemed by
//! its requester, and the audit trail names the signed-in people.
//! Outside CI a missing browser, Playwright or axe-core skips the test with
//! a message; under `CI=true` it fails it.

use std::path::PathBuf;

use keymint_client::ClientError;
use keymint_proto::{AuditEvent, IssueLease, IssuedLease, List, StartTask, Task};
use keymint_testkit::TestServer;

use crate::postgres::in_ci;

const POLICY: &str = r#"
@id("work")
permit(principal, action in [Keymint::Action::"start_task", Keymint::Action::"issue", Keymint::Action::"delegate"], resource);

@id("embeddings-need-a-human")
@approval("required")
permit(principal, action == Keymint::Action::"issue", resource)
when { context.scopes.contains("llm:embeddings") && !context.scopes.contains("llm:chat") };

@id("alice-approves")
permit(principal == Keymint::Operator::"alice", action == Keymint::Action::"approve", resource);
"#;

const CHROMIUM: &str = "/usr/bin/chromium";

/// Where `.ci/run` installs axe-core (`npm install --prefix`), unless
/// `KEYMINT_AXE_JS` names the file.
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

#[allow(
    clippy::disallowed_methods,
    reason = "tests read their environment to find tools"
)]
fn screenshots() -> Option<String> {
    std::env::var("KEYMINT_SCREENSHOTS").ok().map(|d| {
        // Relative to the repository root, like the README says.
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        root.join(d).display().to_string()
    })
}

/// Chromium, Playwright and axe-core, or a reason why not.
async fn tools() -> Result<PathBuf, String> {
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
        return Err(format!(
            "axe-core is missing at `{}` (npm install axe-core)",
            axe.display()
        ));
    }
    Ok(axe)
}

async fn start(c: &keymint_client::Client, workload: &str, parent: Option<&str>) -> Task {
    c.post(
        "/v1/tasks",
        &StartTask {
            workload: Some(workload.into()),
            role: Some("demo".into()),
            // A sub-task ends before its parent.
            ttl_secs: Some(if parent.is_some() { 300 } else { 600 }),
            intent: Some("triage tickets".into()),
            scopes: Some(vec!["llm:chat".into(), "llm:embeddings".into()]),
            parent: parent.map(str::to_owned),
            ..StartTask::default()
        },
    )
    .await
    .unwrap()
}

async fn issue(
    c: &keymint_client::Client,
    task: &str,
    scope: &str,
) -> Result<IssuedLease, ClientError> {
    c.post(
        &format!("/v1/tasks/{task}/leases"),
        &IssueLease {
            scopes: Some(vec![scope.into()]),
            ttl_secs: Some(300),
            ..IssueLease::default()
        },
    )
    .await
}

async fn held(c: &keymint_client::Client, task: &str) -> String {
    match issue(c, task, "llm:embeddings").await {
        Err(ClientError::Held { approval, .. }) => approval,
        other => panic!("expected a held request, got {other:?}"),
    }
}

#[tokio::test]
async fn an_operator_signs_in_ends_a_task_approves_a_request_and_verifies_the_chain_in_a_browser() {
    let axe = match tools().await {
        Ok(a) => a,
        Err(why) => {
            assert!(
                !in_ci(),
                "the console's browser tests need this in CI: {why}"
            );
            eprintln!("skipping: {why}");
            return;
        }
    };
    let ops = tempfile::tempdir().unwrap();
    let s = TestServer::builder()
        .policy(POLICY)
        .config_toml(&format!(
            "[approvals]\nttl = \"10m\"\n[[operators]]\nname = \"alice\"\ntoken_file = {:?}\n",
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

    // The task the console ends, with a sub-agent and a live token.
    let planner = start(&admin, "planner", None).await;
    let sub = start(&admin, "summariser", Some(&planner.id)).await;
    let ptok = issue(&admin, &planner.id, "llm:chat").await.unwrap();
    let ptok = ptok.credential.secret().expose().to_owned();
    let planner_client = s.client(&ptok);
    planner_client
        .get::<Task>(&format!("/v1/tasks/{}", planner.id))
        .await
        .unwrap();

    // A request held for a human, asked with the analyst's own token.
    let analyst = start(&admin, "analyst", None).await;
    let (_, atok) = crate::issue(&admin, &analyst.id).await;
    let analyst_client = s.client(&atok);
    let approval = held(&analyst_client, &analyst.id).await;
    // And one for workload `alice`: the operator's own request.
    let own_task = start(&admin, "alice", None).await;
    let (_, otok) = crate::issue(&admin, &own_task.id).await;
    let own = held(&s.client(&otok), &own_task.id).await;

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/console/console_e2e.py");
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(&script)
        .env("KEYMINT_URL", s.url())
        .env("KEYMINT_ADMIN_TOKEN", &s.admin_token)
        .env("KEYMINT_OPERATOR_TOKEN", &alice)
        .env("KEYMINT_TASK", &planner.id)
        .env("KEYMINT_SUBTASK", &sub.id)
        .env("KEYMINT_APPROVAL", &approval)
        .env("KEYMINT_OWN_APPROVAL", &own)
        .env("KEYMINT_AXE_JS", &axe)
        .env("KEYMINT_CHROMIUM", CHROMIUM)
        .env_remove("KEYMINT_SCREENSHOTS");
    if let Some(dir) = screenshots() {
        std::fs::create_dir_all(&dir).unwrap();
        cmd.env("KEYMINT_SCREENSHOTS", dir);
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(300), cmd.output())
        .await
        .expect("the browser test took over 5 minutes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the browser script failed:\n{stdout}\n{stderr}"
    );
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["ok"], true, "{report}");

    // The task ended in the browser: its token is refused by the API, and
    // its sub-agent ended with it.
    let e = planner_client
        .get::<Task>(&format!("/v1/tasks/{}", planner.id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("unauthorized"), "{e:?}");
    let sub_now: Task = admin.get(&format!("/v1/tasks/{}", sub.id)).await.unwrap();
    assert_eq!(sub_now.status, keymint_proto::TaskStatus::Revoked);

    // Approved in the browser: the requester redeems it, once.
    let r = analyst_client
        .raw(
            http::Method::POST,
            &format!("/v1/approvals/{approval}/redeem"),
            None,
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let redeemed: IssuedLease = r.json().unwrap();
    assert_eq!(redeemed.lease.scopes, vec!["llm:embeddings".to_owned()]);
    // The operator's own request is still pending.
    let a: keymint_core::model::Approval =
        admin.get(&format!("/v1/approvals/{own}")).await.unwrap();
    assert_eq!(a.status, keymint_core::model::ApprovalStatus::Pending);

    // The audit trail names who did what in the console.
    let events: List<AuditEvent> = admin.get("/v1/audit?limit=1000").await.unwrap();
    let has = |kind: &str, actor: &str| {
        events
            .items
            .iter()
            .any(|e| e.kind == kind && e.actor == actor)
    };
    assert!(has("console.signed_in", "admin"));
    assert!(has("console.signed_in", "operator:alice"));
    assert!(has("console.signed_out", "admin"));
    assert!(
        has("auth.failed", "anonymous"),
        "the wrong token is audited"
    );
    let ended = events
        .items
        .iter()
        .find(|e| e.kind == "task.ended" && e.task.as_deref() == Some(planner.id.as_str()))
        .expect("the task's end is audited");
    assert_eq!(ended.actor, "admin");
    assert_eq!(ended.reason.as_deref(), Some("ended from the console test"));
    assert!(has("approval.approved", "operator:alice"));
    assert!(
        has("approval.refused", "operator:alice"),
        "the refusal is audited"
    );
}

/// One HTTP/1.1 exchange with the headers a browser would send; returns
/// the status, the headers (lower-case names) and the body.
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    sock.write_all(req.as_bytes()).await.unwrap();
    // A server that refuses a body may close before reading all of it.
    let _ = sock.write_all(body).await;
    let mut raw = Vec::new();
    let _ = sock.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Signs in with `token`; the session cookie (`keymint_session=…`).
async fn sign_in(s: &TestServer, token: &str) -> String {
    sign_in_from(s, token, None).await
}

/// Signs in with `token` from a browser that may hold a session cookie
/// already; the new session cookie.
async fn sign_in_from(s: &TestServer, token: &str, had: Option<&str>) -> String {
    let origin = s.url();
    let body = format!("token={}", keymint_client::encode(token));
    let mut headers = vec![
        ("Origin", origin.as_str()),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ];
    if let Some(c) = had {
        headers.push(("Cookie", c));
    }
    let (status, h, _) = http(s.addr, "POST", "/ui/login", &headers, body.as_bytes()).await;
    assert_eq!(status, 303);
    let cookie = header(&h, "set-cookie").unwrap();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    assert!(
        cookie.contains("Path=/ui") && !cookie.contains("Secure"),
        "{cookie}"
    );
    cookie.split(';').next().unwrap().to_owned()
}

/// A server on a clock the test moves, from the conformance suite's start.
async fn clocked() -> (TestServer, keymint_core::ManualClock) {
    let clock = keymint_core::ManualClock::new(keymint_store::conformance::T0);
    let s = TestServer::builder()
        .clock(clock.clone())
        .start()
        .await
        .unwrap();
    (s, clock)
}

#[tokio::test]
async fn console_sessions_expire_and_bad_input_is_refused_without_echo() {
    let (s, clock) = clocked().await;
    let admin = s.admin();
    let origin = s.url();

    // Idle for longer than 30 minutes: signed out.
    let cookie = sign_in(&s, &s.admin_token).await;
    let (status, h, body) = http(s.addr, "GET", "/ui", &[("Cookie", &cookie)], b"").await;
    assert_eq!(status, 200);
    assert!(body.contains("<h1>Overview</h1>"));
    let csp = header(&h, "content-security-policy").unwrap();
    assert!(csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"));
    assert!(!csp.contains("unsafe-inline"));
    assert_eq!(header(&h, "x-frame-options"), Some("DENY"));
    clock.advance_secs(29 * 60);
    let (status, _, _) = http(s.addr, "GET", "/ui", &[("Cookie", &cookie)], b"").await;
    assert_eq!(status, 200, "29 minutes idle is still signed in");
    clock.advance_secs(31 * 60);
    let (status, h, _) = http(s.addr, "GET", "/ui", &[("Cookie", &cookie)], b"").await;
    assert_eq!(status, 303, "31 minutes idle is signed out");
    assert_eq!(header(&h, "location"), Some("/ui/login"));

    // Busy for longer than 8 hours: signed out all the same.
    let cookie = sign_in(&s, &s.admin_token).await;
    for _ in 0..(8 * 3 - 1) {
        clock.advance_secs(20 * 60);
        let (status, _, _) = http(s.addr, "GET", "/ui", &[("Cookie", &cookie)], b"").await;
        assert_eq!(status, 200);
    }
    clock.advance_secs(20 * 60);
    let (status, _, _) = http(s.addr, "GET", "/ui", &[("Cookie", &cookie)], b"").await;
    assert_eq!(status, 303, "no session lives past 8 hours");

    // A forged cookie is no session.
    let forged = format!("keymint_session={}", "A".repeat(43));
    let (status, _, _) = http(s.addr, "GET", "/ui/tasks", &[("Cookie", &forged)], b"").await;
    assert_eq!(status, 303);

    // A task token is a valid credential but not an operator: refused, audited.
    let t = crate::start_task(&admin, "<script>alert(1)</script>").await;
    let (_, tok) = crate::issue(&admin, &t.id).await;
    let (status, h, body) = http(
        s.addr,
        "POST",
        "/ui/login",
        &[
            ("Origin", &origin),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        format!("token={tok}").as_bytes(),
    )
    .await;
    assert_eq!(status, 401);
    assert!(header(&h, "set-cookie").is_none());
    assert!(!body.contains(&tok), "the token is not echoed");

    // Markup in stored values is shown as text.
    let cookie = sign_in(&s, &s.admin_token).await;
    let (status, _, body) = http(
        s.addr,
        "GET",
        &format!("/ui/tasks/{}", t.id),
        &[("Cookie", &cookie)],
        b"",
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(!body.contains("<script>alert(1)"));

    // Bad filters, ids and paths: a clear refusal that does not echo them.
    for path in [
        "/ui/tasks?status=%3Cb%3Ebogus",
        "/ui/leases?state=%3Cb%3Ebogus",
        "/ui/audit?before=%3Cb%3Ebogus",
        "/ui/approvals?status=%3Cb%3Ebogus",
        "/ui/tasks/tsk_%3Cb%3Ebogus",
        "/ui/leases/..%2F..%2Fetc%2Fpasswd%3Cb%3Ebogus",
        "/ui/approvals/apr_%3Cb%3Ebogus",
        "/ui/static/..%2F..%2Fbogus%3Cb%3E",
    ] {
        let (status, _, body) = http(s.addr, "GET", path, &[("Cookie", &cookie)], b"").await;
        assert!((400..500).contains(&status), "{path}: {status}");
        assert!(!body.contains("bogus"), "{path} echoed its input");
        assert!(!body.contains("root:"), "{path}");
    }

    // Oversized: a sign-in body over 16 KiB is refused.
    let big = format!("token={}", "a".repeat(16 * 1024 - 5));
    let (status, _, _) = http(
        s.addr,
        "POST",
        "/ui/login",
        &[
            ("Origin", &origin),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        big.as_bytes(),
    )
    .await;
    assert_eq!(status, 413);

    // CSRF on a real action, without a browser: the task is still active.
    let csrf_of = |page: &str| {
        let at = page.find("name=\"csrf\" value=\"").unwrap() + 19;
        page[at..at + 43].to_owned()
    };
    let (_, _, page) = http(s.addr, "GET", "/ui", &[("Cookie", &cookie)], b"").await;
    let csrf = csrf_of(&page);
    for (origin, token) in [
        (None, csrf.as_str()),
        (Some("http://evil.example"), csrf.as_str()),
        (Some(origin.as_str()), ""),
        (Some(origin.as_str()), "wrong"),
    ] {
        let mut h = vec![
            ("Cookie", cookie.as_str()),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ];
        if let Some(o) = origin {
            h.push(("Origin", o));
        }
        let (status, _, _) = http(
            s.addr,
            "POST",
            &format!("/ui/tasks/{}/end", t.id),
            &h,
            format!("csrf={token}").as_bytes(),
        )
        .await;
        assert_eq!(status, 403, "{origin:?} {token}");
    }
    let still: Task = admin.get(&format!("/v1/tasks/{}", t.id)).await.unwrap();
    assert_eq!(still.status, keymint_proto::TaskStatus::Active);
    // With both, it ends.
    let (status, h, _) = http(
        s.addr,
        "POST",
        &format!("/ui/tasks/{}/end", t.id),
        &[
            ("Cookie", &cookie),
            ("Origin", &origin),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        format!("csrf={csrf}&reason=done").as_bytes(),
    )
    .await;
    assert_eq!(status, 303);
    assert_eq!(
        header(&h, "location"),
        Some(format!("/ui/tasks/{}?done=ended", t.id).as_str())
    );
    let e = s
        .client(&tok)
        .get::<Task>(&format!("/v1/tasks/{}", t.id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("unauthorized"), "{e:?}");

    // Sign-out ends the session at once, and needs the CSRF token too.
    let (status, _, _) = http(
        s.addr,
        "POST",
        "/ui/logout",
        &[("Cookie", &cookie), ("Origin", &origin)],
        b"csrf=wrong",
    )
    .await;
    assert_eq!(status, 403);
    let (status, _, _) = http(
        s.addr,
        "POST",
        "/ui/logout",
        &[("Cookie", &cookie), ("Origin", &origin)],
        format!("csrf={csrf}").as_bytes(),
    )
    .await;
    assert_eq!(status, 303);
    let (status, _, _) = http(s.addr, "GET", "/ui", &[("Cookie", &cookie)], b"").await;
    assert_eq!(status, 303, "the session is gone");
}

/// The lease ids linked from a console page.
fn lease_links(page: &str) -> Vec<String> {
    page.split("<tr><td><a href=\"/ui/leases/")
        .skip(1)
        .filter_map(|r| r.split('"').next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn the_console_pages_leases_from_the_store_with_a_cursor() {
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    let t = crate::start_task(&admin, "pager").await;
    let mut issued = Vec::new();
    for _ in 0..120 {
        let (l, _) = crate::issue(&admin, &t.id).await;
        issued.push(l.lease.id);
    }
    let cookie = sign_in(&s, &s.admin_token).await;
    let mut seen = Vec::new();
    let mut path = "/ui/leases?workload=pager".to_owned();
    let mut pages = 0;
    loop {
        let (status, _, body) = http(s.addr, "GET", &path, &[("Cookie", &cookie)], b"").await;
        assert_eq!(status, 200);
        let rows = lease_links(&body);
        assert!(rows.len() <= 50, "one page at a time");
        seen.extend(rows);
        pages += 1;
        let Some(at) = body.find("rel=\"next\"") else {
            break;
        };
        let href = body[..at].rsplit("href=\"").next().unwrap();
        path = href.split('"').next().unwrap().replace("&amp;", "&");
        assert!(pages < 10);
    }
    assert_eq!(pages, 3);
    // Newest first: lease ids begin with their millisecond, and the console
    // orders by id, so leases issued within one millisecond (several are,
    // on a fast machine) come in the order of their random part.
    issued.sort_unstable();
    issued.reverse();
    assert_eq!(seen, issued, "every lease once, newest first");
}

/// A path the router cannot read (`%ff` is not UTF-8) or a method a page
/// does not take is answered with the console's own page, under its
/// headers, like every other refusal of the console (not axum's
/// `text/plain` or an empty body).
#[tokio::test]
async fn unreadable_paths_and_other_methods_get_the_consoles_own_page() {
    let s = TestServer::start().await.unwrap();
    let cookie = sign_in(&s, &s.admin_token).await;
    for (method, path, status, title) in [
        ("GET", "/ui/tasks/%ff", 400, "Bad request"),
        ("GET", "/ui/tasks/%ff%fe/end", 400, "Bad request"),
        ("GET", "/ui/leases/%c3%28", 400, "Bad request"),
        ("GET", "/ui/leases/%ff/revoke", 400, "Bad request"),
        ("GET", "/ui/approvals/%ff", 400, "Bad request"),
        ("PUT", "/ui/tasks", 405, "Method not allowed"),
        ("DELETE", "/ui/logout", 405, "Method not allowed"),
        ("PATCH", "/ui/anything", 405, "Method not allowed"),
    ] {
        let (got, h, body) = http(s.addr, method, path, &[("Cookie", &cookie)], b"").await;
        assert_eq!(got, status, "{method} {path}: {body}");
        assert_eq!(
            header(&h, "content-type"),
            Some("text/html; charset=utf-8"),
            "{method} {path}"
        );
        assert!(
            header(&h, "content-security-policy").is_some_and(|c| c.contains("default-src 'self'")),
            "{method} {path}"
        );
        assert!(
            body.contains(&format!("<h1>{title}</h1>")),
            "{method} {path}: {body}"
        );
        if status == 405 {
            assert!(header(&h, "allow").is_some(), "{method} {path}");
        }
    }
}

/// While the store cannot be reached, the console fails closed: a sign-in
/// that could not be written to the audit trail opens no session, and the
/// audit export is a 503 page, not a `200` download with no events in it
/// (which `keymint audit verify --file` would read as an intact chain).
/// Once the store is back, both work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_store_unreachable_nobody_signs_in_unaudited_and_no_empty_export_is_served() {
    let Some(db) = crate::replicas::fresh_database().await else {
        return;
    };
    let relay = crate::failover::Relay::start().await;
    let s = TestServer::builder()
        .storage(keymint_server::config::StorageBackend::Postgres {
            options: Box::new(
                keymint_store::PostgresOptions::new(
                    &format!("postgres://postgres@127.0.0.1:{}/{db}", relay.port),
                    None,
                    4,
                    keymint_store::PgTls::Disable,
                )
                .unwrap(),
            ),
            password_file: None,
        })
        .start()
        .await
        .unwrap();
    let origin = s.url();
    let cookie = sign_in(&s, &s.admin_token).await;
    let export = |cookie: String| {
        let addr = s.addr;
        async move { http(addr, "GET", "/ui/audit/export", &[("Cookie", &cookie)], b"").await }
    };
    let (status, _, body) = export(cookie.clone()).await;
    assert_eq!(status, 200);
    assert!(body.contains("console.signed_in"), "{body}");

    relay.set_down(true);
    let (status, h, body) = export(cookie.clone()).await;
    assert_eq!(status, 503, "an export that read nothing: {body}");
    assert_eq!(header(&h, "content-type"), Some("text/html; charset=utf-8"));
    assert!(header(&h, "content-disposition").is_none());
    assert!(!body.to_lowercase().contains("postgres"), "{body}");

    let (status, h, body) = http(
        s.addr,
        "POST",
        "/ui/login",
        &[
            ("Origin", &origin),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        format!("token={}", keymint_client::encode(&s.admin_token)).as_bytes(),
    )
    .await;
    assert_eq!(status, 503, "a sign-in that could not be audited: {body}");
    assert!(header(&h, "set-cookie").is_none(), "no session was opened");
    assert!(!body.to_lowercase().contains("postgres"), "{body}");

    relay.set_down(false);
    let t0 = std::time::Instant::now();
    let cookie = loop {
        let (status, h, _) = http(
            s.addr,
            "POST",
            "/ui/login",
            &[
                ("Origin", &origin),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            format!("token={}", keymint_client::encode(&s.admin_token)).as_bytes(),
        )
        .await;
        if status == 303 {
            break header(&h, "set-cookie")
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .to_owned();
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(15),
            "never back: {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let (status, _, body) = export(cookie).await;
    assert_eq!(status, 200);
    assert_eq!(body.matches("console.signed_in").count(), 2, "{body}");
    s.stop().await;
}

/// When the store cannot write (another process holds SQLite's write
/// lock, as a full disk would refuse writes), a console action answers as
/// the API does: 503 with `Retry-After`, on a page that names nothing of
/// the store; it was a 500 "Internal error". The action goes through once
/// the store writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_action_while_the_store_cannot_write_is_a_503_with_retry_after() {
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    let origin = s.url();
    let t = start(&admin, "console-bot", None).await;
    let cookie = sign_in(&s, &s.admin_token).await;
    let (_, _, page) = http(
        s.addr,
        "GET",
        &format!("/ui/tasks/{}", t.id),
        &[("Cookie", &cookie)],
        b"",
    )
    .await;
    let at = page.find("name=\"csrf\" value=\"").unwrap() + 19;
    let csrf = page[at..at + 43].to_owned();
    let end = || {
        let (addr, path) = (s.addr, format!("/ui/tasks/{}/end", t.id));
        let (cookie, origin, csrf) = (cookie.clone(), origin.clone(), csrf.clone());
        async move {
            http(
                addr,
                "POST",
                &path,
                &[
                    ("Cookie", &cookie),
                    ("Origin", &origin),
                    ("Content-Type", "application/x-www-form-urlencoded"),
                ],
                format!("csrf={csrf}&reason=done").as_bytes(),
            )
            .await
        }
    };
    let lock = rusqlite::Connection::open(s.data_dir().join("keymint.db")).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let (status, h, body) = end().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(header(&h, "retry-after"), Some("5"));
    assert_eq!(header(&h, "content-type"), Some("text/html; charset=utf-8"));
    let lower = body.to_lowercase();
    for internal in ["locked", "sqlite", "storage backend", "database"] {
        assert!(!lower.contains(internal), "`{internal}` in: {body}");
    }
    assert!(body.contains("retry later"), "{body}");
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    let (status, _, body) = end().await;
    assert_eq!(status, 303, "it ends once the store writes again: {body}");
}

/// A page left open with live updates re-fetches itself every few seconds
/// (`console.js`, header `X-Keymint-Refresh: 1`). Those fetches are not
/// the operator's activity: they must not keep an unattended session
/// alive past the 30-minute idle limit, while a page the operator opens
/// does.
#[tokio::test]
async fn live_updates_do_not_keep_an_idle_session_alive() {
    let (s, clock) = clocked().await;
    let cookie = sign_in(&s, &s.admin_token).await;
    let refresh = [("Cookie", cookie.as_str()), ("X-Keymint-Refresh", "1")];
    // Refreshed for 40 minutes with nobody at the page: live until the
    // idle limit counted from the sign-in, then signed out.
    for mins in [10, 10, 9] {
        clock.advance_secs(mins * 60);
        let (status, _, body) = http(s.addr, "GET", "/ui", &refresh, b"").await;
        assert_eq!(status, 200, "{body}");
    }
    clock.advance_secs(11 * 60);
    let (status, h, _) = http(s.addr, "GET", "/ui", &refresh, b"").await;
    assert_eq!(
        status, 303,
        "40 minutes of refreshes alone kept the session"
    );
    assert_eq!(header(&h, "location"), Some("/ui/login"));

    // A page the operator asks for is activity.
    let cookie = sign_in(&s, &s.admin_token).await;
    for _ in 0..4 {
        clock.advance_secs(20 * 60);
        let (status, _, _) = http(s.addr, "GET", "/ui/tasks", &[("Cookie", &cookie)], b"").await;
        assert_eq!(status, 200);
    }
}

/// Signing in again from a browser that has a session ends that session:
/// the browser's cookie is replaced by the new one, so the old session
/// is no one's any more. It stayed open (up to 8 hours) for whoever had
/// copied the old cookie. A refused sign-in ends nothing.
#[tokio::test]
async fn signing_in_again_ends_the_session_the_browser_had() {
    let s = TestServer::start().await.unwrap();
    let first = sign_in(&s, &s.admin_token).await;
    let second = sign_in_from(&s, &s.admin_token, Some(&first)).await;
    assert_ne!(first, second);
    let (status, h, _) = http(s.addr, "GET", "/ui", &[("Cookie", &first)], b"").await;
    assert_eq!(status, 303, "the replaced session still opens the console");
    assert_eq!(header(&h, "location"), Some("/ui/login"));
    let (status, _, _) = http(s.addr, "GET", "/ui", &[("Cookie", &second)], b"").await;
    assert_eq!(status, 200);

    // A wrong token from the same browser: refused, and the session stays.
    let (status, _, _) = http(
        s.addr,
        "POST",
        "/ui/login",
        &[
            ("Origin", &s.url()),
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Cookie", &second),
        ],
        format!("token=kma_{}", "0".repeat(49)).as_bytes(),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _, _) = http(s.addr, "GET", "/ui", &[("Cookie", &second)], b"").await;
    assert_eq!(status, 200, "a refused sign-in ended the session");

    let events: List<AuditEvent> = s.admin().get("/v1/audit?limit=1000").await.unwrap();
    let kinds: Vec<&str> = events
        .items
        .iter()
        .filter(|e| e.kind.starts_with("console."))
        .map(|e| e.kind.as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "console.signed_in",
            "console.signed_in",
            "console.signed_out"
        ],
        "the replaced session's end is in the audit trail"
    );
}

/// An operator (or the admin) holds at most 50 console sessions: signing
/// in again and again without the cookie (a script, a leaked token) ends
/// their own least recently used session instead of filling the table,
/// which is shared by everyone (10,000) and, once full of live sessions,
/// kept every other operator and the admin from signing in for 30
/// minutes.
#[tokio::test]
async fn signing_in_over_and_over_ends_ones_own_oldest_sessions_only() {
    let ops = tempfile::tempdir().unwrap();
    let clock = keymint_core::ManualClock::new(keymint_store::conformance::T0);
    let s = TestServer::builder()
        .clock(clock.clone())
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
    let admin = sign_in(&s, &s.admin_token).await;
    let first = sign_in(&s, &alice).await;
    clock.advance_secs(1);
    let second = sign_in(&s, &alice).await;
    clock.advance_secs(1);
    // The first is used now: the second is the least recently used.
    let (status, _, _) = http(s.addr, "GET", "/ui", &[("Cookie", &first)], b"").await;
    assert_eq!(status, 200);
    let mut last = String::new();
    for _ in 0..49 {
        clock.advance_secs(1);
        last = sign_in(&s, &alice).await;
    }
    for (who, cookie, want) in [
        ("alice's least recently used session", &second, 303),
        ("alice's first, used since", &first, 200),
        ("alice's newest", &last, 200),
        ("the admin's", &admin, 200),
    ] {
        let (status, _, _) = http(s.addr, "GET", "/ui", &[("Cookie", cookie)], b"").await;
        assert_eq!(status, want, "{who}");
    }
}

/// Filter inputs are capped by the server, not only by the browser's
/// `maxlength`: a value over 256 bytes is refused with 400 (not passed to
/// the store) and not echoed; one of 256 bytes is a filter like any other.
#[tokio::test]
async fn oversized_filter_values_are_refused_by_the_server() {
    let s = TestServer::start().await.unwrap();
    let cookie = sign_in(&s, &s.admin_token).await;
    let long = "y".repeat(257);
    for path in [
        format!("/ui/tasks?workload={long}"),
        format!("/ui/tasks?q={long}"),
        format!("/ui/tasks?role=demo&before={long}"),
        format!("/ui/leases?task={long}"),
        format!("/ui/leases?workload={long}"),
        format!("/ui/approvals?status={long}"),
        format!("/ui/audit?actor={long}"),
        format!("/ui/audit?kind={long}"),
        format!("/ui/tasks?workload=a&x={long}"),
    ] {
        let (status, _, body) = http(s.addr, "GET", &path, &[("Cookie", &cookie)], b"").await;
        assert_eq!(status, 400, "{path}");
        assert!(!body.contains("yyyyyyyy"), "{path} echoed its input");
    }
    let fits = "y".repeat(256);
    for path in [
        format!("/ui/tasks?workload={fits}"),
        format!("/ui/leases?task={fits}"),
        format!("/ui/audit?actor={fits}"),
    ] {
        let (status, _, _) = http(s.addr, "GET", &path, &[("Cookie", &cookie)], b"").await;
        assert_eq!(status, 200, "{path}");
    }
}

/// Anyone can post a console form, signed in or not: a flood of forged
/// ones is refused every time, audited one by one only up to the broker's
/// burst, and the rest counted in one summary by form when the window
/// closes, so it cannot grow the audit trail without bound.
#[tokio::test]
async fn a_flood_of_forged_forms_is_audited_within_a_bound() {
    let (s, clock) = clocked().await;
    let admin = s.admin();
    let burst = keymint_server::broker::AUTH_AUDIT_BURST as usize;
    const N: usize = 160;
    let headers = [
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Origin", "http://evil.example"),
    ];
    for _ in 0..N {
        let (status, _, _) = http(s.addr, "POST", "/ui/login", &headers, b"token=x").await;
        assert_eq!(status, 403);
    }
    let of = |kind: &'static str| {
        let admin = admin.clone();
        async move {
            let ev: List<AuditEvent> = admin.get("/v1/audit?limit=1000").await.unwrap();
            ev.items
                .into_iter()
                .filter(|e| e.kind == kind)
                .collect::<Vec<_>>()
        }
    };
    let refused = of("console.csrf_refused").await;
    assert_eq!(refused.len(), burst);
    assert!(refused.iter().all(|e| e.data["form"] == "login"));
    assert!(of("console.csrf_refused.suppressed").await.is_empty());

    // The window closes: the expiry manager's tick writes the summary.
    clock.advance_secs(11);
    let t0 = std::time::Instant::now();
    let summary = loop {
        if let Some(e) = of("console.csrf_refused.suppressed").await.pop() {
            break e;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "no summary"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(summary.data["count"], (N - burst) as u64);
    assert_eq!(summary.data["by_form"]["login"], (N - burst) as u64);
    assert_eq!(of("console.csrf_refused").await.len(), burst);
}

/// A refused CSRF attempt (a form from another origin, or without the
/// session's token) leaves one audit event each, bounded: the attacker's
/// origin and form are not copied into the trail.
#[tokio::test]
async fn a_refused_csrf_attempt_is_audited_once_without_the_attackers_text() {
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    let t = crate::start_task(&admin, "worker").await;
    let cookie = sign_in(&s, &s.admin_token).await;
    let evil = format!("http://evil.example/{}", "Z".repeat(4000));
    let own = s.url();
    let attempts: [(&str, Option<&str>, &str); 3] = [
        ("/ui/tasks/{id}/end", Some(evil.as_str()), "csrf=whatever"),
        ("/ui/tasks/{id}/end", Some(own.as_str()), "csrf=ZZZZZZZZZZ"),
        ("/ui/login", Some(evil.as_str()), "token=ZZZZZZZZ"),
    ];
    for (path, origin, body) in attempts {
        let path = path.replace("{id}", &t.id);
        let mut h = vec![
            ("Cookie", cookie.as_str()),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ];
        if let Some(o) = origin {
            h.push(("Origin", o));
        }
        let (status, _, _) = http(s.addr, "POST", &path, &h, body.as_bytes()).await;
        assert_eq!(status, 403, "{path}");
    }
    let still: Task = admin.get(&format!("/v1/tasks/{}", t.id)).await.unwrap();
    assert_eq!(still.status, keymint_proto::TaskStatus::Active);
    let ev: List<AuditEvent> = admin.get("/v1/audit?limit=500").await.unwrap();
    let refused: Vec<&AuditEvent> = ev
        .items
        .iter()
        .filter(|e| e.kind == "console.csrf_refused")
        .collect();
    assert_eq!(refused.len(), 3, "{refused:?}");
    for e in &refused {
        let text = serde_json::to_string(e).unwrap();
        assert!(text.len() < 1024, "{text}");
        assert!(!text.contains("ZZZZ"), "{text}");
    }
    assert_eq!(refused.iter().filter(|e| e.actor == "admin").count(), 2);
}
