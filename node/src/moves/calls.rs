//! Node-to-node calls of replica moves and leader transfers: membership
//! steps carried out at a group's leader, a group's genesis state, and the
//! admin entry points of leader transfers and decommissioning (a move is
//! started by `ops::moves`).

use std::time::{Duration, Instant};

use cleave_metadata::{MetaCommand, MetaError, NodeId, NodeState, OpId, OpKind, ShardId};

use crate::node::Node;
use crate::raft::membership::{MembershipError, MembershipView};
use crate::raft::{GroupRaft, ReplicaNode, SmState};
use crate::rpc::{self, ExecError, MembershipChange};

/// How long one membership change may take to commit.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a leader transfer may take before the API gives up.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);

/// The running move of `shard`, if one runs.
pub fn moving(dir: &cleave_metadata::Directory, shard: ShardId) -> Option<OpId> {
    dir.active_ops()
        .find(|op| matches!(&op.kind, OpKind::Move { shard_id, .. } if *shard_id == shard))
        .map(|op| op.op_id)
}

/// Carries out `change` on `g`, which believes it leads.
async fn execute(g: &GroupRaft, change: &MembershipChange) -> Result<(), MembershipError> {
    match change.clone() {
        // A look the driver decides from (an abort, say) must come from the
        // leader, not from a replica that only believes it leads: confirm
        // with a quorum first.
        MembershipChange::Observe => g.read_barrier().await.map_err(|e| match e {
            crate::raft::ReadError::NotLeader { leader } => MembershipError::NotLeader { leader },
            crate::raft::ReadError::NoQuorum(m) => MembershipError::Refused(format!("leadership not confirmed: {m}")),
            crate::raft::ReadError::Fatal(m) => MembershipError::Fatal(m),
        }),
        MembershipChange::AddLearner { replica, node_id, raft_addr } => {
            g.add_learner(replica, ReplicaNode { node_id, raft_addr }).await
        }
        MembershipChange::EnterJoint { from, to, expected } => g.enter_joint(from, to, expected).await,
        MembershipChange::ChangeVoters { voters, expected } => g.change_voters(voters, expected).await,
        MembershipChange::RemoveLearners { learners, expected } => g.remove_learners(learners, expected).await,
        MembershipChange::TransferLeader { to } => g.transfer_leader(to).await,
    }
}

/// Carries out `change` at `group`'s leader (here, or forwarded) and
/// answers with the group's configuration afterwards.
pub async fn membership_step(
    node: &Node,
    group: ShardId,
    change: MembershipChange,
    hops: u8,
) -> Result<MembershipView, ExecError> {
    let leader = match node.group(group) {
        Some(g) if g.status().is_leader => {
            if group == cleave_metadata::META_GROUP && matches!(change, MembershipChange::TransferLeader { .. }) {
                // The new leader may win its election within the cached
                // confirmation's life: act on no cached confirmation.
                node.meta_leader().tracker().unconfirm();
            }
            match tokio::time::timeout(CHANGE_TIMEOUT, execute(&g, &change)).await {
                Err(_) => return Err(ExecError::Timeout(format!("membership change of group {group}"))),
                Ok(Ok(())) => return Ok(g.membership()),
                Ok(Err(MembershipError::NotLeader { leader })) => leader.map(|l| l.node_id),
                Ok(Err(MembershipError::Refused(m))) => return Err(ExecError::Refused(m)),
                Ok(Err(MembershipError::Fatal(m))) => return Err(ExecError::Internal(m)),
            }
        }
        Some(g) => g.status().leader.map(|l| l.node_id),
        None => None,
    };
    if leader == Some(node.id()) {
        return Err(ExecError::NoLeader { group });
    }
    let req = |hops| rpc::Membership { group, change: change.clone(), hops };
    node.router().forward(group, hops, leader, crate::router::internal_deadline(), req).await
}

/// The state `group` was created with, from this node's replica or another's.
pub async fn genesis(node: &Node, group: ShardId, hops: u8) -> Result<SmState, ExecError> {
    if node.group(group).is_some() {
        return GroupRaft::genesis(node.ctx(), group).map_err(|e| ExecError::Internal(e.to_string()));
    }
    let req = |hops| rpc::Genesis { group, hops };
    node.router().forward(group, hops, None, crate::router::internal_deadline(), req).await
}

/// `POST /admin/transfer-leader`: like [`transfer_leader`], but
/// refused while a move of the shard runs (its driver moves leadership
/// itself, and the two would ping-pong it during `Learning`). Judged on
/// the metadata leader's directory when it answers, else on this node's.
pub async fn admin_transfer_leader(node: &Node, shard_id: ShardId, to_node: NodeId) -> Result<(), ExecError> {
    let dir = match node.meta_leader().cluster_view(0).await {
        Ok(v) => v.directory,
        Err(_) => (*node.directory()).clone(),
    };
    if let Some(op_id) = moving(&dir, shard_id) {
        return Err(ExecError::Meta(MetaError::ShardBusy { shard_id, op_id }));
    }
    transfer_leader(node, shard_id, to_node).await
}

/// Makes `to_node`'s replica the leader of `shard_id`; returns once it
/// leads (or fails after a deadline).
pub async fn transfer_leader(node: &Node, shard_id: ShardId, to_node: NodeId) -> Result<(), ExecError> {
    let dir = node.directory();
    let group = dir.group(shard_id).ok_or(ExecError::Meta(MetaError::UnknownShard(shard_id)))?;
    let to = group
        .replica_on(to_node)
        .map(|r| r.replica_id)
        .ok_or_else(|| ExecError::BadRequest(format!("node {to_node} holds no replica of shard {shard_id}")))?;
    let deadline = Instant::now() + TRANSFER_TIMEOUT;
    loop {
        let view = match membership_step(node, shard_id, MembershipChange::Observe, 0).await {
            Ok(v) => Some(v),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(shard_id, "transfer: observing: {e}");
                None
            }
            Err(e) => return Err(e),
        };
        if let Some(v) = view {
            if v.leader == Some(to) && v.is_leader {
                return Ok(());
            }
            if !v.configs.last().is_some_and(|c| c.contains(&to)) {
                return Err(ExecError::BadRequest(format!(
                    "the replica on node {to_node} is not a voter of shard {shard_id}"
                )));
            }
            if v.leader != Some(to) {
                if let Err(e) = membership_step(node, shard_id, MembershipChange::TransferLeader { to }, 0).await {
                    tracing::debug!(shard_id, "transfer: {e}");
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(ExecError::Timeout(format!("shard {shard_id}: node {to_node} did not take over in time")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Marks `node_id` decommissioning: the replica balancer moves its replicas
/// away, then marks it removed.
pub async fn decommission(node: &Node, node_id: NodeId) -> Result<(), ExecError> {
    node.router().propose_meta(MetaCommand::SetNodeState { node_id, state: NodeState::Decommissioning }, 0).await?;
    Ok(())
}
