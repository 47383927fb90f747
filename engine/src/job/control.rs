//! [`Job`], the handle users drive a job with, and [`JobCore`], the state it shares with the
//! job's task: status, requests, events, progress, speed.
//!
//! Lock order: `control`, then the event channel's internal lock (status events are sent
//! under `control` to keep their order); nothing else is taken under either.

use super::{transition_allowed, verb_allowed, JobError, JobEvent, JobFigures, JobKind, JobStatus, JobVerb, Signal};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Events a job keeps for its watchers before it drops the oldest-unread ones (counted).
const EVENT_QUEUE_COUNT_MAX: usize = 4096;

/// What a job has done: `done_bytes` of `total_bytes` (the total grows while a guest writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// What a job has learnt or done beyond its progress, for its user and the daemon's
/// `query-jobs`: set by the job's task as it goes, read at any time through [`Job::info`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobInfo {
    /// Mirror: whether the job treats the target as reading zeros, and how it knows.
    pub target_is_zero: Option<TargetZero>,
    /// Backup: why it copied everything instead of what its bitmap marks (an inconsistent
    /// bitmap under `on_inconsistent_bitmap = full`); also in its BLOCK_JOB_COMPLETED.
    pub fallback: Option<String>,
    /// Bytes compared by the job's verification (`verify`), source side.
    pub verified_bytes: u64,
    /// Backup: bytes the verification had to pass over because the guest changed them since
    /// the point in time (their only copy is the target's).
    pub unverified_bytes: u64,
    /// Backup with `discard_source`: bytes discarded on the source after their copy.
    pub discarded_source_bytes: u64,
}

/// Whether a mirror's target reads as zeros before the job writes it, and how that is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetZero {
    pub is_zero: bool,
    /// `false`: the caller said so (`target_is_zero`); `true`: the job asked the target's
    /// block status.
    pub detected: bool,
}

/// A request that ends a job's main loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopRequest {
    Cancel { force: bool },
    Complete,
}

struct Control {
    status: JobStatus,
    /// Pauses by users and by the `stop` error policy; `resume` takes one back.
    pause_count: u32,
    stop: Option<StopRequest>,
    finalize_requested: bool,
    /// The job has passed its point of no return (a mirror's switch-over, a backup's
    /// finalization): a cancel can no longer stop it and is refused.
    committed: bool,
    auto_finalize: bool,
    auto_dismiss: bool,
    error: Option<String>,
}

/// A job-specific run-time change (the `change` verb), applied by the job's own code.
pub(crate) type ChangeFn = Box<dyn Fn(&super::JobChange) -> Result<(), JobError> + Send + Sync>;

pub(crate) struct JobCore {
    pub(crate) id: String,
    pub(crate) kind: JobKind,
    control: Mutex<Control>,
    status_changed: Condvar,
    /// Wakes the job's task: verbs, finished copies, guest writes in active modes.
    pub(crate) signal: Signal,
    events: Sender<JobEvent>,
    receiver: Receiver<JobEvent>,
    dropped_event_count: AtomicU64,
    done_bytes: AtomicU64,
    remaining_bytes: AtomicU64,
    speed_bytes_per_s: AtomicU64,
    /// Mirror: every guest write reaches the target before it completes, and nothing is dirty.
    actively_synced: AtomicBool,
    /// Rarely written (a few times a job), so a lock costs nothing; a leaf lock.
    info: Mutex<JobInfo>,
    on_change: ChangeFn,
}

impl JobCore {
    pub(crate) fn new(
        id: String,
        kind: JobKind,
        auto_finalize: bool,
        auto_dismiss: bool,
        speed_bytes_per_s: u64,
        on_change: ChangeFn,
    ) -> Arc<JobCore> {
        let (events, receiver) = crossbeam_channel::bounded(EVENT_QUEUE_COUNT_MAX);
        let control = Control {
            status: JobStatus::Undefined,
            pause_count: 0,
            stop: None,
            finalize_requested: false,
            committed: false,
            auto_finalize,
            auto_dismiss,
            error: None,
        };
        let core = JobCore {
            id,
            kind,
            control: Mutex::new(control),
            status_changed: Condvar::new(),
            signal: Signal::default(),
            events,
            receiver,
            dropped_event_count: AtomicU64::new(0),
            done_bytes: AtomicU64::new(0),
            remaining_bytes: AtomicU64::new(0),
            speed_bytes_per_s: AtomicU64::new(speed_bytes_per_s),
            actively_synced: AtomicBool::new(false),
            info: Mutex::new(JobInfo::default()),
            on_change,
        };
        let core = Arc::new(core);
        core.set_status(JobStatus::Created);
        core
    }

