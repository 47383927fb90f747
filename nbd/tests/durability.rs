//! What a reply promises about durability, checked against a device that forgets unflushed
//! writes when it crashes (the faulty driver's crash model): a write acknowledged with FUA, a
//! write followed by an acknowledged FLUSH, and every write of a `writethrough` export survive
//! the crash; a plain write may not.

mod common;

use common::{runtime, scratch_dir, Served};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use tandem::block::Disk;
use tandem::buf::AlignedBuf;
use tandem::reactor::BackendChoice;
use tandem::IoPriority;
use tandem_drivers::nbd::proto::{self, options as opt, HeaderStyle, Request};
use tandem_drivers::{FaultyDriver, MemoryDriver};
use tandem_nbd::ExportOptions;

const BLOCK: u64 = 4096;

/// A simple-reply connection to `name`.
fn connect(socket: &std::path::Path, name: &str) -> UnixStream {
    let mut stream = UnixStream::connect(socket).unwrap();
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).unwrap();
    stream.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes()).unwrap();
    let mut bytes = Vec::new();
    opt::encode_option(opt::OPT_GO, &opt::encode_info_request(name, &[]), &mut bytes);
    stream.write_all(&bytes).unwrap();
    loop {
        let mut header = [0u8; opt::OPTION_REPLY_HEADER_BYTES];
        stream.read_exact(&mut header).unwrap();
        let header = opt::parse_option_reply_header(&header).unwrap();
        std::io::copy(&mut (&mut stream).take(u64::from(header.length)), &mut std::io::sink()).unwrap();
        if header.reply == opt::REP_ACK {
            return stream;
        }
        assert!(!opt::is_error_reply(header.reply), "GO refused: {:#x}", header.reply);
    }
}

/// Send one request (with `payload`, for a write) and return the reply's error.
fn request(stream: &mut UnixStream, kind: u16, flags: u16, offset: u64, payload: &[u8]) -> u32 {
    let mut bytes = Vec::new();
    let length = payload.len() as u64;
    proto::encode_request(&Request { flags, kind, cookie: 7, offset, length }, HeaderStyle::Simple, &mut bytes);
    bytes.extend_from_slice(payload);
    stream.write_all(&bytes).unwrap();
    let mut reply = [0u8; proto::SIMPLE_REPLY_BYTES];
    stream.read_exact(&mut reply).unwrap();
    match proto::parse_reply_header(&reply) {
        Some(proto::ReplyHeader::Simple { error, cookie: 7 }) => error,
        other => panic!("unexpected reply {other:?}"),
    }
}

/// Write four blocks (plain, FUA, plain then FLUSH, plain) over NBD, crash the device, and
/// return which blocks survived.
fn survivors(writethrough: bool) -> [bool; 4] {
    let (dir, rt) = (scratch_dir(), runtime(BackendChoice::Uring));
    let faulty = Arc::new(FaultyDriver::new(Arc::new(MemoryDriver::new(1 << 20)), 1, true));
    let disk = Disk::new(faulty.clone());
    let options = ExportOptions { writable: true, writethrough, ..ExportOptions::new("d") };
    let served = Served::start(&rt, dir.path(), disk.clone(), options);
    let mut stream = connect(&served.socket, "d");
    let data = [0xa5u8; BLOCK as usize];
    assert_eq!(request(&mut stream, proto::CMD_WRITE, 0, 0, &data), 0);
    assert_eq!(request(&mut stream, proto::CMD_WRITE, proto::CMD_FLAG_FUA, BLOCK, &data), 0);
    assert_eq!(request(&mut stream, proto::CMD_WRITE, 0, 2 * BLOCK, &data), 0);
    assert_eq!(request(&mut stream, proto::CMD_FLUSH, 0, 0, &[]), 0);
    assert_eq!(request(&mut stream, proto::CMD_WRITE, 0, 3 * BLOCK, &data), 0);
    drop(stream);
    tandem::reactor::block_on(faulty.crash()).unwrap();
    faulty.recover();
    std::array::from_fn(|index| {
        let buf = AlignedBuf::zeroed(BLOCK as usize, 4096).unwrap();
        let (outcome, buf) = disk.read_blocking(index as u64 * BLOCK, buf, IoPriority::GUEST);
        outcome.unwrap();
        buf.as_slice() == data
    })
}

#[test]
fn fua_flush_and_writethrough_writes_survive_a_crash() {
    let plain = survivors(false);
    assert!(plain[1], "a FUA write was acknowledged before it was durable");
    assert!(plain[0] && plain[2], "writes before an acknowledged FLUSH were not durable");
    assert!(!plain[3], "the crash model keeps unflushed writes: this test would prove nothing");
    assert_eq!(survivors(true), [true; 4], "writethrough: every acknowledged write is durable");
}
