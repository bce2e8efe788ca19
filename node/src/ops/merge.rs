//! The metadata leader's side of a range merge: the right range's shard
//! (the *source*) hands its whole range to the left range's shard (the
//! *target*), which keeps serving its own range all along
//! (`docs/plans/merge.md`).
//!
//! A merge is a split run backwards, into a group that already exists, so
//! it is driven by the split's planner and loop (`super::split`): the same
//! backfill, forward log, freeze, digest check and deadlines. What differs
//! is here:
//! - `Planned`: the target begins absorbing (`BeginAbsorb`: it receives the
//!   range beside its own, serving none of it) instead of a new group being
//!   created;
//! - the commit is `CommitMerge` (one range at a bumped epoch, the source
//!   leaves the directory);
//! - the cutover is `Subsumed` on the source (it owns nothing from then on
//!   and tells stale routes where the range went) and `Absorb` on the
//!   target (its range joined with the absorbed one), then the source's
//!   replicas are destroyed;
//! - an abort ends the capture at the source and drops what the target
//!   received (`DropAbsorbed`).
//!
//! Also the admin entry point that starts a merge.

use cleave_metadata::{MetaCommand, MetaResponse, OpId, OpKind, Operation, Phase, RangeDescriptor};

use super::supervisor::{advance, meta, now_ms};
use crate::command::ShardCommand;
use crate::node::Node;
use crate::rpc::{self, ExecError};
use crate::split::steps;

/// The ranges a merge joins, as the directory has them (before the commit).
fn ranges(node: &Node, op: &Operation) -> Result<(RangeDescriptor, RangeDescriptor), ExecError> {
    let OpKind::Merge { left_range, right_range, .. } = &op.kind else {
        return Err(ExecError::Internal("not a merge".into()));
    };
    let dir = node.directory();
    let find = |id: &u64| dir.range(*id).cloned().ok_or(ExecError::Internal(format!("range {id} vanished")));
    Ok((find(left_range)?, find(right_range)?))
}

/// `Planned`: the left shard gets ready to receive the right range.
pub(super) async fn begin_absorb(node: &Node, op: &Operation) -> Result<bool, ExecError> {
    let OpKind::Merge { left, right, .. } = &op.kind else {
        return Err(ExecError::Internal("not a merge".into()));
    };
    let (_, r) = ranges(node, op)?;
    let cmd = ShardCommand::BeginAbsorb { op_id: op.op_id, start: r.start, end: r.end, source: *right };
    steps::shard_step(node, *left, cmd, 0).await?;
    metrics::counter!("cleave_merges_started_total").increment(1);
    advance(node, op, Phase::Created).await?;
    Ok(true)
}

/// The right range, which the source captures (`Created`).
pub(super) fn moving_range(node: &Node, op: &Operation) -> Result<(String, Option<String>), ExecError> {
    let (_, r) = ranges(node, op)?;
    Ok((r.start, r.end))
}

/// The commit point, with the source's freeze timestamp kept for the cutover.
pub(super) fn commit(op: &Operation, frozen_ts: u64) -> MetaCommand {
    MetaCommand::CommitMerge { op_id: op.op_id, now_ms: now_ms(), frozen_ts }
}

