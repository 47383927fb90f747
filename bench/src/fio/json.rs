//! `--output-format=json`: fio 3.x's JSON layout with fio's key names, so scripts
//! written for fio (e.g. `jobs[0].read.clat_ns.percentile["99.000000"]`) read ours.
//! What we do not measure is either omitted or, where fio's shape needs it, zero.

use serde_json::{json, Map, Value};

use super::humanize::ctime_utc;
use super::latency::{lat_stats, latency_buckets, percentiles_ns, FIO_PERCENTILES, LAT_BOUNDS, LAT_MSEC_BOUNDS};
use super::report::{DirStats, JobResult, RunReport};
use super::spec::SetOption;

/// Renders `report` as fio's JSON document.
///
/// Fidelity notes: without per-second samples, `bw_*` and `iops_*` sample statistics
/// are 0 with `*_samples: 0` (exactly what fio prints for runs shorter than one sample
/// interval); `short_ios`, `drop_ios`, `majf` and `minf` are not measured and are 0;
/// `iodepth_*` maps are omitted; `trim` is all-zero because we issue no trims; `sync` counts
/// the flushes of `fsync=`, `fdatasync=` and `end_fsync`. Latencies come from 3-significant-digit histograms.
/// Job keys fio prints that this report leaves out on purpose: queue-depth histograms, which
/// the runner does not collect, and latency-target settings (fio's `latency_target`), which it
/// does not support.
pub const OMITTED_JOB_KEYS: [&str; 7] = [
    "iodepth_level",
    "iodepth_submit",
    "iodepth_complete",
    "latency_depth",
    "latency_target",
    "latency_percentile",
    "latency_window",
];

pub fn render_json(report: &RunReport) -> Value {
    let mut root = Map::new();
    root.insert("fio version".into(), json!(format!("tandem-bench {}", env!("CARGO_PKG_VERSION"))));
    root.insert("timestamp".into(), json!(report.timestamp_s));
    root.insert("timestamp_ms".into(), json!(report.timestamp_s.saturating_mul(1000)));
    root.insert("time".into(), json!(ctime_utc(report.timestamp_s)));
    // Not a fio key: says what actually did the I/O.
    root.insert("engine".into(), json!(report.engine));
    if let Some(first) = report.jobs.first().filter(|job| !job.spec.global_options.is_empty()) {
        root.insert("global options".into(), options_json(&first.spec.global_options));
    }
    root.insert("jobs".into(), Value::Array(report.jobs.iter().map(job_json).collect()));
    Value::Object(root)
}

fn job_json(job: &JobResult) -> Value {
    let buckets = latency_buckets(&[&job.read.clat_ns, &job.write.clat_ns]);
    json!({
        "jobname": job.spec.name,
        "groupid": job.spec.groupid,
        "error": job.error,
        "eta": 0,
        // fio rounds elapsed seconds up.
        "elapsed": job.elapsed_ms.div_ceil(1000),
        "job options": options_json(&job.spec.job_options),
        "read": dir_json(&job.read),
        "write": dir_json(&job.write),
        "trim": dir_json(&DirStats::new()),
        "sync": { "total_ios": job.sync.total_ios, "lat_ns": lat_json(&job.sync.lat_ns, false) },
        "job_runtime": job.elapsed_ms,
        "usr_cpu": job.usr_cpu_percent,
        "sys_cpu": job.sys_cpu_percent,
        "ctx": job.ctx_switches,
        "majf": 0,
        "minf": 0,
        "latency_ns": bucket_json(&buckets.nsec, &LAT_BOUNDS, ""),
        "latency_us": bucket_json(&buckets.usec, &LAT_BOUNDS, ""),
        "latency_ms": bucket_json(&buckets.msec, &LAT_MSEC_BOUNDS, ">=2000"),
    })
}

/// fio's `"job options"` / `"global options"`: option name to the value as written.
fn options_json(options: &[SetOption]) -> Value {
    let map = options.iter().map(|option| (option.key.clone(), json!(option.value))).collect::<Map<_, _>>();
    Value::Object(map)
}

