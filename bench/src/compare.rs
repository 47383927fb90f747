//! `tandem-bench compare-fio`: the same job through fio (ioengine=io_uring, direct=1, as the
//! project's anchors run it; ioengine=rbd for an `rbd:` filename, ioengine=nbd for an NBD URI) and through Tandem, on the
//! same file or image, alternating for N rounds.
//! Prints each figure's mean and spread and the ratio Tandem/fio. fio's command is built from
//! the parsed job, so both sides run exactly the same job and nothing is tuned for either.

use crate::fio::{self, JobResult, JobSpec, RunReport};
use serde_json::{json, Value};
use std::process::Command;
use tandem_drivers::rbd::RbdSpec;

const ROUNDS_DEFAULT: u32 = 3;
const ROUNDS_MAX: u32 = 100;

/// One system's figures in one round.
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    iops: f64,
    mib_per_s: f64,
    clat_p50_us: f64,
    clat_p99_us: f64,
    cpu_us_per_io: f64,
}

/// A metric: JSON key, table title, and how to read it from a round's figures.
type Metric = (&'static str, &'static str, fn(&Figures) -> f64);

const METRICS: [Metric; 5] = [
    ("iops", "IOPS", |f| f.iops),
    ("mib_per_s", "MiB/s", |f| f.mib_per_s),
    ("clat_p50_us", "clat p50 (us)", |f| f.clat_p50_us),
    ("clat_p99_us", "clat p99 (us)", |f| f.clat_p99_us),
    ("cpu_us_per_io", "CPU per I/O (us)", |f| f.cpu_us_per_io),
];

pub fn compare_command(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: tandem-bench compare-fio [--rounds=N] [fio options | job file]...\n\n{}", fio::usage());
        return Ok(());
    }
    let (rounds, rest) = take_rounds(args)?;
    let mut config = fio::parse_command_line(&rest).map_err(|e| e.to_string())?;
    same_direct_as_fio(&mut config.jobs)?;
    let fio_version = fio_version()?;
    let fio_args = fio_command(&config.jobs)?;
    let fio_env = fio_env(&config.jobs)?;
    // Lay out the files once, through Tandem, before any timed round.
    crate::target::prepare_files(&config.jobs)?;
    let mut fio_rounds = Vec::new();
    let mut tandem_rounds = Vec::new();
    let mut engine = String::new();
    for round in 0..rounds {
        eprintln!("compare-fio: round {}/{rounds}", round + 1);
        // Alternate who goes first, so drift on the machine hits both alike.
        if round % 2 == 0 {
            fio_rounds.push(run_fio(&fio_args, &fio_env)?);
        }
        let report = crate::run_jobs(&config.jobs, Some("tandem"))?;
        engine = report.engine.clone();
        tandem_rounds.push(tandem_figures(&report)?);
        if round % 2 == 1 {
            fio_rounds.push(run_fio(&fio_args, &fio_env)?);
        }
    }
    let summary =
        Summary { job: job_label(&config.jobs), rounds, fio_version, engine, fio_args, fio_rounds, tandem_rounds };
    match config.output_format {
        fio::OutputFormat::Json => {
            println!("{}", serde_json::to_string_pretty(&summary.json()).map_err(|e| e.to_string())?)
        }
        fio::OutputFormat::Normal => print!("{}", summary.table()),
    }
    Ok(())
}

/// fio's side of a file or block device job always runs direct=1; Tandem's must too, or a job
/// without --direct=1 compared Tandem through the page cache against fio on the device (on a
/// loop device: 2.8x fio's random-read IOPS and 10x its random-write IOPS, none of it real).
fn same_direct_as_fio(jobs: &mut [JobSpec]) -> Result<(), String> {
    for job in jobs {
        let null = job.ioengine.as_deref() == Some("null");
        // fio's rbd and nbd engines have no page cache to bypass.
        if !null && rbd_spec(job)?.is_none() && nbd_uri(job).is_none() {
            job.direct = true;
        }
    }
    Ok(())
}

