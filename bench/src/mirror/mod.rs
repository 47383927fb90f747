//! `tandem-bench mirror`: one mirror job on real files, measured. With a guest (fio's words:
//! `--guest-rw randwrite --guest-bs 4k --guest-iodepth 16 [--guest-rate-iops N]
//! --guest-runtime 20`) it first runs the guest alone (the baseline), then again with the
//! mirror started a second in: phase one runs to READY, phase two holds READY until the guest
//! stops. Then it completes the job and checks with `qemu-img compare` that source and target
//! are identical. Guest figures per phase count only completions inside that phase.

pub(crate) mod guest;
mod plot;
pub(crate) mod qemu;
pub(crate) mod rbd;

pub use guest::{GuestArgs, GuestFigures, GuestRecord, GuestRw, GuestSpec};
pub use qemu::{DaemonKind, DaemonReport, QemuReport};

use crate::fio;
use crate::runner::rusage;
use serde_json::json;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::block::{BlockDriver, Disk};
use tandem::job::mirror::{CopyMode, CopyPriority, MirrorConfig, SyncMode};
use tandem::job::{Job, JobStatus};
use tandem::reactor::{Config, Runtime};
use tandem_drivers::{FileDriver, FileOptions};

/// The job starts this long after the guest, so phase one starts from a running guest.
pub(crate) const JOB_DELAY: Duration = Duration::from_secs(1);
/// Longest the bench waits for READY or the end before it gives up.
const JOB_WAIT_MAX: Duration = Duration::from_secs(3600);

#[derive(clap::Args, Debug, Clone)]
pub struct MirrorArgs {
    /// Source: a file or block device. When missing it is created with --size bytes of random
    /// data (and removed afterwards unless --keep); an existing one is used as it is, its size
    /// is the disk's, and a guest that writes needs --overwrite-source.
    #[arg(long, default_value = "target/tandem-mirror/source.img")]
    pub source: PathBuf,
    /// Target: a file, block device, NBD export (`nbd://HOST[:PORT]/EXPORT`,
    /// `nbd+unix:///EXPORT?socket=PATH`; needs --overwrite-target) or `rbd:POOL/IMAGE[:conf=...]` (QEMU's spelling, a Ceph
    /// RBD image). When missing it is created (a preallocated file, a new image) and removed
    /// afterwards unless --keep; an existing one needs --overwrite-target and is never removed.
    /// On a filesystem that refuses O_DIRECT, such as /dev/shm, it is opened through the page
    /// cache (with a note).
    #[arg(long, default_value = "target/tandem-mirror/target.img")]
    pub target: PathBuf,
    /// Size of a source the bench creates, fio syntax (an existing source keeps its own).
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    pub size: u64,
    /// Keep the images the bench created (it never removes one it found).
    #[arg(long)]
    pub keep: bool,
    /// Let the guest (--guest-rw randwrite or randrw) write an existing --source.
    #[arg(long = "overwrite-source")]
    pub overwrite_source: bool,
    /// Let the job overwrite an existing --target (file, block device or rbd image) that is at
    /// least as large as the source.
    #[arg(long = "overwrite-target")]
    pub overwrite_target: bool,
    /// full, top, none or bitmap.
    #[arg(long, default_value = "full")]
    pub sync: String,
    /// background, write-blocking, write-behind or auto.
    #[arg(long = "copy-mode", default_value = "background")]
    pub copy_mode: String,
    /// guest, balanced or job: who goes first on the device (see docs/jobs.md).
    #[arg(long = "copy-priority", default_value = "guest")]
    pub copy_priority: String,
    /// Dirty-tracking chunk, fio size syntax.
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub granularity: u64,
    /// Copy buffer bytes in flight, fio size syntax [default: 16M; 64M for an rbd target].
    #[arg(long = "buf-size", value_parser = parse_size)]
    pub buf_size: Option<u64>,
    /// Bytes one copy moves at most, fio size syntax [default: 1M; 2M for an rbd target].
    #[arg(long = "max-chunk", value_parser = parse_size)]
    pub max_chunk: Option<u64>,
    /// Copy operations in flight at most [default: 16; 32 for an rbd target].
    #[arg(long = "max-in-flight")]
    pub max_in_flight: Option<usize>,
    /// Copy speed limit in bytes/s, fio size syntax (0: none).
    #[arg(long, default_value = "0", value_parser = parse_size_or_zero)]
    pub speed: u64,
    /// The guest, in fio's words.
    #[command(flatten)]
    pub guest: GuestArgs,
    /// normal or json.
    #[arg(long = "output-format", default_value = "normal")]
    pub output_format: String,
    /// Draw dirty MiB, copy MiB/s, guest IOPS and guest p99 over time into this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Then run the same scenario through qemu-storage-daemon on the same files (its guest is
    /// fio over NBD) and print both side by side. QEMU has no write-behind or auto: it runs
    /// write-blocking against write-behind and background against auto. With an rbd target:
    /// time `rbd import` and, where QEMU's rbd module is installed, `qemu-img convert -n -W -m
    /// 16` into the image.
    #[arg(long = "compare-qemu")]
    pub compare_qemu: bool,
    /// Run Tandem's side through tandemd (next to this binary, else on PATH), driven over QMP
    /// with fio over NBD as its guest exactly as QEMU's side is, instead of in-process. With
    /// --compare-qemu both daemons then do the same work on the same files. tandemd gets
    /// --copy-mode and --copy-priority; a file or block-device target only; no --plot or --verify.
    #[arg(long)]
    pub daemon: bool,
    /// Reactor cores.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub cores: u64,
    /// on: the target reads as zeros, so the job skips what the source reads as zeros
    /// (QEMU 10.1's target-is-zero); off: copy everything; detect: ask the target's block
    /// status. A bare --target-is-zero means on.
    #[arg(long = "target-is-zero", default_value = "detect", default_missing_value = "on", num_args = 0..=1)]
    pub target_is_zero: String,
    /// off, sample or full: compare source and target before the switch-over.
    #[arg(long, default_value = "off")]
    pub verify: String,
    /// Create a missing --target sparse (all holes, as `qemu-img create` makes one) instead of
    /// preallocated: with a sparse source the job then moves only data (see --target-is-zero).
    #[arg(long = "sparse-target")]
    pub sparse_target: bool,
}