/// One direction, as fio's `add_ddir_status_json`.
fn dir_json(dir: &DirStats) -> Value {
    let bw_bytes = dir.bw_bytes_per_s();
    json!({
        "io_bytes": dir.io_bytes,
        "io_kbytes": dir.io_bytes >> 10,
        "bw_bytes": bw_bytes,
        "bw": bw_bytes / 1024,
        "iops": dir.iops(),
        "runtime": dir.reported_runtime_ms(),
        "total_ios": dir.total_ios,
        "short_ios": 0,
        "drop_ios": 0,
        "slat_ns": lat_json(&dir.slat_ns, false),
        "clat_ns": lat_json(&dir.clat_ns, true),
        "lat_ns": lat_json(&dir.lat_ns, false),
        "bw_min": 0,
        "bw_max": 0,
        "bw_agg": 0.0,
        "bw_mean": 0.0,
        "bw_dev": 0.0,
        "bw_samples": 0,
        "iops_min": 0,
        "iops_max": 0,
        "iops_mean": 0.0,
        "iops_stddev": 0.0,
        "iops_samples": 0,
    })
}

/// `{min, max, mean, stddev, N}` plus, for clat with samples, fio's `"percentile"` map
/// keyed like fio ("99.000000"). fio omits the map when there are no samples.
fn lat_json(histogram: &hdrhistogram::Histogram<u64>, with_percentiles: bool) -> Value {
    let stats = lat_stats(histogram);
    let mut object = json!({
        "min": stats.min_ns,
        "max": stats.max_ns,
        "mean": stats.mean_ns,
        "stddev": stats.stddev_ns,
        "N": stats.samples,
    });
    if with_percentiles && stats.samples > 0 {
        let values = percentiles_ns(histogram, &FIO_PERCENTILES);
        let map = FIO_PERCENTILES
            .iter()
            .zip(values)
            .map(|(pct, value_ns)| (format!("{pct:.6}"), json!(value_ns)))
            .collect::<Map<_, _>>();
        object["percentile"] = Value::Object(map);
    }
    object
}

