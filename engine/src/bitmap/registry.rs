//! Named bitmaps attached to a disk. Anyone may read a bitmap; while a job holds a
//! [`BitmapLease`] on one, nobody else may remove, clear, enable/disable or merge into it
//! ("bitmap busy"). `mark` is the disk's write path: every enabled bitmap records the range.

use super::dirty::DirtyBitmap;
use super::error::BitmapError;
use parking_lot::RwLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const NAME_BYTES_MAX: usize = 1023;

struct Named {
    name: String,
    bitmap: Arc<DirtyBitmap>,
    /// Who holds the lease, if anyone.
    owner: Option<String>,
}

#[derive(Default)]
struct Inner {
    /// The disk's size: every bitmap attached must cover exactly it (`None`: any size).
    size_bytes: Option<u64>,
    bitmaps: RwLock<Vec<Named>>,
    /// Bitmaps attached: lets the write path skip the lock when there are none.
    count: AtomicUsize,
}

/// The named bitmaps of one disk. Cloning shares them.
#[derive(Clone, Default)]
pub struct BitmapRegistry {
    inner: Arc<Inner>,
}

/// Exclusive use of a named bitmap by one owner (a job); released on drop.
pub struct BitmapLease {
    registry: BitmapRegistry,
    name: String,
    bitmap: Arc<DirtyBitmap>,
}

impl BitmapLease {
    pub fn bitmap(&self) -> &Arc<DirtyBitmap> {
        &self.bitmap
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for BitmapLease {
    fn drop(&mut self) {
        let mut bitmaps = self.registry.inner.bitmaps.write();
        if let Some(named) = bitmaps.iter_mut().find(|n| n.name == self.name) {
            named.owner = None;
        }
    }
}

impl BitmapRegistry {
    pub fn new() -> BitmapRegistry {
        BitmapRegistry::default()
    }

    /// A registry for a disk of `size_bytes`: bitmaps of another size are refused.
    pub fn for_disk(size_bytes: u64) -> BitmapRegistry {
        BitmapRegistry { inner: Arc::new(Inner { size_bytes: Some(size_bytes), ..Inner::default() }) }
    }

    /// Attach `bitmap` as `name`.
    pub fn add(&self, name: &str, bitmap: DirtyBitmap) -> Result<Arc<DirtyBitmap>, BitmapError> {
        self.add_shared(name, Arc::new(bitmap))
    }

    /// Attach a bitmap someone else holds too, such as a [`RecordingBitmap`]'s, so the disk's
    /// writes mark what will be saved.
    ///
    /// [`RecordingBitmap`]: super::RecordingBitmap
    pub fn add_shared(&self, name: &str, bitmap: Arc<DirtyBitmap>) -> Result<Arc<DirtyBitmap>, BitmapError> {
        check_name(name)?;
        if let Some(size_bytes) = self.inner.size_bytes.filter(|size| *size != bitmap.size_bytes()) {
            return Err(BitmapError::GeometryMismatch {
                granularity_bytes: bitmap.granularity_bytes(),
                size_bytes,
                other_granularity_bytes: bitmap.granularity_bytes(),
                other_size_bytes: bitmap.size_bytes(),
            });
        }
        let mut bitmaps = self.inner.bitmaps.write();
        if bitmaps.iter().any(|n| n.name == name) {
            return Err(BitmapError::Exists { name: name.to_string() });
        }
        bitmaps.push(Named { name: name.to_string(), bitmap: bitmap.clone(), owner: None });
        self.inner.count.store(bitmaps.len(), Ordering::Release);
        Ok(bitmap)
    }

    /// Read access, always allowed.
    pub fn get(&self, name: &str) -> Result<Arc<DirtyBitmap>, BitmapError> {
        let bitmaps = self.inner.bitmaps.read();
        let named = bitmaps.iter().find(|n| n.name == name).ok_or_else(|| not_found(name))?;
        Ok(named.bitmap.clone())
    }

    pub fn names(&self) -> Vec<String> {
        self.inner.bitmaps.read().iter().map(|n| n.name.clone()).collect()
    }

    /// Take exclusive use of `name` for `owner`.
    pub fn acquire(&self, name: &str, owner: &str) -> Result<BitmapLease, BitmapError> {
        let bitmap = self.with_free(name, |named| {
            named.owner = Some(owner.to_string());
            named.bitmap.clone()
        })?;
        Ok(BitmapLease { registry: self.clone(), name: name.to_string(), bitmap })
    }

    /// Detach `name`; refused while it is leased.
    pub fn remove(&self, name: &str) -> Result<Arc<DirtyBitmap>, BitmapError> {
        let mut bitmaps = self.inner.bitmaps.write();
        let index = bitmaps.iter().position(|n| n.name == name).ok_or_else(|| not_found(name))?;
        check_free(&bitmaps[index])?;
        let named = bitmaps.remove(index);
        self.inner.count.store(bitmaps.len(), Ordering::Release);
        Ok(named.bitmap)
    }

    /// Clear `name`; refused while it is leased.
    pub fn clear(&self, name: &str) -> Result<(), BitmapError> {
        self.with_free(name, |named| named.bitmap.clear())
    }

    /// Enable or disable `name`; refused while it is leased.
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), BitmapError> {
        self.with_free(name, |named| named.bitmap.set_enabled(enabled))
    }

    /// OR `source` into `name`; refused while `name` is leased or on a geometry mismatch.
    pub fn merge_into(&self, name: &str, source: &DirtyBitmap) -> Result<(), BitmapError> {
        self.with_free(name, |named| named.bitmap.merge(source))?
    }

    /// The disk's write path: every enabled bitmap records `[offset, offset + length_bytes)`.
    pub fn mark(&self, offset: u64, length_bytes: u64) {
        if self.inner.count.load(Ordering::Acquire) == 0 {
            return;
        }
        for named in self.inner.bitmaps.read().iter() {
            // The disk checked the range against its size, which is the bitmaps' size.
            let _ = named.bitmap.set(offset, length_bytes);
        }
    }

    fn with_free<T>(&self, name: &str, change: impl FnOnce(&mut Named) -> T) -> Result<T, BitmapError> {
        let mut bitmaps = self.inner.bitmaps.write();
        let named = bitmaps.iter_mut().find(|n| n.name == name).ok_or_else(|| not_found(name))?;
        check_free(named)?;
        Ok(change(named))
    }
}

fn not_found(name: &str) -> BitmapError {
    BitmapError::NotFound { name: name.to_string() }
}

fn check_free(named: &Named) -> Result<(), BitmapError> {
    match &named.owner {
        Some(owner) => Err(BitmapError::Busy { name: named.name.clone(), owner: owner.clone() }),
        None => Ok(()),
    }
}

fn check_name(name: &str) -> Result<(), BitmapError> {
    let reason = match name {
        "" => "empty",
        n if n.len() > NAME_BYTES_MAX => "longer than 1023 bytes",
        n if n.chars().any(char::is_control) => "contains a control character",
        _ => return Ok(()),
    };
    Err(BitmapError::BadName { name: name.to_string(), reason })
}
