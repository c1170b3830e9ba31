//! The server stops and comes back (same data directory): the agent keeps
//! what it holds until it expires, reports itself degraded meanwhile, and
//! carries on afterwards without a restart.
//!
//! The test kit binds a fresh port on every start, so the agent reaches the
//! server through a TCP relay in the test; stopping the server makes every
//! call through the relay fail exactly as a stopped server would
//! (connections closed, then refused).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use keymint_agent::client::AgentClient;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

use crate::{Env, Options, eventually, refused, start_server};

/// Relays connections to whatever `backend` currently names. While it
/// names nothing, new connections are closed at once (and counted) and
/// open ones are dropped (so pooled keep-alive connections fail too, as
/// with a server that went away).
async fn relay() -> (
    SocketAddr,
    Arc<Mutex<Option<SocketAddr>>>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let backend: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (b, r) = (Arc::clone(&backend), Arc::clone(&refused));
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = l.accept().await else {
                return;
            };
            let target = *b.lock().unwrap();
            let b = Arc::clone(&b);
            if target.is_none() {
                r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            tokio::spawn(async move {
                let Some(t) = target else { return };
                if let Ok(mut out) = TcpStream::connect(t).await {
                    let cut = async {
                        while b.lock().unwrap().is_some() {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
                        () = cut => {}
                    }
                }
            });
        }
    });
    (addr, backend, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_rides_out_a_server_restart() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let (relay_addr, backend, _) = relay().await;
    // The first server is started by Env; point the relay at it before the
    // agent's first sync matters.
    let mut env = Env::start(Options {
        server_url: Some(format!("http://{relay_addr}")),
        data_dir: Some(data_dir.clone()),
        ..Options::default()
    })
    .await;
    *backend.lock().unwrap() = Some(env.server().addr);
    env.me("tester").await;
    eventually("the agent is ready", async || {
        env.health("/ready").await.0 == 200
    })
    .await;
    let (_, h) = env.health("/health").await;
    assert_eq!(
        (h["status"].clone(), h["server"].clone()),
        (json!("ok"), json!("reachable"))
    );
    assert_eq!(h["entries"], 1);

    let mut c: AgentClient = env.connect().await;
    let t: Value = c
        .call("start_task", &json!({"role": "demo", "ttl_secs": 300}))
        .await
        .unwrap();
    let task = t["task"]["id"].as_str().unwrap().to_owned();
    // A 6-second credential: refreshed at 4 s, expires at 6 s.
    let f: Value = c
        .call(
            "fetch",
            &json!({"task": task, "file": "token", "ttl_secs": 6}),
        )
        .await
        .unwrap();
    let first = f["credential"]["token"].as_str().unwrap().to_owned();
    let path = env.deliver.join(&task).join("token");

    // Outage.
    *backend.lock().unwrap() = None;
    env.server.take().unwrap().stop().await;
    eventually("health says degraded", async || {
        let (code, h) = env.health("/health").await;
        code == 200 && h["status"] == "degraded" && h["server"] == "unreachable"
    })
    .await;
    let (code, h) = env.health("/ready").await;
    assert_eq!(code, 503, "{h}");
    assert_eq!(
        h["credentials"], 1,
        "the held credential is still held: {h}"
    );
    assert_eq!(h["tasks"], 1);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        first,
        "and still delivered"
    );
    // Nothing new is minted; the entries are kept.
    let e = refused(&mut c, "start_task", json!({"role": "demo"})).await;
    assert_eq!(e.code, "unavailable", "{e:?}");
    assert!(
        !e.message.contains(&relay_addr.to_string()),
        "no transport detail"
    );
    let who: Value = c.call("whoami", &json!({})).await.unwrap();
    assert_eq!(who["workload"], "tester");
    let h: Value = c.call("health", &json!({})).await.unwrap();
    assert_eq!(h["status"], "degraded");

    // The server comes back on the same data directory.
    let server = start_server(Some(&data_dir)).await;
    *backend.lock().unwrap() = Some(server.addr);
    env.server = Some(server);
    eventually("the agent is ready again", async || {
        env.health("/ready").await.0 == 200
    })
    .await;
    // The credential is refreshed (the task survived the restart).
    eventually("the credential is refreshed", async || {
        std::fs::read_to_string(&path).is_ok_and(|s| s != first && s.starts_with("kmt_"))
    })
    .await;
    // And new work goes through, on the same connection.
    let t: Value = c
        .call("start_task", &json!({"role": "demo", "ttl_secs": 60}))
        .await
        .unwrap();
    assert_eq!(t["task"]["workload"], "tester");
    let (_, h) = env.health("/health").await;
    assert_eq!(h["status"], "ok");
}

