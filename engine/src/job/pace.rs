//! Guest-first copying: how many bytes the copier keeps in flight, adapted to the latency the
//! guest sees, in the manner of Linux's writeback throttling and io.latency (a background
//! peer scaled down when the protected one's latency rises, grown back slowly).
//!
//! The filter times every guest request that passes it (reads and writes) into a
//! [`LatencyMonitor`]. Every `WINDOW` the job's task hands the window's mean to [`Pace`]:
//! - no guest request in the window: the guest is idle, so the budget is the ceiling at once
//!   (doubling from the start took five windows, a fifth of an unloaded 2 GiB backup), and
//!   the first window with guest requests after it drops it back to one copy;
//! - mean above `factor` x the reference: halve it, down to one copy (one pipelined copy
//!   moved 260-400 MiB/s beside a busy guest, enough for the active modes to reach READY
//!   under an unthrottled guest: the floor of two they had before pipelining cost that guest
//!   a fifth of its IOPS);
//! - otherwise: grow by one copy ([`Pace::unit_bytes`]).
//!
//! The reference is the guest's latency without the copier: the first window with guest
//! requests, and every `PROBE_EVERY_WINDOWS`th after it, is followed by a probe window that
//! starts no copy (once the copies still in flight are done: see `Runner::pace_tick`), and the
//! probe's mean becomes the reference; between probes a lower window mean lowers it. Without
//! probes the reference was the lowest mean seen with copies already running, let rise by 1/64
//! per window: the copier then never saw its own cost (a 2000 IOPS guest's mean tripled).
//!
//! Under `guest`, while the guest is active, every copy is pipelined: its data moves in
//! requests of [`GUEST_PIECE_BYTES`], the write of one piece beside the read of the next, and
//! the budget sets how many such copies run at once (each counts as a read and a write of a
//! piece). A copy request's size is what a guest request stuck behind it waits for: 1 MiB
//! copies left a 2000 IOPS guest a p99 of 5-8x even at 50 MiB/s, and 256 KiB copies, one read
//! then one write each, still 5x while copying under 300 MiB/s. After a window without guest
//! requests copies are large again (half the budget, one read then one write), as many small
//! requests cost CPU (0.22 against 0.15 CPU s per GiB unloaded) and nobody waits on them.
//! Under `balanced` a copy is half the budget, so two overlap, clamped between `floor_bytes`
//! and the chunk maximum.

use super::CopyPriority;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often the budget is adjusted.
pub(crate) const WINDOW: Duration = Duration::from_millis(100);
/// Every this many windows with guest requests, one window starts no copy, and its mean
/// becomes the reference: the guest's latency without the copier.
const PROBE_EVERY_WINDOWS: u32 = 30;
/// The smallest copy under balanced pacing, and a copy's size under guest pacing once the
/// guest has gone idle: measured on this project's virtio disk, copies of 128-256 KiB with
/// 2-4 in flight moved as much as 1 MiB x 16 (see docs/benchmarks.md).
const FLOOR_BYTES: u64 = 256 << 10;
/// The request size of a pipelined copy while a guest is active under `guest` pacing: a guest
/// request that lands behind a copy request waits for it, and fio on the same disk measured a
/// 4 KiB guest's p99 at 2.35x beside a 64 KiB read+write stream, 3.5x beside 128 KiB and 5.2x
/// beside 256 KiB.
const GUEST_PIECE_BYTES: u64 = 64 << 10;

