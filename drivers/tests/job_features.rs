//! Job features of issue 17 on real files with O_DIRECT: the mirror's `target_is_zero` (given
//! and detected) and verification (`verify`) for mirror and backup, with a target that a
//! faulty driver corrupts behind the job's back. `qemu-img compare` is the arbiter.

mod common;

use common::jobs::{allocated_ranges, open, qemu_img_identical, random_bytes, write_image, Guest, Layout, WAIT};
use common::{runtime, scratch_dir};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use tandem::block::{BlockDriver, Disk};
use tandem::job::backup::BackupConfig;
use tandem::job::mirror::{CopyMode, MirrorConfig, SyncMode};
use tandem::job::{Job, JobError, JobEvent, JobStatus, TargetZero, VerifyMode};
use tandem::reactor::{BackendChoice, Runtime};
use tandem_drivers::{Fault, FaultRule, FaultyDriver, OpMask, Trigger};

/// The sparse source of the target_is_zero tests: this big...
const SPARSE_DISK_BYTES: u64 = 256 << 20;
/// ...with data in this many MiB, one every 16 MiB; the rest is holes.
const DATA_MIB_COUNT: u64 = 16;

fn events(job: &Job) -> Vec<JobEvent> {
    job.events().try_iter().collect()
}

fn allocated_bytes(path: &Path) -> u64 {
    allocated_ranges(path).iter().map(|(start, end)| end - start).sum()
}

fn sparse_source(path: &Path) {
    let file = std::fs::File::create(path).unwrap();
    file.set_len(SPARSE_DISK_BYTES).unwrap();
    for index in 0..DATA_MIB_COUNT {
        file.write_all_at(&random_bytes(1 << 20, index + 10), index * (16 << 20) + (3 << 20)).unwrap();
    }
    file.sync_all().unwrap();
}

/// Mirror the sparse source to `target_path` (created by the caller), complete, and return
/// the READY event's `len` and the job's info.
fn mirror_sparse(
    runtime: &Runtime,
    source_path: &Path,
    target_path: &Path,
    target_is_zero: Option<bool>,
) -> (u64, tandem::job::JobInfo) {
    let disk = Disk::new(open(runtime, source_path));
    let config = MirrorConfig { target_is_zero, auto_dismiss: false, ..MirrorConfig::default() };
    let job = tandem::job::mirror::start(&runtime.handle(), &disk, open(runtime, target_path), config).unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Ready || s.is_finished(), WAIT), JobStatus::Ready, "{:?}", job.error());
    job.complete().unwrap();
    assert_eq!(job.wait_for(|s| s.is_finished(), WAIT), JobStatus::Concluded);
    assert_eq!(job.error(), None);
    let ready_len = events(&job)
        .iter()
        .find_map(|event| match event {
            JobEvent::Ready { figures, .. } => Some(figures.len),
            _ => None,
        })
        .expect("a READY event");
    (ready_len, job.info())
}

#[test]
fn target_is_zero_given_or_detected_moves_only_data_and_keeps_the_target_sparse() {
    let dir = scratch_dir();
    let source_path = dir.path().join("source.img");
    sparse_source(&source_path);
    let data_bytes = DATA_MIB_COUNT << 20;
    assert_eq!(allocated_bytes(&source_path), data_bytes, "the source's layout");
    let runtime = runtime(BackendChoice::Auto, 2);
    let cases = [
        (Some(true), TargetZero { is_zero: true, detected: false }),
        (None, TargetZero { is_zero: true, detected: true }),
        (Some(false), TargetZero { is_zero: false, detected: false }),
    ];
    for (index, (option, expected)) in cases.into_iter().enumerate() {
        let target_path = dir.path().join(format!("target-{index}.img"));
        std::fs::File::create(&target_path).unwrap().set_len(SPARSE_DISK_BYTES).unwrap();
        let (ready_len, info) = mirror_sparse(&runtime, &source_path, &target_path, option);
        assert_eq!(info.target_is_zero, Some(expected), "target_is_zero = {option:?}");
        match expected.is_zero {
            true => {
                assert_eq!(ready_len, data_bytes, "len is the data alone with target_is_zero = {option:?}");
                assert_eq!(allocated_bytes(&target_path), data_bytes, "the target is as sparse as the source");
            }
            false => assert_eq!(ready_len, SPARSE_DISK_BYTES, "without it the whole disk is the job's"),
        }
        assert!(qemu_img_identical(&source_path, &target_path), "target_is_zero = {option:?}");
    }
}

