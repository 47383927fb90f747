//! Entry points for the `nbd_client` fuzz target (fuzz/fuzz_targets/nbd_client.rs): the
//! client's parsing of what a server says, over bytes in memory. Not an API; hidden from docs.
//!
//! Invariant: no input panics. Beyond that, the handshake only agrees on valid block sizes,
//! and in the transmission phase every piece of read data or hole the rules accept lands
//! inside its read's buffer, and no read is finished Ok unless covered whole.

use super::handshake::{self, Wanted};
use super::replies::{self, Chunk, Outstanding, Simple};
use crate::nbd::proto::{self as p, HeaderStyle, ReplyHeader};
use std::io::{Read, Write};

/// An in-memory server: it says `input`, what the client writes is dropped.
struct Script<'a> {
    input: &'a [u8],
}

impl Read for Script<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Script<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The handshake (sans I/O over `server`'s bytes), asking for extended headers, structured
/// replies, both or neither; whether it agreed on an export.
pub fn handshake(server: &[u8], extended_headers: bool, structured_replies: bool) -> bool {
    let wanted = Wanted { export: "disk", extended_headers, structured_replies };
    let Ok(negotiated) = handshake::negotiate(&mut Script { input: server }, &wanted) else { return false };
    assert!(negotiated.sizes.is_valid(), "agreed on invalid block sizes {:?}", negotiated.sizes);
    assert!(!negotiated.style.structured() || structured_replies || extended_headers);
    assert!(negotiated.allocation_context.is_none() || negotiated.style.structured());
    true
}

/// One outstanding request of the transmission-phase model, as the reader's slot keeps it.
struct Request {
    cookie: u64,
    outstanding: Outstanding,
    buf: Vec<u8>,
    covered: u64,
    status: Option<(u64, u32)>,
    error: Option<i32>,
}

/// The next `bytes` of `server`, if it has them.
fn take<'a>(server: &mut &'a [u8], bytes: usize) -> Option<&'a [u8]> {
    let (taken, rest) = server.split_at_checked(bytes)?;
    *server = rest;
    Some(taken)
}

/// `base:allocation`'s id in the model.
const CONTEXT: u32 = 1;

