//! The backup job on real files with O_DIRECT: the source is copied aside as the expected
//! snapshot, the backup starts, and a guest of several tasks on two cores writes random pieces
//! of the disk for the whole job. `qemu-img compare` of target and snapshot is the arbiter.

mod common;

use common::jobs::{
    allocated_ranges, open, qemu_img_identical, random_bytes, replay, write_image, Guest, Layout, DISK_BYTES, WAIT,
};
use common::{runtime, scratch_dir};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tandem::block::{BlockDriver, Disk, WriteFlags};
use tandem::buf::AlignedBuf;
use tandem::job::backup::{start, BackupConfig};
use tandem::job::copy_before_write::OnCbwError;
use tandem::job::{ErrorPolicy, Job, JobError, JobEvent, JobStatus, SyncMode};
use tandem::reactor::{BackendChoice, Runtime};
use tandem::IoPriority;
use tandem_drivers::{Fault, FaultRule, FaultyDriver, OpMask, Trigger};

/// Slow enough that the guest writes a few thousand times during a 16 MiB backup.
const SPEED_BYTES_PER_S: u64 = 24 << 20;

struct Setup {
    _dir: tempfile::TempDir,
    source_path: PathBuf,
    target_path: PathBuf,
    snapshot_path: PathBuf,
    runtime: Runtime,
    disk: Disk,
    model: Vec<u8>,
}

/// A source of `layout`, its snapshot copied aside, and a new sparse target.
fn setup(layout: Layout) -> Setup {
    let dir = scratch_dir();
    let path = |name: &str| dir.path().join(name);
    let (source_path, target_path, snapshot_path) = (path("source.img"), path("target.img"), path("snapshot.img"));
    let model = write_image(&source_path, layout, 3);
    std::fs::copy(&source_path, &snapshot_path).unwrap();
    std::fs::File::create(&target_path).unwrap().set_len(DISK_BYTES).unwrap();
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(open(&runtime, &source_path));
    Setup { _dir: dir, source_path, target_path, snapshot_path, runtime, disk, model }
}

fn events(job: &Job) -> Vec<JobEvent> {
    job.events().try_iter().collect()
}

fn wait_null(job: &Job) {
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
}

fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Back up under a guest that writes for the whole job; the target must equal the snapshot.
fn point_in_time(sync: SyncMode, cluster_bytes: u64) {
    let layout = if sync == SyncMode::Top { Layout::Sparse } else { Layout::Dense };
    let s = setup(layout);
    let config = BackupConfig { sync, cluster_bytes, speed_bytes_per_s: SPEED_BYTES_PER_S, ..BackupConfig::default() };
    let target = open(&s.runtime, &s.target_path);
    let job = start(&s.runtime.handle(), &s.disk, target, config).unwrap();
    let guest = Guest::start(&s.runtime, &s.disk, &s.model, 11);
    // Paused until the guest has written a good deal during the job, whatever the machine's
    // speed (copy-before-write keeps working while the copier is paused).
    job.pause().unwrap();
    guest.wait_writes(100);
    job.resume().unwrap();
    wait_null(&job);
    guest.wait_writes(20);
    drop(guest.stop());
    assert_eq!(job.error(), None);
    assert!(!s.disk.has_filter(), "the filter is off once the job ended");
    let Setup { disk, runtime, target_path, snapshot_path, source_path, .. } = s;
    drop((disk, runtime));
    assert!(qemu_img_identical(&snapshot_path, &target_path), "{sync:?} at {cluster_bytes} B clusters");
    assert!(!qemu_img_identical(&snapshot_path, &source_path), "the guest changed the source meanwhile");
    if sync == SyncMode::Top {
        assert!(allocated_bytes(&target_path) < DISK_BYTES, "sync=top leaves the source's holes as holes");
    }
}

#[test]
fn full_4k_is_the_point_in_time() {
    point_in_time(SyncMode::Full, 4 << 10);
}

#[test]
fn full_64k_is_the_point_in_time() {
    point_in_time(SyncMode::Full, 64 << 10);
}

#[test]
fn full_1m_is_the_point_in_time() {
    point_in_time(SyncMode::Full, 1 << 20);
}

#[test]
fn top_4k_is_the_point_in_time() {
    point_in_time(SyncMode::Top, 4 << 10);
}

#[test]
fn top_64k_is_the_point_in_time() {
    point_in_time(SyncMode::Top, 64 << 10);
}

#[test]
fn top_1m_is_the_point_in_time() {
    point_in_time(SyncMode::Top, 1 << 20);
}

/// With sync=none the target gets exactly the old data of what the guest overwrote: every
/// cluster the source no longer shares with the snapshot is on the target as it was.
fn sync_none_saves_what_the_guest_overwrites(cluster_bytes: u64) {
    let s = setup(Layout::Dense);
    let config = BackupConfig { sync: SyncMode::None, cluster_bytes, ..BackupConfig::default() };
    let job = start(&s.runtime.handle(), &s.disk, open(&s.runtime, &s.target_path), config).unwrap();
    let guest = Guest::start(&s.runtime, &s.disk, &s.model, 21);
    guest.wait_writes(300);
    // Stopped before the cancel: writes after the filter is off are not the backup's.
    drop(guest.stop());
    assert_eq!(job.status(), JobStatus::Running, "sync=none runs until cancelled");
    job.cancel(false).unwrap();
    wait_null(&job);
    assert!(events(&job).iter().any(|e| matches!(e, JobEvent::Cancelled { .. })));
    let Setup { disk, runtime, target_path, snapshot_path, source_path, .. } = s;
    drop((disk, runtime));
    let (source, target, snapshot) = (
        std::fs::read(source_path).unwrap(),
        std::fs::read(target_path).unwrap(),
        std::fs::read(snapshot_path).unwrap(),
    );
    let mut changed_count = 0;
    for start in (0..DISK_BYTES as usize).step_by(cluster_bytes as usize) {
        let range = start..start + cluster_bytes as usize;
        if source[range.clone()] != snapshot[range.clone()] {
            changed_count += 1;
            assert_eq!(target[range.clone()], snapshot[range.clone()], "cluster at {start} lost its old data");
        } else {
            assert!(target[range].iter().all(|&b| b == 0), "cluster at {start} was copied though never overwritten");
        }
    }
    assert!(changed_count > 10, "the guest changed only {changed_count} clusters");
}

