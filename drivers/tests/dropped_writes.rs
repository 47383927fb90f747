//! Every write that reached a device is recorded, even when its caller drops the future
//! before it completes: the disk's and the job's bitmaps see it, a mirror's target gets it,
//! and its write-gate ticket lives until the device is done, so a drain (a mirror's start, a
//! backup's point in time, the switch-over) waits for it.
//!
//! Two ways a write outlives its future: polled once off the reactor and dropped (the filter's
//! remaining work used to be dropped with it), and a driver whose write completes later on
//! another thread (a boxed future, as rbd's and the faulty driver's are: the ticket used to be
//! released at once).

mod common;

use common::jobs::{open, qemu_img_identical, random_bytes, replay, write_image, Layout, WAIT};
use common::{runtime, scratch_dir};
use parking_lot::Mutex;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tandem::block::{Alignment, BlockDriver, BufResult, Capabilities, Disk, Extent, IoFuture, WriteFlags};
use tandem::buf::AlignedBuf;
use tandem::job::mirror::{CopyMode, MirrorConfig};
use tandem::job::{backup, mirror, Job, JobStatus, SyncMode};
use tandem::reactor::{block_on, BackendChoice, Runtime};
use tandem::IoPriority;

/// Where the dropped write lands, and how much.
const WRITE_OFFSET: u64 = 1 << 20;
const WRITE_BYTES: usize = 64 << 10;
/// How long the late driver's write takes: far longer than copying the whole 16 MiB disk, so
/// a job that does not wait for it copies the old data first.
const LATE_DELAY: Duration = Duration::from_millis(500);

struct Setup {
    _dir: tempfile::TempDir,
    source_path: PathBuf,
    runtime: Runtime,
}

fn setup() -> Setup {
    let dir = scratch_dir();
    let source_path = dir.path().join("source.img");
    write_image(&source_path, Layout::Dense, 7);
    Setup { _dir: dir, source_path, runtime: runtime(BackendChoice::Auto, 2) }
}

impl Setup {
    /// A new image next to the source: random data (a mirror target) or sparse zeros.
    fn image(&self, name: &str, seed: Option<u64>) -> PathBuf {
        let path = self.source_path.with_file_name(name);
        match seed {
            Some(seed) => drop(write_image(&path, Layout::Dense, seed)),
            None => std::fs::File::create(&path).unwrap().set_len(common::jobs::DISK_BYTES).unwrap(),
        }
        path
    }
}

fn the_write() -> AlignedBuf {
    AlignedBuf::from_slice(&random_bytes(WRITE_BYTES, 99), 4096).unwrap()
}

/// Poll a write once from this plain thread (no reactor core), let it reach the device, and
/// drop it unfinished.
fn poll_once_then_drop(mut write: IoFuture<BufResult<()>>) {
    let mut cx = Context::from_waker(Waker::noop());
    assert!(Pin::new(&mut write).poll(&mut cx).is_pending(), "the write goes through a core's inbox");
    std::thread::sleep(Duration::from_millis(20));
    drop(write);
}

fn wait_null(job: &Job) {
    assert_eq!(job.wait_for(|s| s == JobStatus::Null, WAIT), JobStatus::Null, "error: {:?}", job.error());
    assert_eq!(job.error(), None);
}

fn background_mirror() -> MirrorConfig {
    MirrorConfig { copy_mode: CopyMode::Background, ..MirrorConfig::default() }
}

/// Complete a READY mirror, then check that the target equals the source it switched from.
fn complete_and_compare(s: Setup, disk: Disk, job: &Job, target_path: &Path) {
    job.complete().unwrap();
    wait_null(job);
    assert_eq!(disk.driver().name(), format!("file:{}", target_path.display()), "switched over");
    let Setup { _dir, source_path, runtime } = s;
    drop((disk, runtime));
    assert!(qemu_img_identical(&source_path, target_path), "the target lacks the dropped write");
}

#[test]
fn a_write_polled_off_core_and_dropped_during_a_background_mirror_reaches_the_target() {
    let s = setup();
    let target_path = s.image("target.img", Some(8));
    let disk = Disk::new(open(&s.runtime, &s.source_path));
    let job = mirror::start(&s.runtime.handle(), &disk, open(&s.runtime, &target_path), background_mirror()).unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Ready, WAIT), JobStatus::Ready);
    // Everything is copied: only the mark the filter makes after the source write can bring
    // this write to the target.
    poll_once_then_drop(disk.write(WRITE_OFFSET, the_write(), WriteFlags::default(), IoPriority::GUEST));
    complete_and_compare(s, disk, &job, &target_path);
}

#[test]
fn a_late_write_dropped_before_a_mirror_starts_is_waited_for_and_mirrored() {
    let s = setup();
    let target_path = s.image("target.img", Some(8));
    let late = LateDriver::new(open(&s.runtime, &s.source_path));
    let landed = late.landed.clone();
    let disk = Disk::new(Arc::new(late));
    poll_once_then_drop(disk.write(WRITE_OFFSET, the_write(), WriteFlags::default(), IoPriority::GUEST));
    // The start's drain must wait for the write, or the copier reads the old data and the
    // write lands unseen (it went below the filter the job inserts).
    let job = mirror::start(&s.runtime.handle(), &disk, open(&s.runtime, &target_path), background_mirror()).unwrap();
    assert_eq!(job.wait_for(|s| s == JobStatus::Ready, WAIT), JobStatus::Ready);
    LateDriver::wait_landed(&landed, 1);
    complete_and_compare(s, disk, &job, &target_path);
}

