//! `tandem-bench backup`: one backup job on real files, measured. The source is copied aside
//! first (the expected point in time). With a guest (fio's words, as for `mirror`) the guest
//! first runs alone (the baseline), then again from the instant the backup starts, so every
//! write it makes during the job lands after the point in time. At the end `qemu-img compare`
//! checks that the target equals the copy: `point_in_time_ok`. Guest figures inside the job
//! count only completions between the job's start and its end.
//!
//! `--compare-qemu` runs the same scenario through qemu-storage-daemon (`blockdev-backup`
//! over QMP, fio over NBD as its guest, started right after the job), each system on its own
//! fresh target and checked against its own point-in-time copy. Only each side's ratio to its
//! own no-job baseline compares: QEMU's guest goes through NBD.
//!
//! `--discard-source` benches fleecing instead (see docs/jobs.md): backup A, sync=none, saves
//! what the guest overwrites onto a scratch file the bench creates beside the target; backup B
//! copies A's point-in-time view to the target with `discard_source`, so the scratch shrinks
//! as B reads it. The figures are B's, plus the scratch's peak and final allocated bytes.

use crate::images::Images;
use crate::mirror::guest::{self, GuestArgs, GuestFigures, GuestRw, GuestSpec};
use crate::mirror::qemu::{baseline, unix_ms, window, Daemon, DaemonKind, FioGuest};
use crate::mirror::{
    guest_rows, open_file, open_target, parse_size, parse_size_or_zero, plot_run, qemu_img_identical, ratio, watch,
    Sampler,
};
use crate::runner::rusage;
use serde_json::json;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::block::{BlockDriver, Disk};
use tandem::job::backup::BackupConfig;
use tandem::job::{CopyPriority, Job, JobStatus, SyncMode};
use tandem::reactor::{Config, Runtime};

/// Longest the bench waits for the job to end before it gives up.
const JOB_WAIT_MAX: Duration = Duration::from_secs(3600);

