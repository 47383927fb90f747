//! The per-core reactor: worker threads, each with its own io_uring ring (or a share of a
//! thread pool where io_uring is refused), task executor, buffer pool and inbox.
//!
//! Operations ([`OpKind`]) cover files (read, write, fsync, fallocate) and sockets (accept,
//! recv, one-shot prefix + buffer send). Everything above this module is safe, owned-buffer
//! code; the ring's safety contract lives in `uring.rs`.
//!
//! ```
//! use tandem::reactor::{Config, Runtime};
//! let runtime = Runtime::new(Config { cores: 1, ..Config::default() }).unwrap();
//! let answer = runtime.spawn(|| async { 6 * 7 }).join().unwrap();
//! assert_eq!(answer, 42);
//! ```

mod core;
mod fd;
mod finish;
mod join;
mod local;
pub mod op;
mod sockets;
pub mod stream;
mod threads;
mod time;
mod uring;

#[cfg(test)]
mod socket_tests;

pub use fd::SharedFd;
pub(crate) use finish::run_to_end;
pub use join::{block_on, JoinHandle};
pub use op::last_op_submitted_at;
pub use op::{Op, OpFuture, OpKind, OpOutput, SendPrefix, RESULT_STOPPED, SEND_PREFIX_BYTES_MAX};
pub use time::{now, sleep, sleep_until, yield_now, Sleep, YieldNow};
pub use uring::RingFlavor;

use self::core::{Backend, Core, CoreShared, Message};
use self::local::CoreId;
use self::op::OpShared;
use crate::buf::BufPool;
use crate::error::{Error, Result};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle as ThreadHandle;

/// Which I/O backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// `TANDEM_IO_BACKEND` if set, else io_uring, falling back to threads when refused.
    Auto,
    Uring,
    Threads,
}

/// What the runtime ended up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Uring(RingFlavor),
    Threads,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendKind::Uring(flavor) => write!(f, "io_uring ({})", flavor.describe()),
            BackendKind::Threads => f.write_str("thread pool"),
        }
    }
}

/// Runtime settings. Every field is bounded; `Runtime::new` names any value out of range.
#[derive(Debug, Clone)]
pub struct Config {
    /// Worker threads, one per core. Default: the CPUs this process may use.
    pub cores: usize,
    /// Pin worker `i` to the i-th allowed CPU.
    pub pin: bool,
    /// Ring entries per core (and so operations in the kernel per core, less one).
    pub queue_depth: u32,
    /// Bytes each core's buffer pool may hand out at once.
    pub buffer_pool_bytes_per_core: usize,
    /// Of those, bytes carved from one arena registered with the core's ring (fixed buffers:
    /// no page pinning per request). 0 disables it. Without CAP_IPC_LOCK, registration counts
    /// against RLIMIT_MEMLOCK; a refusal is logged once and the pool works unregistered.
    pub registered_buffer_bytes_per_core: usize,
    pub backend: BackendChoice,
    /// Cap on io_uring's io-wq worker threads per ring (bounded and unbounded each).
    pub io_workers_max: u32,
    /// Threads of the thread-pool backend (its queue depth is one operation per thread). They
    /// do disk I/O only: socket operations wait on one readiness thread (epoll) per runtime.
    pub thread_pool_workers: usize,
    /// A core hands queued operations to the kernel as soon as this many are queued (and at
    /// the end of every turn). 1, like fio's default, gives the device each request at once:
    /// measured on a virtio disk, batching 32 reads per submit lost 15% of random-read IOPS
    /// (a batch is plugged and dispatched together) while saving a few syscalls.
    pub submit_batch_count: usize,
}

const QUEUE_DEPTH_MAX: u32 = 4096;
const CORES_MAX: usize = 1024;
const POOL_BYTES_MIN: usize = 4096;
const THREAD_POOL_WORKERS_MAX: usize = 1024;

impl Default for Config {
    fn default() -> Self {
        Config {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pin: true,
            queue_depth: 256,
            buffer_pool_bytes_per_core: 256 << 20,
            registered_buffer_bytes_per_core: 4 << 20,
            backend: BackendChoice::Auto,
            io_workers_max: 8,
            thread_pool_workers: 64,
            submit_batch_count: 1,
        }
    }
}

