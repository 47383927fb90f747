//! [`RateLimit`]: a job's speed limit in bytes/s, changeable while it runs. A copy asks for
//! its bytes before it starts and is told how long to wait; bursts are capped at one slice
//! (100 ms) of the rate, so a limit holds over any window longer than that.

use std::time::{Duration, Instant};

const SLICE: Duration = Duration::from_millis(100);

pub(crate) struct RateLimit {
    bytes_per_s: u64,
    /// When the bytes granted so far have been "paid for" at the current rate.
    paid_until: Instant,
}

impl RateLimit {
    pub(crate) fn new(bytes_per_s: u64) -> RateLimit {
        RateLimit { bytes_per_s, paid_until: Instant::now() }
    }

    pub(crate) fn set_speed(&mut self, bytes_per_s: u64) {
        self.bytes_per_s = bytes_per_s;
    }

    /// Grant `bytes` at `now`: how long to wait first (zero if unlimited or within budget).
    pub(crate) fn grant(&mut self, bytes: u64, now: Instant) -> Duration {
        if self.bytes_per_s == 0 {
            self.paid_until = now;
            return Duration::ZERO;
        }
        // Idle time earns no credit: the budget restarts at `now`.
        let start = self.paid_until.max(now);
        self.paid_until = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_s as f64);
        self.paid_until.saturating_duration_since(now + SLICE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let mut limit = RateLimit::new(0);
        let now = Instant::now();
        assert_eq!(limit.grant(1 << 30, now), Duration::ZERO);
    }

    #[test]
    fn a_limit_holds_over_a_long_run() {
        // 10 MiB/s, 1 MiB grants: after the first 100 ms burst, each waits ~100 ms more.
        let mut limit = RateLimit::new(10 << 20);
        let start = Instant::now();
        let mut now = start;
        for _ in 0..50 {
            now += limit.grant(1 << 20, now);
        }
        let elapsed_s = now.duration_since(start).as_secs_f64();
        assert!((4.7..=5.0).contains(&elapsed_s), "50 MiB at 10 MiB/s took {elapsed_s} s");
    }

    #[test]
    fn speed_changes_apply_to_the_next_grant() {
        let mut limit = RateLimit::new(1 << 20);
        let now = Instant::now();
        limit.grant(1 << 20, now);
        limit.set_speed(0);
        assert_eq!(limit.grant(1 << 30, now), Duration::ZERO);
    }
}
