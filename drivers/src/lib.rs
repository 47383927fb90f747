//! Block drivers for Tandem, one file each, all behind [`tandem::block::BlockDriver`]:
//! `file` (O_DIRECT through the reactor), `null` (completes at once), `memory` (tests and
//! examples) and `faulty` (wraps any driver and injects errors, latency and crashes).
//! Drivers know nothing of jobs.

pub mod faulty;
pub mod file;
pub mod memory;
pub mod null;

pub use faulty::{Fault, FaultRule, FaultyDriver, OpMask, Trigger};
pub use file::{FileDriver, FileOptions};
pub use memory::MemoryDriver;
pub use null::NullDriver;
