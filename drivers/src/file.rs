//! The file driver: a regular file or block device opened with O_DIRECT, its I/O submitted
//! through the reactor (io_uring or the thread pool). Refuses to fall back to the page cache
//! silently: where O_DIRECT is refused it names the path and errno, unless asked to allow it.
//! A file in RAM (tmpfs, ramfs) is read and written inline instead: see `is_in_memory`; with
//! memory copies through a mapping where every page of it is allocated (`mapped.rs`).

use crate::mapped::Mapping;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tandem::block::{
    map_done, map_transfer, Alignment, BlockDriver, BlockStatus, BufResult, Capabilities, Extent, IoFuture, OpContext,
    WriteFlags,
};
use tandem::buf::AlignedBuf;
use tandem::reactor::{Op, OpKind, RuntimeHandle, SharedFd};
use tandem::{Error, IoPriority, Result};

/// Alignment assumed where the kernel cannot tell (no STATX_DIOALIGN): a page satisfies every
/// filesystem and device seen in practice.
const FALLBACK_ALIGN_BYTES: u64 = 4096;
const STATX_DIOALIGN: u32 = 0x2000;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

/// How to open a file.
#[derive(Debug, Clone, Default)]
pub struct FileOptions {
    pub read_only: bool,
    /// Use the page cache where O_DIRECT is refused (with a log line) instead of failing.
    pub allow_buffered: bool,
    /// Use the page cache on purpose (fio's direct=0).
    pub buffered: bool,
    /// Create the file if missing and make it at least this large (zero-filled, sparse).
    pub create_size_bytes: Option<u64>,
}

/// A file or block device.
pub struct FileDriver {
    name: String,
    path: PathBuf,
    /// Shared with every operation in flight: dropping the driver closes the file only when
    /// the kernel is done with the last of them.
    fd: SharedFd,
    size_bytes: u64,
    alignment: Alignment,
    direct: bool,
    read_only: bool,
    /// A block device: no extents to ask about (block_status says data everywhere).
    block_device: bool,
    /// On tmpfs or ramfs: reads and writes are memory copies, done inline (see
    /// [`FileDriver::is_in_memory`]).
    in_memory: bool,
    /// An in-memory file with every page allocated, mapped: requests are memory copies.
    mapping: Option<Arc<Mapping>>,
    runtime: RuntimeHandle,
}

/// Which way an inline transfer goes.
#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

