//! The metadata leader's side of a live split: observe the two shards,
//! ask the planner ([`super::split_plan`]) what to do, do it. Each action is
//! idempotent, so a step cut short (a failed call, a new metadata leader)
//! is simply done again.
//!
//! Also the admin entry point that starts a split (`Node::start_split`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cleave_metadata::{MetaCommand, MetaResponse, OpId, OpKind, Operation, Phase, RangeState};

use super::faults::hold_ms;
use super::split_plan::{self, Observed, Step};
use super::supervisor::{abort, advance, meta, now_ms, Pace};
use crate::command::{ShardCommand, StepError};
use crate::kv::{Incoming, ShardState};
use crate::node::Node;
use crate::raft::SmState;
use crate::rpc::{self, ExecError, TargetStatus};
use crate::split::forwarder;
use crate::split::steps;

/// Does the work of a split's current phase. `Ok(true)`: it moved on;
/// `Ok(false)`: nothing to do yet.
/// Also drives a merge (`super::merge`): a split run backwards, from the
/// right range's shard (source) into the left one's (target).
pub(super) async fn step(node: &Arc<Node>, op: &Operation, pace: &mut Pace) -> Result<bool, ExecError> {
    let (source, target, merge) = match &op.kind {
        OpKind::Split { source, target, .. } => (source, target, false),
        OpKind::Merge { right, left, .. } => (right, left, true),
        OpKind::Move { .. } => return Err(ExecError::Internal("not a split".into())),
    };
    pace.enter(op.phase);
    let mut obs = Observed {
        now_ms: now_ms(),
        hold_ms: hold_ms(op.kind.name(), op.phase),
        since_report: pace.last_report.elapsed(),
        stalled_for: pace.moved_at.elapsed(),
        stall_limit: node.settings().split_stall,
        attempts: pace.attempts,
        catching_up_for: std::time::Duration::ZERO,
        source: None,
        target: None,
    };
    // Observations are made as the planner asks for them: the target's
    // state from any replica first (no read barrier, which keeps the frozen
    // window short), from its leader if that one was behind.
    let mut target_looks = 0;
    // The target's live keys and bytes as last observed (exact once it has
    // applied the whole forward log of a frozen source).
    let mut figures = None;
    // While frozen, no observation may outlast the freeze deadline: one
    // that hangs (a node gone quiet mid-call) ends with the deadline, so
    // the planner can abandon the split then, not a call timeout later.
    let budget = split_plan::frozen_budget(op, obs.now_ms);
    loop {
        match split_plan::next(op, &obs) {
            Step::Wait => return Ok(false),
            Step::Abort(reason) => return abort(node, op, &reason, false).await,
            Step::ObserveSource => {
                let st = within(budget, forwarder::status(node, *source, op.op_id, 0)).await?;
                pace.attempt(st.attempt);
                pace.saw((st.backfill_done, st.bytes_copied, st.shipped));
                if st.backfill_done {
                    obs.catching_up_for = pace.catching_up_since.get_or_insert_with(Instant::now).elapsed();
                }
                obs.attempts = pace.attempts;
                obs.source = Some(st);
            }
            Step::ObserveTarget if target_looks == 2 => return Ok(false),
            Step::ObserveTarget => {
                let status = if target_looks == 0 {
                    within(budget, steps::incoming_status_any(node, *target)).await?
                } else {
                    within(budget, steps::incoming_status(node, *target, 0)).await?
                };
                target_looks += 1;
                let Some(i) = status.incoming else {
                    return Err(ExecError::Internal("target is not receiving".into()));
                };
                figures = Some((status.keys, status.bytes));
                obs.target = Some(i);
            }
            Step::CreateTarget if merge => return super::merge::begin_absorb(node, op).await,
            Step::CreateTarget => return create_target(node, op).await,
            Step::BeginCapture => return begin_capture(node, op).await,
            Step::Capture { report, freeze } => {
                if let Some(progress) = report {
                    pace.last_report = Instant::now();
                    meta(node, MetaCommand::ReportProgress { op_id: op.op_id, progress }).await?;
                }
                if !freeze {
                    return Ok(false);
                }
                // The freeze and its record are independent (both
                // idempotent): run them together to keep the pause short.
                let (frozen, recorded) =
                    tokio::join!(freeze_source(node, *source, op.op_id), advance(node, op, Phase::Frozen));
                frozen?;
                recorded?;
                return Ok(true);
            }
            Step::ResendFreeze => {
                pace.last_report = Instant::now();
                within(budget, freeze_source(node, *source, op.op_id)).await?;
                return Ok(false);
            }
            Step::Commit => {
                // With the commit, a `Close` on the source: its answer moves
                // this node's clock past every change the source made to the
                // range, so the target's activation, stamped from it, comes
                // after them all (`watch`: the target's changes follow).
                let frozen_ts = obs.source.as_ref().map_or(0, |s| s.frozen_ts);
                if merge && frozen_ts == 0 {
                    // (The planner commits only once the source reported
                    // its freeze, which carries it.)
                    return Err(ExecError::Unavailable("the source's freeze timestamp is not known yet".into()));
                }
                let commit = match merge {
                    true => super::merge::commit(op, frozen_ts),
                    false => MetaCommand::CommitSplit { op_id: op.op_id, now_ms: now_ms() },
                };
                // (A merge's cutover needs no close: see `merge::cutover`.)
                let close = async {
                    match merge {
                        true => Ok(0),
                        false => steps::shard_step(node, *source, ShardCommand::Close, 0).await,
                    }
                };
                let (committed, closed) = tokio::join!(meta(node, commit), close);
                committed?;
                closed?;
                if !merge {
                    metrics::counter!("cleave_splits_committed_total").increment(1);
                }
                // A test's hold of `Committed` (`--fault-hold`): cut over
                // in the next step, once it has passed.
                if hold_ms(op.kind.name(), Phase::Committed) > 0 {
                    return Ok(true);
                }
                // Writes are still paused: cut over at once, with the
                // figures just observed (the planner commits only after
                // seeing a target that applied the whole forward log).
                if merge {
                    return super::merge::cutover(node, op, frozen_ts).await;
                }
                return cutover(node, op, figures).await;
            }
            Step::Cutover => {
                if let OpKind::Merge { frozen_ts, .. } = &op.kind {
                    return super::merge::cutover(node, op, *frozen_ts).await;
                }
                // Resumed: this node's clock may not have seen the source's
                // last changes yet (see `Step::Commit`).
                steps::shard_step(node, *source, ShardCommand::Close, 0).await?;
                return cutover(node, op, None).await;
            }
            Step::Cleanup if merge => return super::merge::cleanup(node, op).await,
            Step::Cleanup => return cleanup(node, op).await,
        }
    }
}