/// `--target-is-zero`'s value as the job's option (`None`: detect).
pub(crate) fn parse_target_is_zero(text: &str) -> Result<Option<bool>, String> {
    match text {
        "on" => Ok(Some(true)),
        "off" => Ok(Some(false)),
        "detect" => Ok(None),
        other => Err(format!("--target-is-zero {other}: expected on, off or detect")),
    }
}

/// The allocated bytes of a regular file by SEEK_DATA/SEEK_HOLE; `None` for anything else
/// (a block device, an rbd image, an NBD export) or when it cannot be read.
pub(crate) fn allocated_bytes(path: &Path) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).ok()?;
    if !file.metadata().ok()?.file_type().is_file() {
        return None;
    }
    let (mut at, mut total) = (0i64, 0u64);
    loop {
        // SAFETY: lseek on a file we own; no memory involved.
        let data = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            return Some(total); // ENXIO: no data after `at`
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < data {
            return None;
        }
        total += (hole - data) as u64;
        at = hole;
    }
}

impl MirrorArgs {
    /// Buffer bytes, chunk bytes and copies in flight: the user's, else the defaults for the
    /// target. A copy into Ceph crosses the network stack and an OSD: on the single-node test
    /// cluster 1 MiB x 16 moved 377 MiB/s into an image where 2 MiB x 32 in 64 MiB moved
    /// 960-1430 (see docs/ceph.md).
    pub fn copy_sizes(&self) -> (u64, u64, usize) {
        let rbd = self.target.to_str().is_some_and(|t| t.starts_with("rbd:"));
        let (buf_bytes, chunk_bytes, ops) = if rbd { (64 << 20, 2 << 20, 32) } else { (16 << 20, 1 << 20, 16) };
        (self.buf_size.unwrap_or(buf_bytes), self.max_chunk.unwrap_or(chunk_bytes), self.max_in_flight.unwrap_or(ops))
    }

    /// The defaults of the command line, for callers that build a scenario in code.
    pub fn defaults(source: PathBuf, target: PathBuf, size: u64) -> MirrorArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: MirrorArgs,
        }
        let mut args = Wrapper::parse_from(["mirror"]).args;
        (args.source, args.target, args.size) = (source, target, size);
        args
    }
}

pub(crate) fn parse_size(value: &str) -> Result<u64, String> {
    match fio::parse_size(value).map_err(|e| e.to_string())? {
        0 => Err(format!("{value}: must be more than 0")),
        bytes => Ok(bytes),
    }
}

pub(crate) fn parse_size_or_zero(value: &str) -> Result<u64, String> {
    fio::parse_size(value).map_err(|e| e.to_string())
}

