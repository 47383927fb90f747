//! Shared set-up for the driver tests: runtimes for each backend and scratch files on a real
//! filesystem under target/ (never tmpfs), failing loudly where O_DIRECT is refused.

#![allow(dead_code)]

pub mod jobs;

use std::path::PathBuf;
use tandem::reactor::{BackendChoice, Config, Runtime};

pub fn runtime(backend: BackendChoice, cores: usize) -> Runtime {
    let config = Config { cores, pin: false, queue_depth: 64, backend, ..Config::default() };
    Runtime::new(config).unwrap_or_else(|e| panic!("runtime with {backend:?}: {e}"))
}

/// A fresh scratch directory under target/tmp.
pub fn scratch_dir() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).expect("creating target/tmp");
    tempfile::Builder::new().prefix("tandem-test-").tempdir_in(&base).expect("scratch dir under target/tmp")
}

/// A buffer of seeded bytes.
pub fn pattern(len: usize, seed: u64) -> tandem::buf::AlignedBuf {
    let mut buf = tandem::buf::AlignedBuf::zeroed(len, 4096).unwrap();
    let mut state = seed;
    for chunk in buf.as_mut_slice().chunks_mut(8) {
        let word = tandem::rng::next(&mut state).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    buf
}