/// Stopping the agent is not the workloads hanging up: their tasks stay
/// active. What it delivered is removed when the next agent starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restart_ends_no_task_and_cleans_up_its_files() {
    let mut env = Env::start(Options::default()).await;
    env.me("tester").await;
    let mut c = env.connect().await;
    let t: Value = c
        .call("start_task", &json!({"role": "demo", "ttl_secs": 120}))
        .await
        .unwrap();
    let task = t["task"]["id"].as_str().unwrap().to_owned();
    let _: Value = c
        .call("fetch", &json!({"task": task, "file": "token"}))
        .await
        .unwrap();
    let dir = env.deliver.join(&task);
    assert!(dir.join("token").exists());
    env.restart_agent().await;
    assert!(!dir.exists(), "the new agent removed the old one's files");
    let t: keymint_proto::Task = env
        .server()
        .admin()
        .get(&format!("/v1/tasks/{task}"))
        .await
        .unwrap();
    assert!(t.status.is_active(), "the task was not ended");
    // The old connection is gone; the task is adopted by a new one.
    assert!(c.call::<Value>("whoami", &json!({})).await.is_err());
    let mut c = env.connect().await;
    let f: Value = c
        .call("fetch", &json!({"task": task, "file": "token"}))
        .await
        .unwrap();
    assert_eq!(f["file"], dir.join("token").display().to_string());
}

/// After an agent restart, a connection of the task's workload takes the
/// task back with `attach`: the new agent then ends it when that
/// connection closes, as it would have ended it with the connection that
/// started it. Another connection cannot take a task that an open
/// connection owns, nor a task of another workload; bad ids change
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_attached_after_an_agent_restart_ends_with_its_new_connection() {
    let mut env = Env::start(Options::default()).await;
    env.me("tester").await;
    let task_of = async |env: &Env, task: &str| -> keymint_proto::Task {
        env.server()
            .admin()
            .get(&format!("/v1/tasks/{task}"))
            .await
            .unwrap()
    };
    let mut c = env.connect().await;
    let t: Value = c
        .call("start_task", &json!({"role": "demo", "ttl_secs": 600}))
        .await
        .unwrap();
    let task = t["task"]["id"].as_str().unwrap().to_owned();
    env.restart_agent().await;
    assert!(task_of(&env, &task).await.status.is_active());

    let mut owner = env.connect().await;
    let a: Value = owner
        .call("attach", &json!({ "task": task }))
        .await
        .unwrap();
    assert_eq!(a["attached"], task.as_str());
    // Attaching again on the same connection is fine; another open
    // connection cannot take it.
    let _: Value = owner
        .call("attach", &json!({ "task": task }))
        .await
        .unwrap();
    let mut other = env.connect().await;
    let e = refused(&mut other, "attach", json!({ "task": task })).await;
    assert_eq!(e.code, "forbidden", "{e:?}");
    for bad in ["../x", "", "tsk_unknown"] {
        let e = refused(&mut other, "attach", json!({ "task": bad })).await;
        assert_ne!(e.code, "unknown_op", "{e:?}");
    }
    let e = refused(&mut other, "attach", json!({ "task": task, "x": 1 })).await;
    assert_eq!(e.code, "bad_request");
    drop(other);
    assert!(task_of(&env, &task).await.status.is_active());

    // The connection that attached closes: the task ends.
    drop(owner);
    eventually("the attached task ends with its connection", async || {
        !task_of(&env, &task).await.status.is_active()
    })
    .await;
    let t = task_of(&env, &task).await;
    assert_eq!(t.status.as_str(), "failed");

    // A task of another workload is not attached.
    let s: Value = env
        .server()
        .admin()
        .post(
            "/v1/tasks",
            &json!({"workload": "someone-else", "role": "demo", "ttl_secs": 600}),
        )
        .await
        .unwrap();
    let foreign = s["id"].as_str().unwrap().to_owned();
    let mut c = env.connect().await;
    let e = refused(&mut c, "attach", json!({ "task": foreign })).await;
    assert!(
        ["forbidden", "not_found"].contains(&e.code.as_str()),
        "{e:?}"
    );
    assert!(task_of(&env, &foreign).await.status.is_active());
}

