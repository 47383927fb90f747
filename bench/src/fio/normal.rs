//! `--output-format=normal`: fio's human-readable report, line for line where we
//! have the data (per-job IOPS/BW, slat/clat/lat, clat percentiles, latency buckets,
//! cpu) and a "Run status group N" summary per reporting group. Ported from fio's stat.c.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use super::humanize::{ctime_utc, num2str};
use super::latency::{lat_stats, latency_buckets, percentiles_ns, LatStats, FIO_PERCENTILES};
use super::report::{DirStats, JobResult, RunReport};

/// Renders `report` like fio's normal output. Lines fio prints from data we do not
/// collect (per-second bw/iops samples, IO depth histograms, disk stats) are left out;
/// `majf`/`minf` are printed as 0. Timestamps are UTC; `pid` is this process.
pub fn render_normal(report: &RunReport) -> String {
    let mut out = String::new();
    for job in &report.jobs {
        write_job(&mut out, job, report.timestamp_s);
    }
    // One summary per reporting group, in group order, as fio prints them.
    let mut groupids: Vec<u32> = report.jobs.iter().map(|job| job.spec.groupid).collect();
    groupids.dedup();
    for groupid in groupids {
        let members: Vec<JobResult> = report.jobs.iter().filter(|job| job.spec.groupid == groupid).cloned().collect();
        write_group_status(&mut out, groupid, &members);
    }
    out
}

// `write!` into a String cannot fail, so its Result is discarded throughout.
fn write_job(out: &mut String, job: &JobResult, timestamp_s: u64) {
    let no_io = job.read.total_ios == 0 && job.write.total_ios == 0;
    if no_io && job.read.io_bytes == 0 && job.write.io_bytes == 0 {
        return; // fio skips jobs that did nothing
    }
    let pid = std::process::id();
    let when = ctime_utc(timestamp_s);
    let (name, groupid) = (&job.spec.name, job.spec.groupid);
    let _ = writeln!(out, "{name}: (groupid={groupid}, jobs=1): err={:2}: pid={pid}: {when}", job.error);
    for (label, dir) in [("read", &job.read), ("write", &job.write)] {
        if dir.io_bytes > 0 && dir.reported_runtime_ms() > 0 {
            write_dir(out, label, dir);
        }
    }
    write_latency_buckets(out, job);
    let _ = writeln!(
        out,
        "  cpu          : usr={:.2}%, sys={:.2}%, ctx={}, majf=0, minf=0",
        job.usr_cpu_percent, job.sys_cpu_percent, job.ctx_switches
    );
    let _ = writeln!(
        out,
        "     issued rwts: total={},{},0,0 short=0,0,0,0 dropped=0,0,0,0",
        job.read.total_ios, job.write.total_ios
    );
}

/// `  read: IOPS=..., BW=...` and the latency lines under it (fio's show_ddir_status).
fn write_dir(out: &mut String, label: &str, dir: &DirStats) {
    let bw = dir.bw_bytes_per_s();
    let iops = dir.total_ios.saturating_mul(1000) / dir.runtime_ms.max(1);
    let _ = writeln!(
        out,
        "  {label}: IOPS={}, BW={} ({})({}/{}msec)",
        num2str(iops, 4, false, ""),
        num2str(bw, 4, true, "B/s"),
        num2str(bw, 4, false, "B/s"),
        num2str(dir.io_bytes, 4, true, "B"),
        dir.runtime_ms
    );
    for (name, histogram) in [("slat", &dir.slat_ns), ("clat", &dir.clat_ns), (" lat", &dir.lat_ns)] {
        let stats = lat_stats(histogram);
        if stats.samples > 0 {
            write_lat_line(out, name, stats);
        }
    }
    write_percentiles(out, "clat", &dir.clat_ns);
}

/// `    clat (usec): min=.., max=.., avg=.., stdev=..`, scaled like fio's nsec_to_usec.
fn write_lat_line(out: &mut String, name: &str, stats: LatStats) {
    let (divisor, unit) = if stats.min_ns > 2_000_000 && stats.max_ns > 99_999_999 && stats.stddev_ns > 1e6 {
        (1_000_000, "msec")
    } else if stats.min_ns > 2_000 && stats.max_ns > 99_999 && stats.stddev_ns > 1e3 {
        (1_000, "usec")
    } else {
        (1, "nsec")
    };
    let _ = writeln!(
        out,
        "    {name} ({unit}): min={}, max={}, avg={:5.2}, stdev={:5.2}",
        num2str(stats.min_ns / divisor, 6, false, ""),
        num2str(stats.max_ns / divisor, 6, false, ""),
        stats.mean_ns / divisor as f64,
        stats.stddev_ns / divisor as f64
    );
}

