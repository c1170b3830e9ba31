//! Proxy budgets are authoritative: kept in the store, they survive a
//! restart and a kill -9, hold under concurrency, and a sub-task draws from
//! its parent's budget (docs/design/0015-durable-budgets.md).

use std::path::Path;
use std::time::{Duration, Instant};

use keymint_client::Client;
use keymint_proto::{IssueLease, IssuedLease, List, StartTask, Task};
use keymint_testkit::TestServer;
use keymint_testkit::upstream::FakeUpstream;
use serde_json::{Value, json};

use crate::start_task_in;

/// The provider key the fake upstream accepts (fabricated).
pub(crate) const KEY: &str = "upstream-key-for-budget-tests-0123456789";

pub(crate) fn config(up: &FakeUpstream) -> String {
    let u = up.url();
    format!(
        r#"
[[upstreams]]
name = "openai"
kind = "openai"
base_url = "{u}/v1"
timeout = "20s"

[prices."gpt-4o-mini"]
input_per_mtok = 0.15
output_per_mtok = 0.60

[[roles]]
name = "five"
engine = "token"
upstream = "openai"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
models = ["gpt-4o-mini"]
endpoints = ["chat.completions"]
max_requests = 5

[[roles]]
name = "tokens"
engine = "token"
upstream = "openai"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
models = ["gpt-4o-mini"]
endpoints = ["chat.completions"]
max_output_tokens = 10

[[roles]]
name = "spend"
engine = "token"
upstream = "openai"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
models = ["gpt-4o-mini"]
endpoints = ["chat.completions"]
max_spend_usd = 0.0001

[[roles]]
name = "hundred"
engine = "token"
upstream = "openai"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
models = ["gpt-4o-mini"]
endpoints = ["chat.completions"]
max_requests = 100

[[roles]]
name = "rated"
engine = "token"
upstream = "openai"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
models = ["gpt-4o-mini"]
endpoints = ["chat.completions"]
requests_per_minute = 5

[[roles]]
name = "tokenrated"
engine = "token"
upstream = "openai"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
models = ["gpt-4o-mini"]
endpoints = ["chat.completions"]
tokens_per_minute = 1000

[[roles]]
name = "kilotokens"
engine = "token"
upstream = "openai"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
models = ["gpt-4o-mini"]
endpoints = ["chat.completions"]
max_output_tokens = 1000

[[roles]]
name = "millidollar"
engine = "token"
upstream = "openai"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
[roles.proxy]
models = ["gpt-4o-mini"]
endpoints = ["chat.completions"]
max_spend_usd = 0.001

"#
    )
}

/// A server in process ([`start`]) in front of a fake upstream, in a data
/// directory of its own (removed when the `TempDir` is dropped).
async fn fresh() -> (FakeUpstream, tempfile::TempDir, TestServer) {
    let up = FakeUpstream::start(KEY).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = start(&up, dir.path()).await;
    (up, dir, s)
}

pub(crate) async fn start(up: &FakeUpstream, dir: &Path) -> TestServer {
    let s = TestServer::builder()
        .data_dir(dir)
        .config_toml(&config(up))
        .start()
        .await
        .unwrap();
    crate::set_upstream_key(&s.admin(), "openai", KEY).await;
    s
}

/// Issues a token for `task` as `as_client` (the admin, or a task token).
pub(crate) async fn token_for(as_client: &Client, task: &str) -> String {
    let l: IssuedLease = as_client
        .post(&format!("/v1/tasks/{task}/leases"), &IssueLease::default())
        .await
        .unwrap();
    l.credential.secret().expose().to_owned()
}

fn chat_body(max_tokens: Option<u64>) -> Vec<u8> {
    let mut b =
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]});
    if let Some(m) = max_tokens {
        b["max_tokens"] = json!(m);
    }
    b.to_string().into_bytes()
}

/// Sends one chat request through the proxy.
pub(crate) async fn post_chat(
    c: &Client,
    max_tokens: Option<u64>,
) -> Result<keymint_client::RawResponse, keymint_client::ClientError> {
    c.raw(
        http::Method::POST,
        "/proxy/openai/chat/completions",
        Some("application/json"),
        chat_body(max_tokens),
    )
    .await
}

/// Sends one chat request; answers its status (a 429 must be the budget's).
pub(crate) async fn chat(c: &Client, max_tokens: Option<u64>) -> u16 {
    let r = post_chat(c, max_tokens).await.unwrap();
    let status = r.status.as_u16();
    if status == 429 {
        let v: Value = r.json().unwrap();
        assert_eq!(v["error"]["code"], "budget_exhausted", "{v}");
    } else {
        assert_eq!(status, 200, "{}", r.text());
    }
    status
}

