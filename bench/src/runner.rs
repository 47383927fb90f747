//! Runs fio-style jobs on the Tandem reactor: each job instance is a task on a core that keeps
//! `iodepth` I/Os in flight (one lane task per slot) over its files, records completion latency
//! in hdrhistogram and counts bytes. The jobs of one `run` call (one stonewall phase) start
//! together, apart from `startdelay` and `wait_for`; each runs its passes (`loops`), each
//! followed by a verify read-back when asked. CPU time is the whole process's. Offsets live
//! in `offsets`, the verify header in `verify`.

mod offsets;
mod verify;

use self::offsets::FileCursor;
use crate::fio::files::job_files;
use crate::fio::values::{ExitWhat, ReadWrite};
use crate::fio::{DirStats, JobResult, JobSpec, RwMode};
use crate::target::{fill_random, Target, TargetError, Targets};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::block::WriteFlags;
use tandem::buf::{AlignedBuf, DEFAULT_ALIGN_BYTES};
use tandem::reactor::{
    current_buf_pool, last_op_submitted_at, now, sleep, sleep_until, yield_now, JoinHandle, Runtime,
};
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
    /// The files the instance spreads its I/O over, round robin (one for most jobs).
    pub files: Vec<Target>,
}

/// Open every job's files, expanding numjobs. Fails before any I/O if one is bad.
pub fn prepare(runtime: &Runtime, jobs: &[JobSpec]) -> Result<Vec<Instance>, TargetError> {
    let mut targets = Targets::new(runtime.handle());
    let mut instances = Vec::new();
    for spec in jobs {
        for job_index in 0..spec.numjobs {
            let files = open_files(&mut targets, spec, job_index)?;
            instances.push(Instance { spec: spec.clone(), job_index, files });
        }
    }
    Ok(instances)
}

/// The clone's files (`fio::files`), each opened as a one-file job of the file's share of the
/// size; its region must hold the job's largest I/O.
fn open_files(targets: &mut Targets, spec: &JobSpec, job_index: u32) -> Result<Vec<Target>, TargetError> {
    let files = job_files(spec, job_index);
    let one_file = |filename: Option<String>, size_bytes: Option<u64>| JobSpec {
        filename,
        size_bytes,
        block_size_bytes: spec.max_block_bytes(),
        ..spec.clone()
    };
    if files.is_empty() {
        return Ok(vec![targets.open(&one_file(spec.filename.clone(), spec.size_bytes))?]);
    }
    files.into_iter().map(|file| targets.open(&one_file(Some(file.path), file.size_bytes))).collect()
}

/// Run all instances to completion; results in the same order.
pub fn run(runtime: &Runtime, instances: Vec<Instance>, live: &Arc<Live>) -> Vec<JobResult> {
    let ramp = instances.iter().map(|i| i.spec.ramp_time).max().unwrap_or_default();
    let mut links = Links::default();
    let handles: Vec<(JobSpec, u32, JoinHandle<Outcome>)> = instances
        .into_iter()
        .enumerate()
        .map(|(i, instance)| {
            let (spec, job_index) = (instance.spec.clone(), instance.job_index);
            let live = live.clone();
            let link = links.link(&spec);
            let handle = runtime.spawn_on(i, move || run_instance(instance, live, link));
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
                sync: outcome.sync,
                elapsed_ms: outcome.elapsed_ms,
                usr_cpu_percent: cpu_share(usage.user_s),
                sys_cpu_percent: cpu_share(usage.system_s),
                ctx_switches: (usage.context_switches as f64 / count) as u64,
                error: outcome.error,
            }
        })
        .collect()
}

/// What ties an instance to the others of its run: fio's `exitall` (a job that finishes
/// stops the rest of its reporting group) and `wait_for` (start after the named job's clones).
struct Link {
    group_stop: Arc<AtomicBool>,
    /// One per run() call: the jobs of one stonewall phase.
    phase_stop: Arc<AtomicBool>,
    waitees: Vec<Arc<AtomicBool>>,
    /// Held for its `Drop`: set when the instance's task ends.
    _done: DoneOnDrop,
}

/// Marks an instance finished when its task ends, also by a panic, so no waiter waits forever.
struct DoneOnDrop(Arc<AtomicBool>);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The flags of one run's instances, handed out in job order.
#[derive(Default)]
struct Links {
    group_stops: HashMap<u32, Arc<AtomicBool>>,
    phase_stop: Arc<AtomicBool>,
    done_by_name: Vec<(String, Arc<AtomicBool>)>,
}

