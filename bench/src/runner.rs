//! Runs fio-style jobs on the Tandem reactor: each job instance is a task on a core that keeps
//! `iodepth` I/Os in flight (one lane task per slot), records completion latency in
//! hdrhistogram and counts bytes. Jobs start together; CPU time is the whole process's.

use crate::fio::{DirStats, JobResult, JobSpec, RwMode};
use crate::target::{fill_random, Target, TargetError, Targets};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::block::WriteFlags;
use tandem::buf::{AlignedBuf, DEFAULT_ALIGN_BYTES};
use tandem::reactor::{current_buf_pool, last_op_submitted_at, now, sleep_until, yield_now, JoinHandle, Runtime};
use tandem::rng;
use tandem::IoPriority;

/// Synchronous completions (null driver) a lane may chain before letting its core turn.
const LANE_BUDGET_COUNT: u32 = 64;
/// Default seed, so runs repeat (fio's randrepeat=1).
const SEED_DEFAULT: u64 = 0x7A6D_656D;

/// Live counters a progress display reads while jobs run (relaxed atomics: display only).
#[derive(Default)]
pub struct Live {
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub read_ios: AtomicU64,
    pub write_ios: AtomicU64,
    /// Set to end every job early (a failing peer); Ctrl-C does the same through
    /// [`stop_on_interrupt`].
    pub stop: AtomicBool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Make Ctrl-C (SIGINT) end the running jobs early, as fio does: the results so far are still
/// reported. A second Ctrl-C is not caught specially: the handler stays, jobs are already ending.
pub fn stop_on_interrupt() {
    let handler = on_interrupt as extern "C" fn(libc::c_int);
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, handler as libc::sighandler_t) };
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// One job instance (numjobs expands into several), ready to run.
pub struct Instance {
    pub spec: JobSpec,
    pub job_index: u32,
    pub target: Target,
}

/// Open every job's target, expanding numjobs. Fails before any I/O if one is bad.
pub fn prepare(runtime: &Runtime, jobs: &[JobSpec]) -> Result<Vec<Instance>, TargetError> {
    let mut targets = Targets::new(runtime.handle());
    let mut instances = Vec::new();
    for spec in jobs {
        let target = targets.open(spec)?;
        for job_index in 0..spec.numjobs {
            instances.push(Instance { spec: spec.clone(), job_index, target: target.clone() });
        }
    }
    Ok(instances)
}

/// Run all instances to completion; results in the same order.
pub fn run(runtime: &Runtime, instances: Vec<Instance>, live: &Arc<Live>) -> Vec<JobResult> {
    let ramp = instances.iter().map(|i| i.spec.ramp_time).max().unwrap_or_default();
    let handles: Vec<(JobSpec, u32, JoinHandle<Outcome>)> = instances
        .into_iter()
        .enumerate()
        .map(|(i, instance)| {
            let (spec, job_index) = (instance.spec.clone(), instance.job_index);
            let live = live.clone();
            let handle = runtime.spawn_on(i, move || run_instance(instance, live));
            (spec, job_index, handle)
        })
        .collect();
    // CPU is counted over the measured window only, as fio resets its counters after ramp.
    std::thread::sleep(ramp);
    let usage_before = rusage();
    let started = Instant::now();
    let count = handles.len().max(1) as f64;
    let outcomes: Vec<_> = handles.into_iter().map(|(spec, index, h)| (spec, index, h.join())).collect();
    let elapsed = started.elapsed();
    let usage = rusage().since(&usage_before);
    outcomes
        .into_iter()
        .map(|(spec, job_index, outcome)| {
            let outcome = outcome.unwrap_or_else(|_| Outcome::failed(libc::ECANCELED));
            let cpu_share = |seconds: f64| seconds / count / elapsed.as_secs_f64().max(1e-9) * 100.0;
            JobResult {
                spec,
                job_index,
                read: outcome.read,
                write: outcome.write,
                elapsed_ms: outcome.elapsed_ms,
                usr_cpu_percent: cpu_share(usage.user_s),
                sys_cpu_percent: cpu_share(usage.system_s),
                ctx_switches: (usage.context_switches as f64 / count) as u64,
                error: outcome.error,
            }
        })
        .collect()
}

struct Outcome {
    read: DirStats,
    write: DirStats,
    elapsed_ms: u64,
    error: i32,
}

impl Outcome {
    fn failed(errno: i32) -> Outcome {
        Outcome { read: DirStats::new(), write: DirStats::new(), elapsed_ms: 0, error: errno }
    }
}

/// A job's shared state, owned by its core (tasks of one job never leave it).
struct JobState {
    spec: JobSpec,
    target: Target,
    priority: IoPriority,
    rng: Cell<u64>,
    sequential_cursor: Cell<u64>,
    issued_bytes: Cell<u64>,
    issued_count: Cell<u64>,
    io_bytes_limit: u64,
    measure_from: Instant,
    deadline: Option<Instant>,
    rate_start: Instant,
    read: RefCell<DirStats>,
    write: RefCell<DirStats>,
    last_completion: Cell<Instant>,
    error: Cell<i32>,
    live: Arc<Live>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Read,
    Write,
}