async fn successes(c: &Client, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        if chat(c, None).await == 200 {
            ok += 1;
        }
    }
    ok
}

/// `n` requests at once; answers how many succeeded.
pub(crate) async fn concurrent(c: &Client, n: usize, max_tokens: Option<u64>) -> usize {
    let mut handles = Vec::new();
    for _ in 0..n {
        let c = c.clone();
        handles.push(tokio::spawn(async move { chat(&c, max_tokens).await }));
    }
    let mut ok = 0;
    for h in handles {
        if h.await.unwrap() == 200 {
            ok += 1;
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_count_of_a_budget() {
    let (up, dir, s) = fresh().await;
    let t = start_task_in(&s.admin(), "five", "agent").await;
    let tok = token_for(&s.admin(), &t.id).await;
    assert_eq!(successes(&s.client(&tok), 3).await, 3);
    s.stop().await;

    // The same data directory: the task, its token and its budget are kept.
    let s = start(&up, dir.path()).await;
    assert_eq!(successes(&s.client(&tok), 5).await, 2);
    assert_eq!(up.received().len(), 5);
    let used = s.proxy().task_usage(&t.id).await;
    assert_eq!(used.requests, 5);
    // Every one of them is in the audit trail, once.
    s.proxy().flush().await;
    let ev: List<Value> = s.admin().get("/v1/audit?limit=1000").await.unwrap();
    let audited: u64 = ev
        .items
        .iter()
        .filter(|e| e["kind"] == "proxy.usage")
        .map(|e| e["data"]["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(audited, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_concurrent_requests_against_a_budget_of_five_give_exactly_five() {
    let (up, _dir, s) = fresh().await;
    up.set_delay(Duration::from_millis(100));
    let t = start_task_in(&s.admin(), "five", "agent").await;
    let tok = token_for(&s.admin(), &t.id).await;
    assert_eq!(concurrent(&s.client(&tok), 30, None).await, 5);
    assert!(up.max_in_flight() >= 2, "the requests did not overlap");
    assert_eq!(up.received().len(), 5);
    assert_eq!(s.proxy().task_usage(&t.id).await.requests, 5);
}

/// A client that goes away while its request's budget is being reserved
/// (the request's future is dropped) costs the budget nothing: what the
/// store reserves after it left is given back at once, not held open until
/// the sweep charges it in full an hour later. Both kinds of reservation:
/// the request's own (a budget of five) and a chunk for the lease (a
/// hundred: the request that reserves it draws its share from it); and the
/// same for a rate limit (five requests a minute), whose units the store's
/// bucket gave the request that left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_while_its_budget_is_reserved_holds_none_of_it() {
    for (role, left) in [("five", 5), ("hundred", 100), ("rated", 5)] {
        let (up, _dir, s) = fresh().await;
        let t = start_task_in(&s.admin(), role, "agent").await;
        let tok = token_for(&s.admin(), &t.id).await;
        drop_while_reserving(&s, &tok).await;
        // What the store gave back is not use: audited now, before any
        // other request, it would stand alone.
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.proxy().flush().await;
        // All of it is left, and the dropped request never reached the
        // upstream.
        let c = s.client(&tok);
        let answered = if role == "rated" {
            let mut ok = 0;
            for _ in 0..left {
                ok += usize::from(post_chat(&c, None).await.unwrap().status == 200);
            }
            ok
        } else {
            drain(&[c], None).await
        };
        assert_eq!(answered, left, "{role}");
        assert_eq!(up.received().len(), left, "{role}");
        assert_eq!(s.proxy().task_usage(&t.id).await.requests, left as u64);
        // The audit trail counts the requests made, and nothing for the
        // one that never left.
        s.proxy().flush().await;
        let ev: List<Value> = s.admin().get("/v1/audit?limit=1000").await.unwrap();
        let usage: Vec<u64> = ev
            .items
            .iter()
            .filter(|e| e["kind"] == "proxy.usage")
            .map(|e| e["data"]["requests"].as_u64().unwrap())
            .collect();
        assert!(
            !usage.contains(&0),
            "{role}: use of nothing audited: {usage:?}"
        );
        assert_eq!(usage.iter().sum::<u64>(), left as u64, "{role}");
        s.stop().await;
    }
}

/// Requests that take longer than a rate limit's holding stays idle (the
/// proxy gives what a task holds back to the store after 500 ms without a
/// request) still give back the tokens they reserved and did not use: a
/// limit of 1,000 tokens a minute lets through one request after another
/// that each reserve about 290 (the body's bytes and `max_tokens`) and use
/// 8. Before, the refund was lost with the holding and the fourth request
/// was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rate_limit_refunds_requests_that_outlast_the_idle_holding() {
    let (up, _dir, s) = fresh().await;
    up.set_delay(Duration::from_millis(800));
    let t = start_task_in(&s.admin(), "tokenrated", "agent").await;
    let c = s.client(&token_for(&s.admin(), &t.id).await);
    for i in 0..5 {
        let a = post_chat(&c, Some(200)).await.unwrap();
        assert_eq!(a.status, 200, "request {i}: {:?}", a.body);
    }
    // The limit still holds: of five at once, which reserve 1,450 between
    // them, no more than 3 fit in the minute's 1,000.
    let sent: Vec<_> = (0..5)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { post_chat(&c, Some(200)).await.unwrap().status })
        })
        .collect();
    let mut at_once = 0;
    for h in sent {
        let status = h.await.unwrap();
        assert!(status == 200 || status == 429, "{status}");
        at_once += usize::from(status == 200);
    }
    assert!((1..=3).contains(&at_once), "{at_once} of 5 passed");
    assert_eq!(up.received().len(), 5 + at_once);
}

