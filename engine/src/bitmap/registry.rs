//! Named bitmaps attached to a disk. Anyone may read a bitmap; while a job holds a
//! [`BitmapLease`] on one, nobody else may remove, clear, enable/disable or merge into it
//! ("bitmap busy"). An inconsistent bitmap (writes may be missing from it) may only be removed
//! or leased by a job that does not trust it, as in QEMU. `mark` is the disk's write path:
//! every enabled bitmap records the range.

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

    /// Whether a job holds `name` (QMP's `busy`); false for an unknown name.
    pub fn is_leased(&self, name: &str) -> bool {
        self.inner.bitmaps.read().iter().any(|n| n.name == name && n.owner.is_some())
    }

    pub fn names(&self) -> Vec<String> {
        self.inner.bitmaps.read().iter().map(|n| n.name.clone()).collect()
    }

    /// Take exclusive use of `name` for `owner`, who will trust its marks: refused while it
    /// is inconsistent.
    pub fn acquire(&self, name: &str, owner: &str) -> Result<BitmapLease, BitmapError> {
        self.lease(name, owner, true)
    }

    /// As [`BitmapRegistry::acquire`], but an inconsistent bitmap is leased too: for an owner
    /// that checks [`DirtyBitmap::is_inconsistent`] under the lease and then does not trust
    /// the marks (a backup falling back to a full copy). Nobody else can change the flag
    /// through the registry while the lease is held.
    pub fn acquire_untrusted(&self, name: &str, owner: &str) -> Result<BitmapLease, BitmapError> {
        self.lease(name, owner, false)
    }

    fn lease(&self, name: &str, owner: &str, trusted: bool) -> Result<BitmapLease, BitmapError> {
        let change = |named: &mut Named| {
            if trusted {
                check_consistent(named)?;
            }
            named.owner = Some(owner.to_string());
            Ok(named.bitmap.clone())
        };
        let bitmap = self.with_free(name, change)??;
        Ok(BitmapLease { registry: self.clone(), name: name.to_string(), bitmap })
    }

    /// Detach `name`; refused while it is leased. Allowed when it is inconsistent: removing
    /// it is the one thing to do with such a bitmap besides a fallback backup.
    pub fn remove(&self, name: &str) -> Result<Arc<DirtyBitmap>, BitmapError> {
        let mut bitmaps = self.inner.bitmaps.write();
        let index = bitmaps.iter().position(|n| n.name == name).ok_or_else(|| not_found(name))?;
        check_free(&bitmaps[index])?;
        let named = bitmaps.remove(index);
        self.inner.count.store(bitmaps.len(), Ordering::Release);
        Ok(named.bitmap)
    }

    /// Clear `name`; refused while it is leased or inconsistent (QEMU refuses it too: a clear
    /// would make an untrustworthy bitmap look like a fresh one).
    pub fn clear(&self, name: &str) -> Result<(), BitmapError> {
        self.with_trusted(name, |named| named.bitmap.clear())
    }

    /// Enable or disable `name`; refused while it is leased or inconsistent (as QEMU).
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), BitmapError> {
        self.with_trusted(name, |named| named.bitmap.set_enabled(enabled))
    }

    /// OR `source` into `name`; refused while `name` is leased, when either side is
    /// inconsistent (the result would be trusted with marks missing), or on a geometry
    /// mismatch.
    pub fn merge_into(&self, name: &str, source: &DirtyBitmap) -> Result<(), BitmapError> {
        if source.is_inconsistent() {
            return Err(BitmapError::InconsistentMergeSource { name: name.to_string() });
        }
        self.with_trusted(name, |named| named.bitmap.merge(source))?
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

    /// As `with_free`, and refused when the bitmap is inconsistent.
    fn with_trusted<T>(&self, name: &str, change: impl FnOnce(&mut Named) -> T) -> Result<T, BitmapError> {
        self.with_free(name, |named| check_consistent(named).map(|()| change(named)))?
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

fn check_consistent(named: &Named) -> Result<(), BitmapError> {
    match named.bitmap.is_inconsistent() {
        true => Err(BitmapError::Inconsistent { name: named.name.clone() }),
        false => Ok(()),
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

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE_BYTES: u64 = 1 << 20;

    fn registry_with(name: &str, inconsistent: bool) -> (BitmapRegistry, Arc<DirtyBitmap>) {
        let registry = BitmapRegistry::for_disk(SIZE_BYTES);
        let bitmap = DirtyBitmap::new(64 << 10, SIZE_BYTES).unwrap();
        bitmap.set(0, 1).unwrap();
        bitmap.set_inconsistent(inconsistent);
        let bitmap = registry.add(name, bitmap).unwrap();
        (registry, bitmap)
    }

    #[test]
    fn an_inconsistent_bitmap_is_refused_by_name_wherever_it_would_be_trusted() {
        let (registry, bitmap) = registry_with("b0", true);
        let refused = BitmapError::Inconsistent { name: "b0".into() };
        assert_eq!(registry.acquire("b0", "mirror job m").err(), Some(refused.clone()));
        assert_eq!(registry.clear("b0").err(), Some(refused.clone()));
        assert_eq!(registry.set_enabled("b0", false).err(), Some(refused.clone()));
        let other = DirtyBitmap::new(64 << 10, SIZE_BYTES).unwrap();
        assert_eq!(registry.merge_into("b0", &other).err(), Some(refused.clone()));
        let text = refused.to_string();
        assert!(text.contains("'b0'") && text.contains("on_inconsistent_bitmap=full"), "{text}");
        // Nothing changed, and nobody holds it.
        assert!(bitmap.is_inconsistent() && bitmap.is_enabled());
        assert_eq!(bitmap.dirty_chunk_count(), 1);
        assert!(registry.acquire_untrusted("b0", "backup job j").is_ok());
    }

    #[test]
    fn an_inconsistent_merge_source_is_refused_and_the_destination_untouched() {
        let (registry, bitmap) = registry_with("dest", false);
        let source = DirtyBitmap::new(64 << 10, SIZE_BYTES).unwrap();
        source.set(128 << 10, 1).unwrap();
        source.set_inconsistent(true);
        let error = registry.merge_into("dest", &source).unwrap_err();
        assert_eq!(error, BitmapError::InconsistentMergeSource { name: "dest".into() });
        assert!(error.to_string().contains("'dest'"), "{error}");
        assert_eq!(bitmap.dirty_chunk_count(), 1);
        source.set_inconsistent(false);
        registry.merge_into("dest", &source).unwrap();
        assert_eq!(bitmap.dirty_chunk_count(), 2);
    }

    #[test]
    fn an_inconsistent_bitmap_can_be_removed_and_leased_untrusted_only_when_free() {
        let (registry, _) = registry_with("b0", true);
        let lease = registry.acquire_untrusted("b0", "backup job j").unwrap();
        assert!(lease.bitmap().is_inconsistent());
        let busy = registry.acquire_untrusted("b0", "backup job k").err().unwrap();
        assert!(matches!(busy, BitmapError::Busy { ref owner, .. } if owner == "backup job j"), "{busy}");
        assert!(matches!(registry.remove("b0"), Err(BitmapError::Busy { .. })));
        drop(lease);
        let removed = registry.remove("b0").unwrap();
        assert!(removed.is_inconsistent());
        assert_eq!(registry.names(), Vec::<String>::new());
    }
}
