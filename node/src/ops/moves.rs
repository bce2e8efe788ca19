//! The metadata leader's side of a replica move: one step per call, each
//! idempotent, resumed from the phase recorded in the directory (the loop
//! around it is [`super::supervisor`]; the next membership step is decided
//! by the pure [`super::move_plan`]).
//!
//! - `Planned`: create the new replica, empty, on the target node; it starts
//!   from the group's genesis state and waits for the leader.
//! - `Created`: add it to the group as a learner.
//! - `Learning`: wait until it has caught up (log or snapshot), move the
//!   leadership off the leaving replica, then record `Joint` *before*
//!   entering the joint configuration, so that no abort can race with it.
//! - `Joint`: enter and flatten the joint configuration (finishing whatever
//!   a previous driver left half done), then record the new replica set.
//!   If the new replica's node dies before the joint configuration is
//!   entered, the replica stays a learner that never catches up: while it
//!   is still only a learner the move is aborted ([`learner_stuck`]), so it
//!   does not hold its group and a `--max-moves` slot forever.
//! - `Committed`: delete the leaving replica and its data.
//! - `Aborted`: revert the configuration and delete the new replica.
//!
//! Every voter change (entering and flattening the joint configuration,
//! removing learners) carries the configuration id of the view it was
//! decided from, and the group's leader refuses it if the configuration has
//! changed since (`raft::membership`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cleave_metadata::{MetaCommand, MetaResponse, NodeId, OpId, OpKind, Operation, Phase, Progress, Replica, ShardId};

use super::faults::{hold_ms, hold_named_ms};
use super::move_plan::{self as plan, Step};
use super::supervisor::{abort, advance, now_ms};
use crate::moves::calls;
use crate::node::Node;
use crate::raft::membership::MembershipView;
use crate::rpc::{self, ExecError, MembershipChange};
use crate::split::steps;

/// How long creating and adding the new replica may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the learner may go without catching up any further.
const LEARN_STALL: Duration = Duration::from_secs(60);
/// How long the new replica's node may be silent, in `Joint` before the
/// joint configuration is entered, before the move is given up.
const TARGET_GONE: Duration = Duration::from_secs(10);
/// How long a move may stay in `Joint` with its new replica still a learner.
const JOINT_CATCH_UP: Duration = Duration::from_secs(60);

/// Why a move in `Joint` whose new replica is still only a learner (the
/// joint configuration not entered) should be given up, if it should: its
/// node is down (`target_up` false, silent for `target_silent`), or it has
/// not caught up within [`JOINT_CATCH_UP`] of entering the phase.
pub fn learner_stuck(target_up: bool, target_silent: Duration, in_phase: Duration) -> Option<&'static str> {
    if !target_up && target_silent >= TARGET_GONE {
        Some("the new replica's node is down and the joint configuration was not entered")
    } else if in_phase >= JOINT_CATCH_UP {
        Some("the new replica did not catch up before the joint configuration was entered")
    } else {
        None
    }
}

async fn meta(node: &Node, cmd: MetaCommand) -> Result<(), ExecError> {
    super::supervisor::meta(node, cmd).await.map(|_| ())
}

async fn observe(node: &Node, shard: ShardId) -> Result<MembershipView, ExecError> {
    calls::membership_step(node, shard, MembershipChange::Observe, 0).await
}

async fn change(node: &Node, shard: ShardId, change: MembershipChange) -> Result<(), ExecError> {
    calls::membership_step(node, shard, change, 0).await.map(|_| ())
}

