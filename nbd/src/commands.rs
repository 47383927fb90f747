//! Carrying out one admitted request on the disk and building its reply: reads (data sent
//! behind its header without a copy), writes, flushes, trims, zeroes, block status, and the
//! success and error replies in the negotiated header style.

use crate::connection::Conn;
use crate::export::MetaContext;
use crate::flow::Body;
use crate::request::Command;
use crate::socket::buffer;
use crate::status;
use tandem::block::WriteFlags;
use tandem::buf::AlignedBuf;
use tandem::IoPriority;
use tandem_drivers::nbd::proto::{self, HeaderStyle, Request};

const G: IoPriority = IoPriority::GUEST;
/// A write-zeroes the disk cannot do natively is written in buffers of this size.
const ZERO_BUF_BYTES: usize = 1 << 20;

pub(crate) async fn write(context: Conn, request: Request, offset: u64, data: AlignedBuf, fua: bool) -> Body {
    let disk = &context.selected.export.disk;
    // writethrough: every write is durable before its reply, as QEMU's writethrough=on.
    let fua = fua || context.selected.export.options.writethrough;
    let (outcome, _data) = disk.write(offset, data, WriteFlags { fua }, G).await;
    done_reply(context.selected.style, &request, outcome)
}

pub(crate) async fn run(context: Conn, request: Request, command: Command) -> Body {
    let style = context.selected.style;
    let disk = &context.selected.export.disk;
    let outcome = match command {
        Command::Read { offset, length_bytes } => return read(&context, &request, offset, length_bytes).await,
        Command::BlockStatus { offset, length_bytes, req_one } => {
            return block_status(&context, &request, offset, length_bytes, req_one).await
        }
        Command::Flush => disk.flush(G).await,
        Command::Trim { offset, length_bytes, fua } => trim(&context, offset, length_bytes, fua).await,
        Command::WriteZeroes { offset, length_bytes, fua, may_unmap, fast } => {
            write_zeroes(&context, offset, length_bytes, fua, may_unmap, fast).await
        }
        Command::Cache | Command::Nothing => Ok(()),
        Command::Write { .. } | Command::Disconnect => unreachable!("handled by the reader"),
    };
    done_reply(style, &request, outcome)
}

async fn trim(context: &Conn, offset: u64, length_bytes: u64, fua: bool) -> tandem::Result<()> {
    let disk = &context.selected.export.disk;
    if !disk.capabilities().discard || !context.selected.export.options.unmap {
        // A trim is advisory: a disk that cannot discard, or an export told not to
        // (QEMU's discard=ignore), keeps the data.
        return Ok(());
    }
    disk.discard(offset, length_bytes, G).await?;
    if fua {
        disk.flush(G).await?;
    }
    Ok(())
}

async fn write_zeroes(
    context: &Conn,
    offset: u64,
    length_bytes: u64,
    fua: bool,
    may_unmap: bool,
    fast: bool,
) -> tandem::Result<()> {
    let disk = &context.selected.export.disk;
    let may_unmap = may_unmap && context.selected.export.options.unmap;
    if disk.capabilities().write_zeroes {
        disk.write_zeroes(offset, length_bytes, may_unmap, G).await?;
    } else if fast {
        return Err(tandem::Error::Unsupported { op: "fast write_zeroes", driver: disk.name().to_string() });
    } else {
        // No native zeroing: write zeros, one buffer at a time.
        let mut at = offset;
        while at < offset + length_bytes {
            let step = (offset + length_bytes - at).min(ZERO_BUF_BYTES as u64) as usize;
            let mut buf = buffer(&context.pool, step).await?;
            buf.as_mut_slice().fill(0);
            disk.write(at, buf, WriteFlags::default(), G).await.0?;
            at += step as u64;
        }
    }
    if fua {
        disk.flush(G).await?;
    }
    Ok(())
}

