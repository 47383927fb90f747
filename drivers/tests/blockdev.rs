//! Mirror and backup onto a block device and back, as an appliance runs them: a file to a loop
//! device, then the loop device (its size from BLKGETSIZE64, block_status all data) to a new
//! file, each under the job tests' concurrent guest writes. `qemu-img compare` is the arbiter.

mod common;

use common::jobs::{open, qemu_img_identical, write_image, Guest, Layout, DISK_BYTES, WAIT};
use common::{runtime, scratch_dir, LoopDevice};
use std::path::Path;
use tandem::block::Disk;
use tandem::job::backup::BackupConfig;
use tandem::job::mirror::{CopyMode, MirrorConfig};
use tandem::job::{JobStatus, SyncMode};
use tandem::reactor::BackendChoice;

/// Slow enough that the guest writes during the backup of the 16 MiB disk.
const SPEED_BYTES_PER_S: u64 = 24 << 20;

/// Mirror `source` to `target` under guest writes that go on after the switch-over; the
/// target must then equal what the guest wrote.
fn mirror_under_guest(dir: &Path, source: &Path, target: &Path, seed: u64) {
    let model = std::fs::read(source).expect("the source's bytes");
    assert_eq!(model.len() as u64, DISK_BYTES, "{}", source.display());
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(open(&runtime, source));
    assert_eq!(disk.size_bytes(), DISK_BYTES, "the size of {}", source.display());
    let config = MirrorConfig { sync: SyncMode::Full, copy_mode: CopyMode::WriteBlocking, ..MirrorConfig::default() };
    let job = tandem::job::mirror::start(&runtime.handle(), &disk, open(&runtime, target), config).expect("starts");
    let guest = Guest::start(&runtime, &disk, &model, seed);
    guest.wait_writes(50);
    let status = job.wait_for(|s| s == JobStatus::Ready || s.is_finished(), WAIT);
    assert_eq!(status, JobStatus::Ready, "job error: {:?}", job.error());
    job.complete().expect("complete");
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    assert_eq!(job.error(), None);
    guest.wait_writes(50); // now on the target
    let model = guest.stop();
    drop((disk, runtime));
    let model_path = dir.join("model.img");
    std::fs::write(&model_path, &model).expect("the model");
    assert!(qemu_img_identical(&model_path, target), "{} differs from what the guest wrote", target.display());
    std::fs::remove_file(&model_path).expect("the model");
}

/// Back `source` up to `target` under guest writes; the target must equal the source as it
/// was at the job's start.
fn backup_under_guest(dir: &Path, source: &Path, target: &Path, seed: u64) {
    let snapshot = dir.join("snapshot.img");
    let model = std::fs::read(source).expect("the source's bytes");
    std::fs::write(&snapshot, &model).expect("the point-in-time copy");
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(open(&runtime, source));
    let config = BackupConfig { speed_bytes_per_s: SPEED_BYTES_PER_S, ..BackupConfig::default() };
    let job = tandem::job::backup::start(&runtime.handle(), &disk, open(&runtime, target), config).expect("starts");
    let guest = Guest::start(&runtime, &disk, &model, seed);
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    assert_eq!(job.error(), None);
    drop(guest.stop());
    drop((disk, runtime));
    assert!(qemu_img_identical(&snapshot, target), "{} is not the point in time", target.display());
    std::fs::remove_file(&snapshot).expect("the snapshot");
}

#[test]
fn mirror_from_a_file_onto_a_loop_device_and_back() {
    let dir = scratch_dir();
    let (file, back) = (dir.path().join("source.img"), dir.path().join("back.img"));
    write_image(&file, Layout::Dense, 21);
    let device = LoopDevice::new(dir.path(), DISK_BYTES);
    mirror_under_guest(dir.path(), &file, &device.device, 22);
    std::fs::File::create(&back).and_then(|f| f.set_len(DISK_BYTES)).expect("a new target");
    mirror_under_guest(dir.path(), &device.device, &back, 23);
}

#[test]
fn backup_from_a_file_onto_a_loop_device_and_back() {
    let dir = scratch_dir();
    let (file, back) = (dir.path().join("source.img"), dir.path().join("back.img"));
    write_image(&file, Layout::Dense, 31);
    let device = LoopDevice::new(dir.path(), DISK_BYTES);
    backup_under_guest(dir.path(), &file, &device.device, 32);
    std::fs::File::create(&back).and_then(|f| f.set_len(DISK_BYTES)).expect("a new target");
    backup_under_guest(dir.path(), &device.device, &back, 33);
}
