//! Who gets what: the executable an entry names, nobody else; a process
//! that is gone, never.

use keymint_proto::{List, Task};
use serde_json::json;

use crate::{Env, Options, Proc, clients, refused, sha256_file};

/// Two executables under one uid: only the one whose SHA-256 the entry
/// names is the workload; the other is told what was seen and gets
/// nothing. And one workload cannot touch another's task or lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_executable_an_entry_names_gets_a_credential() {
    let env = Env::start(Options::default()).await;
    let (a, b) = clients();
    let entry = env
        .entry("client-a", json!({"uid": 0, "exe_sha256": sha256_file(a)}))
        .await;

    let mut pa = Proc::spawn(a, &env.sock, None, None);
    let who = pa.call(json!({"op": "whoami", "id": 1})).await;
    assert_eq!(who["ok"], true, "{who}");
    assert_eq!(who["id"], 1);
    assert_eq!(who["workload"], "client-a");
    assert_eq!(who["entry"], entry.as_str());
    assert_eq!(who["attributes"]["exe_sha256"], sha256_file(a));
    let t = pa
        .call(json!({"op": "start_task", "role": "demo", "ttl_secs": 120}))
        .await;
    assert_eq!(t["ok"], true, "{t}");
    assert_eq!(t["task"]["workload"], "client-a");
    let task = t["task"]["id"].as_str().unwrap().to_owned();
    let f = pa.call(json!({"op": "fetch", "task": task})).await;
    assert_eq!(f["ok"], true, "{f}");
    assert!(
        f["credential"]["token"]
            .as_str()
            .unwrap()
            .starts_with("kmt_"),
        "{f}"
    );
    let lease = f["lease"]["id"].as_str().unwrap().to_owned();

    // b: same uid, another hash. Told what was seen as soon as it
    // connects, before it asks anything, then closed (a peer that matches
    // no entry holds no connection).
    let mut pb = Proc::spawn(b, &env.sock, None, None);
    let r = pb.raw("<").await;
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["error"]["code"], "not_attested", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&sha256_file(b)),
        "says what it saw: {r}"
    );
    assert_eq!(pb.raw("<").await["raw"], "EOF", "and closed");
    pb.finish().await;

    // This test binary is another workload: a's task and lease are not its.
    env.me("tester").await;
    let mut me = env.connect().await;
    for (op, fields) in [
        ("fetch", json!({"task": task})),
        ("end_task", json!({"task": task})),
        ("watch", json!({"task": task})),
        ("renew", json!({"lease": lease})),
    ] {
        let e = refused(&mut me, op, fields).await;
        assert_eq!(e.code, "forbidden", "{op}: {e:?}");
    }

    let tasks: List<Task> = env.server().admin().get("/v1/tasks").await.unwrap();
    assert_eq!(tasks.items.len(), 1, "only a's task exists");
    assert!(tasks.items[0].status.is_active(), "and b did not end it");
    pa.finish().await;
}

/// A process connects and is attested, then forks and exits; its child
/// keeps the connection. The attested process is gone (its pidfd says so,
/// whatever its pid is now), so the child's request is refused and the
/// connection closed. A new connection of the same executable is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_outliving_its_process_is_refused() {
    let env = Env::start(Options::default()).await;
    let (a, _) = clients();
    env.entry("client-a", json!({"uid": 0, "exe_sha256": sha256_file(a)}))
        .await;

    let mut p = Proc::spawn(a, &env.sock, Some("fork"), None);
    let first: serde_json::Value = serde_json::from_str(&p.line().await).unwrap();
    assert_eq!(first["workload"], "client-a", "{first}");
    let second: serde_json::Value = serde_json::from_str(&p.line().await).unwrap();
    assert_eq!(second["ok"], false, "{second}");
    assert_eq!(second["error"]["code"], "not_attested", "{second}");
    assert!(
        second["error"]["message"]
            .as_str()
            .unwrap()
            .contains("has exited"),
        "{second}"
    );
    assert_eq!(p.line().await, "CLOSED");

    let mut again = Proc::spawn(a, &env.sock, None, None);
    let who = again.call(json!({"op": "whoami"})).await;
    assert_eq!(who["workload"], "client-a", "{who}");
    again.finish().await;
}
