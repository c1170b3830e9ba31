//! Issue 18, "The node agent" (docs/design/0024-agent-hardening.md): a
//! process that changes after it connected, a uid that floods the socket,
//! a second agent started by mistake, revocation that must reach delivered
//! files at once, and a server that comes back or refuses the node.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use keymint_agent::{Agent, AgentConfig, AgentError, NodeCredential};
use keymint_core::SystemClock;
use keymint_proto::Task;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

use crate::{Env, Options, WAIT, eventually, open_tempdir, sha256_file};

const NOBODY: u32 = 65534;

/// Attack helpers: one source, two builds (`approved` and `other`) that
/// differ only in a string, so in their SHA-256. Every mode is bounded by
/// an alarm (kept across exec), so a helper never hangs a test.
const HELPER_C: &str = r#"
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>

static const char *variant = VARIANT;
static char resp[1 << 16];

static int read_line(int fd, char *buf, size_t cap) {
    size_t n = 0;
    while (n + 1 < cap) {
        char c;
        ssize_t r = read(fd, &c, 1);
        if (r <= 0) { if (n == 0) return -1; break; }
        if (c == '\n') break;
        buf[n++] = c;
    }
    buf[n] = 0;
    return (int)n;
}

static int dial(int fd, const char *path) {
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    return connect(fd, (struct sockaddr *)&a, sizeof a);
}

static void ask(int fd, const char *tag) {
    const char *w = "{\"op\":\"whoami\"}\n";
    if (write(fd, w, strlen(w)) < 0) printf("%s WRITE %d\n", tag, errno);
    else if (read_line(fd, resp, sizeof resp) < 0) printf("%s EOF\n", tag);
    else printf("%s %s\n", tag, resp);
    fflush(stdout);
}

static void closed(int fd, const char *tag) {
    if (read_line(fd, resp, sizeof resp) < 0) printf("%s CLOSED\n", tag);
    else printf("%s %s\n", tag, resp);
    fflush(stdout);
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc < 2) return 2;
    const char *mode = argv[1];
    if (!strcmp(mode, "variant")) { puts(variant); return 0; }
    if (!strcmp(mode, "hold")) { usleep(500000); return 0; }
    if (strcmp(mode, "use-fd") && strcmp(mode, "connect-fd")) alarm(8);
    /* exec-after SOCK OTHER: connect, ask, exec OTHER on the same connection. */
    if (!strcmp(mode, "exec-after")) {
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (dial(fd, argv[2])) { printf("CONNECT %d\n", errno); return 3; }
        ask(fd, "before");
        char n[16];
        snprintf(n, sizeof n, "%d", fd);
        execl(argv[3], argv[3], "use-fd", n, (char *)0);
        printf("EXEC %d\n", errno);
        return 4;
    }
    /* use-fd FD: ask on an inherited connection, then see if it closes. */
    if (!strcmp(mode, "use-fd")) {
        int fd = atoi(argv[2]);
        ask(fd, "after");
        closed(fd, "after");
        return 0;
    }
    /* share SOCK APPROVED: a socket, then fork; the parent execs APPROVED,
       which connects it; the child asks on it. */
    if (!strcmp(mode, "share")) {
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        char n[16];
        snprintf(n, sizeof n, "%d", fd);
        if (fork() == 0) {
            usleep(400000);
            ask(fd, "child");
            closed(fd, "child");
            return 0;
        }
        execl(argv[3], argv[3], "connect-fd", n, argv[2], (char *)0);
        return 4;
    }
    /* connect-fd FD SOCK: connect an inherited socket, hold it a while. */
    if (!strcmp(mode, "connect-fd")) {
        int fd = atoi(argv[2]);
        if (dial(fd, argv[3])) { printf("CONNECT %d\n", errno); fflush(stdout); return 3; }
        sleep(2);
        return 0;
    }
    /* race SOCK APPROVED: connect, fork; the parent execs APPROVED at once;
       the child asks on the connection. */
    if (!strcmp(mode, "race")) {
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (dial(fd, argv[2])) { printf("CONNECT %d\n", errno); return 3; }
        if (fork() == 0) {
            usleep(100000);
            ask(fd, "child");
            return 0;
        }
        execl(argv[3], argv[3], "hold", (char *)0);
        return 4;
    }
    return 2;
}
"#;

