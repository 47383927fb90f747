//! tandemd driven by the clients its users run, unchanged: Python scripts on QEMU's own QMP
//! library (`qemu.qmp`, from pip) that drive a mirror, an incremental backup chain through
//! transactions, and a pull-mode backup read with nbdcopy and nbdinfo. Each script runs against
//! qemu-storage-daemon and against tandemd in the same test, which shows both that it is a
//! valid QEMU client and that both daemons answer it alike and send the same events in the
//! same order. And a SIGKILL in the middle of a job that records a persistent bitmap.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DISK_BYTES: usize = 16 << 20;
const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/qmp_scripts");

fn scratch_dir() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new().prefix("qemu-clients-").tempdir_in(&base).unwrap()
}

/// The same pseudo-random bytes for both daemons' runs.
fn random_image(path: &Path, seed: u64) {
    let mut state = seed;
    let mut bytes = Vec::with_capacity(DISK_BYTES);
    while bytes.len() < DISK_BYTES {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

fn empty_image(path: &Path) {
    std::fs::File::create(path).unwrap().set_len(DISK_BYTES as u64).unwrap();
}

/// A daemon with one QMP monitor on `DIR/qmp.sock`, stopped with SIGTERM when dropped.
struct Daemon {
    child: Child,
    qmp: PathBuf,
}

impl Daemon {
    fn start(program: &str, dir: &Path, extra: &[String]) -> Daemon {
        let qmp = dir.join("qmp.sock");
        let chardev = format!("socket,id=qmp,path={},server=on,wait=off", qmp.display());
        let mut child = Command::new(program)
            .args(["--chardev", &chardev, "--monitor", "chardev=qmp"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        // Connectable, not only present: a killed daemon's dead socket may be there first.
        while UnixStream::connect(&qmp).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("{program} exited early ({status}): {}", stderr_of(&mut child));
            }
            assert!(Instant::now() < deadline, "{program} never made its QMP socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon { child, qmp }
    }

    /// SIGTERM, wait, and what it said on stderr.
    fn stop(mut self) -> String {
        terminate(&self.child);
        let _ = self.child.wait();
        stderr_of(&mut self.child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        terminate(&self.child);
        let _ = self.child.wait();
    }
}

fn terminate(child: &Child) {
    // SAFETY: kill on a child we spawned and have not reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(stderr) = child.stderr.as_mut() {
        let _ = std::io::Read::read_to_string(stderr, &mut text);
    }
    text
}

fn tandemd() -> &'static str {
    env!("CARGO_BIN_EXE_tandemd")
}

/// Run a script of `qmp_scripts/` with `args`; its JSON report.
fn script(name: &str, args: &[&Path]) -> Value {
    let ready = Command::new("python3").args(["-c", "import qemu.qmp"]).status();
    assert!(
        ready.is_ok_and(|s| s.success()),
        "these tests need Python's qemu.qmp: scripts/install-test-deps installs it (python3 -m pip install qemu.qmp)"
    );
    let output = Command::new("python3").arg(name).args(args).current_dir(SCRIPTS).output().expect("python3");
    assert!(output.status.success(), "{name} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{name} printed no report ({e})"))
}

/// Run `name` against qemu-storage-daemon and tandemd, each in a fresh directory that
/// `prepare` fills; both reports.
fn both(name: &str, prepare: impl Fn(&Path), args: impl Fn(&Path) -> Vec<PathBuf>) -> (Value, Value) {
    let mut reports = Vec::new();
    for program in ["qemu-storage-daemon", tandemd()] {
        let dir = scratch_dir();
        prepare(dir.path());
        let daemon = Daemon::start(program, dir.path(), &[]);
        let mut script_args = vec![daemon.qmp.clone()];
        script_args.extend(args(dir.path()));
        let paths: Vec<&Path> = script_args.iter().map(PathBuf::as_path).collect();
        reports.push(script(name, &paths));
        daemon.stop();
    }
    let tandem = reports.pop().expect("two reports");
    (reports.pop().expect("two reports"), tandem)
}

/// The events QEMU defines (ours, such as MIRROR_COPY_MODE_CHANGE, are extensions), without
/// the pause QEMU's transaction gives a job it starts (its drained section pauses and resumes
/// it; Tandem's transaction holds no job still): the order both daemons must agree on.
fn qemu_events(report: &Value) -> Vec<String> {
    let events: Vec<String> =
        report["events"].as_array().unwrap().iter().map(|e| e.as_str().unwrap().to_string()).collect();
    let mut out: Vec<String> = Vec::new();
    let mut index = 0;
    while index < events.len() {
        let blip = events[index] == "JOB_STATUS_CHANGE:paused"
            && events.get(index + 1).is_some_and(|e| e == "JOB_STATUS_CHANGE:running")
            && out.last().is_some_and(|e| e == "JOB_STATUS_CHANGE:running");
        if blip {
            index += 2;
            continue;
        }
        if events[index] != "MIRROR_COPY_MODE_CHANGE" {
            out.push(events[index].clone());
        }
        index += 1;
    }
    out
}

fn identical(a: &Path, b: &Path) -> bool {
    let status = Command::new("qemu-img").args(["compare", "-q", "-f", "raw", "-F", "raw"]).arg(a).arg(b).status();
    status.expect("qemu-img").success()
}

#[test]
fn a_mirror_script_runs_unchanged_against_both_daemons() {
    let prepare = |dir: &Path| {
        random_image(&dir.join("src.img"), 1);
        empty_image(&dir.join("dst.img"));
    };
    let args = |dir: &Path| vec![dir.join("src.img"), dir.join("dst.img"), dir.join("nbd.sock")];
    let (qsd, tandem) = both("mirror_flow.py", prepare, args);
    assert_eq!(qemu_events(&tandem), qemu_events(&qsd), "tandemd: {tandem}\nqsd: {qsd}");
    assert_eq!(tandem["errors"], qsd["errors"], "the same error classes and texts");
    assert!(qemu_events(&tandem).contains(&"BLOCK_JOB_READY".to_string()));
}

#[test]
fn the_mirror_scripts_copy_is_identical_on_tandemd() {
    let dir = scratch_dir();
    random_image(&dir.path().join("src.img"), 2);
    empty_image(&dir.path().join("dst.img"));
    let daemon = Daemon::start(tandemd(), dir.path(), &[]);
    let (src, dst, nbd) = (dir.path().join("src.img"), dir.path().join("dst.img"), dir.path().join("nbd.sock"));
    let report = script("mirror_flow.py", &[&daemon.qmp, &src, &dst, &nbd]);
    daemon.stop();
    assert!(report["events"].as_array().unwrap().iter().any(|e| e == "MIRROR_COPY_MODE_CHANGE"), "{report}");
    assert!(identical(&src, &dst), "source and target after the mirror and the guest's writes");
}

#[test]
fn an_incremental_backup_script_restores_every_instant_on_both_daemons() {
    let prepare = |dir: &Path| {
        random_image(&dir.join("src.img"), 3);
        for name in ["full", "inc1", "inc2"] {
            empty_image(&dir.join(format!("{name}.img")));
        }
    };
    let (qsd, tandem) = both("incremental_flow.py", prepare, |dir| vec![dir.to_path_buf()]);
    assert_eq!(qsd["restored"], json!([true, true, true]), "QEMU's own chain: {qsd}");
    assert_eq!(tandem["restored"], json!([true, true, true]), "full, full+inc1, full+inc1+inc2: {tandem}");
    assert_eq!(qemu_events(&tandem), qemu_events(&qsd), "tandemd: {tandem}\nqsd: {qsd}");
    for key in ["bitmaps", "aborted", "bitmaps_after_abort"] {
        assert_eq!(tandem[key], qsd[key], "{key}");
    }
}

#[test]
fn a_pull_mode_backup_reads_the_same_point_in_time_and_bitmap_on_both_daemons() {
    let prepare = |dir: &Path| {
        random_image(&dir.join("src.img"), 4);
        empty_image(&dir.join("fleece.img"));
    };
    let (qsd, tandem) = both("pull_flow.py", prepare, |dir| vec![dir.to_path_buf()]);
    assert_eq!(qsd["identical"], true, "QEMU's export is the point in time: {qsd}");
    assert_eq!(tandem["identical"], true, "nbdcopy of the export is the point in time: {tandem}");
    assert_eq!(tandem["dirty"], qsd["dirty"], "nbdinfo --map=qemu:dirty-bitmap:b0");
    assert!(!tandem["dirty"].as_array().unwrap().is_empty());
    assert_eq!(qemu_events(&tandem), qemu_events(&qsd));
}

/// A minimal QMP client for the kill test: commands one at a time, events skipped.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut qmp = Qmp { reader: BufReader::new(stream.try_clone().unwrap()), writer: stream };
        let greeting = qmp.line();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        qmp.execute("qmp_capabilities", json!({}));
        qmp
    }

    fn line(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    fn execute(&mut self, name: &str, arguments: Value) -> Value {
        let request = json!({"execute": name, "arguments": arguments}).to_string() + "\n";
        self.writer.write_all(request.as_bytes()).unwrap();
        loop {
            let message = self.line();
            if message.get("event").is_none() {
                return message;
            }
        }
    }
}

/// `--blockdev` options for a file node and a raw node over it, for each image.
fn blockdevs(images: &[(&str, &Path)]) -> Vec<String> {
    images
        .iter()
        .flat_map(|(name, path)| {
            let file = format!("driver=file,node-name={name}-file,filename={},cache.direct=on", path.display());
            let raw = format!("driver=raw,node-name={name},file={name}-file");
            ["--blockdev".to_string(), file, "--blockdev".to_string(), raw]
        })
        .collect()
}

#[test]
fn sigterm_during_a_job_cancels_it_and_saves_the_persistent_bitmap_consistent() {
    let dir = scratch_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    random_image(&src, 6);
    empty_image(&dst);
    let blockdevs = blockdevs(&[("src", &src), ("dst", &dst)]);
    let daemon = Daemon::start(tandemd(), dir.path(), &blockdevs);
    let mut qmp = Qmp::connect(&daemon.qmp);
    let added = qmp.execute("block-dirty-bitmap-add", json!({"node": "src", "name": "b0", "persistent": true}));
    assert_eq!(added["return"], json!({}), "{added}");
    let slow = json!({"job-id": "m", "device": "src", "target": "dst", "sync": "full", "speed": 1 << 20});
    assert_eq!(qmp.execute("blockdev-mirror", slow)["return"], json!({}));
    let said = daemon.stop();
    assert!(said.contains("SIGTERM"), "{said}");
    assert!(!dir.path().join("qmp.sock").exists(), "the monitor's socket is removed");
    let restarted = Daemon::start(tandemd(), dir.path(), &blockdevs);
    let mut qmp = Qmp::connect(&restarted.qmp);
    let nodes = qmp.execute("query-named-block-nodes", json!({}));
    let file = nodes["return"].as_array().unwrap().iter().find(|n| n["node-name"] == "src-file").unwrap().clone();
    assert_eq!(file["dirty-bitmaps"][0]["inconsistent"], false, "saved consistent at the clean stop: {file}");
    assert_eq!(qmp.execute("query-jobs", json!({}))["return"], json!([]));
}

#[test]
fn a_sigkill_during_a_job_leaves_the_persistent_bitmap_inconsistent_and_the_restart_says_so() {
    let dir = scratch_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    random_image(&src, 5);
    empty_image(&dst);
    let blockdevs = blockdevs(&[("src", &src), ("dst", &dst)]);
    let mut daemon = Daemon::start(tandemd(), dir.path(), &blockdevs);
    let mut qmp = Qmp::connect(&daemon.qmp);
    let added = qmp.execute("block-dirty-bitmap-add", json!({"node": "src", "name": "b0", "persistent": true}));
    assert_eq!(added["return"], json!({}), "{added}");
    let slow = json!({"job-id": "m", "device": "src", "target": "dst", "sync": "full", "speed": 1 << 20});
    assert_eq!(qmp.execute("blockdev-mirror", slow)["return"], json!({}));
    let jobs = qmp.execute("query-jobs", json!({}));
    assert_eq!(jobs["return"][0]["status"], "running", "killed in the middle of the job: {jobs}");
    // SAFETY: kill on our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGKILL) };
    let _ = daemon.child.wait();
    drop(daemon);
    let sidecar = dir.path().join("src.img.b0.bitmap");
    assert!(sidecar.exists(), "the sidecar outlives the process");
    assert!(dir.path().join("qmp.sock").exists(), "the killed daemon's socket is left: the restart replaces it");
    let restarted = Daemon::start(tandemd(), dir.path(), &blockdevs);
    let mut qmp = Qmp::connect(&restarted.qmp);
    let nodes = qmp.execute("query-named-block-nodes", json!({}));
    let file = nodes["return"].as_array().unwrap().iter().find(|n| n["node-name"] == "src-file").unwrap().clone();
    assert_eq!(file["dirty-bitmaps"][0]["name"], "b0");
    assert_eq!(file["dirty-bitmaps"][0]["inconsistent"], true, "{file}");
    let refused = qmp
        .execute("blockdev-backup", json!({"device": "src", "target": "dst", "sync": "incremental", "bitmap": "b0"}));
    assert!(refused["error"]["desc"].as_str().unwrap().contains("b0"), "{refused}");
    let said = restarted.stop();
    assert!(said.contains("persistent bitmap 'b0' loaded as inconsistent"), "{said}");
}
