//! The mirror's verification (`verify`): after `complete`, before the switch-over, source and
//! target are compared while the guest keeps writing; what the guest changes meanwhile is
//! copied again and compared again; the last part is compared with the guest held, and a
//! difference there fails the switch-over, naming its offset.
//!
//! Why a difference found with the guest held is real, and why no change escapes the check:
//! - `todo` marks what is still to compare. A run's bits are cleared *before* its two reads,
//!   and every change to the target marks its range *after* it completed: a copy when it is
//!   reaped, an active guest write when its target write returned (write-behind's too), so a
//!   change that landed after the reads marks the range again.
//! - A guest discard makes its range's contents the device's choice on both sides: while
//!   verifying it is marked dirty, so the copier makes the two equal again (then marks it).
//! - A comparison that differs while the guest runs proves nothing (a background write may
//!   have reached the source and not yet been copied): its range stays marked.
//! - With the guest held, every copy and active write finished and nothing dirty, source and
//!   target are what the switch-over would leave: any marked range that differs now is a
//!   real difference.
//!
//! Passes over `todo` go on while the guest runs until what is left is at most
//! `DRAINED_BYTES_MAX` or `PASSES_MAX` passes are done; the guest waits for the rest only.

use super::filter::MirrorShared;
use crate::buf::AlignedBuf;
use crate::job::verify::{compare, RUN_BYTES_MAX};
use crate::priority::IoPriority;
use std::sync::atomic::Ordering;

/// What is left to compare once the guest is held, at most, unless the passes run out.
const DRAINED_BYTES_MAX: u64 = 16 << 20;
/// Passes while the guest runs, at most: a guest that changes more than a pass can compare
/// would otherwise keep the job from ever switching over.
const PASSES_MAX: u32 = 8;

/// What one step of the live verification did.
pub(super) enum Step {
    /// Compared one run (equal or not); more to do in this pass.
    Compared,
    /// The live passes are over: what is left waits for the guest to be held.
    Done,
}

pub(super) struct Verifier {
    bufs: Option<[AlignedBuf; 2]>,
    cursor: u64,
    pass_count: u32,
}

impl Verifier {
    /// Start: mark what the mode checks and let changes mark their ranges from now on.
    pub(super) fn start(shared: &MirrorShared, seed: u64) -> crate::Result<Verifier> {
        let todo = shared.verify_todo.as_ref().expect("a verifier is made only with verify on");
        let bufs = crate::job::verify::buffers(&shared.source.driver(), &shared.target)?;
        crate::job::verify::mark_regions(shared.verify_mode, todo, seed);
        shared.verifying.store(true, Ordering::Release);
        Ok(Verifier { bufs: Some(bufs), cursor: 0, pass_count: 0 })
    }

    /// Compare the next marked run while the guest runs; a difference stays marked.
    pub(super) async fn step(&mut self, shared: &MirrorShared) -> Result<Step, String> {
        let todo = shared.verify_todo.as_ref().expect("started");
        let Some((offset, length_bytes)) = todo.next_dirty_area(self.cursor, RUN_BYTES_MAX) else {
            self.pass_count += 1;
            self.cursor = 0;
            let done = todo.dirty_bytes() <= DRAINED_BYTES_MAX || self.pass_count >= PASSES_MAX;
            return Ok(if done { Step::Done } else { Step::Compared });
        };
        self.cursor = offset + length_bytes;
        if let Some(differs_at) = self.compare_run(shared, (offset, length_bytes)).await? {
            // Not conclusive with the guest running: compared again once it is held.
            let chunk_start = differs_at - differs_at % todo.granularity_bytes();
            todo.set(chunk_start, offset + length_bytes - chunk_start).expect("inside the run");
        }
        Ok(Step::Compared)
    }

    /// With the guest held and the copy converged: compare everything still marked; the first
    /// difference fails the switch-over.
    pub(super) async fn finish(&mut self, shared: &MirrorShared) -> Result<(), String> {
        let todo = shared.verify_todo.as_ref().expect("started");
        let mut at = 0;
        while let Some((offset, length_bytes)) = todo.next_dirty_area(at, RUN_BYTES_MAX) {
            if let Some(differs_at) = self.compare_run(shared, (offset, length_bytes)).await? {
                todo.set(offset, length_bytes).expect("inside the disk");
                return Err(format!(
                    "verify: source and target differ at offset {differs_at} (byte {differs_at} of disk {}): \
                     the switch-over did not happen",
                    shared.source.name()
                ));
            }
            at = offset + length_bytes;
        }
        shared.verifying.store(false, Ordering::Release);
        assert_eq!(todo.dirty_bytes(), 0, "everything compared equal");
        Ok(())
    }

    /// Clear the run's marks, then read and compare both sides (the order the module's
    /// argument needs); count the bytes.
    async fn compare_run(
        &mut self,
        shared: &MirrorShared,
        (offset, length_bytes): (u64, u64),
    ) -> Result<Option<u64>, String> {
        let todo = shared.verify_todo.as_ref().expect("started");
        todo.reset(offset, length_bytes).expect("an area of the bitmap is inside it");
        let bufs = self.bufs.take().expect("one comparison at a time");
        let source = shared.source.driver();
        let (result, bufs) =
            compare(&source, &shared.target, (offset, length_bytes), bufs, IoPriority::BACKGROUND).await;
        self.bufs = Some(bufs);
        shared.core.update_info(|info| info.verified_bytes += length_bytes);
        result
    }
}
