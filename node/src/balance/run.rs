//! The two balancing loops on the metadata leader (confirmed: see
//! `MetaLeader::confirmed`), each feeding a pure planner:
//!
//! - [`replicas`]: every tick it gathers liveness, leadership and which
//!   listed replicas live nodes do not report holding from the heartbeat
//!   tracker, asks [`super::replicas::plan`] what to do, and starts it
//!   (moves become operations driven by the operations supervisor; leader
//!   transfers are done directly, they take milliseconds).
//! - [`auto_split`]: every second it gathers each shard's size and how
//!   long it has been hot, asks [`super::auto_split::plan`] which ranges to
//!   split, and starts those splits.
//! - [`auto_merge`]: every few seconds it gathers each shard's size and
//!   request rate, asks [`super::auto_merge::plan`] which neighbours to
//!   merge, and starts those merges.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use cleave_metadata::{MetaCommand, NodeState};

use super::auto_merge::{plan as plan_merges, MergePolicy, ShardFigures};
use super::auto_split::{plan as plan_splits, ShardLoad, SplitPolicy};
use super::replicas::{missing_on, plan, Action, BalancePolicy, Missing, NodeHealth};
use crate::node::Node;

/// How often the replica balancer looks.
const TICK: Duration = Duration::from_secs(1);

/// Runs the replica balancer while this node leads the metadata group.
pub async fn replicas(node: Arc<Node>, policy: BalancePolicy) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // (group, node) → since when the node's reports lack its listed replica.
    let mut missing_since: HashMap<(u64, u64), Instant> = HashMap::new();
    loop {
        tick.tick().await;
        if !node.meta_leader().confirmed().await {
            missing_since.clear();
            continue;
        }
        // A new metadata leader waits for a round of heartbeats first.
        if !node.meta_leader().tracker().settled() {
            missing_since.clear();
            continue;
        }
        let dir = node.directory();
        let now = Instant::now();
        let mut missing = Missing::new();
        for n in
            dir.nodes.values().filter(|n| n.state != NodeState::Removed && node.meta_leader().tracker().is_up(n.id))
        {
            let Some(held) = node.meta_leader().tracker().held(n.id) else { continue };
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
                let silent_for = node.meta_leader().tracker().silent_for(n.id);
                NodeHealth { id: n.id, up: node.meta_leader().tracker().is_up(n.id), silent_for }
            })
            .collect();
        let leaders: HashMap<u64, u64> = node.meta_leader().tracker().leaders().into_iter().collect();
        for action in plan(&dir, &health, &leaders, &missing, &policy) {
            match action {
                Action::Move { shard, from, to, reason } => {
                    match crate::ops::moves::start(&node, shard, from, to, reason.to_string(), 0).await {
                        Ok(op) => tracing::info!(shard, from, to, reason, op, "replica balancer started a move"),
                        Err(e) => tracing::debug!(shard, from, to, "move not started: {e}"),
                    }
                }
                Action::TransferLeader { shard, to } => {
                    match crate::moves::calls::transfer_leader(&node, shard, to).await {
                        Ok(()) => {
                            tracing::info!(shard, to, "replica balancer moved a leader");
                            metrics::counter!("cleave_leader_transfers_total").increment(1);
                        }
                        Err(e) => tracing::debug!(shard, to, "leader transfer: {e}"),
                    }
                }
                Action::MarkRemoved { node: id } => {
                    let cmd = MetaCommand::SetNodeState { node_id: id, state: NodeState::Removed };
                    match node.router().propose_meta(cmd, 0).await {
                        Ok(_) => tracing::info!(node = id, "decommissioned node removed"),
                        Err(e) => tracing::debug!(node = id, "marking removed: {e}"),
                    }
                }
            }
        }
    }
}

/// Runs the automatic split planner while this node leads the metadata group.
pub async fn auto_split(node: Arc<Node>, policy: SplitPolicy) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut hot_since: HashMap<u64, std::time::Instant> = HashMap::new();
    loop {
        tick.tick().await;
        if !node.meta_leader().confirmed().await {
            hot_since.clear();
            continue;
        }
        let dir = node.directory();
        let mut loads = HashMap::new();
        for shard in dir.shards.keys() {
            let Some(report) = node.meta_leader().tracker().leader_report(*shard) else { continue };
            let hot = report.qps > policy.split_qps;
            let hot_for = if hot {
                hot_since.entry(*shard).or_insert_with(std::time::Instant::now).elapsed()
            } else {
                hot_since.remove(shard);
                Duration::ZERO
            };
            loads.insert(*shard, ShardLoad { size_bytes: report.size_bytes.unwrap_or(0), hot_for });
        }
        for want in plan_splits(&dir, &loads, &policy, crate::ops::now_ms()) {
            match crate::ops::split::start(&node, Some(want.range_id), None, want.reason.to_string(), 0).await {
                Ok(op) => {
                    tracing::info!(range = want.range_id, reason = want.reason, op, "automatic split started");
                    if let Some(shard) = dir.range(want.range_id).map(|r| r.shard_id) {
                        hot_since.remove(&shard);
                    }
                }
                Err(e) => tracing::debug!(range = want.range_id, "automatic split not started: {e}"),
            }
        }
    }
}

/// Runs the automatic merge planner while this node leads the metadata group.
pub async fn auto_merge(node: Arc<Node>, policy: MergePolicy) {
    if policy.merge_size == 0 {
        return;
    }
    let mut tick = tokio::time::interval(MERGE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // A new metadata leader waits for a round of heartbeats first: a
        // shard it has no figures for is never merged.
        if !node.meta_leader().confirmed().await || !node.meta_leader().tracker().settled() {
            continue;
        }
        let dir = node.directory();
        let figures: HashMap<u64, ShardFigures> = dir
            .shards
            .keys()
            .filter_map(|shard| {
                let r = node.meta_leader().tracker().leader_report(*shard)?;
                Some((*shard, ShardFigures { size_bytes: r.size_bytes?, qps: r.qps }))
            })
            .collect();
        let live = node.meta_leader().tracker().live_nodes();
        for range_id in plan_merges(&dir, &figures, &policy, crate::ops::now_ms(), &live) {
            match crate::ops::merge::start(&node, range_id, "size".into(), 0).await {
                Ok(op) => tracing::info!(range = range_id, op, "automatic merge started"),
                Err(e) => tracing::debug!(range = range_id, "automatic merge not started: {e}"),
            }
        }
    }
}

/// How often the merge planner looks (merges are never urgent).
const MERGE_TICK: Duration = Duration::from_secs(5);
