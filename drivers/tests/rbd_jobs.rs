//! Mirror and backup jobs into and out of Ceph RBD images on the test cluster, under the
//! job tests' guest (several tasks on two cores writing random pieces of the disk). `rbd
//! export` plus `qemu-img compare` and a read back through Tandem are the arbiters.

mod common;

use common::jobs::{allocated_ranges, open, qemu_img_identical, write_image, Guest, Layout, DISK_BYTES, WAIT};
use common::{ceph_cluster, runtime, scratch_dir, ScratchImage};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use tandem::block::{BlockDriver, Disk, WriteFlags};
use tandem::buf::AlignedBuf;
use tandem::job::mirror::{CopyMode, MirrorConfig};
use tandem::job::{backup, mirror, ErrorPolicy, Job, JobEvent, JobStatus, SyncMode};
use tandem::reactor::{BackendChoice, Runtime};
use tandem::IoPriority;
use tandem_drivers::rbd::{create_image, RbdDriver, RbdOptions, RbdSpec};

const G: IoPriority = IoPriority::GUEST;
const PIECE_BYTES: u64 = 1 << 20;

fn wait_status(job: &Job, wanted: JobStatus) {
    let status = job.wait_for(|s| s == wanted || s.is_finished(), WAIT);
    assert_eq!(status, wanted, "job error: {:?}", job.error());
}

fn read_all(driver: Arc<dyn BlockDriver>) -> Vec<u8> {
    let disk = Disk::new(driver);
    let mut data = Vec::with_capacity(disk.size_bytes() as usize);
    for offset in (0..disk.size_bytes()).step_by(PIECE_BYTES as usize) {
        let (result, buf) = disk.read_blocking(offset, AlignedBuf::zeroed(PIECE_BYTES as usize, 4096).unwrap(), G);
        result.unwrap_or_else(|e| panic!("{}: read at {offset}: {e}", disk.name()));
        data.extend_from_slice(buf.as_slice());
    }
    data
}

fn write_all(disk: &Disk, data: &[u8]) {
    for (index, piece) in data.chunks(PIECE_BYTES as usize).enumerate() {
        let buf = AlignedBuf::from_slice(piece, 4096).unwrap();
        let (result, _) = disk.write_blocking(index as u64 * PIECE_BYTES, buf, WriteFlags::default(), G);
        result.unwrap();
    }
}

/// `rbd export` of the image into a file at `path`.
fn rbd_export(spec: &RbdSpec, path: &Path) -> PathBuf {
    let conf = spec.conf_path.as_ref().expect("test specs name their conf");
    let output = Command::new("rbd").arg("-c").arg(conf).arg("export").arg(spec.image_path()).arg(path).output();
    let output = output.expect("rbd must be installed (ceph-common)");
    assert!(output.status.success(), "rbd export: {}", String::from_utf8_lossy(&output.stderr));
    path.to_path_buf()
}

fn save(path: PathBuf, data: &[u8]) -> PathBuf {
    std::fs::write(&path, data).unwrap();
    path
}

/// Mirror `disk` to `target` with the guest writing, switch over, write on; the model.
fn mirror_and_complete(runtime: &Runtime, disk: &Disk, target: Arc<dyn BlockDriver>, model: &[u8]) -> Vec<u8> {
    // Write-blocking: the guest rewrites this small disk faster than a background copy
    // converges (see the mirror tests).
    let config = MirrorConfig { copy_mode: CopyMode::WriteBlocking, ..MirrorConfig::default() };
    let job = mirror::start(&runtime.handle(), disk, target, config).expect("mirror starts");
    let guest = Guest::start(runtime, disk, model, 200);
    wait_status(&job, JobStatus::Ready);
    guest.wait_writes(50);
    job.complete().expect("complete");
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    assert_eq!(job.error(), None);
    guest.wait_writes(50); // on the new disk now
    guest.stop()
}

#[test]
fn a_local_disk_mirrored_into_rbd_equals_what_the_guest_wrote() {
    let dir = scratch_dir();
    let source_path = dir.path().join("source.img");
    let model = write_image(&source_path, Layout::Dense, 1);
    let image = ScratchImage::new(DISK_BYTES);
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(open(&runtime, &source_path));
    let model = mirror_and_complete(&runtime, &disk, Arc::new(image.open()), &model);
    drop((disk, runtime));
    assert!(read_all(Arc::new(image.open())) == model, "read back through Tandem");
    let exported = rbd_export(&image.spec, &dir.path().join("exported.img"));
    assert!(qemu_img_identical(&save(dir.path().join("model.img"), &model), &exported), "rbd export");
}

