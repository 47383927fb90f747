//! Every error the engine returns. Each variant carries the offending value so the message
//! alone tells the user what to fix; nothing here is ever a panic.

use std::fmt;

/// The result type of the engine.
pub type Result<T> = std::result::Result<T, Error>;

/// Which part of a request broke an alignment rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlignedPart {
    Offset,
    Length,
    BufferAddress,
}

impl fmt::Display for AlignedPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AlignedPart::Offset => "offset",
            AlignedPart::Length => "length",
            AlignedPart::BufferAddress => "buffer address",
        })
    }
}

/// An engine error. The `Display` text names the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("request at offset {offset} with length {length_bytes} overflows a 64-bit offset")]
    Overflow { offset: u64, length_bytes: u64 },
    #[error("request [{offset}, {offset}+{length_bytes}) is beyond the end of the disk ({size_bytes} bytes)")]
    OutOfBounds { offset: u64, length_bytes: u64, size_bytes: u64 },
    #[error("{part} {value:#x} is not aligned to {align_bytes} bytes")]
    Misaligned { part: AlignedPart, value: u64, align_bytes: u64 },
    #[error("request at offset {offset} has length 0")]
    EmptyRequest { offset: u64 },
    #[error("request of {length_bytes} bytes exceeds the largest single request ({max_bytes} bytes)")]
    TooLarge { length_bytes: u64, max_bytes: u64 },
    #[error("{op} at offset {offset}: {}", errno_text(*.errno))]
    Io { op: &'static str, offset: u64, errno: i32 },
    #[error("{op} at offset {offset} moved {done_bytes} of {length_bytes} bytes (the file changed size underneath?)")]
    ShortTransfer { op: &'static str, offset: u64, done_bytes: u64, length_bytes: u64 },
    #[error("{op} refused: the disk {name} is read-only")]
    ReadOnly { op: &'static str, name: String },
    #[error("{op} is not supported by driver {driver}")]
    Unsupported { op: &'static str, driver: String },
    #[error(
        "buffer of {requested_bytes} bytes would exceed the pool limit of {limit_bytes} bytes ({in_use_bytes} in use)"
    )]
    BufferLimit { requested_bytes: u64, in_use_bytes: u64, limit_bytes: u64 },
    #[error("alignment {align_bytes} is not a power of two")]
    BadAlignment { align_bytes: u64 },
    #[error("cannot open {path}: {}", errno_text(*.errno))]
    Open { path: String, errno: i32 },
    #[error("{path} refuses O_DIRECT ({}); use a directory on a disk filesystem, or allow buffered I/O", errno_text(*.errno))]
    DirectIoRefused { path: String, errno: i32 },
    #[error("invalid configuration: {name} = {value}: {reason}")]
    Config { name: &'static str, value: String, reason: &'static str },
    #[error("the runtime has shut down")]
    RuntimeStopped,
    #[error("the task panicked (its core caught the panic and keeps running)")]
    TaskPanicked,
    #[error("injected fault: {}", errno_text(*.errno))]
    Injected { errno: i32 },
    #[error("simulated crash: the disk is gone until it is reopened")]
    Crashed,
    #[error("disk {name} is busy: a job's filter is already on it")]
    DiskBusy { name: String },
    #[error("{name} cannot take the disk's place: {why}")]
    UnfitTarget { name: String, why: String },
}

impl Error {
    /// The errno behind this error, where there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { errno, .. } | Error::Open { errno, .. } | Error::Injected { errno } => Some(*errno),
            Error::DirectIoRefused { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// Whether the device ran out of space (the `enospc` error policy keys on this).
    pub fn is_no_space(&self) -> bool {
        self.errno() == Some(libc::ENOSPC)
    }
}

/// `strerror` text plus the symbolic errno, e.g. "Input/output error (EIO, errno 5)".
pub fn errno_text(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    let text = text.split(" (os error").next().unwrap_or(&text).to_string();
    match errno_name(errno) {
        Some(name) => format!("{text} ({name}, errno {errno})"),
        None => format!("{text} (errno {errno})"),
    }
}

fn errno_name(errno: i32) -> Option<&'static str> {
    Some(match errno {
        libc::EIO => "EIO",
        libc::ENOSPC => "ENOSPC",
        libc::EINVAL => "EINVAL",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ENOENT => "ENOENT",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EAGAIN => "EAGAIN",
        libc::EBUSY => "EBUSY",
        libc::ECANCELED => "ECANCELED",
        libc::EROFS => "EROFS",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_bad_value() {
        let e = Error::OutOfBounds { offset: 8192, length_bytes: 4096, size_bytes: 8192 };
        assert!(e.to_string().contains("8192+4096"), "{e}");
        let e = Error::Misaligned { part: AlignedPart::Offset, value: 513, align_bytes: 512 };
        assert_eq!(e.to_string(), "offset 0x201 is not aligned to 512 bytes");
        let e = Error::Io { op: "read", offset: 0, errno: libc::EIO };
        assert!(e.to_string().contains("EIO, errno 5"), "{e}");
        assert!(Error::Injected { errno: libc::ENOSPC }.is_no_space());
        assert!(!Error::Injected { errno: libc::EIO }.is_no_space());
    }
}
