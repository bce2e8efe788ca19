//! The automatic split planner: which ranges the metadata leader splits on
//! its own, decided from heartbeat figures.
//!
//! A range is split when its shard holds more than `split_size` bytes, or
//! when its request rate stays above `split_qps` for `split_qps_window`
//! seconds (then at the median of recently requested keys, so the load
//! divides). Only a range alone in its shard is split (it carries the
//! shard's figures), one operation at a time, at most `max_splits` at
//! once, and no range that a split created or cut less than `cooldown` ago.
//!
//! The decision ([`plan`]) is pure and tested on its own;
//! [`super::run::auto_split`] feeds it.

use std::collections::HashMap;
use std::time::Duration;

use cleave_metadata::{Directory, OpKind, Phase, RangeId, RangeState};

/// Thresholds for automatic splits.
#[derive(Clone, Debug)]
pub struct SplitPolicy {
    pub split_size: u64,
    pub split_qps: f64,
    pub split_qps_window: Duration,
    pub cooldown: Duration,
    pub max_splits: usize,
}

/// A split the planner wants.
#[derive(Debug, PartialEq, Eq)]
pub struct Want {
    pub range_id: RangeId,
    /// "size" or "load".
    pub reason: &'static str,
}

/// What the planner knows of one shard.
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
