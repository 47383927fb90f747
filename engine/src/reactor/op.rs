//! One I/O operation in flight, and the future that waits for it.
//!
//! Ownership rule (the reason this file exists): the operation's buffer lives in [`OpShared`],
//! which the backend keeps alive (one `Arc` strong count) from submission until the
//! completion is reaped. The [`OpFuture`] only holds another count. Dropping the future
//! mid-flight therefore never frees memory the kernel may still write: the buffer is freed
//! when the completion arrives and the backend drops its count. The same holds for the file
//! descriptor: an [`OpKind`] names it by [`SharedFd`], which the cell keeps until completion.
//!
//! Socket operations follow the same rule. A send's message header and iovecs live in a box
//! the cell owns until completion (`SendMsg`). A descriptor returned by an accept is owned by
//! the cell until the future hands it out (as `OpOutput::result`); if the future was dropped
//! first, the cell closes it, so an abandoned accept leaks nothing.

use super::fd::SharedFd;
use crate::buf::AlignedBuf;
use crate::priority::IoPriority;
use parking_lot::Mutex;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

/// What an operation does. Offsets and lengths are in bytes. The descriptor is a
/// [`SharedFd`]: the operation keeps the file open until the kernel is done with it.
#[derive(Debug, Clone)]
pub enum OpKind {
    /// Does nothing: measures the reactor's own round trip.
    Nop,
    /// Read `buf.len()` bytes at `offset` into the buffer.
    Read { fd: SharedFd, offset: u64 },
    /// Write the buffer at `offset`; `fua` makes it durable before completion (RWF_DSYNC).
    Write { fd: SharedFd, offset: u64, fua: bool },
    /// fsync (or fdatasync).
    Fsync { fd: SharedFd, datasync: bool },
    /// fallocate with `mode` (FALLOC_FL_* flags) over `[offset, offset + length_bytes)`.
    Fallocate { fd: SharedFd, mode: i32, offset: u64, length_bytes: u64 },
    /// accept4 with SOCK_CLOEXEC on a listening socket. Result: the new descriptor, which the
    /// caller owns once the future returns it (wrap it in an `OwnedFd`), or `-errno`.
    Accept { fd: SharedFd },
    /// recv into the whole buffer; `waitall` adds MSG_WAITALL. Result: bytes received (0: the
    /// peer closed) or `-errno`. MSG_WAITALL may still return fewer bytes (a signal, a
    /// shutdown, an error after some bytes): callers loop.
    Recv { fd: SharedFd, waitall: bool },
    /// One sendmsg of `prefix` then the buffer (none: prefix only), with MSG_NOSIGNAL (a closed
    /// peer is `-EPIPE`, not SIGPIPE) and MSG_WAITALL. Result: bytes sent (may be short:
    /// callers loop) or `-errno`.
    Send { fd: SharedFd, prefix: SendPrefix },
}

/// Bytes a [`SendPrefix`] holds at most.
pub const SEND_PREFIX_BYTES_MAX: usize = 64;

/// A few bytes sent ahead of a send's buffer in the same operation (a reply header before the
/// data read from disk), held inline so the data buffer is never copied to join them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SendPrefix {
    bytes: [u8; SEND_PREFIX_BYTES_MAX],
    len: u8,
}

impl SendPrefix {
    pub const EMPTY: SendPrefix = SendPrefix { bytes: [0; SEND_PREFIX_BYTES_MAX], len: 0 };

    /// A copy of `bytes`. Panics beyond [`SEND_PREFIX_BYTES_MAX`] bytes.
    pub fn new(bytes: &[u8]) -> SendPrefix {
        assert!(bytes.len() <= SEND_PREFIX_BYTES_MAX, "send prefix of {} bytes > {SEND_PREFIX_BYTES_MAX}", bytes.len());
        let mut prefix = SendPrefix::EMPTY;
        prefix.bytes[..bytes.len()].copy_from_slice(bytes);
        prefix.len = bytes.len() as u8;
        prefix
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Default for SendPrefix {
    fn default() -> SendPrefix {
        SendPrefix::EMPTY
    }
}

impl std::fmt::Debug for SendPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SendPrefix({:02x?})", self.as_slice())
    }
}

