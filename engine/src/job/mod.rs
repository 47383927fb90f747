//! Block jobs: the state machine, verbs, events, error policies and speed limit every job
//! shares, following the semantics of QEMU's job API (what its users rely on), and the jobs
//! themselves ([`mirror`]).
//!
//! A job runs as one task on a reactor core; a [`Job`] handle drives it from any thread. The
//! handle's verbs check the verb table and record the request; the task acts on it at its next
//! step and makes the state transition itself (checked against the transition table), so the
//! state a user sees is always the one the task is in.

pub mod backup;
mod control;
pub(crate) mod copy;
pub mod copy_before_write;
pub mod mirror;
mod options;
pub(crate) mod pace;
mod ratelimit;
mod signal;
pub(crate) mod verify;

pub use control::{Job, JobInfo, JobProgress, TargetZero};
pub(crate) use control::{JobCore, StopRequest};
pub use options::{CopyPriority, SyncMode, VerifyMode};
pub(crate) use ratelimit::RateLimit;
pub(crate) use signal::Signal;

use crate::bitmap::BitmapError;
use crate::error::Error;
use std::fmt;

/// A job's state (QEMU's `JobStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// Before creation finished (never seen through a handle).
    Undefined,
    Created,
    Running,
    /// Paused while running (by a user or by an error policy of `stop`).
    Paused,
    /// The job could complete: for mirror, the target is in sync.
    Ready,
    /// Paused while ready.
    Standby,
    /// Done working, waiting for the other jobs of its transaction (immediate here).
    Waiting,
    /// Waiting to be finalized (auto-finalize off).
    Pending,
    /// Failed or cancelled, cleaning up.
    Aborting,
    /// Finished; its result can be read until it is dismissed.
    Concluded,
    /// Dismissed: gone.
    Null,
}

const STATUS_COUNT: usize = 11;

impl JobStatus {
    /// Every state, in table order.
    pub const ALL: [JobStatus; STATUS_COUNT] = [
        JobStatus::Undefined,
        JobStatus::Created,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Ready,
        JobStatus::Standby,
        JobStatus::Waiting,
        JobStatus::Pending,
        JobStatus::Aborting,
        JobStatus::Concluded,
        JobStatus::Null,
    ];

    /// The name QEMU uses in events and queries.
    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Whether the job has stopped working for good.
    pub fn is_finished(self) -> bool {
        matches!(self, JobStatus::Concluded | JobStatus::Null)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which state may follow which. Rows: from; columns: to, in `JobStatus` order
/// (undefined, created, running, paused, ready, standby, waiting, pending, aborting,
/// concluded, null).
const TRANSITIONS: [[bool; STATUS_COUNT]; STATUS_COUNT] = {
    const F: bool = false;
    const T: bool = true;
    [
        /* undefined */ [F, T, F, F, F, F, F, F, F, F, F],
        /* created   */ [F, F, T, F, F, F, F, F, T, F, F],
        /* running   */ [F, F, F, T, T, F, T, F, T, F, F],
        /* paused    */ [F, F, T, F, F, F, F, F, F, F, F],
        /* ready     */ [F, F, F, F, F, T, T, F, T, F, F],
        /* standby   */ [F, F, F, F, T, F, F, F, F, F, F],
        /* waiting   */ [F, F, F, F, F, F, F, T, T, F, F],
        /* pending   */ [F, F, F, F, F, F, F, F, T, T, F],
        /* aborting  */ [F, F, F, F, F, F, F, F, F, T, F],
        /* concluded */ [F, F, F, F, F, F, F, F, F, F, T],
        /* null      */ [F, F, F, F, F, F, F, F, F, F, F],
    ]
};

/// Whether a job may go from `from` to `to`.
pub fn transition_allowed(from: JobStatus, to: JobStatus) -> bool {
    TRANSITIONS[from.index()][to.index()]
}

/// What a user can ask of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobVerb {
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Complete,
    Finalize,
    Dismiss,
    Change,
}

impl JobVerb {
    /// Every verb.
    pub const ALL: [JobVerb; 8] = [
        JobVerb::Cancel,
        JobVerb::Pause,
        JobVerb::Resume,
        JobVerb::SetSpeed,
        JobVerb::Complete,
        JobVerb::Finalize,
        JobVerb::Dismiss,
        JobVerb::Change,
    ];

    pub fn name(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
            JobVerb::Change => "change",
        }
    }