#[derive(clap::Args, Debug, Clone)]
pub struct BackupArgs {
    /// Source: a file or block device. When missing it is created with --size bytes of random
    /// data (and removed afterwards unless --keep); an existing one is used as it is, its size
    /// is the disk's, and a guest that writes needs --overwrite-source.
    #[arg(long, default_value = "target/tandem-backup/source.img")]
    pub source: PathBuf,
    /// Target: a file, block device or NBD export (`nbd://HOST[:PORT]/EXPORT`,
    /// `nbd+unix:///EXPORT?socket=PATH`). When missing it is created (preallocated) and removed
    /// afterwards unless --keep; an existing one (an export always exists) needs
    /// --overwrite-target and is never removed.
    /// On a filesystem that refuses O_DIRECT, such as /dev/shm, it is opened through the page
    /// cache (with a note).
    #[arg(long, default_value = "target/tandem-backup/target.img")]
    pub target: PathBuf,
    /// Size of a source the bench creates, fio syntax (an existing source keeps its own).
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    pub size: u64,
    /// Keep the images the bench created (it never removes one it found). The point-in-time
    /// copy, made new as TARGET.point-in-time (SOURCE.point-in-time for a block-device target),
    /// is always removed.
    #[arg(long)]
    pub keep: bool,
    /// Let the guest (--guest-rw randwrite or randrw) write an existing --source.
    #[arg(long = "overwrite-source")]
    pub overwrite_source: bool,
    /// Let the job overwrite an existing --target (file or block device) that is at least as
    /// large as the source.
    #[arg(long = "overwrite-target")]
    pub overwrite_target: bool,
    /// full or top (none runs until cancelled and bitmap needs a named bitmap: not benched).
    #[arg(long, default_value = "full")]
    pub sync: String,
    /// guest, balanced or job: who goes first on the device (see docs/jobs.md).
    #[arg(long = "copy-priority", default_value = "guest")]
    pub copy_priority: String,
    /// Copy-before-write and copy unit, fio size syntax.
    #[arg(long = "cluster-size", default_value = "64K", value_parser = parse_size)]
    pub cluster_size: u64,
    /// Copy bytes in flight, fio size syntax.
    #[arg(long = "buf-size", default_value = "16M", value_parser = parse_size)]
    pub buf_size: u64,
    /// Bytes one background copy moves at most, fio size syntax.
    #[arg(long = "max-chunk", default_value = "1M", value_parser = parse_size)]
    pub max_chunk: u64,
    /// Background copies in flight at most.
    #[arg(long = "max-workers", default_value_t = 16)]
    pub max_workers: usize,
    /// Copy speed limit in bytes/s, fio size syntax (0: none).
    #[arg(long, default_value = "0", value_parser = parse_size_or_zero)]
    pub speed: u64,
    /// The guest, in fio's words.
    #[command(flatten)]
    pub guest: GuestArgs,
    /// normal or json.
    #[arg(long = "output-format", default_value = "normal")]
    pub output_format: String,
    /// Draw MiB still to copy, copy MiB/s, guest IOPS and guest p99 over time into this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Then run the same scenario through qemu-storage-daemon on the same files (its guest is
    /// fio over NBD) and print both side by side.
    #[arg(long = "compare-qemu")]
    pub compare_qemu: bool,
    /// Run Tandem's side through tandemd (next to this binary, else on PATH), driven over QMP
    /// with fio over NBD as its guest exactly as QEMU's side is, instead of in-process. With
    /// --compare-qemu both daemons then do the same work on the same files. tandemd gets
    /// --copy-priority and its own copy sizes, as QEMU gets its own; a file or block-device
    /// target only; no --plot, --verify or --discard-source.
    #[arg(long)]
    pub daemon: bool,
    /// Bench fleecing with QEMU 9.1's discard-source: a sync=none backup saves onto a scratch
    /// file (created new as TARGET.scratch, or beside the source for a block-device or NBD
    /// target, and always removed), and a second backup copies its point-in-time view to the
    /// target, discarding each copied cluster on the view so the scratch shrinks. Reports the
    /// scratch's peak and final allocated bytes and the bytes discarded. Not with --compare-qemu.
    #[arg(long = "discard-source")]
    pub discard_source: bool,
    /// Reactor cores.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub cores: u64,
    /// off, sample or full: compare the finished target with the point in time where the
    /// guest left the source alone (see docs/jobs.md).
    #[arg(long, default_value = "off")]
    pub verify: String,
}

impl BackupArgs {
    /// The defaults of the command line, for callers that build a scenario in code.
    pub fn defaults(source: PathBuf, target: PathBuf, size: u64) -> BackupArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: BackupArgs,
        }
        let mut args = Wrapper::parse_from(["backup"]).args;
        (args.source, args.target, args.size) = (source, target, size);
        args
    }
}

/// What one invocation measured.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub complete_s: f64,
    pub mib_per_s: f64,
    pub cpu_s_per_gib: f64,
    pub point_in_time_ok: bool,
    pub copied_bytes: u64,
    /// Bytes `--verify` compared (0 for QEMU, which cannot).
    pub verified_bytes: u64,
    /// (baseline, inside the job) with a guest.
    pub guest: Option<(GuestFigures, GuestFigures)>,
    /// QEMU's figures for the same scenario (`--compare-qemu`).
    pub qemu: Option<Box<BackupReport>>,
    /// `--discard-source`: what became of the scratch.
    pub fleecing: Option<FleecingFigures>,
    /// The daemon this side ran through; `None`: in-process.
    pub daemon: Option<DaemonKind>,
}

/// The scratch of a `--discard-source` run, in allocated bytes (st_blocks).
#[derive(Debug, Clone, Copy)]
pub struct FleecingFigures {
    pub scratch_peak_bytes: u64,
    pub scratch_final_bytes: u64,
    /// Backup B's `discarded_source_bytes`.
    pub discarded_bytes: u64,
}

