//! The mirror job on real files with O_DIRECT, under concurrent random guest writes from
//! several tasks on two cores. `qemu-img compare` is the arbiter of "identical".
//!
//! The guest's writers each own a stripe of the disk and write it one request at a time, so a
//! model of what the guest wrote is exact; after the switch-over the guest goes on writing
//! (to the target now), and the target must equal the model.

mod common;

use common::jobs::{
    allocated_ranges, open, qemu_img_identical, random_bytes, write_image, Guest, Layout, DISK_BYTES, WAIT,
};
use common::{runtime, scratch_dir};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tandem::block::{Disk, WriteFlags};
use tandem::buf::AlignedBuf;
use tandem::job::mirror::{start, CopyMode, MirrorConfig, SyncMode};
use tandem::job::{ErrorPolicy, Job, JobChange, JobError, JobEvent, JobStatus};
use tandem::reactor::{BackendChoice, Runtime};
use tandem::IoPriority;
use tandem_drivers::{Fault, FaultRule, FaultyDriver, OpMask, Trigger};

fn events(job: &Job) -> Vec<JobEvent> {
    job.events().try_iter().collect()
}

fn names(events: &[JobEvent]) -> Vec<&'static str> {
    events.iter().map(JobEvent::name).collect()
}

fn wait_status(job: &Job, wanted: JobStatus) {
    let status = job.wait_for(|s| s == wanted || s.is_finished(), WAIT);
    assert_eq!(status, wanted, "job error: {:?}", job.error());
}

struct Case {
    mode: CopyMode,
    switch_to: CopyMode,
    sync: SyncMode,
    granularity_bytes: u64,
}

/// The whole story: mirror under guest writes, a mode switch, READY, complete while the
/// guest writes, the guest goes on writing to the target; target equals the model.
fn mirror_case(case: Case) {
    let dir = scratch_dir();
    let (source_path, target_path) = (dir.path().join("source.img"), dir.path().join("target.img"));
    let layout = if case.sync == SyncMode::Top { Layout::Sparse } else { Layout::Dense };
    let model = write_image(&source_path, layout, 1);
    match case.sync {
        SyncMode::None => drop(std::fs::copy(&source_path, &target_path).unwrap()), // already in sync
        SyncMode::Top => std::fs::File::create(&target_path).unwrap().set_len(DISK_BYTES).unwrap(),
        _ => drop(write_image(&target_path, Layout::Dense, 2)),
    }
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(open(&runtime, &source_path));
    let target = open(&runtime, &target_path);
    let config = MirrorConfig {
        sync: case.sync,
        copy_mode: case.mode,
        granularity_bytes: case.granularity_bytes,
        copy_bytes_max: case.granularity_bytes.max(1 << 20),
        ..MirrorConfig::default()
    };
    let job = start(&runtime.handle(), &disk, target, config).expect("mirror starts");
    // After the start: with sync=none, writes from before the job are not the job's to copy.
    let guest = Guest::start(&runtime, &disk, &model, 100);
    guest.wait_writes(50);
    job.change(JobChange::CopyMode(case.switch_to)).expect("mode switch");
    wait_status(&job, JobStatus::Ready);
    guest.wait_writes(50);
    job.complete().expect("complete");
    let status = job.wait_for(|s| s == JobStatus::Null, WAIT);
    assert_eq!(status, JobStatus::Null, "auto-dismissed");
    assert_eq!(job.error(), None);
    assert!(!disk.has_filter());
    guest.wait_writes(50); // now on the target
    let model = guest.stop();
    let seen = events(&job);
    let names = names(&seen);
    assert_eq!(names.iter().filter(|n| **n == "BLOCK_JOB_READY").count(), 1, "{names:?}");
    assert!(names.contains(&"MIRROR_COPY_MODE_CHANGE") || case.mode == case.switch_to, "{names:?}");
    assert!(
        matches!(
            seen.iter().rev().find(|e| e.name() == "BLOCK_JOB_COMPLETED"),
            Some(JobEvent::Completed { error: None, .. })
        ),
        "{names:?}"
    );
    drop(disk);
    drop(runtime);
    let model_path = dir.path().join("model.img");
    std::fs::write(&model_path, &model).unwrap();
    assert!(qemu_img_identical(&model_path, &target_path), "target differs from what the guest wrote");
}

