//! The in-flight table: byte ranges of operations under way. Registering a range and checking
//! it against the others is one step under one lock; a registration that overlaps an operation
//! under way waits (async, or blocking) until every overlapping one has finished, across cores
//! and threads. This is what keeps a background copy and a guest write to the same chunk from
//! reordering on a target. It knows nothing of jobs.
//!
//! Fairness: waiting registrations form one FIFO queue, and a new registration is admitted
//! only after every earlier waiter it overlaps, so a stream of short operations cannot starve
//! a waiting one. Capacity is FIFO too: when `capacity` operations are under way, everyone
//! queues.
//!
//! Lock order: the table's mutex is a leaf. The table never calls out while holding it
//! (wakers run after it is released), so callers may hold their own locks around calls that
//! do not wait. Never *wait* for a registration while holding a guard: a waiter that overlaps
//! both could then block both forever (FIFO admission would hold the second behind it).

use crate::sync::Mutex;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// What an operation is, for whoever inspects the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InflightKind {
    GuestWrite,
    Copy,
    CopyBeforeWrite,
}

/// An in-flight table error; nothing was registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflightError {
    #[error("range at offset {offset} has length 0")]
    EmptyRange { offset: u64 },
    #[error("range at offset {offset} with length {length_bytes} overflows a 64-bit offset")]
    Overflow { offset: u64, length_bytes: u64 },
    #[error("in-flight table full: {waiting_count} registrations already wait (limit {waiting_count_max})")]
    Full { waiting_count: usize, waiting_count_max: usize },
    #[error("in-flight table capacity {capacity} must be 1..=65536")]
    BadCapacity { capacity: usize },
}

#[derive(Debug, Clone, Copy)]
struct Range {
    id: u64,
    start: u64,
    end: u64,
    kind: InflightKind,
}

impl Range {
    fn overlaps(&self, other: &Range) -> bool {
        self.start < other.end && other.start < self.end
    }
}

struct Waiter {
    range: Range,
    waker: Option<Waker>,
}

struct State {
    next_id: u64,
    active: Vec<Range>,
    waiting: VecDeque<Waiter>,
}

struct Inner {
    state: Mutex<State>,
    capacity: usize,
    waiting_count_max: usize,
}

/// A table of byte ranges under way. Cloning shares it.
///
/// ```
/// use tandem::inflight::{InflightKind, InflightTable};
/// let table = InflightTable::new(64).unwrap();
/// let copy = table.register_blocking(0, 65536, InflightKind::Copy).unwrap();
/// assert!(table.try_register(4096, 4096, InflightKind::GuestWrite).unwrap().is_none()); // overlaps
/// drop(copy);
/// assert!(table.try_register(4096, 4096, InflightKind::GuestWrite).unwrap().is_some());
/// ```
#[derive(Clone)]
pub struct InflightTable {
    inner: Arc<Inner>,
}

/// Proof that a range is registered; dropping it ends the operation and admits waiters.
pub struct InflightGuard {
    table: InflightTable,
    range: Range,
}

impl InflightGuard {
    pub fn offset(&self) -> u64 {
        self.range.start
    }

    pub fn length_bytes(&self) -> u64 {
        self.range.end - self.range.start
    }

    pub fn kind(&self) -> InflightKind {
        self.range.kind
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.table.finish(self.range.id);
    }
}

const CAPACITY_MAX: usize = 65536;

impl InflightTable {
    /// A table admitting at most `capacity` operations at once; at most 16 x capacity may
    /// wait.
    pub fn new(capacity: usize) -> Result<InflightTable, InflightError> {
        if capacity == 0 || capacity > CAPACITY_MAX {
            return Err(InflightError::BadCapacity { capacity });
        }
        let state = State { next_id: 1, active: Vec::with_capacity(capacity), waiting: VecDeque::new() };
        let inner = Inner { state: Mutex::new(state), capacity, waiting_count_max: capacity * 16 };
        Ok(InflightTable { inner: Arc::new(inner) })
    }

    /// Register `[offset, offset + length_bytes)`, waiting until no earlier overlapping
    /// operation is under way or queued.
    pub fn register(&self, offset: u64, length_bytes: u64, kind: InflightKind) -> Register {
        let outcome = check(offset, length_bytes).and_then(|end| self.enqueue(offset, end, kind));
        match outcome {
            Ok((range, admitted)) => Register { table: self.clone(), range: Some(range), admitted, error: None },
            Err(e) => Register { table: self.clone(), range: None, admitted: false, error: Some(e) },
        }
    }

