//! Shared set-up for the driver tests: runtimes for each backend and scratch files on a real
//! filesystem under target/ (never tmpfs), failing loudly where O_DIRECT is refused.

#![allow(dead_code)]

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

/// splitmix64 for seeded test data.
pub fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A buffer of seeded bytes.
pub fn pattern(len: usize, seed: u64) -> tandem::buf::AlignedBuf {
    let mut buf = tandem::buf::AlignedBuf::zeroed(len, 4096).unwrap();
    let mut state = seed;
    for chunk in buf.as_mut_slice().chunks_mut(8) {
        let word = next_random(&mut state).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    buf
}
