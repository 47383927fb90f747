//! The io_uring backend: one ring per core, created on the core's own thread.
//!
//! Safety contract for everything pushed into the ring (each `unsafe` below names its clause):
//! 1. A submission's `user_data` is either a small token (`TOKEN_*`) or `Arc::into_raw` of the
//!    operation's [`OpShared`]; that strong count is reclaimed exactly once, when its
//!    completion is reaped.
//! 2. Buffer memory named by a submission belongs to that `OpShared`, which clause 1 keeps
//!    alive until the completion is reaped, whatever happened to the future waiting on it.
//! 3. File descriptors stay open until the operations using them complete: an operation can
//!    only name one through a [`SharedFd`](super::fd::SharedFd), which its `OpShared` owns
//!    until `complete` (so a driver dropped mid-flight closes nothing the kernel still uses),
//!    and the ring is only dropped after `drain` saw every operation complete.
//! 4. A send's `msghdr` and iovecs (`SendMsg`) are boxed in its `OpShared` from `describe`
//!    until `complete`, so the addresses the submission names stay valid and unmoved.
//!
//! Shutdown: disk I/O always ends, but a socket operation may wait on an idle peer forever.
//! `drain` therefore cancels the socket operations still in flight after a grace period
//! (they complete with `-ECANCELED`), and only them: disk I/O is still drained to its end.

use super::op::{Described, OpShared, RawKind};
use crate::buf::BufPool;
use crate::error::{Error, Result};
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::HashSet;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN_WAKE_POLL: u64 = 1;
/// user_data of the cancellations `drain` submits: reaped and ignored.
const TOKEN_CANCEL: u64 = 2;
/// How long `drain` lets socket operations finish on their own before cancelling them (and
/// then how often it cancels again what the kernel had not yet armed).
const CANCEL_GRACE: Duration = Duration::from_millis(100);
const RWF_DSYNC: i32 = 0x2;
const IORING_ENTER_GETEVENTS: u32 = 1;

/// Which set-up flags the kernel accepted, for the one log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingFlavor {
    SingleIssuerDeferTaskrun,
    CoopTaskrun,
    Plain,
}

impl RingFlavor {
    pub fn describe(self) -> &'static str {
        match self {
            RingFlavor::SingleIssuerDeferTaskrun => "SINGLE_ISSUER|DEFER_TASKRUN",
            RingFlavor::CoopTaskrun => "COOP_TASKRUN",
            RingFlavor::Plain => "plain flags",
        }
    }
}

/// Ring keys: a registered buffer is used as fixed only on the ring that registered it.
static RING_KEYS: AtomicU64 = AtomicU64::new(1);

pub(crate) struct UringBackend {
    ring: IoUring,
    key: u64,
    pub flavor: RingFlavor,
    wake_fd: RawFd,
    wake_poll_armed: bool,
    /// Operations whose completion is not yet reaped (excludes the wake poll).
    in_flight: usize,
    in_flight_max: usize,
    /// Times the kernel told us the completion queue overflowed and we flushed it.
    pub overflow_flush_count: u64,
    submit_log: SubmitLog,
    /// user_data of the socket operations in flight: what `drain` cancels.
    socket_ops: HashSet<u64>,
}

/// Submission times of recent batches: every operation in a batch shares the timestamp taken
/// when its submission syscall returned (one clock read per batch, not per operation).
struct SubmitLog {
    open_batch: u64,
    times: Box<[Option<Instant>]>,
}

/// Batches remembered; an operation still in flight after this many later batches reports no
/// submission time rather than a wrong one.
const SUBMIT_LOG_COUNT: u64 = 1024;

impl SubmitLog {
    fn new() -> SubmitLog {
        SubmitLog { open_batch: SUBMIT_LOG_COUNT, times: vec![None; SUBMIT_LOG_COUNT as usize].into_boxed_slice() }
    }

    fn close_batch(&mut self, at: Instant) {
        self.times[(self.open_batch % SUBMIT_LOG_COUNT) as usize] = Some(at);
        self.open_batch += 1;
    }

