//! The NBD wire format, shared by Tandem's NBD server and client: the numbers the protocol
//! names, and pure functions that turn bytes into typed values and back. Nothing here does
//! I/O, so every parser can be fed arbitrary bytes (the fuzz target does) and every encoder
//! checked against the parser.
//!
//! Sources: the NBD protocol (`NetworkBlockDevice/nbd` `doc/proto.md`, its extended headers
//! from the `extension-ext-header` branch) and QEMU's `docs/interop/nbd.rst` for the
//! `qemu:` meta contexts. Big-endian everywhere ("network byte order").
//!
//! Layout: this file holds the constants and the fixed-size headers of the transmission phase
//! (requests, simple, structured and extended replies); [`options`] holds the handshake
//! (option requests and replies, export info, meta-context queries).

pub mod options;

/// `NBDMAGIC`: the first 8 bytes a newstyle server sends.
pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: follows INIT_MAGIC (newstyle) and starts every option request.
pub const OPTION_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Starts every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// The IANA port for NBD over TCP.
pub const DEFAULT_PORT: u16 = 10809;

/// Handshake flags (server, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (32 bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (16 bits): what the export lets the client do.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command types.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` status bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME` status bit.
pub const STATE_DIRTY: u32 = 1 << 0;

/// The error values the protocol allows on the wire (they equal Linux's errnos).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Map a local errno to the protocol's error set: anything it does not name is EIO (EINVAL
/// for what a bad request gets), as the spec asks.
pub fn wire_error(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EACCES | libc::EROFS => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::EOPNOTSUPP | libc::ENOSYS => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// Map a wire error back to a local errno (unknown values read as EIO).
pub fn local_errno(error: u32) -> i32 {
    match error {
        EPERM => libc::EPERM,
        ENOMEM => libc::ENOMEM,
        EINVAL => libc::EINVAL,
        ENOSPC => libc::ENOSPC,
        EOVERFLOW => libc::EOVERFLOW,
        ENOTSUP => libc::EOPNOTSUPP,
        ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}

/// Bytes of a compact request header.
pub const REQUEST_BYTES: usize = 28;
/// Bytes of an extended request header.
pub const EXTENDED_REQUEST_BYTES: usize = 32;
pub const SIMPLE_REPLY_BYTES: usize = 16;
pub const STRUCTURED_REPLY_BYTES: usize = 20;
pub const EXTENDED_REPLY_BYTES: usize = 32;

/// Which headers the transmission phase uses, as negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderStyle {
    /// Compact requests, simple replies only.
    Simple,
    /// Compact requests, structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    Structured,
    /// 32-byte requests and replies (`NBD_OPT_EXTENDED_HEADERS`).
    Extended,
}

impl HeaderStyle {
    pub fn request_bytes(self) -> usize {
        match self {
            HeaderStyle::Extended => EXTENDED_REQUEST_BYTES,
            _ => REQUEST_BYTES,
        }
    }

    /// Whether replies may be chunked (structured or extended).
    pub fn structured(self) -> bool {
        self != HeaderStyle::Simple
    }
}

/// One transmission-phase request header, as the client sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    /// Effect length, or payload length where the command carries a payload
    /// (`payload_bytes` says which).
    pub length: u64,
}

impl Request {
    /// Bytes of payload that follow this header on the wire: a write's data, or whatever
    /// PAYLOAD_LEN announces (extended style). The spec says an extended write sets
    /// PAYLOAD_LEN; QEMU 10's client does not, and QEMU's server reads a write's payload either
    /// way, so a write always carries one here too.
    pub fn payload_bytes(&self, style: HeaderStyle) -> u64 {
        match style {
            _ if self.kind == CMD_WRITE => self.length,
            HeaderStyle::Extended if self.flags & CMD_FLAG_PAYLOAD_LEN != 0 => self.length,
            _ => 0,
        }
    }
}