/// fio's `show_clat_percentiles` block with its default list (2 decimals).
fn write_percentiles(out: &mut String, name: &str, histogram: &Histogram<u64>) {
    let values_ns = percentiles_ns(histogram, &FIO_PERCENTILES);
    let (Some(&min_ns), Some(&max_ns)) = (values_ns.iter().min(), values_ns.iter().max()) else {
        return;
    };
    let (scale_steps, divisor, unit) = if min_ns > 2_000_000 && max_ns > 99_999_999 {
        (2, 1_000_000, "msec")
    } else if min_ns > 2_000 && max_ns > 99_999 {
        (1, 1_000, "usec")
    } else {
        (0, 1, "nsec")
    };
    let width = digit_count(max_ns / divisor).max(5);
    let per_line = (80 - 7) / (2 + 10 + width);
    let _ = write!(out, "    {name} percentiles ({unit}):\n     |");
    for (index, (pct, value_ns)) in FIO_PERCENTILES.iter().zip(&values_ns).enumerate() {
        if index != 0 && index % per_line == 0 {
            out.push_str("     |");
        }
        // fio rounds each step up, so a scaled percentile never understates latency.
        let value = (0..scale_steps).fold(*value_ns, |value, _| value.div_ceil(1000));
        let last = index + 1 == values_ns.len();
        let _ = write!(out, " {pct:5.2}th=[{value:>width$}]{}", if last { '\n' } else { ',' });
        if !last && index % per_line == per_line - 1 {
            out.push('\n');
        }
    }
}

fn digit_count(value: u64) -> usize {
    value.checked_ilog10().map_or(1, |log| log as usize + 1)
}

/// `  lat (usec)   : 50=9.38%, 100=82.18%, ...` (fio's show_latencies), five per line.
fn write_latency_buckets(out: &mut String, job: &JobResult) {
    let buckets = latency_buckets(&[&job.read.clat_ns, &job.write.clat_ns]);
    let labels = ["2", "4", "10", "20", "50", "100", "250", "500", "750", "1000", "2000", ">=2000"];
    for (unit, shares) in [("nsec", &buckets.nsec[..]), ("usec", &buckets.usec[..]), ("msec", &buckets.msec[..])] {
        let shown: Vec<String> = labels
            .iter()
            .zip(shares)
            .filter(|(_, share)| **share > 0.0)
            .map(|(label, share)| format!("{label}={share:.2}%"))
            .collect();
        for line in shown.chunks(5) {
            let _ = writeln!(out, "  lat ({unit})   : {}", line.join(", "));
        }
    }
}

/// `Run status group N (all jobs):` with one line per direction that ran.
fn write_group_status(out: &mut String, groupid: u32, jobs: &[JobResult]) {
    let _ = writeln!(out, "\nRun status group {groupid} (all jobs):");
    for (label, pick) in [("   READ", read_of as fn(&JobResult) -> &DirStats), ("  WRITE", write_of)] {
        let dirs: Vec<&DirStats> = jobs.iter().map(pick).filter(|dir| dir.reported_runtime_ms() > 0).collect();
        let (Some(min_run_ms), Some(max_run_ms)) =
            (dirs.iter().map(|d| d.runtime_ms).min(), dirs.iter().map(|d| d.runtime_ms).max())
        else {
            continue;
        };
        let io_bytes = dirs.iter().fold(0u64, |sum, dir| sum.saturating_add(dir.io_bytes));
        let min_bw = dirs.iter().map(|dir| dir.bw_bytes_per_s()).min().unwrap_or(0);
        let max_bw = dirs.iter().map(|dir| dir.bw_bytes_per_s()).max().unwrap_or(0);
        // Aggregate bandwidth: all bytes over the longest runtime, as fio.
        let agg_bw = u64::try_from(u128::from(io_bytes) * 1000 / u128::from(max_run_ms)).unwrap_or(u64::MAX);
        let both = |value: u64, unit: &str| (num2str(value, 4, true, unit), num2str(value, 4, false, unit));
        let ((agg, agg_alt), (min, min_alt), (max, max_alt), (io, io_alt)) =
            (both(agg_bw, "B/s"), both(min_bw, "B/s"), both(max_bw, "B/s"), both(io_bytes, "B"));
        let _ = writeln!(
            out,
            "{label}: bw={agg} ({agg_alt}), {min}-{max} ({min_alt}-{max_alt}), io={io} ({io_alt}), run={min_run_ms}-{max_run_ms}msec"
        );
    }
}

fn read_of(job: &JobResult) -> &DirStats {
    &job.read
}

