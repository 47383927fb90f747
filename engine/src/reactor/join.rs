//! Handing a task's result to whoever waits for it, from any thread, and waiting for a future
//! on a thread that is not a reactor core (`block_on`, the base of the blocking wrappers).

use crate::error::{Error, Result};
use parking_lot::Mutex;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;

struct Slot<T> {
    value: Option<T>,
    waker: Option<Waker>,
    sender_gone: bool,
    panicked: bool,
}

/// The result of a task spawned onto a core. `Send`; await it anywhere, or `join` it from a
/// plain thread. Dropping it detaches the task (the task keeps running).
pub struct JoinHandle<T> {
    slot: Arc<Mutex<Slot<T>>>,
}

pub(crate) struct JoinSender<T> {
    slot: Arc<Mutex<Slot<T>>>,
}

pub(crate) fn join_pair<T>() -> (JoinSender<T>, JoinHandle<T>) {
    let slot = Arc::new(Mutex::new(Slot { value: None, waker: None, sender_gone: false, panicked: false }));
    (JoinSender { slot: slot.clone() }, JoinHandle { slot })
}

impl<T> JoinSender<T> {
    pub(crate) fn send(self, value: T) {
        self.slot.lock().value = Some(value);
        // Drop wakes the receiver.
    }
}

impl<T> Drop for JoinSender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut slot = self.slot.lock();
            slot.sender_gone = true;
            // Dropped while unwinding: the task panicked (the core caught it and lives on).
            slot.panicked = std::thread::panicking();
            slot.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let mut slot = self.slot.lock();
        if let Some(value) = slot.value.take() {
            return Poll::Ready(Ok(value));
        }
        if slot.panicked {
            return Poll::Ready(Err(Error::TaskPanicked));
        }
        if slot.sender_gone {
            // The task was dropped unfinished: its runtime shut down.
            return Poll::Ready(Err(Error::RuntimeStopped));
        }
        slot.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl<T> JoinHandle<T> {
    /// Block this thread until the task finishes. Never call it on a reactor core (it would
    /// stop the core that must run the task).
    pub fn join(self) -> Result<T> {
        block_on(self)
    }

    /// Whether the task has ended (finished, panicked or dropped with its runtime): a server
    /// keeping handles of many short tasks forgets the ended ones with it.
    pub fn is_finished(&self) -> bool {
        let slot = self.slot.lock();
        slot.value.is_some() || slot.sender_gone
    }
}

struct ThreadWaker(Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Run `future` to completion on this thread, parking between polls. For plain threads (tests,
/// the bench's control thread, blocking wrappers); a reactor core must await instead.
pub fn block_on<F: Future>(future: F) -> F::Output {
    assert!(super::local::current_core().is_none(), "block_on on a reactor core would deadlock it");
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        if let Poll::Ready(value) = future.as_mut().poll(&mut cx) {
            return value;
        }
        std::thread::park();
    }
}
