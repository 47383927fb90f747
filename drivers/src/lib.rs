//! Block drivers for Tandem, one file each, all behind [`tandem::block::BlockDriver`]:
//! `file` (O_DIRECT through the reactor), `null` (completes at once), `memory` (tests and
//! examples) and `faulty` (wraps any driver and injects errors, latency and crashes).
//! Drivers know nothing of jobs.
//!
//! ```
//! use std::sync::Arc;
//! use tandem::block::{BlockStatus, Disk, WriteFlags};
//! use tandem::buf::AlignedBuf;
//! use tandem::IoPriority;
//! use tandem_drivers::MemoryDriver;
//!
//! let disk = Disk::new(Arc::new(MemoryDriver::new(1 << 20)));
//! let data = AlignedBuf::from_slice(&[7u8; 4096], 4096).unwrap();
//! disk.write_blocking(8192, data, WriteFlags::default(), IoPriority::GUEST).0.unwrap();
//! let (result, back) = disk.read_blocking(8192, AlignedBuf::zeroed(4096, 4096).unwrap(), IoPriority::GUEST);
//! result.unwrap();
//! assert_eq!(back.as_slice(), &[7u8; 4096][..]);
//! assert_eq!(disk.block_status_blocking(0, 8192).unwrap().status, BlockStatus::Hole);
//! ```

pub mod faulty;
pub mod file;
mod mapped;
pub mod memory;
pub mod nbd;
pub mod null;
pub mod rbd;

pub use faulty::{Fault, FaultRule, FaultyDriver, OpMask, Trigger};
pub use file::{FileDriver, FileOptions};
pub use memory::MemoryDriver;
pub use null::NullDriver;