/// fio's `latency_ns`/`latency_us`/`latency_ms` maps; `last_label` names a final
/// open-ended bucket past the bounds.
fn bucket_json(shares: &[f64], bounds: &[u64], last_label: &str) -> Value {
    let labels = bounds.iter().map(u64::to_string).chain(Some(last_label.to_string()).filter(|l| !l.is_empty()));
    Value::Object(labels.zip(shares).map(|(label, share)| (label, json!(share))).collect())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::fio::spec::JobSpec;

    /// Real `fio --name=t --ioengine=null --size=16M --bs=4k --rw=randread --output-format=json`.
    const FIO_3_33: &str = include_str!("testdata/fio-3.33-null-randread.json");

    /// 1000 reads of 4 KiB in 500 ms with completion latencies 1..=1000 ns.
    fn known_report() -> RunReport {
        let mut job = JobResult::new(JobSpec::new("known"), 0);
        job.read.io_bytes = 4096 * 1000;
        job.read.total_ios = 1000;
        job.read.runtime_ms = 500;
        for ns in 1..=1000 {
            job.read.clat_ns.record(ns).expect("in range");
            job.read.lat_ns.record(ns + 100).expect("in range");
        }
        (job.elapsed_ms, job.usr_cpu_percent, job.sys_cpu_percent, job.ctx_switches) = (501, 12.5, 30.0, 77);
        RunReport { jobs: vec![job], engine: "tandem io_uring".into(), timestamp_s: 1_795_564_332 }
    }

    fn keys(value: &Value) -> BTreeSet<String> {
        value.as_object().map(|object| object.keys().cloned().collect()).unwrap_or_default()
    }

    #[test]
    fn values_match_fio_definitions() {
        let json = render_json(&known_report());
        let read = &json["jobs"][0]["read"];
        assert_eq!(read["iops"], 2000.0); // total_ios * 1000 / runtime_ms
        assert_eq!(read["bw_bytes"], 8_192_000); // io_bytes * 1000 / runtime_ms
        assert_eq!(read["bw"], 8000); // KiB/s
        assert_eq!((read["io_bytes"].as_u64(), read["io_kbytes"].as_u64()), (Some(4_096_000), Some(4000)));
        assert_eq!((read["runtime"].as_u64(), read["total_ios"].as_u64()), (Some(500), Some(1000)));
        let clat = &read["clat_ns"];
        assert_eq!((clat["min"].as_u64(), clat["max"].as_u64(), clat["N"].as_u64()), (Some(1), Some(1000), Some(1000)));
        assert_eq!(clat["mean"], 500.5);
        assert_eq!(clat["percentile"]["50.000000"], 500);
        assert_eq!(clat["percentile"]["99.000000"], 990);
        assert_eq!(clat["percentile"]["1.000000"], 10);
        assert_eq!(read["lat_ns"]["min"], 101);
        assert_eq!(read["slat_ns"]["N"], 0);
    }

    #[test]
    fn job_level_fields() {
        let json = render_json(&known_report());
        let job = &json["jobs"][0];
        assert_eq!((job["jobname"].as_str(), job["elapsed"].as_u64()), (Some("known"), Some(1)));
        assert_eq!((job["usr_cpu"].as_f64(), job["sys_cpu"].as_f64()), (Some(12.5), Some(30.0)));
        assert_eq!((job["ctx"].as_u64(), job["job_runtime"].as_u64()), (Some(77), Some(501)));
        assert_eq!(job["job options"]["name"], "known");
        assert_eq!(job["latency_ns"]["1000"], 25.0);
        assert_eq!(job["latency_us"]["2"], 0.1);
        assert_eq!(job["latency_ms"][">=2000"], 0.0);
        assert_eq!(json["time"], "Tue Nov 24 23:52:12 2026");
        assert!(json["fio version"].as_str().is_some_and(|v| v.starts_with("tandem-bench ")));
        assert!(json.get("global options").is_none());
    }

    #[test]
    fn idle_directions_have_fios_shape_without_percentiles() {
        let mut report = known_report();
        report.jobs[0].write.runtime_ms = 500; // the clock ran, but no writes: fio says 0
        let json = render_json(&report);
        for direction in ["write", "trim"] {
            let dir = &json["jobs"][0][direction];
            assert_eq!((dir["iops"].as_f64(), dir["runtime"].as_u64()), (Some(0.0), Some(0)));
            assert!(dir["clat_ns"].get("percentile").is_none(), "fio omits percentiles without samples");
        }
    }

    #[test]
    fn keys_match_real_fio_output() {
        let fio: Value = serde_json::from_str(FIO_3_33).expect("fixture is JSON");
        let ours = render_json(&known_report());
        let (fio_job, our_job) = (&fio["jobs"][0], &ours["jobs"][0]);
        for direction in ["read", "write", "trim"] {
            assert_eq!(keys(&our_job[direction]), keys(&fio_job[direction]), "{direction}");
            for lat in ["slat_ns", "clat_ns", "lat_ns"] {
                assert_eq!(keys(&our_job[direction][lat]), keys(&fio_job[direction][lat]), "{direction}.{lat}");
            }
        }
        assert_eq!(keys(&our_job["read"]["clat_ns"]["percentile"]), keys(&fio_job["read"]["clat_ns"]["percentile"]));
        for table in ["latency_ns", "latency_us", "latency_ms", "sync"] {
            assert_eq!(keys(&our_job[table]), keys(&fio_job[table]), "{table}");
        }
        let expected: BTreeSet<String> =
            keys(fio_job).into_iter().filter(|key| !OMITTED_JOB_KEYS.contains(&key.as_str())).collect();
        assert_eq!(keys(our_job), expected);
        assert!(keys(&fio).is_subset(&keys(&ours)));
    }

    #[test]
    fn global_and_job_options_are_split_like_fio() {
        let config =
            crate::fio::parse_command_line(&["--ioengine=null", "--size=1M", "--name=x", "--bs=8k"].map(String::from))
                .expect("valid");
        let mut report = known_report();
        report.jobs[0].spec = config.jobs[0].clone();
        let json = render_json(&report);
        assert_eq!(json["global options"], json!({ "ioengine": "null", "size": "1M" }));
        assert_eq!(json["jobs"][0]["job options"], json!({ "name": "x", "bs": "8k" }));
    }
}
