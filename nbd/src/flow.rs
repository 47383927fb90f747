//! Flow control of one connection: what the reader, the request tasks and the writer share on
//! their core. A request counts from the moment its header is read until its reply has left
//! on the socket (or was dropped with a dead peer), and so do the buffer bytes it holds (a
//! write's payload, a read's data). The reader admits the next request only while both the
//! count and the bytes are under the connection's limits: a client that sends requests and
//! never reads the replies stops being read, instead of growing the server's memory.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use tandem::buf::AlignedBuf;

/// One reply on its way to the socket, with the buffer bytes its request reserved.
pub(crate) struct Reply {
    pub body: Body,
    pub cost_bytes: u64,
}

pub(crate) enum Body {
    /// A header and payload built in memory (everything but read data).
    Bytes(Vec<u8>),
    /// A header, then a read's data buffer, sent without copying the data.
    Data { header: [u8; 48], header_bytes: usize, data: AlignedBuf },
}

struct State {
    replies: VecDeque<Reply>,
    /// Requests admitted whose reply has not left yet.
    outstanding: usize,
    /// Buffer bytes those requests hold.
    reserved_bytes: u64,
    /// Request tasks still running.
    running: usize,
    reader_done: bool,
    /// The peer is gone or stalled: replies are dropped from now on.
    writer_failed: bool,
    writer_waker: Option<Waker>,
    reader_waker: Option<Waker>,
}

/// Shared by one connection's reader, tasks and writer (single core: `Rc<RefCell>`).
#[derive(Clone)]
pub(crate) struct Flow {
    state: Rc<RefCell<State>>,
    requests_max: usize,
    bytes_max: u64,
}

impl Flow {
    pub fn new(requests_max: usize, bytes_max: u64) -> Flow {
        assert!(requests_max > 0 && bytes_max > 0);
        let state = State {
            replies: VecDeque::new(),
            outstanding: 0,
            reserved_bytes: 0,
            running: 0,
            reader_done: false,
            writer_failed: false,
            writer_waker: None,
            reader_waker: None,
        };
        Flow { state: Rc::new(RefCell::new(state)), requests_max, bytes_max }
    }

    /// Resolves once another request may be read; false if the writer has failed.
    pub fn admit(&self) -> Admit<'_> {
        Admit { flow: self }
    }

    /// Count one request read from the socket, holding `cost_bytes` of buffers.
    pub fn begin(&self, cost_bytes: u64) {
        let mut state = self.state.borrow_mut();
        state.outstanding += 1;
        state.reserved_bytes += cost_bytes;
        assert!(state.outstanding <= self.requests_max, "admit() bounds the count");
    }

    /// A request's task starts; `task_done` ends it.
    pub fn task_started(&self) {
        self.state.borrow_mut().running += 1;
    }

    pub fn task_done(&self) {
        let mut state = self.state.borrow_mut();
        assert!(state.running > 0, "a task ends once");
        state.running -= 1;
        wake(&mut state.writer_waker);
    }

    /// Queue a reply for the writer (dropped, and its request released, once the writer failed).
    pub fn push(&self, reply: Reply) {
        let mut state = self.state.borrow_mut();
        if state.writer_failed {
            release(&mut state, reply.cost_bytes);
            return;
        }
        state.replies.push_back(reply);
        wake(&mut state.writer_waker);
    }

    /// The writer sent replies that held `cost_bytes`: their requests are over.
    pub fn sent(&self, count: usize, cost_bytes: u64) {
        let mut state = self.state.borrow_mut();
        for _ in 0..count {
            release(&mut state, 0);
        }
        assert!(state.reserved_bytes >= cost_bytes, "a request releases what it reserved");
        state.reserved_bytes -= cost_bytes;
    }

    /// The writer cannot send any more: drop what is queued and every reply still to come.
    pub fn fail_writer(&self) {
        let mut state = self.state.borrow_mut();
        state.writer_failed = true;
        let dropped: Vec<Reply> = state.replies.drain(..).collect();
        for reply in dropped {
            release(&mut state, reply.cost_bytes);
        }
        wake(&mut state.reader_waker);
    }

    /// The reader reads no more: the writer ends once every task has replied.
    pub fn finish_reader(&self) {
        let mut state = self.state.borrow_mut();
        state.reader_done = true;
        wake(&mut state.writer_waker);
    }

    /// Resolves with every queued reply, or `None` once the reader is done, every task has
    /// ended and nothing is left to send.
    pub fn next_replies(&self) -> NextReplies<'_> {
        NextReplies { flow: self }
    }
}

fn wake(waker: &mut Option<Waker>) {
    if let Some(waker) = waker.take() {
        waker.wake();
    }
}

/// One request is over (its reply left, or was dropped).
fn release(state: &mut State, cost_bytes: u64) {
    assert!(state.outstanding > 0, "a request ends once");
    assert!(state.reserved_bytes >= cost_bytes, "a request releases what it reserved");
    state.outstanding -= 1;
    state.reserved_bytes -= cost_bytes;
    wake(&mut state.reader_waker);
}

pub(crate) struct Admit<'a> {
    flow: &'a Flow,
}

impl Future for Admit<'_> {
    type Output = bool;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let mut state = self.flow.state.borrow_mut();
        if state.writer_failed {
            return Poll::Ready(false);
        }
        if state.outstanding < self.flow.requests_max && state.reserved_bytes < self.flow.bytes_max {
            return Poll::Ready(true);
        }
        state.reader_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

pub(crate) struct NextReplies<'a> {
    flow: &'a Flow,
}

impl Future for NextReplies<'_> {
    type Output = Option<Vec<Reply>>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.flow.state.borrow_mut();
        if !state.replies.is_empty() {
            return Poll::Ready(Some(state.replies.drain(..).collect()));
        }
        if state.reader_done && state.running == 0 {
            return Poll::Ready(None);
        }
        state.writer_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(cost_bytes: u64) -> Reply {
        Reply { body: Body::Bytes(vec![0; 16]), cost_bytes }
    }

    #[test]
    fn a_request_counts_until_its_reply_is_sent() {
        let flow = Flow::new(2, 1 << 20);
        let ready = |flow: &Flow| {
            tandem::reactor::block_on(async {
                std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut flow.admit()).poll(cx))).await
            })
        };
        flow.begin(0);
        flow.begin(0);
        assert!(ready(&flow).is_pending(), "two outstanding: the reader waits");
        flow.push(reply(0));
        assert!(ready(&flow).is_pending(), "a queued reply still counts");
        flow.sent(1, 0);
        assert_eq!(ready(&flow), Poll::Ready(true));
    }

    #[test]
    fn bytes_bound_admission_and_a_failed_writer_releases_everything() {
        let flow = Flow::new(64, 1 << 20);
        let ready = |flow: &Flow| {
            tandem::reactor::block_on(async {
                std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut flow.admit()).poll(cx))).await
            })
        };
        flow.begin(1 << 20);
        assert!(ready(&flow).is_pending(), "a full byte budget stops the reader");
        flow.push(reply(1 << 20));
        flow.fail_writer();
        assert_eq!(ready(&flow), Poll::Ready(false), "the reader learns the writer failed");
        let state = flow.state.borrow();
        assert_eq!((state.outstanding, state.reserved_bytes), (0, 0));
    }
}
