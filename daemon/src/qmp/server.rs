//! The monitor's I/O: the listening socket, one reader and one writer thread per client, and
//! the event fan-out (see the design note in the module above).

use super::request::{requests, Splitter};
use super::session::{encode_error, encode_event, greeting, Session};
use super::{Commands, QmpError};
use parking_lot::Mutex;
use serde_json::Value;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

/// How much the monitor takes on; see the design note for why each bound exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; one more is refused.
    pub clients: usize,
    /// Messages queued for one client before it is disconnected as too slow.
    pub queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { clients: 32, queue: 4096 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("QMP socket {}: the path exists; not replacing it (remove it if no daemon uses it)", path.display())]
    PathExists { path: PathBuf },
    #[error("QMP socket {}: {source}", path.display())]
    Socket { path: PathBuf, source: io::Error },
    #[error("QMP limits: clients = {clients} and queue = {queue} must both be at least 1")]
    Limits { clients: usize, queue: usize },
}

const READ_BYTES: usize = 64 << 10;

/// One connection as the rest of the monitor sees it.
struct Client {
    id: u64,
    /// Taken when the reader ends, so the writer drains the queue and stops.
    tx: Mutex<Option<SyncSender<Arc<str>>>>,
    negotiated: AtomicBool,
    closed: AtomicBool,
    /// A handle on the socket to shut it down from any thread, waking its blocked read and write.
    stream: UnixStream,
    queue: usize,
}

impl Client {
    /// Queue one message; false if the client is gone. Never blocks: a full queue disconnects.
    fn send(&self, message: &Arc<str>) -> bool {
        let guard = self.tx.lock();
        let Some(tx) = guard.as_ref() else { return false };
        match tx.try_send(message.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                drop(guard);
                if self.close() {
                    let queue = self.queue;
                    tandem::log::line(&format!(
                        "QMP client {}: {queue} messages are waiting for it to read; disconnecting it",
                        self.id
                    ));
                }
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// Shut the connection down; true for the call that did it.
    fn close(&self) -> bool {
        let first = !self.closed.swap(true, Ordering::AcqRel);
        if first {
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
        }
        first
    }
}

/// Every connection whose reader thread runs; events go to the negotiated ones. Shared on its
/// own with [`EventSender`], which handlers keep: holding all of [`Shared`] would make a cycle
/// through `commands`, and the handlers would never be dropped.
type Registry = Arc<Mutex<Vec<Arc<Client>>>>;

struct Shared {
    limits: Limits,
    commands: Arc<dyn Commands>,
    clients: Registry,
    /// The reader threads (each joins its writer before it ends).
    threads: Mutex<Vec<JoinHandle<()>>>,
    next_id: AtomicU64,
}

/// The running monitor; shutting it down (or dropping it) closes every client.
pub struct Monitor {
    shared: Arc<Shared>,
    path: PathBuf,
    /// The socket's (device, inode), so shutdown removes only the socket we created.
    identity: (u64, u64),
    /// Written once at shutdown to wake the accept thread.
    wake: UnixStream,
    accept: Option<JoinHandle<()>>,
}

/// Emits events to every negotiated client; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct EventSender {
    clients: Registry,
}

impl Monitor {
    /// Listen on `path` (which must not exist) with the default [`Limits`].
    pub fn start(path: &Path, commands: Arc<dyn Commands>) -> Result<Monitor, MonitorError> {
        Monitor::start_with_limits(path, commands, Limits::default())
    }

