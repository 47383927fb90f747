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
use tandem::{Error, Result};

/// The whole file, mapped shared.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len_bytes: usize,
}

// SAFETY: the mapping is plain memory shared with the page cache; every access copies bytes
// in or out and never forms a reference that outlives the call. Overlapping requests in
// flight at once leave unspecified contents, as on any block device.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map `fd`, opened for writing, if the file is `size_bytes` long and fully allocated;
    /// `None` otherwise (the caller keeps using pread/pwrite).
    pub(crate) fn of_allocated_file(fd: &OwnedFd, size_bytes: u64) -> Option<Mapping> {
        // SAFETY: fstat fills a zeroed struct on the stack.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
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
        // SAFETY: `range` checked that [start, start + len) lies inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(start), into.as_mut_ptr(), into.len()) };
        Ok(())
    }

    /// Copy `from` into the file at `offset`.
    pub(crate) fn write(&self, offset: u64, from: &[u8]) -> Result<()> {
        let start = self.range(offset, from.len())?;
        // SAFETY: inside the mapping (checked), which is writable.
        unsafe { std::ptr::copy_nonoverlapping(from.as_ptr(), self.ptr.as_ptr().add(start), from.len()) };
        Ok(())
    }

    /// Zeros over `[offset, offset + length_bytes)`, keeping the pages allocated.
    pub(crate) fn zero(&self, offset: u64, length_bytes: u64) -> Result<()> {
        let len = usize::try_from(length_bytes).map_err(|_| self.out_of_bounds(offset, length_bytes))?;
        let start = self.range(offset, len)?;
        // SAFETY: inside the mapping (checked), which is writable.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(start), 0, len) };
        Ok(())
    }

    /// A discard: the range's contents become unspecified, so they stay as they are (a hole
    /// punched here could later raise SIGBUS). Only the bounds are checked.
    pub(crate) fn discard(&self, offset: u64, length_bytes: u64) -> Result<()> {
        let len = usize::try_from(length_bytes).map_err(|_| self.out_of_bounds(offset, length_bytes))?;
        self.range(offset, len).map(drop)
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
