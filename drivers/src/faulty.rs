//! The faulty driver: wraps any driver and injects faults chosen by offset range, by the n-th
//! matching operation or by a seeded probability: an errno (EIO, ENOSPC, ...), added latency,
//! or a simulated crash that drops every write not yet flushed. Given the same seed and the
//! same operation order, it fails the same way, so a failing test can be replayed.
//!
//! Crash model: with tracking on, every write, write_zeroes and discard first saves the bytes
//! it will overwrite (an undo log). A successful flush empties the log. A crash undoes the log
//! newest first, then re-applies FUA writes (durable when they completed), and fails every
//! operation with `Crashed` until `recover`. Overlapping operations must not be in flight at
//! the same time (no guest may rely on their order either).

use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;
use tandem::block::{Alignment, BlockDriver, BufResult, Capabilities, Extent, IoFuture, WriteFlags};
use tandem::buf::AlignedBuf;
use tandem::reactor::sleep;
use tandem::{Error, IoPriority, Result};

/// Which operations a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpMask(u8);

impl OpMask {
    pub const READ: OpMask = OpMask(1);
    pub const WRITE: OpMask = OpMask(2);
    pub const FLUSH: OpMask = OpMask(4);
    pub const WRITE_ZEROES: OpMask = OpMask(8);
    pub const DISCARD: OpMask = OpMask(16);
    pub const ALL: OpMask = OpMask(31);

    pub fn union(self, other: OpMask) -> OpMask {
        OpMask(self.0 | other.0)
    }

    pub fn contains(self, other: OpMask) -> bool {
        self.0 & other.0 == other.0
    }
}

/// When a rule fires.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Trigger {
    Always,
    /// Operations overlapping `[offset, offset + length_bytes)` (flushes never overlap).
    Range {
        offset: u64,
        length_bytes: u64,
    },
    /// The n-th operation the rule's mask matches, counting from 1.
    Nth(u64),
    /// Each matching operation with this probability (0.0..=1.0), from the driver's seed.
    Probability(f64),
}

/// What happens when a rule fires.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Fail with this errno (`libc::EIO`, `libc::ENOSPC`, ...), before touching the device.
    Errno(i32),
    /// Delay the operation, then run it.
    Delay(Duration),
    /// Crash: unflushed writes are dropped and the device fails until `recover`.
    Crash,
    /// Silent corruption, as a bad disk or a buggy layer below would do it: the write
    /// succeeds with one byte inverted: the first byte of the rule's range inside the write
    /// (a `Range` trigger), else the write's first byte. Writes only (`OpMask::WRITE`); other
    /// operations ignore it.
    FlipByte,
}

/// One injection rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultRule {
    pub ops: OpMask,
    pub trigger: Trigger,
    pub fault: Fault,
    /// Stop firing after this many times (`None`: no limit).
    pub fire_count_max: Option<u64>,
}

struct RuleState {
    rule: FaultRule,
    matched_count: u64,
    fired_count: u64,
}

struct UndoEntry {
    offset: u64,
    old: AlignedBuf,
    /// The data of a FUA write: durable, so re-applied after the undo.
    durable: Option<AlignedBuf>,
}

struct State {
    rules: Vec<RuleState>,
    rng: u64,
    crashed: bool,
    undo: Vec<UndoEntry>,
}

/// What the rules decided for one operation.
#[derive(Default)]
struct Decision {
    delay: Duration,
    errno: Option<i32>,
    crash: bool,
    /// `Fault::FlipByte`: the device offset whose byte is inverted.
    flip_at: Option<u64>,
}

/// A driver that fails on purpose.
pub struct FaultyDriver {
    inner: Arc<dyn BlockDriver>,
    name: String,
    track_unflushed: bool,
    state: Arc<Mutex<State>>,
}

impl FaultyDriver {
    /// Wrap `inner`. `seed` drives `Probability` rules; `track_unflushed` enables the crash
    /// model (every write then costs a read of the old data first).
    pub fn new(inner: Arc<dyn BlockDriver>, seed: u64, track_unflushed: bool) -> FaultyDriver {
        let name = format!("faulty({})", inner.name());
        let state = State { rules: Vec::new(), rng: seed, crashed: false, undo: Vec::new() };
        FaultyDriver { inner, name, track_unflushed, state: Arc::new(Mutex::new(state)) }
    }

    pub fn add_rule(&self, rule: FaultRule) {
        self.state.lock().rules.push(RuleState { rule, matched_count: 0, fired_count: 0 });
    }

    /// Remove every rule (a "repaired" device); a crashed device stays crashed.
    pub fn clear_rules(&self) {
        self.state.lock().rules.clear();
    }

    /// How many times rule `index` (in order of `add_rule`) has fired.
    pub fn fired_count(&self, index: usize) -> u64 {
        self.state.lock().rules.get(index).map_or(0, |r| r.fired_count)
    }

    pub fn is_crashed(&self) -> bool {
        self.state.lock().crashed
    }

