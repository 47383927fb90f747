//! `tandem-bench`: the fio-like harness for Tandem. `run` takes fio's flags and job files and
//! prints fio-compatible text or JSON; `compare-fio` runs fio and Tandem side by side on the
//! same job; `mirror` measures a mirror job under guest load; `demo` is the README's first
//! command.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "tandem-bench", version, about = "fio-like benchmarks for the Tandem storage engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run fio-style jobs on Tandem: fio's flags (--name --filename --rw --bs --iodepth ...)
    /// and/or fio job files. `tandem-bench run --help` lists the options.
    #[command(disable_help_flag = true)]
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the same job through fio (io_uring) and Tandem, both direct=1 on a file or block
    /// device (whatever --direct says), alternating, and print
    /// both with the ratio Tandem/fio. Takes `run`'s options plus --rounds=N.
    #[command(name = "compare-fio", disable_help_flag = true)]
    CompareFio {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A short, visible tour on scratch files: a few benchmarks with progress, then clean up.
    Demo(tandem_bench::demo::DemoArgs),
    /// Mirror a disk to a target under an optional guest load and measure it: time to READY,
    /// copy MiB/s, CPU per GiB, the guest's IOPS and latency before and during the job, and
    /// whether source and target end identical.
    Mirror(Box<tandem_bench::mirror::MirrorArgs>),
    /// Back a disk up under an optional guest load and measure it: time to the end, copy
    /// MiB/s, CPU per GiB, the guest's IOPS and latency before and during the job, and whether
    /// the target equals the source as it was at the job's start.
    Backup(Box<tandem_bench::backup::BackupArgs>),
    /// Tandem's NBD server (tandemd) against qemu-nbd and qemu-storage-daemon on the same
    /// scratch file, driven by fio's nbd engine with one and four connections: IOPS, MiB/s and
    /// the server's CPU per I/O, with ratios.
    #[command(name = "compare-nbd")]
    CompareNbd(tandem_bench::nbd_servers::NbdArgs),
}

fn main() -> ExitCode {
    // Like any Unix filter: a closed pipe (`| head`) ends the process quietly instead of
    // making print! panic.
    // SAFETY: restores the default disposition of one signal before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Run { args } => run_command(&args),
        Command::CompareFio { args } => tandem_bench::compare::compare_command(&args),
        Command::Demo(args) => tandem_bench::demo::demo_command(&args),
        Command::Mirror(args) => tandem_bench::mirror::mirror_command(&args),
        Command::Backup(args) => tandem_bench::backup::backup_command(&args),
        Command::CompareNbd(args) => tandem_bench::nbd_servers::compare_nbd_command(&args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tandem-bench: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `tandem-bench run`: parse like fio, run, print like fio.
fn run_command(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{}", tandem_bench::fio::usage());
        return Ok(());
    }
    let config = tandem_bench::fio::parse_command_line(args).map_err(|e| e.to_string())?;
    tandem_bench::runner::stop_on_interrupt();
    let mut report = tandem_bench::run_jobs(&config.jobs, None)?;
    // group_reporting merges the jobs of one reporting group, as fio does.
    report.jobs = tandem_bench::fio::groups::report_entries(report.jobs);
    let text = match config.output_format {
        tandem_bench::fio::OutputFormat::Json => {
            serde_json::to_string_pretty(&tandem_bench::fio::render_json(&report)).map_err(|e| e.to_string())? + "\n"
        }
        tandem_bench::fio::OutputFormat::Normal => tandem_bench::fio::render_normal(&report),
    };
    match &config.output_path {
        Some(path) => std::fs::write(path, text).map_err(|e| format!("cannot write {path}: {e}"))?,
        None => print!("{text}"),
    }
    // As fio: the report is still printed, but a job that failed makes the exit status non-zero.
    let failed: Vec<_> =
        report.jobs.iter().filter(|r| r.error != 0).map(|r| format!("{} (errno {})", r.spec.name, r.error)).collect();
    match failed.is_empty() {
        true => Ok(()),
        false => Err(format!("jobs ended with errors: {}", failed.join(", "))),
    }
}
