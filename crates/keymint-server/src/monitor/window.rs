//! The arithmetic of misuse monitoring, without I/O or clock: per-minute
//! buckets over a sliding window, and the trailing baseline
//! (docs/design/0033).

use std::collections::VecDeque;

use keymint_core::Timestamp;
use keymint_core::monitor::hour_of;

use crate::monitoring_config::Metric;

/// Requests, tokens and spend (nano-dollars).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub requests: u64,
    pub tokens: u64,
    pub spend_nusd: u64,
}

impl Totals {
    pub fn add(&mut self, o: Self) {
        self.requests = self.requests.saturating_add(o.requests);
        self.tokens = self.tokens.saturating_add(o.tokens);
        self.spend_nusd = self.spend_nusd.saturating_add(o.spend_nusd);
    }

    pub const fn get(&self, m: Metric) -> u64 {
        match m {
            Metric::Requests => self.requests,
            Metric::Tokens => self.tokens,
            Metric::Spend => self.spend_nusd,
        }
    }
}

const MINUTE_MS: i64 = 60_000;

/// Per-minute totals of one subject, oldest first.
#[derive(Debug, Default)]
pub struct Minutes {
    buckets: VecDeque<(i64, Totals)>,
}

impl Minutes {
    pub fn add(&mut self, at: Timestamp, t: Totals) {
        let minute = at.0.div_euclid(MINUTE_MS);
        match self.buckets.iter_mut().rev().find(|(m, _)| *m == minute) {
            Some((_, b)) => b.add(t),
            None => {
                // Out of order by a little (settles finish in any order):
                // kept in place so pruning from the front stays right.
                let at = self
                    .buckets
                    .iter()
                    .rposition(|(m, _)| *m < minute)
                    .map_or(0, |i| i + 1);
                self.buckets.insert(at, (minute, t));
            }
        }
    }

    /// The sum over the `window_secs` ending at `now` (the minutes after
    /// `now - window`, `now`'s minute included).
    pub fn sum(&self, now: Timestamp, window_secs: u64) -> Totals {
        let now_min = now.0.div_euclid(MINUTE_MS);
        let first = now_min - i64::try_from(window_secs / 60).unwrap_or(i64::MAX) + 1;
        let mut t = Totals::default();
        for (_, b) in self
            .buckets
            .iter()
            .filter(|(m, _)| *m >= first && *m <= now_min)
        {
            t.add(*b);
        }
        t
    }

    /// Drops the minutes no window of `keep_secs` ending at `now` needs;
    /// true if nothing is left.
    pub fn prune(&mut self, now: Timestamp, keep_secs: u64) -> bool {
        let first = now.0.div_euclid(MINUTE_MS) - i64::try_from(keep_secs / 60).unwrap_or(0);
        while self.buckets.front().is_some_and(|(m, _)| *m < first) {
            self.buckets.pop_front();
        }
        self.buckets.is_empty()
    }
}

/// The baseline period of a window ending at `now`: the `baseline_secs`
/// of whole hours before the hour the window starts in, so it never
/// overlaps the window (`from`, `to`, `to` exclusive).
pub fn baseline_period(
    now: Timestamp,
    window_secs: u64,
    baseline_secs: u64,
) -> (Timestamp, Timestamp) {
    let w = i64::try_from(window_secs).unwrap_or(i64::MAX / 2000);
    let b = i64::try_from(baseline_secs).unwrap_or(i64::MAX / 2000);
    let to = hour_of(now.plus_millis(-w.saturating_mul(1000)));
    (to.plus_millis(-b.saturating_mul(1000)), to)
}

/// Whether `current` is more than `factor` times the average per window
/// of `baseline_total` (over `baseline_secs`), once the baseline holds at
/// least `min_baseline`. Returns the average when it fires.
pub fn above_baseline(
    current: u64,
    baseline_total: u64,
    factor: f64,
    min_baseline: u64,
    baseline_secs: u64,
    window_secs: u64,
) -> Option<f64> {
    if baseline_total < min_baseline || baseline_secs == 0 {
        return None;
    }
    let avg = baseline_total as f64 * window_secs as f64 / baseline_secs as f64;
    (current as f64 > factor * avg).then_some(avg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    fn t(requests: u64) -> Totals {
        Totals {
            requests,
            tokens: requests * 10,
            spend_nusd: requests * 1000,
        }
    }

    #[test]
    fn a_window_sums_its_minutes_only() {
        let mut m = Minutes::default();
        let t0 = Timestamp(100 * H);
        m.add(t0, t(1));
        m.add(t0.plus_secs(30), t(2)); // same minute
        m.add(t0.plus_secs(120), t(4));
        m.add(t0.plus_secs(61), t(8)); // late, in between
        let now = t0.plus_secs(150);
        assert_eq!(m.sum(now, 60).requests, 4);
        assert_eq!(m.sum(now, 120).requests, 12);
        assert_eq!(m.sum(now, 180).requests, 15);
        assert_eq!(m.sum(now, 3600).tokens, 150);
        // Ten minutes on, a 5-minute window is empty; a pruned deque too.
        let later = t0.plus_secs(600);
        assert_eq!(m.sum(later, 300), Totals::default());
        assert!(!m.prune(later, 600));
        assert!(m.prune(later, 300));
    }

    #[test]
    fn the_baseline_is_the_whole_hours_before_the_window() {
        // 10:30 with a 1h window and 2h baseline: 07:00 to 09:00.
        let now = Timestamp(10 * H + H / 2);
        assert_eq!(
            baseline_period(now, 3600, 7200),
            (Timestamp(7 * H), Timestamp(9 * H))
        );
        // On the hour: the hour that just ended is the window's.
        assert_eq!(
            baseline_period(Timestamp(10 * H), 3600, 3600),
            (Timestamp(8 * H), Timestamp(9 * H))
        );
    }

    #[test]
    fn a_cold_start_never_fires_and_a_spike_does() {
        // No history, or too little: never.
        assert_eq!(above_baseline(1_000_000, 0, 3.0, 10, 7200, 3600), None);
        assert_eq!(above_baseline(1_000_000, 9, 3.0, 10, 7200, 3600), None);
        // 20 over 2h is 10 per 1h window: 30 is not above 3x, 31 is.
        assert_eq!(above_baseline(30, 20, 3.0, 10, 7200, 3600), None);
        assert_eq!(above_baseline(31, 20, 3.0, 10, 7200, 3600), Some(10.0));
        // A 5-minute window against a day: 24 * 12 windows.
        assert_eq!(above_baseline(5, 288, 4.0, 1, 86_400, 300), Some(1.0));
    }
}
