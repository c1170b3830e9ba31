//! Work too large for a connection's runtime: the screen of a large
//! request body.
//!
//! Each core's connections share one single-threaded runtime, so a task
//! that computes for a second stops every other connection of that core
//! for a second. The screen reads a body at about a gigabyte a second when
//! it holds prose and code, but a body crafted to open a rule's window
//! every few bytes (`SECRET_KEY=SECRET_KEY=…`) costs it about a tenth of a
//! microsecond a byte: up to a second for the largest body a role accepts.
//! Bodies from [`INLINE_BELOW`] up are therefore screened on tokio's
//! blocking threads, at most [`lanes`] at a time, so that a caller sending
//! many at once holds at most those threads and the runtimes keep the rest
//! of the cores (a body waiting for a lane waits without holding a thread).

use std::sync::{Arc, OnceLock};

use tokio::sync::Semaphore;

/// Bodies shorter than this are screened where they are read: tens of
/// microseconds at most (a crafted one: about 3 ms), less than a hand-off
/// to another thread and back costs for the common chat request.
pub(crate) const INLINE_BELOW: usize = 32 * 1024;

/// How many large bodies are screened at once: half the cores, at least
/// one.
pub(crate) fn lanes() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

fn gate() -> &'static Arc<Semaphore> {
    static GATE: OnceLock<Arc<Semaphore>> = OnceLock::new();
    GATE.get_or_init(|| Arc::new(Semaphore::new(lanes())))
}

/// The work could not be run (the runtime is shutting down, or the work
/// panicked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lost;

/// Runs `work` on a blocking thread once a lane is free, and returns its
/// result. The lane is held by the work itself: a caller that stops
/// waiting (its client went away) does not free it before the work ends.
pub(crate) async fn run<T, F>(work: F) -> Result<T, Lost>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let permit = Arc::clone(gate()).acquire_owned().await.map_err(|_| Lost)?;
    tokio::task::spawn_blocking(move || {
        let out = work();
        drop(permit);
        out
    })
    .await
    .map_err(|_| Lost)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// The work runs on another thread than the caller's runtime; no more
    /// than `lanes()` run at once, and every one runs.
    #[tokio::test(flavor = "current_thread")]
    async fn work_runs_off_the_runtime_within_its_lanes() {
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let caller = std::thread::current().id();
        let mut jobs = Vec::new();
        for _ in 0..(lanes() + 3) {
            let (running, most) = (Arc::clone(&running), Arc::clone(&most));
            jobs.push(tokio::spawn(run(move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
                running.fetch_sub(1, Ordering::SeqCst);
                std::thread::current().id()
            })));
        }
        for j in jobs {
            let ran_on = j.await.unwrap().unwrap();
            assert_ne!(ran_on, caller);
        }
        assert!(most.load(Ordering::SeqCst) <= lanes());
        assert!(most.load(Ordering::SeqCst) >= 1);
    }

    /// Work that panics is reported lost, and its lane is free again: as
    /// many more runs as there are lanes, together, all end.
    #[tokio::test(flavor = "current_thread")]
    async fn a_panic_in_the_work_is_lost_and_frees_its_lane() {
        for _ in 0..lanes() {
            let out: Result<(), Lost> = run(|| panic!("boom")).await;
            assert_eq!(out, Err(Lost));
        }
        let all = (0..lanes()).map(|i| tokio::spawn(run(move || i)));
        let ends = tokio::time::timeout(Duration::from_secs(30), async {
            let mut got = Vec::new();
            for j in all {
                got.push(j.await.unwrap());
            }
            got
        })
        .await
        .expect("a lane was kept by work that panicked");
        assert_eq!(ends, (0..lanes()).map(Ok).collect::<Vec<_>>());
    }
}