/// What one invocation measured.
#[derive(Debug, Clone)]
pub struct MirrorReport {
    pub ready_s: f64,
    pub complete_s: f64,
    pub mib_per_s: f64,
    pub cpu_s_per_gib: f64,
    pub identical: bool,
    pub copied_bytes: u64,
    /// The job's total (QMP's `len`) at READY: the whole disk, or about the data when the
    /// target reads as zeros.
    pub ready_len_bytes: u64,
    /// The target's allocated bytes after the job, for a file target.
    pub target_allocated_bytes: Option<u64>,
    /// What the job knew of the target reading as zeros, and how.
    pub target_is_zero: Option<tandem::job::TargetZero>,
    /// Bytes `--verify` compared.
    pub verified_bytes: u64,
    /// (baseline, phase1, phase2) with a guest.
    pub guest: Option<(GuestFigures, GuestFigures, GuestFigures)>,
    /// QEMU's figures for the same scenario (`--compare-qemu`).
    pub qemu: Option<QemuReport>,
    /// With `--daemon`, tandemd's own report (the fields above are taken from it).
    pub tandemd: Option<DaemonReport>,
    /// With an rbd target, `--compare-qemu` times the peers that copy a file into an image.
    pub rbd_peers: Option<rbd::RbdPeers>,
}

impl MirrorReport {
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = json!({
            "ready_s": self.ready_s,
            "complete_s": self.complete_s,
            "mib_per_s": self.mib_per_s,
            "cpu_s_per_gib": self.cpu_s_per_gib,
            "identical": self.identical,
            "copied_bytes": self.copied_bytes,
            "ready_len_bytes": self.ready_len_bytes,
            "target_allocated_bytes": self.target_allocated_bytes,
            "target_is_zero": self.target_is_zero.map(|z| json!({"is_zero": z.is_zero, "detected": z.detected})),
            "verified_bytes": self.verified_bytes,
            "tandem_side": self.tandem_side(),
        });
        if let Some(guest) = &self.guest {
            value["guest"] = guest::phases_json(guest);
            value["ratios"] = phase_ratios(guest);
        }
        if let Some(tandemd) = &self.tandemd {
            value["tandemd"] = tandemd.to_json();
        }
        if let Some(qemu) = &self.qemu {
            value["qemu"] = qemu.to_json();
            if let Some(guest) = &qemu.guest {
                value["qemu"]["ratios"] = phase_ratios(guest);
            }
            value["vs_qemu"] = json!({
                "mib_per_s": ratio(self.mib_per_s, qemu.mib_per_s),
                "cpu_s_per_gib": ratio(self.cpu_s_per_gib, qemu.cpu_s_per_gib),
            });
            if let (Some(ours), Some(theirs)) = (&self.guest, &qemu.guest) {
                // Each side's p99 against its own baseline, ours over QEMU's.
                let (ours, theirs) = (phase_ratios(ours), phase_ratios(theirs));
                for key in ["phase1_p99", "phase2_p99"] {
                    let of = |v: &serde_json::Value| v[key].as_f64().unwrap_or(0.0);
                    value["vs_qemu"][format!("{key}_x")] = json!(ratio(of(&ours), of(&theirs)));
                }
            }
        }
        if let Some(peers) = &self.rbd_peers {
            value["peers"] = peers.to_json(self.mib_per_s);
        }
        value
    }

    pub fn to_text(&self) -> String {
        let mut text = format!(
            "mirror: READY after {:.2} s, complete after {:.2} s, {:.0} MiB/s to READY, {:.2} CPU s per GiB, {}\n",
            self.ready_s,
            self.complete_s,
            self.mib_per_s,
            self.cpu_s_per_gib,
            if self.identical { "source and target identical" } else { "SOURCE AND TARGET DIFFER" }
        );
        text += &self.job_line();
        text += &format!("tandem: ran {}\n", self.side_words());
        if let Some(guest) = &self.guest {
            text += &guest_table(if self.tandemd.is_some() { "guest (NBD)" } else { "guest" }, guest);
        }
        if let Some(qemu) = &self.qemu {
            text += &format!(
                "qemu:   {}, READY after {:.2} s, {:.0} MiB/s to READY, {:.2} daemon CPU s per GiB, {}\n",
                qemu.copy_mode,
                qemu.ready_s,
                qemu.mib_per_s,
                qemu.cpu_s_per_gib,
                if qemu.identical { "source and target identical" } else { "SOURCE AND TARGET DIFFER" }
            );
            text += &format!(
                "qemu:   len at READY {} MiB, target allocated {}\n",
                qemu.ready_len_bytes >> 20,
                mib_or_unknown(qemu.target_allocated_bytes)
            );
            if let Some(guest) = &qemu.guest {
                text += &guest_table("qemu guest (NBD)", guest);
            }
            text += &format!(
                "tandem/qemu: {:.2}x MiB/s to READY, {:.2}x CPU s per GiB ({})\n",
                ratio(self.mib_per_s, qemu.mib_per_s),
                ratio(self.cpu_s_per_gib, qemu.cpu_s_per_gib),
                match self.tandemd {
                    Some(_) => "both through their daemon, fio over NBD as the guest: the same work",
                    None =>
                        "guests: compare each side's x columns, not absolute figures: QEMU's guest goes through NBD",
                }
            );
        }
        if let Some(peers) = &self.rbd_peers {
            text += &peers.to_text(self.mib_per_s);
        }
        text
    }
}

