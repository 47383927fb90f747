//! The cookie table of one connection: a fixed set of request slots, each naming its request
//! by a cookie (slot index in the low 32 bits, the slot's generation in the high 32), so a
//! reply for a request that already ended (timed out, connection replaced) can never land in
//! the slot's next request. Pure bookkeeping: the connection holds it under its lock.

use super::super::proto::Request;
use std::task::Waker;
use std::time::Instant;
use tandem::block::DeviceHold;
use tandem::buf::AlignedBuf;

/// Where a slot's request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Free,
    /// Waiting for the writer (or for a reconnect).
    Queued,
    /// On the wire: only a reply or the connection's death ends it.
    Sent,
}

/// One request in the table.
pub(crate) struct Slot {
    generation: u32,
    pub phase: Phase,
    pub request: Request,
    /// A read's destination or a write's payload; `None` while lent to the reader or writer.
    pub buf: Option<AlignedBuf>,
    /// The buffer is out with the reader or writer: the caller must not see the result yet.
    pub lent: bool,
    /// The outcome: `Some(Ok)` done, `Some(Err(errno))` failed. Set once.
    pub outcome: Option<Result<(), i32>>,
    /// The first error chunk's errno (structured replies keep going to DONE after one).
    pub chunk_error: Option<i32>,
    /// Bytes of a read the reply covered so far (data and holes), for the DONE check.
    pub covered_bytes: u64,
    /// A block-status reply's first extent: (length, flags).
    pub status: Option<(u64, u32)>,
    pub waker: Option<Waker>,
    pub deadline: Instant,
    /// When the writer put the request on the wire (its core's clock), for completion latency.
    pub sent_at: Option<Instant>,
    /// The caller's future is gone: free the slot as soon as the reply (or death) ends it.
    pub abandoned: bool,
    /// What a write's caller attached, kept until the server answered or the connection died.
    pub hold: Option<DeviceHold>,
}

/// What a freed slot hands back.
pub(crate) struct Removed {
    pub outcome: Result<(), i32>,
    pub buf: Option<AlignedBuf>,
    /// A block-status reply's first extent: (length, flags).
    pub status: Option<(u64, u32)>,
    pub sent_at: Option<Instant>,
}

pub(crate) struct Table {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Calls waiting for a free slot: all woken when one frees (one of them may have been
    /// dropped meanwhile, so waking only one could strand the rest).
    slot_waiters: Vec<Waker>,
}

impl Table {
    pub fn new(count: usize, now: Instant) -> Table {
        assert!(count > 0 && count <= u32::MAX as usize);
        let blank = |_| Slot {
            generation: 0,
            phase: Phase::Free,
            request: Request { flags: 0, kind: 0, cookie: 0, offset: 0, length: 0 },
            buf: None,
            lent: false,
            outcome: None,
            chunk_error: None,
            covered_bytes: 0,
            status: None,
            waker: None,
            deadline: now,
            sent_at: None,
            abandoned: false,
            hold: None,
        };
        // Popped from the end: slot 0 goes out first, which keeps cookies small in traces.
        Table {
            slots: (0..count).map(blank).collect(),
            free: (0..count as u32).rev().collect(),
            slot_waiters: Vec::new(),
        }
    }

    /// Take a free slot for `request` (its cookie is filled in); `None` when all are busy.
    pub fn insert(&mut self, mut request: Request, buf: Option<AlignedBuf>, deadline: Instant) -> Option<u64> {
        let index = self.free.pop()?;
        let slot = &mut self.slots[index as usize];
        assert_eq!(slot.phase, Phase::Free, "a free-listed slot is free");
        slot.generation = slot.generation.wrapping_add(1);
        let cookie = (u64::from(slot.generation) << 32) | u64::from(index);
        request.cookie = cookie;
        slot.phase = Phase::Queued;
        slot.request = request;
        slot.buf = buf;
        slot.deadline = deadline;
        Some(cookie)
    }

    /// The live slot `cookie` names, if any.
    pub fn get(&mut self, cookie: u64) -> Option<&mut Slot> {
        let slot = self.slots.get_mut((cookie & u64::from(u32::MAX)) as usize)?;
        (slot.phase != Phase::Free && u64::from(slot.generation) == cookie >> 32).then_some(slot)
    }