#[test]
fn sync_none_4k_saves_what_the_guest_overwrites() {
    sync_none_saves_what_the_guest_overwrites(4 << 10);
}

#[test]
fn sync_none_64k_saves_what_the_guest_overwrites() {
    sync_none_saves_what_the_guest_overwrites(64 << 10);
}

#[test]
fn sync_none_1m_saves_what_the_guest_overwrites() {
    sync_none_saves_what_the_guest_overwrites(1 << 20);
}

fn faulty_target(s: &Setup) -> Arc<FaultyDriver> {
    Arc::new(FaultyDriver::new(open(&s.runtime, &s.target_path), 1, false))
}

fn eio_on_writes_at(driver: &FaultyDriver, offset: u64, length_bytes: u64) {
    driver.add_rule(FaultRule {
        ops: OpMask::WRITE.union(OpMask::WRITE_ZEROES),
        trigger: Trigger::Range { offset, length_bytes },
        fault: Fault::Errno(libc::EIO),
        fire_count_max: None,
    });
}

fn guest_write(disk: &Disk, offset: u64, seed: u64) -> tandem::Result<()> {
    let buf = AlignedBuf::from_slice(&random_bytes(4096, seed), 4096).unwrap();
    disk.write_blocking(offset, buf, WriteFlags::default(), IoPriority::GUEST).0
}

fn read_source(disk: &Disk, offset: u64, length_bytes: usize) -> Vec<u8> {
    let (result, buf) = disk.read_blocking(offset, AlignedBuf::zeroed(length_bytes, 4096).unwrap(), IoPriority::GUEST);
    result.unwrap();
    buf.as_slice().to_vec()
}

#[test]
fn a_failed_copy_before_write_fails_the_guest_write_under_break_guest_write() {
    let s = setup(Layout::Dense);
    let target = faulty_target(&s);
    eio_on_writes_at(&target, 4 << 20, 1 << 20);
    let config =
        BackupConfig { sync: SyncMode::None, on_cbw_error: OnCbwError::BreakGuestWrite, ..BackupConfig::default() };
    let job = start(&s.runtime.handle(), &s.disk, target.clone(), config).unwrap();
    let at = (4 << 20) + 8192;
    assert!(guest_write(&s.disk, at, 5).is_err(), "the old data could not be saved: the write must fail");
    assert_eq!(read_source(&s.disk, at, 4096), &s.model[at as usize..at as usize + 4096], "the source is unchanged");
    guest_write(&s.disk, 8 << 20, 6).expect("outside the fault, writes go on");
    assert_eq!(job.status(), JobStatus::Running, "the snapshot is still whole");
    target.clear_rules();
    guest_write(&s.disk, at, 7).expect("once the target works, the write goes through");
    job.cancel(false).unwrap();
    wait_null(&job);
    assert_eq!(job.error(), None);
}

#[test]
fn a_failed_copy_before_write_fails_the_backup_under_break_snapshot() {
    let s = setup(Layout::Dense);
    let target = faulty_target(&s);
    eio_on_writes_at(&target, 4 << 20, 1 << 20);
    let config = BackupConfig {
        sync: SyncMode::None,
        on_cbw_error: OnCbwError::BreakSnapshot,
        auto_dismiss: false,
        ..BackupConfig::default()
    };
    let job = start(&s.runtime.handle(), &s.disk, target, config).unwrap();
    let at = (4 << 20) + 8192;
    guest_write(&s.disk, at, 5).expect("break-snapshot lets the guest write through");
    assert_ne!(read_source(&s.disk, at, 4096), &s.model[at as usize..at as usize + 4096]);
    assert_eq!(job.wait_for(|s| s == JobStatus::Concluded, WAIT), JobStatus::Concluded);
    let error = job.error().expect("the backup failed");
    assert!(error.contains("copy-before-write"), "{error}");
    let completed = events(&job).into_iter().find_map(|e| match e {
        JobEvent::Completed { error, .. } => Some(error),
        _ => None,
    });
    assert!(matches!(completed, Some(Some(_))), "BLOCK_JOB_COMPLETED carries the error: {completed:?}");
    job.dismiss().unwrap();
    assert!(!s.disk.has_filter());
}

#[test]
fn stop_policy_pauses_on_target_eio_and_resume_finishes_the_point_in_time() {
    let s = setup(Layout::Dense);
    let target = faulty_target(&s);
    eio_on_writes_at(&target, 8 << 20, 1 << 20);
    let config = BackupConfig {
        on_target_error: ErrorPolicy::Stop,
        copy_priority: tandem::job::CopyPriority::Job,
        ..BackupConfig::default()
    };
    let job = start(&s.runtime.handle(), &s.disk, target.clone(), config).unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Paused, WAIT), JobStatus::Paused);
    let stopped = events(&job).into_iter().any(|e| {
        matches!(
            e,
            JobEvent::Error { action: tandem::job::ErrorAction::Stop, operation: tandem::job::IoOperation::Write, .. }
        )
    });
    assert!(stopped, "BLOCK_JOB_ERROR with action stop");
    // The guest's own copy-before-write would meet the fault too (and fail its write, the
    // default policy): it starts once the target works, while the job is still paused.
    target.clear_rules();
    let guest = Guest::start(&s.runtime, &s.disk, &s.model, 31);
    guest.wait_writes(200);
    job.resume().unwrap();
    wait_null(&job);
    drop(guest.stop());
    assert_eq!(job.error(), None);
    let Setup { disk, runtime, target_path, snapshot_path, .. } = s;
    drop((disk, target, runtime));
    assert!(qemu_img_identical(&snapshot_path, &target_path));
}