impl MirrorReport {
    /// How Tandem's side ran, as the JSON says it.
    pub fn tandem_side(&self) -> &'static str {
        match self.tandemd {
            Some(_) => "tandemd",
            None => "in-process",
        }
    }

    fn side_words(&self) -> &'static str {
        match self.tandemd {
            Some(_) => "through tandemd (QMP; fio over NBD as its guest; CPU is the daemon's)",
            None => "in-process (the guest on the same reactor; CPU is this process's)",
        }
    }

    /// The job's own line: its len at READY, the target's allocation, what it knew of the
    /// target reading as zeros, and what it verified.
    fn job_line(&self) -> String {
        let zero = match self.target_is_zero {
            Some(z) => {
                format!("{} ({})", if z.is_zero { "yes" } else { "no" }, if z.detected { "detected" } else { "given" })
            }
            None if self.tandemd.is_some() => "not reported over QMP".to_string(),
            None => "not asked (sync none)".to_string(),
        };
        let verified = match self.verified_bytes {
            0 => String::new(),
            bytes => format!(", verified {} MiB", bytes >> 20),
        };
        format!(
            "job:    len at READY {} MiB, target allocated {}, target reads as zeros: {zero}{verified}\n",
            self.ready_len_bytes >> 20,
            mib_or_unknown(self.target_allocated_bytes)
        )
    }
}

fn mib_or_unknown(bytes: Option<u64>) -> String {
    bytes.map_or("unknown (not a file)".to_string(), |bytes| format!("{} MiB", bytes >> 20))
}

pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Each phase's IOPS and p99 against the same system's baseline.
fn phase_ratios(guest: &(GuestFigures, GuestFigures, GuestFigures)) -> serde_json::Value {
    let (baseline, phase1, phase2) = guest;
    json!({
        "phase1_iops": ratio(phase1.iops, baseline.iops),
        "phase1_p99": ratio(phase1.clat_p99_us, baseline.clat_p99_us),
        "phase2_iops": ratio(phase2.iops, baseline.iops),
        "phase2_p99": ratio(phase2.clat_p99_us, baseline.clat_p99_us),
    })
}

fn guest_table(title: &str, guest: &(GuestFigures, GuestFigures, GuestFigures)) -> String {
    let (baseline, phase1, phase2) = guest;
    guest_rows(title, baseline, &[("baseline", baseline), ("phase 1", phase1), ("phase 2", phase2)])
}

/// The guest's figures per window, and each against `baseline`.
pub(crate) fn guest_rows(title: &str, baseline: &GuestFigures, rows: &[(&str, &GuestFigures)]) -> String {
    let header = ("IOPS", "p50 (us)", "p99 (us)", "IOPS x", "p99 x");
    let mut text =
        format!("{title:<18} {:>10} {:>12} {:>12} {:>10} {:>10}\n", header.0, header.1, header.2, header.3, header.4);
    for (name, f) in rows {
        text += &format!(
            "{:<18} {:>10.0} {:>12.1} {:>12.1} {:>10.2} {:>10.2}\n",
            name,
            f.iops,
            f.clat_p50_us,
            f.clat_p99_us,
            ratio(f.iops, baseline.iops),
            ratio(f.clat_p99_us, baseline.clat_p99_us)
        );
    }
    text
}

pub fn mirror_command(args: &MirrorArgs) -> Result<(), String> {
    let json = match args.output_format.as_str() {
        "json" => true,
        "normal" => false,
        other => return Err(format!("--output-format {other}: expected normal or json")),
    };
    // run_mirror removes what it created (unless --keep), never what it found.
    let report = run_mirror(args, !json)?;
    match json {
        true => println!("{}", serde_json::to_string_pretty(&report.to_json()).map_err(|e| e.to_string())?),
        false => print!("{}", report.to_text()),
    }
    let qemu_identical = report.qemu.as_ref().is_none_or(|q| q.identical);
    match (report.identical, qemu_identical) {
        (true, true) => Ok(()),
        (false, _) => Err("source and target differ after the mirror completed".into()),
        (true, false) => Err("QEMU's source and target differ after its mirror completed".into()),
    }
}

/// Options checked before any file is touched.
struct Plan {
    config: MirrorConfig,
    guest: Option<GuestSpec>,
}

