//! fio job files as users write them, shaped like the ones in fio's `examples/` (written here,
//! small): real fio and `tandem-bench run` print as many JSON jobs and reporting groups on
//! the same job file; the options' effects show in what is counted and written; and every
//! option we do not support is refused by name before any file is touched.

mod common;

use common::{run_program, tandem, Scratch};
use serde_json::Value;
use std::collections::BTreeSet;

/// Writes `text` (with `DIR` replaced by the scratch directory) as a job file.
fn job_file(scratch: &Scratch, name: &str, text: &str) -> String {
    let path = scratch.file(name);
    std::fs::write(&path, text.replace("DIR", &scratch.file(""))).expect("write job file");
    path
}

fn tandem_json(path: &str) -> Value {
    tandem(&["run", "--output-format=json", path]).ok().json()
}

/// (jobs, distinct groupids, groupid per job) of a fio-style JSON document.
fn shape(document: &Value) -> (usize, usize, Vec<u64>) {
    let jobs = document["jobs"].as_array().expect("a jobs array");
    let groupids: Vec<u64> = jobs.iter().map(|job| job["groupid"].as_u64().expect("a groupid")).collect();
    let distinct: BTreeSet<u64> = groupids.iter().copied().collect();
    (jobs.len(), distinct.len(), groupids)
}

/// Runs `text` through fio and tandem-bench in one scratch directory; their shapes must match.
fn same_shape_as_fio(test: &str, text: &str, expected_jobs: usize, expected_groups: usize) {
    let version = std::process::Command::new("fio").arg("--version").output();
    assert!(version.is_ok(), "this test needs fio on PATH (apt-get install -y fio)");
    let scratch = Scratch::new(test);
    let path = job_file(&scratch, "job.fio", text);
    // verify_state_save=0: fio would leave its verify state files in the working directory.
    let fio = run_program("fio", &["--output-format=json", "--verify_state_save=0", &path], &[]).ok().json();
    let ours = tandem_json(&path);
    assert_eq!(shape(&ours), shape(&fio), "{test}: tandem-bench vs fio");
    assert_eq!((shape(&ours).0, shape(&ours).1), (expected_jobs, expected_groups), "{test}");
}

// 1. The same jobs and groups as fio.

/// Like fio's ssd-test.fio: one file under directory=, four jobs each behind a stonewall.
#[test]
fn stonewalled_jobs_in_a_directory_like_ssd_test() {
    let text = "[global]\nbs=4k\nioengine=libaio\niodepth=4\nsize=2m\ndirect=1\nruntime=60\n\
                directory=DIR\nfilename=ssd.test.file\n\n\
                [seq-read]\nrw=read\nstonewall\n[rand-read]\nrw=randread\nstonewall\n\
                [seq-write]\nrw=write\nstonewall\n[rand-write]\nrw=randwrite\nstonewall\n";
    same_shape_as_fio("ssd-test", text, 4, 4);
}

/// Like tiobench-example.fio: numjobs clones, bsrange, timeout, and stonewalls between.
#[test]
fn clones_behind_stonewalls_like_tiobench() {
    let text = "[global]\ndirect=1\nsize=1m\nbsrange=4k-4k\ntimeout=60\nnumjobs=2\ndirectory=DIR\n\
                [f1]\nrw=write\n[f2]\nstonewall\nrw=randwrite\n[f3]\nstonewall\nrw=read\n";
    same_shape_as_fio("tiobench", text, 6, 3);
}

/// Like aio-read.fio: no filename, so each job gets its own generated file in directory=.
#[test]
fn generated_file_names_like_aio_read() {
    let text = "[global]\nioengine=libaio\nbuffered=0\nrw=randread\nbs=64k\nsize=1m\ndirectory=DIR\n\
                [file1]\niodepth=4\n[file2]\niodepth=32\n[file3]\niodepth=8\n";
    same_shape_as_fio("aio-read", text, 3, 1);
}

