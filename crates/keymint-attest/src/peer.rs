//! [`PeerInfo`]: what the kernel says about the process at the other end of
//! a connected Unix socket.
//!
//! The order of the reads, and why a recycled pid cannot pass, is in
//! `docs/design/0010-local-attestation.md`; in short: credentials and a
//! pidfd first, then `/proc/PID/...` bracketed by two start-time reads, and
//! last a check through the pidfd that the process is still alive (so its
//! pid was never free to be reused while `/proc` was read).

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{getsockopt, sockopt};
use sha2::{Digest, Sha256};

use crate::error::PeerError;
use crate::procfs;

/// The default bound on the executable size that is hashed: 512 MiB.
pub const DEFAULT_MAX_EXE_SIZE: u64 = 512 * 1024 * 1024;

/// How the pidfd was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PidfdSource {
    /// `SO_PEERPIDFD` (Linux 6.5+): the kernel's own reference to the
    /// process that connected. No window for pid reuse at all.
    PeerPidfd,
    /// `pidfd_open(pid)` on a kernel without `SO_PEERPIDFD`. There is a
    /// window between the peer's `connect` and this call in which the
    /// peer could exit and its pid be reused; see the design note.
    PidfdOpen,
}

/// How to read a peer.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Refuse executables larger than this many bytes (they are streamed
    /// through SHA-256, never held in memory).
    pub max_exe_size: u64,
    /// On kernels without `SO_PEERPIDFD`, fall back to `pidfd_open(pid)`
    /// ([`PidfdSource::PidfdOpen`]). When false, such kernels get
    /// [`PeerError::Pidfd`].
    pub allow_pidfd_open: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            max_exe_size: DEFAULT_MAX_EXE_SIZE,
            allow_pidfd_open: true,
        }
    }
}

/// The attested facts about a peer process, read once when it was built.
///
/// Only this crate constructs one, and only after the whole sequence of
/// reads and checks passed. It holds the peer's pidfd, so
/// [`PeerInfo::is_alive`] can later tell whether the very same process is
/// still running.
#[derive(Debug)]
pub struct PeerInfo {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) pid: i32,
    pub(crate) start_time: u64,
    pub(crate) exe_path: PathBuf,
    pub(crate) exe_path_verified: bool,
    pub(crate) exe_sha256: String,
    /// Device and inode of the running executable, to tell later whether
    /// the process has exec'd another file ([`PeerInfo::recheck`]).
    pub(crate) exe_id: (u64, u64),
    pub(crate) cgroup: Option<String>,
    pub(crate) container_id: Option<String>,
    pub(crate) pidfd_source: PidfdSource,
    pub(crate) pidfd: OwnedFd,
}

impl PeerInfo {
    /// Reads the peer of a connected tokio stream. The `/proc` reads and
    /// the executable hash run on the blocking pool.
    pub async fn from_tokio(stream: &tokio::net::UnixStream) -> Result<Self, PeerError> {
        Self::from_tokio_with(stream, ReadOptions::default()).await
    }

    /// [`PeerInfo::from_tokio`] with explicit options.
    pub async fn from_tokio_with(
        stream: &tokio::net::UnixStream,
        options: ReadOptions,
    ) -> Result<Self, PeerError> {
        let start = Start::new(stream.as_fd(), &options)?;
        tokio::task::spawn_blocking(move || start.finish(&options))
            .await
            .map_err(|_| PeerError::Interrupted)?
    }

    /// Reads the peer of a connected std stream (blocking: hashes the
    /// executable).
    pub fn from_std(stream: &std::os::unix::net::UnixStream) -> Result<Self, PeerError> {
        Self::from_fd(stream.as_fd(), &ReadOptions::default())
    }

    /// Reads the peer of any connected Unix stream socket (blocking).
    pub fn from_fd(fd: BorrowedFd<'_>, options: &ReadOptions) -> Result<Self, PeerError> {
        Start::new(fd, options)?.finish(options)
    }

    /// The peer's effective uid when it connected (`SO_PEERCRED`: the
    /// kernel reports `euid`, in our user namespace).
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The peer's effective gid when it connected (`SO_PEERCRED`: `egid`;
    /// supplementary groups are not seen).
    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// The peer's pid in our pid namespace. Informational: the identity is
    /// the pidfd, not the number.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Field 22 of `/proc/PID/stat`, clock ticks after boot.
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// `readlink /proc/PID/exe`, as the kernel names it in the peer's own
    /// mount namespace (and with ` (deleted)` appended if it was unlinked).
    pub fn exe_path(&self) -> &Path {
        &self.exe_path
    }

    /// True when [`PeerInfo::exe_path`] is trustworthy: the peer shares our
    /// mount namespace and the file at that path, seen from here, is the
    /// very inode that runs. False for processes in containers or private
    /// mount namespaces (which can bind-mount anything at any path) and for
    /// executables that were replaced or removed since they started.
    /// [`crate::Selector::ExePath`] matches only when this is true.
    pub fn exe_path_verified(&self) -> bool {
        self.exe_path_verified
    }

