//! Time for tasks: the per-core cached clock, `sleep` and `yield_now`.
//!
//! The clock is read once per reactor turn (after reaping, before submitting), so completions
//! reaped together share one timestamp instead of paying a clock read each.

use super::local;
use parking_lot::{Condvar, Mutex};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The current time: on a reactor core, the timestamp of this reactor turn; elsewhere a fresh
/// clock read.
pub fn now() -> Instant {
    local::CLOCK.with(|c| c.get()).unwrap_or_else(Instant::now)
}

/// A future that completes at `deadline`. Works on a reactor core (the core's timer heap) and
/// on any other thread (one shared timer thread).
pub struct Sleep {
    deadline: Instant,
}

/// Sleep for `duration`.
pub fn sleep(duration: Duration) -> Sleep {
    Sleep { deadline: Instant::now() + duration }
}

/// Sleep until `deadline`.
pub fn sleep_until(deadline: Instant) -> Sleep {
    Sleep { deadline }
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        // Re-register on every poll: a stale entry only causes one spurious wake-up, and a
        // moved task (new waker) is never lost.
        if !local::add_timer(self.deadline, cx.waker().clone()) {
            shared_timer().add(self.deadline, cx.waker().clone());
        }
        Poll::Pending
    }
}

/// Let the other tasks on this core run before continuing.
pub fn yield_now() -> YieldNow {
    YieldNow { yielded: false }
}

pub struct YieldNow {
    yielded: bool,
}

impl Future for YieldNow {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// The timer used off the reactor: one thread, a heap and a condvar.
struct SharedTimer {
    heap: Mutex<BinaryHeap<Reverse<(Instant, u64, WakerSlot)>>>,
    condvar: Condvar,
}

struct WakerSlot(Waker);
impl PartialEq for WakerSlot {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for WakerSlot {}
impl PartialOrd for WakerSlot {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for WakerSlot {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

fn shared_timer() -> &'static SharedTimer {
    static TIMER: OnceLock<&'static SharedTimer> = OnceLock::new();
    TIMER.get_or_init(|| {
        let timer: &'static SharedTimer =
            Box::leak(Box::new(SharedTimer { heap: Mutex::new(BinaryHeap::new()), condvar: Condvar::new() }));
        std::thread::Builder::new()
            .name("tandem-timer".into())
            .spawn(move || timer.run())
            .expect("spawning the timer thread");
        timer
    })
}

impl SharedTimer {
    fn add(&self, deadline: Instant, waker: Waker) {
        static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let sequence = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.heap.lock().push(Reverse((deadline, sequence, WakerSlot(waker))));
        self.condvar.notify_one();
    }

    fn run(&self) {
        let mut heap = self.heap.lock();
        loop {
            let now = Instant::now();
            while heap.peek().is_some_and(|Reverse((deadline, _, _))| *deadline <= now) {
                let Reverse((_, _, WakerSlot(waker))) = heap.pop().expect("peeked");
                waker.wake();
            }
            match heap.peek().map(|Reverse((deadline, _, _))| *deadline) {
                Some(deadline) => {
                    self.condvar.wait_until(&mut heap, deadline);
                }
                None => self.condvar.wait(&mut heap),
            }
        }
    }
}
