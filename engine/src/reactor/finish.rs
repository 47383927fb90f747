//! Running abandoned work to its end. A guest write whose caller drops its future may already
//! be on the device; what follows it (a filter's dirty mark or target write, a driver's boxed
//! future that holds the write-gate ticket until librbd or a helper thread answers) must still
//! happen, or a bitmap misses the write, a mirror's target lacks it, or a drain overlooks it.
//! On a reactor core such work becomes a task there; anywhere else (a plain thread that polled
//! once, another executor) one process-wide finisher thread drives it.
//!
//! Bound: each item is one abandoned request still in progress, so the finisher holds no more
//! than its callers had in flight; it never creates work of its own.

use async_task::Runnable;
use crossbeam_channel::Sender;
use std::future::Future;
use std::sync::OnceLock;

/// Drive `future` to completion whoever polled it before: a task on the calling core, or the
/// finisher thread off the reactor. Never blocks the caller.
pub(crate) fn run_to_end(future: impl Future<Output = ()> + Send + 'static) {
    if super::on_any_core() && !super::local::stopping() {
        super::spawn_local(future).expect("on a core, a task can be spawned").detach();
        return;
    }
    // A panic in the work is caught by the task (and dropped with it, as it is detached):
    // the finisher thread lives on for every later piece of work.
    let builder = async_task::Builder::new().propagate_panic(true);
    let (runnable, task) = builder.spawn(
        move |_| future,
        |runnable| {
            // The finisher lives for the process: a send only fails if its thread died, and then
            // nothing could run the work anyway.
            let _ = finisher().send(runnable);
        },
    );
    task.detach();
    runnable.schedule();
}

/// The finisher thread's queue, started on first use.
fn finisher() -> &'static Sender<Runnable> {
    static FINISHER: OnceLock<Sender<Runnable>> = OnceLock::new();
    FINISHER.get_or_init(|| {
        let (sender, receiver) = crossbeam_channel::unbounded::<Runnable>();
        std::thread::Builder::new()
            .name("tandem-finisher".into())
            .spawn(move || {
                for runnable in receiver {
                    runnable.run();
                }
            })
            .expect("spawning the finisher thread");
        sender
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn work_dropped_off_the_reactor_still_runs_to_its_end() {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        run_to_end(async move {
            crate::reactor::sleep(Duration::from_millis(20)).await; // wakes from another thread
            flag.store(true, Ordering::SeqCst);
        });
        wait_for(&done);
    }

    fn wait_for(done: &AtomicBool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "the finisher never ran the work");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_panic_in_one_piece_of_work_leaves_the_finisher_running() {
        run_to_end(async { panic!("work that panics (expected in this test)") });
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        run_to_end(async move { flag.store(true, Ordering::SeqCst) });
        wait_for(&done);
    }

    /// Runs its work to the end when dropped, as an abandoned guest write does.
    struct FinishOnDrop(Arc<AtomicBool>);

    impl Drop for FinishOnDrop {
        fn drop(&mut self) {
            let flag = self.0.clone();
            run_to_end(async move { flag.store(true, Ordering::SeqCst) });
        }
    }

    /// A runtime dropped while a task that finishes work on drop is queued: the drop must
    /// neither abort (the run queue was borrowed while it was cleared) nor lose the work.
    #[test]
    fn a_runtime_dropped_with_work_to_finish_in_its_queue_hands_it_to_the_finisher() {
        let runtime = crate::reactor::Runtime::new(crate::reactor::Config { cores: 1, ..Default::default() }).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let (started_tx, started_rx) = crossbeam_channel::bounded(1);
        let holder = FinishOnDrop(done.clone());
        let task = runtime.spawn(move || async move {
            let _holder = holder;
            started_tx.send(()).unwrap();
            loop {
                crate::reactor::yield_now().await; // always in the run queue
            }
        });
        started_rx.recv().unwrap();
        drop(task);
        drop(runtime);
        wait_for(&done);
    }
}