/// A send's `msghdr`, its two iovecs and its own copy of the prefix, boxed so their addresses
/// stay put while the kernel (or a pool thread) reads them: the box is made by `describe` and
/// kept in the cell's state until `complete`, and nothing moves or touches it in between.
pub(crate) struct SendMsg {
    prefix: SendPrefix,
    iov: [libc::iovec; 2],
    header: libc::msghdr,
}

// SAFETY: the pointers inside name the box's own prefix and the operation's buffer, both owned
// by the same cell; whichever thread holds the cell may use them, one at a time (the mutex).
unsafe impl Send for SendMsg {}

impl SendMsg {
    /// The prefix, then `len` bytes at `data` (skipped when empty).
    fn new(prefix: SendPrefix, data: *mut u8, len: usize) -> Box<SendMsg> {
        let empty = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
        // SAFETY: msghdr is plain C data; all zero is an empty message (null name, no control).
        let header: libc::msghdr = unsafe { std::mem::zeroed() };
        let mut msg = Box::new(SendMsg { prefix, iov: [empty; 2], header });
        let mut count = 0;
        if !prefix.is_empty() {
            msg.iov[0] = libc::iovec { iov_base: msg.prefix.bytes.as_mut_ptr().cast(), iov_len: prefix.len() };
            count = 1;
        }
        if len > 0 {
            msg.iov[count] = libc::iovec { iov_base: data.cast(), iov_len: len };
            count += 1;
        }
        msg.header.msg_iov = msg.iov.as_mut_ptr();
        msg.header.msg_iovlen = count as _;
        msg
    }
}

/// An [`OpKind`] as a backend builds its submission from: the descriptor as a bare number.
/// Only [`OpShared::describe`] makes one, from the `OpKind` the cell holds until the
/// operation completes, so the number stays this file's for as long as the kernel uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RawKind {
    Nop,
    Read {
        fd: RawFd,
        offset: u64,
    },
    Write {
        fd: RawFd,
        offset: u64,
        fua: bool,
    },
    Fsync {
        fd: RawFd,
        datasync: bool,
    },
    Fallocate {
        fd: RawFd,
        mode: i32,
        offset: u64,
        length_bytes: u64,
    },
    Accept {
        fd: RawFd,
    },
    Recv {
        fd: RawFd,
        waitall: bool,
    },
    /// `msg` is the cell's boxed [`SendMsg`] header, valid until the operation completes.
    Send {
        fd: RawFd,
        msg: *const libc::msghdr,
    },
}

impl RawKind {
    /// The descriptor of a socket operation (one that may wait on a peer forever).
    pub(crate) fn socket_fd(&self) -> Option<RawFd> {
        match *self {
            RawKind::Accept { fd } | RawKind::Recv { fd, .. } | RawKind::Send { fd, .. } => Some(fd),
            _ => None,
        }
    }
}

impl OpKind {
    /// Every kind but `Send`, whose header `describe` builds (it needs the buffer).
    fn raw(&self) -> RawKind {
        match self {
            OpKind::Nop => RawKind::Nop,
            OpKind::Read { fd, offset } => RawKind::Read { fd: fd.raw(), offset: *offset },
            OpKind::Write { fd, offset, fua } => RawKind::Write { fd: fd.raw(), offset: *offset, fua: *fua },
            OpKind::Fsync { fd, datasync } => RawKind::Fsync { fd: fd.raw(), datasync: *datasync },
            OpKind::Fallocate { fd, mode, offset, length_bytes } => {
                RawKind::Fallocate { fd: fd.raw(), mode: *mode, offset: *offset, length_bytes: *length_bytes }
            }
            OpKind::Accept { fd } => RawKind::Accept { fd: fd.raw() },
            OpKind::Recv { fd, waitall } => RawKind::Recv { fd: fd.raw(), waitall: *waitall },
            OpKind::Send { .. } => unreachable!("describe builds a send's header"),
        }
    }
}

/// An operation to submit: what, with which buffer, at which priority.
pub struct Op {
    pub kind: OpKind,
    pub buf: Option<AlignedBuf>,
    pub priority: IoPriority,
}

