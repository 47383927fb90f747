//! One connection to the server and its life: the cookie table and send queue under one
//! lock, the link (up with a socket, or down since when), and the transitions between them.
//! A connection outlives its sockets: when one dies (error, peer closed, a request past its
//! deadline) the requests on the wire fail, and a reconnect thread installs a new socket with
//! fresh reader and writer tasks ("epochs": a task of an older epoch only ever exits).
//!
//! [`Call`] is one request's future: it takes a slot, queues the request for the writer and
//! waits for the reader (or the watchdog, or the connection's death) to settle it.

use super::dial::dial;
use super::handshake::Negotiated;
use super::table::{Phase, Table};
use super::{reader, writer, NbdConfig};
use crate::nbd::proto::{self, HeaderStyle, Request};
use crate::nbd::uri::NbdUri;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tandem::block::DeviceHold;
use tandem::buf::AlignedBuf;
use tandem::reactor::{RuntimeHandle, SharedFd};

/// What every connection of a driver shares and never changes.
pub(crate) struct Params {
    pub uri: NbdUri,
    pub config: NbdConfig,
    pub runtime: RuntimeHandle,
    pub style: HeaderStyle,
    pub size_bytes: u64,
    /// The largest read or write payload one request may carry (the server's maximum).
    pub payload_max: u64,
}

pub(crate) enum Link {
    Up(SharedFd),
    Down { since: Instant },
}

pub(crate) struct State {
    pub table: Table,
    /// Cookies waiting for the writer, oldest first (stale ones are skipped).
    pub queue: VecDeque<u64>,
    pub writer_waker: Option<Waker>,
    pub link: Link,
    /// Bumped at every death and every reconnect; tasks carry the epoch they serve.
    pub epoch: u64,
    /// `base:allocation`'s id on the current socket.
    pub context: Option<u32>,
    pub reconnecting: bool,
    pub closed: bool,
}

pub(crate) struct Connection {
    pub index: usize,
    pub params: Arc<Params>,
    pub state: Mutex<State>,
}

impl Connection {
    /// A connection over an already negotiated socket; its tasks start at once.
    pub fn start(index: usize, params: Arc<Params>, fd: std::os::fd::OwnedFd, negotiated: &Negotiated) -> Arc<Self> {
        let now = Instant::now();
        let state = State {
            table: Table::new(params.config.inflight_max, now),
            queue: VecDeque::with_capacity(params.config.inflight_max),
            writer_waker: None,
            link: Link::Down { since: now },
            epoch: 0,
            context: None,
            reconnecting: false,
            closed: false,
        };
        let connection = Arc::new(Connection { index, params, state: Mutex::new(state) });
        connection.install(fd, negotiated);
        connection
    }

    /// Put a new socket in place and start its reader and writer.
    fn install(self: &Arc<Self>, fd: std::os::fd::OwnedFd, negotiated: &Negotiated) {
        let fd = SharedFd::new(fd);
        let epoch = {
            let mut state = self.state.lock();
            if state.closed {
                return; // the driver went away while we reconnected: the socket just closes
            }
            state.epoch += 1;
            state.link = Link::Up(fd.clone());
            state.context = negotiated.allocation_context;
            state.reconnecting = false;
            state.epoch
        };
        let (for_reader, for_writer) = (self.clone(), self.clone());
        let (reader_fd, writer_fd) = (fd.clone(), fd);
        let runtime = &self.params.runtime;
        // Both on one core: the writer is woken from any core, the reader wakes callers.
        drop(runtime.spawn_on(self.index, move || reader::run(for_reader, epoch, reader_fd)));
        drop(runtime.spawn_on(self.index, move || writer::run(for_writer, epoch, writer_fd)));
    }