const MODES: [CopyMode; 4] = [CopyMode::Background, CopyMode::WriteBlocking, CopyMode::WriteBehind, CopyMode::Auto];

/// The mode each case switches to before READY. Never to background: under a guest that
/// rewrites the whole (small) disk continuously, background mode does not converge (nor does
/// QEMU's), which is what the active modes and auto are for. Background is still every
/// case's mode for a while when it starts there.
fn next_mode(mode: CopyMode) -> CopyMode {
    match mode {
        CopyMode::Background => CopyMode::WriteBlocking,
        CopyMode::WriteBlocking => CopyMode::WriteBehind,
        CopyMode::WriteBehind => CopyMode::Auto,
        CopyMode::Auto => CopyMode::WriteBlocking,
    }
}

fn every_mode(sync: SyncMode, granularity_bytes: u64) {
    for mode in MODES {
        eprintln!(
            "mode {} -> {}, sync {}, granularity {granularity_bytes}",
            mode.name(),
            next_mode(mode).name(),
            sync.name()
        );
        mirror_case(Case { mode, switch_to: next_mode(mode), sync, granularity_bytes });
    }
}

#[test]
fn full_4k_every_mode() {
    every_mode(SyncMode::Full, 4 << 10);
}

#[test]
fn full_64k_every_mode() {
    every_mode(SyncMode::Full, 64 << 10);
}

#[test]
fn full_1m_every_mode() {
    every_mode(SyncMode::Full, 1 << 20);
}

#[test]
fn top_4k_every_mode() {
    every_mode(SyncMode::Top, 4 << 10);
}

#[test]
fn top_64k_every_mode() {
    every_mode(SyncMode::Top, 64 << 10);
}

#[test]
fn top_1m_every_mode() {
    every_mode(SyncMode::Top, 1 << 20);
}

#[test]
fn none_4k_every_mode() {
    every_mode(SyncMode::None, 4 << 10);
}

#[test]
fn none_64k_every_mode() {
    every_mode(SyncMode::None, 64 << 10);
}

#[test]
fn none_1m_every_mode() {
    every_mode(SyncMode::None, 1 << 20);
}

/// Bytes the file has allocated, by SEEK_DATA / SEEK_HOLE.
#[test]
fn sync_top_leaves_the_target_sparse_where_the_source_was() {
    let dir = scratch_dir();
    let (source_path, target_path) = (dir.path().join("source.img"), dir.path().join("target.img"));
    write_image(&source_path, Layout::Sparse, 7);
    std::fs::File::create(&target_path).unwrap().set_len(DISK_BYTES).unwrap();
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(open(&runtime, &source_path));
    let config = MirrorConfig { sync: SyncMode::Top, ..MirrorConfig::default() };
    let job = start(&runtime.handle(), &disk, open(&runtime, &target_path), config).unwrap();
    wait_status(&job, JobStatus::Ready);
    job.cancel(false).unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    assert!(matches!(events(&job).last(), Some(JobEvent::StatusChange { status: JobStatus::Null, .. })));
    drop(disk);
    drop(runtime);
    assert!(qemu_img_identical(&source_path, &target_path));
    let (source_map, target_map) = (allocated_ranges(&source_path), allocated_ranges(&target_path));
    assert!(!target_map.is_empty());
    for (start, end) in &target_map {
        let covered = source_map.iter().any(|(s, e)| s <= start && end <= e);
        assert!(covered, "target allocated [{start}, {end}) where the source has a hole: {source_map:?}");
    }
}

/// Source and target files plus an opened disk and target, the guest not started.
struct Setup {
    _dir: tempfile::TempDir,
    source_path: PathBuf,
    target_path: PathBuf,
    runtime: Runtime,
    disk: Disk,
    model: Vec<u8>,
}

