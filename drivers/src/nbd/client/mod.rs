//! The NBD client driver: an export on an NBD server (qemu-nbd, nbdkit, Tandem's own) as a
//! Tandem disk, opened from a URI ([`open_uri`]) or a typed [`NbdUri`] plus [`NbdConfig`].
//!
//! Layout: `dial` connects and runs `handshake`; `connection` owns one socket's life (cookie
//! `table`, send queue, death and reconnect) and each request's future; `writer` and `reader`
//! are the per-socket tasks on a reactor core; `watchdog` enforces deadlines. This file maps
//! the [`BlockDriver`] calls to NBD commands.
//!
//! Requests are pipelined: up to `inflight_max` per connection, replies matched by cookie in
//! whatever order the server sends them. With multi-conn advertised, requests spread over
//! `connections` sockets round robin (the server then promises that a flush on any covers
//! writes completed on all).

mod config;
mod connection;
mod dial;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod reader;
mod replies;
mod table;
mod watchdog;
mod writer;

pub use config::{NbdConfig, CONNECTIONS_MAX, INFLIGHT_MAX};
pub use error::NbdError;

use crate::nbd::proto::{self as p, Request};
use crate::nbd::uri::NbdUri;
use connection::{Connection, Params, Reply};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem::block::{
    Alignment, BlockDriver, BlockStatus, BufResult, Capabilities, DeviceHold, Extent, IoFuture, WriteFlags,
};
use tandem::buf::AlignedBuf;
use tandem::reactor::RuntimeHandle;
use tandem::{Error, IoPriority, Result};
use watchdog::Watchdog;

/// Open the export `uri` names (`nbd://HOST[:PORT]/EXPORT` or
/// `nbd+unix:///EXPORT?socket=PATH`).
pub fn open_uri(runtime: &RuntimeHandle, uri: &str, config: &NbdConfig) -> std::result::Result<NbdDriver, NbdError> {
    NbdDriver::open(runtime, &NbdUri::parse(uri)?, config)
}

/// An NBD export behind the [`BlockDriver`] trait.
pub struct NbdDriver {
    name: String,
    connections: Vec<Arc<Connection>>,
    next: AtomicUsize,
    size_bytes: u64,
    /// Transmission flags of the export.
    flags: u16,
    read_only: bool,
    minimum_bytes: u64,
    /// Status requests are cut to this (a compact header's 32-bit length, aligned).
    status_max: u64,
    params: Arc<Params>,
    _watchdog: Watchdog,
}

