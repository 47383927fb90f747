//! The mirror job's task: puts the filter on the source, fills the dirty bitmap for the sync
//! mode, then loops: reap finished copies, apply error policies and verbs, start copies from
//! the dirty bitmap in large contiguous runs, report READY. At the end it drains the source,
//! copies what is left and switches over (complete), or just detaches (cancel).

use super::filter::MirrorShared;
use super::verify::{Step, Verifier};
use super::{CopyMode, MirrorConfig, VerifyMode};
use crate::bitmap::BitmapLease;
use crate::block::BlockDriver;
use crate::buf::AlignedBuf;
use crate::error::Error;
use crate::inflight::InflightKind;
use crate::job::copy::{copy_range, fill_bitmap, reads_as_zeros, CopyOptions, CopyResult};
use crate::job::pace::{Pace, WINDOW as PACE_WINDOW};
use crate::job::{ErrorAction, IoOperation, JobEvent, JobStatus, RateLimit, StopRequest, SyncMode, TargetZero};
use crate::reactor::sleep;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

// Deadlines use `Instant::now()`, not the reactor's per-turn clock: this task loops without
// yielding when a wait is already due, so the turn's clock would never move.

/// How long the task sleeps when it has nothing to do and nobody wakes it (a background
/// guest write does not wake it: marking must stay cheap).
const IDLE_WAIT: Duration = Duration::from_millis(5);
/// Auto mode's rule: one window...
pub const AUTO_WINDOW: Duration = Duration::from_millis(500);
/// ...and this many windows in a row, with guest writes, in which the guest dirtied again at
/// least half of what the copier copied (the dirty bytes fell by less than half the bytes
/// copied), switch to write-behind. One window without a guest write switches back.
pub const AUTO_WINDOW_COUNT: u32 = 2;

/// How the main loop ended.
enum Outcome {
    /// Complete (switch over) or a soft cancel after READY (no switch).
    Complete {
        switch_over: bool,
    },
    Cancelled,
    Failed(String),
}

struct CopyDone {
    offset: u64,
    length_bytes: u64,
    /// What the copy counted against the pace's budget.
    weight_bytes: u64,
    /// `Err(None)`: not attempted (the in-flight table's waiting list was full).
    result: Result<(), Option<(IoOperation, Error)>>,
    bufs: Vec<AlignedBuf>,
}

/// Auto mode's observations.
struct AutoState {
    window_start: Instant,
    guest_count_at_start: u64,
    dirty_at_start_bytes: u64,
    done_at_start_bytes: u64,
    stalled_window_count: u32,
}

struct Runner {
    shared: Arc<MirrorShared>,
    config: MirrorConfig,
    source: Arc<dyn BlockDriver>,
    done: Rc<RefCell<Vec<CopyDone>>>,
    copies_in_flight: usize,
    /// The ranges of the copies in flight (for progress)...
    copy_in_flight_bytes: u64,
    /// ...and their weight against the budget (a pipelined copy weighs two pieces).
    weight_in_flight_bytes: u64,
    /// Buffers of finished copies, at most `buf_size_bytes` in all.
    free_bufs: Vec<AlignedBuf>,
    buf_align: usize,
    cursor: u64,
    rate: RateLimit,
    ready: bool,
    failure: Option<String>,
    auto: AutoState,
    reported_mode: (CopyMode, CopyMode),
    /// The named bitmap of sync=bitmap, held until the job's result is out.
    lease: Option<BitmapLease>,
    /// The in-flight budget the guest's latency allows, and when its window started.
    pace: Pace,
    pace_window_start: Instant,
    /// When the last window closed (a probe, if one was called, starts draining then).
    probe_called_at: Instant,
    /// In the final drain every error fails the job: the guest's writes are held back, so
    /// neither retrying forever (ignore) nor waiting for a human (stop) is acceptable.
    converging: bool,
    /// With `verify` on, once `complete` started it.
    verifier: Option<Verifier>,
}

