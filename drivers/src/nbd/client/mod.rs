//! The NBD client driver (in progress).

// The driver that uses these lands in the next commit.
#![allow(dead_code)]

mod config;
mod error;
mod handshake;
mod table;

pub use config::NbdConfig;
pub use error::NbdError;
