//! The bench never destroys what it did not create: files and block devices the user points it
//! at keep their bytes through rejected options, refusals for a missing `--overwrite-*` flag,
//! read jobs and runs that use them as they are. Loop devices (root, as the suite runs) stand
//! in for a user's disk. Behaviour only, never speed.

mod common;

use common::{pattern_bytes, tandem, LoopDevice, Scratch, BACKUP_BAD_OPTIONS};
use serde_json::Value;
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

// 1. mirror and backup: options are checked before any file is touched.

const MIRROR_BAD: [(&str, &str); 5] = [
    ("--sync=sideways", "sideways"),
    ("--copy-mode=eager", "eager"),
    ("--granularity=3000", "3000"),
    ("--guest-rw=randtrim", "randtrim"),
    ("--output-format=xml", "xml"),
];

#[test]
fn rejected_options_leave_an_existing_source_as_it_was() {
    let scratch = Scratch::new("rejected");
    let (source, target) = (scratch.path("source.img"), scratch.path("target.img"));
    let expected = patterned(&source, 8 * MIB, 1);
    let cases =
        MIRROR_BAD.iter().map(|case| ("mirror", case)).chain(BACKUP_BAD_OPTIONS.iter().map(|case| ("backup", case)));
    for (command, (option, named)) in cases {
        let run =
            tandem(&[command, &arg("source", &source), &arg("target", &target), "--guest-runtime=2", option]).failed();
        assert!(run.stderr.contains(named), "{command} {option}: {}", run.stderr);
        assert_unchanged(&source, &expected, &format!("{command} {option}"));
        assert!(!target.exists(), "{command} {option}: no target created");
    }
}

#[test]
fn a_guest_that_writes_an_existing_source_needs_overwrite_source() {
    let scratch = Scratch::new("oversource");
    let (source, target) = (scratch.path("source.img"), scratch.path("target.img"));
    let expected = patterned(&source, 8 * MIB, 2);
    for command in ["mirror", "backup"] {
        for rw in ["randwrite", "randrw"] {
            let guest = format!("--guest-rw={rw}");
            let run = tandem(&[command, &arg("source", &source), &arg("target", &target), &guest, "--guest-runtime=2"])
                .failed();
            assert!(run.stderr.contains("--overwrite-source"), "{command} {rw}: {}", run.stderr);
            assert_unchanged(&source, &expected, &format!("{command} --guest-rw={rw}"));
            assert!(!target.exists(), "{command} {rw}: no target created");
        }
    }
}

#[test]
fn an_existing_target_needs_overwrite_target_and_is_never_removed() {
    let scratch = Scratch::new("overtarget");
    let (source, target) = (scratch.path("source.img"), scratch.path("target.img"));
    let expected = patterned(&target, 8 * MIB, 3);
    for command in ["mirror", "backup"] {
        let run = tandem(&[command, &arg("source", &source), &arg("target", &target), "--size=8M"]).failed();
        assert!(run.stderr.contains("--overwrite-target"), "{command}: {}", run.stderr);
        assert_unchanged(&target, &expected, command);
        assert!(!source.exists(), "{command}: refused before the source was created");
    }
    // With the flag the job writes it, and it stays: the bench did not create it.
    let run = tandem(&["mirror", &arg("source", &source), &arg("target", &target), "--size=8M", "--overwrite-target"]);
    run.ok();
    assert_eq!(std::fs::metadata(&target).map(|m| m.len()).ok(), Some(8 * MIB as u64), "the target stays");
    assert!(!source.exists(), "the source the bench created is removed");
}

#[test]
fn an_existing_file_where_the_fleecing_scratch_goes_is_refused_and_kept() {
    let scratch = Scratch::new("oldscratch");
    let (source, target, old) =
        (scratch.path("source.img"), scratch.path("target.img"), scratch.path("target.img.scratch"));
    let expected = patterned(&old, MIB, 15);
    let run = tandem(&["backup", &arg("source", &source), &arg("target", &target), "--size=8M", "--discard-source"]);
    let run = run.failed();
    assert!(run.stderr.contains("target.img.scratch"), "names the file: {}", run.stderr);
    assert_unchanged(&old, &expected, "backup --discard-source");
    assert!(!source.exists() && !target.exists(), "refused before anything was created");
}

