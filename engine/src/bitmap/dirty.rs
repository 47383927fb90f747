//! [`DirtyBitmap`]: one bit per chunk of `granularity` bytes.
//!
//! Layout: chunks are grouped in shards of 32768 (512 words, 4 KiB, allocated on first set and
//! kept until the bitmap drops, so a mostly clean 64 TiB disk costs little). Each shard has a
//! `parking_lot` mutex over a summary word mask (which words are non-zero). A top level keeps
//! one bit per shard (non-empty) in atomics, so a scan of an empty bitmap reads one bit per
//! shard and no lock. The O(1) count lives in 16 padded stripes picked by thread.
//!
//! A guest write's mark touches as few shared cache lines as it can, because with several
//! cores marking random offsets every shared line a mark writes moves between cores (measured:
//! two threads gained nothing over one while each mark took the shard lock). So a `set` whose
//! word is already non-zero never locks: chunks already dirty cost one load; new ones one
//! `fetch_or` on the word and an add to the thread's own stripe. Only a word going from zero
//! to non-zero takes the lock, to set its summary bit and the shard's top bit.
//!
//! The invariant: with no `set` in progress, a non-zero word has its summary bit set and a
//! shard with a summary bit set has its top bit set. Memory ordering, and why it holds:
//! - Words change only by read-modify-writes (`fetch_or`, `fetch_and`, `swap`; AcqRel), by
//!   setters with or without the lock and by resets and clears under it. RMWs on one word are
//!   totally ordered, so no bit is ever lost between a lock-free setter and a locked reset, and
//!   each RMW's old value says exactly how many chunks it changed (the counts stay exact).
//! - A lock-free setter proceeds only if its RMW returned a non-zero old value: the word was
//!   non-zero at that point in its order, so the summary and top bits were set by whoever made
//!   it non-zero (under the lock, before releasing it). A reset that later zeroes the word sees
//!   the setter's bit in its RMW (clearing it is then the reset's job; counting it is exact).
//!   If the RMW returned zero (a reset emptied the word after the setter's first look) the
//!   setter takes the lock and publishes the word as a first set would.
//! - Summary and top bits are cleared only under the lock, by a reset whose own RMW left the
//!   word zero; a setter that races in after that RMW sees a zero old value and re-publishes
//!   under the lock once the reset releases it.
//! - Top bits are changed with AcqRel RMWs after the word; a scanner that loads one with
//!   Acquire and then locks the shard sees the words as they were when it was written.
//!
//! A scanner may therefore miss only bits set *concurrently* with its scan, never a bit set
//! before it synchronised with the setter (joined the writer, took a lock the writer released,
//! received its message): what a job needs, since a chunk set during a scan is found by the
//! next scan. `dirty_chunk_count` sums the stripes: exact whenever no mark or reset runs
//! concurrently, and never off by more than the operations in progress.

use super::error::BitmapError;
use crate::sync::{AtomicBool, AtomicPtr, AtomicU64, Mutex, Ordering};

pub const GRANULARITY_BYTES_MIN: u64 = 512;
pub const GRANULARITY_BYTES_MAX: u64 = 64 << 20;
const SIZE_BYTES_MAX: u64 = 1 << 62;
const SHARD_CHUNK_SHIFT: u32 = 15;
const SHARD_CHUNK_COUNT: u64 = 1 << SHARD_CHUNK_SHIFT;
const SHARD_WORD_COUNT: usize = (SHARD_CHUNK_COUNT / 64) as usize;
const SUMMARY_WORD_COUNT: usize = SHARD_WORD_COUNT / 64;
const COUNT_STRIPE_COUNT: usize = 16;

type Words = [AtomicU64; SHARD_WORD_COUNT];

/// This thread's count stripe. Striping by thread rather than by shard keeps a marking core
/// on its own cache line: two cores marking random shards would otherwise meet on the same
/// 16 stripes nearly every mark (measured: that sharing alone held 2 threads to 1.4x of one).
fn count_stripe_index() -> usize {
    static NEXT_STRIPE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT_STRIPE.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % COUNT_STRIPE_COUNT;
    }
    STRIPE.with(|stripe| *stripe)
}