pub(super) async fn run(shared: Arc<MirrorShared>, config: MirrorConfig, lease: Option<BitmapLease>) {
    let source = shared.source.driver();
    // At least a page, though O_DIRECT may accept less: ext4 treats a write whose buffer is
    // not block-aligned as unaligned I/O, which into unwritten (preallocated) extents needs the
    // inode lock exclusively, so io_uring's non-blocking attempt fails and every such write is
    // punted to an io-wq thread (measured: each write of a 2 GiB mirror, about 1/3 of its CPU).
    let device_align = source.alignment().memory_bytes.max(shared.target.alignment().memory_bytes);
    let buf_align = (device_align as usize).max(crate::buf::DEFAULT_ALIGN_BYTES);
    let pace = Pace::new(config.copy_priority, config.buf_size_bytes, config.copy_bytes_max, config.granularity_bytes);
    let mut runner = Runner {
        pace,
        pace_window_start: Instant::now(),
        probe_called_at: Instant::now(),
        rate: RateLimit::new(shared.core.speed_bytes_per_s()),
        auto: AutoState {
            window_start: Instant::now(),
            guest_count_at_start: 0,
            dirty_at_start_bytes: 0,
            done_at_start_bytes: 0,
            stalled_window_count: 0,
        },
        reported_mode: (shared.mode.requested(), shared.mode.in_force()),
        shared,
        config,
        source,
        done: Rc::default(),
        copies_in_flight: 0,
        copy_in_flight_bytes: 0,
        weight_in_flight_bytes: 0,
        free_bufs: Vec::new(),
        buf_align,
        cursor: 0,
        ready: false,
        failure: None,
        lease,
        converging: false,
        verifier: None,
    };
    let outcome = match runner.attach().await {
        Ok(()) => runner.main_loop().await,
        Err(message) => Outcome::Failed(message),
    };
    runner.finish(outcome).await;
}

impl Runner {
    /// The filter went on in `start`; a drain waits out the writes that were in progress then
    /// (they missed it), so none lands after the copy of its range. Then the bitmap is filled.
    async fn attach(&mut self) -> Result<(), String> {
        self.shared.core.set_status(JobStatus::Running);
        let source = &self.shared.source;
        let drain = source.drain().ok_or_else(|| format!("disk {} is being drained by another job", source.name()))?;
        drop(drain.await);
        let target_zero = self.target_zero().await;
        let named = self.lease.as_ref().map(|lease| lease.bitmap().as_ref());
        fill_bitmap(self.config.sync, &self.source, &self.shared.dirty, named, target_zero)
            .await
            .map_err(|e| e.to_string())?;
        self.update_progress();
        // Auto's first window starts with the filled bitmap.
        self.auto.window_start = Instant::now();
        self.auto.dirty_at_start_bytes = self.shared.dirty.dirty_bytes();
        Ok(())
    }

    /// Whether the target reads as zeros before the job writes it: as the caller said, or
    /// (ours) as its block status says. Only full and top copy less for it: none copies only
    /// new writes, and bitmap's target holds an older copy of the source, not zeros.
    async fn target_zero(&self) -> bool {
        if !matches!(self.config.sync, SyncMode::Full | SyncMode::Top) {
            return false;
        }
        let zero = match self.config.target_is_zero {
            Some(is_zero) => TargetZero { is_zero, detected: false },
            None => {
                let size_bytes = self.shared.source.size_bytes();
                TargetZero { is_zero: reads_as_zeros(&self.shared.target, size_bytes).await, detected: true }
            }
        };
        self.shared.core.update_info(|info| info.target_is_zero = Some(zero));
        zero.is_zero
    }

    async fn main_loop(&mut self) -> Outcome {
        loop {
            let generation = self.shared.core.signal.generation();
            self.reap();
            if let Some(message) = self.failure.take() {
                return Outcome::Failed(message);
            }
            match self.shared.core.stop_request() {
                Some(StopRequest::Cancel { force }) if force || !self.ready => return Outcome::Cancelled,
                Some(StopRequest::Cancel { .. }) => return Outcome::Complete { switch_over: false },
                Some(StopRequest::Complete) => return Outcome::Complete { switch_over: true },
                None => {}
            }
            if self.shared.core.pause_requested() {
                self.pause().await;
                continue;
            }
            self.step().await;
            let held = self.pace.holding();
            let wait = if !held && self.copies_in_flight == 0 && self.shared.dirty.dirty_chunk_count() > 0 {
                Duration::ZERO // only a rate limit or active writes held copies back: try again
            } else {
                IDLE_WAIT
            };
            self.shared.core.signal.wait_until(generation, Instant::now() + wait.max(Duration::from_millis(1))).await;
        }
    }

