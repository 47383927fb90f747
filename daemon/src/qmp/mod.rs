//! The QMP monitor: QEMU's machine protocol (docs/interop/qmp-spec.rst) on a Unix socket, so
//! scripts written for qemu-storage-daemon drive `tandemd` unchanged.
//!
//! # What it owns
//!
//! The listening socket (created by [`Monitor::start`], which refuses a path that exists, and
//! removed at shutdown only if it is still the socket we bound), the client connections, and
//! the protocol: greeting, capability negotiation, request framing and checking, the answers
//! to `qmp_capabilities` and `query-commands`, error and event encoding. Every other command
//! goes to the [`Commands`] the daemon passes in; the monitor knows nothing of block nodes.
//!
//! # Threads
//!
//! - One accept thread polls the listener and a wake-up socket (so shutdown never waits on
//!   `accept`).
//! - Per client, a reader thread reads, frames ([`request`]), and runs each command itself:
//!   a command may block (waiting for a drain, say) and only delays that client's later
//!   requests, never another client's reads.
//! - Per client, a writer thread owns the socket's write side and is fed by a bounded channel,
//!   so a response and an event are never interleaved mid-message and responses and events
//!   leave in the order they were queued.
//!
//! # Bounds, and why
//!
//! - At most [`Limits::clients`] connections (32 by default); one more is told so and closed,
//!   so a runaway script cannot exhaust threads.
//! - A request is at most [`request::MAX_REQUEST_BYTES`] and [`request::MAX_DEPTH`] deep; a
//!   larger one is refused as it arrives, never buffered whole.
//! - Each client's queue holds at most [`Limits::queue`] messages (4096 by default). Queueing
//!   never blocks: a client that falls that far behind (it stopped reading) is disconnected
//!   with a log line, so it can neither stall [`EventSender::emit`], the daemon's threads that
//!   emit, nor other clients.
//!
//! Shutdown closes every connection, which wakes blocked reads and writes, and joins every
//! thread; a command still running is waited for, so handlers must return.

pub mod request;
mod server;
mod session;

pub use server::{EventSender, Limits, Monitor, MonitorError};
pub use session::version_json;

use serde_json::{Map, Value};

/// QEMU's error classes; [`ErrorClass::wire_name`] is what the client reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KvmMissingCap,
}

impl ErrorClass {
    pub fn wire_name(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KvmMissingCap => "KVMMissingCap",
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.wire_name())
    }
}

/// A command's failure as the client sees it: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> QmpError {
        QmpError { class, desc: desc.into() }
    }

    /// Most failures: QEMU reports nearly everything as GenericError.
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError::new(ErrorClass::GenericError, desc)
    }

    /// CommandNotFound.
    pub fn not_found(desc: impl Into<String>) -> QmpError {
        QmpError::new(ErrorClass::CommandNotFound, desc)
    }

    /// DeviceNotFound: a node, job or export the command names does not exist.
    pub fn device_not_found(desc: impl Into<String>) -> QmpError {
        QmpError::new(ErrorClass::DeviceNotFound, desc)
    }

    /// DeviceNotActive: the device exists but is not in the state the command needs.
    pub fn device_not_active(desc: impl Into<String>) -> QmpError {
        QmpError::new(ErrorClass::DeviceNotActive, desc)
    }

    /// KVMMissingCap, kept because QEMU's schema has it.
    pub fn kvm_missing_cap(desc: impl Into<String>) -> QmpError {
        QmpError::new(ErrorClass::KvmMissingCap, desc)
    }

    /// The `error` member's value.
    pub fn to_json(&self) -> Value {
        serde_json::json!({"class": self.class.wire_name(), "desc": self.desc})
    }
}

/// The daemon's command handlers, which the monitor calls once a client has negotiated.
pub trait Commands: Send + Sync + 'static {
    /// Run one negotiated command; Ok is the `return` value. `name` was not qmp_capabilities,
    /// and is one of [`Commands::names`] (the monitor answers CommandNotFound for the rest).
    fn execute(&self, name: &str, arguments: Map<String, Value>) -> Result<Value, QmpError>;
    /// The commands `execute` knows (query-commands lists them with qmp_capabilities).
    fn names(&self) -> Vec<&'static str>;
}
