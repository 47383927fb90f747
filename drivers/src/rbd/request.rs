//! A request in librbd's hands, the per-image bound on them, and the watchdog that fails what
//! librbd does not answer in time.
//!
//! Why a watchdog thread and not a timer per request: a reactor timer cannot be cancelled, so
//! each finished request would leave an entry in its core's timer heap for the whole timeout
//! (half a million entries per core at 14k IOPS and 35 s). The watchdog keeps one weak
//! reference per pending request and looks at them every [`WATCH_PERIOD`]; a request it
//! expires is woken and fails with ETIMEDOUT, whether it was waiting for a slot or for librbd.

use super::librbd::{lib, CompletionT, ImageT, Lib};
use parking_lot::Mutex;
use std::ffi::c_void;
use std::ptr::null_mut;
use std::sync::{Arc, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};
use tandem::block::DeviceHold;
use tandem::buf::AlignedBuf;

/// How often the watchdog looks: a timeout fires up to this late.
const WATCH_PERIOD: Duration = Duration::from_millis(250);

/// Why a request ended without librbd's answer.
pub(crate) const EXPIRED: i32 = libc::ETIMEDOUT;

/// Something the watchdog may expire.
pub(crate) trait Expiring: Send + Sync {
    /// Expire it if `now` is past its deadline; false once it needs no more watching.
    fn watch(&self, now: Instant) -> bool;
}

/// The image's watchdog thread; it ends with the driver.
pub(crate) struct Watchdog {
    shared: Arc<WatchShared>,
    thread: Option<std::thread::Thread>,
}

struct WatchShared {
    pending: Mutex<Vec<Weak<dyn Expiring>>>,
}

impl Watchdog {
    pub(crate) fn start() -> std::io::Result<Watchdog> {
        let shared = Arc::new(WatchShared { pending: Mutex::new(Vec::new()) });
        let watched = shared.clone();
        let handle = std::thread::Builder::new().name("tandem-rbd-watch".into()).spawn(move || {
            // Until the driver and every request future that could still register are gone.
            while Arc::strong_count(&watched) > 1 || !watched.pending.lock().is_empty() {
                std::thread::park_timeout(WATCH_PERIOD);
                let now = Instant::now();
                // Taken out and put back so no waker runs under the lock.
                let pending = std::mem::take(&mut *watched.pending.lock());
                let kept: Vec<_> =
                    pending.into_iter().filter(|entry| entry.upgrade().is_some_and(|e| e.watch(now))).collect();
                watched.pending.lock().extend(kept);
            }
        })?;
        Ok(Watchdog { shared, thread: Some(handle.thread().clone()) })
    }

    /// What a request's future keeps to register itself once it starts.
    pub(crate) fn handle(&self) -> WatchHandle {
        WatchHandle(self.shared.clone())
    }
}

/// Registers entries with a watchdog (from any thread).
#[derive(Clone)]
pub(crate) struct WatchHandle(Arc<WatchShared>);

impl WatchHandle {
    pub(crate) fn watch(&self, entry: Weak<dyn Expiring>) {
        self.0.pending.lock().push(entry);
    }
}

impl Drop for Watchdog {
    /// The thread ends once nothing can register with it any more and nothing is pending.
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            thread.unpark();
        }
    }
}

/// One request (see the driver's module comment for the completion path).
pub(crate) struct Request {
    state: Mutex<State>,
    deadline: Instant,
    /// What the caller attached to a write (its gate ticket): dropped with the request, which
    /// librbd keeps (through the completion's reference) until it answers, even after the
    /// future gave up at the deadline.
    _hold: Option<DeviceHold>,
}

struct State {
    /// librbd's return value: bytes or 0 on success, a negative errno on failure.
    result: Option<isize>,
    expired: bool,
    waker: Option<Waker>,
    buf: Option<AlignedBuf>,
    /// Held from submission until librbd answers (not until the caller stops waiting).
    slot: Option<Slot>,
    /// librbd took the request: it owns the buffer until it answers.
    submitted: bool,
}