    /// One round of work: copy-mode bookkeeping, new copies, progress, READY.
    async fn step(&mut self) {
        let active = self.shared.mode.in_force().is_active();
        self.pace_tick();
        self.auto_tick();
        self.report_mode();
        self.rate.set_speed(self.shared.core.speed_bytes_per_s());
        self.start_copies(true).await;
        self.update_progress();
        let synced = self.shared.dirty.dirty_chunk_count() == 0 && self.copies_in_flight == 0;
        if synced && !self.ready {
            self.ready = true;
            self.shared.core.set_status(JobStatus::Ready);
            let core = &self.shared.core;
            core.emit(JobEvent::Ready { id: core.id.clone(), kind: core.kind, figures: core.figures() });
        }
        let quiet = self.shared.background_in_progress.load(Ordering::Acquire) == 0;
        self.shared.core.set_actively_synced(self.ready && synced && active && quiet);
    }

    /// Close the pace's window when it is due. A probe window measures the guest alone, so it
    /// starts only once the copies in flight when it was called are done (they take a few ms;
    /// waiting is capped at one more window).
    fn pace_tick(&mut self) {
        let now = Instant::now();
        let draining = self.pace.holding() && self.copies_in_flight > 0;
        if draining && now.duration_since(self.probe_called_at) < PACE_WINDOW {
            self.shared.guest_latency.discard();
            self.pace_window_start = now;
            return;
        }
        if now.duration_since(self.pace_window_start) < PACE_WINDOW {
            return;
        }
        self.pace.adjust(&self.shared.guest_latency);
        self.pace_window_start = now;
        self.probe_called_at = now;
    }

    /// Paused by a user or an error policy: let copies finish, then wait for resume (or an
    /// end). Guest writes keep flowing through the filter meanwhile.
    async fn pause(&mut self) {
        self.wait_for_copies().await;
        let (paused, resumed) = match self.ready {
            true => (JobStatus::Standby, JobStatus::Ready),
            false => (JobStatus::Paused, JobStatus::Running),
        };
        self.shared.core.set_status(paused);
        while self.shared.core.pause_requested() && self.shared.core.stop_request().is_none() {
            let generation = self.shared.core.signal.generation();
            if !self.shared.core.pause_requested() {
                break;
            }
            self.shared.core.signal.wait_until(generation, Instant::now() + Duration::from_secs(1)).await;
        }
        self.shared.core.set_status(resumed);
    }

    /// Start copies from the dirty bitmap while ops and buffer bytes allow.
    async fn start_copies(&mut self, limited: bool) {
        let granularity = self.config.granularity_bytes;
        // Paced copies keep to the guest's budget, chunk and piece sizes; the final drain (the
        // guest is held back) uses everything the options allow.
        let (budget_bytes, chunk_bytes, piece_bytes) = match limited {
            true => (self.pace.budget_bytes(), self.pace.chunk_bytes(), self.pace.piece_bytes()),
            false => (self.config.buf_size_bytes, self.config.copy_bytes_max, self.config.copy_bytes_max),
        };
        let pipelined = piece_bytes < chunk_bytes;
        if limited && self.pace.holding() {
            return;
        }
        while self.copies_in_flight < self.config.copy_ops_max {
            // A pause or an end takes effect between copies, not after a whole batch.
            let core = &self.shared.core;
            if limited && (core.pause_requested() || matches!(core.stop_request(), Some(StopRequest::Cancel { .. }))) {
                break;
            }
            let room_bytes = budget_bytes.min(self.config.buf_size_bytes).saturating_sub(self.weight_in_flight_bytes);
            let length_max = match pipelined {
                true if room_bytes < 2 * piece_bytes => break,
                true => chunk_bytes,
                false if room_bytes < granularity.min(chunk_bytes) => break,
                false => chunk_bytes.min(room_bytes),
            };
            let Some((offset, length_bytes)) = self.next_area(length_max) else { break };
            self.cursor = offset + length_bytes;
            if limited {
                let wait = self.rate.grant(length_bytes, Instant::now());
                if !wait.is_zero() {
                    sleep(wait).await;
                }
            }
            // Cleared before the read (the task reads only after registering): a background
            // write landing after the read marks it again (see the argument in mod.rs).
            self.shared.dirty.reset(offset, length_bytes).expect("an area of the bitmap is inside it");
            self.spawn_copy(offset, length_bytes, piece_bytes);
        }
    }

