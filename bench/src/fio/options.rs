//! The one fio option table and `apply_option`, which sets a single option on a
//! `JobSpec`. The command-line parser and the job-file parser both go through here,
//! so option names, aliases and value syntax are defined exactly once.

use super::error::OptionError;
use super::size::{parse_bool, parse_duration, parse_size, parse_uint};
use super::spec::{JobSpec, RwMode, SetOption};
use super::values::{parse_bsrange, parse_bssplit, parse_engine, parse_exit_what, parse_per_direction, parse_verify};

/// How an option takes its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// Needs a value: `--bs=4k`, `--bs 4k` or `bs=4k` (fio's `required_argument`).
    Required,
    /// May be bare: `--time_based` means `--time_based=1` (fio's `FIO_OPT_STR_SET`).
    /// On the command line a value must be attached with `=`, as with fio.
    Flag,
}

/// The `JobSpec` field an option sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Name,
    Filename,
    IoEngine,
    Size,
    Offset,
    IoSize,
    BlockSize,
    Rw,
    RwMixRead,
    RwMixWrite,
    IoDepth,
    NumJobs,
    RateIops,
    PrioClass,
    Prio,
    RandSeed,
    Runtime,
    RampTime,
    TimeBased,
    GroupReporting,
    Direct,
    Buffered,
    RandRepeat,
    Directory,
    NrFiles,
    Stonewall,
    NewGroup,
    ExitAll,
    WaitFor,
    ExitWhat,
    NumberIos,
    FileSize,
    Loops,
    StartDelay,
    ThinkTime,
    Rate,
    BsSplit,
    BsRange,
    NoRandomMap,
    Fsync,
    Fdatasync,
    EndFsync,
    Verify,
    DoVerify,
    RbdPool,
    RbdName,
    RbdClient,
    NbdUri,
    /// Accepted for compatibility, no effect (see [`IGNORED_OPTIONS`]); any text.
    IgnoredText,
    /// Accepted for compatibility, no effect; the value must still be a boolean.
    IgnoredBool,
}

/// One known option: its fio name, fio's aliases for it, and its value syntax.
#[derive(Debug, Clone, Copy)]
pub struct OptionDef {
    /// fio's name for the option.
    pub name: &'static str,
    /// Other spellings fio accepts for the same option.
    pub aliases: &'static [&'static str],
    /// Whether a value is required.
    pub kind: ValueKind,
    field: Field,
    /// One line for `usage()`.
    pub help: &'static str,
}

const fn def(
    name: &'static str,
    aliases: &'static [&'static str],
    kind: ValueKind,
    field: Field,
    help: &'static str,
) -> OptionDef {
    OptionDef { name, aliases, kind, field, help }
}

use ValueKind::{Flag, Required};

