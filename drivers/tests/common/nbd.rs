//! NBD servers for the client's tests: qemu-nbd over a scratch file and nbdkit's memory
//! plugin (with filters), each on a Unix socket in its own scratch directory, killed on drop;
//! and Tandem's own server (`tandem-nbd`) exporting a memory disk, on its own runtime.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NbdServer {
    child: Option<Child>,
    pub socket: PathBuf,
    /// qemu-nbd's backing file (none for nbdkit).
    pub file: Option<PathBuf>,
    dir: tempfile::TempDir,
    command: Vec<String>,
}

impl NbdServer {
    /// `qemu-nbd -f raw -t -e 8 --cache=none --discard=unmap -k SOCK FILE` over a new file of
    /// `size_bytes`: persistent, up to 8 clients, and trims that punch holes (qemu-nbd
    /// ignores them by default, which the conformance suite's discard check would see).
    pub fn qemu(size_bytes: u64) -> NbdServer {
        let dir = super::scratch_dir();
        let file = dir.path().join("disk.raw");
        std::fs::File::create(&file).and_then(|f| f.set_len(size_bytes)).expect("creating the qemu-nbd file");
        let socket = dir.path().join("nbd.sock");
        let command: Vec<String> = ["qemu-nbd", "-f", "raw", "-t", "-e", "8", "--cache=none", "--discard=unmap", "-k"]
            .iter()
            .map(|s| s.to_string())
            .chain([socket.display().to_string(), file.display().to_string()])
            .collect();
        let mut server = NbdServer { child: None, socket, file: Some(file), dir, command };
        server.start();
        server
    }

    /// qemu-nbd as [`NbdServer::qemu`], on TCP at 127.0.0.1 and a port the kernel had free.
    pub fn qemu_tcp(size_bytes: u64) -> (NbdServer, u16) {
        let dir = super::scratch_dir();
        let file = dir.path().join("disk.raw");
        std::fs::File::create(&file).and_then(|f| f.set_len(size_bytes)).expect("creating the qemu-nbd file");
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let command: Vec<String> = ["qemu-nbd", "-f", "raw", "-t", "-e", "8", "--cache=none", "-b", "127.0.0.1", "-p"]
            .iter()
            .map(|s| s.to_string())
            .chain([port.to_string(), file.display().to_string()])
            .collect();
        let child = Command::new(&command[0]).args(&command[1..]).stdin(Stdio::null()).spawn().expect("qemu-nbd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd did not listen on port {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let socket = dir.path().join("unused");
        (NbdServer { child: Some(child), socket, file: Some(file), dir, command }, port)
    }

    /// `nbdkit -f --exit-with-parent -U SOCK ARGS...` (e.g. `["memory", "16M"]`, filters
    /// first: `["--filter=delay", "memory", "16M", "delay-read=10s"]`).
    pub fn nbdkit(args: &[&str]) -> NbdServer {
        let dir = super::scratch_dir();
        let socket = dir.path().join("nbd.sock");
        let command: Vec<String> = ["nbdkit", "-f", "--exit-with-parent", "-U"]
            .iter()
            .map(|s| s.to_string())
            .chain(std::iter::once(socket.display().to_string()))
            .chain(args.iter().map(|s| s.to_string()))
            .collect();
        let mut server = NbdServer { child: None, socket, file: None, dir, command };
        server.start();
        server
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Start the server (again, after `kill`) and wait until its socket accepts.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "the server runs already");
        let _ = std::fs::remove_file(&self.socket); // a killed server leaves its socket file
        let child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {:?} (scripts/install-test-deps installs it): {e}", self.command));
        self.child = Some(child);
        let child = self.child.as_mut().expect("just started");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < deadline, "{:?} did not listen on {}", self.command, self.socket.display());
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{:?} exited with {status} before listening", self.command);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill the server (SIGKILL: no goodbye to its clients) and reap it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Tandem's NBD server exporting a writable memory disk of `size_bytes` as the default export,
/// on a runtime of its own (so the client's runtime is measured alone); shut down on drop.
pub struct TandemServer {
    server: Option<tandem_nbd::Server>,
    _runtime: tandem::reactor::Runtime,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl TandemServer {
    pub fn new(size_bytes: u64) -> TandemServer {
        let dir = super::scratch_dir();
        let socket = dir.path().join("tandem.sock");
        let runtime = super::runtime(tandem::reactor::BackendChoice::Auto, 1);
        let config = tandem_nbd::ServerConfig::new(tandem_nbd::Listen::Unix(socket.clone()));
        let server = tandem_nbd::Server::start(runtime.handle(), config).expect("our server starts");
        let disk = tandem::block::Disk::new(std::sync::Arc::new(tandem_drivers::MemoryDriver::new(size_bytes)));
        let options = tandem_nbd::ExportOptions { writable: true, ..tandem_nbd::ExportOptions::new("") };
        server.add_export(disk, options).expect("exporting the memory disk");
        TandemServer { server: Some(server), _runtime: runtime, socket, _dir: dir }
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for TandemServer {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown(); // before its runtime goes
        }
    }
}