fn plan(args: &MirrorArgs) -> Result<Plan, String> {
    let sync = SyncMode::parse(&args.sync).map_err(|e| e.to_string())?;
    if sync == SyncMode::Bitmap {
        return Err(
            "--sync bitmap needs a named bitmap, which the bench has no way to fill; use full, top or none".into()
        );
    }
    let config = MirrorConfig {
        sync,
        copy_mode: CopyMode::parse(&args.copy_mode).map_err(|e| e.to_string())?,
        copy_priority: CopyPriority::parse(&args.copy_priority).map_err(|e| e.to_string())?,
        granularity_bytes: args.granularity,
        buf_size_bytes: args.copy_sizes().0,
        copy_bytes_max: args.copy_sizes().1,
        copy_ops_max: args.copy_sizes().2,
        speed_bytes_per_s: args.speed,
        target_is_zero: parse_target_is_zero(&args.target_is_zero)?,
        verify: tandem::job::VerifyMode::parse(&args.verify).map_err(|e| e.to_string())?,
        ..MirrorConfig::default()
    };
    config.validate().map_err(|e| e.to_string())?;
    let guest = args.guest.spec(args.size)?;
    if !args.size.is_multiple_of(1 << 20) {
        return Err(format!("--size {}: must be a whole number of MiB", args.size));
    }
    if args.daemon {
        check_daemon_options(args)?;
    }
    Ok(Plan { config, guest })
}

/// What `--daemon` cannot do, refused before anything is created; and tandemd must exist.
fn check_daemon_options(args: &MirrorArgs) -> Result<(), String> {
    let target = args.target.display();
    if rbd::spec(&args.target)?.is_some() || crate::remote::nbd_uri(&args.target).is_some() {
        return Err(format!("--daemon with --target {target}: the daemons' side takes a file or block device"));
    }
    if let Some(plot) = &args.plot {
        return Err(format!("--plot {} with --daemon: the job's progress is sampled in-process only", plot.display()));
    }
    if args.verify != "off" {
        return Err(format!("--verify {} with --daemon: QEMU's side cannot verify; run it in-process", args.verify));
    }
    DaemonKind::Tandemd.program().map(drop).map_err(|e| e.to_string())
}

/// Check the options, then look at source and target (touching nothing): the plan for the
/// disk's real size, the arguments with that size, and what this run creates.
fn inspect_images(args: &MirrorArgs, runtime: &Runtime) -> Result<(Plan, MirrorArgs, crate::images::Images), String> {
    let plan = plan(args)?;
    let request = crate::images::Request {
        source: &args.source,
        target: &args.target,
        size_bytes: args.size,
        guest_writes: plan.guest.filter(|g| g.rw != GuestRw::RandRead).and(args.guest.guest_rw.as_deref()),
        overwrite_source: args.overwrite_source,
        overwrite_target: args.overwrite_target,
        compare_qemu: args.compare_qemu,
    };
    let mut images = crate::images::inspect(&request, runtime).map_err(|e| e.to_string())?;
    images.keep = args.keep;
    images.sparse_target = args.sparse_target;
    let sized = MirrorArgs { size: images.size_bytes, ..args.clone() };
    let plan = Plan { guest: sized.guest.spec(images.size_bytes)?, ..plan };
    Ok((plan, sized, images))
}

/// Run the scenario; the images stay (the caller removes them unless `--keep`).
pub fn run_mirror(args: &MirrorArgs, show_progress: bool) -> Result<MirrorReport, String> {
    let note = |text: String| {
        if show_progress {
            eprintln!("{text}")
        }
    };
    let runtime = Runtime::new(Config { cores: args.cores as usize, pin: false, ..Config::default() })
        .map_err(|e| e.to_string())?;
    let (plan, args, mut images) = inspect_images(args, &runtime)?;
    images.create_missing(&runtime, &note).map_err(|e| e.to_string())?;
    // The runtime (and every driver on it) ends before `images` removes what it created:
    // an rbd image still open refuses removal.
    run_on(&args, plan, &images, runtime, (show_progress, &note))
}

