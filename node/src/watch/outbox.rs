//! The queue between a watch's task and its HTTP response.
//!
//! The task pushes lines as the watch makes them; the response body takes
//! them as fast as the client reads, many small lines at a time in one
//! chunk. The queue is bounded in bytes (`--watch-queue-mb`): a push that
//! finds it full waits for the reader to drain it (and the watch reads no
//! further meanwhile), so a burst or a resume from an old cursor is paced
//! by the reader. A reader that takes nothing for the outbox's patience
//! ([`SLOW_AFTER`]) while it is full is cut off with an `error` line
//! (`slow`) rather than held without bound, and resumes from its last
//! cursor. When the client hangs up, the body is dropped and the task
//! sees it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::lines::error_line;

/// Lines go to the response in chunks of at most this many bytes (or one
/// line, when longer): one write for many small lines.
const CHUNK: usize = 64 << 10;
/// A full queue the reader takes nothing from for this long is cut off.
pub const SLOW_AFTER: Duration = Duration::from_secs(5);

/// The lines of one watch, waiting for the HTTP response to send them.
pub struct Outbox {
    inner: Mutex<Queue>,
    /// Lines were queued (or the watch ended): for the response.
    ready: tokio::sync::Notify,
    /// Lines were taken: for a push waiting for room.
    drained: tokio::sync::Notify,
    limit: usize,
    patience: Duration,
}

struct Queue {
    lines: VecDeque<bytes::Bytes>,
    bytes: usize,
    /// When the reader last took lines (or the watch began).
    taken: Instant,
    /// No more lines: the watch ended (or was cut off).
    ended: bool,
    /// The response is gone: the client hung up.
    dropped: bool,
}

impl Outbox {
    /// An outbox of `limit` bytes whose reader is cut off after `patience`
    /// without taking anything from it while it is full.
    pub fn new(limit: usize, patience: Duration) -> Arc<Outbox> {
        let q = Queue { lines: VecDeque::new(), bytes: 0, taken: Instant::now(), ended: false, dropped: false };
        let (ready, drained) = (tokio::sync::Notify::new(), tokio::sync::Notify::new());
        Arc::new(Outbox { inner: Mutex::new(q), ready, drained, limit, patience })
    }

    /// Queues `line` (ending in a newline), waiting for room while the
    /// queue is full; `false` once the watch is over (the reader hung up,
    /// or took nothing for the patience and was cut off). One line larger
    /// than the limit goes into an empty queue.
    pub async fn push(&self, line: bytes::Bytes) -> bool {
        let full_since = Instant::now();
        loop {
            let drained = self.drained.notified();
            let waited = {
                let mut q = self.inner.lock().expect("outbox lock");
                if q.ended || q.dropped {
                    return false;
                }
                if q.lines.is_empty() || q.bytes + line.len() <= self.limit {
                    q.bytes += line.len();
                    q.lines.push_back(line);
                    drop(q);
                    self.ready.notify_one();
                    return true;
                }
                // Full all along since, with nothing taken.
                let waited = full_since.elapsed().min(q.taken.elapsed());
                if waited >= self.patience {
                    let cut = error_line("slow", "the watcher read too slowly; resume from its last cursor");
                    q.lines.push_back(cut);
                    q.ended = true;
                    drop(q);
                    metrics::counter!("cleave_watch_slow_cutoffs_total").increment(1);
                    self.ready.notify_one();
                    return false;
                }
                waited
            };
            let _ = tokio::time::timeout(self.patience - waited, drained).await;
        }
    }

    /// Ends the watch after what is queued.
    pub fn end(&self) {
        self.inner.lock().expect("outbox lock").ended = true;
        self.ready.notify_one();
    }

    pub fn is_dropped(&self) -> bool {
        let q = self.inner.lock().expect("outbox lock");
        q.dropped || q.ended
    }

