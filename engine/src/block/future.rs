//! [`IoFuture`]: the one future type every driver returns, so `dyn BlockDriver` works without
//! boxing the common cases. A reactor operation is awaited in place and mapped by a plain
//! function; a result known at once costs nothing; only composite operations box.

use super::filter::WriteTicket;
use super::BufResult;
use crate::error::{Error, Result};
use crate::reactor::{OpFuture, OpOutput, RESULT_STOPPED};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// What a mapping function needs to know to turn a raw result into an error that names the
/// request.
#[derive(Debug, Clone, Copy)]
pub struct OpContext {
    pub op: &'static str,
    pub offset: u64,
}

/// A `Send` future of a block operation.
pub struct IoFuture<T>(Inner<T>, Option<WriteTicket>);

enum Inner<T> {
    Ready(Option<T>),
    Op { future: OpFuture, context: OpContext, map: fn(OpOutput, OpContext) -> T },
    Boxed(Pin<Box<dyn Future<Output = T> + Send>>),
}

// The value is only ever moved out of the Option, never pinned in place.
impl<T> Unpin for IoFuture<T> {}

impl<T> IoFuture<T> {
    /// A future that is already done.
    pub fn ready(value: T) -> IoFuture<T> {
        IoFuture(Inner::Ready(Some(value)), None)
    }

    /// Await a reactor operation, then map its raw result with `map`.
    pub fn op(future: OpFuture, context: OpContext, map: fn(OpOutput, OpContext) -> T) -> IoFuture<T> {
        IoFuture(Inner::Op { future, context, map }, None)
    }

    /// Any other future (composite operations, injected delays).
    pub fn boxed(future: impl Future<Output = T> + Send + 'static) -> IoFuture<T> {
        IoFuture(Inner::Boxed(Box::pin(future)), None)
    }
}

impl<T: Send + 'static> IoFuture<T> {
    /// Keep a guest write counted in its disk's write gate until it is done. If this
    /// future is dropped first, a reactor operation keeps the ticket until the kernel
    /// completes it (no allocation); a boxed future (rbd, an injected delay) is run to its
    /// end as [`IoFuture::finishing`] does. Either way a drain never overlooks a write
    /// still in flight.
    pub(crate) fn holding(mut self, ticket: WriteTicket) -> IoFuture<T> {
        if let Inner::Boxed(_) = self.0 {
            return self.finishing(ticket);
        }
        self.1 = Some(ticket);
        self
    }

    /// Like [`IoFuture::holding`], for a filter's composite write: if the caller drops this
    /// future unfinished, the rest runs to its end with the ticket (a task on the calling
    /// core, or the finisher thread off the reactor: `reactor::run_to_end`), so the filter's
    /// bookkeeping (a dirty mark after the source write, a target write) is never cut off
    /// halfway.
    pub(crate) fn finishing(self, ticket: WriteTicket) -> IoFuture<T> {
        IoFuture::boxed(Finishing { rest: Some((self, ticket)) })
    }
}

/// See [`IoFuture::finishing`].
struct Finishing<T: Send + 'static> {
    rest: Option<(IoFuture<T>, WriteTicket)>,
}

impl<T: Send + 'static> Future for Finishing<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = self.get_mut();
        let (future, _) = this.rest.as_mut().expect("Finishing polled after completion");
        let poll = Pin::new(future).poll(cx);
        if poll.is_ready() {
            this.rest = None; // done: the ticket counts out now
        }
        poll
    }
}

impl<T: Send + 'static> Drop for Finishing<T> {
    fn drop(&mut self) {
        let Some((future, ticket)) = self.rest.take() else { return };
        crate::reactor::run_to_end(async move {
            future.await;
            drop(ticket);
        });
    }
}

impl<T> Drop for IoFuture<T> {
    fn drop(&mut self) {
        let Some(ticket) = self.1.take() else { return };
        match &self.0 {
            Inner::Op { future, .. } => future.hold_until_complete(Box::new(ticket)),
            Inner::Ready(_) => drop(ticket), // nothing in flight
            Inner::Boxed(_) => {
                debug_assert!(false, "`holding` turns a boxed future into `finishing`");
                drop(ticket);
            }
        }
    }
}

impl<T> Future for IoFuture<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = self.get_mut();
        let poll = match &mut this.0 {
            Inner::Ready(value) => Poll::Ready(value.take().expect("IoFuture polled after completion")),
            Inner::Op { future, context, map } => Pin::new(future).poll(cx).map(|out| map(out, *context)),
            Inner::Boxed(future) => future.as_mut().poll(cx),
        };
        if poll.is_ready() {
            this.1 = None; // the write is done: count it out now, not when the future drops
        }
        poll
    }
}

fn errno_error(result: i32, context: OpContext) -> Error {
    if result == RESULT_STOPPED {
        return Error::RuntimeStopped;
    }
    Error::Io { op: context.op, offset: context.offset, errno: -result }
}

/// Map a read or write: it must move exactly the buffer's length.
pub fn map_transfer(out: OpOutput, context: OpContext) -> BufResult<()> {
    let buf = out.buf.expect("transfers carry their buffer");
    let length_bytes = buf.len() as u64;
    let result = match out.result {
        r if r < 0 => Err(errno_error(r, context)),
        r if r as u64 == length_bytes => Ok(()),
        r => Err(Error::ShortTransfer { op: context.op, offset: context.offset, done_bytes: r as u64, length_bytes }),
    };
    (result, buf)
}

/// Map an operation without data (flush, fallocate): success or errno.
pub fn map_done(out: OpOutput, context: OpContext) -> Result<()> {
    match out.result {
        r if r < 0 => Err(errno_error(r, context)),
        _ => Ok(()),
    }
}
