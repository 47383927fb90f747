//! Socket operations on the thread-pool backend: one readiness thread per runtime, with epoll.
//!
//! Why not the pool's workers: a socket operation may wait on an idle peer forever (an NBD
//! server keeps a recv pending per idle connection), and a worker blocked in it is a worker
//! disk I/O cannot use; enough idle connections would starve, even deadlock, the disk. So the
//! disk workers never see a socket operation: [`SocketPoller::submit`] hands it to this thread,
//! which tries it without blocking and, when it would block, waits for the socket's readiness
//! with epoll (`EPOLLONESHOT`, re-armed while operations wait) and tries again. One thread
//! serves any number of idle connections.
//!
//! Never blocking without touching the socket's own flags (its owner may rely on them): recv
//! and sendmsg take `MSG_DONTWAIT`. accept4 has no such flag: on a blocking listener the
//! accept is made only when a zero-timeout poll reports a pending connection, and as this
//! thread runs all of the runtime's accepts, only an accepter outside the runtime taking that
//! connection in between could make it block (until the next connection).
//!
//! Semantics kept from blocking calls: a `waitall` recv continues until its buffer is full,
//! the stream ends or an error; a send continues until all its bytes are sent or an error
//! (an error after some bytes reports the bytes). Operations on one socket run in submission
//! order per direction: a later send never starts while an earlier one waits (its bytes would
//! land inside the earlier's), nor a later recv (or accept) while an earlier one waits.
//!
//! Ownership: a waiting operation is held here (its `Arc<OpShared>`, and so its buffer, its
//! send header and its `SharedFd`) until it completes, and its descriptor is removed from the
//! epoll set before that completion can close it.
//!
//! Shutdown: [`SocketPoller`]'s drop makes the thread finish what can finish without waiting
//! and complete the rest with `-ECANCELED` (or the bytes already moved), as io_uring cancels
//! socket operations at runtime drop; the sockets themselves are left alone.

use super::op::{Described, OpShared, RawKind};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// The epoll token of the wake-up eventfd (descriptors are non-negative `i32`s).
const WAKE_TOKEN: u64 = u64::MAX;
/// Readiness events taken per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 64;

/// The readiness thread, owned by the thread pool.
pub(crate) struct SocketPoller {
    shared: Arc<PollerShared>,
    thread: Option<JoinHandle<()>>,
}

/// What cores share with the readiness thread.
pub(crate) struct PollerShared {
    epoll: OwnedFd,
    /// An eventfd in the epoll set: written when `incoming` gains an operation or stops.
    wake: OwnedFd,
    incoming: Mutex<Incoming>,
}

struct Incoming {
    ops: Vec<Arc<OpShared>>,
    stopping: bool,
}

impl SocketPoller {
    pub(crate) fn new() -> std::io::Result<SocketPoller> {
        // SAFETY: no memory arguments; the result is checked before use.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nobody else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        // SAFETY: no memory arguments; the result is checked before use.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nobody else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };
        epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, wake.as_raw_fd(), libc::EPOLLIN as u32, WAKE_TOKEN)
            .map_err(std::io::Error::from_raw_os_error)?;
        let shared =
            Arc::new(PollerShared { epoll, wake, incoming: Mutex::new(Incoming { ops: Vec::new(), stopping: false }) });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tandem-sockets".into())
            .spawn(move || Loop { shared: thread_shared, sockets: HashMap::new() }.run())?;
        Ok(SocketPoller { shared, thread: Some(thread) })
    }

    pub(crate) fn shared(&self) -> Arc<PollerShared> {
        self.shared.clone()
    }
}

