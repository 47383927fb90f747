//! Socket operations on real sockets, on both backends: accept, recv with MSG_WAITALL, one-shot
//! prefix + buffer sends, a closed peer, an abandoned accept, and shutdown with a recv or an
//! accept waiting on an idle socket. On the thread pool: waiting socket operations leave the
//! disk workers free, sends on one socket keep their order, and a waitall recv fills up.

use super::*;
use crate::buf::AlignedBuf;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

const BACKENDS: [BackendChoice; 2] = [BackendChoice::Uring, BackendChoice::Threads];
/// Long enough that only a hang reaches it.
const HANG: Duration = Duration::from_secs(20);
const PAYLOAD_BYTES: usize = 1 << 20;
const HEADER: [u8; 16] = *b"reply-header-16b";

fn runtime(backend: BackendChoice, cores: usize) -> Runtime {
    Runtime::new(Config { cores, pin: false, queue_depth: 16, backend, ..Config::default() }).unwrap()
}

fn op(kind: OpKind, buf: Option<AlignedBuf>) -> Op {
    Op { kind, buf, priority: crate::IoPriority::GUEST }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ (i >> 12) as u8).collect()
}

fn listener() -> (SharedFd, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (SharedFd::new(OwnedFd::from(listener)), addr)
}

/// `f()` on another thread; a panic if it has not returned after `HANG`.
fn returns<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || sender.send(f()));
    match receiver.recv_timeout(HANG) {
        Ok(value) => value,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what} hung"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

/// Accept one connection, receive the payload in one waitall recv, send back the header and
/// the same buffer in one send, then a prefix-only trailer.
async fn serve_one(handle: RuntimeHandle, listen_fd: SharedFd) -> (i32, i32) {
    let accepted = handle.submit(op(OpKind::Accept { fd: listen_fd }, None)).await.result;
    assert!(accepted >= 0, "accept: {accepted}");
    // SAFETY: a successful accept's result is a new descriptor the caller owns.
    let conn = SharedFd::new(unsafe { OwnedFd::from_raw_fd(accepted) });
    let buf = AlignedBuf::zeroed(PAYLOAD_BYTES, 4096).unwrap();
    let received = handle.submit(op(OpKind::Recv { fd: conn.clone(), waitall: true }, Some(buf))).await;
    assert_eq!(received.result, PAYLOAD_BYTES as i32, "waitall receives the whole payload");
    let reply = OpKind::Send { fd: conn.clone(), prefix: SendPrefix::new(&HEADER) };
    let sent = handle.submit(op(reply, received.buf)).await.result;
    let trailer = OpKind::Send { fd: conn, prefix: SendPrefix::new(b"end") };
    (sent, handle.submit(op(trailer, None)).await.result)
}

fn echo_over_tcp(backend: BackendChoice) {
    let runtime = runtime(backend, 1);
    let (listen_fd, addr) = listener();
    let handle = runtime.handle();
    let server = runtime.spawn(move || serve_one(handle, listen_fd));
    let client = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(&pattern(PAYLOAD_BYTES)).unwrap();
        let mut reply = vec![0; HEADER.len() + PAYLOAD_BYTES + 3];
        stream.read_exact(&mut reply).unwrap();
        reply
    });
    assert_eq!(server.join().unwrap(), ((HEADER.len() + PAYLOAD_BYTES) as i32, 3), "{backend:?}");
    let reply = client.join().unwrap();
    assert_eq!(reply[..HEADER.len()], HEADER);
    assert!(reply[HEADER.len()..HEADER.len() + PAYLOAD_BYTES] == pattern(PAYLOAD_BYTES)[..], "payload echoed");
    assert_eq!(&reply[HEADER.len() + PAYLOAD_BYTES..], b"end");
}

#[test]
fn accept_recv_and_prefixed_send_uring() {
    echo_over_tcp(BackendChoice::Uring);
}

#[test]
fn accept_recv_and_prefixed_send_threads() {
    echo_over_tcp(BackendChoice::Threads);
}

