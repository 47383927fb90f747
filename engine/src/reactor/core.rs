//! One worker: a thread pinned to a CPU that runs its tasks, submits their I/O to its backend
//! and sleeps in the kernel when there is nothing to do. Other threads reach it only through
//! its inbox, woken by an eventfd write when (and only when) the core sleeps.

use super::local::{self, CoreId, PENDING_OPS, RUN_QUEUE, TIMERS};
use super::op::{OpFuture, OpShared, RESULT_STOPPED};
use super::threads::ThreadsBackend;
use super::uring::{drain_eventfd, UringBackend};
use crate::buf::BufPool;
use async_task::Runnable;
use crossbeam_channel::{Receiver, Sender};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::ThreadId;
use std::time::Duration;

/// Runnables a core runs before it looks at I/O again: bounds how long completions wait.
const TASK_BUDGET_COUNT: usize = 128;
/// Poll interval while operations wait for room in a full thread-pool queue.
const RETRY_PARK: Duration = Duration::from_millis(1);

/// A runnable sent from another thread. Dropping it anywhere but its core would panic inside
/// async-task (local tasks must die where they live), so off-core it is leaked instead: that
/// only happens after the core has stopped.
pub(crate) struct RemoteRunnable {
    runnable: ManuallyDrop<Runnable>,
    home: ThreadId,
}

impl Drop for RemoteRunnable {
    fn drop(&mut self) {
        if std::thread::current().id() == self.home {
            // SAFETY: taken once, here, and never touched again.
            drop(unsafe { ManuallyDrop::take(&mut self.runnable) });
        }
    }
}

pub(crate) enum Message {
    Run(RemoteRunnable),
    Spawn(Box<dyn FnOnce() + Send>),
    Op(Arc<OpShared>),
    Shutdown,
}

/// The part of a core other threads may touch.
pub(crate) struct CoreShared {
    pub id: CoreId,
    inbox: Sender<Message>,
    wake_fd: OwnedFd,
    sleeping: AtomicBool,
    thread: OnceLock<ThreadId>,
    pub pool: BufPool,
}

impl CoreShared {
    pub(crate) fn new(id: CoreId, pool: BufPool) -> std::io::Result<(Arc<CoreShared>, Receiver<Message>)> {
        // SAFETY: eventfd has no memory arguments; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let wake_fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Unbounded on purpose: entries are bounded by the tasks and operations that exist,
        // and a core blocking on another core's full inbox could deadlock the two.
        let (inbox, receiver) = crossbeam_channel::unbounded();
        let shared = CoreShared { id, inbox, wake_fd, sleeping: AtomicBool::new(false), thread: OnceLock::new(), pool };
        Ok((Arc::new(shared), receiver))
    }

    /// Deliver a message; gives it back if the core has stopped.
    pub(crate) fn send(&self, message: Message) -> Result<(), Message> {
        self.inbox.send(message).map_err(|e| e.0)?;
        // SeqCst pairs with the core's store before its last inbox check (see `park`).
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let one = 1u64;
            // SAFETY: writes 8 bytes from a local to our own eventfd.
            unsafe { libc::write(self.wake_fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
        Ok(())
    }

    /// Schedule a runnable of a task that lives on this core, from any thread.
    pub(crate) fn schedule(&self, runnable: Runnable) {
        if local::current_core() == Some(self.id) {
            RUN_QUEUE.with(|q| q.borrow_mut().push_back(runnable));
            return;
        }
        let home = *self.thread.get().expect("tasks exist only once the core runs");
        let message = Message::Run(RemoteRunnable { runnable: ManuallyDrop::new(runnable), home });
        // A stopped core: RemoteRunnable's drop leaks the task rather than panic here.
        let _ = self.send(message);
    }

    /// Queue an operation for this core's backend (on the core: no syscall, no lock).
    pub(crate) fn submit(&self, op: Arc<OpShared>) {
        if local::current_core() == Some(self.id) {
            PENDING_OPS.with(|q| q.borrow_mut().push_back(op));
            return;
        }
        if let Err(Message::Op(op)) = self.send(Message::Op(op)) {
            op.complete(RESULT_STOPPED, |_| None);
        }
    }
}

// One per core for the core's whole life: the size does not matter, and boxing the ring would
// add a pointer chase to every submission.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Backend {
    Uring(UringBackend),
    Threads(ThreadsBackend),
}

pub(crate) struct Core {
    shared: Arc<CoreShared>,
    inbox: Receiver<Message>,
    backend: Backend,
    submit_batch_count: usize,
    stopping: bool,
}

impl Core {
    pub(crate) fn new(
        shared: Arc<CoreShared>,
        inbox: Receiver<Message>,
        backend: Backend,
        submit_batch_count: usize,
    ) -> Core {
        assert!(submit_batch_count > 0);
        Core { shared, inbox, backend, submit_batch_count, stopping: false }
    }

    pub(crate) fn wake_fd(shared: &CoreShared) -> i32 {
        shared.wake_fd.as_raw_fd()
    }

    /// The worker thread's whole life.
    pub(crate) fn run(mut self) {
        let _ = self.shared.thread.set(std::thread::current().id());
        local::CORE.with(|c| c.set(Some(self.shared.id)));
        local::refresh_clock();
        while !self.stopping {
            self.turn();
        }
        self.stop();
        local::CORE.with(|c| c.set(None));
    }