    /// The socket of `epoch` failed (or timed out, or broke the protocol): shut it, fail what was on the wire, fail or
    /// keep what was queued (kept while a reconnect may still come in time), start
    /// reconnecting. A no-op for an epoch already replaced.
    pub fn kill(self: &Arc<Self>, epoch: u64) {
        let reconnect = {
            let mut state = self.state.lock();
            if state.epoch != epoch {
                return;
            }
            if let Link::Up(fd) = &state.link {
                // Unblocks the reader's and writer's pending socket operations.
                tandem::reactor::stream::shutdown(fd, std::net::Shutdown::Both);
            }
            state.epoch += 1;
            state.link = Link::Down { since: Instant::now() };
            let keep_queued = !self.params.config.reconnect_delay.is_zero() && !state.closed;
            let doomed: Vec<u64> = state
                .table
                .live()
                .filter(|(_, slot)| slot.outcome.is_none() && (slot.phase == Phase::Sent || !keep_queued))
                .map(|(cookie, _)| cookie)
                .collect();
            for cookie in doomed {
                state.table.finish(cookie, Err(libc::ENOTCONN));
            }
            if let Some(waker) = state.writer_waker.take() {
                waker.wake();
            }
            let start = !state.closed && !state.reconnecting;
            state.reconnecting |= start;
            start
        };
        if reconnect {
            let weak = Arc::downgrade(self);
            let spawned =
                std::thread::Builder::new().name("tandem-nbd-reconnect".into()).spawn(move || reconnect_loop(weak));
            if spawned.is_err() {
                self.state.lock().reconnecting = false; // the next death tries again
            }
        }
    }

    /// The driver is gone: stop the tasks and the reconnect thread.
    pub fn close(self: &Arc<Self>) {
        let epoch = {
            let mut state = self.state.lock();
            state.closed = true;
            state.epoch
        };
        self.kill(epoch);
    }

    /// The watchdog's look: fail what is past its deadline (and drop the socket under a request
    /// that timed out on the wire), and what waited for a reconnect longer than allowed.
    pub fn expire(self: &Arc<Self>, now: Instant) {
        let (epoch, timed_out_on_wire) = {
            let mut state = self.state.lock();
            let down_too_long = match state.link {
                Link::Down { since } => now >= since + self.params.config.reconnect_delay,
                Link::Up(_) => false,
            };
            let mut expired = Vec::new();
            let mut on_wire = false;
            for (cookie, slot) in state.table.live().filter(|(_, slot)| slot.outcome.is_none()) {
                if now >= slot.deadline {
                    on_wire |= slot.phase == Phase::Sent;
                    expired.push((cookie, libc::ETIMEDOUT));
                } else if down_too_long && slot.phase == Phase::Queued {
                    expired.push((cookie, libc::ENOTCONN));
                }
            }
            for (cookie, errno) in expired {
                state.table.finish(cookie, Err(errno));
            }
            (state.epoch, on_wire)
        };
        if timed_out_on_wire {
            self.kill(epoch);
        }
    }

    /// A request's future (see [`Call`]).
    pub fn call(self: &Arc<Self>, request: Request, buf: Option<AlignedBuf>, hold: Option<DeviceHold>) -> Call {
        Call { connection: self.clone(), cookie: None, pending: Some((request, buf, hold)), deadline: None }
    }
}

