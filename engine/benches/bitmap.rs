//! Criterion benches of the dirty bitmap against a single-mutex baseline (QEMU's design: one
//! lock around a flat word array and a count), measured in the same run so each figure is a
//! ratio: random 4 KiB marks from 1 and 2 threads, scans, counting, and saving to a file.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use parking_lot::Mutex;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tandem::bitmap::DirtyBitmap;

const DISK_SIZE_BYTES: u64 = 1 << 40;
const GRANULARITY_BYTES: u64 = 64 << 10;
const WRITE_BYTES: u64 = 4096;

/// The baseline: one mutex around every bit and the count.
struct MutexBitmap {
    granularity_shift: u32,
    chunk_count: u64,
    inner: Mutex<MutexBits>,
}

struct MutexBits {
    words: Vec<u64>,
    dirty_count: u64,
}

impl MutexBitmap {
    fn new(granularity_bytes: u64, size_bytes: u64) -> MutexBitmap {
        let chunk_count = size_bytes.div_ceil(granularity_bytes);
        let words = vec![0; chunk_count.div_ceil(64) as usize];
        MutexBitmap {
            granularity_shift: granularity_bytes.trailing_zeros(),
            chunk_count,
            inner: Mutex::new(MutexBits { words, dirty_count: 0 }),
        }
    }

    fn set(&self, offset: u64, length_bytes: u64) {
        let first = offset >> self.granularity_shift;
        let end = ((offset + length_bytes - 1) >> self.granularity_shift) + 1;
        let mut bits = self.inner.lock();
        for chunk in first..end {
            let (word, mask) = ((chunk / 64) as usize, 1u64 << (chunk % 64));
            if bits.words[word] & mask == 0 {
                bits.words[word] |= mask;
                bits.dirty_count += 1;
            }
        }
    }

    fn clear(&self) {
        let mut bits = self.inner.lock();
        bits.words.fill(0);
        bits.dirty_count = 0;
    }

    fn dirty_chunk_count(&self) -> u64 {
        self.inner.lock().dirty_count
    }

    /// First chunk `>= from` whose bit equals `dirty`, scanning word by word under the lock.
    fn next_chunk(bits: &MutexBits, from: u64, chunk_count: u64, dirty: bool) -> Option<u64> {
        let mut word_index = (from / 64) as usize;
        let mut mask = !0u64 << (from % 64);
        while word_index < bits.words.len() {
            let word = if dirty { bits.words[word_index] } else { !bits.words[word_index] } & mask;
            if word != 0 {
                let chunk = word_index as u64 * 64 + u64::from(word.trailing_zeros());
                return (chunk < chunk_count).then_some(chunk);
            }
            word_index += 1;
            mask = !0;
        }
        None
    }

    fn next_dirty(&self, from_offset: u64) -> Option<u64> {
        let bits = self.inner.lock();
        let chunk = Self::next_chunk(&bits, from_offset >> self.granularity_shift, self.chunk_count, true)?;
        Some(chunk << self.granularity_shift)
    }

    fn next_dirty_area(&self, from_offset: u64) -> Option<(u64, u64)> {
        let bits = self.inner.lock();
        let start = Self::next_chunk(&bits, from_offset >> self.granularity_shift, self.chunk_count, true)?;
        let end = Self::next_chunk(&bits, start, self.chunk_count, false).unwrap_or(self.chunk_count);
        Some((start << self.granularity_shift, (end - start) << self.granularity_shift))
    }
}

/// The two bitmaps behind one interface for the marking bench.
trait Marker: Sync {
    fn mark(&self, offset: u64);
    fn reset_all(&self);
}

impl Marker for DirtyBitmap {
    fn mark(&self, offset: u64) {
        self.set(offset, WRITE_BYTES).expect("in range");
    }

    fn reset_all(&self) {
        self.clear();
    }
}

impl Marker for MutexBitmap {
    fn mark(&self, offset: u64) {
        self.set(offset, WRITE_BYTES);
    }

    fn reset_all(&self) {
        self.clear();
    }
}

/// xorshift64*: cheap enough not to hide the bitmap's cost.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// `iters` random 4 KiB marks split over `thread_count` threads; wall time from the moment all
/// threads are running to the last one finishing. Each sample starts from an empty bitmap so
/// most marks set a new bit (the costly path) rather than finding it set.
fn mark_randomly(marker: &dyn Marker, thread_count: u64, iters: u64) -> Duration {
    marker.reset_all();
    let barrier = std::sync::Barrier::new(thread_count as usize + 1);
    let block_count = DISK_SIZE_BYTES / WRITE_BYTES;
    let started = std::thread::scope(|scope| {
        for thread in 0..thread_count {
            let barrier = &barrier;
            scope.spawn(move || {
                let mut state = 0x9e37_79b9_7f4a_7c15 ^ (thread + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                let share = iters / thread_count + u64::from(thread < iters % thread_count);
                barrier.wait();
                for _ in 0..share {
                    marker.mark((next_random(&mut state) % block_count) * WRITE_BYTES);
                }
            });
        }
        barrier.wait();
        Instant::now()
    });
    // The scope joined every thread before returning: the time covers all marks.
    started.elapsed()
}

fn random_marks(c: &mut Criterion) {
    let sharded = DirtyBitmap::new(GRANULARITY_BYTES, DISK_SIZE_BYTES).expect("geometry");
    let baseline = MutexBitmap::new(GRANULARITY_BYTES, DISK_SIZE_BYTES);
    let mut group = c.benchmark_group("set_random_4k_1tib");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(1));
    for thread_count in [1u64, 2] {
        let markers: [(&str, &dyn Marker); 2] = [("sharded", &sharded), ("single_mutex", &baseline)];
        for (name, marker) in markers {
            group.bench_with_input(
                BenchmarkId::new(name, format!("{thread_count}_threads")),
                &thread_count,
                |b, &t| b.iter_custom(|iters| mark_randomly(marker, t, iters)),
            );
        }
    }
    group.finish();
}