/// Does the work of a move's current phase. `Ok(true)`: it moved on;
/// `Ok(false)`: nothing to do yet.
pub(super) async fn step(node: &Arc<Node>, op: &Operation, last_progress: &mut Instant) -> Result<bool, ExecError> {
    let OpKind::Move { shard_id, from, to, .. } = &op.kind else {
        return Err(ExecError::Internal("not a move".into()));
    };
    let (shard, from, to) = (*shard_id, from, to);
    let in_phase_ms = now_ms().saturating_sub(op.entered(op.phase).unwrap_or(0));
    // A test hold of `joint` keeps the group *in* its joint configuration
    // (it holds the flattening, not the entering).
    let hold = hold_ms(op.kind.name(), op.phase);
    let held = hold > 0 && in_phase_ms < hold;
    if held && op.phase != Phase::Joint {
        return Ok(false);
    }
    if matches!(op.phase, Phase::Planned | Phase::Created) && in_phase_ms > SETUP_TIMEOUT.as_millis() as u64 {
        return abort(node, op, "the new replica could not be set up in time", false).await;
    }
    match op.phase {
        Phase::Planned => {
            let state = calls::genesis(node, shard, 0).await?;
            let req = rpc::CreateGroup {
                group: shard,
                replica_id: to.replica_id,
                members: Vec::new(),
                state: Box::new(state),
                campaign: false,
                dir_version: node.directory().version,
            };
            node.router().node_call(to.node_id, req).await?;
            metrics::counter!("cleave_moves_started_total").increment(1);
            advance(node, op, Phase::Created).await?;
            Ok(true)
        }
        Phase::Created => {
            add_learner(node, shard, to).await?;
            *last_progress = Instant::now();
            advance(node, op, Phase::Learning).await?;
            Ok(true)
        }
        Phase::Learning => {
            let view = observe(node, shard).await?;
            match plan::forward(&view, from.replica_id, to.replica_id) {
                Step::WaitCommit => Ok(false),
                Step::AddLearner => add_learner(node, shard, to).await.map(|_| false),
                Step::WaitCatchUp { lag } => {
                    let improved = lag.is_some_and(|l| l < op.progress.forward_backlog || op.progress.bytes_total == 0);
                    if improved || last_progress.elapsed() > Duration::from_secs(1) {
                        report_progress(node, op, shard, from, to, lag).await?;
                    }
                    if improved {
                        *last_progress = Instant::now();
                    } else if last_progress.elapsed() > LEARN_STALL {
                        return abort(node, op, "the new replica stopped catching up", false).await;
                    }
                    Ok(false)
                }
                Step::TransferLeader { to: next } => {
                    change(node, shard, MembershipChange::TransferLeader { to: next }).await.map(|_| false)
                }
                Step::EnterJoint | Step::ChangeVoters { .. } | Step::Done => {
                    report_progress(node, op, shard, from, to, Some(0)).await?;
                    advance(node, op, Phase::Joint).await?;
                    Ok(true)
                }
                Step::RemoveLearner => Err(ExecError::Internal("unexpected revert step".into())),
            }
        }
        Phase::Joint => {
            let enter_hold = hold_named_ms("enter_joint");
            if enter_hold > 0 && in_phase_ms < enter_hold {
                return Ok(false);
            }
            let view = observe(node, shard).await?;
            let expected = view.config_id;
            match plan::forward(&view, from.replica_id, to.replica_id) {
                Step::WaitCommit => Ok(false),
                // Not joint, and the new replica only a learner (or not even that).
                Step::WaitCatchUp { .. } | Step::AddLearner => {
                    let (up, silent) = (
                        node.meta_leader().tracker().is_up(to.node_id),
                        node.meta_leader().tracker().silent_for(to.node_id),
                    );
                    if let Some(why) = learner_stuck(up, silent, Duration::from_millis(in_phase_ms)) {
                        return abort(node, op, why, true).await;
                    }
                    if matches!(plan::forward(&view, from.replica_id, to.replica_id), Step::AddLearner) {
                        add_learner(node, shard, to).await?;
                    }
                    Ok(false)
                }
                Step::TransferLeader { to: next } => {
                    change(node, shard, MembershipChange::TransferLeader { to: next }).await.map(|_| false)
                }
                Step::EnterJoint => {
                    let c = MembershipChange::EnterJoint { from: from.replica_id, to: to.replica_id, expected };
                    change(node, shard, c).await.map(|_| true)
                }
                Step::ChangeVoters { .. } if held => Ok(false),
                Step::ChangeVoters { voters } => {
                    change(node, shard, MembershipChange::ChangeVoters { voters, expected }).await.map(|_| true)
                }
                Step::Done => {
                    meta(node, MetaCommand::CommitMove { op_id: op.op_id, now_ms: now_ms() }).await?;
                    metrics::counter!("cleave_moves_committed_total").increment(1);
                    Ok(true)
                }
                Step::RemoveLearner => Err(ExecError::Internal("unexpected revert step".into())),
            }
        }
        Phase::Committed => {
            steps::destroy_replica_at(node, from.node_id, shard, from.replica_id).await?;
            meta(node, MetaCommand::FinishOp { op_id: op.op_id, write_pause_ms: None, now_ms: now_ms() }).await?;
            node.meta_leader().refresh_directory().await;
            Ok(true)
        }
        Phase::Aborted => {
            // A move aborted before its replica was ever added has nothing
            // to revert; otherwise undo whatever the group holds.
            if op.entered(Phase::Created).is_some() {
                let view = observe(node, shard).await?;
                let expected = view.config_id;
                match plan::revert(&view, from.replica_id, to.replica_id) {
                    Step::Done => {}
                    Step::ChangeVoters { voters } => {
                        change(node, shard, MembershipChange::ChangeVoters { voters, expected }).await?;
                        return Ok(false);
                    }
                    Step::RemoveLearner => {
                        let learners = [to.replica_id].into_iter().collect();
                        change(node, shard, MembershipChange::RemoveLearners { learners, expected }).await?;
                        return Ok(false);
                    }
                    _ => return Ok(false),
                }
            }
            steps::destroy_replica_at(node, to.node_id, shard, to.replica_id).await?;
            meta(node, MetaCommand::MarkCleaned { op_id: op.op_id }).await?;
            Ok(true)
        }
        Phase::Capturing | Phase::Frozen | Phase::Done => Ok(false),
    }
}

