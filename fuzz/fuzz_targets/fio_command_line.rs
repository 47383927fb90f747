//! fio command lines: the input split on NUL or newline into arguments (lossy UTF-8).
//! Invariant: `parse_command_line` and `validate` return errors, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// Whether `arg`, read as a job file, could block or never end: devices, FIFOs, /proc, /sys.
/// Such arguments are dropped to keep the target hermetic (a read of /proc/kmsg blocks; that
/// is not a parser bug). Missing paths and ordinary files stay: they are parser input.
fn is_special_path(arg: &str) -> bool {
    match std::fs::canonicalize(arg) {
        Ok(path) => !path.is_file() || ["/proc", "/sys", "/dev"].iter().any(|root| path.starts_with(root)),
        Err(_) => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let args: Vec<String> = data
        .split(|&b| b == 0 || b == b'\n')
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .filter(|arg| arg.starts_with('-') || !is_special_path(arg))
        .collect();
    if let Ok(config) = tandem_bench::fio::parse_command_line(&args) {
        for job in &config.jobs {
            let _ = job.validate();
        }
    }
});
