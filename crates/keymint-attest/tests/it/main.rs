//! keymint-attest's integration tests: one binary (STYLE.md convention 6).
//! Real processes over real sockets: the test process itself, and two C
//! helpers compiled with `gcc` at run time (see `support.rs`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers: a failed step is a failed test"
)]

mod bind;
mod peer;
mod registry;
mod support;
