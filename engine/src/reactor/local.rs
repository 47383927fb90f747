//! The state a worker thread keeps for the tasks it runs: run queue, unsubmitted operations,
//! timers and the cached clock. Thread-local so a task polled by the core can reach it without
//! borrowing the core itself; never touched from any other thread.

use super::op::OpShared;
use async_task::Runnable;
use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

/// Identity of the core this thread runs, if any.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct CoreId {
    pub runtime_id: u64,
    pub index: usize,
}

pub(crate) struct Timer {
    pub deadline: Instant,
    pub sequence: u64,
    pub waker: Waker,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.sequence) == (other.deadline, other.sequence)
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timer {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.deadline, self.sequence).cmp(&(other.deadline, other.sequence))
    }
}

thread_local! {
    pub(crate) static CORE: Cell<Option<CoreId>> = const { Cell::new(None) };
    pub(crate) static RUN_QUEUE: RefCell<VecDeque<Runnable>> = const { RefCell::new(VecDeque::new()) };
    pub(crate) static PENDING_OPS: RefCell<VecDeque<Arc<OpShared>>> = const { RefCell::new(VecDeque::new()) };
    pub(crate) static TIMERS: RefCell<BinaryHeap<Reverse<Timer>>> = const { RefCell::new(BinaryHeap::new()) };
    static TIMER_SEQUENCE: Cell<u64> = const { Cell::new(0) };
    pub(crate) static CLOCK: Cell<Option<Instant>> = const { Cell::new(None) };
    /// This core is shutting down: work that must run to its end goes to the finisher thread
    /// instead of a run queue that is being dropped.
    pub(crate) static STOPPING: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is a core in its shutdown.
pub(crate) fn stopping() -> bool {
    STOPPING.with(|s| s.get())
}

pub(crate) fn current_core() -> Option<CoreId> {
    CORE.with(|c| c.get())
}

/// Register a timer on this core. Returns false off a core.
pub(crate) fn add_timer(deadline: Instant, waker: Waker) -> bool {
    if current_core().is_none() {
        return false;
    }
    let sequence = TIMER_SEQUENCE.with(|s| {
        s.set(s.get() + 1);
        s.get()
    });
    TIMERS.with(|t| t.borrow_mut().push(Reverse(Timer { deadline, sequence, waker })));
    true
}

/// Wake every timer due at `now`; return the next deadline.
pub(crate) fn fire_timers(now: Instant) -> Option<Instant> {
    let mut due = Vec::new();
    let next = TIMERS.with(|t| {
        let mut heap = t.borrow_mut();
        while heap.peek().is_some_and(|Reverse(timer)| timer.deadline <= now) {
            due.push(heap.pop().expect("peeked").0.waker);
        }
        heap.peek().map(|Reverse(timer)| timer.deadline)
    });
    for waker in due {
        waker.wake();
    }
    next
}

pub(crate) fn refresh_clock() -> Instant {
    let now = Instant::now();
    CLOCK.with(|c| c.set(Some(now)));
    now
}