/// Every option that changes a `JobSpec`, with fio's aliases. Boolean options that fio
/// types as `FIO_OPT_BOOL` (direct, buffered, randrepeat) need a value, as in fio.
pub const OPTION_TABLE: &[OptionDef] = &[
    def("name", &[], Required, Field::Name, "start a new job called NAME (command line) / rename the job"),
    def("filename", &[], Required, Field::Filename, "file or block device to run against"),
    def("ioengine", &[], Required, Field::IoEngine, "engine name, kept verbatim; null runs without a file"),
    def("size", &[], Required, Field::Size, "bytes of the file to use (default: the whole file)"),
    def("offset", &["fileoffset"], Required, Field::Offset, "start of the region within the file"),
    def("io_size", &["io_limit"], Required, Field::IoSize, "total bytes to transfer (default: size)"),
    def("bs", &["blocksize"], Required, Field::BlockSize, "block size of each I/O (default 4k)"),
    def(
        "rw",
        &["readwrite"],
        Required,
        Field::Rw,
        "read, write, randread, randwrite, rw|readwrite, randrw (default read)",
    ),
    def("rwmixread", &[], Required, Field::RwMixRead, "percentage of reads in mixed modes (default 50)"),
    def(
        "rwmixwrite",
        &[],
        Required,
        Field::RwMixWrite,
        "percentage of writes in mixed modes (sets rwmixread = 100 - N)",
    ),
    def("iodepth", &[], Required, Field::IoDepth, "I/Os in flight per job, 1..=65536 (default 1)"),
    def("numjobs", &[], Required, Field::NumJobs, "run N clones of the job (default 1)"),
    def("rate_iops", &[], Required, Field::RateIops, "cap IOPS per job: N (both directions) or READ,WRITE; 0 = no cap"),
    def("rate", &[], Required, Field::Rate, "cap bytes/s per job: N (both directions) or READ,WRITE; 0 = no cap"),
    def("directory", &[], Required, Field::Directory, "prefix of relative file names; where JOB.N.M files go"),
    def("nrfiles", &["nr_files"], Required, Field::NrFiles, "files per job when no filename is given (default 1)"),
    def("stonewall", &["wait_for_previous"], Flag, Field::Stonewall, "wait for earlier jobs; start a new group"),
    def("new_group", &[], Flag, Field::NewGroup, "start a new reporting group"),
    def("exitall", &[], Flag, Field::ExitAll, "when this job finishes, stop the rest of its group"),
    def("exit_what", &[], Required, Field::ExitWhat, "what exitall stops: group (default), stonewall or all"),
    def("number_ios", &[], Required, Field::NumberIos, "stop after N I/Os (0 = no limit)"),
    def("wait_for", &[], Required, Field::WaitFor, "start when every clone of the earlier job NAME has finished"),
    def("filesize", &[], Required, Field::FileSize, "size of each file (default: size split over the files)"),
    def("loops", &[], Required, Field::Loops, "passes over the region (default 1)"),
    def("startdelay", &[], Required, Field::StartDelay, "wait before starting the job (plain number = seconds)"),
    def("thinktime", &[], Required, Field::ThinkTime, "pause after each I/O (plain number = microseconds)"),
    def("bssplit", &[], Required, Field::BsSplit, "weighted block sizes: 4k/60:64k/40[,WRITE-LIST]"),
    def("bsrange", &["blocksize_range"], Required, Field::BsRange, "MIN-MAX block sizes; only MIN = MAX"),
    def("norandommap", &[], Flag, Field::NoRandomMap, "random offsets may repeat within a pass"),
    def("fsync", &[], Required, Field::Fsync, "flush after every N writes (0 = never)"),
    def("fdatasync", &[], Required, Field::Fdatasync, "flush after every N writes (0 = never)"),
    def("end_fsync", &[], Required, Field::EndFsync, "flush when the job's writes are done"),
    def("verify", &[], Required, Field::Verify, "crc32c or md5 header in each block, checked on read-back"),
    def("do_verify", &[], Required, Field::DoVerify, "read back and check after writing (default 1)"),
    def("pool", &[], Required, Field::RbdPool, "ioengine=rbd: the Ceph pool"),
    def("rbdname", &[], Required, Field::RbdName, "ioengine=rbd: the image"),
    def("clientname", &[], Required, Field::RbdClient, "ioengine=rbd: the Ceph user (without client.)"),
    def(
        "uri",
        &[],
        Required,
        Field::NbdUri,
        "ioengine=nbd: the export, nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH",
    ),
    def("prioclass", &[], Required, Field::PrioClass, "I/O priority class: 0 none, 1 rt, 2 be, 3 idle"),
    def("prio", &[], Required, Field::Prio, "I/O priority level within the class, 0..=7"),
    def("randseed", &[], Required, Field::RandSeed, "seed for random offsets"),
    def(
        "runtime",
        &["timeout"],
        Required,
        Field::Runtime,
        "stop after this time (plain number = seconds; us/ms/s/m/h/d)",
    ),
    def("ramp_time", &[], Required, Field::RampTime, "warm up this long before measuring"),
    def("time_based", &[], Flag, Field::TimeBased, "run for the full runtime, wrapping around the region"),
    def("group_reporting", &[], Flag, Field::GroupReporting, "report all jobs as one"),
    def("direct", &[], Required, Field::Direct, "1 = O_DIRECT, 0 = buffered (default 0)"),
    def("buffered", &[], Required, Field::Buffered, "inverse of direct"),
    def("randrepeat", &["allrandrepeat"], Required, Field::RandRepeat, "same random sequence on every run (default 1)"),
];

