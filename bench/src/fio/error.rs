//! Every error the fio front end (values, options, job files, validation) can report.
//! Each variant carries the offending option and value, so the message alone tells the
//! user what to fix; no user input ever causes a panic.

/// An error from parsing or validating fio-style options.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum OptionError {
    /// The option name is not one we know (fio: "unrecognized option").
    #[error("unknown option '{name}'")]
    UnknownOption { name: String },
    /// The option is known but its value does not parse or is out of range.
    #[error("invalid value '{value}' for option '{option}': {reason}")]
    InvalidValue { option: String, value: String, reason: String },
    /// The option needs a value (`--bs=4k`) but none was given.
    #[error("option '{option}' requires a value")]
    MissingValue { option: String },
    /// Neither `--name` nor a job file defined a job.
    #[error("no job(s) defined: give --name=NAME or a job file")]
    NoJobs,
    /// A job file line is malformed or holds a bad option; `line` counts from 1.
    #[error("{path}:{line}: {message}")]
    JobFile { path: String, line: usize, message: String },
    /// A job file could not be read.
    #[error("unable to open job file '{path}': {reason}")]
    JobFileRead { path: String, reason: String },
    /// A parsed job has a field value that is out of range.
    #[error("job '{job}': invalid value '{value}' for option '{option}': {reason}")]
    InvalidJob { job: String, option: String, value: String, reason: String },
    /// A parsed job lacks an option it needs.
    #[error("job '{job}': option '{option}' is required: {reason}")]
    MissingOption { job: String, option: String, reason: String },
}

impl OptionError {
    /// A value error not yet tied to an option; [`OptionError::for_option`] names it.
    pub(crate) fn bad_value(value: &str, reason: impl Into<String>) -> Self {
        OptionError::InvalidValue { option: String::new(), value: value.to_string(), reason: reason.into() }
    }

    /// Names the option in an `InvalidValue` raised by a value parser that did not know it.
    pub(crate) fn for_option(self, name: &str) -> Self {
        match self {
            OptionError::InvalidValue { value, reason, .. } => {
                OptionError::InvalidValue { option: name.to_string(), value, reason }
            }
            other => other,
        }
    }
}
