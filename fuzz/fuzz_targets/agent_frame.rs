//! The node agent's line framing and request parsing: bytes as a workload
//! would send them on the socket, arriving in pieces of fuzzer-chosen size,
//! read with `read_line` under a small limit, then each line through
//! `protocol::parse` and the error line it answers with.
//!
//! Checked: a line is never longer than the limit and never holds `\n`;
//! the lines read rebuild the input (each followed by `\n`, a final `\r`
//! dropped) up to the point where reading stopped; every answer is one
//! line of JSON.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use keymint_agent::protocol::{self, FrameError};
use libfuzzer_sys::fuzz_target;
use tokio::io::BufReader;

const MAX: usize = 512;

fuzz_target!(|data: &[u8]| {
    let Some((&cap, input)) = data.split_first() else {
        return;
    };
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    });
    rt.block_on(async {
        let mut r = BufReader::with_capacity(usize::from(cap % 32) + 1, input);
        let mut consumed = 0usize;
        loop {
            match protocol::read_line(&mut r, MAX, Duration::from_secs(5)).await {
                Ok(Some(line)) => {
                    assert!(line.len() <= MAX);
                    assert!(!line.contains(&b'\n'));
                    let raw = &input[consumed..];
                    let nl = raw
                        .iter()
                        .position(|&b| b == b'\n')
                        .expect("a line without its newline");
                    let want = raw[..nl].strip_suffix(b"\r").unwrap_or(&raw[..nl]);
                    assert_eq!(line, want);
                    consumed += nl + 1;
                    let answer = match protocol::parse(&line) {
                        Ok(_) => continue,
                        Err((id, e)) => protocol::error_line(id, &e),
                    };
                    assert_eq!(answer.last(), Some(&b'\n'));
                    assert!(!answer[..answer.len() - 1].contains(&b'\n'));
                    let v: serde_json::Value =
                        serde_json::from_slice(&answer).expect("an answer that is not JSON");
                    assert!(v.is_object());
                }
                Ok(None) => {
                    // Only an unfinished last line is left.
                    assert!(!input[consumed..].contains(&b'\n'));
                    break;
                }
                Err(FrameError::TooLarge(n)) => {
                    assert_eq!(n, MAX);
                    let raw = &input[consumed..];
                    let len = raw.iter().position(|&b| b == b'\n').unwrap_or(raw.len());
                    assert!(len > MAX, "a line within the limit was refused");
                    break;
                }
                Err(e) => panic!("unexpected framing error: {e}"),
            }
        }
    });
});
