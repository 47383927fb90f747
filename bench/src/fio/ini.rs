//! fio job files: INI text with `[global]` and job sections, `key=value` or bare `key`
//! lines, and `;`/`#` comments. Every option goes through `apply_option`; errors carry
//! the file path and 1-based line number.

use std::io::Read;
use std::path::Path;

use super::error::OptionError;
use super::options::apply_option;
use super::spec::JobSpec;

/// Longest job file read. Job files are a few lines of text; the cap turns a job file that
/// never ends (`/dev/zero`) or is not text into an error instead of exhausting memory.
const JOB_FILE_MAX_BYTES: u64 = 16 << 20;

/// Which section the lines being read belong to.
enum Section {
    /// Before the first section header: options here are an error, as in fio.
    None,
    /// A `[global...]` section: options go to the shared globals.
    Global,
    /// A job section: options go to this job (boxed: a JobSpec is large).
    Job(Box<JobSpec>),
}

/// Parses the job file at `path`. Jobs start from `defaults` (usually the command-line
/// globals) plus every `[global]` section that precedes them in the file.
pub fn parse_job_file(path: &Path, defaults: &JobSpec) -> Result<Vec<JobSpec>, OptionError> {
    let mut globals = defaults.clone();
    parse_job_file_into(path, &mut globals)
}

/// Parses job file text; `path` is only used in error messages.
pub fn parse_job_str(text: &str, path: &str, defaults: &JobSpec) -> Result<Vec<JobSpec>, OptionError> {
    let mut globals = defaults.clone();
    parse_job_text(text, path, &mut globals)
}

/// Like [`parse_job_file`], but `[global]` sections update `globals` in place so they
/// carry over to later job files, as fio's shared default job does.
pub(crate) fn parse_job_file_into(path: &Path, globals: &mut JobSpec) -> Result<Vec<JobSpec>, OptionError> {
    let shown = path.display().to_string();
    let read_error = |reason: String| OptionError::JobFileRead { path: shown.clone(), reason };
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(JOB_FILE_MAX_BYTES + 1).read_to_string(&mut text))
        .map_err(|err| read_error(err.to_string()))?;
    if text.len() as u64 > JOB_FILE_MAX_BYTES {
        return Err(read_error(format!("larger than {} MiB: not a job file", JOB_FILE_MAX_BYTES >> 20)));
    }
    parse_job_text(&text, &shown, globals)
}

fn parse_job_text(text: &str, path: &str, globals: &mut JobSpec) -> Result<Vec<JobSpec>, OptionError> {
    let mut jobs = Vec::new();
    let mut section = Section::None;
    for (index, raw_line) in text.lines().enumerate() {
        let at_line = |message: String| OptionError::JobFile { path: path.to_string(), line: index + 1, message };
        let line = strip_comment(raw_line).trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            let name = section_name(line).map_err(at_line)?;
            if let Section::Job(job) = std::mem::replace(&mut section, Section::None) {
                jobs.push(*job);
            }
            // fio treats any section whose name starts with "global" as global.
            section = if name.starts_with("global") {
                Section::Global
            } else {
                Section::Job(Box::new(JobSpec::new_job(globals, name)))
            };
            continue;
        }
        let (key, value) = split_option(line);
        let target = match &mut section {
            Section::None => return Err(at_line(format!("option '{line}' outside of a [job] section"))),
            Section::Global => &mut *globals,
            Section::Job(job) => job,
        };
        apply_option(target, key, value).map_err(|err| at_line(err.to_string()))?;
    }
    if let Section::Job(job) = section {
        jobs.push(*job);
    }
    Ok(jobs)
}

/// Drops everything from the first `;` or `#`, as fio does (so values cannot hold them).
fn strip_comment(line: &str) -> &str {
    line.find([';', '#']).map_or(line, |at| &line[..at])
}

/// The name inside `[name]`, trimmed and non-empty.
fn section_name(line: &str) -> Result<&str, String> {
    let name = line
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .ok_or_else(|| format!("malformed section header '{line}': expected [name]"))?
        .trim();
    if name.is_empty() {
        return Err(format!("empty section name in '{line}'"));
    }
    Ok(name)
}

