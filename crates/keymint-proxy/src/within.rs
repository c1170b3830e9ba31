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

/// `work`, given at most `limit` from the moment it first has to wait.
pub(crate) const fn within<F: Future + Unpin>(limit: Duration, work: F) -> Within<F> {
    Within {
        work,
        limit,
        clock: None,
    }
}

/// The future [`within`] returns.
pub(crate) struct Within<F> {
    work: F,
    limit: Duration,
    /// Started at the first wait. Polled unconstrained: when the work has
    /// used up the task's cooperative budget, the limit is still seen
    /// (as `tokio::time::timeout` does).
    clock: Option<Pin<Box<Unconstrained<Sleep>>>>,
}

impl<F: Future + Unpin> Future for Within<F> {
    type Output = Result<F::Output, TimedOut>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Poll::Ready(v) = Pin::new(&mut this.work).poll(cx) {
            return Poll::Ready(Ok(v));
        }
        let limit = this.limit;
        let clock = this
            .clock
            .get_or_insert_with(|| Box::pin(unconstrained(tokio::time::sleep(limit))));
        match clock.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(TimedOut)),
            Poll::Pending => Poll::Pending,
        }
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
        assert!(w.clock.is_none(), "work that did not wait started a timer");
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
