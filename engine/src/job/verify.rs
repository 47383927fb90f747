//! Verification (ours: QEMU has only the offline `qemu-img compare`): which regions a job
//! checks (`full`: all, `sample`: a seeded pseudo-random part), and the comparison of one run
//! of the source with the same run of the target. The jobs decide when a comparison is
//! conclusive: the mirror's rule is in `mirror/verify.rs`, the backup's in `backup/run.rs`.
//!
//! Bytes are compared directly rather than through checksums: both sides are read into this
//! process anyway, a comparison costs less than hashing both buffers, and it gives the exact
//! first differing offset that the job's error names.

use super::copy::both;
use super::VerifyMode;
use crate::bitmap::DirtyBitmap;
use crate::block::BlockDriver;
use crate::buf::AlignedBuf;
use crate::priority::IoPriority;
use std::sync::Arc;

/// What one comparison reads from each side at most (and the sample's region size).
pub(crate) const RUN_BYTES_MAX: u64 = 1 << 20;
/// `sample` checks one region in this many.
const SAMPLE_ONE_IN: u64 = 32;

/// What a comparison found: `Ok(None)` equal, `Ok(Some(offset))` the first byte that differs;
/// `Err` says which side's read failed. A verification that cannot read fails its job: the
/// copy is not known good, and saying so is the point.
pub(crate) type CompareResult = Result<Option<u64>, String>;

/// Mark in `todo` what `mode` checks of `[0, todo.size_bytes())`: everything, or one region
/// of `RUN_BYTES_MAX` (at least the bitmap's granularity) in `SAMPLE_ONE_IN`, picked from
/// `seed`, and always at least one.
pub(crate) fn mark_regions(mode: VerifyMode, todo: &DirtyBitmap, seed: u64) {
    let size_bytes = todo.size_bytes();
    match mode {
        VerifyMode::Off => {}
        VerifyMode::Full => todo.set(0, size_bytes).expect("the whole bitmap is in range"),
        VerifyMode::Sample => {
            let region_bytes = RUN_BYTES_MAX.max(todo.granularity_bytes());
            let region_count = size_bytes.div_ceil(region_bytes);
            let mut rng = seed | 1;
            let mut marked_count = 0u64;
            for region in 0..region_count {
                if crate::rng::next(&mut rng).is_multiple_of(SAMPLE_ONE_IN) {
                    mark_region(todo, region, region_bytes);
                    marked_count += 1;
                }
            }
            if marked_count == 0 && region_count > 0 {
                mark_region(todo, crate::rng::next(&mut rng) % region_count, region_bytes);
            }
        }
    }
    assert!(mode == VerifyMode::Off || todo.dirty_chunk_count() > 0 || size_bytes == 0);
}

fn mark_region(todo: &DirtyBitmap, region: u64, region_bytes: u64) {
    let offset = region * region_bytes;
    let length_bytes = region_bytes.min(todo.size_bytes() - offset);
    todo.set(offset, length_bytes).expect("a region is inside the bitmap");
}

/// Two buffers of `RUN_BYTES_MAX`, one for each side, aligned for both devices.
pub(crate) fn buffers(source: &Arc<dyn BlockDriver>, target: &Arc<dyn BlockDriver>) -> crate::Result<[AlignedBuf; 2]> {
    let device_align = source.alignment().memory_bytes.max(target.alignment().memory_bytes) as usize;
    let align = device_align.max(crate::buf::DEFAULT_ALIGN_BYTES);
    Ok([AlignedBuf::zeroed(RUN_BYTES_MAX as usize, align)?, AlignedBuf::zeroed(RUN_BYTES_MAX as usize, align)?])
}

/// Read `[offset, offset + length_bytes)` (at most `RUN_BYTES_MAX`) of both sides at once and
/// compare them. The buffers come back whatever happens.
pub(crate) async fn compare(
    source: &Arc<dyn BlockDriver>,
    target: &Arc<dyn BlockDriver>,
    (offset, length_bytes): (u64, u64),
    [mut ours, mut theirs]: [AlignedBuf; 2],
    priority: IoPriority,
) -> (CompareResult, [AlignedBuf; 2]) {
    assert!(length_bytes > 0 && length_bytes <= RUN_BYTES_MAX, "a run of 1 byte to 1 MiB: {length_bytes}");
    assert!(ours.capacity() as u64 >= length_bytes && theirs.capacity() as u64 >= length_bytes);
    ours.set_len(length_bytes as usize);
    theirs.set_len(length_bytes as usize);
    let ((read_source, ours), (read_target, theirs)) =
        both(source.read(offset, ours, priority), target.read(offset, theirs, priority)).await;
    let result = match (read_source, read_target) {
        (Err(error), _) => Err(format!("verify: cannot read the source at {offset}: {error}")),
        (_, Err(error)) => Err(format!("verify: cannot read the target at {offset}: {error}")),
        (Ok(()), Ok(())) => Ok(first_difference(ours.as_slice(), theirs.as_slice()).map(|index| offset + index as u64)),
    };
    (result, [ours, theirs])
}

/// The index of the first byte where `a` and `b` differ (they have the same length).
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    assert_eq!(a.len(), b.len());
    if a == b {
        return None; // memcmp: the common case, fast
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_difference_is_exact() {
        let a = vec![7u8; 4096];
        let mut b = a.clone();
        assert_eq!(first_difference(&a, &b), None);
        b[4095] ^= 1;
        b[1000] ^= 0xff;
        assert_eq!(first_difference(&a, &b), Some(1000));
    }

    #[test]
    fn full_marks_everything_and_sample_a_thirtysecond_or_at_least_one_region() {
        let todo = DirtyBitmap::new(64 << 10, 1 << 30).unwrap();
        mark_regions(VerifyMode::Full, &todo, 1);
        assert_eq!(todo.dirty_bytes(), 1 << 30);

        let todo = DirtyBitmap::new(64 << 10, 1 << 30).unwrap();
        mark_regions(VerifyMode::Sample, &todo, 42);
        let marked_bytes = todo.dirty_bytes();
        assert!(marked_bytes > 0 && marked_bytes < (1 << 30) / 8, "about 1/32 of 1 GiB: {marked_bytes}");
        assert_eq!(marked_bytes % RUN_BYTES_MAX, 0, "whole regions");

        let small = DirtyBitmap::new(4096, 3 << 20).unwrap();
        mark_regions(VerifyMode::Sample, &small, 7);
        assert!(small.dirty_bytes() >= RUN_BYTES_MAX, "at least one region");

        let off = DirtyBitmap::new(4096, 3 << 20).unwrap();
        mark_regions(VerifyMode::Off, &off, 7);
        assert_eq!(off.dirty_bytes(), 0);
    }
}