/// Split `--rounds=N` (ours) from the fio options.
fn take_rounds(args: &[String]) -> Result<(u32, Vec<String>), String> {
    let mut rounds = ROUNDS_DEFAULT;
    let mut rest = Vec::new();
    for arg in args {
        match arg.strip_prefix("--rounds=") {
            Some(value) => {
                rounds =
                    value.parse().ok().filter(|r| (1..=ROUNDS_MAX).contains(r)).ok_or_else(|| {
                        format!("invalid value '{value}' for option 'rounds': expected 1..={ROUNDS_MAX}")
                    })?;
            }
            None => rest.push(arg.clone()),
        }
    }
    Ok((rounds, rest))
}

fn fio_version() -> Result<String, String> {
    let output = Command::new("fio").arg("--version").output().map_err(|e| {
        format!("fio is needed for compare-fio and could not be run ({e}); install it with: apt-get install -y fio")
    })?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// fio's command line for the parsed jobs: the same job, io_uring, direct=1 (or fio's rbd
/// engine on the same image).
fn fio_command(jobs: &[JobSpec]) -> Result<Vec<String>, String> {
    let mut args = vec!["--output-format=json".to_string()];
    for job in jobs {
        if let Some(option) = unforwarded_option(job) {
            return Err(format!(
                "compare-fio: job '{}': {option} is not passed on to fio, so the two sides would run \
                 different jobs; use `tandem-bench run` for it",
                job.name
            ));
        }
        args.extend(fio_job_args(job)?);
    }
    Ok(args)
}

/// The first option of `job` that `fio_job_args` does not pass on to fio, if any.
fn unforwarded_option(job: &JobSpec) -> Option<&'static str> {
    let defaults = JobSpec::default();
    let file_list = job
        .filename
        .as_deref()
        .is_some_and(|name| !name.starts_with("rbd:") && !tandem_drivers::nbd::is_nbd_uri(name) && name.contains(':'));
    [
        (job.stonewall || job.new_group, "stonewall/new_group"),
        (
            job.directory.is_some() || job.filesize_bytes.is_some() || job.nrfiles != 1 || file_list,
            "directory/filesize/nrfiles/filename list",
        ),
        (job.loops != defaults.loops, "loops"),
        (job.startdelay != defaults.startdelay || job.thinktime != defaults.thinktime, "startdelay/thinktime"),
        (job.bssplit.is_some() || job.norandommap, "bssplit/norandommap"),
        (job.flush_every() != 0 || job.end_fsync, "fsync/fdatasync/end_fsync"),
        (job.verify.is_some() || job.exitall, "verify/exitall"),
        (job.wait_for.is_some() || job.number_ios.is_some(), "wait_for/number_ios"),
    ]
    .into_iter()
    .find_map(|(set, name)| set.then_some(name))
}

/// The job's NBD URI, if its filename is one: fio's nbd engine (libnbd) gets the same URI.
fn nbd_uri(job: &JobSpec) -> Option<&str> {
    let named = job.filename.as_deref().filter(|name| tandem_drivers::nbd::is_nbd_uri(name));
    named.or(job.nbd_uri.as_deref().filter(|_| job.engine() == fio::values::Engine::Nbd && job.filename.is_none()))
}

/// The job's rbd image, if its filename is one.
fn rbd_spec(job: &JobSpec) -> Result<Option<RbdSpec>, String> {
    match job.filename.as_deref().filter(|name| name.starts_with("rbd:")) {
        Some(name) => RbdSpec::parse(name).map(Some).map_err(|e| e.to_string()),
        None => Ok(None),
    }
}

/// fio's rbd engine reads the conf from CEPH_CONF and takes no librados options: refuse what
/// it could not be given, rather than compare against a different setup.
fn fio_env(jobs: &[JobSpec]) -> Result<Vec<(String, String)>, String> {
    let mut env = Vec::new();
    for spec in jobs.iter().map(rbd_spec).collect::<Result<Vec<_>, _>>()?.into_iter().flatten() {
        if let Some((key, _)) = spec.options.first() {
            return Err(format!(
                "compare-fio: fio's rbd engine cannot take the librados option {key}; put it in the conf"
            ));
        }
        if spec.namespace.is_some() || spec.snapshot.is_some() {
            return Err("compare-fio: fio's rbd engine takes no namespace or snapshot".into());
        }
        if let Some(conf) = spec.conf_path {
            let conf = conf.to_string_lossy().into_owned();
            // One fio process, one CEPH_CONF.
            if env.iter().any(|(_, known): &(String, String)| *known != conf) {
                return Err("compare-fio: fio's rbd jobs must all use the same conf".into());
            }
            env.push(("CEPH_CONF".to_string(), conf));
        }
    }
    Ok(env)
}

