//! One conformance suite, run against every driver on both I/O backends (crosvm style: a
//! driver or backend that is added gets the whole suite, and a driver-specific bug shows up as
//! one failing row).

mod common;

use common::{pattern, runtime, scratch_dir};
use std::sync::Arc;
use tandem::block::{BlockDriver, BlockStatus, Disk, WriteFlags};
use tandem::buf::AlignedBuf;
use tandem::error::AlignedPart;
use tandem::reactor::{BackendChoice, Runtime};
use tandem::{Error, IoPriority};
use tandem_drivers::{FaultyDriver, FileDriver, FileOptions, MemoryDriver, NullDriver};

const DISK_BYTES: u64 = 16 << 20;
const G: IoPriority = IoPriority::GUEST;

/// A driver under test, the runtime it submits through, and what it promises.
struct Subject {
    disk: Disk,
    runtime: Runtime,
    stores_data: bool,
    /// block_status tells holes from data to the byte range written. rbd knows only which
    /// objects exist (4 MiB by default) and how far each reaches, so it may say data over
    /// zeros or holes in an object that holds data, never the reverse.
    status_exact: bool,
    /// A block device has no holes: block_status says data everywhere, also after a discard.
    status_all_data: bool,
    _loop: Option<common::LoopDevice>,
    _dir: Option<tempfile::TempDir>,
    _image: Option<common::ScratchImage>,
    /// Dropped after the disk: the server outlives its client.
    _server: Option<common::nbd::NbdServer>,
    _tandem_server: Option<common::nbd::TandemServer>,
}

fn subject(driver: &str, backend: BackendChoice) -> Subject {
    let runtime = runtime(backend, 2);
    let mut dir = None;
    let mut image = None;
    let mut loop_device = None;
    let mut server = None;
    let mut tandem_server = None;
    let (inner, stores_data): (Arc<dyn BlockDriver>, bool) = match driver {
        "file" => {
            let scratch = scratch_dir();
            let options = FileOptions { create_size_bytes: Some(DISK_BYTES), ..FileOptions::default() };
            let file = FileDriver::open(&runtime.handle(), scratch.path().join("disk.img"), &options)
                .unwrap_or_else(|e| panic!("the tests need O_DIRECT on target/tmp: {e}"));
            assert!(file.is_direct());
            dir = Some(scratch);
            (Arc::new(file), true)
        }
        "loop" => {
            // A block device through the same driver: BLKGETSIZE64, fallocate on the device.
            let scratch = scratch_dir();
            let device = common::LoopDevice::new(scratch.path(), DISK_BYTES);
            let file = FileDriver::open(&runtime.handle(), &device.device, &FileOptions::default())
                .unwrap_or_else(|e| panic!("opening {}: {e}", device.device.display()));
            assert!(file.is_direct() && !file.is_in_memory(), "a block device goes through the ring with O_DIRECT");
            assert_eq!(file.size_bytes(), DISK_BYTES, "the size comes from the device");
            (loop_device, dir) = (Some(device), Some(scratch));
            (Arc::new(file), true)
        }
        "memory" => (Arc::new(MemoryDriver::new(DISK_BYTES)), true),
        "null" => (Arc::new(NullDriver::new(DISK_BYTES)), false),
        "rbd" => {
            let scratch = common::ScratchImage::new(DISK_BYTES);
            let driver = scratch.open();
            image = Some(scratch);
            (Arc::new(driver), true)
        }
        "faulty" => (Arc::new(FaultyDriver::new(Arc::new(MemoryDriver::new(DISK_BYTES)), 7, true)), true),
        "nbd-qemu" | "nbd-nbdkit" => {
            let nbd = match driver {
                "nbd-qemu" => common::nbd::NbdServer::qemu(DISK_BYTES),
                _ => common::nbd::NbdServer::nbdkit(&["memory", "16M"]),
            };
            // Two connections where the server allows them (nbdkit): the suite's concurrent
            // checks then spread over both.
            let config = tandem_drivers::nbd::NbdConfig { connections: 2, ..Default::default() };
            let client = tandem_drivers::nbd::open_uri(&runtime.handle(), &nbd.uri(), &config)
                .unwrap_or_else(|e| panic!("opening {}: {e}", nbd.uri()));
            server = Some(nbd);
            (Arc::new(client), true)
        }
        "nbd-tandem" => {
            let ours = common::nbd::TandemServer::new(DISK_BYTES);
            let config = tandem_drivers::nbd::NbdConfig { connections: 2, ..Default::default() };
            let client = tandem_drivers::nbd::open_uri(&runtime.handle(), &ours.uri(), &config)
                .unwrap_or_else(|e| panic!("opening {}: {e}", ours.uri()));
            tandem_server = Some(ours);
            (Arc::new(client), true)
        }
        _ => unreachable!("unknown driver {driver}"),
    };
    // nbdkit's memory plugin keeps 32 KiB pages: a page partly zeroed stays data.
    let status_exact = !["rbd", "loop", "nbd-nbdkit"].contains(&driver);
    let status_all_data = driver == "loop";
    Subject {
        disk: Disk::new(inner),
        runtime,
        stores_data,
        status_exact,
        status_all_data,
        _loop: loop_device,
        _dir: dir,
        _image: image,
        _server: server,
        _tandem_server: tandem_server,
    }
}