/// Guest request latencies of the current window (relaxed atomics: a statistic).
#[derive(Default)]
pub(crate) struct LatencyMonitor {
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl LatencyMonitor {
    pub(crate) fn record(&self, latency: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(latency.as_nanos().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    /// Forget the window so far (copies still in flight when a probe was called).
    pub(crate) fn discard(&self) {
        self.take();
    }

    /// The window's (count, mean), and a fresh window.
    fn take(&self) -> (u64, Duration) {
        let count = self.count.swap(0, Ordering::Relaxed);
        let sum_ns = self.sum_ns.swap(0, Ordering::Relaxed);
        (count, Duration::from_nanos(sum_ns.checked_div(count).unwrap_or(0)))
    }
}

/// A guest read through a job's filter, timed into the job's monitor (`monitor` picks it out
/// of the state the filter shares with its job).
pub(crate) fn timed_read<S: Send + Sync + 'static>(
    shared: std::sync::Arc<S>,
    monitor: fn(&S) -> &LatencyMonitor,
    read: crate::block::IoFuture<crate::block::BufResult<()>>,
) -> crate::block::IoFuture<crate::block::BufResult<()>> {
    crate::block::IoFuture::boxed(async move {
        let started = std::time::Instant::now();
        let outcome = read.await;
        monitor(&shared).record(started.elapsed());
        outcome
    })
}

/// The copier's in-flight byte budget.
pub(crate) struct Pace {
    priority: CopyPriority,
    budget_bytes: u64,
    floor_bytes: u64,
    /// The request size of a pipelined copy (see [`GUEST_PIECE_BYTES`]).
    piece_bytes: u64,
    ceiling_bytes: u64,
    chunk_max_bytes: u64,
    reference: Option<Duration>,
    /// The last window had no guest request.
    guest_idle: bool,
    /// This window starts no copy: it measures the guest alone.
    probing: bool,
    windows_since_probe: u32,
}

impl Pace {
    /// `ceiling_bytes` is the buffer size, `chunk_max_bytes` the largest copy, `granularity`
    /// the smallest.
    pub(crate) fn new(priority: CopyPriority, ceiling_bytes: u64, chunk_max_bytes: u64, granularity: u64) -> Pace {
        let floor_bytes = FLOOR_BYTES.clamp(granularity, chunk_max_bytes);
        let budget_bytes = match priority {
            CopyPriority::Job => ceiling_bytes,
            CopyPriority::Guest | CopyPriority::Balanced => (2 * floor_bytes).min(ceiling_bytes),
        };
        Pace {
            priority,
            budget_bytes,
            floor_bytes,
            piece_bytes: GUEST_PIECE_BYTES.min(chunk_max_bytes),
            ceiling_bytes,
            chunk_max_bytes,
            reference: None,
            guest_idle: false,
            probing: false,
            windows_since_probe: 0,
        }
    }

    /// Bytes the copier may have in flight now.
    pub(crate) fn budget_bytes(&self) -> u64 {
        // One copy always fits, whatever the guest's latency: the copier always progresses.
        self.budget_bytes.max(self.unit_bytes().min(self.ceiling_bytes))
    }

    /// Copies are pipelined in small pieces: under `guest` while the guest is active, when a
    /// copy is longer than a piece and the buffer size holds one pipelined copy.
    fn pipelined(&self) -> bool {
        let fits = self.piece_bytes < self.chunk_max_bytes && 2 * self.piece_bytes <= self.ceiling_bytes;
        self.priority == CopyPriority::Guest && !self.guest_idle && fits
    }

    /// What one more copy adds to the bytes in flight: a pipelined copy has a read and a
    /// write of one piece under way, any other copy its whole length.
    pub(crate) fn unit_bytes(&self) -> u64 {
        match self.pipelined() {
            true => 2 * self.piece_bytes,
            false => self.floor_bytes,
        }
    }

    /// The length of the next copy.
    pub(crate) fn chunk_bytes(&self) -> u64 {
        match self.priority {
            CopyPriority::Job => self.chunk_max_bytes,
            _ if self.pipelined() => self.chunk_max_bytes,
            // Balanced, or guest while the guest is idle: two copies overlap.
            _ => (self.budget_bytes() / 2).clamp(self.floor_bytes, self.chunk_max_bytes),
        }
    }

    /// The size of the next copy's requests: a piece when pipelined, else the whole copy.
    pub(crate) fn piece_bytes(&self) -> u64 {
        match self.pipelined() {
            true => self.piece_bytes,
            false => self.chunk_bytes(),
        }
    }

    /// No new copy may start: a probe window is measuring the guest alone.
    pub(crate) fn holding(&self) -> bool {
        self.probing
    }

    /// Close a window of `monitor`'s figures and adjust.
    pub(crate) fn adjust(&mut self, monitor: &LatencyMonitor) {
        let (count, mean) = monitor.take();
        let factor = match self.priority {
            CopyPriority::Job => return,
            CopyPriority::Guest => 1.5,
            CopyPriority::Balanced => 3.0,
        };
        let was_idle = std::mem::replace(&mut self.guest_idle, count == 0);
        if std::mem::take(&mut self.probing) {
            self.windows_since_probe = 0;
            if count > 0 {
                self.reference = Some(mean);
            }
            return;
        }
        if count == 0 {
            self.budget_bytes = self.ceiling_bytes;
            return;
        }
        if was_idle {
            // The guest is back: start again from one copy, and judge the next window.
            self.budget_bytes = self.unit_bytes();
            self.probing = self.reference.is_none();
            return;
        }
        // The first window with a guest, and then every so often, is followed by a probe.
        self.windows_since_probe += 1;
        self.probing = self.reference.is_none() || self.windows_since_probe >= PROBE_EVERY_WINDOWS;
        // Probes re-anchor the reference, so between them it only ever falls: a rise per
        // window let the guest's latency drift past `factor` before the next probe.
        let reference = self.reference.map_or(mean, |reference| reference.min(mean));
        self.reference = Some(reference);
        if mean > reference.mul_f64(factor) {
            self.budget_bytes = (self.budget_bytes / 2).max(self.unit_bytes());
        } else {
            self.budget_bytes = (self.budget_bytes + self.unit_bytes()).min(self.ceiling_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(monitor: &LatencyMonitor, count: u64, latency_us: u64) {
        for _ in 0..count {
            monitor.record(Duration::from_micros(latency_us));
        }
    }

    /// A first window with the guest at `loaded_us`, then the probe it calls for, in which
    /// the guest alone sees `alone_us`.
    fn settle(pace: &mut Pace, monitor: &LatencyMonitor, loaded_us: u64, alone_us: u64) {
        window(monitor, 100, loaded_us);
        pace.adjust(monitor);
        assert!(pace.holding(), "the first window with a guest calls for a probe");
        window(monitor, 100, alone_us);
        pace.adjust(monitor);
        assert!(!pace.holding());
    }

    #[test]
    fn idle_guest_lets_the_copier_grow_to_the_ceiling() {
        let monitor = LatencyMonitor::default();
        let mut pace = Pace::new(CopyPriority::Guest, 16 << 20, 1 << 20, 64 << 10);
        assert_eq!(pace.budget_bytes(), 512 << 10);
        pace.adjust(&monitor);
        assert_eq!(pace.budget_bytes(), 16 << 20, "one idle window is enough");
        assert_eq!((pace.chunk_bytes(), pace.piece_bytes()), (1 << 20, 1 << 20), "nobody waits on large copies");
        window(&monitor, 10, 100);
        pace.adjust(&monitor);
        let pipelined = (pace.chunk_bytes(), pace.piece_bytes(), pace.unit_bytes());
        assert_eq!(pipelined, (1 << 20, 64 << 10, 128 << 10), "with a guest: small requests, never a large one");
        assert_eq!(pace.budget_bytes(), 128 << 10, "the guest came back: one copy again");
        let mut balanced = Pace::new(CopyPriority::Balanced, 16 << 20, 1 << 20, 64 << 10);
        for _ in 0..10 {
            balanced.adjust(&monitor);
        }
        assert_eq!(balanced.chunk_bytes(), 1 << 20);
    }

    #[test]
    fn rising_guest_latency_shrinks_the_budget_to_the_floor() {
        let monitor = LatencyMonitor::default();
        let mut pace = Pace::new(CopyPriority::Guest, 16 << 20, 1 << 20, 64 << 10);
        // The first window already has copies; the reference is the probe's, the guest alone.
        settle(&mut pace, &monitor, 400, 100);
        let grown = pace.budget_bytes();
        window(&monitor, 100, 400);
        pace.adjust(&monitor);
        assert!(pace.budget_bytes() < grown, "400 us is 4x the guest alone");
        for _ in 0..10 {
            window(&monitor, 100, 400);
            pace.adjust(&monitor);
        }
        assert_eq!(pace.budget_bytes(), 128 << 10, "one pipelined copy: a read and a write of 64 KiB");
        assert_eq!(pace.piece_bytes(), 64 << 10);
    }

    #[test]
    fn steady_latency_grows_by_one_floor_per_window() {
        let monitor = LatencyMonitor::default();
        let mut pace = Pace::new(CopyPriority::Balanced, 16 << 20, 1 << 20, 64 << 10);
        settle(&mut pace, &monitor, 120, 120);
        let start = pace.budget_bytes();
        for _ in 0..4 {
            window(&monitor, 50, 120);
            pace.adjust(&monitor);
        }
        assert_eq!(pace.budget_bytes(), start + 4 * (256 << 10));
    }

    #[test]
    fn one_copy_always_fits_whatever_the_latency() {
        let monitor = LatencyMonitor::default();
        let mut pace = Pace::new(CopyPriority::Guest, 16 << 20, 1 << 20, 64 << 10);
        settle(&mut pace, &monitor, 100, 100);
        for _ in 0..10 {
            window(&monitor, 100, 10_000);
            pace.adjust(&monitor);
        }
        assert_eq!(pace.budget_bytes(), 128 << 10, "one pipelined copy");
        assert_eq!(pace.piece_bytes(), 64 << 10);
        let mut balanced = Pace::new(CopyPriority::Balanced, 16 << 20, 1 << 20, 64 << 10);
        settle(&mut balanced, &monitor, 100, 100);
        for _ in 0..10 {
            window(&monitor, 100, 10_000);
            balanced.adjust(&monitor);
        }
        assert_eq!((balanced.budget_bytes(), balanced.piece_bytes()), (256 << 10, 256 << 10), "never pipelined");
    }

    #[test]
    fn job_priority_does_not_adapt() {
        let monitor = LatencyMonitor::default();
        let mut pace = Pace::new(CopyPriority::Job, 16 << 20, 1 << 20, 64 << 10);
        window(&monitor, 100, 100);
        pace.adjust(&monitor);
        window(&monitor, 100, 100_000);
        pace.adjust(&monitor);
        assert_eq!((pace.budget_bytes(), pace.chunk_bytes(), pace.piece_bytes()), (16 << 20, 1 << 20, 1 << 20));
    }

    #[test]
    fn a_probe_recurs_while_the_guest_is_active_and_never_while_it_is_idle() {
        let monitor = LatencyMonitor::default();
        let mut pace = Pace::new(CopyPriority::Guest, 16 << 20, 1 << 20, 64 << 10);
        for _ in 0..100 {
            pace.adjust(&monitor);
            assert!(!pace.holding(), "an idle guest has nothing to protect");
        }
        settle(&mut pace, &monitor, 100, 100);
        let mut probe_count = 0;
        for _ in 0..2 * (PROBE_EVERY_WINDOWS + 1) {
            window(&monitor, 100, 100);
            pace.adjust(&monitor);
            probe_count += u32::from(pace.holding());
        }
        assert_eq!(probe_count, 2);
    }

    #[test]
    fn copies_no_longer_than_a_piece_are_not_pipelined() {
        let monitor = LatencyMonitor::default();
        let mut pace = Pace::new(CopyPriority::Guest, 16 << 20, 64 << 10, 4 << 10);
        window(&monitor, 10, 100);
        pace.adjust(&monitor);
        assert_eq!((pace.chunk_bytes(), pace.piece_bytes(), pace.unit_bytes()), (64 << 10, 64 << 10, 64 << 10));
        // A buffer size below two pieces cannot hold a pipelined copy: one buffer it is.
        let mut small = Pace::new(CopyPriority::Guest, 96 << 10, 96 << 10, 4 << 10);
        window(&monitor, 10, 100);
        small.adjust(&monitor);
        assert_eq!(small.piece_bytes(), small.chunk_bytes());
        assert!(small.budget_bytes() >= small.chunk_bytes().min(96 << 10));
    }

    #[test]
    fn the_reference_only_falls_between_probes() {
        let monitor = LatencyMonitor::default();
        let mut pace = Pace::new(CopyPriority::Guest, 16 << 20, 1 << 20, 64 << 10);
        settle(&mut pace, &monitor, 100, 100);
        for _ in 0..PROBE_EVERY_WINDOWS - 2 {
            window(&monitor, 100, 140);
            pace.adjust(&monitor);
            assert!(!pace.holding());
        }
        let budget = pace.budget_bytes();
        window(&monitor, 100, 160);
        pace.adjust(&monitor);
        assert!(pace.budget_bytes() < budget, "1.6x the guest alone is over 1.5x, however long since the probe");
    }
}
