//! `tandem-bench demo`: the README's first command. Makes scratch files, runs a few short
//! benchmarks with a visible progress display, mirrors the scratch disk under a guest that
//! keeps writing, prints a summary and cleans up: it removes only the files it created in this
//! run (files kept by an earlier `--keep` are its scratch files too: reused, left in place).

use crate::backup::{BackupArgs, BackupReport};
use crate::fio::{self, JobSpec, RwMode};
use crate::mirror::{MirrorArgs, MirrorReport};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Directory for the scratch files (must allow O_DIRECT: not tmpfs on old kernels).
    #[arg(long, default_value = "target/tandem-demo")]
    dir: PathBuf,
    /// Size of the scratch file, fio syntax (256M, 1G).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    size: u64,
    /// Seconds each step runs.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// Keep the scratch files.
    #[arg(long)]
    keep: bool,
}

fn parse_size(value: &str) -> Result<u64, String> {
    fio::parse_size(value).map_err(|e| e.to_string()).and_then(|bytes| match bytes {
        0 => Err("size must be > 0".into()),
        bytes if bytes % (1 << 20) != 0 => Err(format!("size {bytes} must be a whole number of MiB")),
        bytes => Ok(bytes),
    })
}

struct Step {
    name: &'static str,
    rw: RwMode,
    block_size_bytes: u64,
    iodepth: u32,
    null: bool,
}

const STEPS: [Step; 5] = [
    Step { name: "randread-4k-qd32", rw: RwMode::RandRead, block_size_bytes: 4096, iodepth: 32, null: false },
    Step { name: "randwrite-4k-qd32", rw: RwMode::RandWrite, block_size_bytes: 4096, iodepth: 32, null: false },
    Step { name: "read-1m-qd16", rw: RwMode::Read, block_size_bytes: 1 << 20, iodepth: 16, null: false },
    Step { name: "randread-4k-qd1", rw: RwMode::RandRead, block_size_bytes: 4096, iodepth: 1, null: false },
    Step { name: "null-4k-qd32", rw: RwMode::RandRead, block_size_bytes: 4096, iodepth: 32, null: true },
];

pub fn demo_command(args: &DemoArgs) -> Result<(), String> {
    std::fs::create_dir_all(&args.dir).map_err(|e| format!("cannot create {}: {e}", args.dir.display()))?;
    let file = args.dir.join("demo.dat");
    let file_created = !file.exists();
    println!(
        "Tandem demo: {} MiB scratch file {} (O_DIRECT, {} s per step)",
        args.size >> 20,
        file.display(),
        args.seconds
    );
    let mirror_target = args.dir.join("mirror-target.dat");
    let backup_target = args.dir.join("backup-target.dat");
    let outcome = run_steps(args, &file).and_then(|rows| {
        let mirror = mirror_step(args, &file, &mirror_target)?;
        Ok((rows, mirror, backup_step(args, &file, &backup_target)?))
    });
    if args.keep {
        println!("kept {}", args.dir.display());
    } else {
        // The mirror and backup steps removed the targets they created.
        if file_created {
            let _ = std::fs::remove_file(&file);
        }
        let _ = std::fs::remove_dir(&args.dir); // only when empty
    }
    let (rows, mirror, backup) = outcome?;
    println!("\n{:<20} {:>10} {:>10} {:>12} {:>12}", "step", "IOPS", "MiB/s", "p50 (us)", "p99 (us)");
    for row in rows {
        println!("{row}");
    }
    println!("\n{}", mirror.to_text().trim_end());
    println!("{}", backup.to_text().trim_end());
    println!("\nNext: `tandem-bench compare-fio` runs any of these side by side with fio.");
    Ok(())
}

/// Mirror the scratch disk to a second file while a guest writes 2000 IOPS of 4 KiB to it,
/// then switch over and check both files match.
fn mirror_step(args: &DemoArgs, source: &std::path::Path, target: &std::path::Path) -> Result<MirrorReport, String> {
    println!("-- mirror under a 2000 IOPS randwrite guest (write-blocking)");
    let mut mirror = MirrorArgs::defaults(source.to_path_buf(), target.to_path_buf(), args.size);
    // The demo's own scratch files, in its own folder.
    (mirror.overwrite_source, mirror.overwrite_target, mirror.keep) = (true, true, args.keep);
    mirror.copy_mode = "write-blocking".into();
    mirror.guest.guest_rw = Some("randwrite".into());
    mirror.guest.guest_rate_iops = 2000;
    mirror.guest.guest_runtime = (args.seconds * 2).max(2);
    let report = crate::mirror::run_mirror(&mirror, true)?;
    match report.identical {
        true => Ok(report),
        false => Err("the mirror's source and target differ".into()),
    }
}

/// Back the scratch disk up to a third file while the same guest writes to it, then check the
/// backup equals the disk as it was when the job started.
fn backup_step(args: &DemoArgs, source: &std::path::Path, target: &std::path::Path) -> Result<BackupReport, String> {
    println!("-- backup under a 2000 IOPS randwrite guest (copy-before-write)");
    let mut backup = BackupArgs::defaults(source.to_path_buf(), target.to_path_buf(), args.size);
    (backup.overwrite_source, backup.overwrite_target, backup.keep) = (true, true, args.keep);
    backup.guest.guest_rw = Some("randwrite".into());
    backup.guest.guest_rate_iops = 2000;
    backup.guest.guest_runtime = (args.seconds * 2).max(2);
    let report = crate::backup::run_backup(&backup, true)?;
    match report.point_in_time_ok {
        true => Ok(report),
        false => Err("the backup differs from the disk as it was at the job's start".into()),
    }
}

fn run_steps(args: &DemoArgs, file: &std::path::Path) -> Result<Vec<String>, String> {
    let mut rows = Vec::new();
    for step in &STEPS {
        let mut job = JobSpec::new(step.name);
        job.filename = (!step.null).then(|| file.display().to_string());
        job.ioengine = step.null.then(|| "null".to_string());
        job.size_bytes = Some(args.size);
        job.rw = step.rw;
        job.block_size_bytes = step.block_size_bytes;
        job.iodepth = step.iodepth;
        job.direct = true;
        job.time_based = true;
        job.runtime = Some(Duration::from_secs(args.seconds));
        println!("-- {}", step.name);
        let report = crate::run_jobs(std::slice::from_ref(&job), Some(step.name))?;
        let result = report.jobs.first().ok_or("the step ran no job")?;
        if result.error != 0 {
            return Err(format!("{} failed with errno {}", step.name, result.error));
        }
        let stats = if result.write.total_ios > result.read.total_ios { &result.write } else { &result.read };
        let seconds = (stats.runtime_ms as f64 / 1000.0).max(1e-9);
        rows.push(format!(
            "{:<20} {:>10.0} {:>10.1} {:>12.1} {:>12.1}",
            step.name,
            stats.total_ios as f64 / seconds,
            stats.io_bytes as f64 / seconds / (1 << 20) as f64,
            stats.clat_ns.value_at_quantile(0.5) as f64 / 1000.0,
            stats.clat_ns.value_at_quantile(0.99) as f64 / 1000.0
        ));
    }
    Ok(rows)
}