/// What a finished operation hands back: the kernel's result (bytes moved, or `-errno`) and
/// the buffer, which is the caller's again.
#[derive(Debug)]
pub struct OpOutput {
    pub result: i32,
    pub buf: Option<AlignedBuf>,
}

/// What a backend needs to submit an operation. The buffer (`ptr`, `len`) stays in place
/// until the operation completes; `fixed_key` names the ring that registered it, if any.
pub(crate) struct Described {
    pub kind: RawKind,
    pub priority: IoPriority,
    pub ptr: *mut u8,
    pub len: usize,
    pub fixed_key: Option<u64>,
}

/// Result code given to operations that could not be submitted because the runtime stopped.
pub const RESULT_STOPPED: i32 = -libc::ESHUTDOWN;

pub(crate) struct OpShared {
    state: Mutex<OpState>,
}

struct OpState {
    /// What to do; holds the descriptor open until `complete` takes it out.
    kind: OpKind,
    priority: IoPriority,
    buf: Option<AlignedBuf>,
    result: Option<i32>,
    waker: Option<Waker>,
    /// The backend's submission batch this operation went out in.
    batch: u64,
    /// When the kernel (or a pool thread) took the operation.
    submitted_at: Option<Instant>,
    /// Dropped when the operation completes: what its abandoned future had to keep alive
    /// until the kernel is done (see [`OpFuture::hold_until_complete`]).
    held_until_complete: Option<Box<dyn Send>>,
    /// A send's header and iovecs while the operation runs.
    send_msg: Option<Box<SendMsg>>,
    /// An accept's new descriptor, from completion until the future hands it out; closed with
    /// the cell if nobody ever does.
    accepted: Option<OwnedFd>,
}

thread_local! {
    static LAST_SUBMITTED_AT: Cell<Option<Instant>> = const { Cell::new(None) };
    /// Finished operations kept for reuse on this thread: no allocation per I/O once warm.
    static RECYCLED: RefCell<Vec<Arc<OpShared>>> = const { RefCell::new(Vec::new()) };
}

/// Operation cells a thread keeps for reuse at most.
const RECYCLED_COUNT_MAX: usize = 1024;

/// When the operation this thread most recently saw complete was handed to the kernel: the
/// end of its submission syscall (shared by its batch), or when a pool thread picked it up.
/// A benchmark's completion latency starts here, as fio's `clat` does; `None` if unknown.
pub fn last_op_submitted_at() -> Option<Instant> {
    LAST_SUBMITTED_AT.with(|c| c.get())
}

/// For a driver whose request is not one reactor operation (a network request, a send then a
/// reply received by another task): say when the request itself was handed to the kernel, so
/// [`last_op_submitted_at`] names it rather than whatever operation this thread saw complete
/// last (another task's receive). `None` when unknown: the caller then times from its issue.
pub fn set_last_op_submitted_at(at: Option<Instant>) {
    LAST_SUBMITTED_AT.with(|c| c.set(at));
}

impl OpShared {
    /// A cell for `op`: a recycled one from this thread if there is one, else a new one.
    pub(crate) fn new(op: Op) -> Arc<OpShared> {
        let state = OpState {
            kind: op.kind,
            priority: op.priority,
            buf: op.buf,
            result: None,
            waker: None,
            batch: 0,
            submitted_at: None,
            held_until_complete: None,
            send_msg: None,
            accepted: None,
        };
        match RECYCLED.with(|r| r.borrow_mut().pop()) {
            Some(shared) => {
                *shared.state.lock() = state;
                shared
            }
            None => Arc::new(OpShared { state: Mutex::new(state) }),
        }
    }

    /// Whether this is a socket operation (one that may wait on a peer forever).
    pub(crate) fn is_socket(&self) -> bool {
        matches!(self.state.lock().kind, OpKind::Accept { .. } | OpKind::Recv { .. } | OpKind::Send { .. })
    }

