//! The backup job: a point-in-time copy of a source [`Disk`] that keeps taking guest writes.
//! A copy-before-write filter (`copy_before_write.rs`) saves the old data of any cluster a
//! guest write would change before the background copier reached it; the copier (`run.rs`)
//! copies every other cluster the sync mode asks for. The target ends equal to the source as it
//! was when `start` returned (writes still in progress then may be in it or not, as after a
//! crash). The argument is at the top of `copy_before_write.rs`.
//!
//! Sync modes: `full` copies every cluster (zeros allocated on the target), `top` the same with
//! the source's holes left as holes on the target, `none` copies nothing itself: only what the
//! guest is about to overwrite reaches the target, and the job runs until cancelled (with a
//! fleecing view, QEMU's image fleecing). `bitmap` copies what a named bitmap marks: at the
//! point in time its marks move to the job and it starts over, recording what changes after;
//! `bitmap_mode` says what happens to the moved marks at the end (see [`BitmapMode`]). An
//! inconsistent bitmap is refused, or with [`OnInconsistentBitmap::Full`] the job copies the
//! whole disk instead and leaves the bitmap consistent if it succeeds (see [`Fallback`]).
//!
//! The point in time is taken under a drain of the source: no guest write is in progress
//! while the filter goes on, the named bitmap's marks move and a `new_bitmap` is created, so
//! each write is wholly before it (in the backup, and not in the new or emptied bitmap) or
//! wholly after it (saved first, and marked). That is why `start` blocks its caller until
//! the writes in progress are done, and refuses to run on one of the runtime's cores.

mod run;
mod verify;
mod view;

pub use view::SnapshotView;

use super::copy_before_write::{CbwFilter, CbwShared, OnCbwError};
use super::{CopyPriority, ErrorPolicy, Job, JobCore, JobError, JobKind, SyncMode, VerifyMode};
use crate::bitmap::{BitmapLease, BitmapRegistry, DirtyBitmap, GRANULARITY_BYTES_MAX};
use crate::block::{BlockDriver, Disk};
use crate::reactor::RuntimeHandle;
use std::sync::Arc;
use std::time::Duration;

/// What happens to a sync=bitmap backup's named bitmap at the end (QEMU's `bitmap-mode`).
/// Its marks moved to the job at the point in time; the bitmap has recorded new writes since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BitmapMode {
    /// On success the moved marks are done with; on failure or cancel they come back.
    OnSuccess,
    /// The moved marks always come back: the bitmap is never cleared by the job.
    Never,
    /// What was copied is done with, even on failure; only what was not comes back.
    Always,
}

impl BitmapMode {
    pub fn parse(text: &str) -> Result<BitmapMode, JobError> {
        match text {
            "on-success" => Ok(BitmapMode::OnSuccess),
            "never" => Ok(BitmapMode::Never),
            "always" => Ok(BitmapMode::Always),
            _ => Err(JobError::Config {
                name: "bitmap-mode",
                value: text.to_string(),
                reason: "on-success, never or always",
            }),
        }
    }
}

/// What an incremental (sync=bitmap) backup does when its bitmap is inconsistent: its process
/// stopped while recording, so writes may be missing from it (ours; QEMU always fails).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OnInconsistentBitmap {
    /// Refuse to start, naming the bitmap (QEMU's behaviour).
    #[default]
    Fail,
    /// Copy everything instead, say so in the job's info and completion event, and leave the
    /// bitmap consistent, recording from the point in time, for the next incremental.
    Full,
}

