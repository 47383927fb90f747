//! A connection's reader task: it receives replies, matches them to their requests by cookie
//! (in any order, as the server finishes them), puts read data where the request asked, and
//! settles the request. Anything the protocol does not allow (an unknown cookie, a chunk
//! longer than its request could need, a reply in the wrong header style) is a hard
//! disconnect: the stream can no longer be trusted.
//!
//! Every rule about what a reply may say is in `replies` (no I/O there, so the fuzz target
//! runs the same checks); this file receives and applies. A reply that breaks one fails its
//! request with EPROTO. A read's buffer lent out for receiving comes home on every path.
//!
//! Replies arrive through a receive buffer (many small replies per recv, one syscall for a
//! burst); their payloads are copied from it to the caller's buffer.

use super::connection::Connection;
use super::replies::{self, Chunk, Outstanding, Simple, Violation};
use super::table::Phase;
use crate::nbd::proto::{self as p, ReplyHeader};
use std::sync::Arc;
use tandem::buf::AlignedBuf;
use tandem::reactor::{Op, OpKind, RuntimeHandle, SharedFd};
use tandem::IoPriority;

/// Bytes one receive may bring in.
const RECV_BYTES: usize = 256 << 10;

/// Why the reader stops: the socket failed or closed, or the server broke the protocol (the
/// request the reply named, if any, fails with EPROTO rather than ENOTCONN).
enum Broken {
    Socket,
    Protocol { cookie: Option<u64>, violation: Violation },
}

/// A violation by the reply for `cookie` (`None`: the reply named no request of ours).
fn violation(cookie: Option<u64>) -> impl Fn(Violation) -> Broken + Copy {
    move |violation| Broken::Protocol { cookie, violation }
}

pub(crate) async fn run(connection: Arc<Connection>, epoch: u64, fd: SharedFd) {
    // Whatever way the reader ends, a panic included, the socket dies and its requests end.
    let _hang_up = HangUp { connection: connection.clone(), epoch };
    let runtime = connection.params.runtime.clone();
    let Ok(buf) = AlignedBuf::zeroed(RECV_BYTES, 64) else { return };
    let mut stream = Stream { runtime, fd, buf: Some(buf), start: 0, end: 0 };
    let broken = loop {
        if let Err(broken) = reply(&connection, epoch, &mut stream).await {
            break broken;
        }
    };
    if let Broken::Protocol { cookie, violation } = broken {
        eprintln!("tandem: the NBD server at {} broke the protocol ({violation}): hanging up", connection.params.uri);
        let mut state = connection.state.lock();
        if let Some(cookie) = cookie.filter(|_| state.epoch == epoch) {
            state.table.finish(cookie, Err(libc::EPROTO));
        }
    }
}

/// Kills the reader's socket when the reader ends.
struct HangUp {
    connection: Arc<Connection>,
    epoch: u64,
}

impl Drop for HangUp {
    fn drop(&mut self) {
        self.connection.kill(self.epoch);
    }
}

/// The socket's bytes, through the receive buffer.
struct Stream {
    runtime: RuntimeHandle,
    fd: SharedFd,
    /// Bytes `start..end` are received and not yet consumed; `None` while a recv runs.
    buf: Option<AlignedBuf>,
    start: usize,
    end: usize,
}

impl Stream {
    /// Fill `out` exactly.
    async fn take(&mut self, out: &mut [u8]) -> Result<(), Broken> {
        let mut done = 0;
        while done < out.len() {
            if self.start == self.end {
                self.fill().await?;
            }
            let n = (out.len() - done).min(self.end - self.start);
            let buf = self.buf.as_ref().ok_or(Broken::Socket)?; // home between recvs
            out[done..done + n].copy_from_slice(&buf.as_slice()[self.start..self.start + n]);
            (done, self.start) = (done + n, self.start + n);
        }
        Ok(())
    }

