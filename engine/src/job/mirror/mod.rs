//! The mirror job: copy a source [`Disk`] that keeps taking guest writes to a target driver,
//! until the target is in sync (READY), then keep it in sync until the user completes (the
//! disk switches over to the target) or cancels.
//!
//! Parts: this file holds the options, their checks and `start`; `filter` is the guest's write
//! path while the job runs (one per copy mode); `copy` copies one range; `run` is the job's
//! task (scheduling copies from the dirty bitmap, READY, pause, errors, the end).
//!
//! Why the target cannot end with stale data:
//! - Every chunk a guest writes while the job runs is either marked dirty *after* the guest
//!   write completed on the source (background mode), or written to the target by the guest's
//!   own request while its range is registered in the in-flight table (active modes), or both.
//! - A copy clears the range's dirty bits, *then* registers its range in the in-flight table
//!   (waiting for overlapping active writes), *then* reads the source (a pipelined copy reads
//!   each piece after the clear, and holds the whole range until its last piece is written). A background guest write that lands after the read also marks
//!   the chunk after it lands, so after the clear: the chunk is copied again. One that landed
//!   before the read is in what the copy reads.
//! - Two operations on overlapping ranges that both write the target (copies, active guest
//!   writes, write-behind target writes) are registered and so never run at once: the
//!   target sees them in the order they were admitted, and each carries data read (or
//!   written) after the previous one finished.
//! - Active modes never clear dirty bits, so a chunk marked by a background-mode write still
//!   in progress across a mode switch is never lost.
//! - At the end the disk is drained (no guest write in progress, new ones held), every
//!   registered operation finishes, the remaining dirty chunks are copied, and only then is
//!   the switch made.

mod filter;
mod run;
mod verify;

pub use super::{CopyPriority, SyncMode, VerifyMode};

use super::{ErrorPolicy, Job, JobChange, JobCore, JobError, JobKind};
use crate::bitmap::{DirtyBitmap, GRANULARITY_BYTES_MAX, GRANULARITY_BYTES_MIN};
use crate::block::{BlockDriver, Disk};
use crate::reactor::RuntimeHandle;
use std::sync::Arc;

/// How guest writes reach the target while the job runs. Switchable at run time in any
/// direction ([`JobChange::CopyMode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CopyMode {
    /// Guest writes mark the bitmap; the copier catches up.
    Background,
    /// A guest write completes only once it is on source and target.
    WriteBlocking,
    /// A guest write completes after the source write; its target write follows, with the
    /// bytes outstanding bounded by `write_behind_bytes_max` (at the bound guest writes wait,
    /// so the job converges under any write rate). A failed target write marks its chunks
    /// dirty again.
    WriteBehind,
    /// Background while the copier keeps up; write-behind when, for `AUTO_WINDOW_COUNT`
    /// windows of `AUTO_WINDOW` in a row, the guest dirtied again at least half of what the
    /// copier copied; background again after a window with no guest write.
    Auto,
}

impl CopyMode {
    pub fn parse(text: &str) -> Result<CopyMode, JobError> {
        match text {
            "background" => Ok(CopyMode::Background),
            "write-blocking" => Ok(CopyMode::WriteBlocking),
            "write-behind" => Ok(CopyMode::WriteBehind),
            "auto" => Ok(CopyMode::Auto),
            _ => Err(JobError::Config {
                name: "copy-mode",
                value: text.to_string(),
                reason: "background, write-blocking, write-behind or auto",
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CopyMode::Background => "background",
            CopyMode::WriteBlocking => "write-blocking",
            CopyMode::WriteBehind => "write-behind",
            CopyMode::Auto => "auto",
        }
    }

    /// Whether guest writes reach the target themselves in this mode.
    pub fn is_active(self) -> bool {
        matches!(self, CopyMode::WriteBlocking | CopyMode::WriteBehind)
    }
}

/// A mirror's options. `Default` gives QEMU's defaults where they are sound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorConfig {
    /// The job's id in events.
    pub id: String,
    pub sync: SyncMode,
    pub copy_mode: CopyMode,
    /// With `SyncMode::Bitmap`: the source's named bitmap to copy from (leased while the job
    /// runs, left as it was).
    pub bitmap: Option<String>,
    /// Dirty-tracking chunk (power of two, 512 B to 64 MiB).
    pub granularity_bytes: u64,
    /// Bytes the copier keeps in flight at most (a pipelined copy counts its two pieces);
    /// the buffers it keeps for reuse stay within as much again.
    pub buf_size_bytes: u64,
    /// Copy operations in flight at most.
    pub copy_ops_max: usize,
    /// Bytes one copy operation moves at most.
    pub copy_bytes_max: u64,
    /// Write-behind: target bytes outstanding at most.
    pub write_behind_bytes_max: u64,
    /// Copy speed limit in bytes/s (0: none).
    pub speed_bytes_per_s: u64,
    /// Zeros may become holes on the target.
    pub unmap: bool,
    /// A copied buffer of zeros becomes write_zeroes on the target.
    pub detect_zeroes: bool,
    pub on_source_error: ErrorPolicy,
    pub on_target_error: ErrorPolicy,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    /// Who goes first, guest or copier; also sets the copier's I/O class.
    pub copy_priority: CopyPriority,
    /// QEMU 10.1's `target-is-zero`: the target reads as zeros before the job, so zeros and
    /// holes of the source need not be written. `None` (ours): ask the target's block status.
    pub target_is_zero: Option<bool>,
    /// Compare source and target before the switch-over (ours; see `job/verify.rs`).
    pub verify: VerifyMode,
}

impl Default for MirrorConfig {
    fn default() -> MirrorConfig {
        MirrorConfig {
            id: "mirror0".to_string(),
            sync: SyncMode::Full,
            copy_mode: CopyMode::Background,
            bitmap: None,
            granularity_bytes: 64 << 10,
            buf_size_bytes: 16 << 20,
            copy_ops_max: 16,
            copy_bytes_max: 1 << 20,
            write_behind_bytes_max: 64 << 20,
            speed_bytes_per_s: 0,
            unmap: true,
            detect_zeroes: true,
            on_source_error: ErrorPolicy::Report,
            on_target_error: ErrorPolicy::Report,
            auto_finalize: true,
            auto_dismiss: true,
            copy_priority: CopyPriority::Guest,
            target_is_zero: None,
            verify: VerifyMode::Off,
        }
    }
}

/// Limits on the knobs, so one typo cannot ask for a million buffers.
const COPY_OPS_MAX: usize = 1024;
const BUF_SIZE_BYTES_MAX: u64 = 1 << 30;

fn bad(name: &'static str, value: u64, reason: &'static str) -> JobError {
    JobError::Config { name, value: value.to_string(), reason }
}

impl MirrorConfig {
    /// Check the options against the source disk; changes nothing.
    fn check(&self, source: &Disk) -> Result<(), JobError> {
        self.validate()?;
        if self.granularity_bytes < source.alignment().request_bytes {
            return Err(bad("granularity", self.granularity_bytes, "smaller than the source's block size"));
        }
        Ok(())
    }