    /// The next dirty run at or after the cursor, wrapping once to the start.
    fn next_area(&mut self, length_max: u64) -> Option<(u64, u64)> {
        let dirty = &self.shared.dirty;
        if self.cursor >= dirty.size_bytes() {
            self.cursor = 0;
        }
        dirty.next_dirty_area(self.cursor, length_max).or_else(|| {
            self.cursor = 0;
            dirty.next_dirty_area(0, length_max)
        })
    }

    /// Copy a range (its dirty bits already cleared) in its own task. The task registers the
    /// range first, waiting in FIFO order for overlapping active guest writes (so a copy is
    /// never starved by them, and reaches the target after them), then reads and writes:
    /// pipelined in two buffers of `piece_bytes` if the range is longer, else in one buffer.
    fn spawn_copy(&mut self, offset: u64, length_bytes: u64, piece_bytes: u64) {
        let (buf_count, weight_bytes) = match piece_bytes < length_bytes {
            true => (2, 2 * piece_bytes),
            false => (1, length_bytes),
        };
        let buf_bytes = match buf_count {
            2 => piece_bytes,
            _ => self.config.copy_bytes_max,
        };
        let bufs: Result<Vec<AlignedBuf>, Error> = (0..buf_count).map(|_| self.take_buf(buf_bytes)).collect();
        let bufs = match bufs {
            Ok(bufs) => bufs,
            Err(error) => {
                self.shared.mark_dirty(offset, length_bytes);
                self.failure = Some(format!("cannot allocate a copy buffer: {error}"));
                return;
            }
        };
        let options = CopyOptions {
            unmap: self.config.unmap,
            detect_zeroes: self.config.detect_zeroes,
            zeroes_as_data: false,
            priority: self.config.copy_priority.io_priority(),
        };
        let (source, target) = (self.source.clone(), self.shared.target.clone());
        let (done, shared) = (self.done.clone(), self.shared.clone());
        let task = async move {
            let (result, bufs) = match shared.inflight.register(offset, length_bytes, InflightKind::Copy).await {
                Ok(guard) => {
                    let range = (offset, length_bytes, piece_bytes);
                    let (result, bufs): (CopyResult, _) = copy_range(source, target, range, bufs, options).await;
                    drop(guard);
                    (result.map_err(Some), bufs)
                }
                // The table's waiting list is full (guest writes pile up): not copied; the
                // reaper marks the range dirty again.
                Err(_) => (Err(None), bufs),
            };
            done.borrow_mut().push(CopyDone { offset, length_bytes, weight_bytes, result, bufs });
            shared.core.signal.notify();
        };
        let task = crate::reactor::spawn_local(task).expect("the mirror task runs on a reactor core");
        task.detach();
        self.copies_in_flight += 1;
        self.copy_in_flight_bytes += length_bytes;
        self.weight_in_flight_bytes += weight_bytes;
    }

    /// The smallest free buffer of at least `len` bytes, or a new one.
    fn take_buf(&mut self, len: u64) -> crate::error::Result<AlignedBuf> {
        let fitting = self.free_bufs.iter().enumerate().filter(|(_, buf)| buf.capacity() as u64 >= len);
        match fitting.min_by_key(|(_, buf)| buf.capacity()).map(|(index, _)| index) {
            Some(index) => Ok(self.free_bufs.swap_remove(index)),
            None => self.new_buf(len as usize),
        }
    }

