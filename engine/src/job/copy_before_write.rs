//! The copy-before-write filter a backup puts on its source disk: before a guest write may
//! change a cluster whose point-in-time data is not yet on the target, that data is read from
//! the source and written to the target, in whole clusters, at the guest's priority.
//!
//! Why the target ends equal to the source at the job's start:
//! - `to_copy` marks the clusters whose old data is not yet on the target. A bit is only
//!   ever cleared: after the target write of its cluster completed, or when a snapshot view
//!   releases the cluster (a discard through it, `view.rs`): it is then marked `released`
//!   first, and no reader gets its data from anywhere again, so nothing needs saving.
//! - A guest write that finds every cluster of its range clear goes straight to the source:
//!   their old data is already on the target, and nothing writes it there again.
//! - A guest write that finds a marked cluster registers its cluster-aligned range in the
//!   in-flight table (waiting for copies of the same clusters, which register too), looks
//!   again, saves what is still marked, clears it, and only then writes the source.
//! - The background copier registers a range, copies the clusters still marked in it, and
//!   clears them after their target writes: a guest write to one of them waits for it.

use crate::bitmap::DirtyBitmap;
use crate::block::{BlockDriver, BufResult, IoFuture, WriteFilter, WriteFlags};
use crate::buf::{AlignedBuf, BufPool};
use crate::error::{Error, Result};
use crate::inflight::{InflightKind, InflightTable};
use crate::job::copy::{copy_range, CopyOptions};
use crate::job::pace::LatencyMonitor;
use crate::job::{IoOperation, JobCore};
use crate::priority::IoPriority;
use parking_lot::Mutex;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};

/// What a failed copy-before-write does (QEMU's `on-cbw-error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OnCbwError {
    /// The guest write fails; the snapshot stays whole.
    BreakGuestWrite,
    /// The guest write goes ahead; the backup fails.
    BreakSnapshot,
}

impl OnCbwError {
    pub fn parse(text: &str) -> std::result::Result<OnCbwError, super::JobError> {
        match text {
            "break-guest-write" => Ok(OnCbwError::BreakGuestWrite),
            "break-snapshot" => Ok(OnCbwError::BreakSnapshot),
            _ => Err(super::JobError::Config {
                name: "on-cbw-error",
                value: text.to_string(),
                reason: "break-guest-write or break-snapshot",
            }),
        }
    }
}

/// Operations the in-flight table admits at once (guest writes saving old data, and copies).
const INFLIGHT_CAPACITY: usize = 4096;
/// Save buffers kept for reuse: a fresh buffer per save cost 2.8% of the CPU under a 2000 IOPS
/// guest (page faults and clearing). Beyond it a save allocates its own; what bounds saves is
/// the guests' queue depths, as each save holds one guest write.
const SAVE_POOL_BYTES: usize = 32 << 20;

/// What the filter and the backup's task share.
pub(crate) struct CbwShared {
    pub(crate) core: Arc<JobCore>,
    pub(crate) target: Arc<dyn BlockDriver>,
    /// Clusters whose point-in-time data is not yet on the target (see the module's argument).
    pub(crate) to_copy: DirtyBitmap,
    /// Clusters a snapshot view discarded: no longer part of the point in time, so a view's
    /// read of them fails (set only, under the clusters' registration; see `view.rs`).
    pub(crate) released: DirtyBitmap,
    /// Discard each run on the source once it is on the target (`discard_source`).
    discard_source: bool,
    pub(crate) inflight: InflightTable,
    pub(crate) on_cbw_error: OnCbwError,
    /// How long a guest write may wait for its copy-before-write; then it counts as failed.
    pub(crate) cbw_timeout: Option<Duration>,
    /// Zeros on the target as holes (sync=top) or as allocated zeros.
    pub(crate) unmap: bool,
    /// Zeros as data (sync=bitmap: see `CopyOptions::zeroes_as_data`).
    pub(crate) zeroes_as_data: bool,
    /// A save's largest request (and buffer).
    save_piece_bytes: u64,
    save_bufs: BufPool,
    /// Set once the snapshot is broken: guest writes then pass untouched.
    broken: AtomicBool,
    broken_reason: Mutex<Option<String>>,
    pub(crate) guest_latency: LatencyMonitor,
    /// The job is ending: snapshot views refuse new reads.
    detached: AtomicBool,
    view_reads_in_progress: AtomicU64,
    /// With `verify` on: every cluster a guest request touched since the point in time, marked
    /// before the request reaches the source (so a comparison that read its new data finds
    /// the mark): the source no longer holds the point in time there.
    pub(crate) written_since: OnceLock<DirtyBitmap>,
}

