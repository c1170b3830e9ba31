//! The binary's global allocator: mimalloc, with two options that keep an
//! idle process as small as with glibc's malloc and a busy one off the
//! kernel's page tables.
//!
//! mimalloc v3's defaults commit an arena's memory eagerly on Linux and
//! return freed pages to the OS a second after they are freed; a fresh
//! `keymint dev` then sat at 84 MB resident instead of 49 MB (design 0029,
//! "Fifth pass"). The eager commit is turned off here. Freed pages go back
//! after [`PURGE_DELAY_MS`]: not at once (a delay of 0 made every request
//! that emptied a page pay an `madvise`, with a TLB shootdown on the other
//! cores, and the next request a page fault to take it back: design 0029,
//! "Eighth pass"), and not a second later, which an idle process does not
//! need. As `MIMALLOC_ARENA_EAGER_COMMIT=0 MIMALLOC_PURGE_DELAY=100` in the
//! environment would; they are defaults, not overrides: an operator's
//! `MIMALLOC_*` variables still win.
//!
//! The eager commit is read when mimalloc reserves its first arena, which
//! happens before `main` (mimalloc's own initialiser runs as an ELF
//! constructor of priority 101; set from `main`, the option came too late
//! and the process stayed at 64 MB). So the defaults are set by a
//! constructor of priority 99, which the linker orders before it. On other
//! platforms mimalloc's own defaults apply.
//!
//! Once start-up is over, [`keep_memory_returned`] hands what start-up
//! used and freed back to the system (design 0041), and then, once a
//! second, what has lain free for the delay: mimalloc itself only does so
//! when it next takes a page, so a process that falls idle after a burst
//! of load would otherwise keep the burst's pages.
//!
//! This module's `unsafe` (the binary has one other use, `run.rs`'s
//! `pre_exec`): the constructor's entry and calls into the C libraries.
#![expect(
    unsafe_code,
    reason = "mimalloc's options are set by a constructor, in C"
)]

use mimalloc::MiMalloc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// `mi_option_arena_eager_commit` in mimalloc v3's `mimalloc.h` (the Rust
/// bindings do not name it; the enum's order is the ABI, and the test
/// below checks it by the option's environment name).
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
/// `mi_option_purge_delay`, in milliseconds.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// How long a freed page stays committed for the next allocation before
/// mimalloc hands it back: longer than the gaps between requests under
/// load, short enough that, with the task of [`keep_memory_returned`],
/// what a burst freed goes back within about a second.
const PURGE_DELAY_MS: std::ffi::c_long = 100;
/// How often the task of [`keep_memory_returned`] asks mimalloc to hand
/// back what has expired.
const PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs before mimalloc's initialiser (`.init_array.00101`), and so before
/// any allocation and any thread.
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array.00099")]
static SET_DEFAULTS: extern "C" fn() = set_defaults;

