//! A shared mapping of a memory-backed file (tmpfs, ramfs), so the file driver reads and
//! writes it with memory copies instead of a syscall per request. Measured with a mirror whose
//! target sat on /dev/shm: pwrite was 19% of the process's CPU, most of it the page cache
//! lookup and the inode lock that two cores writing one file take in turn.
//!
//! Only a writable file whose every page is allocated is mapped, allocated once more with
//! fallocate before mapping (st_blocks can count a huge page past a 4 KiB hole), and the driver
//! never deallocates a page (zeroing writes zeros, discarding leaves the data): touching an
//! unallocated page of a full tmpfs, even to read it, raises SIGBUS where pwrite would return
//! ENOSPC. A read-only open cannot fallocate, so it is never mapped. A file shrunk or punched
//! under the engine by someone else still raises SIGBUS, as in any process that maps it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use tandem::{Error, Result};

/// The unit of every access to the mapping: one atomic word.
const WORD_BYTES: usize = 8;

/// The whole file, mapped shared.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len_bytes: usize,
}

// SAFETY: the mapping is memory shared with the page cache and with other threads (and
// processes) that read and write the file at once. Every access goes through atomic loads and
// stores (`words`), never through a plain reference or a plain
// copy, so overlapping requests in flight together are not a data race in Rust's memory
// model; they leave unspecified contents, as on any block device.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map `fd`, opened for writing, if the file is `size_bytes` long and fully allocated;
    /// `None` otherwise (the caller keeps using pread/pwrite).
    pub(crate) fn of_allocated_file(fd: &OwnedFd, size_bytes: u64) -> Option<Mapping> {
        // SAFETY: an all-zero libc::stat is a valid value (plain integers).
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat fills a struct on the stack through a valid pointer.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return None;
        }
        let allocated_bytes = (st.st_blocks as u64).saturating_mul(512);
        let len_bytes = usize::try_from(size_bytes).ok()?;
        if size_bytes == 0 || st.st_size as u64 != size_bytes || allocated_bytes < size_bytes {
            return None;
        }
        // SAFETY: plain syscall on an fd we own. Cheap when every page already exists.
        if unsafe { libc::fallocate(fd.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, size_bytes as i64) } != 0 {
            return None;
        }
        let protection = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a fresh shared mapping of an fd we own; the result is checked.
        let ptr =
            unsafe { libc::mmap(std::ptr::null_mut(), len_bytes, protection, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        Some(Mapping { ptr: NonNull::new(ptr.cast())?, len_bytes })
    }

    /// Copy `into.len()` bytes at `offset` out of the file.
    pub(crate) fn read(&self, offset: u64, into: &mut [u8]) -> Result<()> {
        let start = self.range(offset, into.len())?;
        self.copy_out(start, into);
        Ok(())
    }

    /// Copy `from` into the file at `offset`.
    pub(crate) fn write(&self, offset: u64, from: &[u8]) -> Result<()> {
        let start = self.range(offset, from.len())?;
        self.copy_in(start, from);
        Ok(())
    }

    /// Zeros over `[offset, offset + length_bytes)`, keeping the pages allocated.
    pub(crate) fn zero(&self, offset: u64, length_bytes: u64) -> Result<()> {
        let len = usize::try_from(length_bytes).map_err(|_| self.out_of_bounds(offset, length_bytes))?;
        let start = self.range(offset, len)?;
        let head = Self::head_bytes(start, len);
        self.store_partial(start, &[0u8; WORD_BYTES][..head]);
        let word_count = (len - head) / WORD_BYTES;
        self.words(start + head, word_count).iter().for_each(|word| word.store(0, Ordering::Relaxed));
        let tail_start = start + head + word_count * WORD_BYTES;
        self.store_partial(tail_start, &[0u8; WORD_BYTES][..start + len - tail_start]);
        Ok(())
    }

    /// A discard: the range's contents become unspecified, so they stay as they are (a hole
    /// punched here could later raise SIGBUS). Only the bounds are checked.
    pub(crate) fn discard(&self, offset: u64, length_bytes: u64) -> Result<()> {
        let len = usize::try_from(length_bytes).map_err(|_| self.out_of_bounds(offset, length_bytes))?;
        self.range(offset, len).map(drop)
    }

    /// The 8-byte words `[word_start, word_start + 8 * count)` of the mapping, as atomics.
    fn words(&self, word_start: usize, count: usize) -> &[AtomicU64] {
        assert!(word_start.is_multiple_of(WORD_BYTES));
        assert!(count == 0 || word_start + (count - 1) * WORD_BYTES < self.len_bytes);
        // SAFETY: the words start inside the mapping, which mmap made page-aligned, so they
        // are 8-aligned; the mapping's length is a whole number of pages (mmap rounds it up),
        // so a word that starts inside it is mapped whole. They live as long as `self`. Every
        // access to the mapping goes through 8-byte atomics like these, never plain or
        // other-sized accesses, so sharing them between threads is no data race.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(word_start).cast::<AtomicU64>(), count) }
    }

    /// Bytes from `start` to the next word boundary of the mapping, at most `len`.
    fn head_bytes(start: usize, len: usize) -> usize {
        ((WORD_BYTES - start % WORD_BYTES) % WORD_BYTES).min(len)
    }

    /// Copy `[start, start + into.len())` of the mapping into `into`: whole words in one tight
    /// loop (the common case: requests are aligned), partial words at either end.
    fn copy_out(&self, start: usize, into: &mut [u8]) {
        let head = Self::head_bytes(start, into.len());
        let (head_part, rest) = into.split_at_mut(head);
        self.copy_out_partial(start, head_part);
        let word_count = rest.len() / WORD_BYTES;
        let (body, tail) = rest.split_at_mut(word_count * WORD_BYTES);
        for (bytes, word) in body.chunks_exact_mut(WORD_BYTES).zip(self.words(start + head, word_count)) {
            bytes.copy_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes());
        }
        self.copy_out_partial(start + head + body.len(), tail);
    }

    /// Copy out fewer than 8 bytes that lie within one word.
    fn copy_out_partial(&self, start: usize, into: &mut [u8]) {
        if into.is_empty() {
            return;
        }
        let (word_start, within) = (start - start % WORD_BYTES, start % WORD_BYTES);
        assert!(within + into.len() <= WORD_BYTES, "a partial copy stays within its word");
        let bytes = self.words(word_start, 1)[0].load(Ordering::Relaxed).to_ne_bytes();
        into.copy_from_slice(&bytes[within..within + into.len()]);
    }

    /// Copy `from` into the mapping at `start`: whole words in one tight loop, partial words
    /// at either end.
    fn copy_in(&self, start: usize, from: &[u8]) {
        let head = Self::head_bytes(start, from.len());
        let (head_part, rest) = from.split_at(head);
        self.store_partial(start, head_part);
        let word_count = rest.len() / WORD_BYTES;
        let (body, tail) = rest.split_at(word_count * WORD_BYTES);
        for (bytes, word) in body.chunks_exact(WORD_BYTES).zip(self.words(start + head, word_count)) {
            word.store(u64::from_ne_bytes(bytes.try_into().expect("chunks of 8")), Ordering::Relaxed);
        }
        self.store_partial(start + head + body.len(), tail);
    }

    /// Store `bytes` (fewer than 8, within one word) at `start`, changing only those bytes of
    /// the word, so a neighbouring request's bytes of the same word survive.
    fn store_partial(&self, start: usize, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let (word_start, within) = (start - start % WORD_BYTES, start % WORD_BYTES);
        assert!(within + bytes.len() <= WORD_BYTES, "a partial store stays within its word");
        let (mut mask, mut value) = ([0u8; WORD_BYTES], [0u8; WORD_BYTES]);
        mask[within..within + bytes.len()].fill(0xff);
        value[within..within + bytes.len()].copy_from_slice(bytes);
        let (mask, value) = (u64::from_ne_bytes(mask), u64::from_ne_bytes(value));
        // One step (a compare-and-swap loop), so a reader never sees the bytes half replaced.
        let update = |old: u64| Some((old & !mask) | value);
        let _ = self.words(word_start, 1)[0].fetch_update(Ordering::Relaxed, Ordering::Relaxed, update);
    }

    fn range(&self, offset: u64, len: usize) -> Result<usize> {
        let end = offset.checked_add(len as u64).ok_or(Error::Overflow { offset, length_bytes: len as u64 })?;
        if end > self.len_bytes as u64 {
            return Err(self.out_of_bounds(offset, len as u64));
        }
        Ok(offset as usize)
    }

    fn out_of_bounds(&self, offset: u64, length_bytes: u64) -> Error {
        Error::OutOfBounds { offset, length_bytes, size_bytes: self.len_bytes as u64 }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `of_allocated_file` with this length and is dropped
        // once; nothing borrows it past a call.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len_bytes) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unaligned pieces go through partial words: each changes only its own bytes.
    #[test]
    fn pieces_of_words_change_only_their_own_bytes() {
        let dir = tempfile::tempdir_in("/dev/shm").expect("/dev/shm exists on Linux");
        let path = dir.path().join("mapped.img");
        let size_bytes = 8192u64;
        std::fs::write(&path, vec![0xaau8; size_bytes as usize]).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mapping = Mapping::of_allocated_file(&OwnedFd::from(file), size_bytes).expect("a full tmpfs file maps");
        let mut model = vec![0xaau8; size_bytes as usize];
        for (offset, len, byte) in [(5u64, 3usize, 1u8), (13, 8, 2), (4090, 20, 3), (0, 1, 4), (8191, 1, 5)] {
            mapping.write(offset, &vec![byte; len]).unwrap();
            model[offset as usize..offset as usize + len].fill(byte);
        }
        mapping.zero(100, 13).unwrap();
        model[100..113].fill(0);
        let mut back = vec![0u8; size_bytes as usize];
        mapping.read(0, &mut back).unwrap();
        assert!(back == model, "the mapping differs from the model");
        let mut piece = [0u8; 7];
        mapping.read(11, &mut piece).unwrap();
        assert_eq!(piece, model[11..18]);
        assert!(mapping.write(8190, &[0; 3]).is_err(), "past the end");
    }
}