    /// Free `cookie`'s slot, handing back its buffer. The outcome must be known and the
    /// buffer home.
    pub fn remove(&mut self, cookie: u64) -> Removed {
        let slot = self.get(cookie).expect("removing a live cookie");
        assert!(!slot.lent, "a slot is freed only with its buffer home");
        let outcome = slot.outcome.take().expect("a slot is freed once it has an outcome");
        let (buf, status, sent_at) = (slot.buf.take(), slot.status.take(), slot.sent_at.take());
        slot.phase = Phase::Free;
        slot.chunk_error = None;
        slot.covered_bytes = 0;
        slot.waker = None;
        slot.abandoned = false;
        slot.hold = None;
        self.free.push((cookie & u64::from(u32::MAX)) as u32);
        self.slot_waiters.drain(..).for_each(Waker::wake);
        Removed { outcome, buf, status, sent_at }
    }

    /// Record `outcome` (the first one wins) and wake the caller if it may look.
    pub fn finish(&mut self, cookie: u64, outcome: Result<(), i32>) {
        let Some(slot) = self.get(cookie) else { return };
        if slot.outcome.is_none() {
            slot.outcome = Some(outcome);
        }
        self.settle(cookie);
    }

    /// After an outcome or a buffer's return: free an abandoned slot, or wake its caller.
    pub fn settle(&mut self, cookie: u64) {
        let Some(slot) = self.get(cookie) else { return };
        if slot.outcome.is_none() || slot.lent {
            return;
        }
        if slot.abandoned {
            let _ = self.remove(cookie); // nobody waits for the outcome
        } else if let Some(waker) = slot.waker.take() {
            waker.wake();
        }
    }

    /// Cookies of live slots, with their phase, for the watchdog and a dying connection.
    pub fn live(&self) -> impl Iterator<Item = (u64, &Slot)> + '_ {
        self.slots.iter().enumerate().filter(|(_, s)| s.phase != Phase::Free).map(|(index, slot)| {
            let cookie = (u64::from(slot.generation) << 32) | index as u64;
            (cookie, slot)
        })
    }

    /// Wake `waker` when a slot frees.
    pub fn wait_for_slot(&mut self, waker: &Waker) {
        self.slot_waiters.push(waker.clone());
    }

    pub fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::CMD_READ;

    fn request() -> Request {
        Request { flags: 0, kind: CMD_READ, cookie: 0, offset: 0, length: 512 }
    }

    #[test]
    fn cookies_name_one_request_and_go_stale_when_it_ends() {
        let now = Instant::now();
        let mut table = Table::new(2, now);
        let a = table.insert(request(), None, now).unwrap();
        let b = table.insert(request(), None, now).unwrap();
        assert_ne!(a, b);
        assert!(table.insert(request(), None, now).is_none(), "two slots only");
        assert_eq!(table.get(a).unwrap().request.cookie, a);
        table.finish(a, Err(libc::EIO));
        table.finish(a, Ok(()));
        assert_eq!(table.remove(a).outcome, Err(libc::EIO), "the first outcome wins");
        assert!(table.get(a).is_none(), "a freed cookie is stale");
        let c = table.insert(request(), None, now).unwrap();
        assert_eq!(c & 0xffff_ffff, a & 0xffff_ffff, "the slot is reused");
        assert!(table.get(a).is_none(), "the old cookie does not name the new request");
        assert_eq!(table.in_use(), 2);
    }

    #[test]
    fn an_abandoned_slot_frees_itself_once_its_buffer_is_home() {
        let now = Instant::now();
        let mut table = Table::new(1, now);
        let buf = AlignedBuf::zeroed(512, 512).unwrap();
        let cookie = table.insert(request(), Some(buf), now).unwrap();
        let slot = table.get(cookie).unwrap();
        let lent = slot.buf.take();
        slot.lent = true;
        slot.abandoned = true;
        table.finish(cookie, Ok(()));
        assert_eq!(table.in_use(), 1, "the buffer is still out");
        let slot = table.get(cookie).unwrap();
        (slot.buf, slot.lent) = (lent, false);
        table.settle(cookie);
        assert_eq!(table.in_use(), 0);
    }
}