#[test]
fn a_target_holding_data_is_detected_as_not_zero_and_overwritten() {
    let dir = scratch_dir();
    let (source_path, target_path) = (dir.path().join("source.img"), dir.path().join("target.img"));
    sparse_source(&source_path);
    // Old data where the source has holes: skipping them would leave it there.
    let target = std::fs::File::create(&target_path).unwrap();
    target.set_len(SPARSE_DISK_BYTES).unwrap();
    target.write_all_at(&random_bytes(1 << 20, 99), 100 << 20).unwrap();
    target.sync_all().unwrap();
    let runtime = runtime(BackendChoice::Auto, 2);
    let (ready_len, info) = mirror_sparse(&runtime, &source_path, &target_path, None);
    assert_eq!(info.target_is_zero, Some(TargetZero { is_zero: false, detected: true }));
    assert_eq!(ready_len, SPARSE_DISK_BYTES);
    assert!(qemu_img_identical(&source_path, &target_path), "the old data must be gone");
}

/// A faulty target over `path` that inverts a byte at `corrupt_at` on every write there.
fn corrupting_target(runtime: &Runtime, path: &Path, corrupt_at: u64) -> Arc<FaultyDriver> {
    let target = Arc::new(FaultyDriver::new(open(runtime, path), 1, false));
    target.add_rule(FaultRule {
        ops: OpMask::WRITE,
        trigger: Trigger::Range { offset: corrupt_at, length_bytes: 1 },
        fault: Fault::FlipByte,
        fire_count_max: None,
    });
    target
}

/// A 16 MiB dense source and a sparse target beside it; the guest's model of the source.
fn dense_pair(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let (source_path, target_path) = (dir.join("source.img"), dir.join("target.img"));
    let model = write_image(&source_path, Layout::Dense, 5);
    std::fs::File::create(&target_path).unwrap().set_len(model.len() as u64).unwrap();
    (source_path, target_path, model)
}

#[test]
fn mirror_verify_catches_a_corrupted_target_and_does_not_switch_over() {
    let dir = scratch_dir();
    let (source_path, target_path, model) = dense_pair(dir.path());
    let runtime = runtime(BackendChoice::Auto, 2);
    let source = open(&runtime, &source_path);
    let disk = Disk::new(source.clone());
    let corrupt_at = (5 << 20) + 12345;
    let target = corrupting_target(&runtime, &target_path, corrupt_at);
    let config = MirrorConfig { verify: VerifyMode::Full, auto_dismiss: false, ..MirrorConfig::default() };
    let job = tandem::job::mirror::start(&runtime.handle(), &disk, target, config).unwrap();
    let guest = Guest::start(&runtime, &disk, &model, 7);
    assert_eq!(job.wait_for(|s| s == JobStatus::Ready || s.is_finished(), WAIT), JobStatus::Ready);
    guest.wait_writes(50);
    job.complete().unwrap();
    assert_eq!(job.wait_for(|s| s.is_finished(), WAIT), JobStatus::Concluded);
    let error = job.error().expect("the corruption fails the job");
    assert!(error.contains(&format!("differ at offset {corrupt_at}")), "{error}");
    assert!(error.contains("switch-over did not happen"), "{error}");
    let completed = events(&job).into_iter().find(|event| event.name() == "BLOCK_JOB_COMPLETED");
    assert!(matches!(completed, Some(JobEvent::Completed { error: Some(_), .. })), "{completed:?}");
    // No switch-over: the disk still writes its source, which holds what the guest wrote.
    assert!(Arc::ptr_eq(&disk.driver(), &source), "the disk must stay on its source");
    assert!(!disk.has_filter());
    let model = guest.stop();
    assert!(job.info().verified_bytes > 0);
    drop(disk);
    drop(runtime);
    let model_path = dir.path().join("model.img");
    std::fs::write(&model_path, &model).unwrap();
    assert!(qemu_img_identical(&model_path, &source_path), "the source holds every guest write");
}

