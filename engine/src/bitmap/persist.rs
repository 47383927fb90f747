//! Persistent dirty bitmaps: the sidecar file format next to a raw image, its atomic save and
//! its checked load, and the in-use rule (a bitmap whose process died while recording is
//! "inconsistent": `open_for_recording` refuses it until it is acknowledged, forcing a full
//! copy; `open_for_recording_any` loads it flagged, for a backup that falls back to a full copy).
//!
//! File layout, all integers little-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `b"TNDMBMAP"` |
//! | 4 | format version (1) |
//! | 4 | flags: bit 0 = in use (the bitmap was being recorded); other bits must be 0 |
//! | 8 | `granularity_bytes` |
//! | 8 | `size_bytes` |
//! | 8 | `chunk_count` (= `size_bytes` / `granularity_bytes`, rounded up) |
//! | 4 | name length in bytes (at most 1023) |
//! | n | name, UTF-8 |
//! | 8 × ⌈chunk_count / 64⌉ | [`DirtyBitmap::to_words`] |
//! | 4 | CRC32 (crc32fast) of every byte before it |
//!
//! ```
//! use tandem::bitmap::{load, open_for_recording, DirtyBitmap};
//! # let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/tmp");
//! # std::fs::create_dir_all(root).unwrap();
//! let dir = tempfile::tempdir_in(root).unwrap();
//! let path = dir.path().join("disk.img.bitmap");
//! let bitmap = DirtyBitmap::new(65536, 1 << 30).unwrap();
//! tandem::bitmap::save(&path, "backup-1", &bitmap, false).unwrap();
//!
//! let recording = open_for_recording(&path).unwrap(); // flag set on disk from here on
//! recording.bitmap().set(4096, 4096).unwrap();        // the disk's write path
//! recording.close().unwrap();                         // clean stop: flag cleared
//!
//! let loaded = load(&path).unwrap();
//! assert!(!loaded.inconsistent);
//! assert_eq!(loaded.bitmap.next_dirty_area(0, u64::MAX), Some((0, 65536)));
//! ```

