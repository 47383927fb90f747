//! Judging one transmission-phase request before anything touches the disk: which command it
//! is, whether its flags, range and payload are acceptable for the export and the negotiated
//! headers, and, when not, which NBD error the spec names or whether the stream can no longer
//! be trusted. Pure, like the handshake: the fuzz target feeds it arbitrary headers.

use crate::export::Export;
use tandem_drivers::nbd::proto::{self, HeaderStyle, Request};

/// A request the server will carry out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length_bytes: u32,
    },
    /// Its payload (`length_bytes`) follows the header.
    Write {
        offset: u64,
        length_bytes: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length_bytes: u64,
        fua: bool,
    },
    /// Advisory prefetch: a disk opened with O_DIRECT has no cache to fill, so it only checks.
    Cache,
    WriteZeroes {
        offset: u64,
        length_bytes: u64,
        fua: bool,
        may_unmap: bool,
        fast: bool,
    },
    BlockStatus {
        offset: u64,
        length_bytes: u64,
        req_one: bool,
    },
    /// A zero-length read, write, trim, zero or cache: succeeds without touching the disk.
    Nothing,
    Disconnect,
}

/// The verdict on one request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Run(Command),
    /// Reply with `error` after reading and dropping `discard_bytes` of payload; carry on.
    Refuse {
        error: u32,
        message: String,
        discard_bytes: u64,
    },
    /// The spec's hard disconnect: the client broke a MUST, or sent a payload too large to skip.
    Disconnect {
        reason: String,
    },
}

