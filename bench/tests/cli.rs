//! End-to-end tests of the `tandem-bench` binary on real files: error reporting, fio-style
//! JSON and text output, job files, numjobs and rate limits, `compare-fio`, `demo` and help.
//! They assert behaviour only (what is printed, counted and written), never speed.

mod common;

use common::{run_program, tandem, Scratch, BACKUP_BAD_OPTIONS};
use serde_json::Value;
use std::collections::BTreeSet;

const MIB: u64 = 1 << 20;

/// The small file job of these tests: 8 MiB file, 4 MiB of 4 KiB I/Os at depth 4, O_DIRECT.
fn file_job<'a>(name: &'a str, filename: &'a str, rw: &'a str) -> Vec<String> {
    [
        format!("--name={name}"),
        format!("--filename={filename}"),
        format!("--rw={rw}"),
        "--size=8M".into(),
        "--io_size=4M".into(),
        "--bs=4k".into(),
        "--iodepth=4".into(),
        "--direct=1".into(),
        "--output-format=json".into(),
    ]
    .into()
}

fn tandem_owned(args: &[String]) -> common::Run {
    tandem(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

// 1. Errors name what is wrong, print nothing on stdout and never panic.

#[test]
fn unknown_option_is_named() {
    let run = tandem(&["run", "--name=x", "--bogus=1"]).failed();
    assert!(run.stderr.contains("bogus"), "{}", run.stderr);
    assert_eq!(run.stdout, "");
}

#[test]
fn malformed_values_name_option_and_value() {
    let scratch = Scratch::new("malformed");
    let filename = format!("--filename={}", scratch.file("f"));
    for (arg, option, value) in
        [("--bs=abc", "bs", "abc"), ("--iodepth=0", "iodepth", "0"), ("--rw=sideways", "rw", "sideways")]
    {
        let run = tandem(&["run", "--name=x", &filename, "--size=8M", arg]).failed();
        assert!(run.stderr.contains(&format!("'{option}'")), "{arg}: {}", run.stderr);
        assert!(run.stderr.contains(&format!("'{value}'")), "{arg}: {}", run.stderr);
        assert_eq!(run.stdout, "", "{arg}");
    }
    assert!(!scratch.path("f").exists(), "a rejected command line must not create the file");
}

#[test]
fn missing_filename_names_the_job() {
    // Without a filename fio creates JOB.N.M files of the given size; without a size either
    // there is nothing to run against.
    let run = tandem(&["run", "--name=lonely"]).failed();
    assert!(run.stderr.contains("'lonely'") && run.stderr.contains("filename"), "{}", run.stderr);
    assert_eq!(run.stdout, "");
}

#[test]
fn bad_job_file_line_reports_path_and_line() {
    let scratch = Scratch::new("badjobfile");
    let path = scratch.file("bad.fio");
    std::fs::write(&path, "; comment\n[global]\nbs=4k\n\n[j]\nrw=read\nbs=abc\n").expect("write job file");
    let run = tandem(&["run", &path]).failed();
    assert!(run.stderr.contains(&format!("{path}:7:")), "{}", run.stderr);
    assert!(run.stderr.contains("'abc'") && run.stderr.contains("'bs'"), "{}", run.stderr);
    assert_eq!(run.stdout, "");
}

/// Regions fio refuses (smaller than a block; offset + size past 2^64) are errors, not panics.
#[test]
fn impossible_regions_are_errors_not_panics() {
    let scratch = Scratch::new("regions");
    let filename = format!("--filename={}", scratch.file("f"));
    let cases: [&[&str]; 3] = [
        &["--ioengine=null", "--size=1k", "--bs=4k"],
        &["--ioengine=null", "--size=16383p", "--offset=16383p"],
        &[&filename, "--size=16383p", "--offset=16383p"],
    ];
    for case in cases {
        let args: Vec<&str> = ["run", "--name=r"].iter().chain(case).copied().collect();
        let run = tandem(&args).failed();
        assert!(run.stderr.contains("job 'r'") && run.stderr.contains("size"), "{case:?}: {}", run.stderr);
    }
}

/// As fio: a job whose I/O fails still gets its report, and the exit status is non-zero.
#[test]
fn failed_io_exits_non_zero() {
    let scratch = Scratch::new("failedio");
    let filename = format!("--filename={}", scratch.file("f"));
    // 1000-byte blocks cannot be O_DIRECT-aligned on any device.
    let run = tandem(&["run", "--name=odd", &filename, "--size=1M", "--io_size=8k", "--bs=1000", "--direct=1"]);
    let run = run.failed();
    assert!(run.stderr.contains("odd"), "{}", run.stderr);
    assert!(run.stdout.contains("Run status group 0"), "the report is still printed:\n{}", run.stdout);
}

// 2. A read job and a write job on a real file, JSON output.

#[test]
fn read_job_json() {
    let scratch = Scratch::new("readjob");
    let run = tandem_owned(&[vec!["run".to_string()], file_job("r", &scratch.file("f"), "randread")].concat()).ok();
    let json = run.json();
    let job = &json["jobs"][0];
    assert_eq!(job["jobname"], "r");
    assert_eq!(job["error"], 0);
    assert_eq!(job["read"]["io_bytes"].as_u64(), Some(4 * MIB));
    assert_eq!(job["read"]["total_ios"].as_u64(), Some(1024));
    assert_eq!(job["write"]["io_bytes"].as_u64(), Some(0));
    assert!(job["read"]["runtime"].as_u64() > Some(0), "a direction that did I/O has a runtime, as in fio");
    assert!(job["read"]["iops"].as_f64() > Some(0.0));
    assert!(job["read"]["clat_ns"]["percentile"]["99.000000"].as_u64().is_some(), "{}", job["read"]["clat_ns"]);
    assert!(job["usr_cpu"].is_number() && job["sys_cpu"].is_number(), "{job}");
    // The file was created and laid out at the requested size.
    assert_eq!(std::fs::metadata(scratch.path("f")).expect("file created").len(), 8 * MIB);
}

#[test]
fn write_job_json_writes_the_file() {
    let scratch = Scratch::new("writejob");
    let path = scratch.path("f");
    // An existing zero-filled file of the full size: no layout, so every non-zero byte
    // afterwards was written by the job itself.
    std::fs::File::create(&path).and_then(|f| f.set_len(8 * MIB)).expect("create file");
    let run = tandem_owned(&[vec!["run".to_string()], file_job("w", &scratch.file("f"), "write")].concat()).ok();
    let json = run.json();
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0);
    assert_eq!(job["write"]["io_bytes"].as_u64(), Some(4 * MIB));
    assert_eq!(job["write"]["total_ios"].as_u64(), Some(1024));
    assert_eq!(job["read"]["io_bytes"].as_u64(), Some(0));
    assert!(job["write"]["clat_ns"]["percentile"]["99.000000"].as_u64().is_some());
    let bytes = std::fs::read(&path).expect("read back");
    assert_eq!(bytes.len() as u64, 8 * MIB, "the file keeps its size");
    // A sequential write of io_size=4M covers exactly the first 4 MiB, every block.
    let (written, untouched) = bytes.split_at(4 * MIB as usize);
    for (index, block) in written.chunks(4096).enumerate() {
        assert!(block.iter().any(|&b| b != 0), "block {index} of the written half is still zero");
    }
    assert!(untouched.iter().all(|&b| b == 0), "bytes past io_size were written");
}

// 3. The JSON layout is fio's.

fn key_paths(value: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Value::Object(map) = value {
        for (key, child) in map {
            let path = format!("{prefix}/{key}");
            out.insert(path.clone());
            key_paths(child, &path, out);
        }
    }
}

fn keys(value: &Value) -> BTreeSet<String> {
    value.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

#[test]
fn json_has_every_key_fio_prints() {
    let flags = [
        "--ioengine=null",
        "--size=16M",
        "--bs=4k",
        "--rw=randread",
        "--io_size=8M",
        "--output-format=json",
        "--name=x",
    ];
    let version = std::process::Command::new("fio").arg("--version").output();
    assert!(version.is_ok(), "this test needs fio on PATH (apt-get install -y fio)");
    let fio = run_program("fio", &flags, &[]).ok().json();
    let ours = tandem(&[&["run"], &flags[..]].concat()).ok().json();
    let (fio_job, our_job) = (&fio["jobs"][0], &ours["jobs"][0]);

    // Everything fio has under read, recursively (fio's "bins" only exist with json+).
    let mut fio_paths = BTreeSet::new();
    let mut our_paths = BTreeSet::new();
    key_paths(&fio_job["read"], "read", &mut fio_paths);
    key_paths(&our_job["read"], "read", &mut our_paths);
    let missing: Vec<_> = fio_paths.iter().filter(|p| !p.contains("/bins") && !our_paths.contains(*p)).collect();
    assert!(missing.is_empty(), "keys fio prints under read that we do not: {missing:?}");

    let omitted = tandem_bench::fio::json::OMITTED_JOB_KEYS;
    let missing: Vec<_> =
        keys(fio_job).into_iter().filter(|k| !omitted.contains(&k.as_str()) && our_job.get(k).is_none()).collect();
    assert!(missing.is_empty(), "job keys fio prints that we do not: {missing:?}");
    for key in ["jobname", "read", "write", "usr_cpu", "sys_cpu", "job_runtime"] {
        assert!(our_job.get(key).is_some(), "jobs[0].{key} missing");
    }
    assert!(keys(&fio).is_subset(&keys(&ours)), "top level: fio {:?}, ours {:?}", keys(&fio), keys(&ours));
    // The same job does the same amount of I/O under both.
    assert_eq!(our_job["read"]["total_ios"], fio_job["read"]["total_ios"]);
    assert_eq!(our_job["read"]["io_bytes"], fio_job["read"]["io_bytes"]);
    assert_eq!(ours["global options"], fio["global options"]);
}

// 4. fio job files.

#[test]
fn job_file_with_global_section_runs_both_jobs() {
    let scratch = Scratch::new("jobfile");
    let path = scratch.file("two.fio");
    let text = format!(
        "[global]\nfilename={}\nsize=8M\ndirect=1\nbs=4k\nio_size=1M\n\n[reader]\nrw=randread\niodepth=2\n\n[writer]\nrw=randwrite\niodepth=8\n",
        scratch.file("data")
    );
    std::fs::write(&path, text).expect("write job file");
    let run = tandem(&["run", &path]).ok();
    for job in ["reader", "writer"] {
        assert!(run.stdout.contains(&format!("{job}: (groupid=0")), "{job} missing:\n{}", run.stdout);
    }
    assert_eq!(run.stdout.matches("IOPS=").count(), 2, "{}", run.stdout);
    assert!(run.stdout.contains("  read: IOPS=") && run.stdout.contains("  write: IOPS="), "{}", run.stdout);
    assert!(run.stdout.contains("issued rwts: total=256,0,0,0") && run.stdout.contains("issued rwts: total=0,256,0,0"));
}

/// A job faster than a millisecond still reports a rate (fio rounds runtime up to 1 ms).
#[test]
fn sub_millisecond_job_reports_runtime_and_iops() {
    let run = tandem(&["run", "--name=fast", "--ioengine=null", "--size=16M", "--io_size=64k", "--bs=4k"]).ok();
    assert!(run.stdout.contains("  read: IOPS="), "{}", run.stdout);
    let json =
        tandem(&["run", "--name=fast", "--ioengine=null", "--size=16M", "--io_size=64k", "--output-format=json"])
            .ok()
            .json();
    let read = &json["jobs"][0]["read"];
    assert_eq!(read["total_ios"], 16);
    assert!(
        read["runtime"].as_u64() >= Some(1) && read["iops"].as_f64() > Some(0.0) && read["bw"].as_u64() > Some(0),
        "{read}"
    );
}

// 5. numjobs and rate_iops.

#[test]
fn numjobs_gives_one_entry_per_clone() {
    let json = tandem(&[
        "run",
        "--name=n",
        "--ioengine=null",
        "--size=16M",
        "--io_size=1M",
        "--numjobs=2",
        "--output-format=json",
    ])
    .ok()
    .json();
    let jobs = json["jobs"].as_array().expect("jobs array");
    assert_eq!(jobs.len(), 2, "{json}");
    for job in jobs {
        assert_eq!(job["jobname"], "n");
        assert_eq!(job["read"]["total_ios"], 256);
    }
}

#[test]
fn rate_iops_caps_the_number_of_ios() {
    let args = [
        "run",
        "--name=slow",
        "--ioengine=null",
        "--size=16M",
        "--rate_iops=200",
        "--runtime=1",
        "--time_based",
        "--output-format=json",
    ];
    let json = tandem(&args).ok().json();
    let total_ios = json["jobs"][0]["read"]["total_ios"].as_u64().expect("total_ios");
    // 200 per second for 1 second; the slack is for the I/O at t=0 and rounding, not speed.
    assert!(total_ios > 0 && total_ios <= 200 + 50, "total_ios={total_ios}");
}

// 6. compare-fio.

const NULL_JOB: [&str; 6] = ["--name=n", "--ioengine=null", "--size=16M", "--bs=4k", "--rw=randread", "--io_size=8M"];

#[test]
fn compare_fio_json_has_both_sides_and_ratios() {
    let args = [&["compare-fio", "--rounds=1"][..], &NULL_JOB, &["--output-format=json"]].concat();
    let json = tandem(&args).ok().json();
    for key in ["fio", "tandem", "ratios"] {
        assert!(json.get(key).is_some_and(Value::is_object), "{key} missing: {json}");
    }
    assert!(json["ratios"]["iops"].as_f64() > Some(0.0), "{}", json["ratios"]);
    assert_eq!(json["rounds"], 1);
    for side in ["fio", "tandem"] {
        assert_eq!(json[side]["iops"]["rounds"].as_array().map(Vec::len), Some(1), "{side}");
    }
}

#[test]
fn compare_fio_without_fio_says_how_to_install_it() {
    let scratch = Scratch::new("nofio");
    let empty_bin = scratch.path("bin");
    std::fs::create_dir(&empty_bin).expect("mkdir");
    let args = [&["compare-fio", "--rounds=1"][..], &NULL_JOB].concat();
    // The binary is started by absolute path; only its own lookup of `fio` sees this PATH.
    let run = run_program(common::bin(), &args, &[("PATH", empty_bin.to_str().expect("utf-8 path"))]).failed();
    assert!(run.stderr.contains("apt-get install"), "{}", run.stderr);
}

// 7. demo.

/// The step names, read from `STEPS` in bench/src/demo.rs so the test follows the demo.
fn demo_steps() -> Vec<&'static str> {
    let source = include_str!("../src/demo.rs");
    let steps: Vec<&str> = source.split("Step { name: \"").skip(1).filter_map(|rest| rest.split('"').next()).collect();
    assert!(!steps.is_empty(), "no `Step {{ name: \"...\"` found in bench/src/demo.rs");
    steps
}

#[test]
fn demo_runs_every_step_and_cleans_up() {
    let scratch = Scratch::new("demo");
    let dir = scratch.path("demo");
    let run = tandem(&["demo", "--dir", dir.to_str().expect("utf-8"), "--size=16M", "--seconds=1"]).ok();
    for step in demo_steps() {
        assert!(run.stdout.contains(step), "step {step} missing:\n{}", run.stdout);
    }
    assert!(run.stdout.contains("source and target identical"), "mirror step:\n{}", run.stdout);
    assert!(run.stdout.contains("the target equals the source at the job's start"), "backup step:\n{}", run.stdout);
    assert!(!dir.exists(), "{} should be removed", dir.display());
}

#[test]
fn demo_keep_leaves_the_files() {
    let scratch = Scratch::new("demokeep");
    let dir = scratch.path("demo");
    tandem(&["demo", "--dir", dir.to_str().expect("utf-8"), "--size=16M", "--seconds=1", "--keep"]).ok();
    assert_eq!(std::fs::metadata(dir.join("demo.dat")).expect("kept").len(), 16 * MIB);
}

// 8. mirror.

#[test]
fn mirror_json_has_the_issue_fields_and_the_images_match() {
    let scratch = Scratch::new("mirror");
    let (source, target, plot) = (scratch.path("source.img"), scratch.path("target.img"), scratch.path("run.svg"));
    let run = tandem(&[
        "mirror",
        "--plot",
        plot.to_str().expect("utf-8"),
        "--source",
        source.to_str().expect("utf-8"),
        "--target",
        target.to_str().expect("utf-8"),
        "--size=32M",
        "--guest-rw=randwrite",
        "--guest-iodepth=4",
        "--guest-rate-iops=500",
        "--guest-runtime=2",
        "--verify=full",
        "--output-format=json",
    ])
    .ok();
    let value: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}:\n{}", run.stdout));
    let verified_bytes = value["verified_bytes"].as_u64().expect("verified_bytes");
    assert!(verified_bytes >= 32 * MIB, "--verify=full compares every byte: {value}");
    assert!(value["ready_len_bytes"].as_u64().is_some_and(|len| len >= 32 * MIB), "a dense source: {value}");
    assert_eq!(value["target_is_zero"]["detected"], Value::Bool(true), "detected without the flag: {value}");
    for key in ["ready_s", "complete_s", "mib_per_s", "cpu_s_per_gib"] {
        assert!(value[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {value}");
    }
    assert_eq!(value["identical"], Value::Bool(true));
    let copied_bytes = value["copied_bytes"].as_u64().expect("copied_bytes");
    assert!(copied_bytes >= 32 * MIB, "sync=full copies the whole disk, and rewritten chunks again: {copied_bytes}");
    for phase in ["baseline", "phase1", "phase2"] {
        for key in ["iops", "clat_p50_us", "clat_p99_us"] {
            assert!(value["guest"][phase][key].as_f64().is_some(), "guest.{phase}.{key}: {value}");
        }
    }
    for key in ["phase1_iops", "phase1_p99", "phase2_iops", "phase2_p99"] {
        assert!(value["ratios"][key].as_f64().is_some(), "ratios.{key}: {value}");
    }
    assert!(!source.exists() && !target.exists(), "removed without --keep");
    let svg = std::fs::read_to_string(&plot).expect("--plot writes the file");
    assert_eq!(svg.matches("<polyline").count(), 4, "dirty, copy rate, guest IOPS, guest p99");
    assert!(svg.contains("READY"), "READY is marked");
}

#[test]
fn mirror_bad_options_are_named_and_touch_nothing() {
    let scratch = Scratch::new("mirrorbad");
    let source = scratch.path("source.img");
    let source_arg = format!("--source={}", source.display());
    for (option, named) in [
        ("--sync=sideways", "sideways"),
        ("--copy-mode=eager", "eager"),
        ("--granularity=3000", "3000"),
        ("--guest-rw=randtrim", "randtrim"),
        ("--output-format=xml", "xml"),
        ("--target-is-zero=maybe", "maybe"),
        ("--verify=twice", "twice"),
    ] {
        let run = tandem(&["mirror", &source_arg, "--size=8M", "--guest-runtime=2", option]).failed();
        assert!(run.stderr.contains(named), "{option}: {}", run.stderr);
        assert!(!source.exists(), "{option}: nothing created");
    }
}

// 8b. backup.

#[test]
fn backup_json_has_the_issue_fields_and_the_point_in_time_holds() {
    let scratch = Scratch::new("backup");
    let (source, target, plot) = (scratch.path("source.img"), scratch.path("target.img"), scratch.path("run.svg"));
    let run = tandem(&[
        "backup",
        "--plot",
        plot.to_str().expect("utf-8"),
        "--source",
        source.to_str().expect("utf-8"),
        "--target",
        target.to_str().expect("utf-8"),
        "--size=32M",
        "--speed=16M",
        "--guest-rw=randwrite",
        "--guest-iodepth=4",
        "--guest-rate-iops=500",
        "--guest-runtime=3",
        "--verify=sample",
        "--output-format=json",
    ])
    .ok();
    let value: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}:\n{}", run.stdout));
    assert!(value["verified_bytes"].as_u64().is_some(), "verified_bytes: {value}");
    for key in ["complete_s", "mib_per_s", "cpu_s_per_gib"] {
        assert!(value[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {value}");
    }
    assert_eq!(value["point_in_time_ok"], Value::Bool(true), "{value}");
    for window in ["baseline", "job"] {
        for key in ["iops", "clat_p50_us", "clat_p99_us"] {
            assert!(value["guest"][window][key].as_f64().is_some(), "guest.{window}.{key}: {value}");
        }
    }
    assert!(value["guest"]["job"]["iops"].as_f64().is_some_and(|v| v > 0.0), "the guest wrote during the job: {value}");
    for key in ["job_iops", "job_p99"] {
        assert!(value["ratios"][key].as_f64().is_some(), "ratios.{key}: {value}");
    }
    assert!(!source.exists() && !target.exists(), "removed without --keep");
    let svg = std::fs::read_to_string(&plot).expect("--plot writes the file");
    assert_eq!(svg.matches("<polyline").count(), 4, "to copy, copy rate, guest IOPS, guest p99");
    std::fs::remove_file(&plot).expect("the plot");
    let leftovers: Vec<_> = std::fs::read_dir(scratch.path("")).expect("scratch").collect();
    assert!(leftovers.is_empty(), "the point-in-time copy is removed too: {leftovers:?}");
}

#[test]
fn backup_bad_options_are_named_and_touch_nothing() {
    let scratch = Scratch::new("backupbad");
    let source = scratch.path("source.img");
    let source_arg = format!("--source={}", source.display());
    for (option, named) in BACKUP_BAD_OPTIONS {
        let run = tandem(&["backup", &source_arg, "--size=8M", "--guest-runtime=2", option]).failed();
        assert!(run.stderr.contains(named), "{option}: {}", run.stderr);
        assert!(!source.exists(), "{option}: nothing created");
    }
}

#[test]
fn backup_discard_source_benches_fleecing_and_the_scratch_shrinks() {
    let scratch = Scratch::new("backupdiscard");
    let (source, target) = (scratch.path("source.img"), scratch.path("target.img"));
    let run = tandem(&[
        "backup",
        "--source",
        source.to_str().expect("utf-8"),
        "--target",
        target.to_str().expect("utf-8"),
        "--size=32M",
        "--speed=16M",
        "--discard-source",
        "--guest-rw=randwrite",
        "--guest-iodepth=4",
        "--guest-rate-iops=500",
        "--guest-runtime=3",
        "--output-format=json",
    ])
    .ok();
    let value: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}:\n{}", run.stdout));
    assert_eq!(value["point_in_time_ok"], Value::Bool(true), "{value}");
    let figure = |key: &str| value["fleecing"][key].as_u64().unwrap_or_else(|| panic!("fleecing.{key}: {value}"));
    assert_eq!(figure("discarded_bytes"), 32 << 20, "every copied cluster was discarded: {value}");
    let (peak, end) = (figure("scratch_peak_bytes"), figure("scratch_final_bytes"));
    assert!(peak > 0 && end < peak, "the scratch grew under the guest, then shrank: {value}");
    let leftovers: Vec<_> = std::fs::read_dir(scratch.path("")).expect("scratch").collect();
    assert!(leftovers.is_empty(), "images, point-in-time copy and scratch are removed: {leftovers:?}");
}

#[test]
fn backup_discard_source_is_refused_with_compare_qemu_before_anything_is_created() {
    let scratch = Scratch::new("backupdiscardqemu");
    let source = scratch.path("source.img");
    let source_arg = format!("--source={}", source.display());
    let run = tandem(&["backup", &source_arg, "--size=8M", "--discard-source", "--compare-qemu"]).failed();
    assert!(run.stderr.contains("--discard-source"), "{}", run.stderr);
    assert!(!source.exists(), "nothing created");
}

#[test]
fn backup_help_documents_discard_source() {
    let run = tandem(&["backup", "--help"]).ok();
    assert!(run.stdout.contains("--discard-source") && run.stdout.contains("scratch"), "{}", run.stdout);
}

// 9. help.

#[test]
fn run_help_lists_options() {
    let run = tandem(&["run", "--help"]).ok();
    assert!(run.stdout.contains("--bs") && run.stdout.contains("--iodepth"), "{}", run.stdout);
}
