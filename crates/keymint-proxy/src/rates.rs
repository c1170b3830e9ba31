//! Rate limits per task (requests and tokens per minute), kept in the store
//! (docs/design/0040-rate-limits-in-the-store.md).
//!
//! Each limit is one token bucket in the store, shared by every process on
//! it. A process takes units from the bucket ([`Store::take_rates`]: exactly
//! what a request needs while the bucket is low, an eighth of what is left
//! while it is full enough) and spends them from memory; units a request
//! did not use (tokens it reserved and the provider did not bill, a request
//! never sent) go back to the process's own holding, and what a task's
//! holding keeps unspent for [`IDLE_MS`] goes back to the store
//! ([`Rates::due`], from the proxy's flush loop), and so does a holding
//! [`HOLD_MS`] old however busy its task: no unit stays out of the store
//! longer than that, so what the store's bucket refills while units are
//! held is at most [`HOLD_MS`]' worth. Every unit spent was taken from the
//! stored bucket first, so no number of processes, restarts or crashes lets
//! a task go faster than its limit; a crash loses the units its process
//! held (the limit errs strict). Time is a parameter.

use std::sync::Mutex;

use foldhash::HashMap;
use keymint_core::Timestamp;
use keymint_store::{RateAsk, RateGive, RateTake, Store};

use crate::budget::Refusal;
use crate::config::Policy;

/// Units a task's holding keeps unspent this long go back to the store.
pub const IDLE_MS: i64 = 500;
/// A holding this old goes back to the store, however busy its task: the
/// store's bucket refills while a process holds units, and what this lets
/// a task spend above its limit is the refill of this long.
pub const HOLD_MS: i64 = 1_000;

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    units: u64,
    per_minute: u64,
}

#[derive(Debug)]
struct Held {
    /// Requests per minute, tokens per minute.
    slots: [Slot; 2],
    /// Units given back that were taken before this holding was made: they
    /// go to the store's bucket at the next flush, which caps them against
    /// what it refilled since, and are not spent from here.
    returning: [u64; 2],
    touched: Timestamp,
    /// When this holding was made: every unit in `slots` left the store's
    /// bucket since.
    made: Timestamp,
}

impl Held {
    /// Gives back `units` (requests, tokens) taken at `at`: spendable if
    /// they left the store while this holding was there, else returning to
    /// the store; never above a full bucket (what would pass it is dropped:
    /// strict).
    fn back(&mut self, at: Timestamp, units: [u64; 2]) {
        for (i, n) in units.into_iter().enumerate() {
            let full = self.slots[i].per_minute;
            let to = if at >= self.made {
                &mut self.slots[i].units
            } else {
                &mut self.returning[i]
            };
            *to = to.saturating_add(n).min(full);
        }
    }
}

const WHAT: [&str; 2] = ["requests per minute", "tokens per minute"];
const SUFFIX: [&str; 2] = ["rpm", "tpm"];

/// A task's limits as this process applies them: requests and tokens per
/// minute, 0 where the policy sets none. A request carries them to the
/// end, so what it gives back reaches its task's holding even when the
/// holding went back to the store meanwhile (a take or a request that
/// outlasted [`IDLE_MS`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits([u64; 2]);

impl Limits {
    pub fn of(policy: &Policy) -> Self {
        Self(
            [policy.requests_per_minute, policy.tokens_per_minute]
                .map(|l| l.map_or(0, |per_minute| per_minute.max(1))),
        )
    }
}

/// What a request's units were taken under: its task's limits, and when.
/// What it gives back is spent again only from a holding that was there
/// when they were taken; otherwise it goes to the store's bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Took {
    pub limits: Limits,
    pub at: Timestamp,
}

/// What a take still needs from the store's buckets ([`Rates::take_held`]).
#[derive(Debug)]
pub(crate) struct Short {
    pub(crate) task: String,
    took: Took,
    short: Vec<(usize, RateAsk)>,
    from_held: [u64; 2],
}

impl Short {
    /// The asks for [`Store::take_rates`].
    pub(crate) fn asks(&self) -> Vec<RateAsk> {
        self.short.iter().map(|(_, a)| a.clone()).collect()
    }
}

/// The units of the store's buckets this process holds, per task.
#[derive(Debug, Default)]
pub struct Rates {
    tasks: Mutex<HashMap<String, Held>>,
}

