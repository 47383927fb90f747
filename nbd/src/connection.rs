//! One client, from its first byte to its last, on one core: the handshake (bytes in and out
//! of [`Negotiation`]), then the transmission phase. A reader receives request headers and
//! payloads and starts each request as a task on this core, as far as [`Flow`] admits it;
//! each task runs its command on the disk ([`commands`]) and queues its reply; one writer sends
//! the queued replies in the order they completed, small ones gathered into one send.
//!
//! Nothing here is `Send`: a connection lives and dies on its core, so its shared state is
//! `Rc<RefCell<..>>` and no lock is taken per request.

use crate::commands;
use crate::flow::{Body, Flow, Reply};
use crate::negotiate::{self, Negotiation, Outcome, Selected, OPTION_DATA_BYTES_MAX};
use crate::request::{judge, Command, Verdict};
use crate::socket::{buffer, Reader, Socket};
use std::future::Future;
use std::io;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;
use tandem::buf::{AlignedBuf, BufPool};
use tandem_drivers::nbd::proto::{self, options as opt};

/// Bytes of small replies gathered into one send at most.
const GATHER_BYTES_MAX: usize = 64 << 10;
/// Read data up to this size is gathered with other replies; larger data is sent behind its
/// header without a copy.
const GATHER_DATA_BYTES_MAX: usize = 16 << 10;

/// Limits a connection runs under.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub handshake_timeout: Duration,
    pub requests_in_flight_max: usize,
    /// Buffer bytes (read data, write payloads) one connection's requests hold at most before
    /// the next request is read.
    pub connection_bytes_max: u64,
    /// A write payload that takes longer to arrive, or replies the client does not read for
    /// longer, end the connection.
    pub stall_timeout: Duration,
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
    transmission(socket, reader, pool, selected, limits).await
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
    socket.send_all(&[], buf).await.0.map_err(End::Io)
}

/// What a request task needs, cloned cheaply into each.
#[derive(Clone)]
pub(crate) struct Conn {
    pub flow: Flow,
    pub selected: Rc<Selected>,
    pub pool: BufPool,
}

async fn transmission(socket: Socket, mut reader: Reader, pool: BufPool, selected: Selected, limits: Limits) -> End {
    let flow = Flow::new(limits.requests_in_flight_max, limits.connection_bytes_max);
    let context = Conn { flow: flow.clone(), selected: Rc::new(selected), pool: pool.clone() };
    let writer = tandem::reactor::spawn_local(write_replies(socket.clone(), flow.clone(), pool, limits.stall_timeout))
        .expect("a connection runs on a core");
    let end = read_requests(&mut reader, &context, limits.stall_timeout).await;
    if matches!(end, End::Violation(_)) {
        socket.shutdown(); // the spec's hard disconnect: replies still queued are dropped
    }
    flow.finish_reader();
    // Requests under way finish (nothing acknowledged is lost, and their buffers come home)
    // and the writer sends their replies before the connection closes.
    match (end, writer.await) {
        // A client that left while replies were pending shows as the writer's error; a
        // violation keeps its own reason (the hang-up is what broke the writer).
        (End::Client, Err(e)) => End::Io(e),
        (end, _) => end,
    }
}

/// Buffer bytes a command holds until its reply has left: a read's data, a write's payload.
fn cost_bytes(command: &Command) -> u64 {
    match command {
        Command::Read { length_bytes, .. } | Command::Write { length_bytes, .. } => u64::from(*length_bytes),
        _ => 0,
    }
}

