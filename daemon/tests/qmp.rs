//! The QMP monitor over a real Unix socket, driven as a script would drive qemu-storage-daemon's.

use serde_json::{json, Map, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tandemd::qmp::{Commands, Limits, Monitor, MonitorError, QmpError};

/// `echo` returns its arguments, `fail` fails with DeviceNotFound, `wait` blocks until another
/// client runs `release`, `panic` panics.
#[derive(Default)]
struct TestCommands {
    released: Mutex<bool>,
    wake: Condvar,
}

impl Commands for TestCommands {
    fn execute(&self, name: &str, arguments: Map<String, Value>) -> Result<Value, QmpError> {
        match name {
            "echo" => Ok(Value::Object(arguments)),
            "fail" => Err(QmpError::device_not_found("Cannot find device='nope' nor node-name='nope'")),
            "wait" => {
                let released = self.released.lock().unwrap();
                let (_released, timeout) =
                    self.wake.wait_timeout_while(released, Duration::from_secs(10), |released| !*released).unwrap();
                if timeout.timed_out() {
                    return Err(QmpError::generic("never released"));
                }
                Ok(json!({}))
            }
            "release" => {
                *self.released.lock().unwrap() = true;
                self.wake.notify_all();
                Ok(json!({}))
            }
            "panic" => panic!("a handler bug"),
            other => Err(QmpError::generic(format!("test commands do not know {other}"))),
        }
    }

    fn names(&self) -> Vec<&'static str> {
        vec!["echo", "fail", "wait", "release", "panic"]
    }
}

fn scratch() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new().prefix("qmp-").tempdir_in(&base).unwrap()
}

fn start(path: &Path, limits: Limits) -> Monitor {
    Monitor::start_with_limits(path, Arc::new(TestCommands::default()), limits).unwrap()
}

struct Peer {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Peer {
    fn connect(path: &Path) -> Peer {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Peer { reader: BufReader::new(stream.try_clone().unwrap()), stream }
    }

    fn write(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).unwrap();
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        line
    }

    fn recv(&mut self) -> Value {
        let line = self.line();
        assert!(line.ends_with("\r\n"), "{line:?}");
        serde_json::from_str(&line).unwrap()
    }

    fn ask(&mut self, request: Value) -> Value {
        self.write(&format!("{request}\n"));
        self.recv()
    }

    /// Read the greeting and negotiate.
    fn negotiated(path: &Path) -> Peer {
        let mut peer = Peer::connect(path);
        assert!(peer.recv().get("QMP").is_some());
        assert_eq!(peer.ask(json!({"execute": "qmp_capabilities"})), json!({"return": {}}));
        peer
    }