fn setup() -> Setup {
    let dir = scratch_dir();
    let (source_path, target_path) = (dir.path().join("source.img"), dir.path().join("target.img"));
    let model = write_image(&source_path, Layout::Dense, 3);
    write_image(&target_path, Layout::Dense, 4);
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(open(&runtime, &source_path));
    Setup { _dir: dir, source_path, target_path, runtime, disk, model }
}

#[test]
fn cancel_after_ready_completes_with_a_consistent_target_and_no_switch() {
    let s = setup();
    let guest = Guest::start(&s.runtime, &s.disk, &s.model, 200);
    let job = start(&s.runtime.handle(), &s.disk, open(&s.runtime, &s.target_path), MirrorConfig::default()).unwrap();
    wait_status(&job, JobStatus::Ready);
    guest.wait_writes(50);
    drop(guest.stop());
    job.cancel(false).unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    let seen = events(&job);
    assert!(seen.iter().any(|e| matches!(e, JobEvent::Completed { error: None, .. })), "{:?}", names(&seen));
    assert!(!names(&seen).contains(&"BLOCK_JOB_CANCELLED"));
    let Setup { disk, runtime, source_path, target_path, .. } = s;
    assert!(!disk.has_filter());
    assert_eq!(disk.driver().name(), format!("file:{}", source_path.display()), "no switch-over");
    drop(disk);
    drop(runtime);
    assert!(qemu_img_identical(&source_path, &target_path));
}

#[test]
fn complete_after_the_guest_stops_leaves_source_and_target_identical() {
    let s = setup();
    let guest = Guest::start(&s.runtime, &s.disk, &s.model, 300);
    let config = MirrorConfig { copy_mode: CopyMode::WriteBlocking, ..MirrorConfig::default() };
    let job = start(&s.runtime.handle(), &s.disk, open(&s.runtime, &s.target_path), config).unwrap();
    wait_status(&job, JobStatus::Ready);
    guest.wait_writes(50);
    drop(guest.stop());
    job.complete().unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    let Setup { disk, runtime, source_path, target_path, .. } = s;
    assert_eq!(disk.driver().name(), format!("file:{}", target_path.display()), "switched over");
    drop(disk);
    drop(runtime);
    assert!(qemu_img_identical(&source_path, &target_path));
}

#[test]
fn cancel_before_ready_is_cancelled_and_detaches() {
    let s = setup();
    // 1 MiB/s: 16 MiB cannot be READY before the cancel.
    let config = MirrorConfig { speed_bytes_per_s: 1 << 20, ..MirrorConfig::default() };
    let job = start(&s.runtime.handle(), &s.disk, open(&s.runtime, &s.target_path), config).unwrap();
    wait_status(&job, JobStatus::Running);
    job.cancel(false).unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    let seen = events(&job);
    assert!(names(&seen).contains(&"BLOCK_JOB_CANCELLED"), "{:?}", names(&seen));
    assert!(!names(&seen).contains(&"BLOCK_JOB_READY"));
    assert!(!s.disk.has_filter());
    let (result, _) =
        s.disk.write_blocking(0, AlignedBuf::zeroed(4096, 4096).unwrap(), WriteFlags::default(), IoPriority::GUEST);
    result.expect("the disk still takes writes");
}

#[test]
fn pause_and_resume_follow_the_state_machine() {
    let s = setup();
    let config = MirrorConfig { speed_bytes_per_s: 2 << 20, auto_dismiss: false, ..MirrorConfig::default() };
    let job = start(&s.runtime.handle(), &s.disk, open(&s.runtime, &s.target_path), config).unwrap();
    wait_status(&job, JobStatus::Running);
    assert!(matches!(job.complete(), Err(JobError::VerbNotAllowed { status: JobStatus::Running, .. })));
    assert!(matches!(job.resume(), Err(JobError::NotPaused { .. })));
    job.pause().unwrap();
    wait_status(&job, JobStatus::Paused);
    let done = job.progress().done_bytes;
    job.set_speed(0).unwrap();
    job.resume().unwrap();
    wait_status(&job, JobStatus::Ready);
    assert!(job.progress().done_bytes > done, "{done} bytes done when paused, {:?} now", job.progress());
    job.pause().unwrap();
    wait_status(&job, JobStatus::Standby);
    job.resume().unwrap();
    wait_status(&job, JobStatus::Ready);
    job.complete().unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Concluded, WAIT), JobStatus::Concluded);
    assert!(matches!(job.pause(), Err(JobError::VerbNotAllowed { status: JobStatus::Concluded, .. })));
    job.dismiss().unwrap();
    assert_eq!(job.status(), JobStatus::Null);
    let statuses: Vec<JobStatus> = events(&job)
        .into_iter()
        .filter_map(|e| match e {
            JobEvent::StatusChange { status, .. } => Some(status),
            _ => None,
        })
        .collect();
    use JobStatus::*;
    let expected = [Created, Running, Paused, Running, Ready, Standby, Ready, Waiting, Pending, Concluded, Null];
    assert_eq!(statuses, expected);
}

