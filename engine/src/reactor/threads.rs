//! The thread-pool backend: blocking pread/pwritev2/fsync/fallocate on a bounded set of worker
//! threads, for kernels or sandboxes where io_uring is refused. Same operations, same owned
//! buffers: a worker holds the operation (and so its buffer) until it has completed it.
//!
//! The workers do disk I/O only. Socket operations (accept4, recv, sendmsg) may wait on an idle
//! peer forever, and a worker waiting there would be lost to the disk (enough idle connections
//! would take them all): [`ThreadsBackend::push`] hands them to the runtime's readiness thread
//! instead (`sockets.rs`: non-blocking attempts, epoll while they would block), which this
//! pool owns and stops on drop, cancelling what still waits (`-ECANCELED`).

use super::op::{Described, OpShared, RawKind};
use super::sockets::{PollerShared, SocketPoller};
use crate::priority::IoPriority;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

const IOPRIO_WHO_PROCESS: libc::c_int = 1;
const RWF_DSYNC: libc::c_int = 0x2;

/// Shared by every core of a runtime using this backend.
pub(crate) struct ThreadPool {
    sender: Option<Sender<Arc<OpShared>>>,
    workers: Vec<JoinHandle<()>>,
    sockets: SocketPoller,
}

impl ThreadPool {
    /// `worker_count` threads, and at most `queue_count_max` operations waiting for one.
    pub(crate) fn new(worker_count: usize, queue_count_max: usize) -> std::io::Result<ThreadPool> {
        assert!(worker_count > 0 && queue_count_max > 0);
        let (sender, receiver) = crossbeam_channel::bounded(queue_count_max);
        let sockets = SocketPoller::new()?;
        let mut workers = Vec::with_capacity(worker_count);
        for index in 0..worker_count {
            let receiver: Receiver<Arc<OpShared>> = receiver.clone();
            let worker =
                std::thread::Builder::new().name(format!("tandem-io-{index}")).spawn(move || worker_loop(receiver))?;
            workers.push(worker);
        }
        Ok(ThreadPool { sender: Some(sender), workers, sockets })
    }

    /// A core's handle on the pool.
    pub(crate) fn backend(&self) -> ThreadsBackend {
        ThreadsBackend { sender: self.sender.clone().expect("sender lives until drop"), sockets: self.sockets.shared() }
    }
}

impl Drop for ThreadPool {
    /// Closing the queue lets every worker finish what is queued and exit: in-flight disk I/O
    /// drains before the threads are joined. Socket operations still waiting are cancelled
    /// when `sockets` drops, after this.
    fn drop(&mut self) {
        self.sender = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// A core's handle on the pool.
pub(crate) struct ThreadsBackend {
    sender: Sender<Arc<OpShared>>,
    sockets: Arc<PollerShared>,
}

impl ThreadsBackend {
    /// Hand one operation to the pool; give it back if the pool's queue is full. A socket
    /// operation goes to the readiness thread instead, which always takes it.
    pub(crate) fn push(&mut self, op: Arc<OpShared>) -> Result<(), Arc<OpShared>> {
        if op.is_socket() {
            self.sockets.submit(op);
            return Ok(());
        }
        match self.sender.try_send(op) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(op)) | Err(TrySendError::Disconnected(op)) => Err(op),
        }
    }
}

fn worker_loop(receiver: Receiver<Arc<OpShared>>) {
    let mut priority_set = IoPriority::GUEST;
    while let Ok(op) = receiver.recv() {
        let Described { kind, priority, ptr, len, .. } = op.describe(0);
        let submitted_at = std::time::Instant::now();
        if priority != priority_set {
            set_thread_priority(priority);
            priority_set = priority;
        }
        let result = run(kind, ptr, len);
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
                unreachable!("socket operations go to the readiness thread")
            }
        }
    };
    syscall_result(ret)
}

/// A syscall's return as bytes moved (or a descriptor), or `-errno`.
fn syscall_result(ret: i64) -> i32 {
    if ret < 0 {
        -std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
    } else {
        ret.min(i64::from(i32::MAX)) as i32
    }
}
