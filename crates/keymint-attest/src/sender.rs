//! Who wrote what a peer sends: with `SO_PASSCRED` on the listening socket
//! (connections accepted from it inherit it), the kernel attaches to every
//! chunk written on a connection the pid (thread group id) of the process
//! that wrote it, and a process cannot name another pid there without
//! `CAP_SYS_ADMIN`. [`SenderCheckedRead`] reads a connection with
//! `recvmsg` and records the first chunk that came from any process other
//! than the attested one.
//!
//! This is what `SO_PEERCRED` does not give: it names the process that
//! *connected*; a child forked after `connect`, or a process the
//! descriptor was passed to, writes on the same connection under that
//! name. See `docs/design/0024-agent-hardening.md`.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::task::{Context, Poll, ready};

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg, setsockopt, sockopt,
};
use tokio::io::{AsyncRead, Interest, ReadBuf};
use tokio::net::unix::OwnedReadHalf;

/// Turns on `SO_PASSCRED` for a listening socket; every connection it
/// accepts inherits it (and chunks sent before `accept` carry credentials
/// anyway).
pub fn pass_credentials(listener: &impl AsFd) -> io::Result<()> {
    setsockopt(listener, sockopt::PassCred, &true).map_err(io::Error::from)
}

/// Whether a connection read through [`SenderCheckedRead`] has carried
/// bytes from another process than the expected one. Cheap to clone and
/// read from another task.
#[derive(Debug, Clone, Default)]
pub struct Senders {
    /// 0: every chunk so far came from the expected process; otherwise the
    /// first other pid seen (`-1`: a chunk without credentials).
    foreign: Arc<AtomicI32>,
}

impl Senders {
    /// The first process other than the expected one that wrote on the
    /// connection (`Some(-1)`: a chunk whose writer the kernel did not
    /// name), or `None` if there was none.
    pub fn foreign(&self) -> Option<i32> {
        match self.foreign.load(Ordering::Acquire) {
            0 => None,
            p => Some(p),
        }
    }

    fn record(&self, pid: i32) {
        let _ = self
            .foreign
            .compare_exchange(0, pid, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// The read half of a connection accepted from a listener with
/// [`pass_credentials`], read with `recvmsg`: each chunk's writer is
/// compared with `expected` (the attested pid) and a mismatch is recorded
/// in [`Senders`]. The bytes are passed on unchanged: the caller decides
/// (the agent refuses the request and closes the connection).
#[derive(Debug)]
pub struct SenderCheckedRead {
    half: OwnedReadHalf,
    expected: i32,
    senders: Senders,
}

impl SenderCheckedRead {
    pub fn new(half: OwnedReadHalf, expected: i32) -> (Self, Senders) {
        let senders = Senders::default();
        (
            Self {
                half,
                expected,
                senders: senders.clone(),
            },
            senders,
        )
    }
}

impl AsyncRead for SenderCheckedRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.half.as_ref().poll_read_ready(cx))?;
            let stream = this.half.as_ref();
            let dst = buf.initialize_unfilled();
            match stream.try_io(Interest::READABLE, || recv(stream.as_fd(), dst)) {
                Ok((n, pid)) => {
                    if n > 0 && pid != Some(this.expected) {
                        this.senders.record(pid.filter(|p| *p > 0).unwrap_or(-1));
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// One `recvmsg`: the bytes read and the writer's pid, if the kernel named
/// one. A truncated control message (a peer sending descriptors, which the
/// kernel then drops) names no writer.
fn recv(fd: std::os::fd::BorrowedFd<'_>, dst: &mut [u8]) -> io::Result<(usize, Option<i32>)> {
    let mut iov = [io::IoSliceMut::new(dst)];
    let mut space = nix::cmsg_space!(UnixCredentials);
    let msg = recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut space[..]),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut pid = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmCredentials(cr) = c {
                pid = Some(cr.pid());
            }
        }
    }
    Ok((msg.bytes, pid))
}