#[test]
fn cancel_mid_job_is_cancelled_and_takes_the_filter_off() {
    let s = setup(Layout::Dense);
    let config = BackupConfig { speed_bytes_per_s: 4 << 20, ..BackupConfig::default() };
    let job = start(&s.runtime.handle(), &s.disk, open(&s.runtime, &s.target_path), config).unwrap();
    assert!(s.disk.has_filter());
    let guest = Guest::start(&s.runtime, &s.disk, &s.model, 41);
    guest.wait_writes(50);
    job.cancel(false).unwrap();
    wait_null(&job);
    drop(guest.stop());
    assert!(events(&job).iter().any(|e| matches!(e, JobEvent::Cancelled { .. })));
    assert!(!s.disk.has_filter());
    let progress = job.progress();
    assert!(progress.done_bytes < DISK_BYTES, "cancelled before the end: {progress:?}");
}

#[test]
fn bad_input_is_refused_and_starts_nothing() {
    let s = setup(Layout::Dense);
    let handle = s.runtime.handle();
    let target = || open(&s.runtime, &s.target_path);
    let refused = |config: BackupConfig, target: Arc<dyn BlockDriver>| {
        let error = start(&handle, &s.disk, target, config).map(|_| ()).unwrap_err();
        assert!(!s.disk.has_filter(), "{error}: nothing may be started");
        error
    };
    let error = refused(BackupConfig { cluster_bytes: 48 << 10, ..BackupConfig::default() }, target());
    assert!(matches!(error, JobError::Config { name: "cluster-size", ref value, .. } if value == "49152"), "{error}");
    let error = refused(BackupConfig { sync: SyncMode::Bitmap, ..BackupConfig::default() }, target());
    assert!(matches!(error, JobError::Config { name: "bitmap", .. }), "{error}");
    let error = refused(BackupConfig { workers_max: 0, ..BackupConfig::default() }, target());
    assert!(matches!(error, JobError::Config { name: "max-workers", .. }), "{error}");
    let error = refused(BackupConfig::default(), open(&s.runtime, &s.source_path));
    assert!(matches!(error, JobError::SameDevice { .. }), "{error}");
    let small_path = s.target_path.with_file_name("small.img");
    std::fs::File::create(&small_path).unwrap().set_len(DISK_BYTES / 2).unwrap();
    let error = refused(BackupConfig::default(), open(&s.runtime, &small_path));
    assert!(error.to_string().contains("small"), "names the target: {error}");
    let slow = BackupConfig { speed_bytes_per_s: 1 << 20, ..BackupConfig::default() };
    let job = start(&handle, &s.disk, target(), slow).unwrap();
    let second = BackupConfig { id: "second".into(), ..BackupConfig::default() };
    let other_path = s.target_path.with_file_name("other.img");
    std::fs::File::create(&other_path).unwrap().set_len(DISK_BYTES).unwrap();
    let error = start(&handle, &s.disk, open(&s.runtime, &other_path), second).map(|_| ()).unwrap_err();
    assert!(matches!(error, JobError::Disk(tandem::Error::DiskBusy { .. })), "{error}");
    job.cancel(false).unwrap();
    wait_null(&job);
    assert!(!s.disk.has_filter());
}

#[test]
fn cbw_timeout_bounds_how_long_a_guest_write_waits() {
    let s = setup(Layout::Dense);
    let target = faulty_target(&s);
    target.add_rule(FaultRule {
        ops: OpMask::WRITE.union(OpMask::WRITE_ZEROES),
        trigger: Trigger::Range { offset: 4 << 20, length_bytes: 1 << 20 },
        fault: Fault::Delay(std::time::Duration::from_secs(2)),
        fire_count_max: None,
    });
    let config = BackupConfig {
        sync: SyncMode::None,
        cbw_timeout: Some(std::time::Duration::from_millis(100)),
        ..BackupConfig::default()
    };
    let job = start(&s.runtime.handle(), &s.disk, target.clone(), config).unwrap();
    let at = (4 << 20) + 8192;
    let error = guest_write(&s.disk, at, 5).expect_err("the save took longer than cbw-timeout");
    assert!(matches!(error, tandem::Error::Io { op: "copy-before-write", errno: libc::ETIMEDOUT, .. }), "{error}");
    assert_eq!(read_source(&s.disk, at, 4096), &s.model[at as usize..at as usize + 4096], "the source is unchanged");
    assert_eq!(job.status(), JobStatus::Running);
    job.cancel(false).unwrap();
    wait_null(&job);
}

/// The data extents of a sparse file (what an incremental backup wrote).
fn data_extents(path: &Path) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let (fd, size) = (file.as_raw_fd(), file.metadata().unwrap().len() as i64);
    let mut extents = Vec::new();
    let mut at = 0i64;
    while at < size {
        // SAFETY: lseek on an fd we own.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        extents.push((data as u64, (hole - data) as u64));
        at = hole;
    }
    extents
}

/// A new sparse image next to the source.
fn new_image(s: &Setup, name: &str) -> PathBuf {
    let path = s.source_path.with_file_name(name);
    std::fs::File::create(&path).unwrap().set_len(DISK_BYTES).unwrap();
    path
}

#[test]
fn an_incremental_chain_4k_restores_the_source_at_each_backup() {
    incremental_chain(4 << 10);
}

#[test]
fn an_incremental_chain_64k_restores_the_source_at_each_backup() {
    incremental_chain(64 << 10);
}

#[test]
fn an_incremental_chain_1m_restores_the_source_at_each_backup() {
    incremental_chain(1 << 20);
}