/// `key=value` (whitespace around `=` allowed) or a bare `key`.
fn split_option(line: &str) -> (&str, Option<&str>) {
    match line.split_once('=') {
        Some((key, value)) => (key.trim(), Some(value.trim())),
        None => (line, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fio::spec::RwMode;

    const TWO_JOBS: &str = "\
; a comment
# another comment
[global]
ioengine = io_uring
filename=/dev/nvme0n1   ; trailing comment
direct=1
time_based
runtime=10s

[seq-read]
rw=read
bs = 128k

[rand-write]
rw=randwrite
iodepth=16
";

    #[test]
    fn global_section_applies_to_both_jobs() {
        let jobs = parse_job_str(TWO_JOBS, "two.fio", &JobSpec::default()).expect("valid");
        assert_eq!(jobs.len(), 2);
        for job in &jobs {
            assert_eq!(job.filename.as_deref(), Some("/dev/nvme0n1"));
            assert_eq!(job.ioengine.as_deref(), Some("io_uring"));
            assert!(job.direct && job.time_based);
            assert_eq!(job.runtime, Some(std::time::Duration::from_secs(10)));
        }
        assert_eq!((jobs[0].name.as_str(), jobs[0].rw, jobs[0].block_size_bytes), ("seq-read", RwMode::Read, 131072));
        assert_eq!((jobs[1].name.as_str(), jobs[1].rw, jobs[1].iodepth), ("rand-write", RwMode::RandWrite, 16));
        assert_eq!(jobs[1].block_size_bytes, 4096, "job options must not leak between sections");
        assert_eq!(jobs[0].global_options.len(), 5);
    }

    #[test]
    fn later_global_section_only_affects_later_jobs() {
        let text = "[global]\nbs=8k\n[a]\n[global]\nbs=16k\n[b]\n";
        let jobs = parse_job_str(text, "g.fio", &JobSpec::default()).expect("valid");
        assert_eq!((jobs[0].block_size_bytes, jobs[1].block_size_bytes), (8192, 16384));
    }

    #[test]
    fn defaults_come_before_file_values() {
        let defaults = JobSpec { iodepth: 8, block_size_bytes: 512, ..JobSpec::default() };
        let jobs = parse_job_str("[j]\nbs=1k\n", "d.fio", &defaults).expect("valid");
        assert_eq!((jobs[0].iodepth, jobs[0].block_size_bytes), (8, 1024));
    }

    #[test]
    fn bad_option_reports_path_and_line() {
        let text = "[global]\nbs=4k\n\n[job]\nrw=read\nbs=abc\n";
        let err = parse_job_str(text, "bad.fio", &JobSpec::default()).unwrap_err();
        assert_eq!(
            err,
            OptionError::JobFile {
                path: "bad.fio".into(),
                line: 6,
                message: "invalid value 'abc' for option 'bs': expected a non-negative integer".into()
            }
        );
        assert!(err.to_string().starts_with("bad.fio:6: "));
    }

    #[test]
    fn structural_errors_carry_line_numbers() {
        let cases = [
            ("bs=4k\n[j]\n", 1, "outside of a [job] section"),
            ("[j]\n[broken\n", 2, "malformed section header"),
            ("[j]\n[ ]\n", 2, "empty section name"),
            ("[j]\n\n\nfrobnicate=1\n", 4, "unknown option 'frobnicate'"),
            ("[j]\ndirect\n", 2, "option 'direct' requires a value"),
        ];
        for (text, line, needle) in cases {
            match parse_job_str(text, "s.fio", &JobSpec::default()) {
                Err(OptionError::JobFile { line: got, message, .. }) => {
                    assert_eq!(got, line, "{text:?}");
                    assert!(message.contains(needle), "{text:?}: {message}");
                }
                other => panic!("{text:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn bare_flags_and_crlf_lines() {
        let jobs = parse_job_str("[j]\r\ntime_based\r\ngroup_reporting=0\r\nthread\r\n", "f.fio", &JobSpec::default())
            .expect("valid");
        assert!(jobs[0].time_based && !jobs[0].group_reporting);
        assert_eq!(jobs[0].job_options.len(), 4);
    }

    #[test]
    fn empty_file_has_no_jobs() {
        let jobs = parse_job_str("; nothing\n[global]\nbs=8k\n", "e.fio", &JobSpec::default()).expect("valid");
        assert!(jobs.is_empty());
    }

    #[test]
    fn reads_from_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j.fio");
        std::fs::write(&path, TWO_JOBS).expect("write");
        let jobs = parse_job_file(&path, &JobSpec::default()).expect("valid");
        assert_eq!(jobs.len(), 2);
        let missing = parse_job_file(&dir.path().join("nope.fio"), &JobSpec::default()).unwrap_err();
        assert!(matches!(missing, OptionError::JobFileRead { .. }));
    }

    /// Found by fuzzing (`run /dev/full` ran out of memory): endless input is an error.
    #[test]
    fn endless_job_file_is_refused() {
        let err = parse_job_file(Path::new("/dev/zero"), &JobSpec::default()).unwrap_err();
        assert!(
            matches!(err, OptionError::JobFileRead { ref path, ref reason } if path == "/dev/zero" && reason.contains("larger than")),
            "{err:?}"
        );
    }
}