    /// Send an event; if nobody has read the last `EVENT_QUEUE_COUNT_MAX`, drop the oldest.
    pub(crate) fn emit(&self, event: JobEvent) {
        let mut event = event;
        loop {
            match self.events.try_send(event) {
                Ok(()) => return,
                Err(TrySendError::Full(back)) => {
                    let _ = self.receiver.try_recv();
                    self.dropped_event_count.fetch_add(1, Ordering::Relaxed);
                    event = back;
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }

    /// Move to `to` (which the transition table must allow) and tell the watchers.
    pub(crate) fn set_status(&self, to: JobStatus) {
        let mut control = self.control.lock();
        self.set_status_locked(&mut control, to);
        drop(control);
        self.status_changed.notify_all();
    }

    /// The transition itself, under the caller's hold of `control` (so a verb's check and its
    /// transition are one step); the caller notifies `status_changed` after unlocking.
    fn set_status_locked(&self, control: &mut Control, to: JobStatus) {
        let from = control.status;
        assert!(transition_allowed(from, to), "job {}: illegal transition {from} -> {to}", self.id);
        control.status = to;
        // Sent under the lock (the channel's own lock is a leaf): whoever sees the new status
        // finds its event already queued, and events keep the order of the changes.
        self.emit(JobEvent::StatusChange { id: self.id.clone(), status: to });
    }

    /// Pass the point of no return (a mirror's switch-over, a backup's finalization) unless
    /// a cancel came first: then that request is returned and the job must act on it. After
    /// this, a cancel is refused with [`JobError::TooLateToCancel`] instead of being accepted
    /// and ignored.
    pub(crate) fn commit(&self) -> Result<(), StopRequest> {
        let mut control = self.control.lock();
        assert!(!control.committed, "job {}: committed twice", self.id);
        if let Some(stop @ StopRequest::Cancel { .. }) = control.stop {
            return Err(stop);
        }
        control.committed = true;
        Ok(())
    }

    pub(crate) fn status(&self) -> JobStatus {
        self.control.lock().status
    }

    pub(crate) fn pause_requested(&self) -> bool {
        self.control.lock().pause_count > 0
    }

    /// The `stop` error policy: pause as a user would, once however many errors arrive
    /// together (QEMU's rule: no new pause if already paused); one `resume` retries.
    /// Carry out an error policy's `action` for a failed `operation`: BLOCK_JOB_ERROR, then
    /// nothing (ignore), a pause (stop), or the message the job fails with (report).
    pub(crate) fn apply_error(
        &self,
        operation: super::IoOperation,
        action: super::ErrorAction,
        error: &crate::Error,
    ) -> Option<String> {
        let message = error.to_string();
        self.emit(JobEvent::Error { id: self.id.clone(), operation, action, message: message.clone() });
        match action {
            super::ErrorAction::Ignore => None,
            super::ErrorAction::Stop => {
                self.pause_for_error();
                None
            }
            super::ErrorAction::Report => Some(message),
        }
    }

    pub(crate) fn pause_for_error(&self) {
        let mut control = self.control.lock();
        control.pause_count = control.pause_count.max(1);
    }

    pub(crate) fn stop_request(&self) -> Option<StopRequest> {
        self.control.lock().stop
    }

    /// Whether the job may leave `pending` now (auto-finalize, or a user's finalize).
    pub(crate) fn finalize_allowed(&self) -> bool {
        let control = self.control.lock();
        control.auto_finalize || control.finalize_requested
    }

    pub(crate) fn auto_dismiss(&self) -> bool {
        self.control.lock().auto_dismiss
    }

    pub(crate) fn set_error(&self, message: String) {
        self.control.lock().error.get_or_insert(message);
    }

    pub(crate) fn error(&self) -> Option<String> {
        self.control.lock().error.clone()
    }

    pub(crate) fn add_done_bytes(&self, bytes: u64) {
        self.done_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn set_remaining_bytes(&self, bytes: u64) {
        self.remaining_bytes.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn speed_bytes_per_s(&self) -> u64 {
        self.speed_bytes_per_s.load(Ordering::Relaxed)
    }

    pub(crate) fn set_actively_synced(&self, synced: bool) {
        self.actively_synced.store(synced, Ordering::Relaxed);
    }

    pub(crate) fn actively_synced(&self) -> bool {
        self.actively_synced.load(Ordering::Relaxed)
    }

    /// Change the job's info (a leaf lock: never held across anything else).
    pub(crate) fn update_info(&self, update: impl FnOnce(&mut JobInfo)) {
        update(&mut self.info.lock());
    }

    pub(crate) fn info(&self) -> JobInfo {
        self.info.lock().clone()
    }

    pub(crate) fn progress(&self) -> JobProgress {
        let done_bytes = self.done_bytes.load(Ordering::Relaxed);
        JobProgress { done_bytes, total_bytes: done_bytes + self.remaining_bytes.load(Ordering::Relaxed) }
    }

    pub(crate) fn figures(&self) -> JobFigures {
        let progress = self.progress();
        JobFigures { len: progress.total_bytes, offset: progress.done_bytes, speed: self.speed_bytes_per_s() }
    }

    /// Check `verb` against the state, then apply `act` to the control state, atomically.
    fn verb(&self, verb: JobVerb, act: impl FnOnce(&mut Control) -> Result<(), JobError>) -> Result<(), JobError> {
        {
            let mut control = self.control.lock();
            if !verb_allowed(verb, control.status) {
                return Err(JobError::VerbNotAllowed {
                    id: self.id.clone(),
                    verb: verb.name(),
                    status: control.status,
                });
            }
            act(&mut control)?;
        }
        self.signal.notify();
        Ok(())
    }

    /// A verb that is itself a transition (dismiss): the check and the move happen under one
    /// hold of the lock, so of two racing callers exactly one succeeds.
    fn verb_transition(&self, verb: JobVerb, to: JobStatus) -> Result<(), JobError> {
        self.verb(verb, |control| {
            self.set_status_locked(control, to);
            Ok(())
        })?;
        self.status_changed.notify_all();
        Ok(())
    }
}

/// A handle on a running job; cheap to clone, usable from any thread.
///
/// Verbs are checked against the job's state and refused with [`JobError::VerbNotAllowed`]
/// where QEMU's job API refuses them; an accepted verb takes effect at the job's next step.
#[derive(Clone)]
pub struct Job {
    pub(crate) core: Arc<JobCore>,
}

impl Job {
    pub fn id(&self) -> &str {
        &self.core.id
    }

    pub fn kind(&self) -> JobKind {
        self.core.kind
    }

    pub fn status(&self) -> JobStatus {
        self.core.status()
    }

    pub fn progress(&self) -> JobProgress {
        self.core.progress()
    }

    /// Mirror: whether every guest write now reaches the target before it completes and
    /// nothing is left to copy (an active copy mode, READY, no background write in progress).
    pub fn actively_synced(&self) -> bool {
        self.core.actively_synced()
    }

    /// The speed limit in bytes/s (0: none).
    pub fn speed_bytes_per_s(&self) -> u64 {
        self.core.speed_bytes_per_s()
    }

    /// Whether the job leaves `pending` by itself.
    pub fn auto_finalize(&self) -> bool {
        self.core.control.lock().auto_finalize
    }

    /// Whether the job goes from `concluded` to `null` by itself.
    pub fn auto_dismiss(&self) -> bool {
        self.core.auto_dismiss()
    }

    /// What the job has learnt or done beyond its progress (see [`JobInfo`]).
    pub fn info(&self) -> JobInfo {
        self.core.info()
    }

    /// Why the job failed, once it has.
    pub fn error(&self) -> Option<String> {
        self.core.error()
    }

    /// The job's events, in order. Every clone of the receiver drains the same queue.
    pub fn events(&self) -> Receiver<JobEvent> {
        self.core.receiver.clone()
    }

    /// Events dropped because nobody read them (the queue holds 4096).
    pub fn dropped_event_count(&self) -> u64 {
        self.core.dropped_event_count.load(Ordering::Relaxed)
    }

    /// Pause: copying stops at the next step (running becomes paused, ready becomes standby).
    /// Pauses nest: each needs a `resume`.
    pub fn pause(&self) -> Result<(), JobError> {
        self.core.verb(JobVerb::Pause, |control| {
            control.pause_count += 1;
            Ok(())
        })
    }

    /// Take back one pause (a user's, or the one an error policy of `stop` made).
    pub fn resume(&self) -> Result<(), JobError> {
        let id = self.core.id.clone();
        self.core.verb(JobVerb::Resume, |control| match control.pause_count {
            0 => Err(JobError::NotPaused { id }),
            _ => {
                control.pause_count -= 1;
                Ok(())
            }
        })
    }

    /// Cancel. Before ready, or with `force`, the job ends as cancelled and the target is
    /// undefined; a mirror that is ready ends instead with a consistent target and no
    /// switch-over, reported as completed.
    ///
    /// A cancel that arrives while a mirror converges for its switch-over (pending) stops
    /// it: the disk keeps its source. Once the job has passed its point of no return (the
    /// switch-over or the backup's finalization is under way), cancel is refused with
    /// [`JobError::TooLateToCancel`].
    pub fn cancel(&self, force: bool) -> Result<(), JobError> {
        let id = &self.core.id;
        self.core.verb(JobVerb::Cancel, |control| {
            if control.committed {
                return Err(JobError::TooLateToCancel { id: id.clone(), status: control.status });
            }
            control.stop = Some(StopRequest::Cancel { force });
            control.pause_count = 0; // a paused job must wake up to end
            Ok(())
        })
    }

    /// Finish a ready job (a mirror switches the disk over to the target).
    /// Refused with [`JobError::CancelUnderWay`] once a cancel was accepted: the job will not
    /// switch over, and saying Ok would be a lie (QEMU refuses it too).
    pub fn complete(&self) -> Result<(), JobError> {
        let id = &self.core.id;
        self.core.verb(JobVerb::Complete, |control| {
            if let Some(StopRequest::Cancel { .. }) = control.stop {
                return Err(JobError::CancelUnderWay { id: id.clone() });
            }
            control.stop = Some(StopRequest::Complete);
            Ok(())
        })
    }

    /// Let a pending job (auto-finalize off) make its changes and conclude.
    pub fn finalize(&self) -> Result<(), JobError> {
        self.core.verb(JobVerb::Finalize, |control| {
            control.finalize_requested = true;
            Ok(())
        })
    }

    /// Remove a concluded job (auto-dismiss off).
    pub fn dismiss(&self) -> Result<(), JobError> {
        self.core.verb_transition(JobVerb::Dismiss, JobStatus::Null)
    }

    /// Limit copying to `bytes_per_s` (0: no limit).
    pub fn set_speed(&self, bytes_per_s: u64) -> Result<(), JobError> {
        self.core.verb(JobVerb::SetSpeed, |_| Ok(()))?;
        self.core.speed_bytes_per_s.store(bytes_per_s, Ordering::Relaxed);
        self.core.signal.notify();
        Ok(())
    }

    /// Change an option while the job runs.
    pub fn change(&self, change: super::JobChange) -> Result<(), JobError> {
        self.core.verb(JobVerb::Change, |_| Ok(()))?;
        (self.core.on_change)(&change)?;
        self.core.signal.notify();
        Ok(())
    }

    /// Block until the job's status satisfies `wanted` or `timeout` passes; returns the status
    /// then. For threads outside the reactor (tests, tools).
    pub fn wait_for(&self, wanted: impl Fn(JobStatus) -> bool, timeout: Duration) -> JobStatus {
        let deadline = Instant::now() + timeout;
        let mut control = self.core.control.lock();
        while !wanted(control.status) {
            if self.core.status_changed.wait_until(&mut control, deadline).timed_out() {
                break;
            }
        }
        control.status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobChange;

    const STATUSES: [JobStatus; 11] = JobStatus::ALL;
    const VERBS: [JobVerb; 8] = JobVerb::ALL;

    /// A job handle whose state is set by hand (no task runs it), with one pause so that an
    /// allowed resume has something to take back.
    fn job_in(status: JobStatus) -> Job {
        let core = JobCore::new("j".into(), JobKind::Mirror, false, false, 0, Box::new(|_| Ok(())));
        let mut control = core.control.lock();
        control.status = status;
        control.pause_count = 1;
        drop(control);
        Job { core }
    }

    fn apply(job: &Job, verb: JobVerb) -> Result<(), JobError> {
        match verb {
            JobVerb::Cancel => job.cancel(true),
            JobVerb::Pause => job.pause(),
            JobVerb::Resume => job.resume(),
            JobVerb::SetSpeed => job.set_speed(1 << 20),
            JobVerb::Complete => job.complete(),
            JobVerb::Finalize => job.finalize(),
            JobVerb::Dismiss => job.dismiss(),
            JobVerb::Change => job.change(JobChange::CopyMode(crate::job::mirror::CopyMode::WriteBlocking)),
        }
    }

    /// What the control state says a verb did: (status, stop, pause count, finalize, speed).
    fn snapshot(job: &Job) -> (JobStatus, Option<StopRequest>, u32, bool, u64) {
        let control = job.core.control.lock();
        let speed = job.core.speed_bytes_per_s();
        (control.status, control.stop, control.pause_count, control.finalize_requested, speed)
    }

    #[test]
    fn every_verb_in_every_state_answers_as_the_table_says() {
        for status in STATUSES {
            for committed in [false, true] {
                for verb in VERBS {
                    check_verb(status, committed, verb);
                }
            }
        }
    }

    /// One (state, verb) pair, before or past the point of no return: the answer, the error
    /// text, and what the verb changed (nothing when refused).
    fn check_verb(status: JobStatus, committed: bool, verb: JobVerb) {
        let job = job_in(status);
        job.core.control.lock().committed = committed;
        let before = snapshot(&job);
        let result = apply(&job, verb);
        let after = snapshot(&job);
        if !verb_allowed(verb, status) {
            let error = result.expect_err("a verb the table refuses");
            let expected = format!("job j: {} is not allowed while the job is {}", verb.name(), status.name());
            assert_eq!(error.to_string(), expected);
            assert_eq!(after, before, "{verb:?} in {status} was refused but changed the job");
            return;
        }
        if verb == JobVerb::Cancel && committed {
            let error = result.expect_err("past the point of no return");
            assert!(matches!(error, JobError::TooLateToCancel { .. }), "{status}: {error}");
            assert_eq!(after, before, "a refused cancel changed the job in {status}");
            return;
        }
        result.unwrap_or_else(|e| panic!("{verb:?} in {status}: {e}"));
        let expected = match verb {
            JobVerb::Cancel => (status, Some(StopRequest::Cancel { force: true }), 0, false, 0),
            JobVerb::Pause => (status, None, 2, false, 0),
            JobVerb::Resume => (status, None, 0, false, 0),
            JobVerb::SetSpeed => (status, None, 1, false, 1 << 20),
            JobVerb::Complete => (status, Some(StopRequest::Complete), 1, false, 0),
            JobVerb::Finalize => (status, None, 1, true, 0),
            JobVerb::Dismiss => (JobStatus::Null, None, 1, false, 0),
            JobVerb::Change => (status, None, 1, false, 0),
        };
        assert_eq!(after, expected, "{verb:?} in {status}");
    }

    #[test]
    fn a_cancel_before_the_commit_is_obeyed_and_one_after_it_is_refused() {
        let job = job_in(JobStatus::Pending);
        job.cancel(false).unwrap();
        assert_eq!(job.core.commit(), Err(StopRequest::Cancel { force: false }), "the cancel stops the switch-over");

        let job = job_in(JobStatus::Pending);
        job.core.commit().expect("no cancel yet");
        let error = job.cancel(true).expect_err("too late");
        assert!(matches!(error, JobError::TooLateToCancel { status: JobStatus::Pending, .. }), "{error}");
        assert_eq!(
            error.to_string(),
            "job j: cancel is too late: the job is pending and already finishing (switch-over or finalization under way)"
        );
        assert_eq!(snapshot(&job).1, None, "the refused cancel left no request behind");
    }

    /// Verbs in sequence: what an accepted verb promised, a later one cannot take back
    /// silently.
    #[test]
    fn a_complete_after_an_accepted_cancel_is_refused_and_the_cancel_stands() {
        for force in [true, false] {
            let job = job_in(JobStatus::Ready);
            job.cancel(force).unwrap();
            let error = job.complete().expect_err("the cancel was accepted first");
            assert_eq!(error.to_string(), "job j: cannot complete: a cancel is under way");
            assert_eq!(snapshot(&job).1, Some(StopRequest::Cancel { force }), "the cancel stands");
        }
        // The other order: a cancel after complete (before the point of no return) wins.
        let job = job_in(JobStatus::Ready);
        job.complete().unwrap();
        job.cancel(true).unwrap();
        assert_eq!(job.core.commit(), Err(StopRequest::Cancel { force: true }));
    }

    #[test]
    fn of_two_racing_dismisses_exactly_one_succeeds() {
        for round in 0..3000 {
            let job = job_in(JobStatus::Concluded);
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let racers: Vec<_> = (0..2)
                .map(|_| {
                    let (job, barrier) = (job.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        job.dismiss()
                    })
                })
                .collect();
            let results: Vec<_> = racers.into_iter().map(|r| r.join().expect("no panic")).collect();
            let ok_count = results.iter().filter(|r| r.is_ok()).count();
            assert_eq!(ok_count, 1, "round {round}: {results:?}");
            let error = results.into_iter().find_map(Result::err).expect("one refused");
            assert!(matches!(error, JobError::VerbNotAllowed { status: JobStatus::Null, .. }), "{error}");
            assert_eq!(job.status(), JobStatus::Null);
        }
    }
}
