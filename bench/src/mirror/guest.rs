//! The guest of `tandem-bench mirror`: fio's words (rw, bs, iodepth, rate_iops) as lanes on
//! the reactor writing through the same [`Disk`] the job filters. Every completion's latency
//! goes into a histogram of its 100 ms slot, so the report can cut any window (baseline,
//! phase one, phase two) after the fact, counting only completions inside it.

use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::block::{Disk, WriteFlags};
use tandem::buf::AlignedBuf;
use tandem::reactor::{sleep_until, JoinHandle, Runtime};
use tandem::IoPriority;

/// Width of one time slot of the guest's record.
pub const SLOT: Duration = Duration::from_millis(100);
/// Longest guest run recorded (slots are preallocated per lane).
const RUNTIME_MAX: Duration = Duration::from_secs(3600);
/// Latencies above this are clamped (they still count).
const LATENCY_NS_MAX: u64 = 60_000_000_000;

/// What the guest does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestRw {
    RandWrite,
    RandRead,
    /// Half reads, half writes.
    RandRw,
}

impl GuestRw {
    pub fn parse(text: &str) -> Result<GuestRw, String> {
        match text {
            "randwrite" => Ok(GuestRw::RandWrite),
            "randread" => Ok(GuestRw::RandRead),
            "randrw" => Ok(GuestRw::RandRw),
            _ => Err(format!("--guest-rw {text}: expected randwrite, randread or randrw")),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct GuestSpec {
    pub rw: GuestRw,
    pub block_size_bytes: u64,
    pub iodepth: u32,
    /// Total IOPS cap (0: as fast as it goes).
    pub rate_iops: u64,
    pub runtime: Duration,
}

/// The `--guest-*` flags the job commands share.
#[derive(clap::Args, Debug, Clone)]
pub struct GuestArgs {
    /// The guest: randwrite, randread or randrw (none if not given).
    #[arg(long = "guest-rw")]
    pub guest_rw: Option<String>,
    #[arg(long = "guest-bs", default_value = "4k", value_parser = super::parse_size)]
    pub guest_bs: u64,
    #[arg(long = "guest-iodepth", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub guest_iodepth: u32,
    /// Total guest IOPS (0: unthrottled).
    #[arg(long = "guest-rate-iops", default_value_t = 0)]
    pub guest_rate_iops: u64,
    /// Seconds the guest runs (baseline and job run each).
    #[arg(long = "guest-runtime", default_value_t = 20, value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub guest_runtime: u64,
}

impl GuestArgs {
    /// The guest these flags ask for on a disk of `disk_bytes`: `None` without `--guest-rw`.
    pub fn spec(&self, disk_bytes: u64) -> Result<Option<GuestSpec>, String> {
        let Some(rw) = &self.guest_rw else { return Ok(None) };
        let block_size_bytes = self.guest_bs;
        if !block_size_bytes.is_multiple_of(512) || block_size_bytes > disk_bytes {
            return Err(format!("--guest-bs {block_size_bytes}: a multiple of 512 no larger than --size"));
        }
        Ok(Some(GuestSpec {
            rw: GuestRw::parse(rw)?,
            block_size_bytes,
            iodepth: self.guest_iodepth,
            rate_iops: self.guest_rate_iops,
            runtime: Duration::from_secs(self.guest_runtime),
        }))
    }
}

/// The record of one guest run: a latency histogram per slot from `started`.
pub struct GuestRecord {
    pub started: Instant,
    pub slots: Vec<Histogram<u64>>,
    pub error: Option<String>,
}

/// Figures for one window of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GuestFigures {
    pub iops: f64,
    pub clat_p50_us: f64,
    pub clat_p99_us: f64,
}

impl GuestFigures {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"iops": self.iops, "clat_p50_us": self.clat_p50_us, "clat_p99_us": self.clat_p99_us})
    }
}

/// `{baseline, phase1, phase2}` as the reports print them.
pub fn phases_json(phases: &(GuestFigures, GuestFigures, GuestFigures)) -> serde_json::Value {
    let (baseline, phase1, phase2) = phases;
    serde_json::json!({"baseline": baseline.to_json(), "phase1": phase1.to_json(), "phase2": phase2.to_json()})
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3).expect("static bounds")
}

impl GuestRecord {
    /// Completions whose slot lies inside `[from, to)` (whole slots).
    pub fn window(&self, from: Instant, to: Instant) -> GuestFigures {
        let first = from.saturating_duration_since(self.started).as_nanos() / SLOT.as_nanos();
        let last = to.saturating_duration_since(self.started).as_nanos().div_ceil(SLOT.as_nanos());
        let (first, last) = (first as usize, (last as usize).min(self.slots.len()));
        let mut merged = histogram();
        for slot in self.slots.iter().take(last).skip(first) {
            merged.add(slot).expect("same bounds");
        }
        let seconds = ((last.saturating_sub(first)) as f64 * SLOT.as_secs_f64()).max(1e-9);
        GuestFigures {
            iops: merged.len() as f64 / seconds,
            clat_p50_us: merged.value_at_quantile(0.5) as f64 / 1000.0,
            clat_p99_us: merged.value_at_quantile(0.99) as f64 / 1000.0,
        }
    }