/// Instantiate every check for every (driver, backend) pair.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod uring { $( #[test] fn $check() { super::each_driver(tandem::reactor::BackendChoice::Uring, super::$check); } )* }
        mod threads { $( #[test] fn $check() { super::each_driver(tandem::reactor::BackendChoice::Threads, super::$check); } )* }
    };
}

conformance!(
    write_then_read_back,
    fua_write_and_flush,
    write_zeroes_reads_zero,
    discard_then_status,
    block_status_tells_data_from_holes,
    bad_requests_are_refused_and_change_nothing,
    many_tasks_on_every_core,
    core_pool_buffers_round_trip,
);

fn each_driver(backend: BackendChoice, check: fn(&Subject)) {
    // TANDEM_TEST_DRIVERS=nbd-qemu,nbd-nbdkit runs only the rows named (a focused run).
    let only = std::env::var("TANDEM_TEST_DRIVERS").ok();
    let drivers = ["file", "loop", "memory", "null", "faulty", "rbd", "nbd-qemu", "nbd-nbdkit", "nbd-tandem"];
    for driver in drivers.into_iter().filter(|d| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == *d))) {
        let s = subject(driver, backend);
        eprintln!("{driver} on {:?}", s.runtime.backend());
        check(&s);
    }
}

fn read(s: &Subject, offset: u64, len: usize) -> AlignedBuf {
    let (result, buf) = s.disk.read_blocking(offset, AlignedBuf::zeroed(len, 4096).unwrap(), G);
    result.unwrap_or_else(|e| panic!("{}: read {offset}+{len}: {e}", s.disk.name()));
    buf
}

fn write(s: &Subject, offset: u64, buf: AlignedBuf) {
    let (result, _) = s.disk.write_blocking(offset, buf, WriteFlags::default(), G);
    result.unwrap_or_else(|e| panic!("{}: write at {offset}: {e}", s.disk.name()));
}

fn write_then_read_back(s: &Subject) {
    let cases = [(0u64, 4096usize), (4096, 65536), (DISK_BYTES - 8192, 8192), (1 << 20, 1 << 20)];
    for (i, (offset, len)) in cases.into_iter().enumerate() {
        let data = pattern(len, i as u64);
        let expected = data.as_slice().to_vec();
        write(s, offset, data);
        let got = read(s, offset, len);
        if s.stores_data {
            assert!(got.as_slice() == &expected[..], "{}: data at {offset} differs", s.disk.name());
        }
    }
}