fn guest_json((baseline, job): &(GuestFigures, GuestFigures)) -> (serde_json::Value, serde_json::Value) {
    let ratios = json!({
        "job_iops": ratio(job.iops, baseline.iops),
        "job_p99": ratio(job.clat_p99_us, baseline.clat_p99_us),
    });
    (json!({"baseline": baseline.to_json(), "job": job.to_json()}), ratios)
}

impl BackupReport {
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = self.side_json();
        value["tandem_side"] = json!(self.daemon.map_or("in-process", DaemonKind::name));
        if let Some(qemu) = &self.qemu {
            value["qemu"] = qemu.side_json();
            value["vs_qemu"] = json!({
                "mib_per_s": ratio(self.mib_per_s, qemu.mib_per_s),
                "cpu_s_per_gib": ratio(self.cpu_s_per_gib, qemu.cpu_s_per_gib),
            });
            if let (Some(ours), Some(theirs)) = (&self.guest, &qemu.guest) {
                // Each side's p99 against its own baseline, ours over QEMU's.
                let p99 = |(baseline, job): &(GuestFigures, GuestFigures)| ratio(job.clat_p99_us, baseline.clat_p99_us);
                value["vs_qemu"]["job_p99_x"] = json!(ratio(p99(ours), p99(theirs)));
            }
        }
        value
    }

    /// One side's figures: the daemon it ran through (null: in-process), its guest and ratios.
    fn side_json(&self) -> serde_json::Value {
        let mut value = json!({
            "daemon": self.daemon.map(DaemonKind::name),
            "complete_s": self.complete_s,
            "mib_per_s": self.mib_per_s,
            "cpu_s_per_gib": self.cpu_s_per_gib,
            "point_in_time_ok": self.point_in_time_ok,
            "copied_bytes": self.copied_bytes,
            "verified_bytes": self.verified_bytes,
        });
        if let Some(guest) = &self.guest {
            (value["guest"], value["ratios"]) = guest_json(guest);
        }
        if let Some(fleecing) = &self.fleecing {
            value["fleecing"] = json!({
                "scratch_peak_bytes": fleecing.scratch_peak_bytes,
                "scratch_final_bytes": fleecing.scratch_final_bytes,
                "discarded_bytes": fleecing.discarded_bytes,
            });
        }
        value
    }

    pub fn to_text(&self) -> String {
        let (guest_title, side) = match self.daemon {
            Some(_) => ("guest (NBD)", "through tandemd (QMP; fio over NBD as its guest; CPU is the daemon's)"),
            None => ("guest", "in-process (the guest on the same reactor; CPU is this process's)"),
        };
        let mut text = self.summary("backup", guest_title);
        text += &format!("tandem: ran {side}\n");
        if let Some(qemu) = &self.qemu {
            text += &qemu.summary("qemu", "qemu guest (NBD)");
            text += &format!(
                "tandem/qemu: {:.2}x MiB/s, {:.2}x CPU s per GiB ({})\n",
                ratio(self.mib_per_s, qemu.mib_per_s),
                ratio(self.cpu_s_per_gib, qemu.cpu_s_per_gib),
                match self.daemon {
                    Some(_) => "both through their daemon, fio over NBD as the guest: the same work",
                    None =>
                        "guests: compare each side's x columns, not absolute figures: QEMU's guest goes through NBD",
                }
            );
        }
        text
    }

    fn summary(&self, label: &str, guest_title: &str) -> String {
        let verdict = match self.point_in_time_ok {
            true => "the target equals the source at the job's start",
            false => "THE TARGET DIFFERS FROM THE SOURCE AT THE JOB'S START",
        };
        let mut text = format!(
            "{label}: complete after {:.2} s, {:.0} MiB/s, {:.2} CPU s per GiB, {verdict}\n",
            self.complete_s, self.mib_per_s, self.cpu_s_per_gib
        );
        if self.verified_bytes > 0 {
            text += &format!("{label}: verified {} MiB against the point in time\n", self.verified_bytes >> 20);
        }
        if let Some(fleecing) = &self.fleecing {
            let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
            text += &format!(
                "fleecing: the scratch peaked at {:.1} MiB allocated and ended at {:.1} MiB; {:.1} MiB discarded \
                 on the view after their copy\n",
                mib(fleecing.scratch_peak_bytes),
                mib(fleecing.scratch_final_bytes),
                mib(fleecing.discarded_bytes)
            );
        }
        if let Some((baseline, job)) = &self.guest {
            text += &guest_rows(guest_title, baseline, &[("baseline", baseline), ("during the job", job)]);
        }
        text
    }
}

