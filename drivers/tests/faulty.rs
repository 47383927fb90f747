//! The faulty driver: each trigger and fault, replayable from a seed, and the crash model
//! (unflushed writes vanish, flushed and FUA writes stay).

mod common;

use common::{pattern, runtime};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::block::{BlockDriver, Disk, WriteFlags};
use tandem::buf::AlignedBuf;
use tandem::reactor::BackendChoice;
use tandem::{Error, IoPriority};
use tandem_drivers::{Fault, FaultRule, FaultyDriver, MemoryDriver, OpMask, Trigger};

const DISK_BYTES: u64 = 4 << 20;
const G: IoPriority = IoPriority::GUEST;

fn faulty(seed: u64, track: bool) -> (Arc<FaultyDriver>, Disk) {
    let driver = Arc::new(FaultyDriver::new(Arc::new(MemoryDriver::new(DISK_BYTES)), seed, track));
    let disk = Disk::new(driver.clone() as Arc<dyn BlockDriver>);
    (driver, disk)
}

fn write(disk: &Disk, offset: u64, seed: u64, fua: bool) -> tandem::Result<()> {
    disk.write_blocking(offset, pattern(4096, seed), WriteFlags { fua }, G).0
}

fn read(disk: &Disk, offset: u64) -> tandem::Result<AlignedBuf> {
    let (result, buf) = disk.read_blocking(offset, AlignedBuf::zeroed(4096, 4096).unwrap(), G);
    result.map(|()| buf)
}

#[test]
fn errno_by_offset_range_only_hits_the_range() {
    let (driver, disk) = faulty(1, false);
    let rule = FaultRule {
        ops: OpMask::WRITE,
        trigger: Trigger::Range { offset: 65536, length_bytes: 8192 },
        fault: Fault::Errno(libc::EIO),
        fire_count_max: None,
    };
    driver.add_rule(rule);
    assert_eq!(write(&disk, 65536 + 4096, 1, false), Err(Error::Injected { errno: libc::EIO }));
    assert!(write(&disk, 65536 + 8192, 1, false).is_ok(), "just past the range");
    assert!(write(&disk, 0, 1, false).is_ok());
    assert!(read(&disk, 65536).is_ok(), "reads are not in the mask");
    assert_eq!(driver.fired_count(0), 1);
    driver.clear_rules();
    assert!(write(&disk, 65536, 1, false).is_ok(), "repaired");
}

#[test]
fn nth_operation_and_fire_limit() {
    let (driver, disk) = faulty(1, false);
    driver.add_rule(FaultRule {
        ops: OpMask::ALL,
        trigger: Trigger::Nth(3),
        fault: Fault::Errno(libc::ENOSPC),
        fire_count_max: None,
    });
    assert!(write(&disk, 0, 1, false).is_ok());
    assert!(read(&disk, 0).is_ok());
    let err = write(&disk, 4096, 1, false).unwrap_err();
    assert!(err.is_no_space(), "{err}");
    assert!(write(&disk, 4096, 1, false).is_ok(), "only the third");
    driver.add_rule(FaultRule {
        ops: OpMask::FLUSH,
        trigger: Trigger::Always,
        fault: Fault::Errno(libc::EIO),
        fire_count_max: Some(2),
    });
    assert!(disk.flush_blocking(G).is_err());
    assert!(disk.flush_blocking(G).is_err());
    assert!(disk.flush_blocking(G).is_ok(), "fire_count_max bounds the rule");
}

/// The same seed and the same operations fail at the same places.
#[test]
fn probability_is_replayable_from_the_seed() {
    let outcomes = |seed| {
        let (driver, disk) = faulty(seed, false);
        driver.add_rule(FaultRule {
            ops: OpMask::READ,
            trigger: Trigger::Probability(0.3),
            fault: Fault::Errno(libc::EIO),
            fire_count_max: None,
        });
        (0..200).map(|i| read(&disk, (i % 64) * 4096).is_err()).collect::<Vec<_>>()
    };
    let first = outcomes(42);
    assert_eq!(first, outcomes(42));
    assert_ne!(first, outcomes(43));
    let failures = first.iter().filter(|f| **f).count();
    assert!((30..=90).contains(&failures), "about 30% of 200 fail, got {failures}");
}