/// `approved` and `other`, built once per run.
fn helpers() -> &'static (PathBuf, PathBuf) {
    static H: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    H.get_or_init(|| {
        let dir = open_tempdir().keep();
        let src = dir.join("helper.c");
        std::fs::write(&src, HELPER_C).unwrap();
        let build = |v: &str| {
            let out = dir.join(v);
            let st = std::process::Command::new("gcc")
                .arg("-O1")
                .arg(format!("-DVARIANT=\"{v}\""))
                .arg("-o")
                .arg(&out)
                .arg(&src)
                .status()
                .expect("gcc is needed to build the test helpers");
            assert!(st.success());
            std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)).unwrap();
            out
        };
        (build("approved"), build("other"))
    })
}

/// Runs a helper to its end (bounded); its output lines.
async fn run(exe: &Path, args: &[&str]) -> Vec<String> {
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(exe)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the helper ends in time")
    .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The line tagged `tag`, parsed (a non-JSON line as `{"raw": …}`).
fn tagged(lines: &[String], tag: &str) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(&format!("{tag} ")))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| json!({ "raw": l })))
        .collect()
}

/// An approved process that execs another binary on its connection loses
/// its identity: the request after the exec is refused and the connection
/// closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_execs_another_binary_loses_its_identity() {
    let env = Env::start(Options::default()).await;
    let (approved, other) = helpers();
    env.entry(
        "approved",
        json!({"uid": 0, "exe_sha256": sha256_file(approved)}),
    )
    .await;
    let sock = env.sock.to_str().unwrap();
    let out = run(approved, &["exec-after", sock, other.to_str().unwrap()]).await;
    let before = tagged(&out, "before");
    assert_eq!(before[0]["workload"], "approved", "{out:?}");
    let after = tagged(&out, "after");
    assert_eq!(after[0]["ok"], false, "{out:?}");
    assert_eq!(after[0]["error"]["code"], "not_attested", "{out:?}");
    assert!(
        after[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("executable"),
        "{out:?}"
    );
    assert_eq!(after[1]["raw"], "CLOSED", "{out:?}");
}

/// An unapproved process makes a socket and forks; its parent execs the
/// approved binary, which connects the shared socket (so the agent attests
/// the approved binary); the unapproved child then asks on it. The child
/// wrote the request, not the attested process: refused, closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forked_child_cannot_use_the_connection_of_an_approved_process() {
    let env = Env::start(Options::default()).await;
    let (approved, other) = helpers();
    env.entry(
        "approved",
        json!({"uid": 0, "exe_sha256": sha256_file(approved)}),
    )
    .await;
    let sock = env.sock.to_str().unwrap();
    let out = run(other, &["share", sock, approved.to_str().unwrap()]).await;
    let child = tagged(&out, "child");
    assert_eq!(child[0]["ok"], false, "{out:?}");
    assert_eq!(child[0]["error"]["code"], "not_attested", "{out:?}");
    assert!(
        child[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not by the attested process"),
        "{out:?}"
    );
    assert_eq!(child[1]["raw"], "CLOSED", "{out:?}");

    // The outside probe's own sequence: connect, fork, the parent execs the
    // approved binary at once, the child asks. Never the workload.
    for _ in 0..10 {
        let out = run(other, &["race", sock, approved.to_str().unwrap()]).await;
        let child = tagged(&out, "child");
        assert!(!child.is_empty(), "{out:?}");
        assert_ne!(child[0]["ok"], true, "{out:?}");
        assert!(child[0].get("workload").is_none(), "{out:?}");
    }
}

/// One uid allowed on the socket opens connections and keeps them idle; it
/// gets its share, then `busy`, and another workload is still served. An
/// idle connection without a task is closed after the idle timeout, one
/// that owns a task is not, and a peer that matches no entry is told and
/// closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_uid_cannot_hold_every_connection() {
    let env = Env::start(Options {
        group: Some(NOBODY),
        limits: keymint_agent::Limits {
            max_connections: 8,
            max_connections_per_uid: 4,
            idle_timeout: Duration::from_millis(1500),
            ..keymint_agent::Limits::default()
        },
        ..Options::default()
    })
    .await;
    env.me("tester").await;
    env.entry("flooder", json!({"uid": NOBODY})).await;

    // The flooder (uid 65534, matched by its entry) opens 8 and holds them.
    let flood = r#"