/// A mirror with auto-finalize off, completed and now pending for its switch-over.
fn pending_mirror(s: &Setup) -> Job {
    let config = MirrorConfig { auto_finalize: false, ..MirrorConfig::default() };
    let job = start(&s.runtime.handle(), &s.disk, open(&s.runtime, &s.target_path), config).unwrap();
    wait_status(&job, JobStatus::Ready);
    job.complete().unwrap();
    wait_status(&job, JobStatus::Pending);
    job
}

#[test]
fn manual_finalize_switches_over_only_when_asked() {
    let s = setup();
    let job = pending_mirror(&s);
    assert!(s.disk.has_filter(), "no switch before finalize");
    job.finalize().unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    assert_eq!(s.disk.driver().name(), format!("file:{}", s.target_path.display()));
}

/// A cancel while the mirror is pending for its switch-over is obeyed, never accepted and
/// ignored: forced, the job is cancelled; soft, it completes with a consistent copy. Either
/// way the disk keeps its source, and a cancel after the job ended is refused.
#[test]
fn a_cancel_while_pending_stops_the_switch_over() {
    for force in [true, false] {
        let s = setup();
        let job = pending_mirror(&s);
        job.cancel(force).expect("cancel is allowed while pending");
        assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
        let seen = events(&job);
        let names = names(&seen);
        match force {
            true => assert!(names.contains(&"BLOCK_JOB_CANCELLED"), "{names:?}"),
            false => assert!(
                seen.iter().any(|e| matches!(e, JobEvent::Completed { error: None, .. }))
                    && !names.contains(&"BLOCK_JOB_CANCELLED"),
                "{names:?}"
            ),
        }
        assert!(!s.disk.has_filter());
        assert_eq!(s.disk.driver().name(), format!("file:{}", s.source_path.display()), "no switch-over");
        let error = job.cancel(true).expect_err("nothing left to cancel");
        assert!(matches!(error, JobError::VerbNotAllowed { .. }), "{error}");
    }
}

/// The same with auto-finalize, while the job converges for the switch-over (its target
/// flush held back a second): the cancel is still obeyed and the disk keeps its source.
#[test]
fn a_cancel_while_converging_stops_the_switch_over() {
    for force in [true, false] {
        let s = setup();
        let target = faulty_target(&s);
        let job = start(&s.runtime.handle(), &s.disk, target.clone(), MirrorConfig::default()).unwrap();
        wait_status(&job, JobStatus::Ready);
        target.add_rule(FaultRule {
            ops: OpMask::FLUSH,
            trigger: Trigger::Always,
            fault: Fault::Delay(Duration::from_secs(1)),
            fire_count_max: None,
        });
        job.complete().unwrap();
        wait_status(&job, JobStatus::Pending); // auto-finalize: converging, the flush held
        job.cancel(force).expect("cancel is allowed while converging");
        assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
        let names = names(&events(&job));
        assert_eq!(names.contains(&"BLOCK_JOB_CANCELLED"), force, "{names:?}");
        assert!(!s.disk.has_filter());
        assert_eq!(s.disk.driver().name(), format!("file:{}", s.source_path.display()), "no switch-over");
    }
}

fn faulty_target(s: &Setup) -> Arc<FaultyDriver> {
    Arc::new(FaultyDriver::new(open(&s.runtime, &s.target_path), 1, false))
}

