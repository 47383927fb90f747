//! [`Signal`]: wakes a job's task when something it waits for may have changed (a verb, a copy
//! finishing, a guest write landing in an active mode). Waiters remember the generation they
//! last saw, so a notification between their check and their wait is never lost.

use crate::reactor::{sleep_until, Sleep};
use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

#[derive(Default)]
pub(crate) struct Signal {
    generation: AtomicU64,
    wakers: Mutex<Vec<Waker>>,
}

impl Signal {
    /// The generation to pass to [`Signal::wait_until`] after checking the state it guards.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn notify(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let wakers = std::mem::take(&mut *self.wakers.lock());
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Resolves once notified after generation `seen`, or at `deadline`.
    pub(crate) fn wait_until(&self, seen: u64, deadline: Instant) -> Notified<'_> {
        Notified { signal: self, seen, sleep: sleep_until(deadline) }
    }
}

pub(crate) struct Notified<'a> {
    signal: &'a Signal,
    seen: u64,
    sleep: Sleep,
}

impl Future for Notified<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.generation() != self.seen {
            return Poll::Ready(());
        }
        {
            let mut wakers = self.signal.wakers.lock();
            // Checked again under the lock `notify` takes after bumping: no lost wake-up.
            if self.signal.generation() != self.seen {
                return Poll::Ready(());
            }
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
        }
        Pin::new(&mut self.sleep).poll(cx)
    }
}
