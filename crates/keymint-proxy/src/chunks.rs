//! Budget served from memory: chunks (docs/design/0030-chunked-budgets.md).
//!
//! A chunk is one durable reservation in the store that holds budget for
//! several requests of one lease to one upstream, on the task and every
//! ancestor (`Store::reserve_budget` with [`crate::budget::fit_chunk`]).
//! Requests draw their share from it here, without waiting on the store;
//! what they used is settled in batches (`Store::settle_chunks`) by the
//! periodic flush ([`FLUSH_EVERY`]), which also gives back the unused part
//! of chunks that are idle, old or no longer drawn from. A crash leaves
//! the chunk open in the store with everything it still holds, and the
//! sweep charges that in full, to the chunk's lease: never less than was
//! forwarded.
//!
//! Only this module's [`Chunks`] knows what is drawn: one lock, held for a
//! few comparisons per request.

use std::sync::Mutex;
use std::time::Duration;

use foldhash::HashMap;
use keymint_core::Timestamp;
use keymint_store::{ChunkSettle, Usage};
use tokio::sync::watch;

use crate::budget::{CHUNK_START, MAX_CHUNK};

/// How often finished requests are settled and idle chunks given back.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// A chunk not drawn from for this long gives back what it holds.
pub const IDLE_MS: i64 = 500;
/// A chunk is drawn from for at most this long, then retired (far below
/// the sweep's deadline for an open reservation).
pub const MAX_AGE_MS: i64 = 30_000;
/// A chunk half drawn within this long after it came lasts under about
/// 100 ms at the lease's pace: the next one may hold twice as many requests
/// (up to [`MAX_CHUNK`]).
pub const GROW_WITHIN_MS: i64 = 50;
/// A chunk half drawn only after this long: the next one holds half as
/// many (not fewer than [`CHUNK_START`]).
pub const SHRINK_AFTER_MS: i64 = 1_000;

#[derive(Debug)]
struct Chunk {
    id: String,
    /// Not yet drawn.
    free: Usage,
    /// Requests drawn and not finished.
    in_flight: u64,
    /// Finished since the last settle: their shares, their use, and how
    /// many had no usage reported.
    held: Usage,
    used: Usage,
    unmetered: u64,
    created: Timestamp,
    last_draw: Timestamp,
    /// No more draws: what is free goes back at the next flush.
    retired: bool,
    /// A settle that closes it is under way.
    closing: bool,
}

#[derive(Debug)]
struct Pool {
    upstream: String,
    chunks: Vec<Chunk>,
    /// A chunk is being reserved for this pool; resolves (`true`) when it
    /// is in.
    reserving: Option<watch::Receiver<bool>>,
    /// The last chunk granted held one request only: the budget is near
    /// its end, and requests go to the store one by one.
    exact: bool,
    /// Requests the last chunk held (0: none yet).
    last_size: u64,
    /// Requests the next chunk is asked to hold, by the pace of the last
    /// ones (design 0030, "Chunks sized by demand").
    most: u64,
}

/// The lease's next chunk is to be reserved by the one who got this: it
/// ends the pool's reservation under way with `done`, asking the store for
/// at most `most` requests.
#[derive(Debug)]
pub(crate) struct Refill {
    pub(crate) done: watch::Sender<bool>,
    pub(crate) most: u64,
}

/// Chunk `id` of `lease`'s pool for `upstream`.
fn drawn_from<'a>(
    pools: &'a mut HashMap<String, Vec<Pool>>,
    lease: &str,
    upstream: &str,
    id: &str,
) -> Option<&'a mut Chunk> {
    pools
        .get_mut(lease)
        .and_then(|l| l.iter_mut().find(|p| p.upstream == upstream))
        .and_then(|p| p.chunks.iter_mut().find(|c| c.id == id))
}