    /// Receive more; only called once every buffered byte is consumed.
    async fn fill(&mut self) -> Result<(), Broken> {
        assert_eq!(self.start, self.end, "a recv overwrites the buffer from its start");
        let buf = self.buf.take().ok_or(Broken::Socket)?; // one recv at a time
        let kind = OpKind::Recv { fd: self.fd.clone(), waitall: false };
        let out = self.runtime.submit(Op { kind, buf: Some(buf), priority: IoPriority::GUEST }).await;
        self.buf = out.buf;
        self.start = 0;
        self.end = 0;
        match out.result {
            r if r > 0 && self.buf.is_some() => {
                self.end = (r as usize).min(RECV_BYTES);
                Ok(())
            }
            _ => Err(Broken::Socket), // 0: the server closed; negative: the socket failed or was shut
        }
    }
}

/// The request a reply names. A cookie that names nothing on the wire breaks the stream.
fn request_of(connection: &Connection, epoch: u64, cookie: u64) -> Result<Outstanding, Broken> {
    let mut state = connection.state.lock();
    if state.epoch != epoch {
        return Err(Broken::Socket); // this socket is dead already
    }
    let slot = state.table.get(cookie).filter(|slot| slot.phase == Phase::Sent);
    let slot = slot.ok_or(Broken::Protocol { cookie: None, violation: Violation("a reply for no request") })?;
    Ok(Outstanding { kind: slot.request.kind, offset: slot.request.offset, length: slot.request.length })
}

/// Run `apply` on `cookie`'s slot, looked up again after an await: a timeout may have killed
/// this socket (and ended the request) meanwhile, which ends this reader too.
fn with_slot<R>(
    connection: &Connection,
    epoch: u64,
    cookie: u64,
    apply: impl FnOnce(&mut super::table::Slot) -> R,
) -> Result<R, Broken> {
    let mut state = connection.state.lock();
    if state.epoch != epoch {
        return Err(Broken::Socket);
    }
    state.table.get(cookie).map(apply).ok_or(Broken::Socket)
}

/// Receive one reply (a simple reply or one chunk) and apply it.
async fn reply(connection: &Connection, epoch: u64, stream: &mut Stream) -> Result<(), Broken> {
    let style = connection.params.style;
    let mut head = [0u8; p::REPLY_HEADER_BYTES_MAX];
    stream.take(&mut head[..4]).await?;
    let magic = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let bytes = replies::header_bytes(style, magic).map_err(violation(None))?;
    stream.take(&mut head[4..bytes]).await?;
    let header = p::parse_reply_header(&head[..bytes]);
    match header.ok_or(Broken::Protocol { cookie: None, violation: Violation("a short reply header") })? {
        ReplyHeader::Simple { error, cookie } => {
            let request = request_of(connection, epoch, cookie)?;
            let outcome = match replies::simple(style, request, error).map_err(violation(Some(cookie)))? {
                Simple::Done(outcome) => outcome,
                Simple::Data { bytes } => {
                    into_buf(connection, epoch, stream, cookie, 0, bytes).await?;
                    Ok(())
                }
            };
            with_slot(connection, epoch, cookie, |_| ())?;
            connection.state.lock().table.finish(cookie, outcome);
            Ok(())
        }
        ReplyHeader::Chunk { flags, kind, cookie, length } => {
            chunk(connection, epoch, stream, flags, kind, cookie, length).await
        }
    }
}