fn eio_on_writes_at(driver: &FaultyDriver, offset: u64) {
    driver.add_rule(FaultRule {
        ops: OpMask::WRITE.union(OpMask::WRITE_ZEROES),
        trigger: Trigger::Range { offset, length_bytes: 1 << 20 },
        fault: Fault::Errno(libc::EIO),
        fire_count_max: None,
    });
}

#[test]
fn stop_policy_pauses_on_target_eio_and_resume_retries() {
    let s = setup();
    let target = faulty_target(&s);
    eio_on_writes_at(&target, 8 << 20);
    let guest = Guest::start(&s.runtime, &s.disk, &s.model, 400);
    let config = MirrorConfig { on_target_error: ErrorPolicy::Stop, ..MirrorConfig::default() };
    let job = start(&s.runtime.handle(), &s.disk, target.clone(), config).unwrap();
    wait_status(&job, JobStatus::Paused);
    let seen = events(&job);
    assert!(
        seen.iter().any(|e| matches!(
            e,
            JobEvent::Error { action: tandem::job::ErrorAction::Stop, operation: tandem::job::IoOperation::Write, .. }
        )),
        "{:?}",
        names(&seen)
    );
    target.clear_rules();
    job.resume().unwrap();
    wait_status(&job, JobStatus::Ready);
    guest.wait_writes(30);
    let model = guest.stop();
    job.complete().unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    assert_eq!(job.error(), None);
    let Setup { disk, runtime, source_path, target_path, .. } = s;
    drop((disk, target, runtime));
    let model_path = source_path.with_file_name("model.img");
    std::fs::write(&model_path, &model).unwrap();
    assert!(qemu_img_identical(&source_path, &target_path));
    assert!(qemu_img_identical(&model_path, &target_path));
}

#[test]
fn report_policy_ends_the_job_with_the_error() {
    let s = setup();
    let target = faulty_target(&s);
    eio_on_writes_at(&target, 4 << 20);
    let job = start(&s.runtime.handle(), &s.disk, target, MirrorConfig::default()).unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    let seen = events(&job);
    let completed = seen.iter().find_map(|e| match e {
        JobEvent::Completed { error, .. } => Some(error.clone()),
        _ => None,
    });
    let error = completed.flatten().expect("BLOCK_JOB_COMPLETED carries the error");
    assert!(error.contains("injected"), "{error}");
    assert_eq!(job.error().as_deref(), Some(error.as_str()));
    assert!(!s.disk.has_filter());
    assert_eq!(s.disk.driver().name(), format!("file:{}", s.source_path.display()));
}

#[test]
fn ignore_policy_retries_until_the_fault_clears() {
    let s = setup();
    let target = faulty_target(&s);
    target.add_rule(FaultRule {
        ops: OpMask::WRITE,
        trigger: Trigger::Range { offset: 2 << 20, length_bytes: 1 << 20 },
        fault: Fault::Errno(libc::EIO),
        fire_count_max: Some(3),
    });
    let config = MirrorConfig { on_target_error: ErrorPolicy::Ignore, ..MirrorConfig::default() };
    let job = start(&s.runtime.handle(), &s.disk, target, config).unwrap();
    wait_status(&job, JobStatus::Ready);
    let errors = events(&job).into_iter().filter(|e| e.name() == "BLOCK_JOB_ERROR").count();
    assert!(errors >= 1);
    job.complete().unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    let Setup { disk, runtime, source_path, target_path, .. } = s;
    drop((disk, runtime));
    assert!(qemu_img_identical(&source_path, &target_path));
}

