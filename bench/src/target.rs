//! Opening what a job names: a file (created and laid out like fio does when it is missing or
//! short), a block device (used as it is: never laid out, its size from the device), a Ceph
//! RBD image (`rbd:POOL/IMAGE[:conf=...]`, QEMU's spelling; created and laid out when missing
//! and a size is given), an NBD export (`nbd://HOST[:PORT]/EXPORT` or
//! `nbd+unix:///EXPORT?socket=PATH`: used as it is, never laid out) or the null device. Jobs
//! that name the same file share one driver.
//! A target that no job writes is opened read-only and nothing in it is written, except the
//! laid-out part the bench itself appended to a regular file.

use crate::fio::{JobSpec, RwMode};
use std::collections::HashMap;
use std::sync::Arc;
use tandem::block::{Disk, WriteFlags};
use tandem::buf::AlignedBuf;
use tandem::reactor::RuntimeHandle;
use tandem::IoPriority;
use tandem_drivers::rbd::{RbdDriver, RbdError, RbdOptions, RbdSpec};
use tandem_drivers::{FileDriver, FileOptions, NullDriver};

/// Chunk written when laying out a file.
const LAYOUT_CHUNK_BYTES: usize = 1 << 20;

/// Errors of the bench harness; each names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("job '{job}': no filename given (use --filename=PATH, or --ioengine=null)")]
    NoFilename { job: String },
    #[error("job '{job}': no size given and {path} does not exist (use --size=)")]
    NoSize { job: String, path: String },
    #[error("job '{job}': {source}")]
    Engine { job: String, source: tandem::Error },
    #[error("job '{job}': {source}")]
    Rbd { job: String, source: RbdError },
    #[error("job '{job}': {source}")]
    Nbd { job: String, source: Box<tandem_drivers::nbd::NbdError> },
    #[error("job '{job}': offset {offset_bytes} + size {size_bytes} is beyond the end of {path} ({file_bytes} bytes)")]
    Region { job: String, path: String, offset_bytes: u64, size_bytes: u64, file_bytes: u64 },
    #[error("job '{job}': offset {offset_bytes} + size {size_bytes} overflows 64 bits")]
    Overflow { job: String, offset_bytes: u64, size_bytes: u64 },
}

/// What a job does I/O against: a disk and the byte region fio's size/offset select.
#[derive(Clone)]
pub struct Target {
    pub disk: Disk,
    pub offset_bytes: u64,
    pub size_bytes: u64,
}

/// Opens each distinct file once.
pub struct Targets {
    runtime: RuntimeHandle,
    /// Each path's disk and whether it was opened for writing.
    open: HashMap<String, (Disk, bool)>,
}

impl Targets {
    pub fn new(runtime: RuntimeHandle) -> Targets {
        Targets { runtime, open: HashMap::new() }
    }

    pub fn open(&mut self, spec: &JobSpec) -> Result<Target, TargetError> {
        let engine_error = |source| TargetError::Engine { job: spec.name.clone(), source };
        if let Some(size_bytes) = spec.size_bytes.filter(|size| size.checked_add(spec.offset_bytes).is_none()) {
            return Err(TargetError::Overflow { job: spec.name.clone(), offset_bytes: spec.offset_bytes, size_bytes });
        }
        if spec.ioengine.as_deref() == Some("null") {
            let size_bytes =
                spec.size_bytes.ok_or_else(|| TargetError::NoSize { job: spec.name.clone(), path: "null".into() })?;
            let disk = Disk::new(Arc::new(NullDriver::new(spec.offset_bytes + size_bytes)));
            // The same checks as for a file: a region smaller than one block has no offsets.
            return region(spec, "null", disk);
        }
        let path = spec.filename.clone().ok_or_else(|| TargetError::NoFilename { job: spec.name.clone() })?;
        let writes = job_writes(spec);
        let disk = match self.open.get(&path) {
            // A writing job never shares a disk opened read-only for reading jobs.
            Some((disk, writable)) if *writable || !writes => disk.clone(),
            _ if path.starts_with("rbd:") => {
                let rbd_error = |source| TargetError::Rbd { job: spec.name.clone(), source };
                let disk = open_rbd(spec, &path).map_err(rbd_error)?;
                if let Some(end_bytes) = disk.1 {
                    lay_out(&disk.0, 0, end_bytes).map_err(engine_error)?;
                }
                self.open.insert(path.clone(), (disk.0.clone(), true));
                disk.0
            }
            _ if tandem_drivers::nbd::is_nbd_uri(&path) => {
                let nbd_error = |source| TargetError::Nbd { job: spec.name.clone(), source: Box::new(source) };
                let driver = crate::remote::open(&self.runtime, &path, !writes).map_err(nbd_error)?;
                let disk = Disk::new(Arc::new(driver));
                self.open.insert(path.clone(), (disk.clone(), writes));
                disk
            }
            _ => {
                let (disk, writable) = open_file(&self.runtime, spec, &path).map_err(engine_error)?;
                self.open.insert(path.clone(), (disk.clone(), writable));
                disk
            }
        };
        region(spec, &path, disk)
    }
}

fn region(spec: &JobSpec, path: &str, disk: Disk) -> Result<Target, TargetError> {
    let file_bytes = disk.size_bytes();
    let size_bytes = spec.size_bytes.unwrap_or_else(|| file_bytes.saturating_sub(spec.offset_bytes));
    let fits = spec.offset_bytes.checked_add(size_bytes).is_some_and(|end| end <= file_bytes);
    if !fits || size_bytes < spec.block_size_bytes {
        return Err(TargetError::Region {
            job: spec.name.clone(),
            path: path.to_string(),
            offset_bytes: spec.offset_bytes,
            size_bytes,
            file_bytes,
        });
    }
    Ok(Target { disk, offset_bytes: spec.offset_bytes, size_bytes })
}

