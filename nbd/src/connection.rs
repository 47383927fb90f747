//! One client, from its first byte to its last, on one core: the handshake (bytes in and out
//! of [`Negotiation`]), then the transmission phase. A reader receives request headers and
//! payloads and starts each request as a task on this core (at most `requests_in_flight_max`
//! at once); each task runs its command on the disk and queues its reply; one writer sends the
//! queued replies in the order they completed, small ones gathered into one send.
//!
//! Nothing here is `Send`: a connection lives and dies on its core, so its shared state is
//! `Rc<RefCell<..>>` and no lock is taken per request.

use crate::export::MetaContext;
use crate::negotiate::{self, Negotiation, Outcome, Selected, OPTION_DATA_BYTES_MAX};
use crate::request::{judge, Command, Verdict};
use crate::socket::{Reader, Socket};
use crate::status;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tandem::block::WriteFlags;
use tandem::buf::{AlignedBuf, BufPool};
use tandem::IoPriority;
use tandem_drivers::nbd::proto::{self, options as opt, HeaderStyle, Request};

const G: IoPriority = IoPriority::GUEST;
/// Bytes of small replies gathered into one send at most.
const GATHER_BYTES_MAX: usize = 64 << 10;
/// A write-zeroes the disk cannot do natively is written in buffers of this size.
const ZERO_BUF_BYTES: usize = 1 << 20;

/// Limits a connection runs under.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub handshake_timeout: Duration,
    pub requests_in_flight_max: usize,
}

/// Why a connection ended, for the server's log line.
#[derive(Debug)]
pub(crate) enum End {
    /// The client disconnected (NBD_CMD_DISC, ABORT or EOF).
    Client,
    /// The handshake took longer than the limit.
    HandshakeTimeout,
    /// The client broke the protocol; the server hung up.
    Violation(String),
    Io(io::Error),
}

/// Serve one client to the end.
pub(crate) async fn serve(socket: Socket, pool: BufPool, exports: &crate::ExportTable, limits: Limits) -> End {
    let mut reader = Reader::new(socket.clone(), pool.clone());
    let handshake = handshake(&socket, &mut reader, exports);
    let selected = match with_timeout(handshake, limits.handshake_timeout).await {
        None => {
            socket.shutdown();
            return End::HandshakeTimeout;
        }
        Some(Ok(Some(selected))) => selected,
        Some(Ok(None)) => return End::Client,
        Some(Err(end)) => return end,
    };
    transmission(socket, reader, pool, selected, limits.requests_in_flight_max).await
}

/// Greeting, client flags, then options until one chooses an export (`None`: the client left).
async fn handshake(
    socket: &Socket,
    reader: &mut Reader,
    exports: &crate::ExportTable,
) -> Result<Option<Selected>, End> {
    let mut out = Vec::with_capacity(4096);
    negotiate::greeting(&mut out);
    send_bytes(socket, &out).await?;
    reader.fill(4).await.map_err(eof_is_client)?;
    let flags = u32::from_be_bytes(reader.buffered()[..4].try_into().expect("4 bytes"));
    reader.consume(4);
    let mut negotiation = Negotiation::new(flags).map_err(|e| End::Violation(e.to_string()))?;
    loop {
        reader.fill(opt::OPTION_HEADER_BYTES).await.map_err(eof_is_client)?;
        let header = &reader.buffered()[..opt::OPTION_HEADER_BYTES];
        let magic = u64::from_be_bytes(header[..8].try_into().expect("8 bytes"));
        if magic != proto::OPTION_MAGIC {
            return Err(End::Violation(format!("option magic {magic:#x} is not IHAVEOPT")));
        }
        let option = u32::from_be_bytes(header[8..12].try_into().expect("4 bytes"));
        let length = u32::from_be_bytes(header[12..16].try_into().expect("4 bytes"));
        reader.consume(opt::OPTION_HEADER_BYTES);
        out.clear();
        let outcome = if length > OPTION_DATA_BYTES_MAX {
            reader.skip(u64::from(length)).await.map_err(eof_is_client)?;
            negotiation.oversized(option, length, &mut out)
        } else {
            reader.fill(length as usize).await.map_err(eof_is_client)?;
            let outcome = negotiation.handle(option, &reader.buffered()[..length as usize], exports, &mut out);
            reader.consume(length as usize);
            outcome
        };
        send_bytes(socket, &out).await?;
        match outcome {
            Outcome::Continue => {}
            Outcome::Close => return Ok(None),
            Outcome::Transmission(selected) => return Ok(Some(selected)),
        }
    }
}