impl FileDriver {
    /// Open `path` for I/O through `runtime`.
    pub fn open(runtime: &RuntimeHandle, path: impl AsRef<Path>, options: &FileOptions) -> Result<FileDriver> {
        let path = path.as_ref().to_path_buf();
        let (fd, direct) = open_fd(&path, options)?;
        if let Some(size_bytes) = options.create_size_bytes {
            grow(&fd, &path, size_bytes)?;
        }
        let size_bytes = device_size(&fd, &path)?;
        let alignment = if direct { dio_alignment(&fd) } else { Alignment { request_bytes: 1, memory_bytes: 1 } };
        let name = format!("file:{}", path.display());
        let in_memory = is_memory_fs(&fd);
        let block_device = is_block_device(&fd);
        let mapping = match in_memory && !options.read_only {
            true => Mapping::of_allocated_file(&fd, size_bytes).map(Arc::new),
            false => None,
        };
        let driver = FileDriver {
            name,
            path,
            fd: SharedFd::new(fd),
            size_bytes,
            alignment,
            direct,
            read_only: options.read_only,
            block_device,
            in_memory,
            mapping,
            runtime: runtime.clone(),
        };
        Ok(driver)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether I/O bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Whether the file lives in RAM (tmpfs, ramfs). Its reads and writes then run inline on
    /// the calling thread: io_uring cannot do them without blocking, so it would hand each
    /// one to an io-wq thread (measured: every 4 KiB write), and a thread hand-off costs
    /// more CPU than the memory copy itself.
    pub fn is_in_memory(&self) -> bool {
        self.in_memory
    }

    /// Whether an in-memory file is served by memory copies through a mapping (it was fully
    /// allocated when opened) rather than pread/pwrite.
    pub fn is_mapped(&self) -> bool {
        self.mapping.is_some()
    }

    /// A read or write done at once, through the mapping or with pread/pwrite (memory-backed
    /// files only).
    fn transfer_inline(&self, direction: Direction, offset: u64, mut buf: AlignedBuf, fua: bool) -> BufResult<()> {
        let result = match (&self.mapping, direction) {
            (Some(mapping), Direction::Read) => mapping.read(offset, buf.as_mut_slice()),
            (Some(mapping), Direction::Write) => mapping.write(offset, buf.as_slice()),
            (None, _) => return self.transfer_syscall(direction, offset, buf, fua),
        };
        if let Err(error) = result {
            return (Err(error), buf);
        }
        (self.flush_inline(fua, offset), buf)
    }

    /// pread/pwrite, for an in-memory file that is not mapped.
    fn transfer_syscall(&self, direction: Direction, offset: u64, mut buf: AlignedBuf, fua: bool) -> BufResult<()> {
        let (fd, length_bytes) = (self.fd.as_fd().as_raw_fd(), buf.len());
        let op = match direction {
            Direction::Read => "read",
            Direction::Write => "write",
        };
        let done = loop {
            // SAFETY: the buffer is valid for its length and owned here for the call.
            let rc = unsafe {
                match direction {
                    Direction::Read => libc::pread(fd, buf.as_mut_ptr().cast(), length_bytes, offset as i64),
                    Direction::Write => libc::pwrite(fd, buf.as_ptr().cast(), length_bytes, offset as i64),
                }
            };
            match rc {
                rc if rc >= 0 => break rc as u64,
                _ if last_errno() == libc::EINTR => continue,
                _ => return (Err(Error::Io { op, offset, errno: last_errno() }), buf),
            }
        };
        if done != length_bytes as u64 {
            let error = Error::ShortTransfer { op, offset, done_bytes: done, length_bytes: length_bytes as u64 };
            return (Err(error), buf);
        }
        (self.flush_inline(fua, offset), buf)
    }

    /// RAM has nothing to make durable, but a FUA write keeps its meaning if the file system
    /// ever does.
    fn flush_inline(&self, fua: bool, offset: u64) -> Result<()> {
        // SAFETY: plain syscall on an fd we own.
        if fua && unsafe { libc::fdatasync(self.fd.as_fd().as_raw_fd()) } != 0 {
            return Err(Error::Io { op: "flush", offset, errno: last_errno() });
        }
        Ok(())
    }

    fn submit(&self, kind: OpKind, buf: Option<AlignedBuf>, priority: IoPriority) -> tandem::reactor::OpFuture {
        self.runtime.submit(Op { kind, buf, priority })
    }

    fn fallocate(
        &self,
        op: &'static str,
        mode: i32,
        offset: u64,
        length_bytes: u64,
        priority: IoPriority,
    ) -> IoFuture<Result<()>> {
        let fd = self.fd.clone();
        let future = self.submit(OpKind::Fallocate { fd, mode, offset, length_bytes }, None, priority);
        IoFuture::op(future, OpContext { op, offset }, map_done)
    }
}

fn open_fd(path: &Path, options: &FileOptions) -> Result<(OwnedFd, bool)> {
    if options.buffered {
        return open_raw(path, options, false).map(|fd| (fd, false)).map_err(|errno| open_error(path, errno));
    }
    match open_raw(path, options, true) {
        Ok(fd) => Ok((fd, true)),
        Err(errno) if errno == libc::EINVAL && options.allow_buffered => {
            tandem::log::line(&format!("{} refuses O_DIRECT; using the page cache as asked", path.display()));
            open_raw(path, options, false).map(|fd| (fd, false)).map_err(|errno| open_error(path, errno))
        }
        Err(libc::EINVAL) => Err(Error::DirectIoRefused { path: path.display().to_string(), errno: libc::EINVAL }),
        Err(errno) => Err(open_error(path, errno)),
    }
}

fn open_error(path: &Path, errno: i32) -> Error {
    Error::Open { path: path.display().to_string(), errno }
}

fn open_raw(path: &Path, options: &FileOptions, direct: bool) -> std::result::Result<OwnedFd, i32> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| libc::EINVAL)?;
    let mut flags = libc::O_CLOEXEC | if options.read_only { libc::O_RDONLY } else { libc::O_RDWR };
    if direct {
        flags |= libc::O_DIRECT;
    }
    if options.create_size_bytes.is_some() && !options.read_only {
        flags |= libc::O_CREAT;
    }
    // SAFETY: c_path is a valid NUL-terminated string; the fd is checked before use.
    let fd = unsafe { libc::open(c_path.as_ptr(), flags, 0o644) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO));
    }
    // SAFETY: fd was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn grow(fd: &OwnedFd, path: &Path, size_bytes: u64) -> Result<()> {
    let current = device_size(fd, path)?;
    if current >= size_bytes {
        return Ok(());
    }
    // SAFETY: plain syscall on an fd we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size_bytes as i64) } != 0 {
        return Err(open_error(path, last_errno()));
    }
    Ok(())
}

