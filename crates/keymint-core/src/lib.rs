//! keymint's domain, without I/O and without an async runtime.
//!
//! Everything the broker decides is decided here, as plain functions over
//! plain values, so that it can be tested without a server, a database or the
//! wall clock:
//!
//! - [`clock`]: time as a parameter ([`Clock`], [`Timestamp`]), never read
//!   deep in the logic (DESIGN.md invariant 7);
//! - [`token`]: the `kmt_` access-token format with its offline checksum;
//! - [`id`]: task and lease identifiers;
//! - [`duration`]: human durations (`15m`, `1h30m`) for configuration and CLI;
//! - [`keyring`]: the root key, AEAD sealing of stored secrets and HMAC
//!   fingerprints (invariant 4);
//! - [`model`]: tasks, leases and their states;
//! - [`role`]: roles, typed by the engine they issue from;
//! - [`rules`]: what a task, sub-task, lease or renewal may be granted
//!   (invariants 1 and 6);
//! - [`audit`]: the hash-chained audit event and the chain verifier;
//! - [`outfile`]: the one exception to "without I/O": how the command line
//!   writes a file it is told to (never through a symbolic link), here
//!   because every crate with such a flag depends on this one.

pub mod audit;
pub mod clock;
pub mod duration;
pub mod federation;
pub mod id;
pub mod inventory;
pub mod json;
pub mod keyring;
pub mod model;
pub mod monitor;
pub mod outfile;
pub mod role;
pub mod rules;
pub mod token;

pub use clock::{Clock, ManualClock, SystemClock, Timestamp};

/// `bytes` as lower-case hex digits, as `hex::encode` writes them, for the
/// digests written per request: a token's fingerprint (every proxied
/// request and issuance) and each audit event's hash. `hex::encode`
/// collects the digits as `char`s, which counted about 1,700 instructions
/// for 32 bytes, several times what this loop takes.
pub fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn lower_hex_writes_what_hex_encode_writes() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(super::lower_hex(&all), hex::encode(&all));
        assert_eq!(super::lower_hex(&[]), "");
    }
}
