//! The description of one benchmark job (`JobSpec`) with fio's defaults, and the
//! validation that runs once all of a job's options are applied.

use std::time::Duration;

use super::error::OptionError;

/// fio's `rw=` I/O pattern. Trim patterns are not supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RwMode {
    /// `read`: sequential reads (fio's default).
    #[default]
    Read,
    /// `write`: sequential writes.
    Write,
    /// `randread`: random reads.
    RandRead,
    /// `randwrite`: random writes.
    RandWrite,
    /// `randrw`: random mixed reads and writes, split by `rwmixread`.
    RandRw,
    /// `rw` or `readwrite`: sequential mixed reads and writes.
    ReadWrite,
}

impl RwMode {
    /// fio's spelling of this mode.
    pub fn as_fio_str(self) -> &'static str {
        match self {
            RwMode::Read => "read",
            RwMode::Write => "write",
            RwMode::RandRead => "randread",
            RwMode::RandWrite => "randwrite",
            RwMode::RandRw => "randrw",
            RwMode::ReadWrite => "rw",
        }
    }

    /// Parses fio's spelling; `None` for anything else (including trim modes).
    pub fn from_fio_str(text: &str) -> Option<RwMode> {
        match text {
            "read" => Some(RwMode::Read),
            "write" => Some(RwMode::Write),
            "randread" => Some(RwMode::RandRead),
            "randwrite" => Some(RwMode::RandWrite),
            "randrw" => Some(RwMode::RandRw),
            "rw" | "readwrite" => Some(RwMode::ReadWrite),
            _ => None,
        }
    }

    /// Whether this mode issues reads.
    pub fn reads(self) -> bool {
        !matches!(self, RwMode::Write | RwMode::RandWrite)
    }

    /// Whether this mode issues writes.
    pub fn writes(self) -> bool {
        !matches!(self, RwMode::Read | RwMode::RandRead)
    }

    /// Whether offsets are random rather than sequential.
    pub fn is_random(self) -> bool {
        matches!(self, RwMode::RandRead | RwMode::RandWrite | RwMode::RandRw)
    }
}

/// fio's spelling of `mode` (`rw=` value), e.g. for building a fio command line.
pub fn rw_name(mode: RwMode) -> &'static str {
    mode.as_fio_str()
}

/// One option exactly as the user set it, kept for fio's `"job options"` JSON map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetOption {
    /// The option name as written (an alias stays an alias), without leading dashes.
    pub key: String,
    /// The value as written; empty for a bare flag such as `--time_based`.
    pub value: String,
}

/// One job: what to run and how. Field defaults are fio's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    /// Job name (`--name`, or the job file section name).
    pub name: String,
    /// File or block device to run against; not needed with `ioengine=null`.
    pub filename: Option<String>,
    /// Region size; `None` lets the runner use the file's size.
    pub size_bytes: Option<u64>,
    /// Start of the region within the file.
    pub offset_bytes: u64,
    /// Total bytes to transfer (fio `io_size`); `None` means `size_bytes`.
    pub io_size_bytes: Option<u64>,
    /// I/O pattern.
    pub rw: RwMode,
    /// Share of reads in mixed modes, 0..=100.
    pub rwmixread_percent: u32,
    /// Block size of each I/O, > 0.
    pub block_size_bytes: u64,
    /// I/Os kept in flight, 1..=65536.
    pub iodepth: u32,
    /// Identical clones of this job to run; the runner does the cloning.
    pub numjobs: u32,
    /// Time limit; `None` (fio `runtime=0`) means no limit.
    pub runtime: Option<Duration>,
    /// Keep going for the full `runtime` even after `size` is done (repeat the region).
    pub time_based: bool,
    /// Warm-up time whose I/O is not counted.
    pub ramp_time: Duration,
    /// O_DIRECT (fio's default is buffered).
    pub direct: bool,
    /// IOPS cap; `None` (fio `rate_iops=0`) means uncapped.
    pub rate_iops: Option<u64>,
    /// I/O priority class: 0 none, 1 rt, 2 be, 3 idle.
    pub prioclass: Option<u8>,
    /// I/O priority level within the class, 0..=7.
    pub prio: Option<u8>,
    /// fio engine name, kept verbatim (io_uring, libaio, psync, sync, null, ...).
    pub ioengine: Option<String>,
    /// Report all jobs as one merged result.
    pub group_reporting: bool,
    /// Seed random offsets the same way on every run.
    pub randrepeat: bool,
    /// Explicit random seed.
    pub randseed: Option<u64>,
    /// Options inherited from global scope (command line before `--name`, `[global]`).
    pub global_options: Vec<SetOption>,
    /// Options set on this job itself, starting with its `name`.
    pub job_options: Vec<SetOption>,
}