impl Config {
    fn validate(&self) -> Result<()> {
        let bad = |name, value: String, reason| Err(Error::Config { name, value, reason });
        if self.cores == 0 || self.cores > CORES_MAX {
            return bad("cores", self.cores.to_string(), "must be 1..=1024");
        }
        if self.queue_depth < 2 || self.queue_depth > QUEUE_DEPTH_MAX {
            return bad("queue_depth", self.queue_depth.to_string(), "must be 2..=4096");
        }
        if self.buffer_pool_bytes_per_core < POOL_BYTES_MIN {
            return bad("buffer_pool_bytes_per_core", self.buffer_pool_bytes_per_core.to_string(), "must be >= 4096");
        }
        if self.registered_buffer_bytes_per_core > self.buffer_pool_bytes_per_core {
            return bad(
                "registered_buffer_bytes_per_core",
                self.registered_buffer_bytes_per_core.to_string(),
                "must be <= buffer_pool_bytes_per_core",
            );
        }
        if self.thread_pool_workers == 0 || self.thread_pool_workers > THREAD_POOL_WORKERS_MAX {
            return bad("thread_pool_workers", self.thread_pool_workers.to_string(), "must be 1..=1024");
        }
        if self.submit_batch_count == 0 || self.submit_batch_count > self.queue_depth as usize {
            return bad("submit_batch_count", self.submit_batch_count.to_string(), "must be 1..=queue_depth");
        }
        if self.io_workers_max == 0 {
            return bad("io_workers_max", "0".into(), "must be >= 1");
        }
        Ok(())
    }
}

struct RuntimeShared {
    id: u64,
    cores: Vec<Arc<CoreShared>>,
    backend: BackendKind,
    next_core: AtomicUsize,
}

/// A cheap, `Send + Sync` handle on a runtime: what drivers keep to submit I/O.
#[derive(Clone)]
pub struct RuntimeHandle {
    shared: Arc<RuntimeShared>,
}

/// The reactor: owns the worker threads. Dropping it shuts them down after draining the I/O
/// the kernel still holds. Disk I/O runs to its end; a socket operation that could wait on an
/// idle peer forever (accept, recv, send) is ended instead: cancelled on io_uring after a short
/// grace period (`-ECANCELED`), at once on the thread pool (`-ECANCELED`, unless it can finish
/// without waiting; the socket itself is left alone).
pub struct Runtime {
    handle: RuntimeHandle,
    threads: Vec<ThreadHandle<()>>,
    // Dropped after the cores have stopped: its workers finish what is queued, then exit.
    _thread_pool: Option<threads::ThreadPool>,
}

static RUNTIME_IDS: AtomicU64 = AtomicU64::new(1);
static BACKEND_LOGGED: AtomicBool = AtomicBool::new(false);
static FIXED_REFUSED_LOGGED: AtomicBool = AtomicBool::new(false);

fn log_once(flag: &AtomicBool, message: &str) {
    if !flag.swap(true, Ordering::Relaxed) {
        crate::log::line(message);
    }
}

impl Runtime {
    /// Start the workers. Fails with a typed error naming the bad setting, or the refusal.
    pub fn new(config: Config) -> Result<Runtime> {
        config.validate()?;
        let choice = backend_choice(config.backend)?;
        let use_uring = match choice {
            BackendChoice::Threads => false,
            BackendChoice::Uring => true,
            BackendChoice::Auto => uring_available(),
        };
        let thread_pool = match use_uring {
            true => None,
            false => Some(start_thread_pool(&config)?),
        };
        let id = RUNTIME_IDS.fetch_add(1, Ordering::Relaxed);
        let cpus = allowed_cpus();
        let mut cores = Vec::with_capacity(config.cores);
        let mut threads = Vec::with_capacity(config.cores);
        let mut flavor = None;
        for index in 0..config.cores {
            let cpu = config.pin.then(|| cpus[index % cpus.len()]);
            let (core, thread, ring_flavor) =
                start_core(&config, CoreId { runtime_id: id, index }, cpu, thread_pool.as_ref())?;
            cores.push(core);
            threads.push(thread);
            flavor = ring_flavor;
        }
        let backend = flavor.map_or(BackendKind::Threads, BackendKind::Uring);
        if !BACKEND_LOGGED.swap(true, Ordering::Relaxed) {
            crate::log::line(&format!(
                "I/O backend: {backend}, {} cores, queue depth {}",
                config.cores, config.queue_depth
            ));
        }
        let shared = Arc::new(RuntimeShared { id, cores, backend, next_core: AtomicUsize::new(0) });
        Ok(Runtime { handle: RuntimeHandle { shared }, threads, _thread_pool: thread_pool })
    }

    pub fn handle(&self) -> RuntimeHandle {
        self.handle.clone()
    }

