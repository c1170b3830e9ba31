//! The binary's global allocator: mimalloc, with the two options that keep
//! an idle process as small as with glibc's malloc.
//!
//! mimalloc v3's defaults commit an arena's memory eagerly on Linux and
//! return freed pages to the OS a second after they are freed; a fresh
//! `keymint dev` then sat at 84 MB resident instead of 49 MB (design 0029,
//! "Fifth pass"). Both are turned off here, as
//! `MIMALLOC_ARENA_EAGER_COMMIT=0 MIMALLOC_PURGE_DELAY=0` in the environment
//! would. They are defaults, not overrides: an operator's `MIMALLOC_*`
//! variables still win.
//!
//! The eager commit is read when mimalloc reserves its first arena, which
//! happens before `main` (mimalloc's own initialiser runs as an ELF
//! constructor of priority 101; set from `main`, the option came too late
//! and the process stayed at 64 MB). So the defaults are set by a
//! constructor of priority 99, which the linker orders before it. On other
//! platforms mimalloc's own defaults apply.
//!
//! Once start-up is over, [`return_startup_memory`] hands what start-up
//! used and freed back to the system (design 0041).
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
        libmimalloc_sys::mi_option_set_default(PURGE_DELAY, 0);
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
pub fn return_startup_memory() {
    // SAFETY: `mi_collect` only frees or purges memory that no allocation
    // holds, and may be called from any thread at any time.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
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
    /// binary's), run again with `env`, printing its options.
    fn probe(env: &[(&str, &str)]) -> String {
        let exe = std::env::current_exe().unwrap();
        let mut c = std::process::Command::new(exe);
        c.args([
            "--exact",
            "alloc::tests::the_defaults_are_set_before_mimalloc_starts_and_the_environment_wins",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PROBE, "1")
        .env_remove("MIMALLOC_ARENA_EAGER_COMMIT")
        .env_remove("MIMALLOC_PURGE_DELAY");
        c.envs(env.iter().copied());
        let out = c.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let start = text.find("eager=").unwrap_or(0);
        text[start..].split(';').next().unwrap_or("").to_owned()
    }

    #[test]
    #[expect(clippy::disallowed_methods, reason = "the probe's switch")]
    fn the_defaults_are_set_before_mimalloc_starts_and_the_environment_wins() {
        if std::env::var_os(PROBE).is_some() {
            println!("{}", options());
            return;
        }
        // Ours, without the environment.
        assert_eq!(probe(&[]), "eager=0 delay=0");
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