/// A snapshot view's read in progress (see [`CbwShared::view_read`]).
pub(crate) struct ViewRead<'a>(&'a AtomicU64);

impl Drop for ViewRead<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl CbwShared {
    pub(crate) fn new(
        core: Arc<JobCore>,
        target: Arc<dyn BlockDriver>,
        to_copy: DirtyBitmap,
        policy: (OnCbwError, Option<Duration>),
        (unmap, zeroes_as_data): (bool, bool),
        save_piece_bytes: u64,
        discard_source: bool,
    ) -> Arc<CbwShared> {
        assert!(save_piece_bytes > 0);
        let released = DirtyBitmap::new(to_copy.granularity_bytes(), to_copy.size_bytes())
            .expect("the shape of to_copy, which exists");
        let align = target.alignment().memory_bytes as usize;
        let save_bufs = BufPool::new(SAVE_POOL_BYTES, align.max(crate::buf::DEFAULT_ALIGN_BYTES));
        Arc::new(CbwShared {
            core,
            target,
            to_copy,
            released,
            discard_source,
            inflight: InflightTable::new(INFLIGHT_CAPACITY).expect("capacity in range"),
            on_cbw_error: policy.0,
            cbw_timeout: policy.1,
            unmap,
            zeroes_as_data,
            save_piece_bytes,
            save_bufs,
            broken: AtomicBool::new(false),
            broken_reason: Mutex::new(None),
            guest_latency: LatencyMonitor::default(),
            detached: AtomicBool::new(false),
            view_reads_in_progress: AtomicU64::new(0),
            written_since: OnceLock::new(),
        })
    }