    /// (IOPS, p99 in us) per slot, for plots.
    pub fn series(&self) -> Vec<(f64, f64)> {
        let per_s = 1.0 / SLOT.as_secs_f64();
        self.slots.iter().map(|h| (h.len() as f64 * per_s, h.value_at_quantile(0.99) as f64 / 1000.0)).collect()
    }
}

/// A guest running on a runtime's cores.
pub struct Guest {
    started: Instant,
    stop: Arc<AtomicBool>,
    lanes: Vec<JoinHandle<Lane>>,
}

struct Lane {
    slots: Vec<Histogram<u64>>,
    error: Option<String>,
}

impl Guest {
    pub fn start(runtime: &Runtime, disk: &Disk, spec: GuestSpec, seed: u64) -> Guest {
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let lanes = (0..spec.iodepth)
            .map(|index| {
                let (disk, stop) = (disk.clone(), stop.clone());
                let lane_seed = seed ^ u64::from(index + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                runtime.spawn_on(index as usize, move || lane(disk, spec, index, started, stop, lane_seed))
            })
            .collect();
        Guest { started, stop, lanes }
    }

    /// Stop early (a lane otherwise stops at the spec's runtime).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Wait for every lane; their slots merged.
    pub fn join(self) -> GuestRecord {
        let mut slots: Vec<Histogram<u64>> = Vec::new();
        let mut error = None;
        for handle in self.lanes {
            let lane = match handle.join() {
                Ok(lane) => lane,
                Err(e) => Lane { slots: Vec::new(), error: Some(e.to_string()) },
            };
            error = error.or(lane.error);
            for (index, slot) in lane.slots.into_iter().enumerate() {
                match slots.get_mut(index) {
                    Some(merged) => merged.add(&slot).expect("same bounds"),
                    None => slots.push(slot),
                }
            }
        }
        GuestRecord { started: self.started, slots, error }
    }
}

async fn lane(disk: Disk, spec: GuestSpec, index: u32, started: Instant, stop: Arc<AtomicBool>, seed: u64) -> Lane {
    let runtime = spec.runtime.min(RUNTIME_MAX);
    let mut slots: Vec<Histogram<u64>> = Vec::new();
    let mut state = seed;
    let block_count = disk.size_bytes() / spec.block_size_bytes;
    let mut buf = match AlignedBuf::zeroed(spec.block_size_bytes as usize, 4096) {
        Ok(buf) => buf,
        Err(e) => return Lane { slots, error: Some(e.to_string()) },
    };
    crate::target::fill_random(buf.as_mut_slice(), seed);
    // Each lane issues its share of the rate on a fixed schedule (fio's rate_iops spreads the
    // same way), staggered so lanes do not fire together.
    let interval =
        (spec.rate_iops > 0).then(|| Duration::from_secs_f64(f64::from(spec.iodepth) / spec.rate_iops as f64));
    let mut next_issue =
        started + interval.map_or(Duration::ZERO, |i| i.mul_f64(f64::from(index) / f64::from(spec.iodepth)));
    loop {
        if let Some(interval) = interval {
            sleep_until(next_issue).await;
            next_issue += interval;
        }
        let issued = Instant::now();
        if stop.load(Ordering::Relaxed) || issued.duration_since(started) >= runtime {
            return Lane { slots, error: None };
        }
        let offset = tandem::rng::below(&mut state, block_count) * spec.block_size_bytes;
        let write = match spec.rw {
            GuestRw::RandWrite => true,
            GuestRw::RandRead => false,
            GuestRw::RandRw => tandem::rng::next(&mut state) & 1 == 0,
        };
        let (result, back) = match write {
            true => disk.write(offset, buf, WriteFlags::default(), IoPriority::GUEST).await,
            false => disk.read(offset, buf, IoPriority::GUEST).await,
        };
        buf = back;
        let done = Instant::now();
        if let Err(e) = result {
            return Lane { slots, error: Some(e.to_string()) };
        }
        let slot = (done.duration_since(started).as_nanos() / SLOT.as_nanos()) as usize;
        while slots.len() <= slot {
            slots.push(histogram());
        }
        let latency_ns = (done.duration_since(issued).as_nanos() as u64).clamp(1, LATENCY_NS_MAX);
        slots[slot].record(latency_ns).expect("clamped into bounds");
    }
}
