//! Opening one connection: connect (TCP or Unix), then the handshake, both blocking with the
//! configured timeout. This runs at open and on the reconnect thread, never on a core; the
//! socket then goes to the reactor in blocking mode with its timeouts cleared (a receive
//! timeout would make the thread backend's recv fail with EAGAIN between replies).

use super::handshake::{negotiate, Failure, Negotiated, Wanted};
use super::{NbdConfig, NbdError};
use crate::nbd::uri::{Endpoint, NbdUri};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

/// Connect to `uri` and negotiate: the socket and what was agreed.
pub(crate) fn dial(uri: &NbdUri, config: &NbdConfig) -> Result<(OwnedFd, Negotiated), NbdError> {
    let target = uri.to_string();
    let connect_error = |error: std::io::Error| NbdError::Connect {
        target: target.clone(),
        errno: match error.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => libc::ETIMEDOUT,
            _ => error.raw_os_error().unwrap_or(libc::EIO),
        },
    };
    let wanted = Wanted {
        export: &uri.export,
        extended_headers: config.extended_headers,
        structured_replies: config.structured_replies,
    };
    let timeout = Some(config.connect_timeout);
    let (fd, negotiated) = match &uri.endpoint {
        Endpoint::Unix { path } => {
            let mut stream = UnixStream::connect(path).map_err(connect_error)?;
            stream.set_read_timeout(timeout).and_then(|_| stream.set_write_timeout(timeout)).map_err(connect_error)?;
            let negotiated = negotiate(&mut stream, &wanted);
            stream.set_read_timeout(None).and_then(|_| stream.set_write_timeout(None)).map_err(connect_error)?;
            (OwnedFd::from(stream), negotiated)
        }
        Endpoint::Tcp { host, port } => {
            let mut stream = connect_tcp(host, *port, config).map_err(connect_error)?;
            // Request headers are small and latency is what queue depth 1 measures.
            stream.set_nodelay(true).map_err(connect_error)?;
            stream.set_read_timeout(timeout).and_then(|_| stream.set_write_timeout(timeout)).map_err(connect_error)?;
            let negotiated = negotiate(&mut stream, &wanted);
            stream.set_read_timeout(None).and_then(|_| stream.set_write_timeout(None)).map_err(connect_error)?;
            (OwnedFd::from(stream), negotiated)
        }
    };
    let negotiated = negotiated.map_err(|failure| match failure {
        Failure::Io(errno) => NbdError::Connect { target: target.clone(), errno },
        Failure::Protocol(reason) => NbdError::Handshake { target: target.clone(), reason },
        Failure::Refused { option, reply, message } => {
            NbdError::Refused { target: target.clone(), export: uri.export.clone(), option, reply, message }
        }
    })?;
    Ok((fd, negotiated))
}

/// Every address the name resolves to, in order, each with the connect timeout.
fn connect_tcp(host: &str, port: u16, config: &NbdConfig) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::from_raw_os_error(libc::EHOSTUNREACH);
    for address in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&address, config.connect_timeout) {
            Ok(stream) => return Ok(stream),
            Err(error) => last = error,
        }
    }
    Err(last)
}
