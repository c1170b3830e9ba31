//! How long the outbound screen takes over whole files, each read as one
//! request body: the measurement behind design 0019, "Large bodies"
//! (bodies crafted to open a rule's window every few bytes).
//!
//!   cargo run --release -p keymint-scan --example screen_file -- FILE...
//!
//! Prints, per file, its size, what the screen found and the time of one
//! `Screen::find` (the rules are compiled by a first, untimed pass over the
//! same file). A benchmark, not a test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use keymint_scan::screen::Screen;

fn main() {
    let screen = Screen::builtin().expect("the built-in screen rules compile");
    for path in std::env::args().skip(1) {
        let body = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{path}: {e}");
                std::process::exit(2);
            }
        };
        let _ = screen.find(&body);
        let t = Instant::now();
        let found = screen.find(&body).len();
        let took = t.elapsed();
        println!("{path}: {} bytes, {found} found, {took:?}", body.len());
    }
}