impl Rates {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on `task`'s holding under `limits`, touched at `now`;
    /// made empty at `now` if it has none (it went back to the store, or
    /// the task is new).
    fn holding<R>(
        &self,
        task: &str,
        limits: Limits,
        now: Timestamp,
        f: impl FnOnce(&mut Held) -> R,
    ) -> R {
        let mut tasks = self.lock();
        let held = match tasks.get_mut(task) {
            Some(h) => {
                h.touched = h.touched.max(now);
                h
            }
            None => tasks.entry(task.to_owned()).or_insert(Held {
                slots: [Slot::default(); 2],
                returning: [0; 2],
                touched: now,
                made: now,
            }),
        };
        for (i, per_minute) in limits.0.into_iter().enumerate() {
            if per_minute > 0 {
                // A lowered limit (a reload) lowers what is held with it.
                let slot = &mut held.slots[i];
                slot.per_minute = per_minute;
                slot.units = slot.units.min(per_minute);
                held.returning[i] = held.returning[i].min(per_minute);
            }
        }
        f(held)
    }

    /// Takes one request and `tokens` for `task` under `policy`'s limits:
    /// from what this process holds, the rest from the store's buckets
    /// (both or neither). Refused with the wait when a bucket is short;
    /// fails closed when the store cannot be asked.
    pub async fn take(
        &self,
        store: &dyn Store,
        task: &str,
        policy: &Policy,
        tokens: u64,
        now: Timestamp,
    ) -> Result<(), Refusal> {
        match self.take_held(task, Limits::of(policy), tokens, now) {
            None => Ok(()),
            Some(short) => {
                let answer = store.take_rates(short.asks(), now).await;
                self.taken(&short, answer, now)
            }
        }
    }

    /// The part of [`Rates::take`] this process holds: taken at once;
    /// `Some` names what the store's buckets must give for the rest, to
    /// be asked and then told to [`Rates::taken`].
    pub(crate) fn take_held(
        &self,
        task: &str,
        limits: Limits,
        tokens: u64,
        now: Timestamp,
    ) -> Option<Short> {
        // One request, and the tokens it may use (none asked of a token
        // limit by a request that reserves none).
        let need = [
            u64::from(limits.0[0] > 0),
            if limits.0[1] > 0 && tokens > 0 {
                tokens.min(limits.0[1])
            } else {
                0
            },
        ];
        if need == [0, 0] {
            return None;
        }
        // What this process holds pays first; the store is asked for the
        // rest only.
        let mut from_held = [0u64; 2];
        let mut short: Vec<(usize, RateAsk)> = Vec::new();
        self.holding(task, limits, now, |held| {
            for (i, slot) in held.slots.iter_mut().enumerate() {
                if need[i] == 0 {
                    continue;
                }
                let t = slot.units.min(need[i]);
                slot.units -= t;
                from_held[i] = t;
                if t < need[i] {
                    short.push((
                        i,
                        RateAsk {
                            key: format!("{task}/{}", SUFFIX[i]),
                            per_minute: slot.per_minute,
                            need: need[i] - t,
                        },
                    ));
                }
            }
        });
        (!short.is_empty()).then(|| Short {
            task: task.to_owned(),
            took: Took { limits, at: now },
            short,
            from_held,
        })
    }

    /// Ends a take with the store's `answer` to [`Short::asks`], at `now`:
    /// granted units past the need are kept; on a refusal or an error what
    /// was taken from this process's holding goes back to it. Either goes
    /// to the store instead if the holding was made anew meanwhile.
    pub(crate) fn taken(
        &self,
        s: &Short,
        answer: keymint_store::Result<RateTake>,
        now: Timestamp,
    ) -> Result<(), Refusal> {
        // Logged before the holdings' lock is taken.
        let answer = answer.inspect_err(
            |e| tracing::error!(error = %e, "proxy: cannot take from the rate limits"),
        );
        self.holding(&s.task, s.took.limits, now, |held| match answer {
            Ok(RateTake::Taken(granted)) => {
                let mut extra = [0u64; 2];
                for ((i, a), g) in s.short.iter().zip(granted) {
                    extra[*i] = g.saturating_sub(a.need);
                }
                held.back(s.took.at, extra);
                Ok(())
            }
            Ok(RateTake::Wait { index, wait_ms }) => {
                held.back(s.took.at, s.from_held);
                let what = s.short.get(index).map_or(WHAT[0], |(i, _)| WHAT[*i]);
                Err(Refusal::Rate(what, wait_ms.div_ceil(1000).max(1)))
            }
            Err(_) => {
                held.back(s.took.at, s.from_held);
                Err(Refusal::Unavailable)
            }
        })
    }