#[test]
fn source_and_target_that_are_one_file_are_refused() {
    let scratch = Scratch::new("samefile");
    let (source, link) = (scratch.path("source.img"), scratch.path("link.img"));
    let expected = patterned(&source, 8 * MIB, 14);
    std::fs::hard_link(&source, &link).expect("a hard link");
    for command in ["mirror", "backup"] {
        let run = tandem(&[command, &arg("source", &source), &arg("target", &link), "--overwrite-target"]).failed();
        assert!(run.stderr.contains("same file"), "{command}: {}", run.stderr);
        assert_unchanged(&source, &expected, command);
        let missing = scratch.path("missing.img");
        let run = tandem(&[command, &arg("source", &missing), &arg("target", &missing)]).failed();
        assert!(run.stderr.contains("same file") && !missing.exists(), "{command}: {}", run.stderr);
    }
}

#[test]
fn an_existing_source_is_used_as_it_is_and_kept() {
    let scratch = Scratch::new("asis");
    let (source, target) = (scratch.path("source.img"), scratch.path("target.img"));
    let expected = patterned(&source, 8 * MIB, 4);
    for command in ["mirror", "backup"] {
        // --size differs from the source's: the source's own size wins, nothing is replaced.
        let run = tandem(&[
            command,
            &arg("source", &source),
            &arg("target", &target),
            "--size=16M",
            "--guest-rw=randread",
            "--guest-runtime=2",
            "--output-format=json",
        ])
        .ok();
        let value: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}:\n{}", run.stdout));
        assert!(value["copied_bytes"].as_u64() >= Some(8 * MIB as u64), "{command}: {value}");
        assert_unchanged(&source, &expected, command);
        assert!(!target.exists(), "{command}: the target it created is removed");
    }
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

// 3. mirror and backup onto a block device and back.

#[test]
fn mirror_and_backup_onto_a_loop_device_and_back() {
    let scratch = Scratch::new("loopjobs");
    let (source, backing, back) = (scratch.path("source.img"), scratch.path("disk.img"), scratch.path("back.img"));
    let expected = patterned(&source, 8 * MIB, 9);
    patterned(&backing, 8 * MIB, 10);
    let device = LoopDevice::over(&backing);
    let target = Path::new(device.path());
    for command in ["mirror", "backup"] {
        tandem(&[command, &arg("source", &source), &arg("target", target), "--overwrite-target"]).ok();
        assert_unchanged(target, &expected, &format!("{command} file -> loop device"));
        // And back: the device is the source (its size from the device), a new file the target.
        tandem(&[command, &arg("source", target), &arg("target", &back), "--keep"]).ok();
        assert_unchanged(&back, &expected, &format!("{command} loop device -> file"));
        std::fs::remove_file(&back).expect("the kept copy");
        // Through the device, so its page cache holds no stale bytes for the next job.
        patterned(target, 8 * MIB, 11);
    }
    assert_unchanged(&source, &expected, "the source of both jobs");
}

#[test]
fn a_larger_block_device_target_keeps_what_lies_past_the_disk() {
    let scratch = Scratch::new("loopbigger");
    let (source, backing) = (scratch.path("source.img"), scratch.path("disk.img"));
    let expected = patterned(&source, 8 * MIB, 12);
    let mut device_bytes = patterned(&backing, 16 * MIB, 13);
    device_bytes[..8 * MIB].copy_from_slice(&expected);
    let device = LoopDevice::over(&backing);
    let target = Path::new(device.path());
    for command in ["mirror", "backup"] {
        // qemu-img compare checks the disk's 8 MiB, not the device's other 8.
        let run = tandem(&[command, &arg("source", &source), &arg("target", target), "--overwrite-target"]).ok();
        assert!(!run.stderr.contains("DIFFER"), "{command}: {}", run.stderr);
        assert_unchanged(target, &device_bytes, &format!("{command} onto a larger device"));
    }
}
