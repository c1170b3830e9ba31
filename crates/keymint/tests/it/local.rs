//! The local socket: a process on this host is what it attests to (uid,
//! executable hash), with no secret at all. Real clients: curl is the
//! registered workload; python3 on the same uid is not.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use keymint_proto::{AuditEvent, List, Task};
use keymint_testkit::TestServer;
use sha2::Digest;

fn sha256_of(path: &str) -> String {
    let real = std::fs::canonicalize(path).unwrap();
    hex::encode(sha2::Sha256::digest(std::fs::read(real).unwrap()))
}

fn curl(sock: &std::path::Path, body: &str) -> (String, String) {
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(sock)
        .args([
            "-X",
            "POST",
            "http://localhost/v1/tasks",
            "-H",
            "content-type: application/json",
            "-d",
            body,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_process_gets_what_its_executable_is_registered_for() {
    if Command::new("curl").arg("--version").output().is_err() {
        assert!(!crate::postgres::in_ci(), "curl is required under CI=true");
        eprintln!("skipped: curl is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run/keymint.sock");
    let uid = std::fs::metadata(dir.path()).unwrap().uid();
    let curl_hash = sha256_of("/usr/bin/curl");
    let policy = format!(
        r#"@id("curl-agent-works")
permit(principal == Keymint::Workload::"curl-agent", action == Keymint::Action::"start_task", resource)
when {{ principal.method == "unix" && principal.hasTag("exe_sha256")
       && principal.getTag("exe_sha256") == "{curl_hash}" }};"#
    );
    let s = TestServer::builder()
        .policy(&policy)
        .config_toml(&format!(
            "[local]\nsocket = {:?}\n[[local.entry]]\nworkload = \"curl-agent\"\n\
             selectors = {{ uid = {uid}, exe_sha256 = \"{curl_hash}\" }}\n",
            sock.display().to_string()
        ))
        .start()
        .await
        .unwrap();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "owner-only socket");

    // curl, registered by its hash: no token, and the task is its own.
    let sock2 = sock.clone();
    let (code, body) =
        tokio::task::spawn_blocking(move || curl(&sock2, r#"{"role":"demo","ttl_secs":60}"#))
            .await
            .unwrap();
    assert_eq!(code, "201", "{body}");
    let t: Task = serde_json::from_str(&body).unwrap();
    assert_eq!(t.workload, "curl-agent");
    // It cannot name another workload.
    let sock2 = sock.clone();
    let (code, body) = tokio::task::spawn_blocking(move || {
        curl(&sock2, r#"{"role":"demo","workload":"root","ttl_secs":60}"#)
    })
    .await
    .unwrap();
    assert_eq!(code, "403", "{body}");

    // python3 on the same uid is not curl: refused, and says what it saw.
    let sock2 = sock.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg("-c")
            .arg(
                "import socket,sys\n\
                 s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n\
                 b=b'{\"role\":\"demo\",\"ttl_secs\":60}'\n\
                 s.sendall(b'POST /v1/tasks HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: application/json\\r\\nConnection: close\\r\\nContent-Length: %d\\r\\n\\r\\n' % len(b) + b)\n\
                 print(s.makefile('rb').read().decode())",
            )
            .arg(&sock2)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(text.contains("not an attested workload"), "{text}");

    // With a bearer token, an unattested process is whoever the token says.
    let sock2 = sock.clone();
    let admin_token = s.admin_token.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg("-c")
            .arg(
                "import socket,sys\n\
                 s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n\
                 s.sendall(('GET /v1/tasks HTTP/1.1\\r\\nHost: x\\r\\nAuthorization: Bearer %s\\r\\nConnection: close\\r\\n\\r\\n' % sys.argv[2]).encode())\n\
                 print(s.makefile('rb').read().decode())",
            )
            .arg(&sock2)
            .arg(&admin_token)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");

    let ev: List<AuditEvent> = s.admin().get("/v1/audit?limit=100").await.unwrap();
    let started = ev.items.iter().find(|e| e.kind == "task.started").unwrap();
    assert_eq!(
        started.data["policies"],
        serde_json::json!(["curl-agent-works"])
    );
    assert!(
        ev.items
            .iter()
            .any(|e| e.kind == "auth.failed" && e.data["credential"] == "unix"),
        "the refusal is audited"
    );
    let tasks: List<Task> = s.admin().get("/v1/tasks").await.unwrap();
    assert_eq!(tasks.items.len(), 1, "only curl's task exists");
}

/// `SIGTERM` with a request in flight on the local socket (proxied, held
/// 800 ms by the upstream): it is answered in full before keymint exits 0.
/// The local socket's connections used to be cut when the process ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_request_in_flight_on_the_local_socket_finish() {
    if Command::new("curl").arg("--version").output().is_err() {
        assert!(!crate::postgres::in_ci(), "curl is required under CI=true");
        eprintln!("skipped: curl is not installed");
        return;
    }
    let up = keymint_testkit::upstream::FakeUpstream::start(crate::budgets::KEY)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run/keymint.sock");
    let uid = std::fs::metadata(dir.path()).unwrap().uid();
    let (mut child, admin) = crate::budgets::server_with(
        dir.path(),
        &up,
        &format!(
            "[local]\nsocket = {:?}\n[[local.entry]]\nworkload = \"curl-agent\"\n\
             selectors = {{ uid = {uid} }}\n",
            sock.display().to_string()
        ),
    )
    .await;
    crate::set_upstream_key(&admin, "openai", crate::budgets::KEY).await;
    // For the workload the socket attests curl as: the token is bound to it.
    let t = crate::start_task_in(&admin, "hundred", "curl-agent").await;
    let tok = crate::budgets::token_for(&admin, &t.id).await;
    up.set_delay(std::time::Duration::from_millis(800));
    let in_flight = tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&sock)
            .args([
                "-X",
                "POST",
                "http://localhost/proxy/openai/chat/completions",
                "-H",
                "content-type: application/json",
                "-H",
                &format!("authorization: Bearer {tok}"),
                "-d",
                r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    let t0 = std::time::Instant::now();
    while up.received().is_empty() {
        assert!(
            !in_flight.is_finished(),
            "answered without being forwarded: {}",
            in_flight.await.unwrap()
        );
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "never forwarded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let status = crate::budgets::terminate(&mut child).await;
    let text = in_flight.await.unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
    assert_eq!(code, "200", "the request in flight is answered: {body}");
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert!(v["choices"].is_array(), "{body}");
    assert!(status.success(), "keymint after SIGTERM: {status}");
}

/// The peer is attested when it connects; what it writes later must come
/// from it too. A child that inherits the connection (here `sh`, run by
/// the attested python with the socket left open) writes under its own
/// pid (`SO_PASSCRED`), and its request acts as nobody: refused, while the
/// attested process's own request on the same connection was served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_written_by_another_process_on_an_attested_connection_is_refused() {
    let Ok(out) = Command::new("python3")
        .args([
            "-c",
            "import os,sys; print(os.path.realpath(sys.executable))",
        ])
        .output()
    else {
        assert!(
            !crate::postgres::in_ci(),
            "python3 is required under CI=true"
        );
        eprintln!("skipped: python3 is not installed");
        return;
    };
    let python = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run/keymint.sock");
    let uid = std::fs::metadata(dir.path()).unwrap().uid();
    let hash = sha256_of(&python);
    let s = TestServer::builder()
        .policy(keymint_testkit::PERMIT_ALL)
        .config_toml(&format!(
            "[local]\nsocket = {:?}\n[[local.entry]]\nworkload = \"py-agent\"\n\
             selectors = {{ uid = {uid}, exe_sha256 = \"{hash}\" }}\n",
            sock.display().to_string()
        ))
        .start()
        .await
        .unwrap();
    let req = dir.path().join("second.http");
    let body = r#"{"role":"demo","ttl_secs":60}"#;
    std::fs::write(
        &req,
        format!(
            "POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .unwrap();
    let script = "import http.client,socket,subprocess,sys\n\
        s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n\
        b=b'{\"role\":\"demo\",\"ttl_secs\":60}'\n\
        s.sendall(b'POST /v1/tasks HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\n\\r\\n' % len(b) + b)\n\
        r=http.client.HTTPResponse(s); r.begin(); r.read(); print(r.status)\n\
        fd=s.fileno()\n\
        subprocess.run(['/bin/sh','-c','cat \"$1\" >&%d' % fd,'sh',sys.argv[2]], pass_fds=(fd,), check=True)\n\
        r=http.client.HTTPResponse(s); r.begin(); print(r.status); print(r.read().decode())";
    let (sock2, req2) = (sock.clone(), req.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .arg("-c")
            .arg(script)
            .arg(&sock2)
            .arg(&req2)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("201"), "{text}{err}");
    assert_eq!(lines.next(), Some("401"), "{text}{err}");
    assert!(text.contains("another process"), "{text}");
    let tasks: List<Task> = s.admin().get("/v1/tasks").await.unwrap();
    assert_eq!(tasks.items.len(), 1, "only the attested process's task");
}

/// The identity is the process as it was attested: one that `execve`s
/// another executable on the open connection (here the attested python
/// becomes `sh`, same pid, the socket kept) is no longer that workload.
/// Its own request, written under the attested pid, is refused, as the
/// node agent refuses it (docs/design/0024).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_execs_another_binary_on_an_attested_connection_is_refused() {
    let Ok(out) = Command::new("python3")
        .args([
            "-c",
            "import os,sys; print(os.path.realpath(sys.executable))",
        ])
        .output()
    else {
        assert!(
            !crate::postgres::in_ci(),
            "python3 is required under CI=true"
        );
        eprintln!("skipped: python3 is not installed");
        return;
    };
    let python = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run/keymint.sock");
    let uid = std::fs::metadata(dir.path()).unwrap().uid();
    let hash = sha256_of(&python);
    let s = TestServer::builder()
        .policy(keymint_testkit::PERMIT_ALL)
        .config_toml(&format!(
            "[local]\nsocket = {:?}\n[[local.entry]]\nworkload = \"py-agent\"\n\
             selectors = {{ uid = {uid}, exe_sha256 = \"{hash}\" }}\n",
            sock.display().to_string()
        ))
        .start()
        .await
        .unwrap();
    let body = r#"{"role":"demo","ttl_secs":60}"#;
    let second = format!(
        "POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // After the exec, `sh` writes the second request and reads the answer
    // with its builtins only (`printf`, `read`), so every byte is written
    // by the attested pid.
    let script = "import os,socket,http.client,sys\n\
        s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n\
        b=b'{\"role\":\"demo\",\"ttl_secs\":60}'\n\
        s.sendall(b'POST /v1/tasks HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\n\\r\\n' % len(b) + b)\n\
        r=http.client.HTTPResponse(s); r.begin(); r.read(); print(r.status, flush=True)\n\
        fd=s.fileno(); os.set_inheritable(fd, True)\n\
        os.execv('/bin/sh', ['sh','-c','printf \"%s\" \"$1\" >&'+str(fd)+'; while IFS= read -r l <&'+str(fd)+' || [ -n \"$l\" ]; do printf \"%s\\\\n\" \"$l\"; done','sh',sys.argv[2]])";
    let sock2 = sock.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .arg("-c")
            .arg(script)
            .arg(&sock2)
            .arg(&second)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("201"), "{text}{err}");
    let status = lines.next().unwrap_or_default();
    assert!(
        status.starts_with("HTTP/1.1 401"),
        "the exec'd process is not the attested workload: {text}{err}"
    );
    assert!(text.contains("no longer"), "{text}");
    let tasks: List<Task> = s.admin().get("/v1/tasks").await.unwrap();
    assert_eq!(tasks.items.len(), 1, "only the attested process's task");
}

/// Who wrote a request is who wrote all of it: the attested process
/// writes a request's head and leaves its body to a child that inherited
/// the connection (here `sh`, writing under its own pid). The head alone
/// named the attested workload; the body, which says what the task is
/// for, is the child's. Refused, and nothing is started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_written_by_another_process_on_an_attested_connection_is_refused() {
    let Ok(out) = Command::new("python3")
        .args([
            "-c",
            "import os,sys; print(os.path.realpath(sys.executable))",
        ])
        .output()
    else {
        assert!(
            !crate::postgres::in_ci(),
            "python3 is required under CI=true"
        );
        eprintln!("skipped: python3 is not installed");
        return;
    };
    let python = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run/keymint.sock");
    let uid = std::fs::metadata(dir.path()).unwrap().uid();
    let hash = sha256_of(&python);
    let s = TestServer::builder()
        .policy(keymint_testkit::PERMIT_ALL)
        .config_toml(&format!(
            "[local]\nsocket = {:?}\n[[local.entry]]\nworkload = \"py-agent\"\n\
             selectors = {{ uid = {uid}, exe_sha256 = \"{hash}\" }}\n",
            sock.display().to_string()
        ))
        .start()
        .await
        .unwrap();
    // The head goes out first and the server has it (and has resolved the
    // caller) well before the child writes the body.
    let script = "import http.client,socket,subprocess,sys,time\n\
        s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n\
        b='{\"role\":\"demo\",\"ttl_secs\":60}'\n\
        s.sendall(b'POST /v1/tasks HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\n\\r\\n' % len(b))\n\
        time.sleep(0.5)\n\
        fd=s.fileno()\n\
        subprocess.run(['/bin/sh','-c','printf \"%%s\" \"$1\" >&%d' % fd,'sh',b], pass_fds=(fd,), check=True)\n\
        r=http.client.HTTPResponse(s); r.begin(); print(r.status); print(r.read().decode())";
    let sock2 = sock.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .arg("-c")
            .arg(script)
            .arg(&sock2)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("401"), "{text}{err}");
    assert!(text.contains("another process"), "{text}");
    let tasks: List<Task> = s.admin().get("/v1/tasks").await.unwrap();
    assert!(tasks.items.is_empty(), "no task was started: {tasks:?}");
}

/// One uid holds at most `max_connections_per_uid` connections on the
/// socket at once (each is attested, its executable hashed): the next is
/// answered 503 (`unavailable`, `Retry-After`) and closed unread, and a
/// slot given back by a closed connection serves again. A limit of 0 is
/// refused at load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_uid_holds_at_most_its_share_of_the_local_sockets_connections() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("keymint.sock");
    let s = TestServer::builder()
        .config_toml(&format!(
            "[local]\nsocket = {:?}\nmax_connections_per_uid = 3\n",
            sock.display().to_string()
        ))
        .start()
        .await
        .unwrap();
    async fn health(sock: &std::path::Path) -> String {
        let c = tokio::net::UnixStream::connect(sock).await.unwrap();
        let req = b"GET /v1/health HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n";
        crate::exchange(c, req).await
    }
    assert!(health(&sock).await.starts_with("HTTP/1.1 200"));
    // Three connections that each hold a slot, as their answered request
    // shows: a connection closed a moment ago (the health check's) may
    // still hold its slot when the next arrives, and that one is refused
    // and tried again (each such refusal counted below).
    let mut held = Vec::new();
    let mut early = 0;
    let t0 = std::time::Instant::now();
    while held.len() < 3 {
        let mut c = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let head = one_answer(&mut c).await;
        if head.starts_with("HTTP/1.1 200") {
            held.push(c);
            continue;
        }
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "{head}");
        early += 1;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let refused = health(&sock).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: 1"),
        "{refused}"
    );
    assert!(refused.contains("\"unavailable\""), "{refused}");
    // Counted where an operator looks: the metrics.
    assert_eq!(
        crate::metric(&s, "keymint_local_connections_refused_total").await,
        format!("keymint_local_connections_refused_total {}", early + 1)
    );
    // A closed connection gives its slot back.
    drop(held.pop());
    let t0 = std::time::Instant::now();
    loop {
        let answer = health(&sock).await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "{answer}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(held);
    drop(s);

    let zero = TestServer::builder()
        .config_toml(&format!(
            "[local]\nsocket = {:?}\nmax_connections_per_uid = 0\n",
            dir.path().join("zero.sock").display().to_string()
        ))
        .start()
        .await;
    let err = format!("{:#}", zero.err().unwrap());
    assert!(err.contains("max_connections_per_uid"), "{err}");
}

/// Asks for `/v1/health` on `c` and keeps it open (keep-alive): returns
/// what came until the answer's head ended (or the server closed, as it
/// does after a refusal), read within 10 s.
async fn one_answer(c: &mut tokio::net::UnixStream) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    c.write_all(b"GET /v1/health HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match c.read(&mut buf).await.unwrap() {
                0 => break,
                n => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap();
    String::from_utf8_lossy(&got).into_owned()
}
