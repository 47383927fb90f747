//! [`SharedFd`]: the only way an operation names a file descriptor. It owns the descriptor
//! (through an `Arc`), and every operation holds a clone until the kernel is done with it, so
//! a driver dropped while its operations wait in a core's queue, an inbox or the thread pool
//! cannot have its descriptor closed and reused by another file under them (a read would then
//! return that file's bytes, a write would land in it). This is clause 3 of the ring's safety
//! contract (`uring.rs`), enforced by the types instead of stated.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

/// An open file descriptor shared by a driver and its operations in flight; closed when the
/// last of them lets go.
#[derive(Clone, Debug)]
pub struct SharedFd(Arc<OwnedFd>);

impl SharedFd {
    pub fn new(fd: OwnedFd) -> SharedFd {
        SharedFd(Arc::new(fd))
    }

    /// The raw number, for a submission built while an owner of this `SharedFd` is alive.
    pub(crate) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for SharedFd {
    /// For synchronous calls by the owner (fstat, ioctl, mmap): valid while `self` lives.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl From<OwnedFd> for SharedFd {
    fn from(fd: OwnedFd) -> SharedFd {
        SharedFd::new(fd)
    }
}
