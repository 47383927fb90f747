//! The point-in-time read view of a running backup (fleecing): a read-only [`BlockDriver`]
//! that reads each cluster from the target where copy-before-write (or the copier) already
//! saved its old data, and from the source where it did not. With sync=none this is QEMU's
//! image fleecing: another reader (an NBD export, a second backup) gets the disk as it was at
//! the point in time while the guest keeps writing.
//!
//! A read registers its clusters in the job's in-flight table, so no save of them starts
//! while it reads: a cluster still marked keeps its old data on the source until the read is
//! done, and a cleared one is on the target for good. Once the job ends the view refuses to
//! read (ESTALE): the job waits for the reads in progress before it takes the filter off. So
//! does a broken snapshot (break-snapshot), whose source is no longer protected. Under
//! sync=bitmap there is no view: a clear bit there also means "never marked".

use crate::block::{Alignment, BlockDriver, BlockStatus, BufResult, Capabilities, Extent, IoFuture, WriteFlags};
use crate::buf::AlignedBuf;
use crate::error::{Error, Result};
use crate::inflight::InflightKind;
use crate::job::copy_before_write::CbwShared;
use crate::priority::IoPriority;
use std::sync::Arc;

/// See the module doc.
pub struct SnapshotView {
    name: String,
    shared: Arc<CbwShared>,
    source: Arc<dyn BlockDriver>,
}

impl SnapshotView {
    pub(crate) fn new(shared: Arc<CbwShared>, source: Arc<dyn BlockDriver>) -> SnapshotView {
        SnapshotView { name: format!("snapshot-view:{}", source.name()), shared, source }
    }

    fn refused(&self, op: &'static str) -> Error {
        Error::ReadOnly { op, name: self.name.clone() }
    }
}

/// Read `[offset, offset + buf.len())` as it was at the point in time; the caller holds the
/// clusters' registration.
async fn read_registered(
    shared: &CbwShared,
    source: &Arc<dyn BlockDriver>,
    offset: u64,
    buf: AlignedBuf,
    priority: IoPriority,
) -> BufResult<()> {
    // Everything from the source first, then the saved runs from the target over it.
    let (result, mut buf) = source.read(offset, buf, priority).await;
    if result.is_err() {
        return (result, buf);
    }
    let cluster = shared.to_copy.granularity_bytes();
    let end = offset + buf.len() as u64;
    let mut at = offset;
    while at < end {
        let saved = !shared.to_copy.get(at).expect("inside the disk");
        let run_end = match saved {
            true => shared.to_copy.next_dirty(at).unwrap_or(end),
            false => shared.to_copy.next_clean(at).unwrap_or(end),
        }
        .clamp(at + 1, end);
        if saved {
            let length = (run_end - at) as usize;
            let piece = match AlignedBuf::zeroed(length, buf.align()) {
                Ok(piece) => piece,
                Err(error) => return (Err(error), buf),
            };
            let (result, piece) = shared.target.read(at, piece, priority).await;
            if result.is_err() {
                return (result, buf);
            }
            let within = (at - offset) as usize;
            buf.as_mut_slice()[within..within + length].copy_from_slice(piece.as_slice());
        }
        debug_assert!(run_end > at && (run_end == end || run_end % cluster == 0));
        at = run_end;
    }
    (Ok(()), buf)
}

impl BlockDriver for SnapshotView {
    fn name(&self) -> &str {
        &self.name
    }

    fn size_bytes(&self) -> u64 {
        self.source.size_bytes()
    }

    fn alignment(&self) -> Alignment {
        let (source, target) = (self.source.alignment(), self.shared.target.alignment());
        Alignment {
            request_bytes: source.request_bytes.max(target.request_bytes),
            memory_bytes: source.memory_bytes.max(target.memory_bytes),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { read_only: true, fua: false, write_zeroes: false, discard: false, block_status: false }
    }

    fn read(&self, offset: u64, buf: AlignedBuf, priority: IoPriority) -> IoFuture<BufResult<()>> {
        let (shared, source) = (self.shared.clone(), self.source.clone());
        IoFuture::boxed(async move {
            let stale = || Error::Io { op: "read", offset, errno: libc::ESTALE };
            let Some(_reading) = shared.view_read() else {
                return (Err(stale()), buf);
            };
            let size_bytes = shared.to_copy.size_bytes();
            if buf.is_empty() {
                return (Err(Error::EmptyRequest { offset }), buf);
            }
            match offset.checked_add(buf.len() as u64) {
                Some(end) if end <= size_bytes => {}
                _ => return (Err(Error::OutOfBounds { offset, length_bytes: buf.len() as u64, size_bytes }), buf),
            }
            let cluster = shared.to_copy.granularity_bytes();
            let start = offset / cluster * cluster;
            let end =
                (offset + buf.len() as u64).div_ceil(cluster).saturating_mul(cluster).min(shared.to_copy.size_bytes());
            let Ok(guard) = shared.inflight.register(start, end - start, InflightKind::Copy).await else {
                return (Err(Error::Io { op: "read", offset, errno: libc::EBUSY }), buf);
            };
            let (result, buf) = read_registered(&shared, &source, offset, buf, priority).await;
            drop(guard);
            // A broken snapshot stops protecting the source: guest writes go through without
            // saving or registering, so this read may hold data from after the point in time.
            match shared.is_broken() {
                true => (Err(stale()), buf),
                false => (result, buf),
            }
        })
    }

    fn write(
        &self,
        _offset: u64,
        buf: AlignedBuf,
        _flags: WriteFlags,
        _priority: IoPriority,
    ) -> IoFuture<BufResult<()>> {
        IoFuture::ready((Err(self.refused("write")), buf))
    }

    fn flush(&self, _priority: IoPriority) -> IoFuture<Result<()>> {
        IoFuture::ready(Ok(()))
    }

    fn write_zeroes(
        &self,
        _offset: u64,
        _length: u64,
        _may_unmap: bool,
        _priority: IoPriority,
    ) -> IoFuture<Result<()>> {
        IoFuture::ready(Err(self.refused("write_zeroes")))
    }

    fn discard(&self, _offset: u64, _length_bytes: u64, _priority: IoPriority) -> IoFuture<Result<()>> {
        IoFuture::ready(Err(self.refused("discard")))
    }

    fn block_status(&self, offset: u64, length_bytes: u64) -> IoFuture<Result<Extent>> {
        IoFuture::ready(Ok(Extent { status: BlockStatus::Data, offset, length_bytes }))
    }
}
