//! One feed per watched shard per node, shared by every watch there.
//!
//! Without it, each watch reads each of its shards for itself: a thousand
//! watchers of one range are a thousand long polls, and every applied
//! batch wakes them all to read the change log a thousand times. A feed
//! reads the shard once ([`super::stream::fetch`]: all keys, from where it
//! got to), keeps the changes of the last while in a window in memory, and
//! answers the watches' reads from it — the same [`ChangesReply`] a shard
//! gives, so the merge of a watch does not know the difference.
//!
//! A read the window cannot answer (its position is older than the
//! window's start: a resume from an old cursor, a watch that fell behind)
//! goes to the shard as before, until it has caught up. A feed nobody has
//! read for [`IDLE`] stops.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cleave_metadata::ShardId;

use super::changes::Change;
use super::cursor::Position;
use super::serve::{ChangesReply, ChangesRequest, ShardView};
use crate::node::Node;
use crate::rpc::ExecError;

/// A feed unread this long stops.
const IDLE: Duration = Duration::from_secs(30);
/// The window keeps at most this many changes, and this many bytes — less
/// when many shards are watched here: all windows together keep at most
/// [`FEEDS_BYTES`].
const WINDOW_CHANGES: usize = 100_000;
const WINDOW_BYTES: usize = 64 << 20;
const FEEDS_BYTES: usize = 256 << 20;

/// The bytes one window may keep now. (Called under a window's lock: the
/// feeds' lock is taken inside a window's, never the other way round.)
fn window_bytes() -> usize {
    let feeds = FEEDS.lock().expect("feeds lock").len().max(1);
    WINDOW_BYTES.min(FEEDS_BYTES / feeds)
}

/// The feeds of this node.
static FEEDS: std::sync::LazyLock<Mutex<HashMap<ShardId, Arc<Feed>>>> = std::sync::LazyLock::new(Default::default);

/// A shard's feed on this node.
pub struct Feed {
    state: Mutex<Window>,
    /// Sent after every read that moved the window on.
    moved: tokio::sync::watch::Sender<u64>,
}

struct Window {
    /// Every change after `start` and up to `through` is in `changes`.
    start: Position,
    through: Position,
    changes: VecDeque<Arc<Change>>,
    bytes: usize,
    view: ShardView,
    /// Set once the first read answered.
    ready: bool,
    last_read: Instant,
}

impl Feed {
    /// Answers `req` from the window, waiting up to its `wait_ms` for
    /// something past its position; `None` when the window cannot (the
    /// position is before its start, or the feed has nothing yet).
    pub async fn changes_since(&self, req: &ChangesRequest) -> Option<ChangesReply> {
        let after = req.after.clone()?;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(req.wait_ms);
        let mut moved = self.moved.subscribe();
        loop {
            moved.mark_unchanged();
            {
                let mut w = self.state.lock().expect("feed lock");
                w.last_read = Instant::now();
                if !w.ready || after < w.start {
                    return None;
                }
                if w.through_for(req) > after || tokio::time::Instant::now() >= deadline {
                    return Some(w.answer(after, req));
                }
            }
            if tokio::time::timeout_at(deadline, moved.changed()).await.is_err() {
                let w = self.state.lock().expect("feed lock");
                return (w.ready && after >= w.start).then(|| w.answer(after, req));
            }
        }
    }
}

impl Window {
    /// Empty, until the feed's first read.
    fn new() -> Window {
        Window {
            start: Position::after_all(0),
            through: Position::after_all(0),
            changes: VecDeque::new(),
            bytes: 0,
            view: ShardView::default(),
            ready: false,
            last_read: Instant::now(),
        }
    }

    /// Up to where the window is complete for `req`'s keys: not past the
    /// freeze of a range being split that they overlap (what follows it is
    /// the split target's), which the shard's read of the whole window
    /// does not stop at.
    fn through_for(&self, req: &ChangesRequest) -> Position {
        match self.view.freeze_over(&req.start, req.end.as_deref()) {
            Some(f) => self.through.clone().min(Position::after_all(f)),
            None => self.through.clone(),
        }
    }