use super::dirty::DirtyBitmap;
use super::error::BitmapError;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// First 8 bytes of every bitmap file.
pub const MAGIC: [u8; 8] = *b"TNDMBMAP";
/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Longest bitmap name, in bytes (the registry's limit too).
const NAME_BYTES_MAX: usize = 1023;
const FLAG_IN_USE: u32 = 1;
const HEADER_BYTES: usize = 44;
const CRC_BYTES: usize = 4;
/// Words encoded per write: bounds the staging buffer to 64 KiB.
const WORD_BATCH_COUNT: usize = 8192;

/// A persistence error. Each names the file and the bad value.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{op} {}: {source}", .path.display())]
    Io { path: PathBuf, op: &'static str, source: io::Error },
    #[error("{}: not a regular file", .path.display())]
    NotRegularFile { path: PathBuf },
    #[error("{}: not a bitmap file (magic b\"{}\", expected b\"TNDMBMAP\")", .path.display(), .magic.escape_ascii())]
    BadMagic { path: PathBuf, magic: [u8; 8] },
    #[error("{}: bitmap format version {version} is not supported (this build reads {FORMAT_VERSION})", .path.display())]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{}: unknown bitmap flags {flags:#x} (only bit 0, in use, is defined)", .path.display())]
    UnknownFlags { path: PathBuf, flags: u32 },
    #[error("{}: truncated: the header needs {expected_bytes} bytes, the file has {actual_bytes}", .path.display())]
    Truncated { path: PathBuf, expected_bytes: u64, actual_bytes: u64 },
    #[error("{}: {actual_bytes} bytes where the header needs only {expected_bytes}", .path.display())]
    TrailingBytes { path: PathBuf, expected_bytes: u64, actual_bytes: u64 },
    #[error("{}: checksum mismatch: stored {expected_crc:#010x}, computed {actual_crc:#010x}", .path.display())]
    ChecksumMismatch { path: PathBuf, expected_crc: u32, actual_crc: u32 },
    #[error("{}: chunk count {chunk_count} does not match size and granularity ({expected_chunk_count})", .path.display())]
    ChunkCountMismatch { path: PathBuf, chunk_count: u64, expected_chunk_count: u64 },
    #[error("{}: bad bitmap geometry: {source}", .path.display())]
    Geometry { path: PathBuf, source: BitmapError },
    #[error("{}: bitmap name is {length_bytes} bytes, longer than 1023", .path.display())]
    NameTooLong { path: PathBuf, length_bytes: u64 },
    #[error("{}: bitmap name is not UTF-8 (invalid from byte {valid_up_to_bytes})", .path.display())]
    NameNotUtf8 { path: PathBuf, valid_up_to_bytes: u64 },
    #[error("{}: bitmap '{name}' was in use when its process stopped; call clear_inconsistent (forces a full copy) before recording again", .path.display())]
    Inconsistent { path: PathBuf, name: String },
}

/// What [`load`] read.
pub struct LoadedBitmap {
    pub name: String,
    /// Enabled; the bits as saved; flagged inconsistent ([`DirtyBitmap::is_inconsistent`])
    /// exactly when `inconsistent` is set.
    pub bitmap: DirtyBitmap,
    /// The in-use flag was set on disk: the process that recorded it never stopped cleanly, so
    /// writes may be missing from `bitmap`. Not fit for an incremental job until
    /// [`clear_inconsistent`] acknowledges it.
    pub inconsistent: bool,
}

/// A bitmap being recorded into; its file carries the in-use flag until [`RecordingBitmap::close`],
/// and after it while the bitmap is inconsistent. Dropping it without `close` leaves the flag
/// set, exactly as a crash would.
pub struct RecordingBitmap {
    path: PathBuf,
    name: String,
    bitmap: Arc<DirtyBitmap>,
}

impl RecordingBitmap {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bitmap to record into (share it with the write path).
    pub fn bitmap(&self) -> &Arc<DirtyBitmap> {
        &self.bitmap
    }

    /// Save the current bits, flag still set: bounds what a later full copy must redo.
    pub fn checkpoint(&self) -> Result<(), PersistError> {
        save(&self.path, &self.name, &self.bitmap, true)
    }

    /// Clean stop: save with the in-use flag cleared, unless the bitmap is inconsistent in
    /// memory: a clean stop does not bring back the writes a crash lost, so the file keeps the
    /// flag until a fallback backup has made the bitmap consistent (which clears the in-memory
    /// flag, and the next close saves it clean). Marks recorded after this call (through
    /// another handle on [`RecordingBitmap::bitmap`]) are not saved. On error the file keeps
    /// the flag, so the next open treats it as inconsistent: safe, only slower.
    pub fn close(self) -> Result<(), PersistError> {
        save(&self.path, &self.name, &self.bitmap, self.bitmap.is_inconsistent())
    }
}

/// Start persisting `bitmap` (already recording, e.g. one a backup created with
/// `new_bitmap`) to a new sidecar at `path`: saved with the in-use flag, so a crash from here
/// on leaves it inconsistent. The handle shares `bitmap`.
pub fn record(path: impl AsRef<Path>, name: &str, bitmap: Arc<DirtyBitmap>) -> Result<RecordingBitmap, PersistError> {
    let path = path.as_ref();
    save(path, name, &bitmap, true)?;
    Ok(RecordingBitmap { path: path.to_path_buf(), name: name.to_string(), bitmap })
}

/// Load `path`, refuse it if it was left in use, and mark it in use on disk before returning.
pub fn open_for_recording(path: impl AsRef<Path>) -> Result<RecordingBitmap, PersistError> {
    let path = path.as_ref();
    let loaded = load(path)?;
    if loaded.inconsistent {
        return Err(PersistError::Inconsistent { path: path.to_path_buf(), name: loaded.name });
    }
    start_recording(path, loaded)
}

/// As [`open_for_recording`], but a file left in use is loaded rather than refused, with the
/// bitmap flagged inconsistent in memory ([`DirtyBitmap::is_inconsistent`]): the disk's
/// registry then refuses it to every job that would trust it, and a backup with
/// `on_inconsistent_bitmap = full` copies the whole disk and makes it consistent. Until then
/// the file keeps its in-use flag, even across [`RecordingBitmap::close`]. For a process
/// restarting after a crash, which reports the bitmap as loaded inconsistent.
pub fn open_for_recording_any(path: impl AsRef<Path>) -> Result<RecordingBitmap, PersistError> {
    let path = path.as_ref();
    let loaded = load(path)?;
    assert_eq!(loaded.inconsistent, loaded.bitmap.is_inconsistent(), "load flags the bitmap as the file");
    start_recording(path, loaded)
}

fn start_recording(path: &Path, loaded: LoadedBitmap) -> Result<RecordingBitmap, PersistError> {
    // The flag must be on disk before the first mark, so a crash from here on is detected.
    save(path, &loaded.name, &loaded.bitmap, true)?;
    Ok(RecordingBitmap { path: path.to_path_buf(), name: loaded.name, bitmap: Arc::new(loaded.bitmap) })
}

/// The user's acknowledgement of an inconsistent bitmap: mark every chunk dirty and clear the
/// in-use flag. A process that died while recording may have lost marks that never reached the
/// file, and nothing says which; so the only safe next incremental job is a full copy. Returns
/// whether the file was inconsistent; a consistent file is left as it is.
pub fn clear_inconsistent(path: impl AsRef<Path>) -> Result<bool, PersistError> {
    let path = path.as_ref();
    let loaded = load(path)?;
    if !loaded.inconsistent {
        return Ok(false);
    }
    let bitmap = loaded.bitmap;
    bitmap.set(0, bitmap.size_bytes()).map_err(|source| PersistError::Geometry { path: path.to_path_buf(), source })?;
    save(path, &loaded.name, &bitmap, false)?;
    Ok(true)
}

/// Fixed-size part of the file.
struct Header {
    flags: u32,
    granularity_bytes: u64,
    size_bytes: u64,
    chunk_count: u64,
    name_bytes: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.flags.to_le_bytes());
        out[16..24].copy_from_slice(&self.granularity_bytes.to_le_bytes());
        out[24..32].copy_from_slice(&self.size_bytes.to_le_bytes());
        out[32..40].copy_from_slice(&self.chunk_count.to_le_bytes());
        out[40..44].copy_from_slice(&self.name_bytes.to_le_bytes());
        out
    }

    /// Magic and version are checked by the caller, on whatever part of them was read.
    fn decode(bytes: &[u8; HEADER_BYTES]) -> Header {
        Header {
            flags: le_u32(&bytes[12..16]),
            granularity_bytes: le_u64(&bytes[16..24]),
            size_bytes: le_u64(&bytes[24..32]),
            chunk_count: le_u64(&bytes[32..40]),
            name_bytes: le_u32(&bytes[40..44]),
        }
    }

    fn payload_bytes(&self) -> u64 {
        self.chunk_count.div_ceil(64).saturating_mul(8)
    }

    /// Whole file length the header implies; saturates, since a corrupt count can be anything
    /// and no real file is 2^64 bytes long.
    fn file_bytes(&self) -> u64 {
        let fixed_bytes = (HEADER_BYTES + CRC_BYTES) as u64 + u64::from(self.name_bytes);
        fixed_bytes.saturating_add(self.payload_bytes())
    }
}