fn eof_is_client(e: io::Error) -> End {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => End::Client,
        _ => End::Io(e),
    }
}

async fn send_bytes(socket: &Socket, bytes: &[u8]) -> Result<(), End> {
    if bytes.is_empty() {
        return Ok(());
    }
    let buf = AlignedBuf::from_slice(bytes, 64).map_err(|_| End::Io(io::Error::from(io::ErrorKind::OutOfMemory)))?;
    socket.send_all(&[], Some(buf)).await.0.map_err(End::Io)
}

/// State the reader, the request tasks and the writer share on this core.
struct Shared {
    /// Replies waiting for the writer, in completion order.
    replies: VecDeque<Reply>,
    /// Requests started and not yet replied to.
    in_flight: usize,
    /// Set when the reader stops: the writer ends once every request has replied.
    reader_done: bool,
    /// The writer failed (peer gone): replies are dropped from then on.
    writer_failed: bool,
    writer_waker: Option<Waker>,
    reader_waker: Option<Waker>,
}

enum Reply {
    /// A header and payload built in memory (everything but read data).
    Bytes(Vec<u8>),
    /// A header, then a read's data buffer, sent without copying the data.
    Data { header: [u8; 48], header_bytes: usize, data: AlignedBuf },
}

/// What a request task needs, cloned cheaply into each.
#[derive(Clone)]
struct Conn {
    shared: Rc<RefCell<Shared>>,
    selected: Rc<Selected>,
    pool: BufPool,
}

async fn transmission(
    socket: Socket,
    mut reader: Reader,
    pool: BufPool,
    selected: Selected,
    in_flight_max: usize,
) -> End {
    let shared = Rc::new(RefCell::new(Shared {
        replies: VecDeque::new(),
        in_flight: 0,
        reader_done: false,
        writer_failed: false,
        writer_waker: None,
        reader_waker: None,
    }));
    let context = Conn { shared: shared.clone(), selected: Rc::new(selected), pool: pool.clone() };
    let writer = tandem::reactor::spawn_local(write_replies(socket.clone(), shared.clone(), pool))
        .expect("a connection runs on a core");
    let end = read_requests(&mut reader, &context, in_flight_max).await;
    if matches!(end, End::Violation(_)) {
        socket.shutdown(); // the spec's hard disconnect: replies still queued are dropped
    }
    {
        let mut state = shared.borrow_mut();
        state.reader_done = true;
        if let Some(waker) = state.writer_waker.take() {
            waker.wake();
        }
    }
    // Requests under way finish (nothing acknowledged is lost, and their buffers come home)
    // and the writer sends their replies before the connection closes.
    match (end, writer.await) {
        // A client that left while replies were pending shows as the writer's error; a
        // violation keeps its own reason (the hang-up is what broke the writer).
        (End::Client, Err(e)) => End::Io(e),
        (end, _) => end,
    }
}