fn fua_write_and_flush(s: &Subject) {
    let data = pattern(8192, 99);
    let expected = data.as_slice().to_vec();
    let (result, buf) = s.disk.write_blocking(65536, data, WriteFlags { fua: true }, G);
    result.unwrap();
    assert_eq!(buf.len(), 8192, "the buffer comes back");
    s.disk.flush_blocking(G).unwrap();
    if s.stores_data {
        assert_eq!(read(s, 65536, 8192).as_slice(), &expected[..]);
    }
}

fn write_zeroes_reads_zero(s: &Subject) {
    for may_unmap in [false, true] {
        write(s, 1 << 20, pattern(1 << 20, 5));
        s.disk.write_zeroes_blocking((1 << 20) + 4096, 65536, may_unmap, G).unwrap();
        if !s.stores_data {
            continue;
        }
        assert!(read(s, (1 << 20) + 4096, 65536).is_all_zero(), "{} may_unmap={may_unmap}", s.disk.name());
        assert!(!read(s, 1 << 20, 4096).is_all_zero(), "bytes before the range are kept");
        assert!(!read(s, (1 << 20) + 4096 + 65536, 4096).is_all_zero(), "bytes after the range are kept");
        if may_unmap && s.status_exact {
            let extent = s.disk.block_status_blocking((1 << 20) + 4096, 65536).unwrap();
            assert_ne!(extent.status, BlockStatus::Data, "{}: unmapped zeros report as data", s.disk.name());
        }
    }
}

fn discard_then_status(s: &Subject) {
    write(s, 2 << 20, pattern(1 << 20, 6));
    s.disk.discard_blocking(2 << 20, 1 << 20, G).unwrap();
    let extent = s.disk.block_status_blocking(2 << 20, 1 << 20).unwrap();
    assert_eq!(extent.offset, 2 << 20);
    assert!(extent.length_bytes > 0 && extent.length_bytes <= 1 << 20);
    if s.status_all_data {
        assert_eq!((extent.status, extent.length_bytes), (BlockStatus::Data, 1 << 20), "{}", s.disk.name());
    } else if s.stores_data {
        assert_eq!(extent.status, BlockStatus::Hole, "{}: discarded range", s.disk.name());
    }
}

fn block_status_tells_data_from_holes(s: &Subject) {
    let start = 8u64 << 20;
    let extent = s.disk.block_status_blocking(start, 4 << 20).unwrap();
    assert_eq!(extent.offset, start);
    if s.status_all_data {
        assert_eq!((extent.status, extent.length_bytes), (BlockStatus::Data, 4 << 20), "{}", s.disk.name());
        return;
    }
    if !s.stores_data {
        return;
    }
    assert_eq!(extent.status, BlockStatus::Hole, "{}: never written", s.disk.name());
    assert_eq!(extent.length_bytes, 4 << 20);
    write(s, start + (1 << 20), pattern(65536, 8));
    let first = s.disk.block_status_blocking(start, 4 << 20).unwrap();
    let data = s.disk.block_status_blocking(start + (1 << 20), (4 << 20) - (1 << 20)).unwrap();
    assert_eq!(data.status, BlockStatus::Data);
    if s.status_exact {
        assert_eq!((first.status, first.length_bytes), (BlockStatus::Hole, 1 << 20));
        assert!(data.length_bytes >= 65536 && data.length_bytes < 3 << 20, "data run {}", data.length_bytes);
    } else {
        // Coarse, never wrong: a hole may not reach the written bytes, data must cover them.
        assert!(first.status == BlockStatus::Data || first.length_bytes <= 1 << 20, "{first:?}");
        assert!(data.length_bytes >= 65536, "data run {}", data.length_bytes);
    }
}