    /// One turn: messages, tasks, submissions, then completions (waiting if idle).
    fn turn(&mut self) {
        self.drain_inbox();
        run_tasks(TASK_BUDGET_COUNT, self.submit_batch_count);
        let pending_left = self.flush_pending();
        // The clock read at the end of the last turn: timers may fire late by this turn's task
        // time (microseconds), which saves a clock read per turn (about one per I/O when
        // operations are submitted one at a time).
        let now = super::time::now();
        let next_timer = local::fire_timers(now);
        let idle = RUN_QUEUE.with(|q| q.borrow().is_empty()) && self.inbox.is_empty();
        if idle && !self.stopping {
            let mut timeout = next_timer.map(|deadline| deadline.saturating_duration_since(now));
            if pending_left {
                timeout = Some(timeout.map_or(RETRY_PARK, |t| t.min(RETRY_PARK)));
            }
            self.park(timeout);
        } else {
            self.poll_backend(false, None);
        }
        let now = local::refresh_clock();
        local::fire_timers(now);
    }

    fn drain_inbox(&mut self) {
        while let Ok(message) = self.inbox.try_recv() {
            self.handle(message);
        }
    }

    fn handle(&mut self, message: Message) {
        match message {
            Message::Run(mut remote) => {
                // SAFETY: taken once; forget the shell so its Drop does not touch it again.
                let runnable = unsafe { ManuallyDrop::take(&mut remote.runnable) };
                std::mem::forget(remote);
                RUN_QUEUE.with(|q| q.borrow_mut().push_back(runnable));
            }
            Message::Spawn(spawn) => spawn(),
            Message::Op(op) => PENDING_OPS.with(|q| q.borrow_mut().push_back(op)),
            Message::Shutdown => self.stopping = true,
        }
    }

    /// Move queued operations into the backend. Returns whether some had to stay queued.
    fn flush_pending(&mut self) -> bool {
        PENDING_OPS.with(|q| {
            let mut queue = q.borrow_mut();
            while let Some(op) = queue.pop_front() {
                if OpFuture::is_abandoned_by_backend(&op) {
                    continue; // its future was dropped before submission: nothing to do
                }
                let pushed = match &mut self.backend {
                    Backend::Uring(ring) => ring.push(op),
                    Backend::Threads(pool) => pool.push(op),
                };
                if let Err(op) = pushed {
                    queue.push_front(op);
                    return true;
                }
            }
            false
        })
    }

    fn poll_backend(&mut self, wait: bool, timeout: Option<Duration>) {
        match &mut self.backend {
            Backend::Uring(ring) => {
                ring.submit_and_reap(wait, timeout);
            }
            Backend::Threads(_) if wait => wait_eventfd(self.shared.wake_fd.as_raw_fd(), timeout),
            Backend::Threads(_) => {}
        }
    }

    /// Sleep until an I/O completes, a message arrives or `timeout` passes. The sleeping flag
    /// is raised before the last inbox check, so a sender either sees it (and writes the
    /// eventfd) or its message is seen here.
    fn park(&mut self, timeout: Option<Duration>) {
        self.shared.sleeping.store(true, Ordering::SeqCst);
        if !self.inbox.is_empty() {
            self.shared.sleeping.store(false, Ordering::SeqCst);
            self.poll_backend(false, None);
            return;
        }
        self.poll_backend(true, timeout);
        self.shared.sleeping.store(false, Ordering::SeqCst);
    }

    /// Shutdown: refuse what was never submitted, wait for everything the kernel holds, then
    /// drop the tasks here, on their own thread.
    fn stop(&mut self) {
        local::STOPPING.with(|s| s.set(true));
        PENDING_OPS.with(|q| q.borrow_mut().drain(..).for_each(|op| op.complete(RESULT_STOPPED, |_| None)));
        if let Backend::Uring(ring) = &mut self.backend {
            ring.drain();
        }
        self.stopping = true;
        while let Ok(message) = self.inbox.try_recv() {
            match message {
                Message::Op(op) => op.complete(RESULT_STOPPED, |_| None),
                other => drop(other),
            }
        }
        // Taken out before dropping: a task's drop may schedule another (a dropped write that
        // must run to its end), which must not find the queue borrowed. Until it stays empty.
        loop {
            let tasks = RUN_QUEUE.with(|q| std::mem::take(&mut *q.borrow_mut()));
            if tasks.is_empty() {
                break;
            }
            drop(tasks);
        }
        let timers = TIMERS.with(|t| std::mem::take(&mut *t.borrow_mut()));
        drop(timers);
    }
}

/// Run up to `budget` runnables, stopping early once `submit_batch_count` operations are
/// queued: handing I/O to the kernel promptly is worth a syscall (see `Config`).
fn run_tasks(budget: usize, submit_batch_count: usize) {
    for _ in 0..budget {
        let Some(runnable) = RUN_QUEUE.with(|q| q.borrow_mut().pop_front()) else {
            return;
        };
        runnable.run();
        if PENDING_OPS.with(|q| q.borrow().len()) >= submit_batch_count {
            return;
        }
    }
}

/// Threads backend's sleep: wait for the eventfd (a message or a completion's wake-up).
fn wait_eventfd(fd: i32, timeout: Option<Duration>) {
    let timeout_ms = timeout.map_or(-1, |t| t.as_millis().clamp(1, i32::MAX as u128) as i32);
    let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd on the stack, count 1.
    unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
    drain_eventfd(fd);
}