/// new_group without a stonewall, and group_reporting merging only within a group.
#[test]
fn group_reporting_merges_per_group() {
    let text = "[global]\nioengine=null\nsize=1m\ngroup_reporting\n\
                [a]\nnumjobs=2\n[b]\n[c]\nnew_group\nnumjobs=2\n[d]\nstonewall\n";
    same_shape_as_fio("group-reporting", text, 3, 3);
}

/// bssplit, rate per direction, loops, fsync, end_fsync, thinktime, norandommap, randrepeat,
/// a filename list and nrfiles, psync and pvsync2: all in one file, as a tutorial might.
#[test]
fn tutorial_options_together() {
    let text = "[global]\ndirect=1\nsize=1m\ndirectory=DIR\n\
                [split]\nrw=randrw\nbssplit=4k/60:16k/40,64k\nioengine=libaio\niodepth=4\nnorandommap\nrandrepeat=0\n\
                rate_iops=4000\n[paced]\nrw=write\nrate=,4m\nfsync=8\nend_fsync=1\nioengine=psync\n\
                [list]\nnew_group\nfilename=one:two\nrw=read\nloops=2\nthinktime=10\nioengine=pvsync2\n\
                [many]\nnrfiles=3\nrw=randwrite\nstartdelay=0\nioengine=io_uring\n";
    same_shape_as_fio("tutorial", text, 4, 2);
}

/// Like basic-verify.fio plus a second phase that reads back with verify on.
#[test]
fn verify_jobs_like_basic_verify() {
    let text = "[global]\ndirect=1\nbs=4k\nsize=1m\nfilename=DIR/verify.img\n\
                [write-and-verify]\nrw=randwrite\nioengine=libaio\niodepth=16\nverify=crc32c\n\
                [write-md5]\nstonewall\nrw=write\nverify=md5\n";
    same_shape_as_fio("basic-verify", text, 2, 2);
}

/// Like waitfor.fio: each group waits for the one before it by name; group_reporting merges.
#[test]
fn wait_for_and_new_group_like_waitfor() {
    let text = "[global]\nthreads=1\ngroup_reporting\nfilename=DIR/data\nfilesize=1m\n\
                [writers]\nrw=write\nbs=128k\nnumjobs=2\nruntime=10\n\
                [readers]\nnew_group\nwait_for=writers\nrw=randread\nbs=4k\nnumjobs=2\nruntime=10\n\
                [writers2]\nnew_group\nwait_for=readers\nrw=randwrite\nbs=4k\nnumjobs=2\nruntime=10\n";
    same_shape_as_fio("waitfor", text, 3, 3);
}

/// wait_for: the reader verifies what the writer wrote, so it must start after it.
#[test]
fn wait_for_starts_a_job_after_the_named_one() {
    let scratch = Scratch::new("wait-for");
    let text = "[global]\nfilename=DIR/f\nsize=2m\nbs=4k\ndirect=1\nverify=md5\n\
                [writer]\nrw=write\ndo_verify=0\n[reader]\nwait_for=writer\nrw=read\n";
    let ours = tandem_json(&job_file(&scratch, "j.fio", text));
    assert_eq!((job(&ours, 1)["error"].as_i64(), job(&ours, 1)["read"]["total_ios"].as_u64()), (Some(0), Some(512)));
    assert_eq!(shape(&ours).2, [0, 0], "wait_for alone starts no group");
}

/// Like exitwhat.fio: exitall with exit_what=stonewall and =all, number_ios, thinktime and
/// byte rates per direction (jobs that would take minutes are stopped when the slow ones end).
#[test]
fn exit_what_and_number_ios_like_exitwhat() {
    let text = "[global]\nfilename=DIR/test\nfilesize=4m\nblocksize=4096\ngroup_reporting\nexitall=1\n\
                [slow1]\nrw=read\nioengine=sync\nnew_group=1\nthinktime=200\nnumber_ios=100\nexit_what=stonewall\n\
                [fast1]\nnew_group=1\nrw=randrw\nnumjobs=3\nioengine=libaio\niodepth=32\nrate=300,300,300\n\
                [slow2]\nstonewall\nrw=write\nioengine=sync\nnew_group=1\nthinktime=200\nnumber_ios=100\nexit_what=all\n\
                [fast2]\nrw=randrw\nnumjobs=3\nioengine=libaio\niodepth=32\nrate=300,300,300\n";
    same_shape_as_fio("exitwhat", text, 3, 3);
    let scratch = Scratch::new("exitwhat-counts");
    let ours = tandem_json(&job_file(&scratch, "j.fio", text));
    assert_eq!(job(&ours, 0)["read"]["total_ios"], 100, "number_ios ends slow1");
}