/// One structured or extended chunk.
async fn chunk(
    connection: &Connection,
    epoch: u64,
    stream: &mut Stream,
    flags: u16,
    kind: u16,
    cookie: u64,
    length: u64,
) -> Result<(), Broken> {
    let request = request_of(connection, epoch, cookie)?;
    let broke = violation(Some(cookie));
    let head_bytes = replies::chunk_head_bytes(request, flags, kind, length).map_err(broke)?;
    let mut head = vec![0u8; head_bytes];
    stream.take(&mut head).await?;
    let context = connection.state.lock().context;
    match replies::chunk(request, kind, length, &head, context).map_err(broke)? {
        Chunk::Nothing => {}
        Chunk::Data { relative, bytes } => into_buf(connection, epoch, stream, cookie, relative, bytes).await?,
        Chunk::Hole { relative, bytes } => with_slot(connection, epoch, cookie, |slot| {
            let covered = replies::cover(request, slot.covered_bytes, bytes)?;
            slice(slot.buf.as_mut(), relative, bytes).ok_or(Violation("a hole outside the read's buffer"))?.fill(0);
            slot.covered_bytes = covered;
            Ok(())
        })?
        .map_err(broke)?,
        Chunk::Status(extent_bytes, extent_flags) => with_slot(connection, epoch, cookie, |slot| {
            slot.status.get_or_insert((extent_bytes, extent_flags));
        })?,
        Chunk::Error(errno) => with_slot(connection, epoch, cookie, |slot| {
            slot.chunk_error.get_or_insert(errno);
        })?,
    }
    if flags & p::REPLY_FLAG_DONE != 0 {
        let outcome = with_slot(connection, epoch, cookie, |slot| {
            replies::done(request, slot.chunk_error, slot.covered_bytes, slot.status.is_some())
        })?
        .map_err(broke)?;
        connection.state.lock().table.finish(cookie, outcome);
    }
    Ok(())
}

/// Receive `bytes` of read data into `cookie`'s buffer at `relative`. The buffer is lent out
/// of the slot meanwhile, so the lock is not held across receives; it comes home on every way
/// out (see [`Lent`]).
async fn into_buf(
    connection: &Connection,
    epoch: u64,
    stream: &mut Stream,
    cookie: u64,
    relative: u64,
    bytes: u64,
) -> Result<(), Broken> {
    let broke = violation(Some(cookie));
    let request = request_of(connection, epoch, cookie)?;
    let buf = with_slot(connection, epoch, cookie, |slot| match (slot.lent, slot.buf.take()) {
        (false, Some(buf)) => {
            slot.lent = true;
            Some(buf)
        }
        (_, buf) => {
            slot.buf = buf;
            None // not a read, or its buffer is out already: never for a reply of ours
        }
    })?;
    let mut lent = Lent { connection, cookie, buf: Some(buf.ok_or(broke(Violation("read data for no buffer")))?) };
    let covered = with_slot(connection, epoch, cookie, |slot| replies::cover(request, slot.covered_bytes, bytes))?;
    let covered = covered.map_err(broke)?;
    let to = slice(lent.buf.as_mut(), relative, bytes);
    stream.take(to.ok_or(broke(Violation("read data outside the read's buffer")))?).await?;
    with_slot(connection, epoch, cookie, |slot| slot.covered_bytes = covered)
}

/// `bytes` at `relative` in `buf`, if all inside it.
fn slice(buf: Option<&mut AlignedBuf>, relative: u64, bytes: u64) -> Option<&mut [u8]> {
    let from = usize::try_from(relative).ok()?;
    let to = usize::try_from(relative.checked_add(bytes)?).ok()?;
    buf?.as_mut_slice().get_mut(from..to)
}

/// A read's buffer out of its slot while the reader receives into it. Dropping it (on
/// success, an error, a cancelled future or an unwind) puts the buffer back and settles the
/// slot: the caller waits while `lent` is set, so a buffer that never came home would leave
/// the request waiting forever, past any deadline.
struct Lent<'a> {
    connection: &'a Connection,
    cookie: u64,
    /// Always `Some` until dropped.
    buf: Option<AlignedBuf>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let buf = self.buf.take();
        let mut state = self.connection.state.lock();
        // A slot whose buffer is out is never freed (the caller waits for it), whatever the
        // epoch.
        if let Some(slot) = state.table.get(self.cookie) {
            (slot.buf, slot.lent) = (buf, false);
        }
        state.table.settle(self.cookie);
    }
}
