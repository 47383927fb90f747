//! Bitmap errors: each names the bad value; an operation that returns one changed nothing.

/// A bitmap error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    #[error("granularity {granularity_bytes} must be a power of two from 512 B to 64 MiB")]
    BadGranularity { granularity_bytes: u64 },
    #[error("disk size {size_bytes} is not supported (1 B to 2^62 B)")]
    BadSize { size_bytes: u64 },
    #[error("range at offset {offset} has length 0")]
    EmptyRange { offset: u64 },
    #[error("range [{offset}, {offset}+{length_bytes}) is outside the bitmap's {size_bytes} bytes")]
    OutOfRange { offset: u64, length_bytes: u64, size_bytes: u64 },
    #[error("geometry mismatch: granularity {granularity_bytes} / size {size_bytes} vs {other_granularity_bytes} / {other_size_bytes}")]
    GeometryMismatch { granularity_bytes: u64, size_bytes: u64, other_granularity_bytes: u64, other_size_bytes: u64 },
    #[error("bitmap busy: '{name}' is in use by {owner}")]
    Busy { name: String, owner: String },
    #[error("no bitmap named '{name}'")]
    NotFound { name: String },
    #[error("a bitmap named '{name}' already exists")]
    Exists { name: String },
    #[error("bitmap name '{name}' is invalid: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("bitmap '{name}' is inconsistent (its process stopped while recording it, so writes may be missing from it): remove it, or back up with on_inconsistent_bitmap=full to copy the whole disk and make it consistent again")]
    Inconsistent { name: String },
    /// The source is anonymous to the registry (any bitmap may be merged in), so the error
    /// names the bitmap it was to be merged into.
    #[error("cannot merge an inconsistent bitmap into '{name}' (writes may be missing from it): remove the source, or make it consistent with an on_inconsistent_bitmap=full backup first")]
    InconsistentMergeSource { name: String },
}