async fn run_instance(instance: Instance, live: Arc<Live>) -> Outcome {
    let state = Rc::new(JobState::new(instance, live));
    let lanes: Vec<_> = (0..state.spec.iodepth)
        .map(|lane| tandem::reactor::spawn_local(run_lane(state.clone(), lane)).expect("jobs run on a core"))
        .collect();
    for lane in lanes {
        lane.await;
    }
    let elapsed = state.last_completion.get().saturating_duration_since(state.measure_from);
    let elapsed_ms = elapsed.as_millis() as u64;
    // fio rounds a direction's runtime up to whole ms (backend.c update_runtime), so a direction
    // that did I/O never reports runtime 0 (and with it 0 IOPS and 0 bandwidth).
    let direction_runtime_ms = u64::try_from(elapsed.as_micros().div_ceil(1000)).unwrap_or(u64::MAX).max(1);
    let mut read = state.read.replace(DirStats::new());
    let mut write = state.write.replace(DirStats::new());
    for stats in [&mut read, &mut write] {
        if stats.total_ios > 0 {
            stats.runtime_ms = direction_runtime_ms;
        }
    }
    Outcome { read, write, elapsed_ms, error: state.error.get() }
}

impl JobState {
    fn new(instance: Instance, live: Arc<Live>) -> JobState {
        let Instance { spec, job_index, target } = instance;
        let start = now();
        let measure_from = start + spec.ramp_time;
        let deadline = spec.runtime.map(|runtime| measure_from + runtime);
        let io_bytes_limit = match spec.time_based {
            true => u64::MAX,
            false => spec.io_size_bytes.unwrap_or(target.size_bytes),
        };
        let priority = match (spec.prioclass, spec.prio) {
            (None, None) => IoPriority::GUEST,
            (class, level) => IoPriority::from_fio(class.unwrap_or(2), level.unwrap_or(4)).unwrap_or(IoPriority::GUEST),
        };
        let seed = spec.randseed.unwrap_or(SEED_DEFAULT) ^ u64::from(job_index).wrapping_mul(0x9E37_79B9);
        JobState {
            priority,
            rng: Cell::new(seed),
            sequential_cursor: Cell::new(0),
            issued_bytes: Cell::new(0),
            issued_count: Cell::new(0),
            io_bytes_limit,
            measure_from,
            deadline,
            rate_start: start,
            read: RefCell::new(DirStats::new()),
            write: RefCell::new(DirStats::new()),
            last_completion: Cell::new(start),
            error: Cell::new(0),
            live,
            spec,
            target,
        }
    }

    /// The next I/O, or `None` when the job is done (bytes, time, error or stop).
    fn next_io(&self) -> Option<(Direction, u64)> {
        let block_bytes = self.spec.block_size_bytes;
        let past_deadline = self.deadline.is_some_and(|deadline| now() >= deadline);
        let spent = self.issued_bytes.get() >= self.io_bytes_limit;
        let stopped = self.live.stop.load(Ordering::Relaxed) || interrupted();
        if past_deadline || spent || self.error.get() != 0 || stopped {
            return None;
        }
        let direction = self.direction();
        let offset = self.target.offset_bytes + self.relative_offset(block_bytes);
        self.issued_bytes.set(self.issued_bytes.get() + block_bytes);
        self.issued_count.set(self.issued_count.get() + 1);
        Some((direction, offset))
    }

    fn direction(&self) -> Direction {
        let mix = |percent_read: u32| {
            let mut rng = self.rng.get();
            let roll = rng::below(&mut rng, 100) as u32;
            self.rng.set(rng);
            if roll < percent_read {
                Direction::Read
            } else {
                Direction::Write
            }
        };
        match self.spec.rw {
            RwMode::Read | RwMode::RandRead => Direction::Read,
            RwMode::Write | RwMode::RandWrite => Direction::Write,
            RwMode::RandRw | RwMode::ReadWrite => mix(self.spec.rwmixread_percent),
        }
    }

    /// Offset inside the region: a wrapping cursor for sequential jobs, a uniformly random
    /// block for random ones (like fio's norandommap).
    fn relative_offset(&self, block_bytes: u64) -> u64 {
        let block_count = self.target.size_bytes / block_bytes;
        match self.spec.rw {
            RwMode::RandRead | RwMode::RandWrite | RwMode::RandRw => {
                let mut rng = self.rng.get();
                let block = rng::below(&mut rng, block_count);
                self.rng.set(rng);
                block * block_bytes
            }
            RwMode::Read | RwMode::Write | RwMode::ReadWrite => {
                let cursor = self.sequential_cursor.get();
                self.sequential_cursor.set((cursor + 1) % block_count);
                cursor * block_bytes
            }
        }
    }