/// Whether the job writes (any mode but read and randread).
fn job_writes(spec: &JobSpec) -> bool {
    !matches!(spec.rw, RwMode::Read | RwMode::RandRead)
}

/// Open the job's file with O_DIRECT when `direct=1`, and whether it was opened for writing.
/// As fio: only a regular file that is missing or shorter than the job's region is created
/// and laid out, from its old end on; a block device (or any other non-regular file) is used
/// as it is. A job that only reads opens the file read-only unless the bench lays it out.
fn open_file(runtime: &RuntimeHandle, spec: &JobSpec, path: &str) -> tandem::Result<(Disk, bool)> {
    let wanted_bytes = spec.size_bytes.map(|size| size + spec.offset_bytes);
    let existing = std::fs::metadata(path).ok();
    let regular = existing.as_ref().is_none_or(std::fs::Metadata::is_file);
    let start_bytes = existing.as_ref().filter(|m| m.is_file()).map_or(0, std::fs::Metadata::len);
    let layout_end_bytes = wanted_bytes.filter(|end| regular && *end > start_bytes);
    let writable = job_writes(spec) || layout_end_bytes.is_some();
    let options = FileOptions {
        read_only: !writable,
        allow_buffered: false,
        buffered: !spec.direct,
        create_size_bytes: layout_end_bytes,
    };
    let driver = FileDriver::open(runtime, path, &options)?;
    let disk = Disk::new(Arc::new(driver));
    if let Some(end_bytes) = layout_end_bytes {
        lay_out(&disk, start_bytes, end_bytes)?;
    }
    Ok((disk, writable))
}

/// Open an rbd image, creating it when it is missing and the job gives a size; the size to
/// lay out when it was created (reads of never written objects never reach an OSD).
///
/// librbd's cache follows fio's rbd engine: `direct=1` turns it off, otherwise one flush after
/// opening takes it out of its writethrough-until-the-first-flush mode (fio issues the same
/// flush), so both run the same cache.
fn open_rbd(spec: &JobSpec, text: &str) -> Result<(Disk, Option<u64>), RbdError> {
    let mut rbd = RbdSpec::parse(text)?;
    if spec.direct {
        rbd.options.push(("rbd_cache".into(), "false".into()));
    }
    let options = RbdOptions { read_only: false, ..RbdOptions::default() };
    let wanted_bytes = spec.size_bytes.map(|size| size + spec.offset_bytes);
    let (driver, created_bytes) = match (RbdDriver::open(&rbd, &options), wanted_bytes) {
        (Err(RbdError::Image { errno: libc::ENOENT, .. }), Some(size_bytes)) => {
            eprintln!("{text}: creating the image ({} MiB)", size_bytes >> 20);
            tandem_drivers::rbd::create_image(&rbd, size_bytes)?;
            (RbdDriver::open(&rbd, &options)?, Some(size_bytes))
        }
        (opened, _) => (opened?, None),
    };
    let disk = Disk::new(Arc::new(driver));
    if !spec.direct {
        disk.flush_blocking(IoPriority::GUEST)
            .map_err(|e| RbdError::Image { image: rbd.image_path(), errno: e.errno().unwrap_or(libc::EIO) })?;
    }
    Ok((disk, created_bytes))
}

/// Write real data over `[start, end)`, as fio does before reading a new file: reads of never
/// written (or fallocated) extents are answered by the filesystem without touching the device.
pub(crate) fn lay_out(disk: &Disk, start_bytes: u64, end_bytes: u64) -> tandem::Result<()> {
    eprintln!("{}: laying out IO file ({} MiB)", disk.name(), (end_bytes - start_bytes) >> 20);
    // From the old end rounded up: the bytes before it are the user's, even in a partial block.
    let align = disk.alignment().request_bytes;
    let mut offset = start_bytes.next_multiple_of(align);
    let mut buf = AlignedBuf::zeroed(LAYOUT_CHUNK_BYTES, 4096)?;
    fill_random(buf.as_mut_slice(), end_bytes);
    while offset < end_bytes {
        let length = (end_bytes - offset).min(LAYOUT_CHUNK_BYTES as u64) as usize;
        buf.set_len(length);
        let (result, back) = disk.write_blocking(offset, buf, WriteFlags::default(), IoPriority::GUEST);
        result?;
        buf = back;
        offset += length as u64;
    }
    disk.flush_blocking(IoPriority::GUEST)
}

/// Incompressible bytes from a seed (splitmix64).
pub fn fill_random(bytes: &mut [u8], seed: u64) {
    let mut state = seed;
    for chunk in bytes.chunks_mut(8) {
        let word = tandem::rng::next(&mut state).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

/// Create and lay out every job's file now (before timed rounds), on a short-lived runtime.
pub fn prepare_files(jobs: &[JobSpec]) -> Result<(), String> {
    let config = tandem::reactor::Config { cores: 1, ..Default::default() };
    let runtime = tandem::reactor::Runtime::new(config).map_err(|e| e.to_string())?;
    let mut targets = Targets::new(runtime.handle());
    for job in jobs {
        job.validate().map_err(|e| e.to_string())?;
        targets.open(job).map_err(|e| e.to_string())?;
    }
    Ok(())
}
