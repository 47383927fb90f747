//! The guest's write path while a mirror runs, and the state it shares with the job's task.
//!
//! Per copy mode in force when the guest's request arrives:
//! - background: the request goes to the source; its chunks are marked dirty once it is done.
//! - write-blocking: registered in the in-flight table, written to source and target at once
//!   (from a copy of the data); the guest hears back after both.
//! - write-behind: a slice of the write-behind budget is taken (waiting at the bound), the
//!   request is registered and written to the source, and the guest hears back; the target
//!   write follows in its own task, which holds the registration and budget until it is done.
//!
//! A target failure in an active mode marks the chunks dirty (the copier redoes them) and is
//! handed to the job's target error policy; the guest's request still succeeds, as its data is
//! safe on the source.

use super::{CopyMode, VerifyMode};
use crate::bitmap::DirtyBitmap;
use crate::block::{BlockDriver, BufResult, Disk, IoFuture, WriteFilter, WriteFlags};
use crate::buf::AlignedBuf;
use crate::error::{Error, Result};
use crate::inflight::{InflightKind, InflightTable};
use crate::job::copy::both;
use crate::job::pace::LatencyMonitor;
use crate::job::{IoOperation, JobCore};
use crate::priority::IoPriority;
use crate::reactor::RuntimeHandle;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

/// Operations the in-flight table admits at once (guest writes in active modes plus copies).
const INFLIGHT_CAPACITY: usize = 4096;
/// Target failures kept for the job's task to act on; more are counted but not kept (each
/// one's chunks are already dirty again, and one is enough to apply the policy).
const FAILURES_KEPT_MAX: usize = 64;

/// The copy mode a user asked for, and the one in force (they differ only under `Auto`).
pub(crate) struct ModeCell {
    requested: AtomicU8,
    in_force: AtomicU8,
}

fn mode_code(mode: CopyMode) -> u8 {
    mode as u8
}

fn mode_from(code: u8) -> CopyMode {
    match code {
        0 => CopyMode::Background,
        1 => CopyMode::WriteBlocking,
        2 => CopyMode::WriteBehind,
        _ => CopyMode::Auto,
    }
}

impl ModeCell {
    pub(crate) fn new(mode: CopyMode) -> ModeCell {
        let in_force = if mode == CopyMode::Auto { CopyMode::Background } else { mode };
        ModeCell { requested: AtomicU8::new(mode_code(mode)), in_force: AtomicU8::new(mode_code(in_force)) }
    }

    /// A user's change: takes effect for the next guest request. Auto restarts in background.
    pub(crate) fn request(&self, mode: CopyMode) {
        self.requested.store(mode_code(mode), Ordering::Release);
        let in_force = if mode == CopyMode::Auto { CopyMode::Background } else { mode };
        self.in_force.store(mode_code(in_force), Ordering::Release);
    }

    pub(crate) fn requested(&self) -> CopyMode {
        mode_from(self.requested.load(Ordering::Acquire))
    }

    pub(crate) fn in_force(&self) -> CopyMode {
        mode_from(self.in_force.load(Ordering::Acquire))
    }

    /// Auto's own switch; ignored if the user has since asked for another mode.
    pub(crate) fn auto_switch(&self, to: CopyMode) {
        debug_assert!(to != CopyMode::Auto);
        if self.requested() == CopyMode::Auto {
            self.in_force.store(mode_code(to), Ordering::Release);
        }
    }
}

/// A failure on the target (or source) the job's task has to apply its policy to.
pub(crate) struct Failure {
    pub(crate) operation: IoOperation,
    pub(crate) error: Error,
}

/// What the job's task and the guest's write path share.
pub(crate) struct MirrorShared {
    pub(crate) core: Arc<JobCore>,
    pub(crate) source: Disk,
    pub(crate) target: Arc<dyn BlockDriver>,
    /// The job's own dirty bitmap (not one of the disk's named ones).
    pub(crate) dirty: DirtyBitmap,
    pub(crate) inflight: InflightTable,
    pub(crate) mode: Arc<ModeCell>,
    pub(crate) behind: Arc<Budget>,
    /// Guest requests in progress that started in background mode.
    pub(crate) background_in_progress: AtomicU64,
    /// Guest requests seen since the job started (auto mode watches it).
    pub(crate) guest_request_count: AtomicU64,
    pub(crate) failures: Mutex<VecDeque<Failure>>,
    pub(crate) runtime: RuntimeHandle,
    /// What the guest's requests take, as the filter sees them (for guest-first pacing).
    pub(crate) guest_latency: LatencyMonitor,
    pub(crate) verify_mode: VerifyMode,
    /// With `verify` on: what is still to compare (see `verify.rs`)...
    pub(crate) verify_todo: Option<DirtyBitmap>,
    /// ...marked by every change to the target once verification started.
    pub(crate) verifying: AtomicBool,
}

