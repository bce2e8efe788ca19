//! Automatic splits, decided by the metadata leader from heartbeat figures.
//!
//! A range is split when its shard holds more than `split_size` bytes, or
//! when its request rate stays above `split_qps` for `split_qps_window`
//! seconds (then at the median of recently requested keys, so the load
//! divides). One operation per range, at most `max_splits` at once, and no
//! split of a range that a split created less than `cooldown` ago.
//!
//! The decision ([`plan`]) is pure and tested on its own; [`run`] feeds it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cleave_metadata::{Directory, OpKind, Phase, RangeId, RangeState};

use crate::node::Node;

/// Thresholds for automatic splits.
#[derive(Clone, Debug)]
pub struct SplitPolicy {
    pub split_size: u64,
    pub split_qps: f64,
    pub split_qps_window: Duration,
    pub cooldown: Duration,
    pub max_splits: usize,
}

/// A split the rebalancer wants.
#[derive(Debug, PartialEq, Eq)]
pub struct Want {
    pub range_id: RangeId,
    /// "size" or "load".
    pub reason: &'static str,
}

/// What the rebalancer knows of one shard.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShardLoad {
    pub size_bytes: u64,
    /// Seconds the request rate has been above `split_qps` without a break.
    pub hot_for: Duration,
}

/// Picks the splits to start now.
pub fn plan(dir: &Directory, loads: &HashMap<u64, ShardLoad>, policy: &SplitPolicy, now_ms: u64) -> Vec<Want> {
    let running = dir.active_ops().filter(|op| matches!(op.kind, OpKind::Split { .. })).count();
    let mut budget = policy.max_splits.saturating_sub(running);
    let mut wants = Vec::new();
    for r in dir.ranges.values() {
        if budget == 0 {
            break;
        }
        if r.state != RangeState::Active || recently_split(dir, r.range_id, policy.cooldown, now_ms) {
            continue;
        }
        // Only ranges that are alone in their shard carry the shard's figures.
        if dir.ranges.values().filter(|o| o.shard_id == r.shard_id).count() != 1 {
            continue;
        }
        let Some(load) = loads.get(&r.shard_id) else { continue };
        let reason = if load.size_bytes > policy.split_size {
            "size"
        } else if load.hot_for >= policy.split_qps_window {
            "load"
        } else {
            continue;
        };
        wants.push(Want { range_id: r.range_id, reason });
        budget -= 1;
    }
    wants
}

/// Whether a split that created or cut `range` finished within `cooldown`.
fn recently_split(dir: &Directory, range: RangeId, cooldown: Duration, now_ms: u64) -> bool {
    dir.ops.values().any(|op| {
        let OpKind::Split { range_id, new_range_id, .. } = &op.kind else { return false };
        (*range_id == range || *new_range_id == range)
            && op.entered(Phase::Done).is_some_and(|t| now_ms.saturating_sub(t) < cooldown.as_millis() as u64)
    })
}

/// Runs the rebalancer while this node leads the metadata group.
pub async fn run(node: Arc<Node>, policy: SplitPolicy) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut hot_since: HashMap<u64, std::time::Instant> = HashMap::new();
    loop {
        tick.tick().await;
        if !node.confirmed_meta_leader().await {
            hot_since.clear();
            continue;
        }
        let dir = node.directory();
        let mut loads = HashMap::new();
        for shard in dir.shards.keys() {
            let Some(report) = node.tracker.leader_report(*shard) else { continue };
            let hot = report.qps > policy.split_qps;
            let hot_for = if hot {
                hot_since.entry(*shard).or_insert_with(std::time::Instant::now).elapsed()
            } else {
                hot_since.remove(shard);
                Duration::ZERO
            };
            loads.insert(*shard, ShardLoad { size_bytes: report.size_bytes.unwrap_or(0), hot_for });
        }
        for want in plan(&dir, &loads, &policy, crate::split::driver::now_ms()) {
            match node.start_split(Some(want.range_id), None, want.reason.to_string(), 0).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use cleave_metadata::MetaCommand;

    fn policy() -> SplitPolicy {
        SplitPolicy {
            split_size: 1000,
            split_qps: 100.0,
            split_qps_window: Duration::from_secs(10),
            cooldown: Duration::from_secs(60),
            max_splits: 1,
        }
    }

    fn dir() -> Directory {
        Directory::bootstrap(&[(1, "a".into()), (2, "b".into()), (3, "c".into())], 3)
    }

    #[test]
    fn splits_big_or_persistently_hot_ranges_only() {
        let d = dir();
        let small = HashMap::from([(1, ShardLoad { size_bytes: 10, hot_for: Duration::from_secs(3) })]);
        assert!(plan(&d, &small, &policy(), 0).is_empty());
        let big = HashMap::from([(1, ShardLoad { size_bytes: 5000, hot_for: Duration::ZERO })]);
        assert_eq!(plan(&d, &big, &policy(), 0), vec![Want { range_id: 1, reason: "size" }]);
        let hot = HashMap::from([(1, ShardLoad { size_bytes: 10, hot_for: Duration::from_secs(10) })]);
        assert_eq!(plan(&d, &hot, &policy(), 0), vec![Want { range_id: 1, reason: "load" }]);
    }

    #[test]
    fn respects_busy_ranges_concurrency_and_cooldown() {
        let mut d = dir();
        let big = HashMap::from([(1, ShardLoad { size_bytes: 5000, hot_for: Duration::ZERO })]);
        let op = match d
            .apply(&MetaCommand::PlanSplit {
                range_id: 1,
                split_key: "m".into(),
                target_nodes: vec![1, 2, 3],
                reason: "admin".into(),
                now_ms: 0,
            })
            .unwrap()
        {
            cleave_metadata::MetaResponse::Op(op) => op,
            other => panic!("{other:?}"),
        };
        assert!(plan(&d, &big, &policy(), 0).is_empty(), "range busy and the one split slot taken");
        for (from, to) in
            [(Phase::Planned, Phase::Created), (Phase::Created, Phase::Capturing), (Phase::Capturing, Phase::Frozen)]
        {
            d.apply(&MetaCommand::AdvanceOp { op_id: op, from, to, now_ms: 0 }).unwrap();
        }
        d.apply(&MetaCommand::CommitSplit { op_id: op, now_ms: 0 }).unwrap();
        d.apply(&MetaCommand::FinishOp { op_id: op, write_pause_ms: None, now_ms: 1_000 }).unwrap();
        let loads: HashMap<u64, ShardLoad> =
            d.shards.keys().map(|s| (*s, ShardLoad { size_bytes: 5000, hot_for: Duration::ZERO })).collect();
        assert!(plan(&d, &loads, &policy(), 30_000).is_empty(), "both halves in cooldown");
        assert_eq!(plan(&d, &loads, &policy(), 61_001).len(), 1, "cooldown over, one slot");
    }
}