#[test]
fn an_rbd_image_mirrored_out_to_a_local_file_equals_what_the_guest_wrote() {
    let dir = scratch_dir();
    let image = ScratchImage::new(DISK_BYTES);
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(Arc::new(image.open()));
    let model = common::jobs::random_bytes(DISK_BYTES as usize, 7);
    write_all(&disk, &model);
    let target_path = dir.path().join("target.img");
    write_image(&target_path, Layout::Dense, 8);
    let model = mirror_and_complete(&runtime, &disk, open(&runtime, &target_path), &model);
    drop((disk, runtime));
    assert!(qemu_img_identical(&save(dir.path().join("model.img"), &model), &target_path));
}

/// A full backup into one image, then incrementals into fresh images, each under the guest;
/// each incremental's clusters replayed over the full one equal the source at its instant.
#[test]
fn full_and_incremental_backups_into_rbd_restore_the_source_at_each_instant() {
    let dir = scratch_dir();
    let path = |name: &str| dir.path().join(name);
    let source_path = path("source.img");
    let mut model = write_image(&source_path, Layout::Dense, 3);
    let full_snapshot = save(path("snapshot-full.img"), &model);
    let runtime = runtime(BackendChoice::Auto, 2);
    let handle = runtime.handle();
    let disk = Disk::new(open(&runtime, &source_path));

    let full_image = ScratchImage::new(DISK_BYTES);
    let full = backup::BackupConfig {
        new_bitmap: Some("chain".into()),
        speed_bytes_per_s: 24 << 20,
        ..backup::BackupConfig::default()
    };
    let job = backup::start(&handle, &disk, Arc::new(full_image.open()), full).unwrap();
    let guest = Guest::start(&runtime, &disk, &model, 51);
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    assert_eq!(job.error(), None);
    model = guest.stop();
    let chain = disk.bitmaps().get("chain").unwrap();

    // Each incremental: the guest paused, so the snapshot and the list of clusters the job
    // takes over (what the bitmap marks) are both of the job's instant.
    let mut incrementals = Vec::new();
    for round in 0..2u64 {
        let snapshot = save(path(&format!("snapshot{round}.img")), &model);
        let clusters: Vec<(u64, u64)> = chain.areas().collect();
        assert!(!clusters.is_empty(), "round {round}: the guest changed something");
        let image = ScratchImage::new(DISK_BYTES);
        let config = backup::BackupConfig {
            id: format!("inc{round}"),
            sync: SyncMode::Bitmap,
            bitmap: Some("chain".into()),
            ..backup::BackupConfig::default()
        };
        let job = backup::start(&handle, &disk, Arc::new(image.open()), config).unwrap();
        let guest = Guest::start(&runtime, &disk, &model, 61 + round);
        assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
        guest.wait_writes(100);
        model = guest.stop();
        assert_eq!(job.error(), None);
        incrementals.push((image, clusters, snapshot));
    }
    drop((disk, runtime));

    let restored_path = rbd_export(&full_image.spec, &path("restored.img"));
    assert!(qemu_img_identical(&full_snapshot, &restored_path), "the full backup is the source at its start");
    let restored = std::fs::OpenOptions::new().write(true).open(&restored_path).unwrap();
    for (image, clusters, snapshot) in &incrementals {
        let data = read_all(Arc::new(image.open()));
        for &(offset, length) in clusters {
            restored.write_all_at(&data[offset as usize..(offset + length) as usize], offset).unwrap();
        }
        assert!(qemu_img_identical(snapshot, &restored_path), "{} replayed", image.spec.image_path());
    }
}

/// A cluster of its own, stopped on drop: this test kills its OSD.
struct OwnCluster {
    dir: PathBuf,
}

impl OwnCluster {
    fn start(dir: PathBuf) -> OwnCluster {
        ceph_cluster(); // the suite runs beside a cluster, so Ceph's tools are there
        let output = Command::new(script()).arg("start").arg(&dir).output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        OwnCluster { dir }
    }

    fn kill_osd(&self) {
        let pid = std::fs::read_to_string(self.dir.join("run/osd.pid")).unwrap();
        let status = Command::new("kill").arg("-KILL").arg(pid.trim()).status().unwrap();
        assert!(status.success(), "kill the OSD");
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).status();
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-test-cluster")
}

