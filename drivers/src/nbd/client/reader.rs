//! A connection's reader task: it receives replies, matches them to their requests by cookie
//! (in any order, as the server finishes them), puts read data where the request asked, and
//! settles the request. Anything the protocol does not allow (an unknown cookie, a chunk
//! longer than its request could need, a reply in the wrong header style) is a hard
//! disconnect: the stream can no longer be trusted.
//!
//! Replies arrive through a receive buffer (many small replies per recv, one syscall for a
//! burst); their payloads are copied from it to the caller's buffer.

use super::connection::Connection;
use super::table::Phase;
use crate::nbd::proto::{self as p, HeaderStyle, ReplyHeader};
use std::sync::Arc;
use tandem::buf::AlignedBuf;
use tandem::reactor::{Op, OpKind, RuntimeHandle, SharedFd};
use tandem::IoPriority;

/// Bytes one receive may bring in.
const RECV_BYTES: usize = 256 << 10;
/// Payload of a reply chunk that carries no read data (status, errors) at most.
const CHUNK_BYTES_MAX: u64 = 1 << 20;

/// Why the reader stops: the socket failed, or the server broke the protocol.
type Broken = ();

pub(crate) async fn run(connection: Arc<Connection>, epoch: u64, fd: SharedFd) {
    let runtime = connection.params.runtime.clone();
    if let Ok(buf) = AlignedBuf::zeroed(RECV_BYTES, 64) {
        let mut stream = Stream { runtime, fd, buf: Some(buf), start: 0, end: 0 };
        while reply(&connection, epoch, &mut stream).await.is_ok() {}
    }
    connection.kill(epoch);
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
            let buf = self.buf.as_ref().expect("the receive buffer is home between recvs");
            out[done..done + n].copy_from_slice(&buf.as_slice()[self.start..self.start + n]);
            (done, self.start) = (done + n, self.start + n);
        }
        Ok(())
    }

    /// Receive more; only called once every buffered byte is consumed.
    async fn fill(&mut self) -> Result<(), Broken> {
        assert_eq!(self.start, self.end, "a recv overwrites the buffer from its start");
        let buf = self.buf.take().expect("one recv at a time");
        let kind = OpKind::Recv { fd: self.fd.clone(), waitall: false };
        let out = self.runtime.submit(Op { kind, buf: Some(buf), priority: IoPriority::GUEST }).await;
        self.buf = out.buf;
        self.start = 0;
        self.end = 0;
        match out.result {
            r if r > 0 && self.buf.is_some() => {
                self.end = r as usize;
                Ok(())
            }
            _ => Err(()), // 0: the server closed; negative: the socket failed or was shut
        }
    }
}

/// The request a reply names: kind, offset, length. A cookie that names nothing on the wire
/// breaks the stream.
fn request_of(connection: &Connection, epoch: u64, cookie: u64) -> Result<(u16, u64, u64), Broken> {
    let mut state = connection.state.lock();
    if state.epoch != epoch {
        return Err(()); // this socket is dead already
    }
    let slot = state.table.get(cookie).filter(|slot| slot.phase == Phase::Sent).ok_or(())?;
    Ok((slot.request.kind, slot.request.offset, slot.request.length))
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
        return Err(());
    }
    state.table.get(cookie).map(apply).ok_or(())
}