#[test]
fn bad_input_is_refused_and_starts_nothing() {
    let s = setup();
    let handle = s.runtime.handle();
    let target = || open(&s.runtime, &s.target_path);
    let bad_granularity = MirrorConfig { granularity_bytes: 96 << 10, ..MirrorConfig::default() };
    let error = start(&handle, &s.disk, target(), bad_granularity).err().unwrap();
    assert!(error.to_string().contains("98304"), "{error}");

    let small_path = s.target_path.with_file_name("small.img");
    std::fs::File::create(&small_path).unwrap().set_len(DISK_BYTES / 2).unwrap();
    let error = start(&handle, &s.disk, open(&s.runtime, &small_path), MirrorConfig::default()).err().unwrap();
    assert!(error.to_string().contains("smaller"), "{error}");

    let error = start(&handle, &s.disk, open(&s.runtime, &s.source_path), MirrorConfig::default()).err().unwrap();
    assert!(matches!(error, JobError::SameDevice { .. }), "{error}");
    let link = s.source_path.with_file_name("alias.img");
    std::fs::hard_link(&s.source_path, &link).unwrap();
    let error = start(&handle, &s.disk, open(&s.runtime, &link), MirrorConfig::default()).err().unwrap();
    assert!(matches!(error, JobError::SameDevice { .. }), "a hard link is the same file: {error}");

    let unknown = MirrorConfig { sync: SyncMode::Bitmap, bitmap: Some("nope".into()), ..MirrorConfig::default() };
    let error = start(&handle, &s.disk, target(), unknown).err().unwrap();
    assert!(error.to_string().contains("nope"), "{error}");
    let no_bitmap = MirrorConfig { sync: SyncMode::Bitmap, ..MirrorConfig::default() };
    assert!(start(&handle, &s.disk, target(), no_bitmap).is_err());

    assert!(!s.disk.has_filter(), "nothing started");
    assert!(qemu_img_identical(&s.source_path, &s.source_path));
}

#[test]
fn sync_bitmap_copies_only_what_the_named_bitmap_marks() {
    let s = setup();
    // The target starts as a copy; then the guest changes two ranges while a bitmap records.
    std::fs::copy(&s.source_path, &s.target_path).unwrap();
    let bitmap = tandem::bitmap::DirtyBitmap::new(64 << 10, DISK_BYTES).unwrap();
    s.disk.bitmaps().add("since-copy", bitmap).unwrap();
    for offset in [1 << 20, 9 << 20] {
        let buf = AlignedBuf::from_slice(&random_bytes(65536, offset), 4096).unwrap();
        s.disk.write_blocking(offset, buf, WriteFlags::default(), IoPriority::GUEST).0.unwrap();
    }
    let config = MirrorConfig { sync: SyncMode::Bitmap, bitmap: Some("since-copy".into()), ..MirrorConfig::default() };
    let job = start(&s.runtime.handle(), &s.disk, open(&s.runtime, &s.target_path), config).unwrap();
    assert!(matches!(s.disk.bitmaps().remove("since-copy"), Err(tandem::bitmap::BitmapError::Busy { .. })));
    wait_status(&job, JobStatus::Ready);
    assert_eq!(job.progress().done_bytes, 2 * (64 << 10), "only the two marked chunks were copied");
    job.cancel(false).unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    assert!(s.disk.bitmaps().remove("since-copy").is_ok(), "lease released");
    let Setup { disk, runtime, source_path, target_path, .. } = s;
    drop((disk, runtime));
    assert!(qemu_img_identical(&source_path, &target_path));
}

/// A guest that gives up on its write (drops the future after it was submitted) still has it
/// reach the source, since the kernel runs it to its end; the mirror must copy it all the
/// same. In background mode the dirty mark comes after the source write, so it must not be
/// cut off with the future.
#[test]
fn a_guest_write_dropped_in_flight_still_reaches_the_target() {
    let s = setup();
    std::fs::copy(&s.source_path, &s.target_path).unwrap();
    let config = MirrorConfig { sync: SyncMode::None, ..MirrorConfig::default() };
    let job = start(&s.runtime.handle(), &s.disk, open(&s.runtime, &s.target_path), config).unwrap();
    wait_status(&job, JobStatus::Ready);
    let data = random_bytes(64 << 10, 77);
    let offset = 5 << 20;
    let (disk, written) = (s.disk.clone(), data.clone());
    s.runtime
        .spawn_on(0, move || async move {
            let buf = AlignedBuf::from_slice(&written, 4096).unwrap();
            let mut write = disk.write(offset, buf, WriteFlags::default(), IoPriority::GUEST);
            // Poll once, let the core hand the request to the kernel, then abandon it.
            let polled =
                std::future::poll_fn(|cx| std::task::Poll::Ready(std::pin::Pin::new(&mut write).poll(cx).is_ready()))
                    .await;
            tandem::reactor::sleep(Duration::from_millis(1)).await;
            drop(write);
            polled
        })
        .join()
        .unwrap();
    // The source gets the data once the kernel is done with the abandoned request.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (result, back) =
            s.disk.read_blocking(offset, AlignedBuf::zeroed(data.len(), 4096).unwrap(), IoPriority::GUEST);
        result.unwrap();
        if back.as_slice() == data.as_slice() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the abandoned write never reached the source");
        std::thread::sleep(Duration::from_millis(1));
    }
    job.complete().unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    let Setup { disk, runtime, source_path, target_path, .. } = s;
    drop((disk, runtime));
    assert!(qemu_img_identical(&source_path, &target_path), "the abandoned write is missing on the target");
}

