//! Guest-first copying: how many bytes the copier keeps in flight, adapted to the latency the
//! guest sees, in the manner of Linux's writeback throttling and io.latency (a background
//! peer scaled down when the protected one's latency rises, grown back slowly).
//!
//! The filter times every guest request that passes it (reads and writes) into a
//! [`LatencyMonitor`]. Every `WINDOW` the job's task hands the window's mean to [`Pace`]:
//! - no guest request in the window: the guest is idle, double the budget;
//! - mean above `factor` x the reference: halve it (down to one copy of `floor_bytes`, two
//!   in the active modes: see [`Pace::set_copy_floor`]);
//! - otherwise: grow by one floor.
//!
//! The reference is the lowest window mean seen, let rise by 1/64 per window so a device
//! that got slower for good is not chased forever. Under `guest`, while the guest is active,
//! every copy is `floor_bytes` and the budget sets only how many run at once: a copy's size
//! is what a guest request stuck behind it waits for, and 1 MiB copies left a 2000 IOPS guest
//! a p99 of 5-8x even at 50 MiB/s; 256 KiB copies copied faster (294-305 against 267 MiB/s)
//! at the same tail.
//! After a window without guest requests copies are large again (half the budget), as many
//! small copies cost CPU (0.22 against 0.15 CPU s per GiB unloaded) and nobody waits on them.
//! Under `balanced` a copy is half the budget, so two overlap, clamped between `floor_bytes`
//! and the chunk maximum.

use super::CopyPriority;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often the budget is adjusted.
pub(crate) const WINDOW: Duration = Duration::from_millis(100);
/// The smallest copy under guest-first pacing: measured on this project's virtio disk, copies
/// of 128-256 KiB with 2-4 in flight moved as much as 1 MiB x 16 while leaving a 4 KiB guest
/// its latency (see docs/benchmarks.md).
const FLOOR_BYTES: u64 = 256 << 10;

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

    /// The window's (count, mean), and a fresh window.
    fn take(&self) -> (u64, Duration) {
        let count = self.count.swap(0, Ordering::Relaxed);
        let sum_ns = self.sum_ns.swap(0, Ordering::Relaxed);
        (count, Duration::from_nanos(sum_ns.checked_div(count).unwrap_or(0)))
    }
}