/// sync=bitmap's point in time: a full backup, then two incrementals, each under a guest,
/// replayed over the full one, equal the source at each incremental's instant.
fn incremental_chain(cluster_bytes: u64) {
    let s = setup(Layout::Dense);
    let handle = s.runtime.handle();
    // Full backup, and the chain's bitmap created at its very instant, under a guest.
    let full_path = s.target_path.clone();
    let full = BackupConfig {
        new_bitmap: Some("chain".into()),
        cluster_bytes,
        speed_bytes_per_s: SPEED_BYTES_PER_S,
        ..BackupConfig::default()
    };
    let job = start(&handle, &s.disk, open(&s.runtime, &full_path), full).unwrap();
    let guest = Guest::start(&s.runtime, &s.disk, &s.model, 51);
    wait_null(&job);
    assert_eq!(job.error(), None);
    let model = guest.stop();
    let chain = s.disk.bitmaps().get("chain").unwrap();
    assert!(chain.dirty_chunk_count() > 0, "the bitmap recorded the guest's writes since the full backup");
    // Two incrementals, each under a guest, each against its own snapshot.
    let mut model = model;
    let mut incremental_paths = Vec::new();
    for round in 0..2u64 {
        let snapshot_path = s.source_path.with_file_name(format!("snapshot{round}.img"));
        std::fs::copy(&s.source_path, &snapshot_path).unwrap();
        let moved_count = chain.dirty_chunk_count();
        let path = new_image(&s, &format!("inc{round}.img"));
        let config = BackupConfig {
            id: format!("inc{round}"),
            sync: SyncMode::Bitmap,
            bitmap: Some("chain".into()),
            cluster_bytes,
            ..BackupConfig::default()
        };
        let job = start(&handle, &s.disk, open(&s.runtime, &path), config).unwrap();
        let guest = Guest::start(&s.runtime, &s.disk, &model, 61 + round);
        wait_null(&job);
        guest.wait_writes(100);
        model = guest.stop();
        assert_eq!(job.error(), None);
        let copied_bytes: u64 = data_extents(&path).iter().map(|e| e.1).sum();
        assert!(copied_bytes > 0, "round {round}: the guest changed something");
        assert!(copied_bytes <= moved_count * cluster_bytes, "round {round}: only what the bitmap marked");
        incremental_paths.push((path, snapshot_path));
    }
    // Replay full + incrementals into a fresh image: it equals the source at each instant.
    let restored_path = s.source_path.with_file_name("restored.img");
    std::fs::copy(&full_path, &restored_path).unwrap();
    let Setup { disk, runtime, .. } = s;
    drop((disk, runtime));
    for (path, snapshot_path) in &incremental_paths {
        replay(path, &restored_path);
        assert!(qemu_img_identical(snapshot_path, &restored_path), "{} restored", path.display());
    }
}

/// A sync=bitmap backup whose target fails: what comes back to the bitmap per mode.
fn bitmap_after_failure(mode: tandem::job::backup::BitmapMode) -> (u64, u64) {
    bitmap_after_failure_enabled(mode, true)
}

/// As `bitmap_after_failure`, with the named bitmap enabled (recording) or not.
fn bitmap_after_failure_enabled(mode: tandem::job::backup::BitmapMode, enabled: bool) -> (u64, u64) {
    let s = setup(Layout::Dense);
    let bitmap = tandem::bitmap::DirtyBitmap::new(64 << 10, DISK_BYTES).unwrap();
    bitmap.set(0, DISK_BYTES).unwrap();
    let bitmap = s.disk.bitmaps().add("b", bitmap).unwrap();
    s.disk.bitmaps().set_enabled("b", enabled).unwrap();
    let target = faulty_target(&s);
    eio_on_writes_at(&target, 12 << 20, 4 << 20);
    let config = BackupConfig {
        sync: SyncMode::Bitmap,
        bitmap: Some("b".into()),
        bitmap_mode: Some(mode),
        copy_priority: tandem::job::CopyPriority::Job,
        workers_max: 1,
        ..BackupConfig::default()
    };
    let job = start(&s.runtime.handle(), &s.disk, target, config).unwrap();
    wait_null(&job);
    assert!(job.error().is_some(), "the target failed");
    (bitmap.dirty_chunk_count(), DISK_BYTES / (64 << 10))
}

#[test]
fn bitmap_mode_on_success_gives_every_mark_back_on_failure() {
    let (dirty, all) = bitmap_after_failure(tandem::job::backup::BitmapMode::OnSuccess);
    assert_eq!(dirty, all);
}

#[test]
fn bitmap_mode_never_gives_every_mark_back() {
    let (dirty, all) = bitmap_after_failure(tandem::job::backup::BitmapMode::Never);
    assert_eq!(dirty, all);
}

#[test]
fn bitmap_mode_always_gives_back_what_was_not_copied_to_a_disabled_bitmap_too() {
    // A disabled bitmap records no guest writes, but the marks the job did not copy must
    // come back all the same, or the next incremental would miss them.
    let (dirty, all) = bitmap_after_failure_enabled(tandem::job::backup::BitmapMode::Always, false);
    assert!(dirty > 0 && dirty < all, "the uncopied marks came back: {dirty} of {all} marked");
}

#[test]
fn bitmap_mode_always_keeps_what_was_copied_even_on_failure() {
    let (dirty, all) = bitmap_after_failure(tandem::job::backup::BitmapMode::Always);
    assert!(dirty > 0 && dirty < all, "the first 12 MiB were copied before the failure: {dirty} of {all} marked");
}

#[test]
fn bitmap_mode_never_keeps_the_marks_on_success() {
    let s = setup(Layout::Dense);
    let bitmap = tandem::bitmap::DirtyBitmap::new(64 << 10, DISK_BYTES).unwrap();
    bitmap.set(1 << 20, 2 << 20).unwrap();
    let bitmap = s.disk.bitmaps().add("b", bitmap).unwrap();
    let config = BackupConfig {
        sync: SyncMode::Bitmap,
        bitmap: Some("b".into()),
        bitmap_mode: Some(tandem::job::backup::BitmapMode::Never),
        ..BackupConfig::default()
    };
    let job = start(&s.runtime.handle(), &s.disk, open(&s.runtime, &s.target_path), config).unwrap();
    wait_null(&job);
    assert_eq!(job.error(), None);
    assert_eq!(bitmap.dirty_bytes(), 2 << 20);
    let on_success = BackupConfig {
        id: "again".into(),
        sync: SyncMode::Bitmap,
        bitmap: Some("b".into()),
        ..BackupConfig::default()
    };
    let job = start(&s.runtime.handle(), &s.disk, open(&s.runtime, &s.target_path), on_success).unwrap();
    wait_null(&job);
    assert_eq!(bitmap.dirty_bytes(), 0, "on-success: what was copied is done with");
}

