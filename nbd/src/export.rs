//! What a server exports: a [`Disk`] under a name, with the options an operator sets
//! (read-only or writable, description, which dirty bitmaps clients may read), the
//! transmission flags and block sizes that follow from them, and the meta contexts it offers.
//! The [`ExportTable`] is the set a server answers LIST, INFO and GO from; exports come and go
//! while clients connect (the daemon's `block-export-add`/`del`).

use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::sync::Arc;
use tandem::block::Disk;
use tandem_drivers::nbd::proto::{self, options::BlockSizes};

/// The largest payload one request may carry unless the operator says otherwise: QEMU's and
/// nbdkit's 32 MiB.
pub const REQUEST_BYTES_MAX_DEFAULT: u32 = 32 << 20;
/// Bytes clients are told to prefer: below it a write may cost a read-modify-write somewhere.
const PREFERRED_BLOCK_BYTES: u32 = 4096;
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// How an export is offered.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The name clients ask for ("" is the default export).
    pub name: String,
    /// Shown by LIST and NBD_INFO_DESCRIPTION.
    pub description: Option<String>,
    pub writable: bool,
    /// Dirty bitmaps of the disk offered as `qemu:dirty-bitmap:NAME` (each must exist).
    pub bitmaps: Vec<String>,
    /// The largest read or write payload, in bytes (a power of two, at least the disk's
    /// alignment).
    pub request_bytes_max: u32,
    /// Advertise NBD_FLAG_CAN_MULTI_CONN: a flush on one connection covers writes completed on
    /// every other. True of every Tandem disk (a flush is the device's), so on by default.
    pub multi_conn: bool,
    /// Make every write durable before its reply (QEMU's `writethrough=on`): writes go out
    /// with FUA.
    pub writethrough: bool,
    /// Let trims and zeroing deallocate (QEMU's node option `discard=unmap`); off, a trim
    /// succeeds without touching the disk and zeroes stay allocated (`discard=ignore`).
    pub unmap: bool,
}

impl ExportOptions {
    pub fn new(name: &str) -> ExportOptions {
        ExportOptions {
            name: name.to_string(),
            description: None,
            writable: false,
            bitmaps: Vec::new(),
            request_bytes_max: REQUEST_BYTES_MAX_DEFAULT,
            multi_conn: true,
            writethrough: false,
            unmap: true,
        }
    }
}

/// An option of an export that cannot be honoured, named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("export name '{name}' is longer than 4096 bytes or contains NUL")]
    BadName { name: String },
    #[error("an export named '{name}' already exists")]
    Duplicate { name: String },
    #[error("no export named '{name}'")]
    NotFound { name: String },
    #[error("export '{name}': bitmap '{bitmap}' does not exist on disk {disk}")]
    NoSuchBitmap { name: String, bitmap: String, disk: String },
    #[error("export '{name}': writable=on, but disk {disk} is read-only")]
    ReadOnlyDisk { name: String, disk: String },
    #[error("export '{name}': request_bytes_max {value} must be a power of two from the disk's alignment ({align_bytes}) to 2^31")]
    BadRequestMax { name: String, value: u32, align_bytes: u64 },
}

/// One exported disk, immutable once added.
pub struct Export {
    pub options: ExportOptions,
    pub disk: Disk,
}

impl Export {
    /// Check `options` against `disk`; nothing is changed on a refusal.
    pub fn new(disk: Disk, options: ExportOptions) -> Result<Export, ExportError> {
        let name = options.name.clone();
        if name.len() > proto::STRING_BYTES_MAX || name.contains('\0') {
            return Err(ExportError::BadName { name });
        }
        if options.writable && disk.capabilities().read_only {
            return Err(ExportError::ReadOnlyDisk { name, disk: disk.name().to_string() });
        }
        let align_bytes = disk.alignment().request_bytes;
        let max = options.request_bytes_max;
        if !max.is_power_of_two() || u64::from(max) < align_bytes.max(PREFERRED_BLOCK_BYTES.into()) || max > 1 << 31 {
            return Err(ExportError::BadRequestMax { name, value: max, align_bytes });
        }
        for bitmap in &options.bitmaps {
            if disk.bitmaps().get(bitmap).is_err() {
                let disk = disk.name().to_string();
                return Err(ExportError::NoSuchBitmap { name, bitmap: bitmap.clone(), disk });
            }
        }
        Ok(Export { options, disk })
    }