/// fio options that are accepted and recorded (they appear in the JSON "job options")
/// but have NO effect: they tune fio internals (threads vs processes, buffer refills,
/// clock batching, random-map bookkeeping, cache invalidation, io_uring setup flags)
/// that Tandem's runner decides for itself. They are listed so that common job files
/// run unchanged. Their values are still checked: flags must be 0/1/true/false.
pub const IGNORED_OPTIONS: &[OptionDef] = &[
    def("description", &[], Required, Field::IgnoredText, "accepted for compatibility; no effect"),
    def("thread", &["threads"], Flag, Field::IgnoredBool, "accepted for compatibility; no effect"),
    def("refill_buffers", &[], Flag, Field::IgnoredBool, "accepted for compatibility; no effect"),
    def("gtod_reduce", &[], Required, Field::IgnoredBool, "accepted for compatibility; no effect"),
    def("invalidate", &[], Required, Field::IgnoredBool, "accepted for compatibility; no effect"),
    def("fixedbufs", &[], Flag, Field::IgnoredBool, "accepted for compatibility; no effect"),
    def("registerfiles", &[], Flag, Field::IgnoredBool, "accepted for compatibility; no effect"),
    def("hipri", &[], Flag, Field::IgnoredBool, "accepted for compatibility; no effect"),
    def("sqthread_poll", &[], Flag, Field::IgnoredBool, "accepted for compatibility; no effect"),
];

/// Finds an option by fio name or alias (exact, case-sensitive, as fio matches).
pub fn lookup_option(key: &str) -> Option<&'static OptionDef> {
    OPTION_TABLE.iter().chain(IGNORED_OPTIONS).find(|def| def.name == key || def.aliases.contains(&key))
}

/// Sets option `key` on `spec`. `value` is `None` for a bare `key`; an empty value counts
/// as absent. The option is recorded in `spec.job_options` for the JSON report.
pub fn apply_option(spec: &mut JobSpec, key: &str, value: Option<&str>) -> Result<(), OptionError> {
    let key = key.trim();
    let value = value.map(str::trim).filter(|text| !text.is_empty());
    let def = lookup_option(key).ok_or_else(|| OptionError::UnknownOption { name: key.to_string() })?;
    if def.kind == ValueKind::Required && value.is_none() {
        return Err(OptionError::MissingValue { option: key.to_string() });
    }
    set_field(spec, def, value).map_err(|err| err.for_option(key))?;
    spec.job_options.push(SetOption { key: key.to_string(), value: value.unwrap_or("").to_string() });
    Ok(())
}

/// Dispatches to the setter for the option's value type.
fn set_field(spec: &mut JobSpec, def: &OptionDef, value: Option<&str>) -> Result<(), OptionError> {
    match (def.kind, value) {
        (ValueKind::Flag, flag) => {
            let on = flag.map_or(Ok(true), parse_bool)?;
            set_flag(spec, def.field, on);
            Ok(())
        }
        (ValueKind::Required, Some(text)) => set_valued(spec, def.field, text),
        // apply_option has already reported the missing value.
        (ValueKind::Required, None) => Err(OptionError::MissingValue { option: def.name.to_string() }),
    }
}

/// Flags; ignored flags have had their value checked by the caller and change nothing.
fn set_flag(spec: &mut JobSpec, field: Field, on: bool) {
    match field {
        Field::TimeBased => spec.time_based = on,
        Field::GroupReporting => spec.group_reporting = on,
        Field::Stonewall => spec.stonewall = on,
        Field::NewGroup => spec.new_group = on,
        Field::ExitAll => spec.exitall = on,
        Field::NoRandomMap => spec.norandommap = on,
        _ => {}
    }
}

