//! [`Disk`]: the handle a guest (or a job) does I/O through. It checks every request against
//! the device's size and alignment before anything reaches the driver, and answers bad input
//! with a typed error naming the offending value, changing nothing.
//!
//! Later layers hang their filters here (dirty tracking, mirror's active write path,
//! copy-before-write): every guest request already passes through this one place.

use super::{Alignment, BlockDriver, BufResult, Capabilities, Extent, IoFuture, WriteFlags};
use crate::bitmap::BitmapRegistry;
use crate::buf::AlignedBuf;
use crate::error::{AlignedPart, Error, Result};
use crate::priority::IoPriority;
use crate::reactor::block_on;
use std::sync::Arc;

/// Largest single request: io_uring lengths are 32-bit and results signed, and no workload
/// gains from bigger requests than this.
pub const MAX_REQUEST_BYTES: u64 = 1 << 30;

/// A checked, cheaply cloneable handle on a block driver.
///
/// ```
/// # use tandem::block::*;
/// # use tandem::buf::AlignedBuf;
/// # use tandem::IoPriority;
/// # struct Tiny;
/// # impl BlockDriver for Tiny {
/// #   fn name(&self) -> &str { "tiny" }
/// #   fn size_bytes(&self) -> u64 { 8192 }
/// #   fn alignment(&self) -> Alignment { Alignment { request_bytes: 512, memory_bytes: 512 } }
/// #   fn capabilities(&self) -> Capabilities { Capabilities { read_only: false, fua: true, write_zeroes: false, discard: false, block_status: false } }
/// #   fn read(&self, _: u64, b: AlignedBuf, _: IoPriority) -> IoFuture<BufResult<()>> { IoFuture::ready((Ok(()), b)) }
/// #   fn write(&self, _: u64, b: AlignedBuf, _: WriteFlags, _: IoPriority) -> IoFuture<BufResult<()>> { IoFuture::ready((Ok(()), b)) }
/// #   fn flush(&self, _: IoPriority) -> IoFuture<tandem::Result<()>> { IoFuture::ready(Ok(())) }
/// #   fn write_zeroes(&self, _: u64, _: u64, _: bool, _: IoPriority) -> IoFuture<tandem::Result<()>> { IoFuture::ready(Ok(())) }
/// #   fn discard(&self, _: u64, _: u64, _: IoPriority) -> IoFuture<tandem::Result<()>> { IoFuture::ready(Ok(())) }
/// #   fn block_status(&self, o: u64, l: u64) -> IoFuture<tandem::Result<Extent>> { IoFuture::ready(Ok(Extent { status: BlockStatus::Data, offset: o, length_bytes: l })) }
/// # }
/// let disk = Disk::new(std::sync::Arc::new(Tiny));
/// let buf = AlignedBuf::zeroed(4096, 4096).unwrap();
/// let (result, buf) = disk.read_blocking(8192, buf, IoPriority::GUEST);
/// assert_eq!(result.unwrap_err().to_string(),
///            "request [8192, 8192+4096) is beyond the end of the disk (8192 bytes)");
/// assert_eq!(buf.len(), 4096); // the buffer comes back either way
/// ```
#[derive(Clone)]
pub struct Disk {
    driver: Arc<dyn BlockDriver>,
    size_bytes: u64,
    alignment: Alignment,
    capabilities: Capabilities,
    /// Named dirty bitmaps: every enabled one records each accepted write.
    bitmaps: BitmapRegistry,
}

impl Disk {
    pub fn new(driver: Arc<dyn BlockDriver>) -> Disk {
        let alignment = driver.alignment();
        assert!(alignment.request_bytes.is_power_of_two() && alignment.memory_bytes.is_power_of_two());
        let (size_bytes, capabilities) = (driver.size_bytes(), driver.capabilities());
        Disk { size_bytes, capabilities, alignment, driver, bitmaps: BitmapRegistry::for_disk(size_bytes) }
    }

    /// The disk's named dirty bitmaps (their size must be the disk's).
    pub fn bitmaps(&self) -> &BitmapRegistry {
        &self.bitmaps
    }