#[test]
fn recv_from_a_closed_peer_returns_0() {
    for backend in BACKENDS {
        let runtime = runtime(backend, 1);
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        theirs.write_all(b"bye").unwrap();
        drop(theirs);
        let (fd, handle) = (SharedFd::new(ours.into()), runtime.handle());
        let results = runtime
            .block_on(move || async move {
                let recv = || op(OpKind::Recv { fd: fd.clone(), waitall: true }, AlignedBuf::zeroed(4096, 4096).ok());
                let first = handle.submit(recv()).await;
                assert_eq!(&first.buf.unwrap().as_slice()[..3], b"bye");
                (first.result, handle.submit(recv()).await.result)
            })
            .unwrap();
        assert_eq!(results, (3, 0), "{backend:?}: what was left, then end of stream");
    }
}

/// Set in the child process the SIGPIPE test runs in.
const SIGPIPE_CHILD_ENV: &str = "TANDEM_TEST_SIGPIPE_CHILD";

/// The test harness ignores SIGPIPE, which would hide a send without MSG_NOSIGNAL: the test
/// reruns itself alone in a child process that restores the default action (death).
#[test]
fn send_to_a_closed_peer_is_epipe_not_sigpipe() {
    if std::env::var_os(SIGPIPE_CHILD_ENV).is_none() {
        let name =
            module_path!().split_once("::").unwrap().1.to_owned() + "::send_to_a_closed_peer_is_epipe_not_sigpipe";
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &name, "--test-threads=1", "--nocapture"])
            .env(SIGPIPE_CHILD_ENV, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success() && stdout.contains("1 passed"), "child: {:?}\n{stdout}", output.status);
        return;
    }
    // SAFETY: restores the default SIGPIPE action, in a child process running only this test.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    for backend in BACKENDS {
        let runtime = runtime(backend, 1);
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let (fd, handle) = (SharedFd::new(ours.into()), runtime.handle());
        let results = runtime
            .block_on(move || async move {
                let prefix = SendPrefix::new(&HEADER);
                let alone = handle.submit(op(OpKind::Send { fd: fd.clone(), prefix }, None)).await.result;
                let data = AlignedBuf::zeroed(4096, 4096).ok();
                let with_data = handle.submit(op(OpKind::Send { fd, prefix: SendPrefix::EMPTY }, data)).await.result;
                (alone, with_data)
            })
            .unwrap();
        assert_eq!(results, (-libc::EPIPE, -libc::EPIPE), "{backend:?}");
    }
}

/// A recv and an accept wait on idle sockets (the peer stays open) when the runtime is
/// dropped: the drop must still return.
fn drop_while_waiting(backend: BackendChoice) {
    let runtime = runtime(backend, 2);
    let (listen_fd, _addr) = listener();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let (fd, handle) = (SharedFd::new(ours.into()), runtime.handle());
    let accept_handle = handle.clone();
    let _accept = runtime.spawn_on(0, move || async move {
        accept_handle.submit(op(OpKind::Accept { fd: listen_fd }, None)).await.result
    });
    let _recv = runtime.spawn_on(1, move || async move {
        let buf = AlignedBuf::zeroed(4096, 4096).ok();
        handle.submit(op(OpKind::Recv { fd, waitall: false }, buf)).await.result
    });
    std::thread::sleep(Duration::from_millis(50)); // both reach the kernel or a pool thread
    returns("dropping the runtime", move || drop(runtime));
    // Not joined: on the thread pool a task still waiting when its core stops is leaked, not
    // dropped (see `RemoteRunnable`), so its handle never resolves.
    drop(theirs);
}

#[test]
fn drop_with_a_recv_and_an_accept_waiting_uring() {
    drop_while_waiting(BackendChoice::Uring);
}

#[test]
fn drop_with_a_recv_and_an_accept_waiting_threads() {
    drop_while_waiting(BackendChoice::Threads);
}

/// The server side of `stream` closes: its reads see end of stream (not a timeout).
fn assert_closed_by_server(mut stream: TcpStream, case: &str) {
    stream.set_read_timeout(Some(HANG)).unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(stream.read(&mut byte).map_err(|e| e.kind()), Ok(0), "{case}: the accepted descriptor was closed");
}