/// The verification's bitmap, with `verify` on: chunks of the mirror's granularity, at most
/// one comparison run.
fn verify_todo(config: &super::MirrorConfig, size_bytes: u64) -> Option<DirtyBitmap> {
    let granularity_bytes = config.granularity_bytes.min(crate::job::verify::RUN_BYTES_MAX);
    let todo = (config.verify != VerifyMode::Off).then(|| DirtyBitmap::new(granularity_bytes, size_bytes));
    todo.map(|todo| todo.expect("the mirror's own granularity was checked"))
}

impl MirrorShared {
    pub(crate) fn new(
        core: Arc<JobCore>,
        source: Disk,
        target: Arc<dyn BlockDriver>,
        dirty: DirtyBitmap,
        mode: Arc<ModeCell>,
        config: &super::MirrorConfig,
        runtime: &RuntimeHandle,
    ) -> Arc<MirrorShared> {
        let source_size_bytes = source.size_bytes();
        Arc::new(MirrorShared {
            core,
            source,
            target,
            dirty,
            inflight: InflightTable::new(INFLIGHT_CAPACITY).expect("capacity in range"),
            mode,
            behind: Arc::new(Budget::new(config.write_behind_bytes_max)),
            background_in_progress: AtomicU64::new(0),
            guest_request_count: AtomicU64::new(0),
            failures: Mutex::new(VecDeque::new()),
            runtime: runtime.clone(),
            guest_latency: LatencyMonitor::default(),
            verify_mode: config.verify,
            verify_todo: verify_todo(config, source_size_bytes),
            verifying: AtomicBool::new(false),
        })
    }

    /// A change to the target's `[offset, offset + length_bytes)` completed: while verifying,
    /// compare it (again).
    pub(crate) fn verify_mark(&self, offset: u64, length_bytes: u64) {
        if !self.verifying.load(Ordering::Acquire) {
            return;
        }
        let todo = self.verify_todo.as_ref().expect("verifying only with a todo bitmap");
        todo.set(offset, length_bytes).expect("a checked range is inside the bitmap");
    }

    /// Mark a range dirty (after a guest write landed, or a copy or target write failed).
    pub(crate) fn mark_dirty(&self, offset: u64, length_bytes: u64) {
        // Offsets come from checked requests or from the bitmap itself: always in range.
        self.dirty.set(offset, length_bytes).expect("a checked range is inside the bitmap");
    }

    pub(crate) fn fail(&self, operation: IoOperation, error: Error) {
        let mut failures = self.failures.lock();
        if failures.len() < FAILURES_KEPT_MAX {
            failures.push_back(Failure { operation, error });
        }
        drop(failures);
        self.core.signal.notify();
    }

    pub(crate) fn take_failure(&self) -> Option<Failure> {
        self.failures.lock().pop_front()
    }
}

/// The filter the job puts on the source disk.
pub(crate) struct MirrorFilter(pub(crate) Arc<MirrorShared>);

/// A guest request as the filter replays it on the target.
enum GuestOp {
    Write(AlignedBuf, WriteFlags),
    Zeroes(bool),
    Discard,
}

impl GuestOp {
    async fn apply(
        self,
        driver: &Arc<dyn BlockDriver>,
        offset: u64,
        length_bytes: u64,
        priority: IoPriority,
    ) -> (Result<()>, GuestOp) {
        match self {
            GuestOp::Write(buf, flags) => {
                let (result, buf) = driver.write(offset, buf, flags, priority).await;
                (result, GuestOp::Write(buf, flags))
            }
            GuestOp::Zeroes(may_unmap) => {
                (driver.write_zeroes(offset, length_bytes, may_unmap, priority).await, GuestOp::Zeroes(may_unmap))
            }
            GuestOp::Discard => (driver.discard(offset, length_bytes, priority).await, GuestOp::Discard),
        }
    }

    /// The same request with its own copy of the data (write-behind returns the guest's
    /// buffer before the target write).
    fn duplicate(&self) -> Result<GuestOp> {
        Ok(match self {
            GuestOp::Write(buf, flags) => GuestOp::Write(AlignedBuf::from_slice(buf.as_slice(), buf.align())?, *flags),
            GuestOp::Zeroes(may_unmap) => GuestOp::Zeroes(*may_unmap),
            GuestOp::Discard => GuestOp::Discard,
        })
    }
}