    /// Count a snapshot view's read in, unless the job is ending. Ordering as the write gate's:
    /// the reader counts itself then reads the flag, the job sets the flag then reads the
    /// count (all SeqCst), so either the reader backs out or the job waits for it.
    pub(crate) fn view_read(&self) -> Option<ViewRead<'_>> {
        self.view_reads_in_progress.fetch_add(1, Ordering::SeqCst);
        let read = ViewRead(&self.view_reads_in_progress);
        (!self.detached.load(Ordering::SeqCst)).then_some(read)
    }

    /// Refuse new view reads; true once none is in progress.
    pub(crate) fn detach_views(&self) -> bool {
        self.detached.store(true, Ordering::SeqCst);
        self.view_reads_in_progress.load(Ordering::SeqCst) == 0
    }

    /// The snapshot broke: what the source holds is no longer the point in time anywhere.
    pub(crate) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Why the snapshot broke (break-snapshot after a failed copy-before-write), if it did.
    pub(crate) fn broken_reason(&self) -> Option<String> {
        self.broken_reason.lock().clone()
    }

    /// The cluster-aligned span of a request.
    fn clusters(&self, offset: u64, length_bytes: u64) -> (u64, u64) {
        let cluster = self.to_copy.granularity_bytes();
        let start = offset / cluster * cluster;
        let end = (offset + length_bytes).div_ceil(cluster).saturating_mul(cluster).min(self.to_copy.size_bytes());
        (start, end)
    }

    fn any_marked(&self, start: u64, end: u64) -> bool {
        self.to_copy.next_dirty(start).is_some_and(|at| at < end)
    }

    /// Save the old data of every marked cluster the request touches. `Err` fails the guest
    /// write (break-guest-write); under break-snapshot a failure breaks the snapshot instead.
    async fn before_write(&self, below: &Arc<dyn BlockDriver>, offset: u64, length_bytes: u64) -> Result<()> {
        let (start, end) = self.clusters(offset, length_bytes);
        if self.broken.load(Ordering::Acquire) || !self.any_marked(start, end) {
            return Ok(());
        }
        let saved = match self.cbw_timeout {
            Some(limit) => within(limit, self.save(below, start, end)).await,
            None => Some(self.save(below, start, end).await),
        };
        let error = match saved {
            Some(Ok(())) => return Ok(()),
            Some(Err((_, error))) => error,
            None => Error::Io { op: "copy-before-write", offset, errno: libc::ETIMEDOUT },
        };
        match self.on_cbw_error {
            OnCbwError::BreakGuestWrite => Err(error),
            OnCbwError::BreakSnapshot => {
                self.break_snapshot(format!("copy-before-write at offset {offset} failed: {error}"));
                Ok(())
            }
        }
    }

    fn break_snapshot(&self, reason: String) {
        self.broken_reason.lock().get_or_insert(reason);
        self.broken.store(true, Ordering::Release);
        self.core.signal.notify();
    }

    /// Register `[start, end)`, then copy what is still marked in it and clear it.
    async fn save(
        &self,
        below: &Arc<dyn BlockDriver>,
        start: u64,
        end: u64,
    ) -> std::result::Result<(), (IoOperation, Error)> {
        let guard = self
            .inflight
            .register(start, end - start, InflightKind::CopyBeforeWrite)
            .await
            // The table's waiting list is full: guest writes pile up far beyond any device's depth.
            .map_err(|_| {
                (IoOperation::Read, Error::Io { op: "copy-before-write", offset: start, errno: libc::EBUSY })
            })?;
        // One buffer of at most a piece: a discard of the whole disk saves it all, a piece at
        // a time, without asking for memory the size of the request.
        let piece_bytes = (end - start).min(self.save_piece_bytes);
        let buf = self.save_buf(below, piece_bytes as usize).map_err(|error| (IoOperation::Read, error))?;
        let (result, _) = self.copy_marked(below, (start, end, piece_bytes), vec![buf], IoPriority::GUEST).await;
        drop(guard);
        result
    }

    /// A save buffer from the pool, or a fresh one if the pool is spent or the source wants
    /// a stricter alignment than the target.
    fn save_buf(&self, below: &Arc<dyn BlockDriver>, len: usize) -> Result<AlignedBuf> {
        let align = below.alignment().memory_bytes as usize;
        match self.save_bufs.get(len) {
            Ok(buf) if buf.align() >= align => Ok(buf),
            _ => AlignedBuf::zeroed(len, align.max(self.save_bufs.align())),
        }
    }

    /// Copy the marked clusters of `[start, end)` (registered by the caller) in requests of
    /// at most `piece_bytes`, and clear each run after its target write. `bufs` (see
    /// `copy_range`) come back.
    pub(crate) async fn copy_marked(
        &self,
        below: &Arc<dyn BlockDriver>,
        (start, end, piece_bytes): (u64, u64, u64),
        mut bufs: Vec<AlignedBuf>,
        priority: IoPriority,
    ) -> (std::result::Result<(), (IoOperation, Error)>, Vec<AlignedBuf>) {
        let mut at = start;
        while let Some((offset, length_bytes)) = self.to_copy.next_dirty_area(at, end - at) {
            if offset >= end {
                break;
            }
            let length_bytes = length_bytes.min(end - offset);
            let options =
                CopyOptions { unmap: self.unmap, detect_zeroes: true, zeroes_as_data: self.zeroes_as_data, priority };
            let range = (offset, length_bytes, piece_bytes);
            let (result, back) = copy_range(below.clone(), self.target.clone(), range, bufs, options).await;
            bufs = back;
            if result.is_err() {
                return (result, bufs);
            }
            self.to_copy.reset(offset, length_bytes).expect("a marked area is inside the bitmap");
            self.core.add_done_bytes(length_bytes);
            if let Err(error) = self.discard_copied(below, offset, length_bytes, priority).await {
                return (Err((IoOperation::Read, error)), bufs);
            }
            at = offset + length_bytes;
        }
        (Ok(()), bufs)
    }

    /// With `discard_source`, discard a run on the source now that its target write landed
    /// (QEMU's block-copy does the same after each copy). Its failure is the caller's source
    /// error: the data is safe on the target, but the space the user asked back is not given,
    /// and the run is not retried (it is no longer marked).
    async fn discard_copied(
        &self,
        below: &Arc<dyn BlockDriver>,
        offset: u64,
        length_bytes: u64,
        priority: IoPriority,
    ) -> Result<()> {
        if !self.discard_source {
            return Ok(());
        }
        below.discard(offset, length_bytes, priority).await?;
        self.core.update_info(|info| {
            info.discarded_source_bytes += length_bytes;
            assert!(info.discarded_source_bytes <= self.to_copy.size_bytes(), "each run is discarded once");
        });
        Ok(())
    }
}