/// Options whose value is text, a size, a time, or a boolean written out.
fn set_valued(spec: &mut JobSpec, field: Field, text: &str) -> Result<(), OptionError> {
    match field {
        Field::Name => spec.name = text.to_string(),
        Field::Filename => spec.filename = Some(text.to_string()),
        Field::IoEngine => {
            parse_engine(text)?;
            spec.ioengine = Some(text.to_string());
        }
        Field::Directory => spec.directory = Some(text.to_string()),
        Field::WaitFor => spec.wait_for = Some(text.to_string()),
        Field::ExitWhat => spec.exit_what = parse_exit_what(text)?,
        Field::FileSize => spec.filesize_bytes = Some(parse_size(text)?),
        Field::StartDelay => spec.startdelay = parse_duration(text)?,
        Field::ThinkTime => spec.thinktime = parse_micros(text)?,
        Field::Rate => spec.rate_bytes = parse_per_direction(text)?,
        Field::RateIops => spec.rate_iops = parse_per_direction(text)?,
        Field::BsSplit => spec.bssplit = Some(parse_bssplit(text)?),
        Field::BsRange => spec.block_size_bytes = parse_bsrange(text)?,
        Field::EndFsync => spec.end_fsync = parse_bool(text)?,
        Field::Verify => spec.verify = parse_verify(text)?,
        Field::DoVerify => spec.do_verify = parse_bool(text)?,
        Field::RbdPool => spec.rbd_pool = Some(text.to_string()),
        Field::RbdName => spec.rbd_image = Some(text.to_string()),
        Field::RbdClient => spec.rbd_client = Some(text.to_string()),
        Field::NbdUri => spec.nbd_uri = Some(text.to_string()),
        Field::Size => spec.size_bytes = Some(parse_size(text)?),
        Field::Offset => spec.offset_bytes = parse_size(text)?,
        Field::IoSize => spec.io_size_bytes = Some(parse_size(text)?),
        Field::BlockSize => spec.block_size_bytes = parse_block_size(text)?,
        Field::Rw => spec.rw = parse_rw(text)?,
        // fio: runtime=0 means "no limit".
        Field::Runtime => spec.runtime = Some(parse_duration(text)?).filter(|time| !time.is_zero()),
        Field::RampTime => spec.ramp_time = parse_duration(text)?,
        Field::Direct => spec.direct = parse_bool(text)?,
        Field::Buffered => spec.direct = !parse_bool(text)?,
        Field::RandRepeat => spec.randrepeat = parse_bool(text)?,
        Field::IgnoredText => {}
        // Checked although unused, so a typo such as `gtod_reduce=yes` is still reported.
        Field::IgnoredBool => _ = parse_bool(text)?,
        _ => set_number(spec, field, text)?,
    }
    Ok(())
}

/// Options whose value is a plain integer. Only the type's width is checked here;
/// `JobSpec::validate` checks the meaningful ranges so they are enforced in one place.
fn set_number(spec: &mut JobSpec, field: Field, text: &str) -> Result<(), OptionError> {
    let number = parse_uint(text)?;
    match field {
        Field::RwMixRead => spec.rwmixread_percent = narrow(number, text)?,
        Field::RwMixWrite => spec.rwmixread_percent = 100 - percent(number, text)?,
        Field::IoDepth => spec.iodepth = narrow(number, text)?,
        Field::NumJobs => spec.numjobs = narrow(number, text)?,
        Field::NrFiles => spec.nrfiles = narrow(number, text)?,
        Field::Loops => spec.loops = narrow(number, text)?,
        Field::NumberIos => spec.number_ios = Some(number).filter(|&ios| ios > 0),
        Field::Fsync => spec.fsync_every = narrow(number, text)?,
        Field::Fdatasync => spec.fdatasync_every = narrow(number, text)?,
        Field::PrioClass => spec.prioclass = Some(narrow(number, text)?),
        Field::Prio => spec.prio = Some(narrow(number, text)?),
        Field::RandSeed => spec.randseed = Some(number),
        _ => {}
    }
    Ok(())
}

/// A time whose plain number is microseconds (fio's `thinktime`); suffixes as `parse_duration`.
fn parse_micros(text: &str) -> Result<std::time::Duration, OptionError> {
    match parse_uint(text) {
        Ok(micros) => Ok(std::time::Duration::from_micros(micros)),
        Err(_) => parse_duration(text),
    }
}

/// Converts to the field's integer type, naming the value if it does not fit.
fn narrow<T: TryFrom<u64>>(number: u64, text: &str) -> Result<T, OptionError> {
    T::try_from(number).map_err(|_| OptionError::bad_value(text, "number out of range"))
}

/// A percentage, checked now because `rwmixwrite` is stored as `100 - value`.
fn percent(number: u64, text: &str) -> Result<u32, OptionError> {
    match u32::try_from(number) {
        Ok(pct) if pct <= 100 => Ok(pct),
        _ => Err(OptionError::bad_value(text, "must be at most 100")),
    }
}

/// fio's `bs=` also takes per-direction lists (`bs=4k,8k`) which we do not support.
fn parse_block_size(text: &str) -> Result<u64, OptionError> {
    if text.contains(',') {
        return Err(OptionError::bad_value(text, "separate read/write block sizes are not supported"));
    }
    parse_size(text)
}

