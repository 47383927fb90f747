//! A connected socket driven through the reactor: receives and sends are ring operations
//! (or the thread backend's blocking calls where io_uring is refused), buffers are owned by
//! the operation while the kernel has them. [`Reader`] buffers what arrives so that many
//! small headers cost one receive; payloads are handed out in pool buffers the disk can use.

use std::io;
use std::time::Duration;
use tandem::buf::{AlignedBuf, BufPool};
use tandem::reactor::{stream, Op, OpKind, RuntimeHandle, SendPrefix, SharedFd};
use tandem::IoPriority;

/// Bytes one receive asks for: a burst of pipelined requests, or a good part of a payload.
const RECV_BYTES: usize = 256 << 10;
/// How long a connection waits for its core's buffer pool to have room before it gives up.
const POOL_WAIT: Duration = Duration::from_secs(30);
/// Poll interval while waiting for the pool.
const POOL_RETRY: Duration = Duration::from_millis(1);

/// A buffer from the core's pool, waiting while the pool is spent by other connections instead
/// of failing at once: a burst on one connection slows its neighbours, never fails them (each
/// connection's own share is bounded by its flow limits, and a stalled client is cut off).
pub(crate) async fn buffer(pool: &BufPool, len: usize) -> tandem::Result<AlignedBuf> {
    let deadline = std::time::Instant::now() + POOL_WAIT;
    loop {
        match pool.get(len) {
            Err(tandem::Error::BufferLimit { .. }) if std::time::Instant::now() < deadline => {
                tandem::reactor::sleep(POOL_RETRY).await;
            }
            other => return other,
        }
    }
}

fn out_of_memory(e: tandem::Error) -> io::Error {
    io::Error::new(io::ErrorKind::OutOfMemory, e.to_string())
}

#[derive(Clone)]
pub(crate) struct Socket {
    pub fd: SharedFd,
    pub runtime: RuntimeHandle,
}

fn result(code: i32) -> io::Result<usize> {
    match code {
        code if code < 0 => Err(io::Error::from_raw_os_error(-code)),
        code => Ok(code as usize),
    }
}

impl Socket {
    /// One receive into `buf` (all of it if `waitall`); 0 bytes means the peer closed.
    pub async fn recv(&self, buf: AlignedBuf, waitall: bool) -> (io::Result<usize>, AlignedBuf) {
        let kind = OpKind::Recv { fd: self.fd.clone(), waitall };
        let out = self.runtime.submit(Op { kind, buf: Some(buf), priority: IoPriority::GUEST }).await;
        (result(out.result), out.buf.expect("a receive gives its buffer back"))
    }

    /// Send `prefix` (a reply header) then `data`, all of it; the buffer comes back.
    pub async fn send_all(&self, prefix: &[u8], data: AlignedBuf) -> (io::Result<()>, AlignedBuf) {
        let (outcome, data) = stream::send_all(&self.runtime, &self.fd, SendPrefix::new(prefix), data).await;
        (outcome.map_err(io::Error::from_raw_os_error), data)
    }

    /// Stop the connection: a receive or send waiting on it completes at once.
    pub fn shutdown(&self) {
        stream::shutdown(&self.fd, std::net::Shutdown::Both);
    }
}

/// Buffered receiving. Bytes arrive into a pool buffer and are moved to `pending`, from which
/// headers are parsed in place; a payload that is mostly still in flight is received straight
/// into its own buffer.
pub(crate) struct Reader {
    socket: Socket,
    pool: BufPool,
    pending: Vec<u8>,
    start: usize,
}

impl Reader {
    pub fn new(socket: Socket, pool: BufPool) -> Reader {
        Reader { socket, pool, pending: Vec::with_capacity(RECV_BYTES), start: 0 }
    }

    pub fn buffered(&self) -> &[u8] {
        &self.pending[self.start..]
    }

    /// Drop `count` buffered bytes.
    pub fn consume(&mut self, count: usize) {
        assert!(count <= self.pending.len() - self.start);
        self.start += count;
        if self.start == self.pending.len() {
            self.pending.clear();
            self.start = 0;
        }
    }

    /// Receive until at least `count` bytes are buffered. `UnexpectedEof` if the peer closed.
    pub async fn fill(&mut self, count: usize) -> io::Result<()> {
        while self.buffered().len() < count {
            if self.start > 0 {
                self.pending.drain(..self.start);
                self.start = 0;
            }
            let want = RECV_BYTES.max(count - self.pending.len());
            let buf = buffer(&self.pool, want).await.map_err(out_of_memory)?;
            let (outcome, buf) = self.socket.recv(buf, false).await;
            match outcome? {
                0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                received => self.pending.extend_from_slice(&buf.as_slice()[..received]),
            }
        }
        Ok(())
    }

    /// `length` payload bytes in a buffer aligned for the disk.
    pub async fn payload(&mut self, length: usize) -> io::Result<AlignedBuf> {
        let mut buf = buffer(&self.pool, length).await.map_err(out_of_memory)?;
        let have = self.buffered().len().min(length);
        buf.as_mut_slice()[..have].copy_from_slice(&self.buffered()[..have]);
        self.consume(have);
        if have == length {
            return Ok(buf);
        }
        // The rest goes into a buffer of its own with one receive, then behind what we had.
        let rest = buffer(&self.pool, length - have).await.map_err(out_of_memory)?;
        let (outcome, rest) = self.socket.recv(rest, true).await;
        match outcome? {
            received if received == length - have => {
                buf.as_mut_slice()[have..].copy_from_slice(rest.as_slice());
                Ok(buf)
            }
            _ => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
        }
    }

    /// Read and drop `length` bytes (a refused request's payload).
    pub async fn skip(&mut self, mut length: u64) -> io::Result<()> {
        while length > 0 {
            let step = (self.buffered().len() as u64).min(length);
            self.consume(step as usize);
            length -= step;
            if length > 0 {
                self.fill(1).await?;
            }
        }
        Ok(())
    }
}
