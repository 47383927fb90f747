//! The NBD client against real servers: qemu-nbd (extended headers) and nbdkit's memory
//! plugin (structured replies, multi-conn), nbdkit's error and delay filters for the error
//! policy and the deadline, and a qemu-nbd killed and restarted under a client configured to
//! reconnect.

mod common;

use common::nbd::NbdServer;
use common::{pattern, runtime};
use std::sync::Arc;
use std::time::Duration;
use tandem::block::{BlockDriver, BlockStatus, Disk, WriteFlags};
use tandem::buf::AlignedBuf;
use tandem::reactor::{BackendChoice, Runtime};
use tandem::{Error, IoPriority};
use tandem_drivers::nbd::proto::{self, HeaderStyle};
use tandem_drivers::nbd::{open_uri, NbdConfig, NbdDriver, NbdError};

const G: IoPriority = IoPriority::GUEST;
const DISK_BYTES: u64 = 16 << 20;

fn open(runtime: &Runtime, server: &NbdServer, config: &NbdConfig) -> NbdDriver {
    open_uri(&runtime.handle(), &server.uri(), config).unwrap_or_else(|e| panic!("opening {}: {e}", server.uri()))
}

fn read(disk: &Disk, offset: u64, len: usize) -> tandem::Result<AlignedBuf> {
    let (result, buf) = disk.read_blocking(offset, AlignedBuf::zeroed(len, 4096).unwrap(), G);
    result.map(|()| buf)
}

fn write(disk: &Disk, offset: u64, buf: AlignedBuf) -> tandem::Result<()> {
    disk.write_blocking(offset, buf, WriteFlags::default(), G).0
}

fn errno(error: &Error) -> Option<i32> {
    match error {
        Error::Io { errno, .. } => Some(*errno),
        _ => None,
    }
}

#[test]
fn qemu_nbd_negotiates_extended_headers_and_round_trips() {
    let rt = runtime(BackendChoice::Auto, 2);
    let server = NbdServer::qemu(DISK_BYTES);
    let driver = open(&rt, &server, &NbdConfig::default());
    assert_eq!(driver.header_style(), HeaderStyle::Extended, "qemu-nbd 9+ offers extended headers");
    assert!(driver.capabilities().block_status && driver.capabilities().fua);
    let disk = Disk::new(Arc::new(driver));
    assert_eq!(disk.size_bytes(), DISK_BYTES);
    write(&disk, 1 << 20, pattern(65536, 1)).unwrap();
    assert_eq!(read(&disk, 1 << 20, 65536).unwrap().as_slice(), pattern(65536, 1).as_slice());
    let hole = disk.block_status_blocking(8 << 20, 1 << 20).unwrap();
    assert_eq!((hole.status, hole.length_bytes), (BlockStatus::Hole, 1 << 20));
    // The data is in the file qemu-nbd serves.
    let file = std::fs::read(server.file.as_ref().unwrap()).unwrap();
    assert_eq!(&file[1 << 20..(1 << 20) + 65536], pattern(65536, 1).as_slice());
}

#[test]
fn tcp_uris_connect_too() {
    let rt = runtime(BackendChoice::Auto, 2);
    let (_server, port) = NbdServer::qemu_tcp(DISK_BYTES);
    let driver = open_uri(&rt.handle(), &format!("nbd://127.0.0.1:{port}/"), &NbdConfig::default()).unwrap();
    assert_eq!(driver.name(), format!("nbd://127.0.0.1:{port}/"));
    let disk = Disk::new(Arc::new(driver));
    write(&disk, 8192, pattern(8192, 11)).unwrap();
    assert_eq!(read(&disk, 8192, 8192).unwrap().as_slice(), pattern(8192, 11).as_slice());
}

#[test]
fn the_older_paths_work_when_extended_headers_are_not_asked_for() {
    let rt = runtime(BackendChoice::Auto, 2);
    let server = NbdServer::qemu(DISK_BYTES);
    for (extended_headers, structured_replies, style) in
        [(false, true, HeaderStyle::Structured), (false, false, HeaderStyle::Simple)]
    {
        let config = NbdConfig { extended_headers, structured_replies, ..NbdConfig::default() };
        let driver = open(&rt, &server, &config);
        assert_eq!(driver.header_style(), style);
        let disk = Disk::new(Arc::new(driver));
        write(&disk, 4096, pattern(8192, 2)).unwrap();
        assert_eq!(read(&disk, 4096, 8192).unwrap().as_slice(), pattern(8192, 2).as_slice(), "{style:?}");
        disk.write_zeroes_blocking(4096, 4096, true, G).unwrap();
        assert!(read(&disk, 4096, 4096).unwrap().is_all_zero(), "{style:?}");
    }
}

