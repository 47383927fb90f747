//! `DirtyBitmap` against a plain `Vec<bool>` model: the input picks a geometry and a sequence of
//! operations; after every one, results, bits, `dirty_chunk_count` and `dirty_bytes` must agree.
//! Invariant: the sharded bitmap behaves exactly like one bit per chunk, and never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem::bitmap::{BitmapError, DirtyBitmap};

/// Operations per input: enough to build up state, few enough to keep executions fast.
const OP_COUNT_MAX: usize = 64;
/// Two full shards of 32768 chunks and part of a third, so shard boundaries are crossed.
const CHUNK_COUNT_MAX: u64 = 2 * 32768 + 4096;

/// Reads the input front to back; past its end every value is 0.
struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let Some((first, rest)) = self.data.split_first() else { return 0 };
        self.data = rest;
        *first
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    /// An offset or length: mostly within `limit`, sometimes at the edges of u64.
    fn value(&mut self, limit: u64) -> u64 {
        match self.u8() {
            0..=239 => self.u64() % (limit + 1),
            240..=247 => limit + u64::from(self.u8()),
            248..=251 => u64::MAX - u64::from(self.u8()),
            _ => u64::from(self.u8()),
        }
    }
}

/// One bool per chunk, plus the enabled flag.
struct Model {
    granularity_bytes: u64,
    size_bytes: u64,
    dirty: Vec<bool>,
    enabled: bool,
}

impl Model {
    fn range_error(&self, offset: u64, length_bytes: u64) -> Option<BitmapError> {
        if length_bytes == 0 {
            return Some(BitmapError::EmptyRange { offset });
        }
        match offset.checked_add(length_bytes) {
            Some(end) if end <= self.size_bytes => None,
            _ => Some(BitmapError::OutOfRange { offset, length_bytes, size_bytes: self.size_bytes }),
        }
    }

    fn set(&mut self, offset: u64, length_bytes: u64) {
        if !self.enabled {
            return;
        }
        let first = offset / self.granularity_bytes;
        let last = (offset + length_bytes - 1) / self.granularity_bytes;
        self.dirty[first as usize..=last as usize].fill(true);
    }

    /// Only whole chunks; the short last chunk is whole when the range reaches the end.
    fn reset(&mut self, offset: u64, length_bytes: u64) {
        let end_bytes = offset + length_bytes;
        for chunk in 0..self.dirty.len() as u64 {
            let chunk_start = chunk * self.granularity_bytes;
            let chunk_end = (chunk_start + self.granularity_bytes).min(self.size_bytes);
            if chunk_start >= offset && chunk_end <= end_bytes {
                self.dirty[chunk as usize] = false;
            }
        }
    }

    fn next(&self, from_offset: u64, dirty: bool) -> Option<u64> {
        let from = usize::try_from(from_offset / self.granularity_bytes).ok()?;
        let found = self.dirty.iter().skip(from).position(|bit| *bit == dirty)?;
        Some((from + found) as u64 * self.granularity_bytes)
    }

    fn next_dirty_area(&self, from_offset: u64, length_bytes_max: u64) -> Option<(u64, u64)> {
        let start = self.next(from_offset, true)?;
        let chunk_max = (length_bytes_max / self.granularity_bytes).max(1);
        let start_chunk = start / self.granularity_bytes;
        let mut end_chunk = start_chunk;
        while end_chunk < self.dirty.len() as u64
            && end_chunk - start_chunk < chunk_max
            && self.dirty[end_chunk as usize]
        {
            end_chunk += 1;
        }
        let end = (end_chunk * self.granularity_bytes).min(self.size_bytes);
        Some((start, end - start))
    }

    fn dirty_chunk_count(&self) -> u64 {
        self.dirty.iter().filter(|bit| **bit).count() as u64
    }

    fn dirty_bytes(&self) -> u64 {
        let chunk_bytes = |chunk: usize| {
            let start = chunk as u64 * self.granularity_bytes;
            (start + self.granularity_bytes).min(self.size_bytes) - start
        };
        self.dirty.iter().enumerate().filter(|(_, bit)| **bit).map(|(chunk, _)| chunk_bytes(chunk)).sum()
    }

    fn words(&self) -> Vec<u64> {
        let mut words = vec![0u64; self.dirty.len().div_ceil(64)];
        for (chunk, _) in self.dirty.iter().enumerate().filter(|(_, bit)| **bit) {
            words[chunk / 64] |= 1 << (chunk % 64);
        }
        words
    }
}

fn assert_agree(bitmap: &DirtyBitmap, model: &Model, op: u8) {
    assert_eq!(bitmap.dirty_chunk_count(), model.dirty_chunk_count(), "dirty_chunk_count after op {op}");
    assert_eq!(bitmap.dirty_bytes(), model.dirty_bytes(), "dirty_bytes after op {op}");
    assert_eq!(bitmap.is_enabled(), model.enabled, "enabled after op {op}");
    assert!(bitmap.to_words() == model.words(), "bits differ after op {op}");
}

