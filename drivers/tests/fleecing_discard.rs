//! Issue 17: a fleecing backup with `discard_source` (the scratch image shrinks as the second
//! backup reads it, and the point in time stays exact), discards through a snapshot view, and
//! copy-before-write's cluster floor (`min_cluster_bytes`). Real files with O_DIRECT, as in
//! `backup.rs`; `qemu-img compare` is the arbiter of the point in time.

mod common;

use common::jobs::{allocated_ranges, open, qemu_img_identical, random_bytes, write_image, Guest, Layout};
use common::jobs::{DISK_BYTES, WAIT};
use common::{runtime, scratch_dir};
use parking_lot::Mutex;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::block::{Alignment, BlockDriver, BufResult, Capabilities, Disk, Extent, IoFuture, WriteFlags};
use tandem::buf::AlignedBuf;
use tandem::job::backup::{start, start_with_view, BackupConfig};
use tandem::job::{ErrorPolicy, IoOperation, Job, JobError, JobEvent, JobStatus, SyncMode};
use tandem::reactor::{BackendChoice, Runtime};
use tandem::IoPriority;
use tandem_drivers::{Fault, FaultRule, FaultyDriver, OpMask, Trigger};

const CLUSTER_BYTES: u64 = 64 << 10;

struct Setup {
    _dir: tempfile::TempDir,
    source_path: PathBuf,
    target_path: PathBuf,
    scratch_path: PathBuf,
    snapshot_path: PathBuf,
    runtime: Runtime,
    disk: Disk,
    model: Vec<u8>,
}

/// A dense source, its point in time copied aside, and a fresh sparse target and scratch.
fn setup() -> Setup {
    let dir = scratch_dir();
    let path = |name: &str| dir.path().join(name);
    let (source_path, target_path) = (path("source.img"), path("target.img"));
    let (scratch_path, snapshot_path) = (path("scratch.img"), path("snapshot.img"));
    let model = write_image(&source_path, Layout::Dense, 17);
    std::fs::copy(&source_path, &snapshot_path).unwrap();
    for fresh in [&target_path, &scratch_path] {
        std::fs::File::create(fresh).unwrap().set_len(DISK_BYTES).unwrap();
    }
    let runtime = runtime(BackendChoice::Auto, 2);
    let disk = Disk::new(open(&runtime, &source_path));
    Setup { _dir: dir, source_path, target_path, scratch_path, snapshot_path, runtime, disk, model }
}

fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn wait_null(job: &Job) {
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null);
}

fn guest_write(disk: &Disk, offset: u64, seed: u64) {
    let buf = AlignedBuf::from_slice(&random_bytes(4096, seed), 4096).unwrap();
    disk.write_blocking(offset, buf, WriteFlags::default(), IoPriority::GUEST).0.expect("guest write");
}

/// A discard straight on a driver (as the second backup does), run on the runtime.
fn discard(runtime: &Runtime, driver: Arc<dyn BlockDriver>, offset: u64, length_bytes: u64) -> tandem::Result<()> {
    let discarding = runtime.spawn(move || driver.discard(offset, length_bytes, IoPriority::GUEST));
    discarding.join().expect("the runtime runs")
}

fn read(disk: &Disk, offset: u64, length_bytes: usize) -> tandem::Result<Vec<u8>> {
    let buf = AlignedBuf::zeroed(length_bytes, 4096).unwrap();
    let (result, buf) = disk.read_blocking(offset, buf, IoPriority::GUEST);
    result.map(|()| buf.as_slice().to_vec())
}

/// Backup A (sync=none) onto the scratch, with its view; nothing saved yet.
fn fleecing(s: &Setup) -> (Job, Arc<tandem::job::backup::SnapshotView>) {
    let config = BackupConfig {
        id: "fleece".into(),
        sync: SyncMode::None,
        cluster_bytes: CLUSTER_BYTES,
        ..BackupConfig::default()
    };
    start_with_view(&s.runtime.handle(), &s.disk, open(&s.runtime, &s.scratch_path), config).unwrap()
}

