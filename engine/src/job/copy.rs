//! Copying one range from the source's driver to the target, and filling the dirty bitmap
//! for the sync mode. Zeros never travel as data: a range the source reports as a hole or as
//! zeros, or a buffer that reads as all zeros, becomes write_zeroes on the target.

use super::SyncMode;
use crate::bitmap::DirtyBitmap;
use crate::block::{BlockDriver, BlockStatus, WriteFlags};
use crate::buf::AlignedBuf;
use crate::error::{Error, Result};
use crate::job::IoOperation;
use crate::priority::IoPriority;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;

/// How a copy treats zeros, and at what priority it runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CopyOptions {
    pub(crate) unmap: bool,
    pub(crate) detect_zeroes: bool,
    /// Zeros travel as data after all: an incremental backup's sparse target tells what it
    /// holds by its allocated extents, and write_zeroes may leave a range unallocated (or an
    /// unwritten extent, which reads as a hole), so a cluster that became zeros would vanish
    /// from it.
    pub(crate) zeroes_as_data: bool,
    pub(crate) priority: IoPriority,
}

/// What a finished copy reports: the bytes it wrote as data and as zeros, or which side
/// failed.
pub(crate) type CopyResult = std::result::Result<(), (IoOperation, Error)>;

/// Copy `[offset, offset + length_bytes)` extent by extent, data in requests of at most
/// `piece_bytes`. `bufs` holds one buffer of at least `length_bytes`, or two of at least
/// `piece_bytes` for a pipelined copy; they all come back.
pub(crate) async fn copy_range(
    source: Arc<dyn BlockDriver>,
    target: Arc<dyn BlockDriver>,
    (offset, length_bytes, piece_bytes): (u64, u64, u64),
    bufs: Vec<AlignedBuf>,
    options: CopyOptions,
) -> (CopyResult, Vec<AlignedBuf>) {
    assert!(piece_bytes > 0 && !bufs.is_empty() && bufs.len() <= 2);
    assert!(bufs.iter().all(|buf| buf.capacity() as u64 >= piece_bytes.min(length_bytes)));
    let mut bufs = bufs;
    let end = offset + length_bytes;
    let mut at = offset;
    while at < end {
        let extent = match source.block_status(at, end - at).await {
            Ok(extent) if extent.length_bytes > 0 => extent,
            Ok(_) => return (Err((IoOperation::Read, Error::EmptyRequest { offset: at })), bufs),
            Err(error) => return (Err((IoOperation::Read, error)), bufs),
        };
        let length = extent.length_bytes.min(end - at);
        let result = match extent.status {
            BlockStatus::Hole | BlockStatus::Zero => {
                let buf = bufs.pop().expect("a copy owns a buffer");
                let (result, buf) = write_zeroes(&target, (at, length), buf, options).await;
                bufs.push(buf);
                result
            }
            BlockStatus::Data => {
                let (result, back) = copy_data(&source, &target, (at, length, piece_bytes), bufs, options).await;
                bufs = back;
                result
            }
        };
        if result.is_err() {
            return (result, bufs);
        }
        at += length;
    }
    (Ok(()), bufs)
}

/// Data in pieces. With two buffers the write of one piece and the read of the next run at
/// once, so the device always has one copy read and one copy write of a piece: a guest
/// request waits behind at most a piece, while the copy keeps both directions busy (a read
/// then a write per copy leaves each direction idle half the time).
async fn copy_data(
    source: &Arc<dyn BlockDriver>,
    target: &Arc<dyn BlockDriver>,
    (offset, length_bytes, piece_bytes): (u64, u64, u64),
    mut bufs: Vec<AlignedBuf>,
    options: CopyOptions,
) -> (CopyResult, Vec<AlignedBuf>) {
    let end = offset + length_bytes;
    let piece_at = |at: u64| (at, piece_bytes.min(end - at));
    let first = bufs.pop().expect("a copy owns a buffer");
    let (mut result, mut filled) = read_piece(source, piece_at(offset), first, options).await;
    let mut at = offset;
    loop {
        if result.is_err() {
            bufs.push(filled);
            return (result, bufs);
        }
        let written_at = at;
        at += filled.len() as u64;
        if at >= end {
            let (result, buf) = write_piece(target, written_at, filled, options).await;
            bufs.push(buf);
            return (result, bufs);
        }
        let (write_result, read_result, next) = match bufs.pop() {
            Some(spare) => {
                let write = write_piece(target, written_at, filled, options);
                let read = read_piece(source, piece_at(at), spare, options);
                let ((write_result, written), (read_result, next)) = both(write, read).await;
                bufs.push(written);
                (write_result, read_result, next)
            }
            None => {
                let (write_result, written) = write_piece(target, written_at, filled, options).await;
                if write_result.is_err() {
                    bufs.push(written);
                    return (write_result, bufs);
                }
                let (read_result, next) = read_piece(source, piece_at(at), written, options).await;
                (write_result, read_result, next)
            }
        };
        if write_result.is_err() {
            bufs.push(next);
            return (write_result, bufs);
        }
        (result, filled) = (read_result, next);
    }
}

async fn read_piece(
    source: &Arc<dyn BlockDriver>,
    (offset, length_bytes): (u64, u64),
    mut buf: AlignedBuf,
    options: CopyOptions,
) -> (CopyResult, AlignedBuf) {
    buf.set_len(length_bytes as usize);
    let (result, buf) = source.read(offset, buf, options.priority).await;
    (result.map_err(|error| (IoOperation::Read, error)), buf)
}