impl Links {
    /// The next instance's link; `wait_for` waits for the instances of that name before it.
    fn link(&mut self, spec: &JobSpec) -> Link {
        let group_stop = self.group_stops.entry(spec.groupid).or_default().clone();
        let waitees = match &spec.wait_for {
            Some(name) => self.done_by_name.iter().filter(|(n, _)| n == name).map(|(_, d)| d.clone()).collect(),
            None => Vec::new(),
        };
        let done = Arc::new(AtomicBool::new(false));
        self.done_by_name.push((spec.name.clone(), done.clone()));
        Link { group_stop, phase_stop: self.phase_stop.clone(), waitees, _done: DoneOnDrop(done) }
    }
}

/// Polls (the waitees run on other cores) until every waitee is done or the run stops.
async fn wait_for_waitees(link: &Link, live: &Live) {
    const POLL: Duration = Duration::from_millis(1);
    while !link.waitees.iter().all(|done| done.load(Ordering::Relaxed)) {
        if live.stop.load(Ordering::Relaxed) || interrupted() {
            return;
        }
        // sleep() reads the clock itself: `now()` is this turn's stamp and may be older than
        // POLL, and a sleep that is already due never lets the waitee's core turn.
        sleep(POLL).await;
        yield_now().await;
    }
}

struct Outcome {
    read: DirStats,
    write: DirStats,
    sync: DirStats,
    elapsed_ms: u64,
    error: i32,
}

impl Outcome {
    fn failed(errno: i32) -> Outcome {
        Outcome { read: DirStats::new(), write: DirStats::new(), sync: DirStats::new(), elapsed_ms: 0, error: errno }
    }
}

/// What the lanes are doing: the job's own I/O, or reading back what it wrote (fio's verify
/// phase of a write job).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Io,
    Verify,
}

/// One I/O as `next_io` hands it to a lane.
#[derive(Clone, Copy)]
struct NextIo {
    direction: Direction,
    file_index: usize,
    offset_bytes: u64,
    length_bytes: u64,
    /// With rate limits, when it may start.
    not_before: Option<Instant>,
}