fn fio_job_args(job: &JobSpec) -> Result<Vec<String>, String> {
    let null = job.ioengine.as_deref() == Some("null");
    let rbd = rbd_spec(job)?;
    let nbd = nbd_uri(job).filter(|_| !null);
    let engine = match (null, &rbd, nbd) {
        (true, _, _) => "null",
        (false, Some(_), _) => "rbd",
        (false, None, Some(_)) => "nbd",
        (false, None, None) => "io_uring",
    };
    let mut args = vec![
        format!("--name={}", job.name),
        format!("--ioengine={engine}"),
        format!("--rw={}", fio::rw_name(job.rw)),
        format!("--bs={}", job.block_size_bytes),
        format!("--iodepth={}", job.iodepth),
        format!("--numjobs={}", job.numjobs),
        format!("--offset={}", job.offset_bytes),
        format!("--rwmixread={}", job.rwmixread_percent),
    ];
    if let Some(spec) = &rbd {
        args.push(format!("--pool={}", spec.pool));
        args.push(format!("--rbdname={}", spec.image));
        args.push(format!("--clientname={}", spec.user.as_deref().unwrap_or("admin")));
        // fio's rbd engine turns librbd's cache off for direct=1, as the bench does.
        args.push(format!("--direct={}", u8::from(job.direct)));
    } else if let Some(uri) = nbd {
        args.push(format!("--uri={uri}"));
    } else if !null {
        args.push("--direct=1".into());
    }
    let optional = [
        job.filename.as_ref().filter(|_| !null && rbd.is_none() && nbd.is_none()).map(|f| format!("--filename={f}")),
        job.size_bytes.map(|s| format!("--size={s}")),
        job.io_size_bytes.map(|s| format!("--io_size={s}")),
        job.runtime.map(|r| format!("--runtime={}ms", r.as_millis())),
        job.time_based.then(|| "--time_based".to_string()),
        (!job.ramp_time.is_zero()).then(|| format!("--ramp_time={}ms", job.ramp_time.as_millis())),
        rate_arg("rate_iops", job.rate_iops),
        rate_arg("rate", job.rate_bytes),
        job.prioclass.map(|c| format!("--prioclass={c}")),
        job.prio.map(|p| format!("--prio={p}")),
        job.randseed.map(|s| format!("--randseed={s}")),
    ];
    args.extend(optional.into_iter().flatten());
    Ok(args)
}

/// fio's `--NAME=READ,WRITE` for a per-direction limit; nothing when neither is set.
fn rate_arg(name: &str, rate: fio::values::ReadWrite<Option<u64>>) -> Option<String> {
    let text = |value: Option<u64>| value.map_or_else(String::new, |v| v.to_string());
    (rate.read.is_some() || rate.write.is_some()).then(|| format!("--{name}={},{}", text(rate.read), text(rate.write)))
}

/// Run fio. With an rbd job (`env` set) its CPU figure is the whole process's, as Tandem's
/// is: fio reports its job thread's own time (RUSAGE_THREAD), which leaves out librbd's
/// threads, where most of an rbd client's CPU goes.
fn run_fio(args: &[String], env: &[(String, String)]) -> Result<Figures, String> {
    let mut command = Command::new("fio");
    command.args(args).envs(env.iter().map(|(key, value)| (key, value)));
    let children_cpu_before_s = children_cpu_s();
    let output = command.output().map_err(|e| format!("running fio: {e}"))?;
    let fio_process_cpu_s = children_cpu_s() - children_cpu_before_s;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!("fio failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim()));
    }
    let start = stdout.find('{').ok_or_else(|| format!("fio printed no JSON: {stdout}"))?;
    let parsed: Value = serde_json::from_str(&stdout[start..]).map_err(|e| format!("fio's JSON: {e}"))?;
    let mut figures = fio_figures(&parsed)?;
    if !env.is_empty() {
        let ios = fio_total_ios(&parsed);
        figures.cpu_us_per_io = if ios > 0.0 { fio_process_cpu_s / ios * 1e6 } else { 0.0 };
    }
    Ok(figures)
}

