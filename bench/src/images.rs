//! What `mirror` and `backup` may do to the user's `--source` and `--target`: look first (no
//! write, no delete), refuse before anything is touched, create only what is missing, write
//! an existing source or target only when `--overwrite-source` / `--overwrite-target` say so,
//! and remove only what this run created. Never removes an image or file that it found. An
//! NBD export as `--target` always exists (the bench cannot create one): it is written only
//! with `--overwrite-target`, and never removed.

use crate::mirror::rbd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tandem::block::Disk;
use tandem::reactor::Runtime;
use tandem_drivers::rbd::{RbdDriver, RbdError, RbdOptions, RbdSpec};
use tandem_drivers::{FileDriver, FileOptions};

/// Why the bench refuses to start, before anything was touched.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "--source {path}: exists and the guest (--guest-rw={guest_rw}) would write it; pass \
         --overwrite-source to allow that, use --guest-rw=randread, or name a new file"
    )]
    SourceWouldBeWritten { path: String, guest_rw: String },
    #[error(
        "--target {path}: exists ({size_bytes} bytes) and the job would overwrite it; pass \
         --overwrite-target to allow that, or name a new file"
    )]
    TargetExists { path: String, size_bytes: u64 },
    #[error("--target {path}: {target_bytes} bytes, smaller than the source's {source_bytes}")]
    TargetTooSmall { path: String, target_bytes: u64, source_bytes: u64 },
    #[error("--source {path}: {size_bytes} bytes, not a whole number of MiB")]
    SourceSize { path: String, size_bytes: u64 },
    #[error("{option} {path}: neither a regular file nor a block device")]
    NotADisk { option: &'static str, path: String },
    #[error("{option} {path}: cannot open it to read its size: {reason}")]
    Unreadable { option: &'static str, path: String, reason: String },
    #[error("--source and --target name the same file: {path}")]
    SameFile { path: String },
    #[error(
        "--compare-qemu with the existing image {image}: its peers (rbd import) remove and recreate the \
         image; name an image that does not exist"
    )]
    PeersWouldReplace { image: String },
    #[error(
        "--compare-qemu with the NBD target {uri}: QEMU's side of the comparison writes a file target; \
         drop --compare-qemu, or compare the client alone with `compare-fio --filename={uri}`"
    )]
    NoPeersForNbd { uri: String },
    #[error("{path}: {reason}")]
    Create { path: String, reason: String },
}

/// What the user asked of the source and target.
pub struct Request<'a> {
    pub source: &'a Path,
    pub target: &'a Path,
    /// The size of a source the bench creates.
    pub size_bytes: u64,
    /// The guest's `--guest-rw` when it writes the source.
    pub guest_writes: Option<&'a str>,
    pub overwrite_source: bool,
    pub overwrite_target: bool,
    /// `--compare-qemu`: with an rbd target its peers replace the image.
    pub compare_qemu: bool,
}

/// A file or image found before the run: its size, or `None` when missing.
#[derive(Clone, Copy, Debug)]
struct Found {
    size_bytes: Option<u64>,
}

/// The checked plan: the disk's size and what this run creates (and so may remove).
#[derive(Debug)]
pub struct Images {
    pub source: PathBuf,
    pub target: PathBuf,
    /// The source's size when it exists, else the requested size.
    pub size_bytes: u64,
    pub source_created: bool,
    pub target_created: bool,
    /// Where the target is an rbd image.
    pub rbd_target: Option<RbdSpec>,
    /// Where the target is an NBD export: its URI.
    pub nbd_target: Option<String>,
    /// Leave what this run created (`--keep`).
    pub keep: bool,
    /// Create a missing file target sparse (all holes, as `qemu-img create` makes one)
    /// instead of preallocated (`--sparse-target`).
    pub sparse_target: bool,
}