pub fn backup_command(args: &BackupArgs) -> Result<(), String> {
    let json = match args.output_format.as_str() {
        "json" => true,
        "normal" => false,
        other => return Err(format!("--output-format {other}: expected normal or json")),
    };
    if args.target.to_str().is_some_and(|t| t.starts_with("rbd:")) {
        return Err(format!(
            "--target {}: the backup bench takes file and NBD targets (mirror takes rbd: targets; the backup job itself \
             writes to any driver, rbd included)",
            args.target.display()
        ));
    }
    // run_backup removes what it created (unless --keep), never what it found.
    let report = run_backup(args, !json)?;
    match json {
        true => println!("{}", serde_json::to_string_pretty(&report.to_json()).map_err(|e| e.to_string())?),
        false => print!("{}", report.to_text()),
    }
    let qemu_ok = report.qemu.as_ref().is_none_or(|q| q.point_in_time_ok);
    match (report.point_in_time_ok, qemu_ok) {
        (true, true) => Ok(()),
        (false, _) => Err("the target differs from the source as it was at the job's start".into()),
        (true, false) => Err("QEMU's target differs from the source as it was at its job's start".into()),
    }
}

/// Where the bench puts a file of its own, named after the target with `suffix` (the point
/// in time's copy, the fleecing scratch): next to the target, or for a block device target
/// (its folder is /dev) next to a regular source, else in the temporary folder.
pub(crate) fn work_path(target: &Path, source: &Path, suffix: &str) -> PathBuf {
    // An NBD export is neither: its URI is no place for a file.
    let regular_or_missing =
        |path: &Path| crate::remote::nbd_uri(path).is_none() && std::fs::metadata(path).map_or(true, |m| m.is_file());
    let beside = match (regular_or_missing(target), regular_or_missing(source)) {
        (true, _) => target,
        (false, true) => source,
        (false, false) => return std::env::temp_dir().join(format!("tandem-backup-{}{suffix}", std::process::id())),
    };
    let mut name = beside.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    beside.with_file_name(name)
}

const SNAPSHOT_SUFFIX: &str = ".point-in-time";
const SCRATCH_SUFFIX: &str = ".scratch";

/// A file of the bench's own: created new (a file of that name is refused, never replaced)
/// and removed when dropped, so a run removes only what it created.
struct OwnFile {
    path: PathBuf,
}

impl OwnFile {
    fn create(path: PathBuf, what: &str) -> Result<(OwnFile, std::fs::File), String> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| format!("cannot create the {what} {}: {e}", path.display()))?;
        Ok((OwnFile { path }, file))
    }
}

impl Drop for OwnFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The point-in-time copy.
struct Snapshot {
    path: PathBuf,
    _own: OwnFile,
}