/// A job's shared state, owned by its core (tasks of one job never leave it).
struct JobState {
    spec: JobSpec,
    files: Vec<Target>,
    cursors: Vec<FileCursor>,
    priority: IoPriority,
    rng: Cell<u64>,
    seed: u64,
    phase: Cell<Phase>,
    issued_bytes: Cell<u64>,
    issued_count: Cell<u64>,
    /// Per direction since the start, for rate limits: bytes and I/Os issued.
    rate_issued: RefCell<[(u64, u64); 2]>,
    /// Writes completed, for fsync=N.
    writes_done: Cell<u64>,
    /// With verify: what this pass wrote, (file, offset) -> length, read back in order.
    written: RefCell<BTreeMap<(usize, u64), u64>>,
    io_bytes_limit: u64,
    measure_from: Instant,
    deadline: Option<Instant>,
    rate_start: Instant,
    read: RefCell<DirStats>,
    write: RefCell<DirStats>,
    sync: RefCell<DirStats>,
    last_completion: Cell<Instant>,
    error: Cell<i32>,
    live: Arc<Live>,
    /// Set when an `exitall` job of this reporting group (or phase, with exit_what) finishes.
    group_stop: Arc<AtomicBool>,
    phase_stop: Arc<AtomicBool>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Direction {
    Read,
    Write,
}

async fn run_instance(instance: Instance, live: Arc<Live>, link: Link) -> Outcome {
    wait_for_waitees(&link, &live).await;
    if !instance.spec.startdelay.is_zero() {
        sleep(instance.spec.startdelay).await;
    }
    let state = Rc::new(JobState::new(instance, live, &link));
    // time_based repeats within one pass until the deadline; loops only count without it.
    let passes = if state.spec.time_based { 1 } else { state.spec.loops };
    for _ in 0..passes {
        state.begin(Phase::Io);
        run_lanes(&state).await;
        if state.verifies_after_writing() && state.error.get() == 0 {
            state.begin(Phase::Verify);
            run_lanes(&state).await;
        }
        if state.finished() {
            break;
        }
    }
    if state.spec.end_fsync && state.spec.rw.writes() {
        state.flush_all().await;
    }
    if state.spec.exitall {
        // exit_what=all uses the run's stop: every running job ends and no later phase runs.
        let flag = match state.spec.exit_what {
            ExitWhat::Group => &state.group_stop,
            ExitWhat::Stonewall => &state.phase_stop,
            ExitWhat::All => &state.live.stop,
        };
        flag.store(true, Ordering::Relaxed);
    }
    state.outcome()
}

/// Runs `effective_iodepth` lanes over the current phase and waits for them all.
async fn run_lanes(state: &Rc<JobState>) {
    let lanes: Vec<_> = (0..state.spec.effective_iodepth())
        .map(|lane| tandem::reactor::spawn_local(run_lane(state.clone(), lane)).expect("jobs run on a core"))
        .collect();
    for lane in lanes {
        lane.await;
    }
}

impl JobState {
    fn new(instance: Instance, live: Arc<Live>, link: &Link) -> JobState {
        let Instance { spec, job_index, files } = instance;
        assert!(!files.is_empty(), "a job has at least one target");
        let start = now();
        let measure_from = start + spec.ramp_time;
        let deadline = spec.runtime.map(|runtime| measure_from + runtime);
        let region_bytes: u64 = files.iter().map(|file| file.size_bytes).sum();
        let io_bytes_limit = match spec.time_based {
            true => u64::MAX,
            false => spec.io_size_bytes.unwrap_or(region_bytes),
        };
        let priority = match (spec.prioclass, spec.prio) {
            (None, None) => IoPriority::GUEST,
            (class, level) => IoPriority::from_fio(class.unwrap_or(2), level.unwrap_or(4)).unwrap_or(IoPriority::GUEST),
        };
        let seed = job_seed(&spec, job_index);
        JobState {
            priority,
            rng: Cell::new(seed),
            seed,
            cursors: files.iter().map(|_| FileCursor::new()).collect(),
            phase: Cell::new(Phase::Io),
            issued_bytes: Cell::new(0),
            issued_count: Cell::new(0),
            rate_issued: RefCell::new([(0, 0); 2]),
            writes_done: Cell::new(0),
            written: RefCell::new(BTreeMap::new()),
            io_bytes_limit,
            measure_from,
            deadline,
            rate_start: start,
            read: RefCell::new(DirStats::new()),
            write: RefCell::new(DirStats::new()),
            sync: RefCell::new(DirStats::new()),
            last_completion: Cell::new(start),
            error: Cell::new(0),
            live,
            group_stop: link.group_stop.clone(),
            phase_stop: link.phase_stop.clone(),
            spec,
            files,
        }
    }

    /// Starts a pass (fio's loop: back to the region's start) or the verify phase.
    fn begin(&self, phase: Phase) {
        self.phase.set(phase);
        if phase == Phase::Io {
            self.issued_bytes.set(0);
            self.cursors.iter().for_each(FileCursor::rewind);
            self.written.borrow_mut().clear();
        }
    }

    /// fio verifies a write-only job by reading back what it wrote once the writing is done.
    fn verifies_after_writing(&self) -> bool {
        self.spec.verify.is_some() && self.spec.do_verify && !self.spec.rw.reads()
    }

    /// Whether later passes must not run: an error, the deadline, or a stop.
    fn finished(&self) -> bool {
        let past_deadline = self.deadline.is_some_and(|deadline| now() >= deadline);
        let stopped = [&self.live.stop, &self.group_stop, &self.phase_stop].iter().any(|f| f.load(Ordering::Relaxed));
        past_deadline || self.error.get() != 0 || stopped || interrupted()
    }

    /// The next I/O, or `None` when the phase is done (bytes, time, error or stop).
    fn next_io(&self) -> Option<NextIo> {
        if self.finished() {
            return None;
        }
        if self.phase.get() == Phase::Verify {
            return self.next_verify_io();
        }
        let counted_out = self.spec.number_ios.is_some_and(|ios| self.issued_count.get() >= ios);
        if self.issued_bytes.get() >= self.io_bytes_limit || counted_out {
            return None;
        }
        let direction = self.direction();
        let file_index = (self.issued_count.get() % self.files.len() as u64) as usize;
        let length_bytes = self.pick_length(direction);
        let offset_bytes = self.files[file_index].offset_bytes + self.relative_offset(file_index, length_bytes);
        self.issued_bytes.set(self.issued_bytes.get() + length_bytes);
        self.issued_count.set(self.issued_count.get() + 1);
        let not_before = self.rate_slot(direction, length_bytes);
        if self.spec.verify.is_some() && direction == Direction::Write {
            self.remember_write(file_index, offset_bytes, length_bytes);
        }
        Some(NextIo { direction, file_index, offset_bytes, length_bytes, not_before })
    }