import socket, sys, time
held, busy = [], 0
for _ in range(8):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    held.append(s)
# Read until 4 were told `busy` (a loaded machine may take a while to
# answer), then once more: none of the others may be told it.
waiting, deadline = list(held), time.monotonic() + 10
def sweep():
    global busy
    for s in list(waiting):
        s.settimeout(0.1)
        try:
            if b"busy" in s.recv(4096):
                busy += 1
                waiting.remove(s)
        except OSError:
            pass
while busy < 4 and time.monotonic() < deadline:
    sweep()
sweep()
print(busy, flush=True)
time.sleep(1)
"#;
    let mut flooder = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(flood)
        .arg(&env.sock)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = flooder.stdout.take().unwrap();
    let mut first = [0u8; 2];
    tokio::time::timeout(WAIT, out.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&first, b"4\n", "the flooder got 4 connections, then busy");
    // Each refusal is counted where an operator looks (the health report),
    // not logged one line each.
    assert_eq!(env.agent().health().refused_connections, 4);
    // While it holds its 4, another workload is served.
    let mut c = env.connect().await;
    let who: Value = c.call("whoami", &json!({})).await.unwrap();
    assert_eq!(who["workload"], "tester");
    let _ = flooder.wait().await;

    // Idle, with no task: closed after the idle timeout.
    let mut idle = UnixStream::connect(&env.sock).await.unwrap();
    let mut buf = Vec::new();
    let started = tokio::time::Instant::now();
    tokio::time::timeout(WAIT, idle.read_to_end(&mut buf))
        .await
        .expect("an idle connection is closed")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(1000));
    // A connection that owns a task stays open past it.
    let mut c = env.connect().await;
    let t: Value = c
        .call("start_task", &json!({"role": "demo", "ttl_secs": 60}))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let who: Value = c.call("whoami", &json!({})).await.unwrap();
    assert_eq!(who["workload"], "tester", "{t}");

    // A peer that matches no entry: told at once, before it asks, and
    // closed.
    let (_, b) = crate::clients();
    let mut unmatched = crate::Proc::spawn(b, &env.sock, None, None);
    let told = unmatched.raw("<").await;
    assert_eq!(told["error"]["code"], "not_attested", "{told}");
    assert_eq!(unmatched.raw("<").await["raw"], "EOF");
    unmatched.finish().await;
}

/// A second agent started by mistake with the same delivery directory or
/// socket stops before it touches anything: the running agent's files stay
/// and it keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_touches_nothing() {
    let env = Env::start(Options::default()).await;
    env.me("tester").await;
    let mut c = env.connect().await;
    let t: Value = c
        .call("start_task", &json!({"role": "demo", "ttl_secs": 120}))
        .await
        .unwrap();
    let task = t["task"]["id"].as_str().unwrap();
    let f: Value = c
        .call("fetch", &json!({"task": task, "file": "token"}))
        .await
        .unwrap();
    let file = PathBuf::from(f["file"].as_str().unwrap());
    let token = std::fs::read(&file).unwrap();

    // The same configuration: the delivery lock is held.
    let second = Agent::start(env.config.clone(), Arc::new(SystemClock)).await;
    match second {
        Err(e @ AgentError::Running(_)) => {
            assert!(e.to_string().contains("nothing was changed"), "{e}");
        }
        other => panic!("a second agent must refuse to start, got {other:?}"),
    }
    // Another delivery directory, the same socket: the socket is in use.
    let mut cfg = env.config.clone();
    cfg.deliver_dir = env.dir.path().join("deliver-2");
    let second = Agent::start(cfg, Arc::new(SystemClock)).await;
    assert!(
        matches!(
            second,
            Err(AgentError::Bind(keymint_attest::BindError::InUse(_)))
        ),
        "{second:?}"
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        token,
        "the file is untouched"
    );
    let who: Value = c.call("whoami", &json!({})).await.unwrap();
    assert_eq!(who["workload"], "tester");
    let mut fresh = env.connect().await;
    let who: Value = fresh.call("whoami", &json!({})).await.unwrap();
    assert_eq!(who["workload"], "tester", "the first agent still serves");
}