impl Request {
    pub(crate) fn new(buf: Option<AlignedBuf>, deadline: Instant, hold: Option<DeviceHold>) -> Arc<Request> {
        let state = State { result: None, expired: false, waker: None, buf, slot: None, submitted: false };
        Arc::new(Request { state: Mutex::new(state), deadline, _hold: hold })
    }

    /// Take a slot, waiting for one; `None` once the request expired.
    pub(crate) async fn take_slot(&self, slots: &Arc<Slots>) -> Option<()> {
        std::future::poll_fn(|cx| {
            let mut state = self.state.lock();
            if state.expired {
                return Poll::Ready(None);
            }
            // The watchdog wakes this waker; a freed slot wakes every waiter in `slots`.
            state.waker = Some(cx.waker().clone());
            match slots.try_take(cx.waker()) {
                Some(slot) => {
                    state.slot = Some(slot);
                    Poll::Ready(Some(()))
                }
                None => Poll::Pending,
            }
        })
        .await
    }

    /// Hand the request to librbd: `submit` gets the completion and the buffer's address.
    pub(crate) fn submit(
        self: &Arc<Self>,
        lib: &'static Lib,
        image: ImageT,
        submit: impl FnOnce(&'static Lib, ImageT, CompletionT, *mut u8) -> libc::c_int,
    ) -> Result<(), i32> {
        // The buffer's heap address is stable while it sits in the state; nobody takes it out
        // before librbd's answer is in (an expired request hands back a fresh buffer).
        let buf_ptr = self.state.lock().buf.as_mut().map_or(null_mut(), |buf| buf.as_mut_ptr());
        let arg = Arc::into_raw(self.clone()) as *mut c_void;
        let mut completion: CompletionT = null_mut();
        // SAFETY: `arg` is a counted reference that on_complete takes back exactly once.
        let created = unsafe { (lib.rbd_aio_create_completion)(arg, on_complete, &mut completion) };
        if created < 0 {
            // SAFETY: librbd never saw `arg`: take the reference back.
            drop(unsafe { Arc::from_raw(arg as *const Request) });
            let slot = self.state.lock().slot.take();
            drop(slot);
            return Err(-created);
        }
        // Marked before the call: librbd may answer before it returns.
        self.state.lock().submitted = true;
        let submitted = submit(lib, image, completion, buf_ptr);
        if submitted < 0 {
            // SAFETY: the call was refused, so librbd will not call back: release both.
            unsafe {
                (lib.rbd_aio_release)(completion);
                drop(Arc::from_raw(arg as *const Request));
            }
            let slot = {
                let mut state = self.state.lock();
                state.submitted = false;
                state.slot.take()
            };
            drop(slot);
            return Err(-submitted);
        }
        Ok(())
    }

    /// librbd's answer, or `Err(EXPIRED)` if the watchdog got there first.
    pub(crate) async fn wait(&self) -> Result<isize, i32> {
        std::future::poll_fn(|cx| {
            let mut state = self.state.lock();
            match state.result {
                Some(result) if result < 0 => Poll::Ready(Err(-(result as i32))),
                Some(result) => Poll::Ready(Ok(result)),
                None if state.expired => Poll::Ready(Err(EXPIRED)),
                None => {
                    state.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// The caller's buffer once librbd is done with it; after an expiry (librbd may still
    /// write into the original) a fresh one of the same length, capacity and alignment.
    pub(crate) fn take_buf(&self) -> Option<AlignedBuf> {
        let mut state = self.state.lock();
        if state.result.is_some() || !state.submitted {
            return state.buf.take();
        }
        let original = state.buf.as_ref()?;
        let (len, capacity, align) = (original.len(), original.capacity(), original.align());
        drop(state);
        let mut fresh = AlignedBuf::zeroed(capacity, align).expect("a buffer like the caller's");
        fresh.set_len(len);
        Some(fresh)
    }
}

impl Expiring for Request {
    fn watch(&self, now: Instant) -> bool {
        let waker = {
            let mut state = self.state.lock();
            if state.result.is_some() || state.expired {
                return false;
            }
            if now < self.deadline {
                return true;
            }
            state.expired = true;
            state.waker.take()
        };
        waker.into_iter().for_each(Waker::wake);
        false
    }
}

/// librbd's completion callback, on one of librbd's threads: record, release, wake. Nothing
/// in it can panic (a panic must not unwind into C).
extern "C" fn on_complete(completion: CompletionT, arg: *mut c_void) {
    // SAFETY: `arg` is the reference `Request::submit` leaked for this completion.
    let request = unsafe { Arc::from_raw(arg as *const Request) };
    let Ok(lib) = lib() else { return };
    // SAFETY: the completion is done and released exactly once, here.
    let result = unsafe {
        let result = (lib.rbd_aio_get_return_value)(completion);
        (lib.rbd_aio_release)(completion);
        result
    };
    let (waker, slot) = {
        let mut state = request.state.lock();
        state.result = Some(result);
        (state.waker.take(), state.slot.take())
    };
    // The slot goes back before the waiter runs, so the next request can take it at once.
    drop(slot);
    waker.into_iter().for_each(Waker::wake);
}

/// A bounded count of requests inside librbd, with the tasks waiting for one.
pub(crate) struct Slots {
    max: usize,
    state: Mutex<(usize, Vec<Waker>)>,
}

/// One request's place inside librbd; freed on drop.
pub(crate) struct Slot(Arc<Slots>);

impl Slots {
    pub(crate) fn new(max: usize) -> Arc<Slots> {
        assert!(max > 0);
        Arc::new(Slots { max, state: Mutex::new((0, Vec::new())) })
    }

    fn try_take(self: &Arc<Self>, waker: &Waker) -> Option<Slot> {
        let mut state = self.state.lock();
        if state.0 < self.max {
            state.0 += 1;
            return Some(Slot(self.clone()));
        }
        // At most one entry per waiting task: a task polled again must not add another.
        if !state.1.iter().any(|known| known.will_wake(waker)) {
            state.1.push(waker.clone());
        }
        None
    }
}

impl Drop for Slot {
    /// Every waiter is woken: a single one might be a task that stopped waiting, and then
    /// the freed slot would sit unused while the others sleep.
    fn drop(&mut self) {
        let waiters = {
            let mut state = self.0.state.lock();
            assert!(state.0 > 0, "slot accounting underflow");
            state.0 -= 1;
            std::mem::take(&mut state.1)
        };
        waiters.into_iter().for_each(Waker::wake);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_freed_slot_wakes_every_waiter_once_and_each_is_listed_once() {
        let slots = Slots::new(1);
        let (first, second) = (Arc::new(Count(AtomicUsize::new(0))), Arc::new(Count(AtomicUsize::new(0))));
        let (first_waker, second_waker) = (Waker::from(first.clone()), Waker::from(second.clone()));
        let held = slots.try_take(&first_waker).expect("one slot free");
        for _ in 0..3 {
            assert!(slots.try_take(&first_waker).is_none());
            assert!(slots.try_take(&second_waker).is_none());
        }
        assert_eq!(slots.state.lock().1.len(), 2, "a task polled again is not listed again");
        drop(held);
        assert_eq!((first.0.load(Ordering::SeqCst), second.0.load(Ordering::SeqCst)), (1, 1));
        assert!(slots.try_take(&second_waker).is_some(), "the slot is free for whoever comes");
    }

    #[test]
    fn the_watchdog_expires_a_request_past_its_deadline_and_wakes_it() {
        let request = Request::new(None, Instant::now(), None);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        request.state.lock().waker = Some(Waker::from(count.clone()));
        assert!(!request.watch(Instant::now() + Duration::from_millis(1)), "expired: no more watching");
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(request.state.lock().expired);
        let later = Request::new(None, Instant::now() + Duration::from_secs(60), None);
        assert!(later.watch(Instant::now()), "not due: still watched");
    }
}
