//! A storage daemon's side of a scenario: qemu-storage-daemon (`--compare-qemu`) or tandemd
//! (`--daemon`), started with the same command line and driven with the same QMP commands, on
//! the same files. The daemon opens source and target (raw over the file driver, io_uring,
//! O_DIRECT where the filesystem takes it) and runs blockdev-mirror over QMP (JSON lines on a
//! Unix socket). With a guest, it also exports the source over NBD and fio writes to it
//! (`--ioengine=nbd`) with a per-I/O latency log, so the guest's figures are cut to the same
//! windows as the in-process run's: the guest alone, then phase one (job start to READY) and
//! phase two (READY to the guest's end).
//!
//! A guest through NBD and one in-process differ, so only each side's ratio to its own no-job
//! baseline compares across them; two daemons' sides (`--daemon --compare-qemu`) do the same
//! work and compare directly.

use super::guest::GuestFigures;
use super::{GuestRw, GuestSpec, MirrorArgs};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SOCKET_WAIT: Duration = Duration::from_secs(10);

/// Which storage daemon runs a side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonKind {
    Qsd,
    Tandemd,
}

/// Why a daemon's program cannot be found.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(
        "tandemd is neither next to this binary ({beside}) nor on PATH: build it with \
         `cargo build --release -p tandemd` (without --release for a debug tandem-bench)"
    )]
    TandemdMissing { beside: String },
}

impl DaemonKind {
    /// The program's name, as the reports show it.
    pub fn name(self) -> &'static str {
        match self {
            DaemonKind::Qsd => "qemu-storage-daemon",
            DaemonKind::Tandemd => "tandemd",
        }
    }

    /// The program to run. tandemd is looked for next to this binary first, where cargo builds
    /// both (target/<profile>/), so a bench runs the daemon of its own build; then on PATH.
    pub fn program(self) -> Result<PathBuf, DaemonError> {
        if self == DaemonKind::Qsd {
            return Ok(PathBuf::from(self.name()));
        }
        let beside = std::env::current_exe().ok().map(|exe| exe.with_file_name(self.name()));
        if let Some(path) = beside.as_ref().filter(|path| path.is_file()) {
            return Ok(path.clone());
        }
        let on_path = std::env::var_os("PATH")
            .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join(self.name())).find(|p| p.is_file()));
        on_path.ok_or_else(|| DaemonError::TandemdMissing {
            beside: beside.map_or("unknown".into(), |p| p.display().to_string()),
        })
    }

    /// How to install the program, for a failed start.
    fn install_hint(self) -> &'static str {
        match self {
            DaemonKind::Qsd => "install qemu-system-common",
            DaemonKind::Tandemd => "cargo build --release -p tandemd",
        }
    }
}

/// What a daemon measured.
#[derive(Debug, Clone)]
pub struct DaemonReport {
    /// Which daemon ran.
    pub daemon: DaemonKind,
    /// The copy mode it was asked for.
    pub copy_mode: String,
    pub ready_s: f64,
    /// From the job's start to BLOCK_JOB_COMPLETED.
    pub complete_s: f64,
    pub mib_per_s: f64,
    /// The daemon's CPU (user + system, all its threads) from the job's start to READY.
    pub cpu_s_per_gib: f64,
    pub identical: bool,
    /// (baseline, phase1, phase2) with a guest.
    pub guest: Option<(GuestFigures, GuestFigures, GuestFigures)>,
    /// The job's `len` in its BLOCK_JOB_READY.
    pub ready_len_bytes: u64,
    /// The target's allocated bytes after the job (SEEK_DATA), for a file target.
    pub target_allocated_bytes: Option<u64>,
}

/// The name the callers had when only QEMU ran this way.
pub type QemuReport = DaemonReport;

impl DaemonReport {
    pub fn to_json(&self) -> Value {
        let mut value = json!({
            "daemon": self.daemon.name(),
            "copy_mode": self.copy_mode,
            "ready_s": self.ready_s,
            "complete_s": self.complete_s,
            "mib_per_s": self.mib_per_s,
            "cpu_s_per_gib": self.cpu_s_per_gib,
            "identical": self.identical,
            "ready_len_bytes": self.ready_len_bytes,
            "target_allocated_bytes": self.target_allocated_bytes,
        });
        if let Some(guest) = &self.guest {
            value["guest"] = super::guest::phases_json(guest);
        }
        value
    }
}

/// The running daemon and its QMP connection.
pub(crate) struct Daemon {
    kind: DaemonKind,
    child: Reaped,
    qmp: BufReader<UnixStream>,
    dir: tempfile::TempDir,
}

fn direct_ok(path: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).is_ok()
}