fn bad_requests_are_refused_and_change_nothing(s: &Subject) {
    let before = pattern(8192, 42);
    let expected = before.as_slice().to_vec();
    write(s, 0, before);
    let align = s.disk.alignment().request_bytes;
    type Expected = Box<dyn Fn(&Error) -> bool>;
    let attempts: Vec<(u64, usize, Expected)> = vec![
        (DISK_BYTES, 4096, Box::new(|e| matches!(e, Error::OutOfBounds { offset: DISK_BYTES, .. }))),
        (DISK_BYTES - 4096, 8192, Box::new(|e| matches!(e, Error::OutOfBounds { .. }))),
        (u64::MAX - 4095, 8192, Box::new(|e| matches!(e, Error::Overflow { .. }))),
        (0, 0, Box::new(|e| matches!(e, Error::EmptyRequest { offset: 0 }))),
    ];
    for (offset, len, is_expected) in attempts {
        let (result, _) = s.disk.write_blocking(offset, pattern(len, 1), WriteFlags::default(), G);
        let err = result.expect_err("bad write accepted");
        assert!(is_expected(&err), "{}: write {offset}+{len}: unexpected {err}", s.disk.name());
    }
    if align > 1 {
        let (result, _) = s.disk.write_blocking(align / 2, pattern(4096, 1), WriteFlags::default(), G);
        assert_eq!(
            result.unwrap_err(),
            Error::Misaligned { part: AlignedPart::Offset, value: align / 2, align_bytes: align }
        );
        let err = s.disk.write_zeroes_blocking(0, align + align / 2, false, G).unwrap_err();
        assert!(matches!(err, Error::Misaligned { part: AlignedPart::Length, .. }), "{err}");
    }
    let err = s.disk.discard_blocking(DISK_BYTES, 4096, G).unwrap_err();
    assert!(err.to_string().contains(&DISK_BYTES.to_string()), "{err}");
    if s.stores_data {
        assert_eq!(read(s, 0, 8192).as_slice(), &expected[..], "{}: a refused request changed data", s.disk.name());
    }
}

/// Tasks on both cores write disjoint regions concurrently, then every region reads back.
fn many_tasks_on_every_core(s: &Subject) {
    const TASKS: u64 = 16;
    const WRITES: u64 = 32;
    let region_bytes = DISK_BYTES / TASKS;
    let handles: Vec<_> = (0..TASKS)
        .map(|task| {
            let disk = s.disk.clone();
            s.runtime.spawn(move || async move {
                for i in 0..WRITES {
                    let offset = task * region_bytes + i * 8192;
                    let (result, _) =
                        disk.write(offset, pattern(8192, task * 1000 + i), WriteFlags::default(), G).await;
                    result.unwrap();
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
    if !s.stores_data {
        return;
    }
    for task in 0..TASKS {
        for i in 0..WRITES {
            let offset = task * region_bytes + i * 8192;
            let got = read(s, offset, 8192);
            assert_eq!(got.as_slice(), pattern(8192, task * 1000 + i).as_slice(), "task {task} write {i}");
        }
    }
}

/// Buffers from a core's pool are registered with its ring (READ_FIXED/WRITE_FIXED on the
/// uring backend); data must round-trip exactly as with plain buffers, on every core.
fn core_pool_buffers_round_trip(s: &Subject) {
    for core in 0..2u64 {
        let disk = s.disk.clone();
        let stores_data = s.stores_data;
        let roundtrip = s.runtime.spawn_on(core as usize, move || async move {
            let pool = tandem::reactor::current_buf_pool().expect("on a core");
            let mut out = pool.get(65536).unwrap();
            let fixed = out.fixed_key().is_some();
            out.as_mut_slice().copy_from_slice(pattern(65536, 77 + core).as_slice());
            let offset = (4 << 20) + core * 65536;
            let (written, _) = disk.write(offset, out, WriteFlags::default(), G).await;
            written.unwrap();
            let (read, back) = disk.read(offset, pool.get(65536).unwrap(), G).await;
            read.unwrap();
            (fixed, !stores_data || back.as_slice() == pattern(65536, 77 + core).as_slice())
        });
        let (fixed, same) = roundtrip.join().unwrap();
        assert!(same, "{}: pool buffer data on core {core}", s.disk.name());
        let uring = matches!(s.runtime.backend(), tandem::reactor::BackendKind::Uring(_));
        assert_eq!(fixed, uring, "pool buffers are registered exactly when the ring is io_uring");
    }
}