impl Snapshot {
    /// Copy the first `size_bytes` of `source` (a file or block device) to a new file.
    fn copy_of(source: &Path, target: &Path, size_bytes: u64) -> Result<Snapshot, String> {
        let (own, mut copy) = OwnFile::create(work_path(target, source, SNAPSHOT_SUFFIX), "point-in-time copy")?;
        let snapshot = Snapshot { path: own.path.clone(), _own: own };
        let from = std::fs::File::open(source).map_err(|e| format!("cannot read {}: {e}", source.display()))?;
        let copied_bytes = std::io::copy(&mut std::io::Read::take(from, size_bytes), &mut copy)
            .map_err(|e| format!("cannot copy the source to {}: {e}", snapshot.path.display()))?;
        match copied_bytes == size_bytes {
            true => Ok(snapshot),
            false => Err(format!("{}: shrank to {copied_bytes} bytes while it was copied", source.display())),
        }
    }
}

/// Options checked before any file is touched.
fn plan(args: &BackupArgs) -> Result<(BackupConfig, Option<GuestSpec>), String> {
    let sync = SyncMode::parse(&args.sync).map_err(|e| e.to_string())?;
    if matches!(sync, SyncMode::None | SyncMode::Bitmap) {
        return Err(format!(
            "--sync {}: the bench runs full or top (none runs until cancelled; bitmap needs a named bitmap)",
            args.sync
        ));
    }
    let config = BackupConfig {
        sync,
        copy_priority: CopyPriority::parse(&args.copy_priority).map_err(|e| e.to_string())?,
        cluster_bytes: args.cluster_size,
        buf_size_bytes: args.buf_size,
        chunk_bytes_max: args.max_chunk,
        workers_max: args.max_workers,
        speed_bytes_per_s: args.speed,
        verify: tandem::job::VerifyMode::parse(&args.verify).map_err(|e| e.to_string())?,
        discard_source: args.discard_source,
        ..BackupConfig::default()
    };
    config.validate().map_err(|e| e.to_string())?;
    if args.discard_source && args.compare_qemu {
        return Err("--discard-source with --compare-qemu: the QEMU side runs no fleecing scenario".into());
    }
    if args.daemon {
        check_daemon_options(args)?;
    }
    if !args.size.is_multiple_of(1 << 20) {
        return Err(format!("--size {}: must be a whole number of MiB", args.size));
    }
    let guest = args.guest.spec(args.size)?;
    Ok((config, guest))
}

/// What `--daemon` cannot do, refused before anything is created; and tandemd must exist.
fn check_daemon_options(args: &BackupArgs) -> Result<(), String> {
    if crate::remote::nbd_uri(&args.target).is_some() {
        let target = args.target.display();
        return Err(format!("--daemon with --target {target}: the daemons' side takes a file or block device"));
    }
    if args.discard_source {
        return Err("--discard-source with --daemon: the daemons' side runs no fleecing scenario".into());
    }
    if let Some(plot) = &args.plot {
        return Err(format!("--plot {} with --daemon: the job's progress is sampled in-process only", plot.display()));
    }
    if args.verify != "off" {
        return Err(format!("--verify {} with --daemon: QEMU's side cannot verify; run it in-process", args.verify));
    }
    DaemonKind::Tandemd.program().map(drop).map_err(|e| e.to_string())
}

/// Check the options, then look at source and target (touching nothing): the config, the
/// guest for the disk's real size, the arguments with that size, and what this run creates.
fn inspect_images(
    args: &BackupArgs,
    runtime: &Runtime,
) -> Result<(BackupConfig, Option<GuestSpec>, BackupArgs, Images), String> {
    let (config, spec) = plan(args)?;
    let request = crate::images::Request {
        source: &args.source,
        target: &args.target,
        size_bytes: args.size,
        guest_writes: spec.filter(|g| g.rw != GuestRw::RandRead).and(args.guest.guest_rw.as_deref()),
        overwrite_source: args.overwrite_source,
        overwrite_target: args.overwrite_target,
        compare_qemu: args.compare_qemu,
    };
    if args.discard_source {
        let scratch = work_path(&args.target, &args.source, SCRATCH_SUFFIX);
        if std::fs::symlink_metadata(&scratch).is_ok() {
            return Err(format!("--discard-source: {} exists; the bench creates its scratch new", scratch.display()));
        }
    }
    let mut images = crate::images::inspect(&request, runtime).map_err(|e| e.to_string())?;
    images.keep = args.keep;
    let sized = BackupArgs { size: images.size_bytes, ..args.clone() };
    let spec = sized.guest.spec(images.size_bytes)?;
    Ok((config, spec, sized, images))
}

