//! Tandem's NBD server: exports any [`tandem::block::Disk`] to the NBD clients users already
//! have (qemu-img, qemu-io, nbdinfo, nbdcopy, fio's nbd engine, the kernel's nbd-client).
//! An appliance embeds it as a library; `tandemd` is a thin user of it.
//!
//! Layout. Without I/O (tests and the fuzz target drive them with raw bytes): [`export`] (what
//! is offered and how), [`negotiate`] (the handshake), [`request`] (judging a request header),
//! [`status`] (block-status extents). With I/O: `socket` (receives and sends on the reactor),
//! `connection` (one client on one core), `flow` (its flow control), `commands` (a request on
//! the disk and its reply), [`server`] (listener, limits, the connection registry, shutdown).
//! The wire format itself is `tandem_drivers::nbd::proto`, shared with the client driver.

pub mod export;
pub mod negotiate;
pub mod request;
pub mod status;

mod commands;
mod connection;
mod flow;
pub mod server;
mod socket;

pub use export::{Export, ExportError, ExportOptions, ExportTable, MetaContext};
pub use server::{Listen, Server, ServerConfig, ServerError};