/// Receive one reply (a simple reply or one chunk) and apply it.
async fn reply(connection: &Connection, epoch: u64, stream: &mut Stream) -> Result<(), Broken> {
    let style = connection.params.style;
    let mut head = [0u8; p::REPLY_HEADER_BYTES_MAX];
    stream.take(&mut head[..4]).await?;
    let magic = u32::from_be_bytes(head[..4].try_into().expect("4 bytes"));
    let allowed = match style {
        HeaderStyle::Simple => magic == p::SIMPLE_REPLY_MAGIC,
        HeaderStyle::Structured => magic == p::SIMPLE_REPLY_MAGIC || magic == p::STRUCTURED_REPLY_MAGIC,
        HeaderStyle::Extended => magic == p::EXTENDED_REPLY_MAGIC,
    };
    let bytes = p::reply_header_bytes(magic).filter(|_| allowed).ok_or(())?;
    stream.take(&mut head[4..bytes]).await?;
    match p::parse_reply_header(&head[..bytes]).ok_or(())? {
        ReplyHeader::Simple { error, cookie } => {
            let (kind, _, length) = request_of(connection, epoch, cookie)?;
            if error == 0 && kind == p::CMD_READ {
                into_buf(connection, epoch, stream, cookie, 0, length).await?;
            }
            let outcome = if error == 0 { Ok(()) } else { Err(p::local_errno(error)) };
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
    let (command, offset, request_length) = request_of(connection, epoch, cookie)?;
    match kind {
        p::REPLY_TYPE_NONE if length == 0 && flags & p::REPLY_FLAG_DONE != 0 => {}
        p::REPLY_TYPE_OFFSET_DATA if command == p::CMD_READ && (8..=8 + request_length).contains(&length) => {
            let mut at = [0u8; 8];
            stream.take(&mut at).await?;
            let (start, bytes) = (u64::from_be_bytes(at), length - 8);
            let relative = start.checked_sub(offset).filter(|r| r + bytes <= request_length).ok_or(())?;
            into_buf(connection, epoch, stream, cookie, relative, bytes).await?;
        }
        p::REPLY_TYPE_OFFSET_HOLE if command == p::CMD_READ && length == 12 => {
            let mut hole = [0u8; 12];
            stream.take(&mut hole).await?;
            let start = u64::from_be_bytes(hole[..8].try_into().expect("8 bytes"));
            let bytes = u64::from(u32::from_be_bytes(hole[8..].try_into().expect("4 bytes")));
            let relative = start.checked_sub(offset).filter(|r| r + bytes <= request_length).ok_or(())?;
            with_slot(connection, epoch, cookie, |slot| {
                let buf = slot.buf.as_mut().expect("a read's buffer is home between chunks");
                buf.as_mut_slice()[relative as usize..(relative + bytes) as usize].fill(0);
                slot.covered_bytes += bytes;
            })?;
        }
        p::REPLY_TYPE_BLOCK_STATUS | p::REPLY_TYPE_BLOCK_STATUS_EXT
            if command == p::CMD_BLOCK_STATUS && length <= CHUNK_BYTES_MAX =>
        {
            let payload = small_payload(stream, length).await?;
            let (context, descriptors) = p::parse_block_status(kind, &payload).ok_or(())?;
            let ours = connection.state.lock().context == Some(context);
            let first = (descriptors[0].length, descriptors[0].flags);
            with_slot(connection, epoch, cookie, |slot| {
                if ours {
                    slot.status.get_or_insert(first);
                }
            })?;
        }
        k if k & (1 << 15) != 0 && (6..=CHUNK_BYTES_MAX).contains(&length) => {
            // ERROR, ERROR_OFFSET, and error types we do not know: the errno comes first.
            let payload = small_payload(stream, length).await?;
            let error = p::parse_error_payload(&payload).map_or(p::EIO, |(error, _)| error);
            let errno = if error == 0 { libc::EIO } else { p::local_errno(error) };
            with_slot(connection, epoch, cookie, |slot| {
                slot.chunk_error.get_or_insert(errno);
            })?;
        }
        _ => return Err(()), // a type we do not know, for the wrong command, or too long
    }
    if flags & p::REPLY_FLAG_DONE != 0 {
        let outcome = with_slot(connection, epoch, cookie, |slot| match slot.chunk_error {
            Some(errno) => Err(errno),
            // A successful read covers every byte; a status reply has an extent.
            None if command == p::CMD_READ && slot.covered_bytes != request_length => Err(libc::EIO),
            None if command == p::CMD_BLOCK_STATUS && slot.status.is_none() => Err(libc::EIO),
            None => Ok(()),
        })?;
        connection.state.lock().table.finish(cookie, outcome);
    }
    Ok(())
}

async fn small_payload(stream: &mut Stream, length: u64) -> Result<Vec<u8>, Broken> {
    let mut payload = vec![0u8; length as usize];
    stream.take(&mut payload).await?;
    Ok(payload)
}

/// Receive `bytes` of read data into `cookie`'s buffer at `relative`. The buffer is lent out
/// of the slot meanwhile, so the lock is not held across receives.
async fn into_buf(
    connection: &Connection,
    epoch: u64,
    stream: &mut Stream,
    cookie: u64,
    relative: u64,
    bytes: u64,
) -> Result<(), Broken> {
    let mut buf = with_slot(connection, epoch, cookie, |slot| {
        assert!(!slot.lent, "only the reader lends a read's buffer");
        slot.lent = true;
        slot.buf.take().expect("a read carries its buffer")
    })?;
    let range = relative as usize..(relative + bytes) as usize;
    assert!(range.end <= buf.len(), "read data fits its request ({range:?} of {})", buf.len());
    let received = stream.take(&mut buf.as_mut_slice()[range]).await;
    let mut state = connection.state.lock();
    // A slot whose buffer is out is never freed (the caller waits for it), whatever the epoch.
    let slot = state.table.get(cookie).expect("a lent slot stays live");
    (slot.buf, slot.lent) = (Some(buf), false);
    slot.covered_bytes += bytes;
    state.table.settle(cookie);
    received
}
