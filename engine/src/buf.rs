//! Aligned, owned I/O buffers and the bounded pool they come from.
//!
//! A buffer moves into an I/O operation and comes back with its result; while the kernel may
//! touch it, the operation (not the caller) owns it. The pool bounds the bytes handed out so a
//! runaway caller gets a typed error instead of exhausting memory.
//!
//! A core's pool carves its buffers from one arena that the core registers with its ring
//! (IORING_REGISTER_BUFFERS): I/O on such a buffer uses READ_FIXED/WRITE_FIXED, so the kernel
//! does not pin the user pages again on every request.

use crate::error::{Error, Result};
use parking_lot::Mutex;
use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Alignment used when the caller has no better figure: a page satisfies every O_DIRECT
/// memory-alignment rule seen on Linux.
pub const DEFAULT_ALIGN_BYTES: usize = 4096;

/// A heap buffer whose address is aligned for O_DIRECT. Its length may be shrunk below its
/// capacity (for a short request) without reallocating.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
    align: usize,
    home: Option<Arc<PoolShared>>,
    /// A slice of its pool's arena: the memory belongs to the arena, never to this buffer.
    from_arena: bool,
}

// SAFETY: an AlignedBuf uniquely owns its allocation, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only hand out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes aligned to `align` (a power of two).
    pub fn zeroed(len: usize, align: usize) -> Result<AlignedBuf> {
        let layout = layout_for(len, align)?;
        // SAFETY: layout has a non-zero size (layout_for rounds 0 up to one alignment unit).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        Ok(AlignedBuf { ptr, len, capacity: layout.size(), align, home: None, from_arena: false })
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8], align: usize) -> Result<AlignedBuf> {
        let mut buf = AlignedBuf::zeroed(data.len(), align)?;
        buf.as_mut_slice().copy_from_slice(data);
        Ok(buf)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn align(&self) -> usize {
        self.align
    }

    /// Change the length within the capacity (new bytes keep whatever they held).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity, "set_len {len} beyond capacity {}", self.capacity);
        self.len = len;
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for capacity >= len bytes, initialised at allocation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The key of the ring this buffer is registered with, if any (see [`BufPool`]).
    pub fn fixed_key(&self) -> Option<u64> {
        let home = self.home.as_ref().filter(|_| self.from_arena)?;
        match home.fixed_key.load(Ordering::Acquire) {
            0 => None,
            key => Some(key),
        }
    }

    /// Whether every byte is zero (zero detection for copies).
    pub fn is_all_zero(&self) -> bool {
        // SAFETY: every bit pattern is a valid u64, and align_to only reinterprets the aligned
        // middle of a slice we borrow for this call.
        let (head, words, tail) = unsafe { self.as_slice().align_to::<u64>() };
        head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            let (ptr, len, capacity, align, from_arena) =
                (self.ptr, self.len, self.capacity, self.align, self.from_arena);
            home.give_back(AlignedBuf { ptr, len, capacity, align, home: None, from_arena });
            return;
        }
        if self.from_arena {
            return; // the arena's own allocation frees it
        }
        let layout = Layout::from_size_align(self.capacity, self.align).expect("layout checked at allocation");
        // SAFETY: allocated in `zeroed` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf {{ len: {}, capacity: {}, align: {} }}", self.len, self.capacity, self.align)
    }
}

fn layout_for(len: usize, align: usize) -> Result<Layout> {
    if align == 0 || !align.is_power_of_two() {
        return Err(Error::BadAlignment { align_bytes: align as u64 });
    }
    let too_large = || Error::TooLarge { length_bytes: len as u64, max_bytes: isize::MAX as u64 };
    // Checked: `div_ceil(align) * align` wraps for lengths near usize::MAX, and a wrapped size
    // would allocate a few bytes for a huge buffer.
    let size = rounded_up(len, align).ok_or_else(too_large)?;
    let layout = Layout::from_size_align(size, align).map_err(|_| too_large())?;
    debug_assert!(layout.size() >= len && layout.size().is_multiple_of(align));
    Ok(layout)
}

/// `len` (at least 1) rounded up to a multiple of `align` (a power of two); `None` on overflow.
fn rounded_up(len: usize, align: usize) -> Option<usize> {
    debug_assert!(align.is_power_of_two());
    len.max(1).div_ceil(align).checked_mul(align)
}

