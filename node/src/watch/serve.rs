//! A replica answering "the changes after this position": the one read a
//! watch makes of a shard, locally or through the `WatchChanges` call.
//!
//! Any replica can answer, leader or not: it answers from its applied
//! state, and says up to where the answer is complete (`through`) — its
//! resolved timestamp, below which nothing can appear any more. A
//! follower's answer is as true as the leader's, only older. The answer
//! also carries the shard's view (owned ranges, frozen captures, lineage,
//! trim point) at that same applied state, read under the state lock with
//! a RocksDB snapshot, from which the watcher decides what the answer
//! means for each piece of its key range (see [`super::plan`]).
//!
//! A request waits (up to `wait_ms`) when there is nothing new: it
//! returns as soon as the resolved timestamp moves past `after`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::changes::{self, Change, Window};
use super::cursor::Position;
use crate::clock::Ts;
use crate::kv::{span_within as within, spans_overlap as overlaps, Born};
use crate::raft::{GroupRaft, SmState};
use crate::rpc::ExecError;
use crate::storage::Db;

/// What a watch asks of one shard.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ChangesRequest {
    /// Changes strictly after this position; `None`: from the replica's
    /// resolved timestamp (a watch that starts now).
    pub after: Option<Position>,
    /// Up to this timestamp only (a range's changes before a split moved
    /// it on, read from the shard it was split from).
    pub until: Option<Ts>,
    pub start: String,
    pub end: Option<String>,
    pub limit: usize,
    /// How long to wait for something new.
    pub wait_ms: u64,
    /// Include each change's previous value.
    pub prev: bool,
    /// Complete past the freezes of ranges being split (a feed's read of
    /// the whole shard: its watches hold each piece at its freeze).
    #[serde(default)]
    pub past_freezes: bool,
}

/// An answer holds changes of at most about this many bytes (one change
/// more than that at most): replies travel between nodes, and a watcher
/// holds them until it can emit them.
pub const REPLY_BYTES: usize = 4 << 20;

/// A shard's state as a watcher needs it, at the answer's applied state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ShardView {
    pub resolved: Ts,
    /// The ranges the shard owns.
    pub ranges: Vec<(String, Option<String>)>,
    /// Frozen captures: `(start, end, freeze timestamp)`. No change to
    /// the range is made here after its freeze; what follows it is the
    /// split target's.
    pub frozen: Vec<(String, Option<String>, Ts)>,
    /// Ranges handed to another shard (a split, committed).
    pub moved: Vec<(String, Option<String>)>,
    pub born: Option<Born>,
    pub trimmed_through: Ts,
    /// Ranges merged in: `(start, end, the source's freeze, the source)`;
    /// their changes at or below the freeze are in the source
    /// (`kv::Absorbed`).
    pub absorbed: Vec<(String, Option<String>, Ts, cleave_metadata::ShardId)>,
}

impl ShardView {
    /// The earliest freeze of a range being split that `[start, end)`
    /// overlaps: changes of those keys past it are the split target's.
    pub fn freeze_over(&self, start: &str, end: Option<&str>) -> Option<Ts> {
        self.frozen.iter().filter(|(s, e, _)| overlaps(start, end, s, e.as_deref())).map(|f| f.2).min()
    }
}

/// The answer: the changes found, up to where they are complete, and the view.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ChangesReply {
    pub changes: Vec<Arc<Change>>,
    /// Every change of the keys asked for after `after` and up to here is
    /// in `changes`.
    pub through: Position,
    /// The position the answer starts after (the request's, or the
    /// resolved timestamp it started at).
    pub after: Position,
    /// Changes after `after` were trimmed: the request cannot be answered.
    pub compacted: bool,
    pub view: ShardView,
}

