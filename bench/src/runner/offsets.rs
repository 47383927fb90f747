//! Where a job's next I/O goes within one file's region: a wrapping cursor for sequential
//! jobs, and for random jobs either fio's random map (every block once per pass, in a
//! seeded order) or, with `norandommap` or `bssplit`, independent uniform picks.

use std::cell::Cell;

use tandem::rng;

/// A bijection on `0..count` from a seed: an invertible mix on the next power of two,
/// cycle-walked back into range (fewer than two steps on average). Stands in for fio's
/// random map: the same coverage (each block once per pass) without a bitmap.
#[derive(Debug, Clone, Copy)]
pub struct Permutation {
    count: u64,
    bits: u32,
    key: u64,
}

impl Permutation {
    pub fn new(count: u64, key: u64) -> Permutation {
        assert!(count > 0, "a permutation of nothing");
        let bits = (64 - (count - 1).leading_zeros()).max(2);
        Permutation { count, bits, key }
    }

    /// The `index`-th element of the order, `index < count`.
    pub fn at(&self, index: u64) -> u64 {
        assert!(index < self.count, "index {index} outside 0..{}", self.count);
        let mut value = self.mix(index);
        while value >= self.count {
            value = self.mix(value);
        }
        value
    }

    fn mix(&self, value: u64) -> u64 {
        let mask = if self.bits == 64 { u64::MAX } else { (1u64 << self.bits) - 1 };
        let shift = self.bits / 2 + 1;
        let mut x = value;
        for round in 0..3u64 {
            // Each step is a bijection on `bits`-bit numbers: odd multiply, add, xor-shift.
            x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15 | 1).wrapping_add(self.key ^ round) & mask;
            x ^= x >> shift;
        }
        x
    }
}

/// The cursor state of one file of one job clone.
pub struct FileCursor {
    pub sequential_bytes: Cell<u64>,
    pub random_index: Cell<u64>,
}

impl FileCursor {
    pub fn new() -> FileCursor {
        FileCursor { sequential_bytes: Cell::new(0), random_index: Cell::new(0) }
    }

    /// Back to the start of the region, as fio starts every loop.
    pub fn rewind(&self) {
        self.sequential_bytes.set(0);
        self.random_index.set(0);
    }

    /// Next sequential offset for an I/O of `length_bytes` in a region of `region_bytes`,
    /// wrapping to the start when the I/O would run past the end.
    pub fn next_sequential(&self, region_bytes: u64, length_bytes: u64) -> u64 {
        let mut at = self.sequential_bytes.get();
        if at + length_bytes > region_bytes {
            at = 0;
        }
        self.sequential_bytes.set(at + length_bytes);
        at
    }

    /// Next random-map block: each of `block_count` blocks once, then a new order.
    pub fn next_mapped(&self, block_count: u64, seed: u64) -> u64 {
        let index = self.random_index.get();
        self.random_index.set(index + 1);
        let order = Permutation::new(block_count, seed ^ (index / block_count).wrapping_mul(0xA24B_AED4_963E_E407));
        order.at(index % block_count)
    }
}

impl Default for FileCursor {
    fn default() -> Self {
        FileCursor::new()
    }
}

/// A uniform offset for an I/O of `length_bytes`, aligned to `grain_bytes`, inside the region.
pub fn uniform(state: &mut u64, region_bytes: u64, length_bytes: u64, grain_bytes: u64) -> u64 {
    let slots = (region_bytes.saturating_sub(length_bytes) / grain_bytes) + 1;
    rng::below(state, slots) * grain_bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_visit_every_block_once() {
        for count in [1u64, 2, 3, 7, 64, 1000, 4097] {
            let order = Permutation::new(count, 42);
            let mut seen = vec![false; count as usize];
            for index in 0..count {
                let value = order.at(index) as usize;
                assert!(!seen[value], "count {count}: {value} twice");
                seen[value] = true;
            }
        }
        let (a, b) = (Permutation::new(1000, 1), Permutation::new(1000, 2));
        assert!((0..1000).any(|i| a.at(i) != b.at(i)), "keys give different orders");
    }

    #[test]
    fn cursors_wrap_and_remap() {
        let cursor = FileCursor::new();
        let offsets: Vec<u64> = (0..3).map(|_| cursor.next_sequential(8192, 4096)).collect();
        assert_eq!(offsets, [0, 4096, 0]);
        let mut blocks: Vec<u64> = (0..4).map(|_| cursor.next_mapped(4, 9)).collect();
        blocks.sort_unstable();
        assert_eq!(blocks, [0, 1, 2, 3]);
        let mut state = 5;
        assert!((0..100).all(|_| uniform(&mut state, 16384, 8192, 4096) <= 8192));
    }
}