/// How many times a freeze refused for open transaction locks is tried again.
const FREEZE_TRIES: usize = 10;

/// Freezes the source's range. A refusal because transactions hold write
/// locks in it (their commits must land at the source, see
/// `StepError::Locked`) also stops new write locks there (the capture is
/// `freezing`); this finishes those that are over, as a reader meeting
/// their locks would, and tries again. Locks of transactions still running
/// are short and no new ones come, so a few tries see them gone.
async fn freeze_source(node: &Node, source: u64, op_id: u64) -> Result<u64, ExecError> {
    let mut tries = 0;
    loop {
        match steps::shard_step(node, source, ShardCommand::Freeze { op_id }, 0).await {
            Err(ExecError::Step(StepError::Locked { keys, .. })) if tries < FREEZE_TRIES => {
                tries += 1;
                for key in &keys {
                    // A lock still held (its transaction running) answers
                    // an error here: the next try sees whether it is gone.
                    if let Err(e) = node.router().read(key, true).await {
                        tracing::debug!(op_id, key, "settling a lock before the freeze: {e}");
                    }
                }
                tokio::time::sleep(Duration::from_millis(5 * tries as u64)).await;
            }
            r => return r,
        }
    }
}

/// Runs `call`, giving up after `budget` (if any). Only for observations
/// and idempotent re-sends: a call cut short is simply made again.
async fn within<T>(
    budget: Option<Duration>,
    call: impl std::future::Future<Output = Result<T, ExecError>>,
) -> Result<T, ExecError> {
    match budget {
        None => call.await,
        Some(b) => tokio::time::timeout(b, call)
            .await
            .unwrap_or_else(|_| Err(ExecError::Unavailable("the freeze deadline passed during the call".into()))),
    }
}