/// Receive and start requests until the client disconnects or breaks the protocol.
async fn read_requests(reader: &mut Reader, context: &Conn, in_flight_max: usize) -> End {
    let style = context.selected.style;
    let header_bytes = style.request_bytes();
    loop {
        WaitForRoom { shared: &context.shared, limit: in_flight_max }.await;
        {
            let state = context.shared.borrow();
            assert!(state.in_flight < in_flight_max, "the reader waits for room before it reads");
            if state.writer_failed {
                return End::Client;
            }
        }
        if let Err(e) = reader.fill(header_bytes).await {
            return eof_is_client(e);
        }
        let request = match proto::parse_request(&reader.buffered()[..header_bytes], style) {
            Ok(request) => request,
            Err(e) => return End::Violation(e.to_string()),
        };
        reader.consume(header_bytes);
        let export = &context.selected.export;
        match judge(&request, style, export, context.selected.contexts.len()) {
            Verdict::Disconnect { reason } => return End::Violation(reason),
            Verdict::Refuse { error, message, discard_bytes } => {
                if let Err(e) = reader.skip(discard_bytes).await {
                    return eof_is_client(e);
                }
                context.push(error_reply(style, &request, error, &message));
            }
            Verdict::Run(Command::Disconnect) => return End::Client,
            Verdict::Run(Command::Write { offset, length_bytes, fua }) => {
                let data = match reader.payload(length_bytes as usize).await {
                    Ok(data) => data,
                    Err(e) => return eof_is_client(e),
                };
                context.start(write(context.clone(), request, offset, data, fua));
            }
            Verdict::Run(command) => context.start(run(context.clone(), request, command)),
        }
    }
}

impl Conn {
    fn push(&self, reply: Reply) {
        let mut state = self.shared.borrow_mut();
        if !state.writer_failed {
            state.replies.push_back(reply);
        }
        if let Some(waker) = state.writer_waker.take() {
            waker.wake();
        }
    }

    /// Run a request's task on this core; its reply is queued when it ends.
    fn start(&self, task: impl Future<Output = Reply> + 'static) {
        self.shared.borrow_mut().in_flight += 1;
        let context = self.clone();
        let running = tandem::reactor::spawn_local(async move {
            let reply = task.await;
            context.push(reply);
            let mut state = context.shared.borrow_mut();
            assert!(state.in_flight > 0, "a request replies once");
            state.in_flight -= 1;
            if let Some(waker) = state.reader_waker.take() {
                waker.wake();
            }
            if let Some(waker) = state.writer_waker.take() {
                waker.wake();
            }
        });
        running.expect("a connection runs on a core").detach();
    }
}

/// Resolves once fewer than `limit` requests are in flight.
struct WaitForRoom<'a> {
    shared: &'a Rc<RefCell<Shared>>,
    limit: usize,
}

impl Future for WaitForRoom<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.shared.borrow_mut();
        if state.in_flight < self.limit {
            return Poll::Ready(());
        }
        state.reader_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

async fn write(context: Conn, request: Request, offset: u64, data: AlignedBuf, fua: bool) -> Reply {
    let disk = &context.selected.export.disk;
    let (outcome, _data) = disk.write(offset, data, WriteFlags { fua }, G).await;
    done_reply(context.selected.style, &request, outcome)
}

async fn run(context: Conn, request: Request, command: Command) -> Reply {
    let style = context.selected.style;
    let disk = &context.selected.export.disk;
    let outcome = match command {
        Command::Read { offset, length_bytes } => return read(&context, &request, offset, length_bytes).await,
        Command::BlockStatus { offset, length_bytes, req_one } => {
            return block_status(&context, &request, offset, length_bytes, req_one).await
        }
        Command::Flush => disk.flush(G).await,
        Command::Trim { offset, length_bytes, fua } => trim(disk, offset, length_bytes, fua).await,
        Command::WriteZeroes { offset, length_bytes, fua, may_unmap, fast } => {
            write_zeroes(&context, offset, length_bytes, fua, may_unmap, fast).await
        }
        Command::Cache | Command::Nothing => Ok(()),
        Command::Write { .. } | Command::Disconnect => unreachable!("handled by the reader"),
    };
    done_reply(style, &request, outcome)
}

async fn trim(disk: &tandem::block::Disk, offset: u64, length_bytes: u64, fua: bool) -> tandem::Result<()> {
    if !disk.capabilities().discard {
        return Ok(()); // a trim is advisory: a disk that cannot discard keeps the data
    }
    disk.discard(offset, length_bytes, G).await?;
    if fua {
        disk.flush(G).await?;
    }
    Ok(())
}