impl OnInconsistentBitmap {
    pub fn parse(text: &str) -> Result<OnInconsistentBitmap, JobError> {
        match text {
            "fail" => Ok(OnInconsistentBitmap::Fail),
            "full" => Ok(OnInconsistentBitmap::Full),
            _ => Err(JobError::Config {
                name: "on-inconsistent-bitmap",
                value: text.to_string(),
                reason: "fail or full",
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OnInconsistentBitmap::Fail => "fail",
            OnInconsistentBitmap::Full => "full",
        }
    }
}

/// A backup's options. `Default` gives QEMU's defaults where they are sound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupConfig {
    /// The job's id in events.
    pub id: String,
    pub sync: SyncMode,
    /// The named bitmap of sync=bitmap.
    pub bitmap: Option<String>,
    /// With `bitmap`: what happens to its moved marks at the end (default on-success).
    pub bitmap_mode: Option<BitmapMode>,
    /// Create this named bitmap on the source at the job's point in time (granularity: the
    /// cluster size), so later sync=bitmap backups copy only what changed since: the start of
    /// an incremental chain. Both happen or neither.
    pub new_bitmap: Option<String>,
    /// Copy-before-write and copy unit (power of two, 4 KiB to 64 MiB, at least the
    /// source's block size).
    pub cluster_bytes: u64,
    /// Background copies in flight at most.
    pub workers_max: usize,
    /// One background copy's size at most (a multiple of the cluster is used).
    pub chunk_bytes_max: u64,
    /// Bytes the background copier keeps in flight at most.
    pub buf_size_bytes: u64,
    pub speed_bytes_per_s: u64,
    pub on_source_error: ErrorPolicy,
    pub on_target_error: ErrorPolicy,
    pub on_cbw_error: OnCbwError,
    /// How long a guest write may wait for its copy-before-write (`None`: no bound).
    pub cbw_timeout: Option<Duration>,
    pub copy_priority: CopyPriority,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    /// QEMU 9.1's `discard-source`: discard each cluster on the source once it is on the
    /// target (the fleecing scratch image shrinks as the backup reads it). Unlike QEMU, only
    /// on a source whose discard loses nobody's data: the [`SnapshotView`] of a sync=none
    /// backup (`BlockDriver::scratch_discard_bytes`); elsewhere the start is refused. The
    /// cluster is raised to the view's, so each discard releases whole clusters of it.
    pub discard_source: bool,
    /// QEMU 9.2's copy-before-write `min-cluster-size`: a floor on the cluster size, so a
    /// target with large clusters is not written in small pieces. The job's cluster is
    /// `max(cluster_bytes, min_cluster_bytes)`: a power of two, at least the source's block
    /// size, at most `chunk_bytes_max` (and 64 MiB).
    pub min_cluster_bytes: Option<u64>,
    /// sync=bitmap with an inconsistent bitmap: fail (QEMU) or copy everything.
    pub on_inconsistent_bitmap: OnInconsistentBitmap,
    /// Compare the finished target with the point in time (ours; see `job/verify.rs`).
    pub verify: VerifyMode,
}

impl Default for BackupConfig {
    fn default() -> BackupConfig {
        BackupConfig {
            id: "backup0".to_string(),
            sync: SyncMode::Full,
            bitmap: None,
            bitmap_mode: None,
            new_bitmap: None,
            cluster_bytes: 64 << 10,
            workers_max: 16,
            chunk_bytes_max: 1 << 20,
            buf_size_bytes: 16 << 20,
            speed_bytes_per_s: 0,
            on_source_error: ErrorPolicy::Report,
            on_target_error: ErrorPolicy::Report,
            on_cbw_error: OnCbwError::BreakGuestWrite,
            cbw_timeout: None,
            copy_priority: CopyPriority::Guest,
            auto_finalize: true,
            auto_dismiss: true,
            discard_source: false,
            min_cluster_bytes: None,
            on_inconsistent_bitmap: OnInconsistentBitmap::Fail,
            verify: VerifyMode::Off,
        }
    }
}

const CLUSTER_BYTES_MIN: u64 = 4 << 10;
const WORKERS_MAX: usize = 1024;
const BUF_SIZE_BYTES_MAX: u64 = 1 << 30;

fn bad(name: &'static str, value: u64, reason: &'static str) -> JobError {
    JobError::Config { name, value: value.to_string(), reason }
}

impl BackupConfig {
    /// Check the options on their own; changes nothing.
    pub fn validate(&self) -> Result<(), JobError> {
        let cluster = self.cluster_bytes;
        if !cluster.is_power_of_two() || !(CLUSTER_BYTES_MIN..=GRANULARITY_BYTES_MAX).contains(&cluster) {
            return Err(bad("cluster-size", cluster, "a power of two from 4 KiB to 64 MiB"));
        }
        if self.chunk_bytes_max < cluster || self.chunk_bytes_max > crate::block::MAX_REQUEST_BYTES {
            return Err(bad("max-chunk", self.chunk_bytes_max, "at least the cluster size, at most 1 GiB"));
        }
        if self.buf_size_bytes < self.chunk_bytes_max || self.buf_size_bytes > BUF_SIZE_BYTES_MAX {
            return Err(bad("buf-size", self.buf_size_bytes, "at least max-chunk, at most 1 GiB"));
        }
        if self.workers_max == 0 || self.workers_max > WORKERS_MAX {
            return Err(bad("max-workers", self.workers_max as u64, "1 to 1024"));
        }
        if self.verify != VerifyMode::Off && self.sync == SyncMode::None {
            return Err(JobError::Config {
                name: "verify",
                value: self.verify.name().to_string(),
                reason: "sync=none never finishes on its own: there is no finished target to verify",
            });
        }
        if self.verify != VerifyMode::Off && self.discard_source {
            return Err(JobError::Config {
                name: "verify",
                value: self.verify.name().to_string(),
                reason: "verify compares the target with the source, which discard-source discards as it copies",
            });
        }
        if let Some(floor) = self.min_cluster_bytes {
            if !floor.is_power_of_two() || floor > self.chunk_bytes_max || floor > GRANULARITY_BYTES_MAX {
                return Err(bad("min-cluster-size", floor, "a power of two, at most max-chunk and 64 MiB"));
            }
        }
        if self.cbw_timeout == Some(Duration::ZERO) {
            return Err(bad("cbw-timeout", 0, "more than zero, or none"));
        }
        match (self.sync, &self.bitmap, self.bitmap_mode) {
            (SyncMode::Bitmap, None, _) => {
                Err(JobError::Config { name: "bitmap", value: String::new(), reason: "sync=bitmap needs a bitmap" })
            }
            (sync, Some(name), _) if sync != SyncMode::Bitmap => Err(JobError::Config {
                name: "bitmap",
                value: name.clone(),
                reason: "a bitmap is only used with sync=bitmap",
            }),
            (_, None, Some(_)) => Err(JobError::Config {
                name: "bitmap-mode",
                value: String::new(),
                reason: "bitmap-mode needs a bitmap",
            }),
            _ => Ok(()),
        }
    }
}

/// Back `source` up to `target` on `runtime`, as the source is when this returns. Every
/// check runs first: on an error nothing was started or changed.
///
/// ```no_run
/// # use tandem::job::backup::{start, BackupConfig};
/// # fn demo(runtime: &tandem::reactor::RuntimeHandle, source: &tandem::block::Disk,
/// #         target: std::sync::Arc<dyn tandem::block::BlockDriver>) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tandem::job::JobStatus;
/// let job = start(runtime, source, target, BackupConfig::default())?;
/// // The guest keeps writing to `source`; the target gets the source as it was here.
/// job.wait_for(|s| s == JobStatus::Null, Duration::from_secs(600));
/// assert_eq!(job.error(), None);
/// # Ok(()) }
/// ```
pub fn start(
    runtime: &RuntimeHandle,
    source: &Disk,
    target: Arc<dyn BlockDriver>,
    config: BackupConfig,
) -> Result<Job, JobError> {
    config.validate()?;
    start_job(runtime, source, target, config, false).map(|(job, _)| job)
}

/// As [`start`], for a caller that holds `drained`, a drain of `source` (a QMP transaction):
/// the point in time is taken under the caller's drain, so whatever the caller does under the
/// same drain (bitmap actions, other backups) happens at the same instant as far as any guest
/// write can tell. Refused if `drained` is not a drain of `source`.
pub fn start_drained(
    runtime: &RuntimeHandle,
    source: &Disk,
    target: Arc<dyn BlockDriver>,
    config: BackupConfig,
    drained: &crate::block::DrainGuard,
) -> Result<Job, JobError> {
    config.validate()?;
    if !source.is_drained_by(drained) {
        let value = format!("a drain of another disk than {}", source.name());
        return Err(JobError::Config { name: "drained", value, reason: "the guard must drain the backup's source" });
    }
    start_job(runtime, source, target, config, true).map(|(job, _)| job)
}

/// As [`start`], plus a read-only driver that reads the source as it was at the point in time
/// while the job runs (fleecing; with sync=none, QEMU's image fleecing). Wrap it in a
/// [`Disk`] to read it, export it, or back it up again. Its reads fail (ESTALE) once the job
/// has ended.
pub fn start_with_view(
    runtime: &RuntimeHandle,
    source: &Disk,
    target: Arc<dyn BlockDriver>,
    config: BackupConfig,
) -> Result<(Job, Arc<SnapshotView>), JobError> {
    config.validate()?;
    if config.sync == SyncMode::Bitmap {
        // A clear bit there also means "not in the bitmap", whose data the target never gets.
        return Err(JobError::Config {
            name: "sync",
            value: "bitmap".to_string(),
            reason: "a snapshot view needs sync full, top or none",
        });
    }
    // Only a sync=none job's target is a scratch that holds nothing but saves: a discard
    // through the view may give its space back. Elsewhere the target is a backup.
    let scratch = config.sync == SyncMode::None;
    let (job, shared) = start_job(runtime, source, target, config, false)?;
    Ok((job, Arc::new(SnapshotView::new(shared, source.driver(), scratch))))
}

/// Everything of `start` after the options' own checks; the shared state for a view.
fn start_job(
    runtime: &RuntimeHandle,
    source: &Disk,
    target: Arc<dyn BlockDriver>,
    mut config: BackupConfig,
    drained: bool,
) -> Result<(Job, Arc<CbwShared>), JobError> {
    // From here on the job's cluster is the effective one: the filter, the copier and the
    // pace all take it from the config.
    config.cluster_bytes = effective_cluster_bytes(&config, source)?;
    super::check_target(source, &target)?;
    if runtime.on_core() || crate::reactor::on_any_core() {
        return Err(JobError::Config {
            name: "start",
            value: "on a reactor core".to_string(),
            reason: "start a backup from outside the runtime's cores: it waits for the disk's writes in progress",
        });
    }
    let owner = format!("backup job {}", config.id);
    let lease = match &config.bitmap {
        Some(name) => Some(lease_bitmap(source.bitmaps(), name, &owner, config.on_inconsistent_bitmap)?),
        None => None,
    };
    let fallback = lease.as_ref().and_then(Fallback::for_lease);
    if let Some(name) = &config.new_bitmap {
        if source.bitmaps().get(name).is_ok() {
            return Err(crate::bitmap::BitmapError::Exists { name: name.clone() }.into());
        }
    }
    // Every cluster is the job's until its point-in-time data is on the target (sync=none
    // too: the copier copies nothing, but the guest's writes save what they overwrite);
    // sync=bitmap's marks are filled in at the point in time, unless it falls back.
    let to_copy = DirtyBitmap::new(config.cluster_bytes, source.size_bytes())?;
    if config.sync != SyncMode::Bitmap || fallback.is_some() {
        to_copy.set(0, source.size_bytes()).expect("the whole disk is in range");
    }
    let core = new_core(&config, fallback.as_ref());
    let policy = (config.on_cbw_error, config.cbw_timeout);
    // A fallback keeps sync=bitmap's zeros as data: its target is still an incremental that a
    // restore replays by its data extents over the chain before it (see `Fallback`).
    let zeros = (config.sync == SyncMode::Top, config.sync == SyncMode::Bitmap);
    let (piece_bytes, discard) = (config.chunk_bytes_max, config.discard_source);
    let shared = CbwShared::new(core.clone(), target, to_copy, policy, zeros, piece_bytes, discard);
    if config.verify != VerifyMode::Off {
        // Before the filter goes on: every guest write after the point in time is marked.
        let written = DirtyBitmap::new(config.cluster_bytes, source.size_bytes())?;
        assert!(shared.written_since.set(written).is_ok(), "a new job's bitmap is set once");
    }
    let new_bitmap = config.new_bitmap.clone();
    let fallback = fallback.is_some();
    let point = PointInTime { source: source.clone(), shared: shared.clone(), lease, fallback, new_bitmap, drained };
    let moved = runtime.spawn(move || point.take()).join().map_err(|error| {
        JobError::Disk(crate::Error::Config { name: "start", value: error.to_string(), reason: "the runtime stopped" })
    })??;
    let job = Job { core };
    let source = source.clone();
    let task_shared = shared.clone();
    runtime.spawn(move || run::run(task_shared, source, config, moved));
    Ok((job, shared))
}

/// The cluster the job uses: `cluster_bytes` raised to `min_cluster_bytes` and, with
/// `discard_source`, to the source's discard unit, so that each discard frees whole units
/// (a smaller run would free nothing). Checks what needs the source; `validate` the rest.
fn effective_cluster_bytes(config: &BackupConfig, source: &Disk) -> Result<u64, JobError> {
    let block_bytes = source.alignment().request_bytes;
    if config.cluster_bytes < block_bytes {
        return Err(bad("cluster-size", config.cluster_bytes, "smaller than the source's block size"));
    }
    let mut cluster_bytes = config.cluster_bytes;
    if let Some(floor) = config.min_cluster_bytes {
        if floor < block_bytes {
            return Err(bad("min-cluster-size", floor, "smaller than the source's block size"));
        }
        cluster_bytes = cluster_bytes.max(floor);
    }
    if config.discard_source {
        // QEMU discards any source; discarding a guest's own disk under it loses its data.
        let Some(unit) = source.driver().scratch_discard_bytes() else {
            return Err(JobError::Config {
                name: "discard-source",
                value: format!("true (source {})", source.name()),
                reason: "only a snapshot view of a sync=none backup (fleecing) may be discarded",
            });
        };
        if unit > config.chunk_bytes_max {
            return Err(bad("discard-source", unit, "the view's cluster (its discard unit) exceeds max-chunk"));
        }
        cluster_bytes = cluster_bytes.max(unit);
    }
    Ok(cluster_bytes)
}

fn new_core(config: &BackupConfig, fallback: Option<&Fallback>) -> Arc<JobCore> {
    let core = JobCore::new(
        config.id.clone(),
        JobKind::Backup,
        config.auto_finalize,
        config.auto_dismiss,
        config.speed_bytes_per_s,
        Box::new(|_| {
            Err(JobError::Config { name: "change", value: String::new(), reason: "backup has no run-time option" })
        }),
    );
    if let Some(fallback) = fallback {
        // From the start, so a query while the job runs already says why it copies everything.
        core.update_info(|info| info.fallback = Some(fallback.reason.clone()));
    }
    core
}

/// Lease sync=bitmap's bitmap: one that is inconsistent only under `Full`, which will not
/// trust its marks; under `Fail` the registry refuses it by name.
fn lease_bitmap(
    bitmaps: &BitmapRegistry,
    name: &str,
    owner: &str,
    policy: OnInconsistentBitmap,
) -> Result<BitmapLease, JobError> {
    let lease = match policy {
        OnInconsistentBitmap::Fail => bitmaps.acquire(name, owner)?,
        OnInconsistentBitmap::Full => bitmaps.acquire_untrusted(name, owner)?,
    };
    Ok(lease)
}

/// A sync=bitmap backup whose bitmap was inconsistent, under `on_inconsistent_bitmap = full`.
///
/// It copies every cluster, as sync=full, but writes zeros as data, as sync=bitmap: the user
/// asked for an incremental, so the target is the next link of a chain, and a restore writes
/// each link's data extents over the ones before. Zeros written as allocated zeros (sync=full)
/// can be unwritten extents, which `SEEK_DATA` reports as holes: the restore would keep the
/// older link's data where the disk now reads zeros. The cost is a fully allocated target.
///
/// At the point in time the bitmap is cleared, so it records exactly the writes after it, but
/// it stays flagged inconsistent until the job succeeds: a clean close of its sidecar while the
/// job runs then still saves it in use, since the target does not yet hold what its old marks
/// lost. At the end (`run.rs`, `settle_bitmap`), success makes it consistent: with the writes
/// since the point in time, or all dirty under bitmap-mode never (its old marks are unknown, so
/// "never clear them" means "copy everything next time"). Failure or cancel gives it back its
/// old marks, still inconsistent, so the next run falls back again.
pub(crate) struct Fallback {
    /// For the job's info and its BLOCK_JOB_COMPLETED.
    pub(crate) reason: String,
}

impl Fallback {
    /// A fallback if the leased bitmap is inconsistent (the lease keeps the flag as it is).
    fn for_lease(lease: &BitmapLease) -> Option<Fallback> {
        let reason = format!(
            "bitmap '{}' was inconsistent (its process stopped while recording it): copied the whole disk",
            lease.name()
        );
        lease.bitmap().is_inconsistent().then_some(Fallback { reason })
    }
}

/// A sync=bitmap job's named bitmap and the marks that moved from it to the job.
pub(crate) struct MovedMarks {
    pub(crate) lease: BitmapLease,
    pub(crate) marks: DirtyBitmap,
    /// The bitmap was inconsistent: the job copies everything (see [`Fallback`]).
    pub(crate) fallback: bool,
}

/// What happens at the point in time, under a drain of the source.
struct PointInTime {
    source: Disk,
    shared: Arc<CbwShared>,
    lease: Option<BitmapLease>,
    /// The leased bitmap is inconsistent: `to_copy` already holds the whole disk.
    fallback: bool,
    new_bitmap: Option<String>,
    /// The caller holds a drain of the source for the whole start (`start_drained`).
    drained: bool,
}

impl PointInTime {
    /// Drain, create the new bitmap, move the named bitmap's marks, put the filter on: all or
    /// nothing.
    async fn take(self) -> Result<Option<MovedMarks>, JobError> {
        let source = &self.source;
        // Under the caller's drain (`start_drained`), or one of its own.
        let guard = match self.drained {
            true => None,
            false => {
                let drain = source.drain().ok_or_else(|| crate::Error::DiskBusy { name: source.name().to_string() })?;
                Some(drain.await)
            }
        };
        if let Some(name) = &self.new_bitmap {
            let bitmap = DirtyBitmap::new(self.shared.to_copy.granularity_bytes(), source.size_bytes())?;
            source.bitmaps().add(name, bitmap)?;
        }
        if let Err(error) = source.insert_filter(Arc::new(CbwFilter(self.shared.clone()))) {
            if let Some(name) = &self.new_bitmap {
                drop(source.bitmaps().remove(name));
            }
            return Err(error.into());
        }
        let fallback = self.fallback;
        let moved = self.lease.map(|lease| {
            let marks = lease.bitmap().copy();
            if !fallback {
                for (offset, length_bytes) in marks.areas() {
                    self.shared.to_copy.set(offset, length_bytes).expect("same disk size");
                }
            }
            // Under a fallback the flag stays set until the job succeeds (see `Fallback`).
            lease.bitmap().clear();
            MovedMarks { lease, marks, fallback }
        });
        drop(guard);
        Ok(moved)
    }
}