/// A bounded pool of aligned buffers. Cloning shares the pool.
///
/// ```
/// use tandem::buf::BufPool;
/// let pool = BufPool::new(8192, 4096);
/// let a = pool.get(4096).unwrap();
/// let b = pool.get(4096).unwrap();
/// assert!(pool.get(4096).is_err()); // the limit holds
/// drop(a);
/// assert!(pool.get(4096).is_ok()); // a came back to the pool
/// # drop(b);
/// ```
#[derive(Clone)]
pub struct BufPool {
    shared: Arc<PoolShared>,
}

struct PoolShared {
    align: usize,
    limit_bytes: usize,
    state: Mutex<PoolState>,
    /// The ring that registered the arena (0: none).
    fixed_key: AtomicU64,
}

struct PoolState {
    in_use_bytes: usize,
    free: Vec<AlignedBuf>,
    /// One allocation the pool carves buffers from (bump allocation; freed slices go to
    /// `free` and are reused by size). Never handed out itself.
    arena: Option<AlignedBuf>,
    arena_used_bytes: usize,
}

/// Free buffers kept for reuse at most; beyond it they are released to the allocator.
const POOL_FREE_COUNT_MAX: usize = 1024;

impl BufPool {
    /// A pool that hands out at most `limit_bytes` at a time, aligned to `align`.
    pub fn new(limit_bytes: usize, align: usize) -> BufPool {
        BufPool::with_arena(limit_bytes, align, 0).expect("no arena to allocate")
    }

    /// A pool whose first `arena_bytes` of buffers come from one allocation that a ring can
    /// register (see [`BufPool::arena`]).
    pub fn with_arena(limit_bytes: usize, align: usize, arena_bytes: usize) -> Result<BufPool> {
        let arena = match arena_bytes {
            0 => None,
            bytes => Some(AlignedBuf::zeroed(bytes, align)?),
        };
        let state = Mutex::new(PoolState { in_use_bytes: 0, free: Vec::new(), arena, arena_used_bytes: 0 });
        Ok(BufPool { shared: Arc::new(PoolShared { align, limit_bytes, state, fixed_key: AtomicU64::new(0) }) })
    }

    /// The arena's address and length, for registration with a ring.
    pub fn arena(&self) -> Option<(*mut u8, usize)> {
        let mut state = self.shared.state.lock();
        state.arena.as_mut().map(|arena| (arena.as_mut_ptr(), arena.capacity()))
    }

    /// Record that the ring with `key` registered the arena as its buffer 0.
    pub fn set_fixed_key(&self, key: u64) {
        assert_ne!(key, 0, "0 means unregistered");
        self.shared.fixed_key.store(key, Ordering::Release);
    }

    /// A buffer of `len` bytes (contents unspecified), or `BufferLimit` if the pool is spent.
    pub fn get(&self, len: usize) -> Result<AlignedBuf> {
        let shared = &self.shared;
        let mut state = shared.state.lock();
        let too_large = Error::TooLarge { length_bytes: len as u64, max_bytes: shared.limit_bytes as u64 };
        let Some(capacity) = rounded_up(len, shared.align) else { return Err(too_large) };
        if capacity > shared.limit_bytes.saturating_sub(state.in_use_bytes) {
            return Err(Error::BufferLimit {
                requested_bytes: len as u64,
                in_use_bytes: state.in_use_bytes as u64,
                limit_bytes: shared.limit_bytes as u64,
            });
        }
        state.in_use_bytes += capacity;
        debug_assert!(state.in_use_bytes <= shared.limit_bytes, "the check above bounds the pool");
        let reuse = state.free.iter().position(|b| b.capacity == capacity);
        let mut buf = match reuse {
            Some(index) => state.free.swap_remove(index),
            None => match carve(&mut state, capacity, shared.align) {
                Some(buf) => buf,
                None => {
                    drop(state);
                    AlignedBuf::zeroed(len, shared.align).inspect_err(|_| self.shared.release(capacity))?
                }
            },
        };
        buf.set_len(len);
        buf.home = Some(shared.clone());
        Ok(buf)
    }

    pub fn in_use_bytes(&self) -> usize {
        self.shared.state.lock().in_use_bytes
    }

    pub fn limit_bytes(&self) -> usize {
        self.shared.limit_bytes
    }

    /// The alignment of every buffer the pool hands out.
    pub fn align(&self) -> usize {
        self.shared.align
    }
}