#[test]
fn bitmap_input_errors_are_named_and_start_nothing() {
    let s = setup(Layout::Dense);
    let handle = s.runtime.handle();
    let try_start = |config: BackupConfig| {
        let error = start(&handle, &s.disk, open(&s.runtime, &s.target_path), config).map(|_| ()).unwrap_err();
        assert!(!s.disk.has_filter(), "{error}");
        error
    };
    let unknown = BackupConfig { sync: SyncMode::Bitmap, bitmap: Some("nope".into()), ..BackupConfig::default() };
    let error = try_start(unknown);
    assert!(error.to_string().contains("nope"), "{error}");
    let wrong_sync = BackupConfig { bitmap: Some("b".into()), ..BackupConfig::default() };
    assert!(matches!(try_start(wrong_sync), JobError::Config { name: "bitmap", .. }));
    let mode_alone =
        BackupConfig { bitmap_mode: Some(tandem::job::backup::BitmapMode::Always), ..BackupConfig::default() };
    assert!(matches!(try_start(mode_alone), JobError::Config { name: "bitmap-mode", .. }));
    let no_bitmap = BackupConfig { sync: SyncMode::Bitmap, ..BackupConfig::default() };
    assert!(matches!(try_start(no_bitmap), JobError::Config { name: "bitmap", .. }));
    s.disk.bitmaps().add("b", tandem::bitmap::DirtyBitmap::new(64 << 10, DISK_BYTES).unwrap()).unwrap();
    let _lease = s.disk.bitmaps().acquire("b", "someone else").unwrap();
    let busy = BackupConfig { sync: SyncMode::Bitmap, bitmap: Some("b".into()), ..BackupConfig::default() };
    assert!(try_start(busy).to_string().contains("busy"));
    let exists = BackupConfig { new_bitmap: Some("b".into()), ..BackupConfig::default() };
    assert!(try_start(exists).to_string().contains("already exists"));
    drop(_lease);
    let viewed = BackupConfig { sync: SyncMode::Bitmap, bitmap: Some("b".into()), ..BackupConfig::default() };
    let target = open(&s.runtime, &s.target_path);
    let error = tandem::job::backup::start_with_view(&handle, &s.disk, target, viewed).map(|_| ()).unwrap_err();
    assert!(matches!(error, JobError::Config { name: "sync", .. }), "no view of an incremental: {error}");
    assert!(!s.disk.has_filter());
}

#[test]
fn fleecing_reads_equal_the_snapshot_while_the_guest_writes() {
    let s = setup(Layout::Dense);
    let snapshot = std::fs::read(&s.snapshot_path).unwrap();
    let config = BackupConfig { sync: SyncMode::None, ..BackupConfig::default() };
    let target = open(&s.runtime, &s.target_path);
    let (job, view) = tandem::job::backup::start_with_view(&s.runtime.handle(), &s.disk, target, config).unwrap();
    let view = Disk::new(view);
    let guest = Guest::start(&s.runtime, &s.disk, &s.model, 71);
    for pass in 0..3 {
        guest.wait_writes(100);
        for offset in (0..DISK_BYTES).step_by(1 << 20) {
            let (result, buf) =
                view.read_blocking(offset, AlignedBuf::zeroed(1 << 20, 4096).unwrap(), IoPriority::GUEST);
            result.unwrap();
            let expected = &snapshot[offset as usize..(offset + (1 << 20)) as usize];
            assert!(buf.as_slice() == expected, "pass {pass}: the view at {offset} is not the point in time");
        }
    }
    let (result, _) =
        view.write_blocking(0, AlignedBuf::zeroed(4096, 4096).unwrap(), WriteFlags::default(), IoPriority::GUEST);
    assert!(result.is_err(), "the view is read-only");
    drop(guest.stop());
    job.cancel(false).unwrap();
    wait_null(&job);
    let (result, _) = view.read_blocking(0, AlignedBuf::zeroed(4096, 4096).unwrap(), IoPriority::GUEST);
    assert!(matches!(result, Err(tandem::Error::Io { errno: libc::ESTALE, .. })), "{result:?}");
}

#[test]
fn an_incremental_chain_survives_a_restart_through_its_sidecar_and_refuses_after_an_unclean_stop() {
    let s = setup(Layout::Dense);
    let sidecar = s.source_path.with_file_name("source.img.chain.bitmap");
    // Process one: a full backup creates the chain's bitmap, persisted from then on.
    let full = BackupConfig {
        new_bitmap: Some("chain".into()),
        speed_bytes_per_s: SPEED_BYTES_PER_S,
        ..BackupConfig::default()
    };
    let job = start(&s.runtime.handle(), &s.disk, open(&s.runtime, &s.target_path), full).unwrap();
    let recording = tandem::bitmap::record(&sidecar, "chain", s.disk.bitmaps().get("chain").unwrap()).unwrap();
    let guest = Guest::start(&s.runtime, &s.disk, &s.model, 81);
    wait_null(&job);
    assert_eq!(job.error(), None);
    let model = guest.stop();
    recording.close().unwrap(); // clean stop
    let Setup { disk, runtime: first, source_path, target_path: full_path, _dir, .. } = s;
    drop((disk, first));

    // Process two: reopen the source and the sidecar, back up what changed.
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(open(&runtime, &source_path));
    let recording = tandem::bitmap::open_for_recording(&sidecar).unwrap();
    assert!(recording.bitmap().dirty_chunk_count() > 0, "the first process's writes were saved");
    disk.bitmaps().add_shared("chain", recording.bitmap().clone()).unwrap();
    // A cluster that becomes zeros must reach the incremental as data, or the replay skips it.
    disk.write_zeroes_blocking(2 << 20, 64 << 10, true, IoPriority::GUEST).unwrap();
    let snapshot_path = source_path.with_file_name("snapshot-inc.img");
    std::fs::copy(&source_path, &snapshot_path).unwrap();
    let inc_path = source_path.with_file_name("inc.img");
    std::fs::File::create(&inc_path).unwrap().set_len(DISK_BYTES).unwrap();
    let config = BackupConfig { sync: SyncMode::Bitmap, bitmap: Some("chain".into()), ..BackupConfig::default() };
    let job = start(&runtime.handle(), &disk, open(&runtime, &inc_path), config).unwrap();
    let guest = Guest::start(&runtime, &disk, &model, 82);
    wait_null(&job);
    assert_eq!(job.error(), None);
    drop(guest.stop());
    // An unclean stop: the recording is dropped without close, as a crash would leave it.
    drop(recording);
    drop((disk, runtime));
    let restored = source_path.with_file_name("restored.img");
    std::fs::copy(&full_path, &restored).unwrap();
    replay(&inc_path, &restored);
    assert!(qemu_img_identical(&snapshot_path, &restored), "full + incremental after a restart");

    // Process three: the sidecar was left in use; an incremental from it is refused.
    let error = tandem::bitmap::open_for_recording(&sidecar).map(|_| ()).unwrap_err();
    assert!(matches!(error, tandem::bitmap::PersistError::Inconsistent { ref name, .. } if name == "chain"), "{error}");
    assert!(tandem::bitmap::clear_inconsistent(&sidecar).unwrap());
    let recording = tandem::bitmap::open_for_recording(&sidecar).unwrap();
    assert_eq!(recording.bitmap().dirty_bytes(), DISK_BYTES, "acknowledged: the next incremental copies everything");
    recording.close().unwrap();
}