/// Sends one proxied request and goes away while its budget waits in the
/// store: another connection holds the database's write lock meanwhile
/// (well inside the store's 5 s busy timeout).
async fn drop_while_reserving(s: &TestServer, tok: &str) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let db = rusqlite::Connection::open(s.data_dir().join("keymint.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let body = chat_body(None);
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /proxy/openai/chat/completions HTTP/1.1\r\nhost: {}\r\n\
         authorization: Bearer {tok}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        s.addr,
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body).await.unwrap();
    let mut answer = [0u8; 64];
    let waited = tokio::time::timeout(Duration::from_millis(600), conn.read(&mut answer)).await;
    assert!(waited.is_err(), "answered while the store was locked");
    drop(conn);
    tokio::time::sleep(Duration::from_millis(300)).await;
    db.execute_batch("ROLLBACK").unwrap();
}

/// Sequential requests until the budget refuses twice in a row, the second
/// time after budget held in idle chunks was given back (docs/design/0030);
/// answers how many succeeded.
pub(crate) async fn drain(clients: &[Client], max_tokens: Option<u64>) -> usize {
    let (mut ok, mut refused) = (0, 0);
    for i in 0..1000 {
        if chat(&clients[i % clients.len()], max_tokens).await == 200 {
            ok += 1;
            refused = 0;
        } else {
            refused += 1;
            if refused == 2 {
                return ok;
            }
            tokio::time::sleep(Duration::from_millis(800)).await;
        }
    }
    panic!("the budget never ran out");
}