fn run_on(
    args: &MirrorArgs,
    plan: Plan,
    images: &crate::images::Images,
    runtime: Runtime,
    (show_progress, note): (bool, &dyn Fn(String)),
) -> Result<MirrorReport, String> {
    if args.daemon {
        // Nothing of ours holds the files while the daemons run.
        drop(runtime);
        return run_daemons(args, plan.guest, images, note);
    }
    let rbd_target = images.rbd_target.clone();
    let baseline = match plan.guest {
        Some(spec) => {
            note(format!("baseline: the guest alone for {} s", args.guest.guest_runtime));
            let disk = Disk::new(open_file(&runtime, &args.source, false, &note)?);
            let record = guest::Guest::start(&runtime, &disk, spec, 1).join();
            if let Some(e) = record.error {
                return Err(format!("guest failed in the baseline: {e}"));
            }
            Some(record.window(record.started, record.started + spec.runtime))
        }
        None => None,
    };
    let disk = Disk::new(open_file(&runtime, &args.source, false, &note)?);
    let target = match (&rbd_target, &images.nbd_target) {
        (Some(spec), _) => rbd::open(spec)?,
        (None, Some(uri)) => crate::remote::open_target(&runtime.handle(), uri)?,
        (None, None) => open_target(&runtime, &args.target, &disk, &note)?,
    };
    let guest = plan.guest.map(|spec| guest::Guest::start(&runtime, &disk, spec, 2));
    if guest.is_some() {
        std::thread::sleep(JOB_DELAY);
    }
    let usage_before = rusage();
    let job_started = Instant::now();
    let job =
        tandem::job::mirror::start(&runtime.handle(), &disk, target, plan.config.clone()).map_err(|e| e.to_string())?;
    let sampler = Sampler::start(&job);
    let status = watch(&job, "mirror", show_progress, |s| s == JobStatus::Ready || s.is_finished());
    let ready_at = Instant::now();
    let usage_ready = rusage().since(&usage_before);
    if status != JobStatus::Ready {
        if let Some(guest) = guest {
            guest.stop();
            guest.join();
        }
        return Err(format!("the mirror ended before READY: {}", job.error().unwrap_or_else(|| status.to_string())));
    }
    let copied_bytes = job.progress().done_bytes;
    // The len the job reported at READY (QEMU's figure comes from its event too).
    let ready_len_bytes = job
        .events()
        .try_iter()
        .find_map(|event| match event {
            tandem::job::JobEvent::Ready { figures, .. } => Some(figures.len),
            _ => None,
        })
        .unwrap_or(job.progress().total_bytes);
    let record = guest.map(guest::Guest::join);
    job.complete().map_err(|e| e.to_string())?;
    let status = job.wait_for(|s| s == JobStatus::Null, JOB_WAIT_MAX);
    let complete_s = job_started.elapsed().as_secs_f64();
    let samples = sampler.finish();
    if let Some(error) = job.error() {
        return Err(format!("the mirror failed while completing: {error}"));
    }
    if status != JobStatus::Null {
        return Err(format!("the mirror did not finish (status {status})"));
    }
    let info = job.info();
    drop(disk);
    drop(runtime);
    let identical = match &rbd_target {
        Some(spec) => rbd::identical(&args.source, spec, args.size)?,
        None => qemu_img_identical(&args.source, &args.target, args.size)?,
    };
    let ready_s = ready_at.duration_since(job_started).as_secs_f64();
    let gib = copied_bytes as f64 / (1u64 << 30) as f64;
    if let Some(path) = &args.plot {
        let origin = record.as_ref().map_or(job_started, |r| r.started);
        let job_ended = job_started + Duration::from_secs_f64(complete_s);
        let marks = [(job_started, "job"), (ready_at, "READY")];
        let svg = plot_run(&samples, record.as_ref(), (origin, job_ended), &marks, "dirty");
        std::fs::write(path, svg).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    let guest = match (baseline, record) {
        (Some(baseline), Some(record)) => {
            if let Some(e) = &record.error {
                return Err(format!("guest failed during the job: {e}"));
            }
            let end = record.started + plan.guest.map_or(Duration::ZERO, |g| g.runtime);
            Some((baseline, record.window(job_started, ready_at), record.window(ready_at, end)))
        }
        _ => None,
    };
    let (qemu, rbd_peers) = match (args.compare_qemu, &rbd_target) {
        (true, Some(spec)) => (None, Some(rbd::run_peers(&args.source, spec, args.size, note)?)),
        (true, None) => (Some(qemu::run_daemon(DaemonKind::Qsd, args, plan.guest, images, note)?), None),
        (false, _) => (None, None),
    };
    Ok(MirrorReport {
        qemu,
        rbd_peers,
        ready_s,
        complete_s,
        mib_per_s: copied_bytes as f64 / (1 << 20) as f64 / ready_s.max(1e-9),
        cpu_s_per_gib: (usage_ready.user_s + usage_ready.system_s) / gib.max(1e-9),
        identical,
        copied_bytes,
        ready_len_bytes,
        target_allocated_bytes: allocated_bytes(&args.target),
        target_is_zero: info.target_is_zero,
        verified_bytes: info.verified_bytes,
        guest,
        tandemd: None,
    })
}

/// `--daemon`: Tandem's side through tandemd, then with `--compare-qemu` QEMU's the same way.
fn run_daemons(
    args: &MirrorArgs,
    guest: Option<GuestSpec>,
    images: &crate::images::Images,
    note: &dyn Fn(String),
) -> Result<MirrorReport, String> {
    let tandemd = qemu::run_daemon(DaemonKind::Tandemd, args, guest, images, note)?;
    let qemu = match args.compare_qemu {
        true => Some(qemu::run_daemon(DaemonKind::Qsd, args, guest, images, note)?),
        false => None,
    };
    Ok(MirrorReport {
        ready_s: tandemd.ready_s,
        complete_s: tandemd.complete_s,
        mib_per_s: tandemd.mib_per_s,
        cpu_s_per_gib: tandemd.cpu_s_per_gib,
        identical: tandemd.identical,
        copied_bytes: args.size,
        ready_len_bytes: tandemd.ready_len_bytes,
        target_allocated_bytes: tandemd.target_allocated_bytes,
        target_is_zero: None,
        verified_bytes: 0,
        guest: tandemd.guest,
        qemu,
        rbd_peers: None,
        tandemd: Some(tandemd),
    })
}

/// The job's progress every 250 ms from its start to its end, for `--plot`.
pub(crate) struct Sampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, u64, u64)>>,
}