/// Why a request header could not be read. Both mean the stream is out of sync: the spec's
/// answer is a hard disconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("request magic {found:#010x} is not {expected:#010x}")]
    BadMagic { found: u32, expected: u32 },
    #[error("request header needs {needed} bytes, {available} given")]
    Short { needed: usize, available: usize },
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Parse a request header in `style` from the front of `bytes`.
pub fn parse_request(bytes: &[u8], style: HeaderStyle) -> Result<Request, HeaderError> {
    let needed = style.request_bytes();
    if bytes.len() < needed {
        return Err(HeaderError::Short { needed, available: bytes.len() });
    }
    let expected = if style == HeaderStyle::Extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
    let found = u32_at(bytes, 0);
    if found != expected {
        return Err(HeaderError::BadMagic { found, expected });
    }
    let length = match style {
        HeaderStyle::Extended => u64_at(bytes, 24),
        _ => u64::from(u32_at(bytes, 24)),
    };
    let request = Request {
        flags: u16_at(bytes, 4),
        kind: u16_at(bytes, 6),
        cookie: u64_at(bytes, 8),
        offset: u64_at(bytes, 16),
        length,
    };
    Ok(request)
}

/// Encode a request header in `style` (the client side). A compact header cannot carry a
/// length above 32 bits: the caller splits such requests.
pub fn encode_request(request: &Request, style: HeaderStyle, out: &mut Vec<u8>) {
    let extended = style == HeaderStyle::Extended;
    out.extend_from_slice(&(if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC }).to_be_bytes());
    out.extend_from_slice(&request.flags.to_be_bytes());
    out.extend_from_slice(&request.kind.to_be_bytes());
    out.extend_from_slice(&request.cookie.to_be_bytes());
    out.extend_from_slice(&request.offset.to_be_bytes());
    if extended {
        out.extend_from_slice(&request.length.to_be_bytes());
    } else {
        assert!(request.length <= u64::from(u32::MAX), "a compact request's length fits 32 bits");
        out.extend_from_slice(&(request.length as u32).to_be_bytes());
    }
}

/// A reply header as the client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    /// A structured or extended chunk: `length` payload bytes follow.
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        length: u64,
    },
}

/// Bytes of the reply header that starts with `magic`, or `None` for an unknown magic.
pub fn reply_header_bytes(magic: u32) -> Option<usize> {
    match magic {
        SIMPLE_REPLY_MAGIC => Some(SIMPLE_REPLY_BYTES),
        STRUCTURED_REPLY_MAGIC => Some(STRUCTURED_REPLY_BYTES),
        EXTENDED_REPLY_MAGIC => Some(EXTENDED_REPLY_BYTES),
        _ => None,
    }
}

/// Parse a reply header (its size from [`reply_header_bytes`]); `None` when the magic is
/// unknown or the bytes are too few.
pub fn parse_reply_header(bytes: &[u8]) -> Option<ReplyHeader> {
    let magic = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
    if bytes.len() < reply_header_bytes(magic)? {
        return None;
    }
    Some(match magic {
        SIMPLE_REPLY_MAGIC => ReplyHeader::Simple { error: u32_at(bytes, 4), cookie: u64_at(bytes, 8) },
        STRUCTURED_REPLY_MAGIC => ReplyHeader::Chunk {
            flags: u16_at(bytes, 4),
            kind: u16_at(bytes, 6),
            cookie: u64_at(bytes, 8),
            length: u64::from(u32_at(bytes, 16)),
        },
        _ => ReplyHeader::Chunk {
            flags: u16_at(bytes, 4),
            kind: u16_at(bytes, 6),
            cookie: u64_at(bytes, 8),
            length: u64_at(bytes, 24),
        },
    })
}

/// The largest reply header, for fixed buffers.
pub const REPLY_HEADER_BYTES_MAX: usize = EXTENDED_REPLY_BYTES;