/// What a job into an image on a cluster whose OSD dies mid-job must show: the report policy
/// ends it with the target's timeout, nothing hangs, and the guest's writes to the local
/// source all landed.
fn osd_dies_mid_job(start: impl FnOnce(&Runtime, &Disk, Arc<dyn BlockDriver>) -> Job) {
    let dir = scratch_dir();
    let cluster = OwnCluster::start(dir.path().join("ceph"));
    let conf = cluster.dir.join("ceph.conf");
    let spec = RbdSpec::parse(&format!("rbd:tandem/target:conf={}", conf.display())).unwrap();
    create_image(&spec, DISK_BYTES).unwrap();
    let options = RbdOptions { op_timeout_s: 5, ..RbdOptions::default() };
    let target = RbdDriver::open(&spec, &options).unwrap();

    let source_path = dir.path().join("source.img");
    let model = write_image(&source_path, Layout::Dense, 5);
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(open(&runtime, &source_path));
    let job = start(&runtime, &disk, Arc::new(target));
    let guest = Guest::start(&runtime, &disk, &model, 300);
    guest.wait_writes(50);
    cluster.kill_osd();
    let status = job.wait_for(|s| s.is_finished(), WAIT);
    assert!(status.is_finished(), "the job ended ({status:?})");
    let error = job.error().expect("the job failed with the target's error");
    assert!(error.contains("timed out"), "the error names the timeout: {error}");
    let events: Vec<JobEvent> = job.events().try_iter().collect();
    assert!(
        events.iter().any(|e| matches!(e, JobEvent::Completed { error: Some(_), .. })),
        "BLOCK_JOB_COMPLETED carries the error: {events:?}"
    );
    guest.wait_writes(50); // the source still takes writes
    let model = guest.stop();
    assert!(!disk.has_filter(), "the job's filter is off the source");
    drop((disk, runtime));
    assert!(qemu_img_identical(&save(dir.path().join("model.img"), &model), &source_path), "no guest write lost");
}

#[test]
fn an_osd_that_dies_mid_mirror_ends_it_by_its_error_policy_and_the_source_keeps_every_write() {
    osd_dies_mid_job(|runtime, disk, target| {
        let config = MirrorConfig {
            speed_bytes_per_s: 2 << 20, // mid-copy for seconds
            on_target_error: ErrorPolicy::Report,
            ..MirrorConfig::default()
        };
        mirror::start(&runtime.handle(), disk, target, config).unwrap()
    });
}

#[test]
fn an_osd_that_dies_mid_backup_ends_it_by_its_error_policy_and_the_source_keeps_every_write() {
    osd_dies_mid_job(|runtime, disk, target| {
        // break-snapshot: a failed save must not fail the guest's writes to the local source.
        let config = backup::BackupConfig {
            speed_bytes_per_s: 2 << 20,
            on_target_error: ErrorPolicy::Report,
            on_cbw_error: tandem::job::copy_before_write::OnCbwError::BreakSnapshot,
            ..backup::BackupConfig::default()
        };
        backup::start(&runtime.handle(), disk, target, config).unwrap()
    });
}

/// block_status from rbd_diff_iterate2 keeps a sync=top copy out of a sparse image sparse:
/// objects never written stay holes in the target.
#[test]
fn a_sparse_image_mirrored_out_with_sync_top_stays_sparse() {
    let dir = scratch_dir();
    let image = ScratchImage::new(DISK_BYTES);
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(Arc::new(image.open()));
    let mut model = vec![0u8; DISK_BYTES as usize];
    for start in [0u64, 8 << 20] {
        let data = common::jobs::random_bytes(1 << 20, start + 1);
        model[start as usize..(start + (1 << 20)) as usize].copy_from_slice(&data);
        let (result, _) =
            disk.write_blocking(start, AlignedBuf::from_slice(&data, 4096).unwrap(), WriteFlags::default(), G);
        result.unwrap();
    }
    let target_path = dir.path().join("target.img");
    std::fs::File::create(&target_path).unwrap().set_len(DISK_BYTES).unwrap();
    let config = MirrorConfig { sync: SyncMode::Top, ..MirrorConfig::default() };
    let job = mirror::start(&runtime.handle(), &disk, open(&runtime, &target_path), config).unwrap();
    wait_status(&job, JobStatus::Ready);
    // Only the two written objects were marked to copy (a status of "data everywhere" would
    // mark all 16 MiB; zeros then reach the target as holes, so the map alone cannot tell).
    let total_bytes = job.progress().total_bytes;
    assert!((2 << 20..=8 << 20).contains(&total_bytes), "sync=top marked {total_bytes} bytes");
    job.cancel(false).unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
    drop((disk, runtime));
    assert!(qemu_img_identical(&save(dir.path().join("model.img"), &model), &target_path));
    // rbd knows objects (4 MiB), not bytes: the written objects may be copied whole, the
    // others never.
    for (start, end) in allocated_ranges(&target_path) {
        let inside = |object: u64| start >= object && end <= object + (4 << 20);
        assert!(inside(0) || inside(8 << 20), "target allocated [{start}, {end}) in an object never written");
    }
}
