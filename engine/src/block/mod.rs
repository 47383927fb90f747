//! The block layer: the [`BlockDriver`] trait every backend implements, the future type its
//! operations return, and [`Disk`], the checked handle guests and jobs write through.
//!
//! Drivers know nothing of jobs; jobs reach devices only through `Disk` and `BlockDriver`.

mod disk;
mod filter;
mod future;

pub use disk::{Disk, MAX_REQUEST_BYTES};
pub use filter::{Drain, DrainGuard, WriteFilter};
pub use future::{map_done, map_transfer, DeviceHold, IoFuture, OpContext};

use crate::buf::AlignedBuf;
use crate::error::Result;
use crate::priority::IoPriority;

/// A transfer's outcome plus its buffer, which always comes back to the caller.
pub type BufResult<T> = (Result<T>, AlignedBuf);

/// What a range of the device holds, as far as the driver can tell cheaply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockStatus {
    /// Allocated; contents unknown without reading.
    Data,
    /// Allocated and known to read as zeros.
    Zero,
    /// Not allocated; reads as zeros.
    Hole,
}

/// A run of bytes with one status, starting at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub status: BlockStatus,
    pub offset: u64,
    pub length_bytes: u64,
}

/// Alignment a request must meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alignment {
    /// Offsets and lengths are multiples of this (the logical block size for O_DIRECT).
    pub request_bytes: u64,
    /// Buffer addresses are multiples of this.
    pub memory_bytes: u64,
}

/// What a driver can do beyond read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub read_only: bool,
    /// Writes with FUA are durable on completion without a separate flush.
    pub fua: bool,
    pub write_zeroes: bool,
    pub discard: bool,
    /// `block_status` tells holes from data (otherwise everything reports as data).
    pub block_status: bool,
}

/// Flags of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteFlags {
    /// Force unit access: the data is durable when the write completes.
    pub fua: bool,
}

/// A device backend. Methods start the operation and return a `Send` future; requests have
/// already been checked by [`Disk`] (bounds, alignment, overflow), so a driver only asserts.
///
/// A buffer passed in comes back in the result, success or not.
pub trait BlockDriver: Send + Sync + 'static {
    /// A short human name, e.g. `file:/var/tmp/a.img`.
    fn name(&self) -> &str;
    fn size_bytes(&self) -> u64;
    fn alignment(&self) -> Alignment;
    fn capabilities(&self) -> Capabilities;

    /// Read `buf.len()` bytes at `offset` into `buf`.
    fn read(&self, offset: u64, buf: AlignedBuf, priority: IoPriority) -> IoFuture<BufResult<()>>;
    /// Write all of `buf` at `offset`.
    fn write(&self, offset: u64, buf: AlignedBuf, flags: WriteFlags, priority: IoPriority) -> IoFuture<BufResult<()>>;
    /// Make every completed write durable.
    fn flush(&self, priority: IoPriority) -> IoFuture<Result<()>>;
    /// Make the range read as zeros; `may_unmap` lets the driver deallocate it.
    fn write_zeroes(
        &self,
        offset: u64,
        length_bytes: u64,
        may_unmap: bool,
        priority: IoPriority,
    ) -> IoFuture<Result<()>>;
    /// Tell the device the range is unused; its contents become unspecified.
    fn discard(&self, offset: u64, length_bytes: u64, priority: IoPriority) -> IoFuture<Result<()>>;
    /// The status of the bytes from `offset`: one extent, at most `length_bytes` long.
    fn block_status(&self, offset: u64, length_bytes: u64) -> IoFuture<Result<Extent>>;

    /// What the driver stores to, as (device, inode) where that means something (a file),
    /// so a job can refuse a target that is its own source under another name.
    fn device_id(&self) -> Option<(u64, u64)> {
        None
    }

    /// `Some(unit)` if a discard through this driver only gives a job's scratch space back,
    /// in whole units of this size, and loses no data anyone else holds: a backup's snapshot
    /// view over a sync=none job (fleecing). A backup's `discard_source` is allowed only on
    /// such a source, so no job discards a guest's disk under it. `None` for every device.
    fn scratch_discard_bytes(&self) -> Option<u64> {
        None
    }
}