/// Node `name`: raw over a file node `name-file`. Two flat nodes rather than one with `file`
/// nested: both daemons take this form.
fn blockdevs(name: &str, path: &Path) -> [String; 4] {
    use std::os::unix::fs::FileTypeExt;
    let device = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
    let driver = if device { "host_device" } else { "file" };
    let file_node = format!("{name}-file");
    let file = json!({"node-name": file_node, "driver": driver, "filename": path,
        "cache": {"direct": direct_ok(path)}, "aio": "io_uring"});
    let raw = json!({"node-name": name, "driver": "raw", "file": file_node});
    ["--blockdev".into(), file.to_string(), "--blockdev".into(), raw.to_string()]
}

impl Daemon {
    /// Start `kind` on source (node `src`, exported over NBD as `src`) and target (`dst`),
    /// with a QMP monitor, and negotiate QMP.
    pub(crate) fn start(kind: DaemonKind, source: &Path, target: &Path) -> Result<Daemon, String> {
        let program = kind.program().map_err(|e| e.to_string())?;
        let dir = tempfile::Builder::new().prefix("tandem-daemon-").tempdir().map_err(|e| e.to_string())?;
        let (qmp_path, nbd_path) = (dir.path().join("qmp.sock"), dir.path().join("nbd.sock"));
        let child = Command::new(&program)
            .args(blockdevs("src", source))
            .args(blockdevs("dst", target))
            .args(["--nbd-server", &format!("addr.type=unix,addr.path={}", nbd_path.display())])
            .args(["--export", "type=nbd,id=e0,node-name=src,name=src,writable=on"])
            .args(["--chardev", &format!("socket,id=qmp,path={},server=on,wait=off", qmp_path.display())])
            .args(["--monitor", "chardev=qmp"])
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {} ({}): {e}", program.display(), kind.install_hint()))?;
        let mut child = Reaped(child);
        let deadline = Instant::now() + SOCKET_WAIT;
        let stream = loop {
            if let Ok(stream) = UnixStream::connect(&qmp_path) {
                if nbd_path.exists() {
                    break stream;
                }
            }
            let exited = child.0.try_wait().ok().flatten();
            if Instant::now() > deadline || exited.is_some() {
                let how = exited.map_or("still running".to_string(), |status| status.to_string());
                return Err(format!("{} did not open its QMP and NBD sockets ({how})", kind.name()));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut daemon = Daemon { kind, child, qmp: BufReader::new(stream), dir };
        daemon.read()?; // the greeting
        daemon.execute("qmp_capabilities", json!({}))?;
        Ok(daemon)
    }

    fn nbd_uri(&self) -> String {
        format!("nbd+unix:///src?socket={}", self.dir.path().join("nbd.sock").display())
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.qmp.read_line(&mut line) {
            Ok(0) => Err(format!("{} closed QMP", self.kind.name())),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("QMP sent {line:?}: {e}")),
            Err(e) => Err(format!("reading QMP: {e}")),
        }
    }

    /// Run a command; events that arrive meanwhile are dropped (the caller waits for events
    /// only once nothing else is pending).
    pub(crate) fn execute(&mut self, name: &str, arguments: Value) -> Result<Value, String> {
        let line = json!({"execute": name, "arguments": arguments}).to_string() + "\n";
        self.qmp.get_mut().write_all(line.as_bytes()).map_err(|e| format!("writing QMP: {e}"))?;
        loop {
            let message = self.read()?;
            if let Some(error) = message.get("error") {
                return Err(format!("{} QMP {name}: {error}", self.kind.name()));
            }
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
        }
    }

    /// The first of `names` to arrive, with its time; a job error or end ends the wait too.
    pub(crate) fn wait_event(&mut self, names: &[&str]) -> Result<(String, Instant), String> {
        self.wait_event_data(names).map(|(event, at, _)| (event, at))
    }

    /// As `wait_event`, with the event's `data`.
    pub(crate) fn wait_event_data(&mut self, names: &[&str]) -> Result<(String, Instant, Value), String> {
        loop {
            let message = self.read()?;
            let Some(event) = message.get("event").and_then(Value::as_str) else { continue };
            if names.contains(&event) || event == "BLOCK_JOB_COMPLETED" || event == "BLOCK_JOB_ERROR" {
                let data = message.get("data").cloned().unwrap_or(Value::Null);
                return Ok((event.to_string(), Instant::now(), data));
            }
        }
    }

    /// CPU seconds the daemon has used so far (utime + stime from /proc).
    pub(crate) fn cpu_s(&self) -> f64 {
        crate::procstat::cpu_s(self.child.0.id())
    }

    pub(crate) fn quit(mut self) -> Result<(), String> {
        let _ = self.execute("quit", json!({}));
        self.child.0.wait().map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// A daemon's process, killed when dropped still running: a side that fails half-way (a QMP
/// error, a failed guest) leaves no daemon behind holding the images.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// fio as a daemon's guest, over NBD, logging every completion's latency with its wall time.
pub(crate) struct FioGuest {
    child: Child,
    log_prefix: PathBuf,
    dir: PathBuf,
}

impl FioGuest {
    pub(crate) fn start(daemon: &Daemon, spec: &GuestSpec, size_bytes: u64, tag: &str) -> Result<FioGuest, String> {
        let dir = daemon.dir.path().to_path_buf();
        let log_prefix = dir.join(format!("lat-{tag}"));
        let rw = match spec.rw {
            GuestRw::RandWrite => "randwrite",
            GuestRw::RandRead => "randread",
            GuestRw::RandRw => "randrw",
        };
        let mut command = Command::new("fio");
        command
            .args(["--name=guest", "--ioengine=nbd", &format!("--uri={}", daemon.nbd_uri())])
            .args([
                format!("--rw={rw}"),
                format!("--bs={}", spec.block_size_bytes),
                format!("--iodepth={}", spec.iodepth),
            ])
            .args([format!("--runtime={}", spec.runtime.as_secs()), "--time_based".into(), "--size=100%".into()])
            .args([format!("--filesize={size_bytes}"), format!("--write_lat_log={}", log_prefix.display())])
            .args(["--log_avg_msec=0", "--log_unix_epoch=1", "--output-format=json"])
            .arg(format!("--output={}", dir.join(format!("fio-{tag}.json")).display()))
            .stdout(Stdio::null());
        if spec.rate_iops > 0 {
            command.arg(format!("--rate_iops={}", spec.rate_iops));
        }
        let child = command.spawn().map_err(|e| format!("cannot run fio (apt-get install -y fio): {e}"))?;
        Ok(FioGuest { child, log_prefix, dir })
    }

    /// Wait for fio; every completion as (unix ms, clat ns).
    pub(crate) fn finish(mut self) -> Result<Vec<(u64, u64)>, String> {
        let status = self.child.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("fio (the guest over NBD) failed: {status}"));
        }
        let prefix = self.log_prefix.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut points = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| e.to_string())? {
            let name = entry.map_err(|e| e.to_string())?.file_name().to_string_lossy().into_owned();
            if !(name.starts_with(&format!("{prefix}_clat")) && name.ends_with(".log")) {
                continue;
            }
            let text = std::fs::read_to_string(self.dir.join(&name)).map_err(|e| e.to_string())?;
            for line in text.lines() {
                let mut fields = line.split(',').map(str::trim);
                if let (Some(Ok(at)), Some(Ok(ns))) = (fields.next().map(str::parse), fields.next().map(str::parse)) {
                    points.push((at, ns));
                }
            }
        }
        Ok(points)
    }
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Figures of the completions logged in `[from_ms, to_ms)`.
pub(crate) fn window(points: &[(u64, u64)], from_ms: u64, to_ms: u64) -> GuestFigures {
    let mut latencies: Vec<u64> = points.iter().filter(|(at, _)| (from_ms..to_ms).contains(at)).map(|p| p.1).collect();
    if latencies.is_empty() || to_ms <= from_ms {
        return GuestFigures::default();
    }
    latencies.sort_unstable();
    let quantile = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)] as f64 / 1000.0;
    GuestFigures {
        iops: latencies.len() as f64 / ((to_ms - from_ms) as f64 / 1000.0),
        clat_p50_us: quantile(0.5),
        clat_p99_us: quantile(0.99),
    }
}