    fn answer(&self, after: Position, req: &ChangesRequest) -> ChangesReply {
        // The window is in (ts, origin, key) order: find the first change after
        // the position by bisection, then keep the piece's keys.
        let from = self.changes.partition_point(|c| !after.precedes(c));
        let (mut changes, mut bytes) = (Vec::new(), 0);
        let mut through = self.through_for(req);
        for c in self.changes.range(from..) {
            if through.precedes(c) {
                break;
            }
            if !crate::kv::within(&c.key, &req.start, req.end.as_deref()) {
                continue;
            }
            // Shared, previous value and all: a watch that did not ask
            // for it leaves it out of its lines.
            bytes += c.size();
            changes.push(c.clone());
            if changes.len() >= req.limit.max(1) || bytes >= super::serve::REPLY_BYTES {
                through = Position::after(c);
                break;
            }
        }
        ChangesReply { changes, through, after, compacted: false, view: self.view.clone() }
    }

    fn take(&mut self, reply: ChangesReply) {
        if !self.ready {
            (self.start, self.through, self.ready) = (reply.after.clone(), reply.after.clone(), true);
            self.view = reply.view.clone();
        }
        // A replica behind the one read before (a retry elsewhere) says
        // nothing new: the window only moves forward.
        if reply.through <= self.through {
            return;
        }
        for c in reply.changes.into_iter().filter(|c| self.through.precedes(c)) {
            self.bytes += c.size();
            self.changes.push_back(c);
        }
        self.through = reply.through;
        self.view = reply.view;
        let bound = window_bytes();
        while self.changes.len() > WINDOW_CHANGES || self.bytes > bound {
            let Some(c) = self.changes.pop_front() else { break };
            self.bytes -= c.size().min(self.bytes);
            self.start = Position::after(&c);
        }
    }
}

/// The feed of `shard` on this node, started if there is none.
pub fn of(node: &Arc<Node>, shard: ShardId) -> Arc<Feed> {
    let mut feeds = FEEDS.lock().expect("feeds lock");
    if let Some(f) = feeds.get(&shard) {
        return f.clone();
    }
    let feed = Arc::new(Feed { state: Mutex::new(Window::new()), moved: tokio::sync::watch::Sender::new(0) });
    feeds.insert(shard, feed.clone());
    tokio::spawn(run(node.clone(), shard, feed.clone()));
    feed
}

/// Reads the shard for the feed until nobody has read it for a while.
async fn run(node: Arc<Node>, shard: ShardId, feed: Arc<Feed>) {
    let (mut attempt, mut stale) = (0usize, super::stream::Staleness::default());
    loop {
        let (after, idle) = {
            let w = feed.state.lock().expect("feed lock");
            (w.ready.then(|| w.through.clone()), w.last_read.elapsed() >= IDLE)
        };
        if idle {
            break;
        }
        let req = ChangesRequest {
            after,
            until: None,
            start: String::new(),
            end: None,
            limit: super::plan::LIMIT,
            wait_ms: super::stream::POLL_MS,
            // Kept for the watches that ask for previous values.
            prev: true,
            past_freezes: true,
        };
        match super::stream::fetch(&node, shard, req, attempt).await {
            Ok(reply) if reply.compacted => {
                // Fell behind the shard's trim: start again from now (the
                // watches reading older positions go to the shard).
                let mut w = feed.state.lock().expect("feed lock");
                (w.ready, w.changes, w.bytes) = (false, VecDeque::new(), 0);
            }
            Ok(reply) => {
                let moved = reply.through > reply.after || !reply.changes.is_empty();
                attempt = stale.next_attempt(moved, attempt);
                feed.state.lock().expect("feed lock").take(reply);
                if moved {
                    feed.moved.send_modify(|n| *n += 1);
                }
            }
            Err(e) => {
                attempt += 1;
                tracing::debug!(shard, "watch feed: {e}");
                tokio::time::sleep(Duration::from_millis(20 * attempt.min(25) as u64)).await;
            }
        }
    }
    let mut feeds = FEEDS.lock().expect("feeds lock");
    if feeds.get(&shard).is_some_and(|f| Arc::ptr_eq(f, &feed)) {
        feeds.remove(&shard);
    }
}

