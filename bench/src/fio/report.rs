//! Benchmark results as the runner hands them over (`DirStats`, `JobResult`,
//! `RunReport`) and fio's `group_reporting` merge. Rendering lives in `json.rs`
//! and `normal.rs`.

use hdrhistogram::Histogram;

use super::spec::JobSpec;

/// Highest latency the histograms are sized for up front; they grow if exceeded.
const MAX_TRACKED_LATENCY_NS: u64 = 60_000_000_000;
/// Significant digits kept by latency histograms (0.1% resolution).
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;

/// An auto-resizing latency histogram covering 1 ns .. 60 s at 3 significant digits.
pub fn new_latency_histogram() -> Histogram<u64> {
    // Constant, valid bounds: creation cannot fail, so this expect never fires.
    let mut histogram = Histogram::new_with_bounds(1, MAX_TRACKED_LATENCY_NS, LATENCY_SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid");
    histogram.auto(true);
    histogram
}

/// Adds every sample of `source` into `target`, growing `target` if needed.
pub fn add_histogram(target: &mut Histogram<u64>, source: &Histogram<u64>) {
    target.auto(true);
    if target.add(source).is_err() {
        // Only reachable if resizing fails; fall back to clamping rather than losing samples.
        for bucket in source.iter_recorded() {
            target.saturating_record_n(bucket.value_iterated_to(), bucket.count_at_value());
        }
    }
}

/// Results for one direction (read or write) of one job.
#[derive(Debug, Clone)]
pub struct DirStats {
    /// Bytes transferred.
    pub io_bytes: u64,
    /// I/Os completed.
    pub total_ios: u64,
    /// How long this direction ran; bandwidth and IOPS are per this time.
    pub runtime_ms: u64,
    /// Completion latency (submission to completion), ns.
    pub clat_ns: Histogram<u64>,
    /// Submission latency, ns; may be empty.
    pub slat_ns: Histogram<u64>,
    /// Total latency (slat + clat), ns.
    pub lat_ns: Histogram<u64>,
}

impl DirStats {
    /// No I/O yet, with empty latency histograms.
    pub fn new() -> Self {
        DirStats {
            io_bytes: 0,
            total_ios: 0,
            runtime_ms: 0,
            clat_ns: new_latency_histogram(),
            slat_ns: new_latency_histogram(),
            lat_ns: new_latency_histogram(),
        }
    }

    /// Whether this direction did any I/O. fio reports a direction that did nothing with
    /// runtime 0, whatever the clock said; the renderers use this to do the same.
    pub fn did_io(&self) -> bool {
        self.io_bytes > 0 || self.total_ios > 0
    }

    /// `runtime_ms` as fio reports it: 0 for a direction that did no I/O.
    pub fn reported_runtime_ms(&self) -> u64 {
        if self.did_io() {
            self.runtime_ms
        } else {
            0
        }
    }

    /// Bytes per second over `runtime_ms`, integer like fio; 0 if it never ran.
    pub fn bw_bytes_per_s(&self) -> u64 {
        match self.runtime_ms {
            0 => 0,
            ms => (u128::from(self.io_bytes) * 1000 / u128::from(ms)).try_into().unwrap_or(u64::MAX),
        }
    }

    /// I/Os per second over `runtime_ms`; 0 if it never ran.
    pub fn iops(&self) -> f64 {
        match self.runtime_ms {
            0 => 0.0,
            ms => self.total_ios as f64 * 1000.0 / ms as f64,
        }
    }

    /// Adds `other` in, fio-style: sums bytes, I/Os and samples; runtime is the longest.
    pub fn merge(&mut self, other: &DirStats) {
        self.io_bytes = self.io_bytes.saturating_add(other.io_bytes);
        self.total_ios = self.total_ios.saturating_add(other.total_ios);
        self.runtime_ms = self.runtime_ms.max(other.runtime_ms);
        add_histogram(&mut self.clat_ns, &other.clat_ns);
        add_histogram(&mut self.slat_ns, &other.slat_ns);
        add_histogram(&mut self.lat_ns, &other.lat_ns);
    }
}

impl Default for DirStats {
    fn default() -> Self {
        DirStats::new()
    }
}

/// Results of one job (one clone when `numjobs` > 1).
#[derive(Debug, Clone)]
pub struct JobResult {
    /// The job as run; clones keep the job's name.
    pub spec: JobSpec,
    /// Clone number, 0-based.
    pub job_index: u32,
    /// Read direction.
    pub read: DirStats,
    /// Write direction.
    pub write: DirStats,
    /// Flushes (`fsync=N`, `fdatasync=N`, `end_fsync`): count and latency, as fio's `sync`.
    pub sync: DirStats,
    /// Wall time of the whole job.
    pub elapsed_ms: u64,
    /// User CPU time as a share of `elapsed_ms`.
    pub usr_cpu_percent: f64,
    /// System CPU time as a share of `elapsed_ms`.
    pub sys_cpu_percent: f64,
    /// Voluntary plus involuntary context switches.
    pub ctx_switches: u64,
    /// 0, or the errno the job stopped with.
    pub error: i32,
}

impl JobResult {
    /// A result with no I/O for `spec`, to be filled in by the runner.
    pub fn new(spec: JobSpec, job_index: u32) -> Self {
        JobResult {
            spec,
            job_index,
            read: DirStats::new(),
            write: DirStats::new(),
            sync: DirStats::new(),
            elapsed_ms: 0,
            usr_cpu_percent: 0.0,
            sys_cpu_percent: 0.0,
            ctx_switches: 0,
            error: 0,
        }
    }
}

/// Everything one run produced.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// One entry per job clone, or per group when `group_reporting` merged them.
    pub jobs: Vec<JobResult>,
    /// What did the I/O, e.g. "tandem io_uring".
    pub engine: String,
    /// Seconds since the Unix epoch when the run finished.
    pub timestamp_s: u64,
}

