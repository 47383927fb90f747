//! Stream-socket helpers above the single socket operations, for the protocols that use them
//! (the NBD server and client): send a whole message however short each send is, and shut a
//! socket down so operations waiting on it end. One place, so the two ends cannot drift.

use super::fd::SharedFd;
use super::op::{Op, OpKind, SendPrefix};
use super::RuntimeHandle;
use crate::buf::AlignedBuf;
use crate::priority::IoPriority;
use std::os::fd::{AsFd, AsRawFd};

/// Send `prefix` then all of `buf` on a stream socket, continuing where a short send stopped.
/// The buffer comes back, success or not; the error is an errno (a send of nothing while
/// bytes remain is EPIPE: the peer is gone).
pub async fn send_all(
    runtime: &RuntimeHandle,
    fd: &SharedFd,
    prefix: SendPrefix,
    buf: AlignedBuf,
) -> (Result<(), i32>, AlignedBuf) {
    let mut prefix = prefix;
    let mut current = buf;
    let mut original = None; // the caller's buffer while a copy of its tail is being sent
    loop {
        let total = prefix.len() + current.len();
        let op = Op { kind: OpKind::Send { fd: fd.clone(), prefix }, buf: Some(current), priority: IoPriority::GUEST };
        let out = runtime.submit(op).await;
        current = out.buf.expect("a send gives its buffer back");
        let sent = match out.result {
            r if r < 0 => return (Err(-r), original.unwrap_or(current)),
            0 if total > 0 => return (Err(libc::EPIPE), original.unwrap_or(current)),
            r => r as usize,
        };
        assert!(sent <= total, "sent {sent} of {total} bytes");
        if sent == total {
            return (Ok(()), original.unwrap_or(current));
        }
        if sent < prefix.len() {
            prefix = SendPrefix::new(&prefix.as_slice()[sent..]);
            continue;
        }
        // Cut short inside the buffer (a signal, a full socket on the thread backend): rare,
        // so the rest is copied rather than teaching sends an offset.
        let tail = match AlignedBuf::from_slice(&current.as_slice()[sent - prefix.len()..], 64) {
            Ok(tail) => tail,
            Err(_) => return (Err(libc::ENOMEM), original.unwrap_or(current)),
        };
        prefix = SendPrefix::EMPTY;
        let previous = std::mem::replace(&mut current, tail);
        original.get_or_insert(previous);
    }
}

/// shutdown(2) on a socket: receives and sends waiting on it, on either backend, complete at
/// once. A descriptor that is not a socket only gets ENOTSOCK back, which is ignored.
pub fn shutdown(fd: &SharedFd, how: std::net::Shutdown) {
    let how = match how {
        std::net::Shutdown::Read => libc::SHUT_RD,
        std::net::Shutdown::Write => libc::SHUT_WR,
        std::net::Shutdown::Both => libc::SHUT_RDWR,
    };
    // SAFETY: shutdown(2) on a descriptor the SharedFd keeps open; no memory is involved.
    unsafe { libc::shutdown(fd.as_fd().as_raw_fd(), how) };
}
