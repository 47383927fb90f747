//! The backup job's task: copies the clusters still marked in `to_copy` in large runs, paced
//! for the guest, while the copy-before-write filter saves what the guest is about to
//! overwrite; applies the error policies and verbs; at the end flushes the target, takes the
//! filter off and concludes.

use super::{BackupConfig, BitmapMode, MovedMarks};
use crate::bitmap::DirtyBitmap;
use crate::block::{BlockDriver, Disk};
use crate::buf::AlignedBuf;
use crate::error::Error;
use crate::inflight::InflightKind;
use crate::job::copy_before_write::CbwShared;
use crate::job::pace::{Pace, WINDOW as PACE_WINDOW};
use crate::job::{IoOperation, JobEvent, JobStatus, RateLimit, StopRequest, SyncMode, VerifyMode};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the task sleeps when it has nothing to do and nobody wakes it.
const IDLE_WAIT: Duration = Duration::from_millis(5);

enum Outcome {
    Done,
    Cancelled,
    Failed(String),
}

struct CopyDone {
    weight_bytes: u64,
    /// `Err(None)`: not attempted (the in-flight table's waiting list was full).
    result: Result<(), Option<(IoOperation, Error)>>,
    bufs: Vec<AlignedBuf>,
}

struct Runner {
    shared: Arc<CbwShared>,
    source: Disk,
    below: Arc<dyn BlockDriver>,
    config: BackupConfig,
    done: Rc<RefCell<Vec<CopyDone>>>,
    copies_in_flight: usize,
    weight_in_flight_bytes: u64,
    free_bufs: Vec<AlignedBuf>,
    buf_align: usize,
    cursor: u64,
    rate: RateLimit,
    pace: Pace,
    pace_window_start: Instant,
    failure: Option<String>,
    /// sync=bitmap: the named bitmap and the marks that moved to the job.
    moved: Option<MovedMarks>,
}

pub(super) async fn run(shared: Arc<CbwShared>, source: Disk, config: BackupConfig, moved: Option<MovedMarks>) {
    let below = source.driver();
    // A page at least: see the mirror's copier on ext4's unaligned direct writes.
    let device_align = below.alignment().memory_bytes.max(shared.target.alignment().memory_bytes);
    let buf_align = (device_align as usize).max(crate::buf::DEFAULT_ALIGN_BYTES);
    let pace = Pace::new(config.copy_priority, config.buf_size_bytes, config.chunk_bytes_max, config.cluster_bytes);
    let mut runner = Runner {
        rate: RateLimit::new(shared.core.speed_bytes_per_s()),
        shared,
        source,
        below,
        done: Rc::default(),
        copies_in_flight: 0,
        weight_in_flight_bytes: 0,
        free_bufs: Vec::new(),
        buf_align,
        cursor: 0,
        pace,
        pace_window_start: Instant::now(),
        failure: None,
        config,
        moved,
    };
    let outcome = runner.main_loop().await;
    runner.finish(outcome).await;
}

impl Runner {
    async fn main_loop(&mut self) -> Outcome {
        self.shared.core.set_status(JobStatus::Running);
        loop {
            let generation = self.shared.core.signal.generation();
            self.reap();
            if let Some(reason) = self.shared.broken_reason() {
                return Outcome::Failed(reason);
            }
            if let Some(message) = self.failure.take() {
                return Outcome::Failed(message);
            }
            if let Some(StopRequest::Cancel { .. }) = self.shared.core.stop_request() {
                return Outcome::Cancelled;
            }
            if self.shared.core.pause_requested() {
                self.pause().await;
                continue;
            }
            if self.pace_window_start.elapsed() >= PACE_WINDOW {
                self.pace.adjust(&self.shared.guest_latency);
                self.pace_window_start = Instant::now();
            }
            self.rate.set_speed(self.shared.core.speed_bytes_per_s());
            if self.config.sync != SyncMode::None {
                self.start_copies().await;
            }
            self.update_progress();
            let finished = self.shared.to_copy.dirty_chunk_count() == 0 && self.copies_in_flight == 0;
            if finished && self.config.sync != SyncMode::None {
                return Outcome::Done;
            }
            self.shared.core.signal.wait_until(generation, Instant::now() + IDLE_WAIT).await;
        }
    }

    /// Paused by a user or an error policy: let copies finish, then wait. Guest writes keep
    /// saving their old data meanwhile: the point in time cannot wait.
    async fn pause(&mut self) {
        self.wait_for_copies().await;
        self.shared.core.set_status(JobStatus::Paused);
        while self.shared.core.pause_requested() && self.shared.core.stop_request().is_none() {
            let generation = self.shared.core.signal.generation();
            if !self.shared.core.pause_requested() {
                break;
            }
            self.shared.core.signal.wait_until(generation, Instant::now() + Duration::from_secs(1)).await;
        }
        self.shared.core.set_status(JobStatus::Running);
    }