/// `future`'s output, or `None` if `limit` passes first (the future is then dropped: its
/// registration ends, and a target write already under way lands old data, which is harmless).
async fn within<F: Future>(limit: Duration, future: F) -> Option<F::Output> {
    let deadline = crate::reactor::sleep(limit);
    let (mut future, mut deadline) = (std::pin::pin!(future), std::pin::pin!(deadline));
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// The filter the backup puts on its source.
pub(crate) struct CbwFilter(pub(crate) Arc<CbwShared>);

impl CbwFilter {
    /// Save old data, then run `write` with `payload` (the guest's request on the source),
    /// or hand the payload back with the error; timing it all.
    fn guarded<P: Send + 'static, T: Send + 'static, F: Future<Output = T> + Send + 'static>(
        &self,
        below: &Arc<dyn BlockDriver>,
        (offset, length_bytes): (u64, u64),
        payload: P,
        write: impl FnOnce(Arc<dyn BlockDriver>, P) -> F + Send + 'static,
        refuse: impl FnOnce(P, Error) -> T + Send + 'static,
    ) -> impl Future<Output = T> + Send + 'static {
        let (shared, below) = (self.0.clone(), below.clone());
        async move {
            let started = Instant::now();
            let outcome = match shared.before_write(&below, offset, length_bytes).await {
                Ok(()) => {
                    if let Some(written) = shared.written_since.get() {
                        written.set(offset, length_bytes).expect("the disk checked the range");
                    }
                    write(below, payload).await
                }
                Err(error) => refuse(payload, error),
            };
            shared.guest_latency.record(started.elapsed());
            outcome
        }
    }
}

impl WriteFilter for CbwFilter {
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
        let range = (offset, buf.len() as u64);
        let write = move |below: Arc<dyn BlockDriver>, buf| below.write(offset, buf, flags, priority);
        IoFuture::boxed(self.guarded(below, range, buf, write, |buf, error| (Err(error), buf)))
    }

    fn write_zeroes(
        &self,
        below: &Arc<dyn BlockDriver>,
        offset: u64,
        length_bytes: u64,
        may_unmap: bool,
        priority: IoPriority,
    ) -> IoFuture<Result<()>> {
        let write =
            move |below: Arc<dyn BlockDriver>, ()| below.write_zeroes(offset, length_bytes, may_unmap, priority);
        IoFuture::boxed(self.guarded(below, (offset, length_bytes), (), write, |(), error| Err(error)))
    }

    fn discard(
        &self,
        below: &Arc<dyn BlockDriver>,
        offset: u64,
        length_bytes: u64,
        priority: IoPriority,
    ) -> IoFuture<Result<()>> {
        let write = move |below: Arc<dyn BlockDriver>, ()| below.discard(offset, length_bytes, priority);
        IoFuture::boxed(self.guarded(below, (offset, length_bytes), (), write, |(), error| Err(error)))
    }
}