    pub fn start_with_limits(
        path: &Path,
        commands: Arc<dyn Commands>,
        limits: Limits,
    ) -> Result<Monitor, MonitorError> {
        if limits.clients == 0 || limits.queue == 0 {
            return Err(MonitorError::Limits { clients: limits.clients, queue: limits.queue });
        }
        let error = |source| MonitorError::Socket { path: path.to_path_buf(), source };
        // bind refuses an existing path by itself, atomically: nothing is checked then replaced.
        let listener = UnixListener::bind(path).map_err(|e| match e.kind() {
            io::ErrorKind::AddrInUse => MonitorError::PathExists { path: path.to_path_buf() },
            _ => error(e),
        })?;
        let bound = Bound { path };
        let metadata = std::fs::symlink_metadata(path).map_err(error)?;
        listener.set_nonblocking(true).map_err(error)?;
        let (wake, woken) = UnixStream::pair().map_err(error)?;
        let shared = Arc::new(Shared {
            limits,
            commands,
            clients: Arc::new(Mutex::new(Vec::new())),
            threads: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        });
        let accepting = shared.clone();
        let accept = std::thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || accept_loop(&accepting, &listener, &woken))
            .map_err(error)?;
        std::mem::forget(bound);
        let identity = (metadata.dev(), metadata.ino());
        Ok(Monitor { shared, path: path.to_path_buf(), identity, wake, accept: Some(accept) })
    }

    pub fn events(&self) -> EventSender {
        EventSender { clients: self.shared.clients.clone() }
    }

    /// Connections being served (negotiated or not).
    pub fn client_count(&self) -> usize {
        self.shared.clients.lock().len()
    }

    /// Stop accepting, close every connection, wait for every thread, remove the socket.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(accept) = self.accept.take() else { return };
        let _ = (&self.wake).write_all(b"x");
        let _ = accept.join();
        for client in self.shared.clients.lock().iter() {
            client.close();
        }
        let threads = std::mem::take(&mut *self.shared.threads.lock());
        for thread in threads {
            let _ = thread.join();
        }
        let left = self.shared.clients.lock().len();
        if left != 0 {
            tandem::log::line(&format!("QMP monitor: {left} clients were still registered at shutdown"));
        }
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Removes the socket just bound if `start` fails after binding.
struct Bound<'a> {
    path: &'a Path,
}

impl Drop for Bound<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.path);
    }
}

impl EventSender {
    /// Send event `name` to every negotiated client; `data` null leaves the member out. Never
    /// blocks on a client: one that is too far behind is disconnected instead.
    pub fn emit(&self, name: &str, data: Value) {
        let clients = self.clients.lock();
        // Stamped under the lock, so timestamps rise in the order clients receive events.
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let message: Arc<str> = encode_event(name, &data, since).into();
        for client in clients.iter().filter(|client| client.negotiated.load(Ordering::Acquire)) {
            client.send(&message);
        }
    }
}

