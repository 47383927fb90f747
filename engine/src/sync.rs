//! The synchronisation primitives the shared structures use: `parking_lot` and std atomics in
//! normal builds, loom's models under `--cfg loom` so the same code is model-checked.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

/// A mutex whose `lock` cannot fail (poisoning does not apply: a panic under it is a bug
/// report, and the data stays consistent because every critical section is short and total).
pub(crate) struct Mutex<T>(Inner<T>);

#[cfg(not(loom))]
type Inner<T> = parking_lot::Mutex<T>;
#[cfg(loom)]
type Inner<T> = loom::sync::Mutex<T>;

#[cfg(not(loom))]
pub(crate) type MutexGuard<'a, T> = parking_lot::MutexGuard<'a, T>;
#[cfg(loom)]
pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Mutex<T> {
        Mutex(Inner::new(value))
    }

    #[cfg(not(loom))]
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock()
    }

    #[cfg(loom)]
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
