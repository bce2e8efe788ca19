//! Serving one watch: the task that reads the pieces' shards, merges
//! their answers ([`super::plan`]) and writes the NDJSON lines
//! ([`super::lines`]) to the watch's [`Outbox`].
//!
//! - Each piece has one request in flight at a time: a long poll (up to a
//!   second) at the shard's leader, or at the replica here when this node
//!   leads it or knows no leader; a failed one is tried again, at another
//!   replica, after a short pause.
//! - A piece that lags while others have changes waiting (or while the
//!   watch's position is more than a second old) asks its shard for a
//!   `Close`: an idle shard's resolved timestamp moves only so.
//! - A progress line goes out at least every second.
//! - The watch reads no faster than its reader takes lines: its outbox
//!   waits when full, and cuts off a reader that takes nothing for 5 s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cleave_metadata::ShardId;
use futures::stream::FuturesUnordered;
use futures::StreamExt;

use super::cursor::Position;
use super::lines::{error_line, event_line, progress_line};
pub use super::outbox::Outbox;
use super::plan::{Applied, Merge};
use super::serve::{self, ChangesReply, ChangesRequest};
use crate::clock;
use crate::command::ShardCommand;
use crate::node::Node;
use crate::rpc::{self, ExecError};

/// How long one read of a shard waits for something new.
pub const POLL_MS: u64 = 1_000;
/// At least this often a progress line.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// A piece this far behind the clock, while it holds the others up, asks
/// its shard for a `Close`.
const LAG_FOR_CLOSE: Duration = Duration::from_millis(100);
/// How many shards back a watch's opening follows a piece's lineage.
const LINEAGE_CHECKS: usize = 8;
/// Bytes of changes held back per piece (read while another piece lags)
/// before it stops reading ahead.
const HELD_BYTES: usize = 16 << 20;
/// Failed reads in a row of a lineage stage before the watch ends with
/// `compacted` (about 6 s with the growing pause between reads).
const LINEAGE_GIVE_UP: usize = 25;

/// What a watch is asked for.
#[derive(Clone, Debug)]
pub struct WatchSpec {
    pub start: String,
    pub end: Option<String>,
    /// Start right after it; `None`: from now.
    pub cursor: Option<Position>,
    /// Include each change's previous value.
    pub prev: bool,
    /// The user keys watched, when `[start, end)` was widened to whole
    /// hash-spread keyspaces (`keyspace::watch_span`): a change's key is
    /// mapped back to the user's and kept only if it lies here.
    pub keys: Option<(String, Option<String>)>,
}

/// Why a watch could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the history after this cursor was trimmed (kept: --watch-retention, --watch-retention-mb)")]
    Compacted,
    #[error("{0}")]
    Unavailable(String),
}

/// A running watch task: counted, and its outbox ended however it stops
/// (a panic included), so the response never hangs open without lines.
struct Running(Arc<Outbox>);

impl Running {
    fn new(out: Arc<Outbox>) -> Running {
        metrics::gauge!("cleave_watchers").increment(1.0);
        Running(out)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.end();
        metrics::gauge!("cleave_watchers").decrement(1.0);
    }
}

/// The directory's ranges as a plan needs them.
fn ranges(node: &Node) -> Vec<(String, Option<String>, ShardId)> {
    node.directory().ranges.values().map(|r| (r.start.clone(), r.end.clone(), r.shard_id)).collect()
}

/// Reads `shard`'s changes: at the replica here if this node leads the
/// shard (or knows no leader), else at the leader; `attempt` > 0 (a retry)
/// goes round the other replicas.
pub async fn fetch(
    node: &Node,
    shard: ShardId,
    req: ChangesRequest,
    attempt: usize,
) -> Result<ChangesReply, ExecError> {
    let dir = node.directory();
    let leader = node.dir_cache().leader_hint(shard);
    let mut candidates: Vec<u64> = leader.into_iter().collect();
    // (`group_replicas`: a merge's source, no longer a shard of the
    // directory, is still read for the watches behind the merge.)
    for r in dir.group_replicas(shard).unwrap_or_default() {
        if Some(r.node_id) != leader && !candidates.contains(&r.node_id) {
            candidates.push(r.node_id);
        }
    }
    let here = node.group(shard);
    let target = match candidates.get(attempt % candidates.len().max(1)) {
        Some(n) if *n != node.id() => Some(*n),
        _ => None,
    };
    // A retry goes elsewhere even from a replica here that thinks it
    // leads: it may be a stale leader, cut off from the others.
    let local_first = here.is_some() && (target.is_none() || (attempt == 0 && leader.is_none_or(|l| l == node.id())));
    match (local_first, here, target) {
        (true, Some(g), _) | (false, Some(g), None) => serve::changes_since(&node.ctx().db, &g, &req).await,
        // On the bulk lane: answers of megabytes must not queue Raft
        // messages behind them (its timeout is well past a long poll's).
        (_, _, Some(n)) => node.router().bulk_call(n, rpc::WatchChanges { shard, req }).await,
        (_, None, None) => Err(ExecError::Unavailable(format!("no replica of shard {shard} is known"))),
    }
}