/// Wait for a connection or the wake-up; the listener is non-blocking, so poll first.
fn accept_loop(shared: &Arc<Shared>, listener: &UnixListener, woken: &UnixStream) {
    loop {
        let mut fds = [
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: woken.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: two valid pollfd entries that live across the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                tandem::log::line(&format!("QMP monitor: poll failed: {error}"));
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            continue;
        }
        if fds[1].revents != 0 {
            return;
        }
        match listener.accept() {
            Ok((stream, _)) => admit(shared, stream),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of descriptors, say: the connection stays pending, so do not spin on it.
                tandem::log::line(&format!("QMP monitor: accept failed: {e}"));
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

fn admit(shared: &Arc<Shared>, stream: UnixStream) {
    shared.threads.lock().retain(|thread| !thread.is_finished());
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::sync_channel(shared.limits.queue);
    let client = {
        let mut clients = shared.clients.lock();
        assert!(clients.len() <= shared.limits.clients, "more QMP clients than the limit");
        if clients.len() == shared.limits.clients {
            drop(clients);
            return refuse(stream, shared.limits.clients);
        }
        let Some(client) = new_client(id, &stream, tx, shared.limits.queue) else { return };
        clients.push(client.clone());
        client
    };
    let serving = shared.clone();
    let reader = std::thread::Builder::new()
        .name(format!("qmp-client-{id}"))
        .spawn(move || serve(&serving, &client, stream, rx));
    match reader {
        Ok(thread) => shared.threads.lock().push(thread),
        Err(e) => {
            tandem::log::line(&format!("QMP client {id}: cannot start its thread: {e}"));
            deregister(shared, id);
        }
    }
}

fn new_client(id: u64, stream: &UnixStream, tx: SyncSender<Arc<str>>, queue: usize) -> Option<Arc<Client>> {
    // Accepted sockets do not inherit the listener's O_NONBLOCK on Linux; make sure anyway.
    let handle = stream.set_nonblocking(false).and_then(|()| stream.try_clone());
    match handle {
        Ok(handle) => Some(Arc::new(Client {
            id,
            tx: Mutex::new(Some(tx)),
            negotiated: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            stream: handle,
            queue,
        })),
        Err(e) => {
            tandem::log::line(&format!("QMP client {id}: cannot set its socket up: {e}"));
            None
        }
    }
}

/// Tell a connection over the limit why it is closed, without waiting on it.
fn refuse(stream: UnixStream, limit: usize) {
    tandem::log::line(&format!("QMP monitor: refusing a connection: {limit} clients are connected"));
    let error = QmpError::generic(format!("Too many QMP clients: at most {limit} at once"));
    let _ = stream.set_nonblocking(true);
    let _ = (&stream).write_all(encode_error(&error, None).as_bytes());
}

fn deregister(shared: &Shared, id: u64) {
    shared.clients.lock().retain(|client| client.id != id);
}

/// A client's reader thread: start its writer, read and answer until the end, then clean up.
fn serve(shared: &Arc<Shared>, client: &Arc<Client>, stream: UnixStream, rx: Receiver<Arc<str>>) {
    let writing = client.clone();
    let writer = stream.try_clone().and_then(|out| {
        std::thread::Builder::new()
            .name(format!("qmp-writer-{}", client.id))
            .spawn(move || write_loop(&writing, out, rx))
    });
    match writer {
        Ok(writer) => {
            read_loop(shared, client, stream);
            // No more messages: the writer sends what is queued, then ends (or fails at once
            // if the connection was closed).
            client.tx.lock().take();
            let _ = writer.join();
        }
        Err(e) => tandem::log::line(&format!("QMP client {}: cannot start its writer: {e}", client.id)),
    }
    client.close();
    deregister(shared, client.id);
}

fn read_loop(shared: &Shared, client: &Client, mut stream: UnixStream) {
    let mut session = Session::default();
    let mut splitter = Splitter::default();
    let mut buffer = vec![0u8; READ_BYTES];
    if !client.send(&greeting().into()) {
        return;
    }
    loop {
        let read = match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(read) => read,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        for input in requests(&mut splitter, &buffer[..read]) {
            if client.closed.load(Ordering::Acquire) {
                return;
            }
            let negotiated = session.negotiated();
            let answer: Arc<str> = session.answer(shared.commands.as_ref(), input).into();
            let sent = if !negotiated && session.negotiated() {
                negotiate(shared, client, &answer)
            } else {
                client.send(&answer)
            };
            if !sent {
                return;
            }
        }
    }
}

/// Queue the negotiation's return and enable events as one step under the registry lock
/// [`EventSender::emit`] holds: an event either comes before both (and is not sent) or after
/// both, so no event precedes the return and none is lost once the client has read it.
fn negotiate(shared: &Shared, client: &Client, answer: &Arc<str>) -> bool {
    let _clients = shared.clients.lock();
    let sent = client.send(answer);
    client.negotiated.store(true, Ordering::Release);
    sent
}

/// The only writer to the socket: whole messages in queue order, flushed when the queue empties.
fn write_loop(client: &Client, stream: UnixStream, rx: Receiver<Arc<str>>) {
    let mut out = io::BufWriter::with_capacity(READ_BYTES, stream);
    let mut written = || -> io::Result<()> {
        while let Ok(message) = rx.recv() {
            out.write_all(message.as_bytes())?;
            while let Ok(message) = rx.try_recv() {
                out.write_all(message.as_bytes())?;
            }
            out.flush()?;
        }
        Ok(())
    };
    if written().is_err() {
        // The peer is gone (or we closed it): wake the reader too.
        client.close();
    }
}
