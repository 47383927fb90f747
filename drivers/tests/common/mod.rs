//! Shared set-up for the driver tests: runtimes for each backend and scratch files on a real
//! filesystem under target/ (never tmpfs), failing loudly where O_DIRECT is refused.

#![allow(dead_code)]

pub mod jobs;
pub mod nbd;

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

/// The test cluster's conf and pool, from the environment `scripts/test` sets up (see
/// `scripts/ceph-test-cluster`). Never a skip: without a cluster the rbd tests fail and say
/// how to get one.
pub fn ceph_cluster() -> (String, String) {
    let conf = std::env::var("TANDEM_CEPH_CONF").unwrap_or_else(|_| {
        panic!(
            "the rbd tests need a Ceph cluster: run the suite with scripts/test (it starts a \
             throwaway one), or start one with `scripts/ceph-test-cluster start target/ceph` and \
             export the TANDEM_CEPH_CONF and TANDEM_CEPH_POOL it prints"
        )
    });
    (conf, std::env::var("TANDEM_CEPH_POOL").unwrap_or_else(|_| "tandem".into()))
}

/// A fresh image of `size_bytes` in the test cluster, removed on drop.
pub struct ScratchImage {
    pub spec: tandem_drivers::rbd::RbdSpec,
}

impl ScratchImage {
    pub fn new(size_bytes: u64) -> ScratchImage {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let (conf, pool) = ceph_cluster();
        let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let image = format!("test-{}-{unique}", std::process::id());
        let spec = tandem_drivers::rbd::RbdSpec::parse(&format!("rbd:{pool}/{image}:conf={conf}")).unwrap();
        tandem_drivers::rbd::create_image(&spec, size_bytes).unwrap_or_else(|e| panic!("creating {image}: {e}"));
        ScratchImage { spec }
    }

    pub fn open(&self) -> tandem_drivers::rbd::RbdDriver {
        let options = tandem_drivers::rbd::RbdOptions::default();
        tandem_drivers::rbd::RbdDriver::open(&self.spec, &options).unwrap_or_else(|e| panic!("opening: {e}"))
    }
}

impl Drop for ScratchImage {
    fn drop(&mut self) {
        // An image still open elsewhere refuses removal (EBUSY): leave it to the cluster's end.
        let _ = tandem_drivers::rbd::remove_image(&self.spec);
    }
}

/// A loop device over a new zero-filled file of `size_bytes` in `dir`, detached when dropped
/// (also when a test panics). The tests run as root, as `losetup` needs.
pub struct LoopDevice {
    pub device: PathBuf,
}

impl LoopDevice {
    pub fn new(dir: &std::path::Path, size_bytes: u64) -> LoopDevice {
        let backing = dir.join("loop-backing.img");
        std::fs::File::create(&backing).and_then(|f| f.set_len(size_bytes)).expect("the loop device's backing file");
        let output = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&backing)
            .output()
            .unwrap_or_else(|e| panic!("cannot run losetup (util-linux): {e}"));
        assert!(output.status.success(), "losetup (needs root): {}", String::from_utf8_lossy(&output.stderr));
        let device = LoopDevice { device: PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()) };
        // Checked once the guard exists, so a failed check still detaches it.
        assert!(device.device.to_string_lossy().starts_with("/dev/loop"), "losetup printed {:?}", device.device);
        device
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}