    /// With rate_iops, when the next I/O may start.
    fn rate_slot(&self) -> Option<Instant> {
        let rate = self.spec.rate_iops.filter(|r| *r > 0)?;
        let index = self.issued_count.get();
        Some(self.rate_start + Duration::from_nanos(index.saturating_mul(1_000_000_000) / rate))
    }

    fn record(&self, direction: Direction, started: Instant, submitted: Instant, finished: Instant) {
        let block_bytes = self.spec.block_size_bytes;
        if started < self.measure_from {
            return; // ramp time: run, but do not count
        }
        let nanos = |from: Instant, to: Instant| {
            to.saturating_duration_since(from).as_nanos().clamp(1, u128::from(u64::MAX)) as u64
        };
        let mut stats = match direction {
            Direction::Read => self.read.borrow_mut(),
            Direction::Write => self.write.borrow_mut(),
        };
        stats.io_bytes += block_bytes;
        stats.total_ios += 1;
        stats.slat_ns.saturating_record(nanos(started, submitted));
        stats.clat_ns.saturating_record(nanos(submitted, finished));
        stats.lat_ns.saturating_record(nanos(started, finished));
        self.last_completion.set(finished);
    }
}

/// One in-flight slot: issue, wait, record, repeat.
async fn run_lane(state: Rc<JobState>, lane: u32) {
    let block_bytes = state.spec.block_size_bytes as usize;
    let align = state.target.disk.alignment().memory_bytes.max(4096) as usize;
    // The core's pool hands out buffers registered with its ring (no page pinning per I/O).
    let pooled =
        current_buf_pool().filter(|_| align <= DEFAULT_ALIGN_BYTES).and_then(|pool| pool.get(block_bytes).ok());
    let Some(mut buf) = pooled.or_else(|| AlignedBuf::zeroed(block_bytes, align).ok()) else {
        state.error.set(libc::ENOMEM);
        return;
    };
    fill_random(buf.as_mut_slice(), u64::from(lane) + 1);
    let mut chained = 0u32;
    let mut unpublished = Unpublished::default();
    while let Some((direction, offset)) = state.next_io() {
        if let Some(slot) = state.rate_slot() {
            sleep_until(slot).await;
        }
        let started = now();
        let disk = &state.target.disk;
        let (result, back) = match direction {
            Direction::Read => disk.read(offset, buf, state.priority).await,
            Direction::Write => disk.write(offset, buf, WriteFlags::default(), state.priority).await,
        };
        buf = back;
        if let Err(e) = result {
            if state.error.get() == 0 {
                eprintln!("{}: {e}", state.spec.name); // the first error ends the job, as in fio
                state.error.set(e.errno().unwrap_or(libc::EINVAL));
            }
            break;
        }
        // Completion latency starts when the kernel took the request (fio's clat); the time
        // before that, in our queue and the submit syscall, is submission latency (slat).
        let submitted = last_op_submitted_at().unwrap_or(started).max(started);
        state.record(direction, started, submitted, now());
        unpublished.add(direction);
        chained += 1;
        if chained == LANE_BUDGET_COUNT {
            chained = 0;
            unpublished.publish(&state.live, state.spec.block_size_bytes);
            yield_now().await;
        }
    }
    unpublished.publish(&state.live, state.spec.block_size_bytes);
}

/// A lane's I/Os not yet added to the live counters: published every `LANE_BUDGET_COUNT`
/// I/Os, so the progress display costs no shared atomic per I/O.
#[derive(Default)]
struct Unpublished {
    read_ios: u64,
    write_ios: u64,
}

impl Unpublished {
    fn add(&mut self, direction: Direction) {
        match direction {
            Direction::Read => self.read_ios += 1,
            Direction::Write => self.write_ios += 1,
        }
    }

    fn publish(&mut self, live: &Live, block_bytes: u64) {
        for (ios, live_ios, live_bytes) in
            [(self.read_ios, &live.read_ios, &live.read_bytes), (self.write_ios, &live.write_ios, &live.write_bytes)]
        {
            if ios > 0 {
                live_ios.fetch_add(ios, Ordering::Relaxed);
                live_bytes.fetch_add(ios * block_bytes, Ordering::Relaxed);
            }
        }
        *self = Unpublished::default();
    }
}

/// Process CPU time, for fio's usr_cpu/sys_cpu.
#[derive(Clone, Copy)]
pub struct Usage {
    pub user_s: f64,
    pub system_s: f64,
    pub context_switches: u64,
}

impl Usage {
    pub fn since(&self, before: &Usage) -> Usage {
        Usage {
            user_s: self.user_s - before.user_s,
            system_s: self.system_s - before.system_s,
            context_switches: self.context_switches.saturating_sub(before.context_switches),
        }
    }
}

pub fn rusage() -> Usage {
    // SAFETY: an all-zero rusage is a valid value (integers and timevals).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct on the stack through a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Usage {
        user_s: seconds(usage.ru_utime),
        system_s: seconds(usage.ru_stime),
        context_switches: (usage.ru_nvcsw + usage.ru_nivcsw) as u64,
    }
}
