//! block_status for an rbd image: `rbd_diff_iterate2` is synchronous and may talk to the
//! cluster (it also flushes the image first), so it runs on one metadata thread per image,
//! never on a core. Queries wait in a bounded queue; when it is full the answer is "data",
//! which is always true (only not sparse). A query the thread has not answered by its
//! deadline fails with ETIMEDOUT, as an I/O request does.

use super::request::{Expiring, WatchHandle, EXPIRED};
use super::Image;
use parking_lot::Mutex;
use std::ffi::c_void;
use std::future::Future;
use std::sync::mpsc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};
use tandem::block::{BlockStatus, Extent};
use tandem::{Error, Result};

/// The most one query walks: an answer need not cover the whole request, and a shorter walk
/// keeps the metadata thread's turns short.
const QUERY_MAX_BYTES: u64 = 1 << 30;
/// Queries waiting for the metadata thread at most.
const QUEUE_MAX: usize = 64;

/// The image's metadata thread. It ends when the driver goes.
pub(crate) struct StatusThread {
    queries: Mutex<mpsc::SyncSender<Arc<Query>>>,
    deadline: Duration,
}

/// One query, shared by the asking task, the thread and the watchdog.
struct Query {
    offset: u64,
    length_bytes: u64,
    deadline: Instant,
    state: Mutex<QueryState>,
}

#[derive(Default)]
struct QueryState {
    answer: Option<Result<Extent>>,
    waker: Option<Waker>,
}

impl Expiring for Query {
    fn watch(&self, now: Instant) -> bool {
        let waker = {
            let mut state = self.state.lock();
            if state.answer.is_some() {
                return false;
            }
            if now < self.deadline {
                return true;
            }
            let error = Error::Io { op: "block_status", offset: self.offset, errno: EXPIRED };
            state.answer = Some(Err(error));
            state.waker.take()
        };
        waker.into_iter().for_each(Waker::wake);
        false
    }
}

impl Query {
    /// The thread's answer; a late one (after an expiry) is dropped.
    fn answer(&self, extent: Result<Extent>) {
        let waker = {
            let mut state = self.state.lock();
            if state.answer.is_some() {
                return;
            }
            state.answer = Some(extent);
            state.waker.take()
        };
        waker.into_iter().for_each(Waker::wake);
    }
}

impl StatusThread {
    pub(crate) fn start(image: Arc<Image>, size_bytes: u64, deadline: Duration) -> StatusThread {
        let (sender, receiver) = mpsc::sync_channel::<Arc<Query>>(QUEUE_MAX);
        let spawned = std::thread::Builder::new().name("tandem-rbd-status".into()).spawn(move || {
            for query in receiver {
                let length_bytes = query.length_bytes.min(size_bytes.saturating_sub(query.offset));
                query.answer(diff_extent(&image, query.offset, length_bytes));
            }
        });
        // Without the thread the queue fills and every query answers "data".
        if let Err(error) = spawned {
            eprintln!("tandem: no rbd metadata thread ({error}); block status reports data everywhere");
        }
        StatusThread { queries: Mutex::new(sender), deadline }
    }

    pub(crate) fn query(
        &self,
        watch: &WatchHandle,
        offset: u64,
        length_bytes: u64,
    ) -> impl Future<Output = Result<Extent>> + Send + 'static {
        let length_bytes = length_bytes.min(QUERY_MAX_BYTES);
        let deadline = Instant::now() + self.deadline;
        let query = Arc::new(Query { offset, length_bytes, deadline, state: Mutex::new(QueryState::default()) });
        let sent = self.queries.lock().try_send(query.clone());
        if sent.is_ok() {
            let weak: std::sync::Weak<dyn Expiring> = Arc::downgrade(&query) as _;
            watch.watch(weak);
        }
        async move {
            if sent.is_err() {
                return Ok(Extent { status: BlockStatus::Data, offset, length_bytes });
            }
            std::future::poll_fn(|cx| {
                let mut state = query.state.lock();
                match state.answer.take() {
                    Some(extent) => Poll::Ready(extent),
                    None => {
                        state.waker = Some(cx.waker().clone());
                        Poll::Pending
                    }
                }
            })
            .await
        }
    }
}

/// What `rbd_diff_iterate2` found from the walk's start: the first allocated run.
struct Walk {
    start: u64,
    run: Option<(u64, u64)>,
}

/// Stops the walk once the answer is known (diff_iterate returns it; it is not an error).
const WALK_DONE: libc::c_int = -libc::ECANCELED;

extern "C" fn diff_callback(offset: u64, length: libc::size_t, exists: libc::c_int, arg: *mut c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Walk` diff_extent lent for the duration of the call.
    let walk = unsafe { &mut *(arg as *mut Walk) };
    if exists == 0 {
        return 0;
    }
    let end = offset + length as u64;
    match walk.run {
        None if offset > walk.start => {
            walk.run = Some((offset, end));
            WALK_DONE
        }
        None => {
            walk.run = Some((offset, end));
            0
        }
        Some((run_start, run_end)) if offset <= run_end => {
            walk.run = Some((run_start, run_end.max(end)));
            0
        }
        Some(_) => WALK_DONE,
    }
}

/// The extent at `offset`: data up to the end of the first allocated run, or a hole up to its
/// start.
fn diff_extent(image: &Image, offset: u64, length_bytes: u64) -> Result<Extent> {
    let lib = image.cluster.lib;
    let mut walk = Walk { start: offset, run: None };
    // SAFETY: an open image; the callback gets `walk` only during this call.
    let walked = unsafe {
        (lib.rbd_diff_iterate2)(
            image.handle,
            std::ptr::null(),
            offset,
            length_bytes,
            1,
            0,
            diff_callback,
            (&mut walk as *mut Walk).cast(),
        )
    };
    if walked < 0 && walked != WALK_DONE {
        return Err(Error::Io { op: "block_status", offset, errno: -walked });
    }
    let end = offset + length_bytes;
    Ok(match walk.run {
        None => Extent { status: BlockStatus::Hole, offset, length_bytes },
        Some((run_start, _)) if run_start > offset => {
            Extent { status: BlockStatus::Hole, offset, length_bytes: run_start.min(end) - offset }
        }
        Some((_, run_end)) => Extent { status: BlockStatus::Data, offset, length_bytes: run_end.min(end) - offset },
    })
}