    fn time_of(&self, batch: u64) -> Option<Instant> {
        let recent = batch < self.open_batch && self.open_batch - batch <= SUBMIT_LOG_COUNT;
        recent.then(|| self.times[(batch % SUBMIT_LOG_COUNT) as usize]).flatten()
    }
}

/// Build a ring with the best flags this kernel accepts. EINVAL means "flag unknown": try the
/// next rung; any other error (EPERM, ENOSYS, ENOMEM) is returned as is.
pub(crate) fn build_ring(entries: u32) -> std::io::Result<(IoUring, RingFlavor)> {
    let cq_entries = entries * 2;
    let ladder = [RingFlavor::SingleIssuerDeferTaskrun, RingFlavor::CoopTaskrun, RingFlavor::Plain];
    let mut last_error = None;
    for flavor in ladder {
        let mut builder = IoUring::builder();
        builder.setup_cqsize(cq_entries).setup_clamp();
        match flavor {
            RingFlavor::SingleIssuerDeferTaskrun => {
                builder.setup_single_issuer().setup_defer_taskrun();
            }
            RingFlavor::CoopTaskrun => {
                builder.setup_coop_taskrun().setup_taskrun_flag();
            }
            RingFlavor::Plain => {}
        }
        match builder.build(entries) {
            Ok(ring) => return Ok((ring, flavor)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last_error = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_error.expect("the ladder has rungs"))
}

impl UringBackend {
    pub(crate) fn new(queue_depth: u32, wake_fd: RawFd, io_workers_max: u32) -> Result<UringBackend> {
        let (ring, flavor) = build_ring(queue_depth).map_err(|e| Error::Config {
            name: "io_uring",
            value: format!("{queue_depth} entries"),
            reason: leak_reason(e),
        })?;
        if !ring.params().is_feature_ext_arg() {
            return Err(Error::Config { name: "io_uring", value: "EXT_ARG".into(), reason: "kernel older than 5.11" });
        }
        // Bound io-wq: writes the kernel cannot do inline (extending files, unwritten extents)
        // go to worker threads, whose number otherwise grows with load. Best effort: old
        // kernels lack the call and then keep their own default.
        let mut workers = [io_workers_max, io_workers_max];
        let _ = ring.submitter().register_iowq_max_workers(&mut workers);
        let in_flight_max = ring.params().sq_entries() as usize - 1;
        assert!(ring.params().cq_entries() as usize > in_flight_max + 1, "CQ holds every op in flight");
        let submit_log = SubmitLog::new();
        Ok(UringBackend {
            ring,
            key: RING_KEYS.fetch_add(1, Ordering::Relaxed),
            flavor,
            wake_fd,
            wake_poll_armed: false,
            in_flight: 0,
            in_flight_max,
            overflow_flush_count: 0,
            submit_log,
            socket_ops: HashSet::new(),
        })
    }

    /// Register `pool`'s arena as this ring's buffer 0, so I/O on its buffers skips the
    /// kernel's per-request page pinning. Returns the refusal (e.g. ENOMEM under a small
    /// RLIMIT_MEMLOCK); the pool then keeps working with plain reads and writes.
    pub(crate) fn register_pool(&mut self, pool: &BufPool) -> std::io::Result<()> {
        let Some((base, length_bytes)) = pool.arena() else { return Ok(()) };
        let iovec = libc::iovec { iov_base: base.cast(), iov_len: length_bytes };
        // SAFETY: the arena is one live allocation owned by the pool; the pool outlives every
        // operation that names it as fixed (its buffers hold the pool), and the kernel keeps
        // its own page references for as long as the registration lasts.
        unsafe { self.ring.submitter().register_buffers(&[iovec])? };
        pool.set_fixed_key(self.key);
        Ok(())
    }

    /// Queue one operation into the SQ. Returns it back when the in-flight bound is reached.
    pub(crate) fn push(&mut self, op: Arc<OpShared>) -> std::result::Result<(), Arc<OpShared>> {
        if self.in_flight >= self.in_flight_max {
            return Err(op);
        }
        let described = op.describe(self.submit_log.open_batch);
        let socket = described.kind.socket_fd().is_some();
        let user_data = Arc::into_raw(op) as u64;
        let entry = build_entry(described, self.key).user_data(user_data);
        // SAFETY: clauses 1-4: user_data carries the op's strong count, which keeps its buffer,
        // its send header and its SharedFd alive until the completion is reaped. The SQ cannot
        // be full: unsubmitted entries count in in_flight, which stays below sq_entries - 1,
        // leaving room for the wake poll.
        unsafe { self.ring.submission().push(&entry).expect("SQ sized above in_flight_max") };
        self.in_flight += 1;
        if socket {
            self.socket_ops.insert(user_data);
        }
        Ok(())
    }

    /// Submit what is queued, wait for at least one completion if `wait` (at most `timeout`),
    /// and complete everything reaped. Returns the number of operations completed.
    pub(crate) fn submit_and_reap(&mut self, wait: bool, timeout: Option<Duration>) -> usize {
        let queued = self.ring.submission().len();
        if !wait && queued == 0 && self.in_flight == 0 {
            return 0; // nothing the kernel could tell us: skip the syscall
        }
        if queued > 0 {
            // Submit on its own before any wait, so the batch's submission time is known
            // (completion latency starts there, as fio's clat does).
            let outcome = self.enter(false, None);
            self.submit_log.close_batch(Instant::now());
            report_enter_error(outcome);
        } else if !wait {
            // Nothing to submit, but completions may be waiting to be posted (DEFER_TASKRUN).
            report_enter_error(self.enter(false, None));
        }
        if wait {
            self.arm_wake_poll();
            report_enter_error(self.enter(true, timeout));
        }
        self.reap()
    }

    fn enter(&mut self, wait: bool, timeout: Option<Duration>) -> std::io::Result<usize> {
        let submitter = self.ring.submitter();
        match (wait, timeout) {
            (true, Some(timeout)) => {
                let ts = types::Timespec::from(timeout);
                submitter.submit_with_args(1, &types::SubmitArgs::new().timespec(&ts))
            }
            (true, None) => submitter.submit_and_wait(1),
            (false, _) => {
                let queued = self.ring.submission().len() as u32;
                // GETEVENTS even without waiting: under DEFER_TASKRUN completions are only
                // posted by an enter that asks for events.
                // SAFETY: no argument pointer is passed; the SQ tail was published by push.
                unsafe { self.ring.submitter().enter::<libc::sigset_t>(queued, 0, IORING_ENTER_GETEVENTS, None) }
            }
        }
    }

    fn reap(&mut self) -> usize {
        let mut completed = self.reap_queue();
        while self.flush_overflow() {
            completed += self.reap_queue();
        }
        completed
    }

    fn reap_queue(&mut self) -> usize {
        let mut completed = 0;
        for cqe in self.ring.completion() {
            if cqe.user_data() == TOKEN_WAKE_POLL {
                self.wake_poll_armed = false;
                drain_eventfd(self.wake_fd);
                continue;
            }
            if cqe.user_data() == TOKEN_CANCEL {
                continue; // 0, -ENOENT (already done) or -EALREADY: the op's own CQE tells
            }
            if !self.socket_ops.is_empty() {
                self.socket_ops.remove(&cqe.user_data());
            }
            // SAFETY: clause 1: every other user_data is an Arc::into_raw from `push`, and
            // each completion is reaped exactly once.
            let op = unsafe { Arc::from_raw(cqe.user_data() as *const OpShared) };
            self.in_flight -= 1;
            let log = &self.submit_log;
            op.complete(cqe.result(), |batch| log.time_of(batch));
            completed += 1;
        }
        completed
    }

    /// The kernel keeps completions that did not fit in the CQ (FEAT_NODROP) and hands them
    /// over only on an enter with GETEVENTS. Returns whether it flushed.
    fn flush_overflow(&mut self) -> bool {
        if !self.ring.submission().cq_overflow() {
            return false;
        }
        if self.overflow_flush_count == 0 {
            // The in-flight bound should make this impossible: say so once if it happens.
            crate::log::line("completion queue overflowed; flushing the kernel's overflow list");
        }
        self.overflow_flush_count += 1;
        let _ = self.ring.submitter().submit_and_wait(0);
        true
    }

    fn arm_wake_poll(&mut self) {
        if self.wake_poll_armed {
            return;
        }
        let entry =
            opcode::PollAdd::new(types::Fd(self.wake_fd), libc::POLLIN as u32).build().user_data(TOKEN_WAKE_POLL);
        // SAFETY: a poll names no memory; the eventfd lives as long as the core.
        unsafe { self.ring.submission().push(&entry).expect("one slot is kept for the wake poll") };
        self.wake_poll_armed = true;
    }

    /// Reap until nothing is in flight, so the ring can be dropped without the kernel still
    /// owning memory (clause 3). Socket operations still waiting after `CANCEL_GRACE` are
    /// cancelled (again every `CANCEL_GRACE`, for those the kernel had not armed yet).
    pub(crate) fn drain(&mut self) {
        let mut cancel_at = Instant::now() + CANCEL_GRACE;
        while self.in_flight > 0 {
            if Instant::now() >= cancel_at {
                self.cancel_socket_ops();
                cancel_at = Instant::now() + CANCEL_GRACE;
            }
            self.submit_and_reap(true, Some(CANCEL_GRACE));
        }
    }

    /// Queue a cancellation of each socket operation in flight, keeping the wake poll's slot.
    fn cancel_socket_ops(&mut self) {
        let mut sq = self.ring.submission();
        for &user_data in &self.socket_ops {
            if sq.len() + 1 >= sq.capacity() {
                break; // the rest go with the next round
            }
            let builder = types::CancelBuilder::user_data(user_data);
            let entry = opcode::AsyncCancel2::new(builder).build().user_data(TOKEN_CANCEL);
            // SAFETY: a cancellation names no memory (its target is a user_data value); room
            // was checked above.
            unsafe { sq.push(&entry).expect("room checked") };
        }
    }
}

/// Registered buffer index of a pool's arena (each ring registers one arena).
const ARENA_BUF_INDEX: u16 = 0;

fn build_entry(described: Described, ring_key: u64) -> squeue::Entry {
    let Described { kind, priority, ptr, len, fixed_key } = described;
    let ioprio = priority.to_ioprio();
    let fixed = fixed_key == Some(ring_key);
    match kind {
        RawKind::Nop => opcode::Nop::new().build(),
        RawKind::Read { fd, offset } if fixed => {
            opcode::ReadFixed::new(types::Fd(fd), ptr, len as u32, ARENA_BUF_INDEX)
                .offset(offset)
                .ioprio(ioprio)
                .build()
        }
        RawKind::Write { fd, offset, fua } if fixed => {
            opcode::WriteFixed::new(types::Fd(fd), ptr, len as u32, ARENA_BUF_INDEX)
                .offset(offset)
                .ioprio(ioprio)
                .rw_flags(if fua { RWF_DSYNC } else { 0 })
                .build()
        }
        RawKind::Read { fd, offset } => {
            opcode::Read::new(types::Fd(fd), ptr, len as u32).offset(offset).ioprio(ioprio).build()
        }
        RawKind::Write { fd, offset, fua } => opcode::Write::new(types::Fd(fd), ptr, len as u32)
            .offset(offset)
            .ioprio(ioprio)
            .rw_flags(if fua { RWF_DSYNC } else { 0 })
            .build(),
        RawKind::Fsync { fd, datasync } => {
            let flags = if datasync { types::FsyncFlags::DATASYNC } else { types::FsyncFlags::empty() };
            opcode::Fsync::new(types::Fd(fd)).flags(flags).build()
        }
        RawKind::Fallocate { fd, mode, offset, length_bytes } => {
            opcode::Fallocate::new(types::Fd(fd), length_bytes).offset(offset).mode(mode).build()
        }
        // Socket operations carry no I/O priority: their `ioprio` field holds send/recv flags.
        RawKind::Accept { fd } => opcode::Accept::new(types::Fd(fd), std::ptr::null_mut(), std::ptr::null_mut())
            .flags(libc::SOCK_CLOEXEC)
            .build(),
        RawKind::Recv { fd, waitall } => {
            opcode::Recv::new(types::Fd(fd), ptr, len as u32).flags(if waitall { libc::MSG_WAITALL } else { 0 }).build()
        }
        RawKind::Send { fd, msg } => {
            opcode::SendMsg::new(types::Fd(fd), msg).flags((libc::MSG_NOSIGNAL | libc::MSG_WAITALL) as u32).build()
        }
    }
}

fn report_enter_error(outcome: std::io::Result<usize>) {
    let Err(e) = outcome else { return };
    match e.raw_os_error() {
        // Timed out, interrupted, or the kernel wants completions reaped first: unsubmitted
        // entries stay in the SQ and go with the next enter.
        Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN) => {}
        _ => crate::log::line(&format!("io_uring_enter failed: {e}; retrying after reaping")),
    }
}

pub(crate) fn drain_eventfd(fd: RawFd) {
    let mut value = 0u64;
    // SAFETY: reads 8 bytes into a local; the eventfd is non-blocking.
    unsafe { libc::read(fd, (&mut value as *mut u64).cast(), 8) };
}

fn leak_reason(e: std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) => "io_uring_setup refused (EPERM)",
        Some(libc::ENOSYS) => "io_uring_setup missing (ENOSYS)",
        Some(libc::ENOMEM) => "io_uring_setup out of memory (ENOMEM: RLIMIT_MEMLOCK?)",
        Some(libc::EINVAL) => "io_uring_setup rejected every flag set (EINVAL)",
        _ => "io_uring_setup failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::priority::IoPriority;
    use crate::reactor::fd::SharedFd;
    use crate::reactor::op::{Op, OpKind};

    /// The SQE's ioprio field (bytes 2..4 of the 64-byte `io_uring_sqe`).
    fn sqe_ioprio(entry: squeue::Entry) -> u16 {
        // SAFETY: squeue::Entry is a repr(C) wrapper of the 64-byte io_uring_sqe.
        let bytes: [u8; 64] = unsafe { std::mem::transmute(entry) };
        u16::from_ne_bytes([bytes[2], bytes[3]])
    }

    #[test]
    fn priority_reaches_the_sqe() {
        for (priority, expected) in [
            (IoPriority::GUEST, 0),
            (IoPriority::BACKGROUND, (2 << 13) | 7),
            (IoPriority::from_fio(2, 5).unwrap(), (2 << 13) | 5),
        ] {
            let fd = SharedFd::new(std::fs::File::open("/dev/null").unwrap().into());
            for kind in
                [OpKind::Read { fd: fd.clone(), offset: 0 }, OpKind::Write { fd: fd.clone(), offset: 0, fua: true }]
            {
                let op = OpShared::new(Op {
                    kind: kind.clone(),
                    buf: Some(crate::buf::AlignedBuf::zeroed(4096, 4096).unwrap()),
                    priority,
                });
                assert_eq!(sqe_ioprio(build_entry(op.describe(0), 1)), expected, "{kind:?} at {priority}");
            }
        }
    }

    #[test]
    fn submit_log_forgets_old_batches_instead_of_lying() {
        let mut log = SubmitLog::new();
        let first = log.open_batch;
        let at = Instant::now();
        log.close_batch(at);
        assert_eq!(log.time_of(first), Some(at));
        assert_eq!(log.time_of(first + 1), None, "a batch still open has no time");
        for _ in 0..SUBMIT_LOG_COUNT {
            log.close_batch(Instant::now());
        }
        assert_eq!(log.time_of(first), None, "overwritten slot is not reported");
    }
}
