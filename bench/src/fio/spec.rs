//! The description of one benchmark job (`JobSpec`) with fio's defaults, and the
//! validation that runs once all of a job's options are applied.

use std::time::Duration;

use super::error::OptionError;
use super::values::{parse_engine, BsSplit, Engine, ExitWhat, ReadWrite, VerifyKind};

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
    /// IOPS cap per direction; `None` (fio `rate_iops=0`) means uncapped.
    pub rate_iops: ReadWrite<Option<u64>>,
    /// Bandwidth cap per direction in bytes per second (fio `rate`); `None` means uncapped.
    pub rate_bytes: ReadWrite<Option<u64>>,
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
    /// Prefix of relative file names, and where generated names (`JOB.N.M`) go.
    pub directory: Option<String>,
    /// Size of each file (fio `filesize`); `None`: `size` split evenly over the files.
    pub filesize_bytes: Option<u64>,
    /// Which jobs `exitall` stops (fio `exit_what`, default the group).
    pub exit_what: ExitWhat,
    /// Stop after this many I/Os even if the region is not done (fio `number_ios`).
    pub number_ios: Option<u64>,
    /// Start only when every clone of the earlier job of this name has finished (fio `wait_for`).
    pub wait_for: Option<String>,
    /// When this job finishes, stop the other jobs of its reporting group (fio `exitall`).
    pub exitall: bool,
    /// Files per job clone when no `filename` is given (fio `nrfiles`), >= 1.
    pub nrfiles: u32,
    /// Wait for every earlier job to finish before starting (fio `stonewall`); starts a group.
    pub stonewall: bool,
    /// Start a new reporting group without waiting (fio `new_group`).
    pub new_group: bool,
    /// Reporting group, assigned once all jobs are parsed (`groups::assign_groups`).
    pub groupid: u32,
    /// Passes over the region (fio `loops`), >= 1.
    pub loops: u32,
    /// Wait this long before the job starts (fio `startdelay`).
    pub startdelay: Duration,
    /// Pause after each I/O completes before the lane issues its next one (fio `thinktime`).
    pub thinktime: Duration,
    /// Weighted block sizes (fio `bssplit`); overrides `block_size_bytes` when set.
    pub bssplit: Option<BsSplit>,
    /// Random offsets with repeats (true) or each block once per pass (fio's default random map).
    pub norandommap: bool,
    /// Flush after every N writes (fio `fsync`); 0 = never.
    pub fsync_every: u32,
    /// Flush after every N writes (fio `fdatasync`; our drivers have one flush); 0 = never.
    pub fdatasync_every: u32,
    /// Flush once when the job's writes are done (fio `end_fsync`).
    pub end_fsync: bool,
    /// Checksum written into each block's header and checked on read-back (fio `verify`).
    pub verify: Option<VerifyKind>,
    /// Run the read-back phase after a write job (fio `do_verify`, default 1).
    pub do_verify: bool,
    /// fio rbd engine's `pool`, `rbdname` and `clientname`: the image when no filename is given.
    pub rbd_pool: Option<String>,
    pub rbd_image: Option<String>,
    pub rbd_client: Option<String>,
    /// fio nbd engine's `uri`: the export when no filename is given.
    pub nbd_uri: Option<String>,
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
            rate_iops: ReadWrite::default(),
            rate_bytes: ReadWrite::default(),
            prioclass: None,
            prio: None,
            ioengine: None,
            group_reporting: false,
            randrepeat: true,
            randseed: None,
            directory: None,
            filesize_bytes: None,
            exitall: false,
            wait_for: None,
            exit_what: ExitWhat::Group,
            number_ios: None,
            nrfiles: 1,
            stonewall: false,
            new_group: false,
            groupid: 0,
            loops: 1,
            startdelay: Duration::ZERO,
            thinktime: Duration::ZERO,
            bssplit: None,
            norandommap: false,
            fsync_every: 0,
            fdatasync_every: 0,
            end_fsync: false,
            verify: None,
            do_verify: true,
            rbd_pool: None,
            rbd_image: None,
            rbd_client: None,
            nbd_uri: None,
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
        self.validate_target()?;
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
        self.validate_job_file_options()
    }

    /// The options fio's job files add: loops, files, rate limits, verify.
    fn validate_job_file_options(&self) -> Result<(), OptionError> {
        self.check(self.loops >= 1, "loops", u64::from(self.loops), "must be at least 1")?;
        let any = |rate: &ReadWrite<Option<u64>>| rate.read.or(rate.write);
        if let (Some(_), Some(iops)) = (any(&self.rate_bytes), any(&self.rate_iops)) {
            // fio refuses the pair even when they limit different directions.
            self.check(false, "rate_iops", iops, "rate and rate_iops are mutually exclusive (as in fio)")?;
        }
        self.check(self.nrfiles >= 1, "nrfiles", u64::from(self.nrfiles), "must be at least 1")?;
        if let Some(kind) = self.verify {
            let mixed = self.rw.reads() && self.rw.writes();
            let value = format!("{kind:?}").to_lowercase();
            let reason = "verify runs with write jobs (written, then read back) or read jobs, not mixed rw";
            self.check_text(!mixed, "verify", &value, reason)?;
            let small = self.min_block_bytes();
            self.check(small >= 64, "bs", small, "verify needs blocks of at least 64 bytes for its header")?;
        }
        Ok(())
    }

    /// What the job does I/O against: a file or device, generated files (they need a size),
    /// an rbd image, or nothing (null).
    fn validate_target(&self) -> Result<(), OptionError> {
        if let Some(text) = &self.ioengine {
            parse_engine(text).map_err(|err| err.for_option("ioengine"))?;
        }
        match (self.engine(), &self.filename) {
            (Engine::Null, _) | (_, Some(_)) => Ok(()),
            (Engine::Rbd, None) if self.rbd_pool.is_some() && self.rbd_image.is_some() => Ok(()),
            (Engine::Rbd, None) => Err(self.missing("rbdname", "ioengine=rbd needs pool= and rbdname= (or filename=rbd:POOL/IMAGE)")),
            (Engine::Nbd, None) if self.nbd_uri.is_some() => Ok(()),
            (Engine::Nbd, None) => Err(self.missing("uri", "ioengine=nbd needs uri=nbd://HOST[:PORT]/EXPORT or uri=nbd+unix:///EXPORT?socket=PATH")),
            (_, None) if self.size_bytes.or(self.filesize_bytes).is_some() => Ok(()),
            (_, None) => Err(self.missing(
                "filename",
                "the target file or device; or size= to create files named JOB.N.M in directory= (default: the current one)",
            )),
        }
    }

    /// The engine `ioengine` names; our default (no `ioengine`) is asynchronous io_uring, where
    /// fio's is psync. An unknown name has been refused when the option was set.
    pub fn engine(&self) -> Engine {
        self.ioengine.as_deref().and_then(|text| parse_engine(text).ok()).unwrap_or(Engine::Async)
    }

    /// I/Os in flight: `iodepth`, or 1 for fio's synchronous engines (psync and friends
    /// complete each I/O before issuing the next, whatever `iodepth` says).
    pub fn effective_iodepth(&self) -> u32 {
        match self.engine() {
            Engine::Sync => 1,
            _ => self.iodepth,
        }
    }

    /// The largest I/O the job issues (a lane's buffer size).
    pub fn max_block_bytes(&self) -> u64 {
        self.bssplit.as_ref().map_or(self.block_size_bytes, BsSplit::max_bytes)
    }

    /// The smallest I/O the job issues (the grain of its offsets).
    pub fn min_block_bytes(&self) -> u64 {
        self.bssplit.as_ref().map_or(self.block_size_bytes, BsSplit::min_bytes)
    }

    /// Flush after every this many writes (`fsync` or `fdatasync`, the smaller); 0 = never.
    pub fn flush_every(&self) -> u32 {
        match (self.fsync_every, self.fdatasync_every) {
            (0, every) | (every, 0) => every,
            (a, b) => a.min(b),
        }
    }

    fn check_text(&self, ok: bool, option: &str, value: &str, reason: &str) -> Result<(), OptionError> {
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

    /// `InvalidJob` for `option` unless `ok`; keeps `validate` to one line per rule.
    fn check(&self, ok: bool, option: &str, value: u64, reason: &str) -> Result<(), OptionError> {
        self.check_text(ok, option, &value.to_string(), reason)
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
        let mut generated = JobSpec::new("g");
        generated.size_bytes = Some(1 << 20);
        assert_eq!(generated.validate(), Ok(()));
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