/// A replica answering without moving a read on for this long (a stale
/// leader cut off from the others, a follower far behind) is left for
/// another: an idle watched shard is closed at least every second or so.
const STALE: Duration = Duration::from_secs(5);

/// Whether the answers to a read still move it on.
pub struct Staleness(Instant);

impl Default for Staleness {
    fn default() -> Staleness {
        Staleness(Instant::now())
    }
}

impl Staleness {
    /// The attempt number of the next read (which picks its replica, see
    /// [`fetch`]), after an answer at `attempt` that `moved` the read on or
    /// not: back to the first choice once it moves, the next replica once
    /// it has stood still for [`STALE`].
    pub fn next_attempt(&mut self, moved: bool, attempt: usize) -> usize {
        if moved {
            self.0 = Instant::now();
            0
        } else if self.0.elapsed() >= STALE {
            self.0 = Instant::now();
            attempt + 1
        } else {
            attempt
        }
    }
}

/// Starts a watch: plans it, reads every piece once (a trimmed cursor is
/// refused here, before any line), and leaves a task writing its lines to
/// the returned outbox.
pub async fn open(node: Arc<Node>, spec: WatchSpec) -> Result<Arc<Outbox>, OpenError> {
    let deadline = Instant::now() + node.settings().write_timeout;
    let known = ranges(&node);
    // From now: the watcher's clock. A shard behind it is asked to close
    // (see `ask_for_closes`); the first progress line waits for every one.
    let (pos, established) = match &spec.cursor {
        Some(c) => (c.clone(), true),
        None => (Position::after_all(node.ctx().clock.now()), false),
    };
    let mut merge = Merge::new(spec.start.clone(), spec.end.clone(), pos, established, &known);
    // A node that has just started may not know the directory yet.
    while !merge.covers() {
        if Instant::now() >= deadline {
            return Err(OpenError::Unavailable("this node does not know the cluster's ranges yet".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        merge.replan(&ranges(&node));
    }
    // A cursor whose history is gone is refused before the stream starts:
    // each piece reads its first change, following its lineage (a piece
    // born of a split after the cursor reads the shard it was split from
    // first, and so on back). The answers are the watch's own first reads.
    // (Should the directory move meanwhile, the stream plans again and a
    // trimmed history found later ends it with an error line.)
    if established {
        'pieces: for i in 0..merge.pieces.len() {
            for _ in 0..LINEAGE_CHECKS {
                let (shard, mut req) = merge.request(i, 0);
                (req.limit, req.prev) = (1, spec.prev);
                let stages = merge.pieces[i].stages.len();
                match merge.apply(i, first_answer(&node, shard, req, deadline).await?) {
                    Applied::Compacted => return Err(OpenError::Compacted),
                    Applied::Ok if merge.pieces[i].stages.len() > stages => continue,
                    Applied::Ok => continue 'pieces,
                    Applied::Replan => {
                        merge.replan(&ranges(&node));
                        break 'pieces;
                    }
                }
            }
        }
    }
    let outbox = Outbox::new(node.settings().watch.queue_bytes, super::outbox::SLOW_AFTER);
    let out = outbox.clone();
    tokio::spawn(async move {
        let _ended = Running::new(out.clone());
        run(&node, merge, &out, spec.prev, spec.keys).await;
    });
    Ok(outbox)
}

/// One answer, tried at the replicas in turn until the deadline.
async fn first_answer(
    node: &Node,
    shard: ShardId,
    req: ChangesRequest,
    deadline: Instant,
) -> Result<ChangesReply, OpenError> {
    let mut attempt = 0;
    loop {
        match fetch(node, shard, req.clone(), attempt).await {
            Ok(r) => return Ok(r),
            Err(e) if Instant::now() >= deadline => return Err(OpenError::Unavailable(format!("shard {shard}: {e}"))),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20 * attempt.min(10) as u64)).await;
            }
        }
    }
}

