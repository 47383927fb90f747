//! `mirror --daemon` and `backup --daemon`: Tandem's side runs through tandemd, QEMU's through
//! qemu-storage-daemon, both driven over QMP with fio over NBD as the guest, on the same files.
//! These need fio, qemu-storage-daemon and qemu-img (scripts/install-test-deps installs them)
//! and tandemd built beside the bench (`cargo build -p tandemd`). They assert what is reported
//! and what is left on disk, never speed.

mod common;

use common::{tandem, Scratch};
use serde_json::Value;
use std::path::Path;

/// The guest of these runs: short and rate-limited. `--speed` keeps each job running beside it
/// rather than done before fio connects.
const GUEST: [&str; 6] = [
    "--size=32M",
    "--guest-rw=randwrite",
    "--guest-iodepth=4",
    "--guest-rate-iops=500",
    "--guest-runtime=3",
    "--speed=32M",
];

/// tandemd must sit where the bench looks first; say how to put it there rather than fail
/// deep inside a run.
fn require_tandemd() {
    let beside = Path::new(common::bin()).with_file_name("tandemd");
    assert!(beside.is_file(), "{} is missing: run `cargo build -p tandemd` before these tests", beside.display());
}

fn path_arg(option: &str, path: &Path) -> String {
    format!("{option}={}", path.display())
}

fn assert_positive(value: &Value, keys: &[&str], side: &str) {
    for key in keys {
        assert!(value[*key].as_f64().is_some_and(|v| v > 0.0), "{side}.{key}: {value}");
    }
}

/// Every window of a side's guest has its three figures, and the baseline saw the guest run.
fn assert_guest(side: &Value, windows: &[&str], name: &str) {
    for window in windows {
        for key in ["iops", "clat_p50_us", "clat_p99_us"] {
            assert!(side["guest"][*window][key].as_f64().is_some(), "{name}.guest.{window}.{key}: {side}");
        }
    }
    assert!(side["guest"]["baseline"]["iops"].as_f64().is_some_and(|v| v > 0.0), "{name} baseline ran: {side}");
}

#[test]
fn mirror_daemon_compare_qemu_reports_both_daemons_and_removes_only_its_images() {
    require_tandemd();
    let scratch = Scratch::new("daemon-mirror");
    let (source, target, mine) = (scratch.path("source.img"), scratch.path("target.img"), scratch.path("mine"));
    std::fs::write(&mine, b"not the bench's").expect("a file of the user's");
    let (source_arg, target_arg) = (path_arg("--source", &source), path_arg("--target", &target));
    let mut args = vec!["mirror", &source_arg, &target_arg, "--daemon", "--compare-qemu", "--output-format=json"];
    args.extend(GUEST);
    args.push("--copy-mode=write-blocking");
    let value = tandem(&args).ok().json();
    assert_eq!(value["tandem_side"], "tandemd", "{value}");
    let (ours, qemu) = (&value["tandemd"], &value["qemu"]);
    assert_eq!(ours["daemon"], "tandemd", "{value}");
    assert_eq!(qemu["daemon"], "qemu-storage-daemon", "{value}");
    for (name, side) in [("tandemd", ours), ("qemu", qemu)] {
        assert_eq!(side["copy_mode"], "write-blocking", "{name}: {value}");
        assert_eq!(side["identical"], Value::Bool(true), "{name}: source and target identical: {value}");
        assert_positive(side, &["ready_s", "complete_s", "mib_per_s"], name);
        assert!(side["cpu_s_per_gib"].as_f64().is_some_and(|v| v >= 0.0), "{name}.cpu_s_per_gib: {value}");
        assert_guest(side, &["baseline", "phase1", "phase2"], name);
    }
    for key in ["mib_per_s", "cpu_s_per_gib", "phase1_p99_x", "phase2_p99_x"] {
        assert!(value["vs_qemu"][key].as_f64().is_some(), "vs_qemu.{key}: {value}");
    }
    assert_eq!(value["identical"], Value::Bool(true), "the top level is tandemd's: {value}");
    assert!(!source.exists() && !target.exists(), "the images it created are removed");
    assert_eq!(std::fs::read(&mine).expect("still there"), b"not the bench's", "the user's file is untouched");
}

#[test]
fn backup_daemon_compare_qemu_holds_the_point_in_time_and_keeps_the_users_source() {
    require_tandemd();
    let scratch = Scratch::new("daemon-backup");
    let (source, target) = (scratch.path("source.img"), scratch.path("target.img"));
    std::fs::write(&source, common::pattern_bytes(32 << 20, 7)).expect("the user's source");
    let (source_arg, target_arg) = (path_arg("--source", &source), path_arg("--target", &target));
    let mut args = vec!["backup", &source_arg, &target_arg, "--daemon", "--compare-qemu", "--output-format=json"];
    args.extend(GUEST);
    args.extend(["--overwrite-source", "--copy-priority=job"]);
    let value = tandem(&args).ok().json();
    assert_eq!(value["tandem_side"], "tandemd", "{value}");
    assert_eq!(value["daemon"], "tandemd", "{value}");
    assert_eq!(value["qemu"]["daemon"], "qemu-storage-daemon", "{value}");
    for (name, side) in [("tandemd", &value), ("qemu", &value["qemu"])] {
        assert_eq!(side["point_in_time_ok"], Value::Bool(true), "{name}: the target is the source at the start");
        assert_positive(side, &["complete_s", "mib_per_s"], name);
        assert!(side["cpu_s_per_gib"].as_f64().is_some_and(|v| v >= 0.0), "{name}.cpu_s_per_gib: {value}");
        assert_guest(side, &["baseline", "job"], name);
    }
    for key in ["mib_per_s", "cpu_s_per_gib", "job_p99_x"] {
        assert!(value["vs_qemu"][key].as_f64().is_some(), "vs_qemu.{key}: {value}");
    }
    assert!(source.exists(), "the source it found is kept");
    assert!(!target.exists(), "the target it created is removed");
    let leftovers: Vec<_> = std::fs::read_dir(scratch.path("")).expect("scratch").flatten().collect();
    assert_eq!(leftovers.len(), 1, "only the source remains (no point-in-time copy): {leftovers:?}");
}

#[test]
fn daemon_refuses_what_it_cannot_run_before_anything_is_created() {
    let scratch = Scratch::new("daemon-refusals");
    let (source, target) = (scratch.path("source.img"), scratch.path("target.img"));
    let (source_arg, target_arg) = (path_arg("--source", &source), path_arg("--target", &target));
    let cases: [(&[&str], &str); 4] = [
        (&["mirror", "--plot=run.svg"], "--plot run.svg with --daemon"),
        (&["mirror", "--verify=full"], "--verify full with --daemon"),
        (&["backup", "--discard-source"], "--discard-source with --daemon"),
        (&["backup", "--verify=sample"], "--verify sample with --daemon"),
    ];
    for (extra, message) in cases {
        let mut args = vec![extra[0], &source_arg, &target_arg, "--size=8M", "--daemon"];
        args.extend(&extra[1..]);
        let run = tandem(&args).failed();
        assert!(run.stderr.contains(message), "{}: {}", run.what, run.stderr);
        assert!(!source.exists() && !target.exists(), "{}: nothing created", run.what);
    }
}