impl Pool {
    /// Marks the pool's next chunk as under way.
    fn refill(&mut self) -> Refill {
        let (done, rx) = watch::channel(false);
        self.reserving = Some(rx);
        Refill {
            done,
            most: self.most,
        }
    }

    /// Sizes the next chunk by how fast the newest one went: half of it
    /// drawn within [`GROW_WITHIN_MS`] (and it held all it was asked for),
    /// twice as large; only after [`SHRINK_AFTER_MS`], half as large.
    fn pace(&mut self, now: Timestamp) {
        // Chunks are pushed as they come and removed in place: the last is
        // the newest.
        let Some(newest) = self.chunks.last() else {
            return;
        };
        let took = newest.created.until(now);
        if took < GROW_WITHIN_MS && self.last_size >= self.most {
            self.most = self.most.saturating_mul(2).min(MAX_CHUNK);
        } else if took >= SHRINK_AFTER_MS {
            self.most = (self.most / 2).max(CHUNK_START);
        }
    }
}

/// What [`Chunks::draw`] found.
pub(crate) enum Draw {
    /// A share drawn from chunk `id`; `refill`: the pool runs low and the
    /// caller should reserve the next chunk in the background (it is
    /// marked as under way).
    Drawn { id: String, refill: Option<Refill> },
    /// A chunk is being reserved: wait for it, then draw again.
    Wait(watch::Receiver<bool>),
    /// Nothing to draw: reserve in the store. With a sender, this caller
    /// reserves the pool's next chunk (and must [`Chunks::add`] it or
    /// [`Chunks::reserved_none`]).
    Reserve(Option<Refill>),
}

/// One settle of the flush, kept until the store has it.
#[derive(Debug)]
pub(crate) struct Part {
    lease: String,
    upstream: String,
    settle: ChunkSettle,
}

impl Part {
    pub(crate) fn settle(&self) -> ChunkSettle {
        self.settle.clone()
    }
}

/// The pool of `upstream` in a lease's list, made if there is none.
fn pool_of<'a>(list: &'a mut Vec<Pool>, upstream: &str) -> &'a mut Pool {
    let i = match list.iter().position(|p| p.upstream == upstream) {
        Some(i) => i,
        None => {
            list.push(Pool {
                upstream: upstream.to_owned(),
                chunks: Vec::new(),
                reserving: None,
                exact: false,
                last_size: 0,
                most: CHUNK_START,
            });
            list.len() - 1
        }
    };
    &mut list[i]
}

/// The chunks of this process, by lease.
#[derive(Debug, Default)]
pub(crate) struct Chunks {
    pools: Mutex<HashMap<String, Vec<Pool>>>,
}

