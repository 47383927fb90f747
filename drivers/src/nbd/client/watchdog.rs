//! The driver's watchdog thread: it fails requests past their deadline (and drops the socket
//! under one that timed out on the wire, which unblocks its reader), and requests that waited
//! longer than `reconnect_delay` for a dead connection to come back.
//!
//! Why a thread and not a timer per request: a reactor timer cannot be cancelled, so every
//! finished request would leave an entry in its core's timer heap for the whole timeout; the
//! watchdog costs each request nothing but the deadline stored in its slot.

use super::connection::Connection;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

pub(crate) struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Watch `connections` every `period` (a deadline fires up to that late).
    pub fn start(connections: Vec<Weak<Connection>>, period: Duration) -> std::io::Result<Watchdog> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new().name("tandem-nbd-watch".into()).spawn(move || {
            while !stopped.load(Ordering::Acquire) {
                std::thread::park_timeout(period);
                let now = Instant::now();
                for connection in connections.iter().filter_map(Weak::upgrade) {
                    connection.expire(now);
                }
            }
        })?;
        Ok(Watchdog { stop, thread: Some(thread) })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}