    /// Check the options on their own (what `start` checks before it looks at any disk).
    pub fn validate(&self) -> Result<(), JobError> {
        let granularity = self.granularity_bytes;
        let granularity_ok =
            granularity.is_power_of_two() && (GRANULARITY_BYTES_MIN..=GRANULARITY_BYTES_MAX).contains(&granularity);
        if !granularity_ok {
            return Err(bad("granularity", granularity, "a power of two from 512 B to 64 MiB"));
        }
        if self.copy_bytes_max < granularity || self.copy_bytes_max > crate::block::MAX_REQUEST_BYTES {
            return Err(bad("max-chunk", self.copy_bytes_max, "at least the granularity, at most 1 GiB"));
        }
        if self.buf_size_bytes < self.copy_bytes_max || self.buf_size_bytes > BUF_SIZE_BYTES_MAX {
            return Err(bad("buf-size", self.buf_size_bytes, "at least max-chunk, at most 1 GiB"));
        }
        if self.copy_ops_max == 0 || self.copy_ops_max > COPY_OPS_MAX {
            return Err(bad("max-in-flight", self.copy_ops_max as u64, "1 to 1024"));
        }
        if self.write_behind_bytes_max < granularity {
            return Err(bad("write-behind-bytes", self.write_behind_bytes_max, "at least the granularity"));
        }
        match (self.sync, &self.bitmap) {
            (SyncMode::Bitmap, None) => {
                Err(JobError::Config { name: "bitmap", value: String::new(), reason: "sync=bitmap needs a bitmap" })
            }
            (sync, Some(name)) if sync != SyncMode::Bitmap => Err(JobError::Config {
                name: "bitmap",
                value: name.clone(),
                reason: "a bitmap is only used with sync=bitmap",
            }),
            _ => Ok(()),
        }
    }
}

/// Start mirroring `source` to `target` on `runtime`. Every check runs first: on an error
/// nothing was started or changed.
///
/// ```no_run
/// # use tandem::job::mirror::{start, MirrorConfig};
/// # fn demo(runtime: &tandem::reactor::RuntimeHandle, source: &tandem::block::Disk,
/// #         target: std::sync::Arc<dyn tandem::block::BlockDriver>) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tandem::job::JobStatus;
/// let job = start(runtime, source, target, MirrorConfig::default())?;
/// job.wait_for(|s| s == JobStatus::Ready, Duration::from_secs(600));
/// job.complete()?; // the disk now writes to the target
/// # Ok(()) }
/// ```
pub fn start(
    runtime: &RuntimeHandle,
    source: &Disk,
    target: Arc<dyn BlockDriver>,
    config: MirrorConfig,
) -> Result<Job, JobError> {
    config.check(source)?;
    super::check_target(source, &target)?;
    let lease = match &config.bitmap {
        Some(name) => Some(source.bitmaps().acquire(name, &format!("mirror job {}", config.id))?),
        None => None,
    };
    let dirty = DirtyBitmap::new(config.granularity_bytes, source.size_bytes())?;
    let mode = Arc::new(filter::ModeCell::new(config.copy_mode));
    let on_change = {
        let mode = mode.clone();
        Box::new(move |change: &JobChange| match change {
            JobChange::CopyMode(copy_mode) => {
                mode.request(*copy_mode);
                Ok(())
            }
        })
    };
    let core = JobCore::new(
        config.id.clone(),
        JobKind::Mirror,
        config.auto_finalize,
        config.auto_dismiss,
        config.speed_bytes_per_s,
        on_change,
    );
    let shared = filter::MirrorShared::new(core.clone(), source.clone(), target, dirty, mode, &config, runtime);
    // On the write path before `start` returns: with sync=none, every write the caller makes
    // from now on is the job's to copy.
    source.insert_filter(Arc::new(filter::MirrorFilter(shared.clone())))?;
    let job = Job { core };
    runtime.spawn(move || run::run(shared, config, lease));
    Ok(job)
}
