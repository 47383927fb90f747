//! [`DirtyBitmap`]: one bit per chunk of `granularity` bytes.
//!
//! Layout: chunks are grouped in shards of 32768 (512 words, 4 KiB, allocated on first set,
//! so a mostly clean 64 TiB disk costs little). Each shard's bits sit behind its own
//! `parking_lot` mutex, with a per-shard summary word mask (which words are non-zero). A top
//! level keeps one bit per shard (non-empty) in atomics, so a scan of an empty bitmap reads
//! one bit per shard and no lock.
//!
//! Memory ordering. Every change to a shard (its words, summary, `dirty_count` and its top
//! bit) is made under that shard's lock; the shard's `dirty_count` is stored with Release
//! and its top bit changed with AcqRel read-modify-writes, so a reader that loads either with
//! Acquire sees the words as they were when that value was written. A scanner that skips a
//! shard on a zero top bit may therefore miss only bits set *concurrently* with its scan, never
//! a bit set before it synchronised with the setter (joined the writer, took a lock the writer
//! released, received its message): what a job needs, since a chunk set during a scan is
//! found by the next scan and `dirty_chunk_count` stays exact. The global count is updated
//! after the shard, under the same lock, with AcqRel.

use super::error::BitmapError;
use crate::sync::{AtomicBool, AtomicU64, Mutex, Ordering};

pub const GRANULARITY_BYTES_MIN: u64 = 512;
pub const GRANULARITY_BYTES_MAX: u64 = 64 << 20;
const SIZE_BYTES_MAX: u64 = 1 << 62;
const SHARD_CHUNK_SHIFT: u32 = 15;
const SHARD_CHUNK_COUNT: u64 = 1 << SHARD_CHUNK_SHIFT;
const SHARD_WORD_COUNT: usize = (SHARD_CHUNK_COUNT / 64) as usize;
const SUMMARY_WORD_COUNT: usize = SHARD_WORD_COUNT / 64;

struct ShardBits {
    /// `None` until the first chunk of the shard is set.
    words: Option<Box<[u64; SHARD_WORD_COUNT]>>,
    /// Bit `i` set iff `words[i] != 0`.
    summary: [u64; SUMMARY_WORD_COUNT],
}

