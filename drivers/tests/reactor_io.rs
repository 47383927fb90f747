//! The reactor under real file I/O: futures dropped mid-flight, shutdown with I/O in the
//! kernel, and the automatic fallback to the thread pool when io_uring is refused.

mod common;

use common::{pattern, runtime, scratch_dir};
use std::future::Future;
use std::os::unix::process::CommandExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use tandem::block::{Disk, WriteFlags};
use tandem::buf::AlignedBuf;
use tandem::reactor::{yield_now, BackendChoice, BackendKind, Config, Runtime};
use tandem::IoPriority;
use tandem_drivers::{FileDriver, FileOptions};

const DISK_BYTES: u64 = 64 << 20;

fn file_disk(runtime: &Runtime, dir: &tempfile::TempDir) -> Disk {
    let options = FileOptions { create_size_bytes: Some(DISK_BYTES), ..FileOptions::default() };
    let driver = FileDriver::open(&runtime.handle(), dir.path().join("disk.img"), &options)
        .expect("O_DIRECT file under target/tmp");
    let disk = Disk::new(Arc::new(driver));
    // Real data everywhere, so reads go to the device instead of being answered as holes.
    for chunk in 0..DISK_BYTES / (4 << 20) {
        let (result, _) =
            disk.write_blocking(chunk * (4 << 20), pattern(4 << 20, chunk), WriteFlags::default(), IoPriority::GUEST);
        result.unwrap();
    }
    disk
}

fn poll_once<F: Future + Unpin>(future: &mut F) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    matches!(Pin::new(future).poll(&mut cx), Poll::Ready(_))
}

/// Thousands of reads are started and their futures dropped while the kernel still owns the
/// buffers; the buffers must stay alive until each completion, and the disk must keep
/// working (and reading the right bytes) afterwards.
fn drop_in_flight_reads(backend: BackendChoice) {
    let dir = scratch_dir();
    let runtime = runtime(backend, 2);
    let disk = file_disk(&runtime, &dir);
    for core in 0..2 {
        let disk = disk.clone();
        let dropped = runtime.spawn_on(core, move || async move {
            let mut dropped = 0;
            for round in 0..8u64 {
                let mut futures: Vec<_> = (0..512u64)
                    .map(|i| {
                        let offset = ((round * 512 + i) * 65536) % DISK_BYTES;
                        disk.read(offset, AlignedBuf::zeroed(65536, 4096).unwrap(), IoPriority::GUEST)
                    })
                    .collect();
                yield_now().await; // the core submits the batch
                futures.iter_mut().take(8).for_each(|f| {
                    poll_once(f);
                });
                dropped += futures.len();
                drop(futures); // most still in flight
            }
            dropped
        });
        assert_eq!(dropped.join().unwrap(), 8 * 512);
    }
    // Off the reactor too: the request crosses an inbox, then is abandoned.
    for i in 0..1024u64 {
        let mut future = disk.read((i * 4096) % DISK_BYTES, AlignedBuf::zeroed(4096, 4096).unwrap(), IoPriority::GUEST);
        poll_once(&mut future);
    }
    let (result, buf) = disk.read_blocking(4 << 20, AlignedBuf::zeroed(4 << 20, 4096).unwrap(), IoPriority::GUEST);
    result.unwrap();
    assert_eq!(buf.as_slice(), pattern(4 << 20, 1).as_slice(), "data read after the storm");
}

#[test]
fn dropped_in_flight_reads_uring() {
    drop_in_flight_reads(BackendChoice::Uring);
}

#[test]
fn dropped_in_flight_reads_threads() {
    drop_in_flight_reads(BackendChoice::Threads);
}