async fn write_zeroes(
    context: &Conn,
    offset: u64,
    length_bytes: u64,
    fua: bool,
    may_unmap: bool,
    fast: bool,
) -> tandem::Result<()> {
    let disk = &context.selected.export.disk;
    if disk.capabilities().write_zeroes {
        disk.write_zeroes(offset, length_bytes, may_unmap, G).await?;
    } else if fast {
        return Err(tandem::Error::Unsupported { op: "fast write_zeroes", driver: disk.name().to_string() });
    } else {
        // No native zeroing: write zeros, one buffer at a time.
        let mut at = offset;
        while at < offset + length_bytes {
            let step = (offset + length_bytes - at).min(ZERO_BUF_BYTES as u64) as usize;
            let mut buf = context.pool.get(step)?;
            buf.as_mut_slice().fill(0);
            disk.write(at, buf, WriteFlags::default(), G).await.0?;
            at += step as u64;
        }
    }
    if fua {
        disk.flush(G).await?;
    }
    Ok(())
}

async fn read(context: &Conn, request: &Request, offset: u64, length_bytes: u32) -> Reply {
    let style = context.selected.style;
    let buf = match context.pool.get(length_bytes as usize) {
        Ok(buf) => buf,
        Err(e) => return done_reply(style, request, Err(e)),
    };
    let (outcome, data) = context.selected.export.disk.read(offset, buf, G).await;
    if let Err(e) = outcome {
        return done_reply(style, request, Err(e));
    }
    let mut header = Vec::with_capacity(48);
    match style {
        HeaderStyle::Simple => proto::encode_simple_reply(0, request.cookie, &mut header),
        _ => {
            let payload_bytes = 8 + u64::from(length_bytes);
            let (flags, kind) = (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA);
            proto::encode_chunk_header(style, flags, kind, request.cookie, request.offset, payload_bytes, &mut header);
            header.extend_from_slice(&offset.to_be_bytes());
        }
    }
    let mut fixed = [0u8; 48];
    assert!(header.len() <= fixed.len() && header.len() <= tandem::reactor::SEND_PREFIX_BYTES_MAX);
    fixed[..header.len()].copy_from_slice(&header);
    Reply::Data { header: fixed, header_bytes: header.len(), data }
}

async fn block_status(context: &Conn, request: &Request, offset: u64, length_bytes: u64, req_one: bool) -> Reply {
    let style = context.selected.style;
    let disk = &context.selected.export.disk;
    let align = disk.alignment().request_bytes as u32;
    // A compact descriptor holds 32 bits: ask for no more than fits.
    let length_bytes = match style {
        HeaderStyle::Extended => length_bytes,
        _ => length_bytes.min(u64::from(!(align - 1))),
    };
    let mut out = Vec::new();
    let contexts: &[MetaContext] = &context.selected.contexts;
    for (index, meta) in contexts.iter().enumerate() {
        let descriptors = match status::descriptors(disk, meta, offset, length_bytes, req_one).await {
            Ok(descriptors) => descriptors,
            Err(e) => return done_reply(style, request, Err(e)),
        };
        let mut payload = Vec::with_capacity(8 + 16 * descriptors.len());
        proto::encode_block_status(style, index as u32 + 1, &descriptors, align, &mut payload);
        let kind = if style == HeaderStyle::Extended {
            proto::REPLY_TYPE_BLOCK_STATUS_EXT
        } else {
            proto::REPLY_TYPE_BLOCK_STATUS
        };
        let flags = if index + 1 == contexts.len() { proto::REPLY_FLAG_DONE } else { 0 };
        proto::encode_chunk_header(style, flags, kind, request.cookie, request.offset, payload.len() as u64, &mut out);
        out.extend_from_slice(&payload);
    }
    Reply::Bytes(out)
}