#[test]
fn a_discard_of_the_whole_disk_saves_it_all_a_piece_at_a_time() {
    let s = setup(Layout::Dense);
    // Saves in 64 KiB pieces: a discard of the whole disk needs no buffer of its size.
    let config = BackupConfig {
        sync: SyncMode::None,
        chunk_bytes_max: 64 << 10,
        buf_size_bytes: 64 << 10,
        ..BackupConfig::default()
    };
    let job = start(&s.runtime.handle(), &s.disk, open(&s.runtime, &s.target_path), config).unwrap();
    s.disk.discard_blocking(0, DISK_BYTES, IoPriority::GUEST).unwrap();
    job.cancel(false).unwrap();
    wait_null(&job);
    let Setup { disk, runtime, target_path, snapshot_path, .. } = s;
    drop((disk, runtime));
    assert!(qemu_img_identical(&snapshot_path, &target_path), "every cluster was saved before the discard");
}

#[test]
fn bitmap_mode_always_gives_back_a_coarse_chunk_that_was_only_partly_copied() {
    let s = setup(Layout::Dense);
    // The named bitmap's chunks (2 MiB) are coarser than the clusters (64 KiB) and copies (1 MiB).
    let bitmap = tandem::bitmap::DirtyBitmap::new(2 << 20, DISK_BYTES).unwrap();
    bitmap.set(0, 2 << 20).unwrap();
    let bitmap = s.disk.bitmaps().add("coarse", bitmap).unwrap();
    let target = faulty_target(&s);
    eio_on_writes_at(&target, 1 << 20, 1 << 20);
    let config = BackupConfig {
        sync: SyncMode::Bitmap,
        bitmap: Some("coarse".into()),
        bitmap_mode: Some(tandem::job::backup::BitmapMode::Always),
        copy_priority: tandem::job::CopyPriority::Job,
        workers_max: 1,
        ..BackupConfig::default()
    };
    let job = start(&s.runtime.handle(), &s.disk, target, config).unwrap();
    wait_null(&job);
    assert!(job.error().is_some());
    assert!(bitmap.get(0).unwrap(), "[1 MiB, 2 MiB) was never copied: its chunk must come back");
}

#[test]
fn a_failed_full_backup_takes_its_new_bitmap_away() {
    let s = setup(Layout::Dense);
    let target = faulty_target(&s);
    eio_on_writes_at(&target, 8 << 20, 1 << 20);
    let config = BackupConfig { new_bitmap: Some("chain".into()), ..BackupConfig::default() };
    let job = start(&s.runtime.handle(), &s.disk, target, config).unwrap();
    wait_null(&job);
    assert!(job.error().is_some());
    assert!(s.disk.bitmaps().get("chain").is_err(), "no chain may start from a full backup that failed");
}

/// A process that crashed while its chain's bitmap recorded: a full backup creates "b0" on a
/// disk of `layout`, its sidecar records the guest's writes during and after it, and the
/// process stops without closing the sidecar. Returns the sidecar, the source and the full
/// backup's paths, the scratch directory, and the guest's model of the disk.
fn crash_while_recording() -> (PathBuf, PathBuf, PathBuf, tempfile::TempDir, Vec<u8>) {
    let s = setup(Layout::Dense);
    let sidecar = s.source_path.with_file_name("source.img.b0.bitmap");
    let full = BackupConfig { new_bitmap: Some("b0".into()), ..BackupConfig::default() };
    let job = start(&s.runtime.handle(), &s.disk, open(&s.runtime, &s.target_path), full).unwrap();
    let recording = tandem::bitmap::record(&sidecar, "b0", s.disk.bitmaps().get("b0").unwrap()).unwrap();
    let guest = Guest::start(&s.runtime, &s.disk, &s.model, 91);
    wait_null(&job);
    assert_eq!(job.error(), None);
    guest.wait_writes(20);
    let model = guest.stop();
    recording.checkpoint().unwrap();
    drop(recording); // the crash: never closed, so the sidecar stays in use
    let Setup { disk, runtime, source_path, target_path, _dir, .. } = s;
    drop((disk, runtime));
    (sidecar, source_path, target_path, _dir, model)
}

fn completed_fallback(job: &Job) -> Option<String> {
    let events = events(job);
    let completed = events.iter().find_map(|event| match event {
        JobEvent::Completed { fallback, .. } => Some(fallback.clone()),
        _ => None,
    });
    completed.expect("BLOCK_JOB_COMPLETED")
}

fn new_sparse_image(path: &Path) {
    std::fs::File::create(path).unwrap().set_len(DISK_BYTES).unwrap();
}

fn incremental(id: &str, policy: tandem::job::backup::OnInconsistentBitmap) -> BackupConfig {
    BackupConfig {
        id: id.into(),
        sync: SyncMode::Bitmap,
        bitmap: Some("b0".into()),
        on_inconsistent_bitmap: policy,
        ..BackupConfig::default()
    }
}