impl Drop for SocketPoller {
    fn drop(&mut self) {
        self.shared.incoming.lock().stopping = true;
        self.shared.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl PollerShared {
    /// Take a socket operation; it completes on the readiness thread (`-ECANCELED` once the
    /// poller stops).
    pub(crate) fn submit(&self, op: Arc<OpShared>) {
        {
            let mut incoming = self.incoming.lock();
            if !incoming.stopping {
                incoming.ops.push(op);
                drop(incoming);
                self.wake();
                return;
            }
        }
        op.complete(-libc::ECANCELED, |_| None);
    }

    fn wake(&self) {
        let one = 1u64;
        // SAFETY: writes the 8 bytes of `one`, on the stack; the eventfd is ours and open.
        // Failure is EAGAIN (the counter is full): a wake-up is pending anyway.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// One operation waiting for its socket. Built by `describe`: `ptr`/`len` (the buffer) and
/// the kind's descriptor and send header stay valid while `op` is held here.
struct Waiting {
    op: Arc<OpShared>,
    kind: RawKind,
    ptr: *mut u8,
    len: usize,
    /// Bytes already moved (a `waitall` recv or a send made in several steps).
    done: usize,
    submitted_at: Instant,
}

// SAFETY: the raw pointers name the buffer and send header owned by `op`'s cell, which this
// value keeps alive; only the readiness thread uses them.
unsafe impl Send for Waiting {}

/// The operations waiting on one socket, each direction in submission order.
#[derive(Default)]
struct Socket {
    /// Recvs and accepts: wait for EPOLLIN.
    reads: VecDeque<Waiting>,
    /// Sends: wait for EPOLLOUT.
    writes: VecDeque<Waiting>,
}

impl Socket {
    fn interest(&self) -> u32 {
        let mut events = libc::EPOLLONESHOT as u32;
        if !self.reads.is_empty() {
            events |= libc::EPOLLIN as u32;
        }
        if !self.writes.is_empty() {
            events |= libc::EPOLLOUT as u32;
        }
        events
    }
}

/// The readiness thread's state: every socket with a waiting operation, which is exactly the
/// set of descriptors in the epoll set besides the eventfd.
struct Loop {
    shared: Arc<PollerShared>,
    sockets: HashMap<RawFd, Socket>,
}

impl Loop {
    fn run(mut self) {
        let empty = libc::epoll_event { events: 0, u64: 0 };
        let mut events = [empty; EVENTS_PER_WAIT];
        loop {
            // SAFETY: the array is ours, on the stack, and its length is passed.
            let count = unsafe {
                libc::epoll_wait(self.shared.epoll.as_raw_fd(), events.as_mut_ptr(), EVENTS_PER_WAIT as i32, -1)
            };
            let mut finished = Vec::new();
            for event in events.iter().take(count.max(0) as usize) {
                match event.u64 {
                    WAKE_TOKEN => self.drain_wake(),
                    token => self.ready(token as RawFd, &mut finished),
                }
            }
            let (ops, stopping) = {
                let mut incoming = self.shared.incoming.lock();
                (std::mem::take(&mut incoming.ops), incoming.stopping)
            };
            for op in ops {
                self.start(op, &mut finished);
            }
            if stopping {
                self.stop(&mut finished);
            }
            // Completed only now: every descriptor they name has left the epoll set.
            for (op, result, submitted_at) in finished {
                op.complete(result, |_| Some(submitted_at));
            }
            if stopping {
                return;
            }
        }
    }

    fn drain_wake(&self) {
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into `count`, on the stack; the eventfd is non-blocking.
        unsafe { libc::read(self.shared.wake.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
    }

    /// A new operation: tried at once unless an earlier one in its direction still waits.
    fn start(&mut self, op: Arc<OpShared>, finished: &mut Vec<Finished>) {
        let Described { kind, ptr, len, .. } = op.describe(0);
        let fd = kind.socket_fd().expect("only socket operations come here");
        let mut waiting = Waiting { op, kind, ptr, len, done: 0, submitted_at: Instant::now() };
        let registered = self.sockets.contains_key(&fd);
        let socket = self.sockets.entry(fd).or_default();
        let queue = match kind {
            RawKind::Send { .. } => &mut socket.writes,
            _ => &mut socket.reads,
        };
        if queue.is_empty() {
            if let Some(result) = attempt(&mut waiting) {
                finished.push((waiting.op, result, waiting.submitted_at));
                if !registered {
                    self.sockets.remove(&fd);
                }
                return;
            }
        }
        queue.push_back(waiting);
        let interest = socket.interest();
        let op = if registered { libc::EPOLL_CTL_MOD } else { libc::EPOLL_CTL_ADD };
        if let Err(errno) = epoll_ctl(self.shared.epoll.as_raw_fd(), op, fd, interest, fd as u64) {
            // Cannot wait for this descriptor (not pollable): fail what waits on it here.
            let socket = self.sockets.remove(&fd).expect("just inserted");
            if registered {
                self.remove(fd);
            }
            for waiting in socket.reads.into_iter().chain(socket.writes) {
                finished.push((waiting.op, -errno, waiting.submitted_at));
            }
        }
    }

    /// `fd` reported readiness (or a hang-up or error, which the retries then report).
    fn ready(&mut self, fd: RawFd, finished: &mut Vec<Finished>) {
        let Some(socket) = self.sockets.get_mut(&fd) else {
            return;
        };
        run_queue(&mut socket.reads, finished);
        run_queue(&mut socket.writes, finished);
        if socket.reads.is_empty() && socket.writes.is_empty() {
            self.sockets.remove(&fd);
            self.remove(fd);
        } else {
            let interest = socket.interest();
            if let Err(errno) = epoll_ctl(self.shared.epoll.as_raw_fd(), libc::EPOLL_CTL_MOD, fd, interest, fd as u64) {
                let socket = self.sockets.remove(&fd).expect("present");
                self.remove(fd);
                for waiting in socket.reads.into_iter().chain(socket.writes) {
                    finished.push((waiting.op, -errno, waiting.submitted_at));
                }
            }
        }
    }

    /// The poller stops: what can finish without waiting does; the rest is cancelled.
    fn stop(&mut self, finished: &mut Vec<Finished>) {
        for (fd, socket) in std::mem::take(&mut self.sockets) {
            self.remove(fd);
            for mut waiting in socket.reads.into_iter().chain(socket.writes) {
                let result = attempt(&mut waiting).unwrap_or(match waiting.done {
                    0 => -libc::ECANCELED,
                    done => done as i32,
                });
                finished.push((waiting.op, result, waiting.submitted_at));
            }
        }
    }

    /// Take `fd` out of the epoll set (before its last operation completes and may close it).
    fn remove(&self, fd: RawFd) {
        let _ = epoll_ctl(self.shared.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, 0, 0);
    }
}

/// An operation, its result, and when it was taken.
type Finished = (Arc<OpShared>, i32, Instant);

/// Retry a direction's operations in order, until one would block.
fn run_queue(queue: &mut VecDeque<Waiting>, finished: &mut Vec<Finished>) {
    while let Some(waiting) = queue.front_mut() {
        let Some(result) = attempt(waiting) else {
            return;
        };
        let waiting = queue.pop_front().expect("front exists");
        finished.push((waiting.op, result, waiting.submitted_at));
    }
}

/// Try the operation without blocking: `Some(result)` once it is done (bytes moved, a new
/// descriptor, or `-errno`), `None` if it must wait for readiness.
fn attempt(waiting: &mut Waiting) -> Option<i32> {
    loop {
        let ret = match waiting.kind {
            RawKind::Accept { fd } => {
                if !accept_would_not_block(fd) {
                    return None;
                }
                // SAFETY: no memory arguments (null address and length: not wanted); fd is the
                // operation's own SharedFd, open while the operation is held.
                unsafe { libc::accept4(fd, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) as i64 }
            }
            RawKind::Recv { fd, waitall } => {
                let flags = libc::MSG_DONTWAIT | if waitall { libc::MSG_WAITALL } else { 0 };
                // SAFETY: ptr/len name the operation's own buffer (kept alive by `op`); the
                // range from `done` to `len` lies inside it.
                unsafe {
                    libc::recv(fd, waiting.ptr.add(waiting.done).cast(), waiting.len - waiting.done, flags) as i64
                }
            }
            RawKind::Send { fd, msg } => send_rest(fd, msg, waiting.done),
            _ => unreachable!("only socket operations come here"),
        };
        if ret < 0 {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
            match errno {
                libc::EINTR => continue,
                libc::EAGAIN => return None,
                _ if waiting.done > 0 => return Some(waiting.done as i32),
                _ => return Some(-errno),
            }
        }
        let moved = ret as usize;
        match waiting.kind {
            RawKind::Accept { .. } => return Some(ret as i32),
            RawKind::Recv { waitall, .. } => {
                waiting.done += moved;
                if !waitall || moved == 0 || waiting.done == waiting.len {
                    return Some(waiting.done as i32);
                }
            }
            RawKind::Send { msg, .. } => {
                waiting.done += moved;
                // SAFETY: msg is the cell's boxed send header, alive while `op` is held.
                if moved == 0 || waiting.done == unsafe { message_len(msg) } {
                    return Some(waiting.done as i32);
                }
            }
            _ => unreachable!("only socket operations come here"),
        }
    }
}

/// Whether an accept on `fd` returns without blocking: the listener is itself non-blocking
/// (EAGAIN then), or a connection is pending.
fn accept_would_not_block(fd: RawFd) -> bool {
    // SAFETY: no memory arguments; fd is the operation's own, open while it is held.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || flags & libc::O_NONBLOCK != 0 {
        return true; // the accept reports the error, or EAGAIN
    }
    let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd on the stack, count 1, no wait.
    let ready = unsafe { libc::poll(&mut pollfd, 1, 0) };
    ready != 0 // a pending connection, an error or a hang-up (the accept reports those)
}

/// A send header's iovecs.
///
/// # Safety
/// `msg` must point to a `msghdr` whose `msg_iov` names `msg_iovlen` iovecs, all live (and
/// unchanged) for `'a`.
#[allow(clippy::unnecessary_cast)] // msg_iovlen is a usize on glibc, a c_int on musl
unsafe fn iovecs<'a>(msg: *const libc::msghdr) -> &'a [libc::iovec] {
    // SAFETY: per this function's contract.
    unsafe { std::slice::from_raw_parts((*msg).msg_iov, (*msg).msg_iovlen as usize) }
}

/// Bytes a send header's iovecs hold.
///
/// # Safety
/// As for [`iovecs`].
unsafe fn message_len(msg: *const libc::msghdr) -> usize {
    // SAFETY: per this function's contract.
    unsafe { iovecs(msg) }.iter().map(|iov| iov.iov_len).sum()
}

/// One non-blocking sendmsg of what `msg` holds past its first `done` bytes.
fn send_rest(fd: RawFd, msg: *const libc::msghdr, done: usize) -> i64 {
    // SAFETY: msg is the operation's boxed send header (at most 2 iovecs, see `SendMsg`), kept
    // alive with its prefix and buffer by the cell the caller holds.
    let iovs = unsafe { iovecs(msg) };
    let empty = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
    let mut rest = [empty; 2];
    let (mut count, mut skip) = (0, done);
    for iov in iovs {
        if skip >= iov.iov_len {
            skip -= iov.iov_len;
            continue;
        }
        // SAFETY: skip < iov_len, so the new base stays inside the same iovec's memory.
        let base = unsafe { iov.iov_base.cast::<u8>().add(skip) };
        rest[count] = libc::iovec { iov_base: base.cast(), iov_len: iov.iov_len - skip };
        skip = 0;
        count += 1;
    }
    // SAFETY: msghdr is plain C data; all zero is an empty message (null name, no control).
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = rest.as_mut_ptr();
    header.msg_iovlen = count as _;
    // SAFETY: header and rest are on the stack; the iovecs name parts of the operation's live
    // prefix and buffer; fd is its own SharedFd.
    unsafe { libc::sendmsg(fd, &header, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) as i64 }
}

/// `epoll_ctl` with one event; `Err(errno)` on failure.
fn epoll_ctl(epoll: RawFd, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> Result<(), i32> {
    let mut event = libc::epoll_event { events, u64: token };
    // SAFETY: one event on the stack (ignored by EPOLL_CTL_DEL); both descriptors are open.
    match unsafe { libc::epoll_ctl(epoll, op, fd, &mut event) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)),
    }
}
