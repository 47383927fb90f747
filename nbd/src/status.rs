//! NBD_CMD_BLOCK_STATUS answers: the extents of one meta context over a range, as
//! descriptors. `base:allocation` asks the disk's block_status one extent at a time;
//! `qemu:dirty-bitmap:NAME` walks the bitmap's runs of dirty and clean chunks.

use crate::export::MetaContext;
use tandem::block::{BlockStatus, Disk};
use tandem_drivers::nbd::proto::{self, Descriptor};

/// Descriptors one reply chunk carries at most. The spec allows 2^20; clients ask again from
/// where a reply stopped, and a short reply bounds the work one request can cause.
pub const DESCRIPTOR_COUNT_MAX: usize = 1024;

/// The descriptors of `context` over `[offset, offset + length_bytes)`, merged where
/// neighbours share flags. `req_one` asks for exactly one. The range is within the disk and
/// nonempty (checked by the caller).
pub async fn descriptors(
    disk: &Disk,
    context: &MetaContext,
    offset: u64,
    length_bytes: u64,
    req_one: bool,
) -> tandem::Result<Vec<Descriptor>> {
    assert!(length_bytes > 0 && offset + length_bytes <= disk.size_bytes());
    let count_max = if req_one { 1 } else { DESCRIPTOR_COUNT_MAX };
    let mut out: Vec<Descriptor> = Vec::new();
    let end = offset + length_bytes;
    let mut at = offset;
    while at < end {
        let (run_bytes, flags) = match context {
            MetaContext::BaseAllocation => {
                let extent = disk.block_status(at, end - at).await?;
                (extent.length_bytes, allocation_flags(extent.status))
            }
            MetaContext::DirtyBitmap(name) => match disk.bitmaps().get(name) {
                Ok(bitmap) => dirty_run(&bitmap, at, end),
                // Removed while exported: say nothing is dirty rather than fail every query.
                Err(_) => (end - at, 0),
            },
        };
        assert!(run_bytes > 0 && run_bytes <= end - at, "a run moves forward within the range");
        let full = out.len() == count_max;
        match out.last_mut() {
            Some(last) if last.flags == flags => last.length += run_bytes,
            _ if full => break,
            _ => out.push(Descriptor { length: run_bytes, flags }),
        }
        at += run_bytes;
    }
    Ok(out)
}

fn allocation_flags(status: BlockStatus) -> u32 {
    match status {
        BlockStatus::Data => 0,
        BlockStatus::Zero => proto::STATE_ZERO,
        BlockStatus::Hole => proto::STATE_HOLE | proto::STATE_ZERO,
    }
}

/// The run of equal dirtiness starting at `at`, cut at `end`, with its flag.
fn dirty_run(bitmap: &tandem::bitmap::DirtyBitmap, at: u64, end: u64) -> (u64, u32) {
    let dirty = bitmap.get(at).unwrap_or(false);
    let next = if dirty { bitmap.next_clean(at) } else { bitmap.next_dirty(at) };
    let run_end = next.unwrap_or(end).clamp(at + 1, end);
    (run_end - at, if dirty { proto::STATE_DIRTY } else { 0 })
}
