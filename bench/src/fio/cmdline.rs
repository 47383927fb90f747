//! fio's command-line model: options before the first `--name` are global, each
//! `--name` starts a job that inherits them, bare arguments are job files, and
//! `--output-format` / `--output` configure the run as a whole.

use std::path::Path;

use super::error::OptionError;
use super::groups::{assign_groups, check_wait_for};
use super::ini::parse_job_file_into;
use super::options::{apply_option, lookup_option, ValueKind};
use super::spec::JobSpec;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// fio's human-readable text.
    #[default]
    Normal,
    /// fio's JSON layout (`json+` is accepted as `json`).
    Json,
}

/// Everything a command line asks for: validated jobs and where to print results.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// Jobs in fio's order: `--name` jobs first, then job-file jobs. `numjobs` is not
    /// expanded; the runner clones each job `numjobs` times.
    pub jobs: Vec<JobSpec>,
    /// `--output-format`.
    pub output_format: OutputFormat,
    /// `--output`: write results to this file instead of stdout.
    pub output_path: Option<String>,
}

/// Parser state while walking the arguments.
#[derive(Default)]
struct CommandLine {
    globals: JobSpec,
    current: Option<JobSpec>,
    jobs: Vec<JobSpec>,
    job_files: Vec<String>,
    output_format: OutputFormat,
    output_path: Option<String>,
}

/// Parses fio-style arguments (WITHOUT the program name, e.g. `env::args().skip(1)`).
///
/// Options are `--key=value`, `--key value` (only for options that need a value, as
/// with fio's getopt), or a bare `--flag`. Job files are parsed after all options, with
/// the command-line globals applied first. Every job is validated before returning.
pub fn parse_command_line(args: &[String]) -> Result<RunConfig, OptionError> {
    let mut state = CommandLine::default();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let Some(option) = arg.strip_prefix("--") else {
            if arg.starts_with('-') && arg.len() > 1 {
                return Err(OptionError::UnknownOption { name: arg.clone() });
            }
            state.job_files.push(arg.clone());
            continue;
        };
        let (key, attached) = match option.split_once('=') {
            Some((key, value)) => (key, Some(value.to_string())),
            None => (option, None),
        };
        let value = match attached {
            Some(value) => Some(value),
            None if needs_separate_value(key) => Some(take_value(key, &mut rest)?),
            None => None,
        };
        state.apply(key, value.as_deref())?;
    }
    state.finish()
}

/// Whether `--key` with no `=` consumes the next argument as its value.
fn needs_separate_value(key: &str) -> bool {
    match key {
        "output-format" | "output" => true,
        _ => lookup_option(key).is_some_and(|def| def.kind == ValueKind::Required),
    }
}

/// The argument after `--key`. Unlike getopt we refuse another `--option` as a value:
/// `--name --bs=4k` is far more likely a forgotten value than a job called "--bs=4k".
fn take_value<'a>(key: &str, rest: &mut impl Iterator<Item = &'a String>) -> Result<String, OptionError> {
    match rest.next() {
        Some(value) if !value.starts_with("--") => Ok(value.clone()),
        _ => Err(OptionError::MissingValue { option: key.to_string() }),
    }
}

impl CommandLine {
    fn apply(&mut self, key: &str, value: Option<&str>) -> Result<(), OptionError> {
        match key {
            "output-format" => self.output_format = parse_output_format(value)?,
            "output" => self.output_path = Some(required(key, value)?.to_string()),
            "name" => {
                let name = required(key, value)?.trim();
                self.jobs.extend(self.current.take());
                self.current = Some(JobSpec::new_job(&self.globals, name));
            }
            _ => apply_option(self.current.as_mut().unwrap_or(&mut self.globals), key, value)?,
        }
        Ok(())
    }

    fn finish(mut self) -> Result<RunConfig, OptionError> {
        self.jobs.extend(self.current.take());
        // fio keeps one set of globals across all job files: a [global] section in one
        // file also applies to the files after it.
        for (index, path) in self.job_files.iter().enumerate() {
            let mut file_jobs = parse_job_file_into(Path::new(path), &mut self.globals)?;
            // fio separates job files by a stonewall: the first job of every file after the
            // first waits for all jobs before it.
            if let Some(first) = file_jobs.first_mut().filter(|_| index > 0) {
                first.stonewall = true;
            }
            self.jobs.extend(file_jobs);
        }
        if self.jobs.is_empty() {
            return Err(OptionError::NoJobs);
        }
        for job in &self.jobs {
            job.validate()?;
        }
        check_wait_for(&self.jobs)?;
        assign_groups(&mut self.jobs);
        Ok(RunConfig { jobs: self.jobs, output_format: self.output_format, output_path: self.output_path })
    }
}

fn required<'a>(key: &str, value: Option<&'a str>) -> Result<&'a str, OptionError> {
    value.filter(|text| !text.trim().is_empty()).ok_or_else(|| OptionError::MissingValue { option: key.to_string() })
}

