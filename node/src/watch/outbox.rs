//! The queue between a watch's task and its HTTP response.
//!
//! The task pushes lines as the watch makes them; the response body takes
//! them as fast as the client reads, many small lines at a time in one
//! chunk. The queue is bounded in bytes (`--watch-queue-mb`): a watcher
//! that does not read is cut off with an `error` line (`slow`) rather than
//! held in memory without bound, and resumes from its last cursor. When
//! the client hangs up, the body is dropped and the task sees it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::lines::error_line;

/// Lines go to the response in chunks of at most this many bytes (or one
/// line, when longer): one write for many small lines.
const CHUNK: usize = 64 << 10;

/// The lines of one watch, waiting for the HTTP response to send them.
pub struct Outbox {
    inner: Mutex<Queue>,
    ready: tokio::sync::Notify,
    limit: usize,
}

#[derive(Default)]
struct Queue {
    lines: VecDeque<bytes::Bytes>,
    bytes: usize,
    /// No more lines: the watch ended (or was cut off).
    ended: bool,
    /// The response is gone: the client hung up.
    dropped: bool,
}

impl Outbox {
    pub fn new(limit: usize) -> Arc<Outbox> {
        Arc::new(Outbox { inner: Mutex::new(Queue::default()), ready: tokio::sync::Notify::new(), limit })
    }

    /// Queues `line` (ending in a newline); `false` once the watch is over
    /// (the reader hung up, or held too much and was cut off).
    pub fn push(&self, line: bytes::Bytes) -> bool {
        let mut q = self.inner.lock().expect("outbox lock");
        if q.ended || q.dropped {
            return false;
        }
        q.bytes += line.len();
        q.lines.push_back(line);
        // One line larger than the limit alone does not cut a reader off.
        if q.bytes > self.limit && q.lines.len() > 1 {
            let cut = error_line("slow", "the watcher read too slowly; resume from its last cursor");
            q.lines.push_back(cut);
            q.ended = true;
            metrics::counter!("cleave_watch_slow_cutoffs_total").increment(1);
        }
        drop(q);
        self.ready.notify_one();
        true
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

    #[test]
    fn queued_lines_leave_in_chunks_of_at_most_chunk_bytes_in_order() {
        let out = Outbox::new(1 << 20);
        for i in 0..100 {
            assert!(out.push(line(1_000 + i)));
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

    #[test]
    fn a_reader_holding_more_than_the_limit_is_cut_off_after_an_error_line() {
        let out = Outbox::new(10_000);
        assert!(out.push(line(20_000)), "one long line alone is let through");
        assert!(out.push(line(10)), "the second passes the limit: queued, then the cut");
        assert!(!out.push(line(10)), "nothing after the cut");
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
