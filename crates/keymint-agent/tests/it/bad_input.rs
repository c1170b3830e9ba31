//! What a workload can send does not hurt the agent: garbage, huge or
//! unfinished lines, too many connections. The next client is served.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::{Env, Options, WAIT, refused};

async fn answer(r: &mut BufReader<UnixStream>) -> Option<Value> {
    let mut l = String::new();
    let n = tokio::time::timeout(WAIT, r.read_line(&mut l))
        .await
        .expect("an answer in time")
        .unwrap();
    (n > 0).then(|| serde_json::from_str(&l).unwrap())
}

/// Whether the agent closed the connection: the end of the stream, or a
/// reset when it closed with bytes of ours still unread (Linux reports
/// that to the reader of a Unix socket instead of the end, whenever the
/// close comes before the rest of a long line was read).
async fn closed(r: &mut BufReader<UnixStream>) -> bool {
    let mut l = String::new();
    match tokio::time::timeout(WAIT, r.read_line(&mut l))
        .await
        .expect("the end in time")
    {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

async fn raw(env: &Env) -> BufReader<UnixStream> {
    BufReader::new(UnixStream::connect(&env.sock).await.unwrap())
}

async fn assert_served(env: &Env) {
    let mut c = env.connect().await;
    let who: Value = c.call("whoami", &json!({})).await.unwrap();
    assert_eq!(who["workload"], "tester");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_the_socket_does_not_hurt_the_agent() {
    let env = Env::start(Options {
        limits: keymint_agent::Limits {
            line_timeout: Duration::from_millis(300),
            max_connections: 8,
            ..keymint_agent::Limits::default()
        },
        ..Options::default()
    })
    .await;
    env.me("tester").await;

    // Garbage lines get an error each; the connection stays usable.
    let mut c = raw(&env).await;
    for garbage in [
        &b"not json\n"[..],
        b"\xff\xfe\x00garbage\n",
        b"[1,2,3]\n",
        b"{\"op\": 42}\n",
        b"{\"id\": 9}\n",
    ] {
        c.get_mut().write_all(garbage).await.unwrap();
        let r = answer(&mut c).await.unwrap();
        assert_eq!(r["error"]["code"], "bad_request", "{r}");
    }
    c.get_mut()
        .write_all(b"{\"op\":\"frobnicate\",\"id\":1}\n{\"op\":\"whoami\",\"id\":2}\n")
        .await
        .unwrap();
    let r = answer(&mut c).await.unwrap();
    assert_eq!(r["id"], 1);
    assert_eq!(r["error"]["code"], "unknown_op", "{r}");
    // The ops there are, never the caller's own word.
    let m = r["error"]["message"].as_str().unwrap();
    assert!(m.contains("whoami") && !m.contains("frobnicate"), "{r}");
    let r = answer(&mut c).await.unwrap();
    assert_eq!(
        (r["id"].clone(), r["workload"].clone()),
        (json!(2), json!("tester"))
    );

    // An oversized line: one last error, then the connection closes (the
    // agent stops reading at the limit).
    let big = vec![b'x'; 70 * 1024];
    let _ = c.get_mut().write_all(&big).await;
    let r = answer(&mut c).await.unwrap();
    assert_eq!(r["error"]["code"], "too_large", "{r}");
    assert!(closed(&mut c).await, "closed");

    // A slow client that never finishes its line.
    let mut slow = raw(&env).await;
    slow.get_mut().write_all(b"{\"op\":\"who").await.unwrap();
    let r = answer(&mut slow).await.unwrap();
    assert_eq!(r["error"]["code"], "timeout", "{r}");
    assert!(answer(&mut slow).await.is_none(), "closed");

    // Many connections: past the limit, `busy` and closed; served again
    // once they go. The connections above hold their places until the
    // agent has cleaned up after them, a moment after they read the end.
    crate::eventually("the closed connections are released", async || {
        env.agent().health().connections == 0
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..8 {
        let s = UnixStream::connect(&env.sock).await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = UnixStream::connect(&env.sock).await.unwrap();
    let mut buf = String::new();
    tokio::time::timeout(WAIT, extra.read_to_string(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf.contains("\"busy\""), "{buf}");
    drop(held);
    crate::eventually("connections are released", async || {
        env.agent().health().connections == 0
    })
    .await;
    assert_served(&env).await;

    // Requests that are well-formed but wrong.
    let mut c = env.connect().await;
    let t: Value = c
        .call("start_task", &json!({"role": "demo", "ttl_secs": 60}))
        .await
        .unwrap();
    let task = t["task"]["id"].as_str().unwrap();
    for name in ["../x", "a/b", "..", ".x"] {
        let e = refused(&mut c, "fetch", json!({"task": task, "file": name})).await;
        assert_eq!(e.code, "bad_request", "{name}");
    }
    let e = refused(&mut c, "fetch", json!({"task": "../../etc"})).await;
    assert_eq!(e.code, "bad_request");
    let e = refused(&mut c, "fetch", json!({"task": task, "format": "yaml"})).await;
    assert_eq!(e.code, "bad_request");
    assert!(!env.deliver.join("x").exists());
    // A task id the server never issued.
    let e = refused(&mut c, "watch", json!({"task": "tsk_nope"})).await;
    assert_eq!(e.code, "not_found", "{e:?}");
    assert_served(&env).await;
    assert_eq!(env.health("/health").await.0, 200);
}

/// One connection cannot start watchers without end (each is a task and a
/// subscription in the agent's memory): past the limit a `watch` is
/// refused, the connection stays usable, and a watch that ends frees its
/// place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_cannot_start_watches_without_end() {
    // The default limit: 64 at once.
    let env = Env::start(Options::default()).await;
    env.me("tester").await;
    let mut c = env.connect().await;
    let start = async |c: &mut keymint_agent::client::AgentClient| {
        let t: Value = c
            .call("start_task", &json!({"role": "demo", "ttl_secs": 60}))
            .await
            .unwrap();
        t["task"]["id"].as_str().unwrap().to_owned()
    };
    let (task, other) = (start(&mut c).await, start(&mut c).await);
    for _ in 0..63 {
        let _: Value = c.call("watch", &json!({ "task": task })).await.unwrap();
    }
    let _: Value = c.call("watch", &json!({ "task": other })).await.unwrap();
    let e = refused(&mut c, "watch", json!({ "task": task })).await;
    assert_eq!(e.code, "busy", "{e:?}");
    let who: Value = c.call("whoami", &json!({})).await.unwrap();
    assert_eq!(who["workload"], "tester", "the connection stays usable");
    // `other` ends: its watch is over, and a new one may start.
    let _: Value = c.call("end_task", &json!({ "task": other })).await.unwrap();
    crate::eventually("a watch place is free again", async || {
        c.call::<Value>("watch", &json!({ "task": task }))
            .await
            .is_ok()
    })
    .await;
}
