//! Budgets and rate limits per task, in memory.
//!
//! A request first *reserves* what it may use at most (one request, the
//! input tokens estimated from the body, the output tokens it may generate,
//! their cost) under one lock, so that concurrent requests cannot together
//! pass a limit; after the response it *settles* the reservation against
//! the usage the provider reported (or, if none was reported, keeps the
//! whole reservation: an unknown cost is never counted as free).
//!
//! Rate limits are token buckets (requests and tokens per minute) that refill
//! continuously. Time is a parameter.

use std::collections::HashMap;
use std::sync::Mutex;

use keymint_core::Timestamp;

use crate::config::{Policy, Price};

/// What one request asks for.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    /// Upper bound of the input tokens (estimated from the body).
    pub input: u64,
    /// Output tokens the request may generate.
    pub output: u64,
    pub price: Option<Price>,
    /// Whether tokens are metered at all (model listings are not).
    pub metered: bool,
}

/// A granted reservation. `output` may be lower than asked: the request's
/// output limit must then be lowered to it.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub task: String,
    pub input: u64,
    pub output: u64,
    pub spend: u64,
    pub price: Option<Price>,
}

/// Usage counted for a task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub requests: u64,
    pub input: u64,
    pub output: u64,
    pub spend_nusd: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A per-task budget is used up.
    Budget(&'static str),
    /// A rate limit: try again after this many seconds.
    Rate(&'static str, u64),
    /// The role has a spend budget and the model has no price.
    UnknownCost,
}

#[derive(Debug, Clone)]
struct Bucket {
    level: f64,
    per_minute: f64,
    at: Timestamp,
}

impl Bucket {
    fn new(per_minute: u64, now: Timestamp) -> Self {
        Self {
            level: per_minute as f64,
            per_minute: per_minute as f64,
            at: now,
        }
    }

    fn refill(&mut self, now: Timestamp) {
        let ms = self.at.until(now).max(0) as f64;
        self.level = (self.level + ms * self.per_minute / 60_000.0).min(self.per_minute);
        self.at = now;
    }

    /// Seconds until `n` is available (0: available now). A request larger
    /// than the bucket waits for a full bucket.
    fn wait_secs(&mut self, n: f64, now: Timestamp) -> u64 {
        self.refill(now);
        let n = n.min(self.per_minute);
        if self.level >= n {
            0
        } else {
            (((n - self.level) * 60.0 / self.per_minute).ceil() as u64).max(1)
        }
    }
}

#[derive(Debug, Default)]
struct TaskState {
    used: Usage,
    reserved: Usage,
    rpm: Option<Bucket>,
    tpm: Option<Bucket>,
    touched: Timestamp,
}

/// The ledger of every task that used the proxy recently.
#[derive(Debug, Default)]
pub struct Ledger {
    tasks: Mutex<HashMap<String, TaskState>>,
}

fn room(limit: Option<u64>, used: u64, reserved: u64) -> u64 {
    limit.map_or(u64::MAX, |l| {
        l.saturating_sub(used.saturating_add(reserved))
    })
}

impl Ledger {
    /// Reserves `ask` for `task` under `policy`, or says why not.
    pub fn reserve(
        &self,
        task: &str,
        policy: &Policy,
        ask: Ask,
        now: Timestamp,
    ) -> Result<Reservation, Refusal> {
        let max_spend = policy.max_spend_nusd();
        if ask.metered && max_spend.is_some() && ask.price.is_none() {
            return Err(Refusal::UnknownCost);
        }
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let st = tasks.entry(task.to_owned()).or_default();
        st.touched = now;
        let (u, r) = (st.used, st.reserved);
        if room(policy.max_requests, u.requests, r.requests) == 0 {
            return Err(Refusal::Budget("requests"));
        }
        let (mut input, mut output, mut spend) = (0, 0, 0);
        if ask.metered {
            input = ask.input;
            if input > room(policy.max_input_tokens, u.input, r.input) {
                return Err(Refusal::Budget("input tokens"));
            }
            output = ask
                .output
                .min(room(policy.max_output_tokens, u.output, r.output));
            if ask.output > 0 && output == 0 {
                return Err(Refusal::Budget("output tokens"));
            }
            if let (Some(_), Some(price)) = (max_spend, ask.price) {
                let left = room(max_spend, u.spend_nusd, r.spend_nusd);
                let in_cost = price.cost(input, 0);
                if in_cost >= left && (in_cost > 0 || left == 0) {
                    return Err(Refusal::Budget("spend"));
                }
                if let Some(affordable) = (left - in_cost).checked_div(price.output_nusd) {
                    output = output.min(affordable);
                }
                if ask.output > 0 && output == 0 {
                    return Err(Refusal::Budget("spend"));
                }
                spend = price.cost(input, output);
            }
        }
        // Rate limits: check both before taking from either.
        if let Some(rpm) = policy.requests_per_minute {
            let b = st.rpm.get_or_insert_with(|| Bucket::new(rpm, now));
            let w = b.wait_secs(1.0, now);
            if w > 0 {
                return Err(Refusal::Rate("requests per minute", w));
            }
        }
        let tokens = (input + output) as f64;
        if let (Some(tpm), true) = (policy.tokens_per_minute, ask.metered) {
            let b = st.tpm.get_or_insert_with(|| Bucket::new(tpm, now));
            let w = b.wait_secs(tokens, now);
            if w > 0 {
                return Err(Refusal::Rate("tokens per minute", w));
            }
            b.level -= tokens.min(b.per_minute);
        }
        if let Some(b) = st.rpm.as_mut() {
            b.level -= 1.0;
        }
        st.reserved.requests += 1;
        st.reserved.input += input;
        st.reserved.output += output;
        st.reserved.spend_nusd += spend;
        Ok(Reservation {
            task: task.to_owned(),
            input,
            output,
            spend,
            price: ask.price,
        })
    }

    /// Settles a reservation. `actual` is `(input, output)` as the provider
    /// reported it; `None` keeps the whole reservation (fail closed).
    /// Returns what was charged.
    pub fn settle(&self, res: &Reservation, actual: Option<(u64, u64)>, now: Timestamp) -> Usage {
        let (input, output) = actual.unwrap_or((res.input, res.output));
        let spend = match (actual, res.price) {
            (Some(_), Some(p)) => p.cost(input, output),
            _ => res.spend,
        };
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let st = tasks.entry(res.task.clone()).or_default();
        st.touched = now;
        st.reserved.requests = st.reserved.requests.saturating_sub(1);
        st.reserved.input = st.reserved.input.saturating_sub(res.input);
        st.reserved.output = st.reserved.output.saturating_sub(res.output);
        st.reserved.spend_nusd = st.reserved.spend_nusd.saturating_sub(res.spend);
        let charged = Usage {
            requests: 1,
            input,
            output,
            spend_nusd: spend,
        };
        st.used.requests += 1;
        st.used.input += input;
        st.used.output += output;
        st.used.spend_nusd += spend;
        if let Some(b) = st.tpm.as_mut() {
            // Give back what was reserved and not used (or take the excess).
            let reserved = (res.input + res.output) as f64;
            b.refill(now);
            b.level =
                (b.level + reserved.min(b.per_minute) - (input + output) as f64).min(b.per_minute);
        }
        charged
    }

    /// What a task has used (settled) so far.
    pub fn used(&self, task: &str) -> Usage {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.get(task).map(|s| s.used).unwrap_or_default()
    }

    /// Forgets tasks idle since `before` with nothing in flight.
    pub fn forget_idle(&self, before: Timestamp) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|_, s| s.touched >= before || s.reserved.requests > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> Timestamp {
        Timestamp::from_millis(1_700_000_000_000 + ms)
    }

    const PRICE: Price = Price {
        input_nusd: 1000,
        output_nusd: 2000,
    };

    fn ask(input: u64, output: u64) -> Ask {
        Ask {
            input,
            output,
            price: Some(PRICE),
            metered: true,
        }
    }

    #[test]
    fn reservations_never_pass_the_budget_and_settle_to_actual_use() {
        let l = Ledger::default();
        let p = Policy {
            max_output_tokens: Some(100),
            max_requests: Some(3),
            ..Policy::default()
        };
        let a = l.reserve("t", &p, ask(10, 60), t(0)).unwrap();
        assert_eq!(a.output, 60);
        // Only 40 output tokens are left while `a` is in flight: clamped.
        let b = l.reserve("t", &p, ask(10, 60), t(0)).unwrap();
        assert_eq!(b.output, 40);
        assert_eq!(
            l.reserve("t", &p, ask(10, 60), t(0)).unwrap_err(),
            Refusal::Budget("output tokens")
        );
        l.settle(&a, Some((5, 20)), t(1));
        // 40 of a's 60 came back.
        let c = l.reserve("t", &p, ask(10, 60), t(2)).unwrap();
        assert_eq!(c.output, 40);
        l.settle(&b, None, t(3));
        l.settle(&c, Some((5, 5)), t(3));
        assert_eq!(l.used("t").output, 20 + 40 + 5);
        assert_eq!(
            l.reserve("t", &p, ask(1, 1), t(4)).unwrap_err(),
            Refusal::Budget("requests")
        );
    }

    #[test]
    fn spend_is_reserved_from_the_price_and_unknown_cost_fails_closed() {
        let l = Ledger::default();
        let p = Policy {
            // 0.0001 USD = 100,000 nUSD: 10 input (10,000) + at most 45 output.
            max_spend_usd: Some(0.0001),
            ..Policy::default()
        };
        let r = l.reserve("t", &p, ask(10, 1000), t(0)).unwrap();
        assert_eq!(r.output, 45);
        assert_eq!(r.spend, 100_000);
        assert_eq!(
            l.reserve("t", &p, ask(10, 10), t(0)).unwrap_err(),
            Refusal::Budget("spend")
        );
        let mut unpriced = ask(1, 1);
        unpriced.price = None;
        assert_eq!(
            l.reserve("u", &p, unpriced, t(0)).unwrap_err(),
            Refusal::UnknownCost
        );
    }

    #[test]
    fn rate_limits_refill_over_time() {
        let l = Ledger::default();
        let p = Policy {
            requests_per_minute: Some(2),
            ..Policy::default()
        };
        for _ in 0..2 {
            let r = l.reserve("t", &p, ask(1, 1), t(0)).unwrap();
            l.settle(&r, Some((1, 1)), t(0));
        }
        assert_eq!(
            l.reserve("t", &p, ask(1, 1), t(0)).unwrap_err(),
            Refusal::Rate("requests per minute", 30)
        );
        assert!(l.reserve("t", &p, ask(1, 1), t(30_000)).is_ok());
        // Another task has its own bucket.
        assert!(l.reserve("other", &p, ask(1, 1), t(0)).is_ok());
    }

    #[test]
    fn token_rate_takes_the_reservation_and_refunds_the_rest() {
        let l = Ledger::default();
        let p = Policy {
            tokens_per_minute: Some(100),
            ..Policy::default()
        };
        let r = l.reserve("t", &p, ask(50, 50), t(0)).unwrap();
        assert!(matches!(
            l.reserve("t", &p, ask(10, 10), t(0)),
            Err(Refusal::Rate("tokens per minute", _))
        ));
        l.settle(&r, Some((10, 10)), t(0));
        assert!(l.reserve("t", &p, ask(30, 30), t(0)).is_ok());
    }
}