/// Dropping the runtime while tasks keep I/O in flight drains the kernel's operations first;
/// the unfinished tasks report that the runtime stopped.
#[test]
fn shutdown_drains_in_flight_io() {
    let dir = scratch_dir();
    let runtime = runtime(BackendChoice::Uring, 2);
    let disk = file_disk(&runtime, &dir);
    let handles: Vec<_> = (0..32u64)
        .map(|task| {
            let disk = disk.clone();
            runtime.spawn(move || async move {
                let mut buf = AlignedBuf::zeroed(65536, 4096).unwrap();
                for i in 0u64.. {
                    let offset = ((task * 7919 + i) * 65536) % DISK_BYTES;
                    let (result, back) = disk.read(offset, buf, IoPriority::GUEST).await;
                    result.unwrap();
                    buf = back;
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(50));
    drop(runtime);
    for handle in handles {
        assert_eq!(handle.join().unwrap_err(), tandem::Error::RuntimeStopped);
    }
    // After shutdown, new requests fail cleanly instead of hanging.
    let (result, _) = disk.read_blocking(0, AlignedBuf::zeroed(4096, 4096).unwrap(), IoPriority::GUEST);
    assert_eq!(result.unwrap_err(), tandem::Error::RuntimeStopped);
}

const CHILD_ENV: &str = "TANDEM_TEST_SECCOMP_CHILD";

/// The child half of `refused_io_uring_falls_back_to_threads`: runs under a seccomp filter
/// that answers io_uring_setup with EPERM, as container runtimes do.
#[test]
fn fallback_child() {
    let refused = std::env::var_os(CHILD_ENV).is_some();
    let runtime = Runtime::new(Config { cores: 1, pin: false, ..Config::default() }).unwrap();
    match refused {
        true => assert_eq!(runtime.backend(), BackendKind::Threads),
        false => assert!(matches!(runtime.backend(), BackendKind::Uring(_) | BackendKind::Threads)),
    }
    let dir = scratch_dir();
    let disk = file_disk(&runtime, &dir);
    let (result, buf) = disk.read_blocking(0, AlignedBuf::zeroed(65536, 4096).unwrap(), IoPriority::GUEST);
    result.unwrap();
    assert_eq!(buf.as_slice(), &pattern(4 << 20, 0).as_slice()[..65536]);
}

#[test]
fn refused_io_uring_falls_back_to_threads() {
    let exe = std::env::current_exe().unwrap();
    let mut command = std::process::Command::new(exe);
    command
        .args(["--exact", "fallback_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env_remove("TANDEM_IO_BACKEND");
    // SAFETY: pre_exec runs in the forked child before exec; it only makes syscalls.
    unsafe { command.pre_exec(deny_io_uring_setup) };
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "the child test ran:\n{stdout}");
    let lines: Vec<_> = stderr.lines().filter(|l| l.contains("io_uring unavailable")).collect();
    assert_eq!(lines.len(), 1, "exactly one clear log line:\n{stderr}");
    assert!(lines[0].contains("thread-pool backend") && lines[0].contains("Operation not permitted"), "{}", lines[0]);
}

/// A seccomp filter: io_uring_setup fails with EPERM, everything else is allowed.
fn deny_io_uring_setup() -> std::io::Result<()> {
    const SYSCALL_NR_OFFSET: u32 = 0;
    let filter = [
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: SYSCALL_NR_OFFSET,
        },
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: libc::SYS_io_uring_setup as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter { code: (libc::BPF_RET | libc::BPF_K) as u16, jt: 0, jf: 0, k: libc::SECCOMP_RET_ALLOW },
    ];
    let program = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut _ };
    // SAFETY: plain prctl calls; `program` outlives them.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &program as *const _, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A file in RAM (tmpfs) is served inline, and still round-trips data and reports short
/// transfers; a file on the real filesystem is not taken for one.
#[test]
fn tmpfs_files_are_served_inline_and_round_trip() {
    let shm = std::path::Path::new("/dev/shm");
    assert!(shm.is_dir(), "this test needs /dev/shm (tmpfs), present on every Linux machine we run on");
    let ram_dir = tempfile::Builder::new().prefix("tandem-test-").tempdir_in(shm).unwrap();
    let runtime = runtime(BackendChoice::Auto, 1);
    let options = FileOptions { allow_buffered: true, create_size_bytes: Some(1 << 20), ..FileOptions::default() };
    let driver = Arc::new(FileDriver::open(&runtime.handle(), ram_dir.path().join("ram.img"), &options).unwrap());
    assert!(driver.is_in_memory());
    assert!(!driver.is_mapped(), "a sparse file is never mapped: touching a hole of a full tmpfs raises SIGBUS");
    let disk = Disk::new(driver);
    let data = pattern(8192, 9);
    let (result, _) = disk.write_blocking(4096, data, WriteFlags { fua: true }, IoPriority::GUEST);
    result.unwrap();
    let (result, back) = disk.read_blocking(4096, AlignedBuf::zeroed(8192, 4096).unwrap(), IoPriority::GUEST);
    result.unwrap();
    assert_eq!(back.as_slice(), pattern(8192, 9).as_slice());
    let on_disk_dir = scratch_dir();
    let on_disk = FileDriver::open(&runtime.handle(), on_disk_dir.path().join("d.img"), &options).unwrap();
    assert!(!on_disk.is_in_memory(), "{} is not in RAM", on_disk_dir.path().display());
}

#[test]
fn fully_allocated_tmpfs_files_are_mapped_and_keep_their_pages() {
    let shm = std::path::Path::new("/dev/shm");
    assert!(shm.is_dir(), "this test needs /dev/shm (tmpfs), present on every Linux machine we run on");
    let ram_dir = tempfile::Builder::new().prefix("tandem-test-").tempdir_in(shm).unwrap();
    let path = ram_dir.path().join("ram.img");
    let size_bytes: u64 = 4 << 20; // more than one step of a mapped write_zeroes
    let file = std::fs::File::create(&path).unwrap();
    // SAFETY: fallocate on a file we just created.
    assert_eq!(unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, size_bytes as i64) }, 0);
    let allocated_bytes = || std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap()) * 512;
    assert!(allocated_bytes() >= size_bytes);
    let runtime = runtime(BackendChoice::Auto, 1);
    let options = FileOptions { allow_buffered: true, ..FileOptions::default() };
    let read_only = FileOptions { read_only: true, ..options.clone() };
    let reader = FileDriver::open(&runtime.handle(), &path, &read_only).unwrap();
    assert!(!reader.is_mapped(), "a read-only open cannot fallocate the file, so it is never mapped");
    let driver = Arc::new(FileDriver::open(&runtime.handle(), &path, &options).unwrap());
    assert!(driver.is_mapped());
    let disk = Disk::new(driver);
    let (result, _) = disk.write_blocking(4096, pattern(16384, 3), WriteFlags { fua: true }, IoPriority::GUEST);
    result.unwrap();
    let (result, back) = disk.read_blocking(4096, AlignedBuf::zeroed(16384, 4096).unwrap(), IoPriority::GUEST);
    result.unwrap();
    assert_eq!(back.as_slice(), pattern(16384, 3).as_slice());
    let on_file = std::fs::read(&path).unwrap();
    assert_eq!(&on_file[4096..20480], pattern(16384, 3).as_slice(), "other readers see the writes");
    disk.write_zeroes_blocking(4096, 8192, true, IoPriority::GUEST).unwrap();
    disk.write_zeroes_blocking(0, size_bytes - 8192, true, IoPriority::GUEST).unwrap(); // in steps
    disk.discard_blocking(0, size_bytes, IoPriority::GUEST).unwrap();
    let on_file = std::fs::read(&path).unwrap();
    assert!(on_file[..(size_bytes - 8192) as usize].iter().all(|&b| b == 0));
    assert_eq!(&on_file[(size_bytes - 8192) as usize..], &[0u8; 8192][..], "never written");
    assert!(allocated_bytes() >= size_bytes, "zeroing and discarding keep every page allocated");
    let (result, _) = disk.read_blocking(size_bytes - 4096, AlignedBuf::zeroed(8192, 4096).unwrap(), IoPriority::GUEST);
    assert!(result.is_err(), "past the end is refused");
}