    /// The verify phase reads back every block this pass wrote, in offset order.
    fn next_verify_io(&self) -> Option<NextIo> {
        let ((file_index, offset_bytes), length_bytes) = self.written.borrow_mut().pop_first()?;
        Some(NextIo { direction: Direction::Read, file_index, offset_bytes, length_bytes, not_before: None })
    }

    /// Records a write for the verify phase; an earlier block it overlaps is no longer there
    /// to check (bssplit or norandommap can overlap), so it is forgotten.
    fn remember_write(&self, file_index: usize, offset_bytes: u64, length_bytes: u64) {
        let mut written = self.written.borrow_mut();
        let end_bytes = offset_bytes + length_bytes;
        let max_bytes = self.spec.max_block_bytes();
        let overlapping: Vec<(usize, u64)> = written
            .range((file_index, offset_bytes.saturating_sub(max_bytes - 1))..(file_index, end_bytes))
            .filter(|(&(_, start), &length)| start + length > offset_bytes)
            .map(|(&key, _)| key)
            .collect();
        for key in overlapping {
            written.remove(&key);
        }
        written.insert((file_index, offset_bytes), length_bytes);
    }

    fn roll(&self, bound: u64) -> u64 {
        let mut rng = self.rng.get();
        let value = rng::below(&mut rng, bound);
        self.rng.set(rng);
        value
    }

    fn direction(&self) -> Direction {
        match self.spec.rw {
            RwMode::Read | RwMode::RandRead => Direction::Read,
            RwMode::Write | RwMode::RandWrite => Direction::Write,
            RwMode::RandRw | RwMode::ReadWrite if self.roll(100) < u64::from(self.spec.rwmixread_percent) => {
                Direction::Read
            }
            RwMode::RandRw | RwMode::ReadWrite => Direction::Write,
        }
    }

    /// `bs`, or a size drawn from the direction's `bssplit` shares.
    fn pick_length(&self, direction: Direction) -> u64 {
        match &self.spec.bssplit {
            Some(split) => split.pick(direction == Direction::Write, self.roll(100) as u32),
            None => self.spec.block_size_bytes,
        }
    }

    /// Offset inside the file's region: a wrapping cursor for sequential jobs; for random ones
    /// fio's random map (each block once per pass) unless `norandommap` or `bssplit` ask for
    /// independent picks.
    fn relative_offset(&self, file_index: usize, length_bytes: u64) -> u64 {
        let region_bytes = self.files[file_index].size_bytes;
        let cursor = &self.cursors[file_index];
        if !self.spec.rw.is_random() {
            return cursor.next_sequential(region_bytes, length_bytes);
        }
        if self.spec.norandommap || self.spec.bssplit.is_some() {
            let mut rng = self.rng.get();
            let offset_bytes = offsets::uniform(&mut rng, region_bytes, length_bytes, self.spec.min_block_bytes());
            self.rng.set(rng);
            return offset_bytes;
        }
        let block_count = region_bytes / length_bytes;
        cursor.next_mapped(block_count, self.seed ^ file_index as u64) * length_bytes
    }

    /// With `rate`/`rate_iops` for the direction, when this I/O may start: each direction
    /// keeps its own schedule from the job's start, as fio paces reads and writes apart.
    fn rate_slot(&self, direction: Direction, length_bytes: u64) -> Option<Instant> {
        let which = direction as usize;
        let (bytes, ios) = {
            let mut issued = self.rate_issued.borrow_mut();
            let before = issued[which];
            issued[which] = (before.0 + length_bytes, before.1 + 1);
            before
        };
        let pick = |limits: &ReadWrite<Option<u64>>| match direction {
            Direction::Read => limits.read,
            Direction::Write => limits.write,
        };
        let at = |done: u64, per_second: u64| {
            self.rate_start + Duration::from_nanos((u128::from(done) * 1_000_000_000 / u128::from(per_second)) as u64)
        };
        let by_ios = pick(&self.spec.rate_iops).map(|rate| at(ios, rate));
        let by_bytes = pick(&self.spec.rate_bytes).map(|rate| at(bytes, rate));
        by_ios.max(by_bytes)
    }

