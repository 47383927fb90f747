//! [`Disk`]: the handle a guest (or a job) does I/O through. It checks every request against
//! the device's size and alignment before anything reaches the driver, and answers bad input
//! with a typed error naming the offending value, changing nothing.
//!
//! After the checks, a write passes the disk's write gate (so a job can drain writes) and its
//! filter, if a job inserted one (mirror's active write path, copy-before-write), then reaches
//! the driver. A job can also switch the disk over to another driver (mirror's pivot).

use super::filter::{DrainGuard, WriteFilter, WriteGate, WriteTicket};
use super::{Alignment, BlockDriver, BufResult, Capabilities, Extent, IoFuture, WriteFlags};
use crate::bitmap::BitmapRegistry;
use crate::buf::AlignedBuf;
use crate::error::{AlignedPart, Error, Result};
use crate::priority::IoPriority;
use crate::reactor::block_on;
use arc_swap::ArcSwap;
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
    shared: Arc<Shared>,
}

struct Shared {
    name: String,
    /// Size, alignment and capabilities are the disk's for life: a driver it switches over to
    /// must offer at least these (see [`Disk::switch_to`]).
    size_bytes: u64,
    alignment: Alignment,
    capabilities: Capabilities,
    /// The driver and filter in use; swapped whole, read without a lock on every request.
    node: ArcSwap<Node>,
    /// Named dirty bitmaps: every enabled one records each accepted write.
    bitmaps: BitmapRegistry,
    gate: Arc<WriteGate>,
}

/// What a disk's requests currently go through.
struct Node {
    driver: Arc<dyn BlockDriver>,
    filter: Option<Arc<dyn WriteFilter>>,
}

impl Disk {
    pub fn new(driver: Arc<dyn BlockDriver>) -> Disk {
        let alignment = driver.alignment();
        assert!(alignment.request_bytes.is_power_of_two() && alignment.memory_bytes.is_power_of_two());
        let (size_bytes, capabilities) = (driver.size_bytes(), driver.capabilities());
        let shared = Shared {
            name: driver.name().to_string(),
            size_bytes,
            capabilities,
            alignment,
            node: ArcSwap::from_pointee(Node { driver, filter: None }),
            bitmaps: BitmapRegistry::for_disk(size_bytes),
            gate: Arc::new(WriteGate::new()),
        };
        Disk { shared: Arc::new(shared) }
    }

    /// The disk's named dirty bitmaps (their size must be the disk's).
    pub fn bitmaps(&self) -> &BitmapRegistry {
        &self.shared.bitmaps
    }

