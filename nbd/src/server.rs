//! The NBD server an appliance embeds: one listener (Unix socket or TCP), exports added and
//! removed while it runs, a bound on connections, and a shutdown that lets requests under way
//! finish. Accepting runs on core 0; each connection is handed to a core in turn and lives
//! there (see `connection.rs`).

use crate::connection::{self, End, Limits};
use crate::export::{Export, ExportError, ExportOptions, ExportTable};
use crate::socket::Socket;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem::block::Disk;
use tandem::reactor::{stream, JoinHandle, Op, OpKind, RuntimeHandle, SharedFd};
use tandem::IoPriority;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket at this path; the server creates it and removes it on shutdown. An
    /// existing path is refused, never replaced.
    Unix(PathBuf),
    /// TCP on `host:port`; port 0 picks a free one ([`Server::local_addr`] tells which).
    Tcp { host: String, port: u16 },
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
            Listen::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

/// How the server runs. Every field is bounded; [`Server::start`] names a bad one.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Listen,
    /// Clients connected at once; one more is accepted and closed at once (QEMU's
    /// `max-connections`, where 0 means no limit; here the default is 100).
    pub connections_max: usize,
    /// A client must choose an export within this (QEMU's `handshake-max-seconds`: 10 s).
    pub handshake_timeout: Duration,
    /// Requests one connection has under way at most, counted until their reply has left;
    /// the next is not read until one ends.
    pub requests_in_flight_max: usize,
    /// Buffer bytes (read data, write payloads) one connection's requests hold at most before
    /// the next request is read (one request may go past it by its own size).
    pub connection_bytes_max: u64,
    /// A write payload slower to arrive, or replies left unread for longer, end the connection.
    pub stall_timeout: Duration,
    /// At shutdown, connections get this long to finish what is under way; then they are cut.
    pub shutdown_grace: Duration,
}

pub const CONNECTIONS_MAX_LIMIT: usize = 65536;
pub const REQUESTS_IN_FLIGHT_LIMIT: usize = 4096;

impl ServerConfig {
    pub fn new(listen: Listen) -> ServerConfig {
        ServerConfig {
            listen,
            connections_max: 100,
            handshake_timeout: Duration::from_secs(10),
            requests_in_flight_max: 64,
            connection_bytes_max: 64 << 20,
            stall_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
        }
    }