    /// Gives back what a request took (`took`) and did not use: `taken`
    /// tokens were taken, `used` were used (the request itself too when
    /// `request`: it was never sent). Kept by this process for the task's
    /// next requests if its holding was there when they were taken (it
    /// goes back to the store after [`IDLE_MS`] idle or [`HOLD_MS`] in
    /// all); otherwise given to the store's bucket at the next flush.
    pub fn give_back(
        &self,
        task: &str,
        took: Took,
        taken: u64,
        used: u64,
        request: bool,
        now: Timestamp,
    ) {
        let limits = took.limits;
        let tokens = if limits.0[1] > 0 {
            taken.min(limits.0[1]).saturating_sub(used)
        } else {
            0
        };
        let request = request && limits.0[0] > 0;
        if tokens == 0 && !request {
            return;
        }
        // What was taken before the task's holding was made (the request
        // outlasted it, or the holding is made anew for this) goes to the
        // store's bucket, which caps it against what it refilled since.
        self.holding(task, limits, now, |held| {
            held.back(took.at, [u64::from(request), tokens]);
        });
    }

    /// Takes out, to be given back to the store's buckets, what is
    /// returning, and the whole holding of a task idle since [`IDLE_MS`] or
    /// held since [`HOLD_MS`] (every task's, with `all`).
    pub fn due(&self, now: Timestamp, all: bool) -> Vec<RateGive> {
        let idle = now.plus_millis(-IDLE_MS);
        let old = now.plus_millis(-HOLD_MS);
        let mut gives = Vec::new();
        self.lock().retain(|task, held| {
            let goes = all || held.touched <= idle || held.made <= old;
            for (i, slot) in held.slots.iter().enumerate() {
                // One give per bucket: the store caps each the same way.
                let units = std::mem::take(&mut held.returning[i]).saturating_add(if goes {
                    slot.units
                } else {
                    0
                });
                if units > 0 {
                    gives.push(RateGive {
                        key: format!("{task}/{}", SUFFIX[i]),
                        per_minute: slot.per_minute,
                        units,
                    });
                }
            }
            !goes
        });
        gives
    }

