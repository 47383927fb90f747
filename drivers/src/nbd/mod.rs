//! NBD: the wire format Tandem's server and client share ([`proto`]), URIs ([`uri`]) and the
//! client driver ([`client`]). The server is a front-end (crate `tandem-nbd`); the client is a
//! driver like any other.

pub mod client;
pub mod proto;
pub mod uri;

pub use client::{open_uri, NbdConfig, NbdDriver, NbdError};
pub use uri::{is_nbd_uri, Endpoint, NbdUri, UriError};
