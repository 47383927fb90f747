//! Jobs whose target is an NBD export in another process (qemu-nbd over a Unix socket, `common::nbd`),
//! reached through the NBD client driver, under a guest that writes the whole time: the
//! mirror's target ends identical to what the guest wrote, the backup's target equals the
//! source as it was at the job's start (`qemu-img compare`, on the files behind the exports).

mod common;

use common::jobs::{open, qemu_img_identical, write_image, Guest, Layout, DISK_BYTES, WAIT};
use common::nbd::NbdServer;
use common::{runtime, scratch_dir};
use std::sync::Arc;
use tandem::block::Disk;
use tandem::job::{backup, mirror, JobStatus};
use tandem::reactor::BackendChoice;
use tandem_drivers::nbd::{open_uri, NbdConfig};

#[test]
fn a_mirror_to_an_nbd_export_in_another_process_ends_identical() {
    let dir = scratch_dir();
    let source_path = dir.path().join("source.img");
    let model = write_image(&source_path, Layout::Dense, 21);
    let server = NbdServer::qemu(DISK_BYTES);
    let target_path = server.file.clone().expect("qemu-nbd serves a file");
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(open(&runtime, &source_path));
    let target = Arc::new(open_uri(&runtime.handle(), &server.uri(), &NbdConfig::default()).expect("the export opens"));
    let config = mirror::MirrorConfig { copy_mode: mirror::CopyMode::WriteBlocking, ..mirror::MirrorConfig::default() };
    let job = mirror::start(&runtime.handle(), &disk, target, config).expect("mirror starts");
    let guest = Guest::start(&runtime, &disk, &model, 22);
    guest.wait_writes(50);
    assert_eq!(job.wait_for(|s| s == JobStatus::Ready || s.is_finished(), WAIT), JobStatus::Ready, "{:?}", job.error());
    guest.wait_writes(50);
    job.complete().expect("complete");
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    assert_eq!(job.error(), None);
    guest.wait_writes(50); // now through NBD, on the target
    let model = guest.stop();
    drop((disk, runtime));
    let model_path = dir.path().join("model.img");
    std::fs::write(&model_path, &model).unwrap();
    assert!(qemu_img_identical(&model_path, &target_path), "the target differs from what the guest wrote");
}

#[test]
fn a_backup_to_an_nbd_export_in_another_process_is_the_point_in_time() {
    let dir = scratch_dir();
    let path = |name: &str| dir.path().join(name);
    let (source_path, snapshot_path) = (path("source.img"), path("snap.img"));
    let model = write_image(&source_path, Layout::Dense, 23);
    std::fs::copy(&source_path, &snapshot_path).unwrap();
    let server = NbdServer::qemu(DISK_BYTES);
    let target_path = server.file.clone().expect("qemu-nbd serves a file");
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(open(&runtime, &source_path));
    let target = Arc::new(open_uri(&runtime.handle(), &server.uri(), &NbdConfig::default()).expect("the export opens"));
    let config = backup::BackupConfig { speed_bytes_per_s: 24 << 20, ..backup::BackupConfig::default() };
    let job = backup::start(&runtime.handle(), &disk, target, config).expect("backup starts");
    let guest = Guest::start(&runtime, &disk, &model, 24);
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    let writes_during_job = guest.writes();
    drop(guest.stop());
    assert_eq!(job.error(), None);
    assert!(writes_during_job > 50, "the guest wrote only {writes_during_job} times during the job");
    drop((disk, runtime));
    assert!(qemu_img_identical(&snapshot_path, &target_path), "the target is not the point in time");
    assert!(!qemu_img_identical(&snapshot_path, &source_path), "the guest changed the source meanwhile");
}