fn parse_output_format(value: Option<&str>) -> Result<OutputFormat, OptionError> {
    match required("output-format", value)? {
        "normal" => Ok(OutputFormat::Normal),
        "json" | "json+" => Ok(OutputFormat::Json),
        other => Err(OptionError::InvalidValue {
            option: "output-format".to_string(),
            value: other.to_string(),
            reason: "expected normal, json or json+".to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::fio::spec::RwMode;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_string).collect()
    }

    fn parse(line: &str) -> Result<RunConfig, OptionError> {
        parse_command_line(&args(line))
    }

    #[test]
    fn globals_before_name_apply_to_every_job() {
        let config = parse("--filename=/tmp/f --bs=8k --direct=1 --name=a --name=b").expect("valid");
        assert_eq!(config.jobs.len(), 2);
        for (job, name) in config.jobs.iter().zip(["a", "b"]) {
            assert_eq!(job.name, name);
            assert_eq!(job.block_size_bytes, 8192);
            assert!(job.direct);
            assert_eq!(job.filename.as_deref(), Some("/tmp/f"));
        }
        assert_eq!(config.jobs[0].global_options.len(), 3);
        assert_eq!(config.output_format, OutputFormat::Normal);
    }

    #[test]
    fn options_after_name_belong_to_that_job_only() {
        // As fio: b does not inherit a's iodepth or rw, only the globals.
        let config = parse("--filename=/tmp/f --name=a --iodepth=32 --rw=randread --name=b --bs=64k").expect("valid");
        let (a, b) = (&config.jobs[0], &config.jobs[1]);
        assert_eq!((a.iodepth, a.rw, a.block_size_bytes), (32, RwMode::RandRead, 4096));
        assert_eq!((b.iodepth, b.rw, b.block_size_bytes), (1, RwMode::Read, 65536));
        assert_eq!(b.job_options.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(), ["name", "bs"]);
    }

    #[test]
    fn separate_values_and_bare_flags_follow_getopt() {
        let config =
            parse("--filename /tmp/f --name j --runtime 2 --time_based --output-format json+ --output out.json")
                .expect("valid");
        let job = &config.jobs[0];
        assert_eq!((job.name.as_str(), job.runtime), ("j", Some(Duration::from_secs(2))));
        assert!(job.time_based);
        assert_eq!(config.output_format, OutputFormat::Json);
        assert_eq!(config.output_path.as_deref(), Some("out.json"));
    }

    #[test]
    fn unknown_option_error_names_it() {
        let err = parse("--name=x --filename=/tmp/f --bogus=1").unwrap_err();
        assert_eq!(err, OptionError::UnknownOption { name: "bogus".into() });
        assert_eq!(parse("-x --name=j").unwrap_err(), OptionError::UnknownOption { name: "-x".into() });
    }

    #[test]
    fn malformed_and_missing_values_are_reported() {
        let err = parse("--name=x --filename=/tmp/f --bs=abc").unwrap_err();
        assert_eq!(err.to_string(), "invalid value 'abc' for option 'bs': expected a non-negative integer");
        assert_eq!(parse("--name=x --bs").unwrap_err(), OptionError::MissingValue { option: "bs".into() });
        assert_eq!(parse("--name --bs=4k").unwrap_err(), OptionError::MissingValue { option: "name".into() });
        let err = parse("--name=x --filename=/tmp/f --output-format=terse").unwrap_err();
        assert!(
            matches!(err, OptionError::InvalidValue { ref option, ref value, .. } if option == "output-format" && value == "terse")
        );
    }

    #[test]
    fn no_jobs_is_an_error() {
        assert_eq!(parse("--bs=4k --filename=/tmp/f").unwrap_err(), OptionError::NoJobs);
        assert_eq!(parse_command_line(&[]).unwrap_err(), OptionError::NoJobs);
    }

    #[test]
    fn jobs_are_validated() {
        let err = parse("--name=x").unwrap_err();
        assert!(matches!(err, OptionError::MissingOption { ref option, .. } if option == "filename"));
        let err = parse("--ioengine=null --name=x --rwmixread=101").unwrap_err();
        assert!(matches!(err, OptionError::InvalidJob { ref value, .. } if value == "101"));
        assert!(parse("--ioengine=null --size=1M --name=x").is_ok());
    }

    #[test]
    fn job_files_get_command_line_globals_and_follow_name_jobs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jobs.fio");
        std::fs::write(&path, "[global]\nbs=16k\n[filejob]\nrw=write\n").expect("write job file");
        let line = format!("--filename=/tmp/f --iodepth=4 {} --name=cli", path.display());
        let config = parse(&line).expect("valid");
        let names: Vec<&str> = config.jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["cli", "filejob"]);
        let file_job = &config.jobs[1];
        assert_eq!((file_job.iodepth, file_job.block_size_bytes, file_job.rw), (4, 16384, RwMode::Write));
        // The file's [global] must not leak into the command-line job.
        assert_eq!(config.jobs[0].block_size_bytes, 4096);
    }

    /// Real fio 3.33 prints groupids 0, 1, 1 for this command line.
    #[test]
    fn stonewall_on_the_command_line_starts_a_group() {
        let config = parse("--ioengine=null --size=1m --name=x --name=y --stonewall --name=z").expect("valid");
        let groups: Vec<u32> = config.jobs.iter().map(|job| job.groupid).collect();
        assert_eq!(groups, [0, 1, 1]);
        assert!(config.jobs[1].stonewall && !config.jobs[2].stonewall);
    }

    #[test]
    fn missing_job_file_is_reported_with_its_path() {
        let err = parse("/nonexistent/jobs.fio").unwrap_err();
        assert!(matches!(err, OptionError::JobFileRead { ref path, .. } if path == "/nonexistent/jobs.fio"));
    }
}