#[test]
fn a_late_write_dropped_before_a_full_backup_keeps_the_incremental_chain_exact() {
    let s = setup();
    let handle = s.runtime.handle();
    let late = LateDriver::new(open(&s.runtime, &s.source_path));
    let landed = late.landed.clone();
    let disk = Disk::new(Arc::new(late));
    poll_once_then_drop(disk.write(WRITE_OFFSET, the_write(), WriteFlags::default(), IoPriority::GUEST));
    // The full backup's point in time (a drain) comes after the write was issued: the write
    // belongs to it, or, if it landed later, to the bitmap. Before the fix it was in neither.
    let full_path = s.image("full.img", None);
    let full = backup::BackupConfig { new_bitmap: Some("chain".into()), ..backup::BackupConfig::default() };
    wait_null(&backup::start(&handle, &disk, open(&s.runtime, &full_path), full).unwrap());
    LateDriver::wait_landed(&landed, 1);
    let inc_path = s.image("inc.img", None);
    let incremental = backup::BackupConfig {
        id: "inc".into(),
        sync: SyncMode::Bitmap,
        bitmap: Some("chain".into()),
        ..backup::BackupConfig::default()
    };
    wait_null(&backup::start(&handle, &disk, open(&s.runtime, &inc_path), incremental).unwrap());
    let Setup { _dir, source_path, runtime } = s;
    drop((disk, runtime));
    let restored_path = source_path.with_file_name("restored.img");
    std::fs::copy(&full_path, &restored_path).unwrap();
    replay(&inc_path, &restored_path);
    assert!(qemu_img_identical(&source_path, &restored_path), "full + incremental do not restore the source");
}

/// A file driver whose writes complete `LATE_DELAY` later on a thread of their own, as a
/// network driver's do: its write future is boxed and knows nothing of the reactor.
struct LateDriver {
    inner: Arc<dyn BlockDriver>,
    /// Writes the device has finished: a test waits for its write to land before comparing,
    /// so a write nobody waited for shows up as a difference instead of vanishing with the
    /// runtime.
    landed: Arc<AtomicU64>,
}

impl LateDriver {
    fn new(inner: Arc<dyn BlockDriver>) -> LateDriver {
        LateDriver { inner, landed: Arc::new(AtomicU64::new(0)) }
    }

    /// Block until `count` writes have landed.
    fn wait_landed(landed: &AtomicU64, count: u64) {
        let deadline = std::time::Instant::now() + WAIT;
        while landed.load(Ordering::SeqCst) < count {
            assert!(std::time::Instant::now() < deadline, "the late write never landed");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// What the helper thread hands back, and who to wake.
#[derive(Default)]
struct Slot {
    result: Option<BufResult<()>>,
    waker: Option<Waker>,
}

impl BlockDriver for LateDriver {
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
    fn device_id(&self) -> Option<(u64, u64)> {
        self.inner.device_id()
    }
    fn read(&self, offset: u64, buf: AlignedBuf, priority: IoPriority) -> IoFuture<BufResult<()>> {
        self.inner.read(offset, buf, priority)
    }
    fn write(&self, offset: u64, buf: AlignedBuf, flags: WriteFlags, priority: IoPriority) -> IoFuture<BufResult<()>> {
        let slot = Arc::new(Mutex::new(Slot::default()));
        let (inner, thread_slot, landed) = (self.inner.clone(), slot.clone(), self.landed.clone());
        // Started on creation, like an aio submission: the device has the write from here on.
        std::thread::spawn(move || {
            std::thread::sleep(LATE_DELAY);
            let result = block_on(inner.write(offset, buf, flags, priority));
            assert!(result.0.is_ok(), "the late write failed: {:?}", result.0);
            landed.fetch_add(1, Ordering::SeqCst);
            let waker = {
                let mut slot = thread_slot.lock();
                slot.result = Some(result);
                slot.waker.take()
            };
            waker.into_iter().for_each(Waker::wake);
        });
        IoFuture::boxed(std::future::poll_fn(move |cx| {
            let mut slot = slot.lock();
            match slot.result.take() {
                Some(result) => Poll::Ready(result),
                None => {
                    slot.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        }))
    }
    fn flush(&self, priority: IoPriority) -> IoFuture<tandem::Result<()>> {
        self.inner.flush(priority)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        length_bytes: u64,
        may_unmap: bool,
        priority: IoPriority,
    ) -> IoFuture<tandem::Result<()>> {
        self.inner.write_zeroes(offset, length_bytes, may_unmap, priority)
    }
    fn discard(&self, offset: u64, length_bytes: u64, priority: IoPriority) -> IoFuture<tandem::Result<()>> {
        self.inner.discard(offset, length_bytes, priority)
    }
    fn block_status(&self, offset: u64, length_bytes: u64) -> IoFuture<tandem::Result<Extent>> {
        self.inner.block_status(offset, length_bytes)
    }
}