impl Default for JobSpec {
    fn default() -> Self {
        JobSpec {
            name: String::new(),
            filename: None,
            size_bytes: None,
            offset_bytes: 0,
            io_size_bytes: None,
            rw: RwMode::Read,
            rwmixread_percent: 50,
            block_size_bytes: 4096,
            iodepth: 1,
            numjobs: 1,
            runtime: None,
            time_based: false,
            ramp_time: Duration::ZERO,
            direct: false,
            rate_iops: None,
            prioclass: None,
            prio: None,
            ioengine: None,
            group_reporting: false,
            randrepeat: true,
            randseed: None,
            global_options: Vec::new(),
            job_options: Vec::new(),
        }
    }
}

/// Largest accepted `iodepth`; deeper queues than this are a typo, not a benchmark.
pub const MAX_IODEPTH: u32 = 65_536;

impl JobSpec {
    /// A job called `name` with fio's defaults, for building jobs in code.
    pub fn new(name: &str) -> JobSpec {
        JobSpec::new_job(&JobSpec::default(), name)
    }

    /// Starts job `name` from the global options in `globals`, as fio's `--name` and job
    /// file sections do: every option set on `globals` becomes a global option of the job.
    pub fn new_job(globals: &JobSpec, name: &str) -> JobSpec {
        let mut job = globals.clone();
        job.name = name.to_string();
        job.global_options.append(&mut job.job_options);
        job.job_options = vec![SetOption { key: "name".to_string(), value: name.to_string() }];
        job
    }

    /// Checks that the job can run: ranges of every numeric option, a target file
    /// (unless `ioengine=null`), and a `runtime` when `time_based` is set.
    pub fn validate(&self) -> Result<(), OptionError> {
        if self.name.is_empty() {
            return Err(self.missing("name", "every job needs a name"));
        }
        let needs_file = self.ioengine.as_deref() != Some("null");
        if needs_file && self.filename.is_none() {
            return Err(self.missing("filename", "the target file or device (only ioengine=null runs without one)"));
        }
        self.check(self.block_size_bytes > 0, "bs", self.block_size_bytes, "must be greater than 0")?;
        let iodepth_ok = (1..=MAX_IODEPTH).contains(&self.iodepth);
        self.check(iodepth_ok, "iodepth", u64::from(self.iodepth), "must be between 1 and 65536")?;
        self.check(
            self.rwmixread_percent <= 100,
            "rwmixread",
            u64::from(self.rwmixread_percent),
            "must be at most 100",
        )?;
        self.check(self.numjobs >= 1, "numjobs", u64::from(self.numjobs), "must be at least 1")?;
        if let Some(class) = self.prioclass {
            self.check(class <= 3, "prioclass", u64::from(class), "must be 0 (none), 1 (rt), 2 (be) or 3 (idle)")?;
        }
        if let Some(prio) = self.prio {
            self.check(prio <= 7, "prio", u64::from(prio), "must be between 0 and 7")?;
        }
        if self.time_based && self.runtime.is_none() {
            return Err(self.missing("runtime", "time_based needs a non-zero runtime to know when to stop"));
        }
        Ok(())
    }