    fn record(&self, io: &NextIo, started: Instant, submitted: Instant, finished: Instant) {
        if started < self.measure_from {
            return; // ramp time: run, but do not count
        }
        let mut stats = match io.direction {
            Direction::Read => self.read.borrow_mut(),
            Direction::Write => self.write.borrow_mut(),
        };
        stats.io_bytes += io.length_bytes;
        stats.total_ios += 1;
        stats.slat_ns.saturating_record(nanos_between(started, submitted));
        stats.clat_ns.saturating_record(nanos_between(submitted, finished));
        stats.lat_ns.saturating_record(nanos_between(started, finished));
        self.last_completion.set(finished);
    }

    /// After a write completes: with `fsync=N`/`fdatasync=N`, every Nth write flushes its file.
    async fn after_write(&self, file_index: usize) {
        let done = self.writes_done.get() + 1;
        self.writes_done.set(done);
        let every = u64::from(self.spec.flush_every());
        if every > 0 && done.is_multiple_of(every) {
            self.flush(file_index).await;
        }
    }

    /// `end_fsync`: one flush of every file once the job's writes are done.
    async fn flush_all(&self) {
        for file_index in 0..self.files.len() {
            self.flush(file_index).await;
        }
    }

    /// Flushes one file, counted as fio counts syncs; the first error ends the job.
    async fn flush(&self, file_index: usize) {
        let started = now();
        let result = self.files[file_index].disk.flush(self.priority).await;
        let finished = now();
        if let Err(e) = result {
            self.fail(&e.to_string(), e.errno().unwrap_or(libc::EIO));
            return;
        }
        let mut sync = self.sync.borrow_mut();
        sync.total_ios += 1;
        sync.lat_ns.saturating_record(nanos_between(started, finished));
        self.last_completion.set(finished);
    }

    /// The first error ends the job, as in fio.
    fn fail(&self, message: &str, errno: i32) {
        if self.error.get() == 0 {
            eprintln!("{}: {message}", self.spec.name);
            self.error.set(errno);
        }
    }

