//! File delivery to a workload running as another uid: private, replaced
//! atomically while it is read, gone when the task ends or the connection
//! closes.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use keymint_proto::Task;
use serde_json::{Value, json};

use crate::{Env, Options, Proc, clients, eventually, sha256_file};

const NOBODY: u32 = 65534;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_files_are_private_replaced_atomically_and_removed() {
    let env = Env::start(Options {
        group: Some(NOBODY),
        ..Options::default()
    })
    .await;
    let (a, _) = clients();
    env.entry(
        "nobody-a",
        json!({"uid": NOBODY, "exe_sha256": sha256_file(a)}),
    )
    .await;
    let mut p = Proc::spawn(a, &env.sock, None, Some(NOBODY));
    let t = p
        .call(json!({"op": "start_task", "role": "demo", "ttl_secs": 120}))
        .await;
    assert_eq!(t["ok"], true, "{t}");
    let task = t["task"]["id"].as_str().unwrap().to_owned();

    // Names that are paths are refused, and nothing is written.
    for bad in ["../escape", "a/b", "/etc/x", ".hidden", ""] {
        let r = p
            .call(json!({"op": "fetch", "task": task, "file": bad}))
            .await;
        assert_eq!(r["error"]["code"], "bad_request", "{bad}: {r}");
    }
    assert!(!env.deliver.join("escape").exists());
    assert!(!env.deliver.join(&task).exists());

    // A 3-second credential, refreshed at 2 seconds.
    let f = p
        .call(json!({"op": "fetch", "task": task, "file": "token", "ttl_secs": 3}))
        .await;
    assert_eq!(f["ok"], true, "{f}");
    let path = env.deliver.join(&task).join("token");
    assert_eq!(f["file"], path.display().to_string());
    let first = f["credential"]["token"].as_str().unwrap().to_owned();
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!(
        m.mode() & 0o7777,
        0o400,
        "the file is read-only for its owner"
    );
    assert_eq!(
        (m.uid(), m.gid()),
        (NOBODY, NOBODY),
        "owned by the workload"
    );
    let d = std::fs::metadata(env.deliver.join(&task)).unwrap();
    assert_eq!(d.mode() & 0o7777, 0o700, "the task directory is private");
    assert_eq!((d.uid(), d.gid()), (NOBODY, NOBODY));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
    // The workload itself (uid 65534) reads it.
    let read = p.raw(&format!("@read {}", path.display())).await;
    assert_eq!(
        read["raw"],
        first.as_str(),
        "the workload reads its credential"
    );

    // Watch, while a reader reads the file as fast as it can.
    let w = p
        .call(json!({"op": "watch", "task": task, "id": "w"}))
        .await;
    assert_eq!(w, json!({"ok": true, "id": "w", "watching": task}));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, path) = (Arc::clone(&stop), path.clone());
        std::thread::spawn(move || {
            let mut seen = HashSet::new();
            let (mut reads, mut errors) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                match std::fs::read(&path) {
                    Ok(b) => {
                        seen.insert(b);
                        reads += 1;
                    }
                    Err(_) => errors += 1,
                }
            }
            (seen, reads, errors)
        })
    };
    let mut tokens = vec![first.clone()];
    let mut lease = f["lease"]["id"].as_str().unwrap().to_owned();
    for _ in 0..2 {
        let ev = p.raw("<").await;
        assert_eq!(ev["event"], "credential", "{ev}");
        assert_eq!(ev["task"], task.as_str());
        assert_eq!(ev["replaces"], lease.as_str(), "{ev}");
        assert_eq!(ev["file"], path.display().to_string());
        lease = ev["lease"]["id"].as_str().unwrap().to_owned();
        let tok = ev["credential"]["token"].as_str().unwrap().to_owned();
        assert!(!tokens.contains(&tok), "a fresh credential");
        tokens.push(tok);
    }
    stop.store(true, Ordering::Relaxed);
    let (seen, reads, errors) = reader.join().unwrap();
    tokens.push(std::fs::read_to_string(&path).unwrap());
    assert_eq!(errors, 0, "the file is never missing while it is replaced");
    assert!(reads > 50, "the reader read {reads} times");
    for s in &seen {
        let s = String::from_utf8_lossy(s);
        assert!(
            tokens.iter().any(|t| *t == s),
            "a read saw a partial or mixed file: {s:?}"
        );
    }
    assert!(seen.len() >= 2, "the reader saw the replacement");
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!(
        (m.mode() & 0o7777, m.uid()),
        (0o400, NOBODY),
        "the replacement is as private"
    );
    assert_eq!(
        std::fs::read_dir(env.deliver.join(&task)).unwrap().count(),
        1,
        "no temporary files are left"
    );

    // Ending the task removes its directory and tells the watcher.
    let e = p.call(json!({"op": "end_task", "task": task})).await;
    assert_eq!(e["ok"], true, "{e}");
    assert_eq!(e["task"]["status"], "completed");
    let ev = p.raw("<").await;
    assert_eq!(ev["event"], "task_ended", "{ev}");
    assert!(!env.deliver.join(&task).exists(), "removed at task end");

    // A task of a connection that closes ends, and its files go.
    let t = p
        .call(json!({"op": "start_task", "role": "demo", "ttl_secs": 120}))
        .await;
    let task2 = t["task"]["id"].as_str().unwrap().to_owned();
    let f = p
        .call(json!({"op": "fetch", "task": task2, "file": "db.json", "format": "json"}))
        .await;
    assert_eq!(f["ok"], true, "{f}");
    let json_file: Value =
        serde_json::from_slice(&std::fs::read(env.deliver.join(&task2).join("db.json")).unwrap())
            .unwrap();
    assert_eq!(json_file["type"], "bearer");
    assert_eq!(json_file["token"], f["credential"]["token"]);
    p.finish().await;
    eventually("the closed connection's files are removed", async || {
        !env.deliver.join(&task2).exists()
    })
    .await;
    let admin = env.server().admin();
    eventually("the closed connection's task is ended", async || {
        let t: Task = admin.get(&format!("/v1/tasks/{task2}")).await.unwrap();
        !t.status.is_active()
    })
    .await;
}

/// Health tells whether delivered files are held in memory (a tmpfs) or
/// reach a disk: `memory` for a delivery directory under /dev/shm, `disk`
/// for one in the build's own directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_tells_whether_delivered_files_reach_a_disk() {
    let mut env = Env::start(Options::default()).await;
    let on_disk = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let in_memory = tempfile::tempdir_in("/dev/shm").unwrap();
    for (dir, expected) in [(on_disk.path(), "disk"), (in_memory.path(), "memory")] {
        env.agent.take().unwrap().stop().await;
        env.config.deliver_dir = dir.join("deliver");
        env.agent = Some(
            keymint_agent::Agent::start(
                env.config.clone(),
                std::sync::Arc::new(keymint_core::SystemClock),
            )
            .await
            .unwrap(),
        );
        let (_, h) = env.health("/health").await;
        assert_eq!(h["delivery"], expected, "{}", dir.display());
    }
}