/// Counts a background-mode request while it is in progress.
struct BackgroundCount<'a>(&'a AtomicU64);

impl Drop for BackgroundCount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn background(
    shared: &MirrorShared,
    below: &Arc<dyn BlockDriver>,
    request: (u64, u64, GuestOp, IoPriority),
) -> (Result<()>, GuestOp) {
    let (offset, length_bytes, op, priority) = request;
    shared.background_in_progress.fetch_add(1, Ordering::AcqRel);
    let _counted = BackgroundCount(&shared.background_in_progress);
    let (result, op) = op.apply(below, offset, length_bytes, priority).await;
    // After the source has it (or failed: a spare copy is harmless), so a copy that read
    // before it landed is followed by another.
    shared.mark_dirty(offset, length_bytes);
    (result, op)
}

async fn write_blocking(
    shared: &MirrorShared,
    below: &Arc<dyn BlockDriver>,
    request: (u64, u64, GuestOp, IoPriority),
) -> (Result<()>, GuestOp) {
    let (offset, length_bytes, op, priority) = request;
    let Ok(guard) = shared.inflight.register(offset, length_bytes, InflightKind::GuestWrite).await else {
        return background(shared, below, (offset, length_bytes, op, priority)).await;
    };
    // Source and target at once: the guest waits for the slower of the two, not their sum.
    // The registration orders overlapping requests; a copy of the data lets both run.
    let Ok(target_op) = op.duplicate() else {
        return write_blocking_in_turn(shared, below, (offset, length_bytes, op, priority), guard).await;
    };
    let ((result, op), (target_result, _)) = both(
        op.apply(below, offset, length_bytes, priority),
        target_op.apply(&shared.target, offset, length_bytes, priority),
    )
    .await;
    if result.is_err() {
        // The target may hold data the source lacks: the copier makes them equal again.
        shared.mark_dirty(offset, length_bytes);
    } else if let Err(error) = target_result {
        shared.mark_dirty(offset, length_bytes);
        shared.fail(IoOperation::Write, error);
    }
    drop(guard);
    (result, op)
}

/// Write-blocking without a second buffer (no memory for the copy): source, then target.
async fn write_blocking_in_turn(
    shared: &MirrorShared,
    below: &Arc<dyn BlockDriver>,
    request: (u64, u64, GuestOp, IoPriority),
    guard: crate::inflight::InflightGuard,
) -> (Result<()>, GuestOp) {
    let (offset, length_bytes, op, priority) = request;
    let (result, op) = op.apply(below, offset, length_bytes, priority).await;
    if result.is_err() {
        shared.mark_dirty(offset, length_bytes);
        return (result, op);
    }
    let (target_result, op) = op.apply(&shared.target, offset, length_bytes, priority).await;
    if let Err(error) = target_result {
        shared.mark_dirty(offset, length_bytes);
        shared.fail(IoOperation::Write, error);
    }
    drop(guard);
    (result, op)
}

async fn write_behind(
    shared: &Arc<MirrorShared>,
    below: &Arc<dyn BlockDriver>,
    request: (u64, u64, GuestOp, IoPriority),
) -> (Result<()>, GuestOp) {
    let (offset, length_bytes, op, priority) = request;
    let reservation = shared.behind.reserve(length_bytes).await;
    let Ok(guard) = shared.inflight.register(offset, length_bytes, InflightKind::GuestWrite).await else {
        return background(shared, below, (offset, length_bytes, op, priority)).await;
    };
    let (result, op) = op.apply(below, offset, length_bytes, priority).await;
    let target_op = match result.is_ok().then(|| op.duplicate()) {
        Some(Ok(target_op)) => target_op,
        _ => {
            // Source failed, or no memory for the copy: the copier takes over the range.
            shared.mark_dirty(offset, length_bytes);
            return (result, op);
        }
    };
    let task_shared = shared.clone();
    let target_write = async move {
        let (target_result, _) = target_op.apply(&task_shared.target, offset, length_bytes, priority).await;
        if let Err(error) = target_result {
            task_shared.mark_dirty(offset, length_bytes);
            task_shared.fail(IoOperation::Write, error);
        }
        task_shared.verify_mark(offset, length_bytes);
        drop(guard);
        drop(reservation);
    };
    match shared.runtime.on_core() {
        true => crate::reactor::spawn_local(target_write).expect("on a core").detach(),
        false => drop(shared.runtime.spawn(move || target_write)),
    }
    (result, op)
}

