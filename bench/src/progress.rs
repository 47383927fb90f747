//! Progress while jobs run: an indicatif bar on a terminal, plain lines every few seconds
//! otherwise (CI logs), never both. Reads the runner's live counters from a side thread.

use crate::runner::Live;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(250);
const PLAIN_LINE_INTERVAL: Duration = Duration::from_secs(5);

/// A running progress display; `finish` (or drop) stops it.
pub struct Progress {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    /// Show `label` progress over `expected` (if known) from `live`.
    pub fn start(label: String, expected: Option<Duration>, live: Arc<Live>) -> Progress {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let terminal = std::io::stderr().is_terminal();
        let thread = std::thread::Builder::new()
            .name("tandem-progress".into())
            .spawn(move || display(label, expected, live, flag, terminal))
            .ok();
        Progress { done, thread }
    }

    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop();
    }
}

fn display(label: String, expected: Option<Duration>, live: Arc<Live>, done: Arc<AtomicBool>, terminal: bool) {
    let started = Instant::now();
    let bar = terminal.then(|| {
        let total_ms = expected.map_or(0, |d| d.as_millis() as u64);
        let bar = ProgressBar::new(total_ms.max(1));
        let template = "{prefix} [{bar:30}] {percent:>3}% {msg} eta {eta}";
        bar.set_style(ProgressStyle::with_template(template).expect("static template").progress_chars("=> "));
        bar.set_prefix(label.clone());
        bar
    });
    let mut last = Snapshot::take(&live, started);
    let mut last_line = started;
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(TICK);
        let now = Snapshot::take(&live, started);
        let rates = now.rates_since(&last);
        match &bar {
            Some(bar) => {
                bar.set_position(now.elapsed.as_millis() as u64);
                bar.set_message(rates);
            }
            None if last_line.elapsed() >= PLAIN_LINE_INTERVAL => {
                eprintln!("{label}: {:>5.1}s {rates}", now.elapsed.as_secs_f64());
                last_line = Instant::now();
            }
            None => {}
        }
        last = now;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

struct Snapshot {
    elapsed: Duration,
    read_bytes: u64,
    write_bytes: u64,
    read_ios: u64,
    write_ios: u64,
}

impl Snapshot {
    fn take(live: &Live, started: Instant) -> Snapshot {
        Snapshot {
            elapsed: started.elapsed(),
            read_bytes: live.read_bytes.load(Ordering::Relaxed),
            write_bytes: live.write_bytes.load(Ordering::Relaxed),
            read_ios: live.read_ios.load(Ordering::Relaxed),
            write_ios: live.write_ios.load(Ordering::Relaxed),
        }
    }

    /// fio's style: `[r=512MiB/s,w=0KiB/s][r=131k,w=0 IOPS]`.
    fn rates_since(&self, before: &Snapshot) -> String {
        let seconds = (self.elapsed - before.elapsed).as_secs_f64().max(1e-3);
        let mib = |bytes: u64| bytes as f64 / seconds / (1 << 20) as f64;
        let iops = |ios: u64| ios as f64 / seconds;
        format!(
            "[r={:.0}MiB/s,w={:.0}MiB/s][r={:.1}k,w={:.1}k IOPS]",
            mib(self.read_bytes - before.read_bytes),
            mib(self.write_bytes - before.write_bytes),
            iops(self.read_ios - before.read_ios) / 1000.0,
            iops(self.write_ios - before.write_ios) / 1000.0
        )
    }
}