/// Merges jobs into one result the way fio's `group_reporting` does: bytes, I/Os,
/// latency samples, context switches and elapsed time are summed; per-direction runtime
/// is the longest; CPU time is summed, so the percentages become the elapsed-weighted
/// average (fio's `usr_time / total_run_time`). The first job's spec and index are kept,
/// and the first non-zero error wins. An empty slice gives an empty default result.
pub fn merge_jobs(jobs: &[JobResult]) -> JobResult {
    let Some(first) = jobs.first() else {
        return JobResult::new(JobSpec::default(), 0);
    };
    let mut merged = JobResult::new(first.spec.clone(), first.job_index);
    let (mut usr_cpu_ms, mut sys_cpu_ms) = (0.0, 0.0);
    for job in jobs {
        merged.read.merge(&job.read);
        merged.write.merge(&job.write);
        merged.sync.merge(&job.sync);
        merged.elapsed_ms = merged.elapsed_ms.saturating_add(job.elapsed_ms);
        merged.ctx_switches = merged.ctx_switches.saturating_add(job.ctx_switches);
        usr_cpu_ms += job.usr_cpu_percent * job.elapsed_ms as f64 / 100.0;
        sys_cpu_ms += job.sys_cpu_percent * job.elapsed_ms as f64 / 100.0;
        if merged.error == 0 {
            merged.error = job.error;
        }
    }
    if merged.elapsed_ms > 0 {
        merged.usr_cpu_percent = usr_cpu_ms * 100.0 / merged.elapsed_ms as f64;
        merged.sys_cpu_percent = sys_cpu_ms * 100.0 / merged.elapsed_ms as f64;
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(io_bytes: u64, runtime_ms: u64, clat: &[u64]) -> DirStats {
        let mut stats = DirStats::new();
        stats.io_bytes = io_bytes;
        stats.total_ios = clat.len() as u64;
        stats.runtime_ms = runtime_ms;
        for &ns in clat {
            stats.clat_ns.record(ns).expect("in range");
            stats.lat_ns.record(ns + 10).expect("in range");
        }
        stats
    }

    fn job(read: DirStats, elapsed_ms: u64, usr_cpu_percent: f64, error: i32) -> JobResult {
        JobResult {
            read,
            elapsed_ms,
            usr_cpu_percent,
            sys_cpu_percent: usr_cpu_percent / 2.0,
            ctx_switches: 5,
            error,
            ..JobResult::new(JobSpec::new("m"), 0)
        }
    }

    #[test]
    fn rates_are_per_runtime() {
        let stats = dir(4096 * 1000, 500, &[100; 1000]);
        assert_eq!(stats.bw_bytes_per_s(), 8_192_000);
        assert_eq!(stats.iops(), 2000.0);
        assert_eq!((DirStats::new().bw_bytes_per_s(), DirStats::new().iops()), (0, 0.0));
    }

    #[test]
    fn histograms_cover_a_minute_and_grow_beyond() {
        let mut histogram = new_latency_histogram();
        histogram.record(60_000_000_000).expect("within bounds");
        histogram.record(600_000_000_000).expect("auto-resize");
        assert_eq!(histogram.len(), 2);
        assert_eq!(histogram.sigfig(), 3);
    }

    #[test]
    fn merge_sums_like_group_reporting() {
        let first = job(dir(100, 10, &[1, 2]), 1000, 50.0, 0);
        let mut second = job(dir(300, 20, &[3, 4, 5]), 3000, 10.0, 5);
        second.job_index = 1;
        let merged = merge_jobs(&[first, second]);
        assert_eq!((merged.read.io_bytes, merged.read.total_ios, merged.read.runtime_ms), (400, 5, 20));
        assert_eq!((merged.read.clat_ns.len(), merged.read.clat_ns.max(), merged.read.lat_ns.len()), (5, 5, 5));
        assert_eq!((merged.elapsed_ms, merged.ctx_switches, merged.error, merged.job_index), (4000, 10, 5, 0));
        // CPU time adds up: 500 ms + 300 ms of user time over 4000 ms of job time.
        assert!((merged.usr_cpu_percent - 20.0).abs() < 1e-9, "{}", merged.usr_cpu_percent);
        assert!((merged.sys_cpu_percent - 10.0).abs() < 1e-9, "{}", merged.sys_cpu_percent);
        assert_eq!(merged.write.total_ios, 0);
        assert_eq!(merged.spec.name, "m");
    }

    #[test]
    fn merge_of_nothing_is_empty() {
        let merged = merge_jobs(&[]);
        assert_eq!((merged.read.total_ios, merged.elapsed_ms, merged.error), (0, 0, 0));
    }
}