extern "C" fn set_defaults() {
    // SAFETY: `mi_option_set_default` writes one entry of mimalloc's option
    // table (it ignores an index out of bounds), and only if the
    // environment has not set it; it is not thread safe, and this runs in
    // the process's initialisers, before any thread exists.
    unsafe {
        libmimalloc_sys::mi_option_set_default(ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set_default(PURGE_DELAY, PURGE_DELAY_MS);
    }
}

/// What a server calls once start-up is over: hands back what start-up
/// used and freed, then starts a task on the current runtime that hands
/// back, every [`PURGE_EVERY`], the pages free for longer than the delay.
pub fn keep_memory_returned() {
    return_startup_memory();
    tokio::spawn(async {
        let mut tick = tokio::time::interval(PURGE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            collect(false);
        }
    });
}

/// `mi_collect`: with `force`, purges every free page of mimalloc's;
/// without, only those free for longer than the purge delay (a page freed
/// a moment ago stays for the next allocation). Also collects the calling
/// thread's own heap.
fn collect(force: bool) {
    // SAFETY: `mi_collect` only frees or purges memory that no allocation
    // holds, and may be called from any thread at any time.
    unsafe {
        libmimalloc_sys::mi_collect(force);
    }
}

/// Hands the heap that start-up used and freed back to the system.
///
/// Start-up compiles every scanner and screen rule (the proxy's outbound
/// screen), parses the Cedar schema and policies, and opens the store: a
/// peak of transient allocations, Rust's in mimalloc and SQLite's in
/// glibc's malloc, which both allocators would keep after they are freed.
/// `mi_collect(true)` purges mimalloc's free pages; `malloc_trim(0)` gives
/// glibc's free pages back (inside its arenas, not only their tops). Runs
/// once, before the first request; takes nothing that is in use.
fn return_startup_memory() {
    collect(true);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` takes no pointer and only gives unused pages
    // of glibc's own arenas back to the kernel; any thread may call it at
    // any time (glibc locks each arena while it trims).
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROBE: &str = "KEYMINT_TEST_ALLOC_PROBE";

    /// The options as this process sees them.
    fn options() -> String {
        // SAFETY: reads two entries of mimalloc's option table, in bounds.
        let (eager, delay) = unsafe {
            (
                libmimalloc_sys::mi_option_get(ARENA_EAGER_COMMIT),
                libmimalloc_sys::mi_option_get(PURGE_DELAY),
            )
        };
        format!("eager={eager} delay={delay};")
    }

    /// This test binary (whose allocator and constructor are the
    /// binary's) run again on the one test `test`, alone on one thread,
    /// without the operator's `MIMALLOC_*` variables and with `env`: what
    /// it printed from `marker` to the next `;` (all it printed if the
    /// marker is missing, for the assertion's message).
    fn rerun(test: &str, env: &[(&str, &str)], marker: &str) -> String {
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env_remove("MIMALLOC_ARENA_EAGER_COMMIT")
            .env_remove("MIMALLOC_PURGE_DELAY")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        match text.find(marker) {
            Some(start) => text[start..].split(';').next().unwrap_or("").to_owned(),
            None => text,
        }
    }

    /// The options of the binary run again with `env`.
    fn probe(env: &[(&str, &str)]) -> String {
        let env: Vec<_> = [(PROBE, "1")]
            .into_iter()
            .chain(env.iter().copied())
            .collect();
        rerun(
            "alloc::tests::the_defaults_are_set_before_mimalloc_starts_and_the_environment_wins",
            &env,
            "eager=",
        )
    }

    /// This process's anonymous resident memory, in KiB.
    fn rss_anon_kib() -> u64 {
        crate::bench::status_kib("self", "RssAnon:").unwrap()
    }

    const PURGE_PROBE: &str = "KEYMINT_TEST_PURGE_PROBE";

    /// In a process of its own (one thread, nothing else allocating):
    /// 64 MiB of small blocks, written and freed, stay resident for the
    /// next allocations, and are handed back once the delay has passed and
    /// the purger has run.
    #[test]
    #[expect(clippy::disallowed_methods, reason = "the probe's switch")]
    fn freed_memory_stays_for_reuse_and_goes_back_after_the_delay() {
        if std::env::var_os(PURGE_PROBE).is_some() {
            let base = rss_anon_kib();
            let blocks: Vec<Vec<u8>> = (0..2048).map(|i| vec![i as u8; 32 * 1024]).collect();
            let full = rss_anon_kib();
            drop(blocks);
            let freed = rss_anon_kib();
            std::thread::sleep(std::time::Duration::from_millis(3 * PURGE_DELAY_MS as u64));
            collect(false);
            let purged = rss_anon_kib();
            println!("base={base} full={full} freed={freed} purged={purged};");
            return;
        }
        let text = rerun(
            "alloc::tests::freed_memory_stays_for_reuse_and_goes_back_after_the_delay",
            &[(PURGE_PROBE, "1")],
            "base=",
        );
        assert!(text.starts_with("base="), "{text}");
        let figures: std::collections::HashMap<&str, u64> = text
            .split(' ')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k, v.parse().unwrap())
            })
            .collect();
        let (base, full, freed, purged) = (
            figures["base"],
            figures["full"],
            figures["freed"],
            figures["purged"],
        );
        let held = 64 * 1024;
        assert!(full >= base + held * 9 / 10, "{text}");
        // Freed, the pages are kept for reuse: no madvise per free.
        assert!(freed >= base + held * 9 / 10, "{text}");
        // Past the delay, the purger hands (nearly) all of them back.
        assert!(purged < base + held / 8, "{text}");
    }

    #[test]
    #[expect(clippy::disallowed_methods, reason = "the probe's switch")]
    fn the_defaults_are_set_before_mimalloc_starts_and_the_environment_wins() {
        if std::env::var_os(PROBE).is_some() {
            println!("{}", options());
            return;
        }
        // Ours, without the environment.
        assert_eq!(probe(&[]), "eager=0 delay=100");
        // The environment names the options: if the indices above were not
        // those of these names, other values would show.
        assert_eq!(
            probe(&[
                ("MIMALLOC_ARENA_EAGER_COMMIT", "2"),
                ("MIMALLOC_PURGE_DELAY", "250"),
            ]),
            "eager=2 delay=250"
        );
        assert_eq!(probe(&[("MIMALLOC_PURGE_DELAY", "7")]), "eager=0 delay=7");
    }
}