/// Encode a simple reply header.
pub fn encode_simple_reply(error: u32, cookie: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Encode a structured (`style` Structured) or extended chunk header; `request_offset` is the
/// request's offset, which only the extended header carries. `payload_bytes` must fit 32 bits
/// for a structured header (the server's payload limit guarantees it).
pub fn encode_chunk_header(
    style: HeaderStyle,
    flags: u16,
    kind: u16,
    cookie: u64,
    request_offset: u64,
    payload_bytes: u64,
    out: &mut Vec<u8>,
) {
    assert!(style.structured(), "chunks need structured replies or extended headers");
    let extended = style == HeaderStyle::Extended;
    out.extend_from_slice(&(if extended { EXTENDED_REPLY_MAGIC } else { STRUCTURED_REPLY_MAGIC }).to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    if extended {
        out.extend_from_slice(&request_offset.to_be_bytes());
        out.extend_from_slice(&payload_bytes.to_be_bytes());
    } else {
        assert!(payload_bytes <= u64::from(u32::MAX), "a structured chunk's payload fits 32 bits");
        out.extend_from_slice(&(payload_bytes as u32).to_be_bytes());
    }
}

/// One block-status descriptor: `length` bytes with status `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub length: u64,
    pub flags: u32,
}

/// Encode a block-status chunk's payload for context `context_id`: 32-bit descriptors
/// (structured) or 64-bit ones with a count (extended). Compact descriptors longer than 32
/// bits are cut to the largest multiple of `align_bytes` that fits; the caller stops there.
pub fn encode_block_status(
    style: HeaderStyle,
    context_id: u32,
    descriptors: &[Descriptor],
    align_bytes: u32,
    out: &mut Vec<u8>,
) {
    assert!(!descriptors.is_empty(), "a status chunk has at least one descriptor");
    assert!(align_bytes.is_power_of_two());
    out.extend_from_slice(&context_id.to_be_bytes());
    if style == HeaderStyle::Extended {
        out.extend_from_slice(&(descriptors.len() as u32).to_be_bytes());
        for d in descriptors {
            out.extend_from_slice(&d.length.to_be_bytes());
            out.extend_from_slice(&u64::from(d.flags).to_be_bytes());
        }
        return;
    }
    let compact_max = u64::from(!(align_bytes - 1)); // u32::MAX rounded down to the alignment
    for d in descriptors {
        assert!(d.length > 0, "descriptors are nonzero");
        out.extend_from_slice(&(d.length.min(compact_max) as u32).to_be_bytes());
        out.extend_from_slice(&d.flags.to_be_bytes());
    }
}

/// Parse a block-status chunk's payload (type BLOCK_STATUS or BLOCK_STATUS_EXT); `None` if it
/// is malformed (wrong length, zero-length descriptor, count mismatch).
pub fn parse_block_status(kind: u16, payload: &[u8]) -> Option<(u32, Vec<Descriptor>)> {
    let context_id = u32::from_be_bytes(payload.get(..4)?.try_into().ok()?);
    let descriptors: Vec<Descriptor> = match kind {
        REPLY_TYPE_BLOCK_STATUS => {
            let rest = &payload[4..];
            if rest.is_empty() || !rest.len().is_multiple_of(8) {
                return None;
            }
            rest.chunks_exact(8).map(|c| Descriptor { length: u64::from(u32_at(c, 0)), flags: u32_at(c, 4) }).collect()
        }
        REPLY_TYPE_BLOCK_STATUS_EXT => {
            let count = u32::from_be_bytes(payload.get(4..8)?.try_into().ok()?) as usize;
            let rest = &payload[8..];
            if count == 0 || rest.len() != count.checked_mul(16)? {
                return None;
            }
            // Only the low 32 bits carry status in every context we know.
            rest.chunks_exact(16).map(|c| Descriptor { length: u64_at(c, 0), flags: u64_at(c, 8) as u32 }).collect()
        }
        _ => return None,
    };
    descriptors.iter().all(|d| d.length > 0).then_some((context_id, descriptors))
}

/// Encode an error chunk's payload: the error and a message for humans (cut to the spec's
/// 4096-byte string limit).
pub fn encode_error_payload(error: u32, message: &str, out: &mut Vec<u8>) {
    assert!(error != 0, "an error chunk carries a nonzero error");
    let message = truncate_utf8(message, STRING_BYTES_MAX);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// Parse an error chunk's payload: the error and its message (lossy UTF-8).
pub fn parse_error_payload(payload: &[u8]) -> Option<(u32, String)> {
    let error = u32::from_be_bytes(payload.get(..4)?.try_into().ok()?);
    let length = usize::from(u16::from_be_bytes(payload.get(4..6)?.try_into().ok()?));
    let message = payload.get(6..6 + length)?;
    Some((error, String::from_utf8_lossy(message).into_owned()))
}

/// The longest string (export name, description, message) the spec allows.
pub const STRING_BYTES_MAX: usize = 4096;

/// `text` cut to at most `bytes_max` bytes on a character boundary.
pub fn truncate_utf8(text: &str, bytes_max: usize) -> &str {
    if text.len() <= bytes_max {
        return text;
    }
    let mut end = bytes_max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_in_both_styles() {
        let request = Request { flags: CMD_FLAG_FUA, kind: CMD_WRITE, cookie: 7, offset: 1 << 40, length: 4096 };
        for style in [HeaderStyle::Structured, HeaderStyle::Extended] {
            let mut bytes = Vec::new();
            encode_request(&request, style, &mut bytes);
            assert_eq!(bytes.len(), style.request_bytes());
            assert_eq!(parse_request(&bytes, style).unwrap(), request);
        }
    }

    #[test]
    fn a_wrong_magic_or_short_header_is_named() {
        let mut bytes = Vec::new();
        let request = Request { flags: 0, kind: CMD_READ, cookie: 1, offset: 0, length: 512 };
        encode_request(&request, HeaderStyle::Simple, &mut bytes);
        let err = parse_request(&bytes, HeaderStyle::Extended).unwrap_err();
        assert_eq!(err, HeaderError::Short { needed: 32, available: 28 });
        bytes[0] ^= 1;
        assert!(matches!(parse_request(&bytes, HeaderStyle::Simple), Err(HeaderError::BadMagic { .. })));
    }

    #[test]
    fn payload_follows_writes_or_payload_len() {
        let write = Request { flags: 0, kind: CMD_WRITE, cookie: 1, offset: 0, length: 512 };
        assert_eq!(write.payload_bytes(HeaderStyle::Simple), 512);
        assert_eq!(write.payload_bytes(HeaderStyle::Extended), 512, "QEMU's client omits PAYLOAD_LEN on writes");
        let flagged = Request { flags: CMD_FLAG_PAYLOAD_LEN, ..write };
        assert_eq!(flagged.payload_bytes(HeaderStyle::Extended), 512);
        let trim = Request { kind: CMD_TRIM, length: 1 << 30, ..write };
        assert_eq!(trim.payload_bytes(HeaderStyle::Simple), 0);
    }

    #[test]
    fn reply_headers_round_trip() {
        let mut bytes = Vec::new();
        encode_simple_reply(EIO, 9, &mut bytes);
        assert_eq!(parse_reply_header(&bytes), Some(ReplyHeader::Simple { error: EIO, cookie: 9 }));
        for style in [HeaderStyle::Structured, HeaderStyle::Extended] {
            bytes.clear();
            encode_chunk_header(style, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 3, 4096, 520, &mut bytes);
            let magic = u32::from_be_bytes(bytes[..4].try_into().unwrap());
            assert_eq!(reply_header_bytes(magic), Some(bytes.len()));
            let parsed = parse_reply_header(&bytes).unwrap();
            let expected =
                ReplyHeader::Chunk { flags: REPLY_FLAG_DONE, kind: REPLY_TYPE_OFFSET_DATA, cookie: 3, length: 520 };
            assert_eq!(parsed, expected);
        }
        assert_eq!(parse_reply_header(&[0, 1, 2, 3, 4]), None);
    }

    #[test]
    fn block_status_round_trips_and_long_compact_extents_are_cut() {
        let descriptors = [Descriptor { length: 8 << 30, flags: STATE_HOLE | STATE_ZERO }];
        let mut bytes = Vec::new();
        encode_block_status(HeaderStyle::Extended, 1, &descriptors, 512, &mut bytes);
        assert_eq!(parse_block_status(REPLY_TYPE_BLOCK_STATUS_EXT, &bytes), Some((1, descriptors.to_vec())));
        bytes.clear();
        encode_block_status(HeaderStyle::Structured, 2, &descriptors, 512, &mut bytes);
        let (id, parsed) = parse_block_status(REPLY_TYPE_BLOCK_STATUS, &bytes).unwrap();
        assert_eq!((id, parsed[0].length), (2, u64::from(u32::MAX) & !511));
        assert_eq!(parse_block_status(REPLY_TYPE_BLOCK_STATUS, &bytes[..7]), None);
    }

    #[test]
    fn errors_map_to_the_wire_set_and_back() {
        assert_eq!(wire_error(libc::EROFS), EPERM);
        assert_eq!(wire_error(libc::EBADF), EIO);
        assert_eq!(local_errno(wire_error(libc::ENOSPC)), libc::ENOSPC);
        let mut bytes = Vec::new();
        encode_error_payload(EINVAL, &"é".repeat(3000), &mut bytes);
        let (error, message) = parse_error_payload(&bytes).unwrap();
        assert_eq!(error, EINVAL);
        assert!(message.len() <= STRING_BYTES_MAX && message.chars().all(|c| c == 'é'));
    }
}
