//! keymint local attestation: who is the process at the other end of this
//! Unix socket, and which configured workload is it?
//!
//! Linux only. Three parts:
//!
//! - [`PeerInfo`] reads the peer of a connected socket: uid, gid and pid
//!   from `SO_PEERCRED`, a pidfd (from `SO_PEERPIDFD`, or `pidfd_open`),
//!   the executable's path and SHA-256 (through `/proc/PID/exe`), the cgroup
//!   v2 path and a container id parsed from it; and checks through the pidfd
//!   and the start time that all of it belongs to one process that is
//!   still alive. Any doubt is an error, never a wrong identity.
//! - [`Registry`] holds [`Entry`]s (a workload, a set of [`Selector`]s that
//!   must all match, attributes) and attests a [`PeerInfo`] as the workload
//!   of the most specific matching entry.
//! - [`SenderCheckedRead`] reads a connection accepted with
//!   [`pass_credentials`] and records whether any of its bytes were written
//!   by another process than the attested one (a forked child, or a
//!   process the descriptor was passed to).
//! - [`bind_private`] creates the listening socket with owner-only (or
//!   owner-and-group) permissions from the moment it appears at its path;
//!   [`UidSlots`] bounds the connections each uid holds on it.
//!
//! The reasoning (read order, pid reuse, precedence, what this does not
//! defend against) is in `docs/design/0010-local-attestation.md`.

#[cfg(not(target_os = "linux"))]
compile_error!("keymint-attest reads /proc and pidfds: Linux only");

mod bind;
mod error;
mod peer;
mod procfs;
mod registry;
mod selector;
mod sender;
mod slots;

pub use bind::{BindOptions, bind_private, bind_private_std, bind_private_with};
pub use error::{AttestError, BindError, ConfigError, PeerError};
pub use peer::{DEFAULT_MAX_EXE_SIZE, PeerInfo, PidfdSource, ReadOptions};
pub use registry::{AttestedWorkload, Entry, OBSERVED_ATTRIBUTES, Registry};
pub use selector::{RawSelectors, Selector, Selectors};
pub use sender::{SenderCheckedRead, Senders, pass_credentials};
pub use slots::{UidSlot, UidSlots};
