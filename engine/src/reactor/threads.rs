//! The thread-pool backend: blocking pread/pwritev2/fsync/fallocate on a bounded set of worker
//! threads, for kernels or sandboxes where io_uring is refused. Same operations, same owned
//! buffers: a worker holds the operation (and so its buffer) until it has completed it.
//!
//! Socket operations (accept4, recv, sendmsg) block their worker, possibly forever on an idle
//! peer. A worker names the socket it blocks on in [`Blocked`]; dropping the pool shuts those
//! sockets down (`shutdown(SHUT_RDWR)` wakes a blocked recv, send or accept) before joining,
//! and refuses socket operations that had not started (`-ECANCELED`).

use super::op::{Described, OpShared, RawKind};
use crate::priority::IoPriority;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::Mutex;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

const IOPRIO_WHO_PROCESS: libc::c_int = 1;
const RWF_DSYNC: libc::c_int = 0x2;

/// Shared by every core of a runtime using this backend.
pub(crate) struct ThreadPool {
    sender: Option<Sender<Arc<OpShared>>>,
    workers: Vec<JoinHandle<()>>,
    blocked: Arc<Blocked>,
}

/// The socket each worker is blocked on, if any, and whether the pool is stopping.
struct Blocked {
    state: Mutex<BlockedState>,
}

struct BlockedState {
    /// Indexed by worker. A descriptor is listed only while its operation (which owns it
    /// through a `SharedFd`) is held by that worker, so it is open whenever it is listed.
    fds: Vec<Option<RawFd>>,
    stopping: bool,
}

impl Blocked {
    /// Worker `index` is about to block on `fd`. False once the pool stops: do not start.
    fn enter(&self, index: usize, fd: RawFd) -> bool {
        let mut state = self.state.lock();
        assert!(state.fds[index].is_none(), "a worker runs one operation at a time");
        if !state.stopping {
            state.fds[index] = Some(fd);
        }
        !state.stopping
    }

    /// Worker `index` returned from its socket call (before completing, which may close fd).
    fn leave(&self, index: usize) {
        self.state.lock().fds[index] = None;
    }

    /// Wake every worker blocked on a socket, and keep later ones from blocking.
    fn stop(&self) {
        let mut state = self.state.lock();
        state.stopping = true;
        for fd in state.fds.iter().flatten() {
            // SAFETY: no memory argument; fd is open while listed (see `fds`), and the lock
            // keeps its worker from completing (and so closing it) until this returns.
            unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
        }
    }
}

impl ThreadPool {
    /// `worker_count` threads, and at most `queue_count_max` operations waiting for one.
    pub(crate) fn new(worker_count: usize, queue_count_max: usize) -> std::io::Result<ThreadPool> {
        assert!(worker_count > 0 && queue_count_max > 0);
        let (sender, receiver) = crossbeam_channel::bounded(queue_count_max);
        let blocked =
            Arc::new(Blocked { state: Mutex::new(BlockedState { fds: vec![None; worker_count], stopping: false }) });
        let mut workers = Vec::with_capacity(worker_count);
        for index in 0..worker_count {
            let receiver: Receiver<Arc<OpShared>> = receiver.clone();
            let worker_blocked = blocked.clone();
            let worker = std::thread::Builder::new()
                .name(format!("tandem-io-{index}"))
                .spawn(move || worker_loop(receiver, &worker_blocked, index))?;
            workers.push(worker);
        }
        Ok(ThreadPool { sender: Some(sender), workers, blocked })
    }

    pub(crate) fn sender(&self) -> Sender<Arc<OpShared>> {
        self.sender.clone().expect("sender lives until drop")
    }
}

impl Drop for ThreadPool {
    /// Closing the queue lets every worker finish what is queued and exit: in-flight disk I/O
    /// drains before the threads are joined; socket operations are woken or refused.
    fn drop(&mut self) {
        self.sender = None;
        self.blocked.stop();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// A core's handle on the pool.
pub(crate) struct ThreadsBackend {
    sender: Sender<Arc<OpShared>>,
}

impl ThreadsBackend {
    pub(crate) fn new(sender: Sender<Arc<OpShared>>) -> ThreadsBackend {
        ThreadsBackend { sender }
    }

    /// Hand one operation to the pool; give it back if the pool's queue is full.
    pub(crate) fn push(&mut self, op: Arc<OpShared>) -> Result<(), Arc<OpShared>> {
        match self.sender.try_send(op) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(op)) | Err(TrySendError::Disconnected(op)) => Err(op),
        }
    }
}