/// `Committed`: the source gives its range up, the target serves the
/// joined one; then the source's replicas are deleted.
/// `since`: the source's freeze timestamp (as the commit recorded it).
pub(super) async fn cutover(node: &Node, op: &Operation, since: u64) -> Result<bool, ExecError> {
    let OpKind::Merge { left, right, right_replicas, .. } = &op.kind else {
        return Err(ExecError::Internal("not a merge".into()));
    };
    // As the commit recorded it, never this node's directory: a driver
    // whose commit was forwarded to a new metadata leader may not have
    // applied it yet, and would find the left range as it was.
    let merged = committed_range(node, op)?;
    let subsumed = ShardCommand::Subsumed { op_id: op.op_id, merged: merged.clone() };
    let absorb = ShardCommand::Absorb { op_id: op.op_id, ranges: vec![merged], since };
    // Stamped after every change the source made to the range (none after
    // its freeze), as a split target's activation is.
    node.ctx().clock.observe(since);
    let at = node.ctx().clock.now();
    // Both at once, one consensus round. The source's step is a courtesy
    // (stale routes learn the merged range at once, and its data goes
    // early): frozen, it already refuses the range's writes and
    // linearizable reads, and its replicas go once the merge is done. So
    // a source that lost its quorum after the commit cannot hold the merge
    // (and the left shard) up.
    let subsume = tokio::time::timeout(SUBSUME_WAIT, steps::shard_step(node, *right, subsumed, 0));
    let (done, active) = tokio::join!(subsume, steps::shard_step_at(node, *left, absorb, at, 0));
    active?;
    match done {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(op = op.op_id, shard = right, "merge source not told it was subsumed: {e}"),
        Err(_) => tracing::warn!(op = op.op_id, shard = right, "merge source not told it was subsumed in time"),
    }
    let pause = op.entered(Phase::Frozen).map(|f| now_ms().saturating_sub(f));
    if let Some(p) = pause {
        metrics::histogram!("cleave_merge_write_pause_seconds").record(p as f64 / 1000.0);
    }
    meta(node, MetaCommand::FinishOp { op_id: op.op_id, write_pause_ms: pause, now_ms: now_ms() }).await?;
    metrics::counter!("cleave_merges_committed_total").increment(1);
    node.meta_leader().refresh_directory().await;
    // After the merge is done, and a grace for the watches behind it (they
    // read the source's changes up to its freeze: `watch::plan`). A replica
    // not destroyed here (its node down, this leader gone) is one the
    // directory no longer lists, which its node deletes on its own
    // (`moves::gc`, after a grace as long).
    tokio::time::sleep(SOURCE_GRACE).await;
    for r in right_replicas {
        if let Err(e) = steps::destroy_replica_at(node, r.node_id, *right, r.replica_id).await {
            tracing::info!(op = op.op_id, group = right, node = r.node_id, "merged shard's replica left to gc: {e}");
        }
    }
    Ok(true)
}

/// How long the merged source outlives the merge.
const SOURCE_GRACE: std::time::Duration = crate::moves::gc::GRACE;

/// How long the cutover tries to tell the source it was subsumed.
const SUBSUME_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The merged range as the commit recorded it: from `op`, or from this
/// node's directory once it has applied the commit (a driver that committed
/// through another metadata leader waits for it).
fn committed_range(node: &Node, op: &Operation) -> Result<RangeDescriptor, ExecError> {
    let recorded = |o: &Operation| match &o.kind {
        OpKind::Merge { merged: Some(m), .. } => Some(m.clone()),
        _ => None,
    };
    recorded(op)
        .or_else(|| node.directory().ops.get(&op.op_id).and_then(recorded))
        .ok_or_else(|| ExecError::Unavailable("the merge's commit has not reached this node yet".into()))
}

/// `Aborted`: the capture ends and the target drops what it received.
pub(super) async fn cleanup(node: &Node, op: &Operation) -> Result<bool, ExecError> {
    let OpKind::Merge { left, right, .. } = &op.kind else {
        return Err(ExecError::Internal("not a merge".into()));
    };
    // Both always apply, and fence a late BeginCapture / BeginAbsorb.
    let op_id = op.op_id;
    steps::shard_step(node, *right, ShardCommand::EndCapture { op_id }, 0).await?;
    steps::shard_step(node, *left, ShardCommand::DropAbsorbed { op_id }, 0).await?;
    meta(node, MetaCommand::MarkCleaned { op_id }).await?;
    Ok(true)
}

/// Starts a merge of range `range_id` with its right-hand neighbour, as
/// metadata leader (forwarding there if needed).
pub async fn start(node: &Node, range_id: u64, reason: String, hops: u8) -> Result<OpId, ExecError> {
    if !node.meta_leader().is_leader() {
        let req = |hops| rpc::StartMerge { range_id, reason: reason.clone(), hops };
        return node.meta_leader().forward_to_leader(hops, req).await;
    }
    match node.router().propose_meta(MetaCommand::PlanMerge { range_id, reason, now_ms: now_ms() }, 0).await? {
        MetaResponse::Op(op) => Ok(op),
        other => Err(ExecError::Internal(format!("unexpected answer {other:?}"))),
    }
}
