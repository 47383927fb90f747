//! `tandemd`: see the library's documentation; this only reports the outcome.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    match tandemd::run(tandemd::Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tandemd: {message}");
            ExitCode::FAILURE
        }
    }
}