/// A second job file starts with a stonewall, as in fio.
#[test]
fn a_second_job_file_starts_a_new_group() {
    let scratch = Scratch::new("two-files");
    let first = job_file(&scratch, "a.fio", "[a]\nioengine=null\nsize=1m\n[b]\nioengine=null\nsize=1m\n");
    let second = job_file(&scratch, "b.fio", "[c]\nioengine=null\nsize=1m\n");
    let fio = run_program("fio", &["--output-format=json", &first, &second], &[]).ok().json();
    let ours = tandem(&["run", "--output-format=json", &first, &second]).ok().json();
    assert_eq!(shape(&ours), shape(&fio));
    assert_eq!(shape(&ours).2, [0, 0, 1]);
}

// 2. What the options do.

fn job(document: &Value, index: usize) -> &Value {
    &document["jobs"][index]
}

#[test]
fn loops_repeat_the_pass_and_fsync_counts_flushes() {
    let scratch = Scratch::new("loops");
    let text = "[w]\nfilename=DIR/f\nsize=1m\nbs=4k\nrw=write\ndirect=1\nloops=3\nfsync=4\nend_fsync=1\n";
    let ours = tandem_json(&job_file(&scratch, "j.fio", text));
    // 256 blocks a pass, 3 passes (fio counts 768 too); a flush every 4 writes and one at the end.
    assert_eq!(job(&ours, 0)["write"]["total_ios"], 768);
    assert_eq!(job(&ours, 0)["sync"]["total_ios"], 768 / 4 + 1);
}

#[test]
fn a_write_job_with_verify_reads_back_every_block() {
    let scratch = Scratch::new("verify-readback");
    let text = "[w]\nfilename=DIR/f\nsize=1m\nbs=4k\nrw=randwrite\ndirect=1\niodepth=8\nverify=md5\n";
    let ours = tandem_json(&job_file(&scratch, "j.fio", text));
    // fio's random map writes each block once; the verify phase reads each back (fio: 256 256).
    assert_eq!(
        (job(&ours, 0)["write"]["total_ios"].as_u64(), job(&ours, 0)["read"]["total_ios"].as_u64()),
        (Some(256), Some(256))
    );
    assert_eq!(job(&ours, 0)["error"], 0);
}

/// The reader sits behind a stonewall: were it to run beside the writer it would read blocks
/// without headers (the file's laid-out random bytes) and fail.
#[test]
fn stonewall_orders_a_writer_before_its_verifying_reader() {
    let scratch = Scratch::new("verify-phases");
    let text = "[global]\nfilename=DIR/f\nsize=2m\nbs=4k\ndirect=1\nverify=crc32c\n\
                [writer]\nrw=write\ndo_verify=0\n[reader]\nstonewall\nrw=randread\niodepth=4\n";
    let ours = tandem_json(&job_file(&scratch, "j.fio", text));
    assert_eq!((job(&ours, 0)["error"].as_i64(), job(&ours, 1)["error"].as_i64()), (Some(0), Some(0)));
    assert_eq!(job(&ours, 1)["read"]["total_ios"], 512);
}