    /// The SHA-256 of the running executable (read through
    /// `/proc/PID/exe`, so a file replaced on disk does not change it), 64
    /// lowercase hex digits.
    pub fn exe_sha256(&self) -> &str {
        &self.exe_sha256
    }

    /// The cgroup v2 path (`0::` line of `/proc/PID/cgroup`), relative to
    /// our cgroup namespace. `None` on a v1-only host.
    pub fn cgroup(&self) -> Option<&str> {
        self.cgroup.as_deref()
    }

    /// The container id parsed from the cgroup path, if it has one.
    pub fn container_id(&self) -> Option<&str> {
        self.container_id.as_deref()
    }

    /// How the pidfd was obtained.
    pub fn pidfd_source(&self) -> PidfdSource {
        self.pidfd_source
    }

    /// The peer's pidfd.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Whether the attested process is still running (polls the pidfd).
    /// An error counts as not alive.
    pub fn is_alive(&self) -> bool {
        alive(&self.pidfd, self.pid).is_ok()
    }

    /// Whether the attested process still runs what was attested: it is
    /// alive (its pidfd), it has the same start time (so its pid was not
    /// reused), and `/proc/PID/exe` is still the same file (device and
    /// inode), so it has not `execve`d another executable since. Cheap (a
    /// poll, a stat, one small read): meant for every request on a
    /// connection. An exec of the *same* file is not seen (it runs the
    /// same bytes; see `docs/design/0024-agent-hardening.md`).
    pub fn recheck(&self) -> Result<(), PeerError> {
        alive(&self.pidfd, self.pid)?;
        if read_start_time(self.pid)? != self.start_time {
            return Err(PeerError::Changed {
                pid: self.pid,
                what: "start time",
            });
        }
        let exe_link = PathBuf::from(format!("/proc/{}/exe", self.pid));
        let now = fs::metadata(&exe_link).map_err(|e| gone_or(self.pid, &exe_link, e))?;
        if (now.dev(), now.ino()) != self.exe_id {
            return Err(PeerError::Changed {
                pid: self.pid,
                what: "executable",
            });
        }
        // The pid was this process's all along (not reused in between).
        alive(&self.pidfd, self.pid)
    }
}

/// The first, fast half: credentials and pidfd, taken while the caller
/// still holds the socket.
struct Start {
    uid: u32,
    gid: u32,
    pid: i32,
    pidfd: OwnedFd,
    source: PidfdSource,
}

impl Start {
    fn new(fd: BorrowedFd<'_>, options: &ReadOptions) -> Result<Self, PeerError> {
        let cred = getsockopt(&fd, sockopt::PeerCredentials)
            .map_err(|e| PeerError::Credentials(e.into()))?;
        let pid = cred.pid();
        if pid <= 0 {
            return Err(PeerError::NoPid);
        }
        let (pidfd, source) = match getsockopt(&fd, sockopt::PeerPidfd) {
            Ok(pidfd) => (pidfd, PidfdSource::PeerPidfd),
            // Kernels before 6.5 do not know the option.
            Err(Errno::ENOPROTOOPT) if options.allow_pidfd_open => {
                let raw = rustix::process::Pid::from_raw(pid).ok_or(PeerError::NoPid)?;
                match rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()) {
                    Ok(pidfd) => (pidfd, PidfdSource::PidfdOpen),
                    Err(rustix::io::Errno::SRCH) => return Err(PeerError::Exited { pid }),
                    Err(e) => {
                        return Err(PeerError::Pidfd {
                            pid,
                            source: e.into(),
                        });
                    }
                }
            }
            // The peer is gone (no task left for its pid).
            Err(Errno::ESRCH | Errno::EINVAL) => return Err(PeerError::Exited { pid }),
            Err(e) => {
                return Err(PeerError::Pidfd {
                    pid,
                    source: e.into(),
                });
            }
        };
        Ok(Self {
            uid: cred.uid(),
            gid: cred.gid(),
            pid,
            pidfd,
            source,
        })
    }

    /// The second half: everything under `/proc/PID`, bracketed by
    /// liveness and start-time checks.
    fn finish(self, options: &ReadOptions) -> Result<PeerInfo, PeerError> {
        let pid = self.pid;
        // 1. The pidfd names a live process with this pid.
        alive(&self.pidfd, pid)?;
        // 2. Its start time, before.
        let start_time = read_start_time(pid)?;
        // 3. The executable: its name, then its bytes through the magic
        //    link, which opens the running inode whatever the path now holds.
        let exe_link = PathBuf::from(format!("/proc/{pid}/exe"));
        let exe_path = fs::read_link(&exe_link).map_err(|e| gone_or(pid, &exe_link, e))?;
        let exe = File::open(&exe_link).map_err(|e| gone_or(pid, &exe_link, e))?;
        let exe_meta = exe.metadata().map_err(|e| PeerError::proc(&exe_link, e))?;
        if !exe_meta.is_file() {
            return Err(PeerError::Malformed { path: exe_link });
        }
        let exe_sha256 = hash_bounded(&exe, &exe_link, exe_meta.len(), options.max_exe_size)?;
        let exe_path_verified = same_mount_ns(pid)?
            && fs::metadata(&exe_path)
                .is_ok_and(|m| m.dev() == exe_meta.dev() && m.ino() == exe_meta.ino());
        // 4. The cgroup.
        let cgroup_file = PathBuf::from(format!("/proc/{pid}/cgroup"));
        let cgroup_text =
            fs::read_to_string(&cgroup_file).map_err(|e| gone_or(pid, &cgroup_file, e))?;
        let cgroup = procfs::cgroup_v2(&cgroup_text).map(str::to_owned);
        let container_id = cgroup
            .as_deref()
            .and_then(procfs::container_id)
            .map(str::to_owned);
        // 5. Same executable as in 3 (no execve in between)...
        let exe_now = fs::metadata(&exe_link).map_err(|e| gone_or(pid, &exe_link, e))?;
        if exe_now.dev() != exe_meta.dev()
            || exe_now.ino() != exe_meta.ino()
            || fs::read_link(&exe_link).map_err(|e| gone_or(pid, &exe_link, e))? != exe_path
        {
            return Err(PeerError::Changed {
                pid,
                what: "executable",
            });
        }
        // 6. ...same start time as in 2...
        if read_start_time(pid)? != start_time {
            return Err(PeerError::Changed {
                pid,
                what: "start time",
            });
        }
        // 7. ...and the pidfd's process is still alive, so the pid could not
        //    have been reused at any point since 1.
        alive(&self.pidfd, pid)?;
        Ok(PeerInfo {
            uid: self.uid,
            gid: self.gid,
            pid,
            start_time,
            exe_path,
            exe_path_verified,
            exe_sha256,
            exe_id: (exe_meta.dev(), exe_meta.ino()),
            cgroup,
            container_id,
            pidfd_source: self.source,
            pidfd: self.pidfd,
        })
    }
}