#[test]
fn nbdkit_memory_gets_structured_replies_and_several_connections() {
    let rt = runtime(BackendChoice::Auto, 2);
    let server = NbdServer::nbdkit(&["memory", "16M"]);
    let config = NbdConfig { connections: 3, ..NbdConfig::default() };
    let driver = open(&rt, &server, &config);
    assert_eq!(driver.connection_count(), 3, "nbdkit's memory plugin advertises multi-conn");
    assert_ne!(driver.header_style(), HeaderStyle::Simple);
    let disk = Disk::new(Arc::new(driver));
    // Many requests in flight at once over the connections, checked after.
    let handles: Vec<_> = (0..8u64)
        .map(|task| {
            let disk = disk.clone();
            rt.spawn(move || async move {
                for i in 0..16u64 {
                    let offset = (task * 16 + i) * 65536;
                    disk.write(offset, pattern(65536, task * 100 + i), WriteFlags::default(), G).await.0.unwrap();
                }
            })
        })
        .collect();
    handles.into_iter().for_each(|h| h.join().unwrap());
    disk.flush_blocking(G).unwrap();
    for task in 0..8u64 {
        for i in 0..16u64 {
            let got = read(&disk, (task * 16 + i) * 65536, 65536).unwrap();
            assert_eq!(got.as_slice(), pattern(65536, task * 100 + i).as_slice(), "task {task} write {i}");
        }
    }
}

#[test]
fn server_errors_come_back_typed_with_their_errno() {
    BACKENDS.into_iter().for_each(errors_on);
}

fn errors_on(backend: BackendChoice) {
    let rt = runtime(backend, 2);
    let args = ["--filter=error", "memory", "16M", "error-pread=EIO", "error-pread-rate=100%"];
    let server = NbdServer::nbdkit(&args);
    let args = ["--filter=error", "memory", "16M", "error-pwrite=ENOSPC", "error-pwrite-rate=100%"];
    let full = NbdServer::nbdkit(&args);
    let disk = Disk::new(Arc::new(open(&rt, &server, &NbdConfig::default())));
    write(&disk, 0, pattern(4096, 3)).expect("writes are not filtered");
    let error = read(&disk, 0, 4096).unwrap_err();
    assert_eq!(errno(&error), Some(libc::EIO), "{error}");
    let again = read(&disk, 4096, 4096).unwrap_err();
    assert_eq!(errno(&again), Some(libc::EIO), "the connection survives a server error: {again}");
    let disk = Disk::new(Arc::new(open(&rt, &full, &NbdConfig::default())));
    let error = write(&disk, 0, pattern(4096, 3)).unwrap_err();
    assert_eq!(errno(&error), Some(libc::ENOSPC), "{error}");
    assert!(read(&disk, 0, 4096).unwrap().is_all_zero(), "reads still work on that connection");
}

const BACKENDS: [BackendChoice; 2] = [BackendChoice::Uring, BackendChoice::Threads];

#[test]
fn a_server_that_does_not_answer_gives_a_timeout_error() {
    BACKENDS.into_iter().for_each(timeout_on);
}

fn timeout_on(backend: BackendChoice) {
    let rt = runtime(backend, 2);
    let server = NbdServer::nbdkit(&["--filter=delay", "memory", "16M", "delay-read=10"]);
    let config = NbdConfig { request_timeout: Duration::from_secs(1), ..NbdConfig::default() };
    let disk = Disk::new(Arc::new(open(&rt, &server, &config)));
    write(&disk, 0, pattern(4096, 4)).expect("writes are not delayed");
    let error = read(&disk, 0, 4096).unwrap_err();
    assert_eq!(errno(&error), Some(libc::ETIMEDOUT), "{error}");
}

#[test]
fn a_killed_qemu_nbd_is_reconnected_to_when_configured() {
    BACKENDS.into_iter().for_each(reconnect_on);
}