/// Waits at most `bound` for `path` to be gone.
async fn gone_within(path: &Path, bound: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + bound;
    while tokio::time::Instant::now() < deadline {
        if !path.exists() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    !path.exists()
}

/// A task revoked on the server loses its delivered file within about a
/// second (not at the next refresh, minutes later); deleting an entry
/// removes its tasks' files and ends the tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_entry_deletion_reach_delivered_files_at_once() {
    let env = Env::start(Options::default()).await;
    let entry = env.me("tester").await;
    let mut c = env.connect().await;
    let start = async |c: &mut keymint_agent::client::AgentClient| {
        let t: Value = c
            .call("start_task", &json!({"role": "demo", "ttl_secs": 600}))
            .await
            .unwrap();
        let task = t["task"]["id"].as_str().unwrap().to_owned();
        let f: Value = c
            .call(
                "fetch",
                &json!({"task": task, "file": "token", "ttl_secs": 300}),
            )
            .await
            .unwrap();
        (task, PathBuf::from(f["file"].as_str().unwrap()))
    };

    let (task, file) = start(&mut c).await;
    assert!(file.exists());
    let _: Task = env
        .server()
        .admin()
        .post(&format!("/v1/tasks/{task}/revoke"), &json!({}))
        .await
        .unwrap();
    assert!(
        gone_within(&file, Duration::from_secs(2)).await,
        "the file of a revoked task is removed within 2 s"
    );
    // The file goes first, then its task's directory.
    assert!(
        gone_within(file.parent().unwrap(), Duration::from_secs(2)).await,
        "the directory of a revoked task is removed too"
    );

    let (task, file) = start(&mut c).await;
    let _: Value = env
        .server()
        .admin()
        .delete(&format!("/v1/entries/{entry}"))
        .await
        .unwrap();
    assert!(
        gone_within(&file, Duration::from_secs(2)).await,
        "the file of a deleted entry's task is removed within 2 s"
    );
    eventually(
        "the deleted entry's task is ended on the server",
        async || {
            let t: Task = env
                .server()
                .admin()
                .get(&format!("/v1/tasks/{task}"))
                .await
                .unwrap();
            !t.status.is_active()
        },
    )
    .await;
}

/// A node token the server refuses: the agent says so in `/ready` (503,
/// `unauthorized`), not `reachable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_node_token_is_not_ready() {
    let env = Env::start(Options::default()).await;
    let dir = open_tempdir();
    let mut config = AgentConfig::new(
        env.server().url(),
        NodeCredential::Token(keymint_proto::SecretString::new(format!(
            "kma_{}",
            "0".repeat(43)
        ))),
    );
    config.socket = dir.path().join("agent.sock");
    config.deliver_dir = dir.path().join("deliver");
    config.health = Some("127.0.0.1:0".parse().unwrap());
    config.timing.sync_interval = Duration::from_millis(200);
    let agent = Agent::start(config, Arc::new(SystemClock)).await.unwrap();
    eventually("the agent has tried the server", async || {
        agent.health().server != "unreachable"
    })
    .await;
    let h = agent.health();
    assert_eq!(h.server, "unauthorized", "{h:?}");
    assert_eq!(h.status, "degraded", "{h:?}");
    let c = keymint_client::Client::new(&format!("http://{}", agent.health_addr().unwrap()), None)
        .unwrap();
    let r = c
        .raw(http::Method::GET, "/ready", None, Vec::new())
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), 503);
    let body: Value = r.json().unwrap();
    assert_eq!(body["server"], "unauthorized", "{body}");
    agent.stop().await;
}

/// A TCP relay to `target` that can be cut: while down, new connections
/// are closed at once and open ones are dropped (so pooled keep-alive
/// connections fail too, as with a server that went away).
async fn cutting_relay(
    target: std::net::SocketAddr,
) -> (std::net::SocketAddr, tokio::sync::watch::Sender<bool>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (up, rx) = tokio::sync::watch::channel(true);
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = l.accept().await else {
                return;
            };
            let mut rx = rx.clone();
            tokio::spawn(async move {
                if !*rx.borrow() {
                    return;
                }
                let Ok(mut out) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
                    _ = rx.wait_for(|u| !*u) => {}
                }
            });
        }
    });
    (addr, up)
}