/// Run the scenario. Removes what it created unless `--keep`, never what it found.
pub fn run_backup(args: &BackupArgs, show_progress: bool) -> Result<BackupReport, String> {
    let note = |text: String| {
        if show_progress {
            eprintln!("{text}")
        }
    };
    let runtime = Runtime::new(Config { cores: args.cores as usize, pin: false, ..Config::default() })
        .map_err(|e| e.to_string())?;
    let (config, spec, args, mut images) = inspect_images(args, &runtime)?;
    images.create_missing(&runtime, &note).map_err(|e| e.to_string())?;
    // The runtime (and every driver on it) ends before `images` removes what it created.
    run_on(&args, (config, spec), &images, runtime, (show_progress, &note))
}

fn run_on(
    args: &BackupArgs,
    (config, spec): (BackupConfig, Option<GuestSpec>),
    images: &Images,
    runtime: Runtime,
    (show_progress, note): (bool, &dyn Fn(String)),
) -> Result<BackupReport, String> {
    if args.daemon {
        // Nothing of ours holds the files while the daemons run.
        drop(runtime);
        return run_daemons(args, spec, images, note);
    }
    let baseline = match spec {
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
    note("copying the source aside as the expected point in time".to_string());
    let snapshot = Snapshot::copy_of(&args.source, &args.target, args.size)?;
    let disk = Disk::new(open_file(&runtime, &args.source, false, &note)?);
    let target = match crate::remote::nbd_uri(&args.target) {
        Some(uri) => crate::remote::open_target(&runtime.handle(), uri)?,
        None => open_target(&runtime, &args.target, &disk, &note)?,
    };
    let mut scratch = match args.discard_source {
        true => Some(Scratch::create(&args.target, &args.source, args.size)?),
        false => None,
    };
    let usage_before = rusage();
    let job_started = Instant::now();
    let (job, fleece) = start_jobs(&runtime, &disk, target, config, scratch.as_ref(), note)?;
    let guest = spec.map(|spec| guest::Guest::start(&runtime, &disk, spec, 2));
    let sampler = Sampler::start(&job);
    let status = watch(&job, "backup", show_progress, |s| s == JobStatus::Null);
    let job_ended = Instant::now();
    let samples = sampler.finish();
    let usage = rusage().since(&usage_before);
    let (copied_bytes, verified_bytes) = (job.progress().done_bytes, job.info().verified_bytes);
    let record = guest.map(guest::Guest::join);
    let fleecing = match (fleece, scratch.as_mut()) {
        (Some(fleece), Some(scratch)) => Some(scratch.finish(fleece, &job)?),
        _ => None,
    };
    if let Some(error) = job.error() {
        return Err(format!("the backup failed: {error}"));
    }
    if status != JobStatus::Null || job_started.elapsed() > JOB_WAIT_MAX {
        return Err(format!("the backup did not finish (status {status})"));
    }
    drop(disk);
    drop(runtime);
    let point_in_time_ok = qemu_img_identical(&snapshot.path, &args.target, args.size)?;
    drop(snapshot);
    let complete_s = job_ended.duration_since(job_started).as_secs_f64();
    let gib = copied_bytes as f64 / (1u64 << 30) as f64;
    if let Some(path) = &args.plot {
        let svg = plot_run(&samples, record.as_ref(), (job_started, job_ended), &[(job_started, "job")], "to copy");
        std::fs::write(path, svg).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    let guest = match (baseline, record) {
        (Some(baseline), Some(record)) => {
            if let Some(e) = &record.error {
                return Err(format!("guest failed during the job: {e}"));
            }
            Some((baseline, record.window(job_started, job_ended)))
        }
        _ => None,
    };
    let qemu = match args.compare_qemu {
        true => Some(Box::new(run_daemon(DaemonKind::Qsd, args, spec, images, note)?)),
        false => None,
    };
    Ok(BackupReport {
        complete_s,
        mib_per_s: copied_bytes as f64 / (1 << 20) as f64 / complete_s.max(1e-9),
        cpu_s_per_gib: (usage.user_s + usage.system_s) / gib.max(1e-9),
        point_in_time_ok,
        copied_bytes,
        verified_bytes,
        guest,
        qemu,
        fleecing,
        daemon: None,
    })
}

/// `--daemon`: Tandem's side through tandemd, then with `--compare-qemu` QEMU's the same way.
fn run_daemons(
    args: &BackupArgs,
    spec: Option<GuestSpec>,
    images: &Images,
    note: &dyn Fn(String),
) -> Result<BackupReport, String> {
    let tandemd = run_daemon(DaemonKind::Tandemd, args, spec, images, note)?;
    let qemu = match args.compare_qemu {
        true => Some(Box::new(run_daemon(DaemonKind::Qsd, args, spec, images, note)?)),
        false => None,
    };
    Ok(BackupReport { qemu, ..tandemd })
}

/// The backup the bench measures, and with `--discard-source` the fleecing backup A whose view
/// it copies (A saves onto `scratch`; see the module doc).
fn start_jobs(
    runtime: &Runtime,
    disk: &Disk,
    target: Arc<dyn BlockDriver>,
    config: BackupConfig,
    scratch: Option<&Scratch>,
    note: &dyn Fn(String),
) -> Result<(Job, Option<Job>), String> {
    let handle = runtime.handle();
    let Some(scratch) = scratch else {
        return tandem::job::backup::start(&handle, disk, target, config)
            .map(|job| (job, None))
            .map_err(|e| e.to_string());
    };
    let scratch_driver = open_target(runtime, &scratch.path, disk, note)?;
    let fleece = BackupConfig {
        id: "fleece".into(),
        sync: SyncMode::None,
        cluster_bytes: config.cluster_bytes,
        ..BackupConfig::default()
    };
    let (fleece_job, view) =
        tandem::job::backup::start_with_view(&handle, disk, scratch_driver, fleece).map_err(|e| e.to_string())?;
    note(format!("fleecing: backup A saves onto {}; backup B copies its view to the target", scratch.path.display()));
    match tandem::job::backup::start(&handle, &Disk::new(view), target, config) {
        Ok(job) => Ok((job, Some(fleece_job))),
        Err(error) => {
            drop(fleece_job.cancel(false));
            fleece_job.wait_for(|s| s == JobStatus::Null, JOB_WAIT_MAX);
            Err(error.to_string())
        }
    }
}

/// `--discard-source`'s scratch file, its allocated size sampled from its creation.
struct Scratch {
    path: PathBuf,
    _own: OwnFile,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<u64>>,
}

fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

impl Scratch {
    /// A new sparse file of the disk's size, beside the target.
    fn create(target: &Path, source: &Path, size_bytes: u64) -> Result<Scratch, String> {
        let (own, file) = OwnFile::create(work_path(target, source, SCRATCH_SUFFIX), "scratch")?;
        file.set_len(size_bytes).map_err(|e| format!("cannot size the scratch {}: {e}", own.path.display()))?;
        let (path, stop) = (own.path.clone(), Arc::new(AtomicBool::new(false)));
        let (sampled, flag) = (path.clone(), stop.clone());
        let sampler = std::thread::spawn(move || {
            let mut peak_bytes = 0;
            while !flag.load(Ordering::Relaxed) {
                peak_bytes = peak_bytes.max(allocated_bytes(&sampled));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak_bytes
        });
        Ok(Scratch { path, _own: own, stop, sampler: Some(sampler) })
    }

    /// Once B ended: the scratch's figures, then A cancelled (sync=none runs until then).
    fn finish(&mut self, fleece: Job, reader: &Job) -> Result<FleecingFigures, String> {
        let final_bytes = allocated_bytes(&self.path);
        self.stop.store(true, Ordering::Relaxed);
        let peak_bytes = self.sampler.take().map_or(0, |sampler| sampler.join().unwrap_or(0));
        drop(fleece.cancel(false));
        if fleece.wait_for(|s| s == JobStatus::Null, JOB_WAIT_MAX) != JobStatus::Null {
            return Err("the fleecing backup did not end after its cancel".into());
        }
        let figures = FleecingFigures {
            scratch_peak_bytes: peak_bytes.max(final_bytes),
            scratch_final_bytes: final_bytes,
            discarded_bytes: reader.info().discarded_source_bytes,
        };
        Ok(figures)
    }
}

impl Drop for Scratch {
    /// An early return must not leave the sampler running.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// blockdev-backup's arguments for `kind`: the same for both daemons but for tandemd's
/// extension, copy-priority. Each daemon keeps its own copy sizes and depths (QEMU's x-perf
/// left at its defaults): what its users get.
fn backup_arguments(kind: DaemonKind, args: &BackupArgs) -> serde_json::Value {
    let mut backup = json!({"job-id": "j", "device": "src", "target": "dst", "sync": args.sync, "speed": args.speed});
    if kind == DaemonKind::Tandemd {
        backup["copy-priority"] = json!(args.copy_priority);
    }
    backup
}

/// The scenario through `kind`: its own fresh target and point-in-time copy, blockdev-backup,
/// fio over NBD from the job's start.
fn run_daemon(
    kind: DaemonKind,
    args: &BackupArgs,
    spec: Option<GuestSpec>,
    images: &Images,
    note: &dyn Fn(String),
) -> Result<BackupReport, String> {
    let files = (args.source.as_path(), args.target.as_path(), args.size);
    let baseline = spec.as_ref().map(|spec| baseline(kind, files, spec, note)).transpose()?;
    images.refresh_target(note).map_err(|e| e.to_string())?;
    let snapshot = Snapshot::copy_of(&args.source, &args.target, args.size)?;
    let mut daemon = Daemon::start(kind, &args.source, &args.target)?;
    let backup = backup_arguments(kind, args);
    note(format!("{}: blockdev-backup {backup}", kind.name()));
    let (cpu_before, started, started_ms) = (daemon.cpu_s(), Instant::now(), unix_ms());
    daemon.execute("blockdev-backup", backup)?;
    let fio = spec.as_ref().map(|spec| FioGuest::start(&daemon, spec, args.size, "job")).transpose()?;
    let (event, ended) = daemon.wait_event(&["BLOCK_JOB_COMPLETED"])?;
    if event != "BLOCK_JOB_COMPLETED" {
        return Err(format!("{}'s backup sent {event}", kind.name()));
    }
    let cpu_s = daemon.cpu_s() - cpu_before;
    let complete_s = ended.duration_since(started).as_secs_f64();
    let guest = match (fio, baseline) {
        (Some(fio), Some(baseline)) => {
            let points = fio.finish()?;
            Some((baseline, window(&points, started_ms, started_ms + (complete_s * 1000.0) as u64)))
        }
        _ => None,
    };
    daemon.quit()?;
    let gib = args.size as f64 / (1u64 << 30) as f64;
    Ok(BackupReport {
        complete_s,
        mib_per_s: args.size as f64 / (1 << 20) as f64 / complete_s.max(1e-9),
        cpu_s_per_gib: cpu_s / gib,
        point_in_time_ok: qemu_img_identical(&snapshot.path, &args.target, args.size)?,
        copied_bytes: args.size,
        verified_bytes: 0,
        guest,
        qemu: None,
        fleecing: None,
        daemon: Some(kind),
    })
}