fn reconnect_on(backend: BackendChoice) {
    let rt = runtime(backend, 2);
    let mut server = NbdServer::qemu(DISK_BYTES);
    let config = NbdConfig { reconnect_delay: Duration::from_secs(20), ..NbdConfig::default() };
    let disk = Disk::new(Arc::new(open(&rt, &server, &config)));
    write(&disk, 0, pattern(8192, 5)).unwrap();
    server.kill();
    // Issued while the server is gone: it waits for the reconnect (within reconnect_delay).
    let pending = {
        let disk = disk.clone();
        rt.spawn(move || async move { disk.read(0, AlignedBuf::zeroed(8192, 4096).unwrap(), G).await })
    };
    std::thread::sleep(Duration::from_millis(300));
    server.start();
    let (result, buf) = pending.join().unwrap();
    result.expect("the read waited for the new connection");
    assert_eq!(buf.as_slice(), pattern(8192, 5).as_slice());
    write(&disk, 8192, pattern(4096, 6)).unwrap();
    assert_eq!(read(&disk, 8192, 4096).unwrap().as_slice(), pattern(4096, 6).as_slice());
}

#[test]
fn without_a_reconnect_delay_requests_fail_at_once_then_work_again() {
    BACKENDS.into_iter().for_each(fail_then_reconnect_on);
}

fn fail_then_reconnect_on(backend: BackendChoice) {
    let rt = runtime(backend, 2);
    let mut server = NbdServer::qemu(DISK_BYTES);
    let disk = Disk::new(Arc::new(open(&rt, &server, &NbdConfig::default())));
    write(&disk, 0, pattern(4096, 7)).unwrap();
    server.kill();
    let error = read(&disk, 0, 4096).unwrap_err();
    assert!(matches!(errno(&error), Some(libc::ENOTCONN) | Some(libc::ECONNRESET)), "{error}");
    server.start();
    // The driver reconnects in the background (QEMU's behaviour with reconnect-delay=0).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match read(&disk, 0, 4096) {
            Ok(buf) => break assert_eq!(buf.as_slice(), pattern(4096, 7).as_slice()),
            Err(error) => assert!(std::time::Instant::now() < deadline, "never reconnected: {error}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bad_uris_missing_sockets_and_unknown_exports_are_named() {
    let rt = runtime(BackendChoice::Auto, 1);
    let bad = open_uri(&rt.handle(), "nbd+unix:///e?sock=/x", &NbdConfig::default()).unwrap_err();
    assert!(matches!(&bad, NbdError::Uri(e) if e.uri.contains("sock=/x")), "{bad}");
    let missing = open_uri(&rt.handle(), "nbd+unix:///?socket=/nonexistent/nbd.sock", &NbdConfig::default());
    let missing = missing.unwrap_err();
    assert!(matches!(missing, NbdError::Connect { errno: libc::ENOENT, .. }), "{missing}");
    assert!(missing.to_string().contains("/nonexistent/nbd.sock"), "{missing}");
    let server = NbdServer::qemu(1 << 20);
    let uri = format!("nbd+unix:///nosuch?socket={}", server.socket.display());
    let refused = open_uri(&rt.handle(), &uri, &NbdConfig::default()).unwrap_err();
    assert!(matches!(&refused, NbdError::Refused { export, .. } if export == "nosuch"), "{refused}");
    let config = NbdConfig { inflight_max: 0, ..NbdConfig::default() };
    let invalid = open_uri(&rt.handle(), &server.uri(), &config).unwrap_err();
    assert!(matches!(invalid, NbdError::Config { key: "inflight_max", .. }), "{invalid}");
}

#[test]
fn our_own_server_negotiates_everything_the_client_asks_for() {
    let rt = runtime(BackendChoice::Auto, 2);
    let server = common::nbd::TandemServer::new(DISK_BYTES);
    let config = NbdConfig { connections: 2, ..NbdConfig::default() };
    let driver = open_uri(&rt.handle(), &server.uri(), &config).unwrap();
    assert_eq!(driver.header_style(), HeaderStyle::Extended);
    assert_eq!(driver.connection_count(), 2, "a Tandem disk's export advertises multi-conn");
    let capabilities = driver.capabilities();
    assert!(capabilities.block_status && capabilities.fua && capabilities.write_zeroes && capabilities.discard);
    let disk = Disk::new(Arc::new(driver));
    write(&disk, 0, pattern(65536, 9)).unwrap();
    assert_eq!(read(&disk, 0, 65536).unwrap().as_slice(), pattern(65536, 9).as_slice());
}

/// A server that negotiates correctly (structured replies and `base:allocation`, no extended
/// headers), then answers
/// the first request with whatever `reply` makes of it: a peer breaking the protocol on
/// purpose, to check the client hangs up instead of trusting the stream.
fn hostile_server(dir: &std::path::Path, reply: fn(&proto::Request) -> Vec<u8>) -> String {
    use proto::options as opt;
    use std::io::{Read, Write};
    let socket = dir.join("hostile.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut hello = proto::INIT_MAGIC.to_be_bytes().to_vec();
        hello.extend_from_slice(&proto::OPTION_MAGIC.to_be_bytes());
        hello.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
        stream.write_all(&hello).unwrap();
        let mut flags = [0u8; 4];
        stream.read_exact(&mut flags).unwrap();
        loop {
            let mut header = [0u8; 16];
            stream.read_exact(&mut header).unwrap();
            let option = u32::from_be_bytes(header[8..12].try_into().unwrap());
            let mut data = vec![0u8; u32::from_be_bytes(header[12..16].try_into().unwrap()) as usize];
            stream.read_exact(&mut data).unwrap();
            let mut out = Vec::new();
            match option {
                opt::OPT_STRUCTURED_REPLY => opt::encode_option_reply(option, opt::REP_ACK, &[], &mut out),
                opt::OPT_SET_META_CONTEXT => {
                    let context = opt::encode_meta_context_reply(1, "base:allocation");
                    opt::encode_option_reply(option, opt::REP_META_CONTEXT, &context, &mut out);
                    opt::encode_option_reply(option, opt::REP_ACK, &[], &mut out);
                }
                opt::OPT_GO => {
                    let flags = proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH;
                    opt::encode_option_reply(option, opt::REP_INFO, &opt::encode_info_export(1 << 20, flags), &mut out);
                    opt::encode_option_reply(option, opt::REP_ACK, &[], &mut out);
                }
                _ => opt::encode_error_reply(option, opt::REP_ERR_UNSUP, "", &mut out),
            }
            stream.write_all(&out).unwrap();
            if option == opt::OPT_GO {
                break;
            }
        }
        let mut header = [0u8; proto::REQUEST_BYTES];
        stream.read_exact(&mut header).unwrap();
        let request = proto::parse_request(&header, proto::HeaderStyle::Structured).unwrap();
        let _ = stream.write_all(&reply(&request));
        std::thread::sleep(Duration::from_secs(5)); // keep the socket open: only the client may end it
    });
    format!("nbd+unix:///?socket={}", socket.display())
}