impl NbdDriver {
    pub fn open(runtime: &RuntimeHandle, uri: &NbdUri, config: &NbdConfig) -> std::result::Result<NbdDriver, NbdError> {
        config.validate()?;
        let (fd, negotiated) = dial::dial(uri, config)?;
        let flags = negotiated.flags;
        let count = match flags & p::FLAG_CAN_MULTI_CONN != 0 {
            true => config.connections,
            false => 1,
        };
        let params = Arc::new(Params {
            uri: uri.clone(),
            config: config.clone(),
            runtime: runtime.clone(),
            style: negotiated.style,
            size_bytes: negotiated.size_bytes,
            payload_max: u64::from(negotiated.sizes.maximum).min(tandem::block::MAX_REQUEST_BYTES),
        });
        let mut connections = vec![Connection::start(0, params.clone(), fd, &negotiated)];
        // A started connection's tasks keep it alive until it is closed: close them all on
        // any way out with an error.
        let fail = |connections: &[Arc<Connection>], error: NbdError| {
            connections.iter().for_each(|c| c.close());
            error
        };
        for index in 1..count {
            let (fd, more) = dial::dial(uri, config).map_err(|error| fail(&connections, error))?;
            if (more.size_bytes, more.style, more.flags) != (negotiated.size_bytes, negotiated.style, flags) {
                let what = format!("connection {index} negotiated {more:?}, the first {negotiated:?}");
                return Err(fail(&connections, NbdError::Changed { target: uri.to_string(), what }));
            }
            connections.push(Connection::start(index, params.clone(), fd, &more));
        }
        let period = (config.request_timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
        let watched = connections.iter().map(Arc::downgrade).collect();
        let watchdog = Watchdog::start(watched, period).map_err(|error| {
            let detail = error.to_string();
            fail(&connections, NbdError::Start { what: "watchdog thread", detail })
        })?;
        let minimum_bytes = u64::from(negotiated.sizes.minimum);
        Ok(NbdDriver {
            name: uri.to_string(),
            connections,
            next: AtomicUsize::new(0),
            size_bytes: negotiated.size_bytes,
            flags,
            read_only: config.read_only || flags & p::FLAG_READ_ONLY != 0,
            minimum_bytes,
            status_max: match negotiated.style {
                p::HeaderStyle::Extended => tandem::block::MAX_REQUEST_BYTES,
                _ => u64::from(u32::MAX) & !(minimum_bytes - 1),
            },
            params,
            _watchdog: watchdog,
        })
    }

    /// How many sockets the driver uses (more than one only with multi-conn).
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// The header style the handshake agreed on.
    pub fn header_style(&self) -> p::HeaderStyle {
        self.params.style
    }

    /// Whether `block_status` asks the server (`base:allocation` agreed).
    pub fn has_allocation_status(&self) -> bool {
        self.connections[0].state.lock().context.is_some()
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    fn connection(&self) -> &Arc<Connection> {
        let index = match self.connections.len() {
            1 => 0,
            n => self.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        &self.connections[index]
    }

    fn request(&self, kind: u16, flags: u16, offset: u64, length: u64) -> Request {
        Request { flags, kind, cookie: 0, offset, length }
    }

    /// A command without data, cut into pieces a header can carry, sent one after another.
    fn command(&self, op: &'static str, kind: u16, flags: u16, offset: u64, length: u64) -> IoFuture<Result<()>> {
        let piece_max = match self.params.style {
            p::HeaderStyle::Extended => u64::MAX,
            _ => u64::from(u32::MAX) & !(self.minimum_bytes.max(4096) - 1),
        };
        let hold = DeviceHold::new();
        let calls: Vec<_> = pieces(offset, length, piece_max)
            .map(|(at, bytes)| self.connection().call(self.request(kind, flags, at, bytes), None, Some(hold.clone())))
            .collect();
        let future = async move {
            for call in calls {
                let reply = call.await;
                reply.result.map_err(|errno| Error::Io { op, offset, errno })?;
            }
            Ok(())
        };
        IoFuture::boxed_with_hold(future, &hold)
    }

    fn refuse_read_only(&self, op: &'static str) -> Option<Error> {
        self.read_only.then(|| Error::ReadOnly { op, name: self.name.clone() })
    }
}

/// `(offset, length)` pieces of at most `max` bytes covering the range.
fn pieces(offset: u64, length: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    assert!(max > 0);
    let count = length.div_ceil(max);
    (0..count).map(move |i| {
        let at = i * max;
        (offset + at, (length - at).min(max))
    })
}

/// A reply's outcome for `op` at `offset`.
fn outcome(op: &'static str, offset: u64, reply: &Reply) -> Result<()> {
    reply.result.map_err(|errno| Error::Io { op, offset, errno })
}

/// `base:allocation` flags as a Tandem status: a hole that does not read as zeros is data.
fn status_of(flags: u32) -> BlockStatus {
    match (flags & p::STATE_HOLE != 0, flags & p::STATE_ZERO != 0) {
        (true, true) => BlockStatus::Hole,
        (_, true) => BlockStatus::Zero,
        _ => BlockStatus::Data,
    }
}

impl std::fmt::Debug for NbdDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdDriver")
            .field("name", &self.name)
            .field("size_bytes", &self.size_bytes)
            .field("style", &self.params.style)
            .field("connections", &self.connections.len())
            .finish()
    }
}

impl Drop for NbdDriver {
    fn drop(&mut self) {
        for connection in &self.connections {
            connection.close();
        }
    }
}

impl BlockDriver for NbdDriver {
    fn name(&self) -> &str {
        &self.name
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn alignment(&self) -> Alignment {
        // The server's minimum block size; memory alignment does not matter to a socket.
        Alignment { request_bytes: self.minimum_bytes, memory_bytes: 1 }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.read_only,
            fua: self.has(p::FLAG_SEND_FUA),
            write_zeroes: self.has(p::FLAG_SEND_WRITE_ZEROES),
            discard: self.has(p::FLAG_SEND_TRIM),
            block_status: self.has_allocation_status(),
        }
    }