    /// In which states the verb is allowed, in `JobStatus` order.
    fn allowed_in(self) -> [bool; STATUS_COUNT] {
        const F: bool = false;
        const T: bool = true;
        match self {
            JobVerb::Cancel => [F, T, T, T, T, T, T, T, F, F, F],
            JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed | JobVerb::Change => [F, T, T, T, T, T, F, F, F, F, F],
            JobVerb::Complete => [F, F, F, F, T, F, F, F, F, F, F],
            JobVerb::Finalize => [F, F, F, F, F, F, F, T, F, F, F],
            JobVerb::Dismiss => [F, F, F, F, F, F, F, F, F, T, F],
        }
    }
}

/// Whether `verb` is allowed in `status`.
pub fn verb_allowed(verb: JobVerb, status: JobStatus) -> bool {
    verb.allowed_in()[status.index()]
}

/// What kind of job sent an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    Mirror,
    Backup,
}

impl JobKind {
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Mirror => "mirror",
            JobKind::Backup => "backup",
        }
    }
}

/// Which side of a copy failed (`operation` in BLOCK_JOB_ERROR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoOperation {
    Read,
    Write,
}

impl IoOperation {
    pub fn name(self) -> &'static str {
        match self {
            IoOperation::Read => "read",
            IoOperation::Write => "write",
        }
    }
}

/// What to do when a job's I/O fails (QEMU's `BlockdevOnError`), set for source and target
/// separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ErrorPolicy {
    /// The job fails and ends with the error.
    #[default]
    Report,
    /// The failed range stays dirty and is retried later; the job goes on.
    Ignore,
    /// The job pauses; `resume` retries the failed range.
    Stop,
    /// `Stop` on ENOSPC (a target that ran out of space can be grown), `Report` otherwise.
    Enospc,
}

impl ErrorPolicy {
    /// Parse QEMU's spelling.
    pub fn parse(text: &str) -> Result<ErrorPolicy, JobError> {
        match text {
            "report" => Ok(ErrorPolicy::Report),
            "ignore" => Ok(ErrorPolicy::Ignore),
            "stop" => Ok(ErrorPolicy::Stop),
            "enospc" => Ok(ErrorPolicy::Enospc),
            _ => Err(JobError::Config {
                name: "on-error",
                value: text.to_string(),
                reason: "report, ignore, stop or enospc",
            }),
        }
    }

    /// The action this policy takes for `error`.
    pub fn action(self, error: &Error) -> ErrorAction {
        match self {
            ErrorPolicy::Report => ErrorAction::Report,
            ErrorPolicy::Ignore => ErrorAction::Ignore,
            ErrorPolicy::Stop => ErrorAction::Stop,
            ErrorPolicy::Enospc if error.is_no_space() => ErrorAction::Stop,
            ErrorPolicy::Enospc => ErrorAction::Report,
        }
    }
}

/// The action taken on an error (`action` in BLOCK_JOB_ERROR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorAction {
    Report,
    Ignore,
    Stop,
}

impl ErrorAction {
    pub fn name(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
        }
    }
}

/// Where a job stands, as its events report it: `offset` bytes done of `len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobFigures {
    pub len: u64,
    pub offset: u64,
    /// Speed limit in bytes/s, 0 for none.
    pub speed: u64,
}

/// Something a job tells its watchers. `name()` is the QEMU event name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    /// JOB_STATUS_CHANGE.
    StatusChange { id: String, status: JobStatus },
    /// BLOCK_JOB_READY.
    Ready { id: String, kind: JobKind, figures: JobFigures },
    /// BLOCK_JOB_COMPLETED; `error` says why it failed, if it did; `fallback` (ours) why a
    /// backup copied everything instead of what its bitmap marks, if it did.
    Completed { id: String, kind: JobKind, figures: JobFigures, error: Option<String>, fallback: Option<String> },
    /// BLOCK_JOB_CANCELLED.
    Cancelled { id: String, kind: JobKind, figures: JobFigures },
    /// BLOCK_JOB_ERROR.
    Error { id: String, operation: IoOperation, action: ErrorAction, message: String },
    /// MIRROR_COPY_MODE_CHANGE (ours): the copy mode asked for or the one in force changed
    /// (they differ under auto).
    CopyModeChange { id: String, requested: &'static str, in_force: &'static str, actively_synced: bool },
}

impl JobEvent {
    pub fn name(&self) -> &'static str {
        match self {
            JobEvent::StatusChange { .. } => "JOB_STATUS_CHANGE",
            JobEvent::Ready { .. } => "BLOCK_JOB_READY",
            JobEvent::Completed { .. } => "BLOCK_JOB_COMPLETED",
            JobEvent::Cancelled { .. } => "BLOCK_JOB_CANCELLED",
            JobEvent::Error { .. } => "BLOCK_JOB_ERROR",
            JobEvent::CopyModeChange { .. } => "MIRROR_COPY_MODE_CHANGE",
        }
    }
}