    /// A copy buffer from the core's pool, whose registered arena serves first (the kernel
    /// then does not pin the pages on every request) and whose limit bounds the bytes; from
    /// the heap off a core, when the pool is spent, or when the device wants more than a page
    /// of alignment.
    fn new_buf(&self, len: usize) -> crate::error::Result<AlignedBuf> {
        let pooled = crate::reactor::current_buf_pool()
            .filter(|_| self.buf_align <= crate::buf::DEFAULT_ALIGN_BYTES)
            .and_then(|pool| pool.get(len).ok());
        match pooled {
            Some(buf) => Ok(buf),
            None => AlignedBuf::zeroed(len, self.buf_align),
        }
    }

    /// Keep a finished copy's buffer for the next one, up to the buffer size in all.
    fn keep_buf(&mut self, buf: AlignedBuf) {
        let kept_bytes: u64 = self.free_bufs.iter().map(|buf| buf.capacity() as u64).sum();
        if kept_bytes + buf.capacity() as u64 <= self.config.buf_size_bytes {
            self.free_bufs.push(buf);
        }
    }

    /// Account finished copies and guest-path failures; apply the error policies.
    fn reap(&mut self) {
        let finished = std::mem::take(&mut *self.done.borrow_mut());
        for copy in finished {
            self.copies_in_flight -= 1;
            self.copy_in_flight_bytes -= copy.length_bytes;
            self.weight_in_flight_bytes -= copy.weight_bytes;
            for buf in copy.bufs {
                self.keep_buf(buf);
            }
            match copy.result {
                Ok(()) => {
                    self.shared.core.add_done_bytes(copy.length_bytes);
                    self.shared.verify_mark(copy.offset, copy.length_bytes);
                }
                Err(None) => self.shared.mark_dirty(copy.offset, copy.length_bytes),
                Err(Some((operation, error))) => {
                    self.shared.mark_dirty(copy.offset, copy.length_bytes);
                    self.on_error(operation, error);
                }
            }
        }
        while let Some(failure) = self.shared.take_failure() {
            self.on_error(failure.operation, failure.error);
        }
    }