impl Sampler {
    pub(crate) fn start(job: &Job) -> Sampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (job, flag) = (job.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let progress = job.progress();
                samples.push((Instant::now(), progress.done_bytes, progress.total_bytes - progress.done_bytes));
                std::thread::sleep(Duration::from_millis(250));
            }
            samples
        });
        Sampler { stop, thread }
    }

    pub(crate) fn finish(self) -> Vec<(Instant, u64, u64)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// What `--plot` draws: bytes left (`left_title`), copy MiB/s, and the guest's IOPS and p99,
/// from `origin`, with `marks` (the job's start, READY) drawn as lines.
pub(crate) fn plot_run(
    samples: &[(Instant, u64, u64)],
    record: Option<&GuestRecord>,
    (origin, job_ended): (Instant, Instant),
    marks: &[(Instant, &'static str)],
    left_title: &'static str,
) -> String {
    let at = |t: Instant| t.saturating_duration_since(origin).as_secs_f64();
    let mib = (1u64 << 20) as f64;
    let dirty = samples.iter().map(|(t, _, dirty)| (at(*t), *dirty as f64 / mib)).collect();
    let rate = samples
        .windows(2)
        .map(|w| {
            let seconds = w[1].0.duration_since(w[0].0).as_secs_f64().max(1e-9);
            (at(w[1].0), (w[1].1 - w[0].1) as f64 / mib / seconds)
        })
        .collect();
    let mut series = vec![
        plot::Series { title: left_title, unit: "MiB", points: dirty },
        plot::Series { title: "copy", unit: "MiB/s", points: rate },
    ];
    if let Some(record) = record {
        let slot_s = guest::SLOT.as_secs_f64();
        let points: Vec<(f64, f64, f64)> = record
            .series()
            .iter()
            .enumerate()
            .map(|(i, (iops, p99))| (i as f64 * slot_s, *iops, *p99 / 1000.0))
            .collect();
        series.push(plot::Series { title: "guest", unit: "IOPS", points: points.iter().map(|p| (p.0, p.1)).collect() });
        series.push(plot::Series {
            title: "guest p99",
            unit: "ms",
            points: points.iter().map(|p| (p.0, p.2)).collect(),
        });
    }
    let end_s = at(job_ended);
    let end_s = record.map_or(end_s, |r| end_s.max(r.slots.len() as f64 * guest::SLOT.as_secs_f64()));
    let marks: Vec<(f64, &str)> = marks.iter().map(|(t, name)| (at(*t), *name)).collect();
    plot::svg(&series, end_s, &marks)
}

/// Wait for `until`, drawing progress (dirty bytes) on a terminal or a plain line every 5 s.
pub(crate) fn watch(job: &Job, label: &str, show: bool, until: impl Fn(JobStatus) -> bool) -> JobStatus {
    let terminal = show && std::io::stderr().is_terminal();
    let bar = terminal.then(|| {
        let bar = indicatif::ProgressBar::new(1);
        let style = indicatif::ProgressStyle::with_template(&format!("{label} [{{bar:30}}] {{percent:>3}}% {{msg}}"))
            .expect("static template")
            .progress_chars("=> ");
        bar.set_style(style);
        bar
    });
    let started = Instant::now();
    let mut last_line = started;
    loop {
        let status = job.wait_for(&until, Duration::from_millis(250));
        let progress = job.progress();
        let dirty_mib = (progress.total_bytes - progress.done_bytes) as f64 / (1 << 20) as f64;
        let message = format!("{} MiB copied, {dirty_mib:.1} MiB to copy, {status}", progress.done_bytes >> 20);
        if let Some(bar) = &bar {
            bar.set_length(progress.total_bytes.max(1));
            bar.set_position(progress.done_bytes);
            bar.set_message(message);
        } else if show && last_line.elapsed() >= Duration::from_secs(5) {
            eprintln!("{label}: {:.0} s, {message}", started.elapsed().as_secs_f64());
            last_line = Instant::now();
        }
        if until(status) || started.elapsed() > JOB_WAIT_MAX {
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            return status;
        }
    }
}

/// Create the target as a new preallocated file, as a real mirror target is: its extents
/// start unwritten, which costs the first write to each (ext4 converts it). Each system's run
/// gets its own fresh target, so neither inherits the other's written extents. Fails with
/// `AlreadyExists` rather than touch a file that is there.
pub(crate) fn new_target(path: &Path, size_bytes: u64, sparse: bool, note: &dyn Fn(String)) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let target = std::fs::OpenOptions::new().create_new(true).write(true).open(path)?;
    target.set_len(size_bytes)?;
    if sparse {
        return Ok(());
    }
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on an fd we own.
    let rc = unsafe { libc::fallocate(target.as_raw_fd(), 0, 0, size_bytes as i64) };
    if rc != 0 {
        note(format!("note: cannot preallocate {}: {}", path.display(), std::io::Error::last_os_error()));
    }
    Ok(())
}

pub(crate) fn open_file(
    runtime: &Runtime,
    path: &Path,
    allow_buffered: bool,
    note: &dyn Fn(String),
) -> Result<Arc<dyn BlockDriver>, String> {
    let options = FileOptions { allow_buffered, ..FileOptions::default() };
    let driver = FileDriver::open(&runtime.handle(), path, &options).map_err(|e| e.to_string())?;
    if !driver.is_direct() {
        note(format!("note: {} refuses O_DIRECT; the target goes through the page cache", path.display()));
    }
    Ok(Arc::new(driver))
}

/// The target, through the page cache where O_DIRECT is refused, or where its O_DIRECT
/// alignment is stricter than the source's (tmpfs takes O_DIRECT at 4 KiB on recent kernels,
/// while the guest may write 512 B blocks, which the target must take after the switch-over).
pub(crate) fn open_target(
    runtime: &Runtime,
    path: &Path,
    source: &Disk,
    note: &dyn Fn(String),
) -> Result<Arc<dyn BlockDriver>, String> {
    let driver = open_file(runtime, path, true, note)?;
    let (theirs, ours) = (driver.alignment(), source.alignment());
    if theirs.request_bytes <= ours.request_bytes && theirs.memory_bytes <= ours.memory_bytes {
        return Ok(driver);
    }
    note(format!(
        "note: {} needs {} B alignment for O_DIRECT, the source {} B: the target goes through the page cache",
        path.display(),
        theirs.request_bytes,
        ours.request_bytes
    ));
    let options = FileOptions { buffered: true, ..FileOptions::default() };
    Ok(Arc::new(FileDriver::open(&runtime.handle(), path, &options).map_err(|e| e.to_string())?))
}

/// Whether the first `size_bytes` of `a` and `b` are identical, by `qemu-img compare`. Only
/// the disk's bytes count: a target may be larger (a block device usually is), and what lies
/// past the disk's end is the user's, neither written nor compared.
pub(crate) fn qemu_img_identical(a: &Path, b: &Path, size_bytes: u64) -> Result<bool, String> {
    let output = std::process::Command::new("qemu-img")
        .args(["compare", "-q", "--image-opts"])
        .arg(image_opts(a, size_bytes)?)
        .arg(image_opts(b, size_bytes)?)
        .output()
        .map_err(|e| format!("cannot run qemu-img (install qemu-utils): {e}"))?;
    match output.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(format!("qemu-img compare failed: {}", String::from_utf8_lossy(&output.stderr).trim())),
    }
}

/// QEMU's options for the first `size_bytes` of a file, block device or NBD export, read raw.
fn image_opts(path: &Path, size_bytes: u64) -> Result<String, String> {
    match crate::remote::nbd_uri(path) {
        Some(uri) => crate::remote::qemu_image_opts(uri, size_bytes),
        None => Ok(raw_prefix(path, size_bytes)),
    }
}

/// QEMU's options for the first `size_bytes` of a file or block device, read raw.
fn raw_prefix(path: &Path, size_bytes: u64) -> String {
    use std::os::unix::fs::FileTypeExt;
    let device = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
    let protocol = if device { "host_device" } else { "file" };
    // QEMU's option syntax doubles a comma inside a value.
    let filename = path.display().to_string().replace(',', ",,");
    format!("driver=raw,size={size_bytes},file.driver={protocol},file.filename={filename}")
}