    /// The lines queued, as one chunk of about [`CHUNK`] bytes at most
    /// (`Some(None)`: no more will come; `None`: none yet).
    fn pop(&self) -> Option<Option<bytes::Bytes>> {
        let mut q = self.inner.lock().expect("outbox lock");
        let first = match q.lines.pop_front() {
            Some(line) => line,
            None if q.ended => return Some(None),
            None => return None,
        };
        let mut taken = first.len();
        let chunk = if q.lines.front().is_none_or(|l| taken + l.len() > CHUNK) {
            first
        } else {
            let mut chunk = bytes::BytesMut::with_capacity(CHUNK.min(q.bytes));
            chunk.extend_from_slice(&first);
            while let Some(l) = q.lines.front().filter(|l| taken + l.len() <= CHUNK) {
                taken += l.len();
                chunk.extend_from_slice(l);
                q.lines.pop_front();
            }
            chunk.freeze()
        };
        q.bytes -= taken.min(q.bytes);
        q.taken = Instant::now();
        drop(q);
        self.drained.notify_one();
        Some(Some(chunk))
    }

    /// The response's body: the queued lines as they come.
    pub fn body(self: Arc<Self>) -> impl futures::Stream<Item = Result<bytes::Bytes, std::convert::Infallible>> {
        let guard = DropGuard(self);
        futures::stream::unfold(guard, |guard| async move {
            let line = loop {
                let outbox = guard.0.clone();
                let notified = outbox.ready.notified();
                match outbox.pop() {
                    Some(next) => break next,
                    None => notified.await,
                }
            };
            line.map(|l| (Ok(l), guard))
        })
    }
}

/// Marks the outbox dropped when the response body is (the client left).
struct DropGuard(Arc<Outbox>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.inner.lock().expect("outbox lock").dropped = true;
        self.0.drained.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: usize) -> bytes::Bytes {
        let mut l = vec![b'x'; n - 1];
        l.push(b'\n');
        l.into()
    }

    #[tokio::test]
    async fn queued_lines_leave_in_chunks_of_at_most_chunk_bytes_in_order() {
        let out = Outbox::new(1 << 20, SLOW_AFTER);
        for i in 0..100 {
            assert!(out.push(line(1_000 + i)).await);
        }
        let mut chunks = Vec::new();
        while let Some(Some(c)) = out.pop() {
            chunks.push(c);
        }
        assert!(chunks.len() > 1 && chunks.iter().all(|c| c.len() <= CHUNK));
        let all: Vec<u8> = chunks.concat();
        let want: Vec<u8> = (0..100).flat_map(|i| line(1_000 + i).to_vec()).collect();
        assert_eq!(all, want, "every line once, whole and in order");
        assert_eq!(out.inner.lock().unwrap().bytes, 0);
        assert_eq!(out.pop(), None, "nothing yet, not ended");
        out.end();
        assert_eq!(out.pop(), Some(None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_waits_for_its_reader_and_cuts_off_one_that_takes_nothing() {
        let out = Outbox::new(10_000, Duration::from_millis(200));
        assert!(out.push(line(20_000)).await, "one long line alone goes into an empty queue");
        // Full: the next push waits until the reader takes something.
        let pusher = {
            let out = out.clone();
            tokio::spawn(async move { out.push(line(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!pusher.is_finished(), "waiting for room");
        assert_eq!(out.pop().unwrap().unwrap().len(), 20_000);
        assert!(pusher.await.unwrap(), "queued once the reader took the long line");
        // A reader that takes nothing while the queue is full is cut off.
        assert!(out.push(line(9_000)).await);
        assert!(!out.push(line(5_000)).await, "nothing taken for the patience: cut off");
        assert!(!out.push(line(10)).await, "nothing after the cut");
        let mut all = Vec::new();
        while let Some(Some(c)) = out.pop() {
            all.extend_from_slice(&c);
        }
        let text = String::from_utf8(all).unwrap();
        let last = text.trim_end().rsplit('\n').next().unwrap();
        assert!(last.contains("\"slow\""), "{last}");
        assert_eq!(out.pop(), Some(None), "ended");
    }
}
