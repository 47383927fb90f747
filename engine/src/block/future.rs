//! [`IoFuture`]: the one future type every driver returns, so `dyn BlockDriver` works without
//! boxing the common cases. A reactor operation is awaited in place and mapped by a plain
//! function; a result known at once costs nothing; only composite operations box.

use super::filter::WriteTicket;
use super::BufResult;
use crate::error::{Error, Result};
use crate::reactor::{OpFuture, OpOutput, RESULT_STOPPED};
use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
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
    Op {
        future: OpFuture,
        context: OpContext,
        map: fn(OpOutput, OpContext) -> T,
    },
    Boxed(Pin<Box<dyn Future<Output = T> + Send>>),
    /// A boxed future whose device may go on with the request after the future is done or
    /// dropped (librbd after a deadline): what must outlive the request goes in its hold.
    Held {
        future: Pin<Box<dyn Future<Output = T> + Send>>,
        hold: Weak<HoldCell>,
    },
}

type HoldCell = Mutex<Vec<Box<dyn Send>>>;

/// Keeps what a request's caller attached (a guest write's gate ticket) until every clone is
/// gone: a driver gives one clone to its future and one to whatever the device holds until it
/// answers (librbd's completion), so the ticket outlives a future that gave up at a deadline
/// while the write may still land.
#[derive(Clone, Default)]
pub struct DeviceHold(Arc<HoldCell>);

impl DeviceHold {
    pub fn new() -> DeviceHold {
        DeviceHold::default()
    }
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

    /// A boxed future whose request the device may still hold after the future ends: what
    /// the caller attaches lives until every clone of `hold` is dropped (see [`DeviceHold`]).
    pub fn boxed_with_hold(future: impl Future<Output = T> + Send + 'static, hold: &DeviceHold) -> IoFuture<T> {
        IoFuture(Inner::Held { future: Box::pin(future), hold: Arc::downgrade(&hold.0) }, None)
    }
}

impl<T: Send + 'static> IoFuture<T> {
    /// Keep a guest write counted in its disk's write gate until it is done. If this
    /// future is dropped first, a reactor operation keeps the ticket until the kernel
    /// completes it (no allocation); a boxed future (rbd, an injected delay) is run to its
    /// end as [`IoFuture::finishing`] does. Either way a drain never overlooks a write
    /// still in flight.
    pub(crate) fn holding(mut self, ticket: WriteTicket) -> IoFuture<T> {
        match &self.0 {
            Inner::Boxed(_) => return self.finishing(ticket),
            Inner::Held { hold, .. } => {
                // Gone already: the future and the device are both done with the request.
                if let Some(cell) = hold.upgrade() {
                    cell.lock().push(Box::new(ticket));
                }
                return self;
            }
            Inner::Ready(_) | Inner::Op { .. } => {}
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
            Inner::Boxed(_) | Inner::Held { .. } => {
                debug_assert!(false, "`holding` keeps no ticket beside a boxed future");
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
            Inner::Boxed(future) | Inner::Held { future, .. } => future.as_mut().poll(cx),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::filter::WriteGate;

    /// A write whose future ended (given up at a deadline, or dropped) while the device still
    /// holds the request keeps its gate ticket until the device lets go: a drain waits.
    #[test]
    fn a_held_ticket_outlives_the_future_until_the_device_lets_go() {
        let gate = Arc::new(WriteGate::new());
        let hold = DeviceHold::new();
        let device_side = hold.clone(); // what librbd keeps until its completion
        let future: IoFuture<()> = IoFuture::boxed_with_hold(std::future::ready(()), &hold);
        drop(hold);
        let future = future.holding(gate.enter().expect("the gate is open"));
        crate::reactor::block_on(future); // done, as far as the caller is concerned
        let mut drain = std::pin::pin!(gate.drain().expect("no other drain"));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(drain.as_mut().poll(&mut cx).is_pending(), "the device still holds the write");
        drop(device_side);
        assert!(drain.as_mut().poll(&mut cx).is_ready(), "the device let go: the drain ends");
    }
}
