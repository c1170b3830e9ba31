//! Identifiers for tasks and leases: a short prefix and 22 base62 characters,
//! e.g. `tsk_0Vx3kQ2m…`. The first 8 characters are the creation time in
//! milliseconds (base62, so identifiers sort by time and B-tree inserts land
//! at the right edge of the index instead of on random pages); the other 14
//! come from the OS CSPRNG (≈83 bits). They name things; they are not
//! secrets and grant nothing.

use crate::clock::Timestamp;
use crate::token::ALPHABET;

/// How many base62 characters follow an identifier's prefix.
pub const ID_BODY: usize = 22;
const TIME_CHARS: usize = 8;

fn random_id(prefix: &str, now: Timestamp) -> String {
    let mut s = String::with_capacity(prefix.len() + ID_BODY);
    s.push_str(prefix);
    let mut t = u64::try_from(now.millis()).unwrap_or(0);
    let mut time = [b'0'; TIME_CHARS];
    for slot in time.iter_mut().rev() {
        *slot = ALPHABET[(t % 62) as usize];
        t /= 62;
    }
    s.extend(time.iter().map(|&b| char::from(b)));
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

pub fn task_id(now: Timestamp) -> String {
    random_id("tsk_", now)
}

pub fn lease_id(now: Timestamp) -> String {
    random_id("lse_", now)
}

pub fn entry_id(now: Timestamp) -> String {
    random_id("ent_", now)
}

pub fn approval_id(now: Timestamp) -> String {
    random_id("apr_", now)
}

/// A budget reservation of the egress proxy.
pub fn reservation_id(now: Timestamp) -> String {
    random_id("rsv_", now)
}

/// An inventory entry (docs/design/0027).
pub fn inventory_id(now: Timestamp) -> String {
    random_id("inv_", now)
}

/// A suspension by misuse monitoring (docs/design/0033).
pub fn suspension_id(now: Timestamp) -> String {
    random_id("sus_", now)
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
        let now = Timestamp(1_800_000_000_000);
        let a = task_id(now);
        let b = task_id(now);
        assert_ne!(a, b);
        assert!(is_valid("tsk_", &a));
        assert!(is_valid("lse_", &lease_id(now)));
        assert!(!is_valid("tsk_", "tsk_'; drop table tasks;--"));
        assert!(!is_valid("tsk_", &lease_id(now)));
    }

    #[test]
    fn ids_sort_by_creation_time() {
        let mut prev = lease_id(Timestamp(0));
        for ms in [
            1,
            61,
            62,
            3_843,
            1_800_000_000_000,
            1_800_000_000_001,
            253_402_300_799_000,
        ] {
            let next = lease_id(Timestamp(ms));
            assert!(next > prev, "{next} should sort after {prev}");
            prev = next;
        }
    }
}
