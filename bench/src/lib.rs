//! `tandem-bench` as a library: the fio-compatible option parser and report writer, the job
//! runner on the Tandem reactor, `compare-fio`, the mirror scenario and the demo. The binary is a thin CLI over it;
//! the fuzz targets and integration tests use it directly.

pub mod backup;
pub mod compare;
pub mod demo;
pub mod fio;
pub mod images;
pub mod mirror;
pub mod nbd_servers;
pub mod procstat;
pub mod progress;
pub mod remote;
pub mod runner;
pub mod target;

/// Run jobs on a fresh runtime with one core per job instance (as fio has one thread per
/// job), showing progress. `label` overrides the progress prefix.
pub fn run_jobs(jobs: &[fio::JobSpec], label: Option<&str>) -> Result<fio::RunReport, String> {
    for job in jobs {
        job.validate().map_err(|e| e.to_string())?;
    }
    let instance_count: usize = jobs.iter().map(|j| j.numjobs as usize).sum();
    let cpu_count = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Unpinned, as fio runs its jobs: on this VM the disk's interrupts land on one CPU, and a
    // worker pinned elsewhere pays a cross-CPU wake-up (about 20 us) on every completion.
    let cores = instance_count.clamp(1, cpu_count);
    let config = size_buffers(tandem::reactor::Config { cores, pin: false, ..Default::default() }, jobs, cores);
    let runtime = tandem::reactor::Runtime::new(config).map_err(|e| e.to_string())?;
    // Every phase's files are opened (and laid out) before the first I/O, so a bad file in a
    // later phase fails the run before anything was measured.
    let phases = fio::groups::run_phases(jobs)
        .into_iter()
        .map(|phase| runner::prepare(&runtime, &jobs[phase]))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let live = std::sync::Arc::new(runner::Live::default());
    let expected = jobs.iter().filter_map(|j| j.runtime.map(|r| r + j.ramp_time)).max();
    let label = label.map_or_else(|| jobs.first().map_or_else(String::new, |j| j.name.clone()), str::to_string);
    let progress = progress::Progress::start(label, expected, live.clone());
    // fio's stonewall: each phase starts when every job of the phase before has finished.
    let results = phases.into_iter().flat_map(|instances| runner::run(&runtime, instances, &live)).collect();
    progress.finish();
    let engine = format!("tandem {}", runtime.backend());
    let timestamp_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Ok(fio::RunReport { jobs: results, engine, timestamp_s })
}

/// Give each core's pool room (and a registered arena) for every lane's buffer of the jobs it
/// runs, within bounds. Registration may still be refused (memlock): the runtime then logs it
/// and uses plain reads and writes.
fn size_buffers(mut config: tandem::reactor::Config, jobs: &[fio::JobSpec], cores: usize) -> tandem::reactor::Config {
    const ARENA_BYTES_MAX: u64 = 256 << 20;
    let lane_bytes: u64 =
        jobs.iter().map(|j| u64::from(j.effective_iodepth()) * j.max_block_bytes() * u64::from(j.numjobs)).sum();
    let per_core_bytes = lane_bytes.div_ceil(cores as u64).min(ARENA_BYTES_MAX) as usize;
    config.registered_buffer_bytes_per_core = config.registered_buffer_bytes_per_core.max(per_core_bytes);
    config.buffer_pool_bytes_per_core =
        config.buffer_pool_bytes_per_core.max(config.registered_buffer_bytes_per_core * 2);
    config
}
