//! fio job files: the input as lossy UTF-8 text. Invariant: `parse_job_str` (and `validate`
//! on what it returns) report errors, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_bench::fio::JobSpec;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(jobs) = tandem_bench::fio::parse_job_str(&text, "fuzz.fio", &JobSpec::default()) {
        for job in &jobs {
            let _ = job.validate();
        }
    }
});
