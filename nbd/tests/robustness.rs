//! Clients that misbehave, byte by byte over a real socket: garbage, truncated headers,
//! unknown options, commands and flags, lengths past the end, payloads past the limit, too
//! many connections, a handshake that never ends. Each gets what the spec names (an error
//! reply, or the connection closed where the spec says so), and the server keeps serving
//! everyone else.

mod common;

use common::{make_file, open_disk, run, runtime, scratch_dir, Served};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
use tandem::reactor::BackendChoice;
use tandem_drivers::nbd::proto::{self, options as opt, HeaderStyle, Request};
use tandem_nbd::ExportOptions;

const MIB: u64 = 1 << 20;

fn connect(socket: &Path) -> UnixStream {
    let stream = UnixStream::connect(socket).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream
}

fn read_exact(stream: &mut UnixStream, count: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; count];
    stream.read_exact(&mut bytes).expect("the server answers");
    bytes
}

/// Read the greeting and send the client flags.
fn greet(stream: &mut UnixStream) {
    let greeting = read_exact(stream, 18);
    assert_eq!(u64::from_be_bytes(greeting[..8].try_into().unwrap()), proto::INIT_MAGIC);
    stream.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes()).unwrap();
}

/// Send an option and read replies until ACK or an error; returns the reply types.
fn option(stream: &mut UnixStream, option: u32, data: &[u8]) -> Vec<u32> {
    let mut bytes = Vec::new();
    opt::encode_option(option, data, &mut bytes);
    stream.write_all(&bytes).unwrap();
    let mut replies = Vec::new();
    loop {
        let header = opt::parse_option_reply_header(&read_exact(stream, opt::OPTION_REPLY_HEADER_BYTES)).unwrap();
        read_exact(stream, header.length as usize);
        replies.push(header.reply);
        if header.reply == opt::REP_ACK || opt::is_error_reply(header.reply) {
            return replies;
        }
    }
}

/// A connection in the transmission phase with `style` headers.
fn transmission(socket: &Path, export: &str, style: HeaderStyle) -> UnixStream {
    let mut stream = connect(socket);
    greet(&mut stream);
    match style {
        HeaderStyle::Extended => assert_eq!(option(&mut stream, opt::OPT_EXTENDED_HEADERS, &[]), [opt::REP_ACK]),
        HeaderStyle::Structured => assert_eq!(option(&mut stream, opt::OPT_STRUCTURED_REPLY, &[]), [opt::REP_ACK]),
        HeaderStyle::Simple => {}
    }
    let replies = option(&mut stream, opt::OPT_GO, &opt::encode_info_request(export, &[]));
    assert_eq!(replies.last(), Some(&opt::REP_ACK));
    stream
}

fn send_request(stream: &mut UnixStream, style: HeaderStyle, kind: u16, flags: u16, offset: u64, length: u64) {
    let mut bytes = Vec::new();
    proto::encode_request(&Request { flags, kind, cookie: 0xc0ffee, offset, length }, style, &mut bytes);
    stream.write_all(&bytes).unwrap();
}

/// A simple reply's error.
fn simple_error(stream: &mut UnixStream) -> u32 {
    match proto::parse_reply_header(&read_exact(stream, proto::SIMPLE_REPLY_BYTES)) {
        Some(proto::ReplyHeader::Simple { error, cookie }) => {
            assert_eq!(cookie, 0xc0ffee);
            error
        }
        other => panic!("expected a simple reply, got {other:?}"),
    }
}