/// `Planned`: creates the new shard's replicas, receiving, empty.
async fn create_target(node: &Node, op: &Operation) -> Result<bool, ExecError> {
    let OpKind::Split { range_id, split_key, source, target, target_replicas, .. } = &op.kind else {
        return Err(ExecError::Internal("not a split".into()));
    };
    let dir = node.directory();
    let range = dir.range(*range_id).ok_or(ExecError::Internal(format!("range {range_id} vanished")))?;
    let incoming = Incoming {
        mirror_of: mirrored(node, op),
        source: Some(*source),
        ..Incoming::new(op.op_id, split_key.clone(), range.end.clone())
    };
    let mut state = SmState::Shard(ShardState { incoming: Some(incoming), ..Default::default() });
    let members: Vec<(u64, u64, String)> = target_replicas
        .iter()
        .map(|r| (r.replica_id, r.node_id, dir.nodes.get(&r.node_id).map(|n| n.raft_addr.clone()).unwrap_or_default()))
        .collect();
    // The replica next to the source's leader campaigns, so the new group
    // has a leader at once, close to where its data comes from.
    let source_leader = node.dir_cache().leader_hint(*source);
    let campaigner = target_replicas
        .iter()
        .find(|r| Some(r.node_id) == source_leader)
        .or(target_replicas.first())
        .map(|r| r.replica_id);
    // Create the campaigner last: its election needs the others to exist.
    let mut order: Vec<_> = target_replicas.iter().collect();
    order.sort_by_key(|r| Some(r.replica_id) == campaigner);
    // Resumed (another metadata leader, which may have been started with
    // another `--split-mirror`): the replicas made already say how the
    // range is filled, and the rest must start from the same state.
    let router = node.router();
    let asks = target_replicas.iter().map(|r| {
        let ask = rpc::Genesis { group: *target, hops: u8::MAX };
        tokio::time::timeout(Duration::from_secs(1), router.node_call(r.node_id, ask))
    });
    for made in futures::future::join_all(asks).await {
        if let Ok(Ok(s @ SmState::Shard(_))) = made {
            state = s;
            break;
        }
    }
    for r in order {
        let req = rpc::CreateGroup {
            group: *target,
            replica_id: r.replica_id,
            members: members.clone(),
            state: Box::new(state.clone()),
            campaign: Some(r.replica_id) == campaigner,
            dir_version: dir.version,
        };
        node.router().node_call(r.node_id, req).await?;
    }
    metrics::counter!("cleave_splits_started_total").increment(1);
    advance(node, op, Phase::Created).await?;
    Ok(true)
}

/// `Created`: the source begins capturing writes to the moving range.
/// For a merge: the right range, the left shard (which absorbs it).
async fn begin_capture(node: &Node, op: &Operation) -> Result<bool, ExecError> {
    let (source, target, (start, end)) = match &op.kind {
        OpKind::Split { range_id, split_key, source, target, .. } => {
            let dir = node.directory();
            let range = dir.range(*range_id).ok_or(ExecError::Internal(format!("range {range_id} vanished")))?;
            (source, target, (split_key.clone(), range.end.clone()))
        }
        OpKind::Merge { right, left, .. } => (right, left, super::merge::moving_range(node, op)?),
        OpKind::Move { .. } => return Err(ExecError::Internal("not a split".into())),
    };
    let (op_id, target) = (op.op_id, *target);
    // As the target's replicas were created: filled beside the source or not.
    let status = steps::incoming_status(node, target, 0).await?;
    let cmd = match status.incoming.filter(|i| i.op_id == op_id).map(|i| i.mirror_of) {
        Some(Some(_)) => ShardCommand::MirrorCapture { op_id, start, end, target },
        Some(None) => ShardCommand::BeginCapture { op_id, start, end, target },
        None => return Err(ExecError::Unavailable(format!("the target shard {target} is not receiving"))),
    };
    steps::shard_step(node, *source, cmd, 0).await?;
    advance(node, op, Phase::Capturing).await?;
    Ok(true)
}

/// The source shard, when the split's target is filled beside it on every
/// node (`split::mirror`): mirroring is on and every target replica sits on
/// a node holding a source replica.
fn mirrored(node: &Node, op: &Operation) -> Option<cleave_metadata::ShardId> {
    let OpKind::Split { source, target_replicas, .. } = &op.kind else { return None };
    let dir = node.directory();
    let beside = dir.shards.get(source).map(|s| s.replicas.iter().map(|r| r.node_id).collect::<Vec<_>>())?;
    let all = target_replicas.iter().all(|r| beside.contains(&r.node_id));
    (node.settings().split_mirror && all).then_some(*source)
}