/// A piece's read: from the shard's feed here when it can answer, else
/// from the shard.
pub async fn read(
    node: &Arc<Node>,
    shard: ShardId,
    req: ChangesRequest,
    attempt: usize,
) -> Result<ChangesReply, ExecError> {
    if req.until.is_none() && attempt == 0 {
        if let Some(reply) = of(node, shard).changes_since(&req).await {
            return Ok(reply);
        }
    }
    super::stream::fetch(node, shard, req, attempt).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(ts: u64, key: &str) -> Arc<Change> {
        let value = Some(b"1".to_vec());
        Arc::new(Change { ts, origin: 1, key: key.into(), version: ts, value, prev: None, lines: Default::default() })
    }

    fn reply(after: Position, changes: Vec<Arc<Change>>, through: u64) -> ChangesReply {
        let view = ShardView { resolved: through, ..ShardView::default() };
        ChangesReply { changes, through: Position::after_all(through), after, compacted: false, view }
    }

    fn req(after: Position, start: &str, end: Option<&str>, limit: usize) -> ChangesRequest {
        let (start, end) = (start.into(), end.map(Into::into));
        ChangesRequest {
            after: Some(after),
            until: None,
            start,
            end,
            limit,
            wait_ms: 0,
            prev: false,
            past_freezes: false,
        }
    }

    #[test]
    fn the_window_answers_a_piece_from_any_position_inside_it_and_never_moves_back() {
        let mut w = Window::new();
        w.take(reply(Position::after_all(10), vec![], 10));
        w.take(reply(Position::after_all(10), vec![change(11, "a"), change(12, "m"), change(12, "x")], 20));
        // A retry at a replica behind: nothing changes.
        w.take(reply(Position::after_all(20), vec![], 15));
        assert_eq!(w.through, Position::after_all(20));
        let a = w.answer(Position::after_all(10), &req(Position::after_all(10), "b", Some("y"), 10));
        let keys: Vec<_> = a.changes.iter().map(|c| (c.ts, c.key.as_str())).collect();
        assert_eq!((keys, a.through), (vec![(12, "m"), (12, "x")], Position::after_all(20)));
        let after_m = Position::after(&change(12, "m"));
        let a = w.answer(after_m.clone(), &req(after_m, "", None, 10));
        assert_eq!(a.changes.len(), 1, "only (12, x) is after (12, m)");
        let a = w.answer(Position::after_all(0), &req(Position::after_all(0), "", None, 2));
        assert_eq!(a.through, Position::after(&change(12, "m")), "cut at the limit: complete to there");
    }

    /// The shard's read of the whole window goes past a freeze; each
    /// watch's answer stops there only if its keys overlap the frozen range.
    #[test]
    fn a_frozen_range_holds_back_only_the_watches_that_overlap_it() {
        let mut w = Window::new();
        w.take(reply(Position::after_all(10), vec![], 10));
        let mut r = reply(Position::after_all(10), vec![change(12, "b"), change(20, "c"), change(21, "x")], 30);
        r.view.frozen = vec![("m".into(), None, 15)];
        w.take(r);
        let left = w.answer(Position::after_all(10), &req(Position::after_all(10), "a", Some("m"), 10));
        assert_eq!((left.changes.len(), left.through), (2, Position::after_all(30)), "elsewhere: complete to 30");
        let all = w.answer(Position::after_all(10), &req(Position::after_all(10), "", None, 10));
        let keys: Vec<_> = all.changes.iter().map(|c| c.key.as_str()).collect();
        assert_eq!((keys, all.through), (vec!["b"], Position::after_all(15)), "over the frozen range: to its freeze");
    }

    #[test]
    fn the_window_drops_its_oldest_changes_past_its_bounds_and_starts_later() {
        let mut w = Window::new();
        w.take(reply(Position::after_all(0), vec![], 0));
        let many: Vec<Arc<Change>> = (1..=(WINDOW_CHANGES as u64 + 5)).map(|ts| change(ts, "k")).collect();
        w.take(reply(Position::after_all(0), many, WINDOW_CHANGES as u64 + 5));
        assert_eq!(w.changes.len(), WINDOW_CHANGES);
        assert_eq!(w.start, Position::after(&change(5, "k")), "the window now starts after the 5th");
    }
}
