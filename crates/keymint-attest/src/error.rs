//! The error types: one per stage (reading the peer, building the registry,
//! matching, binding the socket).

use std::io;
use std::path::PathBuf;

/// Reading the peer process failed. Never a partial identity: any of these
/// means the connection is not attested.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// `SO_PEERCRED` failed (not a Unix socket, or not connected).
    #[error("cannot read the peer credentials")]
    Credentials(#[source] io::Error),
    /// The kernel reported no pid (the peer is in a pid namespace that has
    /// no mapping in ours).
    #[error("the peer has no pid in this pid namespace")]
    NoPid,
    /// Neither `SO_PEERPIDFD` nor `pidfd_open` gave a pidfd.
    #[error("cannot open a pidfd for pid `{pid}`")]
    Pidfd {
        pid: i32,
        #[source]
        source: io::Error,
    },
    /// The peer exited before attestation finished.
    #[error("the peer (pid `{pid}`) exited before it was attested")]
    Exited { pid: i32 },
    /// What was read about the pid does not belong to one process: its
    /// start time, executable or pidfd changed while it was read (pid reuse,
    /// or an `execve` in between).
    #[error("the process with pid `{pid}` changed while it was attested ({what})")]
    Changed { pid: i32, what: &'static str },
    /// Reading a file under `/proc` failed.
    #[error("cannot read `{path}`")]
    Proc {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A `/proc` file did not have the expected shape.
    #[error("unexpected contents in `{path}`")]
    Malformed { path: PathBuf },
    /// The blocking task that read `/proc` was cancelled or panicked.
    #[error("attestation was interrupted")]
    Interrupted,
    /// The executable is larger than the hashing limit.
    #[error("the executable is larger than {limit} bytes")]
    ExeTooLarge { limit: u64 },
}

impl PeerError {
    pub(crate) fn proc(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Proc {
            path: path.into(),
            source,
        }
    }
}

/// An invalid selector set, entry or registry. The message names the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub(crate) String);

/// Matching an attested peer against the registry failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// No entry matches. Carries what was seen (none of it is secret) so
    /// that an operator can write the entry.
    #[error(
        "no workload entry matches the peer: uid `{uid}`, gid `{gid}`, exe `{exe_path}`, \
         exe_sha256 `{exe_sha256}`, cgroup `{cgroup}`"
    )]
    NoEntry {
        uid: u32,
        gid: u32,
        exe_path: String,
        exe_sha256: String,
        cgroup: String,
    },
    /// Two entries of the same specificity match: refused rather than
    /// guessed. [`crate::Registry::new`] rejects registries where this can
    /// happen, so this is a second line of defence.
    #[error("entries `{first}` and `{second}` both match the peer equally well")]
    Ambiguous { first: String, second: String },
}

/// Creating the private listening socket failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// The path has no parent directory or no file name.
    #[error("`{0}` is not a usable socket path")]
    BadPath(PathBuf),
    /// The parent directory is writable by others (and not a sticky
    /// directory of ours), or owned by someone else.
    #[error("`{path}` is not a safe directory for the socket: {why}")]
    UnsafeParent { path: PathBuf, why: &'static str },
    /// Something that is not a socket sits at the path; it is never removed.
    #[error("`{0}` exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A live server is listening on the path.
    #[error("`{0}` is in use by a running server")]
    InUse(PathBuf),
    /// A system call failed.
    #[error("cannot {what} `{path}`")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}
