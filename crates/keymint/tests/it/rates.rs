//! Rate limits kept in the store (docs/design/0040): a restart does not
//! refill them, and replicas share one limit per task.

use std::time::{Duration, Instant};

use keymint_client::Client;
use keymint_testkit::upstream::FakeUpstream;
use serde_json::Value;

use crate::budgets::{KEY, token_for};
use crate::start_task_in;

/// The role `rated` of the budget tests' configuration allows 5 requests a
/// minute: one more every 12 s.
const PER_MINUTE: u64 = 5;

/// The most a 5-a-minute bucket, full at the start, can grant in `d`.
fn most_in(d: Duration) -> usize {
    (PER_MINUTE + d.as_secs() * PER_MINUTE / 60) as usize
}

/// Sends one chat request: `true` if forwarded; a refusal must be the rate
/// limit's 429 with a `Retry-After`.
async fn chat(c: &Client) -> bool {
    let r = c
        .raw(
            http::Method::POST,
            "/proxy/openai/chat/completions",
            Some("application/json"),
            serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
                .to_string()
                .into_bytes(),
        )
        .await
        .unwrap();
    match r.status.as_u16() {
        200 => true,
        429 => {
            let retry: u64 = r
                .headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .expect("a Retry-After in seconds");
            assert!((1..=12).contains(&retry), "{retry}");
            let v: Value = r.json().unwrap();
            assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
            false
        }
        s => panic!("unexpected {s}: {}", r.text()),
    }
}

async fn successes(c: &Client, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        if chat(c).await {
            ok += 1;
        }
    }
    ok
}

/// Before, the buckets were in memory: three requests, a restart, and five
/// more all passed a limit of five a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_does_not_refill_a_rate_limit() {
    let up = FakeUpstream::start(KEY).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = crate::budgets::start(&up, dir.path()).await;
    let t0 = Instant::now();
    let t = start_task_in(&s.admin(), "rated", "agent").await;
    let tok = token_for(&s.admin(), &t.id).await;
    assert_eq!(successes(&s.client(&tok), 3).await, 3);
    s.stop().await;

    let s = crate::budgets::start(&up, dir.path()).await;
    let ok = 3 + successes(&s.client(&tok), 5).await;
    let most = most_in(t0.elapsed());
    assert!(
        (5..=most).contains(&ok),
        "{ok} requests passed, at most {most} may"
    );
    assert_eq!(up.received().len(), ok);
    // Another task has a bucket of its own.
    let other = start_task_in(&s.admin(), "rated", "agent").await;
    let tok = token_for(&s.admin(), &other.id).await;
    assert!(chat(&s.client(&tok)).await);
    s.stop().await;
}

/// Three replicas on one PostgreSQL database share one bucket per task:
/// 30 concurrent requests spread over them against 5 a minute give 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_one_rate_limit() {
    let Some(db) = crate::replicas::fresh_database().await else {
        return;
    };
    let up = FakeUpstream::start(KEY).await.unwrap();
    let (rs, _dir) = crate::replicas::three_proxies(&db, &up).await;
    let admin = rs[0].admin();
    up.set_delay(Duration::from_millis(50));
    let t0 = Instant::now();
    let t = start_task_in(&admin, "rated", "agent").await;
    let tok = token_for(&admin, &t.id).await;
    let clients: Vec<Client> = rs.iter().map(|r| r.client(&tok)).collect();
    let mut handles = Vec::new();
    for i in 0..30 {
        let c = clients[i % clients.len()].clone();
        handles.push(tokio::spawn(async move { chat(&c).await }));
    }
    let mut ok = 0;
    for h in handles {
        if h.await.unwrap() {
            ok += 1;
        }
    }
    let most = most_in(t0.elapsed());
    assert!(
        (5..=most).contains(&ok),
        "{ok} requests passed, at most {most} may"
    );
    assert_eq!(up.received().len(), ok);
    // Asked afterwards, replica C finds the same empty bucket.
    let c = rs[2].client(&tok);
    let more = successes(&c, 3).await;
    assert!(ok + more <= most_in(t0.elapsed()), "{ok} + {more}");
    for r in rs {
        r.stop().await;
    }
}