    /// The operation's description plus the buffer's address and length, for a backend to
    /// build its submission. The buffer stays in place until `complete`.
    pub(crate) fn describe(&self, batch: u64) -> Described {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        assert!(state.result.is_none() && state.send_msg.is_none(), "an operation is submitted once");
        state.batch = batch;
        let (ptr, len, fixed_key) = match state.buf.as_mut() {
            Some(buf) => (buf.as_mut_ptr(), buf.len(), buf.fixed_key()),
            None => (std::ptr::null_mut(), 0, None),
        };
        let kind = match &state.kind {
            OpKind::Send { fd, prefix } => {
                assert!(prefix.len() + len <= i32::MAX as usize, "a send's result fits an i32");
                let msg = state.send_msg.insert(SendMsg::new(*prefix, ptr, len));
                RawKind::Send { fd: fd.raw(), msg: &msg.header }
            }
            OpKind::Recv { .. } => {
                assert!(len <= i32::MAX as usize, "a recv's result fits an i32");
                state.kind.raw()
            }
            kind => kind.raw(),
        };
        Described { kind, priority: state.priority, ptr, len, fixed_key }
    }

    /// Record the result and wake the waiter. Called once, by the backend that ran it;
    /// `submitted_at` maps the operation's batch to its submission time.
    pub(crate) fn complete(&self, result: i32, submitted_at: impl FnOnce(u64) -> Option<Instant>) {
        let (waker, held, kind, send_msg) = {
            let mut state = self.state.lock();
            assert!(state.result.is_none(), "an operation completes once");
            state.result = Some(result);
            state.submitted_at = submitted_at(state.batch);
            // The kernel is done with the descriptor: this operation's hold on it ends here,
            // not when a recycled cell is next reused.
            let kind = std::mem::replace(&mut state.kind, OpKind::Nop);
            if matches!(kind, OpKind::Accept { .. }) && result >= 0 {
                // SAFETY: a successful accept's result is a new descriptor nobody else owns;
                // the cell owns it until the future hands it out.
                state.accepted = Some(unsafe { OwnedFd::from_raw_fd(result) });
            }
            (state.waker.take(), state.held_until_complete.take(), kind, state.send_msg.take())
        };
        drop((kind, send_msg));
        drop(held); // outside the lock: its drop may wake others
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// Waits for an operation. `Send`, runtime-agnostic: any executor can await it.
pub struct OpFuture {
    pub(crate) shared: Arc<OpShared>,
}

impl OpFuture {
    /// Keep `value` alive until the operation completes, even if this future is dropped
    /// first (the kernel still runs an abandoned operation to its end). Dropped at once if
    /// the operation is already done.
    pub(crate) fn hold_until_complete(&self, value: Box<dyn Send>) {
        let mut state = self.shared.state.lock();
        if state.result.is_some() || Arc::strong_count(&self.shared) == 1 {
            drop(state);
            drop(value); // done, or never submitted: nothing left to wait for
            return;
        }
        state.held_until_complete = Some(value);
    }

    /// Whether nobody but this future still holds the operation (it was never submitted,
    /// or its completion has been reaped).
    pub(crate) fn is_abandoned_by_backend(shared: &Arc<OpShared>) -> bool {
        Arc::strong_count(shared) == 1
    }
}

impl Drop for OpFuture {
    /// Keep the cell for the next operation when nobody else holds it any more (the backend
    /// dropped its count at completion) and its result was taken.
    fn drop(&mut self) {
        let finished = {
            let mut state = self.shared.state.lock();
            // An accepted descriptor nobody read: closed now (in flight, the cell closes it).
            drop(state.accepted.take());
            state.result.is_some() && state.buf.is_none() && state.waker.is_none()
        };
        if !finished || Arc::strong_count(&self.shared) != 1 {
            return; // still in flight (the backend frees it on completion), or output unread
        }
        let shared = self.shared.clone();
        RECYCLED.with(|r| {
            let mut recycled = r.borrow_mut();
            if recycled.len() < RECYCLED_COUNT_MAX {
                recycled.push(shared);
            }
        });
    }
}

impl Future for OpFuture {
    type Output = OpOutput;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<OpOutput> {
        let mut state = self.shared.state.lock();
        if let Some(result) = state.result {
            LAST_SUBMITTED_AT.with(|c| c.set(state.submitted_at));
            state.waker = None;
            // The accepted descriptor's ownership passes to the caller, as `result`.
            let result = state.accepted.take().map_or(result, IntoRawFd::into_raw_fd);
            return Poll::Ready(OpOutput { result, buf: state.buf.take() });
        }
        match &state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}