/// Whether `fd` is a regular file in RAM. Only regular files: a block device's node lives on
/// devtmpfs, which reports tmpfs's magic, yet its I/O goes to the device and must go through
/// the ring (inline, a device read would block the core).
fn is_memory_fs(fd: &OwnedFd) -> bool {
    if file_type(fd) != Some(libc::S_IFREG) {
        return false;
    }
    // SAFETY: an all-zero statfs is a valid value (plain integers).
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs fills the struct on the stack; the fd is ours and open.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    matches!(st.f_type as i64, TMPFS_MAGIC | RAMFS_MAGIC)
}

fn is_block_device(fd: &OwnedFd) -> bool {
    file_type(fd) == Some(libc::S_IFBLK)
}

/// The file's type bits (`S_IFREG`, `S_IFBLK`, ...); `None` if fstat fails.
fn file_type(fd: &OwnedFd) -> Option<libc::mode_t> {
    // SAFETY: an all-zero stat is a valid value (plain integers).
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat fills the struct on the stack; the fd is ours and open.
    let ok = unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } == 0;
    ok.then_some(stat.st_mode & libc::S_IFMT)
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

fn device_size(fd: &OwnedFd, path: &Path) -> Result<u64> {
    // SAFETY: an all-zero stat is a valid value (plain integers).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat fills the struct on the stack; the fd is ours and open.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(open_error(path, last_errno()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFBLK {
        return Ok(st.st_size as u64);
    }
    let mut size_bytes = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64.
    if unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64, &mut size_bytes) } != 0 {
        return Err(open_error(path, last_errno()));
    }
    Ok(size_bytes)
}

/// O_DIRECT alignment from statx's DIOALIGN (Linux 6.1+), the device's logical block size for
/// block devices, or a page.
fn dio_alignment(fd: &OwnedFd) -> Alignment {
    // SAFETY: an all-zero statx is a valid value (plain integers).
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx fills the struct on the stack; AT_EMPTY_PATH with "" names the fd itself.
    let ok = unsafe { libc::statx(fd.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, STATX_DIOALIGN, &mut stx) } == 0;
    if ok && stx.stx_mask & STATX_DIOALIGN != 0 && stx.stx_dio_offset_align > 0 && stx.stx_dio_mem_align > 0 {
        return Alignment {
            request_bytes: u64::from(stx.stx_dio_offset_align),
            memory_bytes: u64::from(stx.stx_dio_mem_align),
        };
    }
    let mut logical_bytes: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int; on a regular file it fails and we fall back.
    if unsafe { libc::ioctl(fd.as_raw_fd(), BLKSSZGET, &mut logical_bytes) } == 0 && logical_bytes > 0 {
        let bytes = logical_bytes as u64;
        return Alignment { request_bytes: bytes, memory_bytes: bytes };
    }
    Alignment { request_bytes: FALLBACK_ALIGN_BYTES, memory_bytes: FALLBACK_ALIGN_BYTES }
}

impl BlockDriver for FileDriver {
    fn name(&self) -> &str {
        &self.name
    }