/// The transmission phase: `server`'s bytes as replies in `style` to a fixed set of
/// outstanding requests (cookies 1 to 5: a read, a status request, a flush, a write, a
/// second read at a high offset), through the same rules as the reader, until the bytes end
/// or a reply breaks the protocol. How many requests it finished.
pub fn replies(style: HeaderStyle, mut server: &[u8]) -> usize {
    let mut finished = 0;
    let request = |cookie, kind, offset, length: u64| Request {
        cookie,
        outstanding: Outstanding { kind, offset, length },
        buf: vec![0; if kind == p::CMD_READ { length as usize } else { 0 }],
        covered: 0,
        status: None,
        error: None,
    };
    let mut outstanding = vec![
        request(1, p::CMD_READ, 4096, 8192),
        request(2, p::CMD_BLOCK_STATUS, 0, 1 << 20),
        request(3, p::CMD_FLUSH, 0, 0),
        request(4, p::CMD_WRITE, 512, 512),
        request(5, p::CMD_READ, u64::MAX - 4095, 4096),
    ];
    loop {
        let Some(magic) = take(&mut server, 4) else { return finished };
        let magic = u32::from_be_bytes(magic.try_into().expect("4 bytes"));
        let Ok(bytes) = replies::header_bytes(style, magic) else { return finished };
        let Some(rest) = take(&mut server, bytes - 4) else { return finished };
        let header = [&magic.to_be_bytes()[..], rest].concat();
        let Some(header) = p::parse_reply_header(&header) else { return finished };
        let cookie = match header {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        };
        let Some(index) = outstanding.iter().position(|r| r.cookie == cookie) else { return finished };
        let slot = &mut outstanding[index];
        let request = slot.outstanding;
        let done = match header {
            ReplyHeader::Simple { error, .. } => match replies::simple(style, request, error) {
                Err(_) => return finished,
                Ok(Simple::Done(outcome)) => Some(outcome),
                Ok(Simple::Data { bytes }) => {
                    assert_eq!(bytes as usize, slot.buf.len(), "simple read data fills its buffer");
                    let Some(data) = take(&mut server, bytes as usize) else { return finished };
                    slot.buf.copy_from_slice(data);
                    Some(Ok(()))
                }
            },
            ReplyHeader::Chunk { flags, kind, length, .. } => {
                let Ok(head_bytes) = replies::chunk_head_bytes(request, flags, kind, length) else { return finished };
                let Some(head) = take(&mut server, head_bytes) else { return finished };
                match replies::chunk(request, kind, length, head, Some(CONTEXT)) {
                    Err(_) => return finished,
                    Ok(Chunk::Nothing) => {}
                    Ok(chunk @ (Chunk::Data { relative, bytes } | Chunk::Hole { relative, bytes })) => {
                        let Ok(covered) = replies::cover(request, slot.covered, bytes) else { return finished };
                        let (from, to) = (relative as usize, (relative + bytes) as usize);
                        let target = slot.buf.get_mut(from..to).expect("accepted data lands inside its buffer");
                        match chunk {
                            Chunk::Data { .. } => {
                                let Some(data) = take(&mut server, bytes as usize) else { return finished };
                                target.copy_from_slice(data);
                            }
                            _ => target.fill(0),
                        }
                        slot.covered = covered;
                    }
                    Ok(Chunk::Status(extent_bytes, extent_flags)) => {
                        assert!(extent_bytes > 0, "an accepted extent is not empty");
                        slot.status.get_or_insert((extent_bytes, extent_flags));
                    }
                    Ok(Chunk::Error(errno)) => {
                        assert!(errno > 0);
                        slot.error.get_or_insert(errno);
                    }
                }
                match flags & p::REPLY_FLAG_DONE != 0 {
                    true => match replies::done(request, slot.error, slot.covered, slot.status.is_some()) {
                        Err(_) => return finished,
                        Ok(outcome) => Some(outcome),
                    },
                    false => None,
                }
            }
        };
        if let Some(outcome) = done {
            let slot = outstanding.remove(index);
            finished += 1;
            if outcome.is_ok() && request.kind == p::CMD_READ {
                assert_eq!(slot.covered, request.length, "a read finished Ok is covered whole");
            }
            if outcome.is_ok() && request.kind == p::CMD_BLOCK_STATUS {
                assert!(slot.status.is_some(), "a status request finished Ok has its extent");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::options as opt;

    /// The model gets as far as a real exchange: it is not rejecting everything.
    #[test]
    fn well_formed_exchanges_go_all_the_way() {
        let mut server = p::INIT_MAGIC.to_be_bytes().to_vec();
        server.extend_from_slice(&p::OPTION_MAGIC.to_be_bytes());
        server.extend_from_slice(&(p::FLAG_FIXED_NEWSTYLE | p::FLAG_NO_ZEROES).to_be_bytes());
        opt::encode_option_reply(opt::OPT_STRUCTURED_REPLY, opt::REP_ACK, &[], &mut server);
        opt::encode_option_reply(opt::OPT_SET_META_CONTEXT, opt::REP_ACK, &[], &mut server);
        opt::encode_option_reply(opt::OPT_GO, opt::REP_INFO, &opt::encode_info_export(1 << 20, 1), &mut server);
        opt::encode_option_reply(opt::OPT_GO, opt::REP_ACK, &[], &mut server);
        assert!(handshake(&server, false, true));
        assert!(!handshake(&server[..server.len() - 1], false, true));

        let style = HeaderStyle::Structured;
        let mut bytes = Vec::new();
        let (data, done) = (p::REPLY_TYPE_OFFSET_DATA, p::REPLY_FLAG_DONE);
        p::encode_chunk_header(style, 0, data, 1, 0, 8 + 4096, &mut bytes);
        bytes.extend_from_slice(&4096u64.to_be_bytes());
        bytes.resize(bytes.len() + 4096, 7);
        p::encode_chunk_header(style, done, p::REPLY_TYPE_OFFSET_HOLE, 1, 0, 12, &mut bytes);
        bytes.extend_from_slice(&8192u64.to_be_bytes());
        bytes.extend_from_slice(&4096u32.to_be_bytes());
        p::encode_simple_reply(0, 3, &mut bytes);
        assert_eq!(replies(style, &bytes), 2);
        p::encode_simple_reply(0, 2, &mut bytes);
        assert_eq!(replies(style, &bytes), 2, "a simple success reply to a status request stops it");
    }
}
