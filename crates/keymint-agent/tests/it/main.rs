//! The node agent against a real in-process server (the test kit): real
//! attestation of real processes (this test binary, and two tiny C clients
//! compiled here that differ only in a string, so in their SHA-256), real
//! files, a real outage.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers: a failed step is a failed test"
)]

mod attest;
mod bad_input;
mod delivery;
mod hardening;
mod outage;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use keymint_agent::client::AgentClient;
use keymint_agent::{Agent, AgentConfig, NodeCredential};
use keymint_core::SystemClock;
use keymint_testkit::TestServer;
use serde_json::{Value, json};
use sha2::Digest;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(15);

pub fn sha256_file(p: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

/// This test binary's own hash (it connects to the agent too).
pub fn my_sha256() -> String {
    sha256_file(Path::new("/proc/self/exe"))
}

/// A directory anyone may traverse (for clients running as another uid).
pub fn open_tempdir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

const CLIENT_C: &str = r#"
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>

static const char *variant = VARIANT;

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

static char line[1 << 17], resp[1 << 17];

/* Relays: each stdin line is sent and one answer line printed; "<" only
   reads (an event); "@read PATH" prints the file (or ERR errno).
   With "fork": whoami, then fork; the parent exits and the child asks
   again on the inherited connection. */
int main(int argc, char **argv) {
    if (argc > 2 && strcmp(argv[2], "variant") == 0) { puts(variant); return 0; }
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) { printf("CONNECT %d\n", errno); return 3; }
    const char *whoami = "{\"op\":\"whoami\"}\n";
    if (argc > 2 && strcmp(argv[2], "fork") == 0) {
        write(fd, whoami, strlen(whoami));
        read_line(fd, resp, sizeof resp);
        printf("%s\n", resp);
        fflush(stdout);
        pid_t parent = getpid();
        if (fork() != 0) _exit(0);
        for (int i = 0; i < 500 && getppid() == parent; i++) usleep(10000);
        usleep(100000);
        write(fd, whoami, strlen(whoami));
        if (read_line(fd, resp, sizeof resp) < 0) printf("EOF\n"); else printf("%s\n", resp);
        fflush(stdout);
        if (read_line(fd, resp, sizeof resp) < 0) printf("CLOSED\n"); else printf("%s\n", resp);
        fflush(stdout);
        return 0;
    }
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "@read ", 6) == 0) {
            line[strcspn(line, "\n")] = 0;
            FILE *f = fopen(line + 6, "r");
            if (!f) { printf("ERR %d\n", errno); fflush(stdout); continue; }
            size_t n = fread(resp, 1, sizeof resp - 1, f);
            resp[n] = 0;
            fclose(f);
            printf("%s\n", resp);
            fflush(stdout);
            continue;
        }
        if (strcmp(line, "<\n") != 0) write(fd, line, strlen(line));
        if (read_line(fd, resp, sizeof resp) < 0) { printf("EOF\n"); fflush(stdout); return 0; }
        printf("%s\n", resp);
        fflush(stdout);
    }
    return 0;
}
"#;

/// Two builds of one C client, `a` and `b`, with different SHA-256s, in a
/// directory anyone can read (compiled once per test run).
pub fn clients() -> &'static (PathBuf, PathBuf) {
    static C: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    C.get_or_init(|| {
        let dir = open_tempdir().keep();
        let src = dir.join("client.c");
        std::fs::write(&src, CLIENT_C).unwrap();
        let build = |v: &str| {
            let out = dir.join(format!("client-{v}"));
            let st = std::process::Command::new("gcc")
                .arg("-O1")
                .arg(format!("-DVARIANT=\"{v}\""))
                .arg("-o")
                .arg(&out)
                .arg(&src)
                .status()
                .expect("gcc is needed to build the test clients");
            assert!(st.success());
            std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)).unwrap();
            out
        };
        let (a, b) = (build("a"), build("b"));
        assert_ne!(sha256_file(&a), sha256_file(&b));
        (a, b)
    })
}

/// A C client process talking to the agent.
#[derive(Debug)]
pub struct Proc {
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Proc {
    pub fn spawn(exe: &Path, sock: &Path, mode: Option<&str>, uid: Option<u32>) -> Self {
        let mut c = tokio::process::Command::new(exe);
        c.arg(sock)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if let Some(m) = mode {
            c.arg(m);
        }
        if let Some(u) = uid {
            c.uid(u).gid(u);
        }
        let mut child = c.spawn().unwrap();
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            child,
            stdin,
            stdout,
        }
    }

    /// The next line the client prints.
    pub async fn line(&mut self) -> String {
        tokio::time::timeout(WAIT, self.stdout.next_line())
            .await
            .expect("the client answers in time")
            .unwrap()
            .unwrap_or_default()
    }