/// Receive and start requests until the client disconnects or breaks the protocol.
async fn read_requests(reader: &mut Reader, context: &Conn, stall: Duration) -> End {
    let style = context.selected.style;
    let header_bytes = style.request_bytes();
    loop {
        if !context.flow.admit().await {
            return End::Client; // the writer failed: the peer is gone or stopped reading
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
        let verdict = judge(&request, style, export, context.selected.contexts.len());
        // Every request that gets a reply counts until the reply has left.
        match &verdict {
            Verdict::Run(Command::Disconnect) | Verdict::Disconnect { .. } => {}
            Verdict::Run(command) => context.flow.begin(cost_bytes(command)),
            Verdict::Refuse { .. } => context.flow.begin(0),
        }
        match verdict {
            Verdict::Disconnect { reason } => return End::Violation(reason),
            Verdict::Refuse { error, message, discard_bytes } => {
                if let Err(e) = reader.skip(discard_bytes).await {
                    return eof_is_client(e);
                }
                context
                    .flow
                    .push(Reply { body: commands::error_reply(style, &request, error, &message), cost_bytes: 0 });
            }
            Verdict::Run(Command::Disconnect) => return End::Client,
            Verdict::Run(Command::Write { offset, length_bytes, fua }) => {
                // A payload that trickles in holds its buffer: it must arrive within the stall limit.
                let data = match with_timeout(reader.payload(length_bytes as usize), stall).await {
                    None => return End::Violation(format!("a write's payload stalled for {stall:?}")),
                    Some(Err(e)) => return eof_is_client(e),
                    Some(Ok(data)) => data,
                };
                let cost = u64::from(length_bytes);
                context.start(commands::write(context.clone(), request, offset, data, fua), cost);
            }
            Verdict::Run(command) => {
                let cost = cost_bytes(&command);
                context.start(commands::run(context.clone(), request, command), cost);
            }
        }
    }
}

impl Conn {
    /// Run a request's task on this core; its reply is queued when it ends.
    fn start(&self, task: impl Future<Output = Body> + 'static, cost_bytes: u64) {
        let flow = self.flow.clone();
        flow.task_started();
        let running = tandem::reactor::spawn_local(async move {
            let body = task.await;
            flow.push(Reply { body, cost_bytes });
            flow.task_done();
        });
        running.expect("a connection runs on a core").detach();
    }
}

/// Send queued replies until the reader is done and every request has replied. A batch that
/// cannot leave within `stall` (the client stopped reading) fails the connection: its buffers
/// must not stay held for ever.
async fn write_replies(socket: Socket, flow: Flow, pool: BufPool, stall: Duration) -> io::Result<()> {
    while let Some(batch) = flow.next_replies().await {
        let (count, cost) = (batch.len(), batch.iter().map(|r| r.cost_bytes).sum());
        let outcome = match with_timeout(send_batch(&socket, &pool, batch), stall).await {
            Some(outcome) => outcome,
            None => Err(io::Error::new(io::ErrorKind::TimedOut, format!("the client read no reply for {stall:?}"))),
        };
        flow.sent(count, cost);
        if let Err(e) = outcome {
            flow.fail_writer();
            socket.shutdown();
            // Keep draining until every request has finished, so none is left waiting.
            while flow.next_replies().await.is_some() {}
            return Err(e);
        }
    }
    Ok(())
}

async fn send_batch(socket: &Socket, pool: &BufPool, batch: Vec<Reply>) -> io::Result<()> {
    let mut gathered: Vec<u8> = Vec::new();
    for reply in batch {
        match reply.body {
            Body::Bytes(bytes) => {
                gathered.extend_from_slice(&bytes);
                if gathered.len() >= GATHER_BYTES_MAX {
                    send_gathered(socket, pool, &mut gathered).await?;
                }
            }
            // A small read's data is copied behind the other replies: one send for many
            // replies costs less than a send each (a 4 KiB copy is ~100 ns, a send several us).
            Body::Data { header, header_bytes, data } if data.len() <= GATHER_DATA_BYTES_MAX => {
                gathered.extend_from_slice(&header[..header_bytes]);
                gathered.extend_from_slice(data.as_slice());
                if gathered.len() >= GATHER_BYTES_MAX {
                    send_gathered(socket, pool, &mut gathered).await?;
                }
            }
            Body::Data { header, header_bytes, data } => {
                send_gathered(socket, pool, &mut gathered).await?;
                socket.send_all(&header[..header_bytes], data).await.0?;
            }
        }
    }
    send_gathered(socket, pool, &mut gathered).await
}

async fn send_gathered(socket: &Socket, pool: &BufPool, gathered: &mut Vec<u8>) -> io::Result<()> {
    if gathered.is_empty() {
        return Ok(());
    }
    let mut buf = buffer(pool, gathered.len()).await.map_err(|e| io::Error::other(e.to_string()))?;
    buf.as_mut_slice().copy_from_slice(gathered);
    gathered.clear();
    socket.send_all(&[], buf).await.0
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
