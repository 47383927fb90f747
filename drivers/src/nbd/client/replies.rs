//! The transmission phase's reply rules without I/O: given a reply header (and the payload
//! bytes it says come first) and the request its cookie names, what the reader is to do, or
//! why the reply breaks the protocol. Every offset, length and count here comes from the
//! server, so all arithmetic on them is checked: a violation is a value, never a panic or a
//! wrapped bound. The reader (`reader.rs`) and the `nbd_client` fuzz target share these.

use crate::nbd::proto::{self as p, HeaderStyle};

/// Payload of a reply chunk that carries no read data (status, errors) at most.
pub const CHUNK_BYTES_MAX: u64 = 1 << 20;

/// The request a reply answers, as the client sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outstanding {
    pub kind: u16,
    pub offset: u64,
    pub length: u64,
}

/// How a reply broke the protocol; the connection is hung up on, the request it names (if
/// any) fails with EPROTO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation(pub &'static str);

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

type Checked<T> = Result<T, Violation>;

/// The whole header's size, from its magic (the first 4 bytes) in the negotiated style.
pub fn header_bytes(style: HeaderStyle, magic: u32) -> Checked<usize> {
    let allowed = match style {
        HeaderStyle::Simple => magic == p::SIMPLE_REPLY_MAGIC,
        HeaderStyle::Structured => magic == p::SIMPLE_REPLY_MAGIC || magic == p::STRUCTURED_REPLY_MAGIC,
        HeaderStyle::Extended => magic == p::EXTENDED_REPLY_MAGIC,
    };
    p::reply_header_bytes(magic).filter(|_| allowed).ok_or(Violation("a reply header of the wrong style or magic"))
}

/// What a simple reply does to its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simple {
    /// The request ends with this outcome.
    Done(Result<(), i32>),
    /// `bytes` of read data follow, into the buffer from its start; then the read is done.
    Data { bytes: u64 },
}

/// A simple reply (`error` is the server's) to `request` on a connection in `style`. A simple
/// reply carries no data but a read's in simple mode, so once structured replies are agreed
/// it may only answer a read or a status request with an error.
pub fn simple(style: HeaderStyle, request: Outstanding, error: u32) -> Checked<Simple> {
    if error != 0 {
        return Ok(Simple::Done(Err(p::local_errno(error))));
    }
    match request.kind {
        p::CMD_BLOCK_STATUS => Err(Violation("a simple success reply to BLOCK_STATUS")),
        p::CMD_READ if style != HeaderStyle::Simple => Err(Violation("a simple success reply to READ")),
        p::CMD_READ => Ok(Simple::Data { bytes: request.length }),
        _ => Ok(Simple::Done(Ok(()))),
    }
}

/// How many of a chunk's payload bytes the reader takes before [`chunk`] decides: a data
/// chunk's offset, a hole's offset and length, a status or error chunk whole.
pub fn chunk_head_bytes(request: Outstanding, flags: u16, kind: u16, length: u64) -> Checked<usize> {
    let bytes = match kind {
        p::REPLY_TYPE_NONE if length == 0 && flags & p::REPLY_FLAG_DONE != 0 => 0,
        p::REPLY_TYPE_NONE => return Err(Violation("a NONE chunk with a payload or without DONE")),
        p::REPLY_TYPE_OFFSET_DATA if request.kind != p::CMD_READ => return Err(Violation("read data for no read")),
        p::REPLY_TYPE_OFFSET_DATA => {
            let most = request.length.checked_add(8).ok_or(Violation("a read too long to answer"))?;
            if !(9..=most).contains(&length) {
                return Err(Violation("a data chunk longer than its read or empty"));
            }
            8
        }
        p::REPLY_TYPE_OFFSET_HOLE if request.kind != p::CMD_READ => return Err(Violation("a hole for no read")),
        p::REPLY_TYPE_OFFSET_HOLE if length != 12 => return Err(Violation("a hole chunk not 12 bytes long")),
        p::REPLY_TYPE_OFFSET_HOLE => 12,
        p::REPLY_TYPE_BLOCK_STATUS | p::REPLY_TYPE_BLOCK_STATUS_EXT if request.kind != p::CMD_BLOCK_STATUS => {
            return Err(Violation("block status for no status request"));
        }
        p::REPLY_TYPE_BLOCK_STATUS | p::REPLY_TYPE_BLOCK_STATUS_EXT if length > CHUNK_BYTES_MAX => {
            return Err(Violation("a block status chunk too long"));
        }
        p::REPLY_TYPE_BLOCK_STATUS | p::REPLY_TYPE_BLOCK_STATUS_EXT => length as usize,
        // ERROR, ERROR_OFFSET, and error types we do not know: the errno comes first.
        k if k & (1 << 15) != 0 && (6..=CHUNK_BYTES_MAX).contains(&length) => length as usize,
        k if k & (1 << 15) != 0 => return Err(Violation("an error chunk too short or too long")),
        _ => return Err(Violation("a chunk type we do not know")),
    };
    Ok(bytes)
}

/// What one chunk does to its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Nothing (NONE, or status for a context that is not ours).
    Nothing,
    /// `bytes` of read data follow on the wire, for the buffer at `relative`.
    Data { relative: u64, bytes: u64 },
    /// `bytes` of zeros at `relative` in the buffer.
    Hole { relative: u64, bytes: u64 },
    /// The first extent of our context: (length, flags).
    Status(u64, u32),
    /// The request fails with this errno (the first error chunk's counts).
    Error(i32),
}

