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
// stores (`copy_out`, `copy_in`, `fill_zero`), never through a plain reference or a plain
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
        let mut at = start;
        while at < start + len {
            let word_start = at - at % WORD_BYTES;
            let piece = (word_start + WORD_BYTES).min(start + len) - at;
            self.store_bytes(word_start, at - word_start, &[0u8; WORD_BYTES][..piece]);
            at += piece;
        }
        Ok(())
    }

    /// A discard: the range's contents become unspecified, so they stay as they are (a hole
    /// punched here could later raise SIGBUS). Only the bounds are checked.
    pub(crate) fn discard(&self, offset: u64, length_bytes: u64) -> Result<()> {
        let len = usize::try_from(length_bytes).map_err(|_| self.out_of_bounds(offset, length_bytes))?;
        self.range(offset, len).map(drop)
    }

    /// The 8-byte word at `word_start` (a multiple of 8) of the mapping, as an atomic.
    fn word(&self, word_start: usize) -> &AtomicU64 {
        assert!(word_start.is_multiple_of(WORD_BYTES) && word_start < self.len_bytes);
        // SAFETY: the word starts inside the mapping, which mmap made page-aligned, so it is
        // 8-aligned; the mapping's length is a whole number of pages (mmap rounds it up), so
        // all 8 bytes are mapped. It lives as long as `self`. Every access to the mapping goes
        // through 8-byte atomics like this one, never plain or other-sized accesses.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(word_start).cast()) }
    }

    /// Copy `[start, start + into.len())` of the mapping into `into`, a word at a time.
    fn copy_out(&self, start: usize, into: &mut [u8]) {
        let mut done = 0;
        while done < into.len() {
            let at = start + done;
            let (word_start, within) = (at - at % WORD_BYTES, at % WORD_BYTES);
            let piece = (WORD_BYTES - within).min(into.len() - done);
            let bytes = self.word(word_start).load(Ordering::Relaxed).to_ne_bytes();
            into[done..done + piece].copy_from_slice(&bytes[within..within + piece]);
            done += piece;
        }
    }

    /// Copy `from` into the mapping at `start`, a word at a time.
    fn copy_in(&self, start: usize, from: &[u8]) {
        let mut done = 0;
        while done < from.len() {
            let at = start + done;
            let (word_start, within) = (at - at % WORD_BYTES, at % WORD_BYTES);
            let piece = (WORD_BYTES - within).min(from.len() - done);
            self.store_bytes(word_start, within, &from[done..done + piece]);
            done += piece;
        }
    }

    /// Store `bytes` at `within` of the word at `word_start`: a whole word is one store; a
    /// part changes only its own bytes, so a neighbouring request's bytes of the same word
    /// survive.
    fn store_bytes(&self, word_start: usize, within: usize, bytes: &[u8]) {
        assert!(within + bytes.len() <= WORD_BYTES && !bytes.is_empty());
        let word = self.word(word_start);
        if bytes.len() == WORD_BYTES {
            word.store(u64::from_ne_bytes(bytes.try_into().expect("8 bytes")), Ordering::Relaxed);
            return;
        }
        let (mut mask, mut value) = ([0u8; WORD_BYTES], [0u8; WORD_BYTES]);
        mask[within..within + bytes.len()].fill(0xff);
        value[within..within + bytes.len()].copy_from_slice(bytes);
        let mask = u64::from_ne_bytes(mask);
        word.fetch_and(!mask, Ordering::Relaxed);
        word.fetch_or(u64::from_ne_bytes(value), Ordering::Relaxed);
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