    fn read(&self, offset: u64, buf: AlignedBuf, _priority: IoPriority) -> IoFuture<BufResult<()>> {
        let length = buf.len() as u64;
        if length > self.params.payload_max {
            return split::read(self, offset, buf);
        }
        let call = self.connection().call(self.request(p::CMD_READ, 0, offset, length), Some(buf), None);
        IoFuture::boxed(async move {
            let reply = call.await;
            (outcome("read", offset, &reply), reply.buf.expect("a read's buffer comes back"))
        })
    }

    fn write(&self, offset: u64, buf: AlignedBuf, flags: WriteFlags, _priority: IoPriority) -> IoFuture<BufResult<()>> {
        if let Some(error) = self.refuse_read_only("write") {
            return IoFuture::ready((Err(error), buf));
        }
        let length = buf.len() as u64;
        if length > self.params.payload_max {
            return split::write(self, offset, buf, flags);
        }
        let mut command_flags = 0;
        if self.params.style == p::HeaderStyle::Extended {
            command_flags |= p::CMD_FLAG_PAYLOAD_LEN;
        }
        // Without the server's FUA, a write then a flush, as QEMU emulates it.
        let fua_flush = match flags.fua {
            true if self.has(p::FLAG_SEND_FUA) => {
                command_flags |= p::CMD_FLAG_FUA;
                None
            }
            true => Some(self.flush(IoPriority::GUEST)),
            false => None,
        };
        let hold = DeviceHold::new();
        let request = self.request(p::CMD_WRITE, command_flags, offset, length);
        let call = self.connection().call(request, Some(buf), Some(hold.clone()));
        let future = async move {
            let reply = call.await;
            let mut result = outcome("write", offset, &reply);
            if let (Ok(()), Some(flush)) = (&result, fua_flush) {
                result = flush.await;
            }
            (result, reply.buf.expect("a write's buffer comes back"))
        };
        IoFuture::boxed_with_hold(future, &hold)
    }

    fn flush(&self, _priority: IoPriority) -> IoFuture<Result<()>> {
        if !self.has(p::FLAG_SEND_FLUSH) {
            return IoFuture::ready(Ok(())); // no write cache: completed writes are durable
        }
        // With several connections (multi-conn), a flush on one covers writes completed on
        // all: the server promised it.
        let call = self.connection().call(self.request(p::CMD_FLUSH, 0, 0, 0), None, None);
        IoFuture::boxed(async move { outcome("flush", 0, &call.await) })
    }

    fn write_zeroes(&self, offset: u64, length_bytes: u64, may_unmap: bool, _p: IoPriority) -> IoFuture<Result<()>> {
        if let Some(error) = self.refuse_read_only("write_zeroes") {
            return IoFuture::ready(Err(error));
        }
        if !self.has(p::FLAG_SEND_WRITE_ZEROES) {
            return IoFuture::ready(Err(Error::Io { op: "write_zeroes", offset, errno: libc::EOPNOTSUPP }));
        }
        let flags = if may_unmap { 0 } else { p::CMD_FLAG_NO_HOLE };
        self.command("write_zeroes", p::CMD_WRITE_ZEROES, flags, offset, length_bytes)
    }

    fn discard(&self, offset: u64, length_bytes: u64, _priority: IoPriority) -> IoFuture<Result<()>> {
        if let Some(error) = self.refuse_read_only("discard") {
            return IoFuture::ready(Err(error));
        }
        if !self.has(p::FLAG_SEND_TRIM) {
            return IoFuture::ready(Ok(())); // advisory: a server without trim keeps the data
        }
        self.command("discard", p::CMD_TRIM, 0, offset, length_bytes)
    }