/// The copy mode `kind` is asked for. tandemd takes ours as it is. QEMU has only background
/// and write-blocking: write-behind runs against its write-blocking (both send every guest
/// write to the target during the copy, so both converge under a busy guest), and auto against
/// its background (auto is background while the copier keeps up, and QEMU's default).
pub(crate) fn copy_mode(kind: DaemonKind, args: &MirrorArgs) -> Result<&'static str, String> {
    match (kind, args.copy_mode.as_str()) {
        (_, "background") => Ok("background"),
        (_, "write-blocking") => Ok("write-blocking"),
        (DaemonKind::Tandemd, "write-behind") => Ok("write-behind"),
        (DaemonKind::Tandemd, "auto") => Ok("auto"),
        (DaemonKind::Qsd, "write-behind") => Ok("write-blocking"),
        (DaemonKind::Qsd, "auto") => Ok("background"),
        (_, other) => Err(format!("--copy-mode {other}: expected background, write-blocking, write-behind or auto")),
    }
}

/// blockdev-mirror's arguments for `kind`: the same for both daemons but for tandemd's
/// extensions (any copy mode, copy-priority).
fn mirror_arguments(kind: DaemonKind, args: &MirrorArgs) -> Result<Value, String> {
    let mut mirror = json!({
        "job-id": "j", "device": "src", "target": "dst", "sync": args.sync, "copy-mode": copy_mode(kind, args)?,
        "granularity": args.granularity, "buf-size": args.copy_sizes().0, "speed": args.speed,
    });
    if kind == DaemonKind::Tandemd {
        mirror["copy-priority"] = json!(args.copy_priority);
    }
    Ok(mirror)
}