    /// `InvalidJob` for `option` unless `ok`; keeps `validate` to one line per rule.
    fn check(&self, ok: bool, option: &str, value: u64, reason: &str) -> Result<(), OptionError> {
        if ok {
            return Ok(());
        }
        Err(OptionError::InvalidJob {
            job: self.name.clone(),
            option: option.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        })
    }

    fn missing(&self, option: &str, reason: &str) -> OptionError {
        OptionError::MissingOption { job: self.name.clone(), option: option.to_string(), reason: reason.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runnable(name: &str) -> JobSpec {
        let mut job = JobSpec::new(name);
        job.filename = Some("/tmp/f".into());
        job
    }

    #[test]
    fn defaults_are_fios() {
        let job = JobSpec::new("j");
        assert_eq!((job.rw, job.block_size_bytes, job.iodepth, job.numjobs), (RwMode::Read, 4096, 1, 1));
        assert_eq!((job.rwmixread_percent, job.offset_bytes, job.direct, job.randrepeat), (50, 0, false, true));
        assert_eq!(job.job_options, vec![SetOption { key: "name".into(), value: "j".into() }]);
        assert_eq!(rw_name(RwMode::ReadWrite), "rw");
        assert_eq!(RwMode::from_fio_str("readwrite"), Some(RwMode::ReadWrite));
    }

    #[test]
    fn new_job_moves_global_options_out_of_job_options() {
        let mut globals = JobSpec::default();
        globals.job_options.push(SetOption { key: "bs".into(), value: "8k".into() });
        globals.block_size_bytes = 8192;
        let job = JobSpec::new_job(&globals, "a");
        assert_eq!(job.block_size_bytes, 8192);
        assert_eq!(job.global_options, vec![SetOption { key: "bs".into(), value: "8k".into() }]);
        assert_eq!(job.job_options.len(), 1);
    }

    #[test]
    fn validate_accepts_a_complete_job_and_null_engine_without_file() {
        assert_eq!(runnable("ok").validate(), Ok(()));
        let mut null = JobSpec::new("n");
        null.ioengine = Some("null".into());
        assert_eq!(null.validate(), Ok(()));
    }

    #[test]
    fn validate_requires_filename() {
        let err = JobSpec::new("nofile").validate().unwrap_err();
        assert!(
            matches!(err, OptionError::MissingOption { ref job, ref option, .. } if job == "nofile" && option == "filename")
        );
    }

    #[test]
    fn validate_names_each_out_of_range_value() {
        type Breaker = fn(&mut JobSpec);
        let cases: [(&str, Breaker, &str); 6] = [
            ("bs", |j| j.block_size_bytes = 0, "0"),
            ("iodepth", |j| j.iodepth = 65_537, "65537"),
            ("rwmixread", |j| j.rwmixread_percent = 101, "101"),
            ("numjobs", |j| j.numjobs = 0, "0"),
            ("prioclass", |j| j.prioclass = Some(4), "4"),
            ("prio", |j| j.prio = Some(8), "8"),
        ];
        for (option, break_it, value) in cases {
            let mut job = runnable("bad");
            break_it(&mut job);
            let err = job.validate().unwrap_err();
            assert!(
                matches!(err, OptionError::InvalidJob { option: ref o, value: ref v, .. } if o == option && v == value),
                "{option}: {err:?}"
            );
            assert!(err.to_string().contains(&format!("'{value}'")), "{err}");
        }
    }

    #[test]
    fn time_based_needs_runtime() {
        let mut job = runnable("tb");
        job.time_based = true;
        let err = job.validate().unwrap_err();
        assert!(matches!(err, OptionError::MissingOption { ref option, .. } if option == "runtime"));
        job.runtime = Some(Duration::from_secs(1));
        assert_eq!(job.validate(), Ok(()));
    }
}