    /// [`InflightTable::register`] for plain threads (never on a reactor core).
    pub fn register_blocking(
        &self,
        offset: u64,
        length_bytes: u64,
        kind: InflightKind,
    ) -> Result<InflightGuard, InflightError> {
        crate::reactor::block_on(self.register(offset, length_bytes, kind))
    }

    /// Register only if that needs no wait; `Ok(None)` otherwise (nothing is queued).
    pub fn try_register(
        &self,
        offset: u64,
        length_bytes: u64,
        kind: InflightKind,
    ) -> Result<Option<InflightGuard>, InflightError> {
        let end = check(offset, length_bytes)?;
        let mut state = self.inner.state.lock();
        let probe = Range { id: 0, start: offset, end, kind };
        let blocked = state.active.len() >= self.inner.capacity
            || state.active.iter().any(|r| r.overlaps(&probe))
            || state.waiting.iter().any(|w| w.range.overlaps(&probe));
        if blocked {
            return Ok(None);
        }
        let range = Range { id: state.next_id, ..probe };
        state.next_id += 1;
        state.active.push(range);
        Ok(Some(InflightGuard { table: self.clone(), range }))
    }

    /// Operations under way and registrations waiting, right now.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.inner.state.lock();
        (state.active.len(), state.waiting.len())
    }

    /// Queue a registration and run admission; returns whether it was admitted at once.
    fn enqueue(&self, start: u64, end: u64, kind: InflightKind) -> Result<(Range, bool), InflightError> {
        let mut state = self.inner.state.lock();
        if state.waiting.len() >= self.inner.waiting_count_max {
            let waiting_count = state.waiting.len();
            return Err(InflightError::Full { waiting_count, waiting_count_max: self.inner.waiting_count_max });
        }
        let range = Range { id: state.next_id, start, end, kind };
        state.next_id += 1;
        state.waiting.push_back(Waiter { range, waker: None });
        let woken = admit(&mut state, self.inner.capacity);
        let admitted = state.active.iter().any(|r| r.id == range.id);
        drop(state);
        wake_all(woken);
        Ok((range, admitted))
    }

    /// An operation ended (or a waiting registration was abandoned): drop it, admit waiters.
    fn finish(&self, id: u64) {
        let mut state = self.inner.state.lock();
        state.active.retain(|r| r.id != id);
        state.waiting.retain(|w| w.range.id != id);
        let woken = admit(&mut state, self.inner.capacity);
        drop(state);
        wake_all(woken);
    }
}

fn check(offset: u64, length_bytes: u64) -> Result<u64, InflightError> {
    if length_bytes == 0 {
        return Err(InflightError::EmptyRange { offset });
    }
    offset.checked_add(length_bytes).ok_or(InflightError::Overflow { offset, length_bytes })
}

/// Admit waiters in FIFO order: each that overlaps nothing under way and no earlier waiter
/// still queued, while there is capacity. Returns the wakers to call after unlocking.
fn admit(state: &mut State, capacity: usize) -> Vec<Waker> {
    let mut woken = Vec::new();
    let mut index = 0;
    while index < state.waiting.len() && state.active.len() < capacity {
        let range = state.waiting[index].range;
        let blocked = state.active.iter().any(|r| r.overlaps(&range))
            || state.waiting.iter().take(index).any(|w| w.range.overlaps(&range));
        if blocked {
            index += 1;
            continue;
        }
        let waiter = state.waiting.remove(index).expect("index is in bounds");
        state.active.push(waiter.range);
        woken.extend(waiter.waker);
    }
    woken
}

fn wake_all(wakers: Vec<Waker>) {
    for waker in wakers {
        waker.wake();
    }
}

/// The future of a registration. `Send`; dropping it before it completes withdraws the
/// registration (and ends the operation if it had already been admitted).
pub struct Register {
    table: InflightTable,
    range: Option<Range>,
    admitted: bool,
    error: Option<InflightError>,
}

impl Future for Register {
    type Output = Result<InflightGuard, InflightError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(error) = self.error.take() {
            return Poll::Ready(Err(error));
        }
        let Some(range) = self.range else { panic!("Register polled after completion") };
        if !self.admitted {
            let mut state = self.table.inner.state.lock();
            match state.waiting.iter_mut().find(|w| w.range.id == range.id) {
                Some(waiter) => {
                    waiter.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                None => assert!(state.active.iter().any(|r| r.id == range.id), "a waiter is queued or admitted"),
            }
        }
        self.range = None;
        Poll::Ready(Ok(InflightGuard { table: self.table.clone(), range }))
    }
}

impl Drop for Register {
    fn drop(&mut self) {
        if let Some(range) = self.range.take() {
            self.table.finish(range.id);
        }
    }
}