/// Mirror under a writing guest with `verify`; the switch-over happens and the target holds
/// every write.
fn mirror_verify_passes(mode: CopyMode, verify: VerifyMode) {
    let dir = scratch_dir();
    let (source_path, target_path, model) = dense_pair(dir.path());
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(open(&runtime, &source_path));
    let config = MirrorConfig { verify, copy_mode: mode, auto_dismiss: false, ..MirrorConfig::default() };
    let job = tandem::job::mirror::start(&runtime.handle(), &disk, open(&runtime, &target_path), config).unwrap();
    let guest = Guest::start(&runtime, &disk, &model, 11);
    assert_eq!(job.wait_for(|s| s == JobStatus::Ready || s.is_finished(), WAIT), JobStatus::Ready);
    guest.wait_writes(50);
    job.complete().unwrap();
    assert_eq!(job.wait_for(|s| s.is_finished(), WAIT), JobStatus::Concluded);
    assert_eq!(job.error(), None, "{mode:?} {verify:?}");
    let verified_bytes = job.info().verified_bytes;
    match verify {
        VerifyMode::Full => assert!(verified_bytes >= model.len() as u64, "every byte: {verified_bytes}"),
        _ => assert!(verified_bytes > 0 && verified_bytes < 2 * model.len() as u64, "{verified_bytes}"),
    }
    guest.wait_writes(50); // on the target now
    let model = guest.stop();
    drop(disk);
    drop(runtime);
    let model_path = dir.path().join("model.img");
    std::fs::write(&model_path, &model).unwrap();
    assert!(qemu_img_identical(&model_path, &target_path), "{mode:?} {verify:?}");
}

#[test]
fn mirror_verify_full_passes_under_a_writing_guest_in_background_mode() {
    mirror_verify_passes(CopyMode::Background, VerifyMode::Full);
}

#[test]
fn mirror_verify_full_passes_under_a_writing_guest_in_write_behind_mode() {
    mirror_verify_passes(CopyMode::WriteBehind, VerifyMode::Full);
}

#[test]
fn mirror_verify_sample_passes_under_a_writing_guest_in_write_blocking_mode() {
    mirror_verify_passes(CopyMode::WriteBlocking, VerifyMode::Sample);
}

/// Back up with `verify` onto a target that may corrupt the byte at `corrupt_at`, while the
/// guest writes 64 pieces of the first 4 MiB (copy-before-write saves them; the rest of the
/// disk keeps its point in time on the source). The job's error, the bytes it compared, and
/// whether the target is the point in time.
fn backup_verify(corrupt_at: Option<u64>) -> (Option<String>, u64, bool) {
    let dir = scratch_dir();
    let (source_path, target_path, _) = dense_pair(dir.path());
    let snapshot_path = dir.path().join("snapshot.img");
    std::fs::copy(&source_path, &snapshot_path).unwrap();
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(open(&runtime, &source_path));
    let target: Arc<dyn BlockDriver> = match corrupt_at {
        Some(at) => corrupting_target(&runtime, &target_path, at),
        None => open(&runtime, &target_path),
    };
    let config = BackupConfig {
        verify: VerifyMode::Full,
        speed_bytes_per_s: 16 << 20,
        auto_dismiss: false,
        ..BackupConfig::default()
    };
    let job = tandem::job::backup::start(&runtime.handle(), &disk, target, config).unwrap();
    for index in 0..64u64 {
        let buf = tandem::buf::AlignedBuf::from_slice(&random_bytes(4096, index), 4096).unwrap();
        let offset = (index * 61 % 1024) * 4096;
        let (result, _) = disk.write_blocking(offset, buf, Default::default(), tandem::IoPriority::GUEST);
        result.expect("guest write");
    }
    assert_eq!(job.wait_for(|s| s.is_finished(), WAIT), JobStatus::Concluded);
    let (error, verified_bytes) = (job.error(), job.info().verified_bytes);
    drop(disk);
    drop(runtime);
    (error, verified_bytes, qemu_img_identical(&snapshot_path, &target_path))
}

