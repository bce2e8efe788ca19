//! The rebalancer's loop on the metadata leader (confirmed: see
//! `meta::Node::confirmed_meta_leader`): every tick it gathers liveness,
//! leadership and which listed replicas live nodes do not report holding
//! from the heartbeat tracker, asks
//! [`super::balance::plan`] what to do, and starts it (moves become
//! operations driven by the operations supervisor; leader transfers are
//! done directly, they take milliseconds).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use cleave_metadata::{MetaCommand, NodeState};

use super::balance::{missing_on, plan, Action, BalancePolicy, Missing, NodeHealth};
use crate::node::Node;

/// How often the rebalancer looks.
const TICK: Duration = Duration::from_secs(1);

/// Runs the rebalancer while this node leads the metadata group.
pub async fn run(node: Arc<Node>, policy: BalancePolicy) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // (group, node) → since when the node's reports lack its listed replica.
    let mut missing_since: HashMap<(u64, u64), Instant> = HashMap::new();
    loop {
        tick.tick().await;
        if !node.confirmed_meta_leader().await {
            missing_since.clear();
            continue;
        }
        // A new metadata leader waits for a round of heartbeats first.
        if !node.tracker.settled() {
            missing_since.clear();
            continue;
        }
        let dir = node.directory();
        let now = Instant::now();
        let mut missing = Missing::new();
        for n in dir.nodes.values().filter(|n| n.state != NodeState::Removed && node.tracker.is_up(n.id)) {
            let Some(held) = node.tracker.held(n.id) else { continue };
            for group in missing_on(&dir, n.id, &held) {
                let since = *missing_since.entry((group, n.id)).or_insert_with(|| {
                    tracing::info!(group, node = n.id, "a listed replica is not reported by its node");
                    now
                });
                missing.insert((group, n.id), now.duration_since(since));
            }
        }
        missing_since.retain(|k, _| missing.contains_key(k));
        let health: Vec<NodeHealth> = dir
            .nodes
            .values()
            .filter(|n| n.state != NodeState::Removed)
            .map(|n| {
                let silent_for = node.tracker.silent_for(n.id);
                NodeHealth { id: n.id, up: node.tracker.is_up(n.id), silent_for }
            })
            .collect();
        let leaders: HashMap<u64, u64> = node.tracker.leaders().into_iter().collect();
        for action in plan(&dir, &health, &leaders, &missing, &policy) {
            match action {
                Action::Move { shard, from, to, reason } => {
                    match node.start_move(shard, from, to, reason.to_string(), 0).await {
                        Ok(op) => tracing::info!(shard, from, to, reason, op, "rebalancer started a move"),
                        Err(e) => tracing::debug!(shard, from, to, "move not started: {e}"),
                    }
                }
                Action::TransferLeader { shard, to } => match node.transfer_leader(shard, to).await {
                    Ok(()) => {
                        tracing::info!(shard, to, "rebalancer moved a leader");
                        metrics::counter!("cleave_leader_transfers_total").increment(1);
                    }
                    Err(e) => tracing::debug!(shard, to, "leader transfer: {e}"),
                },
                Action::MarkRemoved { node: id } => {
                    let cmd = MetaCommand::SetNodeState { node_id: id, state: NodeState::Removed };
                    match node.propose_meta(cmd, 0).await {
                        Ok(_) => tracing::info!(node = id, "decommissioned node removed"),
                        Err(e) => tracing::debug!(node = id, "marking removed: {e}"),
                    }
                }
            }
        }
    }
}