/// Whether the server closed the stream (EOF or reset) instead of answering. A read that
/// times out (the server neither answered nor hung up) is not a close.
fn closed(stream: &mut UnixStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

const BACKENDS: [BackendChoice; 2] = [BackendChoice::Uring, BackendChoice::Threads];

fn served(dir: &Path, backend: BackendChoice) -> (tandem::reactor::Runtime, Served) {
    let rt = runtime(backend);
    let image = dir.join("d.img");
    make_file(&image, 4 * MIB, &[(0, 4 * MIB)], 6);
    let options = ExportOptions { writable: true, ..ExportOptions::new("disk") };
    let served = Served::start_with(&rt, dir, open_disk(&rt, &image), options, |config| {
        config.connections_max = 4;
        config.handshake_timeout = Duration::from_millis(500);
    });
    (rt, served)
}

/// Another client still gets service.
fn still_serves(served: &Served) {
    run("qemu-img", &["info", &served.uri("disk")]);
}

#[test]
fn unknown_options_get_unsup_and_negotiation_goes_on() {
    for backend in BACKENDS {
        let dir = scratch_dir();
        let (_rt, served) = served(dir.path(), backend);
        let mut stream = connect(&served.socket);
        greet(&mut stream);
        assert_eq!(option(&mut stream, 0xdead, b"whatever"), [opt::REP_ERR_UNSUP]);
        assert_eq!(option(&mut stream, opt::OPT_STARTTLS, &[]), [opt::REP_ERR_UNSUP]);
        assert_eq!(option(&mut stream, opt::OPT_LIST, b"junk"), [opt::REP_ERR_INVALID]);
        let go = option(&mut stream, opt::OPT_GO, &opt::encode_info_request("disk", &[]));
        assert_eq!(go.last(), Some(&opt::REP_ACK));
    }
}

#[test]
fn garbage_and_truncated_handshakes_close_only_their_connection() {
    for backend in BACKENDS {
        let dir = scratch_dir();
        let (_rt, served) = served(dir.path(), backend);
        let mut old_client = connect(&served.socket);
        read_exact(&mut old_client, 18);
        old_client.write_all(&0u32.to_be_bytes()).unwrap(); // not fixed newstyle
        assert!(closed(&mut old_client));
        let mut garbage = connect(&served.socket);
        greet(&mut garbage);
        garbage.write_all(b"this is not an option header at all").unwrap();
        assert!(closed(&mut garbage));
        let mut truncated = connect(&served.socket);
        greet(&mut truncated);
        truncated.write_all(&proto::OPTION_MAGIC.to_be_bytes()[..5]).unwrap();
        drop(truncated);
        still_serves(&served);
    }
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    for backend in BACKENDS {
        let dir = scratch_dir();
        let (_rt, served) = served(dir.path(), backend);
        let s = HeaderStyle::Simple;
        let mut stream = transmission(&served.socket, "disk", s);
        send_request(&mut stream, s, 42, 0, 0, 4096);
        assert_eq!(simple_error(&mut stream), proto::EINVAL, "unknown command");
        send_request(&mut stream, s, proto::CMD_FLUSH, 0x4000, 0, 0);
        assert_eq!(simple_error(&mut stream), proto::EINVAL, "unknown flag");
        send_request(&mut stream, s, proto::CMD_READ, 0, 4 * MIB - 4096, 8192);
        assert_eq!(simple_error(&mut stream), proto::EINVAL, "read past the end");
        send_request(&mut stream, s, proto::CMD_WRITE, 0, 4 * MIB, 4096);
        stream.write_all(&[1u8; 4096]).unwrap();
        assert_eq!(simple_error(&mut stream), proto::ENOSPC, "write past the end; its payload is skipped");
        send_request(&mut stream, s, proto::CMD_BLOCK_STATUS, 0, 0, 4096);
        assert_eq!(simple_error(&mut stream), proto::EINVAL, "no meta context selected");
        send_request(&mut stream, s, proto::CMD_READ, 0, 100, 512);
        assert_eq!(simple_error(&mut stream), proto::EINVAL, "misaligned to the minimum block size");
        let over = u64::from(tandem_nbd::export::REQUEST_BYTES_MAX_DEFAULT) + 4096;
        send_request(&mut stream, s, proto::CMD_WRITE, 0, 0, over);
        stream.write_all(&vec![0u8; over as usize]).unwrap();
        assert_eq!(simple_error(&mut stream), proto::EINVAL, "a write beyond the request limit");
        send_request(&mut stream, s, proto::CMD_READ, 0, 0, 4096);
        assert_eq!(simple_error(&mut stream), 0, "the connection still serves");
        assert_eq!(read_exact(&mut stream, 4096).len(), 4096);
        send_request(&mut stream, s, proto::CMD_DISC, 0, 0, 0);
        assert!(closed(&mut stream));
    }
}

#[test]
fn structured_errors_carry_a_message() {
    for backend in BACKENDS {
        let dir = scratch_dir();
        let (_rt, served) = served(dir.path(), backend);
        let s = HeaderStyle::Structured;
        let mut stream = transmission(&served.socket, "disk", s);
        send_request(&mut stream, s, proto::CMD_READ, 0, 8 * MIB, 4096);
        let header = proto::parse_reply_header(&read_exact(&mut stream, proto::STRUCTURED_REPLY_BYTES)).unwrap();
        let proto::ReplyHeader::Chunk { flags, kind, length, .. } = header else { panic!("{header:?}") };
        assert_eq!((flags, kind), (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR));
        let (error, message) = proto::parse_error_payload(&read_exact(&mut stream, length as usize)).unwrap();
        assert_eq!(error, proto::EINVAL);
        assert!(message.contains("beyond"), "{message}");
    }
}

#[test]
fn protocol_violations_hang_up() {
    for backend in BACKENDS {
        let dir = scratch_dir();
        let (_rt, served) = served(dir.path(), backend);
        let mut bad_magic = transmission(&served.socket, "disk", HeaderStyle::Simple);
        bad_magic.write_all(&[0x55u8; 28]).unwrap();
        assert!(closed(&mut bad_magic));
        let e = HeaderStyle::Extended;
        let mut huge = transmission(&served.socket, "disk", e);
        send_request(&mut huge, e, proto::CMD_WRITE, proto::CMD_FLAG_PAYLOAD_LEN, 0, 1 << 40);
        assert!(closed(&mut huge), "a payload too large to skip ends the connection");
        let mut truncated = transmission(&served.socket, "disk", HeaderStyle::Simple);
        truncated.write_all(&proto::REQUEST_MAGIC.to_be_bytes()).unwrap();
        drop(truncated);
        still_serves(&served);
    }
}

#[test]
fn a_handshake_that_never_ends_is_closed() {
    for backend in BACKENDS {
        let dir = scratch_dir();
        let (_rt, served) = served(dir.path(), backend);
        let mut idle = connect(&served.socket);
        read_exact(&mut idle, 18);
        assert!(closed(&mut idle), "the server hangs up after its handshake timeout");
        still_serves(&served);
    }
}

#[test]
fn connections_beyond_the_limit_are_closed_and_the_rest_served() {
    for backend in BACKENDS {
        let dir = scratch_dir();
        let (_rt, served) = served(dir.path(), backend);
        let mut held: Vec<UnixStream> =
            (0..4).map(|_| transmission(&served.socket, "disk", HeaderStyle::Simple)).collect();
        let mut extra = connect(&served.socket);
        assert!(closed(&mut extra), "the fifth connection is refused");
        let s = HeaderStyle::Simple;
        send_request(&mut held[3], s, proto::CMD_READ, 0, 0, 4096);
        assert_eq!(simple_error(&mut held[3]), 0);
        drop(held);
        for _ in 0..100 {
            if served.server.connection_count() == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        still_serves(&served);
    }
}

#[test]
fn shutdown_removes_the_socket_it_created_and_refuses_an_existing_path() {
    for backend in BACKENDS {
        let dir = scratch_dir();
        let (rt, served) = served(dir.path(), backend);
        let socket = served.socket.clone();
        assert!(socket.exists());
        drop(served);
        assert!(!socket.exists(), "the server removes the socket it created");
        let taken = dir.path().join("taken.sock");
        std::fs::write(&taken, b"not ours").unwrap();
        let config = tandem_nbd::ServerConfig::new(tandem_nbd::Listen::Unix(taken.clone()));
        let err = tandem_nbd::Server::start(rt.handle(), config).err().expect("refused").to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(std::fs::read(&taken).unwrap(), b"not ours", "an existing path is never replaced");
    }
}

#[test]
fn a_read_only_export_answers_writes_trims_and_zeroes_with_eperm_and_skips_the_payload() {
    let (dir, rt) = (scratch_dir(), runtime(BackendChoice::Uring));
    let image = dir.path().join("ro.img");
    make_file(&image, MIB, &[(0, MIB)], 9);
    let before = std::fs::read(&image).unwrap();
    let served = Served::start(&rt, dir.path(), open_disk(&rt, &image), ExportOptions::new("ro"));
    let s = HeaderStyle::Simple;
    let mut stream = transmission(&served.socket, "ro", s);
    send_request(&mut stream, s, proto::CMD_WRITE, 0, 0, 4096);
    stream.write_all(&[0u8; 4096]).unwrap();
    assert_eq!(simple_error(&mut stream), proto::EPERM);
    send_request(&mut stream, s, proto::CMD_TRIM, 0, 0, 4096);
    assert_eq!(simple_error(&mut stream), proto::EPERM);
    send_request(&mut stream, s, proto::CMD_WRITE_ZEROES, 0, 0, 4096);
    assert_eq!(simple_error(&mut stream), proto::EPERM);
    send_request(&mut stream, s, proto::CMD_FLUSH, 0, 0, 0);
    assert_eq!(simple_error(&mut stream), 0, "the stream stayed in sync");
    drop(stream);
    drop(served);
    assert_eq!(std::fs::read(&image).unwrap(), before);
}

#[test]
fn a_client_that_never_reads_replies_stops_being_read() {
    for backend in BACKENDS {
        let dir = scratch_dir();
        let (_rt, served) = served(dir.path(), backend);
        let s = HeaderStyle::Structured;
        let mut stream = transmission(&served.socket, "disk", s);
        stream.set_nonblocking(true).unwrap();
        let mut header = Vec::new();
        proto::encode_request(&Request { flags: 0, kind: 99, cookie: 1, offset: 0, length: 0 }, s, &mut header);
        let burst = header.repeat(4096);
        // Unknown commands, each answered with an error the client never reads. The server
        // must stop reading once its replies back up, so this client's sends soon block.
        let limit_bytes = 64 << 20;
        let mut sent_bytes = 0usize;
        let mut blocked = false;
        while sent_bytes < limit_bytes {
            match stream.write(&burst) {
                Ok(n) => sent_bytes += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Give the server a moment to drain what it will, then try once more.
                    std::thread::sleep(Duration::from_millis(200));
                    if let Err(e) = stream.write(&burst) {
                        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
                        blocked = true;
                        break;
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(blocked, "{backend:?}: the server read {sent_bytes} bytes of requests whose replies nobody read");
        drop(stream);
        still_serves(&served);
    }
}

#[test]
fn shutdown_returns_while_a_client_does_not_read_its_replies() {
    for backend in BACKENDS {
        let dir = scratch_dir();
        let rt = runtime(backend);
        let image = dir.path().join("d.img");
        make_file(&image, 64 * MIB, &[(0, 64 * MIB)], 3);
        let options = ExportOptions::new("disk");
        let served = Served::start_with(&rt, dir.path(), open_disk(&rt, &image), options, |config| {
            config.shutdown_grace = Duration::from_millis(200);
        });
        let s = HeaderStyle::Simple;
        let mut stream = transmission(&served.socket, "disk", s);
        for index in 0..32 {
            send_request(&mut stream, s, proto::CMD_READ, 0, index * MIB, MIB);
        }
        std::thread::sleep(Duration::from_millis(200)); // the replies fill the socket
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            served.server.shutdown();
            let _ = done_tx.send(());
        });
        let finished = done_rx.recv_timeout(Duration::from_secs(20));
        assert!(finished.is_ok(), "{backend:?}: shutdown hung on a client that does not read");
        drop(stream);
    }
}

#[test]
fn a_client_hoarding_large_reads_does_not_fail_its_neighbours() {
    let dir = scratch_dir();
    // One core with a 128 MiB buffer pool: both clients share it.
    let config = tandem::reactor::Config {
        cores: 1,
        pin: false,
        buffer_pool_bytes_per_core: 128 << 20,
        ..tandem::reactor::Config::default()
    };
    let rt = tandem::reactor::Runtime::new(config).unwrap();
    let image = dir.path().join("d.img");
    make_file(&image, 256 * MIB, &[(0, MIB)], 4);
    let served = Served::start(&rt, dir.path(), open_disk(&rt, &image), ExportOptions::new("disk"));
    let s = HeaderStyle::Simple;
    let chunk = 32 * MIB;
    let mut hoarder = transmission(&served.socket, "disk", s);
    // Three 32 MiB reads it never collects would hold 96 MiB of the pool; its flow limit
    // (64 MiB) holds it to two.
    for index in 0..3 {
        send_request(&mut hoarder, s, proto::CMD_READ, 0, index * chunk, chunk);
    }
    std::thread::sleep(Duration::from_millis(500)); // it reads as much as it is allowed
    let mut neighbour = transmission(&served.socket, "disk", s);
    for _ in 0..4 {
        send_request(&mut neighbour, s, proto::CMD_READ, 0, 0, chunk);
        assert_eq!(simple_error(&mut neighbour), 0, "the neighbour's read succeeds");
        assert_eq!(read_exact(&mut neighbour, chunk as usize).len(), chunk as usize);
    }
    drop(hoarder);
}