/// Try to connect again, with a delay doubling from 50 ms to 1 s between attempts, until it
/// works or the driver is gone. A server that comes back with another export (size, header
/// style, read-only) is not used: requests keep failing, and the reason is logged once.
fn reconnect_loop(connection: Weak<Connection>) {
    let mut delay = Duration::from_millis(50);
    let mut logged = false;
    loop {
        let Some(strong) = connection.upgrade() else { return };
        if strong.state.lock().closed {
            return;
        }
        let params = strong.params.clone();
        drop(strong); // never keep the driver alive while connecting
        if let Ok((fd, negotiated)) = dial(&params.uri, &params.config) {
            match changed(&params, &negotiated) {
                None => {
                    let Some(strong) = connection.upgrade() else { return };
                    strong.install(fd, &negotiated);
                    return;
                }
                Some(what) if !logged => {
                    eprintln!("tandem: after reconnecting, the NBD export {} changed: {what}", params.uri);
                    logged = true;
                }
                Some(_) => {}
            }
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// What makes a reconnected export unusable in place of the old one.
fn changed(params: &Params, negotiated: &Negotiated) -> Option<String> {
    if negotiated.size_bytes != params.size_bytes {
        return Some(format!("size {} is now {}", params.size_bytes, negotiated.size_bytes));
    }
    if negotiated.style != params.style {
        return Some(format!("headers {:?} are now {:?}", params.style, negotiated.style));
    }
    if negotiated.flags & proto::FLAG_READ_ONLY != 0 && !params.config.read_only {
        return Some("it became read-only".into());
    }
    None
}

/// What a finished [`Call`] hands back.
pub(crate) struct Reply {
    /// Done, or the errno: the server's, ETIMEDOUT (deadline), ENOTCONN (connection lost).
    pub result: Result<(), i32>,
    pub buf: Option<AlignedBuf>,
    /// A block-status reply's first extent: (length, flags).
    pub status: Option<(u64, u32)>,
}

/// One request: queued with a slot, then waiting for its reply.
pub(crate) struct Call {
    connection: Arc<Connection>,
    cookie: Option<u64>,
    pending: Option<(Request, Option<AlignedBuf>, Option<DeviceHold>)>,
    /// Set at the first poll: pieces of a split request, awaited one after another, each get
    /// the whole timeout.
    deadline: Option<Instant>,
}

impl Call {
    /// Take a slot and queue the request; `Some` if it ended before that, `None` once queued
    /// or waiting for a slot.
    fn start(&mut self, state: &mut State, cx: &Context<'_>) -> Option<Reply> {
        let config = &self.connection.params.config;
        let now = tandem::reactor::now();
        let deadline = *self.deadline.get_or_insert(now + config.request_timeout);
        let errno = match state.link {
            _ if state.closed => Some(libc::ESHUTDOWN),
            Link::Down { since } if now >= since + config.reconnect_delay => Some(libc::ENOTCONN),
            _ if now >= deadline => Some(libc::ETIMEDOUT),
            _ => None,
        };
        if let Some(errno) = errno {
            let (_, buf, _) = self.pending.take().expect("a call starts once");
            return Some(Reply { result: Err(errno), buf, status: None });
        }
        if state.table.is_full() {
            // Every slot frees by its deadline at the latest, and a free slot wakes us.
            state.table.wait_for_slot(cx.waker());
            return None;
        }
        let (request, buf, hold) = self.pending.take().expect("a call starts once");
        let cookie = state.table.insert(request, buf, deadline).expect("a slot is free");
        state.table.get(cookie).expect("just inserted").hold = hold;
        state.queue.push_back(cookie);
        self.cookie = Some(cookie);
        if let Some(waker) = state.writer_waker.take() {
            waker.wake();
        }
        None
    }
}

impl Future for Call {
    type Output = Reply;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply> {
        let this = self.get_mut();
        let connection = this.connection.clone();
        let mut state = connection.state.lock();
        if this.cookie.is_none() {
            if let Some(reply) = this.start(&mut state, cx) {
                return Poll::Ready(reply);
            }
            if this.cookie.is_none() {
                return Poll::Pending;
            }
        }
        let cookie = this.cookie.expect("queued");
        let slot = state.table.get(cookie).expect("a call's slot lives until the call takes its outcome");
        if slot.outcome.is_none() || slot.lent {
            match &slot.waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => slot.waker = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        let removed = state.table.remove(cookie);
        this.cookie = None;
        // The bench's completion latency starts when the request went on the wire, not at
        // the reader's last receive (the operation this thread saw complete last).
        tandem::reactor::op::set_last_op_submitted_at(removed.sent_at);
        let (result, buf, status) = (removed.outcome, removed.buf, removed.status);
        Poll::Ready(Reply { result, buf, status })
    }
}

impl Drop for Call {
    /// A caller that stops waiting leaves its slot to be freed when the request ends: the
    /// server may still write into the read buffer's slot or read the write's payload.
    fn drop(&mut self) {
        let Some(cookie) = self.cookie.take() else { return };
        let mut state = self.connection.state.lock();
        let Some(slot) = state.table.get(cookie) else { return };
        slot.abandoned = true;
        slot.waker = None;
        if slot.phase == Phase::Queued {
            // Never sent: nothing on the wire to wait for.
            state.table.finish(cookie, Err(libc::ECANCELED));
        } else {
            state.table.settle(cookie);
        }
    }
}