/// What the fake upstream was asked for and reported: requests, and the
/// output tokens it answered (6, or fewer when `max_tokens` was lower).
fn upstream_output(up: &FakeUpstream) -> (usize, u64) {
    let got = up.received();
    let out = got
        .iter()
        .map(|r| r.json()["max_tokens"].as_u64().unwrap_or(u64::MAX).min(6))
        .sum();
    (got.len(), out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_spend_budgets_stay_exact_with_chunks_under_concurrency() {
    let (up, _dir, s) = fresh().await;
    up.set_delay(Duration::from_millis(20));

    // 1,000 output tokens, 10 reserved and 6 used per request: chunks of
    // several requests at first, single requests with the output lowered
    // at the end; nothing passes the budget and nothing is lost.
    let t = start_task_in(&s.admin(), "kilotokens", "agent").await;
    let c = s.client(&token_for(&s.admin(), &t.id).await);
    let first = concurrent(&c, 60, Some(10)).await;
    assert!(first > 0);
    let used = s.proxy().task_usage(&t.id).await;
    assert_eq!(used.output, upstream_output(&up).1);
    let rest = drain(std::slice::from_ref(&c), Some(10)).await;
    let used = s.proxy().task_usage(&t.id).await;
    assert_eq!(used.output, 1000, "{used:?}");
    let (n, out) = upstream_output(&up);
    assert_eq!((n, out), (first + rest, 1000));
    // No request went upstream with more than was left.
    assert!(
        up.received()
            .iter()
            .all(|r| r.json()["max_tokens"].as_u64().unwrap() <= 10)
    );

    // $0.001 = 1,000,000 nano-dollars; each request reserves its body's
    // length in input tokens and 6 output tokens (17,100) and spends 3,900.
    let t = start_task_in(&s.admin(), "millidollar", "agent").await;
    let c = s.client(&token_for(&s.admin(), &t.id).await);
    let before = up.received().len();
    let first = concurrent(&c, 60, Some(6)).await;
    let rest = drain(std::slice::from_ref(&c), Some(6)).await;
    let used = s.proxy().task_usage(&t.id).await;
    assert!(used.spend_nusd <= 1_000_000, "{used:?}");
    // Settled against actual use, and stopped only when not even a
    // request with its output lowered fits.
    let spent: u64 = up.received()[before..]
        .iter()
        .map(|r| 2 * 150 + r.json()["max_tokens"].as_u64().unwrap().min(6) * 600)
        .sum();
    assert_eq!(used.spend_nusd, spent);
    let input_cost = chat_body(Some(6)).len() as u64 * 150;
    assert!(1_000_000 - used.spend_nusd < input_cost + 600, "{used:?}");
    assert_eq!(up.received().len() - before, first + rest);
    assert_eq!(
        s.proxy().task_usage(&t.id).await.requests as usize,
        first + rest
    );
    assert_eq!(s.proxy().chunked_requests(), 0);
}

/// OpenAI bills a chat completion's `n` choices together, each up to the
/// request's output limit: `n` must not multiply a budget. The role has
/// 10 output tokens; 4 choices of up to 5 would use 20.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_completion_with_several_choices_cannot_multiply_the_budget() {
    let (up, _dir, s) = fresh().await;
    let t = start_task_in(&s.admin(), "tokens", "agent").await;
    let c = s.client(&token_for(&s.admin(), &t.id).await);
    let ask = |n: Value| {
        let c = c.clone();
        async move {
            let body = json!({"model": "gpt-4o-mini", "n": n, "max_tokens": 5,
                "messages": [{"role": "user", "content": "hello there"}]});
            let r = c
                .raw(
                    http::Method::POST,
                    "/proxy/openai/chat/completions",
                    Some("application/json"),
                    body.to_string().into_bytes(),
                )
                .await
                .unwrap();
            let v: Value = r.json().unwrap_or(Value::Null);
            (r.status.as_u16(), v)
        }
    };
    // Four choices share the 10 tokens: 2 each.
    let (status, v) = ask(json!(4)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(4));
    assert_eq!(up.received()[0].json()["max_tokens"], 2);
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(s.proxy().task_usage(&t.id).await.output, 8);
    // 2 tokens left: not one each for 4 choices, one each for 2.
    let (status, v) = ask(json!(4)).await;
    assert_eq!(
        (status, &v["error"]["code"]),
        (429, &json!("budget_exhausted"))
    );
    let (status, v) = ask(json!(2)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(up.received()[1].json()["max_tokens"], 1);
    assert_eq!(s.proxy().task_usage(&t.id).await.output, 10);
    // An `n` no provider takes is refused before anything is reserved.
    for bad in [json!(0), json!(-2), json!(1.5), json!("3"), json!(1000)] {
        let (status, v) = ask(bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("`n`"),
            "{v}"
        );
    }
    assert_eq!(up.received().len(), 2);
    assert_eq!(s.proxy().task_usage(&t.id).await.requests, 2);
}

/// A request that sets two output limits is reserved by the tighter, and
/// both go upstream lowered to the reservation: an upstream may read the
/// looser one (vLLM, like the stand-in, prefers `max_completion_tokens`
/// to `max_tokens`). The role has 10 output tokens; until session 28
/// `max_tokens: 1` with `max_completion_tokens: 100` reserved 1 and used 6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_looser_output_limit_cannot_pass_the_budget() {
    let (up, _dir, s) = fresh().await;
    let t = start_task_in(&s.admin(), "tokens", "agent").await;
    let c = s.client(&token_for(&s.admin(), &t.id).await);
    let looser = [json!(100), json!(100.0), json!("100"), json!(-1)];
    for (i, loose) in looser.iter().cycle().take(12).enumerate() {
        let body = json!({"model": "gpt-4o-mini", "max_tokens": 1,
            "max_completion_tokens": loose,
            "messages": [{"role": "user", "content": "hello there"}]});
        let r = c
            .raw(
                http::Method::POST,
                "/proxy/openai/chat/completions",
                Some("application/json"),
                body.to_string().into_bytes(),
            )
            .await
            .unwrap();
        let status = r.status.as_u16();
        assert!(status == 200 || status == 429, "{i}: {status} {}", r.text());
    }
    let used = s.proxy().task_usage(&t.id).await;
    assert!(used.output <= 10, "{used:?}");
    for r in up.received() {
        let v = r.json();
        for f in ["max_tokens", "max_completion_tokens"] {
            assert!(v[f].as_u64().is_some_and(|m| m <= 1), "{f} went on as {v}");
        }
    }
    assert_eq!(used.requests as usize, up.received().len());
}

/// An output limit no model has (`u64::MAX`), asked by requests in flight
/// together, against a role that limits requests only: the task's
/// counters saturate, and the budget goes on counting. Until session 28
/// the second reservation overflowed the store's integer, and while the
/// first was held every request of the task, and of every task above it,
/// was refused 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_output_limits_in_flight_together_do_not_break_a_budget() {
    let (up, _dir, s) = fresh().await;
    up.set_delay(Duration::from_millis(100));
    let t = start_task_in(&s.admin(), "five", "agent").await;
    let c = s.client(&token_for(&s.admin(), &t.id).await);
    assert_eq!(concurrent(&c, 3, Some(u64::MAX)).await, 3);
    assert_eq!(successes(&c, 4).await, 2);
    let used = s.proxy().task_usage(&t.id).await;
    assert_eq!(used.requests, 5, "{used:?}");
    assert_eq!(up.received().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_task_cannot_exceed_its_parents_remainder_with_chunks() {
    let (up, _dir, s) = fresh().await;
    // The parent (100 requests) uses 90, from chunks; its sub-task, with
    // 100 of its own, gets the 10 left (once the parent's idle chunk is
    // given back), and then nobody in the tree gets more.
    let parent = start_task_in(&s.admin(), "hundred", "planner").await;
    let ptok = token_for(&s.admin(), &parent.id).await;
    assert_eq!(successes(&s.client(&ptok), 90).await, 90);
    let (child, ctok) = sub_task(&s, &ptok, "hundred").await;
    assert_eq!(drain(&[s.client(&ctok)], None).await, 10);
    assert_eq!(successes(&s.client(&ptok), 1).await, 0);
    assert_eq!(s.proxy().task_usage(&parent.id).await.requests, 100);
    assert_eq!(s.proxy().task_usage(&child.id).await.requests, 10);
    assert_eq!(up.received().len(), 100);
    // Each lease's use is audited under it, once.
    s.proxy().flush().await;
    let ev: List<Value> = s.admin().get("/v1/audit?limit=1000").await.unwrap();
    let audited = |task: &str| -> u64 {
        ev.items
            .iter()
            .filter(|e| e["kind"] == "proxy.usage" && e["task"] == task)
            .map(|e| e["data"]["requests"].as_u64().unwrap())
            .sum()
    };
    assert_eq!((audited(&parent.id), audited(&child.id)), (90, 10));
}

/// Starts a sub-task of the task behind `parent_token`, with that token
/// (the broker's `delegate`), and issues the sub-task's token with it too.
async fn sub_task(s: &TestServer, parent_token: &str, role: &str) -> (Task, String) {
    let c = s.client(parent_token);
    let t: Task = c
        .post(
            "/v1/tasks",
            &StartTask {
                workload: Some("helper".into()),
                role: Some(role.into()),
                ttl_secs: Some(300),
                ..StartTask::default()
            },
        )
        .await
        .unwrap();
    assert!(t.parent.is_some());
    let tok = token_for(&c, &t.id).await;
    (t, tok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_task_cannot_exceed_its_parents_remaining_budget() {
    let (up, _dir, s) = fresh().await;

    // Requests: the parent (5) has used 3; a sub-task (in the parent's
    // role, so with 5 of its own) gets the 2 left, and then nobody in the
    // tree gets more.
    let parent = start_task_in(&s.admin(), "five", "planner").await;
    let ptok = token_for(&s.admin(), &parent.id).await;
    assert_eq!(successes(&s.client(&ptok), 3).await, 3);
    let (child, ctok) = sub_task(&s, &ptok, "five").await;
    assert_eq!(successes(&s.client(&ctok), 5).await, 2);
    assert_eq!(successes(&s.client(&ptok), 1).await, 0);
    let (_, ctok2) = sub_task(&s, &ptok, "five").await;
    assert_eq!(successes(&s.client(&ctok2), 1).await, 0);
    assert_eq!(s.proxy().task_usage(&parent.id).await.requests, 5);
    assert_eq!(s.proxy().task_usage(&child.id).await.requests, 2);
    assert_eq!(up.received().len(), 5);

    // Tokens: the parent may produce 10 output tokens and used 6; its
    // sub-task (10 of its own, none used) asks for 100 and is given the 4
    // left: the request goes upstream with `max_tokens` 4.
    let parent = start_task_in(&s.admin(), "tokens", "planner").await;
    let ptok = token_for(&s.admin(), &parent.id).await;
    assert_eq!(chat(&s.client(&ptok), Some(6)).await, 200);
    let (_, ctok) = sub_task(&s, &ptok, "tokens").await;
    assert_eq!(chat(&s.client(&ctok), Some(100)).await, 200);
    let last = up.received().last().unwrap().json();
    assert_eq!(last["max_tokens"], 4, "{last}");
    // The fake upstream answered with 4; nothing is left for anyone.
    assert_eq!(s.proxy().task_usage(&parent.id).await.output, 10);
    assert_eq!(chat(&s.client(&ctok), Some(1)).await, 429);
    assert_eq!(chat(&s.client(&ptok), Some(1)).await, 429);

    // Spend: the parent ($0.0001) spends 5 × 3,900 nano-dollars (2 input
    // and 6 output tokens each), leaving 80,500. Then 24 concurrent
    // requests of its sub-task, each reserving its body's length in input
    // tokens and 6 output tokens (17,100): four fit in what the parent has
    // left, where the sub-task's own, untouched budget would hold five.
    let parent = start_task_in(&s.admin(), "spend", "planner").await;
    let ptok = token_for(&s.admin(), &parent.id).await;
    for _ in 0..5 {
        assert_eq!(chat(&s.client(&ptok), Some(6)).await, 200);
    }
    let (child, ctok) = sub_task(&s, &ptok, "spend").await;
    up.set_delay(Duration::from_millis(100));
    assert_eq!(concurrent(&s.client(&ctok), 24, Some(6)).await, 4);
    let used = s.proxy().task_usage(&parent.id).await;
    assert!(used.spend_nusd <= 100_000, "{used:?}");
    // Settled against actual use.
    assert_eq!(used.spend_nusd, 9 * (2 * 150 + 6 * 600));
    assert_eq!(
        s.proxy().task_usage(&child.id).await.spend_nusd,
        4 * (2 * 150 + 6 * 600)
    );
}

const BIN: &str = env!("CARGO_BIN_EXE_keymint");

/// `keymint server` from a file with the budget roles; answers the child
/// and an admin client once it is healthy.
async fn server(dir: &Path, up: &FakeUpstream) -> (tokio::process::Child, Client) {
    server_with(dir, up, "").await
}

/// A `keymint server` process ([`server`]) with the upstream's key set, a
/// task of one role, and three of its requests answered.
struct WithTask {
    up: FakeUpstream,
    dir: tempfile::TempDir,
    child: tokio::process::Child,
    task: Task,
    /// The task's token, and a client that sends it.
    token: String,
    client: Client,
}

async fn three_answered(role: &str) -> WithTask {
    let up = FakeUpstream::start(KEY).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (child, admin) = server(dir.path(), &up).await;
    crate::set_upstream_key(&admin, "openai", KEY).await;
    let task = start_task_in(&admin, role, "agent").await;
    let token = token_for(&admin, &task.id).await;
    let client = admin.with_token(&token);
    assert_eq!(successes(&client, 3).await, 3);
    WithTask {
        up,
        dir,
        child,
        task,
        token,
        client,
    }
}

/// [`server`] with `extra` at the end of its configuration file.
pub(crate) async fn server_with(
    dir: &Path,
    up: &FakeUpstream,
    extra: &str,
) -> (tokio::process::Child, Client) {
    let data = dir.join("data");
    let text = format!(
        r#"version = 1
[server]
listen = "127.0.0.1:0"
dangerous_plaintext = true
[storage]
data_dir = "{}"
[policy]
paths = ["{}"]
{}
{extra}
"#,
        data.display(),
        dir.join("policies").display(),
        config(up),
    );
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("policies/all.cedar"), keymint_testkit::PERMIT_ALL).unwrap();
    let path = dir.join("keymint.toml");
    std::fs::write(&path, text).unwrap();
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(["server", "--config"]).arg(&path);
    let (child, probe) = until_healthy(cmd).await;
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    (child, probe.with_token(token.trim()))
}

async fn usage_events(admin: &Client) -> Vec<Value> {
    let ev: List<Value> = admin.get("/v1/audit?limit=1000").await.unwrap();
    ev.items
        .into_iter()
        .filter(|e| e["kind"] == "proxy.usage")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_metered_request_and_no_audit_of_it() {
    // Three answered, then a fourth in flight at the upstream when keymint
    // is killed (no flush of any kind runs).
    let WithTask {
        up,
        dir,
        mut child,
        task: t,
        token: tok,
        client: c,
        ..
    } = three_answered("five").await;
    let in_flight = held_at_the_upstream(&up, &c, Duration::from_secs(30)).await;
    child.start_kill().unwrap(); // SIGKILL
    let _ = child.wait().await;
    assert!(!in_flight.await.unwrap(), "the client got no answer");
    up.set_delay(Duration::ZERO);

    let (mut child, admin) = server(dir.path(), &up).await;
    // Audited at start, before any request: the three settled ones with
    // their use, the one in flight charged in full as unmetered.
    let events = usage_events(&admin).await;
    let sum = |k: &str| -> u64 { events.iter().map(|e| e["data"][k].as_u64().unwrap()).sum() };
    assert_eq!(sum("requests"), 4, "{events:?}");
    assert_eq!(sum("unmetered"), 1);
    assert!(events.iter().all(|e| e["task"] == t.id.as_str()));
    // 3 × 6 output tokens reported, 4096 (the default) held by the fourth.
    assert_eq!(sum("output_tokens"), 3 * 6 + 4096);
    // And the budget kept the count: one request is left of five.
    let c = admin.with_token(&tok);
    assert_eq!(successes(&c, 3).await, 1);
    assert_eq!(up.received().len(), 5);
    child.start_kill().unwrap();
    let _ = child.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_an_open_chunk_charges_it_in_full_to_its_lease() {
    // 100 requests: the first reserves a chunk of 12 (an eighth), three are
    // served from it, then keymint is killed with 9 still held.
    let WithTask {
        up,
        dir,
        mut child,
        task: t,
        token: tok,
        ..
    } = three_answered("hundred").await;
    child.start_kill().unwrap(); // SIGKILL
    let _ = child.wait().await;

    let (mut child, admin) = server(dir.path(), &up).await;
    // Audited at start: the chunk in full, under the lease that drew from
    // it. The three answered are in it, metered if a flush recorded them
    // before the kill, else among the unmetered.
    let events = usage_events(&admin).await;
    let sum = |k: &str| -> u64 { events.iter().map(|e| e["data"][k].as_u64().unwrap()).sum() };
    assert_eq!(sum("requests"), 12, "{events:?}");
    let lease = events[0]["lease"].clone();
    assert!(lease.is_string());
    assert!(
        events
            .iter()
            .all(|e| e["task"] == t.id.as_str() && e["lease"] == lease)
    );
    // A flush every 50 ms may have recorded any of the three (they are
    // sequential): k metered at 6 output tokens, the rest held in full.
    let unmetered = sum("unmetered");
    assert!(
        (9..=12).contains(&unmetered),
        "{unmetered} unmetered: {events:?}"
    );
    let metered = 12 - unmetered;
    assert_eq!(sum("output_tokens"), metered * 6 + unmetered * 4096);
    // The budget kept the count: 88 are left, whatever the chunks.
    let c = admin.with_token(&tok);
    assert_eq!(drain(&[c], None).await, 88);
    assert_eq!(up.received().len(), 91);
    child.start_kill().unwrap();
    let _ = child.wait().await;
}

fn sigterm(child: &tokio::process::Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
}

/// A chat request that the upstream holds for `delay`, sent in the
/// background; answers once the upstream has it. The handle tells whether
/// the client got an answer at all.
async fn held_at_the_upstream(
    up: &FakeUpstream,
    c: &Client,
    delay: Duration,
) -> tokio::task::JoinHandle<bool> {
    let before = up.received().len();
    up.set_delay(delay);
    let c = c.clone();
    let answered = tokio::spawn(async move { post_chat(&c, None).await.is_ok() });
    let t0 = Instant::now();
    while up.received().len() == before {
        assert!(t0.elapsed() < Duration::from_secs(10), "never forwarded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    answered
}

/// Sends `SIGTERM` to `child` and answers its exit status (within 20 s).
pub(crate) async fn terminate(child: &mut tokio::process::Child) -> std::process::ExitStatus {
    sigterm(child);
    tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("keymint stops within 20 s of SIGTERM")
        .unwrap()
}

/// A second `SIGTERM` while the first one's drain waits for a request in
/// flight stops the process at once (exit status 1), where the drain alone
/// would wait for the upstream's 20 s; the next start finds the store
/// whole and never lets the task past its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_stops_without_waiting_for_the_drain() {
    let WithTask {
        up,
        dir,
        mut child,
        token: tok,
        client: c,
        ..
    } = three_answered("hundred").await;
    let slow = held_at_the_upstream(&up, &c, Duration::from_secs(20)).await;
    sigterm(&child);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first SIGTERM waits for the request in flight"
    );
    let t0 = Instant::now();
    sigterm(&child);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the second SIGTERM stops keymint at once")
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(!slow.await.unwrap(), "the request in flight was cut");
    up.set_delay(Duration::ZERO);

    // The cut request was forwarded: its chunk stays open and is charged
    // in full at the next start, as after a crash. Never more than the
    // budget, and the audit chain is whole.
    let (mut child, admin) = server(dir.path(), &up).await;
    let left = drain(&[admin.with_token(&tok)], None).await;
    assert!((1..=96).contains(&left), "{left} requests after 4 of 100");
    let report: keymint_proto::ChainReport = admin.get("/v1/audit/verify").await.unwrap();
    assert!(report.ok(), "{report:?}");
    let status = terminate(&mut child).await;
    assert!(status.success(), "{status}");
}

/// `keymint proxy` on the data directory and configuration that
/// [`server`] wrote (one process per data directory: the server is not
/// running); answers the child and a client without a token once it is
/// healthy.
async fn proxy_process(dir: &Path) -> (tokio::process::Child, Client) {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(["proxy", "--config"])
        .arg(dir.join("keymint.toml"))
        .args(["--listen", "127.0.0.1:0"]);
    until_healthy(cmd).await
}

/// Starts `cmd` (a keymint serving on `port`) and answers it and a client
/// without a token once `/v1/health` answers (at most 30 s).
pub(crate) async fn until_healthy(cmd: tokio::process::Command) -> (tokio::process::Child, Client) {
    let (child, addr) = crate::spawn_listening(cmd).await;
    let client = Client::new(&format!("http://{addr}"), None).unwrap();
    let t0 = Instant::now();
    while client
        .get::<keymint_proto::Health>("/v1/health")
        .await
        .is_err()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "keymint at {addr} did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (child, client)
}

/// A chat request that the upstream holds for 800 ms, with `SIGTERM` sent
/// to `child` while it is there: answers the request's status and the
/// process's exit status.
pub(crate) async fn terminated_while_in_flight(
    up: &FakeUpstream,
    c: &Client,
    child: &mut tokio::process::Child,
) -> (u16, std::process::ExitStatus) {
    let before = up.received().len();
    up.set_delay(Duration::from_millis(800));
    let c = c.clone();
    let in_flight = tokio::spawn(async move { chat(&c, None).await });
    let t0 = Instant::now();
    while up.received().len() == before {
        assert!(t0.elapsed() < Duration::from_secs(10), "never forwarded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = terminate(child).await;
    up.set_delay(Duration::ZERO);
    (in_flight.await.unwrap(), status)
}

/// `SIGTERM` (what a service manager or Kubernetes sends), to `keymint
/// server` and to `keymint proxy`: the request in flight is answered in
/// full, the process exits 0, and its open budget chunk gives back what it
/// held: the next start charges only the requests made, all metered.
/// (`keymint proxy` used to stop on `SIGINT` only: `SIGTERM` killed it on
/// the spot, and its chunk of 12 was charged in full at the next start.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_the_request_in_flight_and_gives_back_the_open_chunk() {
    let WithTask {
        up,
        dir,
        mut child,
        token: tok,
        client: c,
        ..
    } = three_answered("hundred").await;
    let (answer, status) = terminated_while_in_flight(&up, &c, &mut child).await;
    assert_eq!(answer, 200, "keymint server answers the request in flight");
    assert!(status.success(), "keymint server after SIGTERM: {status}");

    let (mut proxy, client) = proxy_process(dir.path()).await;
    let c = client.with_token(&tok);
    assert_eq!(successes(&c, 3).await, 3);
    let (answer, status) = terminated_while_in_flight(&up, &c, &mut proxy).await;
    assert_eq!(answer, 200, "keymint proxy answers the request in flight");
    assert!(status.success(), "keymint proxy after SIGTERM: {status}");

    let (mut child, admin) = server(dir.path(), &up).await;
    let events = usage_events(&admin).await;
    let sum = |k: &str| -> u64 { events.iter().map(|e| e["data"][k].as_u64().unwrap()).sum() };
    assert_eq!(sum("requests"), 8, "{events:?}");
    assert_eq!(sum("unmetered"), 0, "{events:?}");
    assert_eq!(sum("output_tokens"), 8 * 6, "{events:?}");
    let c = admin.with_token(&tok);
    assert_eq!(drain(&[c], None).await, 92);
    let status = terminate(&mut child).await;
    assert!(status.success(), "{status}");
}