type Answer = (u64, usize, Result<ChangesReply, ExecError>);

/// The pieces' reads: which has one in flight, how many failed in a row,
/// and the plan they belong to (answers to an older plan are dropped).
struct Reads {
    plan: u64,
    busy: Vec<bool>,
    failures: Vec<usize>,
    stale: Vec<Staleness>,
    /// Failed reads in a row of a merged-away shard's lineage stage, over
    /// plans (each plan finds the stage again).
    lineage_failures: usize,
}

impl Reads {
    fn new(pieces: usize) -> Reads {
        let stale = (0..pieces).map(|_| Staleness::default()).collect();
        Reads { plan: 0, busy: vec![false; pieces], failures: vec![0; pieces], stale, lineage_failures: 0 }
    }

    /// Plans `merge` again from the directory here; reads start afresh.
    fn replan(&mut self, merge: &mut Merge, node: &Node) {
        merge.replan(&ranges(node));
        let n = merge.pieces.len();
        *self = Reads { plan: self.plan + 1, lineage_failures: self.lineage_failures, ..Reads::new(n) };
    }
}

/// The watch's loop, until the client leaves or the watch cannot go on.
async fn run(node: &Arc<Node>, mut merge: Merge, out: &Outbox, prev: bool, keys: Option<(String, Option<String>)>) {
    // A watch from a cursor is established at once: its first line says so.
    let mut announced = merge.established;
    // The position the last progress line promised.
    let mut promised = merge.pos.clone();
    if announced && !out.push(progress_line(&promised)).await {
        return;
    }
    // The user keys watched, and the keyspaces known when the watch was
    // planned: one declared over them later puts their changes under keys
    // this watch does not read (their buckets), so it ends, and is resumed
    // from its cursor over the keyspace (the Rust client does so itself).
    let watched = keys.clone().unwrap_or_else(|| (merge.start.clone(), merge.end.clone()));
    let mut known_spaces = node.directory().keyspaces.0.len();
    let mut reads = Reads::new(merge.pieces.len());
    let mut inflight: FuturesUnordered<futures::future::BoxFuture<'static, Answer>> = FuturesUnordered::new();
    let mut last_progress = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut replans = 0u32;
    loop {
        for i in 0..merge.pieces.len() {
            if reads.busy[i] || merge.pieces[i].buffered >= HELD_BYTES {
                continue;
            }
            reads.busy[i] = true;
            let (shard, mut req) = merge.request(i, POLL_MS);
            req.prev = prev;
            let (node, attempt, plan) = (node.clone(), reads.failures[i], reads.plan);
            let pause = Duration::from_millis(match attempt {
                0 => 0,
                n => 20 * n.min(25) as u64,
            });
            inflight.push(Box::pin(async move {
                tokio::time::sleep(pause).await;
                (plan, i, super::feed::read(&node, shard, req, attempt).await)
            }));
        }
        tokio::select! {
            Some((p, i, answer)) = inflight.next() => {
                if p != reads.plan {
                    continue;
                }
                reads.busy[i] = false;
                match answer {
                    Err(e) => {
                        reads.failures[i] += 1;
                        tracing::debug!(shard = merge.pieces[i].stages[0].shard, "watch read: {e}");
                        // A lineage stage of a shard merged away (no longer
                        // a shard of the directory) that does not answer
                        // for long: deleted after its grace, its history
                        // with it.
                        let stage = &merge.pieces[i].stages[0];
                        if stage.until.is_some() && !node.directory().shards.contains_key(&stage.shard) {
                            reads.lineage_failures += 1;
                            if reads.lineage_failures >= LINEAGE_GIVE_UP {
                                let why = "the history before the watch's position went with a merged shard";
                                out.push(error_line("compacted", why)).await;
                                return;
                            }
                        }
                        if reads.failures[i].is_multiple_of(10) {
                            // Maybe the directory moved on without telling us.
                            reads.replan(&mut merge, node);
                        }
                    }
                    Ok(reply) => {
                        if merge.pieces[i].stages[0].until.is_some() {
                            reads.lineage_failures = 0;
                        }
                        node.ctx().clock.observe(reply.through.ts);
                        let before = (merge.pieces[i].through.clone(), merge.pieces[i].stages.len());
                        match merge.apply(i, reply) {
                            Applied::Ok => {
                                let p = &merge.pieces[i];
                                let moved = p.through > before.0 || p.stages.len() != before.1;
                                reads.failures[i] = reads.stale[i].next_attempt(moved, reads.failures[i]);
                            }
                            Applied::Compacted => {
                                out.push(error_line("compacted", "the history after the watch's position was trimmed")).await;
                                return;
                            }
                            Applied::Replan => {
                                replans += 1;
                                // The directory may not show the change yet:
                                // look again in a moment.
                                let wait = Duration::from_millis(u64::from(replans.min(20)) * 10);
                                tokio::time::sleep(wait).await;
                                reads.replan(&mut merge, node);
                            }
                        }
                    }
                }
            }
            _ = tick.tick() => {
                if out.is_dropped() {
                    return;
                }
                if !merge.covers() {
                    reads.replan(&mut merge, node);
                }
                ask_for_closes(node, &merge);
            }
        }
        let before = merge.pos.clone();
        let ready = merge.ready();
        if !ready.is_empty() {
            replans = 0;
        }
        // Established just now: say so before the first change.
        if merge.established && !announced {
            promised = before;
            if !out.push(progress_line(&promised)).await {
                return;
            }
            (announced, last_progress) = (true, Instant::now());
        }
        let spaces = node.directory().keyspaces.clone();
        if spaces.0.len() != known_spaces {
            known_spaces = spaces.0.len();
            let (from, to, _) = crate::keyspace::watch_span(&spaces, &watched.0, watched.1.as_deref());
            if (from, to) != (merge.start.clone(), merge.end.clone()) {
                let why = "a hash-spread keyspace was declared over the watched keys: resume from the last cursor";
                out.push(error_line("keyspace", why)).await;
                return;
            }
        }
        for c in &ready {
            // A plain key under a keyspace is a stray its declaration moves
            // into a bucket (written, then deleted here): not a user's change.
            if spaces.of(&c.key).is_some() && spaces.to_user(&c.key) == c.key {
                continue;
            }
            let user = spaces.to_user(&c.key);
            let wanted = keys.as_ref().is_none_or(|(s, e)| crate::kv::within(&user, s, e.as_deref()));
            if wanted && !out.push(event_line(c, prev, &user)).await {
                return;
            }
        }
        // The first progress line says the watch is established; then one
        // at least every second, between timestamps only (a read cut at its
        // limit can leave the position inside a transaction's writes, and a
        // progress line is a point a consumer may take as consistent).
        // Inside one, the last progress line is said again: still true,
        // and a second never passes without a line.
        if merge.established && last_progress.elapsed() >= PROGRESS_EVERY {
            if merge.pos.at.is_none() {
                promised = merge.pos.clone();
            }
            if !out.push(progress_line(&promised)).await {
                return;
            }
            (announced, last_progress) = (true, Instant::now());
        }
    }
}