/// Flags each command accepts (FUA is accepted, and ignored where meaningless, on every
/// command, as the spec requires once SEND_FUA is advertised).
fn allowed_flags(kind: u16, style: HeaderStyle) -> u16 {
    let payload =
        if style == HeaderStyle::Extended && kind == proto::CMD_WRITE { proto::CMD_FLAG_PAYLOAD_LEN } else { 0 };
    // DF is advertised (and so allowed) only with structured replies.
    let df = if style.structured() { proto::CMD_FLAG_DF } else { 0 };
    proto::CMD_FLAG_FUA
        | payload
        | match kind {
            proto::CMD_READ => df,
            proto::CMD_WRITE_ZEROES => proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO,
            proto::CMD_BLOCK_STATUS => proto::CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

/// Judge `request` for `export`, with `context_count` meta contexts selected.
pub fn judge(request: &Request, style: HeaderStyle, export: &Export, context_count: usize) -> Verdict {
    let payload_bytes = request.payload_bytes(style);
    let max_bytes = u64::from(export.options.request_bytes_max);
    let refuse = |error: u32, message: String| Verdict::Refuse { error, message, discard_bytes: payload_bytes };
    if payload_bytes > max_bytes && (style == HeaderStyle::Extended || request.kind != proto::CMD_WRITE) {
        let reason = format!("payload of {payload_bytes} bytes exceeds the maximum of {max_bytes}");
        return Verdict::Disconnect { reason };
    }
    let kind = request.kind;
    if kind > proto::CMD_BLOCK_STATUS {
        return refuse(proto::EINVAL, format!("unknown command {kind}"));
    }
    let unknown = request.flags & !allowed_flags(kind, style);
    if unknown != 0 {
        return refuse(proto::EINVAL, format!("flags {unknown:#x} are not valid for command {kind}"));
    }
    let writes = matches!(kind, proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES);
    if writes && !export.options.writable {
        return refuse(proto::EPERM, format!("export '{}' is read-only", export.name()));
    }
    if kind == proto::CMD_BLOCK_STATUS && context_count == 0 {
        return refuse(proto::EINVAL, "no meta context was selected (NBD_OPT_SET_META_CONTEXT)".into());
    }
    match kind {
        proto::CMD_DISC => Verdict::Run(Command::Disconnect),
        proto::CMD_FLUSH => Verdict::Run(Command::Flush),
        _ => judge_range(request, export, max_bytes, payload_bytes),
    }
}

/// Commands with a range: bounds and sizes.
fn judge_range(request: &Request, export: &Export, max_bytes: u64, payload_bytes: u64) -> Verdict {
    let (offset, length_bytes, flags) = (request.offset, request.length, request.flags);
    let refuse = |error: u32, message: String| Verdict::Refuse { error, message, discard_bytes: payload_bytes };
    let size_bytes = export.disk.size_bytes();
    let writes = matches!(request.kind, proto::CMD_WRITE | proto::CMD_WRITE_ZEROES);
    if length_bytes > max_bytes && matches!(request.kind, proto::CMD_READ | proto::CMD_WRITE) {
        return refuse(proto::EINVAL, format!("{length_bytes} bytes exceed the maximum request of {max_bytes}"));
    }
    if offset.checked_add(length_bytes).is_none_or(|end| end > size_bytes) {
        // QEMU's choice, which clients expect: a write past the end is out of space.
        let error = if writes { proto::ENOSPC } else { proto::EINVAL };
        return refuse(error, format!("[{offset}, +{length_bytes}) is beyond the export's {size_bytes} bytes"));
    }
    let fua = flags & proto::CMD_FLAG_FUA != 0;
    if length_bytes == 0 {
        return match request.kind {
            proto::CMD_BLOCK_STATUS => refuse(proto::EINVAL, "block status of zero bytes".into()),
            _ => Verdict::Run(Command::Nothing),
        };
    }
    Verdict::Run(match request.kind {
        proto::CMD_READ => Command::Read { offset, length_bytes: length_bytes as u32 },
        proto::CMD_WRITE => Command::Write { offset, length_bytes: length_bytes as u32, fua },
        proto::CMD_TRIM => Command::Trim { offset, length_bytes, fua },
        proto::CMD_CACHE => Command::Cache,
        proto::CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            length_bytes,
            fua,
            may_unmap: flags & proto::CMD_FLAG_NO_HOLE == 0,
            fast: flags & proto::CMD_FLAG_FAST_ZERO != 0,
        },
        proto::CMD_BLOCK_STATUS => {
            Command::BlockStatus { offset, length_bytes, req_one: flags & proto::CMD_FLAG_REQ_ONE != 0 }
        }
        other => unreachable!("command {other} is handled before ranges"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::ExportOptions;
    use std::sync::Arc;
    use tandem::block::Disk;
    use tandem_drivers::MemoryDriver;

    fn export(writable: bool) -> Export {
        let disk = Disk::new(Arc::new(MemoryDriver::new(1 << 20)));
        Export::new(disk, ExportOptions { writable, ..ExportOptions::new("") }).unwrap()
    }

    fn request(kind: u16, flags: u16, offset: u64, length: u64) -> Request {
        Request { flags, kind, cookie: 1, offset, length }
    }

    fn error_of(verdict: Verdict) -> u32 {
        match verdict {
            Verdict::Refuse { error, .. } => error,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn good_requests_run() {
        let e = export(true);
        let read = judge(&request(proto::CMD_READ, proto::CMD_FLAG_DF, 4096, 4096), HeaderStyle::Structured, &e, 0);
        assert_eq!(read, Verdict::Run(Command::Read { offset: 4096, length_bytes: 4096 }));
        let zero =
            judge(&request(proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_NO_HOLE, 0, 1 << 20), HeaderStyle::Simple, &e, 0);
        let expected =
            Command::WriteZeroes { offset: 0, length_bytes: 1 << 20, fua: false, may_unmap: false, fast: false };
        assert_eq!(zero, Verdict::Run(expected));
        let empty = judge(&request(proto::CMD_WRITE, 0, 0, 0), HeaderStyle::Simple, &e, 0);
        assert_eq!(empty, Verdict::Run(Command::Nothing));
    }

    #[test]
    fn bad_requests_get_the_errors_the_spec_names() {
        let (e, ro, s) = (export(true), export(false), HeaderStyle::Simple);
        assert_eq!(error_of(judge(&request(9, 0, 0, 512), s, &e, 0)), proto::EINVAL);
        assert_eq!(
            error_of(judge(&request(proto::CMD_READ, proto::CMD_FLAG_NO_HOLE, 0, 512), s, &e, 0)),
            proto::EINVAL
        );
        assert_eq!(error_of(judge(&request(proto::CMD_READ, 0, 1 << 20, 512), s, &e, 0)), proto::EINVAL);
        assert_eq!(error_of(judge(&request(proto::CMD_WRITE, 0, 1 << 20, 512), s, &e, 0)), proto::ENOSPC);
        assert_eq!(error_of(judge(&request(proto::CMD_READ, 0, u64::MAX, 512), s, &e, 0)), proto::EINVAL);
        assert_eq!(error_of(judge(&request(proto::CMD_TRIM, 0, 0, 512), s, &ro, 0)), proto::EPERM);
        assert_eq!(error_of(judge(&request(proto::CMD_BLOCK_STATUS, 0, 0, 512), s, &e, 0)), proto::EINVAL);
        let refused_write = judge(&request(proto::CMD_WRITE, 0, 0, 512), s, &ro, 0);
        assert!(matches!(refused_write, Verdict::Refuse { discard_bytes: 512, .. }), "the payload is skipped");
    }

    #[test]
    fn payloads_beyond_the_maximum_are_refused_or_end_the_connection() {
        let e = export(true);
        let big = 64 << 20;
        let compact = judge(&request(proto::CMD_WRITE, 0, 0, big), HeaderStyle::Simple, &e, 0);
        assert!(matches!(compact, Verdict::Refuse { error: proto::EINVAL, discard_bytes, .. } if discard_bytes == big));
        let read = judge(&request(proto::CMD_READ, 0, 0, big), HeaderStyle::Simple, &e, 0);
        assert_eq!(error_of(read), proto::EINVAL);
        let extended = request(proto::CMD_WRITE, proto::CMD_FLAG_PAYLOAD_LEN, 0, big);
        assert!(matches!(judge(&extended, HeaderStyle::Extended, &e, 0), Verdict::Disconnect { .. }));
        let unflagged = judge(&request(proto::CMD_WRITE, 0, 0, 512), HeaderStyle::Extended, &e, 0);
        assert!(matches!(unflagged, Verdict::Run(Command::Write { .. })), "QEMU 10 sends writes without PAYLOAD_LEN");
    }
}
