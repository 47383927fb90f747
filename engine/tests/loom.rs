//! loom models (run with `RUSTFLAGS="--cfg loom" cargo test -p tandem --test loom --release`):
//! every interleaving of the bitmap's shard/summary/top-level updates and of the in-flight
//! table's wait/wake, on the real code (its primitives are loom's under `--cfg loom`).

#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::sync::Arc;
use tandem::bitmap::DirtyBitmap;
use tandem::inflight::{InflightKind, InflightTable};

const GRANULARITY: u64 = 512;
/// Two shards of 32768 chunks, sharing one top-level word.
const SIZE: u64 = 2 * 32768 * GRANULARITY;
const SHARD_1: u64 = 32768 * GRANULARITY;

/// A set and a reset race on one chunk while another shard is set: the O(1) count, the bits
/// and the top level agree whatever the order.
#[test]
fn set_and_reset_keep_counts_and_top_level_consistent() {
    loom::model(|| {
        let bitmap = Arc::new(DirtyBitmap::new(GRANULARITY, SIZE).unwrap());
        let setter = {
            let bitmap = bitmap.clone();
            loom::thread::spawn(move || bitmap.set(0, 1).unwrap())
        };
        let other = {
            let bitmap = bitmap.clone();
            loom::thread::spawn(move || {
                bitmap.reset(0, GRANULARITY).unwrap();
                bitmap.set(SHARD_1, 1).unwrap();
            })
        };
        setter.join().unwrap();
        other.join().unwrap();
        let first_set = bitmap.get(0).unwrap();
        assert_eq!(bitmap.dirty_chunk_count(), u64::from(first_set) + 1);
        let expected = if first_set { 0 } else { SHARD_1 };
        assert_eq!(bitmap.next_dirty(0), Some(expected));
        assert_eq!(bitmap.next_dirty(GRANULARITY), Some(SHARD_1));
    });
}

/// The lock-free path: chunk 0 is set on a word that is non-zero (chunk 1 is dirty) while a
/// reset empties that word. Whatever the order, chunk 0 stays dirty, is found by a scan from
/// the start (its summary and top bits were republished), and the count is exact.
#[test]
fn a_lock_free_set_racing_a_reset_that_empties_the_word_is_kept_and_found() {
    loom::model(|| {
        let bitmap = Arc::new(DirtyBitmap::new(GRANULARITY, SIZE).unwrap());
        bitmap.set(GRANULARITY, 1).unwrap();
        let setter = {
            let bitmap = bitmap.clone();
            loom::thread::spawn(move || bitmap.set(0, 1).unwrap())
        };
        bitmap.reset(GRANULARITY, GRANULARITY).unwrap();
        setter.join().unwrap();
        assert!(bitmap.get(0).unwrap());
        assert!(!bitmap.get(GRANULARITY).unwrap());
        assert_eq!(bitmap.dirty_chunk_count(), 1);
        assert_eq!(bitmap.next_dirty(0), Some(0));
        assert_eq!(bitmap.next_dirty(GRANULARITY), None);
    });
}

/// The ordering argument in dirty.rs: a scanner that synchronised with a setter (here through
/// a Release/Acquire flag) finds the bit, even though it skips shards by their top-level bit
/// without taking their locks.
#[test]
fn a_published_set_is_seen_by_a_lock_free_scan() {
    loom::model(|| {
        let bitmap = Arc::new(DirtyBitmap::new(GRANULARITY, SIZE).unwrap());
        let published = Arc::new(AtomicBool::new(false));
        let setter = {
            let (bitmap, published) = (bitmap.clone(), published.clone());
            loom::thread::spawn(move || {
                bitmap.set(SHARD_1, 1).unwrap();
                published.store(true, Ordering::Release);
            })
        };
        if published.load(Ordering::Acquire) {
            assert_eq!(bitmap.next_dirty(0), Some(SHARD_1));
        }
        setter.join().unwrap();
        assert_eq!(bitmap.next_dirty(0), Some(SHARD_1));
    });
}

/// Two overlapping registrations: never under way together, and the one that waits is always
/// woken (loom reports a deadlock if a wake-up could be lost).
#[test]
fn overlapping_registrations_exclude_and_wake() {
    loom::model(|| {
        let table = InflightTable::new(4).unwrap();
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = [0u64, 4096]
            .into_iter()
            .map(|offset| {
                let (table, inside) = (table.clone(), inside.clone());
                loom::thread::spawn(move || {
                    let guard = loom::future::block_on(table.register(offset, 8192, InflightKind::Copy)).unwrap();
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "overlapping operations under way together");
                    inside.fetch_sub(1, Ordering::SeqCst);
                    drop(guard);
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(table.counts(), (0, 0));
    });
}