/// An accept whose future is dropped, in flight or completed but never polled, closes the
/// descriptor it accepted instead of leaking it.
fn abandoned_accept(backend: BackendChoice) {
    let runtime = runtime(backend, 1);
    let (listen_fd, addr) = listener();
    let (fd, handle) = (listen_fd.clone(), runtime.handle());
    runtime
        .block_on(move || async move {
            let accept = handle.submit(op(OpKind::Accept { fd }, None));
            yield_now().await; // the core hands it to the backend
            drop(accept);
        })
        .unwrap();
    assert_closed_by_server(TcpStream::connect(addr).unwrap(), "dropped in flight");

    let client = TcpStream::connect(addr).unwrap(); // waits in the backlog: the accept is instant
    let handle = runtime.handle();
    runtime
        .block_on(move || async move {
            let accept = handle.submit(op(OpKind::Accept { fd: listen_fd }, None));
            while Arc::strong_count(&accept.shared) > 1 {
                sleep(Duration::from_millis(1)).await; // until the backend let go: completed
            }
            drop(accept);
        })
        .unwrap();
    assert_closed_by_server(client, "completed, never polled");
}

#[test]
fn abandoned_accept_closes_the_descriptor_uring() {
    abandoned_accept(BackendChoice::Uring);
}

#[test]
fn abandoned_accept_closes_the_descriptor_threads() {
    abandoned_accept(BackendChoice::Threads);
}

#[test]
fn send_prefix_holds_up_to_64_bytes() {
    assert_eq!(SendPrefix::new(&[7; SEND_PREFIX_BYTES_MAX]).as_slice(), &[7; SEND_PREFIX_BYTES_MAX][..]);
    assert!(SendPrefix::default().is_empty());
    assert_eq!(format!("{:?}", SendPrefix::new(&[1, 0xab])), "SendPrefix([01, ab])");
    let refused = std::panic::catch_unwind(|| SendPrefix::new(&[0; SEND_PREFIX_BYTES_MAX + 1]));
    assert!(refused.is_err(), "65 bytes refused");
}

/// A file of `len` pattern bytes under the target directory, open for reading.
fn temp_file(len: usize) -> (tempfile::TempDir, SharedFd) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/tmp");
    std::fs::create_dir_all(root).unwrap();
    let dir = tempfile::tempdir_in(root).unwrap();
    let path = dir.path().join("disk");
    std::fs::write(&path, pattern(len)).unwrap();
    (dir, SharedFd::new(OwnedFd::from(std::fs::File::open(&path).unwrap())))
}