    /// Sends one request, returns the answer.
    pub async fn call(&mut self, req: Value) -> Value {
        self.raw(&req.to_string()).await
    }

    pub async fn raw(&mut self, line: &str) -> Value {
        let stdin = self.stdin.as_mut().unwrap();
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        let l = self.line().await;
        serde_json::from_str(&l).unwrap_or_else(|_| json!({ "raw": l }))
    }

    /// Closes stdin: the client exits and its connection closes.
    pub async fn finish(mut self) {
        drop(self.stdin.take());
        let _ = tokio::time::timeout(WAIT, self.child.wait()).await;
    }
}

/// A server, and the agent of its node `dev`.
#[derive(Debug)]
pub struct Env {
    pub server: Option<TestServer>,
    pub agent: Option<Agent>,
    pub config: AgentConfig,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub deliver: PathBuf,
}

#[derive(Debug, Default)]
pub struct Options {
    pub group: Option<u32>,
    pub limits: keymint_agent::Limits,
    /// The agent reaches the server here instead of its own address (a
    /// relay, for outages).
    pub server_url: Option<String>,
    pub data_dir: Option<PathBuf>,
}

pub async fn start_server(data_dir: Option<&Path>) -> TestServer {
    let mut b = TestServer::builder();
    if let Some(d) = data_dir {
        b = b.data_dir(d);
    }
    b.start().await.unwrap()
}

impl Env {
    pub async fn start(o: Options) -> Self {
        let server = start_server(o.data_dir.as_deref()).await;
        let dir = open_tempdir();
        let sock = dir.path().join("run/agent.sock");
        let deliver = dir.path().join("deliver");
        let credential =
            NodeCredential::token_file(&server.data_dir().join("node-dev.token")).unwrap();
        let mut config = AgentConfig::new(o.server_url.unwrap_or_else(|| server.url()), credential);
        config.socket = sock.clone();
        config.group = o.group;
        config.deliver_dir = deliver.clone();
        config.health = Some("127.0.0.1:0".parse().unwrap());
        config.limits = o.limits;
        config.timing.sync_interval = Duration::from_millis(200);
        config.timing.retry_min = Duration::from_millis(100);
        config.timing.retry_max = Duration::from_millis(500);
        let agent = Agent::start(config.clone(), Arc::new(SystemClock))
            .await
            .unwrap();
        Self {
            server: Some(server),
            agent: Some(agent),
            config,
            dir,
            sock,
            deliver,
        }
    }

    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }

    /// Stops the agent and starts a new one with the same configuration.
    pub async fn restart_agent(&mut self) {
        self.agent.take().unwrap().stop().await;
        let agent = Agent::start(self.config.clone(), Arc::new(SystemClock))
            .await
            .unwrap();
        self.agent = Some(agent);
        self.agent().sync_now().await.unwrap();
    }

    pub fn server(&self) -> &TestServer {
        self.server.as_ref().unwrap()
    }

    /// Registers an entry for node `dev` and waits until the agent has it.
    pub async fn entry(&self, workload: &str, selectors: Value) -> String {
        let e: Value = self
            .server()
            .admin()
            .post(
                "/v1/entries",
                &json!({"workload": workload, "node": "dev", "selectors": selectors}),
            )
            .await
            .unwrap();
        self.agent().sync_now().await.unwrap();
        e["id"].as_str().unwrap().to_owned()
    }

    /// An entry for this test binary as `workload`.
    pub async fn me(&self, workload: &str) -> String {
        self.entry(workload, json!({"uid": 0, "exe_sha256": my_sha256()}))
            .await
    }

    pub async fn connect(&self) -> AgentClient {
        AgentClient::connect(&self.sock).await.unwrap()
    }

    pub async fn health(&self, path: &str) -> (u16, Value) {
        let c = keymint_client::Client::new(
            &format!("http://{}", self.agent().health_addr().unwrap()),
            None,
        )
        .unwrap();
        let r = c
            .raw(http::Method::GET, path, None, Vec::new())
            .await
            .unwrap();
        (r.status.as_u16(), r.json().unwrap())
    }
}

/// Polls `f` until it is true or [`WAIT`] passes.
pub async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

/// A call that must fail: its error code.
pub async fn refused(
    c: &mut AgentClient,
    op: &str,
    fields: Value,
) -> keymint_agent::protocol::ApiError {
    match c.call::<Value>(op, &fields).await {
        Err(keymint_agent::client::ClientError::Api(e)) => e,
        other => panic!("`{op}` should be refused, got {other:?}"),
    }
}
