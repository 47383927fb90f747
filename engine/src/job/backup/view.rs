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
//!
//! Discard (QEMU's discard through its snapshot-access node, and what a second backup's
//! `discard_source` calls): the reader says it is done with whole clusters, and they leave
//! the point in time. Only over a sync=none job, whose target is a scratch holding nothing
//! but saves. Why no reader ever sees a wrong byte, and the scratch gives the space back:
//! - The discard registers the whole clusters of its range in the in-flight table, as saves
//!   and reads do, so none of them is saving or reading those clusters meanwhile.
//! - Under the registration it marks them `released`, then clears their `to_copy` bits. A
//!   read registers before it looks at `released`, so it either ran wholly before (and read
//!   the point in time) or sees the mark and fails (EACCES, naming the offset): it never
//!   reads the guest's newer data from the source, nor a discarded scratch.
//! - With the bits clear, guest writes there pass without saving (the filter's argument:
//!   clear means "nothing to save"), and a save that waited for the registration looks
//!   again and finds nothing to do. The scratch stops growing there.
//! - The clusters whose old data was saved are discarded on the scratch once the
//!   registration ends: marked released, nobody reads them from it again, and no save writes
//!   them there again (bits are only ever cleared). Clusters never saved are left alone:
//!   the scratch holds nothing of the job's there, and we discard only what we wrote.
//! - A discard counts as a view operation, so the job waits for it before taking the filter
//!   off, and refuses it (ESTALE) once ending. Partial clusters at the range's edges stay.

use crate::block::{
    Alignment, BlockDriver, BlockStatus, BufResult, Capabilities, Extent, IoFuture, WriteFlags, MAX_REQUEST_BYTES,
};
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
    /// The job's target is a scratch (sync=none): discards may release clusters.
    scratch: bool,
}

impl SnapshotView {
    pub(crate) fn new(shared: Arc<CbwShared>, source: Arc<dyn BlockDriver>, scratch: bool) -> SnapshotView {
        SnapshotView { name: format!("snapshot-view:{}", source.name()), shared, source, scratch }
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

/// Release the whole clusters of a checked range from the point in time and give the
/// scratch's space for them back (the module's argument on discard).
async fn release(shared: &CbwShared, offset: u64, length_bytes: u64, priority: IoPriority) -> Result<()> {
    let (cluster, size_bytes) = (shared.to_copy.granularity_bytes(), shared.to_copy.size_bytes());
    let start = offset.div_ceil(cluster) * cluster;
    // The disk's last cluster may be short: a range reaching the end covers it whole.
    let end = match offset + length_bytes {
        end if end == size_bytes => end,
        end => end / cluster * cluster,
    };
    if start >= end {
        return Ok(());
    }
    let Ok(guard) = shared.inflight.register(start, end - start, InflightKind::Copy).await else {
        return Err(Error::Io { op: "discard", offset, errno: libc::EBUSY });
    };
    let saved = saved_runs(shared, start, end);
    shared.released.set(start, end - start).expect("a checked range is inside the bitmap");
    shared.to_copy.reset(start, end - start).expect("a checked range is inside the bitmap");
    drop(guard);
    if !shared.target.capabilities().discard {
        return Ok(());
    }
    for (at, run_bytes) in saved {
        shared.target.discard(at, run_bytes, priority).await?;
    }
    Ok(())
}

/// The runs of `[start, end)` whose old data is on the target: saved (clear) and not yet
/// released; the caller holds their registration. Each run fits one request.
fn saved_runs(shared: &CbwShared, start: u64, end: u64) -> Vec<(u64, u64)> {
    let cluster = shared.to_copy.granularity_bytes();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for at in (start..end).step_by(cluster as usize) {
        let marked = shared.to_copy.get(at).expect("inside the disk");
        if marked || shared.released.get(at).expect("inside the disk") {
            continue;
        }
        let cluster_bytes = cluster.min(end - at);
        match runs.last_mut() {
            Some((run_at, run_bytes)) if *run_at + *run_bytes == at && *run_bytes < MAX_REQUEST_BYTES => {
                *run_bytes += cluster_bytes
            }
            _ => runs.push((at, cluster_bytes)),
        }
    }
    runs
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

    /// No discard here although the view has one: a disk over the view is read-only and must
    /// not advertise it (a mirror or backup target would then be required to discard too).
    /// The discard is a job's, found through `scratch_discard_bytes`.
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
            // Looked at under the registration: see the module's argument on discard.
            if let Some(at) = shared.released.next_dirty(start).filter(|&at| at < end) {
                return (Err(Error::Io { op: "read", offset: at.max(offset), errno: libc::EACCES }), buf);
            }
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

    fn discard(&self, offset: u64, length_bytes: u64, priority: IoPriority) -> IoFuture<Result<()>> {
        if !self.scratch {
            return IoFuture::ready(Err(self.refused("discard")));
        }
        let shared = self.shared.clone();
        IoFuture::boxed(async move {
            let Some(_discarding) = shared.view_read() else {
                return Err(Error::Io { op: "discard", offset, errno: libc::ESTALE });
            };
            let size_bytes = shared.to_copy.size_bytes();
            if length_bytes == 0 {
                return Err(Error::EmptyRequest { offset });
            }
            match offset.checked_add(length_bytes) {
                Some(end) if end <= size_bytes => release(&shared, offset, length_bytes, priority).await,
                _ => Err(Error::OutOfBounds { offset, length_bytes, size_bytes }),
            }
        })
    }

    fn scratch_discard_bytes(&self) -> Option<u64> {
        self.scratch.then(|| self.shared.to_copy.granularity_bytes())
    }

    fn block_status(&self, offset: u64, length_bytes: u64) -> IoFuture<Result<Extent>> {
        IoFuture::ready(Ok(Extent { status: BlockStatus::Data, offset, length_bytes }))
    }
}