#[test]
fn delay_holds_the_operation_then_runs_it() {
    let runtime = runtime(BackendChoice::Uring, 1);
    let (driver, disk) = faulty(1, false);
    driver.add_rule(FaultRule {
        ops: OpMask::WRITE,
        trigger: Trigger::Always,
        fault: Fault::Delay(Duration::from_millis(30)),
        fire_count_max: None,
    });
    let started = Instant::now();
    // On a core (the core's timers) and off it (the shared timer).
    let on_core = runtime.block_on({
        let disk = disk.clone();
        move || async move { disk.write(0, pattern(4096, 9), WriteFlags::default(), G).await.0 }
    });
    on_core.unwrap().unwrap();
    write(&disk, 4096, 10, false).unwrap();
    assert!(started.elapsed() >= Duration::from_millis(60), "both writes were held");
    assert_eq!(read(&disk, 0).unwrap().as_slice(), pattern(4096, 9).as_slice(), "then they ran");
}

#[test]
fn crash_drops_unflushed_writes_and_keeps_the_rest() {
    let (driver, disk) = faulty(1, true);
    write(&disk, 0, 1, false).unwrap();
    disk.flush_blocking(G).unwrap(); // durable
    write(&disk, 0, 2, false).unwrap(); // lost
    write(&disk, 4096, 3, true).unwrap(); // FUA: durable
    write(&disk, 8192, 4, false).unwrap(); // lost
    disk.write_zeroes_blocking(12288, 4096, false, G).unwrap(); // lost
    tandem::reactor::block_on(driver.crash()).unwrap();
    assert_eq!(read(&disk, 0).unwrap_err(), Error::Crashed, "a crashed disk answers nothing");
    driver.recover();
    assert_eq!(read(&disk, 0).unwrap().as_slice(), pattern(4096, 1).as_slice());
    assert_eq!(read(&disk, 4096).unwrap().as_slice(), pattern(4096, 3).as_slice());
    assert!(read(&disk, 8192).unwrap().is_all_zero(), "never flushed, never there");
    assert!(read(&disk, 12288).unwrap().is_all_zero());
}

#[test]
fn crash_rule_fires_on_the_nth_write() {
    let (driver, disk) = faulty(7, true);
    write(&disk, 0, 1, false).unwrap();
    driver.add_rule(FaultRule {
        ops: OpMask::WRITE,
        trigger: Trigger::Nth(2),
        fault: Fault::Crash,
        fire_count_max: None,
    });
    write(&disk, 4096, 2, false).unwrap(); // first matching write
    assert_eq!(write(&disk, 8192, 3, false), Err(Error::Crashed));
    assert!(driver.is_crashed());
    driver.clear_rules();
    driver.recover();
    assert!(read(&disk, 0).unwrap().is_all_zero(), "the unflushed first write is gone");
    assert!(read(&disk, 4096).unwrap().is_all_zero());
}

#[test]
fn flip_byte_corrupts_one_byte_silently_and_leaves_the_callers_buffer_alone() {
    let (driver, disk) = faulty(1, false);
    driver.add_rule(FaultRule {
        ops: OpMask::WRITE,
        trigger: Trigger::Range { offset: 8192 + 100, length_bytes: 1 },
        fault: Fault::FlipByte,
        fire_count_max: None,
    });
    let data = pattern(4096, 3);
    let (result, back) = disk.write_blocking(8192, data, WriteFlags::default(), G);
    assert!(result.is_ok(), "the write says it succeeded");
    assert_eq!(back.as_slice(), pattern(4096, 3).as_slice(), "the caller's buffer is unchanged");
    let stored = read(&disk, 8192).unwrap();
    let differing: Vec<usize> = (0..4096).filter(|&index| stored.as_slice()[index] != back.as_slice()[index]).collect();
    assert_eq!(differing, vec![100], "exactly the rule's byte");
    assert_eq!(stored.as_slice()[100], back.as_slice()[100] ^ 0xff);
    write(&disk, 0, 4, false).unwrap();
    assert_eq!(read(&disk, 0).unwrap().as_slice(), pattern(4096, 4).as_slice(), "outside the range: intact");
}
