//! How fast the outbound screen reads request bodies of a few sizes:
//! chat-completion JSON whose prompt is generated prose and code without
//! secrets (the proxy screens every request body, path and forwarded
//! header with [`keymint_scan::screen::Screen::find`]).
//!
//!   cargo run --release -p keymint-scan --example screen_speed [ROUNDS]
//!
//! Prints, per body size, the median over ROUNDS (default 7) of the time per
//! body and the throughput. A benchmark, not a test: figures go to
//! docs/benchmarks.md with the command.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use keymint_scan::screen::Screen;

/// Words of prompts and of the code pasted into them; `key`, `token`,
/// `secret` and `password` among them, as real prompts have.
const WORDS: &[&str] = &[
    "the",
    "model",
    "should",
    "answer",
    "with",
    "a",
    "short",
    "summary",
    "of",
    "this",
    "function",
    "fn",
    "let",
    "mut",
    "return",
    "self",
    "config",
    "value",
    "key",
    "token",
    "secret",
    "password",
    "user",
    "request",
    "response",
    "error",
    "handle",
    "async",
    "await",
    "import",
    "from",
    "def",
    "class",
    "if",
    "else",
    "for",
    "in",
    "list",
    "map",
    "string",
    "please",
    "explain",
    "why",
    "test",
    "fails",
    "when",
    "input",
    "is",
    "empty",
    "and",
    "database",
    "query",
    "select",
    "where",
    "id",
    "=",
    "{",
    "}",
    "(",
    ")",
    ";",
    "->",
    "::",
    "http://example.test/api",
    "README.md",
    "2026-12-07",
    "42",
    "0x1f",
    "user_id",
    "apiVersion",
];

fn prose(len: usize, seed: u64) -> String {
    let mut s = String::with_capacity(len + 16);
    let mut x = seed | 1;
    while s.len() < len {
        // xorshift: the same text in every run.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(WORDS[(x % WORDS.len() as u64) as usize]);
        s.push(if x.is_multiple_of(11) { '\n' } else { ' ' });
    }
    s
}

fn body(len: usize) -> Vec<u8> {
    let prompt = prose(len, 0x9e37_79b9_7f4a_7c15);
    serde_json::to_vec(&serde_json::json!({
        "model": "gpt-4o-mini",
        "max_tokens": 64,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt},
        ],
    }))
    .unwrap()
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("ROUNDS is a number"))
        .unwrap_or(7);
    let screen = Screen::builtin().expect("the built-in screen compiles");
    println!("| body | bytes | per body (median of {rounds}) | MB/s |");
    println!("|---|---|---|---|");
    for (label, len) in [
        ("short header value", 2usize),
        ("header value", 0usize),
        ("user agent", 1),
        ("tiny chat", 40),
        ("small chat", 120),
        ("2 KiB prompt", 2_048),
        ("16 KiB prompt", 16_384),
        ("128 KiB prompt", 131_072),
    ] {
        let text = if len == 0 {
            b"application/json".to_vec()
        } else if len == 2 {
            b"gzip, br".to_vec()
        } else if len == 1 {
            b"OpenAI/Python 1.99.1 (async) httpx/0.28.1 CPython/3.12.3 Linux x86_64".to_vec()
        } else {
            body(len)
        };
        assert!(
            screen.find(&text).is_empty(),
            "{label}: the prompt holds no secret"
        );
        // About 0.3 s per round whatever the size.
        let per_round = (300_000_000 / (text.len() * 4 + 200)).max(10);
        let mut times: Vec<Duration> = (0..rounds)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..per_round {
                    std::hint::black_box(screen.find(std::hint::black_box(&text)));
                }
                t.elapsed() / per_round as u32
            })
            .collect();
        times.sort();
        let m = times[rounds / 2];
        let mbs = text.len() as f64 / m.as_secs_f64() / 1e6;
        println!("| {label} | {} | {m:.2?} | {mbs:.0} |", text.len());
    }
}
