//! keymint-scan integration tests: one binary (see STYLE.md). Every fixture
//! that looks like a secret is generated here at run time from random
//! characters; none is, or ever was, a credential.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers: a failed step is a failed test"
)]

mod bad_input;
mod cli;
mod encoded;
mod exports;
mod git;
mod image;
mod paths;
mod processes;
mod rules;
mod sarif;
mod structures;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;

use keymint_scan::cli::ScanArgs;

/// A small random generator for fabricated keys.
#[derive(Debug)]
pub struct Rng(u64);

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    pub fn new() -> Self {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(0x5eed);
        Self(h.finish() | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn chars(&mut self, n: usize, alphabet: &[u8]) -> String {
        (0..n)
            .map(|_| char::from(alphabet[(self.next_u64() % alphabet.len() as u64) as usize]))
            .collect()
    }
}

pub const B62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
pub const URL: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_";

/// A GitHub-shaped token with a valid checksum.
pub fn github_token(rng: &mut Rng) -> String {
    let body = rng.chars(30, B62);
    format!(
        "ghp_{body}{}",
        keymint_core::token::checksum(body.as_bytes())
    )
}

/// An OpenAI-project-shaped key.
pub fn openai_key(rng: &mut Rng) -> String {
    format!(
        "sk-proj-{}T3BlbkFJ{}",
        rng.chars(74, URL),
        rng.chars(74, URL)
    )
}

/// An Anthropic-shaped key.
pub fn anthropic_key(rng: &mut Rng) -> String {
    format!("sk-ant-api03-{}AA", rng.chars(93, URL))
}

/// Parses `keymint scan` flags the way the binary will.
pub fn args(argv: &[&str]) -> ScanArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        scan: ScanArgs,
    }
    let mut full = vec!["keymint-scan"];
    full.extend_from_slice(argv);
    Cli::parse_from(full).scan
}

/// Runs a scan; returns (exit code, stdout, stderr).
pub fn run(argv: &[&str]) -> (u8, String, String) {
    let a = args(argv);
    let mut out = Vec::new();
    let mut err = Vec::new();
    let code = keymint_scan::cli::execute(&a, &mut out, &mut err);
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

/// Runs a JSON scan and returns the parsed document.
pub fn run_json(argv: &[&str]) -> (u8, serde_json::Value, String) {
    let mut full = vec!["--format", "json", "--no-progress"];
    full.extend_from_slice(argv);
    let (code, out, err) = run(&full);
    let doc = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    (code, doc, err)
}

/// The findings of a JSON report.
pub fn findings(doc: &serde_json::Value) -> &Vec<serde_json::Value> {
    doc["findings"].as_array().unwrap()
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs git in `dir`, panicking on failure.
pub fn git(dir: &Path, argv: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(argv)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_SYSTEM", "/dev/null")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