/// Answers `req` from the replica `g` once (no waiting).
pub fn read_once(db: &Db, g: &GroupRaft, req: &ChangesRequest) -> Result<ChangesReply, ExecError> {
    let state = g.state.read().map_err(|_| ExecError::Internal("state lock poisoned".into()))?;
    if g.is_installing() {
        return Err(ExecError::Unavailable("the replica is installing a snapshot".into()));
    }
    let SmState::Shard(s) = &*state else {
        return Err(ExecError::Internal("not a shard".into()));
    };
    let snap = db.snapshot();
    let resolved = s.resolved();
    let view = ShardView {
        resolved,
        ranges: s.ranges.iter().map(|r| (r.start.clone(), r.end.clone())).collect(),
        frozen: s
            .captures
            .iter()
            .filter(|c| c.frozen_at.is_some())
            .map(|c| (c.start.clone(), c.end.clone(), c.frozen_ts))
            .collect(),
        moved: s.moved.iter().map(|r| (r.start.clone(), r.end.clone())).collect(),
        born: s.born.as_deref().cloned(),
        trimmed_through: s.change_log.trimmed_through,
        absorbed: s.absorbed.iter().map(|a| (a.start.clone(), a.end.clone(), a.since, a.from)).collect(),
    };
    drop(state);
    // Checked after the snapshot: a replica is stopped before its data is
    // deleted, so one not stopped yet had all of it in the snapshot. A
    // stopped one may have answered from an emptied change log: as if
    // complete, with nothing in it.
    if g.is_stopped() || g.is_failed() {
        return Err(ExecError::Unavailable("the replica is stopped".into()));
    }
    let after = req.after.clone().unwrap_or(Position::after_all(resolved));
    let (start, end) = (req.start.as_str(), req.end.as_deref());
    let compacted = Position::after_all(view.trimmed_through) > after;
    // A range this replica has given up (moved, or frozen: it applied the
    // freeze, so every change it had there is applied) holds all its
    // changes already: a bounded read of it is complete to its bound.
    let settled = view.moved.iter().any(|(s, e)| within(start, end, s, e.as_deref()))
        || view.frozen.iter().any(|(s, e, _)| within(start, end, s, e.as_deref()));
    // A range frozen here changes no more after its freeze, and what
    // follows it is the split target's: a watch of it is complete to the
    // freeze only (and waits there, rather than read past it in a loop).
    let frozen_at = view.freeze_over(start, end);
    let through_ts = match req.until {
        Some(u) if settled => u,
        Some(u) => u.min(resolved),
        None if req.past_freezes => resolved,
        None => frozen_at.map_or(resolved, |f| f.min(resolved)),
    };
    if compacted {
        return Ok(ChangesReply { changes: Vec::new(), through: after.clone(), after, compacted, view });
    }
    let w = Window { after: &after, through: through_ts, start, end, limit: req.limit.max(1), bytes: REPLY_BYTES };
    let (mut found, full) =
        changes::read(db, Some(&snap), g.group, &w).map_err(|e| ExecError::Internal(e.to_string()))?;
    if !req.prev {
        // Not sent (a reply may cross the network); the Arcs are new here.
        found.iter_mut().for_each(|c| Arc::make_mut(c).prev = None);
    }
    // Below `after` when the replica has not reached it yet: a watch from
    // now starts at the watcher's clock, which may be ahead of the shard's.
    let through = match (full, found.last()) {
        (true, Some(last)) => Position::after(last),
        _ => Position::after_all(through_ts),
    };
    Ok(ChangesReply { changes: found, through, after, compacted, view })
}

/// Answers `req` from the replica `g`, waiting up to `req.wait_ms` for
/// something past its position when there is nothing yet.
pub async fn changes_since(db: &Db, g: &GroupRaft, req: &ChangesRequest) -> Result<ChangesReply, ExecError> {
    let deadline = Instant::now() + Duration::from_millis(req.wait_ms.min(30_000));
    let mut resolved = g.resolved.subscribe();
    let mut req = req.clone();
    loop {
        resolved.mark_unchanged();
        let reply = read_once(db, g, &req)?;
        let moved_on = !reply.changes.is_empty() || reply.through > reply.after || reply.compacted;
        let left = deadline.saturating_duration_since(Instant::now());
        if moved_on || left.is_zero() {
            return Ok(reply);
        }
        // Later reads start where this one did.
        req.after = Some(reply.after);
        let _ = tokio::time::timeout(left, resolved.changed()).await;
    }
}