#[test]
fn fleecing_with_discard_source_shrinks_the_scratch_and_keeps_the_point_in_time() {
    let s = setup();
    let (fleece, view) = fleecing(&s);
    let guest = Guest::start(&s.runtime, &s.disk, &s.model, 5);
    // The guest overwrites much of the disk: its old data piles up on the scratch.
    let deadline = Instant::now() + WAIT;
    while allocated_bytes(&s.scratch_path) < DISK_BYTES / 2 {
        assert!(Instant::now() < deadline, "the scratch never grew: {} B", allocated_bytes(&s.scratch_path));
        std::thread::sleep(Duration::from_millis(5));
    }
    let view_disk = Disk::new(view);
    let config = BackupConfig {
        id: "reader".into(),
        cluster_bytes: CLUSTER_BYTES,
        speed_bytes_per_s: 8 << 20,
        discard_source: true,
        ..BackupConfig::default()
    };
    let reader = start(&s.runtime.handle(), &view_disk, open(&s.runtime, &s.target_path), config).unwrap();
    // The guest goes on writing while the reader copies: (status, scratch's allocated bytes).
    let mut samples = vec![(JobStatus::Created, allocated_bytes(&s.scratch_path))];
    while reader.status() != JobStatus::Null {
        samples.push((reader.status(), allocated_bytes(&s.scratch_path)));
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_null(&reader);
    assert_eq!(reader.error(), None);
    let peak = samples.iter().map(|&(_, bytes)| bytes).max().unwrap();
    let end_bytes = allocated_bytes(&s.scratch_path);
    assert!(end_bytes <= peak / 8, "the scratch fell only from {peak} B to {end_bytes} B");
    let falling = samples.iter().filter(|&&(status, bytes)| status == JobStatus::Running && bytes < peak * 3 / 4);
    assert!(falling.count() >= 2, "no sample while the reader ran shows the fall: {samples:?}");
    assert_eq!(reader.info().discarded_source_bytes, DISK_BYTES, "every cluster was discarded once it was copied");
    // A discarded cluster left the point in time: its read fails rather than show new data.
    let error = read(&view_disk, 0, 4096).unwrap_err();
    assert!(matches!(error, tandem::Error::Io { errno: libc::EACCES, offset: 0, .. }), "{error}");
    drop(guest.stop());
    fleece.cancel(false).unwrap();
    wait_null(&fleece);
    let Setup { disk, runtime, target_path, snapshot_path, source_path, .. } = s;
    drop((view_disk, disk, runtime));
    assert!(qemu_img_identical(&snapshot_path, &target_path), "the reader's target is the point in time");
    assert!(!qemu_img_identical(&snapshot_path, &source_path), "the guest changed the source meanwhile");
}

#[test]
fn a_discard_through_the_view_releases_whole_clusters_and_their_space() {
    let s = setup();
    let (fleece, view) = fleecing(&s);
    for (index, cluster) in [1, 2, 3, 5].into_iter().enumerate() {
        guest_write(&s.disk, cluster * CLUSTER_BYTES + 4096, index as u64);
    }
    let saved = allocated_ranges(&s.scratch_path);
    let saved_bytes: u64 = saved.iter().map(|(start, end)| end - start).sum();
    assert_eq!(saved_bytes, 4 * CLUSTER_BYTES, "four clusters saved: {saved:?}");
    // [1.5, 4.5) clusters: whole clusters 2 and 3 go, the partial 1 and 4 stay.
    let (at, length_bytes) = (CLUSTER_BYTES * 3 / 2, CLUSTER_BYTES * 3);
    discard(&s.runtime, view.clone(), at, length_bytes).unwrap();
    let left: Vec<(u64, u64)> = allocated_ranges(&s.scratch_path);
    assert_eq!(left, [(CLUSTER_BYTES, 2 * CLUSTER_BYTES), (5 * CLUSTER_BYTES, 6 * CLUSTER_BYTES)]);
    let view_disk = Disk::new(view);
    let snapshot = std::fs::read(&s.snapshot_path).unwrap();
    for cluster in [1, 4, 5] {
        let offset = cluster * CLUSTER_BYTES;
        let expected = &snapshot[offset as usize..(offset + CLUSTER_BYTES) as usize];
        assert!(read(&view_disk, offset, CLUSTER_BYTES as usize).unwrap() == expected, "cluster {cluster}");
    }
    let error = read(&view_disk, 2 * CLUSTER_BYTES - 4096, 8192).unwrap_err();
    assert!(matches!(error, tandem::Error::Io { errno: libc::EACCES, offset, .. } if offset == 2 * CLUSTER_BYTES));
    // Released: the guest writes there without saving, and the scratch stays as it is.
    guest_write(&s.disk, 3 * CLUSTER_BYTES, 9);
    assert_eq!(allocated_ranges(&s.scratch_path), left);
    fleece.cancel(false).unwrap();
    wait_null(&fleece);
    let error = discard(&s.runtime, view_disk.driver(), 0, CLUSTER_BYTES).unwrap_err();
    assert!(matches!(error, tandem::Error::Io { errno: libc::ESTALE, .. }), "the job ended: {error}");
}

#[test]
fn discard_source_is_refused_by_name_unless_the_source_is_a_fleecing_view() {
    let s = setup();
    let config = || BackupConfig { discard_source: true, ..BackupConfig::default() };
    let error = start(&s.runtime.handle(), &s.disk, open(&s.runtime, &s.target_path), config()).map(|_| ());
    let error = error.unwrap_err();
    assert!(matches!(error, JobError::Config { name: "discard-source", .. }), "{error}");
    assert!(!s.disk.has_filter(), "nothing started");
    // A view over a sync=full job reads a real backup's target: not a scratch either.
    let full = BackupConfig { sync: SyncMode::Full, speed_bytes_per_s: 1 << 20, ..BackupConfig::default() };
    let (job, view) = start_with_view(&s.runtime.handle(), &s.disk, open(&s.runtime, &s.scratch_path), full).unwrap();
    let view_disk = Disk::new(view);
    let error = start(&s.runtime.handle(), &view_disk, open(&s.runtime, &s.target_path), config()).map(|_| ());
    let error = error.unwrap_err();
    assert!(matches!(error, JobError::Config { name: "discard-source", .. }), "{error}");
    assert!(!view_disk.has_filter(), "nothing started");
    job.cancel(false).unwrap();
    wait_null(&job);
    let Setup { disk, runtime, source_path, snapshot_path, target_path, .. } = s;
    drop((view_disk, disk, runtime));
    assert!(qemu_img_identical(&snapshot_path, &source_path), "the source is unchanged");
    assert_eq!(allocated_bytes(&target_path), 0, "the target is untouched");
}

/// A scratch whose discards fail: the second backup's `discard_source` meets the error as a
/// source error, so `report` fails it and `ignore` goes on (with BLOCK_JOB_ERROR) to a whole
/// point in time.
#[test]
fn a_failed_discard_of_the_source_follows_on_source_error() {
    for policy in [ErrorPolicy::Report, ErrorPolicy::Ignore] {
        let s = setup();
        let scratch = Arc::new(FaultyDriver::new(open(&s.runtime, &s.scratch_path), 1, false));
        scratch.add_rule(FaultRule {
            ops: OpMask::DISCARD,
            trigger: Trigger::Always,
            fault: Fault::Errno(libc::EIO),
            fire_count_max: None,
        });
        let fleece = BackupConfig { sync: SyncMode::None, cluster_bytes: CLUSTER_BYTES, ..BackupConfig::default() };
        let (fleece, view) = start_with_view(&s.runtime.handle(), &s.disk, scratch.clone(), fleece).unwrap();
        guest_write(&s.disk, 4 * CLUSTER_BYTES, 1); // a saved cluster: its release discards the scratch
        let config = BackupConfig {
            id: "reader".into(),
            discard_source: true,
            on_source_error: policy,
            ..BackupConfig::default()
        };
        let view_disk = Disk::new(view);
        let reader = start(&s.runtime.handle(), &view_disk, open(&s.runtime, &s.target_path), config).unwrap();
        wait_null(&reader);
        assert!(scratch.fired_count(0) >= 1, "{policy:?}: the scratch refused a discard");
        let reported = reader
            .events()
            .try_iter()
            .any(|event| matches!(event, JobEvent::Error { operation: IoOperation::Read, .. }));
        assert!(reported, "{policy:?}: BLOCK_JOB_ERROR names the source side");
        match policy {
            ErrorPolicy::Report => assert!(reader.error().is_some(), "report fails the backup"),
            _ => assert_eq!(reader.error(), None, "ignore goes on"),
        }
        fleece.cancel(false).unwrap();
        wait_null(&fleece);
        let Setup { disk, runtime, target_path, snapshot_path, .. } = s;
        drop((view_disk, disk, runtime));
        if policy == ErrorPolicy::Ignore {
            assert!(qemu_img_identical(&snapshot_path, &target_path), "the data reached the target all the same");
        }
    }
}

/// A target that records the size of every write reaching it.
struct Recording {
    inner: Arc<dyn BlockDriver>,
    writes: Mutex<Vec<(u64, u64)>>,
}

impl BlockDriver for Recording {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn alignment(&self) -> Alignment {
        self.inner.alignment()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn read(&self, offset: u64, buf: AlignedBuf, priority: IoPriority) -> IoFuture<BufResult<()>> {
        self.inner.read(offset, buf, priority)
    }
    fn write(&self, offset: u64, buf: AlignedBuf, flags: WriteFlags, priority: IoPriority) -> IoFuture<BufResult<()>> {
        self.writes.lock().push((offset, buf.len() as u64));
        self.inner.write(offset, buf, flags, priority)
    }
    fn flush(&self, priority: IoPriority) -> IoFuture<tandem::Result<()>> {
        self.inner.flush(priority)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        unmap: bool,
        priority: IoPriority,
    ) -> IoFuture<tandem::Result<()>> {
        self.writes.lock().push((offset, length));
        self.inner.write_zeroes(offset, length, unmap, priority)
    }
    fn discard(&self, offset: u64, length_bytes: u64, priority: IoPriority) -> IoFuture<tandem::Result<()>> {
        self.inner.discard(offset, length_bytes, priority)
    }
    fn block_status(&self, offset: u64, length_bytes: u64) -> IoFuture<tandem::Result<Extent>> {
        self.inner.block_status(offset, length_bytes)
    }
    fn device_id(&self) -> Option<(u64, u64)> {
        self.inner.device_id()
    }
}

#[test]
fn min_cluster_bytes_saves_in_pieces_of_the_floor_and_refuses_bad_values_by_name() {
    let s = setup();
    let handle = s.runtime.handle();
    let refused = |min_cluster_bytes: u64, chunk_bytes_max: u64| {
        let config = BackupConfig {
            sync: SyncMode::None,
            min_cluster_bytes: Some(min_cluster_bytes),
            chunk_bytes_max,
            buf_size_bytes: 16 << 20,
            ..BackupConfig::default()
        };
        let error = start(&handle, &s.disk, open(&s.runtime, &s.target_path), config).map(|_| ()).unwrap_err();
        assert!(!s.disk.has_filter(), "{error}: nothing may be started");
        let named = matches!(error, JobError::Config { name: "min-cluster-size", ref value, .. }
            if *value == min_cluster_bytes.to_string());
        assert!(named, "{min_cluster_bytes}: {error}");
    };
    refused(3 << 20, 4 << 20); // not a power of two
    refused(0, 4 << 20);
    refused(2 << 20, 1 << 20); // above the job's max
    refused(256, 4 << 20); // below the disk's block size (512 B at least)

    let floor_bytes = 1 << 20;
    let target = Arc::new(Recording { inner: open(&s.runtime, &s.target_path), writes: Mutex::default() });
    let config = BackupConfig {
        sync: SyncMode::None,
        cluster_bytes: CLUSTER_BYTES,
        min_cluster_bytes: Some(floor_bytes),
        ..BackupConfig::default()
    };
    let job = start(&handle, &s.disk, target.clone(), config).unwrap();
    for (index, offset) in [0, 3 << 20, (3 << 20) + 8192, (9 << 20) + (CLUSTER_BYTES * 5)].into_iter().enumerate() {
        guest_write(&s.disk, offset, 100 + index as u64);
    }
    let writes = target.writes.lock().clone();
    assert_eq!(writes, [(0, floor_bytes), (3 << 20, floor_bytes), (9 << 20, floor_bytes)], "whole floors");
    job.cancel(false).unwrap();
    wait_null(&job);
    let (target_bytes, snapshot) = (std::fs::read(&s.target_path).unwrap(), std::fs::read(&s.snapshot_path).unwrap());
    for (offset, length_bytes) in writes {
        let range = offset as usize..(offset + length_bytes) as usize;
        assert!(target_bytes[range.clone()] == snapshot[range], "the save at {offset} holds the point in time");
    }
}