#[test]
fn verify_names_the_offset_of_a_damaged_block() {
    let scratch = Scratch::new("verify-damage");
    let write = "[w]\nfilename=DIR/f\nsize=1m\nbs=4k\nrw=write\ndirect=1\nverify=crc32c\ndo_verify=0\n";
    tandem(&["run", &job_file(&scratch, "w.fio", write)]).ok();
    let mut bytes = std::fs::read(scratch.path("f")).expect("read the file");
    bytes[8192 + 1000] ^= 0xff;
    std::fs::write(scratch.path("f"), bytes).expect("damage one block");
    let read = "[r]\nfilename=DIR/f\nsize=1m\nbs=4k\nrw=read\ndirect=1\nverify=crc32c\n";
    let run = tandem(&["run", "--output-format=json", &job_file(&scratch, "r.fio", read)]).failed();
    assert!(run.stderr.contains("offset 8192"), "{}", run.stderr);
    assert_eq!(run.json()["jobs"][0]["error"], libc::EILSEQ);
}

#[test]
fn nrfiles_and_filename_lists_name_files_like_fio() {
    let scratch = Scratch::new("files");
    let text = "[global]\ndirectory=DIR\nsize=3m\nrw=write\n[gen]\nnrfiles=3\nnumjobs=2\n[list]\nfilename=a:b\n";
    tandem_json(&job_file(&scratch, "j.fio", text));
    for clone in 0..2 {
        for file in 0..3 {
            let path = scratch.path(&format!("gen.{clone}.{file}"));
            assert_eq!(std::fs::metadata(&path).map(|m| m.len()).ok(), Some(1 << 20), "{}", path.display());
        }
    }
    for name in ["a", "b"] {
        assert_eq!(std::fs::metadata(scratch.path(name)).map(|m| m.len()).ok(), Some(3 << 19), "{name}");
    }
}

#[test]
fn bssplit_sizes_are_both_used() {
    let scratch = Scratch::new("bssplit");
    let text = "[s]\nfilename=DIR/f\nsize=4m\nio_size=2m\nrw=randread\ndirect=1\nbssplit=4k/50:64k/50\n\
                ioengine=psync\niodepth=32\n";
    let ours = tandem_json(&job_file(&scratch, "j.fio", text));
    let read = &job(&ours, 0)["read"];
    let (bytes, ios) = (read["io_bytes"].as_u64().unwrap(), read["total_ios"].as_u64().unwrap());
    assert!(bytes > ios * 4096 && bytes < ios * 65536, "{ios} I/Os moved {bytes} bytes: both sizes are used");
    assert!(bytes >= 2 << 20);
}

#[test]
fn rate_and_rate_iops_together_are_refused_like_fio() {
    let scratch = Scratch::new("rates");
    let text = "[j]\nfilename=DIR/f\nsize=1m\nrw=write\nrate=1m\nrate_iops=100\n";
    let run = tandem(&["run", &job_file(&scratch, "j.fio", text)]).failed();
    assert!(run.stderr.contains("'rate_iops'") && run.stderr.contains("rate"), "{}", run.stderr);
}

/// fio's filesize: each file that size; the job moves what its files hold (fio: 2 MiB here).
#[test]
fn filesize_sizes_each_file() {
    let scratch = Scratch::new("filesize");
    let text = "[fs]\ndirectory=DIR\nnrfiles=2\nfilesize=1m\nsize=4m\nrw=write\n";
    let ours = tandem_json(&job_file(&scratch, "j.fio", text));
    assert_eq!(job(&ours, 0)["write"]["io_bytes"], 2 << 20);
    for file in ["fs.0.0", "fs.0.1"] {
        assert_eq!(std::fs::metadata(scratch.path(file)).map(|m| m.len()).ok(), Some(1 << 20), "{file}");
    }
}

/// exitall: the first job of a group to finish stops the rest of that group, not other groups.
#[test]
fn exitall_stops_the_rest_of_the_group() {
    let scratch = Scratch::new("exitall");
    let text = "[global]\nfilename=DIR/f\nsize=1m\nrw=read\n                [quick]\nioengine=null\nexitall\n[slow]\nrate_iops=10\n                [other]\nnew_group\nsize=64k\nrate_iops=200\n";
    let ours = tandem_json(&job_file(&scratch, "j.fio", text));
    // At 10 IOPS the slow reader would need 25 s for its 256 blocks; it is stopped long before.
    assert_eq!(job(&ours, 0)["read"]["total_ios"], 256);
    assert!(job(&ours, 1)["read"]["total_ios"].as_u64().unwrap() < 256);
    assert_eq!(job(&ours, 2)["read"]["total_ios"], 16, "another group runs to its end");
}

