//! Tandem: an embeddable storage engine.
//!
//! A thread-per-core [`reactor`] submits O_DIRECT reads and writes through io_uring (or a
//! thread pool where io_uring is refused); the [`block`] layer puts a checked [`block::Disk`]
//! handle in front of any [`block::BlockDriver`]. Buffers are owned and aligned ([`buf`]): a
//! buffer moves into an operation and comes back with its result.
//!
//! ```
//! use tandem::buf::AlignedBuf;
//! let buf = AlignedBuf::zeroed(4096, 4096).unwrap();
//! assert_eq!(buf.len(), 4096);
//! assert_eq!(buf.as_ptr() as usize % 4096, 0);
//! ```

pub mod bitmap;
pub mod block;
pub mod buf;
pub mod error;
pub mod inflight;
pub mod job;
pub mod log;
pub mod priority;
pub mod reactor;
pub mod rng;
mod sync;

pub use error::{Error, Result};
pub use priority::{IoClass, IoPriority};