/// CPU seconds (user + system) of this process's waited-for children so far.
fn children_cpu_s() -> f64 {
    // SAFETY: an all-zero rusage is a valid value (integers and timevals).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own through a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

fn fio_total_ios(parsed: &Value) -> f64 {
    let jobs = parsed["jobs"].as_array().map(Vec::as_slice).unwrap_or_default();
    let directions = jobs.iter().flat_map(|job| [&job["read"], &job["write"]]);
    directions.map(|direction| direction["total_ios"].as_f64().unwrap_or(0.0)).sum()
}

/// Figures from fio's JSON: summed over jobs; latency from the first job's busier direction.
fn fio_figures(parsed: &Value) -> Result<Figures, String> {
    let jobs = parsed["jobs"].as_array().filter(|j| !j.is_empty()).ok_or("fio's JSON has no jobs")?;
    let mut figures = Figures::default();
    let mut cpu_s = 0.0;
    let mut ios = 0.0;
    for job in jobs {
        for direction in ["read", "write"] {
            figures.iops += job[direction]["iops"].as_f64().unwrap_or(0.0);
            figures.mib_per_s += job[direction]["bw_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64;
            ios += job[direction]["total_ios"].as_f64().unwrap_or(0.0);
        }
        let cpu_percent = job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0);
        cpu_s += cpu_percent / 100.0 * job["job_runtime"].as_f64().unwrap_or(0.0) / 1000.0;
    }
    let first = &jobs[0];
    let busier =
        if first["write"]["total_ios"].as_f64() > first["read"]["total_ios"].as_f64() { "write" } else { "read" };
    let percentile = |p: &str| first[busier]["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    figures.clat_p50_us = percentile("50.000000");
    figures.clat_p99_us = percentile("99.000000");
    figures.cpu_us_per_io = if ios > 0.0 { cpu_s / ios * 1e6 } else { 0.0 };
    Ok(figures)
}

/// The same figures from Tandem's report, computed the way fio defines them.
fn tandem_figures(report: &RunReport) -> Result<Figures, String> {
    if let Some(failed) = report.jobs.iter().find(|job| job.error != 0) {
        return Err(format!("Tandem's job '{}' failed with errno {}", failed.spec.name, failed.error));
    }
    tandem_figures_from(&report.jobs).ok_or_else(|| "Tandem ran no job".to_string())
}

fn tandem_figures_from(jobs: &[JobResult]) -> Option<Figures> {
    let first = jobs.first()?;
    let mut figures = Figures::default();
    let mut cpu_s = 0.0;
    let mut ios = 0u64;
    for job in jobs {
        for stats in [&job.read, &job.write] {
            let seconds = (stats.runtime_ms as f64 / 1000.0).max(1e-9);
            figures.iops += stats.total_ios as f64 / seconds;
            figures.mib_per_s += stats.io_bytes as f64 / seconds / (1 << 20) as f64;
            ios += stats.total_ios;
        }
        cpu_s += (job.usr_cpu_percent + job.sys_cpu_percent) / 100.0 * job.elapsed_ms as f64 / 1000.0;
    }
    let busier = if first.write.total_ios > first.read.total_ios { &first.write } else { &first.read };
    figures.clat_p50_us = busier.clat_ns.value_at_quantile(0.50) as f64 / 1000.0;
    figures.clat_p99_us = busier.clat_ns.value_at_quantile(0.99) as f64 / 1000.0;
    figures.cpu_us_per_io = if ios > 0 { cpu_s / ios as f64 * 1e6 } else { 0.0 };
    Some(figures)
}

fn job_label(jobs: &[JobSpec]) -> String {
    jobs.iter().map(|j| j.name.as_str()).collect::<Vec<_>>().join("+")
}

struct Summary {
    job: String,
    rounds: u32,
    fio_version: String,
    engine: String,
    fio_args: Vec<String>,
    fio_rounds: Vec<Figures>,
    tandem_rounds: Vec<Figures>,
}

struct Spread {
    mean: f64,
    min: f64,
    max: f64,
}

fn spread(values: &[f64]) -> Spread {
    let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Spread { mean, min, max }
}

impl Summary {
    fn metric(&self, get: fn(&Figures) -> f64) -> (Spread, Spread, f64) {
        let fio = spread(&self.fio_rounds.iter().map(get).collect::<Vec<_>>());
        let tandem = spread(&self.tandem_rounds.iter().map(get).collect::<Vec<_>>());
        let ratio = if fio.mean > 0.0 { tandem.mean / fio.mean } else { 0.0 };
        (fio, tandem, ratio)
    }

    /// How fio ran, for the table's head.
    fn fio_engine(&self) -> &'static str {
        let uses = |engine: &str| self.fio_args.iter().any(|arg| *arg == format!("--ioengine={engine}"));
        match (uses("rbd"), uses("nbd")) {
            (true, _) => "--ioengine=rbd (CPU: the whole fio process, librbd's threads included)",
            (false, true) => "--ioengine=nbd (libnbd, the same URI)",
            (false, false) => "--ioengine=io_uring --direct=1",
        }
    }

    fn table(&self) -> String {
        let mut out = format!(
            "compare-fio: {} ({} rounds, alternating)\n  fio:    {} {}\n  tandem: {}\n\n",
            self.job,
            self.rounds,
            self.fio_version,
            self.fio_engine(),
            self.engine
        );
        out += &format!(
            "{:<18} {:>26} {:>26} {:>12}\n",
            "metric", "fio mean [min-max]", "tandem mean [min-max]", "tandem/fio"
        );
        for (_, title, get) in METRICS {
            let (fio, tandem, ratio) = self.metric(get);
            let cell = |s: &Spread| format!("{} [{}-{}]", short(s.mean), short(s.min), short(s.max));
            out += &format!("{:<18} {:>26} {:>26} {:>11.2}x\n", title, cell(&fio), cell(&tandem), ratio);
        }
        out += &format!("\nfio command: fio {}\n", self.fio_args.join(" "));
        out
    }

    fn json(&self) -> Value {
        let mut fio = serde_json::Map::new();
        let mut tandem = serde_json::Map::new();
        let mut ratios = serde_json::Map::new();
        for (key, _, get) in METRICS {
            let (f, t, ratio) = self.metric(get);
            let rounds = |r: &[Figures]| r.iter().map(get).collect::<Vec<_>>();
            fio.insert(
                key.into(),
                json!({"mean": f.mean, "min": f.min, "max": f.max, "rounds": rounds(&self.fio_rounds)}),
            );
            tandem.insert(
                key.into(),
                json!({"mean": t.mean, "min": t.min, "max": t.max, "rounds": rounds(&self.tandem_rounds)}),
            );
            ratios.insert(key.into(), json!(ratio));
        }
        json!({
            "job": self.job, "rounds": self.rounds, "fio_version": self.fio_version, "engine": self.engine,
            "fio_command": format!("fio {}", self.fio_args.join(" ")),
            "fio": fio, "tandem": tandem, "ratios": ratios,
        })
    }
}

/// 66283 -> "66.3k", 0.052 -> "0.052": short enough for a table cell.
fn short(value: f64) -> String {
    match value.abs() {
        v if v >= 1e6 => format!("{:.2}M", value / 1e6),
        v if v >= 1e4 => format!("{:.1}k", value / 1e3),
        v if v >= 100.0 => format!("{value:.0}"),
        v if v >= 1.0 => format!("{value:.1}"),
        _ => format!("{value:.3}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tandem_runs_direct_wherever_fio_does() {
        let file = ["--name=f", "--filename=/dev/loop9", "--rw=randread"];
        let null = ["--name=n", "--ioengine=null", "--size=1M"];
        let args: Vec<String> = file.iter().chain(&null).map(|s| s.to_string()).collect();
        let mut jobs = fio::parse_command_line(&args).unwrap().jobs;
        assert!(jobs.iter().all(|job| !job.direct), "fio's default is direct=0");
        same_direct_as_fio(&mut jobs).unwrap();
        assert!(jobs[0].direct && fio_job_args(&jobs[0]).unwrap().contains(&"--direct=1".to_string()));
        assert!(!jobs[1].direct, "the null engine has no page cache to bypass");
    }

    #[test]
    fn rounds_flag_is_taken_and_checked() {
        let args: Vec<String> = ["--rounds=5", "--name=a"].iter().map(|s| s.to_string()).collect();
        let (rounds, rest) = take_rounds(&args).unwrap();
        assert_eq!((rounds, rest), (5, vec!["--name=a".to_string()]));
        let err = take_rounds(&["--rounds=0".to_string()]).unwrap_err();
        assert!(err.contains("'0'") && err.contains("rounds"), "{err}");
    }

    #[test]
    fn fio_figures_follow_fio_json() {
        let parsed = json!({"jobs": [{
            "read": {"iops": 1000.0, "bw_bytes": 4096000.0, "total_ios": 10000,
                     "clat_ns": {"percentile": {"50.000000": 50000, "99.000000": 120000}}},
            "write": {"iops": 0.0, "bw_bytes": 0.0, "total_ios": 0, "clat_ns": {}},
            "usr_cpu": 10.0, "sys_cpu": 30.0, "job_runtime": 10000
        }]});
        let f = fio_figures(&parsed).unwrap();
        assert_eq!((f.iops, f.clat_p50_us, f.clat_p99_us), (1000.0, 50.0, 120.0));
        assert!((f.mib_per_s - 3.90625).abs() < 1e-9);
        // 40% of 10 s = 4 CPU seconds over 10000 I/Os = 400 us each.
        assert!((f.cpu_us_per_io - 400.0).abs() < 1e-6, "{}", f.cpu_us_per_io);
    }

    #[test]
    fn options_fio_would_not_get_are_refused_by_name() {
        let plain = JobSpec { filename: Some("/var/tmp/f".into()), ..JobSpec::new("j") };
        assert!(fio_command(std::slice::from_ref(&plain)).is_ok());
        let looped = JobSpec { loops: 2, ..plain.clone() };
        let err = fio_command(&[looped]).unwrap_err();
        assert!(err.contains("loops") && err.contains("'j'"), "{err}");
        let listed = JobSpec { filename: Some("a:b".into()), ..plain };
        assert!(fio_command(&[listed]).unwrap_err().contains("filename list"));
    }

    #[test]
    fn an_nbd_export_goes_to_fios_nbd_engine_with_the_same_uri() {
        let uri = "nbd+unix:///disk?socket=/run/qemu-nbd.sock";
        let args: Vec<String> =
            ["--name=n", &format!("--filename={uri}"), "--rw=randread"].iter().map(|s| s.to_string()).collect();
        let mut jobs = fio::parse_command_line(&args).unwrap().jobs;
        same_direct_as_fio(&mut jobs).unwrap();
        let fio = fio_command(&jobs).unwrap();
        assert!(fio.contains(&"--ioengine=nbd".to_string()) && fio.contains(&format!("--uri={uri}")), "{fio:?}");
        assert!(!fio.iter().any(|a| a.starts_with("--filename") || a.starts_with("--direct")), "{fio:?}");
    }

    #[test]
    fn fios_own_nbd_spelling_is_taken_too() {
        let uri = "nbd://localhost:10809/disk";
        let args: Vec<String> = ["--name=n", "--ioengine=nbd", &format!("--uri={uri}"), "--rw=read"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let jobs = fio::parse_command_line(&args).unwrap().jobs;
        assert_eq!(fio::files::job_files(&jobs[0], 0)[0].path, uri, "the export is the job's one file");
        assert!(fio_command(&jobs).unwrap().contains(&format!("--uri={uri}")));
        let missing: Vec<String> = ["--name=n", "--ioengine=nbd", "--size=1M"].iter().map(|s| s.to_string()).collect();
        let err = fio::parse_command_line(&missing).and_then(|c| c.jobs[0].validate().map(|_| c)).err();
        assert!(err.is_some_and(|e| e.to_string().contains("uri")));
    }

    #[test]
    fn short_numbers() {
        assert_eq!(short(66283.0), "66.3k");
        assert_eq!(short(2_500_000.0), "2.50M");
        assert_eq!(short(0.0521), "0.052");
    }
}