/// The reply to a request with no data: success, or the error its outcome carries.
fn done_reply(style: HeaderStyle, request: &Request, outcome: tandem::Result<()>) -> Reply {
    match outcome {
        Ok(()) => {
            let mut out = Vec::with_capacity(32);
            match style {
                HeaderStyle::Simple => proto::encode_simple_reply(0, request.cookie, &mut out),
                _ => {
                    let (flags, kind) = (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE);
                    proto::encode_chunk_header(style, flags, kind, request.cookie, request.offset, 0, &mut out);
                }
            }
            Reply::Bytes(out)
        }
        Err(e) => {
            let errno = match &e {
                tandem::Error::Unsupported { .. } => libc::EOPNOTSUPP,
                tandem::Error::Misaligned { .. } | tandem::Error::OutOfBounds { .. } => libc::EINVAL,
                tandem::Error::ReadOnly { .. } => libc::EPERM,
                other => other.errno().unwrap_or(libc::EIO),
            };
            error_reply(style, request, proto::wire_error(errno), &e.to_string())
        }
    }
}

fn error_reply(style: HeaderStyle, request: &Request, error: u32, message: &str) -> Reply {
    assert!(error != 0);
    let mut out = Vec::with_capacity(64 + message.len());
    match style {
        HeaderStyle::Simple => proto::encode_simple_reply(error, request.cookie, &mut out),
        _ => {
            let mut payload = Vec::with_capacity(6 + message.len());
            proto::encode_error_payload(error, message, &mut payload);
            let (flags, kind) = (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR);
            proto::encode_chunk_header(
                style,
                flags,
                kind,
                request.cookie,
                request.offset,
                payload.len() as u64,
                &mut out,
            );
            out.extend_from_slice(&payload);
        }
    }
    // A compact read refused with a simple reply carries no data: the client reads only the
    // header, since the error is nonzero.
    Reply::Bytes(out)
}

/// Send queued replies until the reader is done and every request has replied.
async fn write_replies(socket: Socket, shared: Rc<RefCell<Shared>>, pool: BufPool) -> io::Result<()> {
    loop {
        let batch = NextReplies { shared: &shared }.await;
        let Some(batch) = batch else { return Ok(()) };
        if let Err(e) = send_batch(&socket, &pool, batch).await {
            {
                let mut state = shared.borrow_mut();
                state.writer_failed = true;
                state.replies.clear();
                if let Some(waker) = state.reader_waker.take() {
                    waker.wake();
                }
            }
            socket.shutdown();
            // Keep draining until every request has finished, so none is left waiting.
            while (NextReplies { shared: &shared }).await.is_some() {}
            return Err(e);
        }
    }
}

async fn send_batch(socket: &Socket, pool: &BufPool, batch: Vec<Reply>) -> io::Result<()> {
    let mut gathered: Vec<u8> = Vec::new();
    for reply in batch {
        match reply {
            Reply::Bytes(bytes) => {
                gathered.extend_from_slice(&bytes);
                if gathered.len() >= GATHER_BYTES_MAX {
                    send_gathered(socket, pool, &mut gathered).await?;
                }
            }
            Reply::Data { header, header_bytes, data } => {
                send_gathered(socket, pool, &mut gathered).await?;
                socket.send_all(&header[..header_bytes], Some(data)).await.0?;
            }
        }
    }
    send_gathered(socket, pool, &mut gathered).await
}

async fn send_gathered(socket: &Socket, pool: &BufPool, gathered: &mut Vec<u8>) -> io::Result<()> {
    if gathered.is_empty() {
        return Ok(());
    }
    let mut buf = pool.get(gathered.len()).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
    buf.as_mut_slice().copy_from_slice(gathered);
    gathered.clear();
    socket.send_all(&[], Some(buf)).await.0
}

/// Resolves with every queued reply, or `None` once the reader is done and nothing is left.
struct NextReplies<'a> {
    shared: &'a Rc<RefCell<Shared>>,
}

impl Future for NextReplies<'_> {
    type Output = Option<Vec<Reply>>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.shared.borrow_mut();
        if !state.replies.is_empty() {
            return Poll::Ready(Some(state.replies.drain(..).collect()));
        }
        if state.reader_done && state.in_flight == 0 {
            return Poll::Ready(None);
        }
        state.writer_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// `future`, or `None` if `limit` passes first.
async fn with_timeout<F: Future>(future: F, limit: Duration) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut sleep = std::pin::pin!(tandem::reactor::sleep(limit));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        sleep.as_mut().poll(cx).map(|()| None)
    })
    .await
}