/// The pidfd's process has not exited, and it is `pid` in our namespace.
fn alive(pidfd: &OwnedFd, pid: i32) -> Result<(), PeerError> {
    let ready = loop {
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) => break n,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                return Err(PeerError::Pidfd {
                    pid,
                    source: e.into(),
                });
            }
        }
    };
    // A pidfd polls readable once its process has exited (zombies
    // included).
    if ready != 0 {
        return Err(PeerError::Exited { pid });
    }
    let fdinfo = PathBuf::from(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()));
    let text = fs::read_to_string(&fdinfo).map_err(|e| PeerError::proc(&fdinfo, e))?;
    match procfs::fdinfo_pid(&text) {
        Some(p) if p == pid => Ok(()),
        Some(-1) => Err(PeerError::Exited { pid }),
        Some(_) => Err(PeerError::Changed { pid, what: "pidfd" }),
        None => Err(PeerError::Malformed { path: fdinfo }),
    }
}

fn read_start_time(pid: i32) -> Result<u64, PeerError> {
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    let stat = fs::read_to_string(&path).map_err(|e| gone_or(pid, &path, e))?;
    procfs::start_time(&stat).ok_or(PeerError::Malformed { path })
}

/// Whether the peer is in our mount namespace.
fn same_mount_ns(pid: i32) -> Result<bool, PeerError> {
    let theirs_path = PathBuf::from(format!("/proc/{pid}/ns/mnt"));
    let theirs = fs::metadata(&theirs_path).map_err(|e| gone_or(pid, &theirs_path, e))?;
    let ours =
        fs::metadata("/proc/self/ns/mnt").map_err(|e| PeerError::proc("/proc/self/ns/mnt", e))?;
    Ok(theirs.dev() == ours.dev() && theirs.ino() == ours.ino())
}

/// A missing `/proc/PID` entry means the process is gone.
fn gone_or(pid: i32, path: &Path, e: io::Error) -> PeerError {
    if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(Errno::ESRCH as i32) {
        PeerError::Exited { pid }
    } else {
        PeerError::proc(path, e)
    }
}

/// Streams at most `limit` bytes of `file` through SHA-256.
fn hash_bounded(file: &File, path: &Path, size: u64, limit: u64) -> Result<String, PeerError> {
    if size > limit {
        return Err(PeerError::ExeTooLarge { limit });
    }
    let mut hasher = Sha256::new();
    let mut reader = file.take(limit.saturating_add(1));
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(PeerError::proc(path, e)),
        };
        total = total.saturating_add(n as u64);
        if total > limit {
            return Err(PeerError::ExeTooLarge { limit });
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