    /// The name of the driver the disk was created on (kept across a switch-over).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn size_bytes(&self) -> u64 {
        self.shared.size_bytes
    }

    pub fn alignment(&self) -> Alignment {
        self.shared.alignment
    }

    pub fn capabilities(&self) -> Capabilities {
        self.shared.capabilities
    }

    /// The driver requests currently reach (below any filter).
    pub fn driver(&self) -> Arc<dyn BlockDriver> {
        self.shared.node.load().driver.clone()
    }

    /// Whether a job's filter sits on this disk.
    pub fn has_filter(&self) -> bool {
        self.shared.node.load().filter.is_some()
    }

    /// Hold new guest writes back and resolve once none is in progress. `None` if a drain is
    /// already under way (one job owns a disk's drains at a time).
    ///
    /// Never await a drain from a task whose own writes to this disk are still pending: it
    /// would wait for itself.
    pub fn drain(&self) -> Option<super::filter::Drain> {
        self.shared.gate.drain()
    }

    /// Whether `guard` is a drain of this disk (one taken through any clone of it).
    pub fn is_drained_by(&self, guard: &super::filter::DrainGuard) -> bool {
        guard.holds(&self.shared.gate)
    }

    /// Put `filter` on the write path: every write submitted after this returns passes it.
    /// Writes already in progress did not; a [`Disk::drain`] afterwards waits them out. Fails
    /// if another filter is there.
    pub fn insert_filter(&self, filter: Arc<dyn WriteFilter>) -> Result<()> {
        let mut busy = false;
        self.shared.node.rcu(|node| match node.filter {
            Some(_) => {
                busy = true;
                node.clone()
            }
            None => {
                busy = false;
                Arc::new(Node { driver: node.driver.clone(), filter: Some(filter.clone()) })
            }
        });
        match busy {
            true => Err(Error::DiskBusy { name: self.name().to_string() }),
            false => Ok(()),
        }
    }

    /// Take the filter off the write path (while drained).
    pub fn remove_filter(&self, _drained: &DrainGuard) {
        let driver = self.shared.node.load().driver.clone();
        self.shared.node.store(Arc::new(Node { driver, filter: None }));
    }

    /// Switch the disk over to `driver` and drop any filter (mirror's pivot), while drained.
    /// The new driver must be at least as large, no stricter in alignment, writable, and able
    /// to do what the disk advertises.
    pub fn switch_to(&self, _drained: &DrainGuard, driver: Arc<dyn BlockDriver>) -> Result<()> {
        self.check_replacement(driver.as_ref())?;
        self.shared.node.store(Arc::new(Node { driver, filter: None }));
        Ok(())
    }

    /// Whether `driver` could replace this disk's (see [`Disk::switch_to`]).
    pub fn check_replacement(&self, driver: &dyn BlockDriver) -> Result<()> {
        let (ours, theirs) = (self.shared.capabilities, driver.capabilities());
        let unfit = |why: String| Err(Error::UnfitTarget { name: driver.name().to_string(), why });
        if driver.size_bytes() < self.size_bytes() {
            return unfit(format!("{} bytes, smaller than the disk's {}", driver.size_bytes(), self.size_bytes()));
        }
        let (align, their_align) = (self.shared.alignment, driver.alignment());
        if their_align.request_bytes > align.request_bytes || their_align.memory_bytes > align.memory_bytes {
            return unfit(format!(
                "alignment {}/{} bytes, stricter than the disk's {}/{}",
                their_align.request_bytes, their_align.memory_bytes, align.request_bytes, align.memory_bytes
            ));
        }
        let missing = [
            (theirs.read_only && !ours.read_only, "writes"),
            (ours.write_zeroes && !theirs.write_zeroes, "write_zeroes"),
            (ours.discard && !theirs.discard, "discard"),
        ];
        match missing.iter().find(|(lacks, _)| *lacks) {
            Some((_, what)) => unfit(format!("cannot do {what}")),
            None => Ok(()),
        }
    }

    /// Count a guest write in, or come back through the gate once a drain lets it.
    fn enter(&self) -> Option<WriteTicket> {
        self.shared.gate.enter()
    }

    /// Check a byte range: non-empty, no overflow, inside the disk, aligned, not too large.
    pub fn check_range(&self, offset: u64, length_bytes: u64) -> Result<()> {
        if length_bytes == 0 {
            return Err(Error::EmptyRequest { offset });
        }
        let end = offset.checked_add(length_bytes).ok_or(Error::Overflow { offset, length_bytes })?;
        if end > self.size_bytes() {
            return Err(Error::OutOfBounds { offset, length_bytes, size_bytes: self.size_bytes() });
        }
        let align_bytes = self.shared.alignment.request_bytes;
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
        let align_bytes = self.shared.alignment.memory_bytes;
        if !address.is_multiple_of(align_bytes) {
            return Err(Error::Misaligned { part: AlignedPart::BufferAddress, value: address, align_bytes });
        }
        Ok(())
    }

    fn check_writable(&self, op: &'static str) -> Result<()> {
        match self.shared.capabilities.read_only {
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
            Ok(()) => {
                let node = self.shared.node.load();
                match &node.filter {
                    Some(filter) => filter.read(&node.driver, offset, buf, priority),
                    None => node.driver.read(offset, buf, priority),
                }
            }
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
        if let Err(e) = checked {
            return IoFuture::ready((Err(e), buf));
        }
        let Some(ticket) = self.enter() else {
            let (disk, gate) = (self.clone(), self.shared.gate.opened());
            return IoFuture::boxed(async move {
                gate.await;
                disk.write(offset, buf, flags, priority).await
            });
        };
        // Marked before the write starts: a bitmap may over-report a failed write, never miss
        // a done one.
        self.shared.bitmaps.mark(offset, buf.len() as u64);
        let node = self.shared.node.load();
        match &node.filter {
            Some(filter) => filter.write(&node.driver, offset, buf, flags, priority).finishing(ticket),
            None => node.driver.write(offset, buf, flags, priority).holding(ticket),
        }
    }

    pub fn flush(&self, priority: IoPriority) -> IoFuture<Result<()>> {
        self.shared.node.load().driver.flush(priority)
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
            .and_then(|()| self.check_capable("write_zeroes", self.shared.capabilities.write_zeroes))
            .and_then(|()| self.check_range(offset, length_bytes));
        if let Err(e) = checked {
            return IoFuture::ready(Err(e));
        }
        let Some(ticket) = self.enter() else {
            let (disk, gate) = (self.clone(), self.shared.gate.opened());
            return IoFuture::boxed(async move {
                gate.await;
                disk.write_zeroes(offset, length_bytes, may_unmap, priority).await
            });
        };
        self.shared.bitmaps.mark(offset, length_bytes);
        let node = self.shared.node.load();
        match &node.filter {
            Some(filter) => {
                filter.write_zeroes(&node.driver, offset, length_bytes, may_unmap, priority).finishing(ticket)
            }
            None => node.driver.write_zeroes(offset, length_bytes, may_unmap, priority).holding(ticket),
        }
    }

    pub fn discard(&self, offset: u64, length_bytes: u64, priority: IoPriority) -> IoFuture<Result<()>> {
        let checked = self
            .check_writable("discard")
            .and_then(|()| self.check_capable("discard", self.shared.capabilities.discard))
            .and_then(|()| self.check_range(offset, length_bytes));
        if let Err(e) = checked {
            return IoFuture::ready(Err(e));
        }
        let Some(ticket) = self.enter() else {
            let (disk, gate) = (self.clone(), self.shared.gate.opened());
            return IoFuture::boxed(async move {
                gate.await;
                disk.discard(offset, length_bytes, priority).await
            });
        };
        self.shared.bitmaps.mark(offset, length_bytes);
        let node = self.shared.node.load();
        match &node.filter {
            Some(filter) => filter.discard(&node.driver, offset, length_bytes, priority).finishing(ticket),
            None => node.driver.discard(offset, length_bytes, priority).holding(ticket),
        }
    }

    /// The status of the bytes from `offset`, one extent of at most `length_bytes`.
    pub fn block_status(&self, offset: u64, length_bytes: u64) -> IoFuture<Result<Extent>> {
        match self.check_range(offset, length_bytes) {
            Ok(()) => self.shared.node.load().driver.block_status(offset, length_bytes),
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