#[test]
fn a_server_breaking_the_protocol_is_hung_up_on() {
    let scratch = common::scratch_dir();
    let too_long: fn(&proto::Request) -> Vec<u8> = |request| {
        // Read data beyond what the request asked for.
        let mut out = Vec::new();
        let length = 8 + request.length + 4096;
        let (flags, kind) = (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA);
        proto::encode_chunk_header(proto::HeaderStyle::Structured, flags, kind, request.cookie, 0, length, &mut out);
        out.extend_from_slice(&request.offset.to_be_bytes());
        out.resize(out.len() + (length - 8) as usize, 0xab);
        out
    };
    let unknown_cookie: fn(&proto::Request) -> Vec<u8> = |request| {
        let mut out = Vec::new();
        proto::encode_simple_reply(0, request.cookie ^ 0xdead_0000, &mut out);
        out
    };
    let rt = runtime(BackendChoice::Auto, 2);
    // A reply naming the request fails it as a protocol error; one naming nothing of ours
    // only loses the connection under it.
    let cases = [("too long", too_long, libc::EPROTO), ("unknown cookie", unknown_cookie, libc::ENOTCONN)];
    for (name, reply, expected) in cases {
        let dir = scratch.path().join(name.replace(' ', "-"));
        std::fs::create_dir(&dir).unwrap();
        let uri = hostile_server(&dir, reply);
        let disk = Disk::new(Arc::new(open_uri(&rt.handle(), &uri, &NbdConfig::default()).unwrap()));
        let (result, buf) = disk.read_blocking(0, AlignedBuf::zeroed(4096, 4096).unwrap(), G);
        let error = result.unwrap_err();
        assert_eq!(errno(&error), Some(expected), "{name}: {error}");
        assert!(buf.is_all_zero(), "{name}: nothing of the bad reply reached the caller's buffer");
    }
}