/// A change to a running job's options (the `change` verb).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobChange {
    /// Mirror: switch the copy mode, in any direction.
    CopyMode(mirror::CopyMode),
}

/// A job that cannot start, or a verb it refuses. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("job {id}: {verb} is not allowed while the job is {status}")]
    VerbNotAllowed { id: String, verb: &'static str, status: JobStatus },
    #[error("job {id}: cannot resume: the job was not paused")]
    NotPaused { id: String },
    #[error("job {id}: cannot complete: a cancel is under way")]
    CancelUnderWay { id: String },
    #[error("job {id}: cancel is too late: the job is {status} and already finishing (switch-over or finalization under way)")]
    TooLateToCancel { id: String, status: JobStatus },
    #[error("invalid job setting: {name} = {value}: {reason}")]
    Config { name: &'static str, value: String, reason: &'static str },
    #[error("source and target are the same: {name}")]
    SameDevice { name: String },
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    #[error(transparent)]
    Disk(#[from] Error),
}

/// A target fit for a job on `source`: not the source itself (the same driver, or the same
/// file under another name or a hard link), at least as large and no stricter in alignment;
/// and no other job's filter on the disk.
pub(crate) fn check_target(
    source: &crate::block::Disk,
    target: &std::sync::Arc<dyn crate::block::BlockDriver>,
) -> Result<(), JobError> {
    let below = source.driver();
    let same = std::sync::Arc::ptr_eq(&below, target)
        || below.device_id().zip(target.device_id()).is_some_and(|(a, b)| a == b)
        || below.name() == target.name();
    if same {
        return Err(JobError::SameDevice { name: target.name().to_string() });
    }
    source.check_replacement(target.as_ref())?;
    if source.has_filter() {
        return Err(Error::DiskBusy { name: source.name().to_string() }.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [JobStatus; STATUS_COUNT] = JobStatus::ALL;

    #[test]
    fn table_order_matches_the_enum() {
        for (index, status) in ALL.iter().enumerate() {
            assert_eq!(status.index(), index, "{status}");
        }
    }

    #[test]
    fn every_state_but_null_can_end_and_null_is_final() {
        // From every state a path of allowed transitions leads to null, and none leaves it.
        for start in ALL {
            let mut seen = [false; STATUS_COUNT];
            let mut stack = vec![start];
            while let Some(status) = stack.pop() {
                if std::mem::replace(&mut seen[status.index()], true) {
                    continue;
                }
                stack.extend(ALL.into_iter().filter(|to| transition_allowed(status, *to)));
            }
            assert!(seen[JobStatus::Null.index()], "no way from {start} to null");
        }
        assert!(ALL.iter().all(|to| !transition_allowed(JobStatus::Null, *to)));
    }

    #[test]
    fn verbs_follow_the_table() {
        assert!(verb_allowed(JobVerb::Complete, JobStatus::Ready));
        assert!(!verb_allowed(JobVerb::Complete, JobStatus::Running));
        assert!(verb_allowed(JobVerb::Cancel, JobStatus::Pending));
        assert!(!verb_allowed(JobVerb::Cancel, JobStatus::Concluded));
        assert!(verb_allowed(JobVerb::Dismiss, JobStatus::Concluded));
        assert!(verb_allowed(JobVerb::Finalize, JobStatus::Pending));
        assert!(!verb_allowed(JobVerb::Pause, JobStatus::Waiting));
        assert!(verb_allowed(JobVerb::Change, JobStatus::Standby));
    }

    #[test]
    fn enospc_stops_only_on_no_space() {
        let no_space = Error::Io { op: "write", offset: 0, errno: libc::ENOSPC };
        let eio = Error::Io { op: "write", offset: 0, errno: libc::EIO };
        assert_eq!(ErrorPolicy::Enospc.action(&no_space), ErrorAction::Stop);
        assert_eq!(ErrorPolicy::Enospc.action(&eio), ErrorAction::Report);
        assert_eq!(ErrorPolicy::Stop.action(&eio), ErrorAction::Stop);
        assert_eq!(ErrorPolicy::parse("ignore").unwrap(), ErrorPolicy::Ignore);
        let bad = ErrorPolicy::parse("retry").unwrap_err().to_string();
        assert!(bad.contains("retry"), "{bad}");
    }
}