fn write_of(job: &JobResult) -> &DirStats {
    &job.write
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fio::spec::JobSpec;

    /// 1000 reads of 4 KiB in 500 ms; completion latency `clat_ns(i)` for i in 1..=1000.
    fn report_with(clat_ns: impl Fn(u64) -> u64) -> RunReport {
        let mut job = JobResult::new(JobSpec::new("known"), 0);
        (job.read.io_bytes, job.read.total_ios, job.read.runtime_ms) = (4096 * 1000, 1000, 500);
        for i in 1..=1000 {
            job.read.clat_ns.record(clat_ns(i)).expect("in range");
        }
        (job.usr_cpu_percent, job.sys_cpu_percent, job.ctx_switches) = (12.5, 30.0, 77);
        RunReport { jobs: vec![job], engine: "tandem io_uring".into(), timestamp_s: 0 }
    }

    #[test]
    fn job_block_matches_fio_layout() {
        let text = render_normal(&report_with(|i| i));
        let expected_header =
            format!("known: (groupid=0, jobs=1): err= 0: pid={}: Thu Jan  1 00:00:00 1970\n", std::process::id());
        let expected_body = "  read: IOPS=2000, BW=8000KiB/s (8192kB/s)(4000KiB/500msec)
    clat (nsec): min=1, max=1000, avg=500.50, stdev=288.82
    clat percentiles (nsec):
     |  1.00th=[   10],  5.00th=[   50], 10.00th=[  100], 20.00th=[  200],
     | 30.00th=[  300], 40.00th=[  400], 50.00th=[  500], 60.00th=[  600],
     | 70.00th=[  700], 80.00th=[  800], 90.00th=[  900], 95.00th=[  950],
     | 99.00th=[  990], 99.50th=[  995], 99.90th=[ 1000], 99.95th=[ 1000],
     | 99.99th=[ 1000]
  lat (nsec)   : 2=0.10%, 4=0.20%, 10=0.60%, 20=1.00%, 50=3.00%
  lat (nsec)   : 100=5.00%, 250=15.00%, 500=25.00%, 750=25.00%, 1000=25.00%
  lat (usec)   : 2=0.10%
  cpu          : usr=12.50%, sys=30.00%, ctx=77, majf=0, minf=0
     issued rwts: total=1000,0,0,0 short=0,0,0,0 dropped=0,0,0,0

Run status group 0 (all jobs):
   READ: bw=8000KiB/s (8192kB/s), 8000KiB/s-8000KiB/s (8192kB/s-8192kB/s), io=4000KiB (4096kB), run=500-500msec
";
        assert_eq!(text, expected_header + expected_body);
    }

    #[test]
    fn microsecond_latencies_switch_units_like_fio() {
        // 20 us .. 200 us: min > 2000 ns and max > 99999 ns, so fio prints usec.
        let text = render_normal(&report_with(|i| 20_000 + i * 180));
        assert!(text.contains("    clat (usec): min=20, max=200, avg="), "{text}");
        assert!(text.contains("    clat percentiles (usec):\n     |  1.00th=[   22],"), "{text}");
        assert!(text.contains("  lat (usec)   : 50=16.60%, 100=27.80%, 250=55.60%"), "{text}");
    }

    #[test]
    fn idle_jobs_and_directions_are_skipped() {
        let mut report = report_with(|i| i);
        report.jobs.push(JobResult::new(JobSpec::new("idle"), 1));
        let text = render_normal(&report);
        assert!(!text.contains("idle:"));
        assert!(!text.contains("write:") && !text.contains("  WRITE:"));
        assert!(text.contains("   READ: bw="));
    }

    #[test]
    fn group_status_spans_all_jobs() {
        let mut report = report_with(|i| i);
        report.jobs[0].write.runtime_ms = 500; // ran the clock but no writes: no WRITE line
        let mut second = report.jobs[0].clone();
        second.read.runtime_ms = 1000; // same bytes in twice the time: half the bandwidth
        report.jobs.push(second);
        let text = render_normal(&report);
        assert!(
            text.contains("   READ: bw=8000KiB/s (8192kB/s), 4000KiB/s-8000KiB/s (4096kB/s-8192kB/s), io=8000KiB (8192kB), run=500-1000msec"),
            "{text}"
        );
        assert!(!text.contains("  WRITE:"), "{text}");
    }

    #[test]
    fn each_reporting_group_gets_its_summary() {
        let mut report = report_with(|i| i);
        let mut second = report.jobs[0].clone();
        second.spec.groupid = 1;
        report.jobs.push(second);
        let text = render_normal(&report);
        assert!(text.contains("known: (groupid=1, jobs=1)"), "{text}");
        assert!(text.contains("Run status group 0 (all jobs):") && text.contains("Run status group 1 (all jobs):"));
        assert_eq!(text.matches("   READ: ").count(), 2, "{text}");
    }
}