fn le_u32(bytes: &[u8]) -> u32 {
    let mut array = [0u8; 4];
    array.copy_from_slice(bytes);
    u32::from_le_bytes(array)
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut array = [0u8; 8];
    array.copy_from_slice(bytes);
    u64::from_le_bytes(array)
}

fn io_error<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> PersistError + 'a {
    move |source| PersistError::Io { path: path.to_path_buf(), op, source }
}

/// Save `bitmap` as `name` to `path`, atomically: a reader sees the old file or the new one,
/// never a mix, even across a crash. `in_use` marks a bitmap that is being recorded into.
pub fn save(path: impl AsRef<Path>, name: &str, bitmap: &DirtyBitmap, in_use: bool) -> Result<(), PersistError> {
    let path = path.as_ref();
    if name.len() > NAME_BYTES_MAX {
        return Err(PersistError::NameTooLong { path: path.to_path_buf(), length_bytes: name.len() as u64 });
    }
    let Some(file_name) = path.file_name() else {
        let source = io::Error::new(io::ErrorKind::InvalidInput, "path has no file name");
        return Err(PersistError::Io { path: path.to_path_buf(), op: "save", source });
    };
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let temp_path = dir.join(temp_file_name(file_name));
    let result = write_synced(&temp_path, name, bitmap, in_use).and_then(|()| {
        fail_point_before_rename()?;
        fs::rename(&temp_path, path).map_err(io_error(path, "rename temp file over"))
    });
    if result.is_err() {
        // Best effort: the error that matters is the one already in hand.
        let _ = fs::remove_file(&temp_path);
    }
    result?;
    // The rename is durable only once the directory entry is.
    File::open(&dir).and_then(|d| d.sync_all()).map_err(io_error(&dir, "fsync directory"))
}

/// `.<name>.<pid>-<n>.tmp`, the name cut so the whole stays under the usual 255-byte limit.
fn temp_file_name(file_name: &std::ffi::OsStr) -> String {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let lossy = file_name.to_string_lossy();
    let mut stem_end = lossy.len().min(200);
    while !lossy.is_char_boundary(stem_end) {
        stem_end -= 1;
    }
    let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    format!(".{}.{}-{sequence}.tmp", &lossy[..stem_end], std::process::id())
}