fn worker_loop(receiver: Receiver<Arc<OpShared>>, blocked: &Blocked, index: usize) {
    let mut priority_set = IoPriority::GUEST;
    while let Ok(op) = receiver.recv() {
        let Described { kind, priority, ptr, len, .. } = op.describe(0);
        let submitted_at = std::time::Instant::now();
        if priority != priority_set {
            set_thread_priority(priority);
            priority_set = priority;
        }
        let result = match kind.socket_fd() {
            None => run(kind, ptr, len),
            Some(fd) if blocked.enter(index, fd) => {
                let result = run_socket(kind, ptr, len);
                blocked.leave(index);
                result
            }
            Some(_) => -libc::ECANCELED,
        };
        op.complete(result, |_| Some(submitted_at));
    }
}

fn set_thread_priority(priority: IoPriority) {
    // SAFETY: plain syscall on the calling thread (who 0 = this thread); failure only means
    // the scheduler ignores the class, which is what a missing ioprio means anyway.
    unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, libc::c_int::from(priority.to_ioprio())) };
}

/// Run one operation with a blocking syscall; returns bytes moved or `-errno`.
fn run(kind: RawKind, ptr: *mut u8, len: usize) -> i32 {
    // SAFETY: ptr/len name the operation's own buffer, and fd the operation's own SharedFd,
    // both kept alive by the OpShared the caller holds until it calls complete.
    let ret: i64 = unsafe {
        match kind {
            RawKind::Nop => 0,
            RawKind::Read { fd, offset } => libc::pread(fd, ptr.cast(), len, offset as i64) as i64,
            RawKind::Write { fd, offset, fua } => {
                let iov = libc::iovec { iov_base: ptr.cast(), iov_len: len };
                libc::pwritev2(fd, &iov, 1, offset as i64, if fua { RWF_DSYNC } else { 0 }) as i64
            }
            RawKind::Fsync { fd, datasync: true } => libc::fdatasync(fd) as i64,
            RawKind::Fsync { fd, datasync: false } => libc::fsync(fd) as i64,
            RawKind::Fallocate { fd, mode, offset, length_bytes } => {
                libc::fallocate(fd, mode, offset as i64, length_bytes as i64) as i64
            }
            RawKind::Accept { .. } | RawKind::Recv { .. } | RawKind::Send { .. } => {
                unreachable!("socket operations go through run_socket")
            }
        }
    };
    syscall_result(ret)
}

/// Run one socket operation; retried after EINTR, and after EAGAIN (a non-blocking socket)
/// once poll says it is ready, as io_uring does.
fn run_socket(kind: RawKind, ptr: *mut u8, len: usize) -> i32 {
    loop {
        // SAFETY: ptr/len name the operation's own buffer, msg its own boxed send header, and
        // fd its own SharedFd, all kept alive by the OpShared the caller holds until complete.
        let ret = unsafe {
            match kind {
                RawKind::Accept { fd } => {
                    libc::accept4(fd, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) as i64
                }
                RawKind::Recv { fd, waitall } => {
                    libc::recv(fd, ptr.cast(), len, if waitall { libc::MSG_WAITALL } else { 0 }) as i64
                }
                RawKind::Send { fd, msg } => libc::sendmsg(fd, msg, libc::MSG_NOSIGNAL | libc::MSG_WAITALL) as i64,
                _ => unreachable!("only socket operations"),
            }
        };
        let result = syscall_result(ret);
        match -result {
            libc::EINTR => {}
            libc::EAGAIN => wait_ready(kind),
            _ => return result,
        }
    }
}

/// Block until the operation's socket is ready (or shut down: poll reports that too).
fn wait_ready(kind: RawKind) {
    let (fd, events) = match kind {
        RawKind::Send { fd, .. } => (fd, libc::POLLOUT),
        kind => (kind.socket_fd().expect("a socket operation"), libc::POLLIN),
    };
    let mut pollfd = libc::pollfd { fd, events, revents: 0 };
    // SAFETY: one pollfd on the stack, count 1; fd is the operation's own (see run_socket).
    unsafe { libc::poll(&mut pollfd, 1, -1) };
}

/// A syscall's return as bytes moved (or a descriptor), or `-errno`.
fn syscall_result(ret: i64) -> i32 {
    if ret < 0 {
        -std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
    } else {
        ret.min(i64::from(i32::MAX)) as i32
    }
}