/// Look at source and target and refuse what the request does not allow. Touches nothing.
pub fn inspect(request: &Request, runtime: &Runtime) -> Result<Images, ImageError> {
    let rbd_target = rbd::spec(request.target).map_err(|reason| ImageError::Unreadable {
        option: "--target",
        path: shown(request.target),
        reason,
    })?;
    let nbd_target = crate::remote::nbd_uri(request.target).map(str::to_string);
    if let (Some(uri), true) = (&nbd_target, request.compare_qemu) {
        return Err(ImageError::NoPeersForNbd { uri: uri.clone() });
    }
    let source = find_file("--source", request.source, runtime)?;
    let target = match (&rbd_target, &nbd_target) {
        (Some(spec), _) => find_image(spec)?,
        (None, Some(uri)) => find_export(uri, runtime)?,
        (None, None) => find_file("--target", request.target, runtime)?,
    };
    let same = request.source == request.target || same_file(request.source, request.target);
    if rbd_target.is_none() && nbd_target.is_none() && same {
        return Err(ImageError::SameFile { path: shown(request.source) });
    }
    let size_bytes = source.size_bytes.unwrap_or(request.size_bytes);
    if !size_bytes.is_multiple_of(1 << 20) {
        return Err(ImageError::SourceSize { path: shown(request.source), size_bytes });
    }
    if let (Some(_), Some(guest_rw), false) = (source.size_bytes, request.guest_writes, request.overwrite_source) {
        return Err(ImageError::SourceWouldBeWritten { path: shown(request.source), guest_rw: guest_rw.into() });
    }
    if let Some(target_bytes) = target.size_bytes {
        check_target(request, target_bytes, size_bytes, rbd_target.as_ref())?;
    }
    Ok(Images {
        source: request.source.to_path_buf(),
        target: request.target.to_path_buf(),
        size_bytes,
        source_created: source.size_bytes.is_none(),
        target_created: target.size_bytes.is_none(),
        rbd_target,
        nbd_target,
        keep: false,
        sparse_target: false,
    })
}

/// An existing target: only with the flag, only when large enough, never for rbd's peers.
fn check_target(
    request: &Request,
    target_bytes: u64,
    source_bytes: u64,
    rbd_target: Option<&RbdSpec>,
) -> Result<(), ImageError> {
    let path = shown(request.target);
    if !request.overwrite_target {
        return Err(ImageError::TargetExists { path, size_bytes: target_bytes });
    }
    if target_bytes < source_bytes {
        return Err(ImageError::TargetTooSmall { path, target_bytes, source_bytes });
    }
    match (rbd_target, request.compare_qemu) {
        (Some(spec), true) => Err(ImageError::PeersWouldReplace { image: spec.image_path() }),
        _ => Ok(()),
    }
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino(), a.rdev()) == (b.dev(), b.ino(), b.rdev()),
        _ => false,
    }
}

/// A regular file's length or a block device's size (read-only open: BLKGETSIZE64).
fn find_file(option: &'static str, path: &Path, runtime: &Runtime) -> Result<Found, ImageError> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found { size_bytes: None }),
        Err(e) => return Err(ImageError::Unreadable { option, path: shown(path), reason: e.to_string() }),
    };
    use std::os::unix::fs::FileTypeExt;
    if metadata.is_file() {
        return Ok(Found { size_bytes: Some(metadata.len()) });
    }
    if !metadata.file_type().is_block_device() {
        return Err(ImageError::NotADisk { option, path: shown(path) });
    }
    let options = FileOptions { read_only: true, allow_buffered: true, ..FileOptions::default() };
    let driver = FileDriver::open(&runtime.handle(), path, &options).map_err(|e| ImageError::Unreadable {
        option,
        path: shown(path),
        reason: e.to_string(),
    })?;
    Ok(Found { size_bytes: Some(tandem::block::BlockDriver::size_bytes(&driver)) })
}

/// An rbd image's size, opened read-only, or `None` when it does not exist.
fn find_image(spec: &RbdSpec) -> Result<Found, ImageError> {
    let options = RbdOptions { read_only: true, ..RbdOptions::default() };
    match RbdDriver::open(spec, &options) {
        Ok(driver) => Ok(Found { size_bytes: Some(tandem::block::BlockDriver::size_bytes(&driver)) }),
        Err(RbdError::Image { errno: libc::ENOENT, .. }) => Ok(Found { size_bytes: None }),
        Err(e) => Err(ImageError::Unreadable { option: "--target", path: spec.image_path(), reason: e.to_string() }),
    }
}