    fn block_status(&self, offset: u64, length_bytes: u64) -> IoFuture<Result<Extent>> {
        let all_data = Extent { status: BlockStatus::Data, offset, length_bytes };
        if !self.has_allocation_status() {
            return IoFuture::ready(Ok(all_data));
        }
        let length = length_bytes.min(self.status_max);
        let request = self.request(p::CMD_BLOCK_STATUS, p::CMD_FLAG_REQ_ONE, offset, length);
        let call = self.connection().call(request, None, None);
        IoFuture::boxed(async move {
            let reply = call.await;
            outcome("block_status", offset, &reply)?;
            // The reader ends a status request without our extent as a protocol error; should
            // one come through anyway, the caller gets that error, not a panic.
            let protocol = Error::Io { op: "block_status", offset, errno: libc::EPROTO };
            let (extent_bytes, flags) = reply.status.ok_or(protocol)?;
            Ok(Extent { status: status_of(flags), offset, length_bytes: extent_bytes.min(length) })
        })
    }
}

/// Reads and writes larger than the server's maximum payload: pieces through their own
/// buffers, one after another (rare: the engine's requests are smaller than servers allow).
mod split {
    use super::*;

    pub(super) fn read(driver: &NbdDriver, offset: u64, mut buf: AlignedBuf) -> IoFuture<BufResult<()>> {
        let max = driver.params.payload_max;
        let reads: Vec<_> = pieces(offset, buf.len() as u64, max)
            .map(|(at, bytes)| {
                let piece = AlignedBuf::zeroed(bytes as usize, 64).expect("a piece buffer");
                (at - offset, driver.read(at, piece, IoPriority::GUEST))
            })
            .collect();
        IoFuture::boxed(async move {
            for (relative, read) in reads {
                let (result, piece) = read.await;
                if let Err(error) = result {
                    return (Err(error), buf);
                }
                let at = relative as usize;
                buf.as_mut_slice()[at..at + piece.len()].copy_from_slice(piece.as_slice());
            }
            (Ok(()), buf)
        })
    }

    pub(super) fn write(
        driver: &NbdDriver,
        offset: u64,
        buf: AlignedBuf,
        flags: WriteFlags,
    ) -> IoFuture<BufResult<()>> {
        let max = driver.params.payload_max;
        let writes: Vec<_> = pieces(offset, buf.len() as u64, max)
            .map(|(at, bytes)| {
                let start = (at - offset) as usize;
                let piece =
                    AlignedBuf::from_slice(&buf.as_slice()[start..start + bytes as usize], 64).expect("a piece buffer");
                driver.write(at, piece, flags, IoPriority::GUEST)
            })
            .collect();
        IoFuture::boxed(async move {
            for write in writes {
                if let (Err(error), _) = write.await {
                    return (Err(error), buf);
                }
            }
            (Ok(()), buf)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_range_within_the_limit() {
        let got: Vec<_> = pieces(10, 25, 10).collect();
        assert_eq!(got, vec![(10, 10), (20, 10), (30, 5)]);
        assert_eq!(pieces(0, 0, 10).count(), 0);
        let big: Vec<_> = pieces(0, 5 << 30, u64::from(u32::MAX) & !4095).collect();
        assert!(big.iter().all(|&(_, bytes)| bytes <= u64::from(u32::MAX)));
        assert_eq!(big.iter().map(|&(_, bytes)| bytes).sum::<u64>(), 5 << 30);
    }

    #[test]
    fn allocation_flags_map_to_statuses() {
        assert_eq!(status_of(0), BlockStatus::Data);
        assert_eq!(status_of(p::STATE_HOLE), BlockStatus::Data, "unallocated but not known to read zero");
        assert_eq!(status_of(p::STATE_ZERO), BlockStatus::Zero);
        assert_eq!(status_of(p::STATE_HOLE | p::STATE_ZERO), BlockStatus::Hole);
    }
}