    /// Run `make()`'s future on the next core (round robin). The closure is `Send`; the future
    /// it makes need not be.
    pub fn spawn<F, Fut>(&self, make: F) -> JoinHandle<Fut::Output>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        self.handle.spawn(make)
    }

    /// Run `make()`'s future on core `core_index` (modulo the core count).
    pub fn spawn_on<F, Fut>(&self, core_index: usize, make: F) -> JoinHandle<Fut::Output>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        self.handle.spawn_on(core_index, make)
    }

    /// Spawn and wait: the blocking entry point for plain threads.
    pub fn block_on<F, Fut>(&self, make: F) -> Result<Fut::Output>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        self.spawn(make).join()
    }

    pub fn backend(&self) -> BackendKind {
        self.handle.shared.backend
    }

    pub fn core_count(&self) -> usize {
        self.handle.shared.cores.len()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for core in &self.handle.shared.cores {
            let _ = core.send(Message::Shutdown);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl RuntimeHandle {
    /// See [`Runtime::spawn`].
    pub fn spawn<F, Fut>(&self, make: F) -> JoinHandle<Fut::Output>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        let index = self.shared.next_core.fetch_add(1, Ordering::Relaxed);
        self.spawn_on(index, make)
    }

    /// See [`Runtime::spawn_on`].
    pub fn spawn_on<F, Fut>(&self, core_index: usize, make: F) -> JoinHandle<Fut::Output>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        let core = self.shared.cores[core_index % self.shared.cores.len()].clone();
        let (sender, handle) = join::join_pair();
        let schedule_core = core.clone();
        let start = Box::new(move || {
            let future = async move { sender.send(make().await) };
            // A panicking task must not take its core (and every other task on it) down.
            let builder = async_task::Builder::new().propagate_panic(true);
            let (runnable, task) = builder.spawn_local(move |_| future, move |r| schedule_core.schedule(r));
            task.detach();
            runnable.schedule();
        });
        // A stopped core drops `start`, and with it the sender: the handle reports it.
        let _ = core.send(Message::Spawn(start));
        handle
    }

    /// Submit one operation. On one of this runtime's cores it is queued without a syscall
    /// (the core submits the batch at the end of its turn); from any other thread it goes
    /// through a core's inbox.
    pub fn submit(&self, op: Op) -> OpFuture {
        let shared = OpShared::new(op);
        let future = OpFuture { shared: shared.clone() };
        self.home_core().submit(shared);
        future
    }

    fn home_core(&self) -> &Arc<CoreShared> {
        let cores = &self.shared.cores;
        match local::current_core() {
            Some(id) if id.runtime_id == self.shared.id => &cores[id.index],
            _ => &cores[self.shared.next_core.fetch_add(1, Ordering::Relaxed) % cores.len()],
        }
    }

    pub fn backend(&self) -> BackendKind {
        self.shared.backend
    }

    /// The buffer pool of the calling core (or of the next core, off the reactor).
    pub fn buf_pool(&self) -> BufPool {
        self.home_core().pool.clone()
    }

    /// Whether the calling thread is one of this runtime's cores.
    pub fn on_core(&self) -> bool {
        local::current_core().is_some_and(|id| id.runtime_id == self.shared.id)
    }
}

/// Whether the caller runs on a core of any runtime (where blocking on a join would stop the
/// core that must run the task).
pub fn on_any_core() -> bool {
    local::current_core().is_some()
}

/// The calling core's buffer pool (buffers registered with its ring). `None` off a core.
pub fn current_buf_pool() -> Option<BufPool> {
    CURRENT_SHARED.with(|c| c.borrow().as_ref().map(|core| core.pool.clone()))
}

/// Spawn a task on the calling core. Returns `None` off a reactor core.
pub fn spawn_local<Fut>(future: Fut) -> Option<async_task::Task<Fut::Output>>
where
    Fut: Future + 'static,
    Fut::Output: 'static,
{
    let _ = local::current_core()?;
    let core = CURRENT_SHARED.with(|c| c.borrow().clone())?;
    let builder = async_task::Builder::new().propagate_panic(true);
    let (runnable, task) = builder.spawn_local(move |_| future, move |r| core.schedule(r));
    runnable.schedule();
    Some(task)
}

thread_local! {
    static CURRENT_SHARED: std::cell::RefCell<Option<Arc<CoreShared>>> = const { std::cell::RefCell::new(None) };
}

fn backend_choice(choice: BackendChoice) -> Result<BackendChoice> {
    if choice != BackendChoice::Auto {
        return Ok(choice);
    }
    parse_backend_env(std::env::var("TANDEM_IO_BACKEND").ok())
}