/// Waits for a copy-mode event whose mode in force is `in_force`; returns the events seen.
fn wait_mode_event(job: &Job, in_force: &str) -> Vec<JobEvent> {
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match job.events().recv_timeout(left) {
            Ok(event) => {
                let found = matches!(&event, JobEvent::CopyModeChange { in_force: mode, .. } if *mode == in_force);
                seen.push(event);
                if found {
                    return seen;
                }
            }
            Err(_) => panic!("no switch to {in_force}; events: {:?}", names(&seen)),
        }
    }
}

/// Auto: a copier held to a trickle by its speed limit loses to a busy guest, so the job
/// switches to write-behind; once the guest stops it switches back to background; and the
/// target ends identical.
#[test]
fn auto_switches_to_write_behind_when_the_guest_outruns_the_copier_and_back_when_it_stops() {
    let s = setup();
    let guest = Guest::start(&s.runtime, &s.disk, &s.model, 900);
    let config = MirrorConfig { copy_mode: CopyMode::Auto, speed_bytes_per_s: 2 << 20, ..MirrorConfig::default() };
    let job = start(&s.runtime.handle(), &s.disk, open(&s.runtime, &s.target_path), config).unwrap();
    wait_mode_event(&job, "write-behind");
    guest.wait_writes(50);
    let written = guest.stop();
    assert_eq!(written.len() as u64, DISK_BYTES);
    wait_mode_event(&job, "background");
    job.set_speed(0).unwrap();
    wait_status(&job, JobStatus::Ready);
    job.complete().unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    let Setup { disk, runtime, source_path, target_path, .. } = s;
    drop((disk, runtime));
    assert!(qemu_img_identical(&source_path, &target_path));
}

/// Write-behind: the guest hears back once its write is on the source; when the target write
/// that follows fails, its chunk is dirty again, the stop policy pauses the job, and after
/// resume the copier brings the target level.
#[test]
fn write_behind_target_failure_marks_the_chunk_dirty_again() {
    let s = setup();
    let target = faulty_target(&s);
    let config = MirrorConfig {
        copy_mode: CopyMode::WriteBehind,
        on_target_error: ErrorPolicy::Stop,
        ..MirrorConfig::default()
    };
    let job = start(&s.runtime.handle(), &s.disk, target.clone(), config).unwrap();
    wait_status(&job, JobStatus::Ready);
    eio_on_writes_at(&target, 8 << 20);
    let buf = AlignedBuf::from_slice(&random_bytes(16 << 10, 51), 4096).unwrap();
    let (result, _) = s.disk.write_blocking((8 << 20) + 4096, buf, WriteFlags::default(), IoPriority::GUEST);
    result.expect("the guest's write is safe on the source, whatever the target does");
    wait_status(&job, JobStatus::Standby);
    assert!(events(&job).iter().any(|e| e.name() == "BLOCK_JOB_ERROR"));
    target.clear_rules();
    job.resume().unwrap();
    wait_status(&job, JobStatus::Ready);
    job.complete().unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    assert_eq!(job.error(), None);
    let Setup { disk, runtime, source_path, target_path, .. } = s;
    drop((disk, target, runtime));
    assert!(qemu_img_identical(&source_path, &target_path), "the failed target write was never redone");
}
