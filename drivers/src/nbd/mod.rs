//! NBD: the wire format Tandem's server and client share ([`proto`]). The server is a front-end
//! (crate `tandem-nbd`); the client is a driver like any other.

pub mod proto;