/// When each shard was last asked for a `Close` by a watch on this node:
/// shared by all of them, so a thousand watchers of one idle shard ask as
/// often as one.
static CLOSING: std::sync::LazyLock<Mutex<HashMap<ShardId, Instant>>> = std::sync::LazyLock::new(Default::default);

/// Asks the shards of pieces that hold the watch back for a `Close`.
fn ask_for_closes(node: &Arc<Node>, merge: &Merge) {
    let now_ts = node.ctx().clock.now();
    let behind = |ts: clock::Ts| clock::wall_ms(now_ts).saturating_sub(clock::wall_ms(ts));
    let lag = LAG_FOR_CLOSE.as_millis() as u64;
    let waiting = !merge.established || merge.held() > 0 || behind(merge.pos.ts) >= PROGRESS_EVERY.as_millis() as u64;
    if !waiting {
        return;
    }
    for p in &merge.pieces {
        let stage = &p.stages[0];
        if stage.until.is_some() || behind(p.through.ts) < lag {
            continue;
        }
        let shard = stage.shard;
        {
            let mut closing = CLOSING.lock().expect("closing lock");
            if closing.get(&shard).is_some_and(|t| t.elapsed() < LAG_FOR_CLOSE * 2) {
                continue;
            }
            closing.insert(shard, Instant::now());
        }
        // Stamped with this node's clock, which is past every watch's
        // starting point here and every position its pieces reported (it
        // observes them): a shard whose leader's clock is behind still
        // closes past what any watch here waits for.
        let at = node.ctx().clock.now();
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::split::steps::shard_step_at(&node, shard, ShardCommand::Close, at, 0).await {
                tracing::debug!(shard, "closing for a watch: {e}");
            }
        });
    }
}