/// A piece that was read: as zeros if it is all zeros and detection is on, else as data.
async fn write_piece(
    target: &Arc<dyn BlockDriver>,
    offset: u64,
    buf: AlignedBuf,
    options: CopyOptions,
) -> (CopyResult, AlignedBuf) {
    if options.detect_zeroes && buf.is_all_zero() {
        return write_zeroes(target, (offset, buf.len() as u64), buf, options).await;
    }
    let (result, buf) = target.write(offset, buf, WriteFlags::default(), options.priority).await;
    (result.map_err(|error| (IoOperation::Write, error)), buf)
}

/// Zeros on the target: write_zeroes where it can, else a zeroed buffer written as often as
/// the range needs (a pipelined copy's buffers hold only a piece).
async fn write_zeroes(
    target: &Arc<dyn BlockDriver>,
    (offset, length_bytes): (u64, u64),
    mut buf: AlignedBuf,
    options: CopyOptions,
) -> (CopyResult, AlignedBuf) {
    if target.capabilities().write_zeroes && !options.zeroes_as_data {
        let result = target.write_zeroes(offset, length_bytes, options.unmap, options.priority).await;
        return (result.map_err(|error| (IoOperation::Write, error)), buf);
    }
    let end = offset + length_bytes;
    let mut at = offset;
    while at < end {
        buf.set_len((end - at).min(buf.capacity() as u64) as usize);
        buf.as_mut_slice().fill(0);
        let (result, back) = target.write(at, buf, WriteFlags::default(), options.priority).await;
        buf = back;
        if let Err(error) = result {
            return (Err((IoOperation::Write, error)), buf);
        }
        at += buf.len() as u64;
    }
    (Ok(()), buf)
}

/// Mark what `sync` copies before READY. Where the target reads as zeros before the job
/// (`target_zero`), full and top skip whatever the source reads as zeros too, holes and
/// allocated zeros alike: the target already holds them, so the job moves only data and its
/// total (QMP's `len`) is about the data. Where it may not, every range is copied, holes as
/// write_zeroes: top too, which QEMU leaves to the caller's promise of a zeroed target.
pub(crate) async fn fill_bitmap(
    sync: SyncMode,
    source: &Arc<dyn BlockDriver>,
    dirty: &DirtyBitmap,
    named: Option<&DirtyBitmap>,
    target_zero: bool,
) -> Result<()> {
    let size_bytes = dirty.size_bytes();
    match sync {
        SyncMode::None => Ok(()),
        SyncMode::Full | SyncMode::Top if !target_zero => {
            dirty.set(0, size_bytes).expect("whole disk is in range");
            Ok(())
        }
        SyncMode::Bitmap => {
            let named = named.expect("sync=bitmap was checked to have a bitmap");
            for (offset, length) in named.areas() {
                dirty.set(offset, length).expect("same disk size");
            }
            Ok(())
        }
        SyncMode::Full | SyncMode::Top => {
            let mut at = 0;
            while at < size_bytes {
                let extent = match source.block_status(at, size_bytes - at).await {
                    Ok(extent) => extent,
                    // Full needs the map only to skip work: without it, copy the rest.
                    Err(_) if sync == SyncMode::Full => {
                        dirty.set(at, size_bytes - at).expect("inside the disk");
                        return Ok(());
                    }
                    Err(error) => return Err(error),
                };
                let length = extent.length_bytes.clamp(1, size_bytes - at);
                if extent.status == BlockStatus::Data {
                    dirty.set(at, length).expect("inside the disk");
                }
                at += length;
            }
            Ok(())
        }
    }
}

/// Block-status queries [`reads_as_zeros`] makes at most before it answers "not known".
const ZERO_PROBE_QUERIES_MAX: u32 = 4096;

/// Whether `[0, size_bytes)` of `driver` reads as zeros by its block status alone (holes and
/// allocated zeros): a fresh sparse file, a new rbd image, an NBD export that reports holes.
/// Reads nothing. "No" when a query fails or the map is too fragmented to walk cheaply: the
/// answer only lets a job skip work, so doubt means doing it.
pub(crate) async fn reads_as_zeros(driver: &Arc<dyn BlockDriver>, size_bytes: u64) -> bool {
    let mut at = 0;
    for _ in 0..ZERO_PROBE_QUERIES_MAX {
        if at >= size_bytes {
            return true;
        }
        match driver.block_status(at, size_bytes - at).await {
            Ok(extent) if extent.status != BlockStatus::Data && extent.length_bytes > 0 => at += extent.length_bytes,
            _ => return false,
        }
    }
    at >= size_bytes
}

/// Run two futures concurrently in one task; both outputs once both are done.
pub(crate) async fn both<A: Future, B: Future>(a: A, b: B) -> (A::Output, B::Output) {
    let (mut a, mut b) = (std::pin::pin!(a), std::pin::pin!(b));
    let (mut a_out, mut b_out) = (None, None);
    std::future::poll_fn(move |cx| {
        if a_out.is_none() {
            if let Poll::Ready(out) = a.as_mut().poll(cx) {
                a_out = Some(out);
            }
        }
        if b_out.is_none() {
            if let Poll::Ready(out) = b.as_mut().poll(cx) {
                b_out = Some(out);
            }
        }
        match a_out.is_some() && b_out.is_some() {
            true => Poll::Ready((a_out.take().expect("checked"), b_out.take().expect("checked"))),
            false => Poll::Pending,
        }
    })
    .await
}