    /// Start copies of marked runs while ops and the pace's budget allow. Bits are cleared
    /// only once a run is on the target, so the cursor (not the bitmap) keeps a run from being
    /// taken twice; it starts over only when no copy is in flight.
    async fn start_copies(&mut self) {
        if self.pace.holding() {
            return;
        }
        let (budget_bytes, chunk_bytes, piece_bytes) =
            (self.pace.budget_bytes(), self.pace.chunk_bytes(), self.pace.piece_bytes());
        let pipelined = piece_bytes < chunk_bytes;
        while self.copies_in_flight < self.config.workers_max {
            let core = &self.shared.core;
            if core.pause_requested() || core.stop_request().is_some() {
                break;
            }
            let room_bytes = budget_bytes.min(self.config.buf_size_bytes).saturating_sub(self.weight_in_flight_bytes);
            let length_max = match pipelined {
                true if room_bytes < 2 * piece_bytes => break,
                true => chunk_bytes,
                false if room_bytes < self.config.cluster_bytes.min(chunk_bytes) => break,
                false => chunk_bytes.min(room_bytes),
            };
            let Some((offset, length_bytes)) = self.next_area(length_max) else { break };
            self.cursor = offset + length_bytes;
            let wait = self.rate.grant(length_bytes, Instant::now());
            if !wait.is_zero() {
                crate::reactor::sleep(wait).await;
            }
            self.spawn_copy(offset, length_bytes, piece_bytes);
        }
    }

    /// The next marked run at or after the cursor; from the start again once nothing is in
    /// flight (runs behind the cursor then were copied, or failed and are due again).
    fn next_area(&mut self, length_max: u64) -> Option<(u64, u64)> {
        let to_copy = &self.shared.to_copy;
        if self.cursor < to_copy.size_bytes() {
            if let Some(area) = to_copy.next_dirty_area(self.cursor, length_max) {
                return Some(area);
            }
        }
        if self.copies_in_flight > 0 {
            return None;
        }
        self.cursor = 0;
        to_copy.next_dirty_area(0, length_max)
    }

    /// Copy what is still marked of a run in its own task: it registers the run (waiting for
    /// guest writes saving the same clusters), then copies, pipelined in two buffers of
    /// `piece_bytes` if the run is longer.
    fn spawn_copy(&mut self, offset: u64, length_bytes: u64, piece_bytes: u64) {
        let (buf_count, buf_bytes, weight_bytes) = match piece_bytes < length_bytes {
            true => (2, piece_bytes, 2 * piece_bytes),
            false => (1, self.config.chunk_bytes_max, length_bytes),
        };
        let bufs: Result<Vec<AlignedBuf>, Error> = (0..buf_count).map(|_| self.take_buf(buf_bytes)).collect();
        let bufs = match bufs {
            Ok(bufs) => bufs,
            Err(error) => {
                self.failure = Some(format!("cannot allocate a copy buffer: {error}"));
                return;
            }
        };
        let priority = self.config.copy_priority.io_priority();
        let (shared, below, done) = (self.shared.clone(), self.below.clone(), self.done.clone());
        let task = async move {
            let (result, bufs) = match shared.inflight.register(offset, length_bytes, InflightKind::Copy).await {
                Ok(guard) => {
                    let range = (offset, offset + length_bytes, piece_bytes);
                    let (result, bufs) = shared.copy_marked(&below, range, bufs, priority).await;
                    drop(guard);
                    (result.map_err(Some), bufs)
                }
                Err(_) => (Err(None), bufs),
            };
            done.borrow_mut().push(CopyDone { weight_bytes, result, bufs });
            shared.core.signal.notify();
        };
        crate::reactor::spawn_local(task).expect("the backup task runs on a reactor core").detach();
        self.copies_in_flight += 1;
        self.weight_in_flight_bytes += weight_bytes;
    }

    /// The smallest free buffer of at least `len` bytes, or a new one from the core's pool
    /// (its registered arena first), or the heap.
    fn take_buf(&mut self, len: u64) -> crate::error::Result<AlignedBuf> {
        let fitting = self.free_bufs.iter().enumerate().filter(|(_, buf)| buf.capacity() as u64 >= len);
        if let Some(index) = fitting.min_by_key(|(_, buf)| buf.capacity()).map(|(index, _)| index) {
            return Ok(self.free_bufs.swap_remove(index));
        }
        let pooled = crate::reactor::current_buf_pool()
            .filter(|_| self.buf_align <= crate::buf::DEFAULT_ALIGN_BYTES)
            .and_then(|pool| pool.get(len as usize).ok());
        match pooled {
            Some(buf) => Ok(buf),
            None => AlignedBuf::zeroed(len as usize, self.buf_align),
        }
    }

