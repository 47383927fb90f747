//! The bench never destroys what it did not create: files and block devices the user points it
//! at keep their bytes through read jobs. Loop devices (root, as the suite runs) stand
//! in for a user's disk. Behaviour only, never speed.

mod common;

use common::{pattern_bytes, tandem, LoopDevice, Scratch};
use std::path::Path;

const MIB: usize = 1 << 20;

/// A file of `len` seeded bytes; returns them.
fn patterned(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let bytes = pattern_bytes(len, seed);
    std::fs::write(path, &bytes).expect("writing a patterned file");
    bytes
}

fn assert_unchanged(path: &Path, expected: &[u8], what: &str) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{what}: {} is gone: {e}", path.display()));
    assert!(bytes == expected, "{what}: {} was changed", path.display());
}

fn arg(name: &str, path: &Path) -> String {
    format!("--{name}={}", path.display())
}

// 2. run and compare-fio: only missing or short regular files are laid out.

fn read_job(filename: &str, size: &str) -> Vec<String> {
    [
        "run",
        "--name=r",
        &format!("--filename={filename}"),
        "--rw=randread",
        &format!("--size={size}"),
        "--bs=4k",
        "--iodepth=8",
        "--direct=1",
        "--runtime=1",
        "--time_based",
        "--output-format=json",
    ]
    .map(String::from)
    .into()
}

fn tandem_owned(args: &[String]) -> common::Run {
    tandem(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn a_read_job_on_a_loop_device_keeps_its_pattern_and_runs_its_time() {
    let scratch = Scratch::new("loopread");
    let backing = scratch.path("disk.img");
    let expected = patterned(&backing, 16 * MIB, 5);
    let device = LoopDevice::over(&backing);
    // A region of 1 MiB is read in far less than a second: time_based wraps around it.
    for size in ["8M", "1M"] {
        let run = tandem_owned(&read_job(device.path(), size)).ok();
        assert!(!run.stderr.contains("laying out"), "a block device is never laid out: {}", run.stderr);
        let read = &run.json()["jobs"][0]["read"];
        assert!(read["runtime"].as_u64() >= Some(1000), "time_based runs the whole runtime: {read}");
        if size == "1M" {
            assert!(read["total_ios"].as_u64() > Some(256), "the region is read more than once: {read}");
        }
        assert_unchanged(Path::new(device.path()), &expected, &format!("read job, --size={size}"));
    }
}

#[test]
fn a_write_job_never_grows_past_a_block_device() {
    let scratch = Scratch::new("loopbig");
    let backing = scratch.path("disk.img");
    let expected = patterned(&backing, 4 * MIB, 6);
    let device = LoopDevice::over(&backing);
    let mut job = read_job(device.path(), "8M");
    job[3] = "--rw=randwrite".into();
    let run = tandem_owned(&job).failed();
    assert!(run.stderr.contains("beyond the end"), "{}", run.stderr);
    assert_unchanged(Path::new(device.path()), &expected, "a refused write job");
}

#[test]
fn a_read_job_lays_out_only_what_is_missing_from_a_regular_file() {
    let scratch = Scratch::new("shortfile");
    let file = scratch.path("f");
    let expected = patterned(&file, 8 * MIB, 7);
    tandem_owned(&read_job(&scratch.file("f"), "8M")).ok();
    assert_unchanged(&file, &expected, "a long enough file");
    // 1 MiB + 100 bytes: fio's size is 4 MiB; the bytes there stay, the rest is laid out.
    let short = &expected[..MIB + 100];
    std::fs::write(&file, short).expect("shorten");
    let run = tandem_owned(&read_job(&scratch.file("f"), "4M")).ok();
    assert!(run.stderr.contains("laying out"), "{}", run.stderr);
    let bytes = std::fs::read(&file).expect("read back");
    assert_eq!(bytes.len(), 4 * MIB);
    assert!(bytes[..short.len()] == *short, "the bytes the file had are kept");
    assert!(bytes[3 * MIB..].iter().any(|b| *b != 0), "the new part is laid out with data");
}

#[test]
fn compare_fio_read_job_on_a_loop_device_keeps_its_pattern() {
    let scratch = Scratch::new("loopcompare");
    let backing = scratch.path("disk.img");
    let expected = patterned(&backing, 16 * MIB, 8);
    let device = LoopDevice::over(&backing);
    let mut job = read_job(device.path(), "8M");
    job[0] = "compare-fio".into();
    job.insert(1, "--rounds=1".into());
    tandem_owned(&job).ok();
    assert_unchanged(Path::new(device.path()), &expected, "compare-fio read job");
}