/// Write the whole file to `temp_path` (which must not exist) and fsync it.
fn write_synced(temp_path: &Path, name: &str, bitmap: &DirtyBitmap, in_use: bool) -> Result<(), PersistError> {
    let words = bitmap.to_words();
    let header = Header {
        flags: if in_use { FLAG_IN_USE } else { 0 },
        granularity_bytes: bitmap.granularity_bytes(),
        size_bytes: bitmap.size_bytes(),
        chunk_count: bitmap.chunk_count(),
        name_bytes: name.len() as u32,
    };
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(temp_path)
        .map_err(io_error(temp_path, "create temp file"))?;
    let mut writer = BufWriter::with_capacity(1 << 16, file);
    let mut hasher = crc32fast::Hasher::new();
    let mut put = |bytes: &[u8]| {
        hasher.update(bytes);
        writer.write_all(bytes)
    };
    let write_result = (|| {
        put(&header.encode())?;
        put(name.as_bytes())?;
        let mut staging = Vec::with_capacity(WORD_BATCH_COUNT * 8);
        for batch in words.chunks(WORD_BATCH_COUNT) {
            staging.clear();
            batch.iter().for_each(|word| staging.extend_from_slice(&word.to_le_bytes()));
            put(&staging)?;
        }
        Ok::<(), io::Error>(())
    })();
    write_result.map_err(io_error(temp_path, "write"))?;
    writer.write_all(&hasher.finalize().to_le_bytes()).map_err(io_error(temp_path, "write"))?;
    let file = writer.into_inner().map_err(|error| io_error(temp_path, "write")(error.into_error()))?;
    file.sync_all().map_err(io_error(temp_path, "fsync"))
}

#[cfg(test)]
thread_local! {
    /// Tests set this to make the next save fail after its temp file is written and synced.
    static FAIL_BEFORE_RENAME: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn fail_point_before_rename() -> Result<(), PersistError> {
    #[cfg(test)]
    if FAIL_BEFORE_RENAME.with(|fail| fail.replace(false)) {
        let source = io::Error::other("injected failure");
        return Err(PersistError::Io { path: PathBuf::from("<test>"), op: "rename", source });
    }
    Ok(())
}

/// Load the bitmap file at `path`. Every length is checked against the file's size before
/// anything is allocated, so a corrupt or foreign file costs at most its own size in memory.
pub fn load(path: impl AsRef<Path>) -> Result<LoadedBitmap, PersistError> {
    let path = path.as_ref();
    // Checked before opening: opening a FIFO or device could block or have side effects.
    let metadata = fs::metadata(path).map_err(io_error(path, "stat"))?;
    if !metadata.is_file() {
        return Err(PersistError::NotRegularFile { path: path.to_path_buf() });
    }
    let mut file = File::open(path).map_err(io_error(path, "open"))?;
    let file_bytes = file.metadata().map_err(io_error(path, "stat"))?.len();
    let mut header_bytes = [0u8; HEADER_BYTES];
    let read_bytes = read_up_to(&mut file, &mut header_bytes).map_err(io_error(path, "read"))?;
    check_prefix(path, &header_bytes, read_bytes)?;
    let header = Header::decode(&header_bytes);
    if header.name_bytes as usize > NAME_BYTES_MAX {
        return Err(PersistError::NameTooLong { path: path.to_path_buf(), length_bytes: header.name_bytes.into() });
    }
    let expected_bytes = header.file_bytes();
    if file_bytes != expected_bytes {
        let (path, actual_bytes) = (path.to_path_buf(), file_bytes);
        return Err(match file_bytes < expected_bytes {
            true => PersistError::Truncated { path, expected_bytes, actual_bytes },
            false => PersistError::TrailingBytes { path, expected_bytes, actual_bytes },
        });
    }
    // Bounded: equals the file's size, checked above.
    let body_bytes = usize::try_from(expected_bytes).map_err(|_| PersistError::Truncated {
        path: path.to_path_buf(),
        expected_bytes,
        actual_bytes: usize::MAX as u64,
    })?;
    let mut body = vec![0u8; body_bytes - HEADER_BYTES];
    file.read_exact(&mut body).map_err(io_error(path, "read"))?;
    let (content, stored_crc) = body.split_at(body.len() - CRC_BYTES);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header_bytes);
    hasher.update(content);
    let (expected_crc, actual_crc) = (le_u32(stored_crc), hasher.finalize());
    if expected_crc != actual_crc {
        return Err(PersistError::ChecksumMismatch { path: path.to_path_buf(), expected_crc, actual_crc });
    }
    if header.flags & !FLAG_IN_USE != 0 {
        return Err(PersistError::UnknownFlags { path: path.to_path_buf(), flags: header.flags });
    }
    let (name_bytes, payload) = content.split_at(header.name_bytes as usize);
    let name = std::str::from_utf8(name_bytes).map_err(|error| PersistError::NameNotUtf8 {
        path: path.to_path_buf(),
        valid_up_to_bytes: error.valid_up_to() as u64,
    })?;
    let bitmap = build_bitmap(path, &header, payload)?;
    let inconsistent = header.flags & FLAG_IN_USE != 0;
    bitmap.set_inconsistent(inconsistent);
    Ok(LoadedBitmap { name: name.to_string(), bitmap, inconsistent })
}

