//! A connection's writer task: it takes queued requests in order and puts them on the wire.
//! Headers of requests without payload go out together, many per send; a write goes as one
//! send of its header (the op's inline prefix) then the caller's buffer, so the data is
//! never copied. One task per socket keeps sends from interleaving on the stream.

use super::connection::Connection;
use super::table::Phase;
use crate::nbd::proto::{self, CMD_WRITE};
use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use tandem::buf::AlignedBuf;
use tandem::reactor::stream::send_all;
use tandem::reactor::{SendPrefix, SharedFd, SEND_PREFIX_BYTES_MAX};

/// Headers sent in one batch at most: 128 requests of 32 bytes.
const BATCH_BYTES: usize = 4096;

/// What to send next.
enum Work {
    /// `batch` holds this many bytes of headers.
    Headers(usize),
    /// One write: header and payload.
    Write { cookie: u64, header: SendPrefix, payload: AlignedBuf },
}

pub(crate) async fn run(connection: Arc<Connection>, epoch: u64, fd: SharedFd) {
    let runtime = connection.params.runtime.clone();
    let Ok(mut batch) = AlignedBuf::zeroed(BATCH_BYTES, 64) else {
        connection.kill(epoch);
        return;
    };
    let mut header = Vec::with_capacity(proto::EXTENDED_REQUEST_BYTES);
    loop {
        let Some(work) = next(&connection, epoch, &mut batch, &mut header).await else { return };
        let sent = match work {
            Work::Headers(bytes) => {
                batch.set_len(bytes);
                let (sent, back) = send_all(&runtime, &fd, SendPrefix::EMPTY, batch).await;
                batch = back;
                sent
            }
            Work::Write { cookie, header, payload } => {
                let (sent, payload) = send_all(&runtime, &fd, header, payload).await;
                let mut state = connection.state.lock();
                if let Some(slot) = state.table.get(cookie) {
                    assert!(slot.lent && slot.buf.is_none(), "a write's payload was lent to the writer");
                    (slot.buf, slot.lent) = (Some(payload), false);
                    state.table.settle(cookie);
                }
                sent
            }
        };
        if sent.is_err() {
            connection.kill(epoch);
            return;
        }
    }
}

/// Wait for queued requests; `None` once this epoch is over.
async fn next(connection: &Connection, epoch: u64, batch: &mut AlignedBuf, header: &mut Vec<u8>) -> Option<Work> {
    let style = connection.params.style;
    poll_fn(|cx| {
        let mut guard = connection.state.lock();
        if guard.epoch != epoch {
            return Poll::Ready(None);
        }
        let state = &mut *guard;
        batch.set_len(BATCH_BYTES);
        let mut filled = 0;
        while let Some(&cookie) = state.queue.front() {
            let Some(slot) = state.table.get(cookie).filter(|s| s.phase == Phase::Queued && s.outcome.is_none()) else {
                state.queue.pop_front(); // ended before it was sent (dropped, expired)
                continue;
            };
            let is_write = slot.request.kind == CMD_WRITE;
            if (is_write && filled > 0) || filled + style.request_bytes() > BATCH_BYTES {
                break; // send what is batched first
            }
            state.queue.pop_front();
            slot.phase = Phase::Sent;
            slot.sent_at = Some(tandem::reactor::now());
            header.clear();
            proto::encode_request(&slot.request, style, header);
            if is_write {
                let payload = slot.buf.take().expect("a write carries its payload");
                assert_eq!(payload.len() as u64, slot.request.length, "a write's length is its payload's");
                slot.lent = true;
                return Poll::Ready(Some(Work::Write { cookie, header: SendPrefix::new(header), payload }));
            }
            batch.as_mut_slice()[filled..filled + header.len()].copy_from_slice(header);
            filled += header.len();
        }
        if filled > 0 {
            return Poll::Ready(Some(Work::Headers(filled)));
        }
        state.writer_waker = Some(cx.waker().clone());
        Poll::Pending
    })
    .await
}

const _: () = assert!(proto::EXTENDED_REQUEST_BYTES <= SEND_PREFIX_BYTES_MAX);