struct Shard {
    bits: Mutex<ShardBits>,
    /// Chunks set in this shard (written under `bits`).
    dirty_count: AtomicU64,
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
    /// Bit per shard: set iff the shard's `dirty_count` is non-zero.
    top: Box<[AtomicU64]>,
    dirty_count: AtomicU64,
    enabled: AtomicBool,
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
                bits: Mutex::new(ShardBits { words: None, summary: [0; SUMMARY_WORD_COUNT] }),
                dirty_count: AtomicU64::new(0),
            })
            .collect();
        let top = (0..shard_count.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Ok(DirtyBitmap {
            granularity_shift: granularity_bytes.trailing_zeros(),
            size_bytes,
            chunk_count,
            shards,
            top,
            dirty_count: AtomicU64::new(0),
            enabled: AtomicBool::new(true),
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

    /// Dirty chunks, O(1).
    pub fn dirty_chunk_count(&self) -> u64 {
        self.dirty_count.load(Ordering::Acquire)
    }

    /// Dirty bytes (a dirty last chunk counts only its bytes inside the disk), O(1).
    pub fn dirty_bytes(&self) -> u64 {
        let full_bytes = self.dirty_chunk_count() << self.granularity_shift;
        let last_chunk = self.chunk_count - 1;
        let tail_shortfall = (self.chunk_count << self.granularity_shift) - self.size_bytes;
        match tail_shortfall > 0 && self.chunk_is_set(last_chunk) {
            true => full_bytes - tail_shortfall,
            false => full_bytes,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// A disabled bitmap records nothing (`set` is a no-op); scans, reset and merge still work.
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Release);
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
        let end = (offset + length_bytes - 1) >> self.granularity_shift;
        self.update_chunks(first, end + 1, true);
        Ok(())
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
            let removed = shard.dirty_count.load(Ordering::Relaxed);
            bits.words = None;
            bits.summary = [0; SUMMARY_WORD_COUNT];
            self.account(index, shard, removed, false);
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
            let changed = update_shard(&mut bits, chunk - base, shard_end - base, set);
            self.account(shard_index, shard, changed, set);
            chunk = shard_end;
        }
    }

    /// Counts and the top bit after `changed` chunks of shard `index` were set or cleared.
    /// Called with the shard's lock held.
    fn account(&self, index: usize, shard: &Shard, changed: u64, set: bool) {
        if changed == 0 {
            return;
        }
        let before = shard.dirty_count.load(Ordering::Relaxed);
        let after = if set { before + changed } else { before - changed };
        assert!(after <= SHARD_CHUNK_COUNT, "shard count out of range");
        shard.dirty_count.store(after, Ordering::Release);
        let top_bit = 1u64 << (index % 64);
        match (before == 0, after == 0) {
            (true, false) => drop(self.top[index / 64].fetch_or(top_bit, Ordering::AcqRel)),
            (false, true) => drop(self.top[index / 64].fetch_and(!top_bit, Ordering::AcqRel)),
            _ => {}
        }
        match set {
            true => self.dirty_count.fetch_add(changed, Ordering::AcqRel),
            false => self.dirty_count.fetch_sub(changed, Ordering::AcqRel),
        };
    }

    fn chunk_is_set(&self, chunk: u64) -> bool {
        let shard = &self.shards[(chunk >> SHARD_CHUNK_SHIFT) as usize];
        let bits = shard.bits.lock();
        let within = (chunk & (SHARD_CHUNK_COUNT - 1)) as usize;
        bits.words.as_ref().is_some_and(|words| words[within / 64] & (1 << (within % 64)) != 0)
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

    /// OR `other` into this bitmap. Same geometry only.
    pub fn merge(&self, other: &DirtyBitmap) -> Result<(), BitmapError> {
        self.check_geometry(other)?;
        for (index, other_shard) in other.shards.iter().enumerate() {
            // Copy out under the other's lock, then apply under ours: never both at once.
            let Some(words) = other_shard.bits.lock().words.clone() else { continue };
            let shard = &self.shards[index];
            let mut bits = shard.bits.lock();
            let changed = or_words(&mut bits, &words);
            self.account(index, shard, changed, true);
        }
        Ok(())
    }

    /// A new bitmap with the same geometry, bits and enabled state.
    pub fn copy(&self) -> DirtyBitmap {
        let copy = DirtyBitmap::new(self.granularity_bytes(), self.size_bytes).expect("geometry already valid");
        copy.merge(self).expect("same geometry");
        copy.set_enabled(self.is_enabled());
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
            let bits = shard.bits.lock();
            let Some(words) = bits.words.as_ref() else { continue };
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
            let changed = or_words(&mut bits, &full);
            bitmap.account(index, shard, changed, true);
        }
        Ok(bitmap)
    }
}

/// Set or clear chunks `[first, end)` of one shard (shard-relative); returns how many changed.
fn update_shard(bits: &mut ShardBits, first: u64, end: u64, set: bool) -> u64 {
    if !set && bits.words.is_none() {
        return 0;
    }
    let ShardBits { words, summary } = bits;
    let words = words.get_or_insert_with(|| Box::new([0; SHARD_WORD_COUNT]));
    let mut changed = 0u64;
    let mut chunk = first;
    while chunk < end {
        let word_index = (chunk / 64) as usize;
        let low = chunk % 64;
        let high = (end - word_index as u64 * 64).min(64);
        let mask = if high - low == 64 { !0 } else { ((1u64 << (high - low)) - 1) << low };
        let old = words[word_index];
        let new = if set { old | mask } else { old & !mask };
        changed += u64::from((old ^ new).count_ones());
        words[word_index] = new;
        set_summary(summary, word_index, new != 0);
        chunk = word_index as u64 * 64 + high;
    }
    changed
}

fn or_words(bits: &mut ShardBits, source: &[u64; SHARD_WORD_COUNT]) -> u64 {
    let ShardBits { words, summary } = bits;
    let words = words.get_or_insert_with(|| Box::new([0; SHARD_WORD_COUNT]));
    let mut changed = 0u64;
    for (word_index, (word, add)) in words.iter_mut().zip(source.iter()).enumerate() {
        changed += u64::from((add & !*word).count_ones());
        *word |= add;
        set_summary(summary, word_index, *word != 0);
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
    let count = shard.dirty_count.load(Ordering::Acquire);
    if (dirty && count == 0) || (!dirty && count == SHARD_CHUNK_COUNT) {
        return None;
    }
    let bits = shard.bits.lock();
    let Some(words) = bits.words.as_ref() else {
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
        let word = if dirty { words[word_index] } else { !words[word_index] } & mask;
        if word != 0 {
            return Some(word_index as u64 * 64 + u64::from(word.trailing_zeros()));
        }
        word_index += 1;
        mask = !0;
    }
    None
}