impl Chunks {
    fn locked(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Pool>>> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Draws `share` for a request of `lease` to `upstream`.
    pub(crate) fn draw(&self, lease: &str, upstream: &str, share: Usage, now: Timestamp) -> Draw {
        let mut pools = self.locked();
        // The lease's name is copied only for its first pool.
        if !pools.contains_key(lease) {
            pools.insert(lease.to_owned(), Vec::new());
        }
        let Some(list) = pools.get_mut(lease) else {
            return Draw::Reserve(None);
        };
        let pool = pool_of(list, upstream);
        // A reservation whose reserver is gone (dropped) is not waited for.
        if pool
            .reserving
            .as_ref()
            .is_some_and(|rx| rx.has_changed().is_err())
        {
            pool.reserving = None;
        }
        // The oldest chunk with room first: newer ones wait their turn.
        let drawn = pool
            .chunks
            .iter_mut()
            .find(|c| !c.retired && c.free.holds(share));
        if let Some(c) = drawn {
            c.free = c.free.minus(share);
            c.in_flight += 1;
            c.last_draw = now;
            let id = c.id.clone();
            let free: u64 = pool
                .chunks
                .iter()
                .filter(|c| !c.retired)
                .map(|c| c.free.requests)
                .sum();
            // Low water: half a chunk left. The next one is reserved ahead
            // of need, unless the budget is near its end.
            let refill = (pool.reserving.is_none() && !pool.exact && free < pool.last_size / 2)
                .then(|| {
                    pool.pace(now);
                    pool.refill()
                });
            return Draw::Drawn { id, refill };
        }
        match &pool.reserving {
            Some(rx) => Draw::Wait(rx.clone()),
            None if pool.exact => Draw::Reserve(None),
            None => Draw::Reserve(Some(pool.refill())),
        }
    }

    /// Adds a granted chunk (`amount`, of which `drawn` is already taken by
    /// the request that reserved it, if any) and ends the pool's
    /// reservation under way.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add(
        &self,
        lease: &str,
        upstream: &str,
        id: String,
        amount: Usage,
        drawn: Option<Usage>,
        now: Timestamp,
        done: Option<watch::Sender<bool>>,
    ) {
        let mut pools = self.locked();
        let list = pools.entry(lease.to_owned()).or_default();
        let pool = pool_of(list, upstream);
        pool.chunks.push(Chunk {
            id,
            free: amount.minus(drawn.unwrap_or_default()),
            in_flight: u64::from(drawn.is_some()),
            held: Usage::default(),
            used: Usage::default(),
            unmetered: 0,
            created: now,
            last_draw: now,
            retired: false,
            closing: false,
        });
        pool.exact = false;
        pool.last_size = amount.requests;
        if done.is_some() {
            pool.reserving = None;
        }
        drop(pools);
        if let Some(tx) = done {
            let _ = tx.send(true);
        }
    }

    /// Ends the pool's reservation under way without a chunk: the store
    /// granted one request only (`exact`: the budget is near its end) or
    /// refused.
    pub(crate) fn reserved_none(
        &self,
        lease: &str,
        upstream: &str,
        exact: bool,
        done: watch::Sender<bool>,
    ) {
        let mut pools = self.locked();
        if let Some(pool) = pools
            .get_mut(lease)
            .and_then(|l| l.iter_mut().find(|p| p.upstream == upstream))
        {
            pool.reserving = None;
            pool.exact = exact;
        }
        drop(pools);
        let _ = done.send(true);
    }

    /// A request drawn from chunk `id` finished: its `share` was held,
    /// `used` (its whole share if `unmetered`) was used.
    pub(crate) fn finish(
        &self,
        lease: &str,
        upstream: &str,
        id: &str,
        share: Usage,
        used: Usage,
        unmetered: bool,
    ) {
        let mut pools = self.locked();
        // INVARIANT: a chunk with requests in flight is never closed, so
        // it is found; if it were not, its reservation stays in the store
        // and is charged in full.
        if let Some(c) = drawn_from(&mut pools, lease, upstream, id) {
            c.in_flight = c.in_flight.saturating_sub(1);
            c.held = c.held.plus(share);
            c.used = c.used.plus(used);
            c.unmetered += u64::from(unmetered);
        }
    }

    /// A request drawn from chunk `id` was never sent: its `share` is free
    /// again, for the lease's next requests (or given back with the rest
    /// of what the chunk holds free when it retires).
    pub(crate) fn undraw(&self, lease: &str, upstream: &str, id: &str, share: Usage) {
        let mut pools = self.locked();
        if let Some(c) = drawn_from(&mut pools, lease, upstream, id) {
            c.in_flight = c.in_flight.saturating_sub(1);
            c.free = c.free.plus(share);
        }
    }

