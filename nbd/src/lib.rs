//! Tandem's NBD server: exports any [`tandem::block::Disk`] to the NBD clients users already
//! have (qemu-img, qemu-io, nbdinfo, nbdcopy, fio's nbd engine, the kernel's nbd-client).
//! An appliance embeds it as a library; `tandemd` is a thin user of it.
//!
//! Layout: [`export`] (what is offered and how), [`negotiate`] (the handshake, without I/O),
//! [`status`] (block-status extents), `connection` (one client's transmission phase on one
//! core), [`server`] (listeners, limits, the connection registry, shutdown). The wire format
//! itself is `tandem_drivers::nbd::proto`, shared with the client driver.

pub mod export;
pub mod negotiate;
pub mod request;
pub mod status;

pub use export::{Export, ExportError, ExportOptions, ExportTable, MetaContext};
mod commands;
mod connection;
mod flow;
pub mod server;
mod socket;

pub use server::{Listen, Server, ServerConfig, ServerError};