/// `Committed`: the source gives the range up, the target takes it.
/// `figures`: the target's live keys and bytes once it had everything
/// (looked up again when the cutover is resumed after a failure).
async fn cutover(node: &Node, op: &Operation, figures: Option<(u64, u64)>) -> Result<bool, ExecError> {
    let OpKind::Split { range_id, source, target, new_range_id, .. } = &op.kind else {
        return Err(ExecError::Internal("not a split".into()));
    };
    let dir = node.directory();
    let left = dir.range(*range_id).cloned().ok_or(ExecError::Internal("left range missing".into()))?;
    let right = dir.range(*new_range_id).cloned().ok_or(ExecError::Internal("right range missing".into()))?;
    // The target's figures as received (kept as they were at its
    // activation: a cutover resumed after `Activate` went through and
    // `SplitDone` did not must not count the writes the target took since).
    let (keys, bytes) = match figures {
        Some(f) => f,
        None => {
            let TargetStatus { keys, bytes, .. } = steps::incoming_status(node, *target, 0).await?;
            (keys, bytes)
        }
    };
    let done =
        ShardCommand::SplitDone { op_id: op.op_id, left, moved: right.clone(), moved_keys: keys, moved_bytes: bytes };
    let activate = ShardCommand::Activate { op_id: op.op_id, ranges: vec![right] };
    // Both at once, one consensus round: the frozen source refuses reads of
    // the range as well as writes (`router::owned_snapshot`), so a target
    // that serves (and takes writes) before the source's `SplitDone`
    // applies cannot leave a reader with an old route an old value there.
    // Stamped after every change the source made to the range (the caller
    // closed the source first): the target's timestamps follow them.
    let at = node.ctx().clock.now();
    let (done, active) =
        tokio::join!(steps::shard_step(node, *source, done, 0), steps::shard_step_at(node, *target, activate, at, 0));
    done?;
    active?;
    let pause = op.entered(Phase::Frozen).map(|f| now_ms().saturating_sub(f));
    if let Some(p) = pause {
        metrics::histogram!("cleave_split_write_pause_seconds").record(p as f64 / 1000.0);
    }
    meta(node, MetaCommand::FinishOp { op_id: op.op_id, write_pause_ms: pause, now_ms: now_ms() }).await?;
    node.meta_leader().refresh_directory().await;
    Ok(true)
}

/// `Aborted`: the capture ends and the new shard's replicas are deleted.
async fn cleanup(node: &Node, op: &Operation) -> Result<bool, ExecError> {
    let OpKind::Split { source, target, target_replicas, .. } = &op.kind else {
        return Err(ExecError::Internal("not a split".into()));
    };
    // EndCapture always applies; it also makes the source refuse a
    // BeginCapture of this operation that arrives late.
    steps::shard_step(node, *source, ShardCommand::EndCapture { op_id: op.op_id }, 0).await?;
    for r in target_replicas {
        steps::destroy_replica_at(node, r.node_id, *target, r.replica_id).await?;
    }
    meta(node, MetaCommand::MarkCleaned { op_id: op.op_id }).await?;
    Ok(true)
}

/// The nodes for a new shard's replicas: nodes this metadata leader heard
/// from recently (a node it has not heard from is never taken for the
/// emptiest), fewest replicas first; refused when too few are live.
pub fn place(node: &Node, count: usize) -> Result<Vec<u64>, ExecError> {
    Ok(node.directory().place_new_group(&node.meta_leader().tracker().live_nodes(), count)?)
}

/// Starts a split as metadata leader (forwarding there if needed).
pub async fn start(
    node: &Node,
    range_id: Option<u64>,
    key: Option<String>,
    reason: String,
    hops: u8,
) -> Result<OpId, ExecError> {
    if !node.meta_leader().is_leader() {
        let req = |hops| rpc::StartSplit { range_id, key: key.clone(), reason: reason.clone(), hops };
        return node.meta_leader().forward_to_leader(hops, req).await;
    }
    let dir = node.directory();
    let range = match (range_id, &key) {
        (Some(id), _) => dir.range(id).cloned().ok_or(ExecError::Meta(cleave_metadata::MetaError::UnknownRange(id)))?,
        (None, Some(k)) => dir.lookup(k).cloned().ok_or(ExecError::Unavailable("directory not loaded".into()))?,
        (None, None) => return Err(ExecError::Internal("a split needs a key or a range".into())),
    };
    if let RangeState::Busy { op_id } = range.state {
        return Err(ExecError::Meta(cleave_metadata::MetaError::RangeBusy { range_id: range.range_id, op_id }));
    }
    let split_key = match key {
        Some(k) => k,
        None => {
            let req = rpc::MedianKey {
                shard: range.shard_id,
                start: range.start.clone(),
                end: range.end.clone(),
                by_load: reason == "load",
                hops: 0,
            };
            steps::median_key(node, req).await?.ok_or(ExecError::Meta(cleave_metadata::MetaError::BadSplitKey {
                range_id: range.range_id,
                key: String::new(),
            }))?
        }
    };
    let replication = dir.shards.get(&range.shard_id).map_or(3, |s| s.replicas.len()).max(1);
    let targets = place(node, replication)?;
    match node
        .router()
        .propose_meta(
            MetaCommand::PlanSplit {
                range_id: range.range_id,
                split_key,
                target_nodes: targets,
                reason,
                now_ms: now_ms(),
            },
            0,
        )
        .await?
    {
        MetaResponse::Op(op) => Ok(op),
        other => Err(ExecError::Internal(format!("unexpected answer {other:?}"))),
    }
}
