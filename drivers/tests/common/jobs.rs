//! What the job tests share: images of random data, `qemu-img compare` as the arbiter, and a
//! guest of several tasks on two cores writing random pieces of the disk while a job runs.
//!
//! The guest's writers each own a stripe of the disk and write it one request at a time, so a
//! model of what the guest wrote is exact.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem::block::{BlockDriver, Disk, WriteFlags};
use tandem::buf::AlignedBuf;
use tandem::reactor::Runtime;
use tandem::IoPriority;
use tandem_drivers::{FileDriver, FileOptions};

pub const DISK_BYTES: u64 = 16 << 20;
pub const WRITER_COUNT: u64 = 4;
pub const STRIPE_BYTES: u64 = DISK_BYTES / WRITER_COUNT;
pub const WAIT: Duration = Duration::from_secs(120);

pub fn open(runtime: &Runtime, path: &Path) -> Arc<dyn BlockDriver> {
    let driver = FileDriver::open(&runtime.handle(), path, &FileOptions::default())
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    assert!(driver.is_direct(), "{} must be opened with O_DIRECT (is target/ on tmpfs?)", path.display());
    Arc::new(driver)
}

pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        bytes.extend_from_slice(&tandem::rng::next(&mut state).to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// What the source holds before the job: `Dense` random data, or `Sparse` (data in every
/// other MiB, holes between).
#[derive(Clone, Copy, PartialEq)]
pub enum Layout {
    Dense,
    Sparse,
}

pub fn write_image(path: &Path, layout: Layout, seed: u64) -> Vec<u8> {
    let data = random_bytes(DISK_BYTES as usize, seed);
    match layout {
        Layout::Dense => {
            std::fs::write(path, &data).unwrap();
            data
        }
        Layout::Sparse => {
            use std::os::unix::fs::FileExt;
            let file = std::fs::File::create(path).unwrap();
            file.set_len(DISK_BYTES).unwrap();
            let mut model = vec![0u8; DISK_BYTES as usize];
            for mib in (0..DISK_BYTES >> 20).step_by(2) {
                let range = (mib << 20) as usize..((mib + 1) << 20) as usize;
                file.write_all_at(&data[range.clone()], mib << 20).unwrap();
                model[range.clone()].copy_from_slice(&data[range]);
            }
            model
        }
    }
}

pub fn qemu_img_identical(a: &Path, b: &Path) -> bool {
    let output = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .expect("qemu-img must be installed");
    match output.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("qemu-img compare failed: {}", String::from_utf8_lossy(&output.stderr)),
    }
}

/// The guest: `WRITER_COUNT` tasks, each writing random 4-64 KiB pieces of its own stripe one
/// at a time until stopped, keeping its stripe of the model up to date.
pub struct Guest {
    stop: Arc<AtomicBool>,
    write_count: Arc<AtomicU64>,
    writers: Vec<tandem::reactor::JoinHandle<Vec<u8>>>,
}

impl Guest {
    pub fn start(runtime: &Runtime, disk: &Disk, model: &[u8], seed: u64) -> Guest {
        let stop = Arc::new(AtomicBool::new(false));
        let write_count = Arc::new(AtomicU64::new(0));
        let writers = (0..WRITER_COUNT)
            .map(|index| {
                let stripe = model[(index * STRIPE_BYTES) as usize..((index + 1) * STRIPE_BYTES) as usize].to_vec();
                let (disk, stop, write_count) = (disk.clone(), stop.clone(), write_count.clone());
                runtime.spawn_on(index as usize, move || writer(disk, index, stripe, stop, write_count, seed + index))
            })
            .collect();
        Guest { stop, write_count, writers }
    }

    pub fn writes(&self) -> u64 {
        self.write_count.load(Ordering::Relaxed)
    }

    /// Block until the guest has done `count` more writes.
    pub fn wait_writes(&self, count: u64) {
        let target = self.writes() + count;
        let deadline = std::time::Instant::now() + WAIT;
        while self.writes() < target {
            assert!(std::time::Instant::now() < deadline, "the guest stopped writing");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stop the writers; the model of the whole disk.
    pub fn stop(mut self) -> Vec<u8> {
        self.stop.store(true, Ordering::Relaxed);
        let writers = std::mem::take(&mut self.writers);
        writers.into_iter().flat_map(|writer| writer.join().expect("writer task")).collect()
    }
}

impl Drop for Guest {
    /// A failed assertion must not leave writers running forever.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

pub async fn writer(
    disk: Disk,
    index: u64,
    mut stripe: Vec<u8>,
    stop: Arc<AtomicBool>,
    write_count: Arc<AtomicU64>,
    seed: u64,
) -> Vec<u8> {
    let mut state = seed;
    while !stop.load(Ordering::Relaxed) {
        let length = 4096 * (1 + tandem::rng::below(&mut state, 16));
        let within = 4096 * tandem::rng::below(&mut state, (STRIPE_BYTES - length) / 4096 + 1);
        let data = random_bytes(length as usize, tandem::rng::next(&mut state));
        let buf = AlignedBuf::from_slice(&data, 4096).unwrap();
        let (result, _) =
            disk.write(index * STRIPE_BYTES + within, buf, WriteFlags::default(), IoPriority::GUEST).await;
        result.expect("guest write");
        stripe[within as usize..(within + length) as usize].copy_from_slice(&data);
        write_count.fetch_add(1, Ordering::Relaxed);
        // Paced, so background mode can catch up and reach READY.
        tandem::reactor::sleep(Duration::from_micros(500)).await;
    }
    stripe
}

/// The allocated (data) ranges of a file, from SEEK_DATA / SEEK_HOLE.
pub fn allocated_ranges(path: &Path) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let mut ranges = Vec::new();
    let mut at: i64 = 0;
    loop {
        // SAFETY: lseek on an fd we own.
        let data = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        ranges.push((data as u64, hole as u64));
        at = hole;
    }
    ranges
}

/// Write an incremental backup's data (its allocated ranges) over a restored image.
pub fn replay(incremental: &Path, restored: &Path) {
    use std::os::unix::fs::FileExt;
    let (from, to) =
        (std::fs::File::open(incremental).unwrap(), std::fs::OpenOptions::new().write(true).open(restored).unwrap());
    for (start, end) in allocated_ranges(incremental) {
        let mut data = vec![0u8; (end - start) as usize];
        from.read_exact_at(&mut data, start).unwrap();
        to.write_all_at(&data, start).unwrap();
    }
}