/// After an outage long enough for the refresh backoff to grow, the
/// credential is refreshed within moments of the server's return, not at
/// the end of the backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_resumes_at_once_when_the_server_returns() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    // The agent reaches the server through a relay that the test cuts.
    let server = crate::start_server(Some(&data_dir)).await;
    let (relay_addr, up) = cutting_relay(server.addr).await;
    let dir = open_tempdir();
    let mut config = AgentConfig::new(
        format!("http://{relay_addr}"),
        NodeCredential::token_file(&server.data_dir().join("node-dev.token")).unwrap(),
    );
    config.socket = dir.path().join("agent.sock");
    config.deliver_dir = dir.path().join("deliver");
    config.timing.sync_interval = Duration::from_millis(200);
    config.timing.retry_min = Duration::from_millis(100);
    config.timing.retry_max = Duration::from_secs(20);
    let agent = Agent::start(config.clone(), Arc::new(SystemClock))
        .await
        .unwrap();
    let _: Value = server
        .admin()
        .post(
            "/v1/entries",
            &json!({"workload": "tester", "node": "dev",
                    "selectors": {"uid": 0, "exe_sha256": crate::my_sha256()}}),
        )
        .await
        .unwrap();
    agent.sync_now().await.unwrap();
    let mut c = keymint_agent::client::AgentClient::connect(&config.socket)
        .await
        .unwrap();
    let t: Value = c
        .call("start_task", &json!({"role": "demo", "ttl_secs": 300}))
        .await
        .unwrap();
    let task = t["task"]["id"].as_str().unwrap();
    let f: Value = c
        .call(
            "fetch",
            &json!({"task": task, "file": "token", "ttl_secs": 3}),
        )
        .await
        .unwrap();
    let file = PathBuf::from(f["file"].as_str().unwrap());
    // The server goes away before the refresh (at 2 s) and stays away for
    // 9 s: the retries back off (0.1, 0.2, … 6.4 s).
    up.send_replace(false);
    assert!(
        gone_within(&file, Duration::from_secs(5)).await,
        "the credential expired during the outage"
    );
    tokio::time::sleep(Duration::from_secs(7)).await;
    up.send_replace(true);
    let back = tokio::time::Instant::now();
    let deadline = back + Duration::from_millis(2500);
    while !file.exists() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        file.exists(),
        "a fresh credential is delivered within 2.5 s of the server's return"
    );
    agent.stop().await;
}

/// `POST /v1/node/watch` is a node's, and a node learns and ends only
/// what concerns its own workloads: another caller is refused, bad input
/// changes nothing, a task of a workload the node has no entry for is
/// reported over (not described) and cannot be ended through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_watch_is_for_nodes_and_their_own_tasks() {
    let env = Env::start(Options::default()).await;
    let server = env.server();
    let token = std::fs::read_to_string(server.data_dir().join("node-dev.token")).unwrap();
    let node = server.client(token.trim());
    // A task of a workload that node `dev` has no entry for.
    let t: Value = server
        .admin()
        .post(
            "/v1/tasks",
            &json!({"workload": "elsewhere", "role": "demo", "ttl_secs": 60}),
        )
        .await
        .unwrap();
    let task = t["id"].as_str().unwrap().to_owned();

    let e = server
        .admin()
        .post::<_, Value>("/v1/node/watch", &json!({"tasks": [task], "wait_secs": 0}))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e:?}");

    for bad in [
        json!({"tasks": [], "wait_secs": 31}),
        json!({"tasks": vec!["tsk_x"; 1001], "wait_secs": 0}),
        json!({"tasks": [], "surprise": 1}),
        json!({"end": ["../../etc"], "wait_secs": 0}),
    ] {
        let e = node
            .post::<_, Value>("/v1/node/watch", &bad)
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(400), "{bad}: {e:?}");
    }

    let a: Value = node
        .post(
            "/v1/node/watch",
            &json!({"tasks": [task, "tsk_doesnotexist"], "wait_secs": 0}),
        )
        .await
        .unwrap();
    assert_eq!(a["ended"], json!([task, "tsk_doesnotexist"]), "{a}");
    assert_eq!(a["entries"], json!([]), "{a}");

    let e = node
        .post::<_, Value>("/v1/node/watch", &json!({"end": [task], "wait_secs": 0}))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e:?}");
    let t: Task = server
        .admin()
        .get(&format!("/v1/tasks/{task}"))
        .await
        .unwrap();
    assert!(t.status.is_active(), "not ended by a node it is not of");
}
