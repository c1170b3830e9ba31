//! keymint-identity's integration tests: one binary (STYLE.md convention 6).
//! Every key is generated at run time; tokens are signed here (or by PyJWT)
//! and served from a JWKS server on 127.0.0.1:0 that counts its requests.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers: a failed step is a failed test"
)]

mod adversarial;
mod config;
mod interop;
mod profiles;
mod refresh;
mod support;
mod verify;
