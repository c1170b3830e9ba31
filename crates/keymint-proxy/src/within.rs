//! A time limit that costs nothing when the work does not wait.
//!
//! `tokio::time::timeout` reads the clock and looks up the runtime's timer
//! (a thread-local and a reference count) when it is made, before the work
//! is first polled. Most proxied bodies are whole by the time they are
//! collected: the request's is in hyper's read buffer, the response's came
//! with its head. [`within`] polls the work first and makes its timer only
//! when the work has to wait, so such a body costs neither (design 0029,
//! "Tenth pass").
//!
//! The limit runs from that first wait, not from the first poll: the
//! difference is the first poll's own work, which does not wait (copying a
//! body already in memory).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::task::coop::{Unconstrained, unconstrained};
use tokio::time::Sleep;

/// The work did not end within its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimedOut;

/// A limit that starts when the work it bounds first has to wait. The
/// work's own poll calls [`Clock::poll_expired`] only when the work is
/// pending: the first call starts the clock, and it is ready once `limit`
/// has passed since then. [`within`] bounds a future with it; a request
/// body to the API is bounded with it too (keymint-server's `Paced`).
pub struct Clock {
    limit: Duration,
    /// Started at the first wait. Polled unconstrained: when the work has
    /// used up the task's cooperative budget, the limit is still seen
    /// (as `tokio::time::timeout` does).
    sleep: Option<Pin<Box<Unconstrained<Sleep>>>>,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clock")
            .field("limit", &self.limit)
            .field("started", &self.started())
            .finish()
    }
}

impl Clock {
    /// A clock for `limit`, not started.
    pub const fn new(limit: Duration) -> Self {
        Self { limit, sleep: None }
    }

    /// Whether `limit` has passed since the first call (which starts the
    /// clock); registers `cx` to be woken when it does.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let limit = self.limit;
        self.sleep
            .get_or_insert_with(|| Box::pin(unconstrained(tokio::time::sleep(limit))))
            .as_mut()
            .poll(cx)
    }

    const fn started(&self) -> bool {
        self.sleep.is_some()
    }
}

/// `work`, given at most `limit` from the moment it first has to wait.
pub(crate) const fn within<F: Future + Unpin>(limit: Duration, work: F) -> Within<F> {
    Within {
        work,
        clock: Clock::new(limit),
    }
}

/// The future [`within`] returns.
pub(crate) struct Within<F> {
    work: F,
    clock: Clock,
}

impl<F: Future + Unpin> Future for Within<F> {
    type Output = Result<F::Output, TimedOut>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Poll::Ready(v) = Pin::new(&mut this.work).poll(cx) {
            return Poll::Ready(Ok(v));
        }
        this.clock.poll_expired(cx).map(|()| Err(TimedOut))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::sync::oneshot;

    use super::{TimedOut, within};

    #[tokio::test]
    async fn ready_work_is_answered_without_a_clock() {
        let mut w = within(Duration::from_millis(10), std::future::ready(7));
        assert_eq!((&mut w).await, Ok(7));
        assert!(!w.clock.started(), "work that did not wait started a timer");
    }

    #[tokio::test]
    async fn work_that_waits_past_the_limit_times_out() {
        let (_tx, rx) = oneshot::channel::<u8>();
        let started = Instant::now();
        assert_eq!(within(Duration::from_millis(200), rx).await, Err(TimedOut));
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn work_that_ends_within_the_limit_is_answered() {
        let (tx, rx) = oneshot::channel::<u8>();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(5);
        });
        assert_eq!(within(Duration::from_secs(10), rx).await, Ok(Ok(5)));
    }

    #[tokio::test]
    async fn work_that_keeps_making_progress_still_ends_at_the_limit() {
        // A body that trickles forever: a little every 10 ms, never done.
        let trickle = Box::pin(async {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                tokio::task::yield_now().await;
            }
        });
        let started = Instant::now();
        let r: Result<(), TimedOut> = within(Duration::from_millis(300), trickle).await;
        assert_eq!(r, Err(TimedOut));
        assert!(started.elapsed() >= Duration::from_millis(300));
    }
}