/// `fail`: refused by name, and nothing changed: no filter, no lease, the bitmap as it was.
fn assert_fail_changes_nothing(runtime: &Runtime, disk: &Disk, bitmap: &tandem::bitmap::DirtyBitmap, dir: &Path) {
    use tandem::job::backup::OnInconsistentBitmap::Fail;
    let marks_before = bitmap.to_words();
    let refused_path = dir.join("refused.img");
    new_sparse_image(&refused_path);
    let target = open(runtime, &refused_path);
    let error = start(&runtime.handle(), disk, target, incremental("i0", Fail)).map(|_| ()).unwrap_err();
    let named = tandem::bitmap::BitmapError::Inconsistent { name: "b0".into() };
    assert!(matches!(&error, JobError::Bitmap(e) if *e == named), "{error}");
    assert!(error.to_string().contains("'b0'"), "{error}");
    assert!(!disk.has_filter(), "fail starts nothing");
    assert!(bitmap.is_inconsistent() && bitmap.to_words() == marks_before, "fail changes nothing");
    let again = disk.bitmaps().acquire("b0", "check").map(|_| ()).unwrap_err();
    assert_eq!(again, named, "not busy: no lease was left behind");
    assert_eq!(allocated_bytes(&refused_path), 0);
}

/// `full` under a guest: checks the info and the event, and returns the snapshot of the point
/// in time, the fallback's target and the guest's model.
fn fall_back_under_a_guest(
    runtime: &Runtime,
    disk: &Disk,
    source_path: &Path,
    model: &[u8],
) -> (PathBuf, PathBuf, Vec<u8>) {
    use tandem::job::backup::OnInconsistentBitmap::Full;
    let snapshot_path = source_path.with_file_name("snapshot-fallback.img");
    std::fs::copy(source_path, &snapshot_path).unwrap();
    let fallback_path = source_path.with_file_name("fallback.img");
    new_sparse_image(&fallback_path);
    let config = BackupConfig { speed_bytes_per_s: SPEED_BYTES_PER_S, ..incremental("i1", Full) };
    let job = start(&runtime.handle(), disk, open(runtime, &fallback_path), config).unwrap();
    let reason = job.info().fallback.expect("the job says it falls back as soon as it starts");
    assert!(reason.contains("'b0'") && reason.contains("inconsistent") && reason.contains("whole disk"), "{reason}");
    let guest = Guest::start(runtime, disk, model, 92);
    guest.wait_writes(30);
    let model = guest.stop();
    wait_null(&job);
    assert_eq!(job.error(), None);
    assert_eq!(completed_fallback(&job), Some(reason.clone()), "BLOCK_JOB_COMPLETED says the same");
    assert_eq!(job.info().fallback, Some(reason));
    (snapshot_path, fallback_path, model)
}

#[test]
fn an_inconsistent_bitmap_fails_by_name_or_falls_back_to_a_full_copy_that_leaves_it_consistent() {
    let (sidecar, source_path, full_path, dir, model) = crash_while_recording();
    let path = |name: &str| dir.path().join(name);
    // Process two: the sidecar loads inconsistent; a clean stop keeps it so.
    let recording = tandem::bitmap::open_for_recording_any(&sidecar).unwrap();
    assert!(recording.bitmap().is_inconsistent(), "the crash left the sidecar in use");
    recording.close().unwrap();
    assert!(tandem::bitmap::load(&sidecar).unwrap().inconsistent, "a clean stop does not make it trustworthy");

    // Process three.
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(open(&runtime, &source_path));
    let recording = tandem::bitmap::open_for_recording_any(&sidecar).unwrap();
    let bitmap = disk.bitmaps().add_shared("b0", recording.bitmap().clone()).unwrap();
    // Data in the full backup that is zeros now: the fallback must carry it as data, or a
    // restore that replays the chain's data extents keeps the old data there.
    disk.write_zeroes_blocking(2 << 20, 64 << 10, true, IoPriority::GUEST).unwrap();
    assert_fail_changes_nothing(&runtime, &disk, &bitmap, dir.path());
    let (snapshot_path, fallback_path, _) = fall_back_under_a_guest(&runtime, &disk, &source_path, &model);
    assert!(!bitmap.is_inconsistent(), "a successful fallback leaves the bitmap consistent");
    assert_changes_are_marked(&bitmap, &snapshot_path, &source_path);
    assert!(bitmap.dirty_chunk_count() < bitmap.chunk_count(), "it records only the writes since");
    let zeroed = |(start, end): &(u64, u64)| *start <= 2 << 20 && *end >= (2 << 20) + (64 << 10);
    assert!(allocated_ranges(&fallback_path).iter().any(zeroed), "its zeros are data, as an incremental's");

    // The next incremental trusts it (fail is enough) and copies only what changed since.
    let zeros = AlignedBuf::zeroed(4096, 4096).unwrap();
    disk.write_blocking(5 << 20, zeros, WriteFlags::default(), IoPriority::GUEST).0.unwrap();
    let (snapshot2_path, next_path) = (path("snapshot-next.img"), path("next.img"));
    std::fs::copy(&source_path, &snapshot2_path).unwrap();
    new_sparse_image(&next_path);
    let dirty_bytes = bitmap.dirty_bytes();
    let config = incremental("i2", tandem::job::backup::OnInconsistentBitmap::Fail);
    let job = start(&runtime.handle(), &disk, open(&runtime, &next_path), config).unwrap();
    wait_null(&job);
    assert_eq!(job.error(), None);
    assert_eq!((job.info().fallback, completed_fallback(&job)), (None, None));
    // By extents: st_blocks also counts the file's extent tree.
    let data_bytes: u64 = allocated_ranges(&next_path).iter().map(|(start, end)| end - start).sum();
    assert_eq!(data_bytes, dirty_bytes, "only what changed since the fallback");
    assert_eq!(bitmap.dirty_chunk_count(), 0);
    recording.close().unwrap();
    drop((disk, runtime));
    assert!(!tandem::bitmap::load(&sidecar).unwrap().inconsistent, "consistent on disk after a clean stop");
    assert_chain_restores(&full_path, &[(&fallback_path, &snapshot_path), (&next_path, &snapshot2_path)]);
}