/// A slice of the arena's unused tail, if it has room.
fn carve(state: &mut PoolState, capacity: usize, align: usize) -> Option<AlignedBuf> {
    let used_bytes = state.arena_used_bytes;
    let arena = state.arena.as_mut()?;
    assert!(used_bytes <= arena.capacity(), "the arena is never carved past its end");
    if capacity > arena.capacity() - used_bytes {
        return None;
    }
    // SAFETY: used_bytes + capacity is within the arena's allocation.
    let ptr = NonNull::new(unsafe { arena.as_mut_ptr().add(used_bytes) }).expect("inside a live allocation");
    state.arena_used_bytes += capacity;
    Some(AlignedBuf { ptr, len: capacity, capacity, align, home: None, from_arena: true })
}

impl PoolShared {
    fn release(&self, capacity: usize) {
        let mut state = self.state.lock();
        assert!(state.in_use_bytes >= capacity, "pool accounting underflow");
        state.in_use_bytes -= capacity;
    }

    fn give_back(&self, buf: AlignedBuf) {
        let mut state = self.state.lock();
        assert!(state.in_use_bytes >= buf.capacity, "pool accounting underflow");
        state.in_use_bytes -= buf.capacity;
        // Arena slices are always kept: their memory cannot go back to the allocator alone.
        if buf.from_arena || state.free.len() < POOL_FREE_COUNT_MAX {
            state.free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_zeroed() {
        for align in [512, 4096, 65536] {
            let buf = AlignedBuf::zeroed(1000, align).unwrap();
            assert_eq!(buf.as_ptr() as usize % align, 0);
            assert_eq!(buf.capacity() % align, 0);
            assert!(buf.is_all_zero());
        }
        assert_eq!(AlignedBuf::zeroed(10, 3).unwrap_err(), Error::BadAlignment { align_bytes: 3 });
    }

    #[test]
    fn zero_detection_sees_a_single_byte() {
        let mut buf = AlignedBuf::zeroed(8192, 4096).unwrap();
        buf.as_mut_slice()[8191] = 1;
        assert!(!buf.is_all_zero());
    }

    #[test]
    fn arena_slices_are_carved_then_reused_and_never_freed_alone() {
        let pool = BufPool::with_arena(1 << 20, 4096, 16384).unwrap();
        let (base, arena_bytes) = pool.arena().unwrap();
        assert_eq!(arena_bytes, 16384);
        let a = pool.get(8192).unwrap();
        let b = pool.get(8192).unwrap();
        assert_eq!(a.as_ptr(), base as *const u8);
        assert_eq!(b.as_ptr() as usize, base as usize + 8192);
        assert_eq!(a.fixed_key(), None, "not registered yet");
        pool.set_fixed_key(7);
        assert_eq!(b.fixed_key(), Some(7));
        let c = pool.get(4096).unwrap();
        assert_eq!(c.fixed_key(), None, "the arena is full: a heap buffer");
        let a_ptr = a.as_ptr();
        drop(a);
        let again = pool.get(8192).unwrap();
        assert_eq!(again.as_ptr(), a_ptr, "the freed slice is reused");
        assert_eq!(again.fixed_key(), Some(7));
        drop((again, b, c, pool)); // arena freed once, with the pool
    }

    #[test]
    fn pool_bounds_and_recycles() {
        let pool = BufPool::new(3 * 4096, 4096);
        let a = pool.get(4096).unwrap();
        let ptr = a.as_ptr();
        let _b = pool.get(8192).unwrap();
        let err = pool.get(1).unwrap_err();
        assert!(matches!(err, Error::BufferLimit { in_use_bytes: 12288, .. }), "{err}");
        drop(a);
        assert_eq!(pool.in_use_bytes(), 8192);
        let c = pool.get(4096).unwrap();
        assert_eq!(c.as_ptr(), ptr, "the freed buffer is reused");
    }

    #[test]
    fn lengths_whose_rounding_overflows_are_refused_not_wrapped() {
        for len in [usize::MAX, usize::MAX - 1, usize::MAX - 4094, isize::MAX as usize + 1] {
            let err = AlignedBuf::zeroed(len, 4096).unwrap_err();
            assert!(matches!(err, Error::TooLarge { length_bytes, .. } if length_bytes == len as u64), "{len}: {err}");
        }
        let pool = BufPool::new(1 << 20, 4096);
        for len in [usize::MAX, usize::MAX - 4094] {
            let err = pool.get(len).unwrap_err();
            assert!(matches!(err, Error::TooLarge { length_bytes, .. } if length_bytes == len as u64), "{len}: {err}");
        }
        assert_eq!(pool.in_use_bytes(), 0, "a refused request takes nothing from the pool");
    }
}
