//! Bad input gets a clear 4xx and changes nothing.

use keymint_core::token;
use keymint_proto::{List, Task};
use keymint_testkit::TestServer;

use crate::{introspect, issue, start_task};

/// What a request could have changed: the number of tasks and of audit
/// events other than refused authentications (which are audited by design).
async fn state(s: &TestServer) -> (usize, usize) {
    let admin = s.admin();
    let tasks: List<Task> = admin.get("/v1/tasks?limit=1000").await.unwrap();
    let events = auth_failures_and_rest(s).await.1;
    (tasks.items.len(), events)
}

/// (auth.failed events, all other events).
async fn auth_failures_and_rest(s: &TestServer) -> (Vec<keymint_proto::AuditEvent>, usize) {
    let all: List<keymint_proto::AuditEvent> = s.admin().get("/v1/audit?limit=1000").await.unwrap();
    let (failed, rest): (Vec<_>, Vec<_>) =
        all.items.into_iter().partition(|e| e.kind == "auth.failed");
    (failed, rest.len())
}

#[tokio::test]
async fn malformed_oversized_and_unknown_bodies_are_refused() {
    let s = TestServer::builder().max_body(4096).start().await.unwrap();
    let admin = s.admin();
    let t = start_task(&admin, "w").await;
    let before = state(&s).await;
    let json = Some("application/json");
    let cases: Vec<(&str, Option<&str>, Vec<u8>, u16, &str)> = vec![
        (
            "/v1/tasks",
            json,
            b"{\"workload\": \"a\",".to_vec(),
            400,
            "invalid_json",
        ),
        ("/v1/tasks", json, b"not json".to_vec(), 400, "invalid_json"),
        (
            "/v1/tasks",
            json,
            br#"{"workload":"a","role":"demo","admin":true}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "/v1/tasks",
            json,
            br#"{"workload":"a","role":"demo","ttl_secs":-5}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "/v1/tasks",
            json,
            br#"{"workload":"a","role":"demo","ttl_secs":99999999999}"#.to_vec(),
            400,
            "ttl_exceeds_limit",
        ),
        (
            "/v1/tasks",
            json,
            br#"{"workload":"a","role":"demo","ttl_secs":0}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "/v1/tasks",
            json,
            br#"{"workload":"a","role":"demo","ttl_secs":1e99}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "/v1/tasks",
            json,
            br#"{"workload":"a","role":"nope"}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "/v1/tasks",
            json,
            br#"{"workload":"a\nforged line","role":"demo"}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "/v1/tasks",
            json,
            br#"{"workload":"a","role":"demo","scopes":["x'); DROP TABLE tasks;--"]}"#.to_vec(),
            400,
            "invalid_request",
        ),
        // A struct read from an array binds items to fields by their order.
        (
            "/v1/tasks",
            json,
            br#"["arrwl","demo","intent",null,null,60,null,null,null]"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "/v1/tasks",
            json,
            b"  \"w\"".to_vec(),
            400,
            "invalid_request",
        ),
        ("/v1/tasks", json, b"7".to_vec(), 400, "invalid_request"),
        (
            "/v1/tasks",
            Some("text/plain"),
            br#"{"workload":"a","role":"demo"}"#.to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            "/v1/tasks",
            json,
            format!(r#"{{"workload":"{}","role":"demo"}}"#, "a".repeat(8000)).into_bytes(),
            413,
            "payload_too_large",
        ),
    ];
    let lease_path = format!("/v1/tasks/{}/leases", t.id);
    let more: Vec<(&str, Option<&str>, Vec<u8>, u16, &str)> = vec![
        (
            &lease_path,
            json,
            br#"{"ttl_secs":-1}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            &lease_path,
            json,
            br#"{"ttl_secs":86400}"#.to_vec(),
            400,
            "ttl_exceeds_limit",
        ),
        (
            &lease_path,
            json,
            br#"{"scopes":["db:admin"]}"#.to_vec(),
            403,
            "scope_not_granted",
        ),
        (
            &lease_path,
            json,
            br#"{"ttl":5}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (&lease_path, json, b"[]".to_vec(), 400, "invalid_request"),
        (&lease_path, json, b"[60]".to_vec(), 400, "invalid_request"),
    ];
    for (path, ct, body, status, code) in cases.into_iter().chain(more) {
        let r = admin
            .raw(http::Method::POST, path, ct, body.clone())
            .await
            .unwrap();
        assert_eq!(
            r.status.as_u16(),
            status,
            "{path} {}: {}",
            String::from_utf8_lossy(&body)
                .chars()
                .take(80)
                .collect::<String>(),
            r.text()
        );
        assert_eq!(r.headers["content-type"], "application/problem+json");
        let p: keymint_proto::Problem = r.json().unwrap();
        assert_eq!(p.code, code, "{}", p.detail);
        assert!(!p.detail.is_empty());
    }
    // Denials are audited (that moves the head) but nothing else changed.
    let after = state(&s).await;
    assert_eq!(after.0, before.0, "no task was created");
    let leases: List<keymint_proto::Lease> = admin
        .get(&format!("/v1/leases?task={}", t.id))
        .await
        .unwrap();
    assert!(leases.items.is_empty(), "no lease was created");
}

/// A body whose declared length is over the limit is refused at once,
/// before any of it is read: not after the read times out.
#[tokio::test]
async fn a_declared_length_over_the_limit_is_refused_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::builder().max_body(4096).start().await.unwrap();
    let before = state(&s).await;
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /v1/tasks HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: 20971520\r\n\r\n{{\"workload\":",
        s.admin_token
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
        .await
        .expect("answered before the rest of the body came")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("payload_too_large"), "{text}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(state(&s).await, before, "nothing changed");
}

/// Two `Content-Type`s (answered by whichever came first before: the
/// result hung on their order) and a content coding the API does not
/// decode (the body was read as if plain) are refused; nothing changes.
#[tokio::test]
async fn two_media_types_or_a_content_coding_are_refused() {
    let s = TestServer::builder().start().await.unwrap();
    let before = state(&s).await;
    let body = r#"{"workload":"w","role":"demo"}"#;
    for (headers, status, code) in [
        (
            "content-type: application/json\r\ncontent-type: text/plain",
            400,
            "invalid_request",
        ),
        (
            "content-type: text/plain\r\ncontent-type: application/json",
            400,
            "invalid_request",
        ),
        (
            "content-type: application/json\r\ncontent-encoding: gzip",
            415,
            "unsupported_media_type",
        ),
    ] {
        let sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let req = format!(
            "POST /v1/tasks HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n{headers}\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            s.admin_token,
            body.len()
        );
        let text = crate::exchange(sock, req.as_bytes()).await;
        assert!(
            text.starts_with(&format!("HTTP/1.1 {status}")),
            "{headers}: {text}"
        );
        assert!(text.contains(code), "{headers}: {text}");
    }
    assert_eq!(state(&s).await, before, "nothing changed");
}

#[tokio::test]
async fn error_bodies_never_echo_values() {
    let s = TestServer::start().await.unwrap();
    let secret = "sk-proj-THIS-IS-A-FAKE-KEY-FOR-TESTING-1234567890";
    let body = format!(r#"{{"workload":"a","role":"demo","ttl_secs":"{secret}"}}"#);
    let r = s
        .admin()
        .raw(
            http::Method::POST,
            "/v1/tasks",
            Some("application/json"),
            body.into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(!r.text().contains("FAKE-KEY"), "{}", r.text());
    assert!(r.text().contains("line 1"), "says where: {}", r.text());
}

#[tokio::test]
async fn forged_truncated_and_never_issued_tokens_are_refused() {
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    let t = start_task(&admin, "w").await;
    let (_, real) = issue(&admin, &t.id).await;
    let before = state(&s).await;

    let mut flipped = real.clone().into_bytes();
    flipped[10] = if flipped[10] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    // Right shape and checksum, never issued.
    let body = format!("kmt_{}", "Q".repeat(43));
    let unissued = format!("{body}{}", token::checksum(body.as_bytes()));
    assert!(token::check(&unissued).is_ok());
    let admin_forged = format!("kma_{}", &real[4..]);

    let cases = [
        (real[..30].to_owned(), "wrong length"),
        (flipped.clone(), "checksum"),
        (unissued.clone(), "not recognised"),
        (admin_forged.clone(), "checksum"),
        ("sk-proj-abc".to_owned(), "unknown prefix"),
        (String::new(), "Bearer <token>"),
    ];
    for (tok, why) in &cases {
        let r = s
            .client(tok)
            .raw(
                http::Method::GET,
                &format!("/v1/tasks/{}", t.id),
                None,
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 401, "{why}");
        let p: keymint_proto::Problem = r.json().unwrap();
        assert!(p.detail.contains(why), "`{}` should say `{why}`", p.detail);
        if tok.len() >= 20 {
            assert!(
                !p.detail.contains(&tok[4..12]),
                "the error must not echo the token"
            );
        }
    }
    for tok in [&flipped, &unissued, &admin_forged] {
        assert!(!introspect(&admin, tok).await.active);
    }
    assert!(
        introspect(&admin, &real).await.active,
        "the real token still works"
    );
    assert_eq!(state(&s).await, before, "nothing changed");
    // Each refusal that reached authentication is audited: why, what kind
    // of credential, never any of it.
    let (failed, _) = auth_failures_and_rest(&s).await;
    assert_eq!(failed.len(), 5, "{failed:?}");
    assert!(
        failed
            .iter()
            .all(|e| e.outcome == keymint_core::audit::Outcome::Denied)
    );
    assert_eq!(failed[2].reason.as_deref(), Some("token not recognised"));
    assert_eq!(failed[2].data["credential"], "kmt");
    let text = serde_json::to_string(&failed).unwrap();
    for (tok, _) in &cases {
        if tok.len() >= 12 {
            assert!(
                !text.contains(&tok[4..12]),
                "no token contents in the audit trail"
            );
        }
    }
    // A task token is not an admin token.
    let e = s
        .client(&real)
        .get::<List<Task>>("/v1/tasks")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("forbidden"));
    let r = s
        .client(&real)
        .raw(
            http::Method::POST,
            "/v1/introspect",
            Some("application/x-www-form-urlencoded"),
            format!("token={real}").into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    let r = admin
        .raw(http::Method::GET, "/v1/tasks", None, vec![])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let r = s
        .anonymous()
        .with_token("")
        .raw(http::Method::GET, "/v1/tasks", None, vec![])
        .await
        .unwrap();
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn unknown_paths_ids_and_methods() {
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    for (m, p, status) in [
        (http::Method::GET, "/v1/nothing", 404),
        (http::Method::GET, "/v1/tasks/..%2F..%2Fetc%2Fpasswd", 404),
        (http::Method::GET, "/v1/tasks/tsk_'%20OR%201=1--", 404),
        (http::Method::GET, "/v1/leases/lse_nope", 404),
        (http::Method::DELETE, "/v1/tasks", 405),
        (http::Method::GET, "/v1/tasks/x/end", 405),
    ] {
        let r = admin.raw(m.clone(), p, None, vec![]).await.unwrap();
        assert_eq!(r.status.as_u16(), status, "{m} {p}: {}", r.text());
        assert_eq!(r.headers["content-type"], "application/problem+json");
    }
}

/// A flood of bad credentials is counted in full but audited one by one
/// only up to the window's burst; the rest become one summary event, so an
/// unauthenticated caller cannot grow the audit chain without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_credentials_is_summarised_in_the_audit_trail() {
    use keymint_core::{ManualClock, Timestamp};
    let clock = ManualClock::new(Timestamp(1_900_000_000_000));
    let s = TestServer::builder()
        .clock(clock.clone())
        .start()
        .await
        .unwrap();
    let burst = keymint_server::broker::AUTH_AUDIT_BURST as usize;
    let flood = burst + 30;
    let forged = format!("kmt_{}", "A".repeat(43));
    let mut tasks = Vec::new();
    for i in 0..flood {
        let c = if i % 2 == 0 {
            s.client(&forged)
        } else {
            s.client("eyJhbGciOiJub25lIn0.e30.")
        };
        tasks.push(tokio::spawn(async move {
            c.get::<List<Task>>("/v1/tasks").await.unwrap_err().status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Some(401));
    }
    let (failed, _) = auth_failures_and_rest(&s).await;
    assert_eq!(failed.len(), burst, "one event each up to the burst");

    // After the window the expiry manager writes the summary on its own.
    clock.advance_secs(11);
    let t0 = std::time::Instant::now();
    let summary = loop {
        let all: List<keymint_proto::AuditEvent> =
            s.admin().get("/v1/audit?limit=1000").await.unwrap();
        if let Some(e) = all
            .items
            .into_iter()
            .find(|e| e.kind == "auth.failed.suppressed")
        {
            break e;
        }
        assert!(t0.elapsed().as_secs() < 10, "no summary event");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(summary.data["count"], 30);
    let kinds = summary.data["by_credential"].as_object().unwrap();
    let sum: u64 = kinds.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(sum, 30);
    // The metric counts every one of them.
    let line = crate::metric(&s, "keymint_auth_failures_total").await;
    assert_eq!(line, format!("keymint_auth_failures_total {flood}"));
    // A new window audits failures one by one again.
    let _ = s.client(&forged).get::<List<Task>>("/v1/tasks").await;
    let (failed, _) = auth_failures_and_rest(&s).await;
    assert_eq!(failed.len(), burst + 1);
}

/// Whatever a caller puts in a field name, an enum value, a role name, a
/// query parameter or a path parameter, the error names the field (or what
/// was expected), never the caller's value: a fake key, markup, 10 KB,
/// control characters, or text that mimics serde's own message.
#[tokio::test]
async fn error_bodies_name_the_field_never_the_callers_value() {
    use serde_json::{Map, Value, json};
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    let t = start_task(&admin, "w").await;
    let before = state(&s).await;
    let fake_key = format!(
        "sk-proj-{}",
        keymint_core::token::random_base62(40).unwrap().as_str()
    );
    let attacks = [
        fake_key,
        "<script>alert('x')</script>".to_owned(),
        "Z".repeat(10_000),
        "ctl\u{7}\u{1b}[31m\r\nX-Injected: 1".to_owned(),
        "x`, expected one of `admin-only-field".to_owned(),
    ];
    let post = http::Method::POST;
    let get = http::Method::GET;
    for a in &attacks {
        let enc = keymint_client::encode(a);
        let mut unknown_field = Map::new();
        unknown_field.insert(a.clone(), json!(1));
        let cases: Vec<(http::Method, String, Option<Value>)> = vec![
            (
                post.clone(),
                "/v1/tasks".into(),
                Some(Value::Object(unknown_field)),
            ),
            (
                post.clone(),
                "/v1/tasks".into(),
                Some(json!({"workload": "w", "role": a})),
            ),
            (
                post.clone(),
                "/v1/tasks".into(),
                Some(json!({"workload": "w", "role": "demo", "ttl_secs": a})),
            ),
            (
                post.clone(),
                format!("/v1/tasks/{}/end", t.id),
                Some(json!({"status": a})),
            ),
            (get.clone(), format!("/v1/tasks?status={enc}"), None),
            (get.clone(), format!("/v1/tasks?{enc}=1"), None),
            (get.clone(), format!("/v1/leases?limit={enc}"), None),
            (get.clone(), format!("/v1/tasks/{enc}"), None),
            (get.clone(), format!("/v1/leases/{enc}"), None),
            (
                post.clone(),
                format!("/v1/upstreams/{enc}/key"),
                Some(json!({"key": "k"})),
            ),
            (get.clone(), format!("/v1/ssh/cas/{enc}"), None),
            (post.clone(), format!("/v1/databases/{enc}/rotate"), None),
        ];
        for (method, path, body) in cases {
            let r = admin
                .raw(
                    method.clone(),
                    &path,
                    body.as_ref().map(|_| "application/json"),
                    body.map(|b| b.to_string().into_bytes()).unwrap_or_default(),
                )
                .await
                .unwrap();
            let what = format!("{method} {}", &path[..path.len().min(60)]);
            assert!(
                (400..500).contains(&r.status.as_u16()),
                "{what}: {} {}",
                r.status,
                r.text()
            );
            let text = r.text();
            let head: String = a.chars().take(24).collect();
            for bad in [
                a.as_str(),
                head.as_str(),
                "<script",
                "X-Injected",
                "\u{7}",
                "admin-only",
            ] {
                assert!(
                    !text.contains(bad),
                    "{what}: the body echoes the caller's value: {text}"
                );
            }
            let headers = format!("{:?}", r.headers);
            assert!(!headers.contains("X-Injected") && !headers.contains(&head));
        }
    }
    // Still useful: the position, or what was expected.
    let r = admin
        .raw(
            post.clone(),
            "/v1/tasks",
            Some("application/json"),
            br#"{"workload":"w","role":"demo","sk-proj-notreal":1}"#.to_vec(),
        )
        .await
        .unwrap();
    let p: keymint_proto::Problem = r.json().unwrap();
    assert!(
        p.detail.starts_with("unknown field at line 1 column"),
        "{}",
        p.detail
    );
    assert!(
        p.detail.contains("expected one of `workload`"),
        "{}",
        p.detail
    );
    let r = admin
        .raw(
            post,
            &format!("/v1/tasks/{}/end", t.id),
            Some("application/json"),
            br#"{"status":"sk-proj-notreal"}"#.to_vec(),
        )
        .await
        .unwrap();
    let p: keymint_proto::Problem = r.json().unwrap();
    assert!(p.detail.contains("unknown variant"), "{}", p.detail);
    assert!(p.detail.contains("`completed`"), "{}", p.detail);
    assert!(!p.detail.contains("notreal"), "{}", p.detail);
    assert_eq!(state(&s).await, before, "nothing changed");
}

/// Text whose display differs from what is stored is refused where people
/// read it: bidirectional formatting characters ("Trojan Source") in a
/// workload, an intent, a purpose or an end reason, and invisible ones in a
/// workload's name; nothing is changed. Text in right-to-left scripts, and
/// an emoji joined by a zero-width joiner in an intent, are accepted.
#[tokio::test]
async fn text_that_displays_otherwise_than_it_reads_is_refused() {
    use serde_json::json;
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    let t = start_task(&admin, "w").await;
    let before = state(&s).await;
    let start = |body: serde_json::Value| {
        let admin = s.admin();
        async move {
            admin
                .raw(
                    http::Method::POST,
                    "/v1/tasks",
                    Some("application/json"),
                    body.to_string().into_bytes(),
                )
                .await
                .unwrap()
        }
    };
    let task = |field: &str, v: &str| {
        let mut b = json!({"workload": "w", "role": "demo", "ttl_secs": 60});
        b[field] = json!(v);
        b
    };
    for (field, v) in [
        ("workload", "agent\u{202e}lmth.exe"),
        ("workload", "\u{2067}admin\u{2069}"),
        ("workload", "age\u{200b}nt"),
        ("workload", "agent\u{feff}"),
        ("workload", "agent\u{200f}"),
        ("intent", "read logs \u{202e}etadpu\u{202c} only"),
        ("intent", "delete rows\u{2066}"),
        ("intent", "read logs\u{2028}approved: drop tables"),
        ("purpose", "\u{202a}backup"),
    ] {
        let r = start(task(field, v)).await;
        assert_eq!(r.status, 400, "{field} {v:?}: {}", r.text());
        let p: keymint_proto::Problem = r.json().unwrap();
        assert!(p.detail.contains(field), "{}", p.detail);
        assert!(!p.detail.contains(v), "the value is not echoed");
    }
    let r = admin
        .raw(
            http::Method::POST,
            &format!("/v1/tasks/{}/end", t.id),
            Some("application/json"),
            json!({"status": "completed", "reason": "done \u{202e}deliaf"})
                .to_string()
                .into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    // Nothing changed; the refused starts are audited (`task.denied`, the
    // reason naming the field), without the refused text.
    assert_eq!(state(&s).await.0, before.0, "no task was started");
    let events: List<keymint_proto::AuditEvent> = admin.get("/v1/audit?limit=1000").await.unwrap();
    let new: Vec<_> = events
        .items
        .iter()
        .filter(|e| e.kind != "auth.failed")
        .skip(before.1)
        .collect();
    assert_eq!(new.len(), 9, "{new:?}");
    assert!(new.iter().all(|e| e.kind == "task.denied"), "{new:?}");
    let text = serde_json::to_string(&new).unwrap();
    for c in ['\u{202e}', '\u{2067}', '\u{200b}', '\u{2066}', '\u{2028}'] {
        assert!(!text.contains(c), "{c:?} in the trail");
    }
    let still: Task = admin.get(&format!("/v1/tasks/{}", t.id)).await.unwrap();
    assert_eq!(still.status, keymint_core::model::TaskStatus::Active);

    // Right-to-left scripts need no formatting characters; an intent may
    // hold an emoji sequence (a zero-width joiner).
    for b in [
        task("workload", "סוכן-גיבוי"),
        task("intent", "تلخيص التذاكر المفتوحة"),
        task("intent", "pair with 👩\u{200d}💻 on triage"),
    ] {
        let r = start(b.clone()).await;
        assert_eq!(r.status, 201, "{b}: {}", r.text());
    }
}

/// `POST` (or `GET`) `path` with a body of `content_type`, raw.
async fn send(
    c: &keymint_client::Client,
    method: http::Method,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> keymint_client::RawResponse {
    c.raw(method, path, content_type, body).await.unwrap()
}

/// A problem document's detail, checking the status and the media type.
fn problem(r: &keymint_client::RawResponse, status: u16) -> keymint_proto::Problem {
    assert_eq!(r.status.as_u16(), status, "{}", r.text());
    assert_eq!(
        r.headers["content-type"],
        "application/problem+json",
        "{}",
        r.text()
    );
    r.json().unwrap()
}

/// Numbers past what the API's schema (`int64`) holds are refused with the
/// field named, never wrapped or quietly capped: an audit cursor of 2^63
/// (which a cast made -2^63, reading the trail from its start), a renewal's
/// increment (refused as a `ttl_secs` of that size is), and a page size
/// outside 1..=1000 on every list, approvals included.
#[tokio::test]
async fn numbers_past_int64_and_page_sizes_out_of_range_are_refused() {
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    let t = start_task(&admin, "w").await;
    let (lease, _) = issue(&admin, &t.id).await;
    let get = http::Method::GET;
    for after in ["9223372036854775808", "18446744073709551615"] {
        let r = send(
            &admin,
            get.clone(),
            &format!("/v1/audit?after={after}"),
            None,
            vec![],
        )
        .await;
        let p = problem(&r, 400);
        assert!(p.detail.contains("`after`"), "{}", p.detail);
        assert!(!p.detail.contains(after), "{}", p.detail);
    }
    let none: List<keymint_proto::AuditEvent> = admin
        .get("/v1/audit?after=9223372036854775807")
        .await
        .unwrap();
    assert!(none.items.is_empty());

    for path in [
        "/v1/approvals?limit=0",
        "/v1/approvals?limit=1001",
        "/v1/tasks?limit=0",
        "/v1/audit?limit=1001",
    ] {
        let p = problem(&send(&admin, get.clone(), path, None, vec![]).await, 400);
        assert_eq!(p.detail, "`limit` must be between 1 and 1000", "{path}");
    }
    let ok: List<keymint_core::model::Approval> =
        admin.get("/v1/approvals?limit=1000").await.unwrap();
    assert!(ok.items.is_empty());

    // The same words as a lease asked for with a ttl of that size.
    for huge in [1u64 << 63, u64::MAX] {
        let issue_error = problem(
            &send(
                &admin,
                http::Method::POST,
                &format!("/v1/tasks/{}/leases", t.id),
                Some("application/json"),
                format!(r#"{{"ttl_secs":{huge}}}"#).into_bytes(),
            )
            .await,
            400,
        );
        let renew_error = problem(
            &send(
                &admin,
                http::Method::POST,
                &format!("/v1/leases/{}/renew", lease.lease.id),
                Some("application/json"),
                format!(r#"{{"increment_secs":{huge}}}"#).into_bytes(),
            )
            .await,
            400,
        );
        assert_eq!(renew_error.code, issue_error.code);
        assert_eq!(renew_error.detail, issue_error.detail);
    }
    let r = send(
        &admin,
        http::Method::POST,
        &format!("/v1/leases/{}/renew", lease.lease.id),
        Some("application/json"),
        format!(r#"{{"increment_secs":{}}}"#, i64::MAX).into_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "the largest int64 is capped: {}", r.text());
    assert_eq!(r.json::<serde_json::Value>().unwrap()["capped"], true);
}

/// Every refusal is in its route's own shape, never axum's `text/plain`:
/// a path parameter that is not UTF-8 once percent-decoded is a problem
/// document on every `/v1` route; an oversized form is OAuth's error at the
/// token and revocation endpoints and the console's page at its login; a
/// path naming no MCP server is a JSON-RPC error (404).
#[tokio::test]
async fn refusals_outside_handlers_keep_their_routes_shape() {
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    let (get, post, delete) = (http::Method::GET, http::Method::POST, http::Method::DELETE);
    for (m, path, param) in [
        (get.clone(), "/v1/tasks/%ff%fe", "id"),
        (post.clone(), "/v1/tasks/%ff/end", "id"),
        (post.clone(), "/v1/tasks/%c3%28/leases", "id"),
        (get.clone(), "/v1/leases/%ff", "id"),
        (post.clone(), "/v1/leases/%ff/renew", "id"),
        (get.clone(), "/v1/entries/%fe", "id"),
        (delete.clone(), "/v1/entries/%fe", "id"),
        (get.clone(), "/v1/approvals/%ff", "id"),
        (post.clone(), "/v1/suspensions/%ff/lift", "id"),
        (post.clone(), "/v1/upstreams/%ff/key", "id"),
        (post.clone(), "/v1/databases/%ff/rotate", "name"),
        (get.clone(), "/v1/ssh/cas/%ff", "name"),
        (get.clone(), "/v1/inventory/%ff", "id"),
    ] {
        let r = send(
            &admin,
            m.clone(),
            path,
            Some("application/json"),
            b"{}".to_vec(),
        )
        .await;
        let p = problem(&r, 400);
        assert_eq!(p.code, "invalid_request", "{m} {path}");
        assert!(
            p.detail.contains(&format!("`{param}`")),
            "{m} {path}: {}",
            p.detail
        );
    }

    let big = format!("token={}", "a".repeat(70 * 1024)).into_bytes();
    for path in ["/oauth/token", "/oauth/revoke"] {
        let r = send(
            &s.anonymous(),
            post.clone(),
            path,
            Some("application/x-www-form-urlencoded"),
            big.clone(),
        )
        .await;
        assert_eq!(r.status, 413, "{path}: {}", r.text());
        assert!(
            r.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{path}"
        );
        let e: serde_json::Value = r.json().unwrap();
        assert_eq!(e["error"], "invalid_request", "{path}: {e}");
        assert!(
            e["error_description"].as_str().unwrap().contains("bytes"),
            "{e}"
        );
    }
    let r = send(
        &s.anonymous(),
        post.clone(),
        "/ui/login",
        Some("application/x-www-form-urlencoded"),
        big,
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"),
        "{:?}",
        r.headers
    );
    assert!(r.text().contains("the form exceeds"), "{}", r.text());

    // With an MCP server configured, a path that names another one.
    let s = TestServer::builder()
        .config_toml(
            r#"
[issuer]
algorithms = ["ES256"]

[[roles]]
name = "tools"
engine = "jwt"
scopes = ["tools:call"]
default_ttl = "5m"
max_ttl = "30m"
[roles.jwt]
audience = "https://keymint.test/mcp/tools"

[[mcp.servers]]
name = "tools"
upstream = "http://127.0.0.1:9/mcp"
resource = "https://keymint.test/mcp/tools"
"#,
        )
        .start()
        .await
        .unwrap();
    for m in [post, get, delete] {
        let r = send(
            &s.anonymous(),
            m.clone(),
            "/mcp/nope-sk-proj-x",
            Some("application/json"),
            br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#.to_vec(),
        )
        .await;
        assert_eq!(r.status, 404, "{m}");
        let e: serde_json::Value = r.json().unwrap();
        assert_eq!(e["error"]["code"], -32004, "{m}: {e}");
        assert!(!r.text().contains("nope"), "{}", r.text());
    }
}

/// A workload's name may not be blank: only whitespace is refused, with
/// the field named; whitespace around a name stays as it is.
#[tokio::test]
async fn a_blank_workload_name_is_refused() {
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    for w in ["   ", "\t", "\u{3000}"] {
        let r = send(
            &admin,
            http::Method::POST,
            "/v1/tasks",
            Some("application/json"),
            serde_json::json!({"workload": w, "role": "demo"})
                .to_string()
                .into_bytes(),
        )
        .await;
        let p = problem(&r, 400);
        assert!(p.detail.contains("`workload`"), "{}", p.detail);
    }
    let t = start_task(&admin, " padded ").await;
    assert_eq!(t.workload, " padded ");
}

/// A scope that is refused, as malformed or as not granted, is named by
/// where it stands among those asked for, never repeated back: not in the
/// error body and not in the `*.denied` event's reason. Only a scope of
/// the role itself (text the operator wrote) is named. Before, a malformed
/// one was echoed (32 characters: markup, quotes, a backtick that closes
/// the message's quoting) and a well-formed one whole, so a key pasted as
/// a scope went into the audit trail.
#[tokio::test]
async fn refused_scopes_are_named_by_position_never_echoed() {
    use serde_json::json;
    let s = TestServer::start().await.unwrap();
    let admin = s.admin();
    let t = start_task(&admin, "w").await;
    let fake_key = format!(
        "sk-proj-{}",
        keymint_core::token::random_base62(40).unwrap().as_str()
    );
    let attacks = [
        fake_key,
        "<script>alert('x')</script>".to_owned(),
        "Z".repeat(10_000),
        "ctl\u{7}\u{1b}[31m\r\nX-Injected: 1".to_owned(),
        "x`, expected one of `admin-only-field".to_owned(),
        "MARKER\u{200B}invisible".to_owned(),
    ];
    for a in &attacks {
        let head: String = a.chars().take(12).collect();
        let cases = [
            (
                "/v1/tasks".to_owned(),
                json!({"workload": "w", "role": "demo", "scopes": ["llm:chat", a]}),
                "scope 2 of those asked for",
            ),
            (
                format!("/v1/tasks/{}/leases", t.id),
                json!({"scopes": [a]}),
                "scope 1 of those asked for",
            ),
        ];
        for (path, body, named) in cases {
            let r = admin
                .raw(
                    http::Method::POST,
                    &path,
                    Some("application/json"),
                    body.to_string().into_bytes(),
                )
                .await
                .unwrap();
            assert!(
                (400..500).contains(&r.status.as_u16()),
                "{path}: {} {}",
                r.status,
                r.text()
            );
            let text = r.text();
            assert!(text.contains(named), "{path}: {text}");
            for bad in [
                head.as_str(),
                "<script",
                "X-Injected",
                "\u{7}",
                "admin-only",
                "MARKER",
            ] {
                assert!(
                    !text.contains(bad),
                    "{path}: the body echoes the scope: {text}"
                );
            }
        }
        let all: List<keymint_proto::AuditEvent> = admin.get("/v1/audit?limit=1000").await.unwrap();
        let denied: Vec<_> = all
            .items
            .iter()
            .filter(|e| e.kind.ends_with(".denied"))
            .collect();
        assert!(!denied.is_empty());
        for e in denied {
            let ev = serde_json::to_string(e).unwrap();
            for bad in [
                head.as_str(),
                "<script",
                "X-Injected",
                "admin-only",
                "MARKER",
            ] {
                assert!(!ev.contains(bad), "the audit event echoes the scope: {ev}");
            }
        }
    }
    // A scope of the role that the task does not hold is named: it is the
    // operator's text, and the name is what the caller needs.
    let narrow: Task = admin
        .post(
            "/v1/tasks",
            &json!({"workload": "w", "role": "demo", "scopes": ["llm:chat"]}),
        )
        .await
        .unwrap();
    let e = admin
        .post::<_, keymint_proto::IssuedLease>(
            &format!("/v1/tasks/{}/leases", narrow.id),
            &json!({"scopes": ["llm:embeddings"]}),
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("scope `llm:embeddings` is not granted by task"),
        "{e}"
    );
}