    /// Account finished copies and apply the error policies; a failed run stays marked.
    fn reap(&mut self) {
        let finished = std::mem::take(&mut *self.done.borrow_mut());
        for copy in finished {
            self.copies_in_flight -= 1;
            self.weight_in_flight_bytes -= copy.weight_bytes;
            let kept_bytes: u64 = self.free_bufs.iter().map(|buf| buf.capacity() as u64).sum();
            for buf in copy.bufs {
                if kept_bytes + buf.capacity() as u64 <= self.config.buf_size_bytes {
                    self.free_bufs.push(buf);
                }
            }
            if let Err(Some((operation, error))) = copy.result {
                self.on_error(operation, error);
            }
        }
    }

    fn on_error(&mut self, operation: IoOperation, error: Error) {
        let policy = match operation {
            IoOperation::Read => self.config.on_source_error,
            IoOperation::Write => self.config.on_target_error,
        };
        if let Some(message) = self.shared.core.apply_error(operation, policy.action(&error), &error) {
            self.failure.get_or_insert(message);
        }
    }

    async fn wait_for_copies(&mut self) {
        while self.copies_in_flight > 0 {
            let generation = self.shared.core.signal.generation();
            self.reap();
            if self.copies_in_flight == 0 {
                break;
            }
            self.shared.core.signal.wait_until(generation, Instant::now() + IDLE_WAIT).await;
        }
    }

    fn update_progress(&self) {
        self.shared.core.set_remaining_bytes(self.shared.to_copy.dirty_bytes());
    }

    /// Conclude: on success flush the target, wait for finalize; in every case take the
    /// filter off (after the guest writes in progress) and report.
    async fn finish(&mut self, outcome: Outcome) {
        self.wait_for_copies().await;
        let core = self.shared.core.clone();
        let outcome = match outcome {
            Outcome::Done => self.conclude_success().await,
            other => other,
        };
        self.detach().await;
        let succeeded = matches!(outcome, Outcome::Done);
        if !succeeded {
            // What `always` keeps as copied must be durable on the target (best effort: a
            // failed flush is already part of the failure being reported).
            drop(self.shared.target.flush(self.config.copy_priority.io_priority()).await);
            // A chain may not start from a full backup that did not finish.
            if let Some(name) = &self.config.new_bitmap {
                drop(self.source.bitmaps().remove(name));
            }
        }
        self.settle_bitmap(succeeded);
        let (id, kind, figures) = (core.id.clone(), core.kind, core.figures());
        // Reported whatever the outcome: a failed fallback still tells why it copied it all.
        let fallback = core.info().fallback;
        match outcome {
            Outcome::Done => core.emit(JobEvent::Completed { id, kind, figures, error: None, fallback }),
            Outcome::Cancelled => {
                self.to_aborting();
                core.emit(JobEvent::Cancelled { id, kind, figures });
            }
            Outcome::Failed(message) => {
                self.to_aborting();
                core.set_error(message.clone());
                core.emit(JobEvent::Completed { id, kind, figures, error: Some(message), fallback });
            }
        }
        core.set_status(JobStatus::Concluded);
        if core.auto_dismiss() {
            core.set_status(JobStatus::Null);
        }
    }

    /// sync=bitmap: give the named bitmap back what `bitmap_mode` says, then release it. It
    /// has recorded every write since the point in time; the moved marks are what the job was
    /// to copy.
    fn settle_bitmap(&mut self, succeeded: bool) {
        let Some(MovedMarks { lease, marks, fallback }) = self.moved.take() else { return };
        let bitmap = lease.bitmap();
        let mode = self.config.bitmap_mode.unwrap_or(BitmapMode::OnSuccess);
        if fallback {
            settle_fallback(bitmap, &marks, mode, succeeded);
            return;
        }
        match (mode, succeeded) {
            (BitmapMode::OnSuccess | BitmapMode::Always, true) => {}
            (BitmapMode::Never, _) | (BitmapMode::OnSuccess, false) => {
                bitmap.merge(&marks).expect("the marks are a copy of this bitmap");
            }
            // Only what is still to copy comes back, by a merge: a disabled bitmap takes it
            // too (its `set` records nothing, which would lose the marks).
            (BitmapMode::Always, false) => {
                let back = DirtyBitmap::new(marks.granularity_bytes(), marks.size_bytes()).expect("a valid geometry");
                let granularity = marks.granularity_bytes();
                for (offset, length_bytes) in marks.areas() {
                    let mut at = offset;
                    while at < offset + length_bytes {
                        let step_bytes = granularity.min(offset + length_bytes - at);
                        // Any cluster of the step still to copy: the whole step comes back.
                        if self.shared.to_copy.next_dirty(at).is_some_and(|dirty| dirty < at + step_bytes) {
                            back.set(at, step_bytes).expect("inside the bitmap");
                        }
                        at += step_bytes;
                    }
                }
                bitmap.merge(&back).expect("the marks' geometry is the bitmap's");
            }
        }
        drop(lease);
    }