    pub fn name(&self) -> &str {
        self.driver.name()
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn alignment(&self) -> Alignment {
        self.alignment
    }

    pub fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    pub fn driver(&self) -> &Arc<dyn BlockDriver> {
        &self.driver
    }

    /// Check a byte range: non-empty, no overflow, inside the disk, aligned, not too large.
    pub fn check_range(&self, offset: u64, length_bytes: u64) -> Result<()> {
        if length_bytes == 0 {
            return Err(Error::EmptyRequest { offset });
        }
        let end = offset.checked_add(length_bytes).ok_or(Error::Overflow { offset, length_bytes })?;
        if end > self.size_bytes {
            return Err(Error::OutOfBounds { offset, length_bytes, size_bytes: self.size_bytes });
        }
        let align_bytes = self.alignment.request_bytes;
        if !offset.is_multiple_of(align_bytes) {
            return Err(Error::Misaligned { part: AlignedPart::Offset, value: offset, align_bytes });
        }
        if !length_bytes.is_multiple_of(align_bytes) {
            return Err(Error::Misaligned { part: AlignedPart::Length, value: length_bytes, align_bytes });
        }
        Ok(())
    }

    fn check_transfer(&self, offset: u64, buf: &AlignedBuf) -> Result<()> {
        let length_bytes = buf.len() as u64;
        self.check_range(offset, length_bytes)?;
        if length_bytes > MAX_REQUEST_BYTES {
            return Err(Error::TooLarge { length_bytes, max_bytes: MAX_REQUEST_BYTES });
        }
        let address = buf.as_ptr() as u64;
        let align_bytes = self.alignment.memory_bytes;
        if !address.is_multiple_of(align_bytes) {
            return Err(Error::Misaligned { part: AlignedPart::BufferAddress, value: address, align_bytes });
        }
        Ok(())
    }

    fn check_writable(&self, op: &'static str) -> Result<()> {
        match self.capabilities.read_only {
            true => Err(Error::ReadOnly { op, name: self.name().to_string() }),
            false => Ok(()),
        }
    }

    fn check_capable(&self, op: &'static str, capable: bool) -> Result<()> {
        match capable {
            true => Ok(()),
            false => Err(Error::Unsupported { op, driver: self.name().to_string() }),
        }
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: AlignedBuf, priority: IoPriority) -> IoFuture<BufResult<()>> {
        match self.check_transfer(offset, &buf) {
            Ok(()) => self.driver.read(offset, buf, priority),
            Err(e) => IoFuture::ready((Err(e), buf)),
        }
    }

    /// Write all of `buf` at `offset`.
    pub fn write(
        &self,
        offset: u64,
        buf: AlignedBuf,
        flags: WriteFlags,
        priority: IoPriority,
    ) -> IoFuture<BufResult<()>> {
        let checked = self.check_writable("write").and_then(|()| self.check_transfer(offset, &buf));
        match checked {
            Ok(()) => {
                // Marked before the write starts: a bitmap may over-report a failed write,
                // never miss a done one.
                self.bitmaps.mark(offset, buf.len() as u64);
                self.driver.write(offset, buf, flags, priority)
            }
            Err(e) => IoFuture::ready((Err(e), buf)),
        }
    }

    pub fn flush(&self, priority: IoPriority) -> IoFuture<Result<()>> {
        self.driver.flush(priority)
    }

    pub fn write_zeroes(
        &self,
        offset: u64,
        length_bytes: u64,
        may_unmap: bool,
        priority: IoPriority,
    ) -> IoFuture<Result<()>> {
        let checked = self
            .check_writable("write_zeroes")
            .and_then(|()| self.check_capable("write_zeroes", self.capabilities.write_zeroes))
            .and_then(|()| self.check_range(offset, length_bytes));
        match checked {
            Ok(()) => {
                self.bitmaps.mark(offset, length_bytes);
                self.driver.write_zeroes(offset, length_bytes, may_unmap, priority)
            }
            Err(e) => IoFuture::ready(Err(e)),
        }
    }

    pub fn discard(&self, offset: u64, length_bytes: u64, priority: IoPriority) -> IoFuture<Result<()>> {
        let checked = self
            .check_writable("discard")
            .and_then(|()| self.check_capable("discard", self.capabilities.discard))
            .and_then(|()| self.check_range(offset, length_bytes));
        match checked {
            Ok(()) => {
                self.bitmaps.mark(offset, length_bytes);
                self.driver.discard(offset, length_bytes, priority)
            }
            Err(e) => IoFuture::ready(Err(e)),
        }
    }

    /// The status of the bytes from `offset`, one extent of at most `length_bytes`.
    pub fn block_status(&self, offset: u64, length_bytes: u64) -> IoFuture<Result<Extent>> {
        match self.check_range(offset, length_bytes) {
            Ok(()) => self.driver.block_status(offset, length_bytes),
            Err(e) => IoFuture::ready(Err(e)),
        }
    }

    /// Blocking [`Disk::read`], for plain threads (never on a reactor core).
    pub fn read_blocking(&self, offset: u64, buf: AlignedBuf, priority: IoPriority) -> BufResult<()> {
        block_on(self.read(offset, buf, priority))
    }

    /// Blocking [`Disk::write`].
    pub fn write_blocking(
        &self,
        offset: u64,
        buf: AlignedBuf,
        flags: WriteFlags,
        priority: IoPriority,
    ) -> BufResult<()> {
        block_on(self.write(offset, buf, flags, priority))
    }

    /// Blocking [`Disk::flush`].
    pub fn flush_blocking(&self, priority: IoPriority) -> Result<()> {
        block_on(self.flush(priority))
    }

    /// Blocking [`Disk::write_zeroes`].
    pub fn write_zeroes_blocking(
        &self,
        offset: u64,
        length_bytes: u64,
        may_unmap: bool,
        priority: IoPriority,
    ) -> Result<()> {
        block_on(self.write_zeroes(offset, length_bytes, may_unmap, priority))
    }

    /// Blocking [`Disk::discard`].
    pub fn discard_blocking(&self, offset: u64, length_bytes: u64, priority: IoPriority) -> Result<()> {
        block_on(self.discard(offset, length_bytes, priority))
    }

    /// Blocking [`Disk::block_status`].
    pub fn block_status_blocking(&self, offset: u64, length_bytes: u64) -> Result<Extent> {
        block_on(self.block_status(offset, length_bytes))
    }
}