    /// Crash now: drop unflushed writes. Operations fail with `Crashed` until `recover`.
    pub fn crash(&self) -> IoFuture<Result<()>> {
        let entries = {
            let mut state = self.state.lock();
            state.crashed = true;
            std::mem::take(&mut state.undo)
        };
        IoFuture::boxed(roll_back(self.inner.clone(), entries))
    }

    /// Come back after a crash with the flushed state.
    pub fn recover(&self) {
        self.state.lock().crashed = false;
    }

    fn decide(&self, op: OpMask, range: Option<(u64, u64)>) -> std::result::Result<Decision, Error> {
        let mut state = self.state.lock();
        if state.crashed {
            return Err(Error::Crashed);
        }
        let mut decision = Decision::default();
        let State { rules, rng, .. } = &mut *state;
        for entry in rules.iter_mut().filter(|r| r.rule.ops.contains(op)) {
            entry.matched_count += 1;
            let spent = entry.rule.fire_count_max.is_some_and(|max| entry.fired_count >= max);
            if spent || !fires(entry.rule.trigger, entry.matched_count, range, rng) {
                continue;
            }
            entry.fired_count += 1;
            match entry.rule.fault {
                Fault::Errno(errno) => decision.errno = decision.errno.or(Some(errno)),
                Fault::Delay(delay) => decision.delay += delay,
                Fault::Crash => decision.crash = true,
                Fault::FlipByte => decision.flip_at = decision.flip_at.or(flip_position(entry.rule.trigger, range)),
            }
        }
        Ok(decision)
    }

    /// Apply a decision around `run`, the real operation. `Err` from the rules is final.
    fn wrap<T: Send + 'static>(
        &self,
        decision: std::result::Result<Decision, Error>,
        fail: impl FnOnce(Error) -> T + Send + 'static,
        run: impl FnOnce() -> IoFuture<T> + Send + 'static,
    ) -> IoFuture<T> {
        let decision = match decision {
            Ok(d) => d,
            Err(e) => return IoFuture::ready(fail(e)),
        };
        if decision.crash {
            let crash = self.crash();
            return IoFuture::boxed(async move {
                let _ = crash.await;
                fail(Error::Crashed)
            });
        }
        if decision.delay.is_zero() && decision.errno.is_none() {
            return run();
        }
        IoFuture::boxed(async move {
            if !decision.delay.is_zero() {
                sleep(decision.delay).await;
            }
            match decision.errno {
                Some(errno) => fail(Error::Injected { errno }),
                None => run().await,
            }
        })
    }

    /// A future that saves what `[offset, offset + length_bytes)` holds before it changes
    /// (crash model); `None` when tracking is off.
    fn saver(
        &self,
        offset: u64,
        length_bytes: u64,
        durable: Option<AlignedBuf>,
    ) -> Option<impl std::future::Future<Output = Result<()>> + Send + 'static> {
        if !self.track_unflushed {
            return None;
        }
        let (inner, state) = (self.inner.clone(), self.state.clone());
        let align = self.inner.alignment().memory_bytes.max(1) as usize;
        Some(async move {
            let old = AlignedBuf::zeroed(length_bytes as usize, align)?;
            let (read, old) = inner.read(offset, old, IoPriority::GUEST).await;
            read?;
            state.lock().undo.push(UndoEntry { offset, old, durable });
            Ok(())
        })
    }
}

fn fires(trigger: Trigger, matched_count: u64, range: Option<(u64, u64)>, rng: &mut u64) -> bool {
    match trigger {
        Trigger::Always => true,
        Trigger::Nth(n) => matched_count == n,
        Trigger::Range { offset, length_bytes } => {
            range.is_some_and(|(start, length)| start < offset + length_bytes && offset < start + length)
        }
        Trigger::Probability(p) => (tandem::rng::next(rng) as f64 / u64::MAX as f64) < p,
    }
}

/// Where `Fault::FlipByte` inverts a byte of an operation on `range`.
fn flip_position(trigger: Trigger, range: Option<(u64, u64)>) -> Option<u64> {
    let (start, length) = range.filter(|(_, length)| *length > 0)?;
    let at = match trigger {
        Trigger::Range { offset, .. } => offset.max(start),
        _ => start,
    };
    debug_assert!(at < start + length, "a fired range rule overlaps the operation");
    Some(at)
}

/// `buf` (written at `offset`) with the byte at `at` inverted, in a copy: the caller's buffer
/// may be written elsewhere too (an active mirror writes one buffer to source and target).
fn flipped(buf: &AlignedBuf, offset: u64, at: u64) -> Result<AlignedBuf> {
    let mut copy = AlignedBuf::from_slice(buf.as_slice(), buf.align())?;
    let index = (at - offset) as usize;
    assert!(index < copy.len(), "the flipped byte is inside the write");
    copy.as_mut_slice()[index] ^= 0xff;
    Ok(copy)
}

impl FaultyDriver {
    /// A write whose data reaches the device with the byte at `at` inverted; the caller gets
    /// its own buffer back, unchanged. (No crash tracking: a corrupting rule is for
    /// verification tests, not crash tests.)
    fn write_flipped(
        &self,
        offset: u64,
        buf: AlignedBuf,
        at: u64,
        flags: WriteFlags,
        priority: IoPriority,
    ) -> IoFuture<BufResult<()>> {
        let inner = self.inner.clone();
        IoFuture::boxed(async move {
            let copy = match flipped(&buf, offset, at) {
                Ok(copy) => copy,
                Err(error) => return (Err(error), buf),
            };
            let (result, _) = inner.write(offset, copy, flags, priority).await;
            (result, buf)
        })
    }
}

