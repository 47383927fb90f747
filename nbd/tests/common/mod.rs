//! What the server's tests share: scratch files on a real filesystem (target/tmp, O_DIRECT),
//! a server exporting one of them over a Unix socket, and running the real clients.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use tandem::block::Disk;
use tandem::reactor::{BackendChoice, Config, Runtime};
use tandem_drivers::{FileDriver, FileOptions};
use tandem_nbd::{ExportOptions, Listen, Server, ServerConfig};

pub fn scratch_dir() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).expect("creating target/tmp");
    tempfile::Builder::new().prefix("nbd-").tempdir_in(&base).expect("scratch dir under target/tmp")
}

pub fn runtime(backend: BackendChoice) -> Runtime {
    Runtime::new(Config { cores: 2, pin: false, queue_depth: 64, backend, ..Config::default() }).expect("runtime")
}

/// A file of `size_bytes` holding `pattern(seed)` where `data` says, holes elsewhere.
pub fn make_file(path: &Path, size_bytes: u64, data: &[(u64, u64)], seed: u8) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::create(path).unwrap();
    file.set_len(size_bytes).unwrap();
    for (offset, length) in data {
        let bytes: Vec<u8> = (0..*length).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        file.write_all_at(&bytes, *offset).unwrap();
    }
    file.sync_all().unwrap();
}

pub fn open_disk(runtime: &Runtime, path: &Path) -> Disk {
    let driver = FileDriver::open(&runtime.handle(), path, &FileOptions::default()).expect("O_DIRECT on target/tmp");
    Disk::new(Arc::new(driver))
}

/// A server exporting `disk` as `name` on `dir/s.sock`.
pub struct Served {
    pub server: Server,
    pub socket: PathBuf,
    pub disk: Disk,
}

impl Served {
    pub fn start(runtime: &Runtime, dir: &Path, disk: Disk, options: ExportOptions) -> Served {
        Served::start_with(runtime, dir, disk, options, |_| {})
    }

    pub fn start_with(
        runtime: &Runtime,
        dir: &Path,
        disk: Disk,
        options: ExportOptions,
        tune: impl FnOnce(&mut ServerConfig),
    ) -> Served {
        let socket = dir.join("s.sock");
        let mut config = ServerConfig::new(Listen::Unix(socket.clone()));
        tune(&mut config);
        let server = Server::start(runtime.handle(), config).expect("server starts");
        server.add_export(disk.clone(), options).expect("export");
        Served { server, socket, disk }
    }

    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }
}

/// Run `program args`, assert it succeeded, return its stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// Run it and return (success, stdout + stderr).
pub fn try_run(program: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}