async fn read(context: &Conn, request: &Request, offset: u64, length_bytes: u32) -> Body {
    let style = context.selected.style;
    let buf = match buffer(&context.pool, length_bytes as usize).await {
        Ok(buf) => buf,
        Err(e) => return done_reply(style, request, Err(e)),
    };
    let (outcome, data) = context.selected.export.disk.read(offset, buf, G).await;
    if let Err(e) = outcome {
        return done_reply(style, request, Err(e));
    }
    let mut header = Vec::with_capacity(48);
    match style {
        HeaderStyle::Simple => proto::encode_simple_reply(0, request.cookie, &mut header),
        _ => {
            let payload_bytes = 8 + u64::from(length_bytes);
            let (flags, kind) = (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA);
            proto::encode_chunk_header(style, flags, kind, request.cookie, request.offset, payload_bytes, &mut header);
            header.extend_from_slice(&offset.to_be_bytes());
        }
    }
    let mut fixed = [0u8; 48];
    assert!(header.len() <= fixed.len() && header.len() <= tandem::reactor::SEND_PREFIX_BYTES_MAX);
    fixed[..header.len()].copy_from_slice(&header);
    Body::Data { header: fixed, header_bytes: header.len(), data }
}

async fn block_status(context: &Conn, request: &Request, offset: u64, length_bytes: u64, req_one: bool) -> Body {
    let style = context.selected.style;
    let disk = &context.selected.export.disk;
    let align = disk.alignment().request_bytes as u32;
    // A compact descriptor holds 32 bits: ask for no more than fits.
    let length_bytes = match style {
        HeaderStyle::Extended => length_bytes,
        _ => length_bytes.min(u64::from(!(align - 1))),
    };
    let mut out = Vec::new();
    let contexts: &[MetaContext] = &context.selected.contexts;
    for (index, meta) in contexts.iter().enumerate() {
        let descriptors = match status::descriptors(disk, meta, offset, length_bytes, req_one).await {
            Ok(descriptors) => descriptors,
            Err(e) => return done_reply(style, request, Err(e)),
        };
        let mut payload = Vec::with_capacity(8 + 16 * descriptors.len());
        proto::encode_block_status(style, index as u32 + 1, &descriptors, align, &mut payload);
        let kind = if style == HeaderStyle::Extended {
            proto::REPLY_TYPE_BLOCK_STATUS_EXT
        } else {
            proto::REPLY_TYPE_BLOCK_STATUS
        };
        let flags = if index + 1 == contexts.len() { proto::REPLY_FLAG_DONE } else { 0 };
        proto::encode_chunk_header(style, flags, kind, request.cookie, request.offset, payload.len() as u64, &mut out);
        out.extend_from_slice(&payload);
    }
    Body::Bytes(out)
}

/// The reply to a request with no data: success, or the error its outcome carries.
pub(crate) fn done_reply(style: HeaderStyle, request: &Request, outcome: tandem::Result<()>) -> Body {
    match outcome {
        Ok(()) => {
            let mut out = Vec::with_capacity(32);
            match style {
                HeaderStyle::Simple => proto::encode_simple_reply(0, request.cookie, &mut out),
                _ => {
                    let (flags, kind) = (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE);
                    proto::encode_chunk_header(style, flags, kind, request.cookie, request.offset, 0, &mut out);
                }
            }
            Body::Bytes(out)
        }
        Err(e) => {
            let errno = match &e {
                tandem::Error::Unsupported { .. } => libc::EOPNOTSUPP,
                tandem::Error::Misaligned { .. } | tandem::Error::OutOfBounds { .. } => libc::EINVAL,
                tandem::Error::ReadOnly { .. } => libc::EPERM,
                other => other.errno().unwrap_or(libc::EIO),
            };
            error_reply(style, request, proto::wire_error(errno), &e.to_string())
        }
    }
}

pub(crate) fn error_reply(style: HeaderStyle, request: &Request, error: u32, message: &str) -> Body {
    assert!(error != 0);
    let mut out = Vec::with_capacity(64 + message.len());
    match style {
        HeaderStyle::Simple => proto::encode_simple_reply(error, request.cookie, &mut out),
        _ => {
            let mut payload = Vec::with_capacity(6 + message.len());
            proto::encode_error_payload(error, message, &mut payload);
            let (flags, kind) = (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR);
            proto::encode_chunk_header(
                style,
                flags,
                kind,
                request.cookie,
                request.offset,
                payload.len() as u64,
                &mut out,
            );
            out.extend_from_slice(&payload);
        }
    }
    // A compact read refused with a simple reply carries no data: the client reads only the
    // header, since the error is nonzero.
    Body::Bytes(out)
}