    fn outcome(&self) -> Outcome {
        let elapsed = self.last_completion.get().saturating_duration_since(self.measure_from);
        let elapsed_ms = elapsed.as_millis() as u64;
        // fio rounds a direction's runtime up to whole ms (backend.c update_runtime), so a
        // direction that did I/O never reports runtime 0 (and with it 0 IOPS and 0 bandwidth).
        let direction_runtime_ms = u64::try_from(elapsed.as_micros().div_ceil(1000)).unwrap_or(u64::MAX).max(1);
        let mut read = self.read.replace(DirStats::new());
        let mut write = self.write.replace(DirStats::new());
        for stats in [&mut read, &mut write] {
            if stats.total_ios > 0 {
                stats.runtime_ms = direction_runtime_ms;
            }
        }
        Outcome { read, write, sync: self.sync.replace(DirStats::new()), elapsed_ms, error: self.error.get() }
    }
}

/// The job's random seed: `randseed`, fio's fixed default with `randrepeat=1`, or the clock
/// with `randrepeat=0`; clones differ.
fn job_seed(spec: &JobSpec, job_index: u32) -> u64 {
    let base = match (spec.randseed, spec.randrepeat) {
        (Some(seed), _) => seed,
        (None, true) => SEED_DEFAULT,
        (None, false) => {
            let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            clock.as_nanos() as u64 ^ u64::from(std::process::id())
        }
    };
    base ^ u64::from(job_index).wrapping_mul(0x9E37_79B9)
}

fn nanos_between(from: Instant, to: Instant) -> u64 {
    to.saturating_duration_since(from).as_nanos().clamp(1, u128::from(u64::MAX)) as u64
}

/// A lane's buffer: from the core's pool (registered with its ring: no page pinning per I/O)
/// or freshly allocated, holding the job's largest I/O, filled with incompressible bytes.
fn lane_buffer(state: &JobState, lane: u32) -> Option<AlignedBuf> {
    let block_bytes = state.spec.max_block_bytes() as usize;
    let align = state.files.iter().map(|file| file.disk.alignment().memory_bytes).max().unwrap_or(0).max(4096) as usize;
    let pooled =
        current_buf_pool().filter(|_| align <= DEFAULT_ALIGN_BYTES).and_then(|pool| pool.get(block_bytes).ok());
    let mut buf = pooled.or_else(|| AlignedBuf::zeroed(block_bytes, align).ok())?;
    fill_random(buf.as_mut_slice(), u64::from(lane) + 1);
    Some(buf)
}

/// One in-flight slot: issue, wait, record, repeat.
async fn run_lane(state: Rc<JobState>, lane: u32) {
    let Some(mut buf) = lane_buffer(&state, lane) else {
        state.error.set(libc::ENOMEM);
        return;
    };
    let mut chained = 0u32;
    let mut unpublished = Unpublished::default();
    while let Some(io) = state.next_io() {
        if let Some(slot) = io.not_before {
            if !pace(&state, slot).await {
                break;
            }
        }
        buf.set_len(io.length_bytes as usize);
        if let (Some(kind), Direction::Write) = (state.spec.verify, io.direction) {
            verify::stamp(kind, buf.as_mut_slice(), io.offset_bytes, state.issued_count.get());
        }
        let started = now();
        let disk = &state.files[io.file_index].disk;
        let (result, back) = match io.direction {
            Direction::Read => disk.read(io.offset_bytes, buf, state.priority).await,
            Direction::Write => disk.write(io.offset_bytes, buf, WriteFlags::default(), state.priority).await,
        };
        buf = back;
        if let Err(e) = result {
            state.fail(&e.to_string(), e.errno().unwrap_or(libc::EINVAL));
            break;
        }
        // Completion latency starts when the kernel took the request (fio's clat); the time
        // before that, in our queue and the submit syscall, is submission latency (slat).
        let submitted = last_op_submitted_at().unwrap_or(started).max(started);
        state.record(&io, started, submitted, now());
        if !after_io(&state, &io, &buf).await {
            break;
        }
        unpublished.add(io.direction, io.length_bytes);
        chained += 1;
        if chained == LANE_BUDGET_COUNT {
            chained = 0;
            unpublished.publish(&state.live);
            yield_now().await;
        }
    }
    unpublished.publish(&state.live);
}

/// Waits for a rate-limit slot in steps, so a job told to stop (exitall, Ctrl-C) does not
/// sleep out a long slot first. False when the job must stop instead.
async fn pace(state: &JobState, slot: Instant) -> bool {
    const STEP: Duration = Duration::from_millis(100);
    loop {
        if state.finished() {
            return false;
        }
        let clock = Instant::now();
        if clock >= slot {
            return true;
        }
        sleep_until(slot.min(clock + STEP)).await;
    }
}

/// What follows a completed I/O: the verify check of a block read, fsync=N after writes, and
/// thinktime. False when the job must stop (a block failed its check).
async fn after_io(state: &JobState, io: &NextIo, buf: &AlignedBuf) -> bool {
    match (state.spec.verify, io.direction) {
        (Some(kind), Direction::Read) => {
            if let Err(e) = verify::check(kind, buf.as_slice(), io.offset_bytes) {
                state.fail(&e.to_string(), libc::EILSEQ);
                return false;
            }
        }
        (_, Direction::Write) => state.after_write(io.file_index).await,
        (None, Direction::Read) => {}
    }
    if !state.spec.thinktime.is_zero() {
        sleep(state.spec.thinktime).await;
    }
    true
}

/// A lane's I/Os not yet added to the live counters: published every `LANE_BUDGET_COUNT`
/// I/Os, so the progress display costs no shared atomic per I/O.
#[derive(Default)]
struct Unpublished {
    read: (u64, u64),
    write: (u64, u64),
}

impl Unpublished {
    fn add(&mut self, direction: Direction, length_bytes: u64) {
        let counts = match direction {
            Direction::Read => &mut self.read,
            Direction::Write => &mut self.write,
        };
        counts.0 += 1;
        counts.1 += length_bytes;
    }

    fn publish(&mut self, live: &Live) {
        for ((ios, bytes), live_ios, live_bytes) in
            [(self.read, &live.read_ios, &live.read_bytes), (self.write, &live.write_ios, &live.write_bytes)]
        {
            if ios > 0 {
                live_ios.fetch_add(ios, Ordering::Relaxed);
                live_bytes.fetch_add(bytes, Ordering::Relaxed);
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
