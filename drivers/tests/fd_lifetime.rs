//! I/O never reaches the wrong file: operations queued on a core when their driver is dropped
//! keep the file's descriptor open until the kernel is done, so a file opened meanwhile (which
//! would take the lowest free descriptor number) is never read or written in its place.
//!
//! One test in its own binary: nothing else in the process opens files while it runs, so a
//! descriptor closed too early would really be reused by the next open.

mod common;

use common::{pattern, runtime, scratch_dir};
use std::sync::mpsc;
use tandem::block::{BlockDriver, WriteFlags};
use tandem::buf::AlignedBuf;
use tandem::reactor::{block_on, BackendChoice};
use tandem::IoPriority;
use tandem_drivers::{FileDriver, FileOptions};

const FILE_BYTES: usize = 64 << 10;

fn dropped_driver_never_reaches_the_next_file(backend: BackendChoice) {
    let dir = scratch_dir();
    let (a_path, b_path) = (dir.path().join("a.img"), dir.path().join("b.img"));
    let (a_bytes, b_bytes) = (pattern(FILE_BYTES, 1).as_slice().to_vec(), pattern(FILE_BYTES, 2).as_slice().to_vec());
    std::fs::write(&a_path, &a_bytes).unwrap();
    std::fs::write(&b_path, &b_bytes).unwrap();
    let runtime = runtime(backend, 1);
    let driver = FileDriver::open(&runtime.handle(), &a_path, &FileOptions::default()).unwrap();
    assert!(driver.is_direct(), "target/tmp must take O_DIRECT");

    // Hold the only core, so the operations below wait in its inbox, not yet submitted.
    // (Blocking a task's thread is what a test may do and an engine never would.)
    let (held_tx, held_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let holder = runtime.spawn(move || async move {
        held_tx.send(()).unwrap();
        release_rx.recv().unwrap();
    });
    held_rx.recv().unwrap();
    let read = driver.read(0, AlignedBuf::zeroed(4096, 4096).unwrap(), IoPriority::GUEST);
    let write = driver.write(8192, pattern(4096, 3), WriteFlags::default(), IoPriority::GUEST);
    drop(driver);
    // Takes the lowest free number: A's, had dropping the driver closed it.
    let b = std::fs::OpenOptions::new().read(true).write(true).open(&b_path).unwrap();
    release_tx.send(()).unwrap();
    holder.join().unwrap();

    let (read_result, buf) = block_on(read);
    let (write_result, _) = block_on(write);
    drop(b);
    // Never B's bytes, never B written. With the descriptor kept open both operations reach
    // A as asked (a typed error would also keep the promise; success is what holds here).
    if read_result.is_ok() {
        assert!(buf.as_slice() == &a_bytes[..4096], "{backend:?}: the read returned bytes that are not A's");
    }
    assert!(std::fs::read(&b_path).unwrap() == b_bytes, "{backend:?}: B was written through A's queued write");
    read_result.unwrap_or_else(|e| panic!("{backend:?}: read: {e}"));
    write_result.unwrap_or_else(|e| panic!("{backend:?}: write: {e}"));
    let a_now = std::fs::read(&a_path).unwrap();
    assert!(a_now[8192..12288] == *pattern(4096, 3).as_slice(), "{backend:?}: A lacks the queued write");
}

#[test]
fn operations_queued_when_their_driver_is_dropped_never_reach_another_file() {
    for backend in [BackendChoice::Uring, BackendChoice::Threads] {
        dropped_driver_never_reaches_the_next_file(backend);
    }
}
