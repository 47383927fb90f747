//! What sits between a [`Disk`](super::Disk)'s checks and its driver: an optional
//! [`WriteFilter`] (the hook block jobs use to see every guest write: mirror's active modes,
//! copy-before-write) and the [`WriteGate`], which counts guest writes in progress so a job can
//! hold new ones back and wait for the old ones to finish (a "drain") before it inserts a
//! filter, converges, or switches the disk over to another driver.
//!
//! Reads pass the filter but not the gate: a read in flight across a switch-over reads data
//! that is the same on both drivers, and the old driver lives until its last operation
//! completes.

use super::{BlockDriver, BufResult, IoFuture, WriteFlags};
use crate::buf::AlignedBuf;
use crate::error::Result;
use crate::priority::IoPriority;
use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// Sees every accepted guest write before it reaches the driver below, and does it.
///
/// `below` is the driver the disk currently sits on. A filter must eventually perform the
/// request on `below` (or fail it), and may do more: write a target too, copy old data away
/// first, record what changed.
pub trait WriteFilter: Send + Sync + 'static {
    /// Reads pass too, so a filter can watch them (mirror times the guest's I/O); by default
    /// they go straight below.
    fn read(
        &self,
        below: &Arc<dyn BlockDriver>,
        offset: u64,
        buf: AlignedBuf,
        priority: IoPriority,
    ) -> IoFuture<BufResult<()>> {
        below.read(offset, buf, priority)
    }

    fn write(
        &self,
        below: &Arc<dyn BlockDriver>,
        offset: u64,
        buf: AlignedBuf,
        flags: WriteFlags,
        priority: IoPriority,
    ) -> IoFuture<BufResult<()>>;

    fn write_zeroes(
        &self,
        below: &Arc<dyn BlockDriver>,
        offset: u64,
        length_bytes: u64,
        may_unmap: bool,
        priority: IoPriority,
    ) -> IoFuture<Result<()>>;

    fn discard(
        &self,
        below: &Arc<dyn BlockDriver>,
        offset: u64,
        length_bytes: u64,
        priority: IoPriority,
    ) -> IoFuture<Result<()>>;
}

/// Counts guest writes in progress and can hold new ones back.
///
/// Ordering: a writer increments `in_progress` and then reads `closed`; a drainer sets
/// `closed` and then reads `in_progress`. Both pairs are SeqCst, so at least one side sees the
/// other: either the writer sees the gate closed (and backs out), or the drainer counts it.
pub(crate) struct WriteGate {
    in_progress: AtomicU64,
    closed: AtomicBool,
    waiters: Mutex<Waiters>,
}

#[derive(Default)]
struct Waiters {
    writers: Vec<Waker>,
    drainer: Option<Waker>,
}

impl WriteGate {
    pub(crate) fn new() -> WriteGate {
        WriteGate { in_progress: AtomicU64::new(0), closed: AtomicBool::new(false), waiters: Mutex::default() }
    }

    /// Count a write in; `None` if the gate is closed (wait with [`WriteGate::opened`]).
    pub(crate) fn enter(self: &Arc<Self>) -> Option<WriteTicket> {
        self.in_progress.fetch_add(1, Ordering::SeqCst);
        let ticket = WriteTicket(self.clone());
        match self.closed.load(Ordering::SeqCst) {
            true => None, // the ticket's drop counts it out again
            false => Some(ticket),
        }
    }

    fn exit(&self) {
        let left = self.in_progress.fetch_sub(1, Ordering::SeqCst) - 1;
        if left == 0 && self.closed.load(Ordering::SeqCst) {
            if let Some(waker) = self.waiters.lock().drainer.take() {
                waker.wake();
            }
        }
    }

    /// Resolves once the gate is open.
    pub(crate) fn opened(self: &Arc<Self>) -> GateOpened {
        GateOpened(self.clone())
    }

    /// Close the gate and resolve once no counted write is in progress. `None` if another
    /// drain already holds it closed.
    pub(crate) fn drain(self: &Arc<Self>) -> Option<Drain> {
        match self.closed.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => Some(Drain(Some(DrainGuard(self.clone())))),
            Err(_) => None,
        }
    }
}

/// One counted guest write; counted out when dropped (with the request's future).
pub(crate) struct WriteTicket(Arc<WriteGate>);

impl Drop for WriteTicket {
    fn drop(&mut self) {
        self.0.exit();
    }
}

pub(crate) struct GateOpened(Arc<WriteGate>);

impl Future for GateOpened {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if !self.0.closed.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        let mut waiters = self.0.waiters.lock();
        // Checked again under the lock the opener takes after opening: no lost wake-up.
        if !self.0.closed.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        waiters.writers.push(cx.waker().clone());
        Poll::Pending
    }
}

/// The future of a drain: resolves to the guard that keeps the gate closed.
pub struct Drain(Option<DrainGuard>);

impl Future for Drain {
    type Output = DrainGuard;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<DrainGuard> {
        let gate = self.0.as_ref().expect("Drain polled after completion").0.clone();
        if gate.in_progress.load(Ordering::SeqCst) == 0 {
            return Poll::Ready(self.0.take().expect("checked above"));
        }
        let mut waiters = gate.waiters.lock();
        if gate.in_progress.load(Ordering::SeqCst) == 0 {
            drop(waiters);
            return Poll::Ready(self.0.take().expect("checked above"));
        }
        waiters.drainer = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Holds a disk's guest writes back while it lives (no counted write is in progress when it
/// is handed out); dropping it lets them through.
pub struct DrainGuard(Arc<WriteGate>);

impl DrainGuard {
    /// Whether this guard holds `gate` (a disk's): proof a caller drained that disk.
    pub(crate) fn holds(&self, gate: &Arc<WriteGate>) -> bool {
        Arc::ptr_eq(&self.0, gate)
    }
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        self.0.closed.store(false, Ordering::SeqCst);
        let writers = std::mem::take(&mut self.0.waiters.lock().writers);
        writers.into_iter().for_each(Waker::wake);
    }
}