/// The copier's in-flight byte budget.
pub(crate) struct Pace {
    priority: CopyPriority,
    budget_bytes: u64,
    floor_bytes: u64,
    ceiling_bytes: u64,
    chunk_max_bytes: u64,
    reference: Option<Duration>,
    /// Copies of `floor_bytes` the budget never drops below (see [`Pace::set_copy_floor`]).
    floor_copy_count: u64,
    /// The last window had no guest request.
    guest_idle: bool,
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
            ceiling_bytes,
            chunk_max_bytes,
            reference: None,
            floor_copy_count: 1,
            guest_idle: false,
        }
    }

    /// Bytes the copier may have in flight now.
    pub(crate) fn budget_bytes(&self) -> u64 {
        self.budget_bytes.max(self.least_bytes())
    }

    /// Keep at least `count` floor-sized copies in flight whatever the guest's latency. In the
    /// active modes the guest's writes already reach the target, so what is left to copy only
    /// shrinks, and the job converges faster the more the copier keeps moving; one copy at a
    /// time under a guest that keeps the device busy left READY to the guest's end.
    pub(crate) fn set_copy_floor(&mut self, count: u64) {
        assert!(count >= 1, "the copier always makes progress");
        self.floor_copy_count = count;
    }

    fn least_bytes(&self) -> u64 {
        (self.floor_copy_count * self.floor_bytes).min(self.ceiling_bytes)
    }

    /// The size of the next copy.
    pub(crate) fn chunk_bytes(&self) -> u64 {
        match self.priority {
            CopyPriority::Job => self.chunk_max_bytes,
            CopyPriority::Guest if !self.guest_idle => self.floor_bytes,
            // Balanced, or guest while the guest is idle: two copies overlap.
            _ => (self.budget_bytes() / 2).clamp(self.floor_bytes, self.chunk_max_bytes),
        }
    }

    /// Close a window of `monitor`'s figures and adjust.
    pub(crate) fn adjust(&mut self, monitor: &LatencyMonitor) {
        let (count, mean) = monitor.take();
        let factor = match self.priority {
            CopyPriority::Job => return,
            CopyPriority::Guest => 1.5,
            CopyPriority::Balanced => 3.0,
        };
        self.guest_idle = count == 0;
        if count == 0 {
            self.budget_bytes = (self.budget_bytes * 2).min(self.ceiling_bytes);
            return;
        }
        let reference = match self.reference {
            Some(reference) => reference.mul_f64(1.0 + 1.0 / 64.0).min(mean),
            None => mean,
        };
        self.reference = Some(reference);
        if mean > reference.mul_f64(factor) {
            self.budget_bytes = (self.budget_bytes / 2).max(self.floor_bytes);
        } else {
            self.budget_bytes = (self.budget_bytes + self.floor_bytes).min(self.ceiling_bytes);
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

    #[test]
    fn idle_guest_lets_the_copier_grow_to_the_ceiling() {
        let monitor = LatencyMonitor::default();
        let mut pace = Pace::new(CopyPriority::Guest, 16 << 20, 1 << 20, 64 << 10);
        assert_eq!(pace.budget_bytes(), 512 << 10);
        for _ in 0..10 {
            pace.adjust(&monitor);
        }
        assert_eq!(pace.budget_bytes(), 16 << 20);
        assert_eq!(pace.chunk_bytes(), 1 << 20, "nobody waits on large copies");
        window(&monitor, 10, 100);
        pace.adjust(&monitor);
        assert_eq!(pace.chunk_bytes(), 256 << 10, "with a guest: many small copies, never a large one");
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
        window(&monitor, 100, 100);
        pace.adjust(&monitor); // reference 100 us
        let grown = pace.budget_bytes();
        window(&monitor, 100, 400);
        pace.adjust(&monitor);
        assert!(pace.budget_bytes() < grown);
        for _ in 0..10 {
            window(&monitor, 100, 400);
            pace.adjust(&monitor);
        }
        assert_eq!(pace.budget_bytes(), 256 << 10);
        assert_eq!(pace.chunk_bytes(), 256 << 10);
    }

    #[test]
    fn steady_latency_grows_by_one_floor_per_window() {
        let monitor = LatencyMonitor::default();
        let mut pace = Pace::new(CopyPriority::Balanced, 16 << 20, 1 << 20, 64 << 10);
        let start = pace.budget_bytes();
        for _ in 0..4 {
            window(&monitor, 50, 120);
            pace.adjust(&monitor);
        }
        assert_eq!(pace.budget_bytes(), start + 4 * (256 << 10));
    }

    #[test]
    fn the_copy_floor_holds_whatever_the_latency() {
        let monitor = LatencyMonitor::default();
        let mut pace = Pace::new(CopyPriority::Guest, 16 << 20, 1 << 20, 64 << 10);
        window(&monitor, 100, 100);
        pace.adjust(&monitor);
        for _ in 0..10 {
            window(&monitor, 100, 10_000);
            pace.adjust(&monitor);
        }
        assert_eq!(pace.budget_bytes(), 256 << 10, "one floor-sized copy");
        pace.set_copy_floor(2);
        assert_eq!(pace.budget_bytes(), 512 << 10, "two, in an active mode");
        assert_eq!(pace.chunk_bytes(), 256 << 10);
        pace.set_copy_floor(1);
        assert_eq!(pace.budget_bytes(), 256 << 10);
    }

    #[test]
    fn job_priority_does_not_adapt() {
        let monitor = LatencyMonitor::default();
        let mut pace = Pace::new(CopyPriority::Job, 16 << 20, 1 << 20, 64 << 10);
        window(&monitor, 100, 100);
        pace.adjust(&monitor);
        window(&monitor, 100, 100_000);
        pace.adjust(&monitor);
        assert_eq!((pace.budget_bytes(), pace.chunk_bytes()), (16 << 20, 1 << 20));
    }
}