#[test]
fn backup_verify_passes_and_compares_what_the_guest_left_alone() {
    let (error, verified_bytes, identical) = backup_verify(None);
    assert_eq!(error, None);
    assert!(identical, "the target is the point in time");
    // The guest touched at most the first 4 MiB: the other 12 were compared.
    assert!(verified_bytes >= 12 << 20, "{verified_bytes}");
}

#[test]
fn backup_verify_catches_a_corrupted_target() {
    let corrupt_at = (9 << 20) + 777; // beyond what the guest writes
    let (error, _, identical) = backup_verify(Some(corrupt_at));
    assert!(!identical, "the faulty driver corrupted the target");
    let error = error.expect("a corrupted target fails the backup");
    assert!(error.contains(&format!("differs from the point in time at offset {corrupt_at}")), "{error}");
}

#[test]
fn verify_settings_that_cannot_work_are_refused_by_name() {
    let bad = BackupConfig { verify: VerifyMode::Full, sync: SyncMode::None, ..BackupConfig::default() };
    let error = bad.validate().unwrap_err();
    assert!(matches!(error, JobError::Config { name: "verify", .. }), "{error}");
    let bad = BackupConfig { verify: VerifyMode::Sample, discard_source: true, ..BackupConfig::default() };
    assert!(matches!(bad.validate().unwrap_err(), JobError::Config { name: "verify", .. }));
    let parsed = VerifyMode::parse("everything").unwrap_err().to_string();
    assert!(parsed.contains("everything"), "{parsed}");
}

/// Back up a dense 16 MiB source with `config` (no guest) onto a target that may corrupt the
/// byte at `corrupt_at`; `prepare` may add bitmaps to the disk first. The job's end.
fn backup_quiet(
    config: BackupConfig,
    corrupt_at: Option<u64>,
    prepare: impl FnOnce(&Disk),
) -> (JobStatus, Option<String>, tandem::job::JobInfo) {
    let dir = scratch_dir();
    let (source_path, target_path, _) = dense_pair(dir.path());
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(open(&runtime, &source_path));
    prepare(&disk);
    let target: Arc<dyn BlockDriver> = match corrupt_at {
        Some(at) => corrupting_target(&runtime, &target_path, at),
        None => open(&runtime, &target_path),
    };
    let job =
        tandem::job::backup::start(&runtime.handle(), &disk, target, BackupConfig { auto_dismiss: false, ..config })
            .unwrap();
    let status = job.wait_for(|s| s.is_finished(), WAIT);
    (status, job.error(), job.info())
}

#[test]
fn backup_verify_of_an_incremental_compares_whole_copied_clusters_beyond_the_bitmaps_chunks() {
    // The bitmap marks one 64 KiB chunk; the job copies the whole 1 MiB cluster around it, so
    // a corrupted byte elsewhere in that cluster is on the target and must be caught.
    let config = BackupConfig {
        sync: SyncMode::Bitmap,
        bitmap: Some("b".into()),
        cluster_bytes: 1 << 20,
        verify: VerifyMode::Full,
        ..BackupConfig::default()
    };
    let prepare = |disk: &Disk| {
        let bitmap = tandem::bitmap::DirtyBitmap::new(64 << 10, 16 << 20).unwrap();
        bitmap.set(0, 64 << 10).unwrap();
        disk.bitmaps().add("b", bitmap).unwrap();
    };
    let (status, error, _) = backup_quiet(config, Some(100 << 10), prepare);
    assert_eq!(status, JobStatus::Concluded);
    let error = error.expect("the corrupted byte is in a copied cluster");
    assert!(error.contains(&format!("at offset {}", 100 << 10)), "{error}");
}

#[test]
fn backup_verify_works_with_clusters_larger_than_one_comparison() {
    let config = BackupConfig {
        min_cluster_bytes: Some(2 << 20),
        chunk_bytes_max: 4 << 20,
        buf_size_bytes: 16 << 20,
        verify: VerifyMode::Full,
        ..BackupConfig::default()
    };
    let (status, error, info) = backup_quiet(config.clone(), None, |_| {});
    assert_eq!((status, error), (JobStatus::Concluded, None));
    assert_eq!(info.verified_bytes, 16 << 20, "every byte, in comparisons of at most 1 MiB");
    let corrupt_at = (3 << 20) + 5;
    let (_, error, _) = backup_quiet(config, Some(corrupt_at), |_| {});
    let error = error.expect("caught");
    assert!(error.contains(&format!("at offset {corrupt_at}")), "{error}");
}