    /// The settles due now: every chunk's finished requests; what idle,
    /// old or retired chunks hold unused is given back (`all`: every
    /// chunk's, at shutdown), and those with nothing in flight are closed.
    /// The parts are taken out of the chunks: [`Chunks::settled`] with the
    /// store's answer.
    pub(crate) fn due(&self, now: Timestamp, all: bool) -> Vec<Part> {
        let mut pools = self.locked();
        let mut parts = Vec::new();
        for (lease, list) in pools.iter_mut() {
            for pool in list.iter_mut() {
                for c in pool.chunks.iter_mut().filter(|c| !c.closing) {
                    if all
                        || c.free.requests == 0
                        || c.created.until(now) >= MAX_AGE_MS
                        || c.last_draw.until(now) >= IDLE_MS
                    {
                        c.retired = true;
                    }
                    let release = if c.retired { c.free } else { Usage::default() };
                    let close = c.retired && c.in_flight == 0;
                    if c.held.is_zero() && c.used.is_zero() && release.is_zero() && !close {
                        continue;
                    }
                    parts.push(Part {
                        lease: lease.clone(),
                        upstream: pool.upstream.clone(),
                        settle: ChunkSettle {
                            id: c.id.clone(),
                            held: c.held,
                            used: c.used,
                            unmetered: c.unmetered,
                            release,
                            close,
                            now,
                        },
                    });
                    c.free = c.free.minus(release);
                    c.held = Usage::default();
                    c.used = Usage::default();
                    c.unmetered = 0;
                    c.closing = close;
                }
            }
        }
        pools.retain(|_, list| {
            list.retain(|p| !p.chunks.is_empty() || p.reserving.is_some());
            !list.is_empty()
        });
        parts
    }

    /// After the store answered `parts`: on success closed chunks go (and
    /// pools left empty); on failure the parts go back into their chunks,
    /// to be settled at the next flush (the store still holds them all).
    pub(crate) fn settled(&self, parts: Vec<Part>, ok: bool) {
        let mut pools = self.locked();
        for p in parts {
            let Some(list) = pools.get_mut(&p.lease) else {
                continue;
            };
            let Some(pool) = list.iter_mut().find(|x| x.upstream == p.upstream) else {
                continue;
            };
            let Some(i) = pool.chunks.iter().position(|c| c.id == p.settle.id) else {
                continue;
            };
            if ok {
                if p.settle.close {
                    pool.chunks.remove(i);
                }
                continue;
            }
            let c = &mut pool.chunks[i];
            c.held = c.held.plus(p.settle.held);
            c.used = c.used.plus(p.settle.used);
            c.unmetered += p.settle.unmetered;
            c.free = c.free.plus(p.settle.release);
            c.closing = false;
        }
        pools.retain(|_, list| {
            list.retain(|p| !p.chunks.is_empty() || p.reserving.is_some());
            !list.is_empty()
        });
    }

    /// Requests held by chunks of this process not yet drawn (for tests and
    /// metrics).
    pub(crate) fn free_requests(&self) -> u64 {
        self.locked()
            .values()
            .flatten()
            .flat_map(|p| p.chunks.iter())
            .filter(|c| !c.retired)
            .map(|c| c.free.requests)
            .sum()
    }