async fn add_learner(node: &Node, shard: ShardId, to: &Replica) -> Result<(), ExecError> {
    let raft_addr = node
        .dir_cache()
        .raft_addr_of(&node.directory(), to.node_id)
        .ok_or(ExecError::Unavailable(format!("node {} has no address", to.node_id)))?;
    let c = MembershipChange::AddLearner { replica: to.replica_id, node_id: to.node_id, raft_addr };
    change(node, shard, c).await
}

/// Records how far the new replica has got: its size against the leader's
/// (from heartbeats) and how many entries it lacks.
async fn report_progress(
    node: &Node,
    op: &Operation,
    shard: ShardId,
    from: &Replica,
    to: &Replica,
    lag: Option<u64>,
) -> Result<(), ExecError> {
    let leader = node
        .meta_leader()
        .tracker()
        .leader_report(shard)
        .or_else(|| node.meta_leader().tracker().report(from.node_id, shard));
    let target = node.meta_leader().tracker().report(to.node_id, shard);
    let progress = Progress {
        keys_copied: target.as_ref().and_then(|r| r.keys).unwrap_or(0),
        bytes_copied: target.as_ref().and_then(|r| r.size_bytes).unwrap_or(0),
        keys_total: leader.as_ref().and_then(|r| r.keys).unwrap_or(0),
        bytes_total: leader.as_ref().and_then(|r| r.size_bytes).unwrap_or(0).max(1),
        forward_backlog: lag.unwrap_or(op.progress.forward_backlog),
    };
    if progress != op.progress {
        meta(node, MetaCommand::ReportProgress { op_id: op.op_id, progress }).await?;
    }
    Ok(())
}

/// Starts moving `shard_id`'s replica from `from_node` to `to_node`, as
/// metadata leader (forwarding there if needed).
pub async fn start(
    node: &Node,
    shard_id: ShardId,
    from_node: NodeId,
    to_node: NodeId,
    reason: String,
    hops: u8,
) -> Result<OpId, ExecError> {
    if !node.meta_leader().is_leader() {
        let req = |hops| rpc::StartMove { shard_id, from_node, to_node, reason: reason.clone(), hops };
        return node.meta_leader().forward_to_leader(hops, req).await;
    }
    let cmd = MetaCommand::PlanMove { shard_id, from_node, to_node, reason, now_ms: now_ms() };
    match node.router().propose_meta(cmd, 0).await? {
        MetaResponse::Op(op) => Ok(op),
        other => Err(ExecError::Internal(format!("unexpected answer {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_learner_whose_node_died_before_the_joint_configuration_is_given_up() {
        let s = Duration::from_secs;
        assert_eq!(learner_stuck(true, s(0), s(5)), None);
        assert_eq!(learner_stuck(false, s(4), s(5)), None, "a node silent for a moment is not gone");
        assert!(learner_stuck(false, TARGET_GONE, s(5)).is_some());
        // Alive but never catching up: bounded too.
        assert!(learner_stuck(true, s(0), JOINT_CATCH_UP).is_some());
    }
}
