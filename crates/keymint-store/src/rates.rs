//! Rate limits kept in the store (docs/design/0040-rate-limits-in-the-store.md):
//! one token bucket per task and limit, shared by every process on the
//! store, taken from in *slices* that a process then spends from memory.
//!
//! A bucket holds at most `per_minute` units and refills continuously at
//! `per_minute` units a minute. Its level is kept in thousandths of a unit
//! with the time it was last computed, so a row untouched for a minute is
//! full again and can be deleted ([`FORGET_AFTER_MS`]). Every unit a
//! process spends was taken from the stored bucket first, so all processes
//! together never pass the rate a single bucket allows, whatever the
//! number of replicas or restarts; a crash loses the units a process held
//! (the rate errs strict, never loose).

/// A bucket untouched this long is full again: its row can go.
pub const FORGET_AFTER_MS: i64 = 60_000;

/// Below this many requests' worth left in a bucket, a take grants exactly
/// what the request needs (so small limits are exact across replicas).
pub const EXACT_BELOW: u64 = 16;

/// What one request needs from one bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateAsk {
    /// The bucket's key (the proxy uses `<task>/rpm` and `<task>/tpm`).
    pub key: String,
    /// The limit: units per minute, and the bucket's size. At least 1.
    pub per_minute: u64,
    /// Units needed now, at most `per_minute` and at least 1.
    pub need: u64,
}

/// The answer to a take: from every bucket or from none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateTake {
    /// Taken: from each bucket (in the order asked) at least its `need`,
    /// more (a slice to spend from memory) while the bucket is full enough.
    Taken(Vec<u64>),
    /// Nothing taken: the bucket asked at `index` has its `need` in
    /// `wait_ms` milliseconds.
    Wait { index: usize, wait_ms: u64 },
}

/// Units a process gives back unspent (they were taken from the bucket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateGive {
    pub key: String,
    pub per_minute: u64,
    pub units: u64,
}

/// A stored bucket: its level in thousandths of a unit, as of `at_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    pub level_milli: i64,
    pub at_ms: i64,
}

fn cap_milli(per_minute: u64) -> i64 {
    i64::try_from(per_minute)
        .unwrap_or(i64::MAX)
        .saturating_mul(1000)
}

impl Bucket {
    /// A bucket seen for the first time is full.
    pub fn full(per_minute: u64, now_ms: i64) -> Self {
        Self {
            level_milli: cap_milli(per_minute),
            at_ms: now_ms,
        }
    }

    /// The level at `now_ms`: refilled at `per_minute` a minute (a
    /// thousandth of a unit per `60 / per_minute` ms), never above full.
    /// A clock that went back refills nothing and keeps the later time.
    #[must_use]
    pub fn refilled(self, per_minute: u64, now_ms: i64) -> Self {
        let elapsed = now_ms.saturating_sub(self.at_ms).clamp(0, FORGET_AFTER_MS);
        let gained = i128::from(elapsed) * i128::from(per_minute) / 60;
        let level = (i128::from(self.level_milli) + gained).min(i128::from(cap_milli(per_minute)));
        Self {
            level_milli: i64::try_from(level).unwrap_or(i64::MAX),
            at_ms: self.at_ms.max(now_ms),
        }
    }

    /// How many units to take for a request that needs `need`: `None` if
    /// fewer are there (with the wait in ms), else at least `need` and, with
    /// [`EXACT_BELOW`] requests' worth or more left, an eighth of what is
    /// left (a slice the process spends from memory).
    pub fn grant(self, per_minute: u64, need: u64) -> Result<u64, u64> {
        let need = need.clamp(1, per_minute.max(1));
        let avail = u64::try_from(self.level_milli.max(0) / 1000).unwrap_or(0);
        if avail < need {
            let deficit = i128::from(need) * 1000 - i128::from(self.level_milli.max(0));
            // A thousandth of a unit refills every 60 / per_minute ms.
            let per = i128::from(per_minute.max(1));
            let wait = (deficit * 60 + per - 1) / per;
            return Err(u64::try_from(wait).unwrap_or(u64::MAX).max(1));
        }
        if avail / need < EXACT_BELOW {
            return Ok(need);
        }
        Ok((avail / 8).max(need))
    }

    /// The bucket after `units` were taken.
    #[must_use]
    pub fn taken(self, units: u64) -> Self {
        let milli = i64::try_from(units)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        Self {
            level_milli: self.level_milli.saturating_sub(milli),
            ..self
        }
    }

    /// The bucket after `units` came back, never above full.
    #[must_use]
    pub fn given(self, per_minute: u64, units: u64) -> Self {
        let milli = i64::try_from(units)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        Self {
            level_milli: self
                .level_milli
                .saturating_add(milli)
                .min(cap_milli(per_minute)),
            ..self
        }
    }
}