    fn device_id(&self) -> Option<(u64, u64)> {
        // SAFETY: an all-zero stat is a valid value (plain integers).
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat fills the struct on the stack; the fd is ours and open.
        (unsafe { libc::fstat(self.fd.as_fd().as_raw_fd(), &mut st) } == 0).then_some((st.st_dev, st.st_ino))
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn alignment(&self) -> Alignment {
        self.alignment
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { read_only: self.read_only, fua: true, write_zeroes: true, discard: true, block_status: true }
    }

    fn read(&self, offset: u64, buf: AlignedBuf, priority: IoPriority) -> IoFuture<BufResult<()>> {
        if self.in_memory {
            return IoFuture::ready(self.transfer_inline(Direction::Read, offset, buf, false));
        }
        let future = self.submit(OpKind::Read { fd: self.fd.clone(), offset }, Some(buf), priority);
        IoFuture::op(future, OpContext { op: "read", offset }, map_transfer)
    }

    fn write(&self, offset: u64, buf: AlignedBuf, flags: WriteFlags, priority: IoPriority) -> IoFuture<BufResult<()>> {
        if self.in_memory {
            return IoFuture::ready(self.transfer_inline(Direction::Write, offset, buf, flags.fua));
        }
        let kind = OpKind::Write { fd: self.fd.clone(), offset, fua: flags.fua };
        let future = self.submit(kind, Some(buf), priority);
        IoFuture::op(future, OpContext { op: "write", offset }, map_transfer)
    }

    fn flush(&self, priority: IoPriority) -> IoFuture<Result<()>> {
        let future = self.submit(OpKind::Fsync { fd: self.fd.clone(), datasync: true }, None, priority);
        IoFuture::op(future, OpContext { op: "flush", offset: 0 }, map_done)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        length_bytes: u64,
        may_unmap: bool,
        priority: IoPriority,
    ) -> IoFuture<Result<()>> {
        if let Some(mapping) = &self.mapping {
            return zero_mapped(mapping.clone(), offset, length_bytes);
        }
        let mode = match may_unmap {
            true => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            false => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        };
        self.fallocate("write_zeroes", mode, offset, length_bytes, priority)
    }

    fn discard(&self, offset: u64, length_bytes: u64, priority: IoPriority) -> IoFuture<Result<()>> {
        if let Some(mapping) = &self.mapping {
            return IoFuture::ready(mapping.discard(offset, length_bytes));
        }
        self.fallocate(
            "discard",
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            length_bytes,
            priority,
        )
    }

    /// From SEEK_DATA/SEEK_HOLE: metadata only, answered by the filesystem without device I/O,
    /// so it runs inline. Unwritten (preallocated) extents read as zeros and report as holes.
    fn block_status(&self, offset: u64, length_bytes: u64) -> IoFuture<Result<Extent>> {
        if self.block_device {
            // lseek(SEEK_DATA) is EINVAL on a block device, and a device has no holes to tell.
            let length_bytes = length_bytes.min(self.size_bytes.saturating_sub(offset));
            return IoFuture::ready(Ok(Extent { status: BlockStatus::Data, offset, length_bytes }));
        }
        IoFuture::ready(seek_extent(self.fd.as_fd().as_raw_fd(), offset, length_bytes, self.size_bytes))
    }
}

/// How much of a mapped file one step of write_zeroes clears before it lets other tasks on the
/// core run: a whole-disk write_zeroes would otherwise hold the core for seconds.
const ZERO_STEP_BYTES: u64 = 1 << 20;

/// Zeros, never a hole (see mapped.rs), a step at a time.
fn zero_mapped(mapping: Arc<Mapping>, offset: u64, length_bytes: u64) -> IoFuture<Result<()>> {
    if length_bytes <= ZERO_STEP_BYTES {
        return IoFuture::ready(mapping.zero(offset, length_bytes));
    }
    IoFuture::boxed(async move {
        let end = offset.checked_add(length_bytes).ok_or(Error::Overflow { offset, length_bytes })?;
        let mut at = offset;
        while at < end {
            let step_bytes = (end - at).min(ZERO_STEP_BYTES);
            mapping.zero(at, step_bytes)?;
            at += step_bytes;
            tandem::reactor::yield_now().await;
        }
        Ok(())
    })
}

fn seek_extent(fd: i32, offset: u64, length_bytes: u64, size_bytes: u64) -> Result<Extent> {
    let end = (offset + length_bytes).min(size_bytes);
    // SAFETY: lseek on an fd we own; no memory involved.
    let data = unsafe { libc::lseek(fd, offset as i64, libc::SEEK_DATA) };
    let extent = |status, stop: u64| Extent { status, offset, length_bytes: stop.min(end) - offset };
    if data < 0 {
        return match last_errno() {
            libc::ENXIO => Ok(extent(BlockStatus::Hole, end)), // no data after offset
            errno => Err(Error::Io { op: "block_status", offset, errno }),
        };
    }
    if data as u64 > offset {
        return Ok(extent(BlockStatus::Hole, data as u64));
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, offset as i64, libc::SEEK_HOLE) };
    if hole < 0 {
        return Err(Error::Io { op: "block_status", offset, errno: last_errno() });
    }
    Ok(extent(BlockStatus::Data, (hole as u64).max(offset + 1)))
}