/// Keeps a value on its own cache line(s), so writers elsewhere do not evict it.
#[repr(align(128))]
struct Padded<T>(T);

/// What only the lock holder touches.
struct ShardBits {
    /// Bit `i` set if word `i` is non-zero (see the invariant at the top of the file).
    summary: [u64; SUMMARY_WORD_COUNT],
}

#[repr(align(128))]
struct Shard {
    bits: Mutex<ShardBits>,
    /// Null until the first chunk of the shard is set; then set once, under `bits`, and freed
    /// only when the bitmap drops, so a reader holding `&self` may follow it without the lock.
    words: AtomicPtr<Words>,
}

impl Shard {
    fn words(&self) -> Option<&Words> {
        let ptr = self.words.load(Ordering::Acquire);
        // SAFETY: non-null pointers come from Box::into_raw in `words_or_insert` and stay
        // valid until `drop`, which needs `&mut self`.
        (!ptr.is_null()).then(|| unsafe { &*ptr })
    }

    /// The words, allocating them. Only with the shard's lock held (`_locked` proves it).
    fn words_or_insert(&self, _locked: &mut ShardBits) -> &Words {
        if let Some(words) = self.words() {
            return words;
        }
        let words: Box<Words> = Box::new(std::array::from_fn(|_| AtomicU64::new(0)));
        let ptr = Box::into_raw(words);
        self.words.store(ptr, Ordering::Release);
        // SAFETY: just allocated; lives until drop.
        unsafe { &*ptr }
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        let ptr = self.words.load(Ordering::Acquire);
        if !ptr.is_null() {
            // SAFETY: allocated by Box::into_raw in `words_or_insert`; nobody else holds the
            // shard any more (`&mut self`).
            drop(unsafe { Box::from_raw(ptr) });
        }
    }
}

/// A dirty bitmap over `size_bytes` of disk.
///
/// ```
/// use tandem::bitmap::DirtyBitmap;
/// let bitmap = DirtyBitmap::new(65536, 1 << 30).unwrap();
/// bitmap.set(100, 1).unwrap();                  // rounds outward: chunk 0
/// assert_eq!(bitmap.dirty_chunk_count(), 1);
/// assert_eq!(bitmap.next_dirty_area(0, u64::MAX), Some((0, 65536)));
/// bitmap.reset(0, 65535).unwrap();              // covers no chunk whole: nothing
/// assert!(bitmap.get(0).unwrap());
/// bitmap.reset(0, 65536).unwrap();
/// assert_eq!(bitmap.dirty_chunk_count(), 0);
/// ```
pub struct DirtyBitmap {
    granularity_shift: u32,
    size_bytes: u64,
    chunk_count: u64,
    shards: Box<[Shard]>,
    /// Bit per shard: set if any of the shard's summary bits is (see the invariant at the top).
    top: Box<[AtomicU64]>,
    /// Dirty chunks, striped by shard index so markers on different shards rarely share a line.
    count_stripes: Box<[Padded<AtomicU64>]>,
    enabled: Padded<AtomicBool>,
    /// Writes may be missing from the bits (their recording process stopped uncleanly): not
    /// to be trusted by a job. Not on the write path, so not padded.
    inconsistent: AtomicBool,
}