    /// Every cluster is on the target: flush it, then waiting → pending → finalize.
    async fn conclude_success(&mut self) -> Outcome {
        let core = self.shared.core.clone();
        if let Err(error) = self.shared.target.flush(self.config.copy_priority.io_priority()).await {
            return Outcome::Failed(format!("flush of the target: {error}"));
        }
        if self.config.verify != VerifyMode::Off {
            if let Err(end) = self.verify().await {
                return end;
            }
        }
        core.set_status(JobStatus::Waiting);
        core.set_status(JobStatus::Pending);
        while !core.finalize_allowed() {
            let generation = core.signal.generation();
            if let Some(StopRequest::Cancel { .. }) = core.stop_request() {
                return Outcome::Cancelled;
            }
            core.signal.wait_until(generation, Instant::now() + Duration::from_millis(100)).await;
        }
        // The point of no return: a cancel that came first is obeyed, a later one refused.
        match core.commit() {
            Ok(()) => Outcome::Done,
            Err(_) => Outcome::Cancelled,
        }
    }

    /// `verify`: compare the finished target with the point in time (the rules are in
    /// `verify.rs`). A cancel ends it early.
    async fn verify(&mut self) -> Result<(), Outcome> {
        let marks = self.moved.as_ref().filter(|moved| !moved.fallback).map(|moved| &moved.marks);
        let checker = super::verify::Checker::new(&self.shared, &self.below, marks, self.config.cluster_bytes);
        let failed = |message: String| Outcome::Failed(message);
        let mut run = checker.start(self.config.verify).map_err(failed)?;
        loop {
            if let Some(StopRequest::Cancel { .. }) = self.shared.core.stop_request() {
                return Err(Outcome::Cancelled);
            }
            match checker.step(&mut run).await {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(message) => return Err(failed(format!("{message} (disk {})", self.source.name()))),
            }
        }
    }

    /// Take the filter off once the snapshot views' reads and the guest writes in progress
    /// (and their saves) are done.
    async fn detach(&mut self) {
        while !self.shared.detach_views() {
            crate::reactor::sleep(Duration::from_millis(1)).await;
        }
        // Another drain of the disk (a user's) must end first: the filter has to come off.
        let drain = loop {
            match self.source.drain() {
                Some(drain) => break drain,
                None => crate::reactor::sleep(Duration::from_millis(1)).await,
            }
        };
        self.source.remove_filter(&drain.await);
    }

    fn to_aborting(&self) {
        let core = &self.shared.core;
        if core.status() == JobStatus::Paused {
            core.set_status(JobStatus::Running);
        }
        if core.status() != JobStatus::Aborting {
            core.set_status(JobStatus::Aborting);
        }
    }
}

/// The end of a fallback (see `Fallback` in `mod.rs`): the bitmap has recorded every write
/// since the point in time, and is still flagged inconsistent.
fn settle_fallback(bitmap: &DirtyBitmap, old_marks: &DirtyBitmap, mode: BitmapMode, succeeded: bool) {
    match (mode, succeeded) {
        // The whole disk as it was at the point in time is on the target.
        (BitmapMode::OnSuccess | BitmapMode::Always, true) => {}
        // "Never clear the marks", when nobody knows which writes they missed: copy it all.
        // By a merge, which a disabled bitmap takes too (its `set` records nothing).
        (BitmapMode::Never, true) => {
            let all = DirtyBitmap::new(bitmap.granularity_bytes(), bitmap.size_bytes()).expect("a valid geometry");
            all.set(0, all.size_bytes()).expect("the whole bitmap is in range");
            bitmap.merge(&all).expect("the same geometry");
        }
        // As it was found, plus the writes since: untrustworthy, so the next run falls back.
        (_, false) => {
            bitmap.merge(old_marks).expect("the marks are a copy of this bitmap");
            bitmap.set_inconsistent(true);
            return;
        }
    }
    bitmap.set_inconsistent(false);
}
