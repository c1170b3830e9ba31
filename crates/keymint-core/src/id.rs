//! Identifiers for tasks and leases: a short prefix and 22 base62 characters
//! (≈131 bits) from the OS CSPRNG, e.g. `tsk_5hGq…`. They name things; they are
//! not secrets and grant nothing.

use crate::token::ALPHABET;

const ID_BODY: usize = 22;

fn random_id(prefix: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + ID_BODY);
    s.push_str(prefix);
    let mut buf = [0u8; 32];
    while s.len() < prefix.len() + ID_BODY {
        if getrandom::fill(&mut buf).is_err() {
            // The OS CSPRNG does not fail on supported platforms; if it ever
            // did, fall back to a hash of the stack address and a counter,
            // which still yields unique (not unguessable) identifiers. IDs
            // are not secrets.
            static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let addr = std::ptr::addr_of!(buf) as usize as u64;
            buf[..8].copy_from_slice(&n.to_le_bytes());
            buf[8..16].copy_from_slice(&addr.to_le_bytes());
        }
        for &b in &buf {
            if b < 248 && s.len() < prefix.len() + ID_BODY {
                s.push(char::from(ALPHABET[usize::from(b % 62)]));
            }
        }
    }
    s
}

pub fn task_id() -> String {
    random_id("tsk_")
}

pub fn lease_id() -> String {
    random_id("lse_")
}

pub fn approval_id() -> String {
    random_id("apr_")
}

/// Whether `s` looks like an identifier with `prefix` (used to reject
/// garbage early with a clear message instead of a database miss).
pub fn is_valid(prefix: &str, s: &str) -> bool {
    s.len() == prefix.len() + ID_BODY
        && s.starts_with(prefix)
        && s.as_bytes()[prefix.len()..]
            .iter()
            .all(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_prefixed_unique_and_valid() {
        let a = task_id();
        let b = task_id();
        assert_ne!(a, b);
        assert!(is_valid("tsk_", &a));
        assert!(is_valid("lse_", &lease_id()));
        assert!(!is_valid("tsk_", "tsk_'; drop table tasks;--"));
        assert!(!is_valid("tsk_", &lease_id()));
    }
}