impl DirtyBitmap {
    /// An empty, enabled bitmap. `granularity_bytes` is a power of two, 512 B to 64 MiB.
    pub fn new(granularity_bytes: u64, size_bytes: u64) -> Result<DirtyBitmap, BitmapError> {
        let granularity_ok = granularity_bytes.is_power_of_two()
            && (GRANULARITY_BYTES_MIN..=GRANULARITY_BYTES_MAX).contains(&granularity_bytes);
        if !granularity_ok {
            return Err(BitmapError::BadGranularity { granularity_bytes });
        }
        if size_bytes == 0 || size_bytes > SIZE_BYTES_MAX {
            return Err(BitmapError::BadSize { size_bytes });
        }
        let chunk_count = size_bytes.div_ceil(granularity_bytes);
        let shard_count = chunk_count.div_ceil(SHARD_CHUNK_COUNT) as usize;
        let shards = (0..shard_count)
            .map(|_| Shard {
                bits: Mutex::new(ShardBits { summary: [0; SUMMARY_WORD_COUNT] }),
                words: AtomicPtr::new(std::ptr::null_mut()),
            })
            .collect();
        let top = (0..shard_count.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Ok(DirtyBitmap {
            granularity_shift: granularity_bytes.trailing_zeros(),
            size_bytes,
            chunk_count,
            shards,
            top,
            count_stripes: (0..COUNT_STRIPE_COUNT).map(|_| Padded(AtomicU64::new(0))).collect(),
            enabled: Padded(AtomicBool::new(true)),
            inconsistent: AtomicBool::new(false),
        })
    }

    pub fn granularity_bytes(&self) -> u64 {
        1 << self.granularity_shift
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn chunk_count(&self) -> u64 {
        self.chunk_count
    }

    /// Dirty chunks, O(1) (a sum of 16 stripes).
    pub fn dirty_chunk_count(&self) -> u64 {
        let sum =
            self.count_stripes.iter().fold(0u64, |sum, stripe| sum.wrapping_add(stripe.0.load(Ordering::Acquire)));
        // A stripe goes "negative" (wraps) when its thread clears chunks another thread set;
        // only the sum means anything. Mid-update it can be briefly below zero: clamp.
        match sum as i64 {
            negative if negative < 0 => 0,
            _ => sum.min(self.chunk_count),
        }
    }

    /// Dirty bytes (a dirty last chunk counts only its bytes inside the disk), O(1). Exact
    /// while nobody changes the bitmap; during concurrent sets and resets a figure for
    /// progress, off by up to one chunk (the count and the last chunk's bit are read apart),
    /// never below zero nor past the disk. Decisions use `dirty_chunk_count` and the scans.
    pub fn dirty_bytes(&self) -> u64 {
        let full_bytes = self.dirty_chunk_count() << self.granularity_shift;
        let last_chunk = self.chunk_count - 1;
        let tail_shortfall = (self.chunk_count << self.granularity_shift) - self.size_bytes;
        // The count and the last chunk's bit are read at different instants: while another
        // thread sets that chunk, the bit can already be seen with the count not yet raised
        // (0 chunks counted, last chunk set). Saturate rather than wrap to ~2^64 bytes.
        let dirty_bytes = match tail_shortfall > 0 && self.chunk_is_set(last_chunk) {
            true => full_bytes.saturating_sub(tail_shortfall),
            false => full_bytes,
        };
        debug_assert!(dirty_bytes <= self.size_bytes.max(full_bytes));
        dirty_bytes
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.0.load(Ordering::Acquire)
    }

    /// A disabled bitmap records nothing (`set` is a no-op); scans, reset and merge still work.
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.0.store(enabled, Ordering::Release);
    }

    /// Whether writes may be missing from the bits (QEMU's `inconsistent`): the registry then
    /// refuses every use that would trust them (see [`BitmapError::Inconsistent`]).
    pub fn is_inconsistent(&self) -> bool {
        self.inconsistent.load(Ordering::Acquire)
    }

    /// Flag the bits as untrustworthy, or as trustworthy again. Recording goes on either way:
    /// the flag is about writes lost before, not about writes from now on.
    pub fn set_inconsistent(&self, inconsistent: bool) {
        self.inconsistent.store(inconsistent, Ordering::Release);
    }

    fn check_range(&self, offset: u64, length_bytes: u64) -> Result<(), BitmapError> {
        if length_bytes == 0 {
            return Err(BitmapError::EmptyRange { offset });
        }
        let inside = offset.checked_add(length_bytes).is_some_and(|end| end <= self.size_bytes);
        match inside {
            true => Ok(()),
            false => Err(BitmapError::OutOfRange { offset, length_bytes, size_bytes: self.size_bytes }),
        }
    }

    /// Mark `[offset, offset + length_bytes)` dirty, rounding outward to whole chunks.
    pub fn set(&self, offset: u64, length_bytes: u64) -> Result<(), BitmapError> {
        self.check_range(offset, length_bytes)?;
        if !self.is_enabled() {
            return Ok(());
        }
        let first = offset >> self.granularity_shift;
        let last = (offset + length_bytes - 1) >> self.granularity_shift;
        match first / 64 == last / 64 {
            // A guest write's chunks usually share one word: the short path.
            true => self.set_in_word(first, last),
            false => self.update_chunks(first, last + 1, true),
        }
        Ok(())
    }

    /// Set chunks `[first, last]`, all in one word. Already set: one load. Word already
    /// non-zero: one `fetch_or` and the thread's stripe, no lock. Otherwise the lock, to
    /// publish the word in the summary and top level (ordering argument at the top).
    fn set_in_word(&self, first: u64, last: u64) {
        let shard_index = (first >> SHARD_CHUNK_SHIFT) as usize;
        let shard = &self.shards[shard_index];
        let word_index = ((first & (SHARD_CHUNK_COUNT - 1)) / 64) as usize;
        let mask = word_mask(first % 64, last % 64 + 1);
        // One new chunk is the common case; count_ones is ~20 instructions without POPCNT.
        let added = |old: u64| if first == last { 1 } else { u64::from((mask & !old).count_ones()) };
        if let Some(words) = shard.words() {
            let current = words[word_index].load(Ordering::Acquire);
            if current & mask == mask {
                return;
            }
            if current != 0 {
                let old = words[word_index].fetch_or(mask, Ordering::AcqRel);
                if old & mask != mask {
                    self.count(added(old), true);
                }
                if old != 0 {
                    return;
                }
                // A reset emptied the word since the load: publish it as a first set would.
                let mut bits = shard.bits.lock();
                self.publish_word(shard_index, &mut bits, word_index);
                return;
            }
        }
        let mut bits = shard.bits.lock();
        let old = shard.words_or_insert(&mut bits)[word_index].fetch_or(mask, Ordering::AcqRel);
        if old & mask != mask {
            self.count(added(old), true);
        }
        self.publish_word(shard_index, &mut bits, word_index);
    }

    /// Summary and top-level bits for a word just made non-zero; with the shard's lock held.
    fn publish_word(&self, shard_index: usize, bits: &mut ShardBits, word_index: usize) {
        bits.summary[word_index / 64] |= 1 << (word_index % 64);
        self.publish_shard(shard_index);
    }

    fn publish_shard(&self, shard_index: usize) {
        let top_word = &self.top[shard_index / 64];
        let top_bit = 1u64 << (shard_index % 64);
        if top_word.load(Ordering::Acquire) & top_bit == 0 {
            top_word.fetch_or(top_bit, Ordering::AcqRel);
        }
    }

    /// Mark clean every chunk that `[offset, offset + length_bytes)` covers whole; chunks it
    /// covers only in part stay as they are (the disk's last, short chunk counts as whole when
    /// the range reaches the end of the disk).
    pub fn reset(&self, offset: u64, length_bytes: u64) -> Result<(), BitmapError> {
        self.check_range(offset, length_bytes)?;
        let end_bytes = offset + length_bytes;
        let first = offset.div_ceil(self.granularity_bytes());
        let end = match end_bytes == self.size_bytes {
            true => self.chunk_count,
            false => end_bytes >> self.granularity_shift,
        };
        if first < end {
            self.update_chunks(first, end, false);
        }
        Ok(())
    }

    /// Whether the chunk holding byte `offset` is dirty.
    pub fn get(&self, offset: u64) -> Result<bool, BitmapError> {
        self.check_range(offset, 1)?;
        Ok(self.chunk_is_set(offset >> self.granularity_shift))
    }

    /// Mark every chunk clean.
    pub fn clear(&self) {
        for (index, shard) in self.shards.iter().enumerate() {
            let mut bits = shard.bits.lock();
            let Some(words) = shard.words() else { continue };
            let mut removed = 0u64;
            for (word_index, word) in words.iter().enumerate() {
                if word.load(Ordering::Relaxed) != 0 {
                    removed += u64::from(word.swap(0, Ordering::AcqRel).count_ones());
                }
                set_summary(&mut bits.summary, word_index, word.load(Ordering::Acquire) != 0);
            }
            self.count(removed, false);
            self.unpublish_if_empty(index, &bits);
        }
    }

    /// Set or clear chunks `[first, end)`, shard by shard.
    fn update_chunks(&self, first: u64, end: u64, set: bool) {
        assert!(first < end && end <= self.chunk_count);
        let mut chunk = first;
        while chunk < end {
            let shard_index = (chunk >> SHARD_CHUNK_SHIFT) as usize;
            let shard_end = ((shard_index as u64 + 1) << SHARD_CHUNK_SHIFT).min(end);
            let shard = &self.shards[shard_index];
            let mut bits = shard.bits.lock();
            let base = (shard_index as u64) << SHARD_CHUNK_SHIFT;
            let changed = update_shard(shard, &mut bits, chunk - base, shard_end - base, set);
            self.count(changed, set);
            match set {
                true => self.publish_shard(shard_index),
                false => self.unpublish_if_empty(shard_index, &bits),
            }
            chunk = shard_end;
        }
    }

    /// Clear the shard's top bit if its summary says every word is zero; lock held.
    fn unpublish_if_empty(&self, shard_index: usize, bits: &ShardBits) {
        if bits.summary.iter().all(|word| *word == 0) {
            self.top[shard_index / 64].fetch_and(!(1u64 << (shard_index % 64)), Ordering::AcqRel);
        }
    }

    /// Add or remove `changed` chunks from the count, on this thread's stripe.
    fn count(&self, changed: u64, set: bool) {
        if changed == 0 {
            return;
        }
        let stripe = &self.count_stripes[count_stripe_index()].0;
        match set {
            true => stripe.fetch_add(changed, Ordering::AcqRel),
            false => stripe.fetch_sub(changed, Ordering::AcqRel),
        };
    }

    fn chunk_is_set(&self, chunk: u64) -> bool {
        let shard = &self.shards[(chunk >> SHARD_CHUNK_SHIFT) as usize];
        let _bits = shard.bits.lock();
        let within = (chunk & (SHARD_CHUNK_COUNT - 1)) as usize;
        shard.words().is_some_and(|words| words[within / 64].load(Ordering::Acquire) & (1 << (within % 64)) != 0)
    }

    /// Offset of the first dirty chunk at or after the chunk holding `from_offset`.
    pub fn next_dirty(&self, from_offset: u64) -> Option<u64> {
        let from = from_offset >> self.granularity_shift;
        self.next_chunk(from, true).map(|chunk| chunk << self.granularity_shift)
    }

    /// Offset of the first clean chunk at or after the chunk holding `from_offset`.
    pub fn next_clean(&self, from_offset: u64) -> Option<u64> {
        let from = from_offset >> self.granularity_shift;
        self.next_chunk(from, false).map(|chunk| chunk << self.granularity_shift)
    }

    /// The first run of dirty chunks at or after `from_offset`: its offset and length in
    /// bytes, at most `length_bytes_max` (rounded down to whole chunks, at least one) and
    /// never past the end of the disk.
    pub fn next_dirty_area(&self, from_offset: u64, length_bytes_max: u64) -> Option<(u64, u64)> {
        let start = self.next_dirty(from_offset)?;
        let chunk_max = (length_bytes_max >> self.granularity_shift).max(1);
        let start_chunk = start >> self.granularity_shift;
        let limit_chunk = start_chunk.saturating_add(chunk_max).min(self.chunk_count);
        let end_chunk = self.next_chunk(start_chunk, false).map_or(limit_chunk, |clean| clean.min(limit_chunk));
        let end = (end_chunk << self.granularity_shift).min(self.size_bytes);
        Some((start, end - start))
    }

    /// Every dirty run, in order, as `(offset, length_bytes)`.
    pub fn areas(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut from = 0;
        std::iter::from_fn(move || {
            if from >= self.size_bytes {
                return None;
            }
            let (offset, length) = self.next_dirty_area(from, u64::MAX)?;
            from = offset + length;
            Some((offset, length))
        })
    }

    /// First chunk `>= from` whose bit equals `dirty`.
    fn next_chunk(&self, from: u64, dirty: bool) -> Option<u64> {
        let mut shard_index = (from >> SHARD_CHUNK_SHIFT) as usize;
        let mut within = from & (SHARD_CHUNK_COUNT - 1);
        while shard_index < self.shards.len() {
            if dirty {
                shard_index = self.next_nonempty_shard(shard_index)?;
                if shard_index != (from >> SHARD_CHUNK_SHIFT) as usize {
                    within = 0;
                }
            }
            let base = (shard_index as u64) << SHARD_CHUNK_SHIFT;
            let found = scan_shard(&self.shards[shard_index], within, dirty);
            match found.map(|c| base + c).filter(|chunk| *chunk < self.chunk_count) {
                Some(chunk) => return Some(chunk),
                None if !dirty && found.is_some() => return None, // clean bits past the end
                None => {}
            }
            shard_index += 1;
            within = 0;
        }
        None
    }

    /// First shard `>= from` whose top bit is set.
    fn next_nonempty_shard(&self, from: usize) -> Option<usize> {
        let mut word_index = from / 64;
        let mut mask = !0u64 << (from % 64);
        while word_index < self.top.len() {
            let word = self.top[word_index].load(Ordering::Acquire) & mask;
            if word != 0 {
                return Some(word_index * 64 + word.trailing_zeros() as usize);
            }
            word_index += 1;
            mask = !0;
        }
        None
    }

    /// OR `other` into this bitmap. Same geometry only. Inconsistency is not checked here:
    /// the registry refuses a merge with an inconsistent side before it gets this far.
    pub fn merge(&self, other: &DirtyBitmap) -> Result<(), BitmapError> {
        self.check_geometry(other)?;
        for (index, other_shard) in other.shards.iter().enumerate() {
            // Copy out under the other's lock, then apply under ours: never both at once.
            let Some(words) = copy_words(other_shard) else { continue };
            let shard = &self.shards[index];
            let mut bits = shard.bits.lock();
            let changed = or_words(shard, &mut bits, &words);
            self.count(changed, true);
            self.publish_shard(index);
        }
        Ok(())
    }

    /// A new bitmap with the same geometry, bits, enabled state and inconsistency.
    pub fn copy(&self) -> DirtyBitmap {
        let copy = DirtyBitmap::new(self.granularity_bytes(), self.size_bytes).expect("geometry already valid");
        copy.merge(self).expect("same geometry");
        copy.set_enabled(self.is_enabled());
        copy.set_inconsistent(self.is_inconsistent());
        copy
    }

    fn check_geometry(&self, other: &DirtyBitmap) -> Result<(), BitmapError> {
        let same = self.granularity_shift == other.granularity_shift && self.size_bytes == other.size_bytes;
        match same {
            true => Ok(()),
            false => Err(BitmapError::GeometryMismatch {
                granularity_bytes: self.granularity_bytes(),
                size_bytes: self.size_bytes,
                other_granularity_bytes: other.granularity_bytes(),
                other_size_bytes: other.size_bytes,
            }),
        }
    }

    /// The bits as little-endian-ordered words, chunk `i` at bit `i % 64` of word `i / 64`
    /// (for persistence). Bits past `chunk_count` are zero.
    pub fn to_words(&self) -> Vec<u64> {
        let word_count = self.chunk_count.div_ceil(64) as usize;
        let mut out = vec![0u64; word_count];
        for (index, shard) in self.shards.iter().enumerate() {
            let Some(words) = copy_words(shard) else { continue };
            let start = index * SHARD_WORD_COUNT;
            let count = SHARD_WORD_COUNT.min(word_count - start);
            out[start..start + count].copy_from_slice(&words[..count]);
        }
        out
    }

    /// Rebuild a bitmap from [`DirtyBitmap::to_words`] output.
    pub fn from_words(granularity_bytes: u64, size_bytes: u64, words: &[u64]) -> Result<DirtyBitmap, BitmapError> {
        let bitmap = DirtyBitmap::new(granularity_bytes, size_bytes)?;
        let geometry_error = || BitmapError::GeometryMismatch {
            granularity_bytes,
            size_bytes,
            other_granularity_bytes: granularity_bytes,
            other_size_bytes: words.len() as u64 * 64 * granularity_bytes,
        };
        if words.len() as u64 != bitmap.chunk_count.div_ceil(64) {
            return Err(geometry_error());
        }
        let tail_bits = bitmap.chunk_count % 64;
        if tail_bits != 0 && words.last().is_some_and(|last| last >> tail_bits != 0) {
            return Err(geometry_error()); // bits for chunks that do not exist
        }
        for (index, chunk) in words.chunks(SHARD_WORD_COUNT).enumerate() {
            if chunk.iter().all(|w| *w == 0) {
                continue;
            }
            let mut full = Box::new([0u64; SHARD_WORD_COUNT]);
            full[..chunk.len()].copy_from_slice(chunk);
            let shard = &bitmap.shards[index];
            let mut bits = shard.bits.lock();
            let changed = or_words(shard, &mut bits, &full);
            bitmap.count(changed, true);
            bitmap.publish_shard(index);
        }
        Ok(bitmap)
    }
}

/// Bits `low..high` (0 <= low < high <= 64) of a word.
fn word_mask(low: u64, high: u64) -> u64 {
    debug_assert!(low < high && high <= 64);
    if high - low == 64 {
        !0
    } else {
        ((1u64 << (high - low)) - 1) << low
    }
}

/// The shard's words as plain values, read under its lock; `None` if never allocated.
fn copy_words(shard: &Shard) -> Option<Box<[u64; SHARD_WORD_COUNT]>> {
    let _bits = shard.bits.lock();
    let words = shard.words()?;
    Some(Box::new(std::array::from_fn(|i| words[i].load(Ordering::Acquire))))
}

/// Set or clear chunks `[first, end)` of one shard (shard-relative), with its lock held;
/// returns how many changed. Unchanged words are not written.
fn update_shard(shard: &Shard, bits: &mut ShardBits, first: u64, end: u64, set: bool) -> u64 {
    if !set && shard.words().is_none() {
        return 0;
    }
    let words = shard.words_or_insert(bits);
    let mut changed = 0u64;
    let mut chunk = first;
    while chunk < end {
        let word_index = (chunk / 64) as usize;
        let high = (end - word_index as u64 * 64).min(64);
        let mask = word_mask(chunk % 64, high);
        let word = &words[word_index];
        let current = word.load(Ordering::Acquire);
        // RMWs, never load-then-store: a lock-free setter may change the word meanwhile.
        if (set && current & mask != mask) || (!set && current & mask != 0) {
            let old = if set { word.fetch_or(mask, Ordering::AcqRel) } else { word.fetch_and(!mask, Ordering::AcqRel) };
            let new = if set { old | mask } else { old & !mask };
            changed += u64::from((old ^ new).count_ones());
            set_summary(&mut bits.summary, word_index, new != 0);
        }
        chunk = word_index as u64 * 64 + high;
    }
    changed
}

fn or_words(shard: &Shard, bits: &mut ShardBits, source: &[u64; SHARD_WORD_COUNT]) -> u64 {
    let words = shard.words_or_insert(bits);
    let mut changed = 0u64;
    for (word_index, add) in source.iter().enumerate() {
        if add & !words[word_index].load(Ordering::Acquire) != 0 {
            let old = words[word_index].fetch_or(*add, Ordering::AcqRel);
            changed += u64::from((add & !old).count_ones());
            set_summary(&mut bits.summary, word_index, true);
        }
    }
    changed
}

fn set_summary(summary: &mut [u64; SUMMARY_WORD_COUNT], word_index: usize, nonzero: bool) {
    let bit = 1u64 << (word_index % 64);
    match nonzero {
        true => summary[word_index / 64] |= bit,
        false => summary[word_index / 64] &= !bit,
    }
}

/// First shard-relative chunk `>= within` whose bit equals `dirty`.
fn scan_shard(shard: &Shard, within: u64, dirty: bool) -> Option<u64> {
    let bits = shard.bits.lock();
    let Some(words) = shard.words() else {
        return (!dirty).then_some(within);
    };
    let mut word_index = (within / 64) as usize;
    let mut mask = !0u64 << (within % 64);
    while word_index < SHARD_WORD_COUNT {
        if dirty && bits.summary[word_index / 64] >> (word_index % 64) & 1 == 0 {
            word_index += 1;
            mask = !0;
            continue;
        }
        let value = words[word_index].load(Ordering::Acquire);
        let word = if dirty { value } else { !value } & mask;
        if word != 0 {
            return Some(word_index as u64 * 64 + u64::from(word.trailing_zeros()));
        }
        word_index += 1;
        mask = !0;
    }
    None
}
