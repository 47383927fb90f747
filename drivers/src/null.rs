//! The null driver: every operation completes at once without touching data (reads leave the
//! buffer as it was, like fio's null engine). It measures the engine's own cost per I/O.

use tandem::block::{Alignment, BlockDriver, BlockStatus, BufResult, Capabilities, Extent, IoFuture, WriteFlags};
use tandem::buf::AlignedBuf;
use tandem::{IoPriority, Result};

/// A device of a given size that stores nothing.
pub struct NullDriver {
    size_bytes: u64,
}

impl NullDriver {
    pub fn new(size_bytes: u64) -> NullDriver {
        NullDriver { size_bytes }
    }
}

impl BlockDriver for NullDriver {
    fn name(&self) -> &str {
        "null"
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn alignment(&self) -> Alignment {
        Alignment { request_bytes: 1, memory_bytes: 1 }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { read_only: false, fua: true, write_zeroes: true, discard: true, block_status: true }
    }

    fn read(&self, _offset: u64, buf: AlignedBuf, _priority: IoPriority) -> IoFuture<BufResult<()>> {
        IoFuture::ready((Ok(()), buf))
    }

    fn write(
        &self,
        _offset: u64,
        buf: AlignedBuf,
        _flags: WriteFlags,
        _priority: IoPriority,
    ) -> IoFuture<BufResult<()>> {
        IoFuture::ready((Ok(()), buf))
    }

    fn flush(&self, _priority: IoPriority) -> IoFuture<Result<()>> {
        IoFuture::ready(Ok(()))
    }

    fn write_zeroes(
        &self,
        _offset: u64,
        _length_bytes: u64,
        _may_unmap: bool,
        _priority: IoPriority,
    ) -> IoFuture<Result<()>> {
        IoFuture::ready(Ok(()))
    }

    fn discard(&self, _offset: u64, _length_bytes: u64, _priority: IoPriority) -> IoFuture<Result<()>> {
        IoFuture::ready(Ok(()))
    }

    /// Reads return whatever the buffer held, so nothing is known about the contents.
    fn block_status(&self, offset: u64, length_bytes: u64) -> IoFuture<Result<Extent>> {
        IoFuture::ready(Ok(Extent { status: BlockStatus::Data, offset, length_bytes }))
    }
}