/// A second bitmap for `merge`: usually the same geometry, sometimes not.
fn second_bitmap(input: &mut Input, model: &Model) -> (DirtyBitmap, Vec<bool>) {
    let same = input.u8() % 8 != 0;
    let granularity_bytes = if same { model.granularity_bytes } else { model.granularity_bytes * 2 };
    let size_bytes = if same { model.size_bytes } else { model.size_bytes + 1 };
    let other = DirtyBitmap::new(granularity_bytes, size_bytes).expect("valid geometry");
    let mut bits = vec![false; model.dirty.len()];
    for _ in 0..input.u8() % 4 {
        let offset = input.u64() % model.size_bytes;
        let length_bytes = 1 + input.u64() % (model.size_bytes - offset);
        other.set(offset, length_bytes).expect("in range");
        let (first, last) = (offset / granularity_bytes, (offset + length_bytes - 1) / granularity_bytes);
        if same {
            bits[first as usize..=last as usize].fill(true);
        }
    }
    (other, if same { bits } else { Vec::new() })
}

/// Apply one operation to both; compare what they return.
fn step(input: &mut Input, bitmap: &DirtyBitmap, model: &mut Model, op: u8) {
    let size_bytes = model.size_bytes;
    match op {
        0 | 1 => {
            let (offset, length_bytes) = (input.value(size_bytes), input.value(size_bytes));
            let expected = model.range_error(offset, length_bytes);
            let result = if op == 0 { bitmap.set(offset, length_bytes) } else { bitmap.reset(offset, length_bytes) };
            assert_eq!(result.err(), expected, "op {op} ({offset}, {length_bytes})");
            if expected.is_none() {
                if op == 0 {
                    model.set(offset, length_bytes)
                } else {
                    model.reset(offset, length_bytes)
                }
            }
        }
        2 => {
            let offset = input.value(size_bytes);
            let expected = match model.range_error(offset, 1) {
                Some(error) => Err(error),
                None => Ok(model.dirty[(offset / model.granularity_bytes) as usize]),
            };
            assert_eq!(bitmap.get(offset), expected, "get({offset})");
        }
        3 | 4 => {
            let from = input.value(size_bytes);
            let (actual, expected) = match op {
                3 => (bitmap.next_dirty(from), model.next(from, true)),
                _ => (bitmap.next_clean(from), model.next(from, false)),
            };
            assert_eq!(actual, expected, "op {op} from {from}");
        }
        5 => {
            let (from, length_bytes_max) = (input.value(size_bytes), input.value(size_bytes));
            let expected = model.next_dirty_area(from, length_bytes_max);
            assert_eq!(
                bitmap.next_dirty_area(from, length_bytes_max),
                expected,
                "next_dirty_area({from}, {length_bytes_max})"
            );
        }
        6 => {
            let (other, bits) = second_bitmap(input, model);
            let result = bitmap.merge(&other);
            assert_eq!(result.is_ok(), !bits.is_empty(), "merge result {result:?}");
            model.dirty.iter_mut().zip(bits).for_each(|(bit, add)| *bit |= add);
        }
        7 => {
            bitmap.clear();
            model.dirty.fill(false);
        }
        8 => {
            model.enabled = input.u8() % 2 == 0;
            bitmap.set_enabled(model.enabled);
        }
        9 => check_words(input, bitmap, model),
        10 => {
            let areas: Vec<(u64, u64)> = bitmap.areas().collect();
            let mut expected = Vec::new();
            let mut from = 0;
            // The last area ends at the disk's end, inside its short chunk: stop there.
            while let Some(area) = model.next_dirty_area(from, u64::MAX).filter(|_| from < size_bytes) {
                expected.push(area);
                from = area.0 + area.1;
            }
            assert_eq!(areas, expected, "areas");
        }
        _ => {
            let copy = bitmap.copy();
            assert_agree(&copy, model, op);
        }
    }
}

/// `to_words`/`from_words` round trip, and a stray bit past the last chunk is refused.
fn check_words(input: &mut Input, bitmap: &DirtyBitmap, model: &Model) {
    let words = bitmap.to_words();
    let rebuilt = DirtyBitmap::from_words(model.granularity_bytes, model.size_bytes, &words).expect("round trip");
    rebuilt.set_enabled(model.enabled);
    assert_agree(&rebuilt, model, 9);
    let tail_bits = model.dirty.len() % 64;
    if tail_bits != 0 {
        let mut stray = words;
        let last = stray.len() - 1;
        stray[last] |= 1 << (tail_bits + usize::from(input.u8()) % (64 - tail_bits));
        assert!(DirtyBitmap::from_words(model.granularity_bytes, model.size_bytes, &stray).is_err(), "stray bit");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input { data };
    let granularity_bytes = 512u64 << (input.u8() % 8);
    let size_limit_bytes = match input.u8() % 4 {
        0 => 64 << 10,
        1 | 2 => 4 << 20,
        _ => CHUNK_COUNT_MAX * granularity_bytes,
    };
    let size_bytes = 1 + input.u64() % size_limit_bytes;
    let bitmap = DirtyBitmap::new(granularity_bytes, size_bytes).expect("valid geometry");
    let chunk_count = size_bytes.div_ceil(granularity_bytes);
    assert_eq!(bitmap.chunk_count(), chunk_count);
    let mut model = Model { granularity_bytes, size_bytes, dirty: vec![false; chunk_count as usize], enabled: true };
    for _ in 0..OP_COUNT_MAX {
        if input.data.is_empty() {
            break;
        }
        let op = input.u8() % 12;
        step(&mut input, &bitmap, &mut model, op);
        assert_agree(&bitmap, &model, op);
    }
});