async fn roll_back(inner: Arc<dyn BlockDriver>, entries: Vec<UndoEntry>) -> Result<()> {
    let mut durable = Vec::new();
    for entry in entries.into_iter().rev() {
        let (result, _) = inner.write(entry.offset, entry.old, WriteFlags::default(), IoPriority::GUEST).await;
        result?;
        if let Some(data) = entry.durable {
            durable.push((entry.offset, data));
        }
    }
    for (offset, data) in durable.into_iter().rev() {
        inner.write(offset, data, WriteFlags::default(), IoPriority::GUEST).await.0?;
    }
    inner.flush(IoPriority::GUEST).await
}

impl BlockDriver for FaultyDriver {
    fn name(&self) -> &str {
        &self.name
    }

    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn alignment(&self) -> Alignment {
        self.inner.alignment()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn read(&self, offset: u64, buf: AlignedBuf, priority: IoPriority) -> IoFuture<BufResult<()>> {
        let decision = self.decide(OpMask::READ, Some((offset, buf.len() as u64)));
        let (inner, buf) = (self.inner.clone(), Arc::new(Mutex::new(Some(buf))));
        let keep = buf.clone();
        let fail = move |e| (Err(e), keep.lock().take().expect("buffer taken once"));
        self.wrap(decision, fail, move || inner.read(offset, buf.lock().take().expect("buffer taken once"), priority))
    }

    fn write(&self, offset: u64, buf: AlignedBuf, flags: WriteFlags, priority: IoPriority) -> IoFuture<BufResult<()>> {
        let length_bytes = buf.len() as u64;
        let decision = self.decide(OpMask::WRITE, Some((offset, length_bytes)));
        if let Some(at) = decision.as_ref().ok().and_then(|d| d.flip_at) {
            return self.write_flipped(offset, buf, at, flags, priority);
        }
        let durable = match flags.fua {
            true => AlignedBuf::from_slice(buf.as_slice(), buf.align()).ok(),
            false => None,
        };
        let saver = self.saver(offset, length_bytes, durable);
        let (inner, buf) = (self.inner.clone(), Arc::new(Mutex::new(Some(buf))));
        let keep = buf.clone();
        let fail = move |e| (Err(e), keep.lock().take().expect("buffer taken once"));
        let take = move || buf.lock().take().expect("buffer taken once");
        self.wrap(decision, fail, move || match saver {
            None => inner.write(offset, take(), flags, priority),
            Some(saver) => IoFuture::boxed(async move {
                let buf = take();
                match saver.await {
                    Ok(()) => inner.write(offset, buf, flags, priority).await,
                    Err(e) => (Err(e), buf),
                }
            }),
        })
    }

    fn flush(&self, priority: IoPriority) -> IoFuture<Result<()>> {
        let decision = self.decide(OpMask::FLUSH, None);
        let (inner, state) = (self.inner.clone(), self.state.clone());
        self.wrap(decision, Err, move || {
            IoFuture::boxed(async move {
                // Only what completed before the flush started is made durable by it.
                let covered = state.lock().undo.len();
                inner.flush(priority).await?;
                state.lock().undo.drain(..covered);
                Ok(())
            })
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        length_bytes: u64,
        may_unmap: bool,
        priority: IoPriority,
    ) -> IoFuture<Result<()>> {
        let decision = self.decide(OpMask::WRITE_ZEROES, Some((offset, length_bytes)));
        let inner = self.inner.clone();
        let run = move || inner.write_zeroes(offset, length_bytes, may_unmap, priority);
        self.changing(decision, offset, length_bytes, run)
    }

    fn discard(&self, offset: u64, length_bytes: u64, priority: IoPriority) -> IoFuture<Result<()>> {
        let decision = self.decide(OpMask::DISCARD, Some((offset, length_bytes)));
        let inner = self.inner.clone();
        let run = move || inner.discard(offset, length_bytes, priority);
        self.changing(decision, offset, length_bytes, run)
    }

    fn block_status(&self, offset: u64, length_bytes: u64) -> IoFuture<Result<Extent>> {
        if self.is_crashed() {
            return IoFuture::ready(Err(Error::Crashed));
        }
        self.inner.block_status(offset, length_bytes)
    }
}

impl FaultyDriver {
    /// write_zeroes and discard: decided, then saved for the crash model, then run.
    fn changing(
        &self,
        decision: std::result::Result<Decision, Error>,
        offset: u64,
        length_bytes: u64,
        run: impl FnOnce() -> IoFuture<Result<()>> + Send + 'static,
    ) -> IoFuture<Result<()>> {
        let saver = self.saver(offset, length_bytes, None);
        self.wrap(decision, Err, move || match saver {
            None => run(),
            Some(saver) => IoFuture::boxed(async move {
                saver.await?;
                run().await
            }),
        })
    }
}