    pub fn name(&self) -> &str {
        &self.options.name
    }

    /// The transmission flags this export advertises (structured: whether the client
    /// negotiated structured replies, which DF needs).
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let caps = self.disk.capabilities();
        let mut flags = proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH | proto::FLAG_SEND_CACHE;
        if !self.options.writable {
            flags |= proto::FLAG_READ_ONLY;
        } else {
            flags |= proto::FLAG_SEND_FUA | proto::FLAG_SEND_WRITE_ZEROES;
            if caps.discard {
                flags |= proto::FLAG_SEND_TRIM;
            }
            if caps.write_zeroes {
                flags |= proto::FLAG_SEND_FAST_ZERO;
            }
        }
        if structured {
            flags |= proto::FLAG_SEND_DF; // every read is answered in one data chunk anyway
        }
        if self.options.multi_conn {
            flags |= proto::FLAG_CAN_MULTI_CONN;
        }
        flags
    }

    pub fn block_sizes(&self) -> BlockSizes {
        let minimum = self.disk.alignment().request_bytes as u32;
        let preferred = PREFERRED_BLOCK_BYTES.max(minimum);
        let sizes = BlockSizes { minimum, preferred, maximum: self.options.request_bytes_max };
        assert!(sizes.is_valid(), "checked in Export::new: {sizes:?}");
        sizes
    }

    /// Every meta context this export offers, by name.
    pub fn meta_contexts(&self) -> Vec<MetaContext> {
        let bitmaps = self.options.bitmaps.iter().map(|b| MetaContext::DirtyBitmap(b.clone()));
        std::iter::once(MetaContext::BaseAllocation).chain(bitmaps).collect()
    }
}

/// A meta context a client may select for NBD_CMD_BLOCK_STATUS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaContext {
    /// Holes and zeros, from the disk's block_status.
    BaseAllocation,
    /// A named dirty bitmap: bit 0 set where the guest wrote since the bitmap started.
    DirtyBitmap(String),
}

impl MetaContext {
    pub fn name(&self) -> String {
        match self {
            MetaContext::BaseAllocation => BASE_ALLOCATION.to_string(),
            MetaContext::DirtyBitmap(bitmap) => format!("{DIRTY_BITMAP_PREFIX}{bitmap}"),
        }
    }

    /// Whether this context answers `query`. A LIST query may name a whole namespace or the
    /// bitmap family (`base:`, `qemu:`, `qemu:dirty-bitmap:`); a SET query names one context.
    pub fn matches(&self, query: &str, listing: bool) -> bool {
        let name = self.name();
        if name == query {
            return true;
        }
        listing && matches!(query, "base:" | "qemu:" | DIRTY_BITMAP_PREFIX) && name.starts_with(query)
    }
}

/// The exports a server offers, by name. Cheap to read from every connection.
#[derive(Default)]
pub struct ExportTable {
    exports: RwLock<BTreeMap<String, Arc<Export>>>,
}

impl ExportTable {
    pub fn add(&self, export: Export) -> Result<Arc<Export>, ExportError> {
        let mut exports = self.exports.write();
        let name = export.name().to_string();
        if exports.contains_key(&name) {
            return Err(ExportError::Duplicate { name });
        }
        let export = Arc::new(export);
        exports.insert(name, export.clone());
        Ok(export)
    }

    /// Stop offering `name`; connections already using it keep their `Arc` until they close.
    pub fn remove(&self, name: &str) -> Result<Arc<Export>, ExportError> {
        self.exports.write().remove(name).ok_or_else(|| ExportError::NotFound { name: name.to_string() })
    }

    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.exports.read().get(name).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Export>> {
        self.exports.read().values().cloned().collect()
    }
}