    /// Chunks of this process that are open (granted and not closed).
    pub(crate) fn open(&self) -> usize {
        self.locked()
            .values()
            .flatten()
            .map(|p| p.chunks.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> Timestamp {
        Timestamp::from_millis(1_700_000_000_000 + ms)
    }

    fn reqs(n: u64) -> Usage {
        Usage {
            requests: n,
            output: 10 * n,
            ..Usage::default()
        }
    }

    #[test]
    fn draws_come_from_memory_and_settle_in_one_part() {
        let c = Chunks::default();
        // The first request reserves; a second meanwhile waits for it.
        let Draw::Reserve(Some(Refill { done: tx, .. })) = c.draw("l", "u", reqs(1), t(0)) else {
            panic!("the first reserves");
        };
        assert!(matches!(c.draw("l", "u", reqs(1), t(0)), Draw::Wait(_)));
        c.add(
            "l",
            "u",
            "rsv_1".into(),
            reqs(8),
            Some(reqs(1)),
            t(0),
            Some(tx),
        );
        // 7 left: three draws without a refill, the fourth at low water (3
        // < 4) asks for one, once.
        let mut refills = Vec::new();
        for i in 0..4 {
            let Draw::Drawn { id, refill } = c.draw("l", "u", reqs(1), t(1)) else {
                panic!("drawn");
            };
            assert_eq!(id, "rsv_1");
            assert_eq!(refill.is_some(), i == 3, "{i}");
            refills.extend(refill);
        }
        assert!(matches!(
            c.draw("l", "u", reqs(1), t(1)),
            Draw::Drawn { refill: None, .. }
        ));
        assert_eq!(c.free_requests(), 2);
        // A share larger than what is free is not drawn: the refill under
        // way is waited for; once its reserver is gone, not any more.
        assert!(matches!(c.draw("l", "u", reqs(3), t(1)), Draw::Wait(_)));
        drop(refills);
        assert!(matches!(
            c.draw("l", "u", reqs(3), t(1)),
            Draw::Reserve(Some(_))
        ));
        for _ in 0..3 {
            c.finish("l", "u", "rsv_1", reqs(1), reqs(1), false);
        }
        c.finish("l", "u", "rsv_1", reqs(1), Usage::default(), true);
        let parts = c.due(t(2), false);
        assert_eq!(parts.len(), 1);
        let s = parts[0].settle();
        assert_eq!((s.held, s.used, s.unmetered), (reqs(4), reqs(3), 1));
        assert!(!s.close && s.release.is_zero());
        c.settled(parts, true);
        assert!(c.due(t(3), false).is_empty());
    }

    #[test]
    fn an_idle_chunk_gives_back_its_rest_and_closes_when_nothing_is_in_flight() {
        let c = Chunks::default();
        let Draw::Reserve(Some(Refill { done: tx, .. })) = c.draw("l", "u", reqs(1), t(0)) else {
            panic!();
        };
        c.add(
            "l",
            "u",
            "rsv_1".into(),
            reqs(8),
            Some(reqs(1)),
            t(0),
            Some(tx),
        );
        // Idle, but a request is in flight: the free part goes back, the
        // chunk stays open for it.
        let parts = c.due(t(IDLE_MS), false);
        let s = parts[0].settle();
        assert_eq!((s.release, s.close), (reqs(7), false));
        // A failed settle puts it back; the next flush sends it again.
        c.settled(parts, false);
        let parts = c.due(t(IDLE_MS + 50), false);
        assert_eq!(parts[0].settle().release, reqs(7));
        c.settled(parts, true);
        assert_eq!(c.free_requests(), 0);
        // Retired: the next request reserves anew.
        assert!(matches!(
            c.draw("l", "u", reqs(1), t(IDLE_MS + 60)),
            Draw::Reserve(Some(_))
        ));
        c.finish("l", "u", "rsv_1", reqs(1), reqs(1), false);
        let parts = c.due(t(IDLE_MS + 100), false);
        let s = parts[0].settle();
        assert_eq!((s.held, s.close), (reqs(1), true));
        c.settled(parts, true);
        assert_eq!(c.open(), 0);
    }

    /// Draws until the pool asks for its next chunk; that reservation.
    fn drain_to_refill(c: &Chunks, at: Timestamp) -> Refill {
        loop {
            match c.draw("l", "u", reqs(1), at) {
                Draw::Drawn {
                    refill: Some(r), ..
                } => return r,
                Draw::Drawn { refill: None, .. } => {}
                _ => panic!("the chunk ran out before low water"),
            }
        }
    }

    /// The draw that reserves the lease's next chunk when it has none.
    fn reserving_draw(c: &Chunks, at: Timestamp) -> Refill {
        let Draw::Reserve(Some(r)) = c.draw("l", "u", reqs(1), at) else {
            panic!("nothing to draw from: this draw reserves");
        };
        r
    }

    /// The store grants `r` a chunk of `size` at `at` (`drawn`: the
    /// reserving request takes its share of it).
    fn grant(c: &Chunks, id: &str, size: u64, at: Timestamp, r: Refill, drawn: bool) {
        let share = drawn.then(|| reqs(1));
        c.add("l", "u", id.into(), reqs(size), share, at, Some(r.done));
    }

    #[test]
    fn a_lease_whose_chunks_go_fast_is_given_larger_ones() {
        let c = Chunks::default();
        let first = reserving_draw(&c, t(0));
        assert_eq!(first.most, CHUNK_START, "a new lease starts small");
        grant(&c, "rsv_1", CHUNK_START, t(0), first, true);
        // Half of it drawn within 50 ms: the next may be twice as large.
        let r = drain_to_refill(&c, t(GROW_WITHIN_MS - 1));
        assert_eq!(r.most, 2 * CHUNK_START);
        // Granted less than asked (the budget's eighth): no growth.
        grant(&c, "rsv_2", 100, t(40), r, false);
        assert_eq!(drain_to_refill(&c, t(41)).most, 2 * CHUNK_START);
        // Never above the largest chunk.
        let c = Chunks::default();
        let mut r = reserving_draw(&c, t(0));
        let mut at = 0;
        for i in 0..8 {
            let most = r.most;
            grant(&c, &format!("rsv_{i}"), most, t(at), r, true);
            let next = drain_to_refill(&c, t(at + 1)).most;
            assert_eq!(next, (most * 2).min(MAX_CHUNK), "chunk {i}");
            // Retire what is left: the next draw reserves anew.
            at += 10;
            let parts = c.due(t(at + MAX_AGE_MS), false);
            c.settled(parts, true);
            r = reserving_draw(&c, t(at));
        }
        assert_eq!(r.most, MAX_CHUNK);
    }

    #[test]
    fn a_lease_whose_chunks_go_slowly_is_given_smaller_ones_down_to_the_start() {
        let c = Chunks::default();
        grant(
            &c,
            "rsv_1",
            CHUNK_START,
            t(0),
            reserving_draw(&c, t(0)),
            true,
        );
        let r = drain_to_refill(&c, t(1));
        assert_eq!(r.most, 2 * CHUNK_START, "fast once: twice as large");
        grant(&c, "rsv_2", 2 * CHUNK_START, t(2), r, false);
        // Half of it drawn only after a second: back to the start, and no
        // lower however slow.
        let r = drain_to_refill(&c, t(2 + SHRINK_AFTER_MS));
        assert_eq!(r.most, CHUNK_START);
        grant(&c, "rsv_3", CHUNK_START, t(3_000), r, false);
        let r = drain_to_refill(&c, t(3_000 + 10 * SHRINK_AFTER_MS));
        assert_eq!(r.most, CHUNK_START);
    }

    #[test]
    fn near_the_end_requests_go_to_the_store_one_by_one() {
        let c = Chunks::default();
        let Draw::Reserve(Some(Refill { done: tx, .. })) = c.draw("l", "u", reqs(1), t(0)) else {
            panic!();
        };
        c.reserved_none("l", "u", true, tx);
        // No waiting on each other: each reserves its own.
        assert!(matches!(
            c.draw("l", "u", reqs(1), t(0)),
            Draw::Reserve(None)
        ));
        assert!(matches!(
            c.draw("l", "u", reqs(1), t(0)),
            Draw::Reserve(None)
        ));
    }

    #[test]
    fn shutdown_gives_back_everything_not_in_flight() {
        let c = Chunks::default();
        let Draw::Reserve(Some(Refill { done: tx, .. })) = c.draw("l", "u", reqs(1), t(0)) else {
            panic!();
        };
        c.add("l", "u", "rsv_1".into(), reqs(8), None, t(0), Some(tx));
        let parts = c.due(t(1), true);
        let s = parts[0].settle();
        assert_eq!((s.release, s.close), (reqs(8), true));
    }
}