// 3. Unsupported options and values are refused by name, before any file exists.

/// Runs a job file with `line` added; it must fail naming `needle`, and create no file.
fn refused(test: &str, line: &str, needle: &str) {
    let scratch = Scratch::new(test);
    let text = format!("[j]\nfilename=DIR/f\nsize=1m\n{line}\n");
    let run = tandem(&["run", &job_file(&scratch, "j.fio", &text)]).failed();
    assert!(run.stderr.contains(&format!("'{needle}'")), "{line}: {}", run.stderr);
    assert!(!scratch.path("f").exists(), "{line}: a refused job file must not create the file");
}

macro_rules! refuses {
    ($($test:ident: $line:literal names $needle:literal;)*) => {
        $(#[test]
        fn $test() {
            refused(stringify!($test), $line, $needle);
        })*
    };
}

// Options of fio's examples/ that we do not support (see docs/fio-compat.md).
refuses! {
    refuses_flow: "flow=2" names "flow";
    refuses_flow_sleep: "flow_sleep=1000" names "flow_sleep";
    refuses_write_lat_log: "write_lat_log=prio-run.log" names "write_lat_log";
    refuses_write_bw_log: "write_bw_log" names "write_bw_log";
    refuses_zonemode: "zonemode=zbd" names "zonemode";
    refuses_random_distribution: "random_distribution=zipf:0.5" names "random_distribution";
    refuses_blockalign: "blockalign=4k" names "blockalign";
    refuses_io_submit_mode: "io_submit_mode=offload" names "io_submit_mode";
    refuses_steadystate: "steadystate=iops:10%" names "steadystate";
    refuses_ss: "ss=iops:10%" names "ss";
    refuses_numa_cpu_nodes: "numa_cpu_nodes=0" names "numa_cpu_nodes";
    refuses_dedupe_mode: "dedupe_mode=working_set" names "dedupe_mode";
    refuses_filesize_range: "filesize=1m-2m" names "1m-2m";
    refuses_wait_for_a_later_job: "wait_for=nobody" names "nobody";
    refuses_exit_what_value: "exit_what=some" names "some";
    refuses_ratemin: "ratemin=1024" names "ratemin";
    refuses_allow_file_create: "allow_file_create=0" names "allow_file_create";
    refuses_random_generator: "random_generator=lfsr" names "random_generator";
    refuses_latency_target: "latency_target=500000" names "latency_target";
    refuses_atomic: "atomic=1" names "atomic";
    refuses_verify_backlog: "verify_backlog=1" names "verify_backlog";
    refuses_cmdprio_percentage: "cmdprio_percentage=20" names "cmdprio_percentage";
    refuses_continue_on_error: "continue_on_error=write" names "continue_on_error";
    refuses_fill_device: "fill_device=1" names "fill_device";
    refuses_offset_increment: "offset_increment=1m" names "offset_increment";
}

// Values of supported options that we do not support name the option and the value.
refuses! {
    refuses_verify_crc64: "verify=crc64" names "crc64";
    refuses_verify_meta: "verify=meta" names "meta";
    refuses_rw_with_offset_modifier: "rw=read:-8k" names "read:-8k";
    refuses_engine_cpuio: "ioengine=cpuio" names "cpuio";
    refuses_engine_falloc: "ioengine=falloc" names "falloc";
    refuses_bsrange_range: "bsrange=4k-64k" names "4k-64k";
    refuses_startdelay_range: "startdelay=1-2" names "1-2";
    refuses_verify_with_mixed_rw: "rw=randrw\nverify=md5" names "verify";
}
