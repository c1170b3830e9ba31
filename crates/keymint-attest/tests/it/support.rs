//! Test helpers: two distinct executables that connect to a socket.
//!
//! The peer tests need processes whose executables differ. A C helper is
//! compiled with `gcc` once per test run; a second copy with bytes
//! appended (still a valid ELF, different SHA-256) is the "other binary"
//! under the same uid.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

const HELPER_C: &str = r#"
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
/* helper SOCKET [exit]: connect; then wait until the peer closes, or exit at once. */
int main(int argc, char **argv) {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) return 2;
    if (argc > 2) return 0;
    char c;
    if (write(fd, "x", 1) != 1) return 3;
    (void)read(fd, &c, 1);
    return 0;
}
"#;

pub struct Helpers {
    _dir: tempfile::TempDir,
    pub a: PathBuf,
    pub b: PathBuf,
}

pub fn helpers() -> &'static Helpers {
    static H: OnceLock<Helpers> = OnceLock::new();
    H.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("helper.c");
        std::fs::write(&src, HELPER_C).unwrap();
        let a = dir.path().join("helper-a");
        let status = Command::new("gcc")
            .arg("-O1")
            .arg("-o")
            .arg(&a)
            .arg(&src)
            .status()
            .expect("gcc is needed for the peer tests");
        assert!(status.success());
        let b = dir.path().join("helper-b");
        std::fs::copy(&a, &b).unwrap();
        let mut f = std::fs::OpenOptions::new().append(true).open(&b).unwrap();
        f.write_all(b"\0keymint: a different binary\0").unwrap();
        drop(f);
        assert_ne!(sha256_file(&a), sha256_file(&b));
        Helpers { _dir: dir, a, b }
    })
}

pub fn sha256_file(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

/// Starts `exe SOCKET [exit]`.
pub fn spawn(exe: &Path, socket: &Path, exit_at_once: bool) -> Child {
    let mut c = Command::new(exe);
    c.arg(socket);
    if exit_at_once {
        c.arg("exit");
    }
    // ETXTBSY: another test thread's fork can hold the just-written
    // executable open for writing until its own exec; try again shortly.
    for _ in 0..100 {
        match c.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r.unwrap(),
        }
    }
    c.spawn().unwrap()
}

pub fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

pub fn egid() -> u32 {
    nix::unistd::getegid().as_raw()
}