/// An NBD export's size (opened read-only); it always exists.
fn find_export(uri: &str, runtime: &Runtime) -> Result<Found, ImageError> {
    match crate::remote::open(&runtime.handle(), uri, true) {
        Ok(driver) => Ok(Found { size_bytes: Some(tandem::block::BlockDriver::size_bytes(&driver)) }),
        Err(e) => Err(ImageError::Unreadable { option: "--target", path: uri.to_string(), reason: e.to_string() }),
    }
}

impl Images {
    /// Create what is missing: the source laid out with random data, the target preallocated
    /// or sparse (a file) or new (an rbd image). An existing one is left as it is.
    /// A file or image that appeared since [`inspect`] is not ours: it is neither written nor
    /// removed (create_new / create fail on it).
    pub fn create_missing(&mut self, runtime: &Runtime, note: &dyn Fn(String)) -> Result<(), ImageError> {
        if self.source_created {
            let created = create_source(&self.source, self.size_bytes, runtime);
            self.source_created = !matches!(created, Err(Created::Found(_)));
            created.map_err(Created::into_error)?;
        }
        if self.target_created {
            let created = self.create_target(note);
            self.target_created = !matches!(created, Err(Created::Found(_)));
            created.map_err(Created::into_error)?;
        }
        Ok(())
    }

    fn create_target(&self, note: &dyn Fn(String)) -> Result<(), Created> {
        let failed = |reason: String| Created::Failed(ImageError::Create { path: shown(&self.target), reason });
        match &self.rbd_target {
            Some(spec) => match tandem_drivers::rbd::create_image(spec, self.size_bytes) {
                Err(RbdError::Create { errno: libc::EEXIST, .. }) => Err(Created::Found(spec.image_path())),
                other => other.map_err(|e| failed(e.to_string())),
            },
            None => {
                crate::mirror::new_target(&self.target, self.size_bytes, self.sparse_target, note).map_err(|e| match e
                    .kind()
                {
                    std::io::ErrorKind::AlreadyExists => Created::Found(shown(&self.target)),
                    _ => failed(e.to_string()),
                })
            }
        }
    }

    /// Make a target this run created new again (for the next system's run). A target the
    /// user let us overwrite is used as it is.
    pub fn refresh_target(&self, note: &dyn Fn(String)) -> Result<(), ImageError> {
        if !self.target_created {
            return Ok(());
        }
        let create_error = |reason: String| ImageError::Create { path: shown(&self.target), reason };
        match &self.rbd_target {
            Some(spec) => rbd::fresh_image(spec, self.size_bytes).map_err(create_error),
            None => {
                std::fs::remove_file(&self.target).map_err(|e| create_error(e.to_string()))?;
                crate::mirror::new_target(&self.target, self.size_bytes, self.sparse_target, note)
                    .map_err(|e| create_error(e.to_string()))
            }
        }
    }
}

/// Why a creation did not happen: something of that name appeared, or it failed.
enum Created {
    Found(String),
    Failed(ImageError),
}

impl Created {
    fn into_error(self) -> ImageError {
        match self {
            Created::Found(path) => {
                ImageError::Create { path, reason: "appeared while the bench started; left alone".into() }
            }
            Created::Failed(error) => error,
        }
    }
}

impl Drop for Images {
    /// Remove what this run created, unless `--keep`; never what it found.
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if self.source_created {
            let _ = std::fs::remove_file(&self.source);
        }
        if self.target_created {
            match &self.rbd_target {
                Some(spec) => drop(rbd::remove(spec)),
                None => drop(std::fs::remove_file(&self.target)),
            }
        }
    }
}

/// A new source file full of random data, laid out the way `run` lays out fio's files.
fn create_source(source: &Path, size_bytes: u64, runtime: &Runtime) -> Result<(), Created> {
    let failed = |reason: String| Created::Failed(ImageError::Create { path: shown(source), reason });
    if let Some(dir) = source.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| failed(e.to_string()))?;
    }
    match std::fs::OpenOptions::new().write(true).create_new(true).open(source) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(Created::Found(shown(source))),
        other => drop(other.map_err(|e| failed(e.to_string()))?),
    }
    let options = FileOptions { create_size_bytes: Some(size_bytes), ..FileOptions::default() };
    let driver = FileDriver::open(&runtime.handle(), source, &options).map_err(|e| failed(e.to_string()))?;
    crate::target::lay_out(&Disk::new(Arc::new(driver)), 0, size_bytes).map_err(|e| failed(e.to_string()))
}