fn scans(c: &mut Criterion) {
    let empty = DirtyBitmap::new(GRANULARITY_BYTES, DISK_SIZE_BYTES).expect("geometry");
    let empty_baseline = MutexBitmap::new(GRANULARITY_BYTES, DISK_SIZE_BYTES);
    let mut group = c.benchmark_group("next_dirty_empty_1tib");
    group.bench_function("sharded", |b| b.iter(|| black_box(empty.next_dirty(black_box(0)))));
    group.bench_function("single_mutex", |b| b.iter(|| black_box(empty_baseline.next_dirty(black_box(0)))));
    group.finish();

    // One chunk in 4096 dirty: 4096 areas of one chunk each.
    let sparse = DirtyBitmap::new(GRANULARITY_BYTES, DISK_SIZE_BYTES).expect("geometry");
    let sparse_baseline = MutexBitmap::new(GRANULARITY_BYTES, DISK_SIZE_BYTES);
    let stride_bytes = 4096 * GRANULARITY_BYTES;
    for offset in (0..DISK_SIZE_BYTES).step_by(stride_bytes as usize) {
        sparse.set(offset + 7 * GRANULARITY_BYTES, 1).expect("in range");
        sparse_baseline.set(offset + 7 * GRANULARITY_BYTES, 1);
    }
    let mut group = c.benchmark_group("next_dirty_area_sparse_1tib_all_areas");
    group.throughput(Throughput::Elements(DISK_SIZE_BYTES / stride_bytes));
    group.bench_function("sharded", |b| b.iter(|| count_areas(|from| sparse.next_dirty_area(from, u64::MAX))));
    group.bench_function("single_mutex", |b| b.iter(|| count_areas(|from| sparse_baseline.next_dirty_area(from))));
    group.finish();

    let mut group = c.benchmark_group("dirty_chunk_count");
    group.bench_function("sharded", |b| b.iter(|| black_box(sparse.dirty_chunk_count())));
    group.bench_function("single_mutex", |b| b.iter(|| black_box(sparse_baseline.dirty_chunk_count())));
    group.finish();
}

/// Walk every dirty area from offset 0; returns how many there were.
fn count_areas(next_area: impl Fn(u64) -> Option<(u64, u64)>) -> u64 {
    let (mut from, mut count) = (0, 0);
    while let Some((offset, length_bytes)) = next_area(from) {
        from = offset + length_bytes;
        count += 1;
    }
    assert_eq!(count, DISK_SIZE_BYTES / (4096 * GRANULARITY_BYTES));
    count
}

fn scratch_dir() -> PathBuf {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/tmp/bitmap-bench"));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Save a 1 TiB bitmap, ~1% dirty, next to a raw write + fsync of the same number of bytes
/// (the floor any format pays), and load it back.
fn persistence(c: &mut Criterion) {
    let bitmap = DirtyBitmap::new(GRANULARITY_BYTES, DISK_SIZE_BYTES).expect("geometry");
    let mut state = 42;
    while bitmap.dirty_chunk_count() < bitmap.chunk_count() / 100 {
        bitmap.set((next_random(&mut state) % (DISK_SIZE_BYTES / GRANULARITY_BYTES)) * GRANULARITY_BYTES, 1).unwrap();
    }
    let dir = scratch_dir();
    let path = dir.join("bench.bitmap");
    let raw_path = dir.join("bench.raw");
    let raw_bytes: Vec<u8> = bitmap.to_words().iter().flat_map(|word| word.to_le_bytes()).collect();
    let mut group = c.benchmark_group("persist_1tib_1pct");
    group.throughput(Throughput::Bytes(raw_bytes.len() as u64));
    group.bench_function("save", |b| b.iter(|| tandem::bitmap::save(&path, "bench", &bitmap, false).unwrap()));
    group.bench_function("raw_write_fsync", |b| {
        b.iter(|| {
            use std::io::Write;
            let mut file = std::fs::File::create(&raw_path).unwrap();
            file.write_all(&raw_bytes).unwrap();
            file.sync_all().unwrap();
        })
    });
    group.bench_function("load", |b| b.iter(|| black_box(tandem::bitmap::load(&path).unwrap())));
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, random_marks, scans, persistence);
criterion_main!(benches);
