//! Dirty bitmaps: one bit per `granularity` bytes of a disk, lock-sharded so several cores can
//! mark guest writes while a job scans and resets, with a summary level so scans skip clean
//! regions. Knows nothing of jobs; the registry attaches named bitmaps to a disk.

mod dirty;
mod error;
mod persist;
mod registry;

pub use dirty::{DirtyBitmap, GRANULARITY_BYTES_MAX, GRANULARITY_BYTES_MIN};
pub use error::BitmapError;
pub use persist::{
    clear_inconsistent, load, open_for_recording, open_for_recording_any, record, save, LoadedBitmap, PersistError,
    RecordingBitmap, FORMAT_VERSION, MAGIC,
};
pub use registry::{BitmapLease, BitmapRegistry};