/// Fill `buf` as far as the file allows; returns the bytes read.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(count) => filled += count,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// Magic first (a short foreign file is foreign, not truncated), then version, then length.
fn check_prefix(path: &Path, header_bytes: &[u8; HEADER_BYTES], read_bytes: usize) -> Result<(), PersistError> {
    if read_bytes >= 8 && header_bytes[0..8] != MAGIC {
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&header_bytes[0..8]);
        return Err(PersistError::BadMagic { path: path.to_path_buf(), magic });
    }
    let version = le_u32(&header_bytes[8..12]);
    if read_bytes >= 12 && version != FORMAT_VERSION {
        return Err(PersistError::UnsupportedVersion { path: path.to_path_buf(), version });
    }
    if read_bytes < HEADER_BYTES {
        let (expected_bytes, actual_bytes) = (HEADER_BYTES as u64, read_bytes as u64);
        return Err(PersistError::Truncated { path: path.to_path_buf(), expected_bytes, actual_bytes });
    }
    Ok(())
}

/// The bitmap from a checked payload. The chunk count is compared with the geometry before
/// `DirtyBitmap` allocates anything: the payload length (bounded by the file) was computed from
/// the stored count, and the allocation follows the geometry.
fn build_bitmap(path: &Path, header: &Header, payload: &[u8]) -> Result<DirtyBitmap, PersistError> {
    let Header { granularity_bytes, size_bytes, chunk_count, .. } = *header;
    if granularity_bytes.is_power_of_two() {
        let expected_chunk_count = size_bytes.div_ceil(granularity_bytes);
        if chunk_count != expected_chunk_count {
            return Err(PersistError::ChunkCountMismatch {
                path: path.to_path_buf(),
                chunk_count,
                expected_chunk_count,
            });
        }
    }
    // A granularity that is not a power of two is refused by `DirtyBitmap::new` before it
    // allocates, whatever the size.
    let words: Vec<u64> = payload.chunks_exact(8).map(le_u64).collect();
    DirtyBitmap::from_words(granularity_bytes, size_bytes, &words)
        .map_err(|source| PersistError::Geometry { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;

    fn temp_dir() -> tempfile::TempDir {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/tmp");
        fs::create_dir_all(root).unwrap();
        tempfile::tempdir_in(root).unwrap()
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    /// 1 GiB + 100 B at 64 KiB: 16385 chunks, so a short last chunk and a last word of one bit.
    fn sparse_bitmap() -> DirtyBitmap {
        let bitmap = DirtyBitmap::new(64 * KIB, (1 << 30) + 100).unwrap();
        for offset in [0, 5 * 64 * KIB + 7, 700 * MIB, 1 << 30] {
            bitmap.set(offset, 1).unwrap();
        }
        bitmap
    }

    fn assert_same(left: &DirtyBitmap, right: &DirtyBitmap) {
        assert_eq!(left.granularity_bytes(), right.granularity_bytes());
        assert_eq!(left.size_bytes(), right.size_bytes());
        assert_eq!(left.dirty_chunk_count(), right.dirty_chunk_count());
        assert_eq!(left.dirty_bytes(), right.dirty_bytes());
        assert_eq!(left.to_words(), right.to_words());
    }

    fn saved_file(dir: &Path) -> (PathBuf, Vec<u8>) {
        let path = dir.join("disk.bitmap");
        save(&path, "nightly", &sparse_bitmap(), false).unwrap();
        let bytes = fs::read(&path).unwrap();
        (path, bytes)
    }

    /// Recompute the trailing CRC, so a test reaches the checks that follow it.
    fn reseal(bytes: &mut [u8]) {
        let crc_at = bytes.len() - CRC_BYTES;
        let crc = crc32fast::hash(&bytes[..crc_at]);
        bytes[crc_at..].copy_from_slice(&crc.to_le_bytes());
    }

    fn load_bytes(path: &Path, bytes: &[u8]) -> Result<LoadedBitmap, PersistError> {
        fs::write(path, bytes).unwrap();
        load(path)
    }

    #[test]
    fn round_trip_sparse_with_short_last_chunk() {
        let dir = temp_dir();
        let path = dir.path().join("disk.bitmap");
        let bitmap = sparse_bitmap();
        assert_eq!(bitmap.chunk_count() % 64, 1);
        save(&path, "nightly", &bitmap, false).unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.name, "nightly");
        assert!(!loaded.inconsistent);
        assert!(loaded.bitmap.is_enabled());
        assert_same(&loaded.bitmap, &bitmap);
        assert_eq!(loaded.bitmap.dirty_bytes(), 3 * 64 * KIB + 100);
        let expected_bytes = (HEADER_BYTES + 7 + CRC_BYTES) as u64 + bitmap.chunk_count().div_ceil(64) * 8;
        assert_eq!(fs::metadata(&path).unwrap().len(), expected_bytes);
    }

    #[test]
    fn round_trip_dense_and_names() {
        let dir = temp_dir();
        let path = dir.path().join("dense.bitmap");
        let bitmap = DirtyBitmap::new(4 * KIB, 3 * MIB + 512).unwrap();
        bitmap.set(0, bitmap.size_bytes()).unwrap();
        bitmap.reset(64 * KIB, 8 * KIB).unwrap();
        for name in ["", "é-ünïcode ✓", &"n".repeat(NAME_BYTES_MAX)] {
            save(&path, name, &bitmap, false).unwrap();
            let loaded = load(&path).unwrap();
            assert_eq!(loaded.name, name);
            assert_same(&loaded.bitmap, &bitmap);
        }
        assert_eq!(load(&path).unwrap().bitmap.dirty_bytes(), 3 * MIB + 512 - 8 * KIB);
        let error = save(&path, &"n".repeat(NAME_BYTES_MAX + 1), &bitmap, false).unwrap_err();
        assert!(matches!(error, PersistError::NameTooLong { length_bytes: 1024, .. }), "{error}");
    }

    #[test]
    fn in_use_flag_makes_a_bitmap_inconsistent_until_cleared() {
        let dir = temp_dir();
        let path = dir.path().join("disk.bitmap");
        save(&path, "nightly", &sparse_bitmap(), true).unwrap();
        assert!(load(&path).unwrap().inconsistent);
        let error = open_for_recording(&path).err().unwrap();
        assert!(matches!(&error, PersistError::Inconsistent { name, .. } if name == "nightly"), "{error}");
        assert!(error.to_string().contains("disk.bitmap"), "{error}");

        assert!(clear_inconsistent(&path).unwrap());
        let loaded = load(&path).unwrap();
        assert!(!loaded.inconsistent);
        assert_eq!(loaded.bitmap.dirty_chunk_count(), loaded.bitmap.chunk_count());
        assert_eq!(loaded.bitmap.dirty_bytes(), loaded.bitmap.size_bytes());

        let recording = open_for_recording(&path).unwrap();
        assert_eq!(recording.name(), "nightly");
        assert!(load(&path).unwrap().inconsistent, "flag must be on disk while recording");
        recording.close().unwrap();
        assert!(!load(&path).unwrap().inconsistent);
    }

    #[test]
    fn recording_saves_marks_and_close_clears_the_flag() {
        let dir = temp_dir();
        let path = dir.path().join("disk.bitmap");
        save(&path, "nightly", &DirtyBitmap::new(64 * KIB, MIB).unwrap(), false).unwrap();
        assert!(!clear_inconsistent(&path).unwrap(), "a consistent file is left alone");
        assert_eq!(load(&path).unwrap().bitmap.dirty_chunk_count(), 0);

        let recording = open_for_recording(&path).unwrap();
        recording.bitmap().set(3 * 64 * KIB, 1).unwrap();
        recording.checkpoint().unwrap();
        let checkpoint = load(&path).unwrap();
        assert!(checkpoint.inconsistent);
        assert_eq!(checkpoint.bitmap.next_dirty(0), Some(3 * 64 * KIB));
        drop(recording); // no close: as a crash
        assert!(open_for_recording(&path).is_err());

        assert!(clear_inconsistent(&path).unwrap());
        let recording = open_for_recording(&path).unwrap();
        recording.bitmap().reset(0, MIB).unwrap(); // the full copy ran
        recording.bitmap().set(0, 1).unwrap();
        recording.close().unwrap();
        let loaded = load(&path).unwrap();
        assert!(!loaded.inconsistent);
        assert_eq!(loaded.bitmap.dirty_chunk_count(), 1);
    }

    #[test]
    fn open_for_recording_any_loads_an_inconsistent_file_flagged_and_close_keeps_it_so() {
        let dir = temp_dir();
        let path = dir.path().join("disk.bitmap");
        save(&path, "nightly", &DirtyBitmap::new(64 * KIB, MIB).unwrap(), false).unwrap();
        let recording = open_for_recording_any(&path).unwrap();
        assert!(!recording.bitmap().is_inconsistent(), "a consistent file loads consistent");
        recording.bitmap().set(0, 1).unwrap();
        drop(recording); // a crash while recording
        assert!(load(&path).unwrap().bitmap.is_inconsistent(), "load flags the bitmap as the file");

        let recording = open_for_recording_any(&path).unwrap();
        assert!(recording.bitmap().is_inconsistent());
        assert_eq!(recording.name(), "nightly");
        recording.bitmap().set(2 * 64 * KIB, 1).unwrap();
        recording.close().unwrap();
        let loaded = load(&path).unwrap();
        assert!(loaded.inconsistent, "a clean stop must not launder an inconsistent bitmap");
        assert!(loaded.bitmap.get(2 * 64 * KIB).unwrap(), "the marks were saved all the same");
        assert!(open_for_recording(&path).is_err(), "the strict open still refuses it");

        // A fallback backup made it consistent in memory: the next close saves it clean.
        let recording = open_for_recording_any(&path).unwrap();
        recording.bitmap().clear();
        recording.bitmap().set_inconsistent(false);
        recording.checkpoint().unwrap();
        assert!(load(&path).unwrap().inconsistent, "a checkpoint keeps the in-use flag");
        recording.close().unwrap();
        let loaded = load(&path).unwrap();
        assert!(!loaded.inconsistent && !loaded.bitmap.is_inconsistent());
        assert_eq!(loaded.bitmap.dirty_chunk_count(), 0);
    }

    #[test]
    fn flipped_bytes_fail_the_checksum() {
        let dir = temp_dir();
        let (path, bytes) = saved_file(dir.path());
        let payload_at = HEADER_BYTES + "nightly".len();
        for at in [12, 16, 24, 41 + 3, payload_at, payload_at + 17, bytes.len() - 5, bytes.len() - 1] {
            let mut corrupt = bytes.clone();
            corrupt[at] ^= 0x10;
            match load_bytes(&path, &corrupt) {
                Err(PersistError::ChecksumMismatch { expected_crc, actual_crc, .. }) => {
                    assert_ne!(expected_crc, actual_crc)
                }
                Err(error) => panic!("byte {at}: {error}"),
                Ok(_) => panic!("byte {at}: corrupt file loaded"),
            }
        }
    }

    #[test]
    fn truncated_and_overlong_files_name_both_lengths() {
        let dir = temp_dir();
        let (path, bytes) = saved_file(dir.path());
        let full_bytes = bytes.len() as u64;
        for length in [0, 3, 8, 11, 20, 43] {
            let error = load_bytes(&path, &bytes[..length]).err().unwrap();
            let expected = (HEADER_BYTES as u64, length as u64);
            assert!(
                matches!(error, PersistError::Truncated { expected_bytes, actual_bytes, .. } if (expected_bytes, actual_bytes) == expected),
                "{length}: {error}"
            );
        }
        for length in [44, 50, 60, bytes.len() - 4, bytes.len() - 1] {
            let error = load_bytes(&path, &bytes[..length]).err().unwrap();
            let expected = (full_bytes, length as u64);
            assert!(
                matches!(error, PersistError::Truncated { expected_bytes, actual_bytes, .. } if (expected_bytes, actual_bytes) == expected),
                "{length}: {error}"
            );
            assert!(error.to_string().contains(&full_bytes.to_string()), "{error}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        let error = load_bytes(&path, &longer).err().unwrap();
        assert!(matches!(error, PersistError::TrailingBytes { actual_bytes, .. } if actual_bytes == full_bytes + 1));
    }

    #[test]
    fn foreign_and_future_files_are_refused() {
        let dir = temp_dir();
        let (path, bytes) = saved_file(dir.path());
        let mut foreign = bytes.clone();
        foreign[0..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
        let error = load_bytes(&path, &foreign).err().unwrap();
        assert!(matches!(error, PersistError::BadMagic { magic, .. } if &magic == b"QFI\xfb\0\0\0\x03"), "{error}");
        assert!(error.to_string().contains("QFI\\xfb"), "{error}");
        let error = load_bytes(&path, &vec![b'#'; 3 * MIB as usize]).err().unwrap();
        assert!(matches!(error, PersistError::BadMagic { .. }), "{error}");

        let mut future = bytes.clone();
        future[8..12].copy_from_slice(&2u32.to_le_bytes());
        reseal(&mut future);
        let error = load_bytes(&path, &future).err().unwrap();
        assert!(matches!(error, PersistError::UnsupportedVersion { version: 2, .. }), "{error}");

        let mut flags = bytes.clone();
        flags[12..16].copy_from_slice(&0x5u32.to_le_bytes());
        reseal(&mut flags);
        let error = load_bytes(&path, &flags).err().unwrap();
        assert!(matches!(error, PersistError::UnknownFlags { flags: 5, .. }), "{error}");
    }

    #[test]
    fn resealed_nonsense_is_a_typed_error_without_a_huge_allocation() {
        let dir = temp_dir();
        let (path, bytes) = saved_file(dir.path());
        let with = |at: usize, value: &[u8]| {
            let mut changed = bytes.clone();
            changed[at..at + value.len()].copy_from_slice(value);
            reseal(&mut changed);
            load_bytes(&path, &changed).err().unwrap()
        };
        // 2^62 bytes at 512 B would be 2^53 chunks: the length check refuses it first.
        let error = with(24, &(1u64 << 62).to_le_bytes());
        assert!(matches!(error, PersistError::ChunkCountMismatch { chunk_count: 16385, .. }), "{error}");
        let mut huge = bytes.clone();
        huge[16..24].copy_from_slice(&512u64.to_le_bytes());
        huge[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
        huge[32..40].copy_from_slice(&(1u64 << 53).to_le_bytes());
        reseal(&mut huge);
        let error = load_bytes(&path, &huge).err().unwrap();
        assert!(matches!(error, PersistError::Truncated { expected_bytes, .. } if expected_bytes > 1 << 50), "{error}");
        let error = with(32, &u64::MAX.to_le_bytes());
        assert!(matches!(error, PersistError::Truncated { expected_bytes, .. } if expected_bytes > 1 << 60), "{error}");

        let error = with(16, &1000u64.to_le_bytes());
        let bad = BitmapError::BadGranularity { granularity_bytes: 1000 };
        assert!(matches!(&error, PersistError::Geometry { source, .. } if *source == bad), "{error}");
        let error = with(40, &2000u32.to_le_bytes());
        assert!(matches!(error, PersistError::NameTooLong { length_bytes: 2000, .. }), "{error}");
        let error = with(HEADER_BYTES + 2, &[0xff]);
        assert!(matches!(error, PersistError::NameNotUtf8 { valid_up_to_bytes: 2, .. }), "{error}");
        // A bit for chunk 16385, which does not exist, in the one-bit last word.
        let error = with(bytes.len() - CRC_BYTES - 8, &[0b11]);
        assert!(matches!(error, PersistError::Geometry { .. }), "{error}");
    }

    #[test]
    fn missing_and_non_regular_paths_are_typed_errors() {
        let dir = temp_dir();
        let missing = dir.path().join("missing.bitmap");
        let error = load(&missing).err().unwrap();
        assert!(matches!(&error, PersistError::Io { path, .. } if *path == missing), "{error}");
        assert!(error.to_string().contains("No such file"), "{error}");
        let error = load(dir.path()).err().unwrap();
        assert!(matches!(error, PersistError::NotRegularFile { .. }), "{error}");
    }

    #[test]
    fn save_leaves_no_temp_file() {
        let dir = temp_dir();
        let path = dir.path().join("disk.bitmap");
        save(&path, "a", &sparse_bitmap(), false).unwrap();
        save(&path, "b", &sparse_bitmap(), true).unwrap();
        assert_eq!(entries(dir.path()), ["disk.bitmap"]);
    }

    #[test]
    fn failed_save_keeps_the_old_file_and_no_temp() {
        let dir = temp_dir();
        let path = dir.path().join("disk.bitmap");
        let old = sparse_bitmap();
        save(&path, "old", &old, false).unwrap();
        let new = DirtyBitmap::new(4 * KIB, MIB).unwrap();
        new.set(0, MIB).unwrap();

        FAIL_BEFORE_RENAME.with(|fail| fail.set(true));
        assert!(save(&path, "new", &new, false).is_err());
        assert_eq!(entries(dir.path()), ["disk.bitmap"]);
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.name, "old");
        assert_same(&loaded.bitmap, &old);

        // The path is a directory: the rename fails after the temp file was written.
        let blocker = dir.path().join("blocker");
        fs::create_dir(&blocker).unwrap();
        fs::write(blocker.join("keep"), b"x").unwrap();
        let error = save(&blocker, "new", &new, false).unwrap_err();
        assert!(matches!(error, PersistError::Io { .. }), "{error}");
        assert_eq!(entries(dir.path()), ["blocker", "disk.bitmap"]);
        assert_eq!(entries(&blocker), ["keep"]);
        assert_eq!(load(&path).unwrap().name, "old");
    }

    #[test]
    fn read_only_directory_never_leaves_a_broken_file() {
        let dir = temp_dir();
        let path = dir.path().join("disk.bitmap");
        save(&path, "old", &sparse_bitmap(), false).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o555)).unwrap();
        let result = save(&path, "new", &DirtyBitmap::new(4 * KIB, MIB).unwrap(), false);
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        // Root ignores the mode and the save succeeds; anyone else gets EACCES. Either way the
        // file is whole and there is no temp file.
        let expected_name = if result.is_ok() { "new" } else { "old" };
        if let Err(error) = &result {
            assert!(matches!(error, PersistError::Io { op: "create temp file", .. }), "{error}");
        }
        assert_eq!(load(&path).unwrap().name, expected_name);
        assert_eq!(entries(dir.path()), ["disk.bitmap"]);
    }
}
