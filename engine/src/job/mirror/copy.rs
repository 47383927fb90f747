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
use std::sync::Arc;

/// How a copy treats zeros, and at what priority it runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CopyOptions {
    pub(crate) unmap: bool,
    pub(crate) detect_zeroes: bool,
    pub(crate) priority: IoPriority,
}

/// What a finished copy reports: the bytes it wrote as data and as zeros, or which side
/// failed.
pub(crate) type CopyResult = std::result::Result<(), (IoOperation, Error)>;

/// Copy `[offset, offset + length_bytes)` extent by extent; `buf` holds at least
/// `length_bytes` and comes back.
pub(crate) async fn copy_range(
    source: Arc<dyn BlockDriver>,
    target: Arc<dyn BlockDriver>,
    offset: u64,
    length_bytes: u64,
    buf: AlignedBuf,
    options: CopyOptions,
) -> (CopyResult, AlignedBuf) {
    let mut buf = buf;
    let end = offset + length_bytes;
    let mut at = offset;
    while at < end {
        let extent = match source.block_status(at, end - at).await {
            Ok(extent) if extent.length_bytes > 0 => extent,
            Ok(_) => return (Err((IoOperation::Read, Error::EmptyRequest { offset: at })), buf),
            Err(error) => return (Err((IoOperation::Read, error)), buf),
        };
        let length = extent.length_bytes.min(end - at);
        let (result, back) = match extent.status {
            BlockStatus::Hole | BlockStatus::Zero => write_zeroes(&target, at, length, buf, options).await,
            BlockStatus::Data => copy_data(&source, &target, at, length, buf, options).await,
        };
        buf = back;
        if result.is_err() {
            return (result, buf);
        }
        at += length;
    }
    (Ok(()), buf)
}

async fn copy_data(
    source: &Arc<dyn BlockDriver>,
    target: &Arc<dyn BlockDriver>,
    offset: u64,
    length_bytes: u64,
    mut buf: AlignedBuf,
    options: CopyOptions,
) -> (CopyResult, AlignedBuf) {
    buf.set_len(length_bytes as usize);
    let (result, buf) = source.read(offset, buf, options.priority).await;
    if let Err(error) = result {
        return (Err((IoOperation::Read, error)), buf);
    }
    if options.detect_zeroes && buf.is_all_zero() {
        return write_zeroes(target, offset, length_bytes, buf, options).await;
    }
    let (result, buf) = target.write(offset, buf, WriteFlags::default(), options.priority).await;
    (result.map_err(|error| (IoOperation::Write, error)), buf)
}

/// Zeros on the target: write_zeroes where it can, else a zeroed buffer.
async fn write_zeroes(
    target: &Arc<dyn BlockDriver>,
    offset: u64,
    length_bytes: u64,
    mut buf: AlignedBuf,
    options: CopyOptions,
) -> (CopyResult, AlignedBuf) {
    if target.capabilities().write_zeroes {
        let result = target.write_zeroes(offset, length_bytes, options.unmap, options.priority).await;
        return (result.map_err(|error| (IoOperation::Write, error)), buf);
    }
    buf.set_len(length_bytes as usize);
    buf.as_mut_slice().fill(0);
    let (result, buf) = target.write(offset, buf, WriteFlags::default(), options.priority).await;
    (result.map_err(|error| (IoOperation::Write, error)), buf)
}

/// Mark what `sync` copies before READY.
pub(crate) async fn fill_bitmap(
    sync: SyncMode,
    source: &Arc<dyn BlockDriver>,
    dirty: &DirtyBitmap,
    named: Option<&DirtyBitmap>,
) -> Result<()> {
    let size_bytes = dirty.size_bytes();
    match sync {
        SyncMode::None => Ok(()),
        SyncMode::Full => {
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
        SyncMode::Top => {
            let mut at = 0;
            while at < size_bytes {
                let extent = source.block_status(at, size_bytes - at).await?;
                let length = extent.length_bytes.clamp(1, size_bytes - at);
                if extent.status != BlockStatus::Hole {
                    dirty.set(at, length).expect("inside the disk");
                }
                at += length;
            }
            Ok(())
        }
    }
}