/// Replay each incremental over a copy of the full backup, in order; after each the copy
/// must equal that incremental's snapshot.
fn assert_chain_restores(full_path: &Path, chain: &[(&Path, &Path)]) {
    let restored = full_path.with_file_name("restored.img");
    std::fs::copy(full_path, &restored).unwrap();
    for (index, (incremental, snapshot)) in chain.iter().enumerate() {
        assert!(index > 0 || qemu_img_identical(snapshot, incremental), "the fallback is the point in time");
        replay(incremental, &restored);
        assert!(qemu_img_identical(snapshot, &restored), "restored up to link {index}");
    }
}

/// Every 64 KiB cluster where `now` differs from `then` is dirty in `bitmap`.
fn assert_changes_are_marked(bitmap: &tandem::bitmap::DirtyBitmap, then: &Path, now: &Path) {
    let (then, now) = (std::fs::read(then).unwrap(), std::fs::read(now).unwrap());
    let cluster = 64 << 10;
    for start in (0..DISK_BYTES as usize).step_by(cluster) {
        let range = start..start + cluster;
        if then[range.clone()] != now[range] {
            assert!(bitmap.get(start as u64).unwrap(), "the write at {start} since the point in time is not marked");
        }
    }
}

/// An inconsistent bitmap on the disk, marking `[1 MiB, 3 MiB)`.
fn inconsistent_bitmap(s: &Setup) -> Arc<tandem::bitmap::DirtyBitmap> {
    let bitmap = tandem::bitmap::DirtyBitmap::new(64 << 10, DISK_BYTES).unwrap();
    bitmap.set(1 << 20, 2 << 20).unwrap();
    bitmap.set_inconsistent(true);
    s.disk.bitmaps().add("b0", bitmap).unwrap()
}

#[test]
fn a_failed_fallback_leaves_the_bitmap_inconsistent_and_a_fallback_under_never_leaves_it_all_dirty() {
    use tandem::job::backup::{BitmapMode, OnInconsistentBitmap};
    let s = setup(Layout::Dense);
    let bitmap = inconsistent_bitmap(&s);
    let fallback = |mode| BackupConfig {
        sync: SyncMode::Bitmap,
        bitmap: Some("b0".into()),
        bitmap_mode: Some(mode),
        on_inconsistent_bitmap: OnInconsistentBitmap::Full,
        ..BackupConfig::default()
    };
    let target = faulty_target(&s);
    eio_on_writes_at(&target, 8 << 20, 1 << 20);
    let job = start(&s.runtime.handle(), &s.disk, target, fallback(BitmapMode::Always)).unwrap();
    wait_null(&job);
    assert!(job.error().is_some());
    let reason = completed_fallback(&job).expect("a failed fallback still says why it copied it all");
    assert!(reason.contains("'b0'"), "{reason}");
    assert!(bitmap.is_inconsistent(), "failed: the next run must fall back again");
    assert_eq!(bitmap.next_dirty_area(0, u64::MAX), Some((1 << 20, 2 << 20)), "its old marks came back");

    // Disabled (directly: the registry refuses to while it is inconsistent): "all dirty" must
    // still reach it.
    bitmap.set_enabled(false);
    let job =
        start(&s.runtime.handle(), &s.disk, open(&s.runtime, &s.target_path), fallback(BitmapMode::Never)).unwrap();
    wait_null(&job);
    assert_eq!(job.error(), None);
    assert!(!bitmap.is_inconsistent());
    assert_eq!(bitmap.dirty_bytes(), DISK_BYTES, "never: the unknown old marks mean everything, next time");
    let Setup { disk, runtime, target_path, snapshot_path, .. } = s;
    drop((disk, runtime));
    assert!(qemu_img_identical(&snapshot_path, &target_path));
}

#[test]
fn a_mirror_refuses_an_inconsistent_bitmap_by_name() {
    let s = setup(Layout::Dense);
    let bitmap = inconsistent_bitmap(&s);
    let config = tandem::job::mirror::MirrorConfig {
        sync: SyncMode::Bitmap,
        bitmap: Some("b0".into()),
        ..tandem::job::mirror::MirrorConfig::default()
    };
    let error = tandem::job::mirror::start(&s.runtime.handle(), &s.disk, open(&s.runtime, &s.target_path), config)
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(&error, JobError::Bitmap(tandem::bitmap::BitmapError::Inconsistent { name }) if name == "b0"));
    assert!(!s.disk.has_filter());
    assert!(bitmap.is_inconsistent() && bitmap.dirty_bytes() == 2 << 20);
}

#[test]
fn start_drained_takes_the_point_in_time_under_the_callers_drain() {
    let s = setup(Layout::Dense);
    let other = Disk::new(open(&s.runtime, &s.snapshot_path));
    let config = || BackupConfig { auto_dismiss: false, ..BackupConfig::default() };
    let not_ours = tandem::reactor::block_on(other.drain().expect("not drained"));
    let target = open(&s.runtime, &s.target_path);
    let refused = tandem::job::backup::start_drained(&s.runtime.handle(), &s.disk, target.clone(), config(), &not_ours);
    assert!(matches!(refused, Err(JobError::Config { name: "drained", .. })), "another disk's drain is no proof");
    assert!(!s.disk.has_filter(), "nothing started");
    drop(not_ours);
    let guard = tandem::reactor::block_on(s.disk.drain().expect("not drained"));
    let job = tandem::job::backup::start_drained(&s.runtime.handle(), &s.disk, target, config(), &guard).unwrap();
    // A guest write now waits for the caller's drain: it lands after the point in time.
    let disk = s.disk.clone();
    let writer = std::thread::spawn(move || guest_write(&disk, 0, 77));
    drop(guard);
    writer.join().unwrap().unwrap();
    assert_eq!(job.wait_for(|st| st.is_finished(), WAIT), JobStatus::Concluded);
    assert_eq!(job.error(), None);
    let Setup { disk, runtime, target_path, snapshot_path, .. } = s;
    drop((disk, other, runtime));
    assert!(qemu_img_identical(&snapshot_path, &target_path), "the point in time is the drain's");
}