    fn on_error(&mut self, operation: IoOperation, error: Error) {
        let policy = match operation {
            IoOperation::Read => self.config.on_source_error,
            IoOperation::Write => self.config.on_target_error,
        };
        let action = if self.converging { ErrorAction::Report } else { policy.action(&error) };
        if let Some(message) = self.shared.core.apply_error(operation, action, &error) {
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
        let remaining = self.shared.dirty.dirty_bytes() + self.copy_in_flight_bytes;
        self.shared.core.set_remaining_bytes(remaining);
    }

    /// Auto mode: write-behind when the guest undoes the copier's work, background when the
    /// guest goes quiet (the rule in `CopyMode::Auto`).
    fn auto_tick(&mut self) {
        let mode = &self.shared.mode;
        let at = Instant::now();
        if mode.requested() != CopyMode::Auto || at.duration_since(self.auto.window_start) < AUTO_WINDOW {
            return;
        }
        let guest_count = self.shared.guest_request_count.load(Ordering::Relaxed);
        let guest_wrote = guest_count != self.auto.guest_count_at_start;
        let dirty_bytes = self.shared.dirty.dirty_bytes();
        let done_bytes = self.shared.core.progress().done_bytes;
        match mode.in_force() {
            CopyMode::Background if dirty_bytes > 0 && guest_wrote => {
                let copied_bytes = done_bytes.saturating_sub(self.auto.done_at_start_bytes);
                let gained_bytes = self.auto.dirty_at_start_bytes.saturating_sub(dirty_bytes);
                // A window in which the copier copied nothing (paused, or its copies still
                // under way) says nothing about who is winning.
                match copied_bytes {
                    0 => {}
                    _ if gained_bytes.saturating_mul(2) < copied_bytes => self.auto.stalled_window_count += 1,
                    _ => self.auto.stalled_window_count = 0,
                }
                if self.auto.stalled_window_count >= AUTO_WINDOW_COUNT {
                    mode.auto_switch(CopyMode::WriteBehind);
                }
            }
            CopyMode::WriteBehind if !guest_wrote => {
                mode.auto_switch(CopyMode::Background);
                self.auto.stalled_window_count = 0;
            }
            _ => {}
        }
        self.auto.window_start = at;
        self.auto.guest_count_at_start = guest_count;
        self.auto.dirty_at_start_bytes = dirty_bytes;
        self.auto.done_at_start_bytes = done_bytes;
    }

    /// An event whenever the requested or in-force copy mode changed.
    fn report_mode(&mut self) {
        let mode = (self.shared.mode.requested(), self.shared.mode.in_force());
        if mode == self.reported_mode {
            return;
        }
        self.reported_mode = mode;
        let core = &self.shared.core;
        core.emit(JobEvent::CopyModeChange {
            id: core.id.clone(),
            requested: mode.0.name(),
            in_force: mode.1.name(),
            actively_synced: core.actively_synced(),
        });
    }

    /// Conclude: converge and switch over (or not), or detach after a cancel or failure.
    async fn finish(&mut self, outcome: Outcome) {
        let outcome = match outcome {
            Outcome::Complete { switch_over } => self.complete(switch_over).await,
            other => other,
        };
        self.wait_for_copies().await;
        let core = self.shared.core.clone();
        // The lease and the result event go before `concluded`, so a watcher that sees the
        // job concluded finds the bitmap free and the event queued.
        drop(self.lease.take());
        let (id, kind, figures) = (core.id.clone(), core.kind, core.figures());
        match outcome {
            Outcome::Complete { .. } => {
                core.emit(JobEvent::Completed { id, kind, figures, error: None, fallback: None })
            }
            Outcome::Cancelled | Outcome::Failed(_) => {
                self.detach().await;
                self.to_aborting();
                match outcome {
                    Outcome::Failed(message) => {
                        core.set_error(message.clone());
                        core.emit(JobEvent::Completed { id, kind, figures, error: Some(message), fallback: None });
                    }
                    _ => core.emit(JobEvent::Cancelled { id, kind, figures }),
                }
            }
        }
        core.set_status(JobStatus::Concluded);
        if core.auto_dismiss() {
            core.set_status(JobStatus::Null);
        }
    }

    /// READY → waiting → pending; wait for finalize (still copying); then drain, copy what is
    /// left and switch over or detach.
    async fn complete(&mut self, switch_over: bool) -> Outcome {
        let core = self.shared.core.clone();
        if switch_over && self.config.verify != VerifyMode::Off {
            if let Some(end) = self.verify_live().await {
                return end;
            }
        }
        core.set_status(JobStatus::Waiting);
        core.set_status(JobStatus::Pending);
        while !core.finalize_allowed() {
            let generation = core.signal.generation();
            self.reap();
            if let Some(message) = self.failure.take() {
                return Outcome::Failed(message);
            }
            match core.stop_request() {
                Some(StopRequest::Cancel { force: true }) => return Outcome::Cancelled,
                // A ready mirror's soft cancel: a consistent copy, no switch-over.
                Some(StopRequest::Cancel { force: false }) => return self.converge(false).await,
                _ => {}
            }
            self.pace_tick();
            self.start_copies(true).await;
            self.update_progress();
            // What changes while the job waits to be finalized is compared now, not with the
            // guest held.
            if let Some(verifier) = &mut self.verifier {
                if let Err(message) = verifier.step(&self.shared).await {
                    return Outcome::Failed(message);
                }
            }
            core.signal.wait_until(generation, Instant::now() + IDLE_WAIT).await;
        }
        self.converge(switch_over).await
    }

    /// With guest writes held back: every operation done, every dirty chunk copied, the target
    /// flushed; then the switch (or only the filter's removal). Any error here fails the job
    /// and leaves the disk on its source; so does a cancel that arrives before the switch
    /// (a soft one still ends with a consistent copy, reported as completed).
    async fn converge(&mut self, switch_over: bool) -> Outcome {
        let source = self.shared.source.clone();
        let Some(drain) = source.drain() else {
            return Outcome::Failed(format!("disk {} is being drained by another job", source.name()));
        };
        let guard = drain.await;
        if let Err(message) = self.copy_the_rest(&guard).await {
            source.remove_filter(&guard);
            return Outcome::Failed(message);
        }
        if let Some(mut verifier) = self.verifier.take() {
            if let Err(message) = verifier.finish(&self.shared).await {
                source.remove_filter(&guard);
                return Outcome::Failed(message);
            }
        }
        // The point of no return: a cancel from here on is refused, one before it is obeyed.
        let switch_over = match self.shared.core.commit() {
            Ok(()) => switch_over,
            Err(StopRequest::Cancel { force: true }) => {
                source.remove_filter(&guard);
                return Outcome::Cancelled;
            }
            Err(_) => false,
        };
        if !switch_over {
            source.remove_filter(&guard);
            return Outcome::Complete { switch_over: false };
        }
        match source.switch_to(&guard, self.shared.target.clone()) {
            Ok(()) => Outcome::Complete { switch_over: true },
            Err(error) => {
                source.remove_filter(&guard);
                Outcome::Failed(error.to_string())
            }
        }
    }

    /// `verify` after `complete`, while the guest writes and the copier keeps copying: passes
    /// over what is to compare (the rules are in `verify.rs`). `Some` ends the job early (a
    /// cancel, a failure, a read the verification could not make).
    async fn verify_live(&mut self) -> Option<Outcome> {
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        let mut verifier = match Verifier::start(&self.shared, seed) {
            Ok(verifier) => verifier,
            Err(error) => return Some(Outcome::Failed(format!("verify: cannot allocate its buffers: {error}"))),
        };
        loop {
            self.reap();
            if let Some(message) = self.failure.take() {
                return Some(Outcome::Failed(message));
            }
            match self.shared.core.stop_request() {
                Some(StopRequest::Cancel { force: true }) => return Some(Outcome::Cancelled),
                Some(StopRequest::Cancel { force: false }) => return Some(self.converge(false).await),
                _ => {}
            }
            if self.shared.core.pause_requested() {
                self.pause().await; // the verifier stops with the copier
                continue;
            }
            self.pace_tick();
            self.start_copies(true).await;
            self.update_progress();
            match verifier.step(&self.shared).await {
                Ok(Step::Compared) => {}
                Ok(Step::Done) => break,
                Err(message) => return Some(Outcome::Failed(message)),
            }
        }
        self.verifier = Some(verifier);
        None
    }

    /// Under the drain: every copy and active write done, nothing dirty, the target flushed.
    async fn copy_the_rest(&mut self, _drained: &crate::block::DrainGuard) -> Result<(), String> {
        self.converging = true;
        loop {
            let generation = self.shared.core.signal.generation();
            self.reap();
            if let Some(message) = self.failure.take() {
                return Err(message);
            }
            let idle = self.copies_in_flight == 0 && self.shared.inflight.counts() == (0, 0);
            if idle && self.shared.dirty.dirty_chunk_count() == 0 {
                break;
            }
            self.start_copies(false).await;
            self.shared.core.signal.wait_until(generation, Instant::now() + Duration::from_millis(1)).await;
        }
        if let Err(error) = self.shared.target.flush(self.config.copy_priority.io_priority()).await {
            return Err(format!("flush of the target: {error}"));
        }
        self.update_progress();
        Ok(())
    }

    /// Take the filter off (cancel, failure) once the last active write is done.
    async fn detach(&mut self) {
        let source = self.shared.source.clone();
        // Another drain of the disk (a user's) must end first: the filter has to come off.
        let drain = loop {
            match source.drain() {
                Some(drain) => break drain,
                None => sleep(Duration::from_millis(1)).await,
            }
        };
        source.remove_filter(&drain.await);
        while self.shared.inflight.counts() != (0, 0) || self.shared.behind.outstanding_bytes() > 0 {
            sleep(Duration::from_millis(1)).await;
        }
    }

    /// Move to aborting from wherever the loop left the job.
    fn to_aborting(&self) {
        let core = &self.shared.core;
        match core.status() {
            JobStatus::Paused => core.set_status(JobStatus::Running),
            JobStatus::Standby => core.set_status(JobStatus::Ready),
            _ => {}
        }
        if core.status() != JobStatus::Aborting {
            core.set_status(JobStatus::Aborting);
        }
    }
}