/// The guest alone: fio over NBD through `kind` with no job.
pub(crate) fn baseline(
    kind: DaemonKind,
    args: (&Path, &Path, u64),
    spec: &GuestSpec,
    note: &dyn Fn(String),
) -> Result<GuestFigures, String> {
    let (source, target, size_bytes) = args;
    note(format!("{} baseline: fio over NBD alone for {} s", kind.name(), spec.runtime.as_secs()));
    let daemon = Daemon::start(kind, source, target)?;
    let started_ms = unix_ms();
    let points = FioGuest::start(&daemon, spec, size_bytes, "baseline")?.finish()?;
    daemon.quit()?;
    Ok(window(&points, started_ms, started_ms + spec.runtime.as_millis() as u64))
}

/// Run the mirror scenario through `kind` on a fresh target. The source must hold the same
/// data as for the other side's run.
pub fn run_daemon(
    kind: DaemonKind,
    args: &MirrorArgs,
    guest: Option<GuestSpec>,
    images: &crate::images::Images,
    note: &dyn Fn(String),
) -> Result<DaemonReport, String> {
    let mirror = mirror_arguments(kind, args)?;
    let files = (args.source.as_path(), args.target.as_path(), args.size);
    let baseline = guest.as_ref().map(|spec| baseline(kind, files, spec, note)).transpose()?;
    images.refresh_target(note).map_err(|e| e.to_string())?;
    let mut daemon = Daemon::start(kind, &args.source, &args.target)?;
    let fio = match &guest {
        Some(spec) => {
            let fio = FioGuest::start(&daemon, spec, args.size, "job")?;
            std::thread::sleep(super::JOB_DELAY);
            Some(fio)
        }
        None => None,
    };
    note(format!("{}: blockdev-mirror {mirror}", kind.name()));
    if args.target_is_zero != "detect" {
        // QEMU 10.1 has target-is-zero; the 10.0 these machines run refuses it, and both
        // daemons get the same arguments (without it tandemd asks the target's block status).
        note(format!("note: {}'s side runs without target-is-zero, as QEMU before 10.1 must", kind.name()));
    }
    let (cpu_before, started, started_ms) = (daemon.cpu_s(), Instant::now(), unix_ms());
    daemon.execute("blockdev-mirror", mirror)?;
    let (event, ready_at, ready) = daemon.wait_event_data(&["BLOCK_JOB_READY"])?;
    if event != "BLOCK_JOB_READY" {
        return Err(format!("{}'s mirror ended with {event} before READY", kind.name()));
    }
    let cpu_s = daemon.cpu_s() - cpu_before;
    let ready_s = ready_at.duration_since(started).as_secs_f64();
    let guest = match (fio, baseline, &guest) {
        (Some(fio), Some(baseline), Some(spec)) => {
            let (points, ready_ms) = (fio.finish()?, started_ms + (ready_s * 1000.0) as u64);
            let end_ms = started_ms - super::JOB_DELAY.as_millis() as u64 + spec.runtime.as_millis() as u64;
            Some((baseline, window(&points, started_ms, ready_ms), window(&points, ready_ms, end_ms)))
        }
        _ => None,
    };
    daemon.execute("block-job-complete", json!({"device": "j"}))?;
    let (event, completed_at) = daemon.wait_event(&["BLOCK_JOB_COMPLETED"])?;
    if event != "BLOCK_JOB_COMPLETED" {
        return Err(format!("{}'s mirror sent {event} while completing", kind.name()));
    }
    daemon.quit()?;
    let gib = args.size as f64 / (1u64 << 30) as f64;
    Ok(DaemonReport {
        daemon: kind,
        copy_mode: copy_mode(kind, args)?.to_string(),
        ready_s,
        complete_s: completed_at.duration_since(started).as_secs_f64(),
        mib_per_s: args.size as f64 / (1 << 20) as f64 / ready_s.max(1e-9),
        cpu_s_per_gib: cpu_s / gib,
        identical: super::qemu_img_identical(&args.source, &args.target, args.size)?,
        guest,
        ready_len_bytes: ready.get("len").and_then(Value::as_u64).unwrap_or(0),
        target_allocated_bytes: super::allocated_bytes(&args.target),
    })
}