/// Decide a chunk from its header, its head bytes (as many as [`chunk_head_bytes`] said) and
/// the request. `context` is `base:allocation`'s id on this connection.
pub fn chunk(request: Outstanding, kind: u16, length: u64, head: &[u8], context: Option<u32>) -> Checked<Chunk> {
    Ok(match kind {
        p::REPLY_TYPE_OFFSET_DATA => {
            let start = u64::from_be_bytes(head.try_into().map_err(|_| Violation("a data chunk's head"))?);
            let bytes = length.checked_sub(8).ok_or(Violation("a data chunk shorter than its offset"))?;
            Chunk::Data { relative: within(request, start, bytes)?, bytes }
        }
        p::REPLY_TYPE_OFFSET_HOLE => {
            let (start, size) = head.split_first_chunk::<8>().ok_or(Violation("a hole chunk's head"))?;
            let start = u64::from_be_bytes(*start);
            let bytes = u64::from(u32::from_be_bytes(size.try_into().map_err(|_| Violation("a hole chunk's head"))?));
            if bytes == 0 {
                return Err(Violation("an empty hole"));
            }
            Chunk::Hole { relative: within(request, start, bytes)?, bytes }
        }
        p::REPLY_TYPE_BLOCK_STATUS | p::REPLY_TYPE_BLOCK_STATUS_EXT => {
            let (id, descriptors) = p::parse_block_status(kind, head).ok_or(Violation("a malformed block status"))?;
            let first = descriptors.first().ok_or(Violation("a block status without extents"))?;
            match context == Some(id) {
                true => Chunk::Status(first.length, first.flags),
                false => Chunk::Nothing,
            }
        }
        k if k & (1 << 15) != 0 => {
            let error = p::parse_error_payload(head).map_or(p::EIO, |(error, _)| error);
            Chunk::Error(if error == 0 { libc::EIO } else { p::local_errno(error) })
        }
        _ => Chunk::Nothing,
    })
}

/// `bytes` at `start` on the disk as an offset into `request`'s buffer, if all inside it.
fn within(request: Outstanding, start: u64, bytes: u64) -> Checked<u64> {
    let relative = start.checked_sub(request.offset).ok_or(Violation("read data before its request"))?;
    let end = relative.checked_add(bytes).ok_or(Violation("read data past the end of the disk"))?;
    match end <= request.length {
        true => Ok(relative),
        false => Err(Violation("read data past its request")),
    }
}

/// Bytes of a read covered after one more chunk of `bytes`: chunks never overlap, so more
/// than the request asked for is a violation.
pub fn cover(request: Outstanding, covered: u64, bytes: u64) -> Checked<u64> {
    covered.checked_add(bytes).filter(|&total| total <= request.length).ok_or(Violation("read chunks overlap"))
}

/// The outcome at a DONE chunk: the first error chunk's errno, else a read must be covered
/// whole and a status request must have had our extent.
pub fn done(request: Outstanding, error: Option<i32>, covered: u64, status: bool) -> Checked<Result<(), i32>> {
    match error {
        Some(errno) => Ok(Err(errno)),
        None if request.kind == p::CMD_READ && covered != request.length => Err(Violation("a read done short")),
        None if request.kind == p::CMD_BLOCK_STATUS && !status => Err(Violation("a status reply without extents")),
        None => Ok(Ok(())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ: Outstanding = Outstanding { kind: p::CMD_READ, offset: 4096, length: 4096 };

    #[test]
    fn data_and_holes_must_fall_inside_their_read() {
        let at = |start: u64| start.to_be_bytes();
        assert_eq!(chunk(READ, p::REPLY_TYPE_OFFSET_DATA, 8 + 512, &at(4096 + 512), None), {
            Ok(Chunk::Data { relative: 512, bytes: 512 })
        });
        for start in [0, 4096 + 3585, u64::MAX - 5, 4096u64.wrapping_add(u64::MAX - 5)] {
            assert!(chunk(READ, p::REPLY_TYPE_OFFSET_DATA, 8 + 512, &at(start), None).is_err(), "{start}");
            let mut hole = at(start).to_vec();
            hole.extend_from_slice(&512u32.to_be_bytes());
            assert!(chunk(READ, p::REPLY_TYPE_OFFSET_HOLE, 12, &hole, None).is_err(), "{start}");
        }
        assert!(chunk_head_bytes(READ, 0, p::REPLY_TYPE_OFFSET_DATA, 8 + 4097).is_err());
        let huge = Outstanding { length: u64::MAX, ..READ };
        assert!(chunk_head_bytes(huge, 0, p::REPLY_TYPE_OFFSET_DATA, 16).is_err());
        assert_eq!(cover(READ, 4000, 96), Ok(4096));
        assert!(cover(READ, 4000, 97).is_err() && cover(READ, u64::MAX, 1).is_err());
    }

    #[test]
    fn simple_success_replies_carry_no_data_once_chunks_are_agreed() {
        let status = Outstanding { kind: p::CMD_BLOCK_STATUS, ..READ };
        for style in [HeaderStyle::Simple, HeaderStyle::Structured, HeaderStyle::Extended] {
            assert!(simple(style, status, 0).is_err());
            assert_eq!(simple(style, status, p::EINVAL), Ok(Simple::Done(Err(libc::EINVAL))));
        }
        assert_eq!(simple(HeaderStyle::Simple, READ, 0), Ok(Simple::Data { bytes: 4096 }));
        assert!(simple(HeaderStyle::Structured, READ, 0).is_err());
        let flush = Outstanding { kind: p::CMD_FLUSH, offset: 0, length: 0 };
        assert_eq!(simple(HeaderStyle::Structured, flush, 0), Ok(Simple::Done(Ok(()))));
        assert!(done(status, None, 0, false).is_err() && done(READ, None, 4095, false).is_err());
    }
}