/// Decides a take over the buckets as stored (`None`: no row, full), at
/// `now_ms`: the new buckets to write and the answer. Nothing is to be
/// written unless the answer is [`RateTake::Taken`].
pub fn decide(asks: &[RateAsk], stored: &[Option<Bucket>], now_ms: i64) -> (Vec<Bucket>, RateTake) {
    let mut next = Vec::with_capacity(asks.len());
    let mut granted = Vec::with_capacity(asks.len());
    for (i, (a, b)) in asks.iter().zip(stored).enumerate() {
        let b = b
            .unwrap_or_else(|| Bucket::full(a.per_minute, now_ms))
            .refilled(a.per_minute, now_ms);
        match b.grant(a.per_minute, a.need) {
            Ok(n) => {
                granted.push(n);
                next.push(b.taken(n));
            }
            Err(wait_ms) => {
                return (Vec::new(), RateTake::Wait { index: i, wait_ms });
            }
        }
    }
    (next, RateTake::Taken(granted))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(per_minute: u64, need: u64) -> RateAsk {
        RateAsk {
            key: "t/rpm".into(),
            per_minute,
            need,
        }
    }

    #[test]
    fn a_small_bucket_grants_exactly_what_is_needed_until_empty() {
        let mut b: Option<Bucket> = None;
        for _ in 0..5 {
            let (next, r) = decide(&[ask(5, 1)], &[b], 1_000);
            assert_eq!(r, RateTake::Taken(vec![1]));
            b = Some(next[0]);
        }
        let (next, r) = decide(&[ask(5, 1)], &[b], 1_000);
        assert!(next.is_empty());
        // One unit of 5 a minute refills in 12 s.
        assert_eq!(
            r,
            RateTake::Wait {
                index: 0,
                wait_ms: 12_000
            }
        );
        // 12 s later exactly one more.
        let (next, r) = decide(&[ask(5, 1)], &[b], 13_000);
        assert_eq!(r, RateTake::Taken(vec![1]));
        let (_, r) = decide(&[ask(5, 1)], &[Some(next[0])], 13_000);
        assert!(matches!(r, RateTake::Wait { .. }));
    }

    #[test]
    fn a_full_bucket_grants_a_slice_and_never_more_than_it_holds() {
        let (next, r) = decide(&[ask(6_000, 1)], &[None], 0);
        assert_eq!(r, RateTake::Taken(vec![750]));
        assert_eq!(next[0].level_milli, 5_250_000);
        // Many takes never grant more than the bucket held.
        let mut b = Some(Bucket::full(6_000, 0));
        let mut total = 0;
        loop {
            let (next, r) = decide(&[ask(6_000, 1)], &[b], 0);
            match r {
                RateTake::Taken(g) => total += g[0],
                RateTake::Wait { .. } => break,
            }
            b = Some(next[0]);
        }
        assert_eq!(total, 6_000);
    }

    #[test]
    fn two_buckets_are_taken_together_or_not_at_all() {
        let tpm = RateAsk {
            key: "t/tpm".into(),
            per_minute: 100,
            need: 80,
        };
        let empty_tpm = Bucket {
            level_milli: 10_000,
            at_ms: 0,
        };
        let (next, r) = decide(&[ask(5, 1), tpm.clone()], &[None, Some(empty_tpm)], 0);
        assert!(next.is_empty());
        // 70 tokens short at 100 a minute: 42 s.
        assert_eq!(
            r,
            RateTake::Wait {
                index: 1,
                wait_ms: 42_000
            }
        );
        let (next, r) = decide(&[ask(5, 1), tpm], &[None, None], 0);
        assert_eq!(r, RateTake::Taken(vec![1, 80]));
        assert_eq!(next[1].level_milli, 20_000);
    }

    #[test]
    fn refill_is_capped_and_a_clock_going_back_refills_nothing() {
        let b = Bucket {
            level_milli: 0,
            at_ms: 10_000,
        };
        assert_eq!(b.refilled(60, 11_000).level_milli, 1_000);
        assert_eq!(b.refilled(60, 10_000_000).level_milli, 60_000);
        let back = b.refilled(60, 5_000);
        assert_eq!(back.level_milli, 0);
        assert_eq!(back.at_ms, 10_000);
        assert_eq!(b.given(60, 100).level_milli, 60_000);
        // Huge limits do not overflow.
        let big = Bucket::full(u64::MAX, 0).refilled(u64::MAX, 60_000);
        assert!(big.grant(u64::MAX, 1_000_000).is_ok());
    }
}