/// A workload hangs up while the server cannot be reached: its task is
/// ended once the server answers again, not left active to its TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_connection_closed_during_an_outage_ends_when_the_server_returns() {
    let (relay_addr, backend, refused) = relay().await;
    let env = Env::start(Options {
        server_url: Some(format!("http://{relay_addr}")),
        ..Options::default()
    })
    .await;
    *backend.lock().unwrap() = Some(env.server().addr);
    env.me("tester").await;
    let mut c = env.connect().await;
    let t: Value = c
        .call("start_task", &json!({"role": "demo", "ttl_secs": 600}))
        .await
        .unwrap();
    let task = t["task"]["id"].as_str().unwrap().to_owned();
    let status = async || {
        let t: keymint_proto::Task = env
            .server()
            .admin()
            .get(&format!("/v1/tasks/{task}"))
            .await
            .unwrap();
        t.status.as_str().to_owned()
    };

    // The server is out of reach; then the workload hangs up.
    *backend.lock().unwrap() = None;
    eventually("the agent found the server unreachable", async || {
        env.health("/health").await.1["server"] == "unreachable"
    })
    .await;
    drop(c);
    eventually("the agent forgot the task", async || {
        env.health("/health").await.1["tasks"] == 0
    })
    .await;
    // The end is tried at once after the task is forgotten; a few more
    // calls (entry syncs) refused after it, it has failed.
    let seen = refused.load(std::sync::atomic::Ordering::SeqCst);
    eventually("the relay refused more calls", async || {
        refused.load(std::sync::atomic::Ordering::SeqCst) >= seen + 3
    })
    .await;
    assert_eq!(status().await, "active", "not ended during the outage");

    // Back: the end goes through.
    *backend.lock().unwrap() = Some(env.server().addr);
    eventually("the task of the closed connection is ended", async || {
        status().await != "active"
    })
    .await;
    assert_eq!(status().await, "failed");
}

/// A task with an idle timeout, started through the agent, lives while
/// the connection that owns it is open (the agent heartbeats it), and ends
/// at its idle timeout once the agent is gone (killed with nothing left to
/// end it), instead of living to its TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owned_task_is_heartbeated_and_ends_at_its_idle_timeout_without_the_agent() {
    let mut env = Env::start(Options::default()).await;
    env.me("tester").await;
    let task_of = async |env: &Env, task: &str| -> keymint_proto::Task {
        env.server()
            .admin()
            .get(&format!("/v1/tasks/{task}"))
            .await
            .unwrap()
    };
    let mut c = env.connect().await;
    let t: Value = c
        .call(
            "start_task",
            &json!({"role": "demo", "ttl_secs": 600, "idle_timeout_secs": 2}),
        )
        .await
        .unwrap();
    let task = t["task"]["id"].as_str().unwrap().to_owned();
    // Heartbeats carry it past two idle timeouts.
    eventually(
        "the task is heartbeated past its idle timeout",
        async || {
            let t = task_of(&env, &task).await;
            assert!(t.status.is_active(), "{t:?}");
            t.created_at.until(t.last_seen_at) >= 4_000
        },
    )
    .await;
    // The agent dies (dropped: no code of it ends tasks); the connection
    // is gone, nobody heartbeats.
    drop(env.agent.take());
    drop(c);
    eventually("the task ends at its idle timeout", async || {
        !task_of(&env, &task).await.status.is_active()
    })
    .await;
}