fn parse_rw(text: &str) -> Result<RwMode, OptionError> {
    RwMode::from_fio_str(text).ok_or_else(|| {
        OptionError::bad_value(text, "expected read, write, randread, randwrite, rw, readwrite or randrw")
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn apply_all(pairs: &[(&str, Option<&str>)]) -> Result<JobSpec, OptionError> {
        let mut spec = JobSpec::new("t");
        for (key, value) in pairs {
            apply_option(&mut spec, key, *value)?;
        }
        Ok(spec)
    }

    #[test]
    fn every_field_is_settable() {
        let spec = apply_all(&[
            ("filename", Some("/dev/nvme0n1")),
            ("size", Some("1G")),
            ("offset", Some("4k")),
            ("io_size", Some("2M")),
            ("rw", Some("randrw")),
            ("rwmixread", Some("70")),
            ("bs", Some("16k")),
            ("iodepth", Some("32")),
            ("numjobs", Some("4")),
            ("runtime", Some("30")),
            ("time_based", None),
            ("ramp_time", Some("500ms")),
            ("direct", Some("1")),
            ("rate_iops", Some("1000")),
            ("prioclass", Some("2")),
            ("prio", Some("4")),
            ("ioengine", Some("io_uring")),
            ("group_reporting", None),
            ("randrepeat", Some("0")),
            ("randseed", Some("42")),
        ])
        .expect("all valid");
        assert_eq!(spec.filename.as_deref(), Some("/dev/nvme0n1"));
        assert_eq!((spec.size_bytes, spec.offset_bytes, spec.io_size_bytes), (Some(1 << 30), 4096, Some(2 << 20)));
        assert_eq!((spec.rw, spec.rwmixread_percent, spec.block_size_bytes), (RwMode::RandRw, 70, 16384));
        assert_eq!(
            (spec.iodepth, spec.numjobs, spec.rate_iops.read, spec.rate_iops.write),
            (32, 4, Some(1000), Some(1000))
        );
        assert_eq!((spec.runtime, spec.ramp_time), (Some(Duration::from_secs(30)), Duration::from_millis(500)));
        assert!(spec.time_based && spec.direct && spec.group_reporting && !spec.randrepeat);
        assert_eq!((spec.prioclass, spec.prio, spec.randseed), (Some(2), Some(4), Some(42)));
        assert_eq!(spec.ioengine.as_deref(), Some("io_uring"));
        // name + 20 options, in order, as written.
        assert_eq!(spec.job_options.len(), 21);
        assert_eq!(spec.job_options[1], SetOption { key: "filename".into(), value: "/dev/nvme0n1".into() });
        assert_eq!(spec.job_options[11], SetOption { key: "time_based".into(), value: String::new() });
    }

    #[test]
    fn aliases_and_inverse_options() {
        let spec = apply_all(&[
            ("readwrite", Some("rw")),
            ("blocksize", Some("8k")),
            ("timeout", Some("1m")),
            ("rwmixwrite", Some("30")),
            ("buffered", Some("0")),
        ])
        .expect("valid");
        assert_eq!((spec.rw, spec.block_size_bytes), (RwMode::ReadWrite, 8192));
        assert_eq!(spec.runtime, Some(Duration::from_secs(60)));
        assert_eq!(spec.rwmixread_percent, 70);
        assert!(spec.direct);
    }

    #[test]
    fn zero_runtime_and_rate_mean_unlimited_like_fio() {
        let spec = apply_all(&[("runtime", Some("0")), ("rate_iops", Some("0"))]).expect("valid");
        assert_eq!((spec.runtime, spec.rate_iops.read, spec.rate_iops.write), (None, None, None));
    }

    #[test]
    fn flags_take_optional_bool_values() {
        let spec = apply_all(&[("time_based", Some("1")), ("group_reporting", Some("false"))]).expect("valid");
        assert!(spec.time_based && !spec.group_reporting);
        let err = apply_all(&[("time_based", Some("maybe"))]).unwrap_err();
        assert_eq!(
            err,
            OptionError::InvalidValue {
                option: "time_based".into(),
                value: "maybe".into(),
                reason: "expected 1, 0, true or false".into()
            }
        );
    }

    #[test]
    fn unknown_option_is_named() {
        let err = apply_all(&[("bogus", Some("1"))]).unwrap_err();
        assert_eq!(err, OptionError::UnknownOption { name: "bogus".into() });
        assert_eq!(err.to_string(), "unknown option 'bogus'");
    }

    #[test]
    fn malformed_values_name_option_and_value() {
        let err = apply_all(&[("bs", Some("abc"))]).unwrap_err();
        assert!(err.to_string().starts_with("invalid value 'abc' for option 'bs'"), "{err}");
        for (key, value) in [("rw", "trim"), ("iodepth", "4k"), ("prio", "300"), ("rwmixwrite", "101"), ("bs", "4k,8k")]
        {
            let err = apply_all(&[(key, Some(value))]).unwrap_err();
            assert!(
                matches!(err, OptionError::InvalidValue { ref option, value: ref v, .. } if option == key && v == value),
                "{key}={value}: {err:?}"
            );
        }
    }

    #[test]
    fn valued_options_require_a_value_like_fio() {
        // fio: "option '--direct' requires an argument"; bools need a value, flags do not.
        for key in ["bs", "direct", "filename", "gtod_reduce"] {
            assert_eq!(apply_all(&[(key, None)]).unwrap_err(), OptionError::MissingValue { option: key.into() });
            assert_eq!(apply_all(&[(key, Some("  "))]).unwrap_err(), OptionError::MissingValue { option: key.into() });
        }
    }

    #[test]
    fn job_file_options_of_fios_examples() {
        let spec = apply_all(&[
            ("directory", Some("/data")),
            ("nr_files", Some("3")),
            ("wait_for_previous", None),
            ("new_group", None),
            ("loops", Some("2")),
            ("startdelay", Some("4")),
            ("thinktime", Some("2000")),
            ("rate", Some("1m,500k")),
            ("rate_iops", Some(",300")),
            ("bssplit", Some("4k/60:64k/40")),
            ("norandommap", None),
            ("fsync", Some("8")),
            ("fdatasync", Some("4")),
            ("end_fsync", Some("1")),
            ("verify", Some("md5")),
            ("do_verify", Some("0")),
            ("ioengine", Some("libaio")),
            ("exitall", None),
            ("filesize", Some("2m")),
        ])
        .expect("valid");
        assert!(spec.exitall);
        assert_eq!(spec.filesize_bytes, Some(2 << 20));
        assert_eq!((spec.directory.as_deref(), spec.nrfiles, spec.loops), (Some("/data"), 3, 2));
        assert!(spec.stonewall && spec.new_group && spec.norandommap && spec.end_fsync && !spec.do_verify);
        assert_eq!((spec.startdelay, spec.thinktime), (Duration::from_secs(4), Duration::from_micros(2000)));
        assert_eq!((spec.rate_bytes.read, spec.rate_bytes.write), (Some(1 << 20), Some(500 << 10)));
        assert_eq!((spec.rate_iops.read, spec.rate_iops.write), (None, Some(300)));
        assert_eq!((spec.max_block_bytes(), spec.min_block_bytes()), (65536, 4096));
        assert_eq!((spec.flush_every(), spec.verify), (4, Some(crate::fio::values::VerifyKind::Md5)));
        assert_eq!(spec.effective_iodepth(), 1);
        let sync = apply_all(&[("ioengine", Some("psync")), ("iodepth", Some("8"))]).expect("valid");
        assert_eq!(sync.effective_iodepth(), 1);
    }

    #[test]
    fn unsupported_values_of_supported_options_are_named() {
        for (key, value) in [
            ("ioengine", "cpuio"),
            ("verify", "crc64"),
            ("bsrange", "4k-64k"),
            ("bssplit", "4k/70:8k/70"),
            ("rate", "1,2,3,4"),
            ("startdelay", "10-20"),
            ("loops", "x"),
        ] {
            let err = apply_all(&[(key, Some(value))]).unwrap_err();
            assert!(
                matches!(err, OptionError::InvalidValue { ref option, value: ref v, .. } if option == key && v == value),
                "{key}={value}: {err:?}"
            );
        }
    }

    #[test]
    fn ignored_options_are_recorded_but_change_nothing() {
        let spec =
            apply_all(&[("thread", None), ("gtod_reduce", Some("1")), ("description", Some("x y"))]).expect("accepted");
        let mut expected = JobSpec::new("t");
        expected.job_options = spec.job_options.clone();
        assert_eq!(spec, expected);
        assert_eq!(spec.job_options.len(), 4);
        assert!(apply_all(&[("hipri", Some("yes"))]).is_err());
        assert!(IGNORED_OPTIONS.iter().all(|def| lookup_option(def.name).is_some()));
    }
}