/// Idle sockets must not hold the thread pool's disk workers: with 2 workers, 8 recvs on
/// sockets nobody writes to and 4 sends larger than the socket buffers nobody reads wait
/// while a disk read completes; then the peers talk and every socket operation finishes.
#[test]
fn waiting_socket_ops_leave_the_disk_workers_free_threads() {
    const RECVS: usize = 8;
    const SENDS: usize = 4;
    let config = Config { cores: 1, pin: false, queue_depth: 64, backend: BackendChoice::Threads, ..Config::default() };
    let runtime = Runtime::new(Config { thread_pool_workers: 2, ..config }).unwrap();
    let (_dir, file) = temp_file(4096);
    let mut recv_peers = Vec::new();
    let mut recvs = Vec::new();
    for _ in 0..RECVS {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (fd, handle) = (SharedFd::new(ours.into()), runtime.handle());
        recvs.push(runtime.spawn(move || async move {
            let buf = AlignedBuf::zeroed(4096, 4096).ok();
            let output = handle.submit(op(OpKind::Recv { fd, waitall: false }, buf)).await;
            (output.result, output.buf.unwrap().as_slice()[..8].to_vec())
        }));
        recv_peers.push(theirs);
    }
    let mut send_peers = Vec::new();
    let mut sends = Vec::new();
    for i in 0..SENDS {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (fd, handle) = (SharedFd::new(ours.into()), runtime.handle());
        sends.push(runtime.spawn(move || async move {
            let mut buf = AlignedBuf::zeroed(PAYLOAD_BYTES, 4096).unwrap();
            buf.as_mut_slice().copy_from_slice(&pattern(PAYLOAD_BYTES));
            let send = OpKind::Send { fd, prefix: SendPrefix::new(&[i as u8; 4]) };
            handle.submit(op(send, Some(buf))).await.result
        }));
        send_peers.push(theirs);
    }
    std::thread::sleep(Duration::from_millis(100)); // every socket operation reaches the pool

    let handle = runtime.handle();
    let read = returns("a disk read behind waiting socket operations", move || {
        block_on(handle.submit(op(OpKind::Read { fd: file, offset: 0 }, AlignedBuf::zeroed(4096, 4096).ok())))
    });
    assert_eq!(read.result, 4096);
    assert!(read.buf.unwrap().as_slice() == &pattern(4096)[..], "the read's bytes");

    for (i, peer) in recv_peers.iter_mut().enumerate() {
        peer.write_all(&(i as u64).to_le_bytes()).unwrap();
    }
    let readers: Vec<_> = send_peers
        .into_iter()
        .map(|mut peer| {
            std::thread::spawn(move || {
                let mut got = vec![0; 4 + PAYLOAD_BYTES];
                peer.read_exact(&mut got).unwrap();
                got
            })
        })
        .collect();
    for (i, recv) in recvs.into_iter().enumerate() {
        let (result, bytes) = returns("a recv", move || recv.join().unwrap());
        assert_eq!((result, bytes), (8, (i as u64).to_le_bytes().to_vec()), "recv {i}");
    }
    for (i, (send, reader)) in sends.into_iter().zip(readers).enumerate() {
        assert_eq!(returns("a send", move || send.join().unwrap()), (4 + PAYLOAD_BYTES) as i32, "send {i}");
        let got = reader.join().unwrap();
        assert_eq!(got[..4], [i as u8; 4]);
        assert!(got[4..] == pattern(PAYLOAD_BYTES)[..], "send {i}'s payload");
    }
}

/// Two sends on one socket, both larger than its buffer and submitted together, go out one
/// after the other: the second's bytes never land inside the first's. And a waitall recv
/// fed in small pieces waits until its buffer is full.
#[test]
fn sends_on_one_socket_keep_their_order_and_waitall_fills_threads() {
    let runtime = runtime(BackendChoice::Threads, 1);
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    theirs.set_read_timeout(Some(HANG)).unwrap(); // a hang fails the read_exact
    let (fd, handle) = (SharedFd::new(ours.into()), runtime.handle());
    let sends = runtime.spawn(move || async move {
        let filled = |byte| {
            let mut buf = AlignedBuf::zeroed(PAYLOAD_BYTES, 4096).unwrap();
            buf.as_mut_slice().fill(byte);
            Some(buf)
        };
        let first = handle.submit(op(OpKind::Send { fd: fd.clone(), prefix: SendPrefix::new(b"1") }, filled(b'a')));
        let second = handle.submit(op(OpKind::Send { fd: fd.clone(), prefix: SendPrefix::new(b"2") }, filled(b'b')));
        let sent = (first.await.result, second.await.result);
        let recv = handle.submit(op(OpKind::Recv { fd, waitall: true }, AlignedBuf::zeroed(4096, 4096).ok())).await;
        (sent, recv.result, recv.buf.unwrap().as_slice().to_vec())
    });
    let mut got = vec![0; 2 * (1 + PAYLOAD_BYTES)];
    theirs.read_exact(&mut got).unwrap();
    let (first, second) = got.split_at(1 + PAYLOAD_BYTES);
    assert!(first[0] == b'1' && first[1..].iter().all(|&b| b == b'a'), "the first send, whole");
    assert!(second[0] == b'2' && second[1..].iter().all(|&b| b == b'b'), "then the second");
    for piece in pattern(4096).chunks(1000) {
        theirs.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let (sent, received, bytes) = returns("the sends and the recv", move || sends.join().unwrap());
    assert_eq!(sent, ((1 + PAYLOAD_BYTES) as i32, (1 + PAYLOAD_BYTES) as i32));
    assert_eq!(received, 4096, "waitall: the whole buffer");
    assert!(bytes == pattern(4096), "in order");
}