impl MirrorFilter {
    fn guest_op(
        &self,
        below: &Arc<dyn BlockDriver>,
        offset: u64,
        length_bytes: u64,
        op: GuestOp,
        priority: IoPriority,
    ) -> impl Future<Output = (Result<()>, GuestOp)> + Send + 'static {
        let (shared, below) = (self.0.clone(), below.clone());
        shared.guest_request_count.fetch_add(1, Ordering::Relaxed);
        async move {
            let started = Instant::now();
            let request = (offset, length_bytes, op, priority);
            let discard = matches!(request.2, GuestOp::Discard);
            let outcome = match shared.mode.in_force() {
                CopyMode::WriteBlocking => write_blocking(&shared, &below, request).await,
                CopyMode::WriteBehind => write_behind(&shared, &below, request).await,
                CopyMode::Background | CopyMode::Auto => background(&shared, &below, request).await,
            };
            shared.guest_latency.record(started.elapsed());
            if discard && shared.verify_mode != VerifyMode::Off {
                // A discard leaves each side's contents to its device: copy to make them equal
                // for the comparison to come (the copier's write reads back as the source).
                shared.mark_dirty(offset, length_bytes);
            }
            shared.verify_mark(offset, length_bytes);
            outcome
        }
    }
}

impl WriteFilter for MirrorFilter {
    fn read(
        &self,
        below: &Arc<dyn BlockDriver>,
        offset: u64,
        buf: AlignedBuf,
        priority: IoPriority,
    ) -> IoFuture<BufResult<()>> {
        let read = below.read(offset, buf, priority);
        crate::job::pace::timed_read(self.0.clone(), |shared| &shared.guest_latency, read)
    }

    fn write(
        &self,
        below: &Arc<dyn BlockDriver>,
        offset: u64,
        buf: AlignedBuf,
        flags: WriteFlags,
        priority: IoPriority,
    ) -> IoFuture<BufResult<()>> {
        let length_bytes = buf.len() as u64;
        let future = self.guest_op(below, offset, length_bytes, GuestOp::Write(buf, flags), priority);
        IoFuture::boxed(async move {
            match future.await {
                (result, GuestOp::Write(buf, _)) => (result, buf),
                _ => unreachable!("a write comes back as a write"),
            }
        })
    }

    fn write_zeroes(
        &self,
        below: &Arc<dyn BlockDriver>,
        offset: u64,
        length_bytes: u64,
        may_unmap: bool,
        priority: IoPriority,
    ) -> IoFuture<Result<()>> {
        let future = self.guest_op(below, offset, length_bytes, GuestOp::Zeroes(may_unmap), priority);
        IoFuture::boxed(async move { future.await.0 })
    }

    fn discard(
        &self,
        below: &Arc<dyn BlockDriver>,
        offset: u64,
        length_bytes: u64,
        priority: IoPriority,
    ) -> IoFuture<Result<()>> {
        let future = self.guest_op(below, offset, length_bytes, GuestOp::Discard, priority);
        IoFuture::boxed(async move { future.await.0 })
    }
}

/// Write-behind's bound on target bytes outstanding. A request larger than the whole budget
/// is let through alone, so nothing waits forever.
pub(crate) struct Budget {
    limit_bytes: u64,
    state: Mutex<BudgetState>,
}

struct BudgetState {
    outstanding_bytes: u64,
    waiters: Vec<Waker>,
}

impl Budget {
    fn new(limit_bytes: u64) -> Budget {
        Budget { limit_bytes, state: Mutex::new(BudgetState { outstanding_bytes: 0, waiters: Vec::new() }) }
    }

    pub(crate) fn outstanding_bytes(&self) -> u64 {
        self.state.lock().outstanding_bytes
    }

    fn reserve(self: &Arc<Self>, bytes: u64) -> Reserve {
        Reserve { budget: self.clone(), bytes }
    }
}

struct Reserve {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Future for Reserve {
    type Output = Reservation;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reservation> {
        let mut state = self.budget.state.lock();
        let fits = state.outstanding_bytes == 0 || state.outstanding_bytes + self.bytes <= self.budget.limit_bytes;
        if fits {
            state.outstanding_bytes += self.bytes;
            return Poll::Ready(Reservation { budget: self.budget.clone(), bytes: self.bytes });
        }
        state.waiters.push(cx.waker().clone());
        Poll::Pending
    }
}

/// Bytes of the write-behind budget, given back on drop.
struct Reservation {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let waiters = {
            let mut state = self.budget.state.lock();
            state.outstanding_bytes -= self.bytes;
            std::mem::take(&mut state.waiters)
        };
        waiters.into_iter().for_each(Waker::wake);
    }
}