    /// True once the monitor closed the connection (buffered messages are skipped). A
    /// connection still in the listen backlog when the listener closes is reset instead.
    fn closed(&mut self) -> bool {
        let mut sink = Vec::new();
        match self.reader.read_to_end(&mut sink) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn greeting_and_negotiation_rules() {
    let dir = scratch();
    let path = dir.path().join("qmp.sock");
    let monitor = start(&path, Limits::default());
    let mut peer = Peer::connect(&path);
    let greeting = peer.recv();
    assert_eq!(greeting["QMP"]["capabilities"], json!([]));
    let version = &greeting["QMP"]["version"];
    assert!(version["qemu"]["major"].as_u64().is_some() && version["qemu"]["micro"].as_u64().is_some());
    assert!(version["package"].as_str().unwrap().starts_with("tandemd "));

    let early = peer.ask(json!({"execute": "echo", "id": 1}));
    let expected = "Expecting capabilities negotiation with 'qmp_capabilities'";
    assert_eq!(early, json!({"error": {"class": "CommandNotFound", "desc": expected}, "id": 1}));
    let unknown = peer.ask(json!({"execute": "qmp_capabilities", "arguments": {"enable": ["zap"]}}));
    assert_eq!(unknown["error"]["class"], "GenericError");
    assert!(unknown["error"]["desc"].as_str().unwrap().contains("'zap'"), "{unknown}");
    let ok = peer.ask(json!({"execute": "qmp_capabilities", "arguments": {"enable": []}}));
    assert_eq!(ok, json!({"return": {}}));
    let again = peer.ask(json!({"execute": "qmp_capabilities"}));
    assert_eq!(again["error"]["class"], "CommandNotFound");
    let names = peer.ask(json!({"execute": "query-commands"}))["return"].clone();
    for name in ["qmp_capabilities", "query-commands", "echo", "fail"] {
        assert!(names.as_array().unwrap().contains(&json!({"name": name})), "{name} in {names}");
    }
    let oob = peer.ask(json!({"exec-oob": "echo", "id": "o"}));
    assert_eq!(oob["error"]["desc"], "QMP input member 'exec-oob' is unexpected");
    assert_eq!(oob["id"], "o");
    monitor.shutdown();
}

#[test]
fn ids_are_echoed_verbatim_on_return_and_error() {
    let dir = scratch();
    let path = dir.path().join("qmp.sock");
    let monitor = start(&path, Limits::default());
    let mut peer = Peer::negotiated(&path);
    let answer = peer.ask(json!({"execute": "echo", "arguments": {"a": [1, 2]}, "id": "req-1"}));
    assert_eq!(answer, json!({"return": {"a": [1, 2]}, "id": "req-1"}));
    let id = json!({"n": 7, "tags": ["x", null]});
    let answer = peer.ask(json!({"execute": "fail", "id": id}));
    assert_eq!(answer["error"]["class"], "DeviceNotFound");
    assert_eq!(answer["id"], id);
    let answer = peer.ask(json!({"execute": "nope", "id": 3.5}));
    assert_eq!(
        answer,
        json!({"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": 3.5})
    );
    let answer = peer.ask(json!({"execute": "echo", "arguments": [], "id": false}));
    assert_eq!(answer["error"]["desc"], "QMP input member 'arguments' must be an object");
    assert_eq!(answer["id"], false);
    monitor.shutdown();
}

#[test]
fn requests_are_a_stream_not_lines() {
    let dir = scratch();
    let path = dir.path().join("qmp.sock");
    let monitor = start(&path, Limits::default());
    let mut peer = Peer::negotiated(&path);
    peer.write(r#"{"execute": "echo", "id": 1}{"execute": "echo", "id": 2}"#);
    assert_eq!(peer.recv()["id"], 1);
    assert_eq!(peer.recv()["id"], 2);
    peer.write(r#"{"execute": "echo", "argu"#);
    std::thread::sleep(Duration::from_millis(50));
    peer.write(r#"ments": {"k": "v"}, "id": 3}"#);
    assert_eq!(peer.recv(), json!({"return": {"k": "v"}, "id": 3}));
    monitor.shutdown();
}

#[test]
fn bad_input_gets_an_error_and_the_connection_goes_on() {
    let dir = scratch();
    let path = dir.path().join("qmp.sock");
    let monitor = start(&path, Limits::default());
    let mut peer = Peer::negotiated(&path);
    peer.write("{\"execute\": \"echo\",, }\n");
    let bad = peer.recv();
    assert_eq!(bad["error"]["class"], "GenericError");
    assert!(bad["error"]["desc"].as_str().unwrap().starts_with("JSON parse error, "), "{bad}");
    // A string missing its closing quote: dropped up to the newline.
    peer.write("{\"execute\": \"echo\n");
    assert!(peer.recv()["error"]["desc"].as_str().unwrap().starts_with("JSON parse error"));
    assert_eq!(peer.ask(json!([1, 2]))["error"]["desc"], "QMP input must be a JSON object");
    let extra = peer.ask(json!({"execute": "echo", "x": 1}));
    assert_eq!(extra["error"]["desc"], "QMP input member 'x' is unexpected");
    assert_eq!(peer.ask(json!({"id": 1}))["error"]["desc"], "QMP input lacks member 'execute'");
    assert_eq!(peer.ask(json!({"execute": "echo", "id": 9})), json!({"return": {}, "id": 9}));
    monitor.shutdown();
}

#[test]
fn events_reach_only_negotiated_clients_with_a_timestamp() {
    let dir = scratch();
    let path = dir.path().join("qmp.sock");
    let monitor = start(&path, Limits::default());
    let events = monitor.events();
    let mut negotiated = Peer::negotiated(&path);
    let mut fresh = Peer::connect(&path);
    assert!(fresh.recv().get("QMP").is_some());
    wait_until("both clients", || monitor.client_count() == 2);
    events.emit("JOB_STATUS_CHANGE", json!({"id": "job0", "status": "running"}));
    events.emit("STOP", Value::Null);
    let event = negotiated.recv();
    assert_eq!(event["event"], "JOB_STATUS_CHANGE");
    assert_eq!(event["data"], json!({"id": "job0", "status": "running"}));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let seconds = event["timestamp"]["seconds"].as_u64().unwrap();
    assert!(seconds <= now && seconds + 60 > now, "{event}");
    assert!(event["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    let stop = negotiated.recv();
    assert_eq!(stop["event"], "STOP");
    assert!(stop.get("data").is_none());
    // The client that had not negotiated got neither: its next message answers its request.
    assert_eq!(fresh.ask(json!({"execute": "qmp_capabilities", "id": "c"})), json!({"return": {}, "id": "c"}));
    events.emit("RESUME", Value::Null);
    assert_eq!(fresh.recv()["event"], "RESUME");
    monitor.shutdown();
}

#[test]
fn several_clients_at_once_and_a_blocked_command_blocks_only_its_client() {
    let dir = scratch();
    let path = dir.path().join("qmp.sock");
    let monitor = start(&path, Limits::default());
    let mut waiter = Peer::negotiated(&path);
    waiter.write("{\"execute\": \"wait\", \"id\": \"w\"}\n");
    let workers: Vec<_> = (0..8)
        .map(|n| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut peer = Peer::negotiated(&path);
                for i in 0..50 {
                    let answer = peer.ask(json!({"execute": "echo", "arguments": {"n": n, "i": i}, "id": i}));
                    assert_eq!(answer, json!({"return": {"n": n, "i": i}, "id": i}));
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let mut releaser = Peer::negotiated(&path);
    assert_eq!(releaser.ask(json!({"execute": "release"})), json!({"return": {}}));
    assert_eq!(waiter.recv(), json!({"return": {}, "id": "w"}));
    monitor.shutdown();
}

#[test]
fn connections_beyond_the_limit_are_refused_cleanly() {
    let dir = scratch();
    let path = dir.path().join("qmp.sock");
    let monitor = start(&path, Limits { clients: 2, queue: 16 });
    let first = Peer::negotiated(&path);
    let _second = Peer::negotiated(&path);
    let mut third = Peer::connect(&path);
    let refused = third.recv();
    assert_eq!(refused["error"]["class"], "GenericError");
    assert!(refused["error"]["desc"].as_str().unwrap().contains("at most 2"), "{refused}");
    assert!(third.closed());
    drop(first);
    wait_until("the first client to go", || monitor.client_count() == 1);
    let mut fourth = Peer::negotiated(&path);
    assert_eq!(fourth.ask(json!({"execute": "echo"})), json!({"return": {}}));
    monitor.shutdown();
}

#[test]
fn an_existing_path_is_refused_and_kept() {
    let dir = scratch();
    let path = dir.path().join("taken");
    std::fs::write(&path, b"someone's data").unwrap();
    let error = Monitor::start(&path, Arc::new(TestCommands::default())).err().unwrap();
    assert!(matches!(&error, MonitorError::PathExists { path: p } if *p == path), "{error}");
    assert!(error.to_string().contains(&path.display().to_string()));
    assert_eq!(std::fs::read(&path).unwrap(), b"someone's data");
}

#[test]
fn shutdown_closes_clients_and_removes_the_socket() {
    let dir = scratch();
    let path = dir.path().join("qmp.sock");
    let monitor = start(&path, Limits::default());
    let mut peer = Peer::negotiated(&path);
    let mut idle = Peer::connect(&path);
    assert!(path.exists());
    monitor.shutdown();
    assert!(!path.exists());
    assert!(peer.closed());
    assert!(idle.closed());
    // Dropping without shutdown cleans up too, and a socket replaced meanwhile is not ours.
    let monitor = start(&path, Limits::default());
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, b"replaced").unwrap();
    drop(monitor);
    assert_eq!(std::fs::read(&path).unwrap(), b"replaced");
}

#[test]
fn a_client_that_never_reads_blocks_neither_emit_nor_others() {
    let dir = scratch();
    let path = dir.path().join("qmp.sock");
    let monitor = start(&path, Limits { clients: 4, queue: 16 });
    let events = monitor.events();
    let mut stalled = Peer::negotiated(&path);
    let mut reader = Peer::negotiated(&path);
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let reading = std::thread::spawn(move || {
        for _ in 0..64 {
            seen_tx.send(reader.recv()["data"]["n"].as_u64().unwrap()).unwrap();
        }
        reader
    });
    // Large events fill the stalled client's socket buffer, then its queue.
    let pad = "x".repeat(64 << 10);
    for n in 0..64u64 {
        let start = Instant::now();
        events.emit("BLOCK_JOB_PENDING", json!({"n": n, "pad": pad}));
        assert!(start.elapsed() < Duration::from_secs(1), "emit blocked");
        assert_eq!(seen_rx.recv_timeout(Duration::from_secs(10)).unwrap(), n);
    }
    let mut reader = reading.join().unwrap();
    wait_until("the stalled client to be dropped", || monitor.client_count() == 1);
    assert!(stalled.closed());
    assert_eq!(reader.ask(json!({"execute": "echo", "id": 1})), json!({"return": {}, "id": 1}));
    monitor.shutdown();
}

#[test]
fn oversized_requests_and_panicking_handlers_fail_alone() {
    let dir = scratch();
    let path = dir.path().join("qmp.sock");
    let monitor = start(&path, Limits::default());
    let mut peer = Peer::negotiated(&path);
    let huge = "y".repeat(tandemd::qmp::request::MAX_REQUEST_BYTES + (512 << 10));
    peer.write(&format!("{{\"execute\": \"echo\", \"arguments\": {{\"s\": \"{huge}\"}}}}\n"));
    let refused = peer.recv();
    assert!(refused["error"]["desc"].as_str().unwrap().contains("size limit"), "{refused}");
    assert_eq!(peer.ask(json!({"execute": "echo", "id": 1})), json!({"return": {}, "id": 1}));
    let panicked = peer.ask(json!({"execute": "panic", "id": 2}));
    assert_eq!(panicked["error"]["class"], "GenericError");
    assert_eq!(panicked["id"], 2);
    assert_eq!(peer.ask(json!({"execute": "echo", "id": 3})), json!({"return": {}, "id": 3}));
    monitor.shutdown();
}

#[test]
fn the_handles_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Monitor>();
    send_sync::<tandemd::qmp::EventSender>();
    send_sync::<QmpError>();
}

/// Handlers keep an EventSender to emit job events; that must not keep them alive forever.
#[test]
fn handlers_holding_an_event_sender_are_dropped_at_shutdown() {
    struct Holder {
        events: std::sync::OnceLock<tandemd::qmp::EventSender>,
        dropped: Arc<std::sync::atomic::AtomicBool>,
    }
    impl Commands for Holder {
        fn execute(&self, _: &str, _: Map<String, Value>) -> Result<Value, QmpError> {
            Ok(Value::Null)
        }
        fn names(&self) -> Vec<&'static str> {
            Vec::new()
        }
    }
    impl Drop for Holder {
        fn drop(&mut self) {
            self.dropped.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let dir = scratch();
    let path = dir.path().join("qmp.sock");
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let holder = Arc::new(Holder { events: std::sync::OnceLock::new(), dropped: dropped.clone() });
    let monitor = Monitor::start(&path, holder.clone()).unwrap();
    assert!(holder.events.set(monitor.events()).is_ok());
    drop(holder);
    monitor.shutdown();
    assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
}