    fn validate(&self) -> Result<(), ServerError> {
        let bad =
            |name: &'static str, value: String, reason: &'static str| Err(ServerError::Config { name, value, reason });
        if self.connections_max == 0 || self.connections_max > CONNECTIONS_MAX_LIMIT {
            return bad("connections_max", self.connections_max.to_string(), "must be 1..=65536");
        }
        if self.requests_in_flight_max == 0 || self.requests_in_flight_max > REQUESTS_IN_FLIGHT_LIMIT {
            return bad("requests_in_flight_max", self.requests_in_flight_max.to_string(), "must be 1..=4096");
        }
        let hour = Duration::from_secs(3600);
        if self.handshake_timeout.is_zero() || self.handshake_timeout > hour {
            return bad("handshake_timeout", format!("{:?}", self.handshake_timeout), "must be 1 ns..=1 h");
        }
        if self.connection_bytes_max < 1 << 20 || self.connection_bytes_max > 1 << 40 {
            return bad("connection_bytes_max", self.connection_bytes_max.to_string(), "must be 1 MiB..=1 TiB");
        }
        if self.stall_timeout.is_zero() || self.stall_timeout > hour {
            return bad("stall_timeout", format!("{:?}", self.stall_timeout), "must be 1 ns..=1 h");
        }
        if self.shutdown_grace > hour {
            return bad("shutdown_grace", format!("{:?}", self.shutdown_grace), "must be at most 1 h");
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid server setting: {name} = {value}: {reason}")]
    Config { name: &'static str, value: String, reason: &'static str },
    #[error("cannot listen on {listen}: {source}")]
    Listen { listen: String, source: std::io::Error },
    #[error("cannot listen on {path}: it already exists (remove it if no server uses it)")]
    SocketExists { path: String },
    #[error(transparent)]
    Export(#[from] ExportError),
}

/// What the accept loop and the connections share with the handle.
struct Shared {
    exports: ExportTable,
    config: ServerConfig,
    /// Live connections' sockets by id, so shutdown can stop them.
    connections: Mutex<HashMap<u64, SharedFd>>,
    next_id: AtomicU64,
    closing: AtomicBool,
    served: AtomicUsize,
}

/// A running NBD server. Dropping it shuts it down (see [`Server::shutdown`]).
pub struct Server {
    shared: Arc<Shared>,
    runtime: RuntimeHandle,
    listener: SharedFd,
    accept: Option<JoinHandle<()>>,
    /// Connection tasks, joined at shutdown.
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    unix_path: Option<PathBuf>,
    local_addr: Option<SocketAddr>,
}

impl Server {
    /// Bind the listener and start accepting. Nothing is created if a setting is refused.
    pub fn start(runtime: RuntimeHandle, config: ServerConfig) -> Result<Server, ServerError> {
        config.validate()?;
        let (listener, unix_path, local_addr) = bind(&config.listen)?;
        let shared = Arc::new(Shared {
            exports: ExportTable::default(),
            config,
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closing: AtomicBool::new(false),
            served: AtomicUsize::new(0),
        });
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (shared, runtime2, listener, tasks) =
                (shared.clone(), runtime.clone(), listener.clone(), tasks.clone());
            runtime.spawn_on(0, move || accept_loop(shared, runtime2, listener, tasks))
        };
        Ok(Server { shared, runtime, listener, accept: Some(accept), tasks, unix_path, local_addr })
    }

    /// Offer `disk` as an export; checked first, nothing changes on a refusal.
    pub fn add_export(&self, disk: Disk, options: ExportOptions) -> Result<Arc<Export>, ServerError> {
        Ok(self.shared.exports.add(Export::new(disk, options)?)?)
    }

    /// Stop offering an export. Clients already using it keep it until they disconnect.
    pub fn remove_export(&self, name: &str) -> Result<Arc<Export>, ServerError> {
        Ok(self.shared.exports.remove(name)?)
    }

    pub fn exports(&self) -> &ExportTable {
        &self.shared.exports
    }

    /// The TCP address bound (with the port chosen for port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Clients connected now.
    pub fn connection_count(&self) -> usize {
        self.shared.connections.lock().len()
    }

    /// Stop accepting, let every connection finish the requests it has under way (new ones
    /// are not read), close them, and remove the Unix socket this server created. Call it off
    /// the reactor's cores (it waits for them).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(accept) = self.accept.take() else { return };
        assert!(!tandem::reactor::on_any_core(), "Server::shutdown waits for the cores; call it from another thread");
        self.shared.closing.store(true, Ordering::SeqCst);
        stream::shutdown(&self.listener, std::net::Shutdown::Both);
        let _ = accept.join();
        // Reading stops; replies for what is under way still go out, for a grace period. A
        // client that does not read them is then cut off, so shutdown never waits on a peer.
        for fd in self.shared.connections.lock().values() {
            stream::shutdown(fd, std::net::Shutdown::Read);
        }
        let deadline = std::time::Instant::now() + self.shared.config.shutdown_grace;
        while !self.shared.connections.lock().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for fd in self.shared.connections.lock().values() {
            stream::shutdown(fd, std::net::Shutdown::Both);
        }
        let tasks = std::mem::take(&mut *self.tasks.lock());
        for task in tasks {
            let _ = task.join();
        }
        if let Some(path) = self.unix_path.take() {
            let _ = std::fs::remove_file(path);
        }
        let _ = &self.runtime;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !tandem::reactor::on_any_core() {
            self.stop();
        } else if self.accept.is_some() {
            // Stopping waits for the cores, which this thread is one of.
            tandem::log::line("nbd: a Server dropped on a reactor core keeps serving until its runtime stops");
        }
    }
}

type Bound = (SharedFd, Option<PathBuf>, Option<SocketAddr>);

fn bind(listen: &Listen) -> Result<Bound, ServerError> {
    let error = |source| ServerError::Listen { listen: listen.to_string(), source };
    match listen {
        Listen::Unix(path) => {
            if path.symlink_metadata().is_ok() {
                return Err(ServerError::SocketExists { path: path.display().to_string() });
            }
            let listener = UnixListener::bind(path).map_err(error)?;
            Ok((SharedFd::new(OwnedFd::from(listener)), Some(path.clone()), None))
        }
        Listen::Tcp { host, port } => {
            let listener = TcpListener::bind((host.as_str(), *port)).map_err(error)?;
            let local = listener.local_addr().map_err(error)?;
            Ok((SharedFd::new(OwnedFd::from(listener)), None, Some(local)))
        }
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    runtime: RuntimeHandle,
    listener: SharedFd,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    let mut next_core = 0usize;
    loop {
        let op = Op { kind: OpKind::Accept { fd: listener.clone() }, buf: None, priority: IoPriority::GUEST };
        let result = runtime.submit(op).await.result;
        if shared.closing.load(Ordering::SeqCst) {
            if result >= 0 {
                // SAFETY: a descriptor accept just returned, owned by nobody else.
                drop(unsafe { OwnedFd::from_raw_fd(result) });
            }
            return;
        }
        if result < 0 {
            match -result {
                libc::EINTR | libc::ECONNABORTED | libc::EAGAIN => continue,
                libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => {
                    tandem::log::line(&format!(
                        "nbd: accept: {}; retrying in 100 ms",
                        std::io::Error::from_raw_os_error(-result)
                    ));
                    tandem::reactor::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                _ => {
                    tandem::log::line(&format!("nbd: accept failed: {}", std::io::Error::from_raw_os_error(-result)));
                    return;
                }
            }
        }
        // SAFETY: a descriptor accept just returned, owned by nobody else.
        let fd = SharedFd::new(unsafe { OwnedFd::from_raw_fd(result) });
        if shared.connections.lock().len() >= shared.config.connections_max {
            tandem::log::line(&format!("nbd: connection refused: {} clients already", shared.config.connections_max));
            continue; // dropping the descriptor closes it: the client sees EOF
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        shared.connections.lock().insert(id, fd.clone());
        let (shared2, runtime2) = (shared.clone(), runtime.clone());
        let task = runtime.spawn_on(next_core, move || run_connection(shared2, runtime2, fd, id));
        next_core = next_core.wrapping_add(1);
        let mut tasks = tasks.lock();
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }
}

async fn run_connection(shared: Arc<Shared>, runtime: RuntimeHandle, fd: SharedFd, id: u64) {
    set_nodelay(&fd);
    let pool = tandem::reactor::current_buf_pool().expect("connections run on a core");
    let socket = Socket { fd, runtime };
    let limits = Limits {
        handshake_timeout: shared.config.handshake_timeout,
        requests_in_flight_max: shared.config.requests_in_flight_max,
        connection_bytes_max: shared.config.connection_bytes_max,
        stall_timeout: shared.config.stall_timeout,
    };
    let end = connection::serve(socket, pool, &shared.exports, limits).await;
    match end {
        End::Client => {}
        End::HandshakeTimeout => tandem::log::line("nbd: a client did not finish its handshake in time; closed"),
        End::Violation(reason) => tandem::log::line(&format!("nbd: hard disconnect: {reason}")),
        End::Io(e) => tandem::log::line(&format!("nbd: connection ended: {e}")),
    }
    shared.connections.lock().remove(&id);
    shared.served.fetch_add(1, Ordering::Relaxed);
}

/// Replies go out as soon as they are sent (TCP only; a Unix socket ignores it).
fn set_nodelay(fd: &SharedFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads sizeof(int) from a local; failure (not TCP) is harmless.
    unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}