#[test]
fn a_cancel_during_a_backups_verification_cancels_it() {
    let dir = scratch_dir();
    let (source_path, target_path, _) = dense_pair(dir.path());
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(open(&runtime, &source_path));
    // Every target read is slow: the verification takes long enough to be cancelled in.
    let target = Arc::new(FaultyDriver::new(open(&runtime, &target_path), 1, false));
    target.add_rule(FaultRule {
        ops: OpMask::READ,
        trigger: Trigger::Always,
        fault: Fault::Delay(std::time::Duration::from_millis(200)),
        fire_count_max: None,
    });
    let config = BackupConfig { verify: VerifyMode::Full, auto_dismiss: false, ..BackupConfig::default() };
    let job = tandem::job::backup::start(&runtime.handle(), &disk, target, config).unwrap();
    while job.info().verified_bytes == 0 {
        assert!(!job.status().is_finished(), "the job ended before it verified: {:?}", job.error());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    job.cancel(false).unwrap();
    assert_eq!(job.wait_for(|s| s.is_finished(), WAIT), JobStatus::Concluded);
    assert!(events(&job).iter().any(|e| e.name() == "BLOCK_JOB_CANCELLED"), "cancelled, not completed");
    assert!(job.info().verified_bytes < 16 << 20, "it stopped comparing");
    assert!(!disk.has_filter());
}

#[test]
fn a_top_mirror_onto_a_target_holding_data_writes_the_sources_holes() {
    let dir = scratch_dir();
    let (source_path, target_path) = (dir.path().join("source.img"), dir.path().join("target.img"));
    sparse_source(&source_path);
    std::fs::write(&target_path, random_bytes(SPARSE_DISK_BYTES as usize, 77)).unwrap();
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(open(&runtime, &source_path));
    let config = MirrorConfig { sync: SyncMode::Top, ..MirrorConfig::default() };
    let job = tandem::job::mirror::start(&runtime.handle(), &disk, open(&runtime, &target_path), config).unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Ready || s.is_finished(), WAIT), JobStatus::Ready);
    assert_eq!(job.info().target_is_zero, Some(TargetZero { is_zero: false, detected: true }));
    job.complete().unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    assert_eq!(job.error(), None);
    drop(disk);
    drop(runtime);
    assert!(qemu_img_identical(&source_path, &target_path), "the target's old data is gone");
}

#[test]
fn mirror_verify_keeps_comparing_while_the_job_waits_to_be_finalized() {
    let dir = scratch_dir();
    let (source_path, target_path, model) = dense_pair(dir.path());
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(open(&runtime, &source_path));
    let config = MirrorConfig { verify: VerifyMode::Full, auto_finalize: false, ..MirrorConfig::default() };
    let job = tandem::job::mirror::start(&runtime.handle(), &disk, open(&runtime, &target_path), config).unwrap();
    let guest = Guest::start(&runtime, &disk, &model, 17);
    assert_eq!(job.wait_for(|s| s == JobStatus::Ready || s.is_finished(), WAIT), JobStatus::Ready);
    job.complete().unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Pending || s.is_finished(), WAIT), JobStatus::Pending);
    let verified_at_pending = job.info().verified_bytes;
    guest.wait_writes(200);
    let deadline = std::time::Instant::now() + WAIT;
    while job.info().verified_bytes == verified_at_pending {
        assert!(std::time::Instant::now() < deadline, "nothing compared while pending");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    job.finalize().unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    assert_eq!(job.error(), None);
    guest.wait_writes(20);
    let model = guest.stop();
    drop(disk);
    drop(runtime);
    let model_path = dir.path().join("model.img");
    std::fs::write(&model_path, &model).unwrap();
    assert!(qemu_img_identical(&model_path, &target_path));
}
