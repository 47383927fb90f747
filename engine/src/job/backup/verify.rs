//! The backup's verification (`verify`): once every cluster is on the target, compare the
//! target with the point in time wherever the source still holds it.
//!
//! Why a difference found here is real:
//! - The copy-before-write filter marks `written_since` for every cluster a guest request
//!   touches, *before* the request reaches the source. A comparison whose source read saw a
//!   guest's data therefore finds the mark when it looks after the read.
//! - A cluster without the mark holds on the source what it held at the point in time, and
//!   the job copied it (every cluster, or under sync=bitmap every cluster its marks reach):
//!   the target must hold the same bytes.
//! - So a difference is ignored only where `written_since` marks it after the read; anywhere
//!   else it fails the job, naming the offset.
//!
//! Clusters the guest changed were saved by copy-before-write and have no second copy to
//! compare with: they are skipped and counted (`JobInfo::unverified_bytes`).

use crate::bitmap::DirtyBitmap;
use crate::block::BlockDriver;
use crate::buf::AlignedBuf;
use crate::job::copy_before_write::CbwShared;
use crate::job::verify::{buffers, compare, mark_regions, RUN_BYTES_MAX};
use crate::job::VerifyMode;
use crate::priority::IoPriority;
use std::sync::Arc;

pub(super) struct Checker<'a> {
    shared: &'a CbwShared,
    below: &'a Arc<dyn BlockDriver>,
    /// sync=bitmap (not a fallback): the marks the job copied; `None`: it copied everything.
    marks: Option<&'a DirtyBitmap>,
    cluster_bytes: u64,
}

/// A verification under way: what is left, where it stands, its buffers.
pub(super) struct Run {
    todo: DirtyBitmap,
    at: u64,
    bufs: Option<[AlignedBuf; 2]>,
}

impl<'a> Checker<'a> {
    pub(super) fn new(
        shared: &'a CbwShared,
        below: &'a Arc<dyn BlockDriver>,
        marks: Option<&'a DirtyBitmap>,
        cluster_bytes: u64,
    ) -> Checker<'a> {
        assert!(cluster_bytes.is_power_of_two(), "a checked cluster size: {cluster_bytes}");
        Checker { shared, below, marks, cluster_bytes }
    }

    /// What `mode` compares, in chunks of at most one comparison (a cluster may be larger).
    pub(super) fn start(&self, mode: VerifyMode) -> Result<Run, String> {
        let granularity_bytes = self.cluster_bytes.min(RUN_BYTES_MAX);
        let todo = DirtyBitmap::new(granularity_bytes, self.below.size_bytes()).map_err(|e| e.to_string())?;
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        mark_regions(mode, &todo, seed);
        let bufs = buffers(self.below, &self.shared.target).map_err(|e| format!("verify: {e}"))?;
        Ok(Run { todo, at: 0, bufs: Some(bufs) })
    }

    /// Compare the next comparable run; `Ok(false)` once nothing is left.
    pub(super) async fn step(&self, run: &mut Run) -> Result<bool, String> {
        let Some((offset, length_bytes)) = self.next_comparable(run) else { return Ok(false) };
        assert!(length_bytes > 0 && length_bytes <= RUN_BYTES_MAX);
        let bufs = run.bufs.take().expect("one comparison at a time");
        let range = (offset, length_bytes);
        let (result, bufs) = compare(self.below, &self.shared.target, range, bufs, IoPriority::BACKGROUND).await;
        run.bufs = Some(bufs);
        self.shared.core.update_info(|info| info.verified_bytes += length_bytes);
        run.at = offset + length_bytes;
        match result? {
            None => Ok(true),
            Some(differs_at) if self.written(differs_at) => {
                // The guest wrote it while it was compared: from the next cluster on.
                run.at = (differs_at / self.cluster_bytes + 1) * self.cluster_bytes;
                Ok(true)
            }
            Some(differs_at) => {
                Err(format!("verify: the target differs from the point in time at offset {differs_at}"))
            }
        }
    }

    /// The next run at or after `run.at` that `todo` marks and whose clusters the job copied
    /// and the guest left alone, at most one comparison long. What it passes over is counted.
    fn next_comparable(&self, run: &mut Run) -> Option<(u64, u64)> {
        let step_bytes = run.todo.granularity_bytes();
        loop {
            let (offset, length_bytes) = run.todo.next_dirty_area(run.at, RUN_BYTES_MAX)?;
            let end = offset + length_bytes;
            let (mut start, mut unverified_bytes) = (offset, 0);
            while start < end && !self.comparable(start) {
                if self.written(start) {
                    unverified_bytes += step_bytes.min(end - start);
                }
                start += step_bytes;
            }
            let mut stop = start;
            while stop < end && self.comparable(stop) {
                stop += step_bytes;
            }
            let (start, stop) = (start.min(end), stop.min(end));
            if unverified_bytes > 0 {
                self.shared.core.update_info(|info| info.unverified_bytes += unverified_bytes);
            }
            if start < end {
                return Some((start, stop - start));
            }
            run.at = end;
        }
    }

    /// Whether the cluster holding `offset` was copied by the job and left alone by the guest.
    fn comparable(&self, offset: u64) -> bool {
        !self.written(offset) && self.copied(offset)
    }

    fn written(&self, offset: u64) -> bool {
        let written = self.shared.written_since.get().expect("verify on: the job tracks writes");
        written.get(offset).unwrap_or(true)
    }

    /// sync=bitmap copied every cluster that any of its marks reaches (`to_copy` was set from
    /// the marks rounded out to clusters); the other modes copied every cluster.
    fn copied(&self, offset: u64) -> bool {
        let Some(marks) = self.marks else { return true };
        let cluster_start = offset / self.cluster_bytes * self.cluster_bytes;
        let cluster_end = cluster_start + self.cluster_bytes;
        marks.next_dirty(cluster_start).is_some_and(|marked| marked < cluster_end)
    }
}