/// Run `io` on its own thread: a request the client never ends would hang the test instead
/// of failing it. Request deadlines are 2 s; 15 s is plenty.
fn within_15s<T: Send + 'static>(what: &str, io: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(io)));
    });
    match rx.recv_timeout(Duration::from_secs(15)) {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => panic!("{what}: the caller panicked"),
        Err(_) => panic!("{what}: no answer within 15 s though requests time out after 2 s"),
    }
}

fn hostile_disk(rt: &Runtime, dir: &std::path::Path, reply: fn(&proto::Request) -> Vec<u8>) -> Disk {
    let uri = hostile_server(dir, reply);
    let config = NbdConfig { request_timeout: Duration::from_secs(2), ..NbdConfig::default() };
    Disk::new(Arc::new(open_uri(&rt.handle(), &uri, &config).unwrap()))
}

#[test]
fn a_data_chunk_whose_offset_wraps_fails_the_read_instead_of_hanging_it() {
    // The chunk's offset is chosen so that offset - request + length wraps past 2^64: a bounds
    // check done in wrapping arithmetic passes, and the data would land outside the buffer.
    let scratch = common::scratch_dir();
    let rt = runtime(BackendChoice::Auto, 2);
    let wrap: fn(&proto::Request) -> Vec<u8> = |request| {
        let mut out = Vec::new();
        let length = 8 + 4096u64;
        let (flags, kind) = (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA);
        proto::encode_chunk_header(HeaderStyle::Structured, flags, kind, request.cookie, 0, length, &mut out);
        out.extend_from_slice(&(request.offset.wrapping_add(u64::MAX - 5)).to_be_bytes());
        out.resize(out.len() + 4096, 0xab);
        out
    };
    let hole_wrap: fn(&proto::Request) -> Vec<u8> = |request| {
        let mut out = Vec::new();
        let (flags, kind) = (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_HOLE);
        proto::encode_chunk_header(HeaderStyle::Structured, flags, kind, request.cookie, 0, 12, &mut out);
        out.extend_from_slice(&(request.offset.wrapping_add(u64::MAX - 5)).to_be_bytes());
        out.extend_from_slice(&4096u32.to_be_bytes());
        out
    };
    for (name, reply) in [("data", wrap), ("hole", hole_wrap)] {
        let dir = scratch.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let disk = hostile_disk(&rt, &dir, reply);
        let (result, buf) = within_15s(name, move || {
            let mut buf = AlignedBuf::zeroed(4096, 4096).unwrap();
            buf.as_mut_slice().fill(0x11);
            disk.read_blocking(0, buf, G)
        });
        let error = result.unwrap_err();
        assert_eq!(errno(&error), Some(libc::EPROTO), "{name}: {error}");
        assert!(buf.as_slice().iter().all(|&b| b == 0x11), "{name}: the caller's buffer came back untouched");
    }
}

#[test]
fn a_simple_success_reply_to_a_read_or_block_status_in_structured_mode_is_a_protocol_error() {
    // A simple reply may only answer a request that has no data in its reply.
    let scratch = common::scratch_dir();
    let rt = runtime(BackendChoice::Auto, 2);
    let simple: fn(&proto::Request) -> Vec<u8> = |request| {
        let mut out = Vec::new();
        proto::encode_simple_reply(0, request.cookie, &mut out);
        out
    };
    let dir = scratch.path().join("status");
    std::fs::create_dir(&dir).unwrap();
    let disk = hostile_disk(&rt, &dir, simple);
    assert!(disk.capabilities().block_status);
    let error = within_15s("block status", move || disk.block_status_blocking(0, 65536)).unwrap_err();
    assert_eq!(errno(&error), Some(libc::EPROTO), "block status: {error}");
    let dir = scratch.path().join("read");
    std::fs::create_dir(&dir).unwrap();
    let disk = hostile_disk(&rt, &dir, simple);
    let (result, _) = within_15s("read", move || disk.read_blocking(0, AlignedBuf::zeroed(4096, 4096).unwrap(), G));
    let error = result.unwrap_err();
    assert_eq!(errno(&error), Some(libc::EPROTO), "read: {error}");
}
