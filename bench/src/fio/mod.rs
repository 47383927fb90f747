//! fio compatibility: parse fio command lines and job files into `JobSpec`s, and
//! print results in fio's normal and JSON formats. The runner sits in between.

pub mod cmdline;
pub mod error;
pub mod files;
pub mod groups;
pub mod humanize;
pub mod ini;
pub mod json;
pub mod latency;
pub mod normal;
pub mod options;
pub mod report;
pub mod size;
pub mod spec;
pub mod usage;
pub mod values;

// The everyday API at `fio::`; the modules hold the rest (option table, latency maths).
pub use self::{
    cmdline::{parse_command_line, OutputFormat, RunConfig},
    error::OptionError,
    ini::{parse_job_file, parse_job_str},
    json::render_json,
    normal::render_normal,
    options::{apply_option, IGNORED_OPTIONS},
    report::{merge_jobs, DirStats, JobResult, RunReport},
    size::{parse_bool, parse_duration, parse_size},
    spec::{rw_name, JobSpec, RwMode},
    usage::usage,
};