/// `TANDEM_IO_BACKEND`: uring, threads, auto (or unset).
fn parse_backend_env(value: Option<String>) -> Result<BackendChoice> {
    match value {
        None => Ok(BackendChoice::Auto),
        Some(value) => match value.as_str() {
            "uring" | "io_uring" => Ok(BackendChoice::Uring),
            "threads" => Ok(BackendChoice::Threads),
            "" | "auto" => Ok(BackendChoice::Auto),
            _ => Err(Error::Config { name: "TANDEM_IO_BACKEND", value, reason: "expected uring, threads or auto" }),
        },
    }
}

/// Probe once with a tiny ring. A refusal (seccomp, `kernel.io_uring_disabled`, no syscall,
/// no locked memory) is logged once and means the thread pool.
fn uring_available() -> bool {
    match uring::build_ring(4) {
        Ok(_) => true,
        Err(e) => {
            crate::log::line(&format!("io_uring unavailable ({e}); using the thread-pool backend"));
            false
        }
    }
}

fn start_thread_pool(config: &Config) -> Result<threads::ThreadPool> {
    threads::ThreadPool::new(config.thread_pool_workers, config.thread_pool_workers).map_err(|_| Error::Config {
        name: "thread_pool_workers",
        value: config.thread_pool_workers.to_string(),
        reason: "could not start the worker threads",
    })
}

type StartedCore = (Arc<CoreShared>, ThreadHandle<()>, Option<RingFlavor>);

/// Start one worker and wait until it has built its backend on its own thread (a
/// SINGLE_ISSUER ring belongs to the thread that created it).
fn start_core(
    config: &Config,
    id: CoreId,
    cpu: Option<usize>,
    pool: Option<&threads::ThreadPool>,
) -> Result<StartedCore> {
    let buf_pool = BufPool::with_arena(
        config.buffer_pool_bytes_per_core,
        crate::buf::DEFAULT_ALIGN_BYTES,
        if pool.is_none() { config.registered_buffer_bytes_per_core } else { 0 },
    )?;
    let register_pool = buf_pool.clone();
    let (shared, inbox) = CoreShared::new(id, buf_pool).map_err(|_| Error::Config {
        name: "cores",
        value: config.cores.to_string(),
        reason: "eventfd creation failed",
    })?;
    let threads_backend = pool.map(|p| p.backend());
    let (queue_depth, io_workers_max) = (config.queue_depth, config.io_workers_max);
    let submit_batch_count = config.submit_batch_count;
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let thread_shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name(format!("tandem-core-{}", id.index))
        .spawn(move || {
            if let Some(cpu) = cpu {
                pin_to_cpu(cpu);
            }
            let backend = match threads_backend {
                Some(threads_backend) => Ok(Backend::Threads(threads_backend)),
                None => uring::UringBackend::new(queue_depth, Core::wake_fd(&thread_shared), io_workers_max).map(
                    |mut ring| {
                        if let Err(e) = ring.register_pool(&register_pool) {
                            log_once(
                                &FIXED_REFUSED_LOGGED,
                                &format!("registered buffers refused ({e}); using plain reads and writes"),
                            );
                        }
                        Backend::Uring(ring)
                    },
                ),
            };
            let backend = match backend {
                Ok(backend) => backend,
                Err(e) => return drop(ready_tx.send(Err(e))),
            };
            let flavor = match &backend {
                Backend::Uring(ring) => Some(ring.flavor),
                Backend::Threads(_) => None,
            };
            let _ = ready_tx.send(Ok(flavor));
            CURRENT_SHARED.with(|c| *c.borrow_mut() = Some(thread_shared.clone()));
            Core::new(thread_shared, inbox, backend, submit_batch_count).run();
            CURRENT_SHARED.with(|c| *c.borrow_mut() = None);
        })
        .map_err(|_| Error::Config { name: "cores", value: config.cores.to_string(), reason: "thread spawn failed" })?;
    let flavor = ready_rx.recv().map_err(|_| Error::RuntimeStopped)??;
    Ok((shared, thread, flavor))
}

fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity fills the set on the stack for this thread, within its size.
    let ok = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } == 0;
    // SAFETY: CPU_ISSET reads one bit of the set; every cpu index is below CPU_SETSIZE.
    let is_set = |cpu: usize| unsafe { libc::CPU_ISSET(cpu, &set) };
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize).filter(|cpu| ok && is_set(*cpu)).collect();
    if cpus.is_empty() {
        vec![0]
    } else {
        cpus
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: builds a one-CPU set and applies it to the calling thread; failure leaves the
    // thread unpinned, which is only slower.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn one_core() -> Runtime {
        Runtime::new(Config { cores: 2, pin: false, queue_depth: 8, ..Config::default() }).unwrap()
    }

    #[test]
    fn tasks_run_on_the_core_they_were_sent_to() {
        let runtime = one_core();
        for core in 0..4 {
            let on = runtime.spawn_on(core, || async { local::current_core().map(|id| id.index) }).join().unwrap();
            assert_eq!(on, Some(core % 2));
        }
    }

    #[test]
    fn local_tasks_and_timers() {
        let runtime = one_core();
        let waited = runtime
            .block_on(|| async {
                let started = Instant::now();
                let child = spawn_local(async {
                    sleep(Duration::from_millis(20)).await;
                    7
                })
                .unwrap();
                (child.await, started.elapsed())
            })
            .unwrap();
        assert_eq!(waited.0, 7);
        assert!(waited.1 >= Duration::from_millis(20), "slept {:?}", waited.1);
        assert!(spawn_local(async {}).is_none(), "no core on the test thread");
    }

    #[test]
    fn a_task_woken_from_another_core_runs() {
        let runtime = one_core();
        let other = runtime.handle();
        let handle = runtime.spawn_on(0, move || async move {
            // Core 1 finishes the inner task; its wake-up crosses core 0's inbox.
            let inner = other.spawn_on(1, || async {
                sleep(Duration::from_millis(5)).await;
                local::current_core().map(|id| id.index)
            });
            (inner.await.unwrap(), local::current_core().map(|id| id.index))
        });
        assert_eq!(handle.join().unwrap(), (Some(1), Some(0)));
        block_on(sleep(Duration::from_millis(1))); // off-core sleep uses the shared timer
    }

    #[test]
    fn bad_settings_are_named() {
        let err = |config: Config| Runtime::new(config).err().expect("refused").to_string();
        assert!(err(Config { cores: 0, ..Config::default() }).contains("cores = 0"));
        assert!(err(Config { queue_depth: 1, ..Config::default() }).contains("queue_depth = 1"));
        assert!(err(Config { queue_depth: 8192, ..Config::default() }).contains("queue_depth = 8192"));
        assert!(err(Config { thread_pool_workers: 0, ..Config::default() }).contains("thread_pool_workers = 0"));
        assert!(err(Config { buffer_pool_bytes_per_core: 100, ..Config::default() }).contains("= 100"));
    }

    #[test]
    fn backend_env_values() {
        assert_eq!(parse_backend_env(None).unwrap(), BackendChoice::Auto);
        assert_eq!(parse_backend_env(Some("threads".into())).unwrap(), BackendChoice::Threads);
        assert_eq!(parse_backend_env(Some("uring".into())).unwrap(), BackendChoice::Uring);
        let err = parse_backend_env(Some("spdk".into())).unwrap_err().to_string();
        assert!(err.contains("TANDEM_IO_BACKEND = spdk"), "{err}");
    }

    #[test]
    fn a_panicking_task_leaves_its_core_running() {
        let runtime = one_core();
        let handle = runtime.spawn_on(0, || async {
            if local::current_core().is_some() {
                panic!("deliberate panic in a task");
            }
        });
        assert_eq!(handle.join().unwrap_err(), Error::TaskPanicked);
        assert_eq!(runtime.spawn_on(0, || async { 3 }).join().unwrap(), 3, "core 0 still runs tasks");
    }

    #[test]
    fn finished_operation_cells_are_reused() {
        let runtime = one_core();
        let handle = runtime.handle();
        let reused = runtime
            .block_on(move || async move {
                let nop = || handle.submit(Op { kind: OpKind::Nop, buf: None, priority: crate::IoPriority::GUEST });
                let first = nop();
                let first_cell = Arc::as_ptr(&first.shared);
                assert_eq!(first.await.result, 0);
                let second = nop();
                let reused = Arc::as_ptr(&second.shared) == first_cell;
                assert_eq!(second.await.result, 0);
                reused
            })
            .unwrap();
        assert!(reused, "the second operation took the first one's cell");
    }

    #[test]
    fn after_shutdown_spawns_report_stopped() {
        let runtime = one_core();
        let handle = runtime.handle();
        drop(runtime);
        assert_eq!(handle.spawn(|| async { 1 }).join().unwrap_err(), Error::RuntimeStopped);
    }
}