    /// Units held in this process to be spent, for the given task (tests,
    /// metrics); what is returning to the store is not counted.
    pub fn held(&self, task: &str) -> (u64, u64) {
        self.lock()
            .get(task)
            .map_or((0, 0), |h| (h.slots[0].units, h.slots[1].units))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use keymint_store::SqliteStore;

    use super::*;

    fn t(ms: i64) -> Timestamp {
        Timestamp(1_800_000_000_000 + ms)
    }

    /// Units taken under `limits` at `ms`.
    fn took(limits: Limits, ms: i64) -> Took {
        Took { limits, at: t(ms) }
    }

    fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("k.db")).unwrap();
        (dir, Arc::new(s))
    }

    #[tokio::test]
    async fn two_processes_share_one_limit_and_refill_over_time() {
        let (_d, s) = store();
        let (a, b) = (Rates::default(), Rates::default());
        let p = Policy {
            requests_per_minute: Some(2),
            ..Policy::default()
        };
        a.take(&*s, "t", &p, 2, t(0)).await.unwrap();
        b.take(&*s, "t", &p, 2, t(0)).await.unwrap();
        // The limit is the task's, whichever process asks.
        for r in [&a, &b] {
            assert_eq!(
                r.take(&*s, "t", &p, 2, t(0)).await.unwrap_err(),
                Refusal::Rate("requests per minute", 30)
            );
        }
        // A new process (a restart) starts from the store, not full.
        let c = Rates::default();
        assert!(c.take(&*s, "t", &p, 2, t(1_000)).await.is_err());
        assert!(c.take(&*s, "t", &p, 2, t(30_000)).await.is_ok());
        // Another task has its own bucket.
        assert!(a.take(&*s, "other", &p, 2, t(0)).await.is_ok());
        // A request never sent gives its slot back.
        a.take(&*s, "other", &p, 2, t(0)).await.unwrap();
        assert!(a.take(&*s, "other", &p, 2, t(0)).await.is_err());
        a.give_back("other", took(Limits::of(&p), 0), 2, 0, true, t(0));
        assert!(a.take(&*s, "other", &p, 2, t(0)).await.is_ok());
    }

    #[tokio::test]
    async fn token_rate_takes_the_reservation_and_refunds_the_rest() {
        let (_d, s) = store();
        let l = Rates::default();
        let p = Policy {
            tokens_per_minute: Some(100),
            ..Policy::default()
        };
        l.take(&*s, "t", &p, 100, t(0)).await.unwrap();
        assert!(matches!(
            l.take(&*s, "t", &p, 20, t(0)).await,
            Err(Refusal::Rate("tokens per minute", _))
        ));
        l.give_back("t", took(Limits::of(&p), 0), 100, 20, false, t(0));
        assert_eq!(l.held("t"), (0, 80));
        assert!(l.take(&*s, "t", &p, 60, t(0)).await.is_ok());
        assert_eq!(l.held("t"), (0, 20));
    }

    #[tokio::test]
    async fn idle_holdings_go_back_to_the_store_for_other_processes() {
        let (_d, s) = store();
        let (a, b) = (Rates::default(), Rates::default());
        let p = Policy {
            requests_per_minute: Some(1_600),
            ..Policy::default()
        };
        // A full bucket hands a slice to the first process.
        a.take(&*s, "t", &p, 0, t(0)).await.unwrap();
        let (held, _) = a.held("t");
        assert_eq!(held, 199);
        // Not idle yet: nothing goes back.
        assert!(a.due(t(100), false).is_empty());
        let gives = a.due(t(600), false);
        assert_eq!(gives.len(), 1);
        assert_eq!(gives[0].units, 199);
        s.give_rates(gives, t(600)).await.unwrap();
        assert_eq!(a.held("t"), (0, 0));
        // The other process can now use the whole minute's limit, less the
        // one request spent, and no more.
        let mut ok = 0;
        while b.take(&*s, "t", &p, 0, t(600)).await.is_ok() {
            ok += 1;
            assert!(ok <= 1_600, "more than the limit");
        }
        // The bucket is full again (1,400 left + 16 refilled in 600 ms +
        // 199 given back, never above 1,600): a minute's worth, no more.
        assert_eq!(ok, 1_600);
    }

    /// A take the store answers, or a request that ends, after the task's
    /// holding went back to the store (idle for [`IDLE_MS`] meanwhile:
    /// a slow store, a long request): what it gives back is not lost with
    /// the holding, nor spent from a holding made since: it goes to the
    /// store's bucket at the next flush.
    #[tokio::test]
    async fn what_comes_back_after_the_holding_went_to_the_store_is_kept() {
        let (_d, s) = store();
        let l = Rates::default();
        let p = Policy {
            requests_per_minute: Some(5),
            tokens_per_minute: Some(100),
            ..Policy::default()
        };
        let limits = Limits::of(&p);
        let keys = |gives: &[RateGive]| {
            let mut k: Vec<(String, u64)> =
                gives.iter().map(|g| (g.key.clone(), g.units)).collect();
            k.sort();
            k
        };
        // A request that reserves 100 tokens waits on the store; its
        // holding goes idle and back meanwhile.
        let short = l.take_held("t", limits, 100, t(0)).unwrap();
        assert!(l.due(t(600), false).is_empty());
        let answer = s.take_rates(short.asks(), t(0)).await;
        l.taken(&short, answer, t(700)).unwrap();
        // It is never sent: the request and its tokens come back, to the
        // store's bucket.
        l.give_back("t", took(limits, 0), 100, 0, true, t(700));
        assert_eq!(l.held("t"), (0, 0));
        let gives = l.due(t(700), false);
        assert_eq!(
            keys(&gives),
            [("t/rpm".to_owned(), 1), ("t/tpm".to_owned(), 100)]
        );
        s.give_rates(gives, t(700)).await.unwrap();
        // The next request takes 2 s: its holding, emptied by it, goes
        // meanwhile, and its unused tokens come back after...
        assert!(l.take(&*s, "t", &p, 100, t(800)).await.is_ok());
        assert_eq!(l.held("t"), (0, 0));
        let gone = l.due(t(1_400), false);
        assert!(gone.is_empty(), "nothing was held: {gone:?}");
        l.give_back("t", took(limits, 800), 100, 30, false, t(2_800));
        assert_eq!(l.held("t"), (0, 0));
        // ... and go back to the store's bucket at the next flush, where
        // they are capped against what it refilled meanwhile.
        let gives = l.due(t(2_800), false);
        assert_eq!(keys(&gives), [("t/tpm".to_owned(), 70)]);
        s.give_rates(gives, t(2_800)).await.unwrap();
        // One request was sent and used 30 tokens: with the store's bucket
        // refilled 5 tokens in those 3.4 s, 70 more pass and no more.
        let q = Policy {
            tokens_per_minute: Some(100),
            ..Policy::default()
        };
        let other = Rates::default();
        assert!(other.take(&*s, "t", &q, 70, t(3_400)).await.is_ok());
        assert!(other.take(&*s, "t", &q, 10, t(3_400)).await.is_err());
        // The request limit: 5 a minute, 1 spent.
        let r = Policy {
            requests_per_minute: Some(5),
            ..Policy::default()
        };
        for _ in 0..4 {
            assert!(other.take(&*s, "t", &r, 0, t(3_400)).await.is_ok());
        }
        assert!(other.take(&*s, "t", &r, 0, t(3_400)).await.is_err());
    }

    /// What a request that outlasted a minute gives back cannot lift the
    /// task above its limit: the store's bucket refilled meanwhile, and
    /// takes the refund capped.
    #[tokio::test]
    async fn a_late_refund_is_capped_by_the_stores_bucket() {
        let (_d, s) = store();
        let l = Rates::default();
        let p = Policy {
            tokens_per_minute: Some(100),
            ..Policy::default()
        };
        let limits = Limits::of(&p);
        l.take(&*s, "t", &p, 100, t(0)).await.unwrap();
        assert!(l.due(t(600), false).is_empty());
        // 90 of its 100 tokens unused, 70 s later.
        l.give_back("t", took(limits, 0), 100, 10, false, t(70_000));
        s.give_rates(l.due(t(70_000), false), t(70_000))
            .await
            .unwrap();
        let mut got = 0;
        while l.take(&*s, "t", &p, 10, t(70_000)).await.is_ok() {
            got += 10;
            assert!(got <= 100, "more than a minute's limit");
        }
        assert_eq!(got, 100);
    }

    /// A task kept busy keeps no holding longer than [`HOLD_MS`]: tokens a
    /// request gave back to it cannot wait there while the store's bucket
    /// refills, to be spent beside it later. Over any window the task
    /// spends at most its bucket, the refill, and [`HOLD_MS`]' refill.
    #[tokio::test]
    async fn a_busy_tasks_holding_does_not_outlast_the_stores_refill() {
        let (_d, s) = store();
        let l = Rates::default();
        let p = Policy {
            tokens_per_minute: Some(1_000),
            ..Policy::default()
        };
        // A request reserves 800 tokens and is billed none.
        l.take(&*s, "t", &p, 800, t(0)).await.unwrap();
        l.give_back("t", took(Limits::of(&p), 0), 800, 0, false, t(100));
        // The task stays busy for a minute (a request of one token every
        // 200 ms), the flush loop runs every 50 ms.
        let mut now = 100;
        while now < 60_000 {
            now += 50;
            s.give_rates(l.due(t(now), false), t(now)).await.unwrap();
            if now % 200 == 0 {
                l.take(&*s, "t", &p, 1, t(now)).await.unwrap();
            }
        }
        // Then a burst: at most a full bucket passes (the store's refill
        // in the last second is spent by then).
        let mut burst = 0;
        while l.take(&*s, "t", &p, 10, t(now)).await.is_ok() {
            burst += 10;
            assert!(burst <= 2_000, "runaway");
        }
        assert!(
            burst <= 1_000,
            "{burst} tokens in an instant, limit 1,000 a minute"
        );
        assert!(
            burst >= 900,
            "{burst}: the bucket is nearly full after a quiet minute"
        );
    }

    /// A task without limits keeps nothing in the holdings, whatever is
    /// given back; nor does a request that asks nothing of its task's
    /// limits (no tokens, and only a token limit).
    #[test]
    fn a_task_without_limits_is_not_held() {
        let l = Rates::default();
        l.give_back("t", Took::default(), 100, 0, true, t(0));
        let tokens_only = Limits::of(&Policy {
            tokens_per_minute: Some(100),
            ..Policy::default()
        });
        assert!(l.take_held("u", tokens_only, 0, t(0)).is_none());
        l.give_back("u", took(tokens_only, 0), 0, 0, true, t(0));
        assert!(l.due(t(10_000), true).is_empty());
        assert!(l.lock().is_empty());
    }

    #[tokio::test]
    async fn no_limit_asks_nothing_of_the_store() {
        let (_d, s) = store();
        let l = Rates::default();
        for _ in 0..1000 {
            l.take(&*s, "t", &Policy::default(), 10, t(0))
                .await
                .unwrap();
        }
        assert_eq!(l.held("t"), (0, 0));
        assert!(l.due(t(10_000), true).is_empty());
    }
}
